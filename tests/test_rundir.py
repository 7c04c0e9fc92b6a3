"""bilevel.rundir: atomic writes, plain checkpoints, damaged files set aside, one run per directory, resume checks."""

from __future__ import annotations

import collections
import json
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from bilevel import rundir
from bilevel.rundir import (
    LOCK_NAME,
    OWNER_NAME,
    TMP_SUFFIX,
    DamagedFileWarning,
    RunLocked,
    atomic_save,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    check_plain,
    check_run_config,
    load_torch_state,
    read_json_state,
    run_directory,
)


def _temporaries(folder: Path) -> list[Path]:
    return sorted(folder.rglob(f"*{TMP_SUFFIX}"))


def _one_warning(record: list[warnings.WarningMessage]) -> str:
    damaged = [w for w in record if issubclass(w.category, DamagedFileWarning)]
    assert len(damaged) == 1, [str(w.message) for w in record]
    text = str(damaged[0].message)
    assert "\n" not in text
    return text


# ---------------------------------------------------------------------------- atomic writes


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"a": 1})

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text('{"a": 2, "b"')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert json.loads(path.read_text()) == {"a": 1}
    assert _temporaries(tmp_path) == []
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C in the middle of a write too
        atomic_write(path, lambda tmp: (tmp.write_text("x"), (_ for _ in ()).throw(KeyboardInterrupt())))
    assert json.loads(path.read_text()) == {"a": 1} and _temporaries(tmp_path) == []


def test_atomic_writes_replace_the_content_with_a_new_files_permissions(tmp_path):
    path = tmp_path / "t.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert _temporaries(tmp_path) == []


# ---------------------------------------------------------------------------- plain checkpoints


def test_plain_data_round_trip_with_weights_only(tmp_path):
    state = {
        "t": 7,
        "x": 0.5,
        "name": "baydin",
        "none": None,
        "flag": True,
        "w": torch.arange(6.0).reshape(2, 3),
        "gen": torch.Generator().manual_seed(3).get_state(),
        "nested": [(1, torch.ones(2)), {"a": [None, 2.0]}],
        "ordered": collections.OrderedDict(b=1),
        "dtype": torch.float64,
        "size": torch.Size([2, 3]),
    }
    path = tmp_path / "state.pt"
    atomic_save(state, path)
    back = load_torch_state(path)
    assert back.keys() == state.keys()
    assert torch.equal(back["w"], state["w"]) and torch.equal(back["gen"], state["gen"])
    assert back["nested"][1] == {"a": [None, 2.0]} and back["dtype"] is torch.float64


@dataclass
class _History:
    step: list


def test_saving_something_that_is_not_plain_is_refused_naming_it(tmp_path):
    import numpy as np

    path = tmp_path / "state.pt"
    for bad, where in (
        ({"tuner": {"history": _History([1])}}, "['tuner']['history']"),
        ({"losses": np.zeros(3)}, "['losses']"),
        ({"pair": collections.namedtuple("P", "a b")(1, 2)}, "['pair']"),
        ([1, lambda: 0], "[1]"),
    ):
        with pytest.raises(TypeError, match="not plain data") as e:
            atomic_save(bad, path)
        assert where in str(e.value)
        assert not path.exists() and _temporaries(tmp_path) == []
    check_plain({"ok": [1, 2.0, "s", None, torch.zeros(1)]})


