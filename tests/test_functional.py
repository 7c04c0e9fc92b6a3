"""bilevel.functional: code written on an nn.Module, evaluated at weights given as a dict."""

import torch
from torch import nn

from bilevel import functional as Fn


def test_call_swaps_parameters_and_buffers_without_touching_the_module():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double().train()
    x = torch.randn(8, 3, dtype=torch.float64)
    p = {k: torch.randn_like(v) for k, v in Fn.parameters(m).items()}
    before = {k: v.clone() for k, v in m.state_dict().items()}
    bufs = {k: v.clone() for k, v in Fn.buffers(m).items()}
    out = Fn.call(m, p, lambda mod, x: mod(x), x, buffers=bufs)
    # reference: a copy of the module loaded with the same tensors
    ref = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double().train()
    ref.load_state_dict({**before, **p})
    torch.testing.assert_close(out, ref(x))
    torch.testing.assert_close(bufs["1.running_mean"], ref[1].running_mean)  # the update landed in `bufs`
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k  # the module itself is untouched


def test_grad_and_vmap_compose_with_call():
    torch.manual_seed(1)
    m = nn.Linear(3, 1).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    loss = Fn.bind(lambda mod, h: ((mod(x) - y) ** 2).mean() * h, m)
    p = Fn.parameters(m)
    g = torch.func.grad(loss)(p, 2.0)
    r = x @ p["weight"].T + p["bias"] - y
    torch.testing.assert_close(g["weight"], 2.0 * 2 * (r * x).mean(0, keepdim=True))
    stacked = {k: torch.stack([v, 2 * v]) for k, v in p.items()}
    vals = torch.vmap(lambda q: loss(q, 1.0))(stacked)
    torch.testing.assert_close(vals[1], loss({k: 2 * v for k, v in p.items()}, 1.0))
    frozen = nn.Linear(2, 2)
    frozen.bias.requires_grad_(False)
    assert list(Fn.parameters(frozen)) == ["weight"]
