"""Runs that survive anything: real ``bilevel run`` processes killed with SIGKILL, damaged state files, two
processes on one output directory.

A killed run is resumed by re-running the same command; its results.json must equal an uninterrupted
run's number for number (timing keys aside). Kills land at chosen points through the atomic writer's
test hook (``BILEVEL_FAULT_INJECT``, :mod:`bilevel.rundir`: ``kill-in-write:N:GLOB`` truncates the N-th
matching temporary file to half and SIGKILLs the process mid-write) and at a seeded random time from
outside.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bilevel.rundir import OWNER_NAME, TMP_SUFFIX, atomic_savefig
from bilevel_studies import cli

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

#: keys whose values are wall-clock times or say what a re-run reused: the only ones allowed to differ
IGNORED = {"seconds", "wall_seconds", "resumed"}
METHODS = "random,ours-wd-lr-m,diff-through-opt,baydin"


def _clarke(data_dir, out) -> list[str]:
    return [
        "run",
        "clarke",
        "--dataset",
        "energy",
        "--methods",
        METHODS,
        "--inits",
        "2",
        "--steps",
        "60",
        "--checkpoint-every",
        "7",
        "--interval",
        "5",
        "--threads",
        "1",
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
    ]


def _overfit(data_dir, out) -> list[str]:
    return [
        "run",
        "overfit-validation",
        "--models",
        "linear,mlp",
        "--iterations",
        "10",
        "--eval-every",
        "5",
        "--test-size",
        "100",
        "--steps",
        "2",
        "--threads",
        "1",
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
    ]


def _start(argv: list[str], fault: str | None = None, log: Path | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "BILEVEL_FAULT_INJECT"}
    env.update(MPLBACKEND="Agg", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", BILEVEL_DOWNLOAD="0")
    if fault:
        env["BILEVEL_FAULT_INJECT"] = fault
    out = open(log, "w") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "bilevel_studies.cli", *argv], env=env, stdout=out, stderr=subprocess.STDOUT
    )


def _run(argv: list[str], fault: str | None = None, timeout: float = 120) -> int:
    return _start(argv, fault).wait(timeout)


def _numbers(doc, path=""):
    """``doc`` without the timing keys, and without ``config.out`` (where the run was written)."""
    if isinstance(doc, dict):
        return {
            k: _numbers(v, f"{path}.{k}")
            for k, v in doc.items()
            if k not in IGNORED and not (k == "out" and path.endswith("config"))
        }
    if isinstance(doc, list):
        return [_numbers(v, path) for v in doc]
    return doc


def _differences(a, b, path="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def _results(out: Path) -> dict:
    return _numbers(json.loads((out / "results.json").read_text()))


def _temporaries(out: Path) -> list[Path]:
    return sorted(out.rglob(f"*{TMP_SUFFIX}"))


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _wait_for_lock(out: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Until ``proc`` holds ``out``'s lock (its pid in the lock's side file)."""
    owner = out / OWNER_NAME
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if owner.exists() and json.loads(owner.read_text() or "{}").get("pid") == proc.pid:
            return
        time.sleep(0.05)
    raise AssertionError("the run ended (or hung) before taking the lock")


def _step(checkpoint: Path) -> int:
    return torch.load(checkpoint, weights_only=True)["tuner"]["t"]


