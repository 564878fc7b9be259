"""endokern: any causal language model as a reward model, scored by a fused soft-value kernel."""

import os as _os
import sys as _sys

# Threads that wait for a busy core sleep instead of spinning: with OpenMP's default (active) wait, two threads on a
# machine whose other core is taken ran 4 to 10 times slower than one (benchmarks/cpu_threads.py). It can only be set
# before torch starts its OpenMP runtime; a value the user set is kept.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .ops import BACKENDS, SoftValues, available_backends, soft_values  # noqa: E402

__version__ = "0.1.0"

__all__ = ["BACKENDS", "EndoRM", "RunResult", "ScoreResult", "Settings", "SoftValues", "available_backends", "run",
           "soft_values", "__version__"]


def __getattr__(name):
    # The model wrapper imports transformers; the kernels alone do not need it.
    if name in ("EndoRM", "ScoreResult"):
        from . import model

        return getattr(model, name)
    if name == "Settings":
        from .settings import Settings

        return Settings
    if name in ("run", "RunResult"):
        from . import runs

        return getattr(runs, name)
    raise AttributeError(f"module 'endokern' has no attribute {name!r}")