class _RunsCode:
    """Unpickling this writes a marker file: what a tampered checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


@pytest.mark.parametrize("how", ["torch", "pickle"])
def test_a_checkpoint_whose_unpickling_would_run_code_is_refused_and_set_aside(tmp_path, how):
    marker, path = tmp_path / "marker", tmp_path / "METHOD.pt"
    if how == "torch":
        torch.save({"tuner": _RunsCode(marker)}, path)
    else:  # a bare pickle (the legacy format torch.load also reads)
        path.write_bytes(pickle.dumps({"tuner": _RunsCode(marker)}))
    assert not marker.exists()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert load_torch_state(path, "METHOD starts again from step 0") is None
    assert not marker.exists()  # the code did not run
    text = _one_warning(record)
    assert str(path) in text and "METHOD starts again from step 0" in text
    assert "weights_only=True" in text
    aside = list(tmp_path.glob("METHOD.pt.corrupt-*"))
    assert len(aside) == 1 and not path.exists() and aside[0].name in text


def test_a_truncated_checkpoint_is_set_aside_and_a_missing_one_is_none(tmp_path):
    path = tmp_path / "c.pt"
    assert load_torch_state(path) is None
    atomic_save({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert load_torch_state(path) is None
    assert str(path) in _one_warning(record)
    assert len(list(tmp_path.glob("c.pt.corrupt-*"))) == 1


def test_damaged_json_is_set_aside_and_the_next_damage_gets_another_name(tmp_path):
    path = tmp_path / "part.json"
    assert read_json_state(path) is None
    for content in (b'{"a": ', b"\xff\xfe", b"[1, 2]"):
        path.write_bytes(content)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            assert read_json_state(path, "it is recomputed", check=lambda d: isinstance(d, dict)) is None
        assert "it is recomputed" in _one_warning(record)
    assert len(list(tmp_path.glob("part.json.corrupt-*"))) == 3
    path.write_text('{"a": 1}')
    assert read_json_state(path) == {"a": 1}


# ---------------------------------------------------------------------------- run directories


def test_a_second_holder_of_a_run_directory_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "run"
    with run_directory(out, command="bilevel run first") as d:
        assert d == out and (out / LOCK_NAME).exists()
        assert "bilevel run first" in (out / OWNER_NAME).read_text()
        with pytest.raises(RunLocked, match=r"in use by another run \(pid \d+ .*bilevel run first\)"):
            with run_directory(out, command="bilevel run second"):
                pass
        (out / "results.json").write_text("{}")
    assert not (out / OWNER_NAME).exists()
    with run_directory(out):  # released: the next run gets it
        pass


def test_a_run_that_fails_before_any_result_leaves_nothing_behind(tmp_path):
    out = tmp_path / "new" / "run"
    with pytest.raises(ValueError):
        with run_directory(out):
            (out / "checkpoints").mkdir()
            (out / "config.json").write_text("{}")
            raise ValueError("bad option")
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError):  # one that wrote a result keeps it
        with run_directory(out):
            (out / "methods.json").write_text("{}")
            raise ValueError("later failure")
    assert (out / "methods.json").exists()


def test_temporaries_of_a_killed_run_are_swept_and_an_unusable_out_is_one_line(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / f".results.json.abc{TMP_SUFFIX}"
    stale.write_text("half")
    with run_directory(out):
        assert not stale.exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        with run_directory(tmp_path / "file" / "run"):
            pass


def test_the_fault_injection_hook_sleeps_only_for_matching_names(tmp_path, monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(rundir.time, "sleep", slept.append)
    monkeypatch.setattr(rundir, "_writes", {})
    monkeypatch.setenv(rundir.FAULT_ENV, "sleep-in-write:0.3:*.pt")
    atomic_write_text(tmp_path / "a.json", "{}")
    assert slept == []
    atomic_save({"w": torch.ones(1)}, tmp_path / "a.pt")
    assert slept == [0.3] and load_torch_state(tmp_path / "a.pt")["w"].tolist() == [1.0]


# ---------------------------------------------------------------------------- resume checks


def test_run_config_check_refuses_a_changed_configuration(tmp_path):
    out = tmp_path / "run"
    check_run_config(out, {"steps": 20, "inits": 3, "methods": ["a"]})
    assert json.loads((out / "config.json").read_text()) == {"steps": 20, "inits": 3, "methods": ["a"]}
    check_run_config(out, {"steps": 20, "inits": 3, "methods": ["a", "b"]})  # methods may be added
    with pytest.raises(ValueError, match=r"different configuration \{'steps': \(20, 30\)\}"):
        check_run_config(out, {"steps": 30, "inits": 3, "methods": ["a"]})
    # a key added since the run started counts as its default
    check_run_config(out, {"steps": 20, "inits": 3, "new": 1}, defaults={"new": 1})
    with pytest.raises(ValueError, match="'new': \\(1, 2\\)"):
        check_run_config(out, {"steps": 20, "inits": 3, "new": 2}, defaults={"new": 1})
    # no config.json (an older run): the config in its results.json is checked
    old = tmp_path / "old"
    old.mkdir()
    (old / "results.json").write_text(json.dumps({"config": {"steps": 20}}))
    with pytest.raises(ValueError, match="different configuration"):
        check_run_config(old, {"steps": 40})
    check_run_config(old, {"steps": 20}, save=False)
    assert not (old / "config.json").exists()
