"""Hypergradients by differentiating through K optimiser steps (unrolled differentiation).

The reference the IFT approximations are compared with (Lorraine et al. 2020,
Table 1 "unrolled differentiation"; Clarke et al. 2022 "Diff-through-Opt";
Vicol et al. 2021 "K-step unrolling"): starting from the current weights w_0,

    w_{k+1} = w_k - u(lambda, w_k),   hypergradient = d L_V(w_K(lambda), lambda) / d lambda,

full (through all K steps) or truncated to the last L steps (Shaban et al.
2019): the first K - L steps are taken without a graph.

Memory grows linearly with the number of differentiated steps L (the graph of
every step is kept for the backward pass), unlike the IFT solvers whose memory
is constant in the number of Neumann/CG steps.

Lorraine et al.'s Theorem 2: K steps of SGD with learning rate alpha unrolled
from a fixed point w* give exactly ``Neumann(steps=K-1, alpha)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from . import tree as T
from .errors import check_finite
from .hypergradient import Loss, check_inputs

__all__ = ["Tree", "StatefulUpdate", "unrolled_hypergradient", "replay_hypergradient"]

Tree = T.Tree
StatefulUpdate = Callable[[Mapping[str, Tensor], Mapping[str, Tensor], Any], tuple[Mapping[str, Tensor], Any]]


def unrolled_hypergradient(
    outer: Loss,
    params: Mapping[str, Tensor],
    hparams: Mapping[str, Tensor],
    *,
    steps: int,
    inner: Loss | None = None,
    lr: float | None = None,
    update: Callable[..., Any] | None = None,
    state: Any = None,
    truncate: int | None = None,
    check: bool = True,
) -> dict[str, Tensor]:
    """Hypergradient through ``steps`` weight updates from ``params``.

    Args:
        outer: validation loss L_V(params, hparams).
        params: starting weights w_0 (treated as independent of lambda).
        hparams: hyperparameters lambda.
        steps: K, the number of updates taken.
        inner, lr: plain gradient descent w <- w - lr * dL_T/dw, or
        update: a weight update. Without ``state`` it is ``update(w, lambda) -> u``;
            with ``state`` it is ``update(w, lambda, state) -> (u, new_state)``
            (momentum buffers, Adam moments), and the state is differentiated
            through as well, as in Clarke et al.'s Diff-through-Opt.
        state: the initial optimiser state of a stateful ``update``, or ``None`` for a stateless one.
        truncate: differentiate only through the last ``truncate`` steps
            (``None``: all K).
        check: raise :class:`NonFiniteError` on a non-finite loss or result
            (``False`` for populations that mark non-finite members themselves).

    Returns:
        The hypergradient dL_V(w_K)/dlambda with the keys and shapes of ``hparams`` (detached).

    Raises:
        ValueError: not exactly one of ``inner``/``update``, ``inner`` without ``lr``, or a ``truncate``
            outside ``0 .. steps``.
        NonFiniteError: (with ``check``) a non-finite loss or hypergradient.
    """
    check_inputs(params, hparams)
    if (inner is None) == (update is None):
        raise ValueError("pass exactly one of inner= (with lr=) or update=")
    if inner is not None and lr is None:
        raise ValueError("unrolling gradient descent on inner= needs lr=")
    if steps < 0 or (truncate is not None and not 0 <= truncate <= steps):
        raise ValueError(f"need 0 <= truncate <= steps, got steps={steps}, truncate={truncate}")
    h = {k: v.detach().requires_grad_(True) for k, v in hparams.items()}
    w: Tree = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    first_tracked = steps - (steps if truncate is None else truncate)

    def step(w: Tree, state: Any, track: bool) -> tuple[Tree, Any]:
        if inner is not None:
            assert lr is not None  # checked above
            loss = inner(w, h)
            if check:
                check_finite("training loss", loss.detach())
            g = torch.autograd.grad(loss, list(w.values()), create_graph=track)
            u, new_state = {k: lr * gk for k, gk in zip(w, g)}, state
        else:
            assert update is not None  # exactly one of inner/update, checked above
            if state is None:
                u, new_state = update(w, h), None
            else:
                u, new_state = update(w, h, state)
        new = {k: w[k] - u[k] for k in w}
        if not track:
            new = {k: v.detach().requires_grad_(True) for k, v in new.items()}
            new_state = _detach_any(new_state)
        return new, new_state

    with torch.enable_grad():
        for k in range(steps):
            w, state = step(w, state, track=k >= first_tracked)
        loss = outer(w, h)
        if check:
            check_finite("validation loss", loss.detach())
        grads = torch.autograd.grad(loss, list(h.values()), allow_unused=True)
    out = {k: torch.zeros_like(v) if g is None else g.detach() for (k, v), g in zip(h.items(), grads)}
    if check:
        check_finite("hypergradient", out)
    return out


def replay_hypergradient(
    outer: Loss,
    step_map: Callable[..., Any],
    window: Sequence[tuple[Mapping[str, Tensor], Any, Any]],
    tuned: Mapping[str, Tensor],
    fixed: Mapping[str, Tensor] | None = None,
    *,
    check: bool = True,
) -> dict[str, Tensor]:
    """Unrolled hypergradient through a recorded window of an online loop's last weight steps.

    ``window`` holds ``(w_k, state_k, ctx_k)`` for each of the last L steps (weights and
    optimiser state *before* step k, and that step's context: mini-batch, noise). The steps
    are replayed from ``w_0, state_0`` with their own contexts through
    ``step_map(params, raw, ctx, state, create_graph) -> (u, new_state, loss)`` and
    differentiated w.r.t. ``tuned`` (the untuned raw hyperparameters ``fixed`` are
    constants): Clarke et al.'s Diff-through-Opt over the look-back window, with the
    optimiser state differentiated through as well.

    Args:
        outer: the validation loss ``outer(params, tuned)``.
        step_map: ``step_map(params, raw, ctx, state, create_graph) -> (u, new_state, loss)``, one weight
            step ``w <- w - u`` of the loop.
        window: the recorded ``(w_k, state_k, ctx_k)`` of the last L steps, oldest first.
        tuned: the raw hyperparameters to differentiate with respect to.
        fixed: the other raw hyperparameters (constants).
        check: raise :class:`~bilevel.errors.NonFiniteError` on a non-finite loss or result.

    Returns:
        The hypergradient with the keys and shapes of ``tuned`` (detached).

    Raises:
        ValueError: an empty ``window``.
    """
    if not window:
        raise ValueError("replay_hypergradient needs at least one recorded weight step")
    fixed = dict(fixed or {})
    w0, state0, _ = window[0]
    ctxs = [c for _, _, c in window]

    def update(p: Tree, h: Tree, s: tuple[Any, int]) -> tuple[Any, tuple[Any, int]]:
        opt_state, k = s
        u, new, _ = step_map(p, {**fixed, **h}, ctxs[k], opt_state, True)
        return u, (new, k + 1)

    return unrolled_hypergradient(outer, w0, tuned, update=update, state=(state0, 0), steps=len(ctxs), check=check)


def _detach_any(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, Mapping):
        return {k: _detach_any(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_detach_any(v) for v in x)
    return x
