"""The values a run writes: clip-mode pixels, a whole-model atlas, gradient norms, images.npz and
results.json, each against an independent computation."""

import json

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from fvis import images, objectives as O
from tests.test_config_flow import library, run_cli

TILE = 32 - 2 * 2  # tiny's 32 px images, less its display crop of 2 on each side


def clip_display(image, crop):
    """display.mode=clip restated: [-1, 1] -> [0, 255], clipped, truncated to uint8, `crop` px cut per side."""
    x = np.floor(np.clip((np.asarray(image, np.float64) + 1.0) / 2.0, 0.0, 1.0) * 255.0).astype(np.uint8)
    return x[crop: x.shape[0] - crop, crop: x.shape[1] - crop]


def seed_display(image, crop):
    """display.mode=seed restated: centre, divide by std + 1e-5, times 0.15, + 0.5, clip, truncate, crop."""
    x = np.asarray(image, np.float64)
    x = np.clip((x - x.mean()) / (x.std() + 1e-5) * 0.15 + 0.5, 0.0, 1.0)
    return (x * 255.0).astype(np.uint8)[crop: x.shape[0] - crop, crop: x.shape[1] - crop]


def test_clip_display_of_known_pixel_values():
    """mode=clip maps -1 -> 0, 0 -> 127, 1 -> 255 (truncating), clips outside [-1, 1], and crops."""
    row = [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, -2.0, 0.999]
    image = np.array(row, np.float32).reshape(1, 8, 1).repeat(3, axis=0).repeat(3, axis=2)  # 3 rows, 3 colours
    tile = images.deprocess(image, crop=0, mode="clip")
    assert tile.dtype == np.uint8 and tile.shape == (3, 8, 3)
    assert tile[:, :, 0].tolist() == [[0, 63, 127, 191, 255, 255, 0, 254]] * 3
    square = np.zeros((6, 6, 3), np.float32)
    square[1:5, 1:5] = 0.5
    square[0, :] = 1.0
    np.testing.assert_array_equal(images.deprocess(square, crop=1, mode="clip"), np.full((4, 4, 3), 191, np.uint8))


