#!/usr/bin/env bash
# The one-call GPU check (docs/gpu-check.md): on a lent GPU machine with no network, no pip and no pytest, one call
# of at most 9 minutes returns everything it measured, whatever fails. The steps are Python scripts in
# benchmarks/gpu/ (run_steps.py lists them and their caps); this file only prepares the environment:
#   - Cut Cross-Entropy and Liger-Kernel from the wheels in the git-ignored .whl/, unpacked with
#     `python3 -m zipfile -e` into a temporary folder on PYTHONPATH (no pip);
#   - endokern from the source tree (no install, no C++ build);
#   - no network: HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE, PIP_NO_INDEX.
#
#   python benchmarks/gpu/stamp_commit.py          # here, before the device call (writes .gpu-check/commit.json)
#   bash benchmarks/gpu_check.sh                   # on the GPU machine: results in $OUT (the device tool sets it)
#   bash benchmarks/gpu_check.sh --dry-run         # here: the same steps on the CPU, small shapes, Triton interpreter
#   bash benchmarks/gpu_check.sh --out DIR [--steps decisive,ablation] [--budget S] [--wheels DIR]
#
# Results: preflight.json, compile.jsonl, correctness.jsonl, kernels.jsonl, probes.jsonl, e2e.jsonl, summary.md,
# log.txt. Exit status: the number of steps that did not end cleanly (a failed row does not count).
set -uo pipefail
cd "$(dirname "$0")/.."
ARGS=()
OUTDIR=${OUT:-}
WHEELS=.whl
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) ARGS+=(--dry-run) ;;
        --out) OUTDIR=$2; shift ;;
        --wheels) WHEELS=$2; shift ;;
        --steps|--budget|--commit-file) ARGS+=("$1" "$2"); shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[ -n "$OUTDIR" ] || OUTDIR=$(mktemp -d /tmp/endokern-gpu-check.XXXXXX)
PY=${PYTHON:-python3}  # the interpreter that has torch (the device image's python3)
export PIP_NO_INDEX=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}  # Triton's default, said out loud (3.9 warns otherwise)
SITE=$(mktemp -d /tmp/endokern-gpu-check-site.XXXXXX)
trap 'rm -rf "$SITE"' EXIT
for whl in "$WHEELS"/*.whl; do
    [ -e "$whl" ] || continue
    $PY -m zipfile -e "$whl" "$SITE" || echo "# $whl did not unpack: its contender will be a failed row" >&2
done
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
$PY benchmarks/gpu/run_steps.py --out "$OUTDIR" "${ARGS[@]}"
