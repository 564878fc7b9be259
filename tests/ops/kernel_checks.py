"""Checks of the Triton kernel as plain Python functions (no pytest needed), against the float64 oracle.

tests/ops/test_triton_kernel.py runs them under pytest (the interpreter on CPU, CUDA where there is one); a machine
without pytest runs them as ``python tests/ops/kernel_checks.py [--device cuda] [NAME ...]``, which prints one JSON
line per check (name, ok, seconds, error) and exits 1 if any failed.

Each check raises AssertionError with the worst row on a mismatch. Tolerances come from the arithmetic: an fp32 dot
product of D exactly-upcast products is off by at most ``D * u * sum_k |h_k w_k|`` (u = 2^-23 covers tensor cores
that truncate instead of rounding), logsumexp and the target pick-up are 1-Lipschitz in the logits, the entropy's
derivative is bounded by the range of the scaled logits; plus 1e-5 relative for the epilogue's exp2/log2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the Triton interpreter, chosen before triton is first imported (as in conftest)
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the oracle
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: endokern from the source tree

from oracle import logits64, soft_values64  # noqa: E402

import endokern  # noqa: E402
from endokern.ops import triton_backend  # noqa: E402

OFFSET_LIMIT = 2**31


def _draw(gen, n, d, v, *, ignore_frac=0.2, with_bias=True):
    hidden = torch.randn(n, d, generator=gen) * 3.0
    weight = torch.randn(v, d, generator=gen) / math.sqrt(d)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < ignore_frac] = -100
    bias = torch.randn(v, generator=gen) * 2.0 if with_bias else None
    return hidden, weight, targets, bias


def assert_matches_oracle(out, hidden, weight, targets, *, alpha, bias, softcap, label=""):
    """``out`` (value, target_logit, entropy; NaN target where ignored) against the float64 oracle on CPU copies."""
    h, w = hidden.double().cpu(), weight.double().cpu()
    t = targets.cpu()
    b = None if bias is None else bias.double().cpu()
    ref_v, ref_t, ref_e = soft_values64(h, w, t, alpha=alpha, bias=b, softcap=softcap)
    z = logits64(h, w, b, softcap)
    zmax = z.abs().amax(dim=1).clamp(min=1.0)
    d, v = h.shape[1], w.shape[0]
    # fp32 accumulation of D exact products: |dz| <= D u sum_k |h_k w_k| (worst column of the row)
    dz = d * 2.0**-23 * (h.abs() @ w.abs().T).amax(dim=1)
    checks = [
        ("value", out[0], ref_v, dz + 1e-5 * torch.maximum(ref_v.abs(), zmax)),
        ("target_logit", out[1], ref_t, dz + 1e-5 * torch.fmax(ref_t.abs(), zmax)),
    ]
    if out[2] is not None:
        spread = 2.0 * zmax / alpha  # sum_j p_j |u_j - mean u| <= range of u = z / alpha
        scale = (zmax / alpha).clamp(min=1.0) * max(1.0, math.log(v))
        checks.append(("entropy", out[2], ref_e, dz / alpha * spread + 1e-5 * torch.maximum(ref_e.abs(), scale)))
    for name, got, ref, tol in checks:
        assert_within(f"{label} {name}", got, ref, tol)


def assert_within(label, got, ref, tol):
    """Every row of ``got`` within ``tol`` of the float64 ``ref``, NaN exactly where ``ref`` is NaN; the message names
    the worst row."""
    got, ref, tol = got.double().cpu(), ref.cpu(), tol.cpu()
    assert got.shape == ref.shape, f"{label}: shape {tuple(got.shape)}, oracle {tuple(ref.shape)}"
    nan_ref = torch.isnan(ref)
    assert torch.equal(torch.isnan(got), nan_ref), f"{label}: NaN pattern differs from the oracle"
    err = (got - ref).abs().masked_fill(nan_ref, 0.0)
    worst = int((err / tol).argmax())
    assert bool((err <= tol).all()), (
        f"{label}: worst row {worst}: got {got[worst].item():.9g}, oracle {ref[worst].item():.9g}, "
        f"error {err[worst].item():.3g} > tolerance {tol[worst].item():.3g}"
    )


def same_bits(a, b):
    """The same bits, NaN where NaN; two outputs that were not asked for (None) are the same."""
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a.nan_to_num(nan=1234.5), b.nan_to_num(nan=1234.5)) and torch.equal(a.isnan(), b.isnan())


def _run(hidden, weight, targets, bias, alpha, softcap, config=None):
    """The backend's forward with a launch config (None: the one soft_values would use); NaN where no target."""
    ids = torch.where(targets == -100, -1, targets).to(hidden.device)
    value, target_logit, entropy = triton_backend.forward(
        hidden, weight, ids, bias=bias, alpha=alpha, softcap=softcap, return_entropy=True, config=config
    )
    return value, torch.where(ids >= 0, target_logit, float("nan")), entropy


