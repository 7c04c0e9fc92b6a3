"""Resumable experiment parts: one JSON file per finished sub-run, keyed by the settings that produced it.

A study writes each finished part (a task, a method, a setting) with :func:`save_part`
(atomically, :func:`bilevel.rundir.atomic_write_json`); re-running the same command finds it
with :func:`load_part` and skips the work. A part whose stored key differs from the
current settings (another ``--steps``, seed, ...) is recomputed, so changing an option never
silently reuses a stale result. A damaged part file (not JSON, e.g. truncated by hand or by a disk
error) is moved aside to ``NAME.corrupt-<timestamp>`` with a warning naming it, and recomputed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bilevel.rundir import atomic_write_json, read_json_state

__all__ = ["RUN_ONLY", "cached_part", "load_part", "save_part", "say_resumed", "settings_key"]


def _normalise(key: Any) -> Any:
    return json.loads(json.dumps(key))  # tuples -> lists etc., as they will compare after a round trip


def load_part(path: Path, key: Any) -> dict[str, Any] | None:
    """The result stored at ``path`` if it was saved under ``key``, else ``None`` (a damaged file is set aside
    with a warning, :func:`bilevel.rundir.read_json_state`)."""
    doc = read_json_state(
        path,
        "the part is recomputed",
        check=lambda d: isinstance(d, dict) and "key" in d and isinstance(d.get("result"), dict),
    )
    if doc is None or doc.get("key") != _normalise(key):
        return None
    return doc.get("result")


def save_part(path: Path, key: Any, result: dict[str, Any]) -> None:
    """Store ``result`` (JSON-serialisable) at ``path`` under ``key``, atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"key": _normalise(key), "result": result}, indent=1)


#: command-line fields that never change a result (where it is written, how many threads, where the
#: checksum-verified data are read from, the argparse dispatch fields)
RUN_ONLY = ("out", "threads", "data_dir", "command", "experiment", "func")


def settings_key(
    args: Any, drop: tuple[str, ...] = (), keep: tuple[str, ...] | None = None, **extra: Any
) -> dict[str, Any]:
    """The options of ``args`` (an ``argparse.Namespace``) that determine one part's result, plus ``extra``.

    :data:`RUN_ONLY` fields, callables and the names in ``drop`` (e.g. the list of models, which selects
    parts but does not change any one of them) are left out; with ``keep``, only those names are used.
    """
    items = vars(args).items() if not isinstance(args, dict) else args.items()
    key = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in items
        if k not in RUN_ONLY and k not in drop and not callable(v) and (keep is None or k in keep)
    }
    return {**key, **extra}


def cached_part(path: Path, key: Any, compute) -> tuple[dict[str, Any], bool]:
    """``(result, resumed)``: the part stored at ``path`` under ``key``, else ``compute()`` saved there."""
    res = load_part(path, key)
    if res is not None:
        return res, True
    res = compute()
    save_part(path, key, res)
    return res, False


def say_resumed(name: str, what: str, resumed: list[str], parts_dir: Path, console=None) -> None:
    """Print which finished parts a re-run reused (nothing when none was)."""
    if not resumed:
        return
    if console is None:
        from rich.console import Console

        console = Console()
    console.print(f"{name}: reused finished {what} {', '.join(resumed)} from {parts_dir}")
