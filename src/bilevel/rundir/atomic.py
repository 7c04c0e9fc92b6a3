"""Atomic writes: a unique temporary file beside the target, flushed to disk and renamed into place.

An interrupted run never leaves a truncated checkpoint, result or figure, and two writers never share
a temporary file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .faults import _fault_point

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "atomic_savefig", "TMP_SUFFIX"]


#: suffix of the temporary files of :func:`atomic_write` (``.NAME.<random>.bilevel-tmp``)
TMP_SUFFIX = ".bilevel-tmp"

_umask = os.umask(0)
os.umask(_umask)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a fresh temporary file beside ``path``, then rename it to ``path``.

    The temporary file has a unique name (``.NAME.<random>.bilevel-tmp``), gets the permissions a new
    file would get, is flushed to disk before the rename and is removed if ``write`` fails (the
    exception is re-raised), so ``path`` holds either its previous content or the whole new one.

    Args:
        path: the file to write; its folder must exist.
        write: called with the temporary file's path; writes the content there.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_umask)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _fault_point(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``Path(path).write_text(text)``, atomically (:func:`atomic_write`).

    Args:
        path: the file to write.
        text: its new content.
    """
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | os.PathLike, doc: Any, **kwargs: Any) -> None:
    """Write ``doc`` as JSON, atomically (:func:`atomic_write`).

    Args:
        path: the file to write.
        doc: a JSON-serialisable document.
        **kwargs: passed to :func:`json.dumps` (``indent``, ``allow_nan``, ``default``, ...).
    """
    atomic_write_text(path, json.dumps(doc, **kwargs))


def atomic_savefig(fig: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """``fig.savefig(path, **kwargs)``, atomically: a kill while drawing leaves the previous figure (or none),
    never a truncated one.

    Args:
        fig: a matplotlib figure.
        path: the image file; its suffix gives the format unless ``format=`` is passed.
        **kwargs: passed to ``fig.savefig``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    kwargs.setdefault("format", path.suffix.lstrip(".").lower() or "png")
    return atomic_write(path, lambda tmp: fig.savefig(tmp, **kwargs))
