"""Speed and memory of Hessian-vector products and of ``bilevel.hypergradient`` on CPU.

Every time is the median over ``--repeats`` runs (after warm-up runs) and is also
given relative to ONE training gradient (forward + backward, eager autograd) of the
same MLP on the same batch, so the ratios read as "cost in gradient evaluations".

Sections (``--sections 1,2,3``):

1. Hessian-vector-product paths for an MLP of ~270k and of ~1M weights:
   (a) eager double backward on one retained ``create_graph=True`` graph (the
       library's ``backend="autograd"``), graph-building gradient and per-HVP cost
       reported separately; (b) ``torch.func`` reverse-over-reverse
       ``vjp(grad(f))`` recomputed per product and with the ``vjp_fn`` reused;
       (c) forward-over-reverse ``jvp(grad(f))``; (d) ``torch.compile`` of the
       per-product ``vjp(grad(f))`` (and of ``jvp(grad(f))``; compile time
       reported separately, errors caught and printed). Plus a check whether
       forward-over-reverse works on ``mse_loss``, ``huber_loss`` and
       ``cross_entropy`` in this torch version.
2. One full ``bilevel.hypergradient`` (inner: cross-entropy + per-weight L2 with a
   per-weight hyperparameter; outer: validation cross-entropy) for Neumann 0/1/5/20
   and ConjugateGradient 5/20, and the cost per Neumann step (slope 5 -> 20), eager
   and with the solver driven by a compiled HVP.
3. Peak-RSS growth (fresh subprocess per setting, ``MALLOC_MMAP_THRESHOLD_=65536``)
   for Neumann 1/5/20/50 and unrolled differentiation K = 1/5/20.

Run:  python benchmarks/hypergradient_speed.py [--size all|270k|1m] [--threads 2]
          [--repeats 5] [--json out.json] [--sections 1,2,3] [--no-compile]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
import warnings

import torch
import torch.nn.functional as F
from torch.func import grad, jvp, vjp

import bilevel

# MLP widths (input, hidden..., classes) and their exact weight counts (incl. biases)
SIZES = {
    "270k": (784, 256, 256, 10),  # 269,322 weights
    "1m": (784, 1024, 192, 10),  # 1,002,570 weights
}
BATCH = 128


# --------------------------------------------------------------------------- problem


def n_weights(widths) -> int:
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def make_problem(size: str, seed: int = 0):
    """Random-init float32 ReLU MLP, synthetic Gaussian inputs and random labels."""
    widths = SIZES[size]
    gen = torch.Generator().manual_seed(seed)
    params = {}
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        params[f"w{i}"] = torch.randn(b, a, generator=gen) * math.sqrt(2.0 / a)
        params[f"b{i}"] = torch.zeros(b)
    X = torch.randn(BATCH, widths[0], generator=gen)
    y = torch.randint(0, widths[-1], (BATCH,), generator=gen)
    Xv = torch.randn(BATCH, widths[0], generator=gen)
    yv = torch.randint(0, widths[-1], (BATCH,), generator=gen)
    v = {k: torch.randn(p.shape, generator=gen) for k, p in params.items()}
    nv = math.sqrt(sum(float((t * t).sum()) for t in v.values()))
    v = {k: t / nv for k, t in v.items()}
    return params, (X, y, Xv, yv), v


def mlp(p, x):
    n = len(p) // 2
    for i in range(n):
        x = F.linear(x, p[f"w{i}"], p[f"b{i}"])
        if i < n - 1:
            x = torch.relu(x)
    return x


def leaves(tree):
    return {k: t.detach().clone().requires_grad_(True) for k, t in tree.items()}


# --------------------------------------------------------------------------- timing


def median_time(fn, repeats: int, warmup: int = 2, number: int = 1) -> float:
    """Median over ``repeats`` of the mean time of ``number`` back-to-back calls (seconds)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number)
    return statistics.median(times)


def paired_time(fn, base, repeats: int, warmup: int = 2, number: int = 1, base_number: int = 3):
    """Time ``fn`` interleaved with the baseline ``base`` (one training gradient).

    Each repeat times ``base_number`` baseline calls and then ``number`` calls of ``fn``;
    returns (median fn time, median baseline time, median of the per-repeat ratios).
    Pairing adjacent measurements keeps the ratio meaningful when other processes
    load the machine.
    """
    for _ in range(warmup):
        base()
        fn()
    ts, bs, rs = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(base_number):
            base()
        b = (time.perf_counter() - t0) / base_number
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        t = (time.perf_counter() - t0) / number
        ts.append(t)
        bs.append(b)
        rs.append(t / b)
    return statistics.median(ts), statistics.median(bs), statistics.median(rs)


