"""The same IFT hypergradient through bilevel, torchopt and (when JAX is installed) jaxopt.

Problem (Lorraine et al. 2020, sec. 5.1, at benchmark size): a ReLU MLP 784-256-256-10
(269,322 weights) at a random initialisation, one weight decay per weight,

    L_T(w, lam) = CE(train batch) + 1/2 sum_i exp(lam_i) w_i^2,      L_V(w) = CE(validation batch),

and the hypergradient dL_V/dlam = -(dL_V/dw) (H + eps I)^{-1} d^2L_T/dw dlam at the current weights,
with the linear system solved by

* ``cg``: conjugate gradient, exactly ``--steps`` iterations (tolerance 0), on H + eps I (the ridge
  keeps the randomly initialised, indefinite Hessian positive definite, so every library does the
  same work);
* ``neumann``: ``--steps`` Neumann steps with step ``alpha`` (jaxopt has no Neumann solver: its
  ``custom_root`` takes any ``solve(matvec, b)``, here a ``lax.fori_loop`` over the series).

Each library runs its own documented user path: ``bilevel.hypergradient(outer, params, lam,
inner=..., solver=...)``; torchopt's ``diff.implicit.custom_root`` with ``linear_solve.solve_cg`` /
``solve_inv(ns=True)``; jaxopt's ``implicit_diff.custom_root`` with ``linear_solve.solve_cg`` (``ridge``),
``jax.jit``-compiled (compilation excluded from the times).

Agreement: every library's hypergradient in float64 against ours (max |difference| / max |ours|).
Time: float32, the libraries alternate inside each repeat (so load drifts hit all alike);
the median over ``--repeats`` and the ratio to ours are printed.

    python benchmarks/peers.py                       # all libraries found, 1 thread, 20 steps
    python benchmarks/peers.py --threads 2 --json out.json

torchopt is in the ``test`` extra; JAX/jaxopt are optional (``pip install jax jaxopt``): a library
that is not installed is skipped with a note.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings

import numpy as np

WIDTHS = (784, 256, 256, 10)
BATCH = 128


def problem(seed: int = 0) -> dict[str, np.ndarray]:
    """Float64 numpy arrays every library starts from: weights, data, log-decays."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        out[f"w{i}"] = rng.standard_normal((b, a)) * math.sqrt(2.0 / a)
        out[f"b{i}"] = np.zeros(b)
    out["X"] = rng.standard_normal((BATCH, WIDTHS[0]))
    out["y"] = rng.integers(0, WIDTHS[-1], BATCH)
    out["Xv"] = rng.standard_normal((BATCH, WIDTHS[0]))
    out["yv"] = rng.integers(0, WIDTHS[-1], BATCH)
    return out


def weight_keys() -> list[str]:
    return [f"{t}{i}" for i in range(len(WIDTHS) - 1) for t in ("w", "b")]


# --------------------------------------------------------------------------- PyTorch (ours, torchopt)


def torch_problem(arrays: dict[str, np.ndarray], dtype):
    import torch
    import torch.nn.functional as F

    params = {k: torch.tensor(arrays[k], dtype=dtype) for k in weight_keys()}
    lam = {k: torch.full_like(v, math.log(1e-3)) for k, v in params.items()}
    X, Xv = (torch.tensor(arrays[k], dtype=dtype) for k in ("X", "Xv"))
    y, yv = (torch.tensor(arrays[k]) for k in ("y", "yv"))

    def mlp(p, x):
        n = len(WIDTHS) - 1
        for i in range(n):
            x = F.linear(x, p[f"w{i}"], p[f"b{i}"])
            if i < n - 1:
                x = torch.relu(x)
        return x

    def inner(p, h):
        reg = sum((h[k].exp() * p[k] ** 2).sum() for k in p)
        return F.cross_entropy(mlp(p, X), y) + 0.5 * reg

    def outer(p, h):
        return F.cross_entropy(mlp(p, Xv), yv)

    return params, lam, inner, outer


def ours(arrays, dtype, solver: str, steps: int, alpha: float, eps: float, backend: str = "autograd"):
    import bilevel
    from bilevel.solvers import ConjugateGradient, Neumann

    params, lam, inner, outer = torch_problem(arrays, dtype)
    s = (
        ConjugateGradient(steps, tol=0.0, damping=eps)
        if solver == "cg"
        else Neumann(steps, alpha=alpha, damping=eps, divergence="ignore")
    )
    return lambda: bilevel.hypergradient(outer, params, lam, inner=inner, solver=s, backend=backend)


