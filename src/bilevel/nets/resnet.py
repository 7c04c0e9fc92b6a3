"""ResNet-18 for 32x32 images (CIFAR-10, Clarke et al. 2022 sec. 4.2) as a functional model.

The module uses batch statistics in every forward pass (``track_running_stats=False``)
so it is a pure function of its parameters: ``resnet18_forward(params, x)`` calls
``torch.func.functional_call`` and can be ``vmap``-ed over a population.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ResNet18", "resnet18_init", "resnet18_forward"]


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out, track_running_stats=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out, track_running_stats=False)
        self.short = (
            nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out, track_running_stats=False)
            )
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


class ResNet18(nn.Module):
    """He et al. (2016) ResNet-18, CIFAR variant (3x3 stem, no max-pool)."""

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w, track_running_stats=False), nn.ReLU()
        )
        layers, c_in = [], w
        for c_out, stride in ((w, 1), (2 * w, 2), (4 * w, 2), (8 * w, 2)):
            layers += [_Block(c_in, c_out, stride), _Block(c_out, c_out, 1)]
            c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of a batch of images.

        Args:
            x: images, shape (N, 3, 32, 32).

        Returns:
            Logits, shape (N, num_classes).
        """
        return self.head(self.layers(self.stem(x)).mean(dim=(2, 3)))


def resnet18_init(
    num_classes: int = 10, generator: torch.Generator | None = None, width: int = 64, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """Parameters of a freshly initialised :class:`ResNet18` (seeded through ``generator``).

    Args:
        num_classes: the number of classes.
        generator: the random generator (``None``: torch's global state).
        width: the stem's channels (64: the paper's ResNet-18).
        dtype: the parameters' dtype.

    Returns:
        The parameters by name (detached).
    """
    seed = int(torch.randint(0, 2**31 - 1, (), generator=generator)) if generator is not None else None
    with torch.random.fork_rng():
        if seed is not None:
            torch.manual_seed(seed)
        model = ResNet18(num_classes, width).to(dtype)
    params = {k: v.detach() for k, v in model.named_parameters()}
    _TEMPLATES.setdefault((num_classes, width), model.to("meta"))  # built here, outside any vmap
    return params


_TEMPLATES: dict[tuple[int, int], ResNet18] = {}


def resnet18_forward(params: dict[str, Tensor], x: Tensor) -> Tensor:
    """Logits for images with the given parameters (``torch.func.functional_call``; vmap-able).

    Args:
        params: :func:`resnet18_init`'s parameters.
        x: images, shape (N, 3, 32, 32).

    Returns:
        Logits, shape (N, num_classes).
    """
    num_classes, width = params["head.weight"].shape[0], params["stem.0.weight"].shape[0]
    key = (num_classes, width)
    if key not in _TEMPLATES:  # random initialisation of a throw-away template: not allowed inside vmap
        _TEMPLATES[key] = ResNet18(num_classes, width).to("meta")
    return torch.func.functional_call(_TEMPLATES[key], params, (x,))