def transposed_past_2_31(gen, device, operand="weight", dtype=torch.bfloat16, n=37, d=72, v=300):
    """A transposed head (or hidden), ``buf[:, :V].t()`` of a [D, S] buffer whose K offsets (D-1) * S pass 2^31.

    S stays under 2^31 so the stride itself is a 32-bit argument, and the buffer (about 2^31 elements) is never
    touched outside the D x V values written: on CPU the OS commits only those pages. On CUDA it takes 4.4 GB.
    """
    stride = OFFSET_LIMIT // (d - 1) + 1
    assert (d - 1) * stride >= OFFSET_LIMIT > stride
    hidden, weight, targets, bias = _draw(gen, n, d, v)
    rows = v if operand == "weight" else n
    buf = torch.empty((d, stride), dtype=dtype, device=device)  # lazily committed on CPU
    view = buf[:, :rows].t()
    view.copy_(weight if operand == "weight" else hidden)
    assert view.stride() == (1, stride)
    if operand == "weight":
        weight, hidden = view, hidden.to(dtype).to(device)
    else:
        hidden, weight = view, weight.to(dtype).to(device)
    bias = bias.to(device)
    targets = targets.to(device)
    alpha, softcap = 0.7, 30.0
    out = endokern.soft_values(hidden, weight, targets, alpha=alpha, bias=bias, softcap=softcap,
                               return_entropy=True, backend="triton")
    assert_matches_oracle(out, hidden, weight, targets, alpha=alpha, bias=bias, softcap=softcap,
                          label=f"transposed {operand}, stride {stride}")


def _config(config, device, dtype, d=64):
    """A launch config: a GPU_CANDIDATES name, a KernelConfig, or None (what soft_values uses for row-major
    operands of this D on this device)."""
    if isinstance(config, str):
        return triton_backend.GPU_CANDIDATES[config]
    return config or triton_backend.kernel_config(torch.device(device), dtype, wide_loads=d % 16 == 0)


