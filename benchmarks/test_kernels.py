"""The kernel benchmark on pytest-benchmark: every contender of benchmarks/contenders.py, one group per device,
dtype and shape, so ``--benchmark-group-by=group`` prints them side by side.

    python -m pytest benchmarks/test_kernels.py --benchmark-group-by=group --benchmark-columns=median,min,rounds
    python -m pytest benchmarks/test_kernels.py --benchmark-autosave --benchmark-storage=benchmarks/results/pytest-benchmark
    pytest-benchmark --storage benchmarks/results/pytest-benchmark compare 0001 0002 --group-by=group
    ENDOKERN_BENCH_QUICK=1 python -m pytest benchmarks/test_kernels.py      # one small shape (the CI smoke run)

CPU rows run on every machine; GPU rows (the SPEC shapes) skip without CUDA. Before timing, each contender's
per-row ``logsumexp - target logit`` is checked against endokern's fp32-accumulating torch backend: a fast
wrong answer fails. Each test stores in ``extra_info``: the contender, its time over the bare matmul's (the
matmul's median is measured once per group), TFLOP/s, its peak extra memory (CUDA allocator peak; on the CPU a
fresh process's resident-set growth, skipped in quick mode) and the relative error.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from contenders import (  # noqa: E402
    CPU_SHAPES, DTYPES, GPU_SHAPES, QUICK_SHAPES, contenders, cpu_peak_extra, cuda_peak_extra, make_inputs,
    relative_error, time_median,
)

import endokern  # noqa: E402

QUICK = os.environ.get("ENDOKERN_BENCH_QUICK", "0") not in ("", "0")
NAMES = ["matmul", "naive", "torch", "cpu", "triton", "cce", "liger"]
ROUNDS = 3 if QUICK else 7


def _cases():
    for device in ("cpu", "cuda"):
        shapes = QUICK_SHAPES if QUICK else (CPU_SHAPES if device == "cpu" else GPU_SHAPES)
        dtypes = ["bf16"] if (QUICK or device == "cuda") else ["bf16", "fp32"]
        for dtype in dtypes:
            for n, d, v, cap in shapes:
                for name in NAMES:
                    label = f"{device}-{dtype}-{n}x{d}x{v}" + (f"-cap{cap:g}" if cap else "") + f"-{name}"
                    yield pytest.param(device, dtype, (n, d, v, cap), name, id=label)


class _Group:
    """The inputs, reference and bare-matmul time of one (device, dtype, shape), kept while its tests run."""

    key = None

    @classmethod
    def get(cls, device, dtype, shape):
        if cls.key != (device, dtype, shape):
            cls.key, cls.inputs = None, None  # free the previous group's tensors first
            if device.type == "cuda":
                torch.cuda.empty_cache()
            n, d, v, cap = shape
            cls.inputs = make_inputs(n, d, v, DTYPES[dtype], device)
            with torch.no_grad():
                ref = endokern.soft_values(*cls.inputs, softcap=cap, backend="torch")
            cls.reference = (ref.value - ref.target_logit).double()
            matmul = contenders(device, cap)["matmul"]
            cls.matmul_seconds = time_median(matmul, cls.inputs, device, ROUNDS)
            cls.key = (device, dtype, shape)
        return cls


@pytest.mark.parametrize("device_name,dtype,shape,name", _cases())
def test_kernel(benchmark, device_name, dtype, shape, name):
    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("GPU row: needs CUDA")
    n, d, v, cap = shape
    fns = contenders(device, cap)
    if name not in fns:
        pytest.skip(f"{name} does not run on {device_name} here")
    fn = fns[name]
    group = _Group.get(device, dtype, shape)
    inputs = group.inputs
    error = relative_error(fn, inputs, group.reference)  # also the warm-up (torch.compile, Triton JIT)
    if error is not None:  # bf16 logits (naive, CCE, Liger) round at ~4e-3 of max(1, |loss|); fused ones at 1e-6
        assert error <= 2e-2, f"{name}: relative error {error:.3g} against the torch backend"

    def call():
        with torch.no_grad():
            fn(*inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{device_name} {dtype} N={n} D={d} V={v}" + (f" softcap={cap:g}" if cap else "")
    benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    if device.type == "cuda":
        extra = cuda_peak_extra(fn, inputs)
    else:
        extra = None if QUICK else cpu_peak_extra(name, n, d, v, cap, dtype)
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    median = stats.stats.median if stats is not None else None
    benchmark.extra_info.update(
        contender=name, device=device_name, dtype=dtype, n=n, d=d, v=v, softcap=cap,
        ratio_to_matmul=median / group.matmul_seconds if median else None,
        tflops=2 * n * d * v / median / 1e12 if median else None,
        peak_extra_bytes=extra, relative_error=error,
    )
