"""Run directories: crash-safe files, plain checkpoints, one run per directory, resume checks.

The experiment infrastructure every study's output directory (``--out``) goes through; nothing of the
hyperparameter-optimisation core depends on it.

* **Atomic writes** (:func:`atomic_write`, :func:`atomic_save`, :func:`atomic_write_text`,
  :func:`atomic_write_json`, :func:`atomic_savefig`): the file is written under a unique temporary
  name in the same folder (``tempfile.mkstemp``), flushed to disk and renamed into place
  (``os.replace``), so an interrupted run never leaves a truncated checkpoint, result or figure, and
  two writers never share a temporary file.
* **Plain checkpoints** (:func:`atomic_save`, :func:`load_torch_state`, :func:`check_plain`): a torch
  checkpoint holds only plain data (tensors, dicts, lists, tuples, numbers, strings, ``None``: see
  :func:`check_plain`), checked when it is saved, and is read back with ``torch.load(...,
  weights_only=True)``, so a tampered run directory cannot run code when a run resumes from it.
* **Damaged state files** (:func:`read_json_state`, :func:`load_torch_state`, :func:`set_aside`): a
  file that cannot be read back (truncated, not JSON, or a checkpoint ``weights_only=True`` refuses)
  is renamed to ``NAME.corrupt-<timestamp>`` (never deleted), named in one line of a
  :class:`DamagedFileWarning`, and treated as absent, so the caller recomputes it from the last good
  state.
* **Run directories** (:func:`run_directory`): one run at a time per output directory (an exclusive
  ``filelock`` lock on ``OUT/.lock``; the holder's pid, host and command in ``OUT/.lock.owner``), stale
  temporary files of killed runs swept away, and a run that fails before writing any result leaves the
  directory as it found it.
* **Resume checks** (:func:`check_run_config`, :func:`save_run_config`): refuse to resume a directory
  that holds a run with another configuration.

Testing hook: ``BILEVEL_FAULT_INJECT`` makes the atomic writer misbehave on purpose, for the
fault-injection tests (``tests/studies/test_fault_injection.py``):
``kill-in-write:N[:GLOB]`` -- during the N-th atomic write (counted in this process, only paths whose
name matches ``GLOB`` if given) truncate the temporary file to half its size and ``SIGKILL`` the process;
``sleep-in-write:SECONDS[:GLOB]`` -- sleep between writing the temporary file and renaming it.
Several specs may be given, separated by commas.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import signal
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_write",
    "atomic_save",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_savefig",
    "check_plain",
    "check_run_config",
    "SETTINGS_FILES",
    "save_run_config",
    "read_json_state",
    "load_torch_state",
    "set_aside",
    "DamagedFileWarning",
    "RunLocked",
    "run_directory",
    "TMP_SUFFIX",
    "LOCK_NAME",
    "OWNER_NAME",
]

#: suffix of the temporary files of :func:`atomic_write` (``.NAME.<random>.bilevel-tmp``)
TMP_SUFFIX = ".bilevel-tmp"
#: the lock file and its side file (the holder) of :func:`run_directory`
LOCK_NAME, OWNER_NAME = ".lock", ".lock.owner"
FAULT_ENV = "BILEVEL_FAULT_INJECT"

_umask = os.umask(0)
os.umask(_umask)
_writes: dict[str, int] = {}  # per fault-injection spec: the atomic writes it matched, in this process


def _fault_point(path: Path, tmp: Path) -> None:
    """The ``BILEVEL_FAULT_INJECT`` test hook (see the module docstring): called between writing and renaming."""
    for spec in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        kind, _, rest = spec.partition(":")
        arg, _, pattern = rest.partition(":")
        if pattern and not fnmatch.fnmatch(path.name, pattern):
            continue
        _writes[spec] = n = _writes.get(spec, 0) + 1
        if kind == "sleep-in-write":
            time.sleep(float(arg))
        elif kind == "kill-in-write" and n == int(arg):
            size = tmp.stat().st_size
            with open(tmp, "r+b") as f:
                f.truncate(size // 2)
            os.kill(os.getpid(), signal.SIGKILL)


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


# ---------------------------------------------------------------------------- plain checkpoints


def _plain_types() -> tuple[type, ...]:
    import collections

    import torch

    return (
        type(None),
        bool,
        int,
        float,
        complex,
        str,
        bytes,
        dict,
        collections.OrderedDict,
        list,
        tuple,
        set,
        torch.Tensor,
        torch.nn.Parameter,
        torch.Size,
        torch.dtype,
        torch.device,
    )


def check_plain(obj: Any, name: str = "state") -> None:
    """Raise ``TypeError`` unless ``obj`` is plain data that ``torch.load(weights_only=True)`` reads back.

    Plain data are ``None``, ``bool``, ``int``, ``float``, ``complex``, ``str``, ``bytes``, ``dict`` (and
    ``OrderedDict``), ``list``, ``tuple``, ``set``, tensors, ``torch.Size``, ``torch.dtype`` and
    ``torch.device``, nested in any way -- exactly these types, not subclasses (a named tuple or a
    dataclass is pickled by its class, which ``torch.load(weights_only=True)`` refuses). A study whose
    state holds anything else (a dataclass, a NumPy array, a named tuple, a function) converts it to plain
    containers in its ``state_dict`` and back in ``load_state_dict``.

    Args:
        obj: the object to check, e.g. a ``state_dict()``.
        name: how the error message names ``obj``; nested items are named ``name['key'][0]...``.

    Raises:
        TypeError: naming the first item that is not plain and its type.
    """
    allowed = _plain_types()
    stack: list[tuple[str, Any]] = [(name, obj)]
    seen: set[int] = set()
    while stack:
        where, x = stack.pop()
        if type(x) not in allowed:
            raise TypeError(
                f"{where} is a {type(x).__module__}.{type(x).__qualname__}, not plain data: a checkpoint holds "
                "only tensors, dicts, lists, tuples, numbers, strings and None (convert it in state_dict())"
            )
        if isinstance(x, (dict, list, tuple, set)):
            if id(x) in seen:
                continue
            seen.add(id(x))
            if isinstance(x, dict):
                for k, v in x.items():
                    stack.append((f"{where}[{k!r}] (key)", k))
                    stack.append((f"{where}[{k!r}]", v))
            else:
                stack.extend((f"{where}[{i}]", v) for i, v in enumerate(x))


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically (:func:`atomic_write`), of plain data only.

    Args:
        obj: the checkpoint; plain data (:func:`check_plain`), so that :func:`load_torch_state` can read
            it back with ``torch.load(weights_only=True)``.
        path: the file to write.

    Raises:
        TypeError: ``obj`` holds something that is not plain data (nothing is written).
    """
    import torch

    check_plain(obj, Path(path).name)
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


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


