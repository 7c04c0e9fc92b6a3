"""bilevel.tree: every operation on a dict of tensors equals the same operation on the flattened dense vector."""

from __future__ import annotations

import pytest
import torch

from bilevel import tree as T

D = torch.float64


def _tree(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w1": torch.randn(3, 4, generator=g, dtype=D),
        "b1": torch.randn(4, generator=g, dtype=D),
        "s": torch.randn((), generator=g, dtype=D),
    }


def _dense(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference flattening, leaf by leaf in key order (no library code)."""
    return torch.cat([t[k].reshape(-1) for k in t])


def test_flatten_is_the_key_order_concatenation_and_unflatten_its_inverse():
    a = _tree(0)
    flat = T.flatten(a)
    assert torch.equal(flat, _dense(a)) and T.numel(a) == flat.numel() == 17
    back = T.unflatten(flat, a)
    assert list(back) == list(a) and all(torch.equal(back[k], a[k]) and back[k].shape == a[k].shape for k in a)
    v = torch.arange(17, dtype=D)
    assert torch.equal(T.flatten(T.unflatten(v, a)), v)


@pytest.mark.parametrize("s", [0.0, 1.0, -2.5, torch.tensor(0.3, dtype=D)])
def test_add_and_scale_equal_vector_arithmetic(s):
    a, b = _tree(1), _tree(2)
    torch.testing.assert_close(T.flatten(T.add(a, b, s)), _dense(a) + s * _dense(b), rtol=0, atol=1e-15)
    torch.testing.assert_close(T.flatten(T.scale(a, s)), s * _dense(a), rtol=0, atol=1e-15)
    torch.testing.assert_close(T.flatten(T.add(a, b)), _dense(a) + _dense(b), rtol=0, atol=1e-15)
    assert list(T.add(a, b, s)) == list(a)


def test_dot_and_norm_equal_the_dense_inner_product_and_norm():
    a, b = _tree(3), _tree(4)
    assert float(T.dot(a, b)) == pytest.approx(float(_dense(a) @ _dense(b)), rel=1e-14)
    assert float(T.dot_leaves(list(a.values()), list(b.values()))) == pytest.approx(float(_dense(a) @ _dense(b)))
    assert float(T.norm(a)) == pytest.approx(float(torch.linalg.vector_norm(_dense(a))), rel=1e-14)
    one = {"x": torch.tensor([3.0, 4.0], dtype=D)}  # a single leaf takes the other branch
    assert float(T.norm(one)) == 5.0 and float(T.dot(one, one)) == 25.0
    with pytest.raises(ValueError):  # leaves that do not pair up
        T.dot_leaves([torch.ones(2)], [torch.ones(2), torch.ones(2)])


def test_the_result_does_not_depend_on_the_key_order_of_the_second_argument():
    a, b = _tree(5), _tree(6)
    shuffled = {k: b[k] for k in reversed(list(b))}
    assert float(T.dot(a, shuffled)) == pytest.approx(float(T.dot(a, b)))
    torch.testing.assert_close(T.flatten(T.add(a, shuffled, 2.0)), T.flatten(T.add(a, b, 2.0)))


def test_zeros_detach_and_all_finite():
    a = {k: v.clone().requires_grad_() for k, v in _tree(7).items()}
    z = T.zeros_like(a)
    assert all(torch.equal(z[k], torch.zeros_like(a[k])) and z[k].dtype == D for k in a)
    d = T.detach(a)
    assert all(not d[k].requires_grad and d[k].data_ptr() == a[k].data_ptr() for k in a)
    assert T.all_finite(a)
    for bad in (float("nan"), float("inf")):
        b = T.detach(a)
        b = {**b, "b1": b["b1"].clone()}
        b["b1"][2] = bad
        assert not T.all_finite(b)