def ms(t: float | None) -> str:
    return "-" if t is None else f"{1e3 * t:.2f}"


def ratio(t: float | None, base: float) -> str:
    return "-" if t is None else f"{t / base:.2f}"


def short_error(e: BaseException, limit: int = 300) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    text = f"{type(e).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- output

try:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    CONSOLE = Console(width=140, highlight=False, soft_wrap=False)
except ImportError:  # plain-text fallback
    CONSOLE = None


def print_table(title: str, columns: list[str], rows: list[list[str]], note: str | None = None) -> None:
    if CONSOLE is not None:
        table = Table(title=title, box=box.ASCII2, title_justify="left", show_lines=False)
        for i, c in enumerate(columns):
            table.add_column(c, justify="left" if i == 0 else "right", overflow="fold")
        for r in rows:
            table.add_row(*r)
        CONSOLE.print(table)
        if note:
            CONSOLE.print(note)
        CONSOLE.print()
        return
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    print(title)
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(x.ljust(w) for x, w in zip(r, widths)))
    if note:
        print(note)
    print()


def say(text: str) -> None:
    (CONSOLE.print(text) if CONSOLE is not None else print(text))


# --------------------------------------------------------------------------- section 1


def train_grad_fn(params, data):
    """One training gradient (forward + backward, eager autograd): the unit of cost."""
    X, y, _, _ = data
    p = leaves(params)
    keys = list(p)

    def train_grad():
        loss = F.cross_entropy(mlp(p, X), y)
        return torch.autograd.grad(loss, [p[k] for k in keys])

    return train_grad


def grad_baseline(params, data, repeats):
    return median_time(train_grad_fn(params, data), repeats, warmup=3, number=3)


def bench_hvp_paths(size: str, repeats: int, do_compile: bool) -> dict:
    params, data, v = make_problem(size)
    X, y, _, _ = data
    keys = list(params)
    f = lambda p: F.cross_entropy(mlp(p, X), y)  # noqa: E731
    res = {"size": size, "widths": SIZES[size], "n_weights": n_weights(SIZES[size])}
    base = train_grad_fn(params, data)
    t_grad = grad_baseline(params, data, repeats)
    res["grad_s"] = t_grad
    rows = {}

    def timed(fn, number):
        t, b, r = paired_time(fn, base, repeats, number=number)
        return {"s": t, "grad_s": b, "ratio": r}

    # (a) eager double backward on a retained graph (backend="autograd")
    p = leaves(params)
    vl = [v[k] for k in keys]

    def build():
        return torch.autograd.grad(f(p), [p[k] for k in keys], create_graph=True)

    t_build = timed(build, 1)
    g = build()
    hv_eager = lambda: torch.autograd.grad(g, [p[k] for k in keys], vl, retain_graph=True)  # noqa: E731
    t_eager = timed(hv_eager, 5)
    rows["a_eager_retained"] = {"oneoff": t_build, "per_hvp": t_eager}
    ref = [t.detach() for t in hv_eager()]
    del g

    pd = {k: t.detach() for k, t in params.items()}

    def check(out):  # relative error against the eager reference
        num = math.sqrt(sum(float(((o - r) ** 2).sum()) for o, r in zip(out, ref)))
        den = math.sqrt(sum(float((r**2).sum()) for r in ref))
        return num / den

    # (b1) torch.func reverse-over-reverse, recomputed per product
    def hvp_rr(p_, v_):
        _, fn = vjp(grad(f), p_)
        return fn(v_)[0]

    t_rr = timed(lambda: hvp_rr(pd, v), 3)
    rows["b1_func_rr_recomputed"] = {"per_hvp": t_rr, "rel_err": check([hvp_rr(pd, v)[k] for k in keys])}

    # (b2) torch.func reverse-over-reverse, vjp_fn reused
    t_vjp_build = timed(lambda: vjp(grad(f), pd), 1)
    _, vjp_fn = vjp(grad(f), pd)
    t_rr_reuse = timed(lambda: vjp_fn(v), 5)
    rows["b2_func_rr_reused"] = {
        "oneoff": t_vjp_build,
        "per_hvp": t_rr_reuse,
        "rel_err": check([vjp_fn(v)[0][k] for k in keys]),
    }
    del vjp_fn

    # (c) forward-over-reverse
    def hvp_fr(p_, v_):
        return jvp(grad(f), (p_,), (v_,))[1]

    try:
        t_fr = timed(lambda: hvp_fr(pd, v), 3)
        rows["c_func_fwd_over_rev"] = {"per_hvp": t_fr, "rel_err": check([hvp_fr(pd, v)[k] for k in keys])}
    except Exception as e:  # noqa: BLE001
        rows["c_func_fwd_over_rev"] = {"error": short_error(e)}

    # (d) torch.compile, in a fresh process (inductor's OpenMP kernels can slow later eager ops)
    if do_compile:
        child = run_child({"what": "compile_hvp", "size": size, "threads": torch.get_num_threads(), "repeats": repeats})
        if "error" in child:
            rows["d_compile_vjp_grad"] = {"error": child["error"]}
        else:
            rows.update(child["paths"])
            res["compile_child_eager_grad_before_s"] = child["eager_grad_before_s"]
            res["compile_child_eager_grad_after_s"] = child["eager_grad_after_s"]
    res["paths"] = rows
    return res


