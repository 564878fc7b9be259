"""Shared pieces of the GPU check's steps: arguments, shapes, inputs, references, contenders, timing.

Every step script (benchmarks/gpu/*.py) starts with ``ctx = setup(step, file, description)``: it parses the common
arguments (--out, --scratch, --dry-run, --item-cap), chooses the device (CUDA, or the CPU under the Triton
interpreter with --dry-run) and opens the step's rows (jsonrows.StepItems).

Shapes: the GPU shapes of SPEC section 5; with --dry-run, small shapes of the same kinds, and the launch configs of
GPU_CANDIDATES cut to two vocabulary tiles per split, so the interpreter exercises several splits in seconds.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
ROOT = BENCH.parent
TESTS_OPS = ROOT / "tests" / "ops"
for _path in (str(ROOT), str(BENCH)):
    if _path not in sys.path:
        sys.path.insert(1, _path)

import torch  # noqa: E402
from jsonrows import Skip, StepItems  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The decisive row: the Llama 3 8B head at N = 32768 (SPEC section 5).
DECISIVE = (32768, 4096, 128256, None)
DRY_DECISIVE = (64, 32, 700, None)  # two splits of every candidate cut to 2 tiles
# The SPEC sweep, smallest N first (a step stopped at its cap loses the largest shapes, which the decisive row has).
SWEEP_MODELS = [("llama3-8b", 4096, 128256, None), ("qwen2.5-7b", 3584, 152064, None), ("gemma2-2b", 2304, 256000, 30.0)]
SWEEP = [(n, d, v, cap) for n in (2048, 8192, 32768) for (_, d, v, cap) in SWEEP_MODELS]
DRY_SWEEP = [(n, d, v, cap) for n in (4, 8, 16) for (d, v, cap) in ((32, 500, None), (48, 400, None), (16, 600, 30.0))]
# Launch configs the decisive row and the ablation must time; one missing from GPU_CANDIDATES is a failed row.
REQUIRED_CANDIDATES = ("default", "mainloop", "tma-ws-128x128")
# Error bound against the fp32-accumulating reference: bf16 logits (naive, CCE, Liger) round at ~4e-3.
MAX_REL_ERR = 2e-2
# The torch backend (fp32 chunks) is timed only where one call is cheap: 2 N D V at most this many FLOPs.
TORCH_CONTENDER_MAX_FLOP = 12e12


class Context:
    def __init__(self, args, step, items):
        self.args = args
        self.step = step
        self.items = items
        self.dry = args.dry_run
        self.out = Path(args.out)
        self.scratch = Path(args.scratch)
        self.device = torch.device("cpu" if self.dry else "cuda")

    @property
    def cuda(self):
        return self.device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def free_cache(self):
        if self.cuda and torch.cuda.is_available():
            torch.cuda.empty_cache()


def parse(description, add_args=None, argv=None):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, help="the folder of the check's result files")
    parser.add_argument("--scratch", default=None, help="a folder for references and caches (not returned)")
    parser.add_argument("--dry-run", action="store_true", help="the CPU and the Triton interpreter, small shapes")
    parser.add_argument("--item-cap", type=float, default=None, help="seconds one item may take (its watchdog)")
    if add_args:
        add_args(parser)
    args = parser.parse_args(argv)
    if args.dry_run:  # before triton is imported, and before CUDA is touched
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.scratch is None:
        import tempfile

        args.scratch = str(Path(tempfile.gettempdir()) / "endokern-gpu-check-scratch")
    Path(args.scratch).mkdir(parents=True, exist_ok=True)
    return args


def context_check():
    """Raises when this process's CUDA context cannot run work any more (an illegal address is sticky)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.ones(1, device="cuda").add_(1).item()


def setup(step, file, description, add_args=None, default_item_cap=40.0, argv=None):
    args = parse(description, add_args, argv)
    step = step(args) if callable(step) else step
    cap = args.item_cap or (default_item_cap * (1.5 if args.dry_run else 1.0))
    items = StepItems(Path(args.out) / file, step, cap, context_check)
    ctx = Context(args, step, items)
    print(f"# {step}: {'dry run (CPU, Triton interpreter)' if ctx.dry else 'CUDA'}; rows -> {items.rows.path}",
          flush=True)
    return ctx


