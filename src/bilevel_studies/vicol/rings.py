"""Vicol et al. (2021) Sec. 4.1, Fig. 2, 5, 6: dataset distillation on concentric rings, warm vs cold start.

The original data (100 points per class on concentric rings in 2-D) is the
*validation* set of the bilevel problem; the training set is a handful of
learned datapoints (a :class:`bilevel.distill.DistilledData`, optionally with
learned soft labels softmax(c_j)). A 4-layer ReLU MLP with 200 units per hidden
layer (:func:`bilevel.nets.mlp_init`) is trained jointly with the points:

* ``reference``: the MLP trained directly on the original data (Fig. 2a);
* ``warm``: alternating updates (:class:`bilevel.concepts.BilevelOptimizer`,
  concept ``warm-partial``, Alg. 1): one Adam step on the points with the
  hypergradient through K = 1 unrolled SGD step, then one SGD step on the MLP
  (Fig. 2b); the points' trajectory is recorded;
* ``cold``: the same initial MLP re-trained from scratch on the final learned
  points only (concept ``cold``; Fig. 2c).

Paper's result: warm start reaches nearly the reference validation loss although
it only ever trains on one point per class (the weights remember the points'
trajectory), while cold-start re-training on the final points fails. Tasks
(:func:`parse_task`): ``Cclass[-Mpoints|-Kperclass][-soft|-hard]``, C rings, M
learned points in all (or K per class; default one per class), point j starting in
class j mod C; labels are learned soft labels when ``-soft`` or when M < C (hard
one-hot labels could not cover every class), fixed one-hot otherwise. The paper's
tasks are the defaults: ``2class`` (2 points, Fig. 2), ``3class`` (3 points, Fig. 5)
and ``3class-2points`` (3 classes, 2 points with learned soft labels, Fig. 6).

The reference model is trained with plain SGD on the original data for the same
number of steps at ``reference_lr`` (default 0.05). The paper does not say how its
reference (Fig. 2a) was trained (App. D.1 gives only the inner SGD 0.001 and the
outer Adam 0.01); at the inner step 0.001 this torch-initialised MLP is still near
chance after 3000 steps, so the default trains it to convergence at 0.05 (it is the
"trained directly on the original data" yardstick, not part of the bilevel loop;
``--reference-lr 0.001`` gives the inner optimiser's set-up). For the soft-label task the label
logits get their own Adam step (``label_lr``, default 0.1; the paper states none): at the
points' 0.01 the labels settle at the tangent-kernel-weighted class prior and the warm model
predicts one class (33%); at 0.1 they change class during training (all three covered) and the
warm model is above chance, but well below the paper's picture (see docs/vicol.md).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bilevel import concepts as C
from bilevel.distill import DistilledData
from bilevel.nets import mlp_forward, mlp_init
from bilevel.population import derived_seed
from bilevel.rundir import atomic_savefig, atomic_write_json

from .. import _common as V
from .._parts import load_part, save_part

NAME = "rings"
HELP = (
    "Vicol et al. Fig. 2/5/6: distil concentric rings into a few learned points; warm-start joint training "
    "vs cold-start re-training vs the reference"
)

#: the paper's tasks: name -> (classes, learned points, soft labels)
TASKS = {"2class": (2, 2, False), "3class": (3, 3, False), "3class-2points": (3, 2, True)}

_TASK_RE = re.compile(r"^(\d+)class(?:-(\d+)(points?|perclass|per-class))?(?:-(soft|hard))?$")


def parse_task(name: str) -> tuple[int, int, bool]:
    """``(classes, points, soft)`` of a task name ``Cclass[-Mpoints|-Kperclass][-soft|-hard]``.

    M is the total number of learned points (default C, one per class; ``-Kperclass``: M = K C),
    soft labels when ``-soft``, or by default when M < C. ``3class-2points`` = (3, 2, True) (Fig. 6).
    """
    m = _TASK_RE.match(str(name).strip().lower().replace("_", "-"))
    if m is None:
        raise ValueError(
            f"unknown rings task {name!r}: use Cclass[-Mpoints|-Kperclass][-soft|-hard], "
            f"e.g. {', '.join(TASKS)}, 4class-8points, 2class-3perclass-soft"
        )
    classes = int(m.group(1))
    points = classes if m.group(2) is None else int(m.group(2)) * (classes if m.group(3).startswith("per") else 1)
    soft = points < classes if m.group(4) is None else m.group(4) == "soft"
    if classes < 2 or points < 1:
        raise ValueError(f"rings task {name!r}: need at least 2 classes and 1 learned point")
    return classes, points, soft


def task_name(classes: int, points: int, soft: bool) -> str:
    """The canonical name of a task (``parse_task(task_name(*t)) == t``; the paper's tasks keep their names)."""
    name = f"{classes}class" + ("" if points == classes else f"-{points}points")
    if soft != (points < classes):
        name += "-soft" if soft else "-hard"
    return name


def make_rings(
    num_classes: int, per_class: int, generator: torch.Generator, noise: float = 0.1, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """``per_class`` points on a ring of radius c + 1 for class c, with N(0, noise^2) radial jitter."""
    xs, ys = [], []
    for c in range(num_classes):
        theta = 2 * math.pi * torch.rand(per_class, generator=generator, dtype=torch.float64)
        r = (c + 1) + noise * torch.randn(per_class, generator=generator, dtype=torch.float64)
        xs.append(torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=1))
        ys.append(torch.full((per_class,), c, dtype=torch.long))
    return torch.cat(xs).to(dtype), torch.cat(ys)


@dataclass
class Config:
    tasks: tuple[str, ...] = ("2class", "3class", "3class-2points")
    per_class: int = 100
    hidden: int = 200
    layers: int = 4  # linear layers: 2 -> 200 -> 200 -> 200 -> C
    steps: int = 3000
    inner_lr: float = 1e-3
    outer_lr: float = 1e-2
    unroll: int = 1
    reference_lr: float = 0.05
    label_scale: float = 1.0  # initial soft-label logits: label_scale * onehot(class)
    label_lr: float | None = 0.1  # Adam step on the soft-label logits (None: outer_lr); paper: not stated
    point_init: str = "real"  # "real": a random real point of the point's class; "normal": point_scale * N(0, I)
    point_scale: float = 1.0
    net_init: str = "torch"  # "torch": U(+-1/sqrt(fan_in)) weights and biases; "lecun": N(0, 1/fan_in), zero biases
    point_bound: float | None = None  # learned points x = R tanh(z / R) inside (-R, R)^2 (None: unbounded)
    record_every: int = 20
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"


def init_mlp(sizes: list[int], kind: str, seed: int, dtype: torch.dtype) -> dict[str, Tensor]:
    """Initial MLP weights: ``"torch"`` (:func:`bilevel.nets.mlp_init`, torch.nn.Linear's U(+-1/sqrt(fan_in)))
    or ``"lecun"``: W ~ N(0, 1/fan_in), b = 0 -- the default of the JAX libraries (Flax ``nn.Dense``
    lecun_normal, Haiku ``hk.Linear`` truncated normal 1/sqrt(fan_in)) the paper's code used;
    three times torch's weight variance, so the 4-layer MLP learns much faster at SGD lr 0.001."""
    g = torch.Generator().manual_seed(seed)
    if kind == "torch":
        return mlp_init(sizes, g, dtype=dtype)
    if kind != "lecun":
        raise ValueError(f"unknown MLP init {kind!r}; expected 'torch' or 'lecun'")
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        params[f"W{i}"] = (torch.randn(fan_out, fan_in, generator=g, dtype=torch.float64) * fan_in**-0.5).to(dtype)
        params[f"b{i}"] = torch.zeros(fan_out, dtype=dtype)
    return params


def label_summary(labels: list[list[list[float]]]) -> dict[str, Any]:
    """From the recorded soft labels ``(T, n, C)``: each point's argmax class over training
    (``label_path``: the sequence of distinct classes, consecutive repeats merged) and the set of
    classes some point was labelled with at some time (``classes_covered``; Fig. 6: all three)."""
    arg = torch.tensor(labels).argmax(-1)  # (T, n)
    paths = []
    for j in range(arg.shape[1]):
        path = [int(arg[0, j])]
        for c in arg[1:, j].tolist():
            if c != path[-1]:
                path.append(int(c))
        paths.append(path)
    return {"label_path": paths, "classes_covered": sorted({c for p in paths for c in p})}


def _metrics(params: dict[str, Tensor], x: Tensor, y: Tensor) -> dict[str, float]:
    with torch.no_grad():
        logits = mlp_forward(params, x)
        return {
            "val_loss": float(F.cross_entropy(logits, y)),
            "val_accuracy": float((logits.argmax(1) == y).float().mean()),
        }


def run_task(cfg: Config, task: str, progress=None) -> dict[str, Any]:
    num_classes, num_points, soft = parse_task(task)
    dtype = getattr(torch, cfg.dtype)
    g = torch.Generator().manual_seed(derived_seed(cfg.seed, 0))
    xv, yv = make_rings(num_classes, cfg.per_class, g, dtype=dtype)
    xv, yv = xv.to(cfg.device), yv.to(cfg.device)
    sizes = [2] + [cfg.hidden] * (cfg.layers - 1) + [num_classes]
    w0 = {k: v.to(cfg.device) for k, v in init_mlp(sizes, cfg.net_init, derived_seed(cfg.seed, 1), dtype).items()}
    # num_points < num_classes (Fig. 6): classes round-robin, point j starts in class j's one-hot label
    dd = DistilledData((2,), num_classes, soft_labels=soft, num_points=num_points, point_bound=cfg.point_bound)
    # "real": every point starts on a random real point of its (initial) class
    h0 = dd.init(
        torch.Generator().manual_seed(derived_seed(cfg.seed, 2)),
        cfg.point_init,
        real=(xv, yv) if cfg.point_init == "real" else None,
        scale=cfg.point_scale,
        label_scale=cfg.label_scale,
        dtype=dtype,
        device=cfg.device,
        requires_grad=False,
    )

    def inner(p, h):
        return dd.cross_entropy(mlp_forward(p, dd.inputs(h)), h)

    def outer(p, h):
        return F.cross_entropy(mlp_forward(p, xv), yv)

    out: dict[str, Any] = {"task": task, "num_classes": num_classes, "num_points": num_points, "soft_labels": soft}
    t0 = time.perf_counter()
    # reference: the same initial MLP trained on the original data, SGD at reference_lr for the same step budget
    # (the paper does not state its reference's optimiser; see the module docstring)
    ref_concept = C.concept("cold", inner_lr=cfg.reference_lr, inner_steps=cfg.steps, tol=None)
    ref, _ = ref_concept.respond(lambda p, h: outer(p, h), w0, w0, h0)
    out["reference"] = {**_metrics(ref, xv, yv), "seconds": time.perf_counter() - t0}

    t0 = time.perf_counter()
    traj: list[list[list[float]]] = []
    labels: list[list[list[float]]] = []

    curve: list[float] = []  # warm validation accuracy at every record

    def log(o: C.BilevelOptimizer) -> None:
        traj.append(dd.inputs(o.hparams).detach().cpu().tolist())
        curve.append(_metrics(o.params, xv, yv)["val_accuracy"])
        if soft:
            labels.append(dd.targets(o.hparams).detach().cpu().tolist())

    opt = C.BilevelOptimizer(
        inner,
        outer,
        w0,
        h0,
        concept=C.concept("warm-partial", inner_lr=cfg.inner_lr, inner_steps=1),
        method=C.method("unroll", steps=cfg.unroll, lr=cfg.inner_lr),
        outer_lr=cfg.outer_lr,
        outer_optimizer=torch.optim.Adam,
    )
    if soft and cfg.label_lr is not None:  # a separate Adam step size for the label logits
        groups = [
            {"params": [v], "lr": cfg.label_lr if k.endswith("/label_logits") else cfg.outer_lr}
            for k, v in opt.hparams.items()
        ]
        opt.opt = torch.optim.Adam(groups, lr=cfg.outer_lr)
    log(opt)
    status = "ok"
    try:
        opt.run(cfg.steps, record_every=cfg.record_every, callback=log, progress=progress)
    except FloatingPointError as e:  # recorded, never dropped
        status = f"diverged: {e}"
    warm = opt.params
    out["warm"] = {
        **_metrics(warm, xv, yv),
        "status": status,
        "inner_loss": opt.losses()["inner"],
        "accuracy_curve": curve,
        "max_val_accuracy": max(curve),
        "seconds": time.perf_counter() - t0,
    }

    t0 = time.perf_counter()
    final_h = {k: v.detach() for k, v in opt.hparams.items()}
    cold_concept = C.concept("cold", inner_lr=cfg.inner_lr, inner_steps=cfg.steps, tol=None)
    cold, _ = cold_concept.respond(inner, warm, w0, final_h)
    with torch.no_grad():
        cold_inner = float(inner(cold, final_h))
        final_x, final_t = dd.inputs(final_h), dd.targets(final_h)
        final_c = final_t.argmax(-1) if soft else final_t
        fits = {
            name: float((mlp_forward(p, final_x).argmax(1) == final_c).float().mean())
            for name, p in (("warm", warm), ("cold", cold))
        }
    out["warm"]["points_accuracy"] = fits["warm"]
    out["cold"] = {
        **_metrics(cold, xv, yv),
        "inner_loss": cold_inner,
        "points_accuracy": fits["cold"],
        "seconds": time.perf_counter() - t0,
    }
    out["points"] = {
        "trajectory": traj,
        "soft_labels": labels,
        "final": dd.inputs(final_h).cpu().tolist(),
        "final_targets": dd.targets(final_h).cpu().tolist(),
    }
    if soft:
        out["points"].update(label_summary(labels))
    out["_models"] = {"reference": ref, "warm": warm, "cold": cold, "data": (xv, yv)}
    return out


def add_arguments(p) -> None:
    c = Config()
    p.add_argument(
        "--tasks",
        default=",".join(c.tasks),
        help="comma-separated tasks Cclass[-Mpoints|-Kperclass][-soft|-hard]: C rings, M learned points in "
        "all (or K per class; default one per class), soft labels with -soft or when M < C; "
        f"default the paper's {', '.join(TASKS)}",
    )
    p.add_argument(
        "--steps",
        type=V.positive_int,
        default=c.steps,
        help="alternating steps (and reference / cold re-training steps)",
    )
    p.add_argument("--per-class", type=V.positive_int, default=c.per_class, help="original points per class")
    p.add_argument("--hidden", type=V.positive_int, default=c.hidden, help="hidden units per layer")
    p.add_argument("--inner-lr", type=V.positive_float, default=c.inner_lr, help="SGD step on the MLP (paper: 0.001)")
    p.add_argument(
        "--outer-lr", type=V.positive_float, default=c.outer_lr, help="Adam step on the learned points (paper: 0.01)"
    )
    p.add_argument(
        "--reference-lr",
        type=V.positive_float,
        default=c.reference_lr,
        help="SGD step of the reference model trained on the original data (paper: not stated; the default "
        "0.05 converges in the step budget, the inner 0.001 stays near chance)",
    )
    p.add_argument(
        "--unroll", type=V.positive_int, default=c.unroll, help="unrolled steps K of the hypergradient (paper: 1)"
    )
    p.add_argument(
        "--label-scale",
        type=V.finite_float,
        default=c.label_scale,
        help="initial soft-label logits label_scale * onehot (soft-label tasks)",
    )
    p.add_argument(
        "--label-lr",
        type=V.finite_float,
        default=c.label_lr,
        help="Adam step on the soft-label logits (soft-label tasks; paper: not stated; 0 or less: use --outer-lr)",
    )
    p.add_argument(
        "--point-init",
        choices=("real", "normal"),
        default=c.point_init,
        help="initial points: a random real point of each point's class, or --point-scale * N(0, I)",
    )
    p.add_argument("--point-scale", type=V.positive_float, default=c.point_scale, help="std of --point-init normal")
    p.add_argument(
        "--net-init",
        choices=("torch", "lecun"),
        default=c.net_init,
        help="MLP init: torch.nn.Linear's, or JAX's lecun_normal weights with zero biases",
    )
    p.add_argument(
        "--point-bound",
        type=V.nonnegative_float,
        default=0.0,
        help="keep the learned points in (-R, R)^2 by x = R tanh(z / R) (0: unbounded)",
    )


def _tasks(a) -> tuple[str, ...]:
    tasks = tuple(dict.fromkeys(task_name(*parse_task(t)) for t in a.tasks.split(",") if t.strip()))
    if not tasks:
        raise ValueError("rings: --tasks is empty")
    return tasks


def check_arguments(a) -> None:
    _tasks(a)


def main(a, progress_factory=None, console=None) -> dict:
    tasks = _tasks(a)
    cfg = Config(
        tasks=tasks,
        steps=a.steps,
        per_class=a.per_class,
        hidden=a.hidden,
        inner_lr=a.inner_lr,
        outer_lr=a.outer_lr,
        reference_lr=a.reference_lr,
        unroll=a.unroll,
        label_scale=a.label_scale,
        label_lr=a.label_lr if a.label_lr > 0 else None,
        point_init=a.point_init,
        point_scale=a.point_scale,
        net_init=a.net_init,
        point_bound=a.point_bound if a.point_bound > 0 else None,
        seed=a.seed,
        device=a.device,
        dtype=a.dtype,
    )
    return run(cfg, Path(a.out), progress_factory, console)


def run(cfg: Config, out: Path, progress_factory=None, console=None) -> dict:
    """Run the tasks; a task finished by an earlier run with the same settings is read from
    ``out/parts/<task>.json`` instead of re-run (its figure is already in ``out``)."""
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"experiment": NAME, "config": asdict(cfg), "tasks": {}}
    settings = {k: v for k, v in asdict(cfg).items() if k != "tasks"}
    for task in cfg.tasks:
        part, key = out / "parts" / f"{task}.json", {**settings, "task": task}
        res = load_part(part, key)
        resumed = res is not None and (out / f"rings_{task}.png").exists()
        if not resumed:
            res = run_task(cfg, task, progress_factory(task, cfg.steps) if progress_factory else None)
            _plot(res, out / f"rings_{task}.png")
            res.pop("_models")
            save_part(part, key, res)
        doc["tasks"][task] = {**res, "resumed": resumed}
    first = doc["tasks"][cfg.tasks[0]]
    # numbers only under "metrics" (the first task's); which task they are is a top-level field
    doc["metrics_task"] = cfg.tasks[0]
    doc["metrics"] = {k: {m: first[k][m] for m in ("val_loss", "val_accuracy")} for k in ("reference", "warm", "cold")}
    atomic_write_json(out / "results.json", doc, indent=1)
    _print(doc, console)
    return doc