def compile_hvp_child(spec: dict) -> dict:
    import torch._dynamo as dynamo

    size, repeats = spec["size"], spec["repeats"]
    params, data, v = make_problem(size)
    X, y, _, _ = data
    keys = list(params)
    f = lambda p: F.cross_entropy(mlp(p, X), y)  # noqa: E731
    pd = {k: t.detach() for k, t in params.items()}
    base = train_grad_fn(params, data)
    out = {"eager_grad_before_s": grad_baseline(params, data, repeats)}
    ref = [vjp(grad(f), pd)[1](v)[0][k] for k in keys]

    def check(o):
        num = math.sqrt(sum(float(((a - r) ** 2).sum()) for a, r in zip(o, ref)))
        return num / math.sqrt(sum(float((r**2).sum()) for r in ref))

    def hvp_rr(p_, v_):
        _, fn = vjp(grad(f), p_)
        return fn(v_)[0]

    def hvp_fr(p_, v_):
        return jvp(grad(f), (p_,), (v_,))[1]

    paths = {}
    for name, fn in (
        ("d_compile_vjp_grad", hvp_rr),
        ("d_compile_jvp_grad", hvp_fr),
        ("compile_grad_reference", lambda p_, v_: grad(f)(p_)),
    ):
        dynamo.reset()
        dynamo.utils.counters.clear()
        entry = {}
        try:
            cfn = torch.compile(fn, dynamic=False)
            t0 = time.perf_counter()
            res = cfn(pd, v)
            entry["first_call_s"] = time.perf_counter() - t0  # trace + compile + run
            t0 = time.perf_counter()
            cfn(pd, v)
            entry["second_call_s"] = time.perf_counter() - t0
            t, b, r = paired_time(lambda: cfn(pd, v), base, repeats, number=3)
            entry["per_call"] = {"s": t, "grad_s": b, "ratio": r}
            if name != "compile_grad_reference":
                entry["rel_err"] = check([res[k] for k in keys])
            entry["graph_breaks"] = int(sum(dynamo.utils.counters["graph_break"].values()))
        except Exception as e:  # noqa: BLE001
            entry["error"] = short_error(e)
        paths[name] = entry
    out["eager_grad_after_s"] = grad_baseline(params, data, repeats)
    out["paths"] = paths
    return out


