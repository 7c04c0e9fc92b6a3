"""A distilled (synthetic) training set as a hyperparameter.

Dataset distillation (Wang et al., 2018) in the form of Lorraine et al. (2020),
"Optimizing Millions of Hyperparameters by Implicit Differentiation", Sec. 5.3 and
Fig. 6: the *training set itself* is the hyperparameter. With ``k`` learned points
per class and ``C`` classes, the distilled set is

    D_lambda = {(x_j, t_j)}_{j=1..kC},    x_j in R^{shape}  (every pixel a hyperparameter),

the inner (training) loss is the cross-entropy of a model on ``D_lambda``

    L_T(w, lambda) = 1/(kC) sum_j CE(f(x_j; w), t_j),

and the outer (validation) loss is the cross-entropy on real labelled data, so the
IFT hypergradient ``dL_V/dlambda = -dL_V/dw (d^2 L_T/dw dw)^-1 d^2 L_T/dw dlambda``
(Lorraine et al. Eq. 4 / Alg. 1) moves the synthetic points. The targets ``t_j`` are
either the fixed class of the point (``soft_labels=False``: one point set per class, as in
Lorraine et al.) or learned soft labels ``t_j = softmax(c_j)`` of a learned logit
vector ``c_j in R^C`` per point (Vicol et al., 2021, "Implicit Regularization in
Overparameterized Bilevel Optimization", Sec. 4 rings distillation with learned labels).

The raw values live in the library's parametrisation (:mod:`bilevel.hparams`): one
element-granularity hyperparameter called ``name`` with the identity transform over the
pseudo-parameters ``{"x": (kC, *shape), "label_logits": (kC, C)}``, i.e. raw keys
``"<name>/x"`` and (with soft labels) ``"<name>/label_logits"``; :attr:`DistilledData.space`
is that :class:`~bilevel.hparams.HyperParameterSpace`, so a distilled set can be combined
with other hyperparameters in one flat dict optimised by ``torch.optim``.

Optionally (``point_bound=R``) the inputs are kept inside the box ``(-R, R)^shape`` by the
coordinate-wise transform ``x = R tanh(z / R)`` (:class:`bilevel.hparams.ScaledTanh`) of the raw value
``z = "<name>/x"``: slope 1 at the origin (so an optimiser step moves a point near the data as
much as without the bound) and saturating at ``+-R``. Added to stop learned points drifting far
outside the data's range (Vicol et al. 2021 rings, 3 classes / 2 points, see docs/vicol.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .hparams import IDENTITY, Granularity, HyperParameter, HyperParameterSpace, Transform, scaled_tanh

__all__ = ["DistilledData", "DistillInit"]

DistillInit = Literal["zeros", "normal", "real"]


class DistilledData:
    """``per_class`` learned inputs of shape ``shape`` for each of ``num_classes`` classes.

    Point ``j`` belongs to class ``j // per_class`` (:attr:`labels`). With
    ``soft_labels=True`` each point also has a learned logit vector whose softmax is its
    target distribution. See the module docstring for the maths.

    ``num_points=n`` instead gives a set of exactly ``n`` points whose (initial) classes
    are assigned round-robin, point ``j`` in class ``j mod C`` -- e.g. Vicol et al.'s
    Fig. 6, three classes distilled into two points with learned soft labels
    (``DistilledData((2,), 3, num_points=2, soft_labels=True)``: labels ``[0, 1]``).
    With ``n < C`` some classes have no point of their own, which only makes sense with
    ``soft_labels=True`` (the labels can then move to the missing classes) but is allowed
    either way.

    Args:
        shape:
            Shape of one input, e.g. ``(28, 28)``, ``(3, 32, 32)`` or ``(2,)``.
        num_classes:
            Number of classes ``C`` (>= 1).
        per_class:
            Learned points per class ``k`` (>= 1).
        num_points:
            Total number of points ``n`` (>= 1), labels round-robin; replaces ``per_class``
            (which must then be left at 1). ``None``: ``k * C`` points, ``k`` per class.
        soft_labels:
            Learn the targets as ``softmax(label_logits)`` (one ``C``-vector per point).
        name:
            Hyperparameter name (raw-dict key prefix; no ``"/"``).
        point_bound:
            ``None`` (default): the raw ``"<name>/x"`` are the inputs. ``R > 0``: the inputs are
            ``R tanh(raw / R)`` (:class:`bilevel.hparams.ScaledTanh`), inside ``(-R, R)`` coordinate-wise
            (:meth:`init` moves initial coordinates outside the box 1e-6 inside it).
    """

    def __init__(
        self,
        shape: Sequence[int],
        num_classes: int,
        per_class: int = 1,
        soft_labels: bool = False,
        name: str = "distill",
        *,
        num_points: int | None = None,
        point_bound: float | None = None,
    ) -> None:
        shape = tuple(int(s) for s in shape)
        if any(s < 1 for s in shape):
            raise ValueError(f"DistilledData: input shape must have positive sizes, got {shape}")
        if int(num_classes) < 1:
            raise ValueError(f"DistilledData: num_classes must be >= 1, got {num_classes}")
        if int(per_class) < 1:
            raise ValueError(f"DistilledData: per_class must be >= 1, got {per_class}")
        if num_points is not None:
            if int(num_points) < 1:
                raise ValueError(f"DistilledData: num_points must be >= 1, got {num_points}")
            if int(per_class) != 1:
                raise ValueError(
                    f"DistilledData: give either per_class={per_class} or num_points={num_points}, "
                    "not both (num_points assigns classes round-robin)"
                )
        self._num_points = None if num_points is None else int(num_points)
        self.shape: tuple[int, ...] = shape
        self.num_classes = int(num_classes)
        self.per_class = int(per_class)
        self.soft_labels = bool(soft_labels)
        # init range unused (init() sets values explicitly); identity transform: raw == natural.
        self.hparam = HyperParameter(name, IDENTITY, 0.0, 0.0, "raw", Granularity.ELEMENT)
        self.space = HyperParameterSpace([self.hparam])
        #: transform from the raw ``"<name>/x"`` to the inputs (identity, or ScaledTanh with ``point_bound``)
        self.point_transform: Transform = IDENTITY if point_bound is None else scaled_tanh(point_bound)

    # ------------------------------------------------------------------ layout

    @property
    def name(self) -> str:
        return self.hparam.name

    @property
    def num_points(self) -> int:
        """The size of the distilled set: ``num_points`` if given, else ``k * C``."""
        return self.num_classes * self.per_class if self._num_points is None else self._num_points

    @property
    def labels(self) -> Tensor:
        """Class index of every point (int64, CPU): ``[0]*k + [1]*k + ...``, or ``j mod C`` with ``num_points``."""
        if self._num_points is not None:
            return torch.arange(self._num_points) % self.num_classes
        return torch.arange(self.num_classes).repeat_interleave(self.per_class)

    def shapes(self) -> dict[str, torch.Size]:
        """Pseudo-parameter shapes the hyperparameter covers.

        Returns:
            ``{"x": (n, *shape)}``, plus ``"label_logits": (n, C)`` with soft labels.
        """
        out = {"x": torch.Size((self.num_points, *self.shape))}
        if self.soft_labels:
            out["label_logits"] = torch.Size((self.num_points, self.num_classes))
        return out

    def keys(self) -> list[str]:
        """Raw-dict keys of this set.

        Returns:
            E.g. ``["distill/x", "distill/label_logits"]``.
        """
        return [self.hparam.key(k) for k in self.shapes()]

    def _pseudo_params(self) -> dict[str, Tensor]:
        return {k: torch.empty(s, device="meta") for k, s in self.shapes().items()}

    def check(self, hparams: Mapping[str, Tensor]) -> None:
        """Raise ``ValueError`` if ``hparams`` lacks this set's keys or has wrong shapes.

        Keys of other hyperparameters in the same flat dict are ignored.

        Args:
            hparams: a flat dict of raw hyperparameters.

        Raises:
            ValueError: a missing key or a wrong shape (named).
        """
        for key, shape in zip(self.keys(), self.shapes().values()):
            if key not in hparams:
                raise ValueError(f"hyperparameters lack the distilled-data key {key!r}; have {sorted(hparams)}")
            if tuple(hparams[key].shape) != tuple(shape):
                raise ValueError(
                    f"distilled-data hyperparameter {key!r} has shape {tuple(hparams[key].shape)}, "
                    f"expected {tuple(shape)}"
                )

    # ------------------------------------------------------------------ construction

    def init(
        self,
        generator: torch.Generator | None = None,
        init: DistillInit = "zeros",
        real: tuple[Tensor, Tensor] | None = None,
        *,
        scale: float = 1.0,
        label_scale: float = 1.0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        requires_grad: bool = True,
    ) -> dict[str, Tensor]:
        """Initial raw values ``{"<name>/x": ..., ["<name>/label_logits": ...]}``.

        Args:
            generator: the random generator of ``"normal"`` and ``"real"``.
            init: ``"zeros"``; ``"normal"`` (``scale * N(0, 1)`` per entry); ``"real"``: distinct examples of
                each point's class (:attr:`labels`) drawn at random from ``real`` -- Lorraine et al.'s "random
                real images" baseline is exactly this set.
            real: ``(x, y)``, ``x`` of shape ``(n, *shape)`` and ``y`` class indices (only with ``"real"``).
            scale: the standard deviation of ``"normal"``.
            label_scale: label logits start at ``label_scale * onehot(class)`` (``0`` gives uniform labels).
            dtype: default: that of ``real[0]``, else torch's default.
            device: default: that of ``real[0]``, else the CPU.
            requires_grad: whether the returned leaves require gradients.

        Returns:
            The raw hyperparameters of the set.

        Raises:
            ValueError: an unknown ``init``, or ``real`` given without ``"real"`` (or missing with it).
        """
        if real is not None and init != "real":
            raise ValueError(f"DistilledData.init: real=(x, y) is only used with init='real', got init={init!r}")
        ref = real[0] if real is not None else None
        dtype = dtype or (ref.dtype if ref is not None and ref.is_floating_point() else torch.get_default_dtype())
        device = (
            torch.device(device) if device is not None else (ref.device if ref is not None else torch.device("cpu"))
        )
        shape_x = self.shapes()["x"]
        gdev = generator.device if generator is not None else torch.device("cpu")
        if init == "zeros":
            x = torch.zeros(shape_x, dtype=torch.float64)
        elif init == "normal":
            x = scale * torch.randn(shape_x, generator=generator, dtype=torch.float64, device=gdev)
        elif init == "real":
            if real is None:
                raise ValueError("DistilledData.init: init='real' needs real=(x, y)")
            x = self.sample_real(real[0], real[1], generator).to(torch.float64)
        else:
            raise ValueError(f"DistilledData.init: unknown init {init!r}; expected 'zeros', 'normal' or 'real'")
        x = self.point_transform.inverse(self.point_transform.clamp_into_domain(x))  # inputs -> raw
        values: dict[str, Tensor] = {"x": x.to(device)}
        if self.soft_labels:
            values["label_logits"] = label_scale * F.one_hot(self.labels, self.num_classes).to(
                device=device, dtype=torch.float64
            )
        raw = self.space.from_natural(self._pseudo_params(), {self.name: values}, dtype=dtype, device=device)
        return {k: v.requires_grad_(requires_grad) for k, v in raw.items()}

    def sample_real(self, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One distinct random example of each point's class from ``(x, y)``, in :attr:`labels` order.

        Class ``c`` needs as many examples as points labelled ``c``; they are drawn without
        replacement (one ``randperm`` per class with a point, classes in increasing order).

        Args:
            x: real inputs, shape ``(n, *shape)``.
            y: their class indices, shape ``(n,)``.
            generator: the random generator.

        Returns:
            The chosen inputs, shape ``(num_points, *shape)`` (a detached copy).

        Raises:
            ValueError: wrong shapes, or a class with too few examples.
        """
        if x.dim() < 1 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"DistilledData: real inputs must have shape (n, *{self.shape}), got {tuple(x.shape)}")
        if y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
            raise ValueError(
                f"DistilledData: real labels must be {x.shape[0]} integer class indices, "
                f"got shape {tuple(y.shape)} dtype {y.dtype}"
            )
        gdev = generator.device if generator is not None else torch.device("cpu")
        labels = self.labels
        rows = torch.empty(len(labels), dtype=torch.long)
        y_cpu = y.detach().cpu()
        for c in range(self.num_classes):
            slots = torch.nonzero(labels == c).flatten()
            if slots.numel() == 0:
                continue
            idx = torch.nonzero(y_cpu == c).flatten()
            if idx.numel() < slots.numel():
                raise ValueError(
                    f"DistilledData: class {c} has {idx.numel()} real examples, "
                    f"need {slots.numel()} (one per point of that class)"
                )
            perm = torch.randperm(idx.numel(), generator=generator, device=gdev).cpu()
            rows[slots] = idx[perm[: slots.numel()]]
        return x[rows.to(x.device)].detach().clone()

    # ------------------------------------------------------------------ maps

    def natural(self, hparams: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The set's natural values read from a flat raw dict.

        Args:
            hparams: a flat dict of raw hyperparameters (:meth:`check`-ed).

        Returns:
            ``{"x": ..., ["label_logits": ...]}`` (identity transform; ``x`` through :attr:`point_transform`).
        """
        self.check(hparams)
        nat = self.hparam.natural({k: hparams[k] for k in self.keys()})
        assert isinstance(nat, dict)  # element granularity: one tensor per key
        if self.point_transform is not IDENTITY:
            nat = {**nat, "x": self.point_transform.forward(nat["x"])}
        return nat

    def inputs(self, hparams: Mapping[str, Tensor]) -> Tensor:
        """The distilled inputs.

        Args:
            hparams: a flat dict of raw hyperparameters.

        Returns:
            Shape ``(num_points, *shape)``, differentiable in ``hparams``.
        """
        return self.natural(hparams)["x"]

    def targets(self, hparams: Mapping[str, Tensor]) -> Tensor:
        """The targets of the distilled points.

        Args:
            hparams: a flat dict of raw hyperparameters.

        Returns:
            Class indices ``(num_points,)`` (hard labels) or probabilities ``softmax(label_logits)``
            ``(num_points, C)``.
        """
        if self.soft_labels:
            return torch.softmax(self.natural(hparams)["label_logits"], dim=-1)
        self.check(hparams)
        return self.labels.to(hparams[self.keys()[0]].device)

    def cross_entropy(self, logits: Tensor, hparams: Mapping[str, Tensor]) -> Tensor:
        """Mean cross-entropy ``1/n sum_j CE(logits_j, t_j)`` of the model's logits on :meth:`inputs`.

        Args:
            logits: the model's outputs on :meth:`inputs`, shape ``(num_points, C)``.
            hparams: a flat dict of raw hyperparameters (for soft targets).

        Returns:
            A scalar, differentiable in ``logits`` and (soft labels) ``hparams``.

        Raises:
            ValueError: ``logits`` of another shape.
        """
        n = self.num_points
        if logits.dim() != 2 or tuple(logits.shape) != (n, self.num_classes):
            raise ValueError(
                f"DistilledData.cross_entropy: logits must have shape ({n}, {self.num_classes}), "
                f"got {tuple(logits.shape)}"
            )
        self.check(hparams)
        return F.cross_entropy(logits, self.targets(hparams))

    def __repr__(self) -> str:
        size = f"per_class={self.per_class}" if self._num_points is None else f"num_points={self._num_points}"
        return (
            f"DistilledData(shape={self.shape}, num_classes={self.num_classes}, {size}, "
            f"soft_labels={self.soft_labels}, name={self.name!r}"
            + ("" if self.point_transform is IDENTITY else f", point_bound={self.point_transform.domain[1]:g}")
            + ")"
        )
