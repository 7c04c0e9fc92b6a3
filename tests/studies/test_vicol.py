"""Vicol et al. (2021) experiments: closed-form checks of anti-distillation and the parameter-space picture,
and tiny end-to-end CLI runs of rings, anti-distill and param-space."""

import json

import pytest
import torch

from bilevel import concepts as C
from bilevel_studies import cli
from bilevel_studies.vicol import anti_distill as AD
from bilevel_studies.vicol import param_space as PS
from bilevel_studies.vicol import rings as R

D = torch.float64


def test_fourier_features_layout():
    x = torch.tensor([0.0, 1.0], dtype=D)
    Phi = AD.fourier_features(x, 10, "exp")
    assert Phi.shape == (2, 21)
    torch.testing.assert_close(
        Phi[1, 1:11], 2.0 ** (10 - torch.arange(1, 11, dtype=D)) * torch.cos(torch.arange(1, 11, dtype=D))
    )
    torch.testing.assert_close(
        AD.fourier_features(x, 10, "inv")[1, 11:],
        torch.sin(torch.arange(1, 11, dtype=D)) / torch.arange(1, 11, dtype=D),
    )
    with pytest.raises(ValueError, match="amplitudes"):
        AD.fourier_features(x, 10, "linear")


def test_response_matrix_matches_explicit_series_and_inverse():
    g = torch.Generator().manual_seed(0)
    Phi = torch.randn(4, 6, generator=g, dtype=D)
    H = Phi.T @ Phi
    a = 0.5 / float(torch.linalg.eigvalsh(H)[-1])
    S = sum(torch.linalg.matrix_power(torch.eye(6, dtype=D) - a * H, k) for k in range(6)) * a
    torch.testing.assert_close(AD.response_matrix(H, "neumann", K=5, lr=a), S, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(AD.response_matrix(H, "unroll", K=6, lr=a), S, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        AD.response_matrix(H, "proximal", eps=0.3),
        torch.linalg.inv(H + 0.3 * torch.eye(6, dtype=D)),
        rtol=1e-9,
        atol=1e-12,
    )


def test_library_bilevel_loop_lands_on_the_closed_form_fixed_point():
    """Cold start + Neumann, and warm start + proximal (Alg. 3), on the 1/n Fourier problem."""
    cfg = AD.Config(amplitudes=["inv"], neumann_ks=[3], unroll_ks=[2], damping=[1.0], outer_steps=40, mlp=False)
    res = AD.run_linear(cfg, "inv")
    for r in res["runs"]:
        assert r["status"] == "ok"
        assert r["max_abs_diff_y"] < 1e-8, r["label"]
        assert r["val_loss"] < 1e-12
    # the fixed point fits the validation point and is in the row space: w* = Phi^+ y*
    prob = AD._problem(cfg, "inv")
    y, w = AD.fixed_point(prob["Phi"], prob["phi_v"], 2.0, AD.response_matrix(prob["H"], "proximal", eps=1.0))
    torch.testing.assert_close(prob["phi_v"] @ w, torch.tensor(2.0, dtype=D))
    torch.testing.assert_close(prob["Phi"] @ w, y)


def test_norm_tradeoff_less_inner_optimisation_gives_smaller_w_and_larger_y():
    """Fig. 3c: along K (increasing) or eps (decreasing) ||w*|| grows and ||y*|| shrinks; the limit is min-norm y."""
    cfg = AD.Config()
    for amp in ("exp", "inv"):
        prob = AD._problem(cfg, amp)
        curves = AD.closed_form_curves(cfg, prob, cfg.inner_lr[amp])
        trend = AD._trend(curves)
        for kind in ("neumann", "unroll", "proximal"):
            assert trend[kind]["w_norm_nondecreasing"] and trend[kind]["y_norm_nonincreasing"], (amp, kind)
        # eps -> 0: y* is the min-norm y with phi_v^T Phi^+ y = 2, i.e. 2 u / ||u||^2 with u = Phi^+T phi_v
        u = prob["pinv"].T @ prob["phi_v"]
        assert curves["proximal"][-1]["y_norm"] == pytest.approx(float(2 / u.norm()), rel=1e-5)


def test_param_space_projections_and_kaczmarz():
    cfg = PS.Config(cycle_rounds=30)
    prob = PS.problem(cfg)
    # gradient descent to convergence from w_t (warm-full) equals the closed-form projection (App. E)
    concept = C.concept("warm-full", inner_lr=0.2, inner_steps=100000, tol=1e-13)
    wt = torch.tensor([0.3, -0.7], dtype=D)
    h = prob["space"].from_natural({}, {"x": 0.8}, dtype=D)
    w, _ = concept.respond(prob["inner"], {"w": wt}, {"w": wt}, h)
    torch.testing.assert_close(w["w"], prob["project"](wt, 0.8), rtol=1e-10, atol=1e-11)
    # Kaczmarz: cycling projections converge to the common point of all solution lines
    k = PS.kaczmarz_cycle(cfg, prob)
    assert k["dist_to_intersection"][-1] < 1e-9 < k["dist_to_intersection"][0]


def test_mlp_normalised_outer_step_halves_the_validation_residual():
    """One cold-start Neumann outer step with lr = 0.5 / (j_v^T J^+ d): the re-trained MLP's residual halves."""
    cfg = AD.Config()
    x = torch.linspace(-3.0, 3.0, 13, dtype=D)[:, None]
    xv = torch.zeros(1, 1, dtype=D)
    w0 = AD.mlp_init([1, 10, 10, 1], torch.Generator().manual_seed(0), dtype=D)

    def inner(p, h):
        return 0.5 * ((AD.mlp_forward(p, x)[:, 0] - h["targets/y"]) ** 2).sum()

    def outer(p, h):
        return 0.5 * (AD.mlp_forward(p, xv)[0, 0] - 2.0) ** 2

    m = C.method("neumann", steps=10, lr=cfg.mlp_lr)
    opt = C.BilevelOptimizer(
        inner,
        outer,
        w0,
        {"targets/y": torch.zeros(13, dtype=D)},
        concept=C.concept("cold", inner_lr=0.01, inner_steps=1500, tol=None),
        method=m,
    )
    r0 = float(AD.mlp_forward(opt.params, xv)[0, 0]) - 2.0
    lr = AD.normalised_outer_lr(m, inner, outer, opt.params, {k: v.detach() for k, v in opt.hparams.items()}, x, xv)
    for g in opt.opt.param_groups:
        g["lr"] = lr
    opt.step()
    r1 = float(AD.mlp_forward(opt.params, xv)[0, 0]) - 2.0
    assert 0.35 < r1 / r0 < 0.65, (r0, r1)


def test_cli_anti_distill(tmp_path, monkeypatch):
    args = [
        "run",
        "anti-distill",
        "--out",
        str(tmp_path),
        "--amplitudes",
        "inv",
        "--neumann-ks",
        "2",
        "--unroll-ks",
        "2",
        "--damping",
        "1",
        "--mlp-neumann-ks",
        "2",
        "--mlp-unroll-ks",
        "1",
        "--mlp-outer-steps",
        "3",
        "--mlp-cold-steps",
        "20",
        "--mlp-warm-steps",
        "20",
        "--outer-steps",
        "12",
        "--threads",
        "1",
    ]
    code = cli.main(args)
    assert code == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    runs = doc["metrics"]["inv"]["runs"]
    assert [r["label"] for r in runs] == ["neumann K=2", "unroll K=2", "proximal eps=1"]
    assert all(r["status"] == "ok" and r["max_abs_diff_y"] < 1e-2 for r in runs)
    mlp = doc["metrics"]["mlp"]["runs"]
    assert len(mlp) == 2 and all(r["status"] == "ok" and r["y_norm"] > 0 for r in mlp)
    assert (tmp_path / "anti_distill_inv.png").exists() and (tmp_path / "anti_distill_mlp.png").exists()
    assert not any(r["resumed"] for r in runs + mlp)
    # the same command again re-uses every finished run (no bilevel loop is built at all) ...
    monkeypatch.setattr(C, "BilevelOptimizer", None)
    assert cli.main(args) == 0
    again = json.loads((tmp_path / "results.json").read_text())
    runs2, mlp2 = again["metrics"]["inv"]["runs"], again["metrics"]["mlp"]["runs"]
    assert all(r["resumed"] for r in runs2 + mlp2)
    assert [r["y_norm"] for r in runs2 + mlp2] == [r["y_norm"] for r in runs + mlp]
    # ... while a changed setting is recomputed, not silently re-used
    with pytest.raises(TypeError):
        cli.main(args[:-2] + ["--outer-steps", "13", "--threads", "1"])


def test_cli_anti_distill_outer_lr_points_and_validation_point(tmp_path):
    """--outer-lr (plain SGD, the paper's 1e-2), --points and --val-point reach the runs: y moves along the fixed
    direction d of the closed form for the new problem (so y / ||y|| = y* / ||y*||), more slowly than normalised."""
    args = [
        "run",
        "anti-distill",
        "--out",
        str(tmp_path),
        "--amplitudes",
        "inv",
        "--neumann-ks",
        "3",
        "--unroll-ks",
        "",
        "--damping",
        "1",
        "--no-mlp",
        "--outer-steps",
        "20",
        "--points",
        "7",
        "--val-point=0.5,1",
        "--threads",
        "1",
    ]
    assert cli.main(args + ["--outer-lr", "0.01"]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    c = doc["config"]
    assert (c["n_points"], c["val_x"], c["val_y"], c["outer_lr"]) == (7, 0.5, 1.0, 0.01)
    cfg = AD.Config(n_points=7, val_x=0.5, val_y=1.0)
    prob = AD._problem(cfg, "inv")
    assert len(doc["metrics"]["inv"]["x"]) == 7
    plain = doc["metrics"]["inv"]["runs"]
    assert [r["label"] for r in plain] == ["neumann K=3", "proximal eps=1"]
    for r in plain:
        kind, v = r["method"], r["setting"]
        A = AD.response_matrix(prob["H"], kind, K=int(v), lr=cfg.inner_lr["inv"], eps=float(v))
        y_star, _ = AD.fixed_point(prob["Phi"], prob["phi_v"], 1.0, A)
        torch.testing.assert_close(prob["phi_v"] @ prob["pinv"] @ y_star, torch.tensor(1.0, dtype=D))  # fits (0.5, 1)
        y = torch.tensor(r["targets"], dtype=D)
        assert r["outer_lr"] == 0.01 and not r["outer_lr_normalised"] and len(y) == 7
        torch.testing.assert_close(y / y.norm(), y_star / y_star.norm(), rtol=1e-8, atol=1e-10)
        assert 0 < r["val_loss"] < 0.5 and r["max_abs_diff_y"] > 1e-3  # started at 0.5, not converged at 0.01
    # the default (normalised) step lands on the fixed point in the same number of steps
    assert cli.main(args) == 0
    norm = json.loads((tmp_path / "results.json").read_text())["metrics"]["inv"]["runs"]
    assert all(r["outer_lr_normalised"] and r["max_abs_diff_y"] < 1e-4 for r in norm)
    with pytest.raises(ValueError, match="val-point"):
        AD.main(cli.build_parser().parse_args(args[:-3] + ["--val-point", "1", "--threads", "1"]))


def test_cli_param_space(tmp_path, capsys):
    code = cli.main(
        ["run", "param-space", "--out", str(tmp_path), "--outer-steps", "5", "--cycle-rounds", "3", "--threads", "1"]
    )
    assert code == 0
    printed = " ".join(capsys.readouterr().out.split())
    doc = json.loads((tmp_path / "results.json").read_text())
    # only the Kaczmarz rounds that ran are reported (3 of them: rounds 1 and 3, not "1, 5")
    d = doc["kaczmarz"]["dist_to_intersection"]
    assert len(d) == 3 and "after rounds 1, 3:" in printed and "rounds 1, 5" not in printed
    assert f"{d[0]:.3g}, {d[2]:.3g}" in printed
    assert PS.reported_rounds(15) == [1, 5, 15] and PS.reported_rounds(5) == [1, 5]
    assert PS.reported_rounds(1) == [1] and PS.reported_rounds(0) == []
    assert set(doc["metrics"]) == {"cold", "warm-full", "warm-partial"}
    for _name, m in doc["metrics"].items():
        assert m["status"] == "ok" and len(m["w"]) == 6
    # cold start always sits on the projection of the origin: w = p / ||p||^2
    m = doc["metrics"]["cold"]
    p = torch.tensor([1.0, m["final_x"]], dtype=D)
    torch.testing.assert_close(torch.tensor(m["final_w"], dtype=D), p / (p @ p))
    assert (tmp_path / "param_space.png").exists()


def test_cli_rings(tmp_path, monkeypatch):
    args = [
        "run",
        "rings",
        "--out",
        str(tmp_path),
        "--tasks",
        "2class,3class-2points,4class_2perclass",
        "--steps",
        "15",
        "--per-class",
        "20",
        "--hidden",
        "16",
        "--threads",
        "1",
    ]
    code = cli.main(args)
    assert code == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    # "metrics" holds numbers only: reference / warm / cold of the first task, named outside it
    assert set(doc["metrics"]) == {"reference", "warm", "cold"} and doc["metrics_task"] == "2class"
    for key in ("reference", "warm", "cold"):
        m = doc["metrics"][key]
        assert set(m) == {"val_loss", "val_accuracy"}
        assert 0 < m["val_loss"] < 10 and 0 <= m["val_accuracy"] <= 1
    assert list(doc["tasks"]) == ["2class", "3class-2points", "4class-8points"]  # canonical names
    t = doc["tasks"]["3class-2points"]
    assert t["num_points"] == 2 and len(t["points"]["final_targets"][0]) == 3
    assert (tmp_path / "rings_2class.png").exists()
    assert t["soft_labels"] and len(t["points"]["final"]) == 2
    t4 = doc["tasks"]["4class-8points"]
    assert (t4["num_classes"], t4["num_points"], t4["soft_labels"]) == (4, 8, False)
    assert t4["points"]["final_targets"] == [0, 1, 2, 3, 0, 1, 2, 3] and len(t4["points"]["final"]) == 8
    assert (tmp_path / "rings_4class-8points.png").exists()
    assert not any(r["resumed"] for r in doc["tasks"].values())
    # a second invocation re-uses both finished tasks without training anything ...
    monkeypatch.setattr(R, "run_task", None)
    assert cli.main(args) == 0
    again = json.loads((tmp_path / "results.json").read_text())
    assert all(r["resumed"] for r in again["tasks"].values())
    assert again["metrics"] == doc["metrics"]
    # ... and an interrupted run (one task missing) only runs that one
    (tmp_path / "parts" / "3class-2points.json").unlink()
    with pytest.raises(TypeError):
        cli.main(args)


def test_rings_task_names():
    assert [R.parse_task(t) for t in R.TASKS] == list(R.TASKS.values())  # the paper's three tasks
    assert R.parse_task("3class-2points") == (3, 2, True)  # fewer points than classes: soft labels by default
    assert R.parse_task("5class-10points") == (5, 10, False)
    assert R.parse_task("2class-3perclass-soft") == (2, 6, True)
    assert R.parse_task("3CLASS_2points_hard") == (3, 2, False)
    assert R.parse_task("3class-1point") == (3, 1, True)
    for t in [(2, 2, False), (3, 2, True), (3, 3, True), (4, 8, False), (3, 2, False), (6, 1, True)]:
        assert R.parse_task(R.task_name(*t)) == t
    assert [R.task_name(*t) for t in R.TASKS.values()] == list(R.TASKS)
    for bad in ("rings", "1class", "3class-0points", "3class-2points-fuzzy"):
        with pytest.raises(ValueError, match="task"):
            R.parse_task(bad)


def test_rings_warm_start_beats_cold_start_and_nears_the_reference():
    """Sec. 4.1's claim at a small size (50 points per class, 1000 steps, inner SGD 0.002, seeded): warm-start
    joint training ends with a much lower validation loss than cold-start re-training on the final two points,
    and its accuracy is near the reference's (seeds 0-3 gave warm 93-98% / loss 0.41-0.44, cold 46-63% /
    0.66-1.10, reference 100% / 0.001). Its loss stays well above the reference's (0.44 vs 0.001)."""
    cfg = R.Config(tasks=("2class",), per_class=50, hidden=200, steps=1000, inner_lr=0.002, seed=0)
    r = R.run_task(cfg, "2class")
    ref, warm, cold = r["reference"], r["warm"], r["cold"]
    assert warm["status"] == "ok"
    assert warm["val_loss"] < cold["val_loss"] - 0.15, (warm, cold)
    assert warm["val_accuracy"] >= 0.9 and cold["val_accuracy"] <= 0.75, (warm, cold)
    assert ref["val_accuracy"] - warm["val_accuracy"] <= 0.1 and ref["val_loss"] < warm["val_loss"]
    assert cold["points_accuracy"] == 1.0  # cold start classifies its two points: it fails on the rings only


def test_rings_soft_label_hypergradient_matches_finite_differences_and_closed_form():
    """K = 1 unrolled hypergradient of the Fig. 6 problem (learned points and soft labels softmax(c_j)).

    Reference 1: central finite differences of F(w - lr dL_T/dw (w, h)) in every entry of h.
    Reference 2 (labels): with L_T = 1/n sum_j CE(f(x_j; w), t_j), dL_T/dw = 1/n sum_j J_j^T (softmax f_j - t_j), so
    dF/dt_j = lr/n J_j(w) grad F(w_1) and dF/dc_j = (diag(t_j) - t_j t_j^T) dF/dt_j.
    """
    from torch.func import jacrev

    from bilevel.distill import DistilledData
    from bilevel.nets import mlp_forward

    g = torch.Generator().manual_seed(3)
    xv, yv = R.make_rings(3, 5, g, dtype=D)
    w = R.init_mlp([2, 6, 6, 3], "lecun", 4, D)
    w = {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=D) for k, v in w.items()}  # non-zero biases
    dd = DistilledData((2,), 3, soft_labels=True, num_points=2)
    h = dd.init(g, "normal", scale=1.5, dtype=D, requires_grad=False)
    h[dd.keys()[1]] = torch.randn(2, 3, generator=g, dtype=D)
    lr = 0.3

    def inner(p, hh):
        return dd.cross_entropy(mlp_forward(p, dd.inputs(hh)), hh)

    def outer(p, hh):
        return torch.nn.functional.cross_entropy(mlp_forward(p, xv), yv)

    def after_step(hh):
        wr = {k: v.detach().requires_grad_(True) for k, v in w.items()}
        gr = torch.autograd.grad(inner(wr, hh), list(wr.values()))
        return outer({k: v - lr * gk for (k, v), gk in zip(w.items(), gr)}, hh)

    hg = C.method("unroll", steps=1, lr=lr)(outer, w, h, inner=inner)
    eps = 1e-6
    for key, v in h.items():
        fd = torch.zeros_like(v)
        for i in range(v.numel()):
            hp = {k: u.clone() for k, u in h.items()}
            hm = {k: u.clone() for k, u in h.items()}
            hp[key].view(-1)[i] += eps
            hm[key].view(-1)[i] -= eps
            fd.view(-1)[i] = (after_step(hp) - after_step(hm)) / (2 * eps)
        assert float(fd.abs().max()) > 1e-6, key  # the reference is not trivially zero
        torch.testing.assert_close(hg[key], fd, rtol=1e-6, atol=1e-9)
    # closed form for the label logits
    x = dd.inputs(h)
    t = dd.targets(h)
    wr = {k: v.detach().requires_grad_(True) for k, v in w.items()}
    gr = torch.autograd.grad(inner(wr, h), list(wr.values()))
    w1 = {k: (v - lr * gk).detach().requires_grad_(True) for (k, v), gk in zip(w.items(), gr)}
    gF = torch.autograd.grad(outer(w1, h), list(w1.values()))
    jac = jacrev(lambda p: mlp_forward(p, x))(w)  # key -> (n, C, *shape)
    dF_dt = sum((jac[k] * gk).flatten(2).sum(-1) for k, gk in zip(w, gF)) * lr / 2
    dF_dc = torch.stack([(torch.diag(t[j]) - torch.outer(t[j], t[j])) @ dF_dt[j] for j in range(2)])
    torch.testing.assert_close(hg[dd.keys()[1]], dF_dc, rtol=1e-8, atol=1e-12)


def test_rings_label_summary_and_mlp_init():
    labels = [
        [[0.6, 0.3, 0.1], [0.1, 0.8, 0.1]],
        [[0.2, 0.5, 0.3], [0.1, 0.7, 0.2]],
        [[0.1, 0.45, 0.45 + 1e-3], [0.2, 0.7, 0.1]],
    ]
    s = R.label_summary(labels)
    assert s == {"label_path": [[0, 1, 2], [1]], "classes_covered": [0, 1, 2]}
    w = R.init_mlp([2, 400, 400], "lecun", 0, D)
    assert float(w["b0"].abs().max()) == 0.0
    assert abs(float(w["W1"].var()) - 1 / 400) < 2e-5  # N(0, 1/fan_in), 160000 draws: std of the estimate 9e-6
    with pytest.raises(ValueError, match="MLP init"):
        R.init_mlp([2, 3], "xavier", 0, D)


def test_rings_point_bound_tanh_parametrisation(tmp_path):
    """``DistilledData(point_bound=R)``: x = R tanh(z / R) coordinate-wise, so |x| < R for any raw z, init
    round-trips real points inside the box, and the gradient w.r.t. the raw z is sech^2(z / R) dL/dx
    (checked against autograd through the unbounded parametrisation); the CLI option reaches the run."""
    from bilevel.distill import DistilledData, scaled_tanh

    g = torch.Generator().manual_seed(5)
    xv, yv = R.make_rings(3, 10, g, dtype=D)
    dd = DistilledData((2,), 3, soft_labels=True, num_points=2, point_bound=2.5)
    free = DistilledData((2,), 3, soft_labels=True, num_points=2)
    h = dd.init(torch.Generator().manual_seed(1), "real", real=(xv, yv), dtype=D, requires_grad=False)
    h0 = free.init(torch.Generator().manual_seed(1), "real", real=(xv, yv), dtype=D, requires_grad=False)
    torch.testing.assert_close(dd.inputs(h), h0[free.keys()[0]], rtol=1e-12, atol=1e-12)  # same initial points
    z = torch.tensor([[10.0, -3.0], [0.2, -9.0]], dtype=D, requires_grad=True)
    x = dd.inputs({dd.keys()[0]: z, dd.keys()[1]: h[dd.keys()[1]]})
    assert 2.49 < float(x.detach().abs().max()) < 2.5
    a = torch.tensor([[1.0, 2.0], [-3.0, 0.5]], dtype=D)
    (gz,) = torch.autograd.grad((a * x).sum() + (x**2).sum(), z)
    xx = 2.5 * torch.tanh(z.detach() / 2.5)
    torch.testing.assert_close(gz, (a + 2 * xx) / torch.cosh(z.detach() / 2.5) ** 2, rtol=1e-12, atol=1e-14)
    assert float(gz[0, 1].abs()) > 0.1  # gradients flow away from saturation
    with pytest.raises(ValueError, match="bound"):
        scaled_tanh(0.0)
    args = [
        "run",
        "rings",
        "--out",
        str(tmp_path),
        "--tasks",
        "3class-2points",
        "--steps",
        "30",
        "--per-class",
        "10",
        "--hidden",
        "8",
        "--threads",
        "1",
        "--point-bound",
        "0.5",
        "--outer-lr",
        "0.5",
    ]
    assert cli.main(args) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    traj = torch.tensor(doc["tasks"]["3class-2points"]["points"]["trajectory"])
    assert doc["config"]["point_bound"] == 0.5 and float(traj.abs().max()) <= 0.5
    assert float((traj[-1] - traj[0]).abs().max()) > 0.05  # the points moved


def test_warm_start_unroll_linear_targets_move_along_the_closed_form_direction():
    """Alg. 1 (one inner step per outer step, hypergradient through K unrolled steps) on the 1/n Fourier problem.

    Unroll(w, y, K) is affine in y, so every hypergradient is r_K d_K with d_K = Phi A_K phi_v (A_K the K-term series,
    ``response_matrix(H, "unroll", K)``): the targets stay on the line along d_K whatever the weights do, and the
    warm-start run has the cold-start fixed point of the same K (the reason the Fig. 8 ordering is expected)."""
    cfg = AD.Config(amplitudes=["inv"], mlp=False)
    prob = AD._problem(cfg, "inv")
    K, lr = 3, cfg.inner_lr["inv"]
    y0 = prob["space"].from_natural(prob["pseudo"], {"targets": {"y": torch.zeros(13)}}, dtype=D, device="cpu")
    w0 = {"w": torch.zeros(21, dtype=D)}
    opt = C.BilevelOptimizer(
        prob["inner"],
        prob["outer"],
        w0,
        y0,
        concept=C.concept("warm-partial", inner_lr=lr, inner_steps=1),
        method=C.method("unroll", steps=K, lr=lr),
        outer_lr=0.5,
    )
    d = prob["Phi"] @ (AD.response_matrix(prob["H"], "unroll", K=K, lr=lr) @ prob["phi_v"])
    g0 = opt.step()["targets/y"]  # at w = 0, y = 0 the unrolled weights are 0: r_K = -2
    torch.testing.assert_close(g0, -2.0 * d, rtol=1e-10, atol=1e-14)
    for _ in range(30):
        opt.step()
    y = opt.hparams["targets/y"].detach()
    assert float(y.norm()) > 1e-3
    torch.testing.assert_close(y / y.norm(), d / d.norm(), rtol=1e-9, atol=1e-12)


def test_mlp_unrolled_hypergradient_matches_finite_differences():
    """The hypergradient of the warm-start MLP runs (Fig. 8, K unrolled SGD steps) against central differences
    of F(Unroll(w, y, K)) computed by a plain loop, in float64."""
    cfg = AD.Config()
    prob = AD.mlp_problem(cfg)
    inner, outer, w0 = prob["inner"], prob["outer"], prob["w0"]
    y = torch.linspace(0.5, 1.5, 13, dtype=D)
    K, lr = 5, cfg.mlp_lr

    def unrolled_val(yv):
        w = {k: v.clone() for k, v in w0.items()}
        for _ in range(K):
            w = {k: v.detach().requires_grad_(True) for k, v in w.items()}
            g = torch.autograd.grad(inner(w, {"targets/y": yv}), list(w.values()))
            w = {k: (v - lr * gk).detach() for (k, v), gk in zip(w.items(), g)}
        return float(outer(w, {"targets/y": yv}))

    hg = C.method("unroll", steps=K, lr=lr)(outer, w0, {"targets/y": y}, inner=inner)["targets/y"]
    h = 1e-6
    fd = torch.tensor(
        [(unrolled_val(y + h * e) - unrolled_val(y - h * e)) / (2 * h) for e in torch.eye(13, dtype=D)], dtype=D
    )
    assert float(hg.abs().max()) > 1e-4
    torch.testing.assert_close(hg, fd, rtol=1e-6, atol=1e-9)
