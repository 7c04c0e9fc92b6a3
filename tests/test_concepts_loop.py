"""BilevelOptimizer on the one loop: bilevel.loop.run with a HyperFirst schedule and a MethodStrategy decides
when the outer step happens, the loop's callbacks fire, and the numbers are those of the hand-written
alternation (least squares f = 1/2 ||Phi w - y||^2, outer F = 1/2 (phi_v^T w - 2)^2)."""

import pytest
import torch

from bilevel import concepts as C
from bilevel.loop import HyperFirst

D = torch.float64


@pytest.fixture
def ls():
    g = torch.Generator().manual_seed(5)
    Phi = torch.randn(4, 6, generator=g, dtype=D)
    phi_v = torch.randn(6, generator=g, dtype=D)

    def inner(p, h):
        return 0.5 * ((Phi @ p["w"] - h["y"]) ** 2).sum()

    def outer(p, h):
        return 0.5 * (phi_v @ p["w"] - 2.0) ** 2

    lam = float(torch.linalg.eigvalsh(Phi.T @ Phi)[-1])
    return dict(Phi=Phi, phi_v=phi_v, y=torch.randn(4, generator=g, dtype=D), inner=inner, outer=outer, eta=0.5 / lam)


class Events:
    """Counts the loop's events and keeps what a callback sees."""

    def __init__(self):
        self.seen = []

    def on_weight_step(self, tuner):
        self.seen.append(("w", tuner.t, float(tuner.last_losses)))

    def on_interval(self, tuner):
        self.seen.append(("i", tuner.t, tuner.hyper_steps))

    def on_hyper_step(self, tuner):
        self.seen.append(("h", tuner.t, tuner.hyper_steps, tuner.last_hypergradient["y"].clone()))


def optimizer(ls, concept, m, **kw):
    return C.BilevelOptimizer(
        ls["inner"], ls["outer"], {"w": torch.zeros(6, dtype=D)}, {"y": ls["y"].clone()}, concept, m, 0.1, **kw
    )


