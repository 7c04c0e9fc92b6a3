"""Every bad option ends in one clear line and leaves nothing behind; options that cannot change a result do
not block a resume; seeds give disjoint initialisations; an all-diverged method says why."""

from __future__ import annotations

import argparse
import json
import sys

import pytest
import torch

from bilevel import population as pop
from bilevel_studies import _common as C
from bilevel_studies import cli
from bilevel_studies.clarke.config import METHODS, ClarkeConfig
from bilevel_studies.clarke.methods import build_tuner
from bilevel_studies.clarke.problem import load_problem

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _refused(capsys, argv: list[str]) -> str:
    """The one line argparse prints for ``argv`` (exit status 2)."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


# (command, option, bad value, message): one per validator kind, across every study and the demo
BAD = [
    ("run clarke", "--steps", "0", "argument --steps: must be an integer >= 1, got 0"),
    ("run clarke", "--steps", "-5", "argument --steps: must be an integer >= 1, got -5"),
    ("run clarke", "--inits", "0", "argument --inits: must be an integer >= 1, got 0"),
    ("run clarke", "--interval", "0", "argument --interval: must be an integer >= 1, got 0"),
    ("run clarke", "--checkpoint-every", "0", "argument --checkpoint-every: must be an integer >= 1, got 0"),
    ("run clarke", "--checkpoint-every", "-2", "argument --checkpoint-every: must be an integer >= 1, got -2"),
    ("run clarke", "--lookback", "-1", "argument --lookback: must be an integer >= 0, got -1"),
    ("run clarke", "--hyper-lr", "0", "argument --hyper-lr: must be a number > 0, got 0"),
    ("run clarke", "--hyper-lr", "nan", "argument --hyper-lr: must be a finite number, got 'nan'"),
    ("run clarke", "--hyper-lr", "fast", "argument --hyper-lr: must be a number, got 'fast'"),
    ("run clarke", "--val-fraction", "1", "argument --val-fraction: must be a number in (0, 1), got 1"),
    ("run clarke", "--batch-size", "0", "argument --batch-size: must be an integer >= 1, got 0"),
    ("run clarke", "--threads", "0", "argument --threads: must be an integer >= 1, got 0"),
    ("run clarke", "--seed", "-1", "argument --seed: must be an integer >= 0 and <= 4294967295, got -1"),
    ("run sensitivity", "--intervals", "5,0", "argument --intervals: must be comma-separated integers >= 1, got '5,0'"),
    ("run asha-pbt", "--report-every", "0", "argument --report-every: must be an integer >= 1, got 0"),
    ("run bayesopt", "--samples", "0", "argument --samples: must be an integer >= 1, got 0"),
    ("run inverse-study", "--hyper-steps", "0", "argument --hyper-steps: must be an integer >= 1, got 0"),
    ("run overfit-validation", "--lookback", "-1", "argument --lookback: must be an integer >= 0, got -1"),
    ("run distill", "--hyper-lr", "-0.1", "argument --hyper-lr: must be a number > 0, got -0.1"),
    (
        "run val-split",
        "--fractions",
        "0.5,1",
        "argument --fractions: must be comma-separated numbers > 0 and < 1, got '0.5,1'",
    ),
    ("run augment", "--momentum", "1.5", "argument --momentum: must be a number in [0, 1], got 1.5"),
    ("run lstm", "--bptt", "0", "argument --bptt: must be an integer >= 1, got 0"),
    ("run rings", "--steps", "0", "argument --steps: must be an integer >= 1, got 0"),
    ("run anti-distill", "--points", "0", "argument --points: must be an integer >= 1, got 0"),
    ("run param-space", "--outer-lr", "0", "argument --outer-lr: must be a number > 0, got 0"),
    ("demo", "--steps", "0", "argument --steps: must be an integer >= 1, got 0"),
]


@pytest.mark.parametrize("command,option,value,message", BAD, ids=[f"{c[4:] or c} {o} {v}" for c, o, v, _ in BAD])
def test_bad_numbers_are_refused_at_parse_time(tmp_path, capsys, command, option, value, message):
    out = tmp_path / "out"
    line = _refused(capsys, [*command.split(), "--out", str(out), f"{option}={value}"])
    assert line == f"bilevel {command}: error: {message}"
    assert not out.exists()


def test_every_numeric_option_has_a_validator():
    """No ``bilevel run`` study (nor ``bilevel demo``) takes a bare ``int``/``float``: each number is checked."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parsers = {"demo": sub.choices["demo"]}
    run = next(a for a in sub.choices["run"]._actions if isinstance(a, argparse._SubParsersAction))
    parsers.update(run.choices)
    bare = [
        f"{name} {'/'.join(a.option_strings)}"
        for name, p in parsers.items()
        for a in p._actions
        if a.type in (int, float)
    ]
    assert bare == []


