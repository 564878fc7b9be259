"""C++ CPU backend: the kernel of ``csrc/``, built by ``setup.py`` as ``endokern._cpu_kernel``."""

from __future__ import annotations

try:
    from endokern import _cpu_kernel  # type: ignore[attr-defined]

    UNAVAILABLE = None
except ImportError as exc:
    _cpu_kernel = None
    UNAVAILABLE = (
        "the C++ extension endokern._cpu_kernel is not built "
        f"({exc}); reinstall with a C++ compiler present (pip install .)"
    )


def forward(hidden, weight, targets, *, bias, alpha, softcap, return_entropy):
    raise RuntimeError(UNAVAILABLE or "the C++ kernel's Python binding is missing")
