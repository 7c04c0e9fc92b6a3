"""Vicol et al. (2021) Sec. 4.2, Fig. 3, 7, 8: anti-distillation, an overparameterised outer problem.

Thirteen (``n_points``) learned targets y (outer parameters) at fixed, linearly
spaced inputs x_i in [-3, 3], initialised at 0, train a regressor (inner
parameters w) that should fit one validation point (0, 2) (``val_x, val_y``):

    f(w, y) = 1/2 ||Phi w - y||^2,    F(w) = 1/2 (phi(0)^T w - 2)^2,

with Fourier features phi(x) = [1, a_n cos(n x), a_n sin(n x)]_{n=1..10} (21
weights), a_n = 2^(10-n) ("exp", Fig. 3) or 1/n ("inv", Fig. 7). Many y fit F
exactly; which one is found depends on the response-Jacobian approximation A of
H^{-1} (H = Phi^T Phi): every approximation here moves y along the fixed
direction d = Phi A phi(0), and the inner solution stays in the row space of Phi,
so the fixed point is (App. D.2; derived in docs/vicol.md)

    y* = 2 d / (phi(0)^T Phi^+ d),    w* = Phi^+ y*,

with A = lr sum_{k<=K} (I - lr H)^k (Neumann K: K + 1 terms), the same with K - 1
(unrolling K steps: K terms) or (H + eps I)^{-1} (proximal). Because the fixed
point does not depend on the outer step, the linear runs by default *normalise*
the outer SGD step, lr = 0.5 / (phi(0)^T Phi^+ d), which halves the validation
residual per step; ``outer_lr`` (CLI ``--outer-lr``, paper: 1e-2) instead uses a
plain fixed SGD step, which reaches the same fixed point much more slowly. :func:`response_matrix` and
:func:`fixed_point` compute it for any K or eps; the library's bilevel loop
(:class:`bilevel.concepts.BilevelOptimizer`) is run for a few settings and must
land on it. Also the 2-layer, 10-unit ReLU MLP version (Fig. 8): Neumann with a
cold-started MLP (re-trained from scratch by ``mlp_cold_steps`` SGD steps before
every outer step, App. D.2) and, optionally, alternating (warm-start) updates
through K unrolled steps. The MLP's outer SGD step is normalised like the linear
one: lr = 0.5 / (j_v^T J^+ d) with J, j_v the network's output Jacobians at the
training and validation inputs and d = dF/dy / r the hypergradient direction, so
the linearised validation residual halves per outer step (the paper's 0.01 would
need thousands of outer steps, each re-training the MLP).

Every finished run is stored in ``out/parts/`` (:mod:`._parts`); re-running the
same command re-uses it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bilevel import concepts as C
from bilevel import tree as T
from bilevel.hparams import IDENTITY, Granularity, HyperParameter, HyperParameterSpace
from bilevel.nets import mlp_forward, mlp_init
from bilevel.rundir import atomic_savefig, atomic_write_json

from .. import _common as V
from .._parts import load_part, save_part

NAME = "anti-distill"
HELP = (
    "Vicol et al. Fig. 3/7/8: 13 learned targets fitting one validation point; ||w|| and ||y|| against "
    "Neumann/unroll K and proximal eps, Fourier features and a small MLP"
)

VAL_X, VAL_Y = 0.0, 2.0
D = torch.float64


def targets_space(n: int) -> tuple[HyperParameterSpace, dict[str, Tensor]]:
    """The learned targets as an element-granularity identity hyperparameter ``targets/y`` of shape (n,)."""
    space = HyperParameterSpace([HyperParameter("targets", IDENTITY, 0.0, 0.0, "raw", Granularity.ELEMENT)])
    pseudo = {"y": torch.empty(n, device="meta")}
    return space, pseudo


def fourier_features(x: Tensor, n: int = 10, amplitudes: str = "exp") -> Tensor:
    """[1, a_k cos(k x), a_k sin(k x)]_{k=1..n} with a_k = 2^(n-k) (``exp``) or 1/k (``inv``): (len(x), 2n+1)."""
    k = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)
    if amplitudes == "exp":
        a = 2.0 ** (n - k)
    elif amplitudes == "inv":
        a = 1.0 / k
    else:
        raise ValueError(f"unknown amplitudes {amplitudes!r}: use 'exp' (2^(N-n)) or 'inv' (1/n)")
    kx = x[:, None] * k[None, :]
    return torch.cat([torch.ones_like(x)[:, None], a * torch.cos(kx), a * torch.sin(kx)], dim=1)


def response_matrix(H: Tensor, kind: str, *, K: int = 0, lr: float = 1.0, eps: float = 0.0) -> Tensor:
    """The approximation A of H^{-1} that each hypergradient method applies (Table 1), by eigendecomposition.

    ``neumann``: lr sum_{k=0}^{K} (I - lr H)^k = (I - (I - lr H)^{K+1}) H^{-1} on H's range, lr (K+1) on its
    null space; ``unroll``: the same with K - 1 (K unrolled steps); ``proximal``: (H + eps I)^{-1}.
    """
    lam, V = torch.linalg.eigh(H)
    lam = lam.clamp(min=0.0)
    if kind == "proximal":
        f = 1.0 / (lam + eps)
    elif kind in ("neumann", "unroll"):
        terms = K + 1 if kind == "neumann" else K
        safe = torch.where(lam > 0, lam, torch.ones_like(lam))
        # (1 - (1 - lr lam)^n) / lam without cancellation for tiny lam (-> lr n)
        f = torch.where(lam > 0, -torch.expm1(terms * torch.log1p(-lr * lam)) / safe, lr * terms * torch.ones_like(lam))
    else:
        raise ValueError(f"unknown response kind {kind!r}")
    return V @ torch.diag(f) @ V.T


def fixed_point(Phi: Tensor, phi_v: Tensor, target: float, A: Tensor) -> tuple[Tensor, Tensor]:
    """(y*, w*) = (t d / (phi_v^T Phi^+ d), Phi^+ y*) with d = Phi A phi_v (see the module docstring)."""
    pinv = torch.linalg.pinv(Phi)
    d = Phi @ (A @ phi_v)
    y = target * d / (phi_v @ (pinv @ d))
    return y, pinv @ y


@dataclass
class Config:
    amplitudes: list[str] = field(default_factory=lambda: ["exp", "inv"])
    n_points: int = 13  # learned targets at linspace(-3, 3, n_points) (paper: 13)
    val_x: float = VAL_X  # the validation point (val_x, val_y) (paper: (0, 2))
    val_y: float = VAL_Y
    outer_lr: float | None = None  # linear runs: None = normalised outer SGD step; a number = plain SGD (paper 1e-2)
    n_freq: int = 10
    neumann_ks: list[int] = field(default_factory=lambda: [1, 10, 100])
    unroll_ks: list[int] = field(default_factory=lambda: [1, 10, 100])
    damping: list[float] | None = None  # proximal eps; None: damping_default of the basis
    outer_steps: int = 60
    mlp: bool = True
    mlp_neumann_ks: list[int] = field(default_factory=lambda: [0, 10, 100, 1000])
    mlp_unroll_ks: list[int] = field(default_factory=list)
    mlp_outer_steps: int = 8
    mlp_cold_steps: int = 2000
    mlp_warm_steps: int = 20000  # Alg. 1 steps of the unrolled runs (the paper gives none; 2000 leave K=1 unfitted)
    mlp_lr: float = 0.01
    mlp_curve_points: int = 20  # records of (val loss, inner loss, ||y||) per MLP run (none change the result)
    mlp_outer_lr: float | None = None  # None: normalised (halve the linearised residual per step) for Neumann runs
    seed: int = 0
    device: str = "cpu"

    #: inner learning rate (the Neumann alpha and the unrolled step) per basis, App. D.2
    inner_lr = {"exp": 1e-8, "inv": 1e-3}
    #: proximal damping eps per basis, spanning H's spectrum (lambda_max(H) = 1.8e6 for exp, 13 for inv)
    damping_default = {"exp": [1e6, 1e4, 1e2, 1.0], "inv": [10.0, 1.0, 0.1, 0.01]}


def _problem(cfg: Config, amplitudes: str) -> dict[str, Any]:
    x = torch.linspace(-3.0, 3.0, cfg.n_points, dtype=D, device=cfg.device)
    Phi = fourier_features(x, cfg.n_freq, amplitudes)
    phi_v = fourier_features(torch.tensor([cfg.val_x], dtype=D, device=cfg.device), cfg.n_freq, amplitudes)[0]
    space, pseudo = targets_space(cfg.n_points)

    def inner(p, h):
        return 0.5 * ((Phi @ p["w"] - space.natural(h)["targets"]["y"]) ** 2).sum()

    def outer(p, h):
        return 0.5 * (phi_v @ p["w"] - cfg.val_y) ** 2

    return dict(
        x=x,
        Phi=Phi,
        phi_v=phi_v,
        H=Phi.T @ Phi,
        pinv=torch.linalg.pinv(Phi),
        inner=inner,
        outer=outer,
        space=space,
        pseudo=pseudo,
    )


def _setting_label(kind: str, value: float) -> str:
    return f"{kind} {'eps' if kind == 'proximal' else 'K'}={value:g}"


def closed_form_curves(cfg: Config, prob: dict[str, Any], lr: float) -> dict[str, list[dict[str, float]]]:
    """||w*|| and ||y*|| on a fine grid of K (Neumann, unroll) and eps (proximal)."""
    ks = sorted({int(round(v)) for v in torch.logspace(0, 7, 29).tolist()})
    epss = torch.logspace(8, -4, 25).tolist()
    out: dict[str, list[dict[str, float]]] = {}
    for kind, grid in (("neumann", ks), ("unroll", ks), ("proximal", epss)):
        rows = []
        for v in grid:
            A = response_matrix(prob["H"], kind, K=int(v), lr=lr, eps=float(v))
            y, w = fixed_point(prob["Phi"], prob["phi_v"], cfg.val_y, A)
            rows.append({"K" if kind != "proximal" else "eps": v, "w_norm": float(w.norm()), "y_norm": float(y.norm())})
        out[kind] = rows
    return out


def _cached_run(parts: Path | None, name: str, key: dict[str, Any]):
    """(path, stored result or None) of one resumable run under ``parts`` (``None``: no caching)."""
    if parts is None:
        return None, None
    path = parts / f"{name}.json"
    return path, load_part(path, key)


def run_linear(cfg: Config, amplitudes: str, progress=None, parts: Path | None = None) -> dict[str, Any]:
    """Closed-form curves plus library runs (BilevelOptimizer) for the configured K and eps.

    With ``parts``, each finished run is stored there and re-used by a later call with the same settings."""
    prob = _problem(cfg, amplitudes)
    lr = cfg.inner_lr[amplitudes]
    Phi, pinv, H = prob["Phi"], prob["pinv"], prob["H"]
    eye = torch.eye(H.shape[0], dtype=D, device=cfg.device)
    y0 = prob["space"].from_natural(
        prob["pseudo"], {"targets": {"y": torch.zeros(cfg.n_points)}}, dtype=D, device=cfg.device
    )
    w0 = {"w": torch.zeros(H.shape[0], dtype=D, device=cfg.device)}
    min_norm = lambda start, h: {"w": start["w"] + pinv @ (h["targets/y"] - Phi @ start["w"])}  # noqa: E731
    runs = []
    settings = (
        [("neumann", k) for k in cfg.neumann_ks]
        + [("unroll", k) for k in cfg.unroll_ks]
        + [("proximal", e) for e in (cfg.damping or cfg.damping_default[amplitudes])]
    )
    lam_max = float(torch.linalg.eigvalsh(H)[-1])
    for kind, value in settings:
        key = {
            "basis": amplitudes,
            "method": kind,
            "setting": value,
            "n_points": cfg.n_points,
            "n_freq": cfg.n_freq,
            "outer_steps": cfg.outer_steps,
            "device": cfg.device,
            "val_point": [cfg.val_x, cfg.val_y],
            "outer_lr": cfg.outer_lr,
        }
        path, done = _cached_run(parts, f"{amplitudes}_{kind}_{value:g}", key)
        if done is not None:
            runs.append({**done, "resumed": True})
            if progress:
                progress(1)
            continue
        if kind == "proximal":
            m = C.method("proximal", eps=value)
            # Alg. 3: y_{t+1} = argmin f(w, y_{t+1}) + eps/2 ||w - w_t||^2, in closed form
            prox = lambda s, h, e=value: {"w": torch.linalg.solve(H + e * eye, Phi.T @ h["targets/y"] + e * s["w"])}  # noqa: E731
            concept = C.concept("warm-full", inner_lr=lr, closed_form=prox)
            A = response_matrix(H, "proximal", eps=value)
        else:
            m = C.method(kind, steps=int(value), lr=lr)
            # cold start: the weights re-trained from 0 to convergence are the min-norm Phi^+ y
            concept = C.concept("cold", inner_lr=lr, closed_form=min_norm)
            A = response_matrix(H, kind, K=int(value), lr=lr)
        y_star, w_star = fixed_point(Phi, prob["phi_v"], cfg.val_y, A)
        # Every hypergradient is r_t d (r_t the validation residual), so SGD keeps y on the line through 0 along d
        # and the fixed point does not depend on the outer step; with a converged inner problem
        # r_{t+1} = r_t (1 - lr_outer phi^T Phi^+ d), so lr_outer = 0.5 / (phi^T Phi^+ d) halves r every step.
        # cfg.outer_lr: the paper's plain SGD step instead (same fixed point, reached more slowly).
        d = Phi @ (A @ prob["phi_v"])
        steps = cfg.outer_steps
        if cfg.outer_lr is not None:
            outer_lr = float(cfg.outer_lr)
        else:
            outer_lr = 0.5 / float(prob["phi_v"] @ (pinv @ d))
            if kind == "proximal":  # the weights lag (a step closes a fraction lambda / (lambda + eps) of the gap)
                outer_lr *= lam_max / (lam_max + value)
        if kind == "proximal":
            steps *= 3
        start = time.perf_counter()
        opt = C.BilevelOptimizer(prob["inner"], prob["outer"], w0, y0, concept=concept, method=m, outer_lr=outer_lr)
        status = "ok"
        try:
            opt.run(steps, record_every=steps)
        except FloatingPointError as e:  # recorded, never dropped
            status = f"diverged: {e}"
        y = opt.hparams["targets/y"].detach()
        w = opt.params["w"]
        row = {
            "method": kind,
            "setting": value,
            "label": _setting_label(kind, value),
            "status": status,
            "outer_lr": outer_lr,
            "outer_lr_normalised": cfg.outer_lr is None,
            "outer_steps": steps,
            "val_loss": opt.losses()["outer"],
            "w_norm": float(w.norm()),
            "y_norm": float(y.norm()),
            "closed_form_w_norm": float(w_star.norm()),
            "closed_form_y_norm": float(y_star.norm()),
            "max_abs_diff_y": float((y - y_star).abs().max()),
            "targets": y.tolist(),
            "weights": w.cpu().tolist(),
            "seconds": time.perf_counter() - start,
        }
        if path is not None:
            save_part(path, key, row)
        runs.append({**row, "resumed": False})
        if progress:
            progress(1)
    curves = closed_form_curves(cfg, prob, lr)
    return {"inner_lr": lr, "x": prob["x"].tolist(), "runs": runs, "closed_form": curves, "trend": _trend(curves)}


def _trend(curves: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Does less inner optimisation (smaller K, larger eps) give smaller ||w|| and larger ||y||? (Fig. 3c)"""
    out = {}
    for kind, rows in curves.items():
        key = "eps" if kind == "proximal" else "K"
        # rows run from less to more inner optimisation: K increasing, eps decreasing
        w = [r["w_norm"] for r in rows]
        y = [r["y_norm"] for r in rows]
        tol = 1e-9
        out[kind] = {
            "w_norm_nondecreasing": all(b >= a * (1 - tol) for a, b in zip(w, w[1:])),
            "y_norm_nonincreasing": all(b <= a * (1 + tol) for a, b in zip(y, y[1:])),
            "w_norm_range": [min(w), max(w)],
            "y_norm_range": [min(y), max(y)],
            "order": f"{key} {'increasing' if kind != 'proximal' else 'decreasing'}",
        }
    return out