def test_warm_partial_blocks_are_hyper_first_and_match_the_hand_written_loop(ls):
    """K = 2: x <- x - a dF(Unroll(w, x, 1))/dx, then two steps w <- w - eta df/dw; every callback fires."""
    eta, Phi, phi_v = ls["eta"], ls["Phi"], ls["phi_v"]
    ev = Events()
    opt = optimizer(
        ls,
        C.concept("warm-partial", inner_lr=eta, inner_steps=2),
        C.method("unroll", steps=1, lr=eta),
        callbacks=[ev],
    )
    assert opt.block == 2 and opt.loop.schedule == HyperFirst(2)
    assert isinstance(opt.loop.strategy, C.MethodStrategy) and type(opt.loop) is not C.ConceptTuner
    w, x = torch.zeros(6, dtype=D), ls["y"].clone()
    grads = []
    for _ in range(3):
        w1 = w - eta * Phi.T @ (Phi @ w - x)
        g = (phi_v @ w1 - 2.0) * eta * (Phi @ phi_v)  # dw1/dx = eta Phi^T
        grads.append(g)
        x = x - 0.1 * g
        for _ in range(2):
            w = w - eta * Phi.T @ (Phi @ w - x)
    hist = opt.run(3, callback=lambda o: None)
    torch.testing.assert_close(opt.hparams["y"].detach(), x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(opt.params["w"], w, rtol=1e-12, atol=1e-12)
    assert [r["t"] for r in hist] == [0, 1, 2, 3] and opt.t == 3 and opt.inner_steps_taken == 6
    assert opt.loop.t == 6 and opt.loop.hyper_steps == 3
    # the order of events: interval, hyper step (before any weight step), then the block of two weight steps
    kinds = [e[0] for e in ev.seen]
    assert kinds == ["i", "h", "w", "w"] * 3
    hyper = [e for e in ev.seen if e[0] == "h"]
    assert [(e[1], e[2]) for e in hyper] == [(0, 1), (2, 2), (4, 3)]
    for e, g in zip(hyper, grads):
        torch.testing.assert_close(e[3], g, rtol=1e-12, atol=1e-12)


def test_step_and_run_give_the_same_trajectory(ls):
    c, m = C.concept("warm-partial", inner_lr=ls["eta"], inner_steps=3), C.method("neumann", steps=2, lr=ls["eta"])
    a, b = optimizer(ls, c, m), optimizer(ls, c, m)
    used = [a.step()["y"].clone() for _ in range(4)]
    b.run(4)
    assert torch.equal(a.params["w"], b.params["w"]) and torch.equal(a.hparams["y"], b.hparams["y"])
    assert a.t == b.t == 4 and torch.equal(used[-1], b.loop.last_hypergradient["y"])


@pytest.mark.parametrize(
    "concept",
    [
        lambda eta: C.concept("cold", inner_lr=1.6 * eta, inner_steps=4000, tol=1e-11),
        lambda eta: C.concept("warm-partial", inner_lr=eta, inner_steps=2, prox_eps=0.5),
        lambda eta: C.concept("warm-partial", inner_lr=eta, inner_steps=0),
    ],
    ids=["cold", "warm-partial-prox", "warm-partial-0"],
)
def test_a_response_is_one_weight_step_of_a_concept_tuner(ls, concept):
    """Non-plain concepts: each outer step is one weight step of a ConceptTuner, the concept's respond()."""
    c = concept(ls["eta"])
    ev = Events()
    opt = optimizer(ls, c, C.method("implicit"), callbacks=[ev])
    assert isinstance(opt.loop, C.ConceptTuner) and opt.block == 1 and opt.loop.schedule == HyperFirst(1)
    start = opt.inner_steps_taken  # cold: the response to x_0 at construction (not a counted weight step)
    assert (start > 0) == (c.name == "cold") and opt.loop.t == 0 and ev.seen == []
    progress = []
    for k in range(2):
        before = {"w": opt.params["w"].clone()}
        g = opt.step()
        f_before = float(ls["inner"](before, {"y": opt.hparams["y"].detach()}))  # at x_{t+1}, before the response
        expect_w, n = c.respond(ls["inner"], before, opt.initial, opt.hparams)
        torch.testing.assert_close(opt.params["w"], expect_w["w"], rtol=0, atol=0)
        assert ev.seen[-1][:2] == ("w", k + 1) and ev.seen[-1][2] == pytest.approx(f_before, rel=1e-12)
        assert ev.seen[-2][0] == "h" and torch.equal(ev.seen[-2][3], g["y"])
    opt.run(2, progress=progress.append)
    assert progress == [1, 1] and opt.t == 4 and opt.loop.t == 4 and opt.loop.hyper_steps == 4
    assert (opt.inner_steps_taken > start) == (c.inner_steps > 0)


def test_records_and_record_every(ls):
    opt = optimizer(
        ls, C.concept("warm-partial", inner_lr=ls["eta"], inner_steps=1), C.method("unroll", steps=1, lr=ls["eta"])
    )
    seen = []
    hist = opt.run(5, record_every=2, callback=lambda o: seen.append(o.t))
    assert [r["t"] for r in hist] == [0, 2, 4] and seen == [2, 4]
    r = opt.record()
    assert r["t"] == 5 and set(r) == {"t", "outer", "inner", "hparams"}
    assert r["outer"] == opt.losses()["outer"] and torch.equal(r["hparams"]["y"], opt.hparams["y"].detach())
    assert not r["hparams"]["y"].requires_grad
    with pytest.raises(ValueError, match="record_every"):
        opt.run(1, record_every=0)


def test_method_strategy_hypergradient_is_the_method(ls):
    m = C.method("proximal", eps=0.2)
    opt = optimizer(ls, C.concept("warm-full", inner_lr=1.6 * ls["eta"], inner_steps=4000, tol=1e-11), m)
    direct = m(ls["outer"], opt.params, {"y": opt.hparams["y"].detach()}, inner=ls["inner"])
    torch.testing.assert_close(opt.loop.strategy.hypergradient(opt.loop, None, None)["y"], direct["y"])
    y0 = opt.hparams["y"].detach().clone()
    torch.testing.assert_close(opt.step()["y"], direct["y"])
    torch.testing.assert_close(opt.hparams["y"].detach(), y0 - 0.1 * direct["y"])


def test_a_failing_run_leaves_no_run_state(ls):
    def bad(o):
        raise RuntimeError("stop")

    opt = optimizer(
        ls, C.concept("warm-partial", inner_lr=ls["eta"], inner_steps=1), C.method("unroll", steps=1, lr=ls["eta"])
    )
    with pytest.raises(RuntimeError, match="stop"):
        opt.run(3, callback=bad)
    assert opt.t == 1
    opt.step()  # outside run: no record, no callback
    assert opt.t == 2
