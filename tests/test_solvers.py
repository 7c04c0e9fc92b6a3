"""bilevel.solvers: each solver against dense linear algebra, damping, the failure modes of CG and Neumann,
AutoNeumann."""

import warnings

import pytest
import torch
from problems import D

import bilevel as B
from bilevel import tree as T
from bilevel.solvers import AutoNeumann, Damped, check_size, damped, dense_jacobian, make_solver, power_iteration


class Matrix:
    """x^T A as a linear operator on {"w": vector}."""

    def __init__(self, A):
        self.A = A

    def rmatvec(self, x):
        return {"w": x["w"] @ self.A}

    def matvec(self, x):
        return {"w": self.A @ x["w"]}


def spd(n, top, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    return Q @ torch.diag(torch.linspace(0.5, top, n, dtype=D)) @ Q.T


def test_damped_operator_is_j_plus_eps_identity():
    A = spd(5, 3.0)
    op = Matrix(A)
    torch.testing.assert_close(
        dense_jacobian(damped(op, 0.7), {"w": torch.zeros(5, dtype=D)}), A + 0.7 * torch.eye(5, dtype=D)
    )
    assert damped(op, 0.0) is op and isinstance(damped(op, 0.1), Damped)
    with pytest.raises(ValueError, match="damping"):
        damped(op, -1.0)
    v = {"w": torch.randn(5, dtype=D)}
    ref = torch.linalg.solve((A + 0.7 * torch.eye(5, dtype=D)).T, v["w"])
    for solver in (B.Exact(damping=0.7), B.ConjugateGradient(50, damping=0.7), B.Neumann(400, alpha=0.2, damping=0.7)):
        torch.testing.assert_close(solver(op, v)["w"], ref, rtol=1e-8, atol=1e-10)


def test_auto_neumann_picks_one_over_lambda_max_and_converges():
    A = spd(6, 40.0)  # alpha = 1 would diverge (eigenvalues up to 40)
    v = {"w": torch.randn(6, generator=torch.Generator().manual_seed(1), dtype=D)}
    s = AutoNeumann(2500, max_alpha=None)
    x = s(Matrix(A), v)
    assert s.alpha == pytest.approx(1 / 40.0, rel=2e-2)  # power iteration, 20 products
    torch.testing.assert_close(x["w"], torch.linalg.solve(A.T, v["w"]), rtol=1e-6, atol=1e-8)
    capped = AutoNeumann(3, max_alpha=1.0)
    capped(Matrix(spd(6, 0.1)), v)
    assert capped.alpha == 1.0  # an update map with small eigenvalues keeps Clarke's alpha = 1


def test_auto_neumann_refreshes_alpha_when_curvature_grows():
    v = {"w": torch.randn(6, generator=torch.Generator().manual_seed(2), dtype=D)}
    s = AutoNeumann(30, max_alpha=None)
    s(Matrix(spd(6, 1.0)), v)
    assert s.alpha == pytest.approx(1.0, rel=2e-2)
    A = spd(6, 25.0)  # training sharpened: alpha = 1 now makes the terms grow
    with pytest.raises(B.NeumannDivergenceError):
        B.Neumann(30, alpha=1.0)(Matrix(A), v)
    x = s(Matrix(A), v)
    assert s.refreshes == 1 and s.alpha <= 0.5 / 25.0 * 1.05
    assert bool(torch.isfinite(x["w"]).all())
    # the refreshed series approximates the inverse (30 steps at alpha = 0.5 / lambda_max on a spectrum 0.5..25)
    ref = torch.linalg.solve(A.T, v["w"])
    assert torch.nn.functional.cosine_similarity(x["w"], ref, dim=0) > 0.9
    state = s.state_dict()
    s2 = AutoNeumann(30, max_alpha=None)
    s2.load_state_dict(state)
    torch.testing.assert_close(s2(Matrix(A), v)["w"], s(Matrix(A), v)["w"], rtol=0, atol=0)


def test_auto_neumann_in_a_hypergradient_matches_exact_on_ridge():
    from problems import ridge

    prob = ridge()
    lam = torch.full((prob["d"],), -1.0, dtype=D)
    w = {"w": prob["solve"](lam)}
    got = B.hypergradient(prob["outer"], w, {"lam": lam}, inner=prob["inner"], solver=AutoNeumann(500, max_alpha=None))
    torch.testing.assert_close(got["lam"], prob["exact"](lam), rtol=1e-6, atol=1e-10)
    assert T.numel(got) == prob["d"]


# ---------------------------------------------------------------------------- every solver against a dense solve


class TreeMatrix:
    """x^T A for vectors stored as a two-leaf tree (flattened in key order, :func:`bilevel.tree.flatten`)."""

    def __init__(self, A, symmetric=False):
        self.A, self.symmetric = A, symmetric
        self.like = {"a": torch.zeros(2, 3, dtype=D), "b": torch.zeros(4, dtype=D)}

    def rmatvec(self, x):
        return T.unflatten(T.flatten(x) @ self.A, self.like)

    def matvec(self, x):
        return T.unflatten(self.A @ T.flatten(x), self.like)


def _vector(n, seed):
    like = TreeMatrix(torch.eye(n, dtype=D)).like
    return T.unflatten(torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=D), like)


