"""bilevel.search on its own: the generic pieces of the population search (no study, no Ray cluster).

The trainables are driven here with Ray Tune's session replaced by recorders (``report``,
``restored_state``), so the protocol of the runs that user factories build is checked without Ray;
the Clarke et al. problem plugged in, end to end on Ray, is tests/studies/test_ray.py.
"""

import json
import math

import pytest

from bilevel.hparams import NATURAL_INIT_EPS
from bilevel.search import bayesopt as B
from bilevel.search import ray_tune as R

# ---------------------------------------------------------------------------- pure pieces


def test_blocks_cover_the_population_in_order():
    assert R.blocks(5, 2) == [(0, 2), (2, 2), (4, 1)]
    assert R.blocks(3, 8) == [(0, 3)]
    with pytest.raises(ValueError, match="block size"):
        R.blocks(3, 0)


def test_asha_budget_matches_the_paper():
    # Clarke et al. B.8.2: rungs (1, 4, 16, 64, 256, 1024, 4000) and 4000 x 200 / 7 = 114 286 trials
    assert R.asha_rungs(4000, 1, 4) == [1, 4, 16, 64, 256, 1024, 4000]
    assert R.asha_trials_for_budget(200, 4000, 1, 4) == 114286
    assert R.asha_rungs(1000, 10, 4) == [10, 40, 160, 640, 1000]


def test_incumbent_is_the_running_minimum_over_time():
    rows = [(3.0, 5.0), (1.0, 9.0), (2.0, None), (4.0, R.DIVERGED), (5.0, 4.0), (6.0, 4.5)]
    assert R.incumbent(rows) == ([1.0, 3.0, 5.0], [9.0, 5.0, 4.0])


def test_pbt_ratios_only_for_changed_values():
    old = {"lr": 1e-3, "weight_decay": 1e-5, "momentum": 0.5}
    assert R.pbt_ratios(old, old) == {}
    r = R.pbt_ratios({"lr": 1.2e-3, "weight_decay": 1e-5, "momentum": 0.4}, old)
    assert r.keys() == {"lr", "momentum"}
    assert r["lr"] == pytest.approx(1.2) and r["momentum"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="positive and finite"):
        R.pbt_ratios({**old, "lr": 0.0}, old)


def test_unfinished_trials_are_detected_and_reported_as_an_interrupt():
    """After a SIGINT, Tuner.fit returns with trials still pending/running/paused: that is an interrupt."""
    done = [("a", "TERMINATED"), ("b", "ERROR")]
    R.check_finished(done)  # finished or failed: no interrupt (failures raise RuntimeError in fit)
    left = [("a", "TERMINATED"), ("b", "RUNNING"), ("c", "PENDING"), ("d", "PAUSED")]
    assert R.unfinished(left) == left[1:]
    with pytest.raises(KeyboardInterrupt, match=r"3 of 4 trial\(s\) unfinished \(b \(RUNNING\), c \(PENDING\)"):
        R.check_finished(left, "/x/ray/clarke-random")
    assert issubclass(R.Interrupted, KeyboardInterrupt)


def test_member_blocks_must_cover_the_population_once():
    assert R.member_blocks([{"first": 2, "count": 1}, {"first": 0, "count": 2}], 3) == [(0, 2), (2, 1)]
    with pytest.raises(ValueError, match="do not cover"):
        R.member_blocks([{"first": 0, "count": 2}], 3)
    with pytest.raises(ValueError, match="do not cover"):
        R.member_blocks([{"first": 0, "count": 2}, {"first": 1, "count": 2}], 3)


def test_merge_blocks_joins_any_per_member_layout():
    """Lists are per-member (concatenated), numbers summed, mappings are tables on a shared axis."""

    def part(first, n):
        members = list(range(first, first + n))
        return {
            "score": [float(m) for m in members],
            "cost": float(n),
            "name": "toy",
            "trace": {"t": [1, 2], "x": [[m, m] for m in members]},
        }

    m = R.merge_blocks([part(0, 2), part(2, 1)], axis="t")
    assert m == {
        "score": [0.0, 1.0, 2.0],
        "cost": 3.0,
        "name": "toy",
        "trace": {"t": [1, 2], "x": [[0, 0], [1, 1], [2, 2]]},
    }
    with pytest.raises(ValueError, match="disagree"):
        R.merge_blocks([part(0, 1), {**part(1, 1), "name": "other"}], axis="t")
    with pytest.raises(ValueError, match="no block"):
        R.merge_blocks([])