def print_hvp_table(res: dict) -> None:
    tg = res["grad_s"]
    P = res["paths"]
    w = res["widths"]
    cols = ["path", "one-off ms", "one-off / grad", "per HVP ms", "HVP / grad", "rel. err vs (a)"]
    rows = [["training gradient (fwd+bwd, eager)", "-", "-", ms(tg), "1.00", "-"]]

    def row(label, e, per="per_hvp", oneoff="oneoff"):
        if "error" in e:
            return [label, "-", "-", "FAILED", "-", e["error"]]
        err = e.get("rel_err")
        o = e.get(oneoff)
        if isinstance(o, float):  # compile time: a single measurement, relative to the median gradient
            o_ms, o_ratio = ms(o), ratio(o, tg)
        else:
            o_ms, o_ratio = ("-", "-") if o is None else (ms(o["s"]), f"{o['ratio']:.2f}")
        return [label, o_ms, o_ratio, ms(e[per]["s"]), f"{e[per]['ratio']:.2f}", "-" if err is None else f"{err:.1e}"]

    rows.append(row("(a) eager double backward, retained graph", P["a_eager_retained"]))
    rows.append(row("(b) func vjp(grad(f)), recomputed per HVP", P["b1_func_rr_recomputed"]))
    rows.append(row("(b) func vjp(grad(f)), vjp_fn reused", P["b2_func_rr_reused"]))
    rows.append(row("(c) func jvp(grad(f)) fwd-over-rev", P["c_func_fwd_over_rev"]))
    labels = {
        "d_compile_vjp_grad": "(d) torch.compile vjp(grad(f)) per HVP",
        "d_compile_jvp_grad": "(d) torch.compile jvp(grad(f)) per HVP",
        "compile_grad_reference": "ref: torch.compile grad(f) (a gradient)",
    }
    notes = []
    for k, label in labels.items():
        if k in P:
            rows.append(row(label, P[k], per="per_call", oneoff="first_call_s"))
            e = P[k]
            if "error" not in e:
                notes.append(
                    f"  {label}: first call (trace+compile) {e['first_call_s']:.1f} s, "
                    f"second call {1e3 * e['second_call_s']:.1f} ms, graph breaks {e['graph_breaks']}"
                )
    title = (
        f"1. HVP paths, MLP {'-'.join(map(str, w))} ({res['n_weights']:,} weights), float32, batch {BATCH}, "
        f"cross-entropy"
    )
    note = (
        "one-off = graph-building gradient for (a) (create_graph=True), vjp(grad(f)) for (b reused), "
        "first call incl. compilation for (d).\n"
        "ms = median over repeats; '/ grad' = median of per-repeat ratios to a training gradient timed "
        "right before (pairing cancels slow load drifts)"
    )
    if "compile_child_eager_grad_before_s" in res:
        notes.append(
            f"  (d) ran in a fresh process; its eager training gradient took "
            f"{ms(res['compile_child_eager_grad_before_s'])} ms before compiling and "
            f"{ms(res['compile_child_eager_grad_after_s'])} ms after running the compiled code"
        )
    if notes:
        note += "\n" + "\n".join(notes)
    print_table(title, cols, rows, note)


def forward_over_reverse_support() -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(5, 20, generator=gen) * 0.3
    x = torch.randn(32, 20, generator=gen)
    t_reg = torch.randn(32, 5, generator=gen)
    t_cls = torch.randint(0, 5, (32,), generator=gen)
    v = torch.randn(5, 20, generator=gen)
    cases = {
        "F.mse_loss(reduction='mean')": lambda w: F.mse_loss(torch.tanh(x @ w.T), t_reg, reduction="mean"),
        "F.huber_loss": lambda w: F.huber_loss(x @ w.T, t_reg),
        "F.cross_entropy": lambda w: F.cross_entropy(x @ w.T, t_cls),
    }
    out = []
    for name, f in cases.items():
        entry = {"loss": name}
        ref = vjp(grad(f), W)[1](v)[0]
        try:
            fr = jvp(grad(f), (W,), (v,))[1]
            err = float((fr - ref).norm() / ref.norm())
            entry.update(works=err < 1e-4, rel_err=err)
        except Exception as e:  # noqa: BLE001
            entry.update(works=False, error=short_error(e))
        out.append(entry)
    return out


# --------------------------------------------------------------------------- section 2


def make_bilevel(size: str):
    params, (X, y, Xv, yv), v = make_problem(size)

    def inner(p, h):  # training CE + per-weight L2 with a per-weight (log) coefficient
        reg = sum((h[k].exp() * p[k] ** 2).sum() for k in p)
        return F.cross_entropy(mlp(p, X), y) + 0.5 * reg

    def outer(p, h):
        return F.cross_entropy(mlp(p, Xv), yv)

    hparams = {k: torch.full_like(t, math.log(1e-3)) for k, t in params.items()}
    return params, hparams, inner, outer