def test_missing_data_dir_is_refused_and_creates_nothing(tmp_path, capsys):
    line = _refused(capsys, ["run", "clarke", "--out", str(tmp_path / "o"), "--data-dir", str(tmp_path / "nope")])
    assert "argument --data-dir:" in line and "does not exist" in line
    assert sorted(tmp_path.iterdir()) == []


def test_missing_data_files_leave_nothing_behind(tmp_path, capsys, monkeypatch):
    """An existing but empty data directory: one line naming the missing file; neither the output directory nor
    any folder in the data directory is created."""
    monkeypatch.setenv("BILEVEL_DOWNLOAD", "0")
    empty = tmp_path / "data"
    empty.mkdir()
    out = tmp_path / "runs" / "energy"
    assert (
        cli.main(
            [
                "run",
                "clarke",
                "--dataset",
                "energy",
                "--inits",
                "1",
                "--steps",
                "2",
                "--data-dir",
                str(empty),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    said = capsys.readouterr().out.strip().splitlines()
    assert said[-1].startswith("error: data file not found:")
    assert not (tmp_path / "runs").exists() and list(empty.iterdir()) == []


def test_lookback_zero_per_method(tmp_path, data_dir, capsys, one_thread):
    """diff-through-opt unrolls --lookback steps: 0 is refused before anything is written; the IFT methods take
    0 (one Neumann term) and run."""
    base = [
        "run",
        "clarke",
        "--dataset",
        "energy",
        "--inits",
        "1",
        "--steps",
        "4",
        "--interval",
        "2",
        "--lookback",
        "0",
        "--threads",
        "1",
        "--data-dir",
        str(data_dir),
    ]
    assert cli.main([*base, "--methods", "random,diff-through-opt", "--out", str(tmp_path / "dto")]) == 2
    said = capsys.readouterr().out
    assert "diff-through-opt" in said and "--lookback >= 1" in said and len(said.strip().splitlines()) == 1
    assert not (tmp_path / "dto").exists()
    assert cli.main([*base, "--methods", "ours-wd-lr-m", "--out", str(tmp_path / "ift")]) == 0
    assert json.loads((tmp_path / "ift" / "results.json").read_text())["config"]["lookback"] == 0


def test_bad_output_directory_is_one_line(tmp_path, data_dir, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    argv = ["run", "clarke", "--dataset", "energy", "--inits", "1", "--steps", "2", "--data-dir", str(data_dir)]
    assert cli.main([*argv, "--out", str(afile / "out")]) == 2
    said = capsys.readouterr().out.strip()
    assert said == f"error: cannot use --out {afile / 'out'}: {afile} is a file"
    if sys.platform.startswith("linux"):  # a place nobody may create folders in, even root
        assert cli.main([*argv, "--out", "/proc/bilevel-test/out"]) == 2
        said = capsys.readouterr().out.strip()
        assert said.startswith("error: cannot use --out /proc/bilevel-test/out:") and "\n" not in said


def test_checkpoint_interval_does_not_block_a_resume(tmp_path, data_dir, capsys, one_thread, monkeypatch):
    """Stopped with --checkpoint-every 7, resumed with 11: the same numbers as an uninterrupted run with 50; another
    --steps is still refused."""
    base = [
        "run",
        "clarke",
        "--dataset",
        "energy",
        "--methods",
        "ours-wd-lr-m",
        "--inits",
        "2",
        "--steps",
        "30",
        "--interval",
        "5",
        "--threads",
        "1",
        "--data-dir",
        str(data_dir),
    ]
    assert cli.main([*base, "--checkpoint-every", "50", "--out", str(tmp_path / "ref")]) == 0
    ref = json.loads((tmp_path / "ref" / "results.json").read_text())

    import contextlib

    @contextlib.contextmanager
    def stop_at_20():
        def factory(name, total):
            count = [0]

            def advance(n=1):
                count[0] += n
                if count[0] >= 20:
                    raise KeyboardInterrupt

            return advance

        yield factory

    out = tmp_path / "cut"
    monkeypatch.setattr(cli, "progress_bars", stop_at_20)
    assert cli.main([*base, "--checkpoint-every", "7", "--out", str(out)]) == 130
    monkeypatch.undo()
    assert (out / "checkpoints" / "ours-wd-lr-m.pt").exists()
    assert cli.main([*base, "--checkpoint-every", "11", "--out", str(out)]) == 0
    got = json.loads((out / "results.json").read_text())
    for key in ("final_test_loss", "final_val_loss", "curves", "hparams", "diverged_at"):
        assert got["methods"]["ours-wd-lr-m"][key] == ref["methods"]["ours-wd-lr-m"][key], key
    capsys.readouterr()
    assert cli.main([*base, "--steps", "40", "--out", str(out)]) == 2
    assert "different configuration" in capsys.readouterr().out


def test_seeds_give_disjoint_initialisations(data_dir):
    """--seed 0 keeps initialisation i on seed i (today's numbers); --seed 1 shares none of its initialisations."""
    assert [pop.derived_seed(0, i) for i in range(4)] == [0, 1, 2, 3]
    assert pop.derived_seed(1, 0) == pop.SEED_STRIDE and pop.derived_seed(2, 5) == 2 * pop.SEED_STRIDE + 5
    with pytest.raises(ValueError):
        pop.derived_seed(0, pop.SEED_STRIDE)
    cfg = ClarkeConfig(dataset="energy", inits=6, steps=1, data_dir=str(data_dir))
    problem = load_problem(cfg)
    method = METHODS["ours-wd-lr-m"]
    zero = build_tuner(cfg, problem, method)
    params, _ = pop.init_population(problem.init, 6, 0)
    for k in params:
        assert torch.equal(zero.params[k], params[k])  # seed 0: member i on seed i, as before
    one = build_tuner(ClarkeConfig(**{**cfg.__dict__, "seed": 1}), problem, method)
    a, b = zero.describe()["lr"].tolist(), one.describe()["lr"].tolist()
    assert not set(a) & set(b)
    w0, w1 = zero.params["W0"].flatten(1), one.params["W0"].flatten(1)
    assert not any(torch.equal(x, y) for x in w0 for y in w1)
    # the same seed gives the same numbers; a block of members equals the same members of the whole population
    again = build_tuner(ClarkeConfig(**{**cfg.__dict__, "seed": 1, "inits": 2}), problem, method, first=3)
    assert torch.equal(again.params["W0"], one.params["W0"][3:5])
    assert "S * 1_000_003 + i" in C.SEED_HELP


def test_all_diverged_method_says_why(tmp_path, data_dir, capsys, one_thread):
    """--hyper-lr 1e3: every ours-wd-lr-m run diverges (exit 0, a result), and the output says when and what to try."""
    assert (
        cli.main(
            [
                "run",
                "clarke",
                "--dataset",
                "energy",
                "--methods",
                "random,ours-wd-lr-m",
                "--inits",
                "3",
                "--steps",
                "30",
                "--interval",
                "5",
                "--hyper-lr",
                "1e3",
                "--threads",
                "1",
                "--data-dir",
                str(data_dir),
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    said = capsys.readouterr().out
    notes = [line for line in said.splitlines() if line.startswith("note:")]
    assert len(notes) == 1, said
    assert notes[0].startswith("note: all 3 runs of ours-wd-lr-m diverged (non-finite loss by step ")
    assert notes[0].endswith("try a smaller --hyper-lr (now 1000)")


def test_auto_threads_are_chosen_once_per_run_directory(tmp_path, capsys, monkeypatch):
    """``--threads auto`` (the default) records its choice in OUT/.threads; a resume reuses it whatever the
    machine's load is then, and an explicit number wins."""
    import bilevel.threads

    out = tmp_path / "run"
    base = ["run", "param-space", "--cycle-rounds", "2", "--out", str(out)]
    monkeypatch.setattr(bilevel.threads, "busy_elsewhere", lambda sample=0.15: 0.0)  # an idle machine
    assert cli.main(base) == 0
    chosen = json.loads((out / cli.THREADS_FILE).read_text())["threads"]
    assert chosen == min(4, bilevel.threads.cores())
    monkeypatch.setattr(bilevel.threads, "busy_elsewhere", lambda sample=0.15: 64.0)  # now a busy one
    assert cli.main(base) == 0
    assert torch.get_num_threads() == chosen  # reused, not re-chosen
    assert cli.main(base[:-2] + ["--threads", "1", "--out", str(tmp_path / "pinned")]) == 0
    assert torch.get_num_threads() == 1 and not (tmp_path / "pinned" / cli.THREADS_FILE).exists()
    fresh = tmp_path / "fresh"
    assert cli.main(base[:-1] + [str(fresh)]) == 0
    assert json.loads((fresh / cli.THREADS_FILE).read_text())["threads"] == 1  # busy machine: one thread
    capsys.readouterr()


def test_a_failed_run_leaves_no_threads_file(tmp_path, capsys):
    out = tmp_path / "bad"
    assert cli.main(["run", "clarke", "--dataset", "no-such-set", "--out", str(out)]) != 0
    assert not out.exists()
    capsys.readouterr()


# one name per idea: --lookback is the Neumann/unrolled step count, --steps weight updates, --damping the eps
# of (J + eps I); the old spellings still parse (recorded commands run), hidden from --help, with one warning line
@pytest.mark.parametrize(
    "command,new,old,value,dest,expected",
    [
        ("lstm", "--lookback", "--terms", "2", "lookback", 2),
        ("lstm", "--overfit-lookback", "--overfit-terms", "4", "overfit_lookback", 4),
        ("augment", "--lookback", "--terms", "2", "lookback", 2),
        ("overfit-validation", "--lookback", "--steps", "7", "lookback", 7),
        ("val-split", "--lookback", "--steps", "7", "lookback", 7),
        ("distill", "--lookback", "--steps", "7", "lookback", 7),
        ("inverse-study", "--lookback", "--steps", "7", "lookback", 7),
        ("inverse-study", "--max-lookback", "--max-steps", "9", "max_lookback", 9),
        ("inverse-study", "--lookbacks", "--neumann-terms", "1,3", "lookbacks", [1, 3]),
        ("anti-distill", "--damping", "--eps", "0.5,2", "damping", [0.5, 2.0]),
    ],
)
def test_old_option_names_are_deprecated_aliases(capsys, command, new, old, value, dest, expected):
    parser = cli.build_parser()
    base = ["run", command, "--out", "x"]
    a = parser.parse_args([*base, new, value])
    assert getattr(a, dest) == expected and capsys.readouterr().err == ""
    a = parser.parse_args([*base, old, value])
    assert getattr(a, dest) == expected
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"bilevel run {command}: warning: {old} is deprecated; use {new}"]
    default = getattr(parser.parse_args(base), dest)  # the alias leaves the default alone
    assert default is None or default != expected
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--help"])
    shown = capsys.readouterr().out
    assert new in shown and f"{old} " not in shown.replace(f"{new} ", "")


def test_clarke_steps_are_weight_updates_and_lookback_the_neumann_steps():
    a = cli.build_parser().parse_args(["run", "clarke", "--out", "x", "--steps", "30", "--lookback", "2"])
    assert (a.steps, a.lookback) == (30, 2)


def test_datasets_names_the_loader_of_every_data_set(capsys, monkeypatch):
    """``bilevel datasets`` shows, for every data set it lists, the public loader call that loads it (a new
    user needs no IDX or pickle parsing of their own), and that call is the one ``bilevel.data.load`` makes."""
    import bilevel.data as D

    monkeypatch.setattr(cli, "console", cli.Console(width=400))
    assert cli.main(["datasets"]) == 0
    shown = capsys.readouterr().out
    for info in D.DATASETS.values():
        call = info.loader_call
        name = call.removeprefix("bilevel.data.").split("(")[0]
        assert callable(getattr(D, name)) and name in D.__all__, call
        row = next(line for line in shown.splitlines() if f" {info.name} " in line)
        assert call in row, (info.name, row)
    assert "bilevel.data.load_mnist_splits(fashion=True)" in D.DATASETS["fashion-mnist"].loader_call
