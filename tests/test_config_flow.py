"""Config values reach the computation: `fvis key=X` computes exactly what the library computes
with the explicit Python setting X (and not what the default gives); display, cache, quality and
loop keys change no image; a resumed job recomputes after a change; the presets hold the values
their documentation states."""

from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

import fvis
from fvis import cli, objectives as O, optim, params, regularizers as R, transforms as T
from tests.test_resume import attempts, composed

ROOT = Path(__file__).resolve().parents[1]
BASE = {"model": "tiny", "filters": "0:2", "steps": "3", "quality.enabled": "false"}
UNITS, STEPS = [0, 1], 3  # what BASE asks of the library: tiny's conv2, filters 0 and 1, 3 steps


def overrides(*extra):
    """BASE with `extra` ("key=value") on top; a key given again replaces BASE's (Hydra refuses repeats)."""
    merged = dict(BASE)
    merged.update(e.split("=", 1) for e in extra)
    return [f"{k}={v}" for k, v in merged.items()]


class Run(NamedTuple):
    folder: Path
    summary: dict
    record: dict
    arrays: dict  # images.npz


def read_npz(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def run_cli(folder, *extra):
    """`fvis BASE extra...` in-process, into `folder`."""
    summary, record = cli.run(composed(*overrides(*extra)), folder)
    npz = Path(folder) / "images.npz"  # a whole-model job has one per layer folder instead
    return Run(Path(folder), summary, record, read_npz(npz) if npz.exists() else {})


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`cli_run(*extra)`: the CLI job BASE + extra, run once per module in its own folder."""
    cache = {}

    def run(*extra):
        if extra not in cache:
            cache[extra] = run_cli(tmp_path_factory.mktemp("cli"), *extra)
        return cache[extra]
    return run


def library(model, objective="conv2", units=UNITS, **settings):
    """The library's own run with explicit settings (no config involved)."""
    return fvis.visualize(model, objective, units, progress=False, **{"steps": STEPS, **settings})


@pytest.fixture(scope="module")
def default(tiny):
    """The library's reference run: channel(conv2), pixels, no transform, normalized ascent at lr 10, seed 0."""
    return library(tiny)


def assert_same(run, result):
    """The CLI's images.npz holds exactly the library result's units, images, curves and final values."""
    for name in ("units", "images", "curves", "final"):
        np.testing.assert_array_equal(run.arrays[name], getattr(result, name), err_msg=name)


def images_of(outcome):
    return outcome.arrays["images"] if isinstance(outcome, Run) else outcome.images


def assert_differs(a, b):
    """Two runs' images differ: another shape, or values apart by more than float rounding."""
    a, b = images_of(a), images_of(b)
    assert a.shape != b.shape or np.max(np.abs(a - b)) > 1e-3, "the setting changed nothing"


# --- each key that shapes the images: CLI key=X == library with X, != the default ---

def test_defaults_equal_the_library_reference_settings(cli_run, default):
    """With no override, the CLI computes the library's reference job (normalized ascent lr 10, pixels, seed 0)."""
    assert_same(cli_run(), default)


def test_lr_reaches_the_reference_optimiser(cli_run, tiny, default):
    """lr=3 is the step length of normalized ascent."""
    run = cli_run("lr=3")
    assert_same(run, library(tiny, optimizer=optim.normalized_ascent(3.0)))
    assert_differs(run, default)


def test_seed_reaches_the_job(cli_run, tiny, default):
    """seed=5 gives the library's seed-5 starts."""
    run = cli_run("seed=5")
    assert_same(run, library(tiny, seed=5))
    assert_differs(run, default)


def test_steps_reach_the_loop(cli_run, tiny, default):
    """steps=5 runs 5 steps: 5 curve values per image, the library's 5-step images."""
    run = cli_run("steps=5")
    assert run.arrays["curves"].shape == (2, 1, 5)
    assert_same(run, library(tiny, steps=5))
    assert_differs(run, default)


def test_filters_choose_the_units_in_the_order_given(cli_run, tiny):
    """filters=[5,2] visualizes units 5 then 2."""
    run = cli_run("filters=[5,2]")
    assert run.arrays["units"].tolist() == [5, 2] and run.summary["units"] == [5, 2]
    assert_same(run, library(tiny, units=[5, 2]))


def test_image_size_reaches_the_model(cli_run, default):
    """image_size=[24,40] (non-square: height first) builds the model at 24x40."""
    run = cli_run("image_size=[24,40]")
    assert run.arrays["images"].shape == (2, 1, 24, 40, 3)
    assert_same(run, library(fvis.models.tiny_convnet(image_size=(24, 40))))


def test_images_per_unit_reaches_the_job(cli_run, tiny):
    """images_per_unit=2 gives the library's two images per unit."""
    run = cli_run("images_per_unit=2")
    assert run.arrays["images"].shape == (2, 2, 32, 32, 3)
    assert_same(run, library(tiny, images_per_unit=2))


def test_layer_reaches_the_objective(cli_run, tiny, default):
    """layer=conv3 maximises conv3's channels."""
    run = cli_run("layer=conv3")
    assert_same(run, library(tiny, O.channel("conv3")))
    assert_differs(run, default)


def test_objective_border_reaches_the_objective(cli_run, tiny, default):
    """objective.border=0 averages the whole map."""
    run = cli_run("objective.border=0")
    assert_same(run, library(tiny, O.channel("conv2", border=0)))
    assert_differs(run, default)


@pytest.mark.parametrize("extra, objective, settings", [
    (["objective=neuron"], lambda: O.neuron("conv2"), {}),
    (["objective=neuron", "objective.position=[3,5]"], lambda: O.neuron("conv2", position=(3, 5)), {}),
    (["objective=class_logit", "layer=logits"], lambda: O.class_logit("logits"), {}),
    (["objective=deepdream"], lambda: O.deepdream("conv2"), {}),
    (["objective=diversity", "images_per_unit=2"], lambda: O.channel("conv2") + 100 * O.diversity("conv2"),
     {"images_per_unit": 2}),
    (["objective=regularized"], lambda: O.channel("conv2") - 0.05 * R.total_variation(), {}),
], ids=["neuron", "neuron-position", "class_logit", "deepdream", "diversity", "regularized"])
def test_objective_configs_equal_the_objectives_built_in_python(cli_run, tiny, default, extra, objective, settings):
    """Each objective config computes the objective its header names, as written in Python."""
    run = cli_run(*extra)
    assert_same(run, library(tiny, objective(), **settings))
    if not settings:
        assert_differs(run, default)


@pytest.mark.parametrize("extra, param", [
    (["param=fourier"], lambda: params.fourier()),
    (["param=maco"], lambda: params.maco()),
    (["param.init_scale=0.5"], lambda: params.pixel(init_scale=0.5)),
    (["param=fourier", "param.decay_power=2.0"], lambda: params.fourier(decay_power=2.0)),
], ids=["fourier", "maco", "pixel-init_scale", "fourier-decay_power"])
def test_param_configs_and_their_arguments_reach_the_job(cli_run, tiny, default, extra, param):
    """param=... and param.<argument>=... give the library's run with that parameterization."""
    run = cli_run(*extra)
    assert_same(run, library(tiny, param=param()))
    assert_differs(run, default)


def test_fourier_argument_changes_the_fourier_images(cli_run):
    """param.decay_power is not ignored: it changes what param=fourier computes."""
    assert_differs(cli_run("param=fourier", "param.decay_power=2.0"), cli_run("param=fourier"))


@pytest.mark.parametrize("extra, transform", [
    (["transform=standard"], lambda: T.standard()),
    (["transform=maco"], lambda: T.compose([T.random_crop((0.7, 1.0), center_std=0.15), T.noise(0.08)])),
], ids=["standard", "maco"])
def test_transform_configs_reach_the_job(cli_run, tiny, default, extra, transform):
    """transform=standard / maco give the library's run with those transforms."""
    run = cli_run(*extra)
    assert_same(run, library(tiny, transform=transform()))
    assert_differs(run, default)


@pytest.mark.parametrize("name, optimizer", [("adam", optax.adam), ("nadam", optax.nadam)])
def test_optimizer_configs_take_lr(cli_run, tiny, name, optimizer):
    """optimizer=adam|nadam lr=0.2 is optax's optimiser at 0.2 (not the presets' 0.05, not the default 10)."""
    run = cli_run(f"optimizer={name}", "lr=0.2")
    assert_same(run, library(tiny, optimizer=optimizer(0.2)))
    assert_differs(run, library(tiny, optimizer=optimizer(0.05)))


def test_precision_bfloat16_reaches_the_model(cli_run, tiny, default):
    """precision=bfloat16 equals the library's bfloat16 run and differs from float32."""
    run = cli_run("precision=bfloat16")
    assert_same(run, library(tiny, precision="bfloat16"))
    assert_differs(run, default)


def test_model_arguments_reach_the_model(cli_run, default):
    """The tiny model's own arguments (width, weight seed, channels) build the model the library builds;
    each changes the images, so dropping any one of them fails the comparison."""
    run = cli_run("model.width=4", "model.seed=1", "model.channels=1")
    assert run.arrays["images"].shape == (2, 1, 32, 32, 1)
    assert_same(run, library(fvis.models.tiny_convnet(image_size=(32, 32), width=4, seed=1, channels=1)))


# --- keys that must not change the images ---

def test_display_cache_and_quality_keys_change_no_image(cli_run, default):
    """display.*, compilation_cache and quality.* leave images, curves and final values as they are."""
    for extra in (["display.mode=clip", "display.crop=4", "display.margin=1"], ["compilation_cache=false"],
                  ["quality.enabled=true", "quality.draws=2"]):
        assert_same(cli_run(*extra), default)
    assert "quality" in cli_run("quality.enabled=true", "quality.draws=2").summary  # the key was applied


def test_loop_form_changes_images_only_to_float_rounding(cli_run, tiny):
    """loop=scan and loop=host each equal the library's run in that form, and agree to float rounding."""
    scan, host = cli_run("loop=scan"), cli_run("loop=host")
    assert scan.summary["loop"] == "scan" and host.summary["loop"] == "host"
    assert_same(scan, library(tiny, loop="scan"))
    assert_same(host, library(tiny, loop="host"))
    for name in ("images", "curves", "final"):
        np.testing.assert_allclose(scan.arrays[name], host.arrays[name], rtol=1e-5, atol=1e-6)


# --- resuming after a change ---

def test_resumed_job_recomputes_after_a_seed_or_steps_change_and_reuses_all_when_unchanged(tmp_path, tiny, default):
    """An unchanged rerun reuses every chunk; seed=1, then steps=2, recompute every chunk to a fresh run's images."""
    run_cli(tmp_path)
    run = run_cli(tmp_path)
    assert attempts(tmp_path)[-1]["chunks"] == {"total": 2, "reused": 2, "computed": 0, "recomputed_bad": []}
    assert_same(run, default)
    for extra, settings in ((["seed=1"], {"seed": 1}), (["seed=1", "steps=2"], {"seed": 1, "steps": 2})):
        run = run_cli(tmp_path, *extra)
        last = attempts(tmp_path)[-1]
        assert last["status"] == "done" and last["chunks"]["reused"] == 0 and last["chunks"]["computed"] == 2
        assert_same(run, library(tiny, **settings))


# --- the presets hold the values their documentation states ---

DOCUMENTED = {  # file -> phrases that state the values the tests below check
    "README.md": ["experiment=lucid   # Fourier (1/f**1.25) + decorrelated colour, transforms, Adam 0.05, 256 steps",
                  "experiment=maco    # MaCo: fixed 1/f magnitude, optimise the phase; 256 steps",
                  "`standard` (Lucid's pad 12, jitter 8, scale 0.9-1.1, rotate ±10°, jitter 4)",
                  "`seed` (the reference, same as `null`)"],
    "conf/experiment/lucid.yaml": ["Fourier parameterization with 1/f**1.25 scaling and decorrelated colour",
                                   "the standard\n# transforms, Adam at lr 0.05, 256 steps"],
    "conf/experiment/maco.yaml": ["NAdam, 256 steps, random crops, Gaussian + uniform noise of 0.08",
                                  "crops of\n# 70-100 % of the image", "lr 0.05 instead of 1.0"],
    "conf/experiment/seed.yaml": ["pixels, no transforms, L2-normalised\n# gradient ascent, lr 10, 30 steps"],
    "conf/transform/standard.yaml": ["pad 12, jitter 8,\n# scale 0.9-1.1, rotate +-10 degrees, jitter 4"],
    "conf/transform/maco.yaml": ["Gaussian + uniform noise of 0.08"],
}


def test_preset_documentation_states_the_values_tested_here():
    """The README and the presets' headers still say what the preset tests below pin down."""
    for name, phrases in DOCUMENTED.items():
        text = (ROOT / name).read_text()
        for phrase in phrases:
            assert phrase in text, (name, phrase)


def preset(name):
    return composed("model=tiny", f"experiment={name}")


def updates(optimizer, grads, params_):
    """The updates an optax optimiser makes for a fixed sequence of gradients."""
    state, out = optimizer.init(params_), []
    for g in grads:
        u, state = optimizer.update(g, state, params_)
        out.append(np.asarray(u))
    return out


GRADS = [jax.random.normal(jax.random.key(i), (4, 5, 3)) for i in range(4)]
PARAMS = jnp.zeros((4, 5, 3))
# Lucid's square root of ImageNet's colour covariance, columns scaled to a longest norm of 1.
COLOR = np.array([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
COLOR = COLOR / np.linalg.norm(COLOR, axis=0).max()


def inverse_frequency(h, w, power=1.0):
    """1 / f**power per FFT bin, f in cycles per pixel, capped at the image's lowest frequency (the 1/f law)."""
    f = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.fftfreq(w)[None, :] ** 2)
    return 1.0 / np.maximum(f, 1.0 / max(h, w)) ** power


def assert_same_draws(transform, documented, image, draws=4):
    """`transform` and `documented` give the same images for the same keys."""
    keys = jax.random.split(jax.random.key(0), draws)
    apply = lambda fn: np.stack([np.asarray(fn(key, image)) for key in keys])  # eager: cheaper than compiling
    got = apply(transform)
    assert len({g.tobytes() for g in got}) == draws  # the draws differ, so the ranges are exercised
    np.testing.assert_array_equal(got, apply(documented))


def fourier_image(p, decorrelate, power=1.0):
    """Fourier (1/f**power) + decorrelated colour restated in numpy: (2, H, W, 3) spectrum -> image in [-1, 1]."""
    spectrum = (p[0] + 1j * p[1]) * inverse_frequency(*p.shape[1:3], power)[..., None]
    x = np.real(np.fft.ifft2(spectrum, axes=(0, 1), norm="ortho")) / 4.0
    x = x @ COLOR.T if decorrelate else x
    return 2.0 / (1.0 + np.exp(-x)) - 1.0


def test_lucid_preset_is_fourier_1_25_decorrelated_standard_transforms_adam_005_256_steps():
    """lucid: Fourier (1/f**1.25) + decorrelated colour, the standard transforms, Adam 0.05, 256 steps, clip."""
    cfg = preset("lucid")
    assert cfg.steps == 256 and cfg.display.mode == "clip" and cfg.redirect_relu is True
    param, key = instantiate(cfg.param), jax.random.key(3)
    start = np.asarray(param.init(key, (16, 12, 3)))
    np.testing.assert_array_equal(start, 0.01 * np.asarray(jax.random.normal(key, (2, 16, 12, 3))))
    p = np.asarray(jax.random.normal(jax.random.key(4), (2, 16, 12, 3)))
    np.testing.assert_allclose(param.to_image(p), fourier_image(p, decorrelate=True, power=1.25), atol=1e-5)
    assert np.max(np.abs(fourier_image(p, True) - fourier_image(p, False))) > 1e-2  # colour matters here
    for got, want in zip(updates(instantiate(cfg.optimizer), GRADS, PARAMS), updates(optax.adam(0.05), GRADS, PARAMS)):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    image = jax.random.uniform(jax.random.key(5), (28, 28, 3), jnp.float32, -1, 1)
    documented = T.compose([T.pad(12), T.jitter(8), T.random_affine(scales=(0.9, 1.1), degrees=10.0), T.jitter(4)])
    assert_same_draws(instantiate(cfg.transform), documented, image)


def test_maco_preset_is_phase_only_1_over_f_crops_noise_nadam_005_256_steps():
    """maco: a fixed 1/f magnitude with only the phase free, crops 70-100 %, noise 0.08, NAdam 0.05, 256 steps."""
    cfg = preset("maco")
    assert cfg.steps == 256 and cfg.display.mode == "clip" and cfg.redirect_relu is True
    for got, want in zip(updates(instantiate(cfg.optimizer), GRADS, PARAMS), updates(optax.nadam(0.05), GRADS, PARAMS)):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    crop, noise = OmegaConf.to_container(cfg.transform.transforms)
    assert crop["_target_"] == "fvis.transforms.random_crop" and crop["size"] == [0.7, 1.0]
    assert noise["_target_"] == "fvis.transforms.noise" and noise["std"] == 0.08
    image = jax.random.uniform(jax.random.key(5), (24, 24, 3), jnp.float32, -1, 1)
    documented = T.compose([T.random_crop((0.7, 1.0), center_std=0.15), T.noise(0.08)])
    assert_same_draws(instantiate(cfg.transform), documented, image)
    param, (h, w) = instantiate(cfg.param), (32, 24)
    ratios = []
    for i in range(2):  # two random phases: the same magnitude, 1/f with no mean colour
        phase = param.init(jax.random.key(i), (h, w, 3))
        assert float(jnp.min(phase)) >= -np.pi and float(jnp.max(phase)) <= np.pi and float(jnp.std(phase)) > 1.5
        y = np.asarray(param.to_image(phase), np.float64)
        z = np.log((1 + y) / (1 - y)) @ np.linalg.inv(COLOR.T)  # undo the sigmoid, then the colour mixing
        magnitude = np.abs(np.fft.fft2(z, axes=(0, 1)))
        assert np.all(magnitude[0, 0] < 1e-3 * magnitude.max())
        ratio = (magnitude / inverse_frequency(h, w)[..., None]).reshape(h * w, 3)[1:]  # all bins but DC
        np.testing.assert_allclose(ratio, np.median(ratio), rtol=2e-3)
        ratios.append(np.median(ratio))
    assert ratios[0] == pytest.approx(ratios[1], rel=1e-3)


def test_seed_preset_is_the_reference_pixels_no_transform_normalized_ascent_lr10_30_steps():
    """seed: pixels from near-gray noise, no transform, image += 10 g/||g||, 30 steps, the same as no preset."""
    cfg = preset("seed")
    assert cfg.steps == 30 and cfg.redirect_relu is False
    param, key = instantiate(cfg.param), jax.random.key(7)
    start = np.asarray(param.init(key, (8, 8, 3)))
    np.testing.assert_array_equal(start, (np.asarray(jax.random.uniform(key, (8, 8, 3))) - 0.5) * 0.25)
    np.testing.assert_array_equal(param.to_image(start), start)
    np.testing.assert_array_equal(instantiate(cfg.transform)(key, start), start)
    for g, u in zip(GRADS, updates(instantiate(cfg.optimizer), GRADS, PARAMS)):
        np.testing.assert_allclose(u, -10.0 * np.asarray(g) / np.linalg.norm(g), rtol=1e-5)
    reference = composed("experiment=seed")  # with the reference model, whose config sets no display crop
    assert OmegaConf.to_container(reference, resolve=True) == OmegaConf.to_container(composed(), resolve=True)
