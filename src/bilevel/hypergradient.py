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

from . import functional as Fn
from . import tree as T
from .errors import check_finite, check_like
from .solvers import LinearOperator, Solver, power_iteration

__all__ = ["hypergradient", "linearise", "largest_eigenvalue", "check_inputs", "Loss", "Update", "Backend"]

Tree = T.Tree
# called with plain dicts (params, hparams); a function taking Mappings is one of these too
Loss = Callable[[Tree, Tree], Tensor]
Update = Callable[[Tree, Tree], Mapping[str, Tensor]]
Backend = Literal["autograd", "func", "compile"]


class JacobianOperator(LinearOperator, Protocol):
    """What :func:`linearise` returns: products with J = dr/dw, and with dr/dlambda."""

    def hparam_vjp(self, x: Tree) -> Tree:
        """x^T dr/dlambda (a vector-Jacobian product with respect to the hyperparameters).

        Args:
            x: a vector, keys and shapes of the weights.

        Returns:
            x^T dr/dlambda, keys and shapes of the hyperparameters.
        """
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

    def __init__(self, residual: Tree, params: Tree, hparams: Tree, symmetric: bool = False) -> None:
        self.r, self.params, self.hparams = residual, params, hparams
        self.symmetric = symmetric  # J is a Hessian (inner=): symmetric by construction

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
        self.symmetric = False  # set by linearise: True for a Hessian (inner=)
        self._vjp_fn: Callable[[Tree], tuple[Tree, Tree]] = out[1]
        self.params = params

    def rmatvec(self, x: Tree) -> Tree:
        return self._vjp_fn(x)[0]

    def hparam_vjp(self, x: Tree) -> Tree:
        return self._vjp_fn(x)[1]

    def matvec(self, x: Tree) -> Tree:
        vjp2 = torch.func.vjp(lambda z: self._vjp_fn(z)[0], T.zeros_like(self.params))[1]
        return vjp2(x)[0]


class _Compiled:
    """``backend="compile"``: the whole hypergradient as one ``torch.compile``-d program.

    The program is the ``"func"`` path end to end (:func:`_func_hypergradient`: the validation
    gradient, every product of the solver's loop and the hyperparameter product), so the compiler
    sees the loop unrolled: it shares the forward work that every product of the loop repeats and
    fuses the solver's vector arithmetic into the products (jaxopt's ``jax.jit`` of ``custom_root``
    does the same). The solvers take a branch-free path while traced (``torch.compiler.is_compiling``).
    The first call for an ``(outer, inner or update, solver)`` triple runs eagerly with every check
    (shapes, symmetry, Neumann divergence) and compiles for the next calls; later calls check the
    finiteness of the residual, the losses and the result only. Programs are cached per triple (the
    same objects compile once; shapes are static) in a table of the ``cache_size`` most recently used,
    so a loop that builds new closures every call does not grow memory (it recompiles instead).
    """

    cache_size = 8
    _cache: OrderedDict[Hashable, Callable[[Tree, Tree], tuple[Tree, Tensor, Tree, Tree, Tree]]] = OrderedDict()

    @classmethod
    def lookup(cls, key: Hashable) -> Callable[[Tree, Tree], tuple[Tree, Tensor, Tree, Tree, Tree]] | None:
        fn = cls._cache.get(key)
        if fn is not None:
            cls._cache.move_to_end(key)
        return fn

    @classmethod
    def store(cls, key: Hashable, fn: Callable[[Tree, Tree], tuple[Tree, Tensor, Tree, Tree, Tree]]) -> None:
        cls._cache[key] = torch.compile(fn, dynamic=False)
        while len(cls._cache) > cls.cache_size:
            cls._cache.popitem(last=False)


def _func_hypergradient(
    outer: Loss, residual_fn: Callable[[Tree, Tree], Tree], symmetric: bool, solver: Solver, p: Tree, h: Tree
) -> tuple[Tree, Tensor, Tree, Tree, Tree]:
    """(hypergradient, L_V, dL_V/dw, the solver's x, the residual r) by ``torch.func`` alone (traceable)."""
    (v, direct), loss = torch.func.grad_and_value(outer, argnums=(0, 1))(p, h)
    op = _FuncOperator(residual_fn, p, h)
    op.symmetric = symmetric
    x = solver(op, v)
    indirect = op.hparam_vjp(x)
    return {k: direct[k] - indirect[k] for k in h}, loss, v, x, op.r


def _residual_fn(inner: Loss | None, update: Update | None) -> Callable[[Tree, Tree], Tree]:
    if (inner is None) == (update is None):
        raise ValueError("pass exactly one of inner= (training loss) or update= (weight update map)")
    if inner is not None:
        return lambda p, h: torch.func.grad(inner, argnums=0)(p, h)
    assert update is not None  # exactly one of inner/update, checked above
    return lambda p, h: dict(update(p, h))


def _leaves(tree: Mapping[str, Tensor]) -> Tree:
    return {k: v.detach().requires_grad_(True) for k, v in tree.items()}