# ---------------------------------------------------------------------------- MLP (Fig. 8)


def _flat_jacobian(params: dict[str, Tensor], x: Tensor) -> Tensor:
    """d mlp(x)_i / d params, flattened to (len(x), n_params) (the network's output Jacobian)."""
    jac = torch.func.jacrev(lambda p: mlp_forward(p, x)[:, 0])(params)
    return torch.cat([j.reshape(x.shape[0], -1) for j in jac.values()], dim=1)


def normalised_outer_lr(
    m: C.HypergradientMethod,
    inner,
    outer,
    params: dict[str, Tensor],
    hparams: dict[str, Tensor],
    x: Tensor,
    xv: Tensor,
    target: float = VAL_Y,
) -> float:
    """0.5 / (j_v^T J^+ d): the outer SGD step that halves the linearised validation residual.

    The hypergradient is r d (r = mlp(x_v) - target); a step y <- y - lr r d moves the re-trained
    network's output at x_v by about -lr r j_v^T J^+ d (min-norm re-fit of the targets),
    as in the linear problem, where the same choice halves the residual exactly.
    """
    r = float(mlp_forward(params, xv)[0, 0]) - target
    if abs(r) < 1e-12:
        return 1.0
    d = m(outer, params, hparams, inner=inner)["targets/y"].detach() / r
    rate = float(_flat_jacobian(params, xv)[0] @ (torch.linalg.pinv(_flat_jacobian(params, x)) @ d))
    if not rate > 0:
        raise ValueError(f"{m.label}: the hypergradient does not decrease the validation loss (rate {rate:.3g})")
    return 0.5 / rate