def _print(doc: dict, console) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title="rings distillation: validation (original data) loss / accuracy")
    for c in ("task", "reference", "warm (joint)", "cold (re-trained on final points)", "label classes over training"):
        t.add_column(c, justify="right")
    for task, r in doc["tasks"].items():
        cell = lambda m: f"{m['val_loss']:.3f} / {100 * m['val_accuracy']:.1f}%"  # noqa: E731
        paths = r["points"].get("label_path")
        t.add_row(
            task,
            cell(r["reference"]),
            cell(r["warm"]) + ("" if r["warm"]["status"] == "ok" else " (diverged)"),
            cell(r["cold"]),
            "; ".join("->".join(map(str, q)) for q in paths) if paths else "-",
        )
    console.print(t)


def _plot(res: dict, path: Path) -> None:
    import numpy as np
    from matplotlib.figure import Figure

    models = res["_models"]
    xv, yv = (t.cpu() for t in models["data"])
    lim = float(xv.abs().max()) + 0.5
    g = torch.linspace(-lim, lim, 150)
    G1, G2 = torch.meshgrid(g, g, indexing="xy")
    grid = torch.stack([G1.reshape(-1), G2.reshape(-1)], 1)
    fig = Figure(figsize=(15, 4.6))
    cmap = "coolwarm" if res["num_classes"] == 2 else "viridis"
    for i, name in enumerate(("reference", "warm", "cold")):
        ax = fig.add_subplot(1, 3, i + 1)
        p = {k: v.detach().cpu().to(grid.dtype) for k, v in models[name].items()}
        with torch.no_grad():
            pred = mlp_forward(p, grid).argmax(1).reshape(G1.shape)
        ax.contourf(
            G1.numpy(), G2.numpy(), pred.numpy(), levels=np.arange(res["num_classes"] + 1) - 0.5, cmap=cmap, alpha=0.3
        )
        ax.scatter(xv[:, 0], xv[:, 1], c=yv, cmap=cmap, s=6, alpha=0.6)
        if name != "reference":
            traj = np.array(res["points"]["trajectory"])  # (T, n, 2)
            for j in range(traj.shape[1]):
                if name == "warm":
                    if res["soft_labels"] and res["points"]["soft_labels"]:
                        lab = np.array(res["points"]["soft_labels"])[:, j]  # (T, C)
                        colors = lab[:, :3] if lab.shape[1] >= 3 else np.c_[lab, np.zeros(len(lab))]
                        ax.scatter(traj[:, j, 0], traj[:, j, 1], c=np.clip(colors, 0, 1), s=4)
                    else:
                        ax.plot(traj[:, j, 0], traj[:, j, 1], "-", lw=1, color="k")
                ax.scatter(traj[-1, j, 0], traj[-1, j, 1], marker="*", s=160, color="k", edgecolor="w")
        m = res[name]
        ax.set_title(f"{name}: val loss {m['val_loss']:.3f}, acc {100 * m['val_accuracy']:.0f}%", fontsize=9)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")  # noqa: E702
    fig.suptitle(f"rings {res['task']}: reference, warm-start trajectory of the learned points, cold-start re-training")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
