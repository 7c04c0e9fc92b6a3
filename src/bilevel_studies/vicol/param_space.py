"""Vicol et al. (2021) App. C/D.1, Fig. 4: cold start, warm start (full) and warm start (partial) in weight space.

A toy linear regression with two weights w in R^2 and one learned datapoint
whose input moves on a line, p(x) = a + x b (x, a scalar, is the outer
parameter), with target 1:

    f(w, x) = 1/2 (w^T p(x) - 1)^2,     F(w) = 1/2 ||w - w_val||^2.

The inner problem is overparameterised: its solution set S(x) = {w : w^T p(x) = 1}
is a line in weight space. Every such line passes through the point w_c with
w_c^T a = 1 and w_c^T b = 0. The three solution concepts
(:mod:`bilevel.concepts`), all trained from w_0 = 0:

* ``cold``: re-train from 0 to convergence -> the projection of the origin onto
  S(x), w = p / ||p||^2; the reachable weights are one curve (a circle through 0);
* ``warm-full``: re-train from w_t to convergence -> the projection of w_t onto
  S(x_{t+1}), which is Kaczmarz's method (cycling through solution sets
  converges to their intersection w_c, shown in the fourth panel);
* ``warm-partial``: one gradient step from w_t per outer step (Alg. 1, K = 1 unroll).

The cold and warm-full runs use the Neumann hypergradient with ``neumann_steps``
= K (K + 1 terms; the min-norm IFT, their Table 1 response, as K grows); the
partial run differentiates through its one unrolled step.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bilevel import concepts as C
from bilevel.hparams import IDENTITY, HyperParameter, HyperParameterSpace
from bilevel.rundir import atomic_savefig, atomic_write_json

from .. import _common as V

NAME = "param-space"
HELP = "Vicol et al. Fig. 4: cold start, warm start with full and with partial inner optimisation in a 2-D weight space"

D = torch.float64


@dataclass
class Config:
    a: tuple[float, float] = (1.0, 0.0)
    b: tuple[float, float] = (0.0, 1.0)
    w_val: tuple[float, float] = (0.2, 1.2)
    x0: float = 0.5
    outer_steps: int = 200
    outer_lr: float = 0.1
    inner_lr: float = 0.2
    neumann_steps: int = 30
    cycle: list[float] = field(default_factory=lambda: [-1.5, -0.5, 0.5, 1.5])
    cycle_rounds: int = 15
    device: str = "cpu"


def problem(cfg: Config) -> dict[str, Any]:
    """Losses, the outer parameter's space and raw x_0, and the closed-form projection onto S(x)."""
    a = torch.tensor(cfg.a, dtype=D, device=cfg.device)
    b = torch.tensor(cfg.b, dtype=D, device=cfg.device)
    w_val = torch.tensor(cfg.w_val, dtype=D, device=cfg.device)
    space = HyperParameterSpace([HyperParameter("x", IDENTITY, cfg.x0, cfg.x0)])
    raw = space.from_natural({}, {"x": cfg.x0}, dtype=D, device=cfg.device)

    def point(h):
        return a + space.natural(h)["x"] * b

    def inner(p, h):
        return 0.5 * (p["w"] @ point(h) - 1.0) ** 2

    def outer(p, h):
        return 0.5 * ((p["w"] - w_val) ** 2).sum()

    def project(w: Tensor, x: float) -> Tensor:
        """argmin_{v in S(x)} ||v - w||^2 = w + (1 - w^T p) p / ||p||^2 (App. E, Kaczmarz)."""
        p = a + x * b
        return w + (1.0 - w @ p) * p / (p @ p)

    # the common point of all S(x): w^T a = 1, w^T b = 0
    M = torch.stack([a, b])
    w_c = torch.linalg.solve(M, torch.tensor([1.0, 0.0], dtype=D, device=cfg.device))
    return dict(a=a, b=b, w_val=w_val, space=space, raw=raw, inner=inner, outer=outer, project=project, w_c=w_c)


