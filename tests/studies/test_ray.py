"""Population search on Ray Tune (generic bilevel.search.ray_tune) with the Clarke et al. problem plugged in
(bilevel_studies.clarke.search): blocks of initialisations as trials, restore, the PBT ratio mutation, ASHA/PBT."""

import json
import math
import shutil

import pytest
import torch

pytest.importorskip("ray.tune", reason="Ray Tune not installed (pip install 'bilevel[ray]')")

from bilevel.hparams import NATURAL_INIT_EPS  # noqa: E402
from bilevel.search import ray_tune as R  # noqa: E402
from bilevel_studies import cli  # noqa: E402
from bilevel_studies.clarke import search as S  # noqa: E402
from bilevel_studies.clarke.config import ClarkeConfig, Method  # noqa: E402
from bilevel_studies.clarke.methods import start_method  # noqa: E402
from bilevel_studies.clarke.problem import load_problem  # noqa: E402
from bilevel_studies.clarke.running import run_experiment  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def ray_local():
    """One local 2-CPU Ray instance for the whole module (the library joins it instead of starting its own)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


# ---------------------------------------------------------------------------- pure pieces (Clarke's layout)
# (the library's generic pieces alone: tests/test_search.py)


def test_pbt_ratio_mutation_scales_the_tuners_current_values(data_dir):
    """B.8.2: PBT's new/old ratio multiplies the hyperparameters our tuner has moved to, not PBT's values."""
    cfg = ClarkeConfig(
        dataset="energy", inits=2, steps=20, interval=5, lookback=2, dtype="float64", data_dir=str(data_dir)
    )
    problem = load_problem(cfg)
    start = {"lr": [1e-2, 3e-3], "weight_decay": [1e-4, 1e-6], "momentum": [0.3, 0.7]}
    run = start_method(cfg, problem, "ours-wd-lr-m", hparams=start)
    torch.testing.assert_close(run.tuner.describe()["lr"], torch.tensor([1e-2, 3e-3], dtype=torch.float64))
    run.advance(20)
    before = run.tuner.describe()
    assert not torch.allclose(before["lr"], torch.tensor([1e-2, 3e-3], dtype=torch.float64))  # the tuner moved them
    wd_raw = run.tuner.raw["weight_decay"].clone()
    adam = {k: v.clone() for k, v in run.tuner.hyper_opt.state_dict()["state"][0].items() if torch.is_tensor(v)}
    pbt_old = {"lr": 1e-2, "weight_decay": 1e-4, "momentum": 0.3}
    pbt_new = {"lr": 1.2e-2, "weight_decay": 1e-4, "momentum": 0.3 * 1.8}
    ratios = R.apply_pbt_mutation(run.tuner, pbt_new, pbt_old)
    assert ratios == pytest.approx({"lr": 1.2, "momentum": 1.8})
    after = run.tuner.describe()
    torch.testing.assert_close(after["lr"], before["lr"] * 1.2, rtol=1e-12, atol=0)
    assert torch.equal(run.tuner.raw["weight_decay"], wd_raw)  # unchanged by PBT: untouched
    mom = before["momentum"] * 1.8
    # a momentum pushed to or past 1 is moved just inside (0, 1)
    expect = torch.where(mom >= 1, torch.full_like(mom, 1 - NATURAL_INIT_EPS), mom)
    assert bool((mom[1] >= 1) & (mom[0] < 1))
    torch.testing.assert_close(after["momentum"], expect, rtol=1e-9, atol=1e-12)
    for k, v in run.tuner.hyper_opt.state_dict()["state"][0].items():  # the hyper-optimiser's state is kept
        if torch.is_tensor(v):
            assert torch.equal(v, adam[k])
    with pytest.raises(ValueError, match="positive and finite"):
        run.tuner.rescale("lr", -1.0)
    with pytest.raises(ValueError, match="not in the space"):
        run.tuner.rescale("dropout", 2.0)


def test_merge_blocks_concatenates_members():
    def part(vals):
        return {
            "final_test_loss": vals,
            "final_val_loss": vals,
            "final_train_loss": vals,
            "seconds": [1.0] * len(vals),
            "diverged_at": [None] * len(vals),
            "wall_seconds": float(len(vals)),
            "curves": {
                "step": [5, 10],
                "test_loss": [[v, v] for v in vals],
                "val_loss": [[v, v] for v in vals],
                "train_loss": [[v, v] for v in vals],
            },
            "hparams": {"step": [5, 10], "lr": [[v, v] for v in vals]},
        }

    m = R.merge_blocks([part([1.0, 2.0]), part([3.0])])
    assert m["final_test_loss"] == [1.0, 2.0, 3.0] and m["wall_seconds"] == 3.0
    assert m["curves"]["step"] == [5, 10] and m["hparams"]["lr"][2] == [3.0, 3.0]


def test_interrupted_ray_run_prints_the_resume_message(tmp_path, data_dir, monkeypatch, capsys):
    """The CLI turns an unfinished Ray run into its "interrupted ... run the same command again" exit 130."""

    def stopped(*a, **k):
        R.check_finished([("t0", "TERMINATED"), ("t1", "RUNNING")], tmp_path / "ray")

    monkeypatch.setattr(S, "run_clarke", stopped)
    rc = cli.main(
        [
            "run",
            "clarke",
            "--dataset",
            "energy",
            "--methods",
            "random",
            "--inits",
            "2",
            "--steps",
            "10",
            "--backend",
            "ray",
            "--out",
            str(tmp_path / "o"),
            "--data-dir",
            str(data_dir),
        ]
    )
    assert rc == 130 and "run the same command again to resume" in capsys.readouterr().out


def test_pbt_explore_clips_into_the_tuners_domains():
    b = S.hparam_bounds()
    assert b["lr"]["clip"] == (1e-10, 1.0) and b["momentum"]["domain"] == (0.0, 1.0)
    c = S.clip_to_domains({"member": 3, "lr": 0.9 * 1.2, "weight_decay": 1e-8, "momentum": 0.9 * 1.2})
    assert c == {"member": 3, "lr": 1.0, "weight_decay": 1e-8, "momentum": 1 - NATURAL_INIT_EPS}
    c = S.clip_to_domains({"lr": 2.0, "weight_decay": 0.0, "momentum": 0.0})
    assert c == {"lr": 1.0, "weight_decay": NATURAL_INIT_EPS, "momentum": NATURAL_INIT_EPS}
    assert S.clip_to_domains({"lr": 1e-12, "weight_decay": 1e-3, "momentum": 0.5})["lr"] == 1e-10
    inside = {"lr": 1e-3 * 0.8, "weight_decay": 1e-5 * 1.2, "momentum": 0.5 * 1.2}
    assert R.clip_to_domains(dict(inside), b) == inside  # values inside the domains are left alone


# ---------------------------------------------------------------------------- Ray end to end


def test_ray_backend_equals_local_per_initialisation_adds_methods_and_restores(tmp_path, data_dir, ray_local):
    args = [
        "--dataset",
        "energy",
        "--inits",
        "3",
        "--steps",
        "20",
        "--interval",
        "5",
        "--lookback",
        "2",
        "--dtype",
        "float64",
        "--checkpoint-every",
        "10",
        "--data-dir",
        str(data_dir),
    ]
    out = tmp_path / "ray"
    ray_args = [*args, "--out", str(out), "--backend", "ray", "--block-size", "2"]
    # first one method, then a second one added in the same --out (used to fail: KeyError 'random')
    assert cli.main(["run", "clarke", "--methods", "random", *ray_args]) == 0
    first = json.loads((out / "results.json").read_text())
    assert cli.main(["run", "clarke", "--methods", "random,ours-wd-lr-m", *ray_args]) == 0
    ray_doc = json.loads((out / "results.json").read_text())
    assert list(ray_doc["methods"]) == ["random", "ours-wd-lr-m"]
    assert ray_doc["methods"]["random"] == first["methods"]["random"]  # the first method is unchanged
    cfg = ClarkeConfig(
        dataset="energy",
        methods=["random", "ours-wd-lr-m"],
        inits=3,
        steps=20,
        interval=5,
        lookback=2,
        dtype="float64",
        checkpoint_every=10,
        data_dir=str(data_dir),
    )
    local = run_experiment(cfg, tmp_path / "local")
    for m in ("random", "ours-wd-lr-m"):
        a, b = local["methods"][m], ray_doc["methods"][m]
        assert len(b["final_test_loss"]) == 3
        for key in ("final_test_loss", "final_val_loss", "final_train_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-9), (m, key)
        for name in ("lr", "weight_decay", "momentum"):
            for ra, rb in zip(a["hparams"][name], b["hparams"][name]):
                assert rb == pytest.approx(ra, rel=1e-9)
    # one Ray Tune experiment per method, two blocks (2 + 1 members) each, each block a trial
    for m in ("random", "ours-wd-lr-m"):
        trials = [p for p in S.clarke_experiment(out, m).iterdir() if p.is_dir()]
        assert len(trials) == 2, m
    # lose everything but the Ray Tune experiments: re-running restores each (Tuner.restore), same results
    shutil.rmtree(out / "methods")
    (out / "results.json").unlink()
    again = run_experiment(cfg, out, backend="ray", block_size=2)
    for m in ("random", "ours-wd-lr-m"):
        assert again["methods"][m]["final_test_loss"] == ray_doc["methods"][m]["final_test_loss"]
    assert (out / "table.md").exists()


def test_ctrl_c_during_a_ray_run_is_an_interrupt_and_the_rerun_resumes(tmp_path, data_dir, ray_local):
    """A real SIGINT to the driver after the first trial completes: Tune stops with trials left, run_clarke
    raises Interrupted (a KeyboardInterrupt), and the same call again finishes them with the local results."""
    import os
    import signal

    cfg = ClarkeConfig(
        dataset="energy",
        methods=["random"],
        inits=3,
        steps=10,
        dtype="float64",
        checkpoint_every=5,
        data_dir=str(data_dir),
    )
    sent = []

    def factory(name, total):
        def advance(n=1):
            handler = signal.getsignal(signal.SIGINT)
            # only with Tune's own handler in place (else a SIGINT would stop pytest itself)
            if not sent and getattr(handler, "__name__", "") == "signal_interrupt_tune_run":
                sent.append(name)
                os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: Tune's handler stops the run gracefully

        return advance

    out = tmp_path / "int"
    with pytest.raises(R.Interrupted, match="unfinished"):
        S.run_clarke(cfg, ["random"], out, block_size=1, progress_factory=factory)
    assert sent
    res = S.run_clarke(cfg, ["random"], out, block_size=1)
    local = run_experiment(cfg, tmp_path / "local")
    assert res["random"]["final_test_loss"] == pytest.approx(local["methods"]["random"]["final_test_loss"], rel=1e-9)


def test_asha_pbt_cli_smoke(tmp_path, data_dir, ray_local):
    out = tmp_path / "ap"
    args = {
        "--dataset": "energy",
        "--methods": "ours-wd-lr-m",
        "--inits": "3",
        "--steps": "20",
        "--interval": "5",
        "--lookback": "2",
        "--report-every": "10",
        "--perturbation-interval": "10",
        "--asha-trials": "4",
        "--out": str(out),
        "--data-dir": str(data_dir),
    }

    def argv(**change):
        return ["run", "asha-pbt", *[x for k, v in {**args, **change}.items() for x in (k, v)]]

    assert cli.main(argv()) == 0
    doc = json.loads((out / "results.json").read_text())
    assert list(doc["methods"]) == ["asha+ours-wd-lr-m", "pbt+ours-wd-lr-m"]
    assert doc["config"]["asha_rungs"] == [10, 20]
    # live curves under Ray Tune: Ray's own TensorBoard logging, one event file per trial
    events = list((out / "ray").rglob("events.out.tfevents*"))
    trials = {p.parent for p in (out / "ray").rglob("params.json")}
    assert trials and {p.parent for p in events} == trials
    for name, m in doc["methods"].items():
        n = m["fully_trained"]
        assert n == len(m["final_test_loss"]) and (n == 3 if name.startswith("pbt") else 1 <= n <= 4)
        assert all(v is None or 0 < v < 1e4 for v in m["final_test_loss"])
        assert m["incumbent"]["test_loss"] == sorted(m["incumbent"]["test_loss"], reverse=True)
        assert all(math.isfinite(h["lr"]) and h["lr"] > 0 for h in m["final_hparams"])
    # every ASHA trial reaches the first rung (10 steps); only the fully trained ones reach 20
    a = doc["methods"]["asha+ours-wd-lr-m"]
    assert a["weight_steps"] == 20 * a["fully_trained"] + 10 * (4 - a["fully_trained"])
    assert (out / "incumbent.png").stat().st_size > 1000 and (out / "table.md").exists()
    p = doc["methods"]["pbt+ours-wd-lr-m"]
    assert len(p["mutations"]) == 3 and p["exploits"] >= 0 and isinstance(p["applied_ratios"], list)
    # a re-run in the same --out with another configuration is refused (it used to return the stale results)
    for change in ({"--steps": "30"}, {"--inits": "4"}, {"--perturbation-interval": "20"}):
        assert cli.main(argv(**change)) == 2, change
        assert json.loads((out / "results.json").read_text()) == doc
    # the same command again resumes: the saved results, unchanged
    assert cli.main(argv()) == 0
    assert json.loads((out / "results.json").read_text())["methods"] == doc["methods"]


def test_pbt_exploit_applies_the_ratio_to_the_donors_tuned_values(tmp_path, data_dir, ray_local):
    """PBT + ours end to end with a forced exploit: synchronous PBT, 2 paths, quantile 0.5 (at step 10 the
    worse path surely clones the better; 15 steps, so no perturbation at the end), no resampling (each ratio
    is a 1.2 / 0.8 factor, or less where the explored value was clipped into the domain). The mutation starts
    from the donor's *tuned* values after 10 steps (recomputed here) and sets the tuner to those x the ratio."""
    cfg = ClarkeConfig(
        dataset="energy", inits=2, steps=15, interval=5, lookback=2, dtype="float64", data_dir=str(data_dir)
    )
    out = tmp_path / "pbt"
    res = S.run_scheduled(
        cfg,
        "ours-wd-lr-m",
        "pbt",
        2,
        out,
        report_every=5,
        perturbation_interval=10,
        quantile_fraction=0.5,
        resample_probability=0.0,
        synch=True,
    )
    assert res["fully_trained"] == 2 and res["exploits"] == 1
    (m,) = {json.dumps(x, sort_keys=True): x for path in res["mutations"] for x in path}.values()
    assert m["step"] == 10 and m["donor"] != m["trial"] and m["ratios"]
    assert res["applied_ratios"] == [{"trial": m["trial"], "step": 10, "ratios": m["ratios"]}]
    # the donor's tuned values after 10 steps, trained here alone from its PBT (Table 5) values
    problem = load_problem(cfg)
    one = ClarkeConfig(**{**cfg.__dict__, "inits": 1})
    donor = start_method(
        one,
        problem,
        Method(merge_train_val=False),
        first=m["donor_member"],
        hparams={n: [m["pbt_old"][n]] for n in S.HPARAM_NAMES},
    )
    donor.advance(10)
    tuned = {n: float(v[0]) for n, v in donor.tuner.describe().items()}
    bounds = S.hparam_bounds()
    for n in S.HPARAM_NAMES:
        assert m["before"][n] == pytest.approx(tuned[n], rel=1e-9) and m["before"][n] != m["pbt_old"][n]
        r = m["ratios"].get(n, 1.0)
        assert r == pytest.approx(m["pbt_new"][n] / m["pbt_old"][n], rel=1e-12)
        assert any(
            m["pbt_new"][n] == pytest.approx(R.clip_to_domains({n: m["pbt_old"][n] * f}, bounds)[n], rel=1e-12)
            for f in (0.8, 1.2)
        )
        expect = m["before"][n] * r
        if n == "momentum":
            expect = min(expect, 1 - NATURAL_INIT_EPS)
        assert m["after"][n] == pytest.approx(expect, rel=1e-9), n
    # the exploited path's later reports carry the ratio; the results (as asha-pbt saves them) keep the record
    assert json.loads(json.dumps(res))["mutations"] == res["mutations"]
