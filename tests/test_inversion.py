"""Beyond one image per channel: starting images, feature inversion, caricature, MaCo's
transparency map and snapshots, checked by value on the tiny convnet (32x32)."""


import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest
from PIL import Image

import fvis
from fvis import models, objectives as O, params, transforms as T
from fvis.errors import MissingFileError
from tests.test_config_flow import assert_same, library, run_cli

SIZE = (32, 32)


def synthetic_photo(size=SIZE):
    """A smooth colour pattern with an edge, (H, W, 3) float32 in [-1, 1] (8-bit values, as a PNG holds)."""
    y, x = np.mgrid[: size[0], : size[1]] / np.array(size, np.float64)[:, None, None]
    rgb = np.stack([np.sin(6 * x + 2 * y), np.cos(5 * y), np.where(x + y > 1, 0.6, -0.6)], axis=-1)
    return (np.round((rgb * 0.9 + 1) * 127.5) / 127.5 - 1).astype(np.float32)


@pytest.fixture(scope="module")
def photo_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.fromarray(np.round((synthetic_photo() + 1) * 127.5).astype(np.uint8)).save(path)
    return path


def keras_acts(vis_model, layer, image):
    """`layer`'s activation of one fvis image, by Keras itself (the tiny model's input space is the identity)."""
    sub = keras.Model(vis_model.model.inputs, vis_model.model.get_layer(layer).output)
    return np.asarray(sub(np.asarray(image, np.float32)[None], training=False)[0], np.float64)


# --- starting image ---

def test_pixel_and_fourier_starts_reproduce_the_photo():
    """start_from: pixels are the photo exactly; Fourier within float rounding (pixels at +-1 come 1/255 inside)."""
    photo = synthetic_photo()
    photo[0, 0] = [1.0, -1.0, 0.5]  # saturated pixels: Fourier's sigmoid reaches neither end
    inside = np.clip(photo, -254 / 255, 254 / 255)
    for param, expected, tol in [(params.pixel(), photo, 0.0), (params.fourier(), inside, 2e-6),
                                 (params.fourier(decay_power=2.0, decorrelate=False), inside, 2e-6)]:
        start = params.start_from(param, photo)
        image = np.asarray(start.to_image(start.init(jax.random.key(3), photo.shape)))
        np.testing.assert_allclose(image, expected, atol=tol, rtol=0)


