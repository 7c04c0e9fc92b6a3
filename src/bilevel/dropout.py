"""Differentiable dropout and the AWD-LSTM regularisers, with rates as hyperparameters.

Lorraine et al. (2020, sec. 5.5) tune the regularisers of AWD-LSTM (Merity et al.
2018) by gradient: variational dropout on the input, the hidden states and the
output (Gal & Ghahramani 2016), embedding dropout, DropConnect on the
hidden-to-hidden weights (Wan et al. 2013), activation regularisation (AR) and
temporal activation regularisation (TAR), with one rate per unit/weight if
wanted. A Bernoulli mask has no gradient with respect to its rate, so the masks
are *concrete* (relaxed Bernoulli; Maddison et al. 2017, Jang et al. 2017) as in
concrete dropout (Gal, Hron & Kendall 2017, eq. 5):

    z_drop = sigmoid((logit p + logit u) / t),    u ~ U(0, 1),
    mask   = (1 - z_drop) / (1 - p),

with drop rate ``p`` and temperature ``t``. As ``t -> 0``, ``z_drop -> 1[u > 1 - p]``, a
Bernoulli(p) drop indicator, so the mask becomes inverted dropout's ``Bernoulli(1-p)/(1-p)``;
for every ``t`` the mask is a deterministic, differentiable function of ``p`` given
the uniform noise ``u``. Passing the *same* ``u`` (see :func:`uniform_noise`) to
the training loss used for a step and for its hypergradient makes the inner loss
``L_T(w, lambda)`` one deterministic function, as the implicit function theorem
needs. ``p = 0`` gives the identity exactly (``logit 0 = -inf``).

Rates live in :mod:`bilevel.hparams` parametrisations (``logit`` transform, see
:func:`dropout_rate`); AR/TAR coefficients in ``log10`` (:func:`ar_coefficient`).
A rate may be a scalar or one value per unit (variational dropout), per word
(embedding dropout) or per weight (DropConnect): any shape that broadcasts
against the mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .hparams import LOG10, LOGIT, Granularity, HyperParameter

__all__ = [
    "uniform_noise",
    "concrete_keep_mask",
    "concrete_dropout",
    "variational_dropout",
    "embedding_dropout",
    "drop_connect",
    "activation_regularization",
    "temporal_activation_regularization",
    "dropout_rate",
    "ar_coefficient",
    "DEFAULT_TEMPERATURE",
]

#: Concrete-dropout temperature of Gal et al. (2017) (their code uses 0.1).
DEFAULT_TEMPERATURE = 0.1
#: Uniform noise is kept this far inside (0, 1) so that logit(u) is finite.
_U_EPS = 1e-7


def uniform_noise(
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """U(eps, 1 - eps) noise for the concrete masks, drawn in float64 on the CPU so that seeded draws agree
    across devices.

    Args:
        shape: the mask's shape.
        generator: the random generator (``None``: torch's global one).
        dtype: the dtype returned.
        device: the device returned.

    Returns:
        Uniform noise in ``[1e-7, 1 - 1e-7]`` (so that ``logit(u)`` is finite).
    """
    u = torch.rand(tuple(shape), generator=generator, dtype=torch.float64)
    return u.clamp(_U_EPS, 1 - _U_EPS).to(dtype=dtype, device=device)


def _check_rate(rate: Tensor | float, mask_shape: Sequence[int], what: str) -> Tensor:
    r = rate if isinstance(rate, Tensor) else torch.as_tensor(float(rate), dtype=torch.float64)
    if not r.is_floating_point():
        raise ValueError(f"{what}: the dropout rate must be a floating-point tensor, got {r.dtype}")
    try:
        torch.broadcast_shapes(tuple(r.shape), tuple(mask_shape))
    except RuntimeError:
        raise ValueError(
            f"{what}: rate of shape {tuple(r.shape)} does not broadcast against the mask shape {tuple(mask_shape)}"
        ) from None
    if r.numel() and not r.requires_grad and bool(((r < 0) | (r >= 1)).any()):
        raise ValueError(
            f"{what}: dropout rates must lie in [0, 1), got values in [{float(r.min()):.4g}, {float(r.max()):.4g}]"
        )
    return r


def concrete_keep_mask(rate: Tensor | float, noise: Tensor, temperature: float = DEFAULT_TEMPERATURE) -> Tensor:
    """Relaxed inverted-dropout mask ``(1 - sigmoid((logit p + logit u)/t)) / (1 - p)`` (Gal et al. 2017, eq. 5).

    ``temperature == 0`` gives the hard mask ``1[u <= 1 - p] / (1 - p)`` (no gradient with respect to ``p``
    then). Differentiable in ``rate`` for ``t > 0``.

    Args:
        rate: the drop rate ``p`` in [0, 1), a number or a tensor that broadcasts against ``noise``.
        noise: ``u``, values in (0, 1) (:func:`uniform_noise`); fixes the mask's shape.
        temperature: ``t >= 0``.

    Returns:
        The mask, shape of ``noise``, mean 1 over the noise.

    Raises:
        ValueError: a negative temperature, non-float noise, or a rate that does not broadcast.
    """
    if not temperature >= 0:
        raise ValueError(f"concrete dropout temperature must be >= 0, got {temperature}")
    if not noise.is_floating_point():
        raise ValueError(f"concrete dropout noise must be a floating-point tensor, got {noise.dtype}")
    p = _check_rate(rate, noise.shape, "concrete_keep_mask").to(noise)
    logit_p = torch.log(p) - torch.log1p(-p)  # -inf at p = 0, so the mask is exactly 1 there
    logit_u = torch.log(noise) - torch.log1p(-noise)
    if temperature == 0:
        keep = (logit_p + logit_u <= 0).to(noise)
    else:
        keep = 1 - torch.sigmoid((logit_p + logit_u) / temperature)
    return keep / (1 - p)


def concrete_dropout(
    x: Tensor, rate: Tensor | float, noise: Tensor, temperature: float = DEFAULT_TEMPERATURE
) -> Tensor:
    """``x * mask`` with a concrete mask (:func:`concrete_keep_mask`).

    Args:
        x: the input.
        rate: the drop rate (broadcasts against ``noise``).
        noise: uniform noise whose shape broadcasts against ``x``.
        temperature: the concrete temperature.

    Returns:
        The dropped-out input, differentiable in ``rate``.

    Raises:
        ValueError: ``noise`` does not broadcast against ``x``.
    """
    try:
        torch.broadcast_shapes(tuple(noise.shape), tuple(x.shape))
    except RuntimeError:
        raise ValueError(
            f"concrete_dropout: noise of shape {tuple(noise.shape)} does not broadcast against "
            f"the input of shape {tuple(x.shape)}"
        ) from None
    return x * concrete_keep_mask(rate, noise, temperature)


def variational_dropout(
    x: Tensor, rate: Tensor | float, noise: Tensor, temperature: float = DEFAULT_TEMPERATURE
) -> Tensor:
    """Locked (variational) dropout of a (T, B, H) sequence: one mask per sequence and unit, shared over time.

    Gal & Ghahramani (2016); AWD-LSTM's ``LockedDropout``.

    Args:
        x: the sequence, shape (T, B, H).
        rate: a scalar or one rate per unit, shape (H,).
        noise: uniform noise of shape (B, H).
        temperature: the concrete temperature.

    Returns:
        ``x`` times the mask, broadcast over time.

    Raises:
        ValueError: ``x`` is not 3-d or ``noise`` has another shape.
    """
    if x.dim() != 3:
        raise ValueError(f"variational_dropout expects a (time, batch, units) tensor, got shape {tuple(x.shape)}")
    if tuple(noise.shape) != tuple(x.shape[1:]):
        raise ValueError(
            f"variational_dropout: noise must have shape (batch, units) = {tuple(x.shape[1:])}, "
            f"got {tuple(noise.shape)}"
        )
    return x * concrete_keep_mask(rate, noise, temperature).unsqueeze(0)


def embedding_dropout(
    weight: Tensor, rate: Tensor | float, noise: Tensor, temperature: float = DEFAULT_TEMPERATURE
) -> Tensor:
    """Drop whole rows (words) of an embedding matrix (V, E) (Gal & Ghahramani 2016; AWD-LSTM ``embedded_dropout``).

    A dropped word is removed from every sequence of the mini-batch.

    Args:
        weight: the embedding matrix, shape (V, E).
        rate: a scalar or one rate per word, shape (V,).
        noise: uniform noise of shape (V,).
        temperature: the concrete temperature.

    Returns:
        The embedding matrix with its rows scaled by the mask.

    Raises:
        ValueError: ``weight`` is not a matrix or ``noise`` has another shape.
    """
    if weight.dim() != 2:
        raise ValueError(f"embedding_dropout expects a (vocab, dim) matrix, got shape {tuple(weight.shape)}")
    if tuple(noise.shape) != (weight.shape[0],):
        raise ValueError(
            f"embedding_dropout: noise must have shape (vocab,) = ({weight.shape[0]},), got {tuple(noise.shape)}"
        )
    return weight * concrete_keep_mask(rate, noise, temperature).unsqueeze(1)


def drop_connect(
    weight: Tensor, rate: Tensor | float, noise: Tensor, temperature: float = DEFAULT_TEMPERATURE
) -> Tensor:
    """DropConnect (Wan et al. 2013) on a weight matrix; AWD-LSTM's ``WeightDrop`` on ``W_hh``.

    Args:
        weight: the weights.
        rate: a scalar or one rate per weight.
        noise: uniform noise of the weight's shape.
        temperature: the concrete temperature.

    Returns:
        The weights times the mask.

    Raises:
        ValueError: ``noise`` has another shape.
    """
    if tuple(noise.shape) != tuple(weight.shape):
        raise ValueError(
            f"drop_connect: noise must have the weight's shape {tuple(weight.shape)}, got {tuple(noise.shape)}"
        )
    return weight * concrete_keep_mask(rate, noise, temperature)


def activation_regularization(h: Tensor, alpha: Tensor | float) -> Tensor:
    """AR (Merity et al. 2017, eq. 1) of the (dropped-out) last-layer outputs.

    Args:
        h: the outputs.
        alpha: the coefficient.

    Returns:
        ``alpha * mean(h^2)``.
    """
    return alpha * h.pow(2).mean()


def temporal_activation_regularization(h: Tensor, beta: Tensor | float) -> Tensor:
    """TAR (Merity et al. 2017, eq. 2): the change of the outputs over time.

    Args:
        h: the outputs, time on axis 0.
        beta: the coefficient.

    Returns:
        ``beta * mean((h_t - h_{t-1})^2)``.

    Raises:
        ValueError: fewer than 2 time steps.
    """
    if h.shape[0] < 2:
        raise ValueError(f"temporal activation regularisation needs at least 2 time steps, got shape {tuple(h.shape)}")
    return beta * (h[1:] - h[:-1]).pow(2).mean()


# --------------------------------------------------------------------------- hyperparameter specs


def dropout_rate(
    name: str,
    init: float = 0.5,
    granularity: Granularity | str = "scalar",
    sites: Sequence[str] | None = None,
    clip: tuple[float, float] | None = (1e-4, 0.95),
) -> HyperParameter:
    """A dropout / DropConnect rate in ``logit`` space (Lorraine et al. 2020 sec. 5.5 initialise at 0.5).

    ``granularity="element"`` with ``sites`` gives one rate per unit/word/weight: the shapes
    come from the template dict passed to :class:`~bilevel.hparams.HyperParameterSpace`
    (e.g. ``{"input": torch.empty(E)}``).

    Args:
        name: the hyperparameter's name.
        init: the initial rate.
        granularity: ``"scalar"`` or ``"element"`` (one rate per entry of each site).
        sites: the template keys of the per-element rates.
        clip: the natural range the rate is clipped to, so that ``1 / (1 - p)`` stays bounded.

    Returns:
        The :class:`~bilevel.hparams.HyperParameter`.
    """
    raw = LOGIT.inverse_float(init)
    g = Granularity(granularity)
    return HyperParameter(
        name,
        LOGIT,
        raw,
        raw,
        "raw",
        g,
        clip,
        tuple(sites) if sites is not None and g is not Granularity.SCALAR else None,
    )


def ar_coefficient(name: str, init: float) -> HyperParameter:
    """A scalar AR/TAR coefficient in ``log10`` space (AWD-LSTM defaults: alpha = 2, beta = 1).

    Args:
        name: the hyperparameter's name.
        init: the initial coefficient, > 0.

    Returns:
        The :class:`~bilevel.hparams.HyperParameter`.

    Raises:
        ValueError: ``init <= 0``.
    """
    if not init > 0:
        raise ValueError(f"{name}: AR/TAR coefficients must be > 0 (they are tuned in log10 space), got {init}")
    raw = LOG10.inverse_float(init)
    return HyperParameter(name, LOG10, raw, raw)
