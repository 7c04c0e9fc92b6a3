"""One-pass overhead of the front door (issue 25): ``bilevel.Tuner`` against the plain PyTorch loop.

Three measurements, each on one torch thread, with the runs compared alternating (plain, variant,
plain, variant, ... with the order of each pair flipped every other time) and reported as medians of
per-pair ratios, beside the load average (``os.getloadavg``) of the machine:

``digits`` (default)
    The 2-conv CNN (Conv(1, 8, 3)-ReLU-Conv(8, 16, 3)-ReLU-Flatten-Linear, padding 1) on 1,000
    scikit-learn digits (the split of ``examples/tune_cnn_digits.py``: 1,000 train, 400 validation,
    the last 397 test), batches of 64, 10 epochs, SGD from lr 3e-3, momentum 0.5, weight decay 1e-4,
    seeds 0-2. The plain loop is ``for x, y in loader: opt.zero_grad(); F.cross_entropy(model(x),
    y).backward(); opt.step()`` with ``torch.optim.SGD``; each variant is ``bilevel.Tuner`` on the same
    model, start and batches (tuning lr, momentum and weight decay, ``mode="ift"``), or with
    ``mode="none"`` (the adapter alone). Prints the time ratio (process CPU time and wall time) and
    the test accuracy / validation loss of both.
``breakdown``
    Where the Tuner's time goes: the weight step (data, gradient, update rule, checks) and the
    hyperparameter step (training gradient with ``create_graph``, the update map's graph, the
    validation loss and gradient, each Neumann product, AutoNeumann's power iteration on the first
    call, the ``x^T dr/dlambda`` product, the hyper-optimiser, the rest), by thread CPU timers around
    the pieces of ``tuner.loop.hypergradient`` (wrapped on the instance, nothing in ``bilevel`` is
    changed), for several model widths and look-backs, and the overhead these predict for each T.
``clarke``
    Clarke et al.'s population (``bilevel run clarke``'s own ``run_method``, in this process) for
    ``random`` and ``ours-wd-lr-m`` alternating, one pair per variant and repeat: median final test loss and
    ``ours-wd-lr-m``'s CPU time and loop wall time over ``random``'s; with ``--same-data`` also over the
    plain population on the training split alone (``random`` trains on training + validation rows).

Usage::

    python benchmarks/overhead.py                                   # the default against plain, seeds 0-2
    python benchmarks/overhead.py --interval 40 --hyper-lr 0.2      # one variant
    python benchmarks/overhead.py --none --frontier --repeats 5 --json benchmarks/results/overhead-digits.json
    python benchmarks/overhead.py --breakdown --widths 1,4 --lookbacks 1,5,10
    python benchmarks/overhead.py --problem clarke --dataset energy --inits 20 --steps 4000 --frontier --same-data
    python benchmarks/overhead.py --plot-only --figure docs/img/overhead-frontier.png --figure-from A.json ...

A variant is ``--variant "T=40,i=2,hlr=0.2,vb=50,solver=S,mode=ift|none,opt=bilevel|torch,adaptive=M"`` (M > 0:
``bilevel.loop.Adaptive(T, max_interval=M)``, a step every T weight steps while the hyperparameters move, up to M
apart once they settle) with S one of
neumann, neumann-alpha1, identity, cg (repeatable; unnamed keys keep the front door's defaults), or the
single one given by ``--interval``, ``--lookback``, ``--solver``, ``--val-batch``, ``--hyper-lr``;
``--none`` adds the Tuner with ``mode="none"`` (with the user's ``torch.optim.SGD``, and with the
differentiable twin that a tuned run steps); ``--frontier`` adds the issue's grid.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bilevel

DEFAULT_HYPER_LR = 0.05  # bilevel.Tuner's default (Clarke et al.)
DEFAULT_INTERVAL = 10
DEFAULT_LOOKBACK = 5
SOLVERS = ("neumann", "neumann-alpha1", "identity", "cg")


# --------------------------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """One configuration of the front door (the defaults are ``bilevel.Tuner``'s)."""

    mode: str = "ift"  # "ift" (tuned) or "none" (the adapter alone)
    interval: int = DEFAULT_INTERVAL  # T
    lookback: int = DEFAULT_LOOKBACK  # i: Neumann steps (CG iterations for solver="cg")
    # "neumann": the Tuner's default AutoNeumann(i) (alpha by 20 power-iteration products on the first call, capped
    # at 1); "neumann-alpha1": Neumann(i, alpha=1) (Clarke et al.'s, OnlineTuner's default: no power iteration);
    # "identity": J^-1 ~ I; "cg": ConjugateGradient(i)
    solver: str = "neumann"
    hyper_lr: float = DEFAULT_HYPER_LR
    val_batch: int = 200  # validation examples per hyperparameter step (the val loader's batch size)
    optimizer: str = "bilevel"  # "bilevel": bilevel.optim.SGD; "torch": torch.optim.SGD (mode "none": steps it)
    adaptive: int = 0  # > 0: bilevel.loop.Adaptive(T, max_interval=adaptive) instead of Every(T)
    name: str = ""

    def __post_init__(self) -> None:
        if self.mode not in ("ift", "none"):
            raise ValueError(f"mode must be 'ift' or 'none', got {self.mode!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.optimizer not in ("bilevel", "torch"):
            raise ValueError(f"optimizer must be 'bilevel' or 'torch', got {self.optimizer!r}")
        if self.interval < 1 or self.lookback < 0 or self.val_batch < 1 or not self.hyper_lr > 0:
            raise ValueError(f"invalid variant {self}")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.mode == "none":
            return "none (torch.optim.SGD)" if self.optimizer == "torch" else "none (bilevel.optim.SGD twin)"
        solver = {
            "neumann": f"i={self.lookback}",
            "neumann-alpha1": f"i={self.lookback} alpha=1",
            "identity": "identity",
            "cg": f"cg{self.lookback}",
        }[self.solver]
        when = f"T={self.interval}..{self.adaptive}" if self.adaptive else f"T={self.interval}"
        return f"{when} {solver} hlr={self.hyper_lr:.3g} vb={self.val_batch}"

    def solver_object(self) -> Any:
        """The solver of ``bilevel.Tuner(strategy=IFT(...))``: ``None`` for its default ``AutoNeumann(lookback)``."""
        if self.solver == "identity":
            return bilevel.Identity()
        if self.solver == "cg":
            return bilevel.ConjugateGradient(self.lookback)
        if self.solver == "neumann-alpha1":
            return bilevel.Neumann(self.lookback, alpha=1.0, divergence="ignore")
        return None

    def tuner_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``bilevel.Tuner`` for this variant (besides model, loss and optimiser)."""
        solver = self.solver_object()
        when = bilevel.loop.Adaptive(self.interval, max_interval=self.adaptive) if self.adaptive else self.interval
        how = bilevel.strategies.IFT(solver) if self.mode == "ift" and solver is not None else self.mode
        return dict(
            tune=("lr", "momentum", "weight_decay") if self.mode == "ift" else None,
            schedule=when,
            lookback=self.lookback,
            strategy=how,
            hyper_lr=self.hyper_lr,
            progress=False,
        )

    def cli_flags(self) -> str:
        """The ``bilevel run clarke`` flags (its solver is Neumann(i, alpha=1), i = 0 the identity)."""
        i = 0 if self.solver == "identity" else self.lookback
        adaptive = f" --max-interval {self.adaptive}" if self.adaptive else ""
        return f"--interval {self.interval} --lookback {i} --hyper-lr {self.hyper_lr:g}{adaptive}"


def parse_variant(spec: str) -> Variant:
    """``"T=40,i=2,hlr=0.2,vb=50,solver=cg,mode=ift,opt=torch,name=..."`` -> :class:`Variant`."""
    keys = {
        "t": ("interval", int),
        "interval": ("interval", int),
        "i": ("lookback", int),
        "lookback": ("lookback", int),
        "hlr": ("hyper_lr", float),
        "hyper_lr": ("hyper_lr", float),
        "vb": ("val_batch", int),
        "val_batch": ("val_batch", int),
        "solver": ("solver", str),
        "mode": ("mode", str),
        "opt": ("optimizer", str),
        "adaptive": ("adaptive", int),
        "name": ("name", str),
    }
    kw: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        k, _, v = part.partition("=")
        if k.strip().lower() not in keys:
            raise ValueError(f"unknown key {k!r} in variant {spec!r}; known: {', '.join(keys)}")
        field_name, kind = keys[k.strip().lower()]
        kw[field_name] = kind(v.strip())
    return Variant(**kw)


def none_variants() -> list[Variant]:
    return [Variant(mode="none", optimizer="torch"), Variant(mode="none", optimizer="bilevel")]


def frontier(val_batch_small: int = 50) -> list[Variant]:
    """The issue's grid: T in {10, 20, 40, 80} with hyper_lr x sqrt(T/10) and x T/10, look-back 5, 2, 1 and
    the identity at T = 10, and a smaller validation batch."""
    out = [Variant(name="default")]
    for t in (20, 40, 80):
        out.append(Variant(interval=t, hyper_lr=DEFAULT_HYPER_LR * math.sqrt(t / 10), name=f"T={t} hlr x sqrt"))
        out.append(Variant(interval=t, hyper_lr=DEFAULT_HYPER_LR * t / 10, name=f"T={t} hlr x T/10"))
    for i in (2, 1):
        out.append(Variant(lookback=i, name=f"i={i}"))
    out.append(Variant(solver="identity", lookback=0, name="identity"))
    out.append(Variant(val_batch=val_batch_small, name=f"vb={val_batch_small}"))
    return out


# --------------------------------------------------------------------------------------------- measuring


def load() -> tuple[float, float, float]:
    return os.getloadavg()


def clocks() -> tuple[float, float]:
    return time.process_time(), time.perf_counter()


def summary(xs: Sequence[float]) -> dict[str, float]:
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "min": xs[0], "max": xs[-1], "n": len(xs)}


# --------------------------------------------------------------------------------------------- the digits CNN


@dataclass
class DigitsConfig:
    epochs: int = 10
    n_train: int = 1000
    batch: int = 64
    lr: float = 3e-3
    momentum: float = 0.5
    weight_decay: float = 1e-4
    width: int = 1


_DIGITS: tuple[torch.Tensor, torch.Tensor] | None = None


def digits(seed: int, n_train: int = 1000) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``examples/tune_cnn_digits.py``'s split for ``seed``: train ``[:n_train]``, val 1000:1400, test 1400:."""
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        _DIGITS = torch.tensor(X, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16, torch.tensor(y)
    X, y = _DIGITS
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    return {"train": (X[:n_train], y[:n_train]), "val": (X[1000:1400], y[1000:1400]), "test": (X[1400:], y[1400:])}


def cnn(width: int = 1) -> nn.Module:
    """Conv(1, 8w, 3)-ReLU-Conv(8w, 16w, 3)-ReLU-Flatten-Linear(16w * 64, 10) on 8 x 8 digits (padding 1)."""
    c1, c2 = 8 * width, 16 * width
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c2 * 64, 10),
    )


@torch.no_grad()
def quality(model: nn.Module, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    model.eval()
    out = {}
    for name in ("val", "test"):
        x, y = data[name]
        logits = model(x)
        out[f"{name}_loss"] = float(F.cross_entropy(logits, y))
        out[f"{name}_acc"] = float((logits.argmax(1) == y).float().mean())
    model.train()
    return out


def plain_run(data: dict, seed: int, cfg: DigitsConfig, timers: dict[str, list[float]] | None = None) -> dict:
    """The plain PyTorch loop; ``timers`` (optional): thread CPU time of data / forward+backward / step."""
    torch.manual_seed(seed)  # the same initial weights and shuffles as the Tuner's run
    model = cnn(cfg.width)
    train = DataLoader(TensorDataset(*data["train"]), batch_size=cfg.batch, shuffle=True)
    c0, w0 = clocks()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if timers is None:
        for _ in range(cfg.epochs):
            for x, y in train:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
    else:
        tt = time.thread_time
        for _ in range(cfg.epochs):
            it = iter(train)
            while True:
                t0 = tt()
                try:
                    x, y = next(it)
                except StopIteration:
                    break
                t1 = tt()
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                t2 = tt()
                opt.step()
                t3 = tt()
                timers.setdefault("data", []).append(t1 - t0)
                timers.setdefault("forward + backward", []).append(t2 - t1)
                timers.setdefault("optimiser step", []).append(t3 - t2)
    c1, w1 = clocks()
    return {"cpu": c1 - c0, "wall": w1 - w0, **quality(model, data)}


def make_tuner(model: nn.Module, variant: Variant, cfg: DigitsConfig) -> bilevel.Tuner:
    """``bilevel.Tuner`` for ``variant`` on ``model`` with the SGD start of ``cfg``."""
    if variant.optimizer == "torch":
        opt: Any = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = bilevel.optim.SGD(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return bilevel.Tuner(model, loss_fn=F.cross_entropy, optimizer=opt, **variant.tuner_kwargs())


def tuner_run(
    data: dict, seed: int, variant: Variant, cfg: DigitsConfig, instrument: Callable[[bilevel.Tuner], Any] | None = None
) -> dict:
    torch.manual_seed(seed)
    model = cnn(cfg.width)
    train = DataLoader(TensorDataset(*data["train"]), batch_size=cfg.batch, shuffle=True)
    val = DataLoader(TensorDataset(*data["val"]), batch_size=variant.val_batch)
    c0, w0 = clocks()
    tuner = make_tuner(model, variant, cfg)
    if instrument is not None:
        instrument(tuner)
    tuner.fit(train, val, epochs=cfg.epochs)
    c1, w1 = clocks()
    out = {"cpu": c1 - c0, "wall": w1 - w0, **quality(model, data), "tuner_val_loss": tuner.history[-1]["val_loss"]}
    out["hparams"] = {k: v for k, v in tuner.hparams.items() if isinstance(v, float)}
    out["hyper_steps"] = tuner.loop.t // variant.interval if variant.mode == "ift" else 0
    alpha = getattr(tuner.loop.solver, "alpha", None)
    out["neumann_alpha"] = alpha
    out["neumann_refreshes"] = getattr(tuner.loop.solver, "refreshes", None)
    return out


def compare_digits(variants: list[Variant], seeds: list[int], repeats: int, cfg: DigitsConfig) -> dict:
    """Alternating pairs (plain, variant) for every repeat, seed and variant; the order in a pair flips."""
    data = {s: digits(s, cfg.n_train) for s in seeds}
    warm = replace(cfg, epochs=1)
    plain_run(data[seeds[0]], seeds[0], warm)
    for v in variants:
        tuner_run(data[seeds[0]], seeds[0], v, warm)
    pairs: dict[str, list[dict]] = {v.label: [] for v in variants}
    runs: dict[str, dict[int, dict]] = {v.label: {} for v in variants}
    plain: dict[int, dict] = {}
    deterministic = True
    print(f"load average at start {load()}", flush=True)
    for r in range(repeats):
        for s in seeds:
            for k, v in enumerate(variants):
                first_plain = (r + k) % 2 == 0
                la = load()
                if first_plain:
                    p = plain_run(data[s], s, cfg)
                    t = tuner_run(data[s], s, v, cfg)
                else:
                    t = tuner_run(data[s], s, v, cfg)
                    p = plain_run(data[s], s, cfg)
                for store, res in ((plain, p), (runs[v.label], t)):
                    old = store.get(s)
                    if old is None:
                        store[s] = res
                    elif old["test_acc"] != res["test_acc"] or old["val_loss"] != res["val_loss"]:
                        deterministic = False
                pairs[v.label].append(
                    {
                        "repeat": r,
                        "seed": s,
                        "plain_first": first_plain,
                        "plain_cpu": p["cpu"],
                        "plain_wall": p["wall"],
                        "cpu": t["cpu"],
                        "wall": t["wall"],
                        "ratio_cpu": t["cpu"] / p["cpu"],
                        "ratio_wall": t["wall"] / p["wall"],
                        "load": la,
                    }
                )
            print(f"repeat {r} seed {s} done, load {load()}", flush=True)
    rows = []
    for v in variants:
        ps = pairs[v.label]
        res = runs[v.label]
        gain = [res[s]["test_acc"] - plain[s]["test_acc"] for s in seeds]
        dval = [res[s]["val_loss"] - plain[s]["val_loss"] for s in seeds]
        rows.append(
            {
                "variant": asdict(v),
                "label": v.label,
                "ratio_cpu": summary([x["ratio_cpu"] for x in ps]),
                "ratio_wall": summary([x["ratio_wall"] for x in ps]),
                "cpu_s": statistics.median(x["cpu"] for x in ps),
                "plain_cpu_s": statistics.median(x["plain_cpu"] for x in ps),
                "test_acc": {s: res[s]["test_acc"] for s in seeds},
                "val_loss": {s: res[s]["val_loss"] for s in seeds},
                "test_loss": {s: res[s]["test_loss"] for s in seeds},
                "gain_test_acc": {"mean": statistics.mean(gain), "per_seed": gain},
                "delta_val_loss": {"mean": statistics.mean(dval), "per_seed": dval},
                "hparams": {s: res[s]["hparams"] for s in seeds},
                "neumann_alpha": {s: res[s]["neumann_alpha"] for s in seeds},
                "hyper_steps": res[seeds[0]]["hyper_steps"],
            }
        )
    return {
        "problem": "digits-cnn",
        "config": asdict(cfg),
        "seeds": seeds,
        "repeats": repeats,
        "deterministic": deterministic,
        "plain": {s: {k: plain[s][k] for k in ("test_acc", "val_loss", "test_loss")} for s in seeds},
        "rows": rows,
        "pairs": pairs,
    }


def print_digits(doc: dict) -> None:
    seeds = doc["seeds"]
    pl = doc["plain"]
    acc = " ".join(f"{pl[s]['test_acc']:.4f}" for s in seeds)
    val = " ".join(f"{pl[s]['val_loss']:.3f}" for s in seeds)
    print(f"\nplain loop: test accuracy (seeds {seeds}) {acc}; val loss {val}")
    hdr = f"{'variant':34s} {'x plain (CPU)':>22s} {'x plain (wall)':>15s}  test accuracy per seed  gain    val loss"
    print(hdr)
    for row in doc["rows"]:
        r, w = row["ratio_cpu"], row["ratio_wall"]
        accs = " ".join(f"{row['test_acc'][s]:.4f}" for s in seeds)
        vals = " ".join(f"{row['val_loss'][s]:.3f}" for s in seeds)
        print(
            f"{row['label']:34s} {r['median']:6.2f} [{r['q1']:.2f}, {r['q3']:.2f}] n={r['n']:<3d} {w['median']:12.2f}"
            f"   {accs}  {row['gain_test_acc']['mean']:+.3f}  {vals}"
        )
    print(f"(deterministic across repeats: {doc['deterministic']})")


# --------------------------------------------------------------------------------------------- breakdown


class Timers:
    """Thread CPU time per named piece, and counts."""

    def __init__(self) -> None:
        self.t: dict[str, list[float]] = {}

    def add(self, name: str, dt: float) -> None:
        self.t.setdefault(name, []).append(dt)

    def total(self, name: str) -> float:
        return sum(self.t.get(name, []))

    def count(self, name: str) -> int:
        return len(self.t.get(name, []))


def instrument(tuner: bilevel.Tuner, timers: Timers) -> None:
    """Wrap the pieces of ``tuner.loop``'s weight and hyperparameter steps with thread-CPU timers (instance
    attributes: the loop calls ``self.hyper_step``, ``self.solver``, ``self.training_gradient``, ...)."""
    loop = tuner.loop
    tt = time.thread_time
    ctx: dict[str, Any] = {"hyper": False, "power": False, "residual_end": None}

    def wrap(obj: Any, name: str, label: Callable[[tuple, dict], str | None]) -> None:
        orig = getattr(obj, name)

        def inner(*a: Any, **k: Any) -> Any:
            t0 = tt()
            try:
                return orig(*a, **k)
            finally:
                key = label(a, k)
                if key is not None:
                    timers.add(key, tt() - t0)

        setattr(obj, name, inner)

    orig_hyper = loop.hyper_step

    def hyper_step(*a: Any, **k: Any) -> Any:
        ctx["hyper"] = True
        t0 = tt()
        try:
            return orig_hyper(*a, **k)
        finally:
            timers.add("hyper step (total)", tt() - t0)
            ctx["hyper"] = False

    loop.hyper_step = hyper_step
    wrap(loop, "weight_step", lambda a, k: "weight step (total)")
    wrap(loop, "_nonfinite", lambda a, k: None if ctx["hyper"] else "ws: finiteness checks")
    wrap(
        loop,
        "training_gradient",
        lambda a, k: "hs: training gradient, create_graph" if ctx["hyper"] else "ws: forward + backward",
    )
    orig_rule = loop.apply_rule

    def apply_rule(*a: Any, **k: Any) -> Any:
        t0 = tt()
        out = orig_rule(*a, **k)
        t1 = tt()
        timers.add("hs: update rule u(lambda, w), in the graph" if ctx["hyper"] else "ws: update rule (twin)", t1 - t0)
        if ctx["hyper"]:
            ctx["residual_end"] = t1
        return out

    loop.apply_rule = apply_rule
    wrap(loop, "apply_hypergradient", lambda a, k: "hs: hyper-optimiser step (Adam)")
    wrap(tuner, "evaluate", lambda a, k: "end-of-epoch validation (history)")
    wrap(tuner._train_cursor, "next", lambda a, k: "ws: next training batch")
    wrap(tuner._val_cursor, "next", lambda a, k: "hs: next validation batch")
    solver = loop.solver
    if hasattr(solver, "_estimate"):  # AutoNeumann's power iteration (first call, and on a refresh)
        orig_est = solver._estimate

        def estimate(*a: Any, **k: Any) -> Any:
            ctx["power"] = True
            t0 = tt()
            try:
                return orig_est(*a, **k)
            finally:
                timers.add("hs: AutoNeumann power iteration (20 products)", tt() - t0)
                ctx["power"] = False

        solver._estimate = estimate

    class TimedSolver:
        damping = getattr(solver, "damping", 0.0)

        def __call__(self, op: Any, v: Any) -> Any:
            t0 = tt()
            if ctx["residual_end"] is not None:
                timers.add("hs: validation loss + gradient (+ checks)", t0 - ctx["residual_end"])
            wrap(op, "rmatvec", lambda a, k: None if ctx["power"] else "hs: Neumann / CG product")
            wrap(op, "hparam_vjp", lambda a, k: "hs: x^T dr/dlambda product")
            try:
                return solver(op, v)
            finally:
                timers.add("hs: solver (total)", tt() - t0)

    loop.solver = TimedSolver()


def breakdown(widths: list[int], lookbacks: list[int], seed: int, repeats: int, cfg: DigitsConfig) -> dict:
    """Per (width, look-back): ``repeats`` alternating pairs of an instrumented plain loop and an instrumented
    default Tuner (T = 10); the medians over the pairs of each piece's time per occurrence (ms)."""
    data = digits(seed, cfg.n_train)
    out = []
    print(f"load average at start {load()}", flush=True)
    for width in widths:
        wcfg = replace(cfg, width=width)
        n_weights = sum(p.numel() for p in cnn(width).parameters())
        for i in lookbacks:
            variant = Variant(lookback=i)
            plain_run(data, seed, replace(wcfg, epochs=1))
            tuner_run(data, seed, variant, replace(wcfg, epochs=1))
            per: list[dict[str, float]] = []
            loads = []
            for r in range(repeats):
                pt: dict[str, list[float]] = {}
                tm = Timers()
                loads.append(load())
                for o in (0, 1) if r % 2 == 0 else (1, 0):
                    if o == 0:
                        p = plain_run(data, seed, wcfg, timers=pt)
                    else:
                        t = tuner_run(data, seed, variant, wcfg, instrument=lambda tu, tm=tm: instrument(tu, tm))
                per.append(_breakdown_metrics(p, pt, t, tm, cfg.epochs))
            med = {k: statistics.median(x[k] for x in per) for k in per[0]}
            med.update(width=width, weights=n_weights, lookback=i, loads=loads)
            out.append(med)
            print_breakdown_row(med)
    return {"problem": "digits-cnn breakdown", "config": asdict(cfg), "seed": seed, "repeats": repeats, "rows": out}


def _breakdown_metrics(p: dict, pt: dict[str, list[float]], t: dict, tm: Timers, epochs: int) -> dict[str, float]:
    steps = len(pt["data"])
    hs = tm.count("hyper step (total)")
    ms = lambda name: 1e3 * tm.total(name)  # noqa: E731  (the run's total, ms)
    m: dict[str, float] = {
        "steps": steps,
        "hyper steps": hs,
        "products": tm.count("hs: Neumann / CG product"),
        "power iterations": tm.count("hs: AutoNeumann power iteration (20 products)"),
        "plain run ms": 1e3 * p["cpu"],
        "tuner run ms": 1e3 * t["cpu"],
        "plain step ms": 1e3 * p["cpu"] / steps,
        "plain: data ms/step": 1e3 * sum(pt["data"]) / steps,
        "plain: forward + backward ms/step": 1e3 * sum(pt["forward + backward"]) / steps,
        "plain: optimiser step ms/step": 1e3 * sum(pt["optimiser step"]) / steps,
        "ws: total ms/step": (ms("weight step (total)") + ms("ws: next training batch")) / steps,
        "ws: next training batch ms/step": ms("ws: next training batch") / steps,
        "ws: forward + backward ms/step": ms("ws: forward + backward") / steps,
        "ws: update rule (twin) ms/step": ms("ws: update rule (twin)") / steps,
        "ws: finiteness checks ms/step": ms("ws: finiteness checks") / steps,
    }
    m["ws: rest ms/step"] = m["ws: total ms/step"] - sum(
        m[f"ws: {k} ms/step"]
        for k in ("next training batch", "forward + backward", "update rule (twin)", "finiteness checks")
    )
    power = ms("hs: AutoNeumann power iteration (20 products)")
    products = ms("hs: Neumann / CG product")
    hs_total = ms("hyper step (total)")
    solver = ms("hs: solver (total)")
    parts = {
        "next validation batch": ms("hs: next validation batch"),
        "training gradient, create_graph": ms("hs: training gradient, create_graph"),
        "update rule u(lambda, w), in the graph": ms("hs: update rule u(lambda, w), in the graph"),
        "validation loss + gradient (+ checks)": ms("hs: validation loss + gradient (+ checks)"),
        "products (Neumann / CG)": products,
        "solver vector arithmetic and checks": solver - products - power,
        "x^T dr/dlambda product": ms("hs: x^T dr/dlambda product"),
        "hyper-optimiser step (Adam)": ms("hs: hyper-optimiser step (Adam)"),
    }
    parts["rest (Python: closures, natural values, dicts)"] = (
        hs_total + parts["next validation batch"] - power - sum(parts.values())
    )
    for k, v in parts.items():
        m[f"hs: {k} ms/step"] = v / max(1, hs)
    m["hs: one product ms"] = products / max(1, m["products"])
    m["hs: total without power iteration ms/step"] = (hs_total + parts["next validation batch"] - power) / max(1, hs)
    m["power iteration ms (once per run)"] = power
    m["end-of-epoch validation ms/epoch"] = ms("end-of-epoch validation (history)") / epochs
    m["other (loop, callbacks, construction) ms/run"] = (
        m["tuner run ms"]
        - m["ws: total ms/step"] * steps
        - (hs_total + parts["next validation batch"])
        - ms("end-of-epoch validation (history)")
    )
    # what these pieces predict for T (the same run, floor(steps / T) hyperparameter steps, one power iteration)
    base = (
        m["ws: total ms/step"] * steps
        + ms("end-of-epoch validation (history)")
        + m["other (loop, callbacks, construction) ms/run"]
    )
    for T in (10, 20, 40, 80):
        n = steps // T
        m[f"predicted x plain, T={T}"] = (
            base + n * m["hs: total without power iteration ms/step"] + (power if n else 0.0)
        ) / m["plain run ms"]
    m["measured x plain, T=10"] = t["cpu"] / p["cpu"]
    return m


def print_breakdown_row(m: dict) -> None:
    print(
        f"\nwidth {m['width']} ({m['weights']:.0f} weights), lookback {m['lookback']}: {m['steps']:.0f} weight steps, "
        f"{m['hyper steps']:.0f} hyperparameter steps, {m['products']:.0f} products; loads {m['loads']}"
    )
    for k, v in m.items():
        if isinstance(v, float) and k not in ("width", "weights", "lookback", "steps", "hyper steps", "products"):
            print(f"  {k:58s} {v:10.3f}")


# --------------------------------------------------------------------------------------------- clarke


def clarke_config(dataset: str, inits: int, steps: int, v: Variant, data_dir: str | None) -> Any:
    """``bilevel run clarke``'s configuration for these flags (its own parser and ``config_from_args``)."""
    from bilevel_studies.clarke import clarke as C

    p = argparse.ArgumentParser()
    C.add_arguments(p)
    flags = ["--dataset", dataset, "--inits", str(inits), "--steps", str(steps), *v.cli_flags().split()]
    a = p.parse_args(flags)
    a.seed, a.data_dir, a.device, a.dtype = 0, data_dir, "cpu", "float32"
    return C.config_from_args(a)


#: the plain loop of Clarke's problem on the *same* data as ours-wd-lr-m: ``random``'s fixed hyperparameters,
#: trained on the training split alone (``random`` trains on training + validation, as the paper's Random does)
SAME_DATA = "random on the training split"


def compare_clarke(
    variants: list[Variant],
    dataset: str,
    inits: int,
    steps: int,
    data_dir: str | None,
    same_data: bool = False,
    repeats: int = 1,
) -> dict:
    """Alternating pairs (random, ours-wd-lr-m), one per variant and repeat, through the command's ``run_method``;
    with ``same_data`` triples, the third run ``random``'s population on the training split alone (the plain loop
    on the data ours-wd-lr-m trains on). The order rotates from one variant to the next and reverses every other
    time. Test losses come from the first repeat (the runs are deterministic)."""
    from bilevel.allocator import keep_freed_memory
    from bilevel_studies.clarke.config import Method
    from bilevel_studies.clarke.problem import load_problem
    from bilevel_studies.clarke.running import run_method

    keep_freed_memory()  # as every bilevel command does
    for v in variants:
        if v.solver == "cg" or v.val_batch != 200 or v.mode != "ift":
            raise ValueError(f"{v.label}: the clarke command has no such option (solver cg, val batch, mode none)")
    methods: dict[str, Any] = {"random": "random", "ours-wd-lr-m": "ours-wd-lr-m"}
    if same_data:
        methods[SAME_DATA] = Method(mode="none", tuned=(), merge_train_val=False)
    problem = load_problem(clarke_config(dataset, inits, steps, variants[0], data_dir))
    warm = clarke_config(dataset, inits, 2 * variants[0].interval, variants[0], data_dir)
    for m in methods.values():  # first calls (autograd's double backward, allocator) not timed
        run_method(warm, problem, m)
    print(f"load average at start {load()}", flush=True)
    names = list(methods)
    pairs: dict[str, list[dict]] = {v.label: [] for v in variants}
    results: dict[str, dict] = {}
    n = 0
    for r in range(repeats):
        for v in variants:
            cfg = clarke_config(dataset, inits, steps, v, data_dir)
            res: dict[str, Any] = {}
            la = load()
            order = names[n % len(names) :] + names[: n % len(names)]
            order = order if n % 2 == 0 else order[::-1]
            n += 1
            for name in order:
                c0, w0 = clocks()
                out = run_method(cfg, problem, methods[name])
                c1, w1 = clocks()
                res[name] = {"cpu": c1 - c0, "wall": w1 - w0, "loop_wall": out["wall_seconds"]}
                results.setdefault(v.label, {}).setdefault(name, out)
            ours, rnd = res["ours-wd-lr-m"], res["random"]
            pair = {
                "repeat": r,
                "order": order,
                "ratio_cpu": ours["cpu"] / rnd["cpu"],
                "ratio_loop_wall": ours["loop_wall"] / rnd["loop_wall"],
                "seconds": res,
                "load_before": la,
                "load_after": load(),
            }
            same = ""
            if same_data:
                sd = res[SAME_DATA]
                pair["ratio_cpu_same_data"] = ours["cpu"] / sd["cpu"]
                pair["ratio_loop_wall_same_data"] = ours["loop_wall"] / sd["loop_wall"]
                same = f"; x {SAME_DATA}: CPU {pair['ratio_cpu_same_data']:.2f}"
            pairs[v.label].append(pair)
            print(
                f"repeat {r} {v.label:30s} x random: CPU {pair['ratio_cpu']:.2f}, loop wall "
                f"{pair['ratio_loop_wall']:.2f}{same}  load {la[0]:.2f} -> {pair['load_after'][0]:.2f}",
                flush=True,
            )
    rows = []
    for v in variants:
        ps, res = pairs[v.label], results[v.label]
        fin = [x for x in res["ours-wd-lr-m"]["final_test_loss"] if x is not None]
        rfin = [x for x in res["random"]["final_test_loss"] if x is not None]
        row = {
            "variant": asdict(v),
            "label": v.label,
            "command": f"bilevel run clarke --dataset {dataset} --methods random,ours-wd-lr-m --inits {inits} "
            f"--steps {steps} {v.cli_flags()} --threads 1 --out OUT",
            "median_test_loss": statistics.median(fin) if fin else math.nan,
            "test_loss_summary": summary(fin) if fin else None,
            "diverged": inits - len(fin),
            "random_median_test_loss": statistics.median(rfin) if rfin else math.nan,
            "ratio_cpu": statistics.median(p["ratio_cpu"] for p in ps),
            "ratio_cpu_all": [p["ratio_cpu"] for p in ps],
            "ratio_loop_wall": statistics.median(p["ratio_loop_wall"] for p in ps),
            "final_test_loss": res["ours-wd-lr-m"]["final_test_loss"],
            "final_val_loss": res["ours-wd-lr-m"]["final_val_loss"],
            "pairs": ps,
        }
        if same_data:
            row["ratio_cpu_same_data"] = statistics.median(p["ratio_cpu_same_data"] for p in ps)
            row["ratio_cpu_same_data_all"] = [p["ratio_cpu_same_data"] for p in ps]
            row["ratio_loop_wall_same_data"] = statistics.median(p["ratio_loop_wall_same_data"] for p in ps)
            sfin = [x for x in res[SAME_DATA]["final_test_loss"] if x is not None]
            row["same_data_median_test_loss"] = statistics.median(sfin) if sfin else math.nan
        rows.append(row)
    print(f"\n{dataset}, {inits} initialisations, {steps} steps; ratios: medians over {repeats} alternating run(s)")
    for row in rows:
        same = f"  x {SAME_DATA}: {row['ratio_cpu_same_data']:.2f}" if same_data else ""
        print(
            f"{row['label']:30s} median test loss {row['median_test_loss']:.4g} (random "
            f"{row['random_median_test_loss']:.4g}), diverged {row['diverged']}/{inits};  x random: CPU "
            f"{row['ratio_cpu']:.2f}, loop wall {row['ratio_loop_wall']:.2f}{same}"
        )
    return {
        "problem": f"clarke {dataset}",
        "inits": inits,
        "steps": steps,
        "same_data": same_data,
        "repeats": repeats,
        "rows": rows,
    }


# --------------------------------------------------------------------------------------------- figure


def figure(docs: list[dict], path: str) -> None:
    """Overhead against result, one panel per problem. A variant measured in several documents (same label)
    pools its pairs; a Clarke problem's results come from its longest run (the runs are deterministic) and its
    times from the runs with the same-data baseline (``--same-data``; others only when no such run exists)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems: dict[str, dict[str, dict]] = {}
    plain: dict[str, float] = {}
    floor: dict[str, list[float]] = {}  # mode="none" (the adapter alone)
    longest = {d["problem"]: max(x.get("steps", 0) for x in docs if x.get("problem") == d["problem"]) for d in docs}
    timed = {d["problem"] for d in docs if d.get("same_data")}
    for doc in docs:
        if not doc.get("rows") or "ratio_cpu" not in doc["rows"][0]:
            continue
        rows = problems.setdefault(doc["problem"], {})
        for row in doc["rows"]:
            if row["variant"]["mode"] != "ift":
                if doc["problem"] == "digits-cnn":
                    floor.setdefault(doc["problem"], []).extend(x["ratio_cpu"] for x in doc["pairs"][row["label"]])
                continue
            e = rows.setdefault(row["label"], {"ratios": [], "ys": None, "diverged": 0})
            if doc["problem"] == "digits-cnn":
                e["ratios"] += [x["ratio_cpu"] for x in doc["pairs"][row["label"]]]
                e["ys"] = list(row["val_loss"].values())
                plain[doc["problem"]] = statistics.mean(doc["plain"][k]["val_loss"] for k in doc["plain"])
                continue
            if doc.get("steps") == longest[doc["problem"]] and e["ys"] is None:
                e["ys"], e["diverged"] = [row["median_test_loss"]], row["diverged"]
            if doc.get("same_data"):
                e["ratios"] += row.get("ratio_cpu_same_data_all", [row.get("ratio_cpu_same_data")])
            elif doc["problem"] not in timed:
                e["ratios"] += row.get("ratio_cpu_all", [row["ratio_cpu"]])
    if not problems:
        return
    fig, axes = plt.subplots(1, len(problems), figsize=(6.4 * len(problems), 5.0), squeeze=False)
    for ax, (problem, rows) in zip(axes[0], problems.items()):
        for k, (label, r) in enumerate(sorted(rows.items())):
            if not r["ratios"] or r["ys"] is None:
                continue
            x = statistics.median(r["ratios"])
            y = statistics.mean(r["ys"])
            xerr = None
            if len(r["ratios"]) > 1:
                q = statistics.quantiles(r["ratios"], n=4, method="inclusive")
                xerr = [[x - q[0]], [q[2] - x]]
            ax.errorbar(x, y, xerr=xerr, fmt="o", capsize=2, ms=4, elinewidth=0.8)
            text = label + (f" ({r['diverged']} diverged)" if r["diverged"] else "")
            ax.annotate(text, (x, y), fontsize=6, xytext=(4, (-1) ** k * (3 + 4 * (k % 3))), textcoords="offset points")
        ax.axvline(1.3, color="red", ls="--", lw=0.8, label="1.3x")
        if problem == "digits-cnn":
            ax.axhline(plain[problem], color="grey", ls=":", label="plain loop (mean over seeds)")
            if floor.get(problem):
                ax.axvline(statistics.median(floor[problem]), color="grey", ls="-.", lw=0.8, label="mode='none'")
            ax.set_ylabel("final validation loss (mean over seeds 0-2)")
            ax.set_xlabel("time / plain PyTorch loop (CPU; median and IQR of pairs)")
        else:
            ax.set_ylabel("median final test loss (finite members)")
            what = "the plain loop on the same data" if problem in timed else "random's"
            ax.set_xlabel(f"ours-wd-lr-m CPU time / {what} (median, IQR)")
            ax.set_yscale("log")
        ax.set_title(problem)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"figure: {path}")


# --------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problem", choices=["digits", "clarke"], default="digits")
    ap.add_argument("--breakdown", action="store_true", help="(digits) where the time goes, instead of the ratios")
    ap.add_argument("--interval", type=int, default=None, help="T of the single variant")
    ap.add_argument("--lookback", type=int, default=None, help="i of the single variant")
    ap.add_argument("--solver", choices=SOLVERS, default=None, help="neumann: the Tuner's AutoNeumann (default)")
    ap.add_argument("--val-batch", type=int, default=None, help="validation examples per hyperparameter step")
    ap.add_argument("--hyper-lr", type=float, default=None)
    ap.add_argument("--variant", action="append", default=[], help="T=..,i=..,hlr=..,vb=..,solver=..,mode=..,opt=..")
    ap.add_argument("--none", action="store_true", help="also the Tuner with mode='none' (adapter alone)")
    ap.add_argument("--frontier", action="store_true", help="the issue's grid of variants")
    ap.add_argument("--no-default", action="store_true", help="leave out the single (default) variant")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--repeats", type=int, default=None, help="alternating pairs per seed and variant (3; clarke 1)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--widths", default="1", help="(breakdown) channel multipliers of the CNN")
    ap.add_argument("--lookbacks", default="5", help="(breakdown) look-backs")
    ap.add_argument("--dataset", default="energy", help="(clarke) data set")
    ap.add_argument("--inits", type=int, default=20, help="(clarke) initialisations")
    ap.add_argument("--steps", type=int, default=4000, help="(clarke) weight steps")
    ap.add_argument("--data-dir", default=None, help="(clarke) data directory (default $BILEVEL_DATA)")
    ap.add_argument(
        "--same-data", action="store_true", help=f"(clarke) also time {SAME_DATA!r}: the plain loop on ours' data"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write every measurement here")
    ap.add_argument("--figure", default=None, help="write a PNG of overhead against result (needs --json docs)")
    ap.add_argument("--figure-from", action="append", default=[], help="more JSON files to draw beside this run's")
    ap.add_argument("--plot-only", action="store_true", help="only draw --figure from the --figure-from files")
    a = ap.parse_args(argv)
    if a.plot_only:
        if not a.figure:
            ap.error("--plot-only needs --figure")
        figure([json.load(open(p)) for p in a.figure_from], a.figure)
        return {}
    torch.set_num_threads(a.threads)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    cfg = DigitsConfig(epochs=a.epochs)

    single = Variant(
        interval=a.interval if a.interval is not None else DEFAULT_INTERVAL,
        lookback=a.lookback if a.lookback is not None else DEFAULT_LOOKBACK,
        solver=a.solver or "neumann",
        val_batch=a.val_batch or 200,
        hyper_lr=a.hyper_lr if a.hyper_lr is not None else DEFAULT_HYPER_LR,
    )
    if single == Variant():
        single = replace(single, name="default")
    variants: list[Variant] = []
    if a.none:
        variants += none_variants()
    if not a.no_default and not a.frontier:
        variants.append(single)
    if a.frontier:
        variants += frontier()
    variants += [parse_variant(s) for s in a.variant]
    if a.problem == "clarke":  # the command has no mode none, CG or validation batch option (UCI: full batch)
        dropped = [v.label for v in variants if v.mode != "ift" or v.solver == "cg" or v.val_batch != 200]
        if dropped:
            print(f"not available through bilevel run clarke, left out: {dropped}")
        variants = [v for v in variants if v.label not in dropped]
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "argv": list(sys.argv if argv is None else argv),
        "load_start": load(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average {meta['load_start']}")
    repeats = a.repeats if a.repeats is not None else (1 if a.problem == "clarke" else 3)
    if a.problem == "clarke":
        doc = compare_clarke(variants, a.dataset, a.inits, a.steps, a.data_dir, a.same_data, repeats)
    elif a.breakdown:
        widths = [int(w) for w in a.widths.split(",")]
        lookbacks = [int(i) for i in a.lookbacks.split(",")]
        doc = breakdown(widths, lookbacks, seeds[0], repeats, cfg)
    else:
        for v in variants:
            print(f"variant {v.label}: {v}")
        doc = compare_digits(variants, seeds, repeats, cfg)
        print_digits(doc)
    meta["load_end"] = load()
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    doc["meta"] = meta
    print(f"load average at end {meta['load_end']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        print(f"json: {a.json}")
    if a.figure:
        docs = [doc] + [json.load(open(p)) for p in a.figure_from]
        figure(docs, a.figure)
    return doc


if __name__ == "__main__":
    main()
