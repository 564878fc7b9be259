"""Which backends can run here, and the choice made by ``backend="auto"``."""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

BACKENDS = ("triton", "cpu", "torch")


def unavailable_reason(name: str, device: Optional[torch.device] = None) -> Optional[str]:
    """Why backend ``name`` cannot run for tensors on ``device`` (None: it can)."""
    device = torch.device(device) if device is not None else None
    if name == "torch":
        return None
    if name == "triton":
        from . import triton_backend

        if triton_backend.IMPORT_ERROR is not None:
            return f"triton is not importable: {triton_backend.IMPORT_ERROR}"
        if device is not None and device.type == "cpu" and not triton_backend.triton_interpreting():
            return "triton runs CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 before importing triton"
        if device is not None and device.type not in ("cuda", "cpu"):
            return f"triton does not run {device.type} tensors"
        return None
    if name == "cpu":
        from . import cpu_backend

        if cpu_backend.UNAVAILABLE is not None:
            return cpu_backend.UNAVAILABLE
        if device is not None and device.type != "cpu":
            return f"the C++ kernel runs CPU tensors, not {device.type}"
        return None
    return f"unknown backend {name!r}; choose one of 'auto', {', '.join(map(repr, BACKENDS))}"


def available_backends(device="cpu") -> Dict[str, Optional[str]]:
    """``{backend: None if it runs on device else the reason it does not}``."""
    return {name: unavailable_reason(name, device) for name in BACKENDS}


def resolve(backend: str, device: torch.device) -> Callable:
    """The forward function of ``backend`` for tensors on ``device``; a clear error if it cannot run."""
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "cpu" if device.type == "cpu" else "torch"
        if unavailable_reason(backend, device) is not None:
            backend = "torch"
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is unavailable: {reason}")
    if backend == "triton":
        from .triton_backend import forward
    elif backend == "cpu":
        from .cpu_backend import forward
    else:
        from .torch_backend import forward
    return forward
