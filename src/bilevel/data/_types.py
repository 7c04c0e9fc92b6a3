"""Containers for split data sets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

__all__ = ["SplitData", "RegressionData", "ClassificationData"]


@dataclass
class SplitData:
    """Train / validation / test tensors plus a free-form ``metadata`` dict."""

    X_train: Tensor
    y_train: Tensor
    X_val: Tensor
    y_val: Tensor
    X_test: Tensor
    y_test: Tensor
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def X_trainval(self) -> Tensor:
        """Training and validation inputs merged (train rows first)."""
        return torch.cat([self.X_train, self.X_val])

    @property
    def y_trainval(self) -> Tensor:
        """Training and validation targets merged (train rows first)."""
        return torch.cat([self.y_train, self.y_val])

    def merged(self) -> Self:
        """A copy whose training set is train+validation and whose validation set is empty.

        Clarke et al. (2022) train their "Random" baselines on train+validation. Normalisation statistics
        are left as they were.

        Returns:
            The merged copy (same type).
        """
        empty_X = self.X_val[:0]
        empty_y = self.y_val[:0]
        kw = {k: getattr(self, k) for k in self.__dataclass_fields__}
        kw.update(
            X_train=self.X_trainval,
            y_train=self.y_trainval,
            X_val=empty_X,
            y_val=empty_y,
            metadata={**self.metadata, "merged_train_val": True},
        )
        return type(self)(**kw)

    @property
    def sizes(self) -> tuple[int, int, int]:
        """``(n_train, n_val, n_test)`` rows."""
        return len(self.X_train), len(self.X_val), len(self.X_test)

    def to(self, device: torch.device | str | int | None = None, dtype: torch.dtype | None = None) -> Self:
        """A copy on another device and, for floating tensors, dtype.

        Args:
            device: the device (``None``: unchanged).
            dtype: the dtype of the floating tensors (``None``: unchanged); labels keep theirs.

        Returns:
            The copy (same type, same metadata).
        """
        kw = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for k, v in kw.items():
            if isinstance(v, Tensor):
                kw[k] = v.to(device=device, dtype=dtype if v.is_floating_point() else None)
        return type(self)(**kw)


@dataclass
class RegressionData(SplitData):
    """Regression splits; ``y_*`` have shape (n, 1).

    When normalised, ``x_mean``/``x_std``/``y_mean``/``y_std`` hold the statistics
    used (computed on the training rows); :meth:`unnormalise_y` maps predictions back
    to the original target scale.
    """

    x_mean: Tensor | None = None
    x_std: Tensor | None = None
    y_mean: Tensor | None = None
    y_std: Tensor | None = None

    def unnormalise_y(self, y: Tensor) -> Tensor:
        """Map standardised targets or predictions back to the original target scale.

        Args:
            y: values in standardised units.

        Returns:
            ``y * y_std + y_mean`` (``y`` itself when the targets were not normalised).
        """
        if self.y_mean is None:
            return y
        assert self.y_std is not None  # set together with y_mean
        return y * self.y_std.to(y) + self.y_mean.to(y)


@dataclass
class ClassificationData(SplitData):
    """Classification splits; ``y_*`` are int64 class indices."""

    num_classes: int = 0
