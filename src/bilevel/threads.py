"""How many CPU threads torch should use: a default that holds when the machine is shared.

torch starts with one intra-op thread per core. That is the fastest setting for a run that has the
machine to itself, and a disaster when another process is running: threads that wait for each other
on an oversubscribed CPU made two ``bilevel demo`` at once take 100 s each with torch's default
threads against 33.5 s with one (docs/benchmarks.md, "Threads"). The policy ``"auto"`` therefore
takes **the cores that other processes leave idle when the run starts** (measured from ``/proc/stat``
over a short busy window, this process excluded), at least 1 and at most ``limit``: alone on a
2-core machine a run gets 2 threads, beside another run (or started together with one) 1.

The choice is made once, at the start of a run: the number of threads can change floating-point
results in their last bits (a parallel reduction sums in a different order), so the command line
records it in the run directory and a resumed run reuses it, and a run that must be bit-for-bit
reproducible under any load pins an explicit number (``--threads 1``).
"""

from __future__ import annotations

import os
import time
from typing import Literal

import torch

__all__ = ["ThreadSpec", "cores", "busy_elsewhere", "auto_threads", "resolve_threads", "set_threads"]

#: ``"auto"`` or a positive number of threads
ThreadSpec = int | Literal["auto"]


def cores() -> int:
    """CPU cores this process may run on.

    Returns:
        The size of its affinity mask where the OS has one, else ``os.cpu_count()`` (at least 1).
    """
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _proc_stat_busy() -> tuple[float, float] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat, or None where it does not exist."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return total - idle, total


def busy_elsewhere(sample: float = 0.15) -> float:
    """Cores kept busy by *other* processes over the next ``sample`` seconds (0.0 where unknown).

    (busy jiffies of the machine - this process's CPU time) over the window, from ``/proc/stat``. The window
    is spent computing, not sleeping: two runs that start together measure at the same moment, and each must
    see the other busy (a sleeping twin would look like an idle machine).

    Args:
        sample: the length of the measurement, in seconds.

    Returns:
        The average number of cores busy with other processes, >= 0.
    """
    first, own0, t0 = _proc_stat_busy(), time.process_time(), time.monotonic()
    if first is None:
        return 0.0
    x = 0
    while time.monotonic() - t0 < sample:
        x += 1
    second, own, wall = _proc_stat_busy(), time.process_time() - own0, time.monotonic() - t0
    if second is None or second[1] <= first[1]:
        return 0.0
    n = os.cpu_count() or 1
    busy_fraction = (second[0] - first[0]) / (second[1] - first[1])  # of all CPUs
    return max(0.0, busy_fraction * n - own / wall)


def auto_threads(*, limit: int = 4, n_cores: int | None = None, busy: float | None = None) -> int:
    """The ``"auto"`` policy: the cores other processes leave idle, in [1, ``limit``].

    Args:
        limit: the most threads (small CPU problems gain nothing beyond a few).
        n_cores: the cores available (default: :func:`cores`; tests pass it to decide without measuring).
        busy: the cores busy elsewhere (default: :func:`busy_elsewhere`, measured now).

    Returns:
        ``clamp(round(n_cores - busy), 1, limit)``.
    """
    n = cores() if n_cores is None else n_cores
    others = busy_elsewhere() if busy is None else busy
    return max(1, min(limit, n - round(others)))


def resolve_threads(spec: ThreadSpec | None) -> int:
    """A number of threads from a ``--threads`` value.

    Args:
        spec: a positive int (used as it is), or ``"auto"`` / ``None`` (:func:`auto_threads`).

    Returns:
        The number of threads, >= 1.

    Raises:
        ValueError: anything else (zero, a negative number, another string).
    """
    if spec is None or spec == "auto":
        return auto_threads()
    if isinstance(spec, bool) or not isinstance(spec, int) or spec < 1:
        raise ValueError(f"threads must be a positive integer or 'auto', got {spec!r}")
    return spec


def set_threads(spec: ThreadSpec | None = "auto") -> int:
    """Set torch's intra-op threads from a ``--threads`` value.

    Args:
        spec: as :func:`resolve_threads`.

    Returns:
        The number of threads set (``torch.set_num_threads``).
    """
    n = resolve_threads(spec)
    torch.set_num_threads(n)
    return n
