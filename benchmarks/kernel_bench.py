"""Kernel benchmark (SPEC section 5): every contender side by side in one process, as ratios.

Contenders (bare matmul, naive, the endokern backends, Cut Cross-Entropy, Liger, and with --configs C,... the
Triton kernel with each launch config C of triton_backend.GPU_CANDIDATES) are defined once in
benchmarks/contenders.py, which benchmarks/test_kernels.py (pytest-benchmark) shares. Every contender's per-row
loss is checked against the torch backend (column "rel err").

Time is the median of --reps runs after a warm-up (CUDA events on GPU). Peak extra memory is what a
contender adds on top of its inputs: torch.cuda.max_memory_allocated on GPU; on CPU the growth of the
peak resident set (VmHWM, reset before the call) of a fresh process that runs it once, so it
counts the C++ kernel's own buffers too (Linux only).

    python benchmarks/kernel_bench.py                      # CPU rows of SPEC section 5
    python benchmarks/kernel_bench.py --device cuda        # GPU rows (H100 shapes)
    python benchmarks/kernel_bench.py --device cuda --shapes 32768:4096:128256 --configs default,128x128,stages4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import endokern  # noqa: E402
from contenders import (  # noqa: E402
    CPU_SHAPES, DTYPES, GPU_SHAPES, contenders, cpu_peak_extra, cuda_peak_extra, device_name, make_inputs,
    relative_error, slug, time_median,
)


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
    args = parser.parse_args(argv)
    if args.configs:
        from endokern.ops.triton_backend import GPU_CANDIDATES

        unknown = [c for c in args.configs.split(",") if c not in GPU_CANDIDATES]
        if unknown:
            parser.error(f"--configs: unknown {', '.join(unknown)}; the candidates are {', '.join(GPU_CANDIDATES)}")

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
        slug(name) + "-kernels.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        command="python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        device=name, torch=torch.__version__, endokern=endokern.__version__, reps=args.reps, rows=rows,
    ), indent=1) + "\n")
    print(f"# wrote {out}")


if __name__ == "__main__":
    main()