class CountingSolver:
    """Wraps a solver and counts the products it asks of the operator (untimed runs only)."""

    def __init__(self, solver):
        self.solver, self.damping, self.count = solver, solver.damping, 0

    def __call__(self, op, v):
        outer = self

        class Op:
            def rmatvec(self, x):
                outer.count += 1
                return op.rmatvec(x)

            def matvec(self, x):
                outer.count += 1
                return op.matvec(x)

        return self.solver(Op(), v)


def smallest_eigenvalue(op, like, iters: int = 300) -> float:
    """lambda_min(J) by Lanczos (scipy's ``eigsh``, which="SA") on the operator's products.

    Power iteration on J - lambda_max I is useless here: the eigenvalues near 0 all map to
    about -lambda_max, so it returns a Rayleigh quotient of a random vector (it gave -0.078
    where Lanczos finds -3.6 on the 270k MLP, and CG then met the negative curvature).
    """
    import numpy as np
    from scipy.sparse.linalg import LinearOperator, eigsh

    n = bilevel.tree.numel(like)
    dtype = next(iter(like.values())).dtype

    def mv(x):
        x = torch.as_tensor(np.asarray(x).ravel(), dtype=dtype)
        return bilevel.tree.flatten(op.rmatvec(bilevel.tree.unflatten(x, like))).double().numpy()

    lo = eigsh(
        LinearOperator((n, n), matvec=mv, dtype=np.float64),
        k=1,
        which="SA",
        maxiter=iters,
        tol=1e-3,
        return_eigenvectors=False,
    )
    return float(lo[0])


def bench_hypergradient(size: str, repeats: int, do_compile: bool) -> dict:
    params, hparams, inner, outer = make_bilevel(size)
    _, data, _ = make_problem(size)
    base = train_grad_fn(params, data)
    t_grad = grad_baseline(params, data, repeats)
    lam = bilevel.largest_eigenvalue(params, hparams, inner=inner, iters=30)
    op, p_leaf, _ = bilevel.linearise(params, hparams, inner=inner)
    lam_min = smallest_eigenvalue(op, {k: t.detach() for k, t in p_leaf.items()})
    alpha = 1.0 / lam
    damping = max(1.0, 1.5 * -lam_min, 0.05 * lam)  # J + damping I positive definite with margin
    res = {
        "size": size,
        "n_weights": n_weights(SIZES[size]),
        "grad_s": t_grad,
        "lambda_max": lam,
        "lambda_min": lam_min,
        "alpha": alpha,
        "cg_damping": damping,
        "rows": [],
    }
    settings = [("autograd", "Neumann", s) for s in (0, 1, 5, 20)]
    settings += [("autograd", "CG", s) for s in (5, 20)]
    settings += [("func", "Neumann", s) for s in (0, 5, 20)]
    if do_compile:  # the library's own compiled path, end to end (compilation in the warm-up call)
        settings += [("compile", "Neumann", s) for s in (0, 5, 20)]
    for backend, kind, steps in settings:
        if kind == "Neumann":
            solver = bilevel.Neumann(steps, alpha=alpha, divergence="ignore")
        else:
            solver = bilevel.ConjugateGradient(steps, tol=0.0, damping=damping)
        counter = CountingSolver(solver)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bilevel.hypergradient(outer, params, hparams, inner=inner, solver=counter, backend=backend)
        call = lambda: bilevel.hypergradient(
            outer,
            params,
            hparams,
            inner=inner,
            solver=solver,  # noqa: E731
            backend=backend,
        )
        t, b, r = paired_time(call, base, repeats, warmup=1)
        res["rows"].append(
            {
                "backend": backend,
                "solver": kind,
                "steps": steps,
                "time_s": t,
                "grad_s": b,
                "ratio": r,
                "products": counter.count,
                "warnings": sorted({str(w.message)[:120] for w in caught}),
            }
        )

    def slope(backend):
        r = {x["steps"]: x["ratio"] for x in res["rows"] if x["backend"] == backend and x["solver"] == "Neumann"}
        return (r[20] - r[5]) / 15

    res["neumann_step_cost_autograd"] = slope("autograd")
    res["neumann_step_cost_func"] = slope("func")
    if do_compile:
        res["neumann_step_cost_compile"] = slope("compile")

    # The Neumann solver alone, driven by the library's eager operator (backend="autograd")
    gen = torch.Generator().manual_seed(1)
    v = {k: torch.randn(t.shape, generator=gen) * 1e-3 for k, t in params.items()}
    solver_rows = {}
    for steps in (5, 20):
        s = bilevel.Neumann(steps, alpha=alpha, divergence="ignore")
        t, b, r = paired_time(lambda: s(op, v), base, repeats, warmup=1)
        solver_rows[f"eager_{steps}"] = {"s": t, "grad_s": b, "ratio": r}
    res["solver_only_eager_step_cost"] = (solver_rows["eager_20"]["ratio"] - solver_rows["eager_5"]["ratio"]) / 15
    del op, p_leaf
    if do_compile:  # ... and by a torch.compile'd HVP, in a fresh process
        child = run_child(
            {
                "what": "compile_neumann",
                "size": size,
                "threads": torch.get_num_threads(),
                "repeats": repeats,
                "alpha": alpha,
            }
        )
        if "error" in child:
            res["compiled_error"] = child["error"]
        else:
            res["compiled_first_call_s"] = child["first_call_s"]
            solver_rows.update(child["solver_rows"])
            res["compiled_hvp"] = child["hvp"]
            res["solver_only_compiled_step_cost"] = (
                solver_rows["compiled_20"]["ratio"] - solver_rows["compiled_5"]["ratio"]
            ) / 15
    res["solver_only"] = solver_rows
    return res


