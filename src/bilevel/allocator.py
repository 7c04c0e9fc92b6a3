"""Keep freed memory in the process: large temporaries then cost no page faults (glibc on Linux).

glibc's ``malloc`` serves a large block (above its ``mmap`` threshold, adaptive up to 32 MB) with a
fresh ``mmap`` and gives it back to the OS when it is freed; the next allocation of that size faults
its pages in again, one by one. A training step of a stacked population allocates and frees many such
blocks (Clarke et al.'s UCI MLP with P = 200 members: activations of 200 x 615 x 50 floats, 24.6 MB),
and on this project's CPU 100 weight steps of ``bilevel run clarke``'s population took 5.1 s with the
default settings and 3.5 s after :func:`keep_freed_memory` (docs/benchmarks.md, "Population weight step").
The price is that the process keeps its peak memory until it exits. ``bilevel`` commands call it at
start; call it yourself before a long CPU run (it does not change any result).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = (1 << 31) - 1) -> bool:
    """Keep freed memory in the process (glibc's ``mallopt``), so that large temporaries cost no page faults.

    Sets ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` so that blocks below ``mmap_threshold`` bytes come
    from the heap and freed memory below ``trim_threshold`` stays in it.

    Args:
        mmap_threshold: blocks smaller than this many bytes are served from the heap.
        trim_threshold: free memory at the top of the heap up to this many bytes is kept.

    Returns:
        ``True`` when both were set, ``False`` where there is no glibc (macOS, Windows, musl): nothing is
        changed there.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
