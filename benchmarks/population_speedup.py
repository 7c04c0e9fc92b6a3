"""Vectorised population vs a Python loop of single initialisations (Clarke et al.'s many-initialisation protocol).

    python benchmarks/population_speedup.py --dataset energy --inits 50 --steps 200 --threads 1

Times ``ours-wd-lr-m`` (and ``random``) trained as one vmap-ed population of N members
against N separate runs of one member each (same seeds, same results), and checks that
the final test losses agree.
"""

from __future__ import annotations

import argparse
import time

import torch

from bilevel_studies.clarke.config import ClarkeConfig
from bilevel_studies.clarke.problem import load_problem
from bilevel_studies.clarke.running import run_method


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="energy")
    ap.add_argument("--inits", type=int, default=50)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--methods", default="random,ours-wd-lr-m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"{a.dataset}, {a.inits} initialisations, {a.steps} steps, torch threads={a.threads}")
    print(f"{'method':>14} {'vectorised s':>13} {'loop s':>9} {'speed-up':>9} {'max |diff| of final test loss':>30}")
    for method in a.methods.split(","):
        cfg = ClarkeConfig(
            dataset=a.dataset,
            inits=a.inits,
            steps=a.steps,
            checkpoint_every=a.steps,
            record_every=a.steps,
            data_dir=a.data_dir,
            dtype="float64",
        )
        problem = load_problem(cfg)
        run_method(ClarkeConfig(**{**cfg.__dict__, "steps": 2, "inits": 2}), problem, method)  # warm-up
        t = time.perf_counter()
        together = run_method(cfg, problem, method)["final_test_loss"]
        t_vec = time.perf_counter() - t
        t = time.perf_counter()
        alone = []
        for i in range(a.inits):
            one = ClarkeConfig(**{**cfg.__dict__, "inits": 1})
            alone += run_method(one, problem, method, first=i)["final_test_loss"]  # member i alone
        t_loop = time.perf_counter() - t
        diff = max((abs(x - y) for x, y in zip(together, alone) if x is not None and y is not None), default=0.0)
        print(f"{method:>14} {t_vec:13.2f} {t_loop:9.2f} {t_loop / t_vec:8.1f}x {diff:30.2e}")


if __name__ == "__main__":
    main()
