"""Compile, before anything is timed, every kernel variant the GPU check will launch: in parallel processes (one
per CPU core, at most 16), each launching its share of the variants once at a small shape with the same
specialization (dtype, options, D divisible by 16, strides) as the real calls. Triton's on-disk cache then serves
the later steps, so compile time stays out of their timings. One row per variant in compile.jsonl.

  cand:<config>:<plain|softcap>    triton_backend.forward with a GPU_CANDIDATES launch config (bf16)
  front:bf16:<plain|softcap>       soft_values(backend="triton"), the SPEC sweep's and the end-to-end run's calls
  contender:<cce|liger>:<cap>      Cut Cross-Entropy's and Liger's kernels (their autotuner's configs too)
  probe:read                       the L2 / HBM probe kernel
  check:<name>                     every check of the correctness step, run once (its variants: fp32, fp16,
                                   transposed operands, bias, softcap, entropy)

Under --dry-run nothing is compiled (the interpreter runs the source): the check:* rows are skipped with that
reason and the other variants are launched at tiny shapes, so their code paths still run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import checklib as ck
import torch
from jsonrows import EXIT_CONTEXT_LOST, EXIT_ITEM_HUNG, Skip

MAX_WORKERS = 16


def jobs(ctx):
    """Job names, longest first: the contenders' autotuned kernels, the warp-specialized candidate, the others."""
    import correctness

    names = [f"contender:{c}:{cap}" for c in ("cce", "liger") for cap in ("none", "30")]
    cands = ck.candidate_names(ctx.dry)
    cands.sort(key=lambda c: (0 if "tma" in c or "ws" in c else 1))
    names += [f"cand:{c}:plain" for c in cands]
    names += ["cand:default:softcap", "front:bf16:plain", "front:bf16:softcap", "probe:read"]
    names += [f"check:{name}" for name, _ in correctness.items(ctx)]
    return names


def small_shape(ctx, cfg=None):
    split = cfg.split_size if cfg is not None else 8192
    if ctx.dry:
        return (20, 32, split + 100, None)
    return (512, 256, 2 * split + 256, None)  # N, V, D divisible by 16 as at every SPEC shape


def run_job(ctx, job):
    kind, _, rest = job.partition(":")
    if kind == "check":
        if ctx.dry:
            raise Skip("the interpreter compiles nothing: the correctness step runs this check")
        import correctness

        fn = dict(correctness.items(ctx))[rest]
        return {"check": fn()}
    if kind == "probe":
        import l2_probe

        kernel = l2_probe.read_kernel()
        x = torch.rand(1 << 14, device=ctx.device)
        out = torch.empty(8, device=ctx.device)
        kernel[(8,)](x, out, x.numel(), 1, BLOCK=2048, num_warps=8)
        ctx.sync()
        return {}
    name, _, option = rest.partition(":")
    softcap = 30.0 if option in ("softcap", "30") else None
    if kind == "cand":
        cands = ck.candidates(ctx.dry)
        contender = f"triton[{name}]"
        shape = small_shape(ctx, cands.get(name))
    elif kind == "front":
        contender, shape = "triton", small_shape(ctx)
    elif kind == "contender":
        contender, shape = name, small_shape(ctx)
    else:
        raise ValueError(f"unknown job {job!r}")
    fn = ck.make_contender(ctx, contender, softcap)
    inputs = ck.make_inputs(ctx, shape)
    start = time.perf_counter()
    with torch.no_grad():
        fn(*inputs)
    ctx.sync()
    return {"first_call_s": round(time.perf_counter() - start, 3), "shape": ck.shape_label(shape)}


def worker(ctx, index, count):
    names = jobs(ctx)
    for job in names[index::count]:
        ctx.items.run(job, lambda job=job: run_job(ctx, job))
        ctx.free_cache()
    return 0


def main(argv=None):
    def add(parser):
        parser.add_argument("--worker", type=int, default=None, help=argparse_hidden())
        parser.add_argument("--workers", type=int, default=None, help="parallel processes (default: CPU cores, <= 16)")

    ctx = ck.setup("compile", "compile.jsonl", __doc__.split("\n\n")[0], add, default_item_cap=120.0, argv=argv)
    count = ctx.args.workers or max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    if ctx.args.worker is not None:
        return worker(ctx, ctx.args.worker, count)
    names = ctx.items.plan(jobs(ctx))
    count = min(count, len(names))
    print(f"# compile: {len(names)} variants in {count} processes", flush=True)
    base = [sys.executable, os.path.abspath(__file__), "--out", str(ctx.out), "--scratch", str(ctx.scratch),
            "--workers", str(count)] + (["--dry-run"] if ctx.dry else [])
    if ctx.args.item_cap:
        base += ["--item-cap", str(ctx.args.item_cap)]
    procs = {i: subprocess.Popen(base + ["--worker", str(i)]) for i in range(count)}
    restarts = {i: 0 for i in range(count)}
    while procs:
        time.sleep(0.2)
        for i, proc in list(procs.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del procs[i]
            if rc in (EXIT_CONTEXT_LOST, EXIT_ITEM_HUNG) and restarts[i] < 5:  # resume after the rows it wrote
                restarts[i] += 1
                procs[i] = subprocess.Popen(base + ["--worker", str(i)])
            elif rc != 0:
                print(f"# compile worker {i} exited with {rc}", file=sys.stderr, flush=True)
    return 0


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    raise SystemExit(main())
