"""Clarke et al.'s experiment end to end on small settings: schema, methods, resume, CLI."""

import json
import math

import numpy as np
import pytest
import torch

from bilevel.nets import mlp_forward
from bilevel_studies import cli
from bilevel_studies.clarke import clarke
from bilevel_studies.clarke.config import METHODS, ClarkeConfig
from bilevel_studies.clarke.methods import AUTHORS_BAYDIN, build_tuner, is_authors_baydin, start_method, three_batched
from bilevel_studies.clarke.problem import LM_SIZES, load_problem
from bilevel_studies.clarke.reporting import perplexity_rows
from bilevel_studies.clarke.running import _migrate_baydin, run_experiment

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def energy_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("clarke")
    code = cli.main(
        [
            "run",
            "clarke",
            "--dataset",
            "energy",
            "--methods",
            "all",
            "--inits",
            "3",
            "--steps",
            "20",
            "--interval",
            "5",
            "--lookback",
            "2",
            "--out",
            str(out),
            "--data-dir",
            str(data_dir),
        ]
    )
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def test_results_schema_and_all_methods(energy_run):
    out, doc = energy_run
    assert doc["experiment"] == "clarke" and doc["dataset"] == "energy"
    assert list(doc["methods"]) == list(METHODS)
    for name, m in doc["methods"].items():
        n = 1 if name == "random-3batched" else 3
        for key in ("final_test_loss", "final_val_loss", "seconds"):
            assert len(m[key]) == n, (name, key)
        assert all(v is None or v > 0 for v in m["final_test_loss"])
    for f in ("table.md", "cdf.png", "median_curves.png"):
        assert (out / f).exists()


def test_random_3batched_picks_best_validation():
    random = {
        "final_test_loss": [5.0, 1.0, 3.0, 2.0, None, 9.0, 7.0],
        "final_val_loss": [0.5, 0.9, 0.1, None, 0.3, 0.2, 0.0],
        "seconds": [1.0] * 7,
    }
    out = three_batched(random)
    assert out["final_test_loss"] == [3.0, 9.0]
    assert out["final_val_loss"] == [0.1, 0.2]
    assert out["seconds"] == [3.0, 3.0]


def test_same_initialisations_across_methods(data_dir):
    cfg = ClarkeConfig(dataset="energy", inits=2, steps=1, data_dir=str(data_dir))
    problem = load_problem(cfg)
    a = build_tuner(cfg, problem, METHODS["random"])
    b = build_tuner(cfg, problem, METHODS["ours-wd-hdlr-m"])
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k])
    da, db = a.describe(), b.describe()
    for name in ("lr", "weight_decay", "momentum"):
        torch.testing.assert_close(da[name], db[name])
    lr = da["lr"]
    assert bool(((lr >= 1e-6) & (lr <= 0.1)).all())


def test_interrupt_and_resume_gives_the_same_results(tmp_path, data_dir):
    cfg = ClarkeConfig(
        dataset="energy",
        methods=["ours-wd-lr-m"],
        inits=2,
        steps=30,
        interval=5,
        lookback=2,
        checkpoint_every=10,
        data_dir=str(data_dir),
    )
    full = run_experiment(cfg, tmp_path / "full")

    count = {"n": 0}

    def interrupting(name, total):
        def advance(n=1):
            count["n"] += n
            if count["n"] == 25:
                raise KeyboardInterrupt

        return advance

    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "cut", progress_factory=interrupting)
    assert (tmp_path / "cut" / "checkpoints" / "ours-wd-lr-m.pt").exists()
    resumed = run_experiment(cfg, tmp_path / "cut")
    assert resumed["methods"]["ours-wd-lr-m"]["final_test_loss"] == full["methods"]["ours-wd-lr-m"]["final_test_loss"]


