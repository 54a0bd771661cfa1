"""Sample grids: size, layout and value mapping of the written PNG (read back with Pillow)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.track.images import grid_shape, save_grid_png


def _read(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_grid_png_size_layout_and_spin_mapping(tmp_path):
    rng = np.random.default_rng(0)
    spins = rng.choice([-1.0, 1.0], size=(10, 1, 5, 7))  # 10 -> 3 rows x 4 cols
    path = save_grid_png(spins, tmp_path / "sub" / "g.png", pad_px=2, scale=3)
    img = _read(path)
    rows, cols = grid_shape(10)
    assert (rows, cols) == (3, 4)
    assert img.shape == (rows * 5 * 3 + (rows + 1) * 2, cols * 7 * 3 + (cols + 1) * 2, 3)
    # Tile i sits at row i // cols, col i % cols; each site is a 3x3 block: -1 black, +1 white.
    for i in (0, 5, 9):
        r, c = divmod(i, cols)
        top, left = 2 + r * (15 + 2), 2 + c * (21 + 2)
        tile = img[top : top + 15 : 3, left : left + 21 : 3, 0]
        np.testing.assert_array_equal(tile, np.where(spins[i, 0] > 0, 255, 0))
    # Empty slots (10, 11) and padding stay gray.
    assert (img[-3, -3] == 128).all() and (img[0, 0] == 128).all()


def test_uniform_spin_batch_stays_white_not_gray(tmp_path):
    img = _read(save_grid_png(np.ones((4, 3, 3)), tmp_path / "up.png", pad_px=0))
    assert img.shape == (6, 6, 3) and (img == 255).all()


def test_arbitrary_range_normalised_over_batch_and_nan_red(tmp_path):
    x = np.array([[[0.0, 5.0]], [[10.0, np.nan]]])  # [2, 1, 2] -> [N, H, W]
    img = _read(save_grid_png(x, tmp_path / "r.png", pad_px=0, ncols=2))
    assert img.shape == (1, 4, 3)
    assert list(img[0, :3, 0]) == [0, 128, 255]  # min..max over the batch: 0, 5, 10
    assert tuple(img[0, 3]) == (255, 0, 0)


def test_bad_shapes_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"\[N, H, W\] or \[N, 1, H, W\]"):
        save_grid_png(np.zeros((2, 3, 4, 4)), tmp_path / "x.png")
    with pytest.raises(ValueError, match="non-empty"):
        save_grid_png(np.zeros((0, 4, 4)), tmp_path / "x.png")
    with pytest.raises(ValueError, match="value_range"):
        save_grid_png(np.zeros((1, 4, 4)), tmp_path / "x.png", value_range=(1.0, 1.0))


def test_drawable_views_images_as_they_are_and_3d_fields_by_their_middle_slice():
    from pipeline.track.images import drawable, is_image_shape

    x = np.arange(2 * 1 * 4 * 3 * 5, dtype=np.float64).reshape(2, 1, 4, 3, 5)
    assert np.array_equal(drawable(x), x[:, 0, 2]) and drawable(x).shape == (2, 3, 5)
    assert np.array_equal(drawable(x[:, :, 0]), x[:, 0, 0])  # [N, 1, H, W]
    assert np.array_equal(drawable(x[:, 0, 0]), x[:, 0, 0])  # [N, H, W]
    for not_images in (np.zeros((2, 7)), np.zeros((2, 3, 4, 4)), np.zeros((2, 2, 4, 4, 4))):
        assert drawable(not_images) is None and not is_image_shape(not_images.shape[1:])
