"""Image grids and matrix heat-map panels as PNG files.

* :func:`make_grid` tiles ``N`` images (``(N, H, W)``, ``(N, C, H, W)`` with ``C`` in
  {1, 3}, or flat ``(N, D)`` with ``shape=``) into one ``(rows, cols, 3)`` float array in
  ``[0, 1]``, e.g. the distilled images of Lorraine et al. (2020), Fig. 6;
* :func:`save_image_grid` writes such a grid as a PNG, optionally with one caption per
  image;
* :func:`save_heatmaps` draws matrices side by side with a shared colour scale and an
  optional elementwise preprocessing (``np.tanh`` for the inverse-Hessian panels of
  Lorraine et al., Fig. 4).

Figures use :class:`matplotlib.figure.Figure` with the Agg canvas (no pyplot state).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from ..rundir import atomic_savefig, atomic_write

__all__ = ["make_grid", "save_image_grid", "save_heatmaps"]

Normalize = Literal["per-image", "global", "none"]


def _as_images(images: npt.ArrayLike, shape: Sequence[int] | None) -> np.ndarray:
    """``(N, H, W, C)`` float64 array from a tensor / array of images."""
    if hasattr(images, "detach"):
        images = images.detach().cpu().double().numpy()
    x = np.asarray(images, dtype=np.float64)
    if shape is not None:
        if x.ndim < 1 or int(np.prod(x.shape[1:])) != int(np.prod(shape)):
            raise ValueError(f"make_grid: cannot view images of shape {x.shape} as (N, *{tuple(shape)})")
        x = x.reshape((x.shape[0], *shape))
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(
            f"make_grid: images must be (N, H, W) or (N, C, H, W) with C in (1, 3) "
            f"(or flat with shape=...), got shape {x.shape}"
        )
    if x.shape[0] == 0:
        raise ValueError("make_grid: no images given")
    if not np.isfinite(x).all():
        raise ValueError("make_grid: images contain non-finite values")
    x = np.transpose(x, (0, 2, 3, 1))
    return np.repeat(x, 3, axis=3) if x.shape[3] == 1 else x


def _normalise(x: np.ndarray, normalize: Normalize) -> np.ndarray:
    if normalize == "none":
        return np.clip(x, 0.0, 1.0)
    if normalize == "global":
        lo, hi = x.min(), x.max()
        return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    if normalize == "per-image":
        lo = x.min(axis=(1, 2, 3), keepdims=True)
        hi = x.max(axis=(1, 2, 3), keepdims=True)
        span = np.where(hi > lo, hi - lo, 1.0)
        return np.where(hi > lo, (x - lo) / span, 0.0)
    raise ValueError(f"make_grid: normalize must be 'per-image', 'global' or 'none', got {normalize!r}")


def make_grid(
    images: npt.ArrayLike,
    nrow: int | None = None,
    padding: int = 2,
    normalize: Normalize = "per-image",
    pad_value: float = 1.0,
    shape: Sequence[int] | None = None,
) -> np.ndarray:
    """Tile images row by row into a ``(R*(H+p)+p, K*(W+p)+p, 3)`` array in ``[0, 1]``.

    Args:
        images: N images, (N, H, W), (N, C, H, W), (N, H, W, C) or flattened with ``shape``.
        nrow: images per row (default ``ceil(sqrt(N))``).
        padding: pixels of ``pad_value`` around every tile.
        normalize: ``"per-image"`` min-max scales each image to ``[0, 1]`` (a constant image becomes 0),
            ``"global"`` uses one min and max for all, ``"none"`` clips to ``[0, 1]``.
        pad_value: the padding's grey level.
        shape: the image shape of flattened images.

    Returns:
        The RGB grid (grey images are repeated over 3 channels).
    """
    x = _normalise(_as_images(images, shape), normalize)
    n, h, w, _ = x.shape
    nrow = int(nrow) if nrow is not None else math.ceil(math.sqrt(n))
    if nrow < 1 or padding < 0:
        raise ValueError(f"make_grid: need nrow >= 1 and padding >= 0, got nrow={nrow}, padding={padding}")
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, 3), float(pad_value))
    for i in range(n):
        r, c = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[top : top + h, left : left + w] = x[i]
    return grid


def _png(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"expected a .png path, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def save_image_grid(
    images: npt.ArrayLike,
    path: str | os.PathLike[str],
    nrow: int | None = None,
    padding: int = 2,
    normalize: Normalize = "per-image",
    labels: Sequence[str] | None = None,
    title: str | None = None,
    shape: Sequence[int] | None = None,
    tile_inches: float = 1.0,
) -> Path:
    """Write ``images`` as a PNG grid.

    Without ``labels``/``title`` the PNG holds exactly :func:`make_grid`'s pixels (8-bit); with a ``title``
    only, a figure showing that grid under the title; with ``labels``, a matplotlib figure with one
    captioned panel per image.

    Args:
        images: as :func:`make_grid`.
        path: the PNG to write (atomically).
        nrow: images per row.
        padding: pixels between tiles.
        normalize: as :func:`make_grid`.
        labels: one caption per image.
        title: the figure's title.
        shape: the image shape of flattened images.
        tile_inches: the size of one panel in a figure.

    Returns:
        ``path``.
    """
    path = _png(path)
    if labels is None and title is None:
        from matplotlib.image import imsave

        grid = make_grid(images, nrow, padding, normalize, shape=shape)
        atomic_write(path, lambda tmp: imsave(tmp, grid, format="png"))
        return path
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if labels is None:  # one axes holding the tiled grid: fast for hundreds of images (e.g. CIFAR-100 classes)
        grid = make_grid(images, nrow, padding, normalize, shape=shape)
        n = _as_images(images, shape).shape[0]
        cols = int(nrow) if nrow is not None else math.ceil(math.sqrt(n))
        rows = math.ceil(n / cols)
        fig = Figure(figsize=(tile_inches * cols + 0.2, tile_inches * rows + 0.5))
        FigureCanvasAgg(fig)
        ax = fig.add_axes((0.0, 0.0, 1.0, 1.0 - 0.4 / (tile_inches * rows + 0.5)))
        ax.set_axis_off()
        ax.imshow(grid, interpolation="nearest")
        if title is not None:  # always here: labels and title are not both None
            fig.suptitle(title, fontsize=10)
        atomic_savefig(fig, path, format="png", dpi=100)
        return path
    x = _normalise(_as_images(images, shape), normalize)
    n = x.shape[0]
    if labels is not None and len(labels) != n:
        raise ValueError(f"save_image_grid: {len(labels)} labels for {n} images")

    nrow = int(nrow) if nrow is not None else math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    fig = Figure(
        figsize=(tile_inches * nrow + 0.2, tile_inches * rows + (0.4 if title else 0.1) + 0.2 * (labels is not None)),
        layout="constrained",
    )
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, nrow, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < n:
            ax.imshow(x[i], interpolation="nearest")
            if labels is not None:
                ax.set_title(str(labels[i]), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    atomic_savefig(fig, path, format="png", dpi=100)
    return path


def save_heatmaps(
    matrices: Sequence[npt.ArrayLike],
    titles: Sequence[str],
    path: str | os.PathLike[str],
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    cmap: str = "RdBu_r",
    title: str | None = None,
    panel_inches: float = 2.6,
) -> Path:
    """Draw square matrices side by side with one symmetric colour scale and a colour bar.

    Args:
        matrices: the matrices.
        titles: one title per matrix.
        path: the PNG to write (atomically).
        transform: applied elementwise first (e.g. ``np.tanh``, as Lorraine et al. (2020) Fig. 4 does to
            show inverse Hessians whose entries span many magnitudes).
        cmap: the matplotlib colour map.
        title: the figure's title.
        panel_inches: the size of one panel.

    Returns:
        ``path``.
    """
    if len(matrices) != len(titles) or not matrices:
        raise ValueError(
            f"save_heatmaps: need one title per matrix, got {len(matrices)} matrices and {len(titles)} titles"
        )
    mats = []
    for m in matrices:
        a = m.detach().cpu().double().numpy() if hasattr(m, "detach") else np.asarray(m, dtype=np.float64)
        if a.ndim != 2:
            raise ValueError(f"save_heatmaps: matrices must be 2-D, got shape {a.shape}")
        mats.append(transform(a) if transform is not None else a)
    path = _png(path)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    vmax = max(float(np.nanmax(np.abs(a))) for a in mats) or 1.0
    fig = Figure(figsize=(panel_inches * len(mats) + 0.8, panel_inches + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(mats), squeeze=False)[0]
    im = None
    for ax, a, t in zip(axes, mats, titles):
        im = ax.imshow(a, cmap=cmap, vmin=-vmax, vmax=vmax, interpolation="nearest")
        ax.set_title(t, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    assert im is not None  # matrices is not empty
    fig.colorbar(im, ax=list(axes), shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=10)
    atomic_savefig(fig, path, format="png", dpi=110)
    return path
