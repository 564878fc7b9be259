"""Kernel timings of the GPU check, one JSON row per (shape, contender) in kernels.jsonl.

  --part decisive  N=32768, D=4096, V=128256 bf16: the bare torch.matmul, the kernel (soft_values, backend
                   "triton"), the main-loop-only probe (GPU_CANDIDATES["mainloop"]), the TMA + warp-specialized
                   candidate ("tma-ws-128x128"), Cut Cross-Entropy, Liger, then the naive path (its memory is the
                   yardstick of SPEC section 5)
  --part ablation  the same shape: the bare matmul, then every GPU_CANDIDATES launch config
  --part sweep     N in {2048, 8192, 32768} x Llama 3 8B, Qwen2.5-7B, Gemma 2 (softcap 30): matmul, the kernel,
                   naive where its logits fit in free memory, the torch backend where one call is cheap, CCE, Liger

Each row: the median of several CUDA-event timings after a warm-up (the first call timed on its own), TFLOP/s,
the ratio to the bare matmul of the same shape in the same process, the worst relative error of the per-row loss
against the reference (endokern's torch backend, computed once per shape), the peak extra memory. A contender
that does not import, or a launch config GPU_CANDIDATES lacks, is a failed row with the reason.
"""

from __future__ import annotations

import checklib as ck
import torch
from jsonrows import Skip

PARTS = ("decisive", "ablation", "sweep")


def plan(ctx, part):
    if part == "decisive":
        shapes = [ck.DRY_DECISIVE if ctx.dry else ck.DECISIVE]
        names = ["matmul", "triton", "triton[mainloop]", "triton[tma-ws-128x128]", "cce", "liger", "naive"]
    elif part == "ablation":
        shapes = [ck.DRY_DECISIVE if ctx.dry else ck.DECISIVE]
        names = ["matmul"] + [f"triton[{c}]" for c in ck.candidate_names(ctx.dry)]
    else:
        shapes = ck.DRY_SWEEP if ctx.dry else ck.SWEEP
        names = ["matmul", "triton", "naive", "torch", "cce", "liger"]
    return [(shape, name) for shape in shapes for name in names]


def reps_for(ctx, part):
    if ctx.dry:
        return 2, 1
    return {"decisive": (10, 2), "ablation": (7, 2), "sweep": (5, 2)}[part]


class Shape:
    """Inputs and reference of one shape, made when its first item needs them and dropped with the next shape."""

    def __init__(self, ctx, shape):
        self.ctx, self.shape = ctx, shape
        self.inputs = self.ref = None
        self.ref_fields = {}

    def load(self):
        if self.inputs is None:
            self.inputs = ck.make_inputs(self.ctx, self.shape)
            self.ref, self.ref_fields = ck.reference(self.ctx, self.shape, self.inputs)
        return self

    def drop(self):
        self.inputs = self.ref = None
        self.ctx.free_cache()


def measure_item(ctx, part, held, name, matmul_ms):
    shape = held.shape
    n, d, v, cap = shape
    fn = ck.make_contender(ctx, name, cap)  # raises for a missing import or config: a failed row
    probe = False
    if name.startswith("triton["):
        cfg = ck.candidates(ctx.dry).get(name[len("triton["):-1])
        probe = ck.is_probe(cfg)
    fields = {}
    if name == "naive" and ctx.cuda:
        # bf16 logits, their fp32 copy, logsumexp's (z - max) and its exp; the softcap's tanh adds two more
        need = n * v * (2 + 4 + 4 + 4 + (8 if cap else 0))
        free = ck.free_bytes(ctx)
        if need > 0.85 * free:
            raise Skip(f"naive needs about {ck.gib(need)} GiB for its logits; {ck.gib(free)} GiB free")
        fields["estimated_gib"] = ck.gib(need)
    if name == "torch" and ck.flops(shape) > ck.TORCH_CONTENDER_MAX_FLOP:
        held.load()
        raise Skip(f"not cheap here: 2NDV = {ck.flops(shape) / 1e12:.0f} TFLOP in fp32 chunks; its one call as "
                   f"this shape's reference took {held.ref_fields.get('reference_s')} s")
    held.load()
    fields.update(held.ref_fields)

    def check(out):
        if name == "matmul":
            return {}
        if probe:
            return {"checked": False, "note": "timing probe: its outputs are not soft values"}
        err = ck.rel_err(out, held.ref)
        return {"rel_err": err}

    reps, warmup = reps_for(ctx, part)
    fields.update(ck.measure(ctx, fn, held.inputs, reps, warmup, check))
    fields["extra_mb"] = ck.peak_extra_mb(ctx, fn, held.inputs)
    fields["tflops"] = ck.tflops(shape, fields["ms_median"])
    if matmul_ms and name != "matmul":
        fields["x_matmul"] = round(fields["ms_median"] / matmul_ms, 4)
    err = fields.get("rel_err")
    if err is not None and not err <= ck.MAX_REL_ERR:
        fields["status"] = "failed"
        fields["reason"] = f"WRONG: relative error {err:.3g} against the reference (bound {ck.MAX_REL_ERR})"
    return fields


def main(argv=None):
    def add(parser):
        parser.add_argument("--part", choices=PARTS, required=True)

    # The three parts share kernels.jsonl, each as its own step.
    ctx = ck.setup(lambda args: args.part, "kernels.jsonl", __doc__.split("\n\n")[0], add, default_item_cap=60.0,
                   argv=argv)
    part = ctx.args.part
    todo = plan(ctx, part)
    ctx.items.plan(f"{ck.shape_label(s)}/{name}" for s, name in todo)
    held = None
    matmul_ms = {}
    for row in ctx.items.done.values():  # a restarted step: the matmul timed before
        if row.get("contender") == "matmul" and row.get("ms_median"):
            matmul_ms[row["shape"]] = row["ms_median"]
    for shape, name in todo:
        label = ck.shape_label(shape)
        if held is None or held.shape != shape:
            if held is not None:
                held.drop()
            held = Shape(ctx, shape)
        n, d, v, cap = shape
        info = dict(contender=name, shape=label, n=n, d=d, v=v, softcap=cap, dtype="bf16")
        if name.startswith("triton[") or name == "triton":
            from endokern.ops import triton_backend

            cfg = (ck.candidates(ctx.dry).get(name[len("triton["):-1]) if name != "triton"
                   else triton_backend.kernel_config(ctx.device, torch.bfloat16))
            info.update(ck.config_fields(cfg))
        row = ctx.items.run(f"{label}/{name}", lambda held=held, name=name, label=label: _guarded(
            ctx, part, held, name, matmul_ms.get(label)), **info)
        if name == "matmul" and row.get("status") == "ok":
            matmul_ms[label] = row["ms_median"]
    if held is not None:
        held.drop()
    return 0


def _guarded(ctx, part, held, name, matmul_ms):
    try:
        return measure_item(ctx, part, held, name, matmul_ms)
    except torch.cuda.OutOfMemoryError:
        ctx.free_cache()
        raise


if __name__ == "__main__":
    raise SystemExit(main())
