import pytest
import torch

from bilevel.hparams import HyperParameterSpace, learning_rate, per_weight_decay, weight_decay
from bilevel.regularizers import PerWeightL2, l2_penalty

DT = torch.float64


def make_params():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 2, generator=g, dtype=DT), "b": torch.randn(2, generator=g, dtype=DT)}


def test_scalar_matches_hand_computation_and_gradient():
    params = {k: v.requires_grad_() for k, v in make_params().items()}
    wd = torch.tensor(0.3, dtype=DT)
    pen = l2_penalty(params, wd)
    hand = 0.5 * 0.3 * (params["w"].detach() ** 2).sum() + 0.5 * 0.3 * (params["b"].detach() ** 2).sum()
    torch.testing.assert_close(pen, hand)
    gw, gb = torch.autograd.grad(pen, [params["w"], params["b"]])
    torch.testing.assert_close(gw, 0.3 * params["w"].detach())
    torch.testing.assert_close(gb, 0.3 * params["b"].detach())


def test_per_element_and_per_tensor():
    params = {k: v.requires_grad_() for k, v in make_params().items()}
    wd_w = torch.rand(3, 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    pen = l2_penalty(params, {"w": wd_w, "b": torch.tensor(0.5, dtype=DT)})
    hand = 0.5 * (wd_w * params["w"].detach() ** 2).sum() + 0.25 * (params["b"].detach() ** 2).sum()
    torch.testing.assert_close(pen, hand)
    (gw,) = torch.autograd.grad(pen, [params["w"]])
    torch.testing.assert_close(gw, wd_w * params["w"].detach())
    # mapping keys select the penalised parameters; names= restricts further
    torch.testing.assert_close(l2_penalty(params, {"w": wd_w}), 0.5 * (wd_w * params["w"].detach() ** 2).sum())
    torch.testing.assert_close(l2_penalty(params, 2.0, names=["b"]), (params["b"].detach() ** 2).sum())


def test_gradient_wrt_weight_decay():
    params = make_params()
    wd = torch.rand(3, 2, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: l2_penalty(params, {"w": x}), (wd,))
    (g,) = torch.autograd.grad(l2_penalty(params, {"w": wd}), [wd])
    torch.testing.assert_close(g, 0.5 * params["w"] ** 2)


def test_errors_name_the_parameter():
    params = make_params()
    with pytest.raises(ValueError, match=r"'w'.*\(2,\).*\(3, 2\)"):
        l2_penalty(params, {"w": torch.ones(2, dtype=DT)})
    with pytest.raises(ValueError, match="zzz"):
        l2_penalty(params, {"zzz": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="'b'"):
        l2_penalty(params, {"w": torch.tensor(1.0)}, names=["w", "b"])
    with pytest.raises(ValueError, match="nope"):
        l2_penalty(params, 1.0, names=["nope"])


def test_per_weight_l2_from_raw():
    params = make_params()
    space = HyperParameterSpace([learning_rate(), per_weight_decay()])
    raw = space.init(params, generator=torch.Generator().manual_seed(0), shared_init=False, requires_grad=True)
    reg = PerWeightL2.from_space(space)
    pen = reg(params, raw)
    nat = space.natural(raw)["weight_decay"]
    torch.testing.assert_close(pen, l2_penalty(params, nat))
    g = torch.autograd.grad(pen, [raw["weight_decay/w"]])[0]
    # d/draw 0.5 * 10**raw * w**2 = 0.5 * ln10 * 10**raw * w**2
    torch.testing.assert_close(g, 0.5 * torch.log(torch.tensor(10.0, dtype=DT)) * nat["w"].detach() * params["w"] ** 2)
    # scalar weight decay spec works too
    scalar = PerWeightL2(weight_decay())
    r = {"weight_decay": torch.tensor(-2.0, dtype=DT)}
    torch.testing.assert_close(scalar.penalty(params, r), l2_penalty(params, 0.01))
    with pytest.raises(ValueError, match="momentum"):
        PerWeightL2.from_space(space, "momentum")


def test_vmap_over_population():
    params = make_params()
    wd = torch.rand(4, 3, 2, dtype=DT)
    out = torch.func.vmap(lambda x: l2_penalty(params, {"w": x}))(wd)
    ref = torch.stack([l2_penalty(params, {"w": x}) for x in wd])
    torch.testing.assert_close(out, ref)
