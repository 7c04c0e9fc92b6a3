"""Bad input gets an error that names the problem."""

import math

import pytest
import torch
from problems import D, ridge

import bilevel as B


def _setup():
    P = ridge()
    lam = torch.zeros(P["d"], dtype=D)
    return P, {"w": P["solve"](lam)}, {"lam": lam}


def test_nonfinite_validation_loss_named():
    P, p, h = _setup()
    bad = lambda p, h: P["outer"](p, h) * float("nan")  # noqa: E731
    with pytest.raises(FloatingPointError, match="validation loss"):
        B.hypergradient(bad, p, h, inner=P["inner"], solver=B.Identity())
    with pytest.raises(B.NonFiniteError, match="validation loss"):
        B.unrolled_hypergradient(bad, p, h, inner=P["inner"], lr=0.1, steps=2)


def test_nonfinite_training_loss_named():
    P, p, h = _setup()
    bad = lambda p, h: P["inner"](p, h) + float("inf")  # noqa: E731
    with pytest.raises(B.NonFiniteError, match="training loss"):
        B.hypergradient(P["outer"], p, h, inner=bad, solver=B.Identity())


@pytest.mark.parametrize(
    "solver",
    [B.Neumann(3, alpha=0.1), B.Neumann(3, alpha=0.1, divergence="ignore"), B.ConjugateGradient(5), B.Exact()],
    ids=repr,
)
def test_nonfinite_jvp_named(solver):
    """A NaN Hessian-vector product (finite loss and gradient) is named, whichever solver meets it."""
    P, p, h = _setup()
    with pytest.raises(B.NonFiniteError, match="Jacobian-vector product|Neumann series term"):
        B.hypergradient(P["outer"], p, h, inner=_nan_curvature(P["inner"]), solver=solver)


def _nan_curvature(inner):
    """inner + a term whose value and gradient are 0 at the current w but whose Hessian is NaN."""

    class F(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w):
            ctx.save_for_backward(w)
            return w.new_zeros(())

        @staticmethod
        def backward(ctx, g):
            (w,) = ctx.saved_tensors
            return g * _G.apply(w)

    class _G(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w):
            return torch.zeros_like(w)

        @staticmethod
        def backward(ctx, g):
            return g * float("nan")

    return lambda p, h: inner(p, h) + F.apply(p["w"])


def test_both_or_neither_inner_update():
    P, p, h = _setup()
    with pytest.raises(ValueError, match="exactly one"):
        B.hypergradient(P["outer"], p, h, solver=B.Identity())
    with pytest.raises(ValueError, match="exactly one"):
        B.hypergradient(P["outer"], p, h, inner=P["inner"], update=lambda p, h: p, solver=B.Identity())


def test_update_shape_and_key_mismatch_named():
    P, p, h = _setup()
    with pytest.raises(ValueError, match=r"missing \['w'\]"):
        B.hypergradient(P["outer"], p, h, update=lambda p, h: {"v": p["w"]}, solver=B.Identity())
    with pytest.raises(ValueError, match=r"update\(params, hparams\)\['w'\] has shape \(3,\)"):
        B.hypergradient(P["outer"], p, h, update=lambda p, h: {"w": p["w"][:3]}, solver=B.Identity())


def test_non_tensor_hparams_named():
    P, p, _ = _setup()
    with pytest.raises(ValueError, match=r"hparams\['lam'\] must be a floating-point tensor"):
        B.hypergradient(P["outer"], p, {"lam": 0.3}, inner=P["inner"], solver=B.Identity())


def test_neumann_divergence_suggests_alpha():
    P, p, h = _setup()
    lam_max = float(torch.linalg.eigvalsh(P["hessian"](h["lam"])).max())
    est = B.largest_eigenvalue(p, h, inner=P["inner"], iters=100)
    assert math.isclose(est, lam_max, rel_tol=1e-6)
    with pytest.raises(B.NeumannDivergenceError, match="alpha <=") as info:
        B.hypergradient(P["outer"], p, h, inner=P["inner"], solver=B.Neumann(30, alpha=3.0 / lam_max))
    assert math.isclose(info.value.suggested_alpha, 1 / lam_max, rel_tol=0.02)
    with pytest.warns(RuntimeWarning, match="diverges"):
        B.hypergradient(
            P["outer"], p, h, inner=P["inner"], solver=B.Neumann(30, alpha=3.0 / lam_max, divergence="warn")
        )


def test_exact_refuses_large():
    P, p, h = _setup()
    with pytest.raises(ValueError, match="max_size"):
        B.hypergradient(P["outer"], p, h, inner=P["inner"], solver=B.Exact(max_size=3))


def test_bad_solver_arguments():
    with pytest.raises(ValueError, match="steps"):
        B.Neumann(-1)
    with pytest.raises(ValueError, match="alpha"):
        B.Neumann(3, alpha=0.0)


def test_func_backend_names_nonfinite_quantities():
    P, p, h = _setup()
    bad = lambda p, h: P["inner"](p, h) * float("nan")  # noqa: E731
    with pytest.raises(B.NonFiniteError, match="residual"):
        B.hypergradient(P["outer"], p, h, inner=bad, solver=B.Neumann(3, alpha=0.1), backend="func")
    upd = lambda p, h: {"w": p["w"] * float("inf")}  # noqa: E731
    with pytest.raises(B.NonFiniteError, match="residual"):
        B.hypergradient(P["outer"], p, h, update=upd, solver=B.Identity(), backend="func")


def test_neumann_nan_term_is_nonfinite_not_divergence():
    """A NaN Jacobian-vector product inside the series is named as such, not as a divergence."""

    class NanOp:
        def rmatvec(self, x):
            return {k: torch.full_like(v, float("nan")) for k, v in x.items()}

    v = {"w": torch.ones(3, dtype=D)}
    with pytest.raises(B.NonFiniteError, match="Neumann series term"):
        B.Neumann(3, alpha=0.1)(NanOp(), v)
    out = B.Neumann(3, alpha=0.1, divergence="ignore")(NanOp(), v)  # populations handle it themselves
    assert not bool(torch.isfinite(out["w"]).any())


@pytest.mark.parametrize("steps", [1, 2])
def test_neumann_divergence_detected_with_few_steps(steps):
    P, p, h = _setup()
    lam_max = float(torch.linalg.eigvalsh(P["hessian"](h["lam"])).max())
    with pytest.raises(B.NeumannDivergenceError, match="alpha <="):
        B.hypergradient(P["outer"], p, h, inner=P["inner"], solver=B.Neumann(steps, alpha=5.0 / lam_max))
    # a convergent alpha passes with the same few steps
    B.hypergradient(P["outer"], p, h, inner=P["inner"], solver=B.Neumann(steps, alpha=1.0 / lam_max))


def test_non_scalar_losses_and_integer_hparams_named():
    P, p, h = _setup()
    vec = lambda p, h: p["w"] ** 2  # noqa: E731
    with pytest.raises(ValueError, match=r"validation loss outer.*scalar.*got \(6,\)"):
        B.hypergradient(vec, p, h, inner=P["inner"], solver=B.Identity())
    with pytest.raises(ValueError, match="training loss inner.*scalar"):
        B.hypergradient(P["outer"], p, h, inner=vec, solver=B.Identity())
    with pytest.raises(ValueError, match="dtype torch.int64"):
        B.hypergradient(P["outer"], p, {"lam": torch.zeros(3, dtype=torch.long)}, inner=P["inner"], solver=B.Identity())