def test_maco_start_is_the_photos_phase_on_macos_magnitude():
    """MaCo's start keeps the photo's Fourier phase (decorrelated, before the sigmoid) on the 1/f magnitude:
    a numpy statement of that image, and it correlates with the photo far more than a random MaCo start."""
    photo = synthetic_photo()
    start = params.start_from(params.maco(), photo)
    image = np.asarray(start.to_image(start.init(jax.random.key(0), photo.shape)), np.float64)

    color = np.array([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
    color /= np.max(np.linalg.norm(color, axis=0))
    z = np.clip(photo.astype(np.float64), -254 / 255, 254 / 255)
    z = np.log((1 + z) / (1 - z)) @ np.linalg.inv(color.T)
    fy, fx = np.fft.fftfreq(SIZE[0])[:, None], np.fft.fftfreq(SIZE[1])[None, :]
    magnitude = 1.0 / np.maximum(np.sqrt(fy ** 2 + fx ** 2), 1.0 / max(SIZE))
    magnitude[0, 0] = 0.0
    phase = np.angle(np.fft.fft2(z, axes=(0, 1)))
    mirrored = np.roll(np.flip(phase, (0, 1)), (1, 1), axis=(0, 1))
    rec = np.real(np.fft.ifft2(magnitude[..., None] * np.exp(1j * (phase - mirrored) / 2), axes=(0, 1)))
    rec = (rec - rec.mean()) / rec.std()
    expected = 2.0 / (1.0 + np.exp(-(rec @ color.T))) - 1.0
    np.testing.assert_allclose(image, expected, atol=1e-4)

    random = params.maco()
    noise = np.asarray(random.to_image(random.init(jax.random.key(0), photo.shape)))
    corr = lambda a: np.corrcoef(a.ravel(), photo.ravel())[0, 1]
    assert corr(image) > 0.4 and abs(corr(noise)) < 0.1, (corr(image), corr(noise))


def test_a_missing_start_image_is_named_before_the_model_loads(tmp_path, monkeypatch):
    """image=/missing.png stops the CLI with a MissingFileError naming the path, before the model is built
    (building it fails the test) and leaving no run folder (a refused run)."""
    def built(**kwargs):
        raise AssertionError("the model was built before the photo was checked")

    monkeypatch.setattr(models, "tiny_convnet", built)
    missing = tmp_path / "no_such_photo.png"
    with pytest.raises(MissingFileError, match="no_such_photo.png"):
        run_cli(tmp_path / "run", f"image={missing}")
    assert not (tmp_path / "run").exists()
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(MissingFileError, match="bad.png"):
        params.start_from(params.fourier(), tmp_path / "bad.png")


# --- feature inversion ---

def test_inversion_started_from_the_photo_is_a_fixed_point(tiny):
    """L2 inversion, no transforms, started from the photo: objective 0, gradient ~0 (vs. from noise), image unmoved."""
    photo = synthetic_photo()
    objective = O.inversion("conv2", photo)
    run = lambda param: fvis.visualize(tiny, objective, [0], param=param, optimizer=optax.sgd(1.0), steps=2,
                                       progress=False)
    at_photo, from_noise = run(params.start_from(params.pixel(), photo)), run(params.pixel())
    assert abs(at_photo.curves[0, 0, 0]) < 1e-6 and from_noise.curves[0, 0, 0] < -0.1
    assert at_photo.grad_norms[0, 0, 0] < 1e-5 * from_noise.grad_norms[0, 0, 0]
    np.testing.assert_allclose(at_photo.images[0, 0], photo, atol=1e-6)


def test_inversion_from_noise_reduces_the_activation_distance_tenfold(tiny):
    """From noise, 60 Adam steps cut ||a - a0||^2 / ||a0||^2 (measured by Keras) at least tenfold."""
    photo = synthetic_photo()
    result = fvis.visualize(tiny, O.inversion("conv2", photo), [0], optimizer=optax.adam(0.05), steps=60,
                            snapshots=[0], progress=False)
    target = keras_acts(tiny, "conv2", photo)
    distance = lambda image: np.sum((keras_acts(tiny, "conv2", image) - target) ** 2) / np.sum(target ** 2)
    before, after = distance(result.snapshots[0, 0, 0]), distance(result.images[0, 0])
    assert before / after >= 10, (before, after)
    np.testing.assert_allclose(result.final[0, 0], -after, rtol=1e-3)


# --- caricature ---

def test_caricature_amplifies_the_photos_activations(tiny):
    """Caricature from the photo: the value is dot(a, a0) * max(cos, 0.1)**p (numpy, Keras activations), starts at
    ||a0||^2, and the dot product with the photo's activations grows by at least 20 %."""
    photo = synthetic_photo()
    result = fvis.visualize(tiny, O.caricature("conv2", photo, cossim_pow=2.0), [0],
                            param=params.start_from(params.pixel(), photo), optimizer=optax.adam(0.02), steps=10,
                            progress=False)
    a0, a = keras_acts(tiny, "conv2", photo), keras_acts(tiny, "conv2", result.images[0, 0])
    dot, cos = np.sum(a * a0), np.sum(a * a0) / np.linalg.norm(a) / np.linalg.norm(a0)
    assert cos < 0.999  # the power matters at the final image
    np.testing.assert_allclose(result.curves[0, 0, 0], np.sum(a0 * a0), rtol=1e-3)
    np.testing.assert_allclose(result.final[0, 0], dot * max(cos, 0.1) ** 2, rtol=1e-3)
    assert dot > 1.2 * np.sum(a0 * a0), (dot, np.sum(a0 * a0))


# --- MaCo's transparency map ---

def corner_model():
    """A unit that sees only the top-left 8x8 pixels: crop, then a 3x3 conv ('unit')."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((*SIZE, 3))
    x = keras.layers.Cropping2D(((0, SIZE[0] - 8), (0, SIZE[1] - 8)))(inputs)
    x = keras.layers.Conv2D(4, 3, name="unit")(x)
    return fvis.models.wrap(keras.Model(inputs, x), input_space="tf")


def test_transparency_is_the_normalised_gradient_magnitude_where_the_unit_looks():
    """One step, pixels, no transform: transparency = channel-mean |d objective / d image| / its max (jax.grad of
    the Keras model), zero outside the corner the unit sees."""
    model = corner_model()
    result = fvis.visualize(model, O.channel("unit", border=0), [2], steps=1, snapshots=[0], progress=False)
    start = jnp.asarray(result.snapshots[0, 0, 0])
    grad = jax.grad(lambda x: jnp.mean(model.model(x[None], training=False)[0, ..., 2]))(start)
    expected = np.mean(np.abs(np.asarray(grad)), axis=-1)
    alpha = result.transparency[0, 0]
    assert alpha.shape == SIZE
    np.testing.assert_allclose(alpha, expected / expected.max(), atol=1e-5)
    assert np.all(alpha[8:] == 0) and np.all(alpha[:, 8:] == 0)


def test_maco_transparency_is_high_where_the_planted_pattern_drives_the_unit():
    """MaCo preset components (phase, random crops + noise, NAdam): the map is in [0, 1], peaks at 1, and is
    several times higher in the top-left quadrant than in the other three."""
    result = fvis.visualize(corner_model(), O.channel("unit", border=0), [0, 1], param=params.maco(),
                            transform=T.compose([T.random_crop((0.7, 1.0)), T.noise(0.08)]),
                            optimizer=optax.nadam(0.05), steps=8, progress=False)
    alpha = result.transparency
    assert alpha.shape == (2, 1, *SIZE) and alpha.min() >= 0 and np.allclose(alpha.max(axis=(2, 3)), 1)
    corner, rest = alpha[..., :16, :16].mean(axis=(2, 3)), np.concatenate(
        [alpha[..., 16:, :].reshape(2, 1, -1), alpha[..., :16, 16:].reshape(2, 1, -1)], axis=-1).mean(-1)
    assert np.all(corner > 5 * rest), (corner, rest)


# --- snapshots ---

@pytest.mark.parametrize("loop", ["scan", "host"])
def test_snapshots_hold_the_images_at_exactly_the_requested_steps(tiny, loop):
    """snapshots=[0, 2, 5]: the start (the photo), the 2-step image (a separate 2-step run), and the final image."""
    photo = synthetic_photo()
    run = lambda steps, **kw: fvis.visualize(tiny, "conv2", [0, 3], param=params.start_from(params.pixel(), photo),
                                             steps=steps, loop=loop, progress=False, **kw)
    result = run(5, snapshots=[5, 0, 2])
    assert result.snapshots.shape == (2, 1, 3, *SIZE, 3) and result.snapshot_steps.tolist() == [0, 2, 5]
    np.testing.assert_array_equal(result.snapshots[:, :, 0], np.broadcast_to(photo, (2, 1, *SIZE, 3)))
    np.testing.assert_allclose(result.snapshots[:, :, 1], run(2).images, atol=1e-6)
    np.testing.assert_array_equal(result.snapshots[:, :, 2], result.images)


def test_bad_snapshot_steps_are_refused():
    """Snapshot steps past `steps` (or not integers) stop the job before it compiles."""
    for bad in ([0, 31], [1.5], "0:30"):
        with pytest.raises(fvis.errors.InvalidValueError, match="snapshots"):
            fvis.Settings(steps=30, snapshots=bad)


# --- the command line and the files ---

def test_maco_preset_writes_transparency_tiles_snapshots_and_shows_them(tmp_path):
    """experiment=maco with snapshots: RGBA tiles whose alpha is the map (images.npz) and whose colour is the tile,
    a strip with one column per snapshot, a GIF with one frame per snapshot, all named in report.html."""
    run = run_cli(tmp_path, "experiment=maco", "layer=conv3", "steps=4", "snapshots=[0,2,4]", "display.crop=2",
                  "quality.enabled=true")
    alpha = run.arrays["transparency"]
    for i, record in enumerate(run.summary["filters"]):
        rgba = np.asarray(Image.open(tmp_path / record["alpha_png"]))
        assert rgba.shape == (28, 28, 4)
        np.testing.assert_array_equal(rgba[..., 3], np.round(alpha[i, 0, 2:-2, 2:-2] * 255).astype(np.uint8))
        np.testing.assert_array_equal(rgba[..., :3], np.asarray(Image.open(tmp_path / record["png"])))
    strip = np.asarray(Image.open(tmp_path / "snapshots.png"))
    assert strip.shape == (2 * 28 + 5, 3 * 28 + 2 * 5, 3)
    np.testing.assert_array_equal(strip[:28, -28:], np.asarray(Image.open(tmp_path / "filters/filter_0000.png")))
    gif = Image.open(tmp_path / "snapshots.gif")
    assert gif.n_frames == 3 and gif.size == (2 * 28 + 5, 28)
    np.testing.assert_array_equal(run.arrays["snapshot_steps"], [0, 2, 4])
    page = (tmp_path / "report.html").read_text()
    assert all(name in page for name in ("filters/filter_0001_alpha.png", "snapshots.png", "snapshots.gif"))


def test_show_snapshots_gives_the_gif_a_notebook_shows(tiny):
    """show_snapshots returns an IPython image holding a GIF with one frame per snapshot."""
    pytest.importorskip("IPython")
    result = fvis.visualize(tiny, "conv2", [0], steps=2, snapshots=[0, 1, 2], progress=False)
    shown = fvis.outputs.show_snapshots(result, crop=0)
    assert Image.open(__import__("io").BytesIO(shown.data)).n_frames == 3


@pytest.mark.parametrize("extra, objective, settings", [
    (["experiment=inversion", "layer=conv2", "filters=[0]"], lambda p: O.inversion("conv2", p),
     dict(param=params.fourier(), optimizer=optax.adam(0.05), steps=256 // 64)),
    (["experiment=caricature", "layer=conv2", "filters=[0]"], lambda p: O.caricature("conv2", p),
     dict(param="start", transform=T.standard(), optimizer=optax.adam(0.05), steps=4)),
    (["objective=direction", "objective.vectors=[[0,1,0,0,0,0,0,0,0,0,0,0,0,0,0,0],"
      "[1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,-1]]"], lambda p: O.direction("conv2", np.eye(16)[[1]].tolist()
                                                                    + [[1] + [0] * 14 + [-1]]), {}),
    (["objective=combined", "objective.terms.1.layer=conv3"], lambda p: O.channel("conv2") + O.channel("conv3"), {}),
    (["objective=neuron", "objective.position=[0,9]"], lambda p: O.neuron("conv2", position=(0, 9)), {}),
])
def test_objective_configs_equal_the_objectives_built_in_python(tiny, tmp_path, photo_file, extra, objective,
                                                                settings):
    """Each new objective config and preset computes what its header names, as written in Python."""
    settings = dict(settings)
    if settings.get("param") == "start":
        settings["param"] = params.start_from(params.fourier(), photo_file)
    steps = settings.pop("steps", 3)
    photo = [f"image={photo_file}"] if extra[0].startswith("experiment") else []  # a photo is also the start
    run = run_cli(tmp_path, *extra, *photo, f"steps={steps}")
    units = run.arrays["units"].tolist()
    assert_same(run, library(tiny, objective(photo_file), units=units, steps=steps, **settings))
