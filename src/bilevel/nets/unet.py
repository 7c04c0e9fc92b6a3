"""Residual U-Net data-augmentation network (Lorraine et al. 2020, sec. 5.4 and appendix E.3).

The augmenter maps an image and Gaussian noise to an augmented image,

    x~ = f_lambda(x, eps) = x + g_lambda([x, eps]),    eps ~ N(0, I) (one noise channel),

where ``g`` is a small U-Net (Ronneberger et al. 2015) fed the image with the noise
channel concatenated (so C + 1 input channels), and the residual connection from
the input to the output makes the identity easy to represent. The U-Net's last
(1x1) convolution starts at zero, so ``f`` is *exactly* the identity at
initialisation: training on its output is plain training until the
hyperparameter optimiser moves it. Every U-Net weight is a hyperparameter
(:func:`augmenter_space` puts them all in one ``identity``-transform, per-element
:class:`~bilevel.hparams.HyperParameter`).

The network is an ``nn.Module`` used functionally through
``torch.func.functional_call``; it has no buffers (no batch norm).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..hparams import IDENTITY, Granularity, HyperParameter, HyperParameterSpace

__all__ = ["UNet", "unet_init", "augment", "augmenter_space", "AUGMENT_HPARAM"]

#: Name of the augmenter's hyperparameter in :func:`augmenter_space` (raw keys ``"augment/<param>"``).
AUGMENT_HPARAM = "augment"


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU()
    )


class UNet(nn.Module):
    """Residual U-Net ``x + g([x, eps])`` with ``depth`` resolutions and ``width`` channels at the top.

    Encoder level ``i`` has ``width * 2**i`` channels (two 3x3 convolutions + ReLU, then 2x2 max-pooling
    except at the bottom); the decoder up-samples with 2x2 transposed convolutions, concatenates the
    skip connection and applies two 3x3 convolutions; a 1x1 convolution (zero-initialised) maps back to
    ``channels``. Images need sides divisible by ``2 ** (depth - 1)``.
    """

    def __init__(self, channels: int = 1, width: int = 8, depth: int = 2, noise_channels: int = 1) -> None:
        super().__init__()
        if channels < 1 or width < 1 or depth < 1 or noise_channels < 0:
            raise ValueError(
                f"UNet needs channels, width, depth >= 1 and noise_channels >= 0, got "
                f"{channels}, {width}, {depth}, {noise_channels}"
            )
        self.channels, self.depth, self.noise_channels = channels, depth, noise_channels
        widths = [width * 2**i for i in range(depth)]
        c_in = channels + noise_channels
        self.down = nn.ModuleList()
        for w in widths:
            self.down.append(_double_conv(c_in, w))
            c_in = w
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in range(depth - 1))
        self.dec = nn.ModuleList(_double_conv(2 * widths[i], widths[i]) for i in range(depth - 1))
        self.out = nn.Conv2d(widths[0], channels, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero the output convolution so that the network is the identity map."""
        nn.init.zeros_(self.out.weight)
        if self.out.bias is not None:  # always: the convolution has a bias
            nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, noise: Tensor) -> Tensor:
        """The augmented images ``x + g([x, noise])``.

        Args:
            x: images (N, channels, H, W), sides divisible by ``2 ** (depth - 1)``.
            noise: (N, noise_channels, H, W).

        Returns:
            The augmented images, shape of ``x``.

        Raises:
            ValueError: shapes that do not fit.
        """
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"UNet expects images of shape (N, {self.channels}, H, W), got {tuple(x.shape)}")
        want = (x.shape[0], self.noise_channels, *x.shape[2:])
        if tuple(noise.shape) != want:
            raise ValueError(f"UNet: noise must have shape {want}, got {tuple(noise.shape)}")
        k = 2 ** (self.depth - 1)
        if x.shape[2] % k or x.shape[3] % k:
            raise ValueError(
                f"UNet with depth {self.depth} needs image sides divisible by {k}, got {tuple(x.shape[2:])}"
            )
        h = torch.cat([x, noise], dim=1)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h)
            if i < self.depth - 1:
                skips.append(h)
                h = torch.max_pool2d(h, 2)
        for up, dec in zip(reversed(self.up), reversed(self.dec)):
            h = dec(torch.cat([up(h), skips.pop()], dim=1))
        return x + self.out(h)


def unet_init(module: UNet, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Fresh, seeded parameters for ``module`` (torch's default convolution initialisation, zero output layer).

    Args:
        module: the U-Net (its output layer is zeroed too, so it starts as the identity map).
        generator: the random generator.

    Returns:
        The parameters by name.
    """
    from .convnets import module_init

    params = module_init(module, generator)  # this also re-initialises the output convolution ...
    module.reset_parameters()  # ... so zero it again, in the module and in the returned copy
    for k in ("out.weight", "out.bias"):
        params[k] = torch.zeros_like(params[k])
    return params


def augment(module: UNet, params: Mapping[str, Tensor], x: Tensor, noise: Tensor) -> Tensor:
    """``f_lambda(x, eps)`` with the U-Net weights ``params`` (a pure function of them).

    Args:
        module: the U-Net (its own weights are not used).
        params: the weights lambda.
        x: images.
        noise: eps.

    Returns:
        The augmented images.
    """
    return torch.func.functional_call(module, dict(params), (x, noise))


def augmenter_space(params: Mapping[str, Tensor]) -> tuple[HyperParameterSpace, dict[str, Tensor]]:
    """The augmenter's weights as one per-element hyperparameter (``identity`` transform), and its raw dict.

    Args:
        params: the U-Net weights.

    Returns:
        ``(space, raw)`` with ``raw["augment/<param>"] = params[<param>]`` (copies); recover the U-Net
        weights with ``space.natural(raw)["augment"]``.
    """
    hp = HyperParameter(AUGMENT_HPARAM, IDENTITY, 0.0, 0.0, granularity=Granularity.ELEMENT)
    space = HyperParameterSpace([hp])
    raw = space.from_natural(params, {AUGMENT_HPARAM: dict(params)})
    return space, raw
