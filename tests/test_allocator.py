"""keep_freed_memory: large blocks come from the heap afterwards (glibc's own accounting, mallinfo2)."""

import ctypes
import ctypes.util

import pytest
import torch

from bilevel.allocator import keep_freed_memory


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _mmapped_bytes() -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    try:
        fn = libc.mallinfo2
    except AttributeError:
        pytest.skip("glibc without mallinfo2 (< 2.33)")
    fn.restype = _Mallinfo2
    return int(fn().hblkhd)  # bytes in blocks served by mmap


def test_large_tensors_come_from_the_heap_after_keep_freed_memory():
    if not keep_freed_memory():
        pytest.skip("no glibc malloc here")
    before = _mmapped_bytes()
    t = torch.ones(10_000_000)  # 40 MB: above glibc's largest adaptive mmap threshold (32 MB)
    assert float(t.sum()) == 1e7
    assert _mmapped_bytes() - before < 1_000_000  # not mmapped: the 40 MB came from the heap
    del t


def test_keep_freed_memory_is_idempotent():
    assert keep_freed_memory() == keep_freed_memory()