def mlp_problem(cfg: Config) -> dict[str, Any]:
    """The MLP anti-distillation problem of Fig. 8: inputs, initial weights and targets, inner and outer losses."""
    x = torch.linspace(-3.0, 3.0, cfg.n_points, dtype=D, device=cfg.device)[:, None]
    xv = torch.tensor([[cfg.val_x]], dtype=D, device=cfg.device)
    space, pseudo = targets_space(cfg.n_points)
    w0 = {
        k: v.to(cfg.device)
        for k, v in mlp_init([1, 10, 10, 1], torch.Generator().manual_seed(cfg.seed), dtype=D).items()
    }
    y0 = space.from_natural(pseudo, {"targets": {"y": torch.zeros(cfg.n_points)}}, dtype=D, device=cfg.device)

    def inner(p, h):
        return 0.5 * ((mlp_forward(p, x)[:, 0] - space.natural(h)["targets"]["y"]) ** 2).sum()

    def outer(p, h):
        return 0.5 * (mlp_forward(p, xv)[0, 0] - cfg.val_y) ** 2

    return dict(x=x, xv=xv, w0=w0, y0=y0, inner=inner, outer=outer)


def run_mlp(cfg: Config, progress=None, parts: Path | None = None) -> dict[str, Any]:
    """2-layer, 10-unit ReLU MLP: Neumann K with cold start, and alternating updates through K unrolled steps."""
    prob = mlp_problem(cfg)
    x, xv, w0, y0, inner, outer = (prob[k] for k in ("x", "xv", "w0", "y0", "inner", "outer"))

    runs = []
    settings = [("neumann", k) for k in cfg.mlp_neumann_ks] + [("unroll", k) for k in cfg.mlp_unroll_ks]
    grid = torch.linspace(-math.pi, math.pi, 200, dtype=D, device=cfg.device)[:, None]
    for kind, K in settings:
        common = {
            "n_points": cfg.n_points,
            "lr": cfg.mlp_lr,
            "seed": cfg.seed,
            "device": cfg.device,
            "val_point": [cfg.val_x, cfg.val_y],
        }
        if kind == "neumann":
            key = {
                **common,
                "outer_steps": cfg.mlp_outer_steps,
                "cold_steps": cfg.mlp_cold_steps,
                "outer_lr": cfg.mlp_outer_lr,
            }
        else:
            key = {**common, "warm_steps": cfg.mlp_warm_steps, "outer_lr": cfg.mlp_outer_lr}
        path, done = _cached_run(parts, f"mlp_{kind}_{K}", {"method": kind, "K": K, **key})
        if done is not None:
            runs.append({**done, "resumed": True})
            if progress:
                progress(1)
            continue
        start = time.perf_counter()
        if kind == "neumann":
            m = C.method("neumann", steps=K, lr=cfg.mlp_lr)
            concept = C.concept("cold", inner_lr=cfg.mlp_lr, inner_steps=cfg.mlp_cold_steps, tol=None)
            steps = cfg.mlp_outer_steps
        else:
            m = C.method("unroll", steps=K, lr=cfg.mlp_lr)
            concept = C.concept("warm-partial", inner_lr=cfg.mlp_lr, inner_steps=1)
            steps = cfg.mlp_warm_steps
        opt = C.BilevelOptimizer(
            inner, outer, w0, y0, concept=concept, method=m, outer_lr=cfg.mlp_outer_lr or cfg.mlp_lr
        )
        status = "ok"
        outer_lr = cfg.mlp_outer_lr or cfg.mlp_lr
        try:
            if kind == "neumann" and cfg.mlp_outer_lr is None:  # at the first cold-start solution
                outer_lr = normalised_outer_lr(m, inner, outer, opt.params, T.detach(opt.hparams), x, xv, cfg.val_y)
                for group in opt.opt.param_groups:
                    group["lr"] = outer_lr
            every = max(1, steps // cfg.mlp_curve_points)
            history = opt.run(steps, record_every=every)
        except (FloatingPointError, ValueError) as e:  # recorded, never dropped
            status = f"diverged: {e}"
            history = []
        # the convergence record: validation / inner loss and ||y|| every `every` outer steps
        curve = [
            {
                "t": h["t"],
                "val_loss": h["outer"],
                "inner_loss": h["inner"],
                "y_norm": float(h["hparams"]["targets/y"].norm()),
            }
            for h in history
        ]
        y = opt.hparams["targets/y"].detach()
        wn = math.sqrt(sum(float((v - w0[k]).pow(2).sum()) for k, v in opt.params.items()))
        with torch.no_grad():
            fit = mlp_forward(opt.params, grid)[:, 0]
        row = {
            "method": kind,
            "setting": K,
            "label": _setting_label(kind, K),
            "status": status,
            "outer_lr": outer_lr,
            "outer_steps": steps,
            "val_loss": opt.losses()["outer"],
            "inner_loss": opt.losses()["inner"],
            "w_norm": math.sqrt(sum(float(v.pow(2).sum()) for v in opt.params.values())),
            "w_dist_from_init": wn,
            "y_norm": float(y.norm()),
            "targets": y.tolist(),
            "fit": fit.tolist(),
            "curve": curve,
            "seconds": time.perf_counter() - start,
        }
        if path is not None:
            save_part(path, {"method": kind, "K": K, **key}, row)
        runs.append({**row, "resumed": False})
        if progress:
            progress(1)
    return {"x": x[:, 0].tolist(), "fit_x": torch.linspace(-math.pi, math.pi, 200).tolist(), "runs": runs}


# ---------------------------------------------------------------------------- CLI


def add_arguments(p) -> None:
    c = Config()
    p.add_argument(
        "--amplitudes",
        default=",".join(c.amplitudes),
        help="Fourier amplitudes: exp (2^(N-n), Fig. 3), inv (1/n, Fig. 7)",
    )
    p.add_argument(
        "--paper",
        action="store_true",
        help="paper-scale grids: Neumann K up to 1000 (linear and MLP), MLP re-trained 5000 steps per outer "
        "step (App. D.2), 20 outer steps, and the warm-start unrolled MLP runs K=1,5,20 "
        "(20000 alternating steps); explicit options below still override",
    )
    p.add_argument(
        "--neumann-ks",
        type=V.int_list(0, empty=True),
        default=None,
        help=f"Neumann steps K: the series sum_{{k=0..K}}, i.e. K+1 terms (cold-start runs; default {c.neumann_ks})",
    )
    p.add_argument(
        "--unroll-ks",
        type=V.int_list(1, empty=True),
        default=None,
        help=f"unrolled steps K, = Neumann K-1 (K terms) (cold-start runs; default {c.unroll_ks})",
    )
    p.add_argument(
        "--damping",
        type=V.float_list(0, open_low=True, empty=True),
        default=None,
        help=f"proximal damping eps (warm-start, Alg. 3); default per basis {c.damping_default}",
    )
    V.add_deprecated_alias(p, "--eps", "--damping", type=V.float_list(0, open_low=True, empty=True))
    p.add_argument(
        "--outer-steps",
        type=V.positive_int,
        default=None,
        help=f"outer SGD steps per linear run, x3 for proximal (default {c.outer_steps})",
    )
    p.add_argument(
        "--outer-lr",
        type=V.positive_float,
        default=None,
        help="plain outer SGD step of the linear runs (paper: 0.01); default: normalised per run, "
        "0.5 / (phi_v^T Phi^+ d), which halves the validation residual per step (same fixed point)",
    )
    p.add_argument(
        "--points",
        type=V.positive_int,
        default=c.n_points,
        help=f"number of learned targets, at linspace(-3, 3, N) (paper: {c.n_points})",
    )
    p.add_argument(
        "--val-point",
        default=f"{VAL_X:g},{VAL_Y:g}",
        help="the validation point X,Y the regressor should fit (paper: 0,2; a negative X as --val-point=-1,2)",
    )
    p.add_argument("--no-mlp", action="store_true", help="skip the MLP version (Fig. 8)")
    p.add_argument(
        "--mlp-neumann-ks",
        type=V.int_list(0, empty=True),
        default=None,
        help=f"MLP Neumann steps K (K+1 terms), cold start (default {c.mlp_neumann_ks})",
    )
    p.add_argument(
        "--mlp-unroll-ks",
        type=V.int_list(1, empty=True),
        default=None,
        help="MLP warm-start alternating runs (Alg. 1: one SGD step per outer step, hypergradient through K "
        "unrolled steps), Fig. 8's unrolled half; default none, 1,5,20 reproduces it on one CPU thread in 6-11 min "
        "(--paper: 1,5,20)",
    )
    p.add_argument(
        "--mlp-outer-steps",
        type=V.positive_int,
        default=None,
        help=f"outer steps of the cold-start Neumann MLP runs (default {c.mlp_outer_steps})",
    )
    p.add_argument(
        "--mlp-cold-steps",
        type=V.positive_int,
        default=None,
        help=f"MLP re-training SGD steps before each outer step (default {c.mlp_cold_steps}; paper: 5000)",
    )
    p.add_argument(
        "--mlp-warm-steps",
        type=V.positive_int,
        default=None,
        help=f"alternating steps of the unrolled MLP runs (default {c.mlp_warm_steps}: K=1 fits the validation "
        "point to 1e-6 at the paper's outer step 0.01)",
    )
    p.add_argument(
        "--mlp-outer-lr",
        type=V.positive_float,
        default=None,
        help="fixed outer SGD step of the MLP runs (paper: 0.01); default: normalised for Neumann, 0.01 for unroll",
    )


#: --paper: the paper's grids and budgets (App. D.2); the warm-start MLP runs (K=1, 5, 20, 20000 steps) take
#: 1 / 3 / 8 ms per alternating step on one CPU thread, 6-11 min together (measured, docs/vicol.md)
PAPER = dict(
    neumann_ks=[1, 10, 100, 1000],
    mlp_neumann_ks=[0, 1, 10, 100, 1000],
    mlp_unroll_ks=[1, 5, 20],
    mlp_cold_steps=5000,
    mlp_outer_steps=20,
    mlp_warm_steps=20000,
)


def check_arguments(a) -> None:
    V.check_names("--amplitudes", V.names(a.amplitudes), ("exp", "inv"))
    try:
        x, y = (float(v) for v in a.val_point.split(","))
    except ValueError:
        raise ValueError(f"--val-point must be X,Y (two numbers), got {a.val_point!r}") from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise ValueError(f"--val-point must be two finite numbers, got {a.val_point!r}")


def main(a, progress_factory=None, console=None) -> dict:
    check_arguments(a)
    base = {**asdict(Config()), **(PAPER if a.paper else {})}
    given = {
        "neumann_ks": a.neumann_ks,
        "unroll_ks": a.unroll_ks,
        "outer_steps": a.outer_steps,
        "mlp_neumann_ks": a.mlp_neumann_ks,
        "mlp_unroll_ks": a.mlp_unroll_ks,
        "mlp_outer_steps": a.mlp_outer_steps,
        "mlp_cold_steps": a.mlp_cold_steps,
        "mlp_warm_steps": a.mlp_warm_steps,
    }
    opts = {k: (v if v is not None else base[k]) for k, v in given.items()}
    try:
        val_x, val_y = (float(v) for v in a.val_point.split(","))
    except ValueError:
        raise ValueError(f"--val-point must be X,Y (two numbers), got {a.val_point!r}") from None
    if a.points < 1:
        raise ValueError(f"--points must be >= 1, got {a.points}")
    if a.outer_lr is not None and not a.outer_lr > 0:
        raise ValueError(f"--outer-lr must be > 0, got {a.outer_lr}")
    cfg = Config(
        amplitudes=[s for s in a.amplitudes.split(",") if s],
        damping=a.damping,
        mlp=not a.no_mlp,
        mlp_outer_lr=a.mlp_outer_lr,
        seed=a.seed,
        device=a.device,
        n_points=a.points,
        val_x=val_x,
        val_y=val_y,
        outer_lr=a.outer_lr,
        **opts,
    )
    for amp in cfg.amplitudes:
        if amp not in ("exp", "inv"):
            raise ValueError(f"unknown amplitudes {amp!r}: use exp or inv")
    return run(cfg, Path(a.out), progress_factory, console)


def run(cfg: Config, out: Path, progress_factory=None, console=None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    doc: dict[str, Any] = {"experiment": NAME, "config": asdict(cfg), "metrics": {}}
    for amp in cfg.amplitudes:
        n_lin = len(cfg.neumann_ks) + len(cfg.unroll_ks) + len(cfg.damping or cfg.damping_default[amp])
        prog = progress_factory(f"fourier {amp}", n_lin) if progress_factory else None
        doc["metrics"][amp] = run_linear(cfg, amp, prog, parts=out / "parts")
    if cfg.mlp:
        prog = progress_factory("mlp", len(cfg.mlp_neumann_ks) + len(cfg.mlp_unroll_ks)) if progress_factory else None
        doc["metrics"]["mlp"] = run_mlp(cfg, prog, parts=out / "parts")
    doc["seconds"] = time.perf_counter() - t0
    atomic_write_json(out / "results.json", doc, indent=1)
    _plot(doc, cfg, out)
    _print(doc, console)
    return doc


def _print(doc: dict, console) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    for amp, m in doc["metrics"].items():
        mlp = amp == "mlp"
        cfg = doc["config"]
        step = (
            "; neumann: cold start (re-trained per outer step), unroll: warm start (Alg. 1, one SGD step per "
            "outer step)"
            if mlp
            else (
                f", outer SGD step {cfg['outer_lr']:g}"
                if cfg.get("outer_lr") is not None
                else ", normalised outer SGD step"
            )
        )
        t = Table(
            title=f"anti-distillation, {'MLP' if mlp else f'Fourier {amp}'}: {cfg['n_points']} learned targets, "
            f"validation point ({cfg['val_x']:g}, {cfg['val_y']:g}){step}"
        )
        for c in (
            ("setting", "val loss", "||w||", "||y||")
            + (("inner loss", "outer steps") if mlp else ("closed-form ||y||", "max |y - y*|"))
            + ("s",)
        ):
            t.add_column(c, justify="right")
        for r in m["runs"]:
            row = [
                r["label"] + ("" if r["status"] == "ok" else " (diverged)"),
                f"{r['val_loss']:.2e}",
                f"{r['w_norm']:.4g}",
                f"{r['y_norm']:.4g}",
            ]
            if mlp:
                row += [f"{r['inner_loss']:.1e}", str(r["outer_steps"])]
            else:
                row += [f"{r['closed_form_y_norm']:.4g}", f"{r['max_abs_diff_y']:.1e}"]
            t.add_row(*row, f"{r['seconds']:.1f}")
        console.print(t)
        if mlp:
            for kind in ("neumann", "unroll"):
                rows = sorted(
                    (r for r in m["runs"] if r["method"] == kind and r["status"] == "ok"), key=lambda r: r["setting"]
                )
                w = [r["w_norm"] for r in rows]
                y = [r["y_norm"] for r in rows]
                if len(rows) > 1:
                    console.print(
                        f"  mlp {kind} (K increasing): ||w|| non-decreasing "
                        f"{all(b >= a for a, b in zip(w, w[1:]))}, ||y|| non-increasing "
                        f"{all(b <= a for a, b in zip(y, y[1:]))}"
                    )
        else:
            for kind, tr in m["trend"].items():
                console.print(
                    f"  {amp} {kind} ({tr['order']}): ||w|| non-decreasing {tr['w_norm_nondecreasing']}, "
                    f"||y|| non-increasing {tr['y_norm_nonincreasing']}; ||w|| in "
                    f"[{tr['w_norm_range'][0]:.3g}, {tr['w_norm_range'][1]:.3g}], ||y|| in "
                    f"[{tr['y_norm_range'][0]:.3g}, {tr['y_norm_range'][1]:.3g}]"
                )


#: one colour and line style per method, shared by every panel (Neumann and unroll K nearly coincide:
#: unroll K = Neumann K-1, so unroll is drawn dashed on top of a thicker Neumann line)
STYLE = {
    "neumann": dict(color="C0", lw=2.5),
    "unroll": dict(color="C1", lw=1.2, ls="--"),
    "proximal": dict(color="C3", lw=1.5),
}


def _plot(doc: dict, cfg: Config, out: Path) -> None:
    from matplotlib.figure import Figure

    dense = torch.linspace(-math.pi, math.pi, 400, dtype=D)
    for amp, m in doc["metrics"].items():
        mlp = amp == "mlp"
        kinds = [k for k in ("neumann", "unroll", "proximal") if any(r["method"] == k for r in m["runs"])]
        norm_panels = 1 if mlp else 2
        fig = Figure(figsize=(4.6 * (len(kinds) + norm_panels), 4.2))
        n = len(kinds) + norm_panels
        axes = [fig.add_subplot(1, n, i + 1) for i in range(n)]
        for ax, kind in zip(axes, kinds):
            for r in [r for r in m["runs"] if r["method"] == kind]:
                if mlp:
                    (line,) = ax.plot(m["fit_x"], r["fit"], lw=1, label=r["label"])
                else:
                    fit = fourier_features(dense, cfg.n_freq, amp) @ torch.tensor(r["weights"], dtype=D)
                    (line,) = ax.plot(dense.tolist(), fit.tolist(), lw=1, label=r["label"])
                ax.scatter(m["x"], r["targets"], s=14, color=line.get_color())
            ax.scatter([cfg.val_x], [cfg.val_y], marker="x", s=80, color="green", zorder=5, label="validation point")
            ax.set_title(f"{kind}: learned targets and fits")
            ax.set_xlabel("x")
            ax.legend(fontsize=7)
        if mlp:
            ax = axes[-1]
            for kind in kinds:
                rows = [r for r in m["runs"] if r["method"] == kind]
                ks = [max(r["setting"], 0.5) for r in rows]
                st = STYLE[kind]
                ax.plot(ks, [r["w_norm"] for r in rows], marker="o", color=st["color"], label=f"||w|| {kind}")
                ax.plot(ks, [r["y_norm"] for r in rows], marker="s", ls=":", color=st["color"], label=f"||y|| {kind}")
            ax.set_xscale("log")
            ax.set_xlabel("K (K=0 drawn at 0.5)")
            ax.set_title("norms against K")  # noqa: E702
            ax.legend(fontsize=7)
        else:
            for ax, norm in zip(axes[-2:], ("w_norm", "y_norm")):
                ax2 = ax.twiny()
                for kind in ("neumann", "unroll"):
                    rows = m["closed_form"][kind]
                    ax.plot([r["K"] for r in rows], [r[norm] for r in rows], label=f"{kind} (K, bottom)", **STYLE[kind])
                rows = m["closed_form"]["proximal"]
                ax2.plot(
                    [r["eps"] for r in rows], [r[norm] for r in rows], label="proximal (eps, top)", **STYLE["proximal"]
                )
                for r in m["runs"]:
                    (ax2 if r["method"] == "proximal" else ax).scatter(
                        [r["setting"]], [r[norm]], color="k", s=12, zorder=5
                    )
                ax.set_xscale("log")
                ax2.set_xscale("log")
                ax2.invert_xaxis()
                ax.set_yscale("log")  # noqa: E702
                ax.set_xlabel("K (Neumann steps: K+1 terms / unrolled steps: K terms)")
                ax2.set_xlabel("eps (proximal), decreasing")  # noqa: E702
                ax.set_ylabel(f"{'||w||' if norm == 'w_norm' else '||y||'}: closed form (lines), library runs (dots)")
                lines = ax.get_legend_handles_labels()
                lines2 = ax2.get_legend_handles_labels()
                ax.legend(
                    lines[0] + lines2[0],
                    lines[1] + lines2[1],
                    fontsize=7,
                    loc="upper left" if norm == "w_norm" else "upper right",
                )
        fig.tight_layout()
        atomic_savefig(fig, out / f"anti_distill_{amp}.png", dpi=100)