def test_clip_to_domains_uses_the_given_bounds_only():
    bounds = {"rate": {"domain": (0.0, math.inf), "clip": (1e-3, 1.0)}, "share": {"domain": (0.0, 1.0), "clip": None}}
    c = R.clip_to_domains({"member": 1, "rate": 5.0, "share": 1.2, "other": -7.0}, bounds)
    assert c == {"member": 1, "rate": 1.0, "share": 1 - NATURAL_INIT_EPS, "other": -7.0}
    assert R.clip_to_domains({"share": 0.0}, bounds) == {"share": NATURAL_INIT_EPS}  # missing names are skipped
    inside = {"rate": 0.5, "share": 0.5}
    assert R.clip_to_domains(dict(inside), bounds) == inside


class Toy:
    """A run for the trainables: ``x`` moves by ``rate`` per step; one hyperparameter, ``rate``."""

    def __init__(self, member=0, rate=1.0, diverge_at=None):
        self.member, self.rate, self.x, self.t, self.diverge_at = member, rate, 0.0, 0, diverge_at

    @property
    def step(self):
        return self.t

    @property
    def alive(self):
        return self.diverge_at is None or self.t < self.diverge_at

    def advance(self, steps):
        self.t += steps
        self.x += self.rate * steps

    def losses(self):
        return {"val_loss": abs(self.x - 10.0), "test_loss": math.inf if self.x > 100 else abs(self.x - 11.0)}

    def hparams(self):
        return {"rate": self.rate}

    def rescale(self, name, factor):
        assert name == "rate"
        self.rate *= factor

    def state_dict(self):
        return {"x": self.x, "t": self.t, "rate": self.rate}

    def load_state_dict(self, s):
        self.x, self.t, self.rate = s["x"], s["t"], s["rate"]

    def result(self):
        return {"x": [self.x] * 2, "t": self.t}


@pytest.fixture
def session(monkeypatch):
    """Ray Tune's session, recorded: every ``report`` call and a settable checkpoint to restore from."""
    rec = {"reports": [], "restore": None}
    monkeypatch.setattr(
        R,
        "report",
        lambda metrics, state=None, result=None: rec["reports"].append(
            (dict(metrics), None if state is None else json.loads(json.dumps(state)), result)
        ),
    )
    monkeypatch.setattr(R, "restored_state", lambda: rec["restore"])
    monkeypatch.setattr(R, "_trial_id", lambda: "trial-b")
    return rec


def toy_block(config):
    return Toy(member=config["job"]["first"], rate=config["rate"])


def test_population_trainable_checkpoints_and_finishes_the_factorys_run(session):
    trial = R.population_trainable(toy_block, steps=7, checkpoint_every=3)
    assert trial.__name__ == "toy_block"  # named after the factory: Tuner.restore checks the name
    trial({"job": {"first": 0, "count": 2}, "rate": 2.0, "threads": 1})
    assert [(m["step"], m["done"]) for m, _, _ in session["reports"]] == [(3, False), (6, False), (7, True)]
    assert [s["x"] for _, s, _ in session["reports"]] == [6.0, 12.0, 14.0]
    assert [r for _, _, r in session["reports"]] == [None, None, {"x": [14.0, 14.0], "t": 7}]
    # restarted from the step-6 checkpoint: one step more, the same result
    session["reports"].clear()
    session["restore"] = {"x": 12.0, "t": 6, "rate": 2.0}
    trial({"job": {"first": 0, "count": 2}, "rate": 2.0})
    assert [(m["step"], r) for m, _, r in session["reports"]] == [(7, {"x": [14.0, 14.0], "t": 7})]


def toy_scheduled(config):
    return Toy(member=config["member"], rate=config["rate"], diverge_at=config.get("diverge_at"))


def test_scheduled_trainable_applies_and_records_the_pbt_ratio_mutation(session):
    trial = R.scheduled_trainable(toy_scheduled, ["rate"], steps=6)
    base = {"member": 1, "report_every": 2, "checkpoint_every": 4, "threads": 1, "t0": 0.0}
    trial({**base, "rate": 1.0})
    steps = [m["step"] for m, _, _ in session["reports"]]
    assert steps == [2, 4, 6] and [s is not None for _, s, _ in session["reports"]] == [False, True, True]
    last = session["reports"][-1][0]
    assert last["val_loss"] == 4.0 and last["now_rate"] == 1.0 and last["mutated_at"] == -1
    assert json.loads(last["lineage"]) == []
    # an exploit: this trial starts from another trial's step-4 checkpoint (trained at rate 1.0), PBT now says 1.5
    donor = session["reports"][1][1]
    session["reports"].clear()
    session["restore"] = {**donor, "writer": "trial-a", "member": 0}
    trial({**base, "rate": 1.5})
    ((m5, _, _),) = session["reports"]
    assert m5["step"] == 6 and m5["ratio_rate"] == pytest.approx(1.5) and m5["mutated_at"] == 4
    (rec,) = json.loads(m5["lineage"])
    assert rec == {
        "step": 4,
        "trial": "trial-b",
        "donor": "trial-a",
        "donor_member": 0,
        "ratios": {"rate": 1.5},
        "pbt_old": {"rate": 1.0},
        "pbt_new": {"rate": 1.5},
        "before": {"rate": 1.0},
        "after": {"rate": 1.5},
    }
    assert m5["val_loss"] == pytest.approx(abs(4.0 + 2 * 1.5 - 10.0))


