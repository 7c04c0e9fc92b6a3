"""Data-parallel online tuning under ``torchrun``: SGD's learning rate, momentum and weight decay of a small CNN.

Run with ``torchrun --nproc_per_node=2 examples/ddp_digits.py [--small]`` (one process works too:
``python examples/ddp_digits.py``). Each rank sees its shard of every global batch (``DistributedSampler``),
the model is wrapped in ``DistributedDataParallel`` as usual, and :class:`bilevel.Tuner` averages every
derivative the hypergradient needs over the ranks (:mod:`bilevel.distributed`), so every rank holds the same
weights and hyperparameters, and the run follows the one-process run on the global batches.
"""

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import bilevel


def main(epochs=5, n_train=960, global_batch=64, seed=0, dtype=torch.float32, progress=False):
    """Tune on this process's shard; returns rank 0's view (every rank's is the same)."""
    distributed = "RANK" in os.environ
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X, dtype=dtype).reshape(-1, 1, 8, 8) / 16, torch.tensor(y)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    train_set = TensorDataset(X[:n_train], y[:n_train])
    val_set, test = TensorDataset(X[1000:1384], y[1000:1384]), (X[1400:], y[1400:])
    torch.manual_seed(seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10)).to(dtype)
    if distributed:
        model = DistributedDataParallel(model)
    # every global batch is the same set of examples whatever the number of processes: rank r takes every
    # world-th index of the one shuffled order (one process: all of them)
    train_sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=seed, drop_last=True)
    val_sampler = DistributedSampler(val_set, world, rank, shuffle=False, drop_last=True)
    train = DataLoader(train_set, batch_size=global_batch // world, sampler=train_sampler, drop_last=True)
    val = DataLoader(val_set, batch_size=128 // world, sampler=val_sampler, drop_last=True)
    tuner = bilevel.Tuner(
        model,
        F.cross_entropy,
        bilevel.optim.SGD(lr=3e-3, momentum=0.5, weight_decay=1e-4),
        tune=("lr", "momentum", "weight_decay"),
        progress=progress and rank == 0,
    )
    start = time.perf_counter()
    tuner.fit(train, val, epochs=epochs)
    seconds = time.perf_counter() - start
    inner = model.module if distributed else model
    inner.eval()
    with torch.no_grad():
        acc = (inner(test[0]).argmax(1) == test[1]).float().mean().item()
    return {
        "world": world,
        "rank": rank,
        "test_acc": acc,
        "val_loss": tuner.history[-1]["val_loss"],
        "hparams": tuner.hparams,
        "seconds": seconds,
        "steps": tuner.loop.t,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", action="store_true", help="2 epochs (a few seconds)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--float64", action="store_true", help="train in float64 (to compare with one process)")
    parser.add_argument("--json", default=None, help="write rank 0's result to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = main(epochs=2 if args.small else 5, dtype=torch.float64 if args.float64 else torch.float32)
    if out["rank"] == 0:
        hp = ", ".join(f"{k} {v:.6g}" for k, v in out["hparams"].items())
        print(
            f"{out['world']} process(es): test accuracy {out['test_acc']:.4f}  val loss {out['val_loss']:.4f}  "
            f"{out['steps']} steps in {out['seconds']:.1f} s  ({hp})"
        )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f)
    if dist.is_initialized():
        dist.destroy_process_group()