def test_killed_clarke_run_resumes_exactly(tmp_path, data_dir, one_thread, capsys):
    """random, ours-wd-lr-m, diff-through-opt and baydin, each killed in the middle of its training (SIGKILL during
    a checkpoint write, and from outside at a seeded random time), then resumed: zero differences."""
    reference = _start(_clarke(data_dir, tmp_path / "reference"))  # in parallel with the killed runs
    cut = tmp_path / "cut"
    ckpt = cut / "checkpoints"
    argv = _clarke(data_dir, cut)
    # checkpoints at t = 7, 14, ..., 56 and 60: nine writes per method trained from scratch
    # 1. during random's 3rd checkpoint write (t=21): its t=14 checkpoint stays, the half-written file is a stray
    assert _run(argv, "kill-in-write:3:*.pt") == -signal.SIGKILL
    assert _step(ckpt / "random.pt") == 14 and _temporaries(cut)
    # 2. random resumes (7 writes to t=60, finished); ours-wd-lr-m is killed writing t=21
    assert _run(argv, "kill-in-write:10:*.pt") == -signal.SIGKILL
    assert (cut / "methods" / "random.json").exists() and _step(ckpt / "ours-wd-lr-m.pt") == 14
    # 3. the same for diff-through-opt: resumed from t=14, in the middle of an unrolled window (interval 5)
    assert _run(argv, "kill-in-write:10:*.pt") == -signal.SIGKILL
    assert (cut / "methods" / "ours-wd-lr-m.json").exists() and _step(ckpt / "diff-through-opt.pt") == 14
    # 4. the same for baydin, with slowed checkpoint writes: while it holds the directory, a second run on it
    #    stops at once, in one line naming the holder
    slow = _start(argv, "sleep-in-write:0.25:*.pt,kill-in-write:10:*.pt")
    _wait_for_lock(cut, slow)
    capsys.readouterr()
    t0 = time.monotonic()
    assert cli.main(argv) == 3
    said = capsys.readouterr().out
    assert time.monotonic() - t0 < 2 and f"pid {slow.pid}" in said and "in use by another run" in said
    assert len(said.strip().splitlines()) == 1
    assert slow.wait(60) == -signal.SIGKILL
    assert (cut / "methods" / "diff-through-opt.json").exists() and _step(ckpt / "baydin.pt") == 14
    # 5. baydin killed from outside at a seeded random time (its remaining writes sleep 1.75 s in all)
    slow = _start(argv, "sleep-in-write:0.25:*.pt")
    _wait_for_lock(cut, slow)
    time.sleep(random.Random(13).uniform(0.2, 1.5))
    slow.send_signal(signal.SIGKILL)
    assert slow.wait(30) == -signal.SIGKILL
    assert not (cut / "results.json").exists()
    # 6. the same command finishes the run (the killed holder's lock was released by the system)
    assert _run(argv) == 0
    assert reference.wait(120) == 0
    assert _differences(_results(tmp_path / "reference"), _results(cut)) == []
    assert _temporaries(cut) == [] and not (cut / OWNER_NAME).exists()
    assert not any(ckpt.iterdir())


def test_killed_study_with_parts_resumes_exactly(tmp_path, data_dir, one_thread, capsys):
    """overfit-validation (one part per model) killed while writing its second part; a damaged part."""
    reference = _start(_overfit(data_dir, tmp_path / "reference"))
    cut = tmp_path / "cut"
    argv = _overfit(data_dir, cut)
    assert _run(argv, "kill-in-write:2:*.json") == -signal.SIGKILL  # parts/linear.json, then parts/mlp.json
    assert (cut / "parts" / "linear.json").exists() and not (cut / "parts" / "mlp.json").exists()
    assert _run(argv) == 0
    assert json.loads((cut / "results.json").read_text())["resumed"] == ["linear"]
    assert reference.wait(120) == 0
    ref = _results(tmp_path / "reference")
    assert _differences(ref, _results(cut)) == []
    # a truncated part is named in a warning, set aside and recomputed (here in this process)
    part = cut / "parts" / "mlp.json"
    part.write_text(part.read_text()[:200])
    capsys.readouterr()
    assert cli.main(argv) == 0
    said = capsys.readouterr().out
    assert "warning:" in said and str(part) in said
    assert len(list(part.parent.glob("mlp.json.corrupt-*"))) == 1
    again = json.loads((cut / "results.json").read_text())
    assert again["resumed"] == ["linear"]
    assert _differences(ref, _numbers(again)) == []


def test_damaged_state_files_are_set_aside_and_recomputed(tmp_path, data_dir, one_thread, capsys, monkeypatch):
    """A truncated checkpoint, methods file or config.json: a warning naming it, the file moved aside (not
    deleted), the work recomputed from the last good state, the same numbers."""
    base = [
        "run",
        "clarke",
        "--dataset",
        "energy",
        "--methods",
        "random,baydin",
        "--inits",
        "2",
        "--steps",
        "30",
        "--checkpoint-every",
        "7",
        "--threads",
        "1",
        "--data-dir",
        str(data_dir),
    ]
    assert cli.main([*base, "--out", str(tmp_path / "ref")]) == 0
    ref = _results(tmp_path / "ref")
    out = tmp_path / "cut"

    @__import__("contextlib").contextmanager
    def interrupting():  # Ctrl-C at baydin's step 25 (random finished, baydin checkpointed at 21)
        def factory(name, total):
            count = [0]

            def advance(n=1):
                count[0] += n
                if name == "baydin" and count[0] >= 25:
                    raise KeyboardInterrupt

            return advance

        yield factory

    monkeypatch.setattr(cli, "progress_bars", interrupting)
    assert cli.main([*base, "--out", str(out)]) == 130
    monkeypatch.undo()
    ckpt, done, config = out / "checkpoints" / "baydin.pt", out / "methods" / "random.json", out / "config.json"
    assert ckpt.exists() and done.exists()
    for f in (ckpt, done, config):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    capsys.readouterr()
    assert cli.main([*base, "--out", str(out)]) == 0
    said = capsys.readouterr().out
    for f in (ckpt, done, config):
        assert str(f) in said, f
        assert len(list(f.parent.glob(f"{f.name}.corrupt-*"))) == 1, f
    assert "baydin starts again from step 0" in said and "random is trained again" in said
    assert _differences(ref, _results(out)) == []


