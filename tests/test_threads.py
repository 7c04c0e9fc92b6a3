"""The thread policy (:mod:`bilevel.threads`): idle cores at the start of a run, at least 1, at most ``limit``."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from bilevel import threads


@pytest.mark.parametrize(
    ("n_cores", "busy", "expected"),
    [(2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.0, 1), (2, 3.0, 1), (16, 0.0, 4), (16, 13.2, 3), (1, 0.0, 1)],
)
def test_auto_takes_the_idle_cores(n_cores, busy, expected):
    assert threads.auto_threads(n_cores=n_cores, busy=busy) == expected


def test_explicit_numbers_are_kept_and_bad_ones_refused():
    assert threads.resolve_threads(3) == 3
    for bad in (0, -1, 1.5, "two", True):
        with pytest.raises(ValueError, match="positive integer or 'auto'"):
            threads.resolve_threads(bad)  # type: ignore[arg-type]


def test_set_threads_sets_torch():
    before = torch.get_num_threads()
    try:
        assert threads.set_threads(1) == 1 and torch.get_num_threads() == 1
        n = threads.set_threads("auto")
        assert 1 <= n <= min(4, threads.cores()) and torch.get_num_threads() == n
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_a_busy_process_elsewhere_is_seen():
    """A process spinning on one core is counted (about 1 core; more if the machine is busy anyway)."""
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        time.sleep(0.5)
        assert threads.busy_elsewhere(0.5) >= 0.7
    finally:
        spin.kill()
        spin.wait()
