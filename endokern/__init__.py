"""endokern: any causal language model as a reward model, scored by a fused soft-value kernel."""

from .ops import BACKENDS, SoftValues, available_backends, soft_values

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
