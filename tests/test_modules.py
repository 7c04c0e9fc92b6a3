"""nn.Module users pass dict(model.named_parameters()); buffers work via functional_call."""

import torch
from torch import nn
from torch.func import functional_call

import bilevel as B
from bilevel import tree as T


def test_module_with_batchnorm_buffers_matches_dense_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).double()
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    buffers = dict(model.named_buffers())
    params = {k: v.detach() for k, v in model.named_parameters()}
    X, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64)
    Xv, yv = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)

    def inner(p, h):
        out = functional_call(model, (p, buffers), (X,))
        return ((out - y) ** 2).mean() + 0.5 * h["wd"].exp() * sum((v**2).sum() for v in p.values())

    def outer(p, h):
        return ((functional_call(model, (p, buffers), (Xv,)) - yv) ** 2).mean()

    h = {"wd": torch.tensor(-1.0, dtype=torch.float64)}
    hg = B.hypergradient(outer, params, h, inner=inner, solver=B.Exact())

    # independent reference: dense Hessian and mixed derivative on the flat vector
    flat = T.flatten(params)
    f_in = lambda w, lam: inner(T.unflatten(w, params), {"wd": lam})  # noqa: E731
    f_out = lambda w: outer(T.unflatten(w, params), h)  # noqa: E731
    H = torch.func.hessian(f_in, argnums=0)(flat, h["wd"])
    mixed = torch.func.jacrev(torch.func.grad(f_in, argnums=0), argnums=1)(flat, h["wd"])
    v = torch.func.grad(f_out)(flat)
    ref = -v @ torch.linalg.solve(H, mixed)
    torch.testing.assert_close(hg["wd"], ref, rtol=1e-8, atol=1e-12)
    # buffers untouched (eval mode)
    assert model[1].num_batches_tracked.item() == 0