def compile_neumann_child(spec: dict) -> dict:
    """The Neumann solver driven by a torch.compile'd vjp(grad(inner)) operator."""
    import torch._dynamo as dynamo

    size, repeats, alpha = spec["size"], spec["repeats"], spec["alpha"]
    params, hparams, inner, outer = make_bilevel(size)
    _, data, _ = make_problem(size)
    base = train_grad_fn(params, data)
    pd, hd = dict(params), dict(hparams)
    gen = torch.Generator().manual_seed(1)
    v = {k: torch.randn(t.shape, generator=gen) * 1e-3 for k, t in params.items()}

    def hvp(x):
        return vjp(lambda p_: grad(inner)(p_, hd), pd)[1](x)[0]

    dynamo.reset()
    chvp = torch.compile(hvp, dynamic=False)

    class CompiledOp:
        def rmatvec(self, x):
            return chvp(x)

        def matvec(self, x):
            return chvp(x)  # symmetric Hessian

    cop = CompiledOp()
    t0 = time.perf_counter()
    chvp(v)
    out = {"first_call_s": time.perf_counter() - t0}
    t, b, r = paired_time(lambda: chvp(v), base, repeats, number=3)
    out["hvp"] = {"s": t, "grad_s": b, "ratio": r}
    rows = {}
    for steps in (5, 20):
        s = bilevel.Neumann(steps, alpha=alpha, divergence="ignore")
        t, b, r = paired_time(lambda: s(cop, v), base, repeats, warmup=1)
        rows[f"compiled_{steps}"] = {"s": t, "grad_s": b, "ratio": r}
    out["solver_rows"] = rows
    return out


