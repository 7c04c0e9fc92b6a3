"""Time per weight step against population size, and the full Clarke et al. Energy protocol, on a GPU.

For Clarke et al. (2022)'s protocol every method trains P initialisations at once as one vmap-ed
population (:mod:`bilevel.population`). This measures, on ``--device`` (default ``cuda``):

1. seconds per weight step of ``random`` and ``ours-wd-lr-m`` (T = 10, i = 5, the hypergradient
   steps included: 100-step windows) for P = 1, 4, 16, 64, 256, 1024 on UCI Energy (full batch)
   and Fashion-MNIST (batch 50), timed with ``torch.cuda.synchronize()`` around each window, and the
   number of host-device synchronisations a window triggers (``torch.cuda.set_sync_debug_mode``
   counts them as warnings);
2. with ``--protocol``, the wall time of the full Energy protocol, every method x 200
   initialisations x 4,000 steps (``bilevel run clarke --dataset energy --methods all --inits 200
   --steps 4000 --device cuda``), run as a subprocess.

Writes ``--out`` (JSON) and prints a table. It also runs on a CPU (``--device cpu --sizes 1,4 --steps
20``) to check it works.

    python benchmarks/gpu_population_sweep.py --json gpu.json --protocol
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

import torch

from bilevel_studies.clarke.config import ClarkeConfig
from bilevel_studies.clarke.methods import MethodRun, start_method
from bilevel_studies.clarke.problem import load_problem


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_window(run: MethodRun, steps: int, device: str) -> tuple[float, int]:
    """(seconds per weight step over ``steps`` steps, host-device synchronisations in them)."""
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.startswith("cuda"):
            torch.cuda.set_sync_debug_mode("warn")
        t0 = time.perf_counter()
        run.tuner.run(steps, run.train_batches, run.val_batches)
        sync(device)
        dt = time.perf_counter() - t0
        if device.startswith("cuda"):
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    return dt / steps, syncs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--datasets", default="energy,fashion-mnist")
    ap.add_argument("--methods", default="random,ours-wd-lr-m")
    ap.add_argument("--sizes", default="1,4,16,64,256,1024")
    ap.add_argument("--steps", type=int, default=100, help="weight steps per timed window")
    ap.add_argument("--protocol", action="store_true", help="also time the full Energy protocol")
    ap.add_argument("--protocol-out", default="runs/gpu-energy-protocol")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--json", default="gpu_population_sweep.json")
    a = ap.parse_args()
    info = {
        "device": a.device,
        "name": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(info)
    rows = []
    for dataset in a.datasets.split(","):
        for P in map(int, a.sizes.split(",")):
            cfg = ClarkeConfig(
                dataset=dataset, inits=P, steps=a.steps, device=a.device, data_dir=a.data_dir, record_every=10**9
            )
            problem = load_problem(cfg)
            for method in a.methods.split(","):
                run = start_method(cfg, problem, method)
                time_window(run, 20, a.device)  # warm-up: allocator, kernels, cuDNN choices
                per_step, syncs = time_window(run, a.steps, a.device)
                row = dict(dataset=dataset, P=P, method=method, ms_per_step=1e3 * per_step, syncs=syncs)
                rows.append(row)
                print(
                    f"{dataset:>14} P={P:5d} {method:>13}: {1e3 * per_step:8.3f} ms/step, "
                    f"{1e3 * per_step / P:8.4f} ms/member-step, {syncs} syncs in {a.steps} steps",
                    flush=True,
                )
    doc: dict = {"info": info, "rows": rows}
    if a.protocol:
        cmd = [
            sys.executable,
            "-m",
            "bilevel_studies.cli",
            "run",
            "clarke",
            "--dataset",
            "energy",
            "--methods",
            "all",
            "--inits",
            "200",
            "--steps",
            "4000",
            "--device",
            a.device,
            "--out",
            a.protocol_out,
        ]
        if a.data_dir:
            cmd += ["--data-dir", a.data_dir]
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, env=dict(os.environ))
        doc["protocol"] = {"command": " ".join(cmd[2:]), "seconds": time.perf_counter() - t0, "returncode": rc}
        print(f"full Energy protocol: {doc['protocol']['seconds']:.0f} s (exit {rc})")
    with open(a.json, "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