def ours_compiled(arrays, dtype, solver: str, steps: int, alpha: float, eps: float):
    """``backend="compile"``: the whole hypergradient as one torch.compile program (first call: eager + compile)."""
    fn = ours(arrays, dtype, solver, steps, alpha, eps, backend="compile")
    fn()  # the eager first call that compiles; the caller's first call then includes the compilation
    return fn


def torchopt_fn(arrays, dtype, solver: str, steps: int, alpha: float, eps: float):
    import torch
    import torchopt

    params, lam, inner, outer = torch_problem(arrays, dtype)
    keys = list(params)

    def optimality(w, h):  # dL_T/dw = 0 at the solution (torchopt: the stationary condition)
        hd = dict(zip(keys, h))  # functional (torch.func.grad): torchopt differentiates it with functorch.vjp
        g = torch.func.grad(lambda wd: inner(wd, hd))(dict(zip(keys, w)))
        return tuple(g[k] for k in keys)

    if solver == "cg":
        solve = torchopt.linear_solve.solve_cg(maxiter=steps, ridge=eps, rtol=0.0, atol=0.0)
    else:  # Neumann: alpha * sum_j (I - alpha (H + eps I))^j v
        solve = torchopt.linear_solve.solve_inv(ns=True, maxiter=steps, alpha=alpha, ridge=eps)

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
    def solution(w, h):  # the "inner solver": the weights are taken as the fixed point
        return tuple(t.detach().clone() for t in w)

    w0 = tuple(params[k] for k in keys)

    def call():
        h = tuple(lam[k].detach().clone().requires_grad_(True) for k in keys)
        w = solution(w0, h)
        loss = outer(dict(zip(keys, w)), None)
        return dict(zip(keys, torch.autograd.grad(loss, h)))

    return call


# --------------------------------------------------------------------------- JAX (jaxopt)


def jaxopt_fn(arrays, dtype_name: str, solver: str, steps: int, alpha: float, eps: float):
    import jax
    import jax.numpy as jnp
    import jaxopt

    dt = jnp.float64 if dtype_name == "float64" else jnp.float32
    params = {k: jnp.asarray(arrays[k], dtype=dt) for k in weight_keys()}
    lam = {k: jnp.full_like(v, math.log(1e-3)) for k, v in params.items()}
    # the data go in as arguments of the jitted function, not as constants XLA could fold at compile time
    data = {k: jnp.asarray(arrays[k], dtype=dt) for k in ("X", "Xv")} | {k: jnp.asarray(arrays[k]) for k in ("y", "yv")}

    def mlp(p, x):
        n = len(WIDTHS) - 1
        for i in range(n):
            x = x @ p[f"w{i}"].T + p[f"b{i}"]
            if i < n - 1:
                x = jax.nn.relu(x)
        return x

    def ce(logits, labels):
        return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, labels[:, None], 1)[:, 0])

    def inner(p, h, d):
        reg = sum(jnp.sum(jnp.exp(h[k]) * p[k] ** 2) for k in p)
        return ce(mlp(p, d["X"]), d["y"]) + 0.5 * reg

    def optimality(w, h, d):
        return jax.grad(inner)(w, h, d)

    if solver == "cg":

        def solve(matvec, b):
            return jaxopt.linear_solve.solve_cg(matvec, b, ridge=eps, tol=0.0, maxiter=steps)

    else:

        def solve(matvec, b):  # alpha * sum_{j=0}^{steps} (I - alpha (A + eps I))^j b
            tm = jax.tree_util.tree_map

            def body(_, carry):
                term, total = carry
                at = matvec(term)
                term = tm(lambda t, a: t - alpha * (a + eps * t), term, at)
                return term, tm(jnp.add, total, term)

            _, total = jax.lax.fori_loop(0, steps, body, (b, b))
            return tm(lambda t: alpha * t, total)

    @jaxopt.implicit_diff.custom_root(optimality, solve=solve)
    def solution(w, h, d):
        return w

    hg = jax.jit(jax.grad(lambda h, w, d: ce(mlp(solution(w, h, d), d["Xv"]), d["yv"])))

    def call():
        out = hg(lam, params, data)
        jax.block_until_ready(out)
        return out

    return call


# --------------------------------------------------------------------------- driver


