"""C++ CPU backend: the kernel of ``csrc/``, built by ``setup.py`` as ``endokern._cpu_kernel``.

The SIMD path is the best the CPU supports (AVX-512 with bf16 dot products, AVX-512, AVX2 + FMA,
portable); ``ENDOKERN_CPU_SIMD=avx2`` (etc.) forces one, for tests and comparisons.
"""

from __future__ import annotations

import os
from typing import List, Optional

import torch

try:
    from endokern import _cpu_kernel  # type: ignore[attr-defined]

    UNAVAILABLE = None
except ImportError as exc:
    _cpu_kernel = None
    UNAVAILABLE = (
        "the C++ extension endokern._cpu_kernel is not built "
        f"({exc}); reinstall with a C++ compiler present (pip install .)"
    )

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def supported_simd() -> List[str]:
    """The SIMD paths this CPU can run, best last (empty when the extension is not built)."""
    return list(_cpu_kernel.supported_simd()) if _cpu_kernel is not None else []


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor],
    alpha: float,
    softcap: Optional[float],
    return_entropy: bool,
    simd: Optional[str] = None,
    return_logit_sum: bool = False,
):
    if _cpu_kernel is None:
        raise RuntimeError(UNAVAILABLE)
    simd = simd or os.environ.get("ENDOKERN_CPU_SIMD", "auto")
    if simd != "auto" and simd not in supported_simd():
        raise RuntimeError(f"SIMD path {simd!r} is not supported by this CPU; it runs {supported_simd()}")
    # the kernel reads rows with any stride but needs contiguous columns
    hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    targets = targets.contiguous()
    n, d = hidden.shape
    v = weight.shape[0]
    value = torch.empty(n, dtype=torch.float32)
    target_logit = torch.empty(n, dtype=torch.float32)
    entropy = torch.empty(n, dtype=torch.float32) if return_entropy else None
    logit_sum = torch.empty(n, dtype=torch.float32) if return_logit_sum else None
    _cpu_kernel.soft_values(
        hidden.data_ptr(), hidden.stride(0), weight.data_ptr(), weight.stride(0), DTYPE_CODES[hidden.dtype],
        bias.data_ptr() if bias is not None else 0, targets.data_ptr(), n, d, v, float(alpha),
        float(softcap) if softcap is not None else 0.0, return_entropy, value.data_ptr(), target_logit.data_ptr(),
        entropy.data_ptr() if entropy is not None else 0, simd, torch.get_num_threads(),
        logit_sum=logit_sum.data_ptr() if logit_sum is not None else 0,
    )
    if return_logit_sum:
        return value, target_logit, entropy, logit_sum
    return value, target_logit, entropy


# The kernel checks the LM head for NaN and Inf as it packs it (every value, every call, no extra pass) and answers
# NaN values when it is not finite; soft_values then reports it.
forward.checks_weight = True
