"""The implicit-function-theorem hypergradient: the contract every method shares.

At a fixed point r(lambda, w*) = 0 of the inner problem, the implicit function
theorem gives dw*/dlambda = -J^{-1} dr/dlambda with J = dr/dw, so

    dL_V/dlambda = dL_V/dlambda|_direct - dL_V/dw (J + eps I)^{-1} dr/dlambda

(Lorraine et al. 2020, eq. 2-3; Clarke et al. 2022, eq. 4-7; eps = 0 is the
plain IFT, eps > 0 Vicol et al. 2021's proximal best response). The residual is

* ``inner=L_T``: r = dL_T/dw, J the training-loss Hessian (Lorraine et al.), or
* ``update=u``: r = u(lambda, w) with w <- w - u (Clarke et al.), which makes
  learning rates and momenta tunable.

The vector dL_V/dw (J + eps I)^{-1} is delegated to a solver from
:mod:`bilevel.solvers`; only vector-Jacobian products of r are ever formed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from . import _tree as T
from . import functional as Fn
from .errors import check_finite, check_like
from .solvers import LinearOperator, Solver
from .solvers import largest_eigenvalue as _power_iteration

__all__ = ["hypergradient", "linearise", "largest_eigenvalue", "Loss", "Update", "Backend"]

Tree = T.Tree
# called with plain dicts (params, hparams); a function taking Mappings is one of these too
Loss = Callable[[Tree, Tree], Tensor]
Update = Callable[[Tree, Tree], Mapping[str, Tensor]]
Backend = Literal["autograd", "func", "compile"]


class JacobianOperator(LinearOperator, Protocol):
    """What :func:`linearise` returns: products with J = dr/dw, and with dr/dlambda."""

    def hparam_vjp(self, x: Tree) -> Tree:
        """x^T dr/dlambda (a vector-Jacobian product with respect to the hyperparameters)."""
        ...


class _AutogradOperator:
    """Products with J = dr/dw by reverse-over-reverse on one retained graph of r.

    r is built once with ``create_graph=True``; every product is one backward
    pass through that graph (the "eager double backward", the fastest path we
    measured, see docs/benchmarks.md) and adds nothing to it.

    Products are not checked one by one (a finiteness check costs about half a
    gradient per product on a 1M-weight MLP): a non-finite product propagates
    into the solver's result, which the solvers (Neumann's term norms, CG's
    curvature) and :func:`hypergradient` check and name.
    """

    def __init__(self, residual: Tree, params: Tree, hparams: Tree) -> None:
        self.r, self.params, self.hparams = residual, params, hparams

    def _vjp(self, x: Tree, wrt: Tree, create_graph: bool = False) -> Tree:
        outs = [self.r[k] for k in self.params]
        cot = [x[k] for k in self.params]
        grads = torch.autograd.grad(
            outs, list(wrt.values()), cot, retain_graph=True, allow_unused=True, create_graph=create_graph
        )
        return {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(wrt.items(), grads)}

    def rmatvec(self, x: Tree) -> Tree:
        return T.detach(self._vjp(x, self.params))

    def hparam_vjp(self, x: Tree) -> Tree:
        return T.detach(self._vjp(x, self.hparams))

    def matvec(self, x: Tree) -> Tree:
        # J x by the double-vjp trick: d/dz <J^T z, x> = J x.
        z = {k: torch.zeros_like(v, requires_grad=True) for k, v in self.params.items()}
        jtz = self._vjp(z, self.params, create_graph=True)
        outs = [jtz[k] for k in self.params]
        grads = torch.autograd.grad(
            outs, list(z.values()), [x[k] for k in self.params], retain_graph=True, allow_unused=True
        )
        return {k: torch.zeros_like(v) if g is None else g.detach() for (k, v), g in zip(z.items(), grads)}


class _FuncOperator:
    """The same products through ``torch.func.vjp`` (composable with ``vmap``)."""

    def __init__(
        self, residual_fn: Callable[[Tree, Tree], Tree], params: Mapping[str, Tensor], hparams: Mapping[str, Tensor]
    ) -> None:
        out = torch.func.vjp(residual_fn, dict(params), dict(hparams))  # (r, vjp_fn) without has_aux
        self.r: Tree = out[0]
        self._vjp_fn: Callable[[Tree], tuple[Tree, Tree]] = out[1]
        self.params = params

    def rmatvec(self, x: Tree) -> Tree:
        return self._vjp_fn(x)[0]

    def hparam_vjp(self, x: Tree) -> Tree:
        return self._vjp_fn(x)[1]

    def matvec(self, x: Tree) -> Tree:
        vjp2 = torch.func.vjp(lambda z: self._vjp_fn(z)[0], T.zeros_like(self.params))[1]
        return vjp2(x)[0]


class _CompiledOperator(_FuncOperator):
    """Products from ``torch.compile``-d vector-Jacobian products of the residual, recomputed per product.

    Two compiled programs: x -> x^T dr/dw (every solver step) and x -> x^T dr/dlambda
    (once per hypergradient), each re-running the forward and backward of r (no graph
    is kept). They are cached per user function (``inner``/``update``; the same
    object compiles once) in a table of the ``cache_size`` most recently used
    functions, so a loop that builds a new closure every call does not grow memory. On this CPU the eager graph reuse of
    ``"autograd"`` measured as fast or faster (docs/benchmarks.md); compiling pays off
    mostly on a GPU. The first call pays the compilation.
    """

    cache_size = 8
    params: Tree  # plain dicts here (the compiled programs take them)
    hparams: Tree
    _cache: OrderedDict[Hashable, tuple[Callable[[Tree, Tree, Tree], Tree], Callable[[Tree, Tree, Tree], Tree]]] = (
        OrderedDict()
    )

    def __init__(
        self,
        residual_fn: Callable[[Tree, Tree], Tree],
        params: Mapping[str, Tensor],
        hparams: Mapping[str, Tensor],
        key: Hashable,
    ) -> None:
        fns = self._cache.get(key)
        if fns is None:

            def wrt_params(p: Tree, h: Tree, x: Tree) -> Tree:
                return torch.func.vjp(lambda q: residual_fn(q, h), p)[1](x)[0]

            def wrt_hparams(p: Tree, h: Tree, x: Tree) -> Tree:
                return torch.func.vjp(lambda g: residual_fn(p, g), h)[1](x)[0]

            fns = (torch.compile(wrt_params, dynamic=False), torch.compile(wrt_hparams, dynamic=False))
            self._cache[key] = fns
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        self._wrt_params, self._wrt_hparams = fns
        self.params, self.hparams = dict(params), dict(hparams)
        self.r = residual_fn(self.params, self.hparams)

    def rmatvec(self, x: Tree) -> Tree:
        return self._wrt_params(self.params, self.hparams, x)

    def hparam_vjp(self, x: Tree) -> Tree:
        return self._wrt_hparams(self.params, self.hparams, x)

    def matvec(self, x: Tree) -> Tree:
        raise ValueError("ConjugateGradient(normal_equations=True) needs backend='autograd' or 'func', not 'compile'")


def _residual_fn(inner: Loss | None, update: Update | None) -> Callable[[Tree, Tree], Tree]:
    if (inner is None) == (update is None):
        raise ValueError("pass exactly one of inner= (training loss) or update= (weight update map)")
    if inner is not None:
        return lambda p, h: torch.func.grad(inner, argnums=0)(p, h)
    assert update is not None  # exactly one of inner/update, checked above
    return lambda p, h: dict(update(p, h))


def _leaves(tree: Mapping[str, Tensor]) -> Tree:
    return {k: v.detach().requires_grad_(True) for k, v in tree.items()}


def _validate(params: Mapping[str, Tensor], hparams: Mapping[str, Tensor]) -> None:
    for name, tree in (("params", params), ("hparams", hparams)):
        if not isinstance(tree, Mapping) or not tree:
            raise ValueError(f"{name} must be a non-empty dict of tensors, got {type(tree).__name__}")
        for k, v in tree.items():
            if not isinstance(v, Tensor) or not v.is_floating_point():
                got = f"a tensor of dtype {v.dtype}" if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(f"{name}[{k!r}] must be a floating-point tensor, got {got}")


def _check_scalar(name: str, value: object) -> None:
    if not isinstance(value, Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"the {name} must return a scalar tensor, got {shape}: reduce it (e.g. .mean() or .sum())")


def linearise(
    params: Mapping[str, Tensor],
    hparams: Mapping[str, Tensor],
    *,
    inner: Loss | None = None,
    update: Update | None = None,
    backend: Backend = "autograd",
    check: bool = True,
) -> tuple[JacobianOperator, Tree, Tree]:
    """The Jacobian operator of the residual r at (params, hparams), plus leaf copies.

    Returns ``(op, params_leaves, hparams_leaves)``; ``op.rmatvec``, ``op.matvec``
    and ``op.hparam_vjp`` give x^T J, J x and x^T dr/dlambda.
    """
    _validate(params, hparams)
    fn = _residual_fn(inner, update)
    if backend in ("func", "compile"):
        op: _FuncOperator = (
            _FuncOperator(fn, params, hparams)
            if backend == "func"
            else _CompiledOperator(fn, params, hparams, key=inner if inner is not None else update)
        )
        check_like("update(params, hparams)", op.r, params, "params")
        if check:
            check_finite("residual (training gradient or update)", T.detach(op.r))
        return op, dict(params), dict(hparams)
    if backend != "autograd":
        raise ValueError(f"unknown backend {backend!r}: use 'autograd', 'func' or 'compile'")
    p, h = _leaves(params), _leaves(hparams)
    with torch.enable_grad():
        if inner is not None:
            loss = inner(p, h)
            _check_scalar("training loss inner(params, hparams)", loss)
            if check:
                check_finite("training loss", loss)
            grads = torch.autograd.grad(loss, list(p.values()), create_graph=True)
            r = dict(zip(p, grads))
        else:
            assert update is not None  # _residual_fn checked: exactly one of inner/update
            r = dict(update(p, h))
            check_like("update(params, hparams)", r, p, "params")
    if check:
        check_finite("residual (training gradient or update)", T.detach(r))
    return _AutogradOperator(r, p, h), p, h


def _unmodule(params: Mapping[str, Tensor] | nn.Module, *fns: Callable | None) -> tuple[Mapping[str, Tensor], list]:
    """An ``nn.Module`` as weights: its trainable parameters, and ``fn(model, h)`` -> ``fn(params, h)``."""
    if not isinstance(params, nn.Module):
        return params, list(fns)
    return Fn.parameters(params), [None if f is None else Fn.bind(f, params) for f in fns]


def hypergradient(
    outer: Loss,
    params: Mapping[str, Tensor] | nn.Module,
    hparams: Mapping[str, Tensor],
    *,
    inner: Loss | None = None,
    update: Update | None = None,
    solver: Solver,
    backend: Backend = "autograd",
    check: bool = True,
) -> dict[str, Tensor]:
    """IFT hypergradient dL_V/dlambda at the current weights (Lorraine et al. 2020, eq. 2-3).

    Args:
        outer: ``outer(params, hparams) -> scalar`` validation loss L_V.
        params: weights w, a dict of tensors, or an ``nn.Module`` (its trainable parameters; ``outer``,
            ``inner`` and ``update`` then take ``(model, hparams)`` and call ``model(x)`` as usual).
        hparams: hyperparameters lambda, a dict of tensors of any shapes.
        inner: training loss L_T; the fixed point is dL_T/dw = 0.
        update: weight update u(lambda, w) with w <- w - u (Clarke et al. 2022, eq. 4-7);
            the fixed point is u = 0. Exactly one of ``inner``/``update``.
        solver: a :mod:`bilevel.solvers` solver giving v (J + eps I)^{-1}.
        backend: ``"autograd"`` (default: one retained double-backward graph, the
            fastest on a CPU), ``"func"`` (``torch.func.vjp``, composable with other
            ``torch.func`` transforms) or ``"compile"`` (``torch.compile``-d products).
        check: raise :class:`NonFiniteError` on non-finite quantities (default). A
            population of independent problems (block-diagonal J) passes ``False``
            and marks its non-finite members itself.

    Returns:
        dL_V/dlambda - (dL_V/dw) (J + eps I)^{-1} (dr/dlambda), with the keys and
        shapes of ``hparams``, detached. The direct term dL_V/dlambda is included.

    Raises:
        NonFiniteError: a non-finite loss, product or result (names which).
        NeumannDivergenceError: from ``Neumann`` when its terms grow.
        ValueError: mismatched keys or shapes.
    """
    params, (outer, inner, update) = _unmodule(params, outer, inner, update)
    op, p, h = linearise(params, hparams, inner=inner, update=update, backend=backend, check=check)
    if backend in ("func", "compile"):
        (v, direct), loss = torch.func.grad_and_value(outer, argnums=(0, 1))(p, h)
    else:
        with torch.enable_grad():
            loss = outer(p, h)
            _check_scalar("validation loss outer(params, hparams)", loss)
            if check:
                check_finite("validation loss", loss)
            g = torch.autograd.grad(loss, list(p.values()) + list(h.values()), allow_unused=True)
        v = {k: torch.zeros_like(t) if gi is None else gi for (k, t), gi in zip(p.items(), g[: len(p)])}
        direct = {k: torch.zeros_like(t) if gi is None else gi for (k, t), gi in zip(h.items(), g[len(p) :])}
    if check:
        check_finite("validation loss", loss.detach())
        check_finite("validation gradient dL_V/dw", T.detach(v))
    x = solver(op, T.detach(v))
    if check:  # also catches a non-finite Jacobian-vector product inside the solver
        check_finite("inverse-Jacobian-vector product (a Jacobian-vector product or the solver overflowed)", x)
    indirect = op.hparam_vjp(x)
    out = {k: (direct[k] - indirect[k]).detach() for k in h}
    if check:
        check_finite("hypergradient", out)
    return out


def largest_eigenvalue(
    params: Mapping[str, Tensor] | nn.Module,
    hparams: Mapping[str, Tensor],
    *,
    inner: Loss | None = None,
    update: Update | None = None,
    iters: int = 20,
) -> float:
    """Power-iteration estimate of lambda_max(J), so that ``Neumann(alpha <= 1/lambda_max)`` converges.

    ``params`` may be an ``nn.Module`` (then ``inner``/``update`` take ``(model, hparams)``)."""
    params, (inner, update) = _unmodule(params, inner, update)
    op, p, _ = linearise(params, hparams, inner=inner, update=update)
    return _power_iteration(op, T.detach(p), iters=iters)
