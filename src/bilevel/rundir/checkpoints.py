"""Plain checkpoints: only plain data saved (checked), read back with ``torch.load(weights_only=True)``.

A tampered run directory cannot run code when a run resumes from it; a checkpoint that cannot be read
back is set aside (:mod:`bilevel.rundir.damaged`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .atomic import atomic_write
from .damaged import set_aside

__all__ = ["check_plain", "atomic_save", "load_torch_state"]


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
