"""The optimisation and the models pinned down by value: dead units, per-image steps, inference mode, input
spaces, each against an independent computation (hand-worked, numpy, or Keras itself)."""

import json
import re

import keras
import numpy as np
import pytest
from hydra import compose, initialize_config_module
from PIL import Image

import fvis
from fvis import cli, models, optim
from tests.conftest import shared_path

# ------------------------------------------------------------------------------------------------ dead units

DEAD = [1, 4]  # channels whose bias keeps them below zero, so the ReLU after them is 0 for every start image


def save_model_with_dead_channels(path):
    """Conv2D(6) + ReLU on 32x32x3: bias -100 on the DEAD channels (ReLU output 0 everywhere, zero gradient),
    +1 on the others (ReLU active everywhere on a near-gray image, non-zero gradient)."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((32, 32, 3), name="image")
    conv = keras.layers.Conv2D(6, 3, padding="same", name="conv")
    outputs = keras.layers.ReLU(name="relu")(conv(inputs))
    model = keras.Model(inputs, outputs, name="deadnet")
    kernel, bias = conv.get_weights()  # Glorot uniform: |w| < sqrt(6 / (27 + 54)) = 0.27, halved below
    bias[:] = 1.0  # at a start image (|x| < 0.125) |x * w| sums to < 27 * 0.136 * 0.125 = 0.46: 1 + that > 0
    bias[DEAD] = -100.0  # and -100 + that < 0
    conv.set_weights([kernel * 0.5, bias])
    model.save(path)


def composed(*overrides):
    with initialize_config_module(config_module="fvis.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture(scope="module")
def dead_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dead")
    save_model_with_dead_channels(folder / "deadnet.keras")
    cli.run(composed("model=saved", f"model.path={folder / 'deadnet.keras'}", "layer=relu", "image_size=[32,32]",
                     "filters=all", "steps=3", "quality.draws=2", "display.crop=2"), folder / "run")
    return folder / "run"


def test_dead_filters_are_exactly_the_dead_channels(dead_run):
    """results.json lists the dead units (and only them), and flags each filter accordingly."""
    results = json.loads((dead_run / "results.json").read_text())
    assert results["dead_filters"] == DEAD
    assert [f["dead"] for f in results["filters"]] == [u in DEAD for u in range(6)]
    for f in results["filters"]:
        if f["unit"] in DEAD:
            assert f["final"] == 0.0 and f["objective_curve"] == [0.0, 0.0, 0.0]
        else:  # about 1 (the bias) at the start, then rising
            assert 0.5 < f["objective_curve"][0] < f["objective_curve"][1] < f["objective_curve"][2] < f["final"]


def test_report_counts_the_dead_units(dead_run):
    """report.html states how many units are dead; their robustness is undefined (activation 0)."""
    page = (dead_run / "report.html").read_text()
    count = re.search(r"<th>dead units[^<]*</th><td>(\d+)</td>", page)
    assert count is not None and int(count.group(1)) == len(DEAD)
    results = json.loads((dead_run / "results.json").read_text())
    assert [f["quality"]["robustness"] is None for f in results["filters"]] == [u in DEAD for u in range(6)]


def test_dead_tiles_are_plain_gray_and_live_ones_are_not(dead_run):
    """A dead unit's tile (and its cell of the grid) is uniform gray 128; a live unit's shows its pattern."""
    tiles = {u: np.asarray(Image.open(dead_run / "filters" / f"filter_{u:04d}.png")) for u in range(6)}
    grid = np.asarray(Image.open(dead_run / "grid.png"))  # 3 x 2 tiles of 28 px, 5 px margins
    for unit, tile in tiles.items():
        cell = grid[(unit // 3) * 33: (unit // 3) * 33 + 28, (unit % 3) * 33: (unit % 3) * 33 + 28]
        np.testing.assert_array_equal(cell, tile)
        if unit in DEAD:
            assert np.all(tile == 128), f"dead unit {unit}'s tile is not plain gray"
        else:
            assert tile.std() > 10, f"live unit {unit}'s tile is flat"


# ---------------------------------------------------------------------- several images, inference mode
# Runs of one step of normalised ascent (pixel parameterization) at lr 1 and lr 2 start from the same image x0
# with the same gradient g: x_lr = x0 + lr * g / |g|, so x0 = 2 * x_1 - x_2 without touching fvis' internals.

UNITS = [0, 6, 15]


@pytest.fixture(scope="module")
def one_step(tiny):
    run = lambda d, lr: fvis.visualize(tiny, "relu2", UNITS, steps=1, images_per_unit=d,
                                       optimizer=optim.normalized_ascent(lr), progress=False)
    return {(d, lr): run(d, lr) for d in (1, 2) for lr in (1.0, 2.0)}


def test_each_image_of_a_unit_takes_its_own_normalised_step(one_step):
    """With D images per unit each image is normalised alone: every image moves by exactly lr in L2 norm."""
    a, b = one_step[2, 1.0], one_step[2, 2.0]
    assert np.all(a.grad_norms > 0)  # live units: a step of norm lr exists
    moves = np.sqrt(np.sum((b.images - a.images) ** 2, axis=(2, 3, 4)))  # (units, images): (2 - 1) * |g / |g||
    np.testing.assert_allclose(moves, 1.0, rtol=1e-4, err_msg="each image must move by lr (per-image norm)")


def test_the_first_image_of_a_unit_is_the_single_image_runs(one_step):
    """Image 0 of a unit has the same key, start and step with D = 2 as with D = 1 (no group term)."""
    for lr in (1.0, 2.0):
        np.testing.assert_allclose(one_step[2, lr].images[:, 0], one_step[1, lr].images[:, 0], atol=1e-6,
                                   err_msg="image 0 of a unit depends on the unit's other image")
        np.testing.assert_allclose(one_step[2, lr].final[:, 0], one_step[1, lr].final[:, 0], rtol=1e-5)
    assert np.abs(one_step[2, 1.0].images[:, 1] - one_step[2, 1.0].images[:, 0]).max() > 0.05  # image 1 differs


def keras_channel_means(model, layer, images, *, training):
    """(M, H, W, 3) images in [-1, 1] ("tf" space) -> (M, channels): the channel objective (border 2) computed
    by Keras itself, in inference or training mode. Stateless: a training-mode call would otherwise update
    the model's BatchNorm statistics (the session's shared model)."""
    sub = keras.Model(model.inputs, model.get_layer(layer).output)
    weights = ([v.value for v in sub.trainable_variables], [v.value for v in sub.non_trainable_variables])
    acts, _ = sub.stateless_call(*weights, np.asarray(images, np.float32), training=training)
    return np.asarray(acts)[:, 2:-2, 2:-2].mean(axis=(1, 2))


def test_job_values_are_keras_inference_values(tiny, one_step):
    """final and the step-0 curve value equal Keras' inference-mode value of the same images (relu2 follows
    BatchNorm with moving statistics and Dropout 0.5: training mode would give other values)."""
    a, b = one_step[2, 1.0], one_step[2, 2.0]
    rows = np.arange(len(UNITS))
    before = [np.array(v.value) for v in tiny.model.variables]
    for j in range(2):
        final = keras_channel_means(tiny.model, "relu2", a.images[:, j], training=False)[rows, UNITS]
        np.testing.assert_allclose(a.final[:, j], final, rtol=1e-4, atol=1e-6, err_msg="final != Keras inference")
        start = 2.0 * a.images[:, j] - b.images[:, j]
        at_start = keras_channel_means(tiny.model, "relu2", start, training=False)[rows, UNITS]
        np.testing.assert_allclose(a.curves[:, j, 0], at_start, rtol=1e-3, atol=1e-6,
                                   err_msg="the step-0 value != Keras inference")
        trained = keras_channel_means(tiny.model, "relu2", a.images[:, j], training=True)[rows, UNITS]
        assert np.abs(trained - final).max() > 0.2 * np.abs(final).max()  # training mode would show
    for old, var in zip(before, tiny.model.variables):
        np.testing.assert_array_equal(old, np.asarray(var.value))  # the check itself changed no weight


# ------------------------------------------------------------------------------------------------ input spaces


def keras_preprocess(name):
    """`keras.applications.<module>.preprocess_input` of the module that defines application `name` (found by
    the constructor's own module: keras.applications.mobilenet_v3 does not re-export MobileNetV3Large)."""
    module = getattr(keras.applications, name).__module__.rsplit(".", 1)[-1]  # e.g. "resnet_v2", "densenet"
    return getattr(keras.applications, module).preprocess_input


def fvis_space(name):
    """The input space `fvis.models.keras_application(name)` gives a model (its family's, else "tf")."""
    return models.keras_models._APPLICATION_SPACES.get(name, "tf")


def synthetic_photo(h=24, w=40):
    """A deterministic coloured uint8 image: different ramps and a pattern per channel, the full range."""
    y, x = np.mgrid[:h, :w]
    red = 255 * x / (w - 1)
    green = 255 * (1 - y / (h - 1))
    blue = 127.5 + 127.5 * np.sin(2 * np.pi * (x + 2 * y) / 9)
    return np.round(np.stack([red, green, blue], axis=-1)).astype(np.uint8)


def check_every_application_space(photo):
    fvis_image = photo.astype(np.float32) / 127.5 - 1.0  # the fvis image of a uint8 photo
    names = sorted(n for n in dir(keras.applications) if n[0].isupper())  # every application Keras has
    assert set(models.keras_models._APPLICATION_SPACES) <= set(names) and len(names) >= 40
    wrong = []
    for name in names:
        expected = np.asarray(keras_preprocess(name)(photo.astype(np.float32).copy()))  # it works in place
        seen = np.asarray(models.INPUT_SPACES[fvis_space(name)](fvis_image))  # what VisModel.to_model_input does
        if seen.shape != expected.shape or not np.allclose(seen, expected, rtol=1e-5, atol=2e-4):
            wrong.append(f"{name} ({fvis_space(name)}): max diff "
                         f"{np.abs(seen - expected).max() if seen.shape == expected.shape else seen.shape}")
    assert not wrong, "input space differs from Keras' preprocess_input for " + "; ".join(wrong)


def test_every_application_input_space_is_keras_preprocessing_on_a_coloured_image():
    """Each keras.applications family gets exactly what its own preprocess_input makes of the photo."""
    photo = synthetic_photo()
    assert len(np.unique(photo.reshape(-1, 3), axis=0)) > 100 and photo.min() == 0 and photo.max() == 255
    check_every_application_space(photo)


def test_every_application_input_space_is_keras_preprocessing_on_a_photo():
    """The same on a real photo (../shared/images/chelsea.png)."""
    photo = np.asarray(Image.open(shared_path("images", "chelsea.png")).convert("RGB"))
    check_every_application_space(photo)