def run_concept(cfg: Config, prob: dict[str, Any], name: str, progress=None) -> dict[str, Any]:
    w0 = {"w": torch.zeros(2, dtype=D, device=cfg.device)}
    if name == "warm-partial":
        concept = C.concept("warm-partial", inner_lr=cfg.inner_lr, inner_steps=1)
        method = C.method("unroll", steps=1, lr=cfg.inner_lr)
    else:
        # re-training to convergence is the projection onto S(x) (from 0 or from w_t), taken in closed form
        concept = C.concept(
            name, inner_lr=cfg.inner_lr, closed_form=lambda s, h: {"w": prob["project"](s["w"], float(h["x"]))}
        )
        method = C.method("neumann", steps=cfg.neumann_steps, lr=cfg.inner_lr)
    traj_w, traj_x = [], []

    def log(o: C.BilevelOptimizer) -> None:
        traj_w.append(o.params["w"].cpu().tolist())
        traj_x.append(float(o.hparams["x"].detach()))

    start = time.perf_counter()
    opt = C.BilevelOptimizer(
        prob["inner"], prob["outer"], w0, prob["raw"], concept=concept, method=method, outer_lr=cfg.outer_lr
    )
    log(opt)
    status = "ok"
    try:
        hist = opt.run(cfg.outer_steps, callback=log, progress=progress)
    except FloatingPointError as e:
        status, hist = f"diverged: {e}", [opt.record()]
    x = float(opt.hparams["x"].detach())
    w = opt.params["w"]
    return {
        "status": status,
        "final_x": x,
        "final_w": w.cpu().tolist(),
        "val_loss": hist[-1]["outer"],
        "inner_loss": hist[-1]["inner"],
        "dist_to_solution_set": float((prob["project"](w, x) - w).norm()),
        "inner_steps": opt.inner_steps_taken,
        "w": traj_w,
        "x": traj_x,
        "seconds": time.perf_counter() - start,
    }


def kaczmarz_cycle(cfg: Config, prob: dict[str, Any]) -> dict[str, Any]:
    """Warm-full projections cycling through the solution sets of ``cfg.cycle``: distance to w_c per round."""
    space = prob["space"]
    # gradient descent to convergence (not the closed form), checked against the closed-form limit w_c
    concept = C.concept("warm-full", inner_lr=cfg.inner_lr, inner_steps=100000, tol=1e-13)
    w = {"w": torch.zeros(2, dtype=D, device=cfg.device)}
    traj, dist = [w["w"].cpu().tolist()], []
    for _ in range(cfg.cycle_rounds):
        for x in cfg.cycle:
            h = space.from_natural({}, {"x": x}, dtype=D, device=cfg.device)
            w, _ = concept.respond(prob["inner"], w, w, h)
            traj.append(w["w"].cpu().tolist())
        dist.append(float((w["w"] - prob["w_c"]).norm()))
    return {"xs": cfg.cycle, "w": traj, "dist_to_intersection": dist, "intersection": prob["w_c"].cpu().tolist()}


def add_arguments(p) -> None:
    c = Config()
    p.add_argument("--outer-steps", type=V.positive_int, default=c.outer_steps, help="outer SGD steps per concept")
    p.add_argument(
        "--outer-lr", type=V.positive_float, default=c.outer_lr, help="outer SGD step on the datapoint coordinate x"
    )
    p.add_argument("--inner-lr", type=V.positive_float, default=c.inner_lr, help="inner gradient-descent step")
    p.add_argument("--x0", type=V.finite_float, default=c.x0, help="initial datapoint coordinate")
    p.add_argument(
        "--cycle-rounds",
        type=V.positive_int,
        default=c.cycle_rounds,
        help="Kaczmarz rounds through the 4 solution sets",
    )


def main(a, progress_factory=None, console=None) -> dict:
    cfg = Config(
        outer_steps=a.outer_steps,
        outer_lr=a.outer_lr,
        inner_lr=a.inner_lr,
        x0=a.x0,
        cycle_rounds=a.cycle_rounds,
        device=a.device,
    )
    return run(cfg, Path(a.out), progress_factory, console)


