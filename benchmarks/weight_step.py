"""The front door's weight step against a plain ``torch.optim`` step, as the number of weight tensors grows.

Between two hyperparameter steps the tuner takes weight steps with its differentiable twin of the optimiser
(:mod:`bilevel.updates`); its cost beyond the plain step is Python work per weight *tensor* (the update rule,
the finiteness check, ``functional_call``'s swap), so it grows with the number of tensors, not of weights.
This times one weight step (``Tuner.loop.weight_step``, hyperparameters tuned, no hyperparameter step) against
``opt.zero_grad(); loss.backward(); opt.step()`` with ``torch.optim`` on the same module and batch, in
alternating blocks, one thread, CPU time, for an MLP of ``--depths`` hidden layers (2 tensors each) and the
digits CNN of ``benchmarks/overhead.py`` (6 tensors):

    python benchmarks/weight_step.py --depths 1,10,30 --optimizers sgd,adam
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import bilevel


def mlp(depth: int, width: int = 32) -> nn.Module:
    """``depth`` hidden Linear-ReLU layers of ``width`` units on 32 inputs, 10 outputs."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def cnn() -> nn.Module:
    """The digits CNN of ``benchmarks/overhead.py`` (11,498 weights in 6 tensors)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 64, 10),
    )


def time_pair(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: str, blocks: int, reps: int) -> dict:
    """Median ms per step of the plain step and the tuner's weight step, and the median of per-block ratios."""
    if optimizer == "sgd":
        twin: object = bilevel.optim.SGD(lr=0.01, momentum=0.9, weight_decay=1e-4)
        plain_opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        tune = ("lr", "momentum", "weight_decay")
    else:
        twin = bilevel.optim.Adam(lr=1e-3, weight_decay=1e-4)
        plain_opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
        tune = ("lr", "weight_decay")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuner = bilevel.Tuner(model, loss_fn=F.cross_entropy, optimizer=twin, tune=tune, progress=False)

    def plain() -> None:
        plain_opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        plain_opt.step()

    def weight_step() -> None:
        tuner.loop.weight_step((x, y))

    times: dict[str, list[float]] = {"plain": [], "tuner": []}
    fns: dict[str, Callable[[], None]] = {"plain": plain, "tuner": weight_step}
    for f in fns.values():  # warm up
        for _ in range(5):
            f()
    for b in range(blocks):
        for name in ("plain", "tuner") if b % 2 == 0 else ("tuner", "plain"):
            t = time.process_time()
            for _ in range(reps):
                fns[name]()
            times[name].append((time.process_time() - t) / reps * 1e3)
    ratios = [t / p for p, t in zip(times["plain"], times["tuner"])]
    return {
        "tensors": len(list(model.parameters())),
        "plain_ms": statistics.median(times["plain"]),
        "tuner_ms": statistics.median(times["tuner"]),
        "ratio": statistics.median(ratios),
    }


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", default="1,10,30", help="hidden layers of the MLPs (comma-separated)")
    p.add_argument("--optimizers", default="sgd,adam")
    p.add_argument("--blocks", type=int, default=16, help="alternating blocks per model and optimiser")
    p.add_argument("--reps", type=int, default=30, help="steps per block")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    print(f"{'model':<12} {'optimiser':<9} {'tensors':>7} {'plain ms':>9} {'tuner ms':>9} {'x plain':>8}")
    for optimizer in a.optimizers.split(","):
        models: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [("digits CNN", cnn, (64, 1, 8, 8))]
        models += [(f"MLP depth {d}", lambda d=d: mlp(d), (64, 32)) for d in map(int, a.depths.split(","))]
        for name, build, shape in models:
            torch.manual_seed(0)
            model = build()
            x, y = torch.randn(*shape), torch.randint(0, 10, (64,))
            r = {"model": name, "optimizer": optimizer, **time_pair(model, x, y, optimizer, a.blocks, a.reps)}
            rows.append(r)
            print(
                f"{name:<12} {optimizer:<9} {r['tensors']:>7} {r['plain_ms']:>9.2f} {r['tuner_ms']:>9.2f} "
                f"{r['ratio']:>8.2f}"
            )
    return rows


if __name__ == "__main__":
    main()
