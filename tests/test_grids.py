"""Image grids and heat-map panels (bilevel.report.grids)."""

import numpy as np
import pytest
import torch

from bilevel.report.grids import make_grid, save_heatmaps, save_image_grid


def test_make_grid_places_tiles_and_normalises_per_image():
    imgs = torch.zeros(3, 2, 2)
    imgs[0] = torch.tensor([[0.0, 1.0], [2.0, 3.0]])  # scaled to [0, 1/3, 2/3, 1]
    imgs[1] = 5.0  # constant -> 0
    imgs[2] = torch.tensor([[-1.0, 1.0], [1.0, -1.0]])
    g = make_grid(imgs, nrow=2, padding=1, pad_value=0.5)
    assert g.shape == (2 * 3 + 1, 2 * 3 + 1, 3)
    np.testing.assert_allclose(g[1:3, 1:3, 0], [[0, 1 / 3], [2 / 3, 1]])
    np.testing.assert_allclose(g[1:3, 4:6, 1], 0.0)
    np.testing.assert_allclose(g[4:6, 1:3, 2], [[0, 1], [1, 0]])
    assert (g[0] == 0.5).all() and (g[:, 3] == 0.5).all()
    np.testing.assert_allclose(g[4:6, 4:6], 0.5)  # empty 4th tile is padding


def test_make_grid_global_flat_and_colour():
    flat = torch.arange(8.0).reshape(2, 4)
    g = make_grid(flat, nrow=1, padding=0, normalize="global", shape=(2, 2))
    np.testing.assert_allclose(g[:, :, 0].reshape(-1), np.arange(8) / 7)
    rgb = np.random.default_rng(0).uniform(size=(1, 3, 4, 5))
    g = make_grid(rgb, padding=0, normalize="none")
    np.testing.assert_allclose(g, rgb[0].transpose(1, 2, 0))


def test_save_image_grid_round_trips_pixels(tmp_path):
    from matplotlib.image import imread

    imgs = np.random.default_rng(1).uniform(size=(5, 1, 6, 7))
    p = save_image_grid(imgs, tmp_path / "sub" / "grid.png", nrow=3)
    back = imread(p)[..., :3]
    np.testing.assert_allclose(back, make_grid(imgs, nrow=3), atol=1 / 255 + 1e-6)
    q = save_image_grid(imgs, tmp_path / "labelled.png", labels=list("abcde"), title="t")
    assert imread(q).shape[0] > 50
    many = np.random.default_rng(2).uniform(size=(100, 3, 4, 4))
    r = imread(save_image_grid(many, tmp_path / "titled.png", nrow=10, title="100 images"))
    assert r.shape[:2] == (
        10 * 100 + 50,
        10 * 100 + 20,
    )  # one tiled axes: (rows + 0.5) x (cols + 0.2) inches at 100 dpi


def test_save_heatmaps(tmp_path):
    from matplotlib.image import imread

    p = save_heatmaps([np.eye(3) * 10, -np.ones((3, 3))], ["a", "b"], tmp_path / "h.png", transform=np.tanh)
    assert imread(p).ndim == 3


def test_errors():
    with pytest.raises(ValueError, match=r"C in \(1, 3\)"):
        make_grid(np.zeros((2, 2, 4, 4)))
    with pytest.raises(ValueError, match="cannot view"):
        make_grid(np.zeros((2, 5)), shape=(2, 2))
    with pytest.raises(ValueError, match="non-finite"):
        make_grid(np.full((1, 2, 2), np.nan))
    with pytest.raises(ValueError, match="normalize"):
        make_grid(np.zeros((1, 2, 2)), normalize="minmax")
    with pytest.raises(ValueError, match=".png"):
        save_image_grid(np.zeros((1, 2, 2)), "grid.jpg")
    with pytest.raises(ValueError, match="3 labels for 1 images"):
        save_image_grid(np.zeros((1, 2, 2)), "/tmp/x.png", labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="2-D"):
        save_heatmaps([np.zeros(3)], ["a"], "/tmp/x.png")
