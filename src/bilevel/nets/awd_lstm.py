"""Word-level LSTM language model with the AWD-LSTM regularisers as hyperparameters.

Lorraine et al. (2020, sec. 5.5, appendix E.4) tune the regularisers of AWD-LSTM
(Merity, Keskar & Socher 2018) on Penn Treebank:

* ``dropoute``: embedding dropout (whole rows of the embedding matrix),
* ``dropouti``: variational dropout on the LSTM input (the embeddings),
* ``dropouth``: variational dropout between LSTM layers,
* ``dropouto``: variational dropout on the last layer's output,
* ``wdrop``: DropConnect on every hidden-to-hidden matrix ``W_hh``,
* ``alpha``: activation regularisation (AR) of the dropped-out last-layer outputs,
* ``beta``: temporal activation regularisation (TAR) of the raw last-layer outputs,

with concrete (relaxed Bernoulli) dropout so that the rates are differentiable
(:mod:`bilevel.dropout`). ``granularity="scalar"`` gives these 7 hyperparameters;
``"element"`` gives one rate per word (``dropoute``), per unit (``dropouti``,
``dropouth``, ``dropouto``) and per weight of ``W_hh`` (``wdrop``); AR and TAR stay
scalar. The network is :mod:`bilevel.nets.lstm`'s (same parameter dict,
:func:`~bilevel.nets.lstm.lstm_layer` for the recurrence, zero initial state per
window, untied decoder).

The dropout noise is an explicit argument (:func:`awd_noise`), so that one draw per
training step makes the training loss a deterministic function of weights and
hyperparameters, which the implicit-function-theorem hypergradient differentiates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..dropout import (
    DEFAULT_TEMPERATURE,
    activation_regularization,
    ar_coefficient,
    drop_connect,
    dropout_rate,
    embedding_dropout,
    temporal_activation_regularization,
    uniform_noise,
    variational_dropout,
)
from ..hparams import Granularity, HyperParameterSpace
from .lstm import lstm_layer

__all__ = ["AWD_HPARAMS", "num_layers", "awd_sites", "awd_space", "awd_noise", "awd_lstm_forward", "awd_lstm_loss"]

#: The 7 AWD-LSTM regularisation hyperparameters tuned by Lorraine et al. (2020) sec. 5.5.
AWD_HPARAMS = ("dropoute", "dropouti", "dropouth", "dropouto", "wdrop", "alpha", "beta")


def num_layers(params: Mapping[str, Tensor]) -> int:
    """The number of LSTM layers of a parameter dict.

    Args:
        params: an LSTM language model's parameters (:func:`~bilevel.nets.lstm.lstm_lm_init`).

    Returns:
        The number of ``W_ih<l>`` keys.

    Raises:
        ValueError: not an LSTM LM parameter dict.
    """
    n = sum(1 for k in params if k.startswith("W_ih"))
    if n < 1 or any(f"W_hh{i}" not in params for i in range(n)):
        raise ValueError(f"not an LSTM LM parameter dict (need W_ih0.., W_hh0..): keys {list(params)}")
    return n


def awd_sites(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Shape templates of the dropout sites, used as the ``params`` of the hyperparameter space.

    Args:
        params: the LSTM language model's parameters.

    Returns:
        ``emb`` (V,), ``input`` (E,), ``hidden<l>`` (H,) between layers l and l+1, ``output`` (H,), and
        ``W_hh<l>`` (4H, H) (uninitialised tensors: only their shapes count).
    """
    L = num_layers(params)
    V, E = params["emb"].shape
    like = params["emb"]
    sites = {"emb": like.new_empty(V), "input": like.new_empty(E)}
    for layer in range(L - 1):
        sites[f"hidden{layer}"] = like.new_empty(params[f"W_hh{layer}"].shape[1])
    sites["output"] = like.new_empty(params[f"W_hh{L - 1}"].shape[1])
    for layer in range(L):
        sites[f"W_hh{layer}"] = torch.empty_like(params[f"W_hh{layer}"])
    return sites


def awd_space(
    params: Mapping[str, Tensor],
    granularity: Granularity | str = "scalar",
    rate: float = 0.5,
    alpha: float = 2.0,
    beta: float = 1.0,
    rates: Mapping[str, float] | None = None,
) -> tuple[HyperParameterSpace, dict[str, Tensor]]:
    """The 7 AWD-LSTM hyperparameters (scalar or per unit/weight) and their initial raw values.

    Args:
        params: the LSTM language model's parameters.
        granularity: ``"scalar"`` or ``"element"`` (one rate per unit/word/weight).
        rate: the initial rate of every dropout (Lorraine et al. initialise at 0.5).
        alpha: the initial AR coefficient (AWD-LSTM's default).
        beta: the initial TAR coefficient (AWD-LSTM's default).
        rates: initial rates of named dropouts (``dropoute``, ``dropouti``, ``dropouth``, ``dropouto``, ``wdrop``).

    Returns:
        ``(space, raw)``; pass ``awd_sites(params)`` as ``params`` to the space's methods.

    Raises:
        ValueError: ``"tensor"`` granularity or an unknown rate name.
    """
    g = Granularity(granularity)
    if g is Granularity.TENSOR:
        raise ValueError("AWD-LSTM hyperparameters are 'scalar' or 'element' (one per unit/weight), not 'tensor'")
    rates = dict(rates or {})
    unknown = [k for k in rates if k not in AWD_HPARAMS[:5]]
    if unknown:
        raise ValueError(f"unknown dropout rates {unknown}; known: {list(AWD_HPARAMS[:5])}")
    L = num_layers(params)
    site_names = {
        "dropoute": ("emb",),
        "dropouti": ("input",),
        "dropouth": tuple(f"hidden{i}" for i in range(L - 1)),
        "dropouto": ("output",),
        "wdrop": tuple(f"W_hh{i}" for i in range(L)),
    }
    hps = [dropout_rate(n, rates.get(n, rate), g, site_names[n]) for n in AWD_HPARAMS[:5]]
    space = HyperParameterSpace([*hps, ar_coefficient("alpha", alpha), ar_coefficient("beta", beta)])
    return space, space.init(awd_sites(params))  # every init range is one point: the values above


