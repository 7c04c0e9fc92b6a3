"""Time per weight step and per hyperparameter step of bilevel.Tuner, data-parallel vs one process, and the bytes
all-reduced per hyperparameter step.

    torchrun --nproc_per_node=2 benchmarks/ddp_step.py --threads 1     # 2 processes x 1 thread
    python benchmarks/ddp_step.py --threads 2                           # 1 process x 2 threads

Both see the same global batches (64 digits per weight step, 128 per validation batch; each of N ranks holds 1/N
of them). The model is the 2-conv CNN of the digits examples (Conv(1,8,3)-ReLU-Conv(8,16,3)-ReLU-Linear), the
tuned hyperparameters SGD's lr, momentum and weight decay (IFT on the update map, AutoNeumann with 5 steps).
Every ``torch.distributed.all_reduce`` is counted during the timed hyperparameter steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import bilevel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--weight-steps", type=int, default=60)
    p.add_argument("--hyper-steps", type=int, default=12)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16, torch.tensor(y)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(1024, 10),
    )
    if distributed:
        model = nn.parallel.DistributedDataParallel(model)
    tuner = bilevel.Tuner(
        model,
        F.cross_entropy,
        bilevel.optim.SGD(lr=0.01, momentum=0.5, weight_decay=1e-4),
        tune=("lr", "momentum", "weight_decay"),
        progress=False,
    )
    b, vb = 64 // world, 128 // world
    batch = (X[rank * b : (rank + 1) * b], y[rank * b : (rank + 1) * b])
    vbatch = (X[1000 + rank * vb : 1000 + (rank + 1) * vb], y[1000 + rank * vb : 1000 + (rank + 1) * vb])
    loop = tuner.loop
    for _ in range(3):  # warm-up, and AutoNeumann's power iteration on its first call
        loop.step(batch)
        loop.hyper_step(batch, vbatch)
    weight, hyper = [], []
    for _ in range(a.weight_steps):
        t0 = time.perf_counter()
        loop.step(batch)
        weight.append(time.perf_counter() - t0)
    calls: list[int] = []
    if distributed:
        original = dist.all_reduce

        def counted(tensor: torch.Tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(tensor.numel() * tensor.element_size())
            return original(tensor, *args, **kwargs)

        dist.all_reduce = counted  # type: ignore[assignment]
    for _ in range(a.hyper_steps):
        t0 = time.perf_counter()
        loop.hyper_step(batch, vbatch)
        hyper.append(time.perf_counter() - t0)
    if distributed:
        dist.all_reduce = original  # type: ignore[assignment]
    n_weights = sum(v.numel() for v in loop.params.values())
    if rank == 0:
        per = len(calls) / a.hyper_steps
        print(
            f"{world} process(es) x {a.threads} thread(s), {n_weights} weights: weight step "
            f"{1e3 * statistics.median(weight):.2f} ms, hyperparameter step {1e3 * statistics.median(hyper):.2f} ms "
            f"(medians of {a.weight_steps} / {a.hyper_steps})"
        )
        if distributed:
            print(
                f"all-reduces per hyperparameter step: {per:.0f}, {sum(calls) / a.hyper_steps / 1e3:.1f} kB "
                f"(sizes in bytes: {calls[: int(per)]})"
            )
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
