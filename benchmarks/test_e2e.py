"""The end-to-end benchmark on pytest-benchmark: EndoRM against Hugging Face naive scoring (benchmarks/e2e.py),
one group per device and model, so ``--benchmark-group-by=group`` prints them side by side.

    python -m pytest benchmarks/test_e2e.py --benchmark-group-by=group      # CPU: SmolLM2-135M-Instruct, 64 LLMBar pairs
    ENDOKERN_BENCH_QUICK=1 python -m pytest benchmarks/test_e2e.py          # a two-layer Qwen2.5-vocabulary model

GPU rows (random-weight Qwen2.5-0.5B, 512 examples) skip without CUDA. Both contenders score the same token ids;
their summed log-probabilities must agree before anything is timed. ``extra_info`` holds tokens per second,
examples per second, the peak extra memory of one pass and, for endokern, the speed-up over hf-naive.
ENDOKERN_BENCH_PAIRS sets the CPU run's LLMBar pairs (default 64).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import best_naive_batch, build, naive_logprobs, timed  # noqa: E402

QUICK = os.environ.get("ENDOKERN_BENCH_QUICK", "0") not in ("", "0")
PAIRS = int(os.environ.get("ENDOKERN_BENCH_PAIRS", "64"))
ROWS = {  # device -> build() arguments
    "cpu": dict(config="qwen2.5-tiny", examples=4) if QUICK else dict(pairs=PAIRS),
    "cuda": dict(config="qwen2.5-tiny", examples=64) if QUICK else dict(config="qwen2.5-0.5b", examples=512),
}
_built = {}
_seconds = {}


def _setup(device_name):
    if device_name not in _built:
        _built.clear()
        device = torch.device(device_name)
        rm, encoded, label, unit = build(device, **ROWS[device_name])
        batch = best_naive_batch(rm, encoded, [1, 2, 4] if device.type == "cpu" else [1, 2, 4, 8, 16], device)
        ours = [r.logprob for r in rm.score_encoded(encoded)]
        naive = naive_logprobs(rm.model, encoded, batch, device)
        worst = max(abs(o - n) / max(abs(n), 1.0) for o, n in zip(ours, naive))
        _built[device_name] = (device, rm, encoded, label, unit, batch, worst)
    return _built[device_name]


@pytest.mark.parametrize("contender", ["hf-naive", "endokern"])  # hf-naive first: endokern's ratio needs it
@pytest.mark.parametrize("device_name", ["cpu", "cuda"])
def test_e2e(benchmark, device_name, contender):
    if device_name == "cuda" and not torch.cuda.is_available():
        pytest.skip("GPU row: needs CUDA")
    device, rm, encoded, label, unit, batch, worst = _setup(device_name)
    fp32 = rm.head.weight.dtype == torch.float32
    assert worst <= (1e-3 if fp32 else 3e-2), f"endokern and hf-naive disagree: {worst:.3g} relative"
    if contender == "endokern":
        run = lambda: rm.score_encoded(encoded)  # noqa: E731
    else:
        run = lambda: naive_logprobs(rm.model, encoded, batch, device)  # noqa: E731
    _, _, extra = timed(run, device)  # one pass for the peak memory (and a warm-up)

    def call():
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"e2e {device_name} {label}"
    benchmark.pedantic(call, rounds=1 if device.type == "cpu" else 3, warmup_rounds=0, iterations=1)
    stats = getattr(benchmark, "stats", None)
    seconds = stats.stats.median if stats is not None else None
    _seconds[(device_name, contender)] = seconds
    naive_s = _seconds.get((device_name, "hf-naive"))
    units = len(encoded) // 2 if unit == "pairs" else len(encoded)
    benchmark.extra_info.update(
        contender=contender if contender == "endokern" else f"hf-naive (batch {batch})", model=label,
        device=device_name, sequences=len(encoded), tokens=sum(e.length for e in encoded),
        tokens_per_s=sum(e.length for e in encoded) / seconds if seconds else None,
        **{f"{unit}_per_s": units / seconds if seconds else None},
        peak_extra_bytes=extra, logprob_max_rel_diff=worst,
        speedup_over_naive=naive_s / seconds if (seconds and naive_s and contender == "endokern") else None,
    )