def awd_noise(
    params: Mapping[str, Tensor], batch_size: int, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """One draw of the uniform noise of every dropout site for a mini-batch of ``batch_size`` sequences.

    Args:
        params: the LSTM language model's parameters (dtype and device of the noise).
        batch_size: B, the sequences of the mini-batch.
        generator: the random generator.

    Returns:
        ``emb`` (V,), ``input`` (B, E), ``hidden<l>`` and ``output`` (B, H), ``W_hh<l>`` (4H, H).
    """
    like = params["emb"]
    out = {}
    for name, t in awd_sites(params).items():
        shape = t.shape if name in ("emb",) or name.startswith("W_hh") else (batch_size, *t.shape)
        out[name] = uniform_noise(shape, generator, dtype=like.dtype, device=like.device)
    return out


def _rate(nat: Mapping[str, Any], name: str, site: str) -> Tensor:
    v = nat[name]
    return v if isinstance(v, Tensor) else v[site]


def awd_lstm_forward(
    params: Mapping[str, Tensor],
    tokens: Tensor,
    nat: Mapping[str, Any] | None = None,
    noise: Mapping[str, Tensor] | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
) -> tuple[Tensor, Tensor, Tensor]:
    """The AWD-LSTM forward pass, with (training) or without (evaluation) the regularisers.

    Embedding dropout -> input dropout -> per layer DropConnect on ``W_hh`` and the recurrence, hidden
    dropout between layers -> output dropout -> decoder.

    Args:
        params: the LSTM language model's parameters.
        tokens: int64 token ids, shape (T, B).
        nat: natural hyperparameters (``space.natural(raw)``); ``None`` (with ``noise=None``) runs without
            dropout (evaluation).
        noise: :func:`awd_noise`'s draw for this mini-batch.
        temperature: the concrete-dropout temperature.

    Returns:
        ``(logits (T*B, V), raw last-layer outputs, dropped last-layer outputs)``.

    Raises:
        ValueError: only one of ``nat``/``noise``, or ``tokens`` not 2-d.
    """
    if (nat is None) != (noise is None):
        raise ValueError("pass both nat= and noise= for a training pass, or neither for evaluation")
    if tokens.dim() != 2:
        raise ValueError(f"tokens must have shape (time, batch), got {tuple(tokens.shape)}")
    L = num_layers(params)
    train = nat is not None
    rates: Mapping[str, Any] = nat if nat is not None else {}  # both or neither, checked above
    draws: Mapping[str, Tensor] = noise if noise is not None else {}
    emb = (
        embedding_dropout(params["emb"], _rate(rates, "dropoute", "emb"), draws["emb"], temperature)
        if train
        else params["emb"]
    )
    x = emb[tokens]
    if train:
        x = variational_dropout(x, _rate(rates, "dropouti", "input"), draws["input"], temperature)
    for layer in range(L):
        W_hh = params[f"W_hh{layer}"]
        if train:
            W_hh = drop_connect(W_hh, _rate(rates, "wdrop", f"W_hh{layer}"), draws[f"W_hh{layer}"], temperature)
        x = lstm_layer(x, params[f"W_ih{layer}"], W_hh, params[f"b{layer}"])
        if train and layer < L - 1:
            x = variational_dropout(x, _rate(rates, "dropouth", f"hidden{layer}"), draws[f"hidden{layer}"], temperature)
    raw_out = x
    if train:
        x = variational_dropout(x, _rate(rates, "dropouto", "output"), draws["output"], temperature)
    T, B = tokens.shape
    logits = (x @ params["dec_W"].T + params["dec_b"]).reshape(T * B, -1)
    return logits, raw_out, x


def awd_lstm_loss(
    params: Mapping[str, Tensor],
    tokens: Tensor,
    targets: Tensor,
    nat: Mapping[str, Any] | None = None,
    noise: Mapping[str, Tensor] | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
) -> Tensor:
    """AWD-LSTM training loss ``CE + alpha * AR(dropped output) + beta * TAR(raw output)``.

    Args:
        params: the LSTM language model's parameters.
        tokens: int64 token ids, shape (T, B).
        targets: the next tokens, flattened to (T*B,).
        nat: natural hyperparameters; ``None`` (with ``noise=None``): plain cross-entropy (evaluation).
        noise: :func:`awd_noise`'s draw.
        temperature: the concrete-dropout temperature.

    Returns:
        The scalar loss.
    """
    logits, raw_out, dropped = awd_lstm_forward(params, tokens, nat, noise, temperature)
    loss = F.cross_entropy(logits, targets.reshape(-1))
    if nat is not None:
        loss = loss + activation_regularization(dropped, nat["alpha"])
        if tokens.shape[0] > 1:
            loss = loss + temporal_activation_regularization(raw_out, nat["beta"])
    return loss