# ---- launch configs -----------------------------------------------------------------------------------------


def candidates(dry):
    """triton_backend.GPU_CANDIDATES, the live dict; in a dry run each config's split cut to 2 tiles (in place, so
    every caller in the process, tests/ops/kernel_checks.py's too, sees the same configs)."""
    from endokern.ops import triton_backend

    cands = triton_backend.GPU_CANDIDATES
    if dry and not getattr(triton_backend, "_gpu_check_dry", False):
        for name, cfg in list(cands.items()):
            cands[name] = cfg._replace(split_tiles=min(cfg.split_tiles, 2))
        triton_backend._gpu_check_dry = True
    return cands


def candidate_names(dry):
    """Every GPU_CANDIDATES name, then the required ones it lacks (their rows fail and say so)."""
    names = list(candidates(dry))
    return names + [n for n in REQUIRED_CANDIDATES if n not in names]


def is_probe(cfg):
    """A timing probe (its outputs are not soft values): GPU_CANDIDATES["mainloop"]."""
    return bool(getattr(cfg, "mainloop_only", False))


def config_fields(cfg):
    return {"config": {k: v for k, v in cfg._asdict().items() if v not in (False, None)}} if cfg is not None else {}


# ---- inputs, references, contenders -------------------------------------------------------------------------


def shape_label(shape):
    n, d, v, cap = shape
    return f"{n}x{d}x{v}" + (f"-cap{cap:g}" if cap else "")


def make_inputs(ctx, shape, dtype=torch.bfloat16, seed=0):
    from contenders import make_inputs as draw

    n, d, v, _ = shape
    return draw(n, d, v, dtype, ctx.device, seed=seed)


def reference(ctx, shape, inputs, dtype_name="bf16", seed=0):
    """Per-row ``logsumexp - target logit`` from endokern's fp32-accumulating torch backend, float64: computed once
    per shape for the whole run (cached in the scratch folder across steps), with the seconds it took."""
    import endokern

    path = ctx.scratch / "refs" / f"{dtype_name}-{shape_label(shape)}-seed{seed}-{ctx.device.type}.pt"
    if path.exists():
        saved = torch.load(path)
        return saved["loss"].to(ctx.device), {"reference_s": saved["seconds"], "reference_cached": True}
    ctx.sync()
    start = time.perf_counter()
    with torch.no_grad():
        ref = endokern.soft_values(*inputs, softcap=shape[3], backend="torch")
    loss = (ref.value - ref.target_logit).double()
    ctx.sync()
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"loss": loss.cpu(), "seconds": seconds}, path)
    return loss, {"reference_s": round(seconds, 4), "reference_cached": False}


def loss_of(out):
    from contenders import loss_of as loss

    return loss(out)


def rel_err(out, ref):
    """Worst |loss - reference| / max(1, |reference|) over rows; None where the output is no loss (the matmul)."""
    got = loss_of(out)
    if got is None:
        return None
    err = ((got.double() - ref).abs() / ref.abs().clamp(min=1.0)).max()
    return float(err) if bool(torch.isfinite(err)) else float("inf")