def test_scheduled_trainable_reports_diverged_and_non_finite_losses_as_diverged(session):
    trial = R.scheduled_trainable(toy_scheduled, ["rate"], steps=4)
    trial({"member": 0, "rate": 30.0, "report_every": 2, "checkpoint_every": 2, "t0": 0.0})
    (a, _, _), (b, _, _) = session["reports"]
    assert a["test_loss"] == abs(60.0 - 11.0) and b["test_loss"] == R.DIVERGED and not b["diverged"]
    session["reports"].clear()
    trial({"member": 0, "rate": 1.0, "diverge_at": 3, "report_every": 2, "checkpoint_every": 2, "t0": 0.0})
    last = session["reports"][-1][0]
    assert last["diverged"] and last["val_loss"] == last["test_loss"] == R.DIVERGED


def test_run_scheduled_checks_its_arguments(tmp_path):
    pytest.importorskip("ray.tune", reason="Ray Tune not installed (pip install 'bilevel[ray]')")
    with pytest.raises(ValueError, match="unknown scheduler"):
        R.run_scheduled(toy_scheduled, {"rate": [1.0]}, tmp_path, steps=4, scheduler="hyperband")
    with pytest.raises(ValueError, match="multiple of report_every"):
        R.run_scheduled(
            toy_scheduled, {"rate": [1.0]}, tmp_path, steps=4, scheduler="pbt", report_every=3, perturbation_interval=4
        )
    with pytest.raises(ValueError, match="same number"):
        R.run_scheduled(toy_scheduled, {"rate": [1.0], "b": [1.0, 2.0]}, tmp_path, steps=4, scheduler="asha")


# ---------------------------------------------------------------------------- Bayesian optimisation


def test_bayesopt_runs_any_evaluation_and_resumes():
    """Repeats evaluated together, the best-validation sample chosen, diverged points told the worst loss."""
    pytest.importorskip("optuna", reason="Optuna not installed (pip install 'bilevel[ray]')")
    calls = []

    def evaluate(k, points):
        calls.append((k, [dict(p) for p in points]))
        val = [(p["x"] - 0.3) ** 2 if p["x"] < 0.9 else math.nan for p in points]
        return {"val": val, "test": [v + 1.0 for v in val], "seconds": 2.0}

    space = {"u": (0.0, 1.0)}
    saved = []
    res = B.run(
        evaluate,
        space,
        repeats=2,
        samples=4,
        startup=2,
        seed=3,
        transform=lambda q: {"x": q["u"]},
        save=lambda s: saved.append(json.loads(json.dumps(s))),
    )
    assert [k for k, _ in calls] == [0, 1, 2, 3] and all(len(p) == 2 for _, p in calls)
    for r, recs in enumerate(res["records"]):
        assert [x["natural"]["x"] for x in recs] == [x["params"]["u"] for x in recs] == [p[r]["x"] for _, p in calls]
        assert all(x["seconds"] == 1.0 for x in recs)  # the evaluation's 2 s shared by the 2 repeats
        finite = [x for x in recs if x["val"] is not None]
        best = min(finite, key=lambda x: x["val"])
        assert res["final_val_loss"][r] == best["val"] and res["final_test_loss"][r] == best["val"] + 1.0
        assert all(
            x["told"] == (x["val"] if x["val"] is not None else B.objective(None, [y["val"] for y in recs[:i]]))
            for i, x in enumerate(recs)
        )
    assert res["seconds"] == [4.0, 4.0] and res["incumbent"]["seconds"][0] == [1.0, 2.0, 3.0, 4.0]
    # resumed after two samples: the first two kept, the evaluation called for the last two only
    calls.clear()
    again = B.run(
        evaluate, space, repeats=2, samples=4, startup=2, seed=3, transform=lambda q: {"x": q["u"]}, state=saved[1]
    )
    assert [k for k, _ in calls] == [2, 3]
    assert [r[:2] for r in again["records"]] == saved[1]["records"]
    with pytest.raises(ValueError, match="startup"):
        B.run(evaluate, space, repeats=1, samples=2, startup=3)
    d = B.distributions({"u": (0.0, 1.0)})
    assert (d["u"].low, d["u"].high) == (0.0, 1.0)
