"""The kernel benchmark's contenders, shapes and measurements: one definition for benchmarks/kernel_bench.py (a table and
JSON) and benchmarks/test_kernels.py (pytest-benchmark).

Contenders, each computing per-row soft value (logsumexp) and target logit from hidden [N, D] and
the LM head [V, D]:
  matmul     torch.matmul(H, W.T) alone in the input dtype: the compute floor
  naive      logits in the input dtype, then fp32 logsumexp and gather
  torch      endokern backend="torch" (chunked PyTorch)
  cpu        endokern backend="cpu" (the C++ kernel), when built
  triton     endokern backend="triton", on CUDA
  cce        Cut Cross-Entropy's linear_cross_entropy forward (LSE - target logit), if importable: its Triton
             kernels on CUDA, its torch.compile path (impl="torch_compile") on the CPU
  liger      Liger-Kernel's fused linear cross entropy forward, on CUDA, if importable
  triton[C]  with --configs C,...: the Triton split kernel with launch config C of
             endokern.ops.triton_backend.GPU_CANDIDATES (the ablation; also under TRITON_INTERPRET=1 on CPU);
             C = mainloop is a timing probe (loads and tl.dot, one max per tile): timed, its output not checked

Time is the median of --reps runs after a warm-up (CUDA events on GPU). Peak extra memory is what a
contender adds on top of its inputs: torch.cuda.max_memory_allocated on GPU; on CPU the growth of the
peak resident set (VmHWM, reset before the call) of a fresh process that runs it once, so it
counts the C++ kernel's own buffers too (Linux only).
"""

from __future__ import annotations

import math
import platform
import re
import statistics
import subprocess
import sys
import time

import torch

import endokern
from endokern.ops.registry import unavailable_reason

CPU_SHAPES = [(2048, 576, 49152, None), (1024, 2048, 32000, None)]
GPU_SHAPES = [
    (n, d, v, cap)
    for (d, v, cap) in [(4096, 128256, None), (3584, 152064, None), (2304, 256000, 30.0)]
    for n in (2048, 8192, 32768)
]
# ENDOKERN_BENCH_QUICK=1: one small shape, so the pytest-benchmark suite can be smoke-tested in CI.
QUICK_SHAPES = [(256, 64, 4000, None)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def make_inputs(n, d, v, dtype, device, seed=0):
    """Not zeros: normal hidden rows and a head scaled so logits are O(10), as in trained models.

    Drawn on the device itself (a GPU head of 256000 x 4096 takes seconds to draw on a CPU), in fp32, then cast.
    """
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = (torch.randn(n, d, generator=g, device=device) * 2.0).to(dtype)
    weight = (torch.randn(v, d, generator=g, device=device) / math.sqrt(d)).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g, device=device)
    return hidden, weight, targets


def contenders(device: torch.device, softcap, configs=()):
    """name -> callable(hidden, weight, targets), for those that can run here."""
    out = {}
    out["matmul"] = lambda h, w, t: torch.matmul(h, w.T)

    def naive(h, w, t):
        z = torch.matmul(h, w.T).float()
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        return torch.logsumexp(z, dim=1), z.gather(1, t.unsqueeze(1)).squeeze(1)

    out["naive"] = naive
    for backend in ("torch", "cpu", "triton"):
        if unavailable_reason(backend, device) is None and not (backend == "triton" and device.type == "cpu"):
            out[backend] = lambda h, w, t, b=backend: endokern.soft_values(h, w, t, softcap=softcap, backend=b)
    if configs and unavailable_reason("triton", device) is None:
        from endokern.ops import triton_backend

        for config in configs:
            cfg = triton_backend.GPU_CANDIDATES[config]

            def run(h, w, t, cfg=cfg):
                got = triton_backend.forward(h, w, t, bias=None, alpha=1.0, softcap=softcap, return_entropy=False,
                                             config=cfg)
                # a timing probe's output is not soft values: a 2-D tensor, which loss_of does not check
                return got[0][:, None] if cfg.mainloop_only else got

            out[f"triton[{config}]"] = run
    try:  # on CUDA its Triton kernels; on the CPU its torch.compile path (impl="torch_compile")
        from cut_cross_entropy import linear_cross_entropy

        impl = {} if device.type == "cuda" else {"impl": "torch_compile"}
        out["cce"] = lambda h, w, t: linear_cross_entropy(h, w, t, softcap=softcap, reduction="none", **impl)
    except Exception as exc:
        print(f"# cce not run: {exc}", file=sys.stderr)
    if device.type == "cuda":
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            out["liger"] = lambda h, w, t: liger_fused_linear_cross_entropy(
                h, w, t, reduction="none", softcap=softcap
            )
        except Exception as exc:
            print(f"# liger not run: {exc}", file=sys.stderr)
    return out


def loss_of(out):
    """Per-row ``logsumexp - target logit`` from a contender's output (None for the bare matmul)."""
    if isinstance(out, torch.Tensor):  # CCE and Liger: the per-row loss; the matmul: logits (no check)
        return out.float() if out.dim() == 1 else None
    if hasattr(out, "value"):  # endokern's SoftValues
        return out.value - out.target_logit
    value, target_logit = out[:2]  # naive (value, target), triton_backend.forward (value, target, entropy)
    return value - target_logit


def relative_error(fn, args, reference):
    """Worst |loss - reference| / max(1, |reference|) over rows: every contender must compute the same function."""
    if reference is None:
        return None
    with torch.no_grad():
        got = loss_of(fn(*args))
    if got is None:
        return None
    return float(((got.double() - reference).abs() / reference.abs().clamp(min=1.0)).max())


def time_median(fn, args, device, reps, warmup=1):
    with torch.no_grad():
        for _ in range(warmup):
            fn(*args)
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(*args)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn(*args)
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cuda_peak_extra(fn, args):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        fn(*args)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def status_bytes(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def cpu_peak_extra(name, n, d, v, softcap, dtype_name):
    """Run one contender once in a fresh process; its peak resident set minus that before the call."""
    cmd = [sys.executable, __file__, name, str(n), str(d), str(v), str(softcap), dtype_name]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def memory_probe(name, n, d, v, softcap, dtype_name):
    softcap = None if softcap == "None" else float(softcap)
    device = torch.device("cpu")
    args = make_inputs(int(n), int(d), int(v), DTYPES[dtype_name], device)
    configs = [name[len("triton["):-1]] if name.startswith("triton[") else ()
    fn = contenders(device, softcap, configs)[name]
    with torch.no_grad():  # a small call first: library loading is not the kernel's memory
        fn(args[0][:1], args[1][:64], args[2][:1] % 64)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    before = status_bytes("VmRSS")
    with torch.no_grad():
        fn(*args)
    print(max(0, status_bytes("VmHWM") - before))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def slug(name: str) -> str:
    """A device name as a file-name part: 'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


if __name__ == "__main__":  # the fresh process of cpu_peak_extra
    memory_probe(*sys.argv[1:])
