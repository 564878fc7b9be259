#!/usr/bin/env bash
# One call on a lent GPU machine (no registry there): install endokern in place, run the GPU tests and
# the GPU kernel benchmark, leave everything under $OUT (default: benchmarks/results).
# Cut Cross-Entropy and Liger-Kernel wheels, if carried in wheels/, are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
ls wheels/*.whl >/dev/null 2>&1 && python -m pip install --no-deps wheels/*.whl
python -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { tail "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python -m pytest -m gpu -q 2>&1 | tee "$OUT/gpu-tests.txt"
gpu=$(python -c "import torch,re; print(re.sub(r'[^A-Za-z0-9]+','-',torch.cuda.get_device_name()).strip('-').lower())")
python benchmarks/kernels.py --device cuda --out "$OUT/$gpu-kernels.json" "$@" 2>&1 | tee "$OUT/$gpu-kernels.txt"