def splits_against_oracle(gen, device, dtype=torch.bfloat16, config=None, n=333, d=200):
    """Two full vocabulary splits and a third whose last tile is partial; bias, softcap, entropy, alpha != 1.
    With config None: D = 200 runs the config for D not a multiple of 16, D = 256 the default."""
    cfg = _config(config, device, dtype, d)
    assert not cfg.mainloop_only
    v = 2 * cfg.split_size + (cfg.split_tiles // 2) * cfg.block_n + cfg.block_n // 2 + 1
    hidden, weight, targets, bias = _draw(gen, n, d, v)
    hidden, weight = hidden.to(dtype).to(device), weight.to(dtype).to(device)
    targets, bias = targets.to(device), bias.to(device)
    targets[-1] = v - 1  # a target in the partial last tile
    alpha, softcap = 1.7, 30.0
    out = _run(hidden, weight, targets, bias, alpha, softcap, cfg)
    assert -(-v // cfg.split_size) == 3
    assert_matches_oracle(out, hidden, weight, targets, alpha=alpha, bias=bias, softcap=softcap,
                          label=f"{config or 'auto'} {dtype} V={v}")


def mainloop_probe(gen, device, dtype=torch.bfloat16, config="mainloop", n=70, d=72):
    """The timing probe runs every tile of every split: its value is alpha * logsumexp over the splits of
    (the split's max raw logit) / alpha (bias and softcap ignored): not a soft value."""
    cfg = _config(config, device, dtype, d)
    assert cfg.mainloop_only
    v = 2 * cfg.split_size + cfg.block_n // 2 + 1
    hidden, weight, _, bias = _draw(gen, n, d, v)
    hidden, weight = hidden.to(dtype).to(device), weight.to(dtype).to(device)
    alpha = 0.6
    ids = torch.full((n,), -1, dtype=torch.int64, device=device)
    value, _, _ = triton_backend.forward(hidden, weight, ids, bias=bias.to(device), alpha=alpha, softcap=30.0,
                                         return_entropy=True, config=cfg)
    z = logits64(hidden.double().cpu(), weight.double().cpu())
    split_max = torch.stack([z[:, s : s + cfg.split_size].amax(dim=1) for s in range(0, v, cfg.split_size)], dim=1)
    ref = alpha * torch.logsumexp(split_max / alpha, dim=1)
    dz = d * 2.0**-23 * (hidden.double().cpu().abs() @ weight.double().cpu().abs().T).amax(dim=1)
    tol = dz + 1e-5 * torch.maximum(ref.abs(), z.abs().amax(dim=1).clamp(min=1.0))
    err = (value.double().cpu() - ref).abs()
    worst = int((err / tol).argmax())
    assert bool((err <= tol).all()), f"probe row {worst}: {value[worst].item()!r} vs {ref[worst].item()!r}"


def row_alone_bitwise(gen, device, dtype=torch.bfloat16, config=None, n=4096, d=256, v=5000):
    """A row alone (and in a reordered sub-batch) gives the same bits as in a large batch."""
    cfg = _config(config, device, dtype, d)
    hidden, weight, targets, bias = _draw(gen, n, d, v)
    hidden, weight = hidden.to(dtype).to(device), weight.to(dtype).to(device)
    targets, bias = targets.to(device), bias.to(device)
    full = _run(hidden, weight, targets, bias, 0.8, 30.0, cfg)
    again = _run(hidden, weight, targets, bias, 0.8, 30.0, cfg)
    for a, b in zip(full, again):
        assert same_bits(a, b), "two runs on the same inputs differ"
    for r in sorted({0, 1, 63, 64, 127, 128, n // 2 + 5, n - 1}):
        alone = _run(hidden[r : r + 1], weight, targets[r : r + 1], bias, 0.8, 30.0, cfg)
        for name, a, b in zip(("value", "target_logit", "entropy"), full, alone):
            assert same_bits(a[r : r + 1], b), f"row {r} alone: {name} {b.item()!r} != {a[r].item()!r} in the batch"
    sub = torch.arange(n - 1, -1, -7, device=device)
    part = _run(hidden[sub], weight, targets[sub], bias, 0.8, 30.0, cfg)
    for a, b in zip(full, part):
        assert same_bits(a[sub], b), "rows differ in a reordered sub-batch"


CHECKS = {
    "transposed-weight": lambda g, dev: transposed_past_2_31(g, dev, "weight"),
    "transposed-hidden": lambda g, dev: transposed_past_2_31(g, dev, "hidden"),
    **{f"splits-{dt}-d{d}": (lambda g, dev, dt=dt, d=d: splits_against_oracle(g, dev, getattr(torch, dt), d=d))
       for dt in ("float32", "float16", "bfloat16") for d in (256, 200)},
    "row-alone": lambda g, dev: row_alone_bitwise(g, dev),
    "mainloop-probe": lambda g, dev: mainloop_probe(g, dev),
}


def correct_candidates():
    """The launch configs whose outputs are soft values (every GPU_CANDIDATES entry but the timing probes)."""
    return [name for name, cfg in triton_backend.GPU_CANDIDATES.items() if not cfg.mainloop_only]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"checks to run (default: all): {', '.join(CHECKS)}; "
                        "'candidates' also runs splits and row-alone for every correct GPU_CANDIDATES config")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=int(os.environ.get("ENDOKERN_SEED", "0")) or None)
    args = parser.parse_args(argv)
    names = args.names or list(CHECKS)
    todo = [(name, CHECKS[name]) for name in names if name in CHECKS]
    if "candidates" in names:
        for cand in correct_candidates():
            todo.append((f"splits[{cand}]", lambda g, dev, c=cand: splits_against_oracle(g, dev, config=c, d=256)))
            todo.append((f"row-alone[{cand}]", lambda g, dev, c=cand: row_alone_bitwise(g, dev, config=c)))
    unknown = [name for name in names if name not in CHECKS and name != "candidates"]
    if unknown:
        parser.error(f"unknown checks {unknown}; known: {', '.join(CHECKS)}, candidates")
    failed = 0
    for name, fn in todo:
        seed = args.seed or int.from_bytes(os.urandom(6), "little")
        start = time.perf_counter()
        try:
            fn(torch.Generator().manual_seed(seed), args.device)
            error = None
        except Exception as exc:  # every check reports; the exit status says whether any failed
            error = f"{type(exc).__name__}: {exc}"[:2000]
            failed += 1
        print(json.dumps(dict(check=name, device=args.device, ok=error is None, seconds=round(time.perf_counter() - start, 2),
                              seed=seed, error=error)), flush=True)
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