def _reference(A, v, eps=0.0):
    """The row vector x with x^T (A + eps I) = v^T, by a dense solve."""
    return torch.linalg.solve((A + eps * torch.eye(len(A), dtype=D)).T, T.flatten(v))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_solver_matches_a_dense_solve_on_random_spd_systems(seed):
    A = spd(10, 4.0, seed)  # spectrum 0.5 .. 4
    v = _vector(10, seed + 10)
    ref = _reference(A, v)
    solvers = {
        "exact": B.Exact(),
        "cg": B.ConjugateGradient(10),  # n iterations: exact in exact arithmetic
        "cg-normal": B.ConjugateGradient(60, normal_equations=True),
        "neumann": B.Neumann(300, alpha=1 / 4.0),  # contraction 1 - 0.5/4 per step
        "auto-neumann": AutoNeumann(300, max_alpha=None),
    }
    for name, solver in solvers.items():
        x = solver(TreeMatrix(A, symmetric=True), v)
        assert x.keys() == v.keys() and all(x[k].shape == v[k].shape for k in v), name
        torch.testing.assert_close(T.flatten(x), ref, rtol=1e-8, atol=1e-10, msg=name)


def test_cg_and_exact_solve_a_non_symmetric_system_as_the_transpose():
    """x^T A = v^T for a non-symmetric A (an update map's Jacobian): Exact and CG on the normal equations agree with
    solve(A^T, v); plain CG refuses it rather than answering wrongly."""
    g = torch.Generator().manual_seed(3)
    A = spd(10, 3.0, 4) + 0.3 * torch.randn(10, 10, generator=g, dtype=D)
    v = _vector(10, 5)
    ref = _reference(A, v)
    torch.testing.assert_close(T.flatten(B.Exact()(TreeMatrix(A), v)), ref, rtol=1e-10, atol=1e-12)
    normal = B.ConjugateGradient(200, normal_equations=True)(TreeMatrix(A), v)
    torch.testing.assert_close(T.flatten(normal), ref, rtol=1e-7, atol=1e-9)
    with pytest.raises(B.NotSymmetricError, match="normal_equations=True"):
        B.ConjugateGradient(10)(TreeMatrix(A), v)


@pytest.mark.parametrize("eps", [0.1, 1.0, 5.0])
def test_damping_eps_equals_solving_a_plus_eps_identity(eps):
    A = spd(10, 4.0, 6)
    v = _vector(10, 7)
    ref = _reference(A, v, eps)
    for solver in (
        B.Exact(damping=eps),
        B.ConjugateGradient(10, damping=eps),
        B.Neumann(500, alpha=1 / (4.0 + eps), damping=eps),
        AutoNeumann(500, damping=eps, max_alpha=None),
        make_solver("cg", 10, damping=eps),
    ):
        torch.testing.assert_close(T.flatten(solver(TreeMatrix(A, symmetric=True), v)), ref, rtol=1e-8, atol=1e-10)
    # Identity takes J ~ I inside (J + eps I)^-1: (1 + eps)^-1 v; Neumann(0) is its first term alpha v whatever eps
    torch.testing.assert_close(T.flatten(B.Identity(eps)(TreeMatrix(A), v)), T.flatten(v) / (1 + eps))
    torch.testing.assert_close(T.flatten(B.Neumann(0, alpha=0.3, damping=eps)(TreeMatrix(A), v)), 0.3 * T.flatten(v))


def test_neumann_partial_sums_are_the_truncated_series():
    """Neumann(K, alpha) = alpha sum_{j=0..K} (I - alpha A)^j v, term by term (K + 1 terms), for the row vector."""
    A = spd(10, 4.0, 8)
    v = _vector(10, 9)
    M = torch.eye(10, dtype=D) - 0.2 * A.T
    for K in (0, 1, 5):
        series = sum(torch.linalg.matrix_power(M, j) @ T.flatten(v) for j in range(K + 1)) * 0.2
        torch.testing.assert_close(T.flatten(B.Neumann(K, alpha=0.2)(TreeMatrix(A), v)), series)


