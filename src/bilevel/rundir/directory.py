"""Run directories: one run at a time per output directory (a lock), stale temporaries swept, failures undone."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .atomic import TMP_SUFFIX, atomic_write_json

__all__ = ["run_directory", "RunLocked", "SETTINGS_FILES", "LOCK_NAME", "OWNER_NAME"]


#: the lock file and its side file (the holder) of :func:`run_directory`
LOCK_NAME, OWNER_NAME = ".lock", ".lock.owner"


class RunLocked(RuntimeError):
    """Another process holds the run directory's lock."""


def _owner(out: Path) -> str:
    try:
        o = json.loads((out / OWNER_NAME).read_text())
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(o["started"]))
        return f"pid {o['pid']} on {o['host']}, started {started}: {o['command']}"
    except Exception:  # no side file yet (it is written just after the lock is taken), or damaged
        return "holder unknown"


def _check_writable(out: Path) -> list[Path]:
    """Raise a one-line ``OSError`` unless ``out`` is (or can be created as) a writable directory;
    return the missing folders, outermost first."""
    missing: list[Path] = []
    p = out
    while not (p.exists() or p.is_symlink()):
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    if not p.is_dir():
        what = "is a file" if p.is_file() else "is not a directory"
        raise NotADirectoryError(f"cannot use --out {out}: {p} {what}")
    if not os.access(p, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot use --out {out}: no permission to write in {p}")
    return missing[::-1]


def _sweep_temporaries(out: Path) -> None:
    """Remove the temporary files killed runs left (:func:`atomic_write`'s ``*.bilevel-tmp``)."""
    for tmp in out.rglob(f".*{TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            tmp.unlink()


def _entries(out: Path) -> set[Path]:
    return set(out.rglob("*"))


#: files that hold a run's settings, not results: a run that fails having written only these leaves nothing
SETTINGS_FILES = ("config.json", ".threads")


@contextlib.contextmanager
def run_directory(out: str | os.PathLike, command: str | None = None) -> Iterator[Path]:
    """Use ``out`` as the output directory of one run, exclusively (a context manager).

    * ``out`` (and missing parents) is created; a path under a file or in a place without write
      permission raises a one-line ``OSError`` first.
    * An exclusive lock on ``out/.lock`` (:mod:`filelock`, released by the operating system when the
      process dies, so a killed run never blocks the next one) is taken without waiting; the holder's
      pid, host, start time and ``command`` go to ``out/.lock.owner``.
    * Temporary files of killed runs (``*.bilevel-tmp``) are removed.
    * If the body fails (an exception, Ctrl-C) before anything but settings (:data:`SETTINGS_FILES`) and
      empty folders was written into ``out``, what this run created is removed: the directory is left as
      it was found.

    Args:
        out: the run directory.
        command: the command line recorded as the holder's (default: ``sys.argv``).

    Returns:
        The context manager; it yields ``out`` as a :class:`~pathlib.Path`.

    Raises:
        RunLocked: another process holds the lock; the message names that holder.
        OSError: ``out`` cannot be created or written (one line).
    """
    import filelock

    out = Path(out)
    missing = _check_writable(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_created(out, set(), missing, had_lock=True)
        raise type(e)(f"cannot use --out {out}: {e.strerror or e}") from None
    if not out.is_dir():
        raise NotADirectoryError(f"cannot use --out {out}: it is not a directory")
    lock_path, owner_path = out / LOCK_NAME, out / OWNER_NAME
    had_lock = lock_path.exists()
    lock = filelock.FileLock(lock_path, timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise RunLocked(
            f"{out} is in use by another run ({_owner(out)}); wait for it to finish or use another --out"
        ) from None
    except OSError as e:
        _remove_created(out, set(), missing, had_lock)
        raise type(e)(f"cannot use --out {out}: {e.strerror or e}") from None
    try:
        atomic_write_json(
            owner_path,
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.time(),
                "command": command or " ".join(sys.argv),
            },
        )
        _sweep_temporaries(out)
        before = _entries(out)
    except BaseException:
        lock.release()
        raise
    try:
        yield out
    except BaseException:
        owner_path.unlink(missing_ok=True)
        new = _entries(out) - before - {lock_path, owner_path}
        undo = all(p.is_dir() or p.name in SETTINGS_FILES for p in new)  # nothing of value was written
        if undo:
            _remove_created(out, new, [], had_lock=True)  # under the lock
        lock.release()
        if undo:
            _remove_created(out, set(), missing, had_lock)  # the lock file and the folders this run created
        raise
    else:
        owner_path.unlink(missing_ok=True)
        lock.release()


def _remove_created(out: Path, new: set[Path], missing: list[Path], had_lock: bool) -> None:
    """Remove the files and folders a failed run created (``new``; the lock file unless it was there before;
    the folders of ``missing`` if they are empty then)."""
    for p in sorted(new, key=lambda q: len(q.parts), reverse=True):
        with contextlib.suppress(OSError):
            p.rmdir() if p.is_dir() else p.unlink()
    if not had_lock:
        with contextlib.suppress(OSError):
            (out / LOCK_NAME).unlink()
    for d in reversed(missing):
        with contextlib.suppress(OSError):
            d.rmdir()
