"""Correctness on CUDA before any timing: the CUDA tests of tests/ops/test_triton_kernel.py and the GPU test of
tests/ops/test_soft_values.py as plain Python (no pytest on the GPU machine), one row per check in
correctness.jsonl.

The checks of tests/ops/kernel_checks.py (the same functions the pytest tests call):
  transposed-weight, transposed-hidden   a W.t() head / transposed hidden whose K offsets (D-1) * stride pass 2^31
  splits-<dtype>[<config>]               three vocabulary splits, the last tile partial, bias + softcap + entropy,
                                         alpha != 1, against the float64 oracle (the default config and every
                                         GPU_CANDIDATES config that computes soft values; fp32 only for the default)
  row-alone[<config>]                    a row alone, and in a reordered sub-batch, has the bits it has in a batch
                                         of 4096; two runs on the same inputs give the same bits
Here:
  front-door-<dtype>                     endokern.soft_values(backend="triton") at shapes that are no multiple of
                                         any block, N = 1, ignored rows, bias, softcap, entropy, alpha != 1
  large-logits-<dtype>                   |z| ~ 1e3
  at-size-<dtype>-<shape>                the SPEC shapes against float64 on the GPU: no worse than PyTorch's own
                                         computation in that dtype, and ten more runs bit-identical

Inputs are drawn fresh (the seed is in each row). With --dry-run: the interpreter, small shapes.
"""

from __future__ import annotations

import math
import os
import sys

import checklib as ck
import torch

DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
AT_SIZE = [(2048, 4096, 128256, None), (1000, 2304, 256000, 30.0), (3, 576, 49152, None)]
DRY_AT_SIZE = [(16, 32, 600, None), (6, 16, 500, 30.0), (3, 32, 300, None)]


def kernel_checks():
    sys.path.insert(0, str(ck.TESTS_OPS))
    import kernel_checks as kc  # tests/ops/kernel_checks.py: plain functions, no pytest

    return kc


def draw(gen, n, d, v, dtype, device, *, scale=3.0, with_bias=True):
    hidden = torch.randn(n, d, generator=gen) * scale
    weight = torch.randn(v, d, generator=gen) / math.sqrt(d)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < 0.2] = -100
    bias = torch.randn(v, generator=gen) * 2.0 if with_bias else None
    to = lambda x: None if x is None else x.to(device)  # noqa: E731
    return to(hidden.to(dtype)), to(weight.to(dtype)), to(targets), to(bias)


def fresh_seed():
    return int.from_bytes(os.urandom(6), "little")


def front_door(ctx, dtype, case):
    """soft_values(backend="triton") against the float64 oracle at awkward shapes."""
    import endokern

    kc = kernel_checks()
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    shapes = [(37, 64, 1000), (130, 48, 777), (1, 32, 300), (9, 16, 2100)]
    if ctx.dry:  # the interpreter's small config runs about a thousand tile steps a second
        shapes = [(9, 16, 300), (1, 32, 100)]
    for n, d, v in shapes if case == "normal" else shapes[:2]:
        hidden, weight, targets, bias = draw(gen, n, d, v, dtype, ctx.device, scale=3.0 if case == "normal" else 1e3)
        for alpha, softcap, b in ((0.7, 30.0, bias), (2.0, None, None)):
            out = endokern.soft_values(hidden, weight, targets, alpha=alpha, bias=b, softcap=softcap,
                                       return_entropy=True, backend="triton")
            kc.assert_matches_oracle(out, hidden, weight, targets, alpha=alpha, bias=b, softcap=softcap,
                                     label=f"{n}x{d}x{v} alpha={alpha} softcap={softcap}")
            again = endokern.soft_values(hidden, weight, targets, alpha=alpha, bias=b, softcap=softcap,
                                         return_entropy=True, backend="triton")
            for a, c in zip(out, again):
                assert kc.same_bits(a, c), f"{n}x{d}x{v}: two runs on the same inputs differ"
    return {"seed": seed}


