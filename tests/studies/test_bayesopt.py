"""The Bayesian-optimisation baseline (Clarke et al. 2022, B.5) on Optuna: the generic bilevel.search.bayesopt
with the Clarke et al. problem plugged in (bilevel_studies.clarke.search)."""

import json
import math

import pytest

pytest.importorskip("optuna", reason="Optuna not installed (pip install 'bilevel[ray]')")

from bilevel.search import bayesopt as B  # noqa: E402
from bilevel_studies import cli  # noqa: E402
from bilevel_studies.clarke import search as S  # noqa: E402
from bilevel_studies.clarke.config import ClarkeConfig, Method  # noqa: E402
from bilevel_studies.clarke.methods import method_results, start_method  # noqa: E402
from bilevel_studies.clarke.problem import load_problem  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def test_natural_values_of_the_table5_space():
    h = S.natural({"log10_lr": -2.0, "log10_weight_decay": -5.0, "momentum": 0.9})
    assert h == pytest.approx({"lr": 1e-2, "weight_decay": 1e-5, "momentum": 0.9})
    d = S.distributions()
    assert (d["log10_lr"].low, d["log10_lr"].high) == (-6.0, -1.0)
    assert (d["log10_weight_decay"].low, d["log10_weight_decay"].high) == (-7.0, -2.0)
    assert (d["momentum"].low, d["momentum"].high) == (0.0, 1.0)


def test_incumbent_follows_the_best_validation_sample():
    recs = [
        {"val": 3.0, "test": 30.0, "seconds": 1.0},
        {"val": None, "test": None, "seconds": 1.0},
        {"val": 1.0, "test": 40.0, "seconds": 2.0},
        {"val": 2.0, "test": 5.0, "seconds": 1.0},
    ]
    t, v, te = B.incumbent(recs)
    assert t == [1.0, 2.0, 4.0, 5.0] and v == [3.0, 3.0, 1.0, 1.0]
    assert te == [30.0, 30.0, 40.0, 40.0]  # chosen by validation loss, not by the (hidden) test loss


def test_first_samples_are_random_then_the_sampler_is_used():
    study = B.make_study(0, "gp", startup=2)
    B.replay(
        study,
        [
            {"params": {"log10_lr": -3.0, "log10_weight_decay": -4.0, "momentum": 0.5}, "val": 1.0},
            {"params": {"log10_lr": -2.0, "log10_weight_decay": -6.0, "momentum": 0.1}, "val": None},
        ],
        S.distributions(),
    )
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]
    assert study.best_value == 1.0
    # a diverged sample is told the worst finite validation loss seen so far (none yet: failed)
    assert B.objective(None, []) is None and B.objective(None, [2.0, None, 5.0]) == 5.0
    assert B.objective(1.5, [9.0]) == 1.5
    with pytest.raises(ValueError, match="unknown sampler"):
        B.make_study(0, "grid")


def test_bo_samples_equal_standalone_trainings_and_resume(data_dir):
    cfg = ClarkeConfig(dataset="energy", inits=2, steps=15, dtype="float64", data_dir=str(data_dir))
    problem = load_problem(cfg)
    saved = []
    res = S.run_bayesopt(
        cfg, problem, repeats=2, samples=3, startup=2, save=lambda s: saved.append(json.loads(json.dumps(s)))
    )
    assert len(res["records"]) == 2 and all(len(r) == 3 for r in res["records"])
    method = Method(mode="none", tuned=(), merge_train_val=False)
    one = ClarkeConfig(**{**cfg.__dict__, "inits": 1})
    for r in range(2):
        for k, rec in enumerate(res["records"][r]):
            # each BO sample = member k * repeats + r trained alone with the proposed hyperparameters
            run = start_method(
                one, problem, method, first=k * 2 + r, hparams={n: [v] for n, v in rec["natural"].items()}
            )
            run.advance(cfg.steps)
            alone = method_results(one, problem, run)
            assert rec["val"] == pytest.approx(alone["final_val_loss"][0], rel=1e-9)
            assert rec["test"] == pytest.approx(alone["final_test_loss"][0], rel=1e-9)
        best = min((x for x in res["records"][r] if x["val"] is not None), key=lambda x: x["val"])
        assert res["final_test_loss"][r] == best["test"] and res["final_val_loss"][r] == best["val"]
    # resume after the second sample: the first two samples are kept, the third is trained
    resumed = S.run_bayesopt(cfg, problem, repeats=2, samples=3, startup=2, state=saved[1])
    for r in range(2):
        assert resumed["records"][r][:2] == saved[1]["records"][r]
        assert len(resumed["records"][r]) == 3
    with pytest.raises(ValueError, match="startup"):
        S.run_bayesopt(cfg, problem, repeats=1, samples=2, startup=3)


def test_bayesopt_cli_smoke(tmp_path, data_dir):
    out = tmp_path / "bo"
    assert (
        cli.main(
            [
                "run",
                "bayesopt",
                "--dataset",
                "energy",
                "--repeats",
                "2",
                "--samples",
                "4",
                "--startup",
                "2",
                "--steps",
                "20",
                "--out",
                str(out),
                "--data-dir",
                str(data_dir),
            ]
        )
        == 0
    )
    doc = json.loads((out / "results.json").read_text())
    m = doc["methods"]["bayesopt"]
    assert doc["experiment"] == "bayesopt" and doc["config"]["library"] == "optuna"
    assert len(m["final_test_loss"]) == 2 and all(
        v is None or (math.isfinite(v) and v > 0) for v in m["final_test_loss"]
    )
    assert all(len(r) == 4 for r in m["records"])
    assert (out / "incumbent.png").exists() and (out / "table.md").exists()
    # a re-run in the same --out with another configuration is refused (shared check, rundir.check_run_config)
    assert (
        cli.main(
            [
                "run",
                "bayesopt",
                "--dataset",
                "energy",
                "--repeats",
                "2",
                "--samples",
                "4",
                "--startup",
                "2",
                "--steps",
                "30",
                "--out",
                str(out),
                "--data-dir",
                str(data_dir),
            ]
        )
        == 2
    )
    assert json.loads((out / "results.json").read_text()) == doc