def test_clip_display_through_the_cli_writes_the_restated_tiles(tmp_path):
    """display.mode=clip display.crop=4 display.margin=1: each filter PNG and grid cell is the restated tile."""
    run = run_cli(tmp_path, "filters=0:3", "display.mode=clip", "display.crop=4", "display.margin=1")
    tiles = [clip_display(run.arrays["images"][i, 0], 4) for i in range(3)]
    grid = images.load_png(tmp_path / "grid.png")
    assert grid.shape == (2 * 24 + 1, 2 * 24 + 1, 3)  # 3 tiles of 24 px, 2 per row, 1 px margins
    for i, tile in enumerate(tiles):
        np.testing.assert_array_equal(images.load_png(tmp_path / "filters" / f"filter_{i:04d}.png"), tile)
        y, x = (i // 2) * 25, (i % 2) * 25
        np.testing.assert_array_equal(grid[y: y + 24, x: x + 24], tile)
    assert not grid[24].any() and not grid[:, 24].any() and not grid[25:, 25:].any()  # margins, the empty cell


@pytest.fixture(scope="module")
def atlas_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("atlas")
    return folder, run_cli(folder, "layers=[conv1,conv2]", "filters=0:9", "steps=2").summary


def test_atlas_rows_are_each_layers_first_eight_tiles(atlas_run):
    """atlas.png row r holds the first 8 tiles of the r-th layer: its filter PNGs and its grid's cells,
    each the seed display of that layer's own images."""
    folder, summary = atlas_run
    atlas = images.load_png(folder / "atlas.png")
    assert atlas.shape == (2 * TILE + 5, 8 * TILE + 7 * 5, 3)
    for r, (layer, count) in enumerate([("conv1", 8), ("conv2", 9)]):
        sub = folder / "layers" / f"{r:03d}_{layer}"
        assert summary["layers"][r]["layer"] == layer and summary["layers"][r]["filters"] == count
        with np.load(sub / "images.npz") as data:
            assert data["units"].tolist() == list(range(count))
            layer_images = data["images"]
        grid, cols = images.load_png(sub / "grid.png"), 3  # 8 or 9 tiles: 3 per row
        for c in range(8):
            cell = atlas[r * (TILE + 5): r * (TILE + 5) + TILE, c * (TILE + 5): c * (TILE + 5) + TILE]
            expected = seed_display(layer_images[c, 0], 2)
            np.testing.assert_array_equal(cell, expected, err_msg=f"{layer} tile {c}")
            np.testing.assert_array_equal(images.load_png(sub / "filters" / f"filter_{c:04d}.png"), expected)
            y, x = (c // cols) * (TILE + 5), (c % cols) * (TILE + 5)
            np.testing.assert_array_equal(grid[y: y + TILE, x: x + TILE], expected)
    assert not atlas[TILE: TILE + 5].any()  # the black margin between the rows


def test_atlas_layers_compute_their_own_layers_objective(atlas_run, tiny):
    """Each layer folder of a whole-model job holds the library's channel(layer) run of its filters."""
    folder, _ = atlas_run
    for r, (layer, count) in enumerate([("conv1", 8), ("conv2", 9)]):
        with np.load(folder / "layers" / f"{r:03d}_{layer}" / "images.npz") as data:
            expected = library(tiny, O.channel(layer), list(range(count)), steps=2)
            for name in ("images", "curves", "final"):
                np.testing.assert_array_equal(data[name], getattr(expected, name), err_msg=f"{layer} {name}")


def start_image(seed, unit, shape):
    """A unit's random start restated: key(seed) folded with the unit, then image 0, split, first half;
    uniform noise in [-0.125, 0.125) (the reference's (U[0, 1) - 0.5) * 0.25)."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), unit), 0)
    return (jax.random.uniform(jax.random.split(key)[0], shape, jnp.float32) - 0.5) * 0.25


def test_grad_norms_are_the_objectives_gradient_norms_at_each_step(tiny):
    """grad_norms[..., k] is ||d objective / d image|| at the image before step k (jax.grad on the Keras
    model itself); normalized ascent at lr 10 moves the image by exactly 10 along g / ||g||."""
    conv2 = keras.Model(tiny.model.inputs, tiny.model.get_layer("conv2").output)
    units = [3, 7]
    one, two = library(tiny, units=units, steps=1), library(tiny, units=units, steps=2)
    for i, unit in enumerate(units):
        objective = lambda x: jnp.mean(conv2(x[None], training=False)[0, 2:-2, 2:-2, unit])
        x0 = start_image(0, unit, (32, 32, 3))
        g0 = jax.grad(objective)(x0)
        assert two.grad_norms[i, 0, 0] == pytest.approx(float(jnp.linalg.norm(g0)), rel=1e-5)
        assert two.curves[i, 0, 0] == pytest.approx(float(objective(x0)), rel=1e-5)
        step = one.images[i, 0] - np.asarray(x0)
        assert np.linalg.norm(step) == pytest.approx(10.0, rel=1e-5)
        np.testing.assert_allclose(step, 10.0 * g0 / jnp.linalg.norm(g0), atol=1e-5)
        g1 = jax.grad(objective)(jnp.asarray(one.images[i, 0]))
        assert two.grad_norms[i, 0, 1] == pytest.approx(float(jnp.linalg.norm(g1)), rel=1e-4)
        np.testing.assert_array_equal(one.grad_norms[i, 0], two.grad_norms[i, 0, :1])


def test_images_npz_and_results_json_hold_the_results_values(tmp_path, tiny):
    """images.npz holds exactly the Result's units, images, curves, final values, each final image's value
    for every unit and gradient norms, and the chunk of each unit (it serves a finished job's chunks), and
    results.json the same per-filter final values and curves, unit-major, with the PNG names."""
    run = run_cli(tmp_path, "filters=[3,1]", "images_per_unit=2")
    result = library(tiny, units=[3, 1], images_per_unit=2)
    assert set(run.arrays) == {"units", "images", "curves", "final", "grad_norms", "transparency", "snapshots",
                               "unit_values", "snapshot_steps", "fingerprint", "chunk", "chunk_batch_size"}
    assert run.arrays["units"].dtype == np.int32 and run.arrays["images"].dtype == np.float32
    assert run.arrays["unit_values"].shape == (2, 2, 2)  # (units, images per unit, the job's units)
    for name in ("units", "images", "curves", "final", "grad_norms", "unit_values"):
        np.testing.assert_array_equal(run.arrays[name], getattr(result, name), err_msg=name)
    assert run.arrays["chunk"].tolist() == [0, 1]  # batch_size auto on CPU is 1: a chunk per unit
    records = json.loads((tmp_path / "results.json").read_text())["filters"]
    assert [(f["unit"], f["image"], f["png"]) for f in records] == [
        (3, 0, "filters/filter_0003_0.png"), (3, 1, "filters/filter_0003_1.png"),
        (1, 0, "filters/filter_0001_0.png"), (1, 1, "filters/filter_0001_1.png")]
    for k, record in enumerate(records):
        i, j = divmod(k, 2)
        assert np.float32(record["final"]) == result.final[i, j]
        np.testing.assert_array_equal(np.float32(record["objective_curve"]), result.curves[i, j])
        assert record["dead"] is False
