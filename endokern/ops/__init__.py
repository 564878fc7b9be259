"""Kernels: the ``soft_values`` front door and one module per backend."""

from .registry import BACKENDS, available_backends
from .soft_values import SoftValues, soft_values

__all__ = ["BACKENDS", "SoftValues", "available_backends", "soft_values"]