# ---------------------------------------------------------------------------- damaged state files


class DamagedFileWarning(UserWarning):
    """A state file (checkpoint, finished part, configuration) could not be read: it was set aside."""


def set_aside(path: str | os.PathLike, reason: str, then: str = "it will be recomputed") -> Path:
    """Rename the damaged file ``path`` to ``NAME.corrupt-<timestamp>`` and warn, in one line.

    The :class:`DamagedFileWarning` names the file, ``reason`` (on one line, at most 160 characters),
    where the file went and ``then``. The file is never deleted.

    Args:
        path: the damaged file.
        reason: why it cannot be used (e.g. the exception that reading it raised).
        then: what happens instead, e.g. ``"it will be recomputed"``.

    Returns:
        The new path of the file.
    """
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while dest.exists():
        dest = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    os.replace(path, dest)
    reason = " ".join(str(reason).split())
    if len(reason) > 160:
        reason = reason[:157] + "..."
    warnings.warn(f"{path} is damaged ({reason}); moved it to {dest.name}; {then}", DamagedFileWarning, stacklevel=3)
    return dest


def read_json_state(
    path: str | os.PathLike, then: str = "it will be recomputed", check: Callable[[Any], bool] | None = None
) -> Any | None:
    """The JSON document at ``path``, or ``None`` if there is none or it is damaged.

    A file that is not UTF-8 JSON (or fails ``check``) is set aside (:func:`set_aside`).

    Args:
        path: the JSON file.
        then: what the caller does instead of using a damaged file (for the warning).
        check: an extra test of the document's content; ``False`` sets the file aside.

    Returns:
        The parsed document, or ``None``.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as e:
        set_aside(path, f"not UTF-8 text: {e}", then)
        return None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        set_aside(path, f"invalid JSON: {e}", then)
        return None
    if check is not None and not check(doc):
        set_aside(path, "unexpected content", then)
        return None
    return doc


def _load_error(e: Exception) -> str:
    """One line on why ``torch.load`` failed: a refused (non-plain) object is named as such."""
    text = str(e)
    if "Weights only load failed" in text:
        found = re.search(r"(?:Unsupported global|Unsupported operand)[^\n.]*", text)
        what = found.group(0).strip() if found else "an object that is not plain data"
        return f"not a plain checkpoint, refused by torch.load(weights_only=True): {what}"
    return f"{type(e).__name__}: {text}"


def load_torch_state(path: str | os.PathLike, then: str = "it will be recomputed") -> Any | None:
    """``torch.load(path, weights_only=True)`` onto the CPU, or ``None`` if there is no file or it is damaged.

    Only plain data are read (:func:`check_plain`): a checkpoint whose unpickling would build any other
    object (and could so run code) is refused. A file ``torch.load`` cannot read -- truncated, not a
    checkpoint, or refused -- is set aside (:func:`set_aside`: one :class:`DamagedFileWarning` line
    naming it, the file renamed to ``NAME.corrupt-<timestamp>``) and ``None`` returned, so the caller
    recomputes it.

    Args:
        path: the checkpoint file.
        then: what the caller does instead of using a damaged file (for the warning).

    Returns:
        The checkpoint's content, or ``None``.
    """
    import torch

    path = Path(path)
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # truncated zip, refused or bad pickle, EOF, ...: the file is unreadable whatever the cause
        set_aside(path, _load_error(e), then)
        return None


# ---------------------------------------------------------------------------- resume checks


def check_run_config(
    out: Path,
    config: Mapping[str, Any],
    *,
    free: Sequence[str] = ("methods", "device", "data_dir"),
    defaults: Mapping[str, Any] | None = None,
    save: bool = True,
) -> None:
    """Refuse to resume ``out`` if it holds a run with a different configuration; then save ``config``.

    Used by the resumable experiments (``clarke``, ``asha-pbt``, ``bayesopt``): ``out/config.json``
    (else the ``config`` of an existing ``out/results.json``) is compared with ``config`` key by key
    after a JSON round trip. A damaged ``config.json`` is set aside (:func:`set_aside`) and the check
    falls back to ``results.json``.

    Args:
        out: the run directory.
        config: this run's configuration (JSON-serialisable).
        free: keys that may change (e.g. methods may be added: their results are cached one file each;
            options that cannot change a result, such as the checkpoint interval).
        defaults: the value a key missing from the saved configuration counts as (a key added since that
            run started).
        save: write ``config`` to ``out/config.json`` afterwards (:func:`save_run_config`).

    Raises:
        ValueError: naming the changed keys as ``{key: (saved, now)}``.
    """
    out = Path(out)
    now = json.loads(json.dumps(dict(config)))
    saved_file, results = out / "config.json", out / "results.json"
    is_dict = lambda d: isinstance(d, dict)  # noqa: E731
    old = read_json_state(saved_file, "it is rewritten from this run's options", check=is_dict)
    if old is None:
        doc = read_json_state(results, "it is rewritten at the end of this run", check=is_dict)
        old = doc.get("config") if doc is not None else None
    if isinstance(old, dict):
        dflt = json.loads(json.dumps(dict(defaults or {})))
        changed = {
            k: (old.get(k, dflt.get(k)), v) for k, v in now.items() if k not in free and old.get(k, dflt.get(k)) != v
        }
        if changed:
            raise ValueError(
                f"{out} holds a run with a different configuration {changed}; use another --out or delete it"
            )
    if save:
        save_run_config(out, now)


def save_run_config(out: Path, config: Mapping[str, Any]) -> None:
    """Write ``out/config.json`` atomically (creating ``out`` if needed).

    Args:
        out: the run directory.
        config: the configuration (JSON-serialisable).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", json.loads(json.dumps(dict(config))), indent=1)


# ---------------------------------------------------------------------------- run directories


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
