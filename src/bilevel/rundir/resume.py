"""Resume checks: refuse to resume a directory that holds a run with another configuration."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .atomic import atomic_write_json
from .damaged import read_json_state

__all__ = ["check_run_config", "save_run_config"]


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
