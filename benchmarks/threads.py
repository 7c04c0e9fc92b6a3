"""Wall time of every entry point at 1 and 2 threads and with ``--threads auto``, alone and beside a second run.

Each command runs its default model and data with fewer steps (``CMDS``: the per-step work is the
default's, the run is shorter), as a fresh ``python -m bilevel_studies.cli`` process. Conditions:

* ``alone``: one process on the machine;
* ``paired``: two identical processes started together (a user running two experiments), the
  wall time of the slower one.

For ``auto`` the thread count each process chose is read back from its ``OUT/.threads``.

    python benchmarks/threads.py --json threads.json                  # everything (about 25 min on 2 cores)
    python benchmarks/threads.py --commands demo,clarke --conditions paired --threads 1,auto,2

Run it on an otherwise idle machine: the ``alone`` rows mean nothing under load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: default model and data, fewer steps (the wall time then still includes start-up: imports, data loading)
CMDS = {
    "demo": ["demo", "--steps", "300"],
    "anti-distill": ["run", "anti-distill"],
    "augment": ["run", "augment", "--steps", "40", "--eval-size", "200", "--aug-samples", "1"],
    "bayesopt": ["run", "bayesopt", "--repeats", "1", "--samples", "6", "--startup", "3"],
    "clarke": ["run", "clarke", "--steps", "300"],
    "distill": ["run", "distill", "--hyper-steps", "20"],
    "inverse-study": ["run", "inverse-study", "--hyper-steps", "10"],
    "lstm": ["run", "lstm", "--steps", "20", "--eval-windows", "5", "--overfit-steps", "20"],
    "overfit-validation": ["run", "overfit-validation", "--iterations", "100"],
    "param-space": ["run", "param-space"],
    "rings": ["run", "rings", "--steps", "500"],
    "sensitivity": ["run", "sensitivity", "--steps", "40"],
    "val-split": ["run", "val-split", "--iterations", "200"],
}


def start(name: str, threads: str, k: int, work: Path) -> tuple[subprocess.Popen, Path]:
    out = work / f"{name}-{threads}-{k}"
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-m", "bilevel_studies.cli", *CMDS[name], "--out", str(out), "--threads", threads]
    err = open(str(out) + ".err", "w")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=dict(os.environ, MPLBACKEND="Agg")), out


def wall_times(procs: list[subprocess.Popen]) -> list[float]:
    t0, ends = time.perf_counter(), {}
    while len(ends) < len(procs):
        for i, p in enumerate(procs):
            if i not in ends and p.poll() is not None:
                ends[i] = time.perf_counter() - t0
        time.sleep(0.05)
    return [ends[i] for i in range(len(procs))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--commands", default=",".join(CMDS))
    ap.add_argument("--conditions", default="alone,paired")
    ap.add_argument("--threads", default="1,2,auto")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for cond in a.conditions.split(","):
            for name in a.commands.split(","):
                for threads in a.threads.split(","):
                    n = 1 if cond == "alone" else 2
                    started = [start(name, threads, k, work) for k in range(n)]
                    ts = wall_times([p for p, _ in started])
                    rcs = [p.returncode for p, _ in started]
                    chosen = []
                    for _, out in started:
                        f = out / ".threads"
                        chosen.append(json.loads(f.read_text())["threads"] if f.exists() else None)
                    row = results.setdefault(name, {})
                    row[f"{cond}-{threads}"] = max(ts)
                    row[f"{cond}-{threads}-chosen"] = chosen
                    print(f"{name:>18} {cond:>6} threads={threads:>4}: {max(ts):6.1f} s  exit {rcs}  chosen {chosen}")
                    if a.json:
                        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