def test_cg_on_an_indefinite_system_stops_and_warns_at_negative_curvature():
    g = torch.Generator().manual_seed(10)
    Q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=D))
    A = Q @ torch.diag(torch.linspace(-2.0, 3.0, 10, dtype=D)) @ Q.T  # symmetric, indefinite
    v = _vector(10, 11)
    with pytest.warns(RuntimeWarning, match="non-positive curvature"):
        x = B.ConjugateGradient(50)(TreeMatrix(A, symmetric=True), v)
    assert bool(torch.isfinite(T.flatten(x)).all())
    # damping that makes A + eps I positive definite removes the warning and solves it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = B.ConjugateGradient(50, damping=2.5)(TreeMatrix(A, symmetric=True), v)
    torch.testing.assert_close(T.flatten(x), _reference(A, v, 2.5), rtol=1e-8, atol=1e-10)


def test_neumann_detects_divergence_and_suggests_one_over_lambda_max():
    A = spd(10, 8.0, 12)  # alpha = 1: eigenvalues of alpha A up to 8, far outside (0, 2)
    v = _vector(10, 13)
    with pytest.raises(B.NeumannDivergenceError, match="diverges") as e:
        B.Neumann(10, alpha=1.0)(TreeMatrix(A, symmetric=True), v)
    assert e.value.suggested_alpha == pytest.approx(1 / 8.0, rel=1e-2)
    with pytest.warns(RuntimeWarning, match="diverges"):
        B.Neumann(10, alpha=1.0, divergence="warn")(TreeMatrix(A, symmetric=True), v)
    x = B.Neumann(10, alpha=1.0, divergence="ignore")(TreeMatrix(A, symmetric=True), v)
    assert float(T.norm(x)) > 1e3 * float(T.norm(v))  # it did grow
    with pytest.raises(B.NonFiniteError):  # a series that overflows is named, not returned
        B.Neumann(400, alpha=1.0)(TreeMatrix(A * 1e3, symmetric=True), v)
    B.Neumann(10, alpha=1 / 8.0)(TreeMatrix(A, symmetric=True), v)  # the suggested alpha converges: no error


def test_power_iteration_finds_the_largest_eigenvalue():
    A = spd(10, 6.0, 14)
    lam = power_iteration(TreeMatrix(A), TreeMatrix(A).like, iters=200)
    assert lam == pytest.approx(float(torch.linalg.eigvalsh(A).max()), rel=1e-6)
    assert power_iteration(TreeMatrix(torch.zeros(10, 10, dtype=D)), TreeMatrix(A).like) == 0.0


def test_exact_takes_the_pseudoinverse_of_a_singular_system_and_refuses_large_ones():
    g = torch.Generator().manual_seed(15)
    Phi = torch.randn(4, 10, generator=g, dtype=D)
    A = Phi.T @ Phi  # rank 4 of 10
    v = T.unflatten(A @ torch.randn(10, generator=g, dtype=D), TreeMatrix(A).like)  # in the range of A
    x = B.Exact()(TreeMatrix(A), v)
    torch.testing.assert_close(T.flatten(x), torch.linalg.pinv(A) @ T.flatten(v), rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="max_size=5"):
        B.Exact(max_size=5)(TreeMatrix(A), v)
    with pytest.raises(ValueError, match="refuses 11 weights"):
        check_size(B.Exact(max_size=10), 11)
    check_size(B.ConjugateGradient(3), 10**9)  # only the dense solver has a size limit


def test_dense_jacobian_rows_are_vector_jacobian_products_in_flatten_order():
    g = torch.Generator().manual_seed(16)
    A = torch.randn(10, 10, generator=g, dtype=D)
    torch.testing.assert_close(dense_jacobian(TreeMatrix(A), TreeMatrix(A).like), A)


def test_make_solver_builds_each_named_solver():
    assert make_solver("neumann", 7, alpha=None) == B.Neumann(7, alpha=1.0)
    assert make_solver("neumann", 7, alpha=0.5, damping=0.1, divergence="warn") == B.Neumann(7, 0.5, 0.1, "warn")
    assert make_solver("cg", 4, damping=0.2) == B.ConjugateGradient(4, damping=0.2)
    assert make_solver("identity", 0, damping=0.3) == B.Identity(0.3)
    assert make_solver("exact", 0, max_size=9) == B.Exact(max_size=9)
    with pytest.raises(ValueError, match="unknown solver"):
        make_solver("lu", 3)
    with pytest.raises(ValueError, match=">= 0"):
        make_solver("cg", -1)
    with pytest.raises(ValueError, match="alpha"):
        B.Neumann(3, alpha=0.0)