def run(cfg: Config, out: Path, progress_factory=None, console=None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    prob = problem(cfg)
    doc: dict[str, Any] = {"experiment": NAME, "config": asdict(cfg), "metrics": {}}
    for name in C.CONCEPTS:
        prog = progress_factory(name, cfg.outer_steps) if progress_factory else None
        doc["metrics"][name] = run_concept(cfg, prob, name, prog)
    doc["kaczmarz"] = kaczmarz_cycle(cfg, prob)
    # the best the cold start can do: min over x of F(p(x) / ||p(x)||^2), by a dense grid
    xs = torch.linspace(-20, 20, 400001, dtype=D, device=cfg.device)
    ps = prob["a"][None] + xs[:, None] * prob["b"][None]
    cold_w = ps / (ps**2).sum(1, keepdim=True)
    doc["cold_curve_best_val_loss"] = float((0.5 * ((cold_w - prob["w_val"]) ** 2).sum(1)).min())
    atomic_write_json(out / "results.json", doc, indent=1)
    _plot(doc, cfg, prob, out / "param_space.png")
    _print(doc, console)
    return doc


def _print(doc: dict, console) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title="parameter space (Fig. 4): final state per solution concept")
    for c in ("concept", "val loss F", "final x", "final w", "dist to S(x)", "inner steps", "s"):
        t.add_column(c, justify="right")
    for name, m in doc["metrics"].items():
        t.add_row(
            name + ("" if m["status"] == "ok" else " (diverged)"),
            f"{m['val_loss']:.4g}",
            f"{m['final_x']:.4g}",
            "(" + ", ".join(f"{v:.3f}" for v in m["final_w"]) + ")",
            f"{m['dist_to_solution_set']:.1e}",
            str(m["inner_steps"]),
            f"{m['seconds']:.2f}",
        )
    console.print(t)
    k = doc["kaczmarz"]
    console.print(f"best validation loss on the cold-start curve (grid): {doc['cold_curve_best_val_loss']:.4g}")
    dist = k["dist_to_intersection"]
    rounds = reported_rounds(len(dist))
    if rounds:
        console.print(
            f"Kaczmarz (warm-full cycling through S(x) for x in {k['xs']}): distance to the intersection "
            f"{k['intersection']} after rounds {', '.join(map(str, rounds))}: "
            f"{', '.join(f'{dist[r - 1]:.3g}' for r in rounds)}"
        )
    else:
        console.print("Kaczmarz: no rounds run (--cycle-rounds 0)")


def reported_rounds(n: int) -> list[int]:
    """The Kaczmarz rounds printed (1-based): 1, 5 and the last, only those of the ``n`` that ran."""
    return sorted({r for r in (1, 5, n) if 1 <= r <= n})


def _plot(doc: dict, cfg: Config, prob: dict[str, Any], path: Path) -> None:
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(17, 4.4))
    g = np.linspace(-0.8, 1.8, 200)
    W1, W2 = np.meshgrid(g, g)
    wv = np.array(cfg.w_val)
    Fv = 0.5 * ((W1 - wv[0]) ** 2 + (W2 - wv[1]) ** 2)
    a, b = np.array(cfg.a), np.array(cfg.b)

    def solution_line(ax, x, **kw):
        p = a + x * b
        t = np.linspace(-3, 3, 2)
        base = p / (p @ p)
        d = np.array([-p[1], p[0]])
        pts = base[None] + t[:, None] * d[None]
        ax.plot(pts[:, 0], pts[:, 1], **kw)

    panels = list(doc["metrics"].items()) + [("Kaczmarz cycle (warm-full)", doc["kaczmarz"])]
    for i, (name, m) in enumerate(panels):
        ax = fig.add_subplot(1, 4, i + 1)
        ax.contour(W1, W2, Fv, levels=15, cmap="Greys", linewidths=0.6)
        xs = m["xs"] if "xs" in m else np.quantile(m["x"], [0, 0.33, 0.66, 1.0])
        for x in xs:
            solution_line(ax, float(x), color="k", lw=1)
        w = np.array(m["w"])
        ax.plot(w[:, 0], w[:, 1], ".-", ms=3, lw=0.8, color="C3", label="w_t")
        ax.scatter([0], [0], marker="o", color="k", s=20, label="w_0 = 0")
        ax.scatter([wv[0]], [wv[1]], marker="*", color="green", s=80, label="argmin F")
        ax.set_xlim(g[0], g[-1])
        ax.set_ylim(g[0], g[-1])
        ax.set_aspect("equal")  # noqa: E702
        ax.set_title(name if "xs" in m else f"{name}: F={m['val_loss']:.3g}", fontsize=9)
        ax.set_xlabel("w1")
        ax.set_ylabel("w2")  # noqa: E702
        ax.legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
