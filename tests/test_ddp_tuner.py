"""bilevel.Tuner under torchrun: 2 CPU processes (gloo) follow the one-process run on the same global batches.

Runs ``examples/ddp_digits.py`` (DistributedDataParallel model, DistributedSampler shards) with ``torchrun
--nproc_per_node=2`` and as one process, in float64, and compares the tuned hyperparameters, the validation loss
and the test accuracy. The derivative-level checks (every product all-reduced once, bitwise-identical replicas)
are in tests/test_distributed.py.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd + ["--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.skipif(not shutil.which("torchrun", path=str(Path(sys.executable).parent)), reason="no torchrun")
def test_two_processes_follow_the_one_process_run(tmp_path):
    script = ["examples/ddp_digits.py", "--small", "--float64"]
    one = _run([sys.executable, *script], tmp_path / "one.json")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    two = _run(
        [torchrun, "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *script],
        tmp_path / "two.json",
    )
    assert (one["world"], two["world"]) == (1, 2) and one["steps"] == two["steps"] == 30
    for k, v in one["hparams"].items():
        assert two["hparams"][k] == pytest.approx(v, rel=1e-8), k
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-8)
    assert two["test_acc"] == one["test_acc"]
    assert one["hparams"]["lr"] != pytest.approx(3e-3, rel=1e-3)  # something was tuned
