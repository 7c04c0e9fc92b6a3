"""``nn.Module`` <-> dicts of tensors: run any code that uses a module at weights given as a dict.

The functional core works on ``dict[str, Tensor]`` weights (``torch.func``); users write code that
calls their module (``model(x)``, or any function of the module and a batch). :func:`call`
evaluates such code with the module's parameters (and buffers) replaced by the given tensors,
through ``torch.func.functional_call`` on a thin wrapper, so ``torch.func.grad``, ``vjp`` and
``vmap`` compose with it and the module itself is left untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

__all__ = ["parameters", "buffers", "tied", "call", "bind"]

R = TypeVar("R")


class _Bound(nn.Module):
    """``forward(fn, *args) = fn(module, *args)``, so functional_call can swap the module's tensors."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.m = module

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.m, *args)


def parameters(module: nn.Module) -> dict[str, Tensor]:
    """The module's trainable parameters by name, detached (``requires_grad`` parameters only).

    Args:
        module: the model.

    Returns:
        ``{name: tensor}``, the weights the functional core differentiates.
    """
    return {k: v.detach() for k, v in module.named_parameters() if v.requires_grad}


def buffers(module: nn.Module) -> dict[str, Tensor]:
    """The module's buffers by name (e.g. BatchNorm running statistics).

    Args:
        module: the model.

    Returns:
        ``{name: tensor}`` (the module's own tensors, not copies).
    """
    return dict(module.named_buffers())


def tied(module: nn.Module) -> bool:
    """Whether the module holds one parameter or buffer under two names (tied weights, e.g. an embedding shared
    with the output layer).

    Args:
        module: the model.

    Returns:
        ``True`` when some tensor has two names (then :func:`call` must swap every name of it).
    """
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return len({id(t) for _, t in named}) != len(named)


def call(
    module: nn.Module,
    params: Mapping[str, Tensor],
    fn: Callable[..., R],
    *args: Any,
    buffers: Mapping[str, Tensor] | None = None,
    tie_weights: bool = True,
) -> R:
    """``fn(module, *args)`` with the module's parameters (and ``buffers``) replaced by the given tensors.

    Parameters not in ``params`` (frozen ones) keep their values. In-place buffer updates (BatchNorm
    in train mode) land in the ``buffers`` tensors passed, never in the module's own.

    Args:
        module: the model; left untouched.
        params: the weights to use, by parameter name.
        fn: code written on the module, ``fn(module, *args)``.
        *args: passed to ``fn``.
        buffers: the buffers to use (``None``: the module's own).
        tie_weights: a tensor given under one of its names replaces it under all of them (``torch.func``'s
            default). A caller that knows the module has no tied tensors (:func:`tied` is ``False``) may pass
            ``False``: the same result, without the search for tied names on every call (about 1 ms a call for
            60 tensors on a CPU).

    Returns:
        What ``fn`` returns, differentiable with respect to ``params`` (``torch.func`` composes with it).
    """
    bound = _Bound(module)  # a thin wrapper: cheap, and it keeps no reference to the module afterwards
    tensors = {f"m.{k}": v for k, v in params.items()}
    if buffers:
        tensors.update({f"m.{k}": v for k, v in buffers.items()})
    return torch.func.functional_call(bound, tensors, (fn, *args), strict=False, tie_weights=tie_weights)


def bind(fn: Callable[..., R], module: nn.Module) -> Callable[..., R]:
    """A loss written on the module, as a function of weights.

    Args:
        fn: ``fn(module, hparams)``.
        module: the model.

    Returns:
        ``f(params, hparams) = call(module, params, fn, hparams)``.
    """
    return lambda p, h: call(module, p, fn, h)
