"""Multi-layer perceptron as a pure function of a parameter dict (Clarke et al.'s 50-unit MLP)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["mlp_init", "mlp_forward"]


def mlp_init(
    sizes: Sequence[int], generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """MLP parameters drawn as ``torch.nn.Linear`` does: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both.

    Args:
        sizes: layer widths, input first, output last.
        generator: the random generator.
        dtype: the parameters' dtype (drawn in float64 first).

    Returns:
        Weights ``W{i}`` (out, in) and biases ``b{i}`` (out,).
    """
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        bound = fan_in**-0.5
        params[f"W{i}"] = (
            (torch.rand(fan_out, fan_in, generator=generator, dtype=torch.float64) * 2 - 1).mul(bound).to(dtype)
        )
        params[f"b{i}"] = (torch.rand(fan_out, generator=generator, dtype=torch.float64) * 2 - 1).mul(bound).to(dtype)
    return params


def mlp_forward(params: dict[str, Tensor], x: Tensor) -> Tensor:
    """ReLU MLP: x -> [Linear -> ReLU] * (L - 1) -> Linear.

    Args:
        params: :func:`mlp_init`'s parameters.
        x: inputs, shape (N, in).

    Returns:
        Outputs, shape (N, out).
    """
    n = len(params) // 2
    for i in range(n):
        x = x @ params[f"W{i}"].T + params[f"b{i}"]
        if i < n - 1:
            x = torch.relu(x)
    return x