def run_child(spec: dict, env: dict | None = None) -> dict:
    # Started through /bin/sh, which forks (not execs) the child: a process started straight from this one
    # (vfork + exec) inherits this process's peak RSS into its ru_maxrss, which could not then be reset.
    cmd = [
        "/bin/sh",
        "-c",
        '"$0" "$@"; exit $?',
        sys.executable,
        os.path.abspath(__file__),
        "--_child",
        json.dumps(spec),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if out.returncode != 0:
        lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
        return {"error": lines[-1][:300] if lines else f"child exited with {out.returncode}"}
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": "child printed no result: " + out.stdout[-300:]}


def print_hypergradient_table(res: dict) -> None:
    cols = ["backend", "solver", "steps", "operator products", "time ms", "grad ms (paired)", "time / grad"]
    rows = []
    for r in res["rows"]:
        rows.append(
            [
                r["backend"],
                r["solver"],
                str(r["steps"]),
                str(r["products"]),
                ms(r["time_s"]),
                ms(r["grad_s"]),
                f"{r['ratio']:.2f}",
            ]
        )
    w = SIZES[res["size"]]
    title = (
        f"2. bilevel.hypergradient, MLP {'-'.join(map(str, w))} ({res['n_weights']:,} weights); "
        f"inner = CE + per-weight L2 (per-weight hparam), outer = validation CE"
    )
    lines = [
        f"Neumann alpha = 1/lambda_max = {res['alpha']:.4g} (lambda_max by power iteration ~ "
        f"{res['lambda_max']:.4g}, lambda_min by Lanczos ~ {res['lambda_min']:.4g}), divergence='ignore'; "
        f"CG damping = {res['cg_damping']:.3g}, tol = 0 (CG products include 2 for its symmetry check)",
        "time / grad = median of per-repeat ratios to a training gradient timed right before",
    ]
    for r in res["rows"]:
        for wmsg in r["warnings"]:
            lines.append(f"  warning ({r['backend']} {r['solver']} {r['steps']}): {wmsg}")
    lines.append(
        f"cost per Neumann step (slope 5 -> 20), full hypergradient, backend='autograd': "
        f"{res['neumann_step_cost_autograd']:.2f} gradient evaluations (target <= 2.5)"
    )
    lines.append(
        f"cost per Neumann step (slope 5 -> 20), full hypergradient, backend='func':     "
        f"{res['neumann_step_cost_func']:.2f} gradient evaluations"
    )
    if "neumann_step_cost_compile" in res:
        lines.append(
            f"cost per Neumann step (slope 5 -> 20), full hypergradient, backend='compile':  "
            f"{res['neumann_step_cost_compile']:.2f} gradient evaluations (target <= 1.8)"
        )
    so = res["solver_only"]
    lines.append(
        f"Neumann solver alone, library's eager operator: 5 steps {so['eager_5']['ratio']:.2f}, "
        f"20 steps {so['eager_20']['ratio']:.2f} gradients -> {res['solver_only_eager_step_cost']:.2f} "
        "gradient evaluations per step"
    )
    if "solver_only_compiled_step_cost" in res:
        lines.append(
            f"Neumann solver alone, torch.compile'd vjp(grad(inner)) operator (fresh process; first call "
            f"{res['compiled_first_call_s']:.1f} s; one compiled HVP = {res['compiled_hvp']['ratio']:.2f} "
            f"gradients): 5 steps {so['compiled_5']['ratio']:.2f}, 20 steps {so['compiled_20']['ratio']:.2f}"
            f" gradients -> {res['solver_only_compiled_step_cost']:.2f} gradient evaluations per step "
            "(target <= 1.8)"
        )
    elif "compiled_error" in res:
        lines.append(f"compiled operator FAILED: {res['compiled_error']}")
    print_table(title, cols, rows, "\n".join(lines))


# --------------------------------------------------------------------------- section 3


def rss_now_kb() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def vm_hwm_kb() -> int:
    with open("/proc/self/status") as fh:
        return next(int(ln.split()[1]) for ln in fh if ln.startswith("VmHWM"))


def memory_child(spec: dict) -> dict:
    params, hparams, inner, outer = make_bilevel(spec["size"])
    # warm-up: allocator, kernels, autograd engine threads
    bilevel.hypergradient(outer, params, hparams, inner=inner, solver=bilevel.Neumann(1, alpha=1e-3))
    gc.collect()
    rss0 = rss_now_kb()
    try:  # reset the peak (VmHWM, which ru_maxrss reads) to the current RSS, so the import peak is not the bar
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        reset = True
    except OSError:
        reset = False
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm0 = vm_hwm_kb()
    if spec["method"] == "neumann":
        bilevel.hypergradient(
            outer, params, hparams, inner=inner, solver=bilevel.Neumann(spec["steps"], alpha=1e-3, divergence="ignore")
        )
    else:
        bilevel.unrolled_hypergradient(outer, params, hparams, inner=inner, lr=1e-3, steps=spec["steps"])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm1 = vm_hwm_kb()
    return {
        "vmhwm_growth_mb": (hwm1 - hwm0) / 1024,
        "peak_reset": reset,
        "rss_before_mb": rss0 / 1024,
        "maxrss_before_mb": before / 1024,
        "maxrss_growth_mb": (after - before) / 1024,
        "peak_minus_rss_before_mb": (after - rss0) / 1024,
    }


def bench_memory(size: str, threads: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    rows = []
    for method, steps in [("neumann", s) for s in (1, 5, 20, 50)] + [("unrolled", k) for k in (1, 5, 20)]:
        spec = {"method": method, "steps": steps, "size": size, "threads": threads}
        child = run_child({**spec, "what": "memory"}, env=env)
        rows.append({**spec, **child})
    return {"size": size, "n_weights": n_weights(SIZES[size]), "rows": rows}


def print_memory_table(res: dict) -> None:
    cols = [
        "method",
        "steps",
        "peak RSS growth MB (ru_maxrss delta)",
        "VmHWM delta MB",
        "RSS before call MB",
        "peak reset",
    ]
    rows = []
    for r in res["rows"]:
        label = "Neumann (IFT)" if r["method"] == "neumann" else "unrolled (K steps)"
        if "error" in r:
            rows.append([label, str(r["steps"]), "FAILED", r["error"], "-", "-"])
            continue
        rows.append(
            [
                label,
                str(r["steps"]),
                f"{r['maxrss_growth_mb']:.1f}",
                f"{r['vmhwm_growth_mb']:.1f}",
                f"{r['rss_before_mb']:.1f}",
                "yes" if r["peak_reset"] else "no",
            ]
        )
    w = SIZES[res["size"]]
    mb = 4 * res["n_weights"] / 2**20
    title = (
        f"3. Peak memory vs steps, MLP {'-'.join(map(str, w))} ({res['n_weights']:,} weights; one float32 "
        f"weight vector = {mb:.1f} MB), fresh process each, MALLOC_MMAP_THRESHOLD_=65536"
    )
    note = (
        "child started via /bin/sh (so ru_maxrss does not inherit this process's peak); after a warm-up "
        "hypergradient the peak is reset\nto the current RSS (write 5 to /proc/self/clear_refs), then ru_maxrss "
        "and VmHWM are read around one call;\nNeumann alpha = 1e-3, unrolled = plain GD with lr = 1e-3 "
        "on the same inner loss, all K steps differentiated"
    )
    print_table(title, cols, rows, note)


# --------------------------------------------------------------------------- main


def machine_info(threads: int) -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"torch {torch.__version__}, Python {platform.python_version()}, {cpu}, "
        f"os.cpu_count()={os.cpu_count()}, torch threads={threads}, bilevel {bilevel.__version__}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--size",
        default="all",
        choices=["all", *SIZES],
        help="MLP size(s) for section 1; sections 2-3 use the largest chosen (default: all)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sections", default="1,2,3")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--json", default=None, help="also write all measurements to this JSON file")
    ap.add_argument("--_child", dest="child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        torch.set_num_threads(spec["threads"])
        torch.manual_seed(0)
        fn = {"memory": memory_child, "compile_hvp": compile_hvp_child, "compile_neumann": compile_neumann_child}[
            spec["what"]
        ]
        print(json.dumps(fn(spec), default=str))
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sizes = list(SIZES) if args.size == "all" else [args.size]
    big = sizes[-1]
    sections = {int(s) for s in args.sections.split(",")}
    results = {"machine": machine_info(args.threads), "argv": sys.argv[1:], "repeats": args.repeats}
    say(results["machine"])
    results["loadavg_start"] = os.getloadavg()
    say("load average at start (1/5/15 min): " + " ".join(f"{x:.2f}" for x in results["loadavg_start"]))
    say(f"median of {args.repeats} repeats after warm-up; ratios are relative to one eager training gradient\n")
    t_start = time.perf_counter()
    if 1 in sections:
        results["hvp"] = []
        for size in sizes:
            r = bench_hvp_paths(size, args.repeats, not args.no_compile)
            results["hvp"].append(r)
            print_hvp_table(r)
        results["forward_over_reverse"] = fr = forward_over_reverse_support()
        print_table(
            "1. forward-over-reverse jvp(grad(f)) support, torch " + torch.__version__,
            ["loss", "works", "detail"],
            [
                [
                    e["loss"],
                    "yes" if e["works"] else "no",
                    e.get("error", f"rel. err vs vjp(grad(f)) {e.get('rel_err', float('nan')):.1e}"),
                ]
                for e in fr
            ],
        )
    if 2 in sections:
        results["hypergradient"] = r = bench_hypergradient(big, args.repeats, not args.no_compile)
        print_hypergradient_table(r)
    if 3 in sections:
        results["memory"] = r = bench_memory(big, args.threads)
        print_memory_table(r)
    results["total_s"] = time.perf_counter() - t_start
    results["loadavg_end"] = os.getloadavg()
    say(
        f"total benchmark time {results['total_s']:.0f} s; load average at end (1/5/15 min): "
        + " ".join(f"{x:.2f}" for x in results["loadavg_end"])
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, default=str)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        traceback.print_exc()
        sys.exit(130)
