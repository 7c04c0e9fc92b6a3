"""Damaged state files: set aside (renamed, never deleted), named in one warning line, treated as absent."""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["DamagedFileWarning", "set_aside", "read_json_state"]


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