def make_contender(ctx, name, softcap):
    """The callable ``(hidden, weight, targets) -> output`` of a contender; raises Skip (does not apply here) or
    the error that keeps it from running (an import that fails, a name GPU_CANDIDATES lacks): a failed row."""
    import endokern
    from endokern.ops.registry import unavailable_reason

    if name == "matmul":
        return lambda h, w, t: torch.matmul(h, w.T)
    if name == "naive":
        def naive(h, w, t):
            z = torch.matmul(h, w.T).float()
            if softcap is not None:
                z = softcap * torch.tanh(z / softcap)
            return torch.logsumexp(z, dim=1), z.gather(1, t.unsqueeze(1)).squeeze(1)
        return naive
    if name in ("torch", "triton"):
        reason = unavailable_reason(name, ctx.device)
        if reason:
            raise RuntimeError(f"backend {name!r} is unavailable: {reason}")
        return lambda h, w, t: endokern.soft_values(h, w, t, softcap=softcap, backend=name)
    if name.startswith("triton[") and name.endswith("]"):
        from endokern.ops import triton_backend

        config = name[len("triton["):-1]
        cands = candidates(ctx.dry)
        if config not in cands:
            raise LookupError(f"{config!r} is not in endokern.ops.triton_backend.GPU_CANDIDATES "
                              f"(it has: {', '.join(cands)})")
        cfg = cands[config]
        return lambda h, w, t: triton_backend.forward(h, w, t, bias=None, alpha=1.0, softcap=softcap,
                                                      return_entropy=False, config=cfg)
    if name == "cce":
        from cut_cross_entropy import linear_cross_entropy  # an ImportError is the row's reason

        if not ctx.cuda:
            raise Skip("Cut Cross-Entropy's Triton kernels do not run under the interpreter, and its torch.compile "
                       "path takes about 40 s to compile on a CPU: the dry run checks only that it imports")
        return lambda h, w, t: linear_cross_entropy(h, w, t, softcap=softcap, reduction="none")
    if name == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        if not ctx.cuda and softcap is not None:
            raise Skip("Liger's softcap path does not run under the Triton interpreter (it calls .to on a float)")
        return lambda h, w, t: liger_fused_linear_cross_entropy(h, w, t, reduction="none", softcap=softcap)
    raise ValueError(f"unknown contender {name!r}")


def package_version(module):
    """``module``'s version and where it was imported from, or the reason it does not import."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001
        return {"import": False, "reason": f"{type(exc).__name__}: {exc}"[:400]}
    version = getattr(mod, "__version__", None)
    if version is None:
        try:
            import importlib.metadata as md

            dist = {"cut_cross_entropy": "cut-cross-entropy", "liger_kernel": "liger-kernel"}.get(module, module)
            version = md.version(dist)
        except Exception:  # noqa: BLE001
            version = None
    return {"import": True, "version": version, "path": str(Path(mod.__file__).parent)}


# ---- timing -------------------------------------------------------------------------------------------------


def measure(ctx, fn, args, reps, warmup, check=None):
    """First call (timed on its own: compile, autotune), ``check(out)`` on its output, ``warmup - 1`` more calls,
    then ``reps`` timed calls (CUDA events, or the host clock on the CPU). Returns the timing fields and check's."""
    fields = {}
    with torch.no_grad():
        ctx.sync()
        start = time.perf_counter()
        out = fn(*args)
        ctx.sync()
        fields["first_call_s"] = round(time.perf_counter() - start, 4)
        if check is not None:
            fields.update(check(out))
        del out
        for _ in range(max(0, warmup - 1)):
            fn(*args)
        ctx.sync()
        times = []
        for _ in range(reps):
            if ctx.cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fn(*args)
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn(*args)
                times.append((time.perf_counter() - t0) * 1e3)
    fields.update(ms_median=round(statistics.median(times), 4), ms_min=round(min(times), 4),
                  ms_max=round(max(times), 4), reps=reps, warmup=warmup, ms=[round(t, 4) for t in times])
    return fields


def peak_extra_mb(ctx, fn, args):
    """Memory one call adds above what is allocated before it (the CUDA allocator's peak); None on the CPU."""
    if not ctx.cuda:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        fn(*args)
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 2)


def free_bytes(ctx):
    if not ctx.cuda:
        return None
    return torch.cuda.mem_get_info()[0]


def flops(shape):
    n, d, v, _ = shape
    return 2.0 * n * d * v


def tflops(shape, ms):
    return round(flops(shape) / (ms * 1e-3) / 1e12, 2) if ms else None


def gib(x):
    return round(x / 2**30, 2) if x is not None else None


def is_finite(x):
    return x is not None and math.isfinite(x)