def max_rel_diff(a: dict, b: dict) -> float:
    num = max(float(np.max(np.abs(np.asarray(a[k], dtype=np.float64) - np.asarray(b[k], dtype=np.float64)))) for k in a)
    den = max(float(np.max(np.abs(np.asarray(b[k], dtype=np.float64)))) for k in b)
    return num / den


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="CG iterations / Neumann steps")
    ap.add_argument("--solvers", default="cg,neumann")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for torch and XLA")
    ap.add_argument("--eps", type=float, default=5.0, help="ridge / damping eps (H + eps I)")
    ap.add_argument("--alpha", type=float, default=0.01, help="Neumann step")
    ap.add_argument("--libraries", default="bilevel,bilevel-compile,torchopt,jaxopt")
    ap.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="'cpu' (default): process CPU time, robust to other jobs on a shared machine (with --threads 1 it is "
        "the wall time of an idle machine); 'wall': perf_counter",
    )
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.threads == 1:  # XLA's CPU client reads its thread settings when JAX starts
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        )
    import torch

    torch.set_num_threads(a.threads)
    libs = a.libraries.split(",")
    found = {"bilevel": True, "bilevel-compile": True, "torchopt": importlib.util.find_spec("torchopt") is not None}
    found["jaxopt"] = importlib.util.find_spec("jax") is not None and importlib.util.find_spec("jaxopt") is not None
    versions = [f"torch {torch.__version__}"]
    if found["jaxopt"] and "jaxopt" in libs:
        import jax

        jax.config.update("jax_enable_x64", True)  # float64 arrays where asked; float32 stays float32
        versions += [f"jax {jax.__version__}", f"jaxopt {importlib.metadata.version('jaxopt')}"]
    if found["torchopt"] and "torchopt" in libs:
        import torchopt

        versions.append(f"torchopt {torchopt.__version__}")
    for lib in libs:
        if not found.get(lib, False):
            print(f"note: {lib} is not installed: skipped (pip install {'jax jaxopt' if lib == 'jaxopt' else lib})")
    libs = [lib for lib in libs if found.get(lib, False)]
    print(", ".join(versions), f"| Python {platform.python_version()}, {os.cpu_count()} CPUs, threads={a.threads}")
    print(
        f"MLP {'-'.join(map(str, WIDTHS))} (269,322 weights), batch {BATCH}, per-weight decay, "
        f"ridge eps={a.eps}, Neumann alpha={a.alpha}, {a.steps} steps, median of {a.repeats}, {a.clock} time"
    )
    arrays = problem()
    makers = {"bilevel": ours, "bilevel-compile": ours_compiled, "torchopt": torchopt_fn, "jaxopt": jaxopt_fn}
    results: dict = {"threads": a.threads, "steps": a.steps, "versions": versions, "solvers": {}}
    for solver in a.solvers.split(","):
        row: dict = {}
        ref = None
        for lib in libs:  # float64 agreement
            dtype = "float64" if lib == "jaxopt" else torch.float64
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = makers[lib](arrays, dtype, solver, a.steps, a.alpha, a.eps)()
            out = {k: np.asarray(v.detach() if hasattr(v, "detach") else v) for k, v in out.items()}
            if ref is None:
                ref = out
            row[lib] = {"float64_rel_diff_vs_bilevel": max_rel_diff(out, ref)}
        fns = {}
        for lib in libs:  # float32 timing, compiled / warmed up first
            dtype = "float32" if lib == "jaxopt" else torch.float32
            fns[lib] = makers[lib](arrays, dtype, solver, a.steps, a.alpha, a.eps)
            t0 = time.perf_counter()
            fns[lib]()
            row[lib]["first_call_s"] = time.perf_counter() - t0
            for _ in range(2):
                fns[lib]()
        clock = time.process_time if a.clock == "cpu" else time.perf_counter
        times: dict[str, list[float]] = {lib: [] for lib in libs}
        for _ in range(a.repeats):
            for lib in libs:
                t0 = clock()
                fns[lib]()
                times[lib].append(clock() - t0)
        base = statistics.median(times["bilevel"])
        print(f"\n{solver} ({a.steps} {'iterations' if solver == 'cg' else 'steps'})")
        print(f"{'library':>10} {'median ms':>10} {'/ bilevel':>10} {'first call s':>13} {'float64 rel. diff':>18}")
        for lib in libs:
            med = statistics.median(times[lib])
            row[lib].update(median_ms=1e3 * med, ratio_to_bilevel=med / base, times_ms=[1e3 * t for t in times[lib]])
            print(
                f"{lib:>10} {1e3 * med:10.2f} {med / base:10.2f} {row[lib]['first_call_s']:13.2f} "
                f"{row[lib]['float64_rel_diff_vs_bilevel']:18.1e}"
            )
        results["solvers"][solver] = row
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
