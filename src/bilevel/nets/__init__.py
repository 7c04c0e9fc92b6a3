"""Functional models: parameters are dicts of tensors, ``forward(params, x)`` is a pure function."""

from .mlp import mlp_forward, mlp_init

__all__ = ["mlp_init", "mlp_forward"]
