"""endokern: any causal language model as a reward model, scored by a fused soft-value kernel."""

from .ops import BACKENDS, SoftValues, available_backends, soft_values

__version__ = "0.1.0"

__all__ = ["BACKENDS", "SoftValues", "available_backends", "soft_values", "__version__"]
