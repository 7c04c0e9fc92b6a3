"""Convolutional classifiers as ``nn.Module`` s, used functionally through
``torch.func.functional_call`` (``bilevel.population.module_forward``).

``LeNet`` is the LeNet-5-style network of Lorraine et al. (2020) sec. 5.2 (two 5x5
convolutions with max-pooling, then three fully connected layers).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["LeNet", "module_init", "AlexNet", "CifarResNet", "resnet44"]


class LeNet(nn.Module):
    """LeNet-5 style: conv(6, 5x5) -> pool -> conv(16, 5x5) -> pool -> fc 120 -> fc 84 -> fc classes (ReLU)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = ((image_size // 2) - 4) // 2
        if side < 1:
            raise ValueError(f"LeNet needs images of at least 12x12 pixels, got {image_size}")
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * side * side, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Logits of a batch of images.

        Args:
            x: images, shape (N, C, H, W) or (N, H, W) (a channel axis is added).

        Returns:
            Logits, shape (N, num_classes).
        """
        if x.dim() == 3:
            x = x.unsqueeze(-3)
        return self.classifier(self.features(x))


def module_init(module: nn.Module, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Fresh parameters for ``module`` (reset with torch's default initialisation, seeded by ``generator``).

    Args:
        module: the model (its parameters are reset in place).
        generator: the random generator (``None``: torch's global state).

    Returns:
        Copies of the new parameters by name.
    """
    seed = int(torch.randint(0, 2**31 - 1, (), generator=generator)) if generator is not None else None
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        for m in module.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()  # type: ignore[operator]  # nn.Module.__getattr__ types it Tensor | Module
    return {k: v.detach().clone() for k, v in module.named_parameters()}


class AlexNet(nn.Module):
    """AlexNet-style network for small images, as used for CIFAR-10 by Lorraine et al. (2020) sec. 5.2 / App. E.1.

    The small-image AlexNet variant (Krizhevsky's cuda-convnet "layers-18pct" family):
    conv(64, 5x5) -> ReLU -> maxpool 3/2 -> conv(64, 5x5) -> ReLU -> maxpool 3/2 ->
    fc 384 -> fc 192 -> fc classes. ``width`` scales every layer (1.0 = the sizes above),
    so it can be made small enough for a CPU.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, width: float = 1.0) -> None:
        super().__init__()
        if image_size < 8:
            raise ValueError(f"AlexNet needs images of at least 8x8 pixels, got {image_size}")
        c, f1, f2 = (max(1, round(v * width)) for v in (64, 384, 192))
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, padding=1),
            nn.Conv2d(c, c, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, padding=1),
        )
        side = (image_size + 1) // 2
        side = (side + 1) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * side * side, f1),
            nn.ReLU(),
            nn.Linear(f1, f2),
            nn.ReLU(),
            nn.Linear(f2, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Logits of a batch of images.

        Args:
            x: images, shape (N, C, H, W).

        Returns:
            Logits, shape (N, num_classes).
        """
        if x.dim() == 3:
            x = x.unsqueeze(-3)
        return self.classifier(self.features(x))


class CifarResNet(nn.Module):
    """He et al. (2016) sec. 4.2 CIFAR ResNet-(6n+2): a 3x3 stem of ``width`` channels, three stages of ``n``
    basic blocks with ``width``, ``2 width``, ``4 width`` channels (stride 2 between stages), global average
    pooling and a linear head. ``n=7`` is ResNet-44 (Lorraine et al. 2020 sec. 5.2). Blocks are those of
    :mod:`bilevel.nets.resnet` (batch statistics in every pass, 1x1 projection shortcuts), so the network is
    a pure function of its parameters.
    """

    def __init__(self, n: int = 7, in_channels: int = 3, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        from .resnet import _Block

        if n < 1 or width < 1:
            raise ValueError(f"CifarResNet needs n >= 1 and width >= 1, got n={n}, width={width}")
        self.depth = 6 * n + 2
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width, track_running_stats=False),
            nn.ReLU(),
        )
        layers, c_in = [], width
        for stage in range(3):
            c_out = width * 2**stage
            for b in range(n):
                layers.append(_Block(c_in, c_out, 2 if stage > 0 and b == 0 else 1))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of a batch of images.

        Args:
            x: images, shape (N, C, H, W).

        Returns:
            Logits, shape (N, num_classes).
        """
        if x.dim() == 3:
            x = x.unsqueeze(-3)
        return self.head(self.layers(self.stem(x)).mean(dim=(2, 3)))


def resnet44(in_channels: int = 3, num_classes: int = 10, width: int = 16) -> CifarResNet:
    """ResNet-44 (``n = 7``) of He et al. (2016), used by Lorraine et al. (2020) Fig. 5 / Fig. 10.

    Args:
        in_channels: image channels.
        num_classes: the number of classes.
        width: the stem's channels.

    Returns:
        The :class:`CifarResNet`.
    """
    return CifarResNet(7, in_channels, num_classes, width)