def test_changed_config_in_same_dir_is_refused(tmp_path, data_dir):
    cfg = ClarkeConfig(dataset="energy", methods=["random"], inits=1, steps=2, data_dir=str(data_dir))
    run_experiment(cfg, tmp_path)
    cfg.steps = 3
    with pytest.raises(ValueError, match="different configuration"):
        run_experiment(cfg, tmp_path)


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert cli.main(["run", "clarke", "--dataset", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown data set 'nope'" in capsys.readouterr().out
    assert (
        cli.main(
            ["run", "clarke", "--methods", "random,magic", "--inits", "1", "--steps", "1", "--out", str(tmp_path / "x")]
        )
        == 2
    )
    assert "unknown method" in capsys.readouterr().out
    assert cli.main(["report", str(tmp_path / "missing")]) == 2


def test_report_rerenders(energy_run, tmp_path):
    out, _ = energy_run
    assert cli.main(["report", str(out), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "table.md").read_text().count("|") > 10


def test_sensitivity_grid(tmp_path, data_dir):
    from bilevel_studies.clarke import sensitivity

    cfg = ClarkeConfig(dataset="energy", methods=["ours-wd-lr-m"], inits=2, steps=6, data_dir=str(data_dir))
    doc = sensitivity.run(cfg, [2, 3], [0, 1], tmp_path)
    grid = doc["median_final_test_loss"]["ours-wd-lr-m"]
    assert len(grid) == 2 and all(len(r) == 2 for r in grid)
    # each cell is the median over the members of that cell's own run
    cell = json.loads((tmp_path / "ours-wd-lr-m" / "T3_i1" / "results.json").read_text())
    vals = sorted(v for v in cell["methods"]["ours-wd-lr-m"]["final_test_loss"] if v is not None)
    assert grid[1][1] == pytest.approx(sum(vals) / 2)
    assert (tmp_path / "sensitivity.png").stat().st_size > 1000


def test_sensitivity_updates_scale_steps_and_random_is_shared(tmp_path, data_dir):
    from bilevel_studies.clarke import sensitivity

    cfg = ClarkeConfig(dataset="energy", methods=["random"], inits=2, steps=999, data_dir=str(data_dir))
    doc = sensitivity.run(cfg, [2, 3], [0, 4], tmp_path, updates=2)
    assert sorted(p.name for p in (tmp_path / "random").iterdir()) == ["T2", "T3"]  # one run per T, not per i
    for T in (2, 3):
        cell = json.loads((tmp_path / "random" / f"T{T}" / "results.json").read_text())
        assert cell["config"]["steps"] == 2 * T
    row = doc["median_final_test_loss"]["random"][1]
    assert row[0] == row[1] is not None


def test_language_model_config_runs(tmp_path, data_dir):
    if not (data_dir / "ptb").is_dir():
        pytest.skip("no Penn Treebank data")
    cfg = ClarkeConfig(
        dataset="ptb",
        methods=["ours-wd-lr-m"],
        inits=2,
        steps=2,
        interval=2,
        lookback=1,
        data_dir=str(data_dir),
        record_rows=700,
        eval_rows=1400,
    )
    doc = run_experiment(cfg, tmp_path)
    losses = doc["methods"]["ours-wd-lr-m"]["final_test_loss"]
    # an untrained LM predicts nearly uniformly over the 10,000 words: cross-entropy ~ log(10000)
    assert all(abs(v - 9.2103) < 0.05 for v in losses)


def test_image_inputs_are_standardised_with_training_statistics():
    raw = load_problem(ClarkeConfig(dataset="digits", image_scaling="unit", dtype="float64"))
    std = load_problem(ClarkeConfig(dataset="digits", dtype="float64"))
    Xtr = raw.train[0].numpy()
    mu, sd = Xtr.mean(0), Xtr.std(0, ddof=1)
    sd = np.where(sd > 1e-10, sd, 1.0)
    for a, b in ((raw.train, std.train), (raw.val, std.val), (raw.test, std.test)):
        np.testing.assert_allclose(b[0].numpy(), (a[0].numpy() - mu) / sd, atol=1e-12)
        assert torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="image_scaling"):
        load_problem(ClarkeConfig(dataset="digits", image_scaling="minmax"))


def test_cli_model_lm_size_test_fraction_and_batch_defaults(tmp_path, data_dir):
    """The CLI reaches every configuration: --model, --lm-size, --test-fraction; CIFAR-10 batches of 100."""
    p = cli.build_parser()
    a = p.parse_args(["run", "clarke", "--dataset", "ptb", "--lm-size", "paper", "--out", str(tmp_path)])
    cfg = clarke.config_from_args(a)
    assert (cfg.lm_size, cfg.model, cfg.batch_size) == ("paper", "auto", None)  # the LM size's own batch (40)
    assert (
        clarke.config_from_args(p.parse_args(["run", "clarke", "--dataset", "cifar10", "--out", "x"])).batch_size == 100
    )
    assert (
        clarke.config_from_args(p.parse_args(["run", "clarke", "--dataset", "fashion-mnist", "--out", "x"])).batch_size
        == 50
    )
    # a UCI test share of 20% instead of Clarke's split files: 768 Energy rows -> 154 test rows
    cfg = ClarkeConfig(
        dataset="energy", methods=["random"], inits=1, steps=1, test_fraction=0.2, data_dir=str(data_dir)
    )
    prob = load_problem(cfg)
    assert len(prob.test[0]) == 154 and len(prob.train[0]) + len(prob.val[0]) == 768 - 154
    with pytest.raises(ValueError, match="does not fit"):
        load_problem(ClarkeConfig(dataset="energy", model="lstm", data_dir=str(data_dir)))
    with pytest.raises(ValueError, match="test-fraction applies to the UCI sets"):
        load_problem(ClarkeConfig(dataset="digits", test_fraction=0.2))


def test_random_3batched_needs_three_inits(tmp_path, data_dir):
    cfg = ClarkeConfig(dataset="energy", methods=["random-3batched"], inits=2, steps=1, data_dir=str(data_dir))
    with pytest.raises(ValueError, match="needs --inits >= 3"):
        run_experiment(cfg, tmp_path)


def test_tensorboard_option_writes_live_curves_of_every_loop(tmp_path, data_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    code = cli.main(
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
            "20",
            "--data-dir",
            str(data_dir),
            "--out",
            str(tmp_path / "o"),
            "--tensorboard",
            str(tb),
        ]
    )
    assert code == 0
    assert sorted(p.name for p in tb.iterdir()) == ["loop-0", "loop-1"]
    acc = EventAccumulator(str(tb / "loop-1"))
    acc.Reload()
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    lr = doc["methods"]["ours-wd-lr-m"]["hparams"]["lr"]  # per member, at the recorded steps
    got = [e.value for e in acc.Scalars("hparam/lr/member_0")]
    assert got == pytest.approx(lr[0], rel=1e-5)


# ---------------------------------------------------------------------------- Baydin as Clarke et al.'s code runs it


def _member(tree, j):
    return {k: v[j].detach().clone() for k, v in tree.items()}


def _mse_grad(w, X, y):
    w = {k: v.clone().requires_grad_() for k, v in w.items()}
    loss = ((mlp_forward(w, X) - y) ** 2).mean()
    return dict(zip(w, torch.autograd.grad(loss, list(w.values())))), float(loss)


def test_authors_baydin_is_sgd_on_log10_lr_along_minus_gradient_dot_product(data_dir):
    """One step of ``baydin`` against a hand computation per member (plain torch, no vmap): the SGD step with
    momentum and weight decay on train+validation, then log10 lr += 0.001 * g_1 . g_0, momentum and decay fixed."""
    cfg = ClarkeConfig(dataset="energy", inits=3, steps=1, dtype="float64", data_dir=str(data_dir))
    problem = load_problem(cfg)
    run = start_method(cfg, problem, "baydin")
    tuner = run.tuner
    assert is_authors_baydin(tuner) and isinstance(tuner.hyper_opt, torch.optim.SGD)
    assert tuner.hyper_opt.param_groups[0]["lr"] == 0.001 and tuner.tuned_keys == ["lr"]
    X, y = problem.merge(problem.train, problem.val)  # Baydin trains on train + validation, full batch
    assert len(X) == len(run.train_batches()[0]) == len(problem.train[0]) + len(problem.val[0])
    w0, raw0, nat0 = dict(tuner.params), {k: v.detach().clone() for k, v in tuner.raw.items()}, tuner.describe()
    run.advance(1)
    nat1 = tuner.describe()
    for j in range(cfg.inits):
        lr, mom, wd = (float(nat0[n][j]) for n in ("lr", "momentum", "weight_decay"))
        g0, _ = _mse_grad(_member(w0, j), X, y)
        w1 = {k: v - lr * (g0[k] + wd * v) for k, v in _member(w0, j).items()}  # torch SGD's first step
        for k in w1:
            torch.testing.assert_close(tuner.params[k][j], w1[k], rtol=1e-12, atol=1e-12)
        g1, _ = _mse_grad(w1, X, y)
        dot = sum(float((g1[k] * g0[k]).sum()) for k in g0)
        expected = min(0.0, max(-10.0, float(raw0["lr"][j]) + 0.001 * dot))
        assert float(tuner.raw["lr"][j]) == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert dot != 0 and float(tuner.raw["lr"][j]) != float(raw0["lr"][j])
        for n in ("momentum", "weight_decay"):
            assert float(nat1[n][j]) == float(nat0[n][j])


def test_authors_baydin_hypergradient_is_the_lr_derivative_of_a_plain_sgd_step(data_dir):
    """-g_1 . g_0 is d L(w_0 - lr g_0) / d lr (central finite difference): the quantity Baydin et al. follow."""
    cfg = ClarkeConfig(dataset="energy", inits=1, steps=1, dtype="float64", data_dir=str(data_dir))
    problem = load_problem(cfg)
    run = start_method(cfg, problem, "baydin")
    X, y = problem.merge(problem.train, problem.val)
    w0 = _member(run.tuner.params, 0)
    g0, _ = _mse_grad(w0, X, y)
    lr, eps = 0.01, 1e-6

    def loss_at(a):
        return _mse_grad({k: v - a * g0[k] for k, v in w0.items()}, X, y)[1]

    fd = (loss_at(lr + eps) - loss_at(lr - eps)) / (2 * eps)
    run.tuner.strategy.prev = (run.tuner.params, None)
    run.tuner.params = {k: (v - lr * g0[k]).unsqueeze(0) for k, v in w0.items()}  # population axis of one
    h = run.tuner.strategy.hypergradient(run.tuner, (X, y), (X, y))["lr"]
    assert float(h[0]) == pytest.approx(fd, rel=1e-6)


def test_authors_baydin_clamps_raw_lr_into_clarkes_box(data_dir):
    cfg = ClarkeConfig(dataset="energy", inits=2, steps=1, dtype="float64", baydin_hyper_lr=1e6, data_dir=str(data_dir))
    run = start_method(cfg, load_problem(cfg), "baydin")
    run.advance(1)
    raw = run.tuner.raw["lr"]
    assert bool(((raw >= -10) & (raw <= 0)).all()) and bool((raw == 0).any())  # pushed up to lr = 1, no further


def test_earlier_baydin_files_become_baydin_ours(tmp_path):
    (tmp_path / "methods").mkdir()
    (tmp_path / "checkpoints").mkdir()
    old = {"final_test_loss": [1.0], "final_val_loss": [1.0], "seconds": [1.0]}
    (tmp_path / "methods" / "baydin.json").write_text(json.dumps(old))
    torch.save({"tuner": {}}, tmp_path / "checkpoints" / "baydin.pt")
    with pytest.warns(UserWarning, match="baydin-ours"):
        _migrate_baydin(tmp_path)
    assert json.loads((tmp_path / "methods" / "baydin-ours.json").read_text()) == old
    assert (tmp_path / "checkpoints" / "baydin-ours.pt").exists()
    assert not (tmp_path / "methods" / "baydin.json").exists()
    new = {**old, "variant": AUTHORS_BAYDIN}
    (tmp_path / "methods" / "baydin.json").write_text(json.dumps(new))
    _migrate_baydin(tmp_path)  # the authors' variant's own files stay
    assert json.loads((tmp_path / "methods" / "baydin.json").read_text()) == new


def test_baydin_variants_and_records_in_a_run(energy_run):
    _, doc = energy_run
    assert doc["methods"]["baydin"]["variant"] == AUTHORS_BAYDIN
    assert "variant" not in doc["methods"]["baydin-ours"]
    assert doc["config"]["baydin_hyper_lr"] == 0.001


def test_perplexity_rows_are_statistics_of_exp_cross_entropy():
    doc = {"methods": {"a": {"final_test_loss": [1.0, 2.0, None, 3.0]}}}
    (row,) = perplexity_rows(doc, n_resamples=50)
    assert row["median"] == pytest.approx(math.exp(2.0))
    assert row["best"] == pytest.approx(math.e) and row["diverged"] == 1 and row["n"] == 4
    assert row["mean"] == pytest.approx((math.e + math.exp(2) + math.exp(3)) / 3)


def test_paper_protocol_is_one_option_away_and_explicit_options_win(tmp_path, capsys):
    """``--paper-protocol``: Clarke et al.'s scale (PTB: 50 inits, their 2391 x 10 weight steps = 72 epochs, the
    2 x 650 LSTM with bptt 70 and 40 sequences); --inits / --steps / --lm-size given on the command line win."""
    p = cli.build_parser()

    def cfg(*extra):
        return clarke.config_from_args(p.parse_args(["run", "clarke", *extra, "--out", str(tmp_path)]))

    c = cfg("--dataset", "ptb", "--paper-protocol")
    assert (c.inits, c.steps, c.lm_size, c.batch_size) == (50, 2391 * 10, "paper", None)
    assert LM_SIZES[c.lm_size] == dict(embed=650, hidden=650, layers=2, bptt=70, batch=40)
    # 72 passes over the 929,589 training tokens in bptt-70 windows of 40 sequences: 72 * 929589 / 2800 steps
    assert abs(c.steps - 72 * 929589 / (40 * 70)) < 10
    c = cfg("--dataset", "ptb", "--paper-protocol", "--inits", "3", "--lm-size", "cpu")
    assert (c.inits, c.steps, c.lm_size) == (3, 23910, "cpu")
    c = cfg("--dataset", "ptb")  # the CPU size without the option
    assert (c.inits, c.steps, c.lm_size) == (40, 4000, "cpu")
    assert (cfg("--dataset", "energy", "--paper-protocol").inits, cfg("--dataset", "energy").inits) == (200, 40)
    assert cfg("--dataset", "fashion-mnist", "--paper-protocol").steps == 8400  # 10 epochs of 42,000 / 50
    assert cli.main(["run", "clarke", "--dataset", "digits", "--paper-protocol", "--out", str(tmp_path / "d")]) == 2
    out = capsys.readouterr().out
    assert "no paper protocol for 'digits'" in out and len(out.strip().splitlines()) == 1


def test_widened_lr_range_and_rollback(tmp_path, data_dir):
    """--lr-max 1.0 draws initial learning rates from [1e-6, 1]; seed 0's first member (lr 0.71) overflows within
    5 steps. With --on-divergence record it is frozen and counted; with rollback it returns to its last good
    state with a halved learning rate and finishes, and the members that never diverged are bit-identical."""
    cfg = ClarkeConfig(dataset="energy", inits=3, steps=1, data_dir=str(data_dir), lr_max=1.0)
    lr = build_tuner(cfg, load_problem(cfg), METHODS["random"]).describe()["lr"]
    assert bool(((lr >= 1e-6) & (lr <= 1.0)).all()) and float(lr.max()) > 0.1
    docs = {}
    for mode in ("record", "rollback"):
        out = tmp_path / mode
        args = ["run", "clarke", "--dataset", "energy", "--methods", "random", "--inits", "3", "--steps", "40"]
        args += ["--lr-max", "1.0", "--on-divergence", mode, "--out", str(out), "--data-dir", str(data_dir)]
        assert cli.main(args) == 0
        docs[mode] = json.loads((out / "methods" / "random.json").read_text())
    record, rollback = docs["record"], docs["rollback"]
    assert record["diverged_at"][0] is not None and rollback["diverged_at"] == [None, None, None]
    assert rollback["rollbacks"][0] >= 1 and rollback["rollbacks"][1:] == [0, 0]
    assert math.isfinite(rollback["final_test_loss"][0])
    assert rollback["final_test_loss"][1:] == record["final_test_loss"][1:]
    with pytest.raises(ValueError, match="--lr-max must be"):
        clarke.validate_config(ClarkeConfig(dataset="energy", lr_max=2.0))


def test_max_interval_gives_the_tuned_methods_an_adaptive_schedule(data_dir):
    from bilevel.schedules import Adaptive, Every
    from bilevel_studies.clarke.config import validate_config

    cfg = ClarkeConfig(dataset="energy", inits=2, steps=30, interval=5, max_interval=40, data_dir=str(data_dir))
    problem = load_problem(cfg)
    assert build_tuner(cfg, problem, METHODS["ours-wd-lr-m"]).schedule == Adaptive(5, max_interval=40)
    assert build_tuner(cfg, problem, METHODS["random"]).schedule == Every(5)  # nothing tuned: no schedule to adapt
    assert build_tuner(cfg, problem, METHODS["baydin"]).schedule == Every(1)  # every step, as the authors'
    with pytest.raises(ValueError, match="--max-interval 4 must be >= --interval 5"):
        validate_config(ClarkeConfig(interval=5, max_interval=4))