def check_inputs(params: Mapping[str, Tensor], hparams: Mapping[str, Tensor]) -> None:
    """Check the weights and hyperparameters every hypergradient takes (:func:`hypergradient`,
    :func:`bilevel.unroll.unrolled_hypergradient`, :mod:`bilevel.concepts`).

    Args:
        params: the weights w.
        hparams: the hyperparameters lambda.

    Raises:
        ValueError: either is not a non-empty dict of floating-point tensors (the message names the
            first offending key and what it holds).
    """
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

    Args:
        params: the weights w (a dict of floating-point tensors).
        hparams: the hyperparameters lambda.
        inner: the training loss L_T (r = dL_T/dw, J its Hessian), or
        update: the weight update map u (r = u, J = du/dw); exactly one of the two.
        backend: ``"autograd"`` (one retained double-backward graph) or ``"func"``/``"compile"``
            (``torch.func.vjp``; linearising is eager either way).
        check: raise :class:`~bilevel.errors.NonFiniteError` on a non-finite loss or residual.

    Returns:
        ``(op, params_leaves, hparams_leaves)``: ``op.rmatvec``, ``op.matvec`` and ``op.hparam_vjp``
        give x^T J, J x and x^T dr/dlambda (``op.symmetric`` is true for a Hessian); the leaves are the
        tensors ``op`` was built at.

    Raises:
        ValueError: not exactly one of ``inner``/``update``, bad inputs (:func:`check_inputs`), an
            unknown backend, or a non-scalar training loss.
    """
    check_inputs(params, hparams)
    fn = _residual_fn(inner, update)
    if backend in ("func", "compile"):  # linearise itself is eager for both; hypergradient compiles
        op = _FuncOperator(fn, params, hparams)
        op.symmetric = inner is not None  # a Hessian
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
    return _AutogradOperator(r, p, h, symmetric=inner is not None), p, h


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
            ``torch.func`` transforms) or ``"compile"`` (the whole hypergradient, solver loop
            included, as one ``torch.compile``-d program; the first call per
            ``(outer, inner/update, solver)`` is eager and compiles, see ``_Compiled``).
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
    if backend == "compile":
        return _compiled_hypergradient(outer, params, hparams, inner, update, solver, check)
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


def _compiled_hypergradient(
    outer: Loss,
    params: Mapping[str, Tensor],
    hparams: Mapping[str, Tensor],
    inner: Loss | None,
    update: Update | None,
    solver: Solver,
    check: bool,
) -> dict[str, Tensor]:
    """``backend="compile"`` (:class:`_Compiled`): eager with every check on the first call of a triple."""
    key = (outer, inner if inner is not None else update, solver)
    try:
        fn = _Compiled.lookup(key)
    except TypeError:  # an unhashable solver or function: nothing to cache it by, so it runs eagerly
        return hypergradient(
            outer, params, hparams, inner=inner, update=update, solver=solver, backend="func", check=check
        )
    if fn is None:
        out = hypergradient(
            outer, params, hparams, inner=inner, update=update, solver=solver, backend="func", check=check
        )
        if getattr(solver, "compile_whole", True):
            residual = _residual_fn(inner, update)
            _Compiled.store(key, lambda p, h: _func_hypergradient(outer, residual, inner is not None, solver, p, h))
        return out
    check_inputs(params, hparams)
    hg, loss, v, x, r = fn(dict(params), dict(hparams))
    if check:
        check_finite("residual (training gradient or update)", T.detach(r))
        check_finite("validation loss", loss.detach())
        check_finite("validation gradient dL_V/dw", T.detach(v))
        check_finite("inverse-Jacobian-vector product (a Jacobian-vector product or the solver overflowed)", x)
        check_finite("hypergradient", hg)
    return T.detach(hg)


def largest_eigenvalue(
    params: Mapping[str, Tensor] | nn.Module,
    hparams: Mapping[str, Tensor],
    *,
    inner: Loss | None = None,
    update: Update | None = None,
    iters: int = 20,
) -> float:
    """Power-iteration estimate of lambda_max(J), so that ``Neumann(alpha <= 1/lambda_max)`` converges.

    The one public eigenvalue estimate (``bilevel.largest_eigenvalue``): J is the Jacobian of the problem's
    residual (:func:`linearise`), and the iteration is :func:`bilevel.solvers.power_iteration`'s.

    Args:
        params: the weights, a dict of tensors or an ``nn.Module`` (then ``inner``/``update`` take
            ``(model, hparams)``).
        hparams: the hyperparameters.
        inner: the training loss (J its Hessian), or
        update: the weight update map (J = du/dw); exactly one of the two.
        iters: products of the power iteration.

    Returns:
        The eigenvalue of J largest in magnitude (estimated).
    """
    params, (inner, update) = _unmodule(params, inner, update)
    op, p, _ = linearise(params, hparams, inner=inner, update=update)
    return power_iteration(op, T.detach(p), iters=iters)