def at_size(ctx, dtype, shape):
    """tests/ops/test_soft_values.py's GPU test: error no worse than PyTorch's own in the dtype, float64 truth."""
    import endokern

    sys.path.insert(0, str(ck.ROOT / "tests"))
    from oracle import soft_values_in_dtype

    kc = kernel_checks()
    n, d, v, softcap = shape
    seed = fresh_seed()
    gen = torch.Generator(device=ctx.device).manual_seed(seed)
    hidden = (torch.randn(n, d, generator=gen, device=ctx.device) * 3.0).to(dtype)
    weight = (torch.randn(v, d, generator=gen, device=ctx.device) / math.sqrt(d)).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen, device=ctx.device)
    targets[torch.rand(n, generator=gen, device=ctx.device) < 0.2] = -100
    out = endokern.soft_values(hidden, weight, targets, softcap=softcap, return_entropy=True, backend="triton")
    own = soft_values_in_dtype(hidden, weight, targets, softcap=softcap)
    z = hidden.double() @ weight.double().T
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    has = targets != -100
    truth = (
        torch.logsumexp(z, dim=1),
        z.gather(1, torch.where(has, targets, 0).unsqueeze(1)).squeeze(1),
    )
    logp = torch.log_softmax(z, dim=1)
    truth += (-(logp.exp() * logp).sum(dim=1),)
    del z, logp
    errors = {}
    for name, got, mine, ref, mask in zip(("value", "target_logit", "entropy"), out, own, truth,
                                          (torch.ones_like(has), has, torch.ones_like(has))):
        if not bool(mask.any()):
            continue
        err = float((got.double() - ref)[mask].abs().max())
        own_err = float((mine.double() - ref)[mask].abs().max())
        bound = 1.05 * own_err + 1e-5 * float(ref[mask].abs().max())
        errors[name] = {"err": err, "torch_in_dtype_err": own_err}
        assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} (PyTorch's own in {dtype}: {own_err:.3g})"
    for _ in range(10):
        again = endokern.soft_values(hidden, weight, targets, softcap=softcap, return_entropy=True, backend="triton")
        for a, b in zip(out, again):
            assert kc.same_bits(a, b), "ten runs on the same inputs: the bits differ"
    return {"seed": seed, "errors": errors}


def kc_item(ctx, fn_name, *args, **kwargs):
    kc = kernel_checks()
    seed = fresh_seed()
    getattr(kc, fn_name)(torch.Generator().manual_seed(seed), ctx.device, *args, **kwargs)
    return {"seed": seed}


def items(ctx):
    """(name, callable) in the order they run: the offset bug first, the candidates last."""
    dry = ctx.dry
    out = [
        ("transposed-weight", lambda: kc_item(ctx, "transposed_past_2_31", "weight")),
        ("transposed-hidden", lambda: kc_item(ctx, "transposed_past_2_31", "hidden")),
    ]
    small = dict(n=37, d=40) if dry else {}
    for name, dtype in DTYPE_NAMES.items():
        out.append((f"splits-{name}", lambda dtype=dtype: kc_item(ctx, "splits_against_oracle", dtype, None, **small)))
    out.append(("row-alone", lambda: kc_item(ctx, "row_alone_bitwise", torch.bfloat16, None,
                                             **(dict(n=130, d=32, v=300) if dry else {}))))
    for name, dtype in DTYPE_NAMES.items():
        out.append((f"front-door-{name}", lambda dtype=dtype: front_door(ctx, dtype, "normal")))
        out.append((f"large-logits-{name}", lambda dtype=dtype: front_door(ctx, dtype, "large")))
    for shape in DRY_AT_SIZE if dry else AT_SIZE:
        for name, dtype in DTYPE_NAMES.items():
            out.append((f"at-size-{name}-{ck.shape_label(shape)}", lambda dtype=dtype, shape=shape: at_size(ctx, dtype, shape)))
    cands = ck.candidates(dry)
    cand_small = dict(n=37, d=64) if dry else {}
    for cand in ck.candidate_names(dry):
        if cand in cands and ck.is_probe(cands[cand]):
            continue  # a timing probe computes no soft values
        for name in ("fp16", "bf16"):
            out.append((f"splits-{name}[{cand}]", lambda cand=cand, name=name: _candidate(
                ctx, cands, cand, "splits_against_oracle", DTYPE_NAMES[name], cand, **cand_small)))
        out.append((f"row-alone[{cand}]", lambda cand=cand: _candidate(
            ctx, cands, cand, "row_alone_bitwise", torch.bfloat16, cand,
            **(dict(n=130, d=64, v=600) if dry else {}))))
    return out


def _candidate(ctx, cands, cand, fn_name, *args, **kwargs):
    if cand not in cands:
        raise LookupError(f"{cand!r} is not in endokern.ops.triton_backend.GPU_CANDIDATES (it has: {', '.join(cands)})")
    return kc_item(ctx, fn_name, *args, **kwargs)


def main(argv=None):
    ctx = ck.setup("correctness", "correctness.jsonl", __doc__.split("\n\n")[0], default_item_cap=45.0, argv=argv)
    todo = items(ctx)
    ctx.items.plan(name for name, _ in todo)
    for name, fn in todo:
        ctx.items.run(name, fn)
        ctx.free_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
