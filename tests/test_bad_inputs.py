"""Odd models and bad input: a clear answer, never a silently wrong picture."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest
from hydra import compose, initialize_config_module

import fvis
from fvis import cli, images, models, numerics, objectives, optim, outputs, params, regularizers, transforms
from fvis.errors import InvalidValueError, NonFiniteError
from fvis.models import keras_init


def test_dead_unit_gets_a_gray_tile_in_its_own_cell_and_a_flag(tmp_path):
    result = fvis.visualize(_dead_channel_5_model(), "relu2", "0:9", steps=4, progress=False)
    dead = result.dead[:, 0]
    assert dead[5] and not dead.all()
    assert np.isfinite(result.images).all() and np.isfinite(result.final).all()
    summary = outputs.write_run(tmp_path, result, config={}, meta={}, crop=2)
    assert [f["dead"] for f in summary["filters"]] == dead.tolist()
    grid = images.load_png(tmp_path / "grid.png")
    for u in range(9):  # 3 x 3 cells of 28 px, 5 px margins: each cell holds its own unit's tile
        tile = images.load_png(tmp_path / f"filters/filter_{u:04d}.png")
        np.testing.assert_array_equal(grid[(u // 3) * 33: (u // 3) * 33 + 28, (u % 3) * 33: (u % 3) * 33 + 28], tile)
        assert (tile == 128).all() if dead[u] else np.unique(tile).size > 10


def test_gradient_normalisation_is_finite_at_zero():
    update, _ = optim.normalized_ascent(10.0).update(jnp.zeros((4, 4, 3)), optim.normalized_ascent(10.0).init(None))
    assert np.array_equal(np.asarray(update), np.zeros((4, 4, 3)))
    assert np.isfinite(images.deprocess(np.zeros((8, 8, 3)), crop=0)).all()


def test_every_traced_norm_and_std_has_a_finite_gradient_at_zero():
    zeros = jnp.zeros((3, 4, 4, 2))
    for fn in (lambda x: numerics.safe_norm(x), lambda x: numerics.safe_std(x),
               lambda x: jnp.sum(numerics.safe_norm(x, axis=(1, 2, 3))),
               lambda x: jnp.sum(params._standardize(x)),  # MaCo's image standardisation
               lambda x: objectives.diversity("l").group_fn({"l": x}, 0),  # Gram cosine similarity
               lambda x: regularizers.l2()({objectives.INPUT: x[0]}, 0)):
        value, grad = jax.value_and_grad(fn)(zeros)
        assert np.isfinite(value) and np.isfinite(grad).all() and not np.asarray(grad).any()


def _dead_channel_5_model():
    vis_model = models.tiny_convnet(image_size=(32, 32), seed=3)
    conv2 = vis_model.model.get_layer("conv2")
    kernel, bias = conv2.get_weights()
    kernel[..., 5], bias[5] = 0.0, -1.0  # relu2 channel 5 is 0 everywhere, its gradient too
    conv2.set_weights([kernel, bias])
    return vis_model


@pytest.mark.parametrize("preset", ["lucid", "maco"])
def test_dead_unit_stays_finite_and_flagged_with_every_parameterization_and_transform(preset):
    param = params.fourier() if preset == "lucid" else params.maco()
    transform = transforms.standard() if preset == "lucid" else transforms.compose(
        [transforms.random_crop((0.7, 1.0)), transforms.noise(0.08)])
    settings = dict(param=param, transform=transform, optimizer=optax.adam(0.05), steps=3, progress=False)
    model = _dead_channel_5_model()
    alone = fvis.visualize(model, objectives.channel("relu2"), [4, 5], **settings)
    assert np.isfinite(alone.images).all() and np.isfinite(alone.final).all()
    assert alone.dead.tolist() == [[False], [True]]
    # diversity compares Gram matrices of the whole layer: finite, and no longer dead
    diverse = fvis.visualize(model, objectives.channel("relu2") + 10.0 * objectives.diversity("relu2"), [4, 5],
                             images_per_unit=2, **settings)
    assert np.isfinite(diverse.images).all() and np.isfinite(diverse.final).all()


def test_non_finite_chunk_names_layer_filter_and_step_and_keeps_finished_chunks(tiny, tmp_path):
    channel = objectives.channel("conv2")
    poisoned = objectives.Objective(lambda acts, unit: channel(acts, unit) * jnp.where(unit >= 4, jnp.nan, 1.0),
                                    layers=["conv2"], checks=channel.checks, name="channel(conv2)")
    store = outputs.ChunkStore(tmp_path, "f")
    with pytest.raises(NonFiniteError, match=r"Non-finite objective and gradient \(its norm\) at step 0 of 3, "
                                             r"for channel\(conv2\), filter 4\."):
        fvis.visualize(tiny, poisoned, "0:8", steps=3, batch_size=2, store=store, progress=False)
    assert sorted(p.name for p in (tmp_path / "chunks").iterdir()) == ["chunk_00000.npz", "chunk_00001.npz"]
    assert store.load(1, np.array([2, 3], np.int32)) is not None


def test_non_finite_gradient_with_a_finite_objective_names_the_gradient(tiny):
    """A NaN in the gradient alone (sqrt'(0) * 0) is named as the gradient, at the step it appeared."""
    channel = objectives.channel("conv2")
    nan_gradient = objectives.Objective(
        lambda acts, unit: channel(acts, unit) + 0.0 * jnp.sqrt(jnp.sum(acts["conv2"] * 0.0)),
        layers=["conv2"], checks=channel.checks, name="channel(conv2)")
    with pytest.raises(NonFiniteError, match=r"Non-finite gradient \(its norm\) at step 0 of 3, for "
                                             r"channel\(conv2\), filter 0\."):
        fvis.visualize(tiny, nan_gradient, "0:2", steps=3, progress=False)


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fvis", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_grayscale_non_square_model_keeps_channels_and_axis_order(tmp_path):
    out = tmp_path / "gray"
    proc = run_cli("model=tiny", "model.channels=1", "image_size=[40,24]", "filters=0:5", "steps=3",
                   f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    from PIL import Image
    tile = Image.open(out / "filters/filter_0000.png")
    assert tile.mode == "L" and tile.size == (24 - 4, 40 - 4)  # PIL sizes are (width, height)
    grid = Image.open(out / "grid.png")
    assert grid.mode == "L" and grid.size == (3 * 20 + 2 * 5, 2 * 36 + 5)
    with np.load(out / "images.npz") as data:
        assert data["images"].shape == (5, 1, 40, 24, 1)


def test_sequential_without_input_asks_for_image_size():
    seq = keras.Sequential([keras.layers.Conv2D(4, 3, name="c")])
    with pytest.raises(InvalidValueError, match=r"pass image_size=\(H, W\)"):
        models.wrap(seq)


def test_model_without_spatial_size_uses_the_configured_size():
    with keras_init.host_initial_values():  # random weights drawn on the host: no initializer is compiled
        backbone = keras.applications.MobileNet(alpha=0.25, include_top=False, weights=None)
    assert backbone.inputs[0].shape[1] is None
    with pytest.raises(InvalidValueError, match="does not fix its input size"):
        models.wrap(backbone)
    vis_model = models.wrap(backbone, image_size=(64, 48))
    result = fvis.visualize(vis_model, "conv_pw_3_relu", [0, 1], steps=1, progress=False)
    assert result.images.shape == (2, 1, 64, 48, 3)


@pytest.mark.parametrize("layer", ["logits", "gap"])
def test_neuron_objective_works_on_vector_layers(tiny, layer):
    result = fvis.visualize(tiny, objectives.neuron(layer), [0, 3], steps=3, progress=False)
    assert np.isfinite(result.images).all() and result.final.shape == (2, 1)


def test_flatten_output_takes_a_neuron_objective():
    x = keras.Input((8, 8, 1))  # fvis takes 1 or 3 channels
    y = keras.layers.Conv2D(3, 3, name="c")(x)
    y = keras.layers.Flatten(name="flat")(y)
    vis_model = models.wrap(keras.Model(x, y))
    result = fvis.visualize(vis_model, objectives.neuron("flat"), "all", steps=2, progress=False)
    assert result.units.tolist() == list(range(6 * 6 * 3))


def test_filters_all_gives_exactly_every_channel(tiny):
    assert fvis.prepare(tiny, "conv3", "all").units.tolist() == list(range(32))


def test_preprocessing_inside_the_model_receives_its_own_range():
    x = keras.Input((16, 16, 3))
    y = keras.layers.Rescaling(1 / 127.5, offset=-1, name="scale")(x)  # expects [0, 255]
    y = keras.layers.Conv2D(2, 3, name="conv")(y)
    vis_model = models.wrap(keras.Model(x, y), input_space="raw255")
    extractor = fvis.prepare(vis_model, "conv", [0]).forward
    scaled = keras.Model(x, vis_model.model.get_layer("scale").output)
    sides = np.stack([np.full((16, 16, 3), -1.0), np.full((16, 16, 3), 1.0)]).astype("float32")
    np.testing.assert_allclose(np.asarray(scaled(vis_model.to_model_input(sides)))[:, 0, 0], [[-1] * 3, [1] * 3],
                               atol=1e-6)
    assert extractor.shapes()["conv"] == (14, 14, 2)


def test_traces_do_not_grow_with_filters_chunks_or_steps(step_traces):
    vis_model = models.tiny_convnet(image_size=(16, 16), width=64)  # conv3: 256 channels
    traces = []
    for units, steps in (("0:16", 2), ("all", 2), ("0:16", 40)):
        before = len(step_traces)
        fvis.visualize(vis_model, "conv3", units, steps=steps, batch_size=16, progress=False)
        traces.append(len(step_traces) - before)
    assert traces == [1, 1, 1]  # 16 filters, 256 filters in 16 chunks, 40 steps: one trace each


@pytest.mark.parametrize("args, message", [
    (["steps=-1"], "steps must be an integer >= 1. Received: steps=-1"),
    (["lr=0"], "must be a finite number > 0 (at most 3.4e38, float32's largest). Received: lr=0"),
    (["lr='0.05'"], "Received: lr='0.05'"),  # a string, even of a number, failed only when compiled
    (["lr=true"], "Received: lr=True"),  # ran as lr 1
    (["optimizer=adam", "optimizer.learning_rate=abc"], "Received: optimizer.learning_rate='abc'"),
    (["model=resnet50v2", "model.weights=null", "image_size=[16,16]"], "Input size must be at least 32x32"),
    (["model=resnet50v2", "model.name=ResNet51"], "Did you mean 'ResNet50'"),
    (["model=mobilenet"], "Missing mandatory value: model.weights"),
    (["experiment=lucid"], "crop=16 leaves no pixels of a 32x32 image"),  # the preset's crop, the tiny model's size
])
def test_bad_config_values_print_one_line_before_compute(args, message, tmp_path, capsys, step_traces):
    # in-process (cli.run_command is the command's body); tests/test_cli.py runs the real command
    with initialize_config_module(config_module="fvis.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*(["model=tiny"] if not args[0].startswith("model=") else []), *args])
    before = len(step_traces)
    with pytest.raises(SystemExit) as exit_info:
        cli.run_command(cfg, str(tmp_path / "run"))
    errors = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(errors) == 1 and errors[0].startswith("fvis: error:")
    assert message in errors[0], errors
    assert len(step_traces) == before and not (tmp_path / "run").exists()  # refused: no run folder left


@pytest.mark.parametrize("display, message", [
    ({"crop": 16}, "crop=16 leaves no pixels of a 32x32 image"),
    ({"crop": 2.5}, "display.crop must be an integer >= 0"),
    ({"margin": -1}, "display.margin must be an integer >= 0"),
    ({"mode": "xyz"}, "Unknown display mode 'xyz'"),
])
def test_display_settings_are_refused_before_compute(tiny, tmp_path, display, message, step_traces):
    job = fvis.prepare(tiny, "conv2", "0:2", steps=1)
    before = len(step_traces)
    with pytest.raises(InvalidValueError, match=message):
        outputs.run_and_write(job, tmp_path, config={}, meta={}, display={"crop": 2, "mode": "seed", "margin": 5,
                                                                           **display})
    assert len(step_traces) == before and not (tmp_path / "chunks").exists()


@pytest.mark.parametrize("make, kwargs, message", [
    (lambda: objectives.neuron("conv2", position=(100, 100)), {}, r"position \[100, 100\] lies outside .*32x32"),
    (lambda: objectives.neuron("conv2", position=(-1, 0)), {}, r"lies outside.*0 <= y < 32"),
    (lambda: objectives.neuron("conv2", position=[1]), {}, r"two integers \[y, x\].*Received: position=\[1\]"),
    (lambda: objectives.neuron("logits", position=(0, 0)), {}, "position applies to feature maps"),
    (lambda: objectives.channel("conv2", border=-1), {}, "border must be an integer >= 0.*border=-1"),
    (lambda: objectives.channel("conv2", border=1.5), {}, "border=1.5"),
    (lambda: objectives.deepdream("conv2", border=-2), {}, "border=-2"),
    (lambda: objectives.channel("conv2") + objectives.diversity("conv2"), {"images_per_unit": 1},
     "needs images_per_unit >= 2"),
])
def test_objective_settings_out_of_range_are_refused_before_compute(tiny, make, kwargs, message, step_traces):
    before = len(step_traces)
    with pytest.raises(InvalidValueError, match=message):
        fvis.prepare(tiny, make(), "0:2", **kwargs)
    assert len(step_traces) == before


def test_neuron_position_picks_that_position(tiny):
    job = fvis.prepare(tiny, objectives.neuron("conv2", position=(3, 5)), [1])
    image = np.random.default_rng(0).uniform(-0.1, 0.1, (32, 32, 3)).astype(np.float32)
    acts = job.forward(job.forward.weights(), image)
    assert float(job.objective(acts, 1)) == float(acts["conv2"][3, 5, 1])


def test_weights_file_for_another_architecture_is_refused(tmp_path, tiny):
    path = tmp_path / "tiny.weights.h5"
    tiny.model.save_weights(path)
    with pytest.raises(InvalidValueError, match="cannot be loaded into MobileNet.*same architecture"):
        models.keras_application("MobileNet", alpha=0.25, weights=str(path), include_top=True, image_size=(64, 64))
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"\x00not hdf5" * 100)
    with pytest.raises(InvalidValueError, match="garbage.h5"):
        models.keras_application("MobileNet", alpha=0.25, weights=str(garbage), include_top=True, image_size=(64, 64))
