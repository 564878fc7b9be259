"""Kernel benchmark (SPEC section 5): every contender side by side in one process, as ratios.

Contenders, each computing per-row soft value (logsumexp) and target logit from hidden [N, D] and
the LM head [V, D]:
  matmul     torch.matmul(H, W.T) alone in the input dtype: the compute floor
  naive      logits in the input dtype, then fp32 logsumexp and gather
  torch      endokern backend="torch" (chunked PyTorch)
  cpu        endokern backend="cpu" (the C++ kernel), when built
  triton     endokern backend="triton", on CUDA
  cce        Cut Cross-Entropy's linear_cross_entropy forward (LSE - target logit), on CUDA, if importable
  liger      Liger-Kernel's fused linear cross entropy forward, on CUDA, if importable
  triton[C]  with --configs C,...: the Triton split kernel with launch config C of
             endokern.ops.triton_backend.GPU_CANDIDATES (the ablation; also under TRITON_INTERPRET=1 on CPU)

Time is the median of --reps runs after a warm-up (CUDA events on GPU). Peak extra memory is what a
contender adds on top of its inputs: torch.cuda.max_memory_allocated on GPU; on CPU the growth of the
peak resident set (VmHWM, reset before the call) of a fresh process that runs it once, so it
counts the C++ kernel's own buffers too (Linux only).

    python benchmarks/kernels.py                      # CPU rows of SPEC section 5
    python benchmarks/kernels.py --device cuda        # GPU rows (H100 shapes)
    python benchmarks/kernels.py --device cuda --shapes 32768:4096:128256 --configs default,128x128,stages4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import endokern
from endokern.ops.registry import unavailable_reason

CPU_SHAPES = [(2048, 576, 49152, None), (1024, 2048, 32000, None)]
GPU_SHAPES = [
    (n, d, v, cap)
    for (d, v, cap) in [(4096, 128256, None), (3584, 152064, None), (2304, 256000, 30.0)]
    for n in (2048, 8192, 32768)
]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def make_inputs(n, d, v, dtype, device, seed=0):
    """Not zeros: normal hidden rows and a head scaled so logits are O(10), as in trained models."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = (torch.randn(n, d, generator=g) * 2.0).to(dtype).to(device)
    weight = (torch.randn(v, d, generator=g) / math.sqrt(d)).to(dtype).to(device)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
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
            out[f"triton[{config}]"] = lambda h, w, t, cfg=cfg: triton_backend.forward(
                h, w, t, bias=None, alpha=1.0, softcap=softcap, return_entropy=False, config=cfg
            )
    if device.type == "cuda":
        try:
            from cut_cross_entropy import linear_cross_entropy

            out["cce"] = lambda h, w, t: linear_cross_entropy(h, w, t, softcap=softcap, reduction="none")
        except Exception as exc:
            print(f"# cce not run: {exc}", file=sys.stderr)
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
    cmd = [sys.executable, __file__, "--_memory-probe", name, str(n), str(d), str(v), str(softcap), dtype_name]
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default=None, help="comma list of bf16, fp32, fp16 (default: bf16,fp32 on CPU)")
    parser.add_argument("--shapes", default=None, help="N:D:V[:softcap],... (default: SPEC section 5)")
    parser.add_argument("--contenders", default=None, help="comma list (default: all that run here)")
    parser.add_argument("--configs", default=None,
                        help="comma list of triton_backend.GPU_CANDIDATES names to time side by side (the ablation)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/<device>-kernels.json)")
    parser.add_argument("--_memory-probe", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._memory_probe:
        memory_probe(*args._memory_probe)
        return

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count())
    dtype_names = (args.dtypes or ("bf16,fp32" if device.type == "cpu" else "bf16")).split(",")
    if args.shapes:
        shapes = []
        for spec in args.shapes.split(","):
            parts = spec.split(":")
            shapes.append((int(parts[0]), int(parts[1]), int(parts[2]), float(parts[3]) if len(parts) > 3 else None))
    else:
        shapes = CPU_SHAPES if device.type == "cpu" else GPU_SHAPES

    rows = []
    header = f"{'dtype':5s} {'N':>6s} {'D':>5s} {'V':>7s} {'cap':>4s} {'contender':18s} {'time s':>9s} {'TFLOP/s':>8s} " \
             f"{'x matmul':>8s} {'naive/x':>8s} {'extra MB':>9s} {'mem/naive':>9s} {'rel err':>8s}"
    print(f"# {device_name(device)}, torch {torch.__version__}")
    print(header)
    for dtype_name in dtype_names:
        for n, d, v, softcap in shapes:
            inputs = make_inputs(n, d, v, DTYPES[dtype_name], device)
            fns = contenders(device, softcap, args.configs.split(",") if args.configs else ())
            if args.contenders:
                keep = set(args.contenders.split(",")) | {"matmul", "naive"}
                fns = {k: f for k, f in fns.items() if k in keep or k.startswith("triton[")}
            # The reference: endokern's fp32-accumulating torch backend (exact products, fp32 sums).
            with torch.no_grad():
                ref = endokern.soft_values(*inputs, softcap=softcap, backend="torch")
            reference = (ref.value - ref.target_logit).double()
            del ref
            results = {}
            for name, fn in fns.items():
                try:
                    seconds = time_median(fn, inputs, device, args.reps)
                    if args.no_memory:
                        extra = None
                    elif device.type == "cuda":
                        extra = cuda_peak_extra(fn, inputs)
                    else:
                        extra = cpu_peak_extra(name, n, d, v, softcap, dtype_name)
                except Exception as exc:  # e.g. out of memory for naive at the largest shapes
                    print(f"# {name} failed at {(n, d, v)}: {type(exc).__name__}: {exc}", file=sys.stderr)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                try:
                    error = relative_error(fn, inputs, reference)
                except Exception as exc:
                    print(f"# {name} output not checked: {type(exc).__name__}: {exc}", file=sys.stderr)
                    error = None
                if error is not None and not error <= 2e-2:  # bf16 logits (naive, CCE, Liger) round at ~4e-3
                    print(f"# {name} at {(n, d, v)}: WRONG, relative error {error:.3g}", file=sys.stderr)
                results[name] = (seconds, extra, error)
            base_t = results.get("matmul", (None,))[0]
            naive_t, naive_m = results.get("naive", (None, None, None))[:2]
            for name, (seconds, extra, error) in results.items():
                row = dict(
                    dtype=dtype_name, n=n, d=d, v=v, softcap=softcap, contender=name, seconds=seconds,
                    tflops=2 * n * d * v / seconds / 1e12,
                    ratio_to_matmul=seconds / base_t if base_t else None,
                    naive_speedup=naive_t / seconds if naive_t else None,
                    extra_bytes=extra,
                    memory_vs_naive=(extra / naive_m) if (extra is not None and naive_m) else None,
                    relative_error=error,
                )
                rows.append(row)
                fmt = lambda x, f: format(x, f) if x is not None else "-"  # noqa: E731
                print(
                    f"{dtype_name:5s} {n:6d} {d:5d} {v:7d} {fmt(softcap, '4.0f'):>4s} {name:18s} {seconds:9.4f} "
                    f"{row['tflops']:8.2f} {fmt(row['ratio_to_matmul'], '8.2f'):>8s} "
                    f"{fmt(row['naive_speedup'], '8.2f'):>8s} "
                    f"{fmt(extra / 2**20 if extra is not None else None, '9.1f'):>9s} "
                    f"{fmt(row['memory_vs_naive'], '9.4f'):>9s} {fmt(error, '8.1e'):>8s}",
                    flush=True,
                )
            del inputs
    name = device_name(device)
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / (
        re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() + "-kernels.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        command="python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        device=name, torch=torch.__version__, endokern=endokern.__version__, reps=args.reps, rows=rows,
    ), indent=1) + "\n")
    print(f"# wrote {out}")


if __name__ == "__main__":
    main()
