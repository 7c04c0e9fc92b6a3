"""Word-level LSTM language model as a pure function of a parameter dict (vmap-able).

Clarke et al. (2022) sec. 4.2 use a 2-layer, 650-unit LSTM with a learned
embedding on Penn Treebank (Zaremba-style, no dropout). Every window of ``bptt``
tokens starts from a zero hidden state here, so that a whole population of models
can be ``torch.func.vmap``-ed without carrying per-member state between batches.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["lstm_lm_init", "lstm_lm_forward", "lstm_layer"]


def lstm_lm_init(
    vocab: int,
    embed: int,
    hidden: int,
    layers: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    init_range: float = 0.1,
) -> dict[str, Tensor]:
    """Parameters of a word-level LSTM language model, Uniform(-init_range, init_range) as in Zaremba et al. (2014).

    Args:
        vocab: the vocabulary size V.
        embed: the embedding size E.
        hidden: the units per layer h.
        layers: the number of layers.
        generator: the random generator.
        dtype: the parameters' dtype (drawn in float64 first, so seeded draws agree across dtypes).
        init_range: the uniform range.

    Returns:
        Embedding ``emb`` (V, E); per layer ``W_ih{l}`` (4h, in), ``W_hh{l}`` (4h, h), ``b{l}`` (4h, zeros);
        decoder ``dec_W`` (V, h), ``dec_b`` (zeros).
    """

    def u(*shape: int) -> Tensor:
        return ((torch.rand(*shape, generator=generator, dtype=torch.float64) * 2 - 1) * init_range).to(dtype)

    p = {"emb": u(vocab, embed)}
    for layer in range(layers):
        n_in = embed if layer == 0 else hidden
        p[f"W_ih{layer}"] = u(4 * hidden, n_in)
        p[f"W_hh{layer}"] = u(4 * hidden, hidden)
        p[f"b{layer}"] = torch.zeros(4 * hidden, dtype=dtype)
    p["dec_W"] = u(vocab, hidden)
    p["dec_b"] = torch.zeros(vocab, dtype=dtype)
    return p


def lstm_lm_forward(params: dict[str, Tensor], tokens: Tensor) -> Tensor:
    """Next-token logits of the LSTM language model, from a zero state.

    Args:
        params: :func:`lstm_lm_init`'s parameters.
        tokens: int64 token ids, shape (T, B).

    Returns:
        Logits of shape (T * B, vocab).
    """
    layers = sum(1 for k in params if k.startswith("W_ih"))
    x = params["emb"][tokens]  # (T, B, E)
    T, B = tokens.shape
    for layer in range(layers):
        x = lstm_layer(x, params[f"W_ih{layer}"], params[f"W_hh{layer}"], params[f"b{layer}"])
    return (x @ params["dec_W"].T + params["dec_b"]).reshape(T * B, -1)


def lstm_layer(x: Tensor, W_ih: Tensor, W_hh: Tensor, b: Tensor) -> Tensor:
    """One LSTM layer over a sequence from a zero state.

    Gates ``i, f, g, o = chunk(x_t W_ih^T + h_{t-1} W_hh^T + b, 4)``,
    ``c_t = s(f) c_{t-1} + s(i) tanh(g)``, ``h_t = s(o) tanh(c_t)`` (Hochreiter & Schmidhuber 1997).

    Args:
        x: the inputs, shape (T, B, in).
        W_ih: input weights (4h, in).
        W_hh: recurrent weights (4h, h).
        b: biases (4h,).

    Returns:
        The hidden states, shape (T, B, h).
    """
    T, B = x.shape[0], x.shape[1]
    H = W_hh.shape[1]
    h = x.new_zeros(B, H)
    c = x.new_zeros(B, H)
    pre = x @ W_ih.T + b  # input contributions for all steps at once
    outs = []
    for t in range(T):
        gates = pre[t] + h @ W_hh.T
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs)
