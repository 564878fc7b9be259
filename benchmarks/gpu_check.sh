#!/usr/bin/env bash
# The one-call GPU check: on a lent GPU machine with no network, in well under 8 minutes, from the source tree
# (no install, no C++ build):
#   1. tests/ops/test_soft_values.py on CUDA (every test, not only -m gpu)           -> tests.txt
#   2. benchmarks/test_kernels.py (pytest-benchmark) at the SPEC shapes: bare matmul, naive, torch, triton,
#      Cut Cross-Entropy and Liger (their wheels carried in .whl/)                    -> kernels.{json,txt}
#   3. the launch-config ablation of triton_backend.GPU_CANDIDATES, N=32768 D=4096 V=128256 -> ablation.{json,txt}
#   4. benchmarks/e2e.py --device cuda --config qwen2.5-0.5b --examples 512          -> e2e.{json,txt}
# plus gpu.txt (device, driver, versions): 8 files under $OUT (default benchmarks/results/gpu-check).
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine (device tool: carry .whl)
#   bash benchmarks/gpu_check.sh --dry-run    # here: every step on the CPU with tiny shapes (Triton interpreter)
#
# Wheels: python3 -m pip download --no-deps --only-binary=:all: -d .whl cut-cross-entropy==25.1.1 liger-kernel==0.8.5
# (pure Python, under 1 MB; .whl/ is git-ignored). Each step has its own timeout; a failed step is reported and
# the next one runs; the exit status is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
case "${1:-}" in
    "") ;;
    --dry-run) DRY=1 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (the only one is --dry-run)" >&2; exit 2 ;;
esac
OUT=${OUT:-benchmarks/results/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PIP_NO_INDEX=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export TRITON_DEFAULT_FP_FUSION=1
SITE=$(mktemp -d)
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl \
        || echo "# wheels in .whl/ did not install: cce and liger will be missing"
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"

failed=0
step() {  # step NAME SECONDS LOG COMMAND...: run with a timeout, tee its output, count a failure
    local name=$1 limit=$2 log=$3
    shift 3
    local start=$SECONDS
    echo "## $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    echo "## $name: exit $rc after $((SECONDS - start))s" | tee -a "$log"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

if [ $DRY -eq 1 ]; then
    export TRITON_INTERPRET=1
    DEV=cpu
    QUICK=1
    ABLATION="37:40:1500"
    CONFIGS=default,128x128
    E2E=(--config qwen2.5-tiny --examples 8 --naive-batches 1,2)
    TEST_LIMIT=900 TESTK=(-k "triton and not simd")
else
    DEV=cuda
    QUICK=""
    ABLATION="32768:4096:128256"
    CONFIGS=$($PY -c "from endokern.ops.triton_backend import GPU_CANDIDATES as c; print(','.join(c))")
    E2E=(--config qwen2.5-0.5b --examples 512)
    TEST_LIMIT=150 TESTK=()
fi

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
    $PY -c "import sys, torch, triton, transformers; print(sys.version.split()[0], 'torch', torch.__version__, \
'triton', triton.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
    $PY -c "import cut_cross_entropy; print('cce', cut_cross_entropy.__file__)" 2>&1 | tail -1
    $PY -c "import liger_kernel; print('liger', liger_kernel.__file__)" 2>&1 | tail -1
    git log -1 --format='endokern %H %s' 2>/dev/null || true
} 2>&1 | tee "$OUT/gpu.txt"

step tests "$TEST_LIMIT" "$OUT/tests.txt" \
    $PY -m pytest -q -p no:cacheprovider tests/ops/test_soft_values.py "${TESTK[@]}"
step kernels 150 "$OUT/kernels.txt" \
    env ${QUICK:+ENDOKERN_BENCH_QUICK=1} $PY -m pytest -q -p no:cacheprovider benchmarks/test_kernels.py -k "$DEV-" \
    --benchmark-group-by=group --benchmark-columns=median,min,rounds --benchmark-json="$OUT/kernels.json"
step ablation 90 "$OUT/ablation.txt" \
    $PY benchmarks/kernel_bench.py --device $DEV --shapes "$ABLATION" --dtypes bf16 --reps 5 --no-memory \
    --contenders matmul --configs "$CONFIGS" --out "$OUT/ablation.json"
step e2e 80 "$OUT/e2e.txt" \
    $PY benchmarks/e2e.py --device $DEV "${E2E[@]}" --out "$OUT/e2e.json"

rm -rf "$SITE"
echo "# gpu_check: $failed failed step(s); results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $failed
