"""The front door of the fused kernel: validate once, dispatch to a backend.

For hidden rows ``h_i`` and an LM head ``W`` (optional bias ``b``, optional final softcap ``c``), the
logits are ``z_i = W h_i + b`` then ``z_i <- c * tanh(z_i / c)``, and for each row:

- ``value[i]        = alpha * logsumexp(z_i / alpha)`` over the whole vocabulary (the soft value V),
- ``target_logit[i] = z_i[targets[i]]`` (NaN where the row has no target),
- ``entropy[i]      = H(softmax(z_i / alpha))`` when asked,
- ``logit_sum[i]    = sum_j z_ij`` when asked (after bias and softcap, before the 1/alpha scale; with ``value`` at
  alpha 1 it gives the self-certainty ``LSE(z) - sum_j z_j / V - log V``, see :mod:`endokern.reward`).

No backend ever allocates an ``N x V`` tensor; accumulation is fp32 whatever the input dtype, and a
row's bits do not depend on the other rows of the batch.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from . import registry

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class SoftValues(NamedTuple):
    """fp32 ``[N]`` tensors: ``value`` (V), ``target_logit`` (Q of the target, NaN if none), ``entropy`` and
    ``logit_sum`` (None unless asked)."""

    value: torch.Tensor
    target_logit: torch.Tensor
    entropy: Optional[torch.Tensor]
    logit_sum: Optional[torch.Tensor] = None


def soft_values(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: Optional[torch.Tensor] = None,
    *,
    alpha: float = 1.0,
    bias: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
    return_logit_sum: bool = False,
) -> SoftValues:
    """Soft values, target logits and (optionally) entropies of ``hidden @ weight.T (+ bias)``.

    Args:
        hidden: ``[N, D]`` final hidden states (fp32, fp16 or bf16).
        weight: ``[V, D]`` LM head weight, same dtype and device as ``hidden``.
        targets: ``[N]`` integer token ids, or ``ignore_index`` for rows without a target; None: no targets.
        alpha: temperature of the soft value, ``> 0``.
        bias: ``[V]`` LM head bias, or None.
        softcap: final logit softcap ``c > 0`` (``z <- c * tanh(z / c)``), or None.
        ignore_index: the target id that marks a row without a target.
        return_entropy: also return the entropy of ``softmax(z / alpha)``.
        return_logit_sum: also return ``sum_j z_j`` per row (fp32 accumulation; one more running sum in the same
            pass, nothing extra when off).
        backend: ``"auto"`` (triton on CUDA, the C++ kernel on CPU when built, else torch),
            ``"triton"``, ``"cpu"`` or ``"torch"``.

    Raises:
        ValueError / TypeError: bad shapes, dtypes, devices, targets, alpha, softcap, or NaN/Inf inputs.
        RuntimeError: the requested backend cannot run here (the message says why).
    """
    _check_tensor("hidden", hidden, 2)
    _check_tensor("weight", weight, 2)
    n, d = hidden.shape
    v, d_w = weight.shape
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden is {hidden.dtype} but weight is {weight.dtype}; they must share one dtype")
    if d != d_w:
        raise ValueError(f"hidden is [N={n}, D={d}] but weight is [V={v}, D={d_w}]: the D dimensions differ")
    if v == 0 or d == 0:
        raise ValueError(f"weight must be non-empty, got shape {tuple(weight.shape)}")
    device = hidden.device
    if weight.device != device:
        raise ValueError(f"hidden is on {device} but weight is on {weight.device}")
    if bias is not None:
        _check_tensor("bias", bias, 1)
        if bias.shape[0] != v:
            raise ValueError(f"bias has {bias.shape[0]} entries but the vocabulary has V={v}")
        if bias.device != device:
            raise ValueError(f"hidden is on {device} but bias is on {bias.device}")
    alpha = _check_positive("alpha", alpha)
    if softcap is not None:
        softcap = _check_positive("softcap", softcap)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")

    if targets is None:
        target_ids = torch.full((n,), -1, dtype=torch.int64, device=device)
    else:
        target_ids = _normalize_targets(targets, n, v, ignore_index, device)

    # Every call checks every input, the LM head too, whatever wrote to it (an in-place op, .data, NumPy). A backend
    # whose kernel reads the whole head anyway checks it there (``checks_weight``: the C++ kernel tests each value
    # as it packs it and answers NaN values, about 10-20% of a CPU call saved); for the others it is one read of
    # V x D here (about 1% of the kernel's time on a GPU). A check cached by tensor version would miss writes
    # through .data, which keep the version.
    impl = registry.resolve(backend, device)
    weight_in_kernel = bool(getattr(impl, "checks_weight", False)) and n > 0
    _check_finite("hidden", hidden)
    if not weight_in_kernel:
        _check_finite("weight", weight)
    if bias is not None:
        _check_finite("bias", bias)
        bias = bias.to(torch.float32).contiguous()

    if n == 0:
        empty = torch.empty(0, dtype=torch.float32, device=device)
        return SoftValues(empty, empty.clone(), empty.clone() if return_entropy else None,
                          empty.clone() if return_logit_sum else None)
    extra = {"return_logit_sum": True} if return_logit_sum else {}  # backends return a 4th tensor when asked
    value, target_logit, entropy, *rest = impl(
        hidden, weight, target_ids, bias=bias, alpha=alpha, softcap=softcap, return_entropy=return_entropy, **extra
    )
    logit_sum = rest[0] if return_logit_sum else None
    if weight_in_kernel and not bool(torch.isfinite(value).all()):
        _check_finite("weight", weight)  # says so when the head is not finite; else the values are what they are
    target_logit = torch.where(target_ids >= 0, target_logit, torch.full_like(target_logit, math.nan))
    return SoftValues(value, target_logit, entropy if return_entropy else None, logit_sum)


def _check_tensor(name: str, x, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {x.dtype}; endokern takes float32, float16 or bfloat16 "
            f"(integer, complex and float64 inputs are not supported: cast them first)"
        )
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(x.shape)}")


def _check_positive(name: str, x) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a positive number, got {x!r}") from None
    if not (x > 0 and math.isfinite(x)):
        raise ValueError(f"{name} must be a finite number > 0, got {x}")
    return x


def _normalize_targets(targets, n: int, v: int, ignore_index: int, device) -> torch.Tensor:
    """Target ids as int64 with -1 for rows without a target (the backends' convention)."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor or None, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor of token ids, got {targets.dtype}")
    if targets.dim() != 1 or targets.shape[0] != n:
        raise ValueError(f"targets must have shape [N={n}], got {tuple(targets.shape)}")
    if targets.device != device:
        raise ValueError(f"hidden is on {device} but targets are on {targets.device}")
    targets = targets.to(torch.int64)
    has_target = targets != ignore_index
    bad = has_target & ((targets < 0) | (targets >= v))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"targets[{row}] = {int(targets[row])} is outside the vocabulary [0, {v}) "
            f"and is not ignore_index ({ignore_index})"
        )
    return torch.where(has_target, targets, torch.full_like(targets, -1)).contiguous()


def _check_finite(name: str, x: torch.Tensor) -> None:
    # aminmax propagates NaN and exposes +-Inf, without an N x D boolean temporary.
    if x.numel() == 0:
        return
    lo, hi = torch.aminmax(x)
    if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        raise ValueError(f"{name} contains NaN or Inf; endokern refuses to score non-finite inputs")
