"""Populations of independent initialisations trained as one vectorised computation.

Clarke et al. (2022) train 100-200 random hyperparameter initialisations per
method. Here every weight and raw hyperparameter tensor carries a leading
population axis of size P; the model's forward pass is ``torch.func.vmap``-ed
over it, and the population's losses are summed before differentiation. The
members do not interact, so the Hessian / update Jacobian of the sum is block
diagonal and every gradient, Neumann series and hypergradient of the sum is the
stack of the members' own (tested against training each member alone).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .tree import Tree

__all__ = [
    "stack",
    "member",
    "size",
    "per_member",
    "vmap_loss",
    "module_forward",
    "module_population",
    "init_population",
    "SEED_STRIDE",
    "derived_seed",
]

#: Seeds of different base seeds are this far apart (a prime): :func:`derived_seed`.
SEED_STRIDE = 1_000_003


def derived_seed(seed: int, i: int = 0) -> int:
    """The seed of initialisation (or stream) ``i`` of a run with base seed ``seed``: ``seed * SEED_STRIDE + i``.

    Base seed 0 gives ``i`` itself; different base seeds give disjoint seeds as long as
    ``0 <= i < SEED_STRIDE`` (whereas ``seed + i`` would make base seed 1 repeat all but the first
    initialisation of base seed 0). Pass ``derived_seed(seed, first)`` to :func:`init_population` for
    members ``first, first + 1, ...``.

    Args:
        seed: the run's base seed (>= 0).
        i: the initialisation or stream, ``0 <= i < SEED_STRIDE``.

    Returns:
        ``seed * SEED_STRIDE + i``.

    Raises:
        ValueError: ``seed < 0`` or ``i`` out of range.
    """
    if seed < 0 or not 0 <= i < SEED_STRIDE:
        raise ValueError(f"derived_seed needs seed >= 0 and 0 <= i < {SEED_STRIDE}, got seed={seed}, i={i}")
    return seed * SEED_STRIDE + i


def stack(trees: Sequence[Mapping[str, Tensor]]) -> Tree:
    """Stack P dicts of tensors with equal keys and shapes along a new leading axis.

    Args:
        trees: the members, in order.

    Returns:
        One tree whose leaves have shape ``(P, *leaf_shape)``; member i is ``trees[i]``.

    Raises:
        ValueError: no member.
    """
    if not trees:
        raise ValueError("cannot stack an empty population")
    return {k: torch.stack([t[k] for t in trees]) for k in trees[0]}


def member(tree: Mapping[str, Tensor], i: int) -> Tree:
    """Member ``i`` of a stacked tree (the inverse of :func:`stack`).

    Args:
        tree: a stacked tree (leading population axis).
        i: the member.

    Returns:
        The member's tree (views of the stacked leaves).
    """
    return {k: v[i] for k, v in tree.items()}


def size(tree: Mapping[str, Tensor]) -> int:
    """The population size P of a stacked tree.

    Args:
        tree: a stacked tree.

    Returns:
        The length of the leading axis (of its first leaf).
    """
    return next(iter(tree.values())).shape[0]


def per_member(value: Tensor, like: Tensor) -> Tensor:
    """View a per-member value so that it broadcasts against a stacked leaf.

    Args:
        value: one value per member, shape (P,) (or already ``like``'s number of dimensions).
        like: a stacked leaf, shape (P, ...).

    Returns:
        ``value`` reshaped to (P, 1, ..., 1), as many dimensions as ``like``.
    """
    if value.dim() == like.dim():
        return value
    return value.reshape(value.shape + (1,) * (like.dim() - value.dim()))


def vmap_loss(
    forward: Callable[..., Tensor], loss: Callable[[Tensor, Tensor], Tensor]
) -> Callable[[Tree, Any, Any], Tensor]:
    """``(stacked_params, hparams, (x, y)) -> (P,)``: per-member ``loss(forward(params, x), y)``.

    The signature of :class:`bilevel.tuner.OnlineTuner`'s losses (``hparams``, the natural
    hyperparameters, is not used: the hyperparameters of such a loss are all update-form).

    Args:
        forward: ``forward(params, x)`` of one member.
        loss: ``loss(output, y)`` of one member, a scalar.

    Returns:
        The population's loss function, vectorised over the leading axis of the parameters with
        ``torch.func.vmap`` (the batch is shared by every member).
    """
    one = lambda p, x, y: loss(forward(p, x), y)  # noqa: E731
    batched = torch.func.vmap(one, in_dims=(0, None, None))
    return lambda p, h, batch: batched(p, *batch)


def module_forward(module: torch.nn.Module) -> Callable[[Tree, Tensor], Tensor]:
    """``forward(params, x)`` for an ``nn.Module`` through ``torch.func.functional_call``.

    ``params`` are the module's parameters (as from ``dict(module.named_parameters())``);
    the module's buffers are used as they are (e.g. BatchNorm statistics in eval mode).

    Args:
        module: the model.

    Returns:
        ``forward(params, x)``, composable with ``torch.func.vmap`` over stacked parameters.
    """
    buffers = dict(module.named_buffers())
    return lambda p, x: torch.func.functional_call(module, (p, buffers), (x,))


def module_population(module: torch.nn.Module, n: int) -> Tree:
    """n identical copies of a module's parameters, stacked (re-initialise them as you like).

    Args:
        module: the model.
        n: the population size.

    Returns:
        The stacked parameters (detached copies), leading axis ``n``.
    """
    return stack([{k: v.detach().clone() for k, v in module.named_parameters()} for _ in range(n)])


def init_population(
    make_params: Callable[[torch.Generator], Mapping[str, Tensor]],
    n: int,
    seed: int,
    make_hparams: Callable[[Mapping[str, Tensor], torch.Generator], Mapping[str, Tensor]] | None = None,
) -> tuple[Tree, Tree]:
    """Initialise members ``seed, seed + 1, ..., seed + n - 1``: member i uses its own generator.

    So member i of a population equals a population of one started with
    ``seed + i`` -- the basis of the vectorised-vs-alone equivalence. To give runs with different base
    seeds disjoint members, pass ``seed=derived_seed(base, first)`` (:func:`derived_seed`).

    Args:
        make_params: ``make_params(generator)``, one member's weights.
        n: the population size.
        seed: the seed of member 0.
        make_hparams: ``make_hparams(params, generator)``, one member's raw hyperparameters, drawn after its
            weights from the same generator (``None``: no hyperparameters).

    Returns:
        ``(params, raw_hparams)`` stacked (``raw_hparams`` is ``{}`` without ``make_hparams``).
    """
    ps, hs = [], []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        p = make_params(g)
        ps.append(p)
        if make_hparams is not None:
            hs.append(make_hparams(p, g))
    return stack(ps), (stack(hs) if hs else {})
