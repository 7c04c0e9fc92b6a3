"""The two linear maps and the global loss: ``_Copy`` (f), ``_Reduce`` (g) and :func:`data_parallel_loss`.

f and g are each other's transposes, so each autograd Function's backward is the other Function and every
derivative of a wrapped loss, of any order, is global (the maths: :mod:`bilevel.distributed`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from .ranks import is_data_parallel, world_size

__all__ = ["data_parallel_loss"]


_F = TypeVar("_F", bound=Callable[..., Tensor])  # loss(params, hparams, batch) -> () or (P,)


def _all_reduce(tensors: Sequence[Tensor], group: Any) -> tuple[Tensor, ...]:
    """The all-reduce SUM of ``tensors``: one ``torch.distributed.all_reduce`` per (dtype, device) bucket.

    Each bucket is flattened into one new vector (the inputs are not modified), reduced in place and split back
    into views of the caller's shapes.
    """
    buckets: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.dtype, t.device), []).append(i)
    out: list[Tensor | None] = [None] * len(tensors)
    for idx in buckets.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=group)
        for i, piece in zip(idx, flat.split([tensors[i].numel() for i in idx])):
            out[i] = piece.view(tensors[i].shape)
    return tuple(t for t in out if t is not None)


class _Reduce(torch.autograd.Function):
    """``g``: rank-local tensors -> their all-reduce SUM (replicated). Backward: the identity (``_Copy``)."""

    @staticmethod
    def forward(group: Any, *tensors: Tensor) -> tuple[Tensor, ...]:
        return _all_reduce(tensors, group)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.group = inputs[0]

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Any, ...]:
        return (None, *_Copy.apply(ctx.group, *grads))


class _Copy(torch.autograd.Function):
    """``f``: replicated tensors -> the same values for rank-local use. Backward: all-reduce SUM (``_Reduce``)."""

    @staticmethod
    def forward(group: Any, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.group = inputs[0]

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Any, ...]:
        return (None, *_Reduce.apply(ctx.group, *grads))


def _leaves(tree: Any, out: list[Tensor]) -> None:
    if isinstance(tree, Tensor):
        out.append(tree)
    elif isinstance(tree, Mapping):
        for v in tree.values():
            _leaves(v, out)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            _leaves(v, out)


def _rebuild(tree: Any, new: dict[int, Tensor]) -> Any:
    if isinstance(tree, Tensor):
        return new.get(id(tree), tree)
    if isinstance(tree, Mapping):
        return {k: _rebuild(v, new) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # a named tuple
        return type(tree)(*(_rebuild(v, new) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(_rebuild(v, new) for v in tree)
    return tree


def _copy_in(tree: Any, group: Any) -> Any:
    """``tree`` with every tensor that requires grad passed through ``_Copy`` (all of them in one call: one bucket).

    Mappings (nested too) become dicts, lists and tuples keep their types; tensors that need no gradient and
    non-tensors are kept as they are. Without grad mode, or with nothing requiring grad, ``tree`` itself.
    """
    if not torch.is_grad_enabled():
        return tree
    found: list[Tensor] = []
    _leaves(tree, found)
    todo = list({id(t): t for t in found if t.requires_grad}.values())  # each tensor once
    if not todo:
        return tree
    copies = _Copy.apply(group, *todo)
    return _rebuild(tree, {id(t): c for t, c in zip(todo, copies)})


def data_parallel_loss(loss: _F, group: Any = None) -> _F:
    """``loss`` as the global mean over the ranks' shards, whose derivatives of every order are global.

    The wrapped function evaluates ``loss(params, hparams, batch)`` on this rank's shard and returns
    ``(1/N) sum_r loss_r``, the same on every rank. Every tensor in ``params`` and in ``hparams`` (a dict,
    possibly nested, of tensors and other values) that requires grad passes through ``_Copy`` first (one
    bucket each for the weights and for the hyperparameters), so every gradient with respect to them, and
    every derivative of those gradients, is summed over the ranks in backward: one all-reduce per backward
    pass for the weights, and one for the hyperparameters when the loss reads them (see the module docstring
    for the maths and the counts). The shards must have equal sizes (``DistributedSampler(drop_last=True)``
    or its padding, and ``DataLoader(drop_last=True)``).

    Args:
        loss: ``loss(params, hparams, batch)`` returning a scalar (or shape (P,) for a stacked population),
            the mean over ``batch``.
        group: the process group the ranks form (``None``: the default group).

    Returns:
        The wrapped loss, or ``loss`` itself (the same object) when ``torch.distributed`` is not
        initialised, the group has one rank, or ``loss`` is wrapped already. Mappings in ``params`` and
        ``hparams`` reach ``loss`` as dicts.
    """
    if not is_data_parallel(group) or getattr(loss, "data_parallel", False):
        return loss  # one rank, or wrapped already
    n = world_size(group)

    @functools.wraps(loss)
    def wrapped(params: Any, hparams: Any, batch: Any) -> Tensor:
        value = loss(_copy_in(params, group), _copy_in(hparams, group), batch)
        if not isinstance(value, Tensor):
            raise TypeError(f"the loss must return a tensor, got {type(value).__name__}")
        (total,) = _Reduce.apply(group, value / n)
        return total

    wrapped.data_parallel = True  # type: ignore[attr-defined]
    return wrapped  # type: ignore[return-value]
