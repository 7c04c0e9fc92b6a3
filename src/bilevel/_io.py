"""Crash-safe file writes: a checkpoint or result is written to a temporary file and renamed into place,
so an interrupted run never leaves a truncated file that a resumed run would then fail to read."""

from __future__ import annotations

import json
import os
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["atomic_save", "atomic_write_text", "atomic_write_json", "check_run_config"]


def _replace(path: Path, write) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically."""
    _replace(Path(path), lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``Path(path).write_text(text)``, atomically."""
    _replace(Path(path), lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | os.PathLike, doc: Any, **kwargs: Any) -> None:
    """Write ``doc`` as JSON, atomically (``kwargs`` go to :func:`json.dumps`)."""
    atomic_write_text(path, json.dumps(doc, **kwargs))


def check_run_config(out: Path, config: Mapping[str, Any], *, free: Sequence[str] = ("methods", "device", "data_dir"),
                     defaults: Mapping[str, Any] | None = None) -> None:
    """Refuse to resume ``out`` if it holds a run with a different configuration; then save ``config``.

    Used by the resumable experiments (``clarke``, ``asha-pbt``, ``bayesopt``):
    ``out/config.json`` (else the ``config`` of an existing ``out/results.json``)
    is compared with ``config`` key by key after a JSON round trip; keys in ``free`` may change
    (e.g. methods may be added: their results are cached one file each), and a key missing from
    the saved configuration counts as its value in ``defaults`` (added since that run started).
    Raises ``ValueError`` naming the changed keys as ``{key: (saved, now)}``.
    """
    out = Path(out)
    now = json.loads(json.dumps(dict(config)))
    saved_file, results = out / "config.json", out / "results.json"
    old = None
    if saved_file.exists():
        old = json.loads(saved_file.read_text())
    elif results.exists():
        old = json.loads(results.read_text()).get("config")
    if old is not None:
        dflt = json.loads(json.dumps(dict(defaults or {})))
        changed = {k: (old.get(k, dflt.get(k)), v) for k, v in now.items()
                   if k not in free and old.get(k, dflt.get(k)) != v}
        if changed:
            raise ValueError(f"{out} holds a run with a different configuration {changed}; "
                             "use another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    saved_file.write_text(json.dumps(now, indent=1))
