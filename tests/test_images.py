"""Deprocess and grid: the reference's display, exact dtypes, PNG round trips."""

import numpy as np
import pytest

from fvis import images


def seed_deprocess(img):
    """The seed's deprocess_image, verbatim in NumPy."""
    img = img.copy()
    img -= img.mean()
    img /= img.std() + 1e-5
    img *= 0.15
    img = img[25:-25, 25:-25, :]
    img += 0.5
    img = np.clip(img, 0, 1)
    img *= 255
    return np.clip(img, 0, 255).astype("uint8")


def test_deprocess_matches_reference():
    x = np.random.default_rng(0).normal(0, 0.3, (180, 180, 3)).astype("float32")
    tile = images.deprocess(x)
    assert tile.dtype == np.uint8 and tile.shape == (130, 130, 3)
    assert np.abs(tile.astype(int) - seed_deprocess(x).astype(int)).max() <= 1  # float32 vs float64 rounding


def test_grid_reference_layout():
    tiles = [np.full((130, 130, 3), i, np.uint8) for i in range(64)]
    g = images.grid(tiles)
    assert g.shape == (1075, 1075, 3) and g.dtype == np.uint8
    assert g[0, 0, 0] == 0 and g[0, 135, 0] == 1 and g[135, 0, 0] == 8 and g[130, 0, 0] == 0
    assert g[7 * 135, 7 * 135, 0] == 63


def test_grid_sized_from_count_non_square():
    tiles = [np.full((10, 20, 1), 9, np.uint8)] * 5  # 3 columns, 2 rows
    g = images.grid(tiles, margin=2)
    assert g.shape == (2 * 10 + 2, 3 * 20 + 4, 1)
    assert g[12:, 44:].sum() == 0  # the empty sixth cell stays black


def test_png_round_trip_rgb_and_gray(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (12, 7, 3), dtype=np.uint8)
    gray = rgb[..., :1]
    images.save_png(tmp_path / "a.png", rgb)
    images.save_png(tmp_path / "b.png", gray)
    np.testing.assert_array_equal(images.load_png(tmp_path / "a.png"), rgb)
    np.testing.assert_array_equal(images.load_png(tmp_path / "b.png"), gray)


def test_save_png_refuses_floats(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        images.save_png(tmp_path / "c.png", np.zeros((4, 4, 3), np.float32))
