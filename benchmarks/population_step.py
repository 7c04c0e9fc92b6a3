"""One weight step of a stacked population: the library's loop against hand-batched code.

Clarke et al.'s UCI protocol trains P initialisations of a 1-hidden-layer MLP (50 ReLU units) with
full-batch SGD (per-member learning rate, momentum, weight decay). This times one weight step of
such a population four ways, on the same data, weights and hyperparameters:

* ``hand``: the forward and backward written by hand as batched matmuls (the shared input times all
  members' first layers as one GEMM, ``torch.baddbmm`` for the second) and
  the SGD-with-momentum update written out, no autograd (the floor for this step on this CPU);
* ``autograd``: the batched forward in ``torch.baddbmm`` with autograd for the backward;
* ``vmap``: ``torch.func.vmap(torch.func.grad(loss))`` over the members, plus the same update;
* ``tuner``: :meth:`bilevel.tuner.OnlineTuner.weight_step` (mode ``none``: what ``random`` runs),
  with :func:`bilevel.population.vmap_loss` over :func:`bilevel.nets.mlp_forward`.

And the one-pass overhead: ``ours-wd-lr-m``'s time per weight step (T = 10, i = 5: an IFT
hypergradient with 5 Neumann steps every 10 weight steps) over ``random``'s, with the hyperparameter
step's training gradient reused by the next weight step (:class:`bilevel.tuner.SharedGradient`, opt-in
``share_gradient=True``) and without it (the default).

    python benchmarks/population_step.py --inits 200 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bilevel import hparams as H
from bilevel import population as pop
from bilevel.data import load
from bilevel.nets import mlp_forward, mlp_init
from bilevel.tuner import OnlineTuner, TunerConfig
from bilevel.updates import SGD

CLOCK = time.process_time  # --clock: CPU time by default (robust to other jobs on a shared machine)


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = CLOCK()
        fn()
        ts.append(CLOCK() - t0)
    return 1e3 * statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="energy")
    ap.add_argument("--inits", type=int, default=200)
    ap.add_argument("--hidden", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--runs", type=int, default=11, help="alternating 100-step runs per loop for the overhead")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument(
        "--malloc",
        choices=("keep", "default"),
        default="keep",
        help="'keep' (default, as the bilevel commands): bilevel.allocator.keep_freed_memory(); 'default': glibc's own",
    )
    ap.add_argument(
        "--clock", choices=("cpu", "wall"), default="cpu", help="process CPU time (default) or wall time (perf_counter)"
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.malloc == "keep":
        from bilevel.allocator import keep_freed_memory

        keep_freed_memory()
    global CLOCK
    CLOCK = time.process_time if a.clock == "cpu" else time.perf_counter
    dtype = getattr(torch, a.dtype)
    d = load(a.dataset, data_dir=a.data_dir)
    X, y = d.X_train.to(dtype), d.y_train.to(dtype).reshape(len(d.X_train), -1)
    Xv, yv = d.X_val.to(dtype), d.y_val.to(dtype).reshape(len(d.X_val), -1)
    sizes = [X.shape[1], a.hidden, y.shape[1]]
    P = a.inits
    space = H.HyperParameterSpace([H.learning_rate(), H.weight_decay(), H.momentum()])
    params, raw = pop.init_population(
        lambda g: mlp_init(sizes, g, dtype=dtype), P, 0, lambda p, g: space.init(p, g, dtype=dtype)
    )
    nat = space.natural(raw)
    lr, wd, mom = (pop.per_member(nat[n], nat[n]).reshape(P, 1, 1) for n in ("lr", "weight_decay", "momentum"))
    print(
        f"{a.dataset}: {len(X)} training rows x {X.shape[1]} features, MLP {'-'.join(map(str, sizes))}, "
        f"P = {P} members, full batch, {a.dtype}, torch {torch.__version__}, threads {a.threads}, "
        f"{a.clock} time, malloc {a.malloc}"
    )

    W0, b0, W1, b1 = (params[k] for k in ("W0", "b0", "W1", "b1"))
    Xb = X.expand(P, *X.shape)

    def hand() -> None:  # forward, backward and SGD(momentum, wd) by hand; the shared input folded into one GEMM
        H_ = W0.shape[1]
        h = (X @ W0.reshape(P * H_, -1).T).reshape(len(X), P, H_).transpose(0, 1) + b0[:, None, :]
        a1 = h.clamp_min(0)
        out = torch.baddbmm(b1[:, None, :], a1, W1.transpose(1, 2))
        g_out = (2.0 / out[0].numel()) * (out - y)  # d mean((out - y)^2) / d out, per member
        gW1 = torch.bmm(g_out.transpose(1, 2), a1)
        gb1 = g_out.sum(1)
        g_h = torch.bmm(g_out, W1) * (h > 0)
        gW0 = (g_h.transpose(0, 1).reshape(len(X), P * H_).T @ X).reshape(P, H_, -1)
        gb0 = g_h.sum(1)
        for g, w in ((gW0, W0), (gb0, b0), (gW1, W1), (gb1, b1)):
            view = (P,) + (1,) * (w.dim() - 1)
            d_ = g + wd.reshape(view) * w
            buf = mom.reshape(view) * d_ + d_  # one momentum step from a buffer d_ (same arithmetic)
            _ = w - lr.reshape(view) * buf

    def loss_batched(p):
        h = torch.baddbmm(p["b0"][:, None, :], Xb, p["W0"].transpose(1, 2)).relu()
        out = torch.baddbmm(p["b1"][:, None, :], h, p["W1"].transpose(1, 2))
        return ((out - y) ** 2).mean(dim=(1, 2))

    def autograd_step() -> None:
        w = {k: v.detach().requires_grad_() for k, v in params.items()}
        gs = torch.autograd.grad(loss_batched(w).sum(), list(w.values()))
        for (_, v), g in zip(w.items(), gs):
            view = (P,) + (1,) * (v.dim() - 1)
            d_ = g + wd.reshape(view) * v
            _ = v.detach() - lr.reshape(view) * (mom.reshape(view) * d_ + d_)

    one = lambda p: ((mlp_forward(p, X) - y) ** 2).mean()  # noqa: E731
    vg = torch.func.vmap(torch.func.grad(one))

    def vmap_step() -> None:
        gs = vg(params)
        for k, v in params.items():
            view = (P,) + (1,) * (v.dim() - 1)
            d_ = gs[k] + wd.reshape(view) * v
            _ = v - lr.reshape(view) * (mom.reshape(view) * d_ + d_)

    loss = pop.vmap_loss(mlp_forward, lambda out, t: ((out - t) ** 2).mean())

    def tuner(mode: str, tuned: tuple[str, ...], share: bool = True) -> OnlineTuner:
        cfg = TunerConfig(tuned=tuned, mode=mode, interval=10, lookback=5, share_gradient=share)  # type: ignore[arg-type]
        return OnlineTuner(params, raw, space, SGD(), loss, loss, update_form=space.names, config=cfg)

    random = tuner("none", ())
    random.step((X, y))  # momentum buffers exist from here on, as in every later step
    rows = {
        "hand": median_ms(hand, a.repeats),
        "autograd": median_ms(autograd_step, a.repeats),
        "vmap": median_ms(vmap_step, a.repeats),
        "tuner": median_ms(lambda: random.step((X, y)), a.repeats),
    }
    best = min(rows["hand"], rows["autograd"], rows["vmap"])  # the fastest code written for this population
    print(f"\n{'one weight step':>16} {'median ms':>10} {'/ best batched':>15}")
    for name, ms in rows.items():
        print(f"{name:>16} {ms:10.2f} {ms / best:15.2f}")

    def run(t: OnlineTuner, steps: int = 100) -> None:
        t.run(steps, lambda: (X, y), lambda: (Xv, yv))

    tuned = ("lr", "weight_decay", "momentum")
    runs = {"random": tuner("none", ()), "ours": tuner("ift", tuned), "ours, no sharing": tuner("ift", tuned, False)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for t in runs.values():
        run(t, 20)
    for _ in range(a.runs):  # alternate, so load drifts hit all alike
        for name, t in runs.items():
            t0 = CLOCK()
            run(t)
            times[name].append(CLOCK() - t0)
    m = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"\n100 weight steps (median of {a.runs} alternating runs): random {m['random']:.3f} s")
    for name in ("ours", "ours, no sharing"):
        print(
            f"ours-wd-lr-m (T = 10, i = 5{'' if name == 'ours' else ', share_gradient=False'}) {m[name]:.3f} s: "
            f"one-pass overhead {m[name] / m['random']:.3f}x"
        )
    paired = statistics.median(a / b for a, b in zip(times["ours"], times["ours, no sharing"]))
    print(f"sharing the hyperparameter step's gradient: {paired:.3f}x the time (median of per-run ratios)")


if __name__ == "__main__":
    main()