class _RunsCode:
    """Unpickling this runs code: it writes a marker file (a tampered checkpoint)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_a_checkpoint_that_would_run_code_is_refused_set_aside_and_recomputed(tmp_path, data_dir, one_thread, capsys):
    """A tampered ``checkpoints/METHOD.pt`` whose unpickling would run code: ``torch.load(weights_only=True)``
    refuses it (the code does not run), one warning line names it, it is moved aside, the method is trained
    from step 0, and the numbers are those of a clean run."""
    base = ["run", "clarke", "--dataset", "energy", "--methods", "random", "--inits", "2", "--steps", "20"]
    base += ["--checkpoint-every", "7", "--threads", "1", "--data-dir", str(data_dir)]
    assert cli.main([*base, "--out", str(tmp_path / "ref")]) == 0
    out, marker = tmp_path / "cut", tmp_path / "marker"
    (out / "checkpoints").mkdir(parents=True)
    ckpt = out / "checkpoints" / "random.pt"
    torch.save({"tuner": _RunsCode(marker)}, ckpt)
    capsys.readouterr()
    assert cli.main([*base, "--out", str(out)]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "warning:" in line]
    assert not marker.exists()
    assert len(said) == 1 and str(ckpt) in said[0] and "weights_only=True" in said[0], said
    assert "random starts again from step 0" in said[0]
    assert len(list(ckpt.parent.glob("random.pt.corrupt-*"))) == 1 and not ckpt.exists()
    assert _differences(_results(tmp_path / "ref"), _results(out)) == []


@pytest.mark.parametrize(
    "method,cold", [("random-xlr", False), ("ours-wd-lr-m", True), ("diff-through-opt", True), ("baydin", False)]
)
def test_checkpoint_holds_every_piece_of_loop_state(method, cold, one_thread):
    """Mini-batches (a shuffling generator), cold starts, the unrolled window, Baydin's previous step, the
    hyper-optimiser, the x LR callback: saved and loaded (through bytes) at odd steps, with the global random
    state disturbed in between, a run ends exactly where an uninterrupted one does."""
    import io

    from bilevel.loop import Every
    from bilevel_studies.clarke.config import ClarkeConfig
    from bilevel_studies.clarke.methods import method_results, start_method
    from bilevel_studies.clarke.problem import load_problem

    torch.set_num_threads(1)
    cfg = ClarkeConfig(dataset="digits", inits=2, steps=30, interval=5, lookback=3, batch_size=32)
    problem = load_problem(cfg)

    def start():
        run = start_method(cfg, problem, method)
        if cold:
            run.tuner.schedule = Every(5, cold_steps=3)  # Vicol et al.'s cold start
        return run

    full = start()
    full.advance(30)
    run, t = start(), 0
    for cut in (3, 11, 17, 26, 30):
        run.advance(cut - t)
        t = cut
        buf = io.BytesIO()
        torch.save(run.state_dict(), buf)
        buf.seek(0)
        torch.manual_seed(t)
        run = start()
        run.load_state_dict(torch.load(buf, weights_only=True))  # plain data: no pickled object
    a, b = method_results(cfg, problem, full), method_results(cfg, problem, run)
    assert _differences(_numbers(a), _numbers(b)) == []
    assert all(torch.equal(full.tuner.params[k], run.tuner.params[k]) for k in full.tuner.params)


def test_figures_are_written_atomically(tmp_path):
    """A figure whose drawing fails half-way leaves the previous file and no temporary behind."""
    from matplotlib.figure import Figure

    fig = Figure()
    fig.add_subplot().plot([1, 2, 3])
    path = tmp_path / "f.png"
    atomic_savefig(fig, path)
    before = path.read_bytes()
    assert before[:8] == b"\x89PNG\r\n\x1a\n"

    class Broken:
        def savefig(self, target, **kw):
            Path(target).write_bytes(b"\x89PNG half")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_savefig(Broken(), path)
    assert path.read_bytes() == before and _temporaries(tmp_path) == []
