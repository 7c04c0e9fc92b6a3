"""The ``BILEVEL_FAULT_INJECT`` testing hook: the atomic writer misbehaving on purpose.

For the fault-injection tests (``tests/studies/test_fault_injection.py``):
``kill-in-write:N[:GLOB]`` -- during the N-th atomic write (counted in this process, only paths whose
name matches ``GLOB`` if given) truncate the temporary file to half its size and ``SIGKILL`` the process;
``sleep-in-write:SECONDS[:GLOB]`` -- sleep between writing the temporary file and renaming it.
Several specs may be given, separated by commas.
"""

from __future__ import annotations

import fnmatch
import os
import signal
import time
from pathlib import Path

__all__ = ["FAULT_ENV"]


FAULT_ENV = "BILEVEL_FAULT_INJECT"
_writes: dict[str, int] = {}  # per fault-injection spec: the atomic writes it matched, in this process


def _fault_point(path: Path, tmp: Path) -> None:
    """The ``BILEVEL_FAULT_INJECT`` test hook (see the module docstring): called between writing and renaming."""
    for spec in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        kind, _, rest = spec.partition(":")
        arg, _, pattern = rest.partition(":")
        if pattern and not fnmatch.fnmatch(path.name, pattern):
            continue
        from . import _writes  # the package's counts: ``bilevel.rundir._writes``, which a test may replace

        _writes[spec] = n = _writes.get(spec, 0) + 1
        if kind == "sleep-in-write":
            time.sleep(float(arg))
        elif kind == "kill-in-write" and n == int(arg):
            size = tmp.stat().st_size
            with open(tmp, "r+b") as f:
                f.truncate(size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
