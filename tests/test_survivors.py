"""Values that mutation testing (experiments/results/mutation.md) found unchecked, each against a hand value."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fvis import cli, objectives, transforms
from fvis.models import INPUT_SPACES, VisModel


def test_unit_raw255_and_torch_spaces_on_hand_values_in_colour_and_gray():
    x = np.array([-1.0, 0.0, 1.0], np.float32)
    np.testing.assert_allclose(INPUT_SPACES["unit"](x[:, None]), [[0.0], [0.5], [1.0]])
    np.testing.assert_allclose(INPUT_SPACES["raw255"](x[:, None]), [[0.0], [127.5], [255.0]])
    gray = INPUT_SPACES["torch"](np.zeros((4, 4, 1), np.float32))  # one grayscale image
    assert gray.shape == (4, 4, 1)
    np.testing.assert_allclose(gray, (0.5 - 0.485) / 0.229, rtol=1e-6)  # the red channel's statistics
    caffe = INPUT_SPACES["caffe"](np.zeros((4, 4, 1), np.float32))
    assert caffe.shape == (4, 4, 1)
    np.testing.assert_allclose(caffe, 127.5 - 103.939, rtol=1e-6)


def test_a_model_source_must_implement_the_whole_interface():
    assert VisModel.__abstractmethods__ == {"layer_paths", "output_shapes", "feature_map_paths", "weights", "call",
                                            "default_path"}

    class Partial(VisModel):
        def layer_paths(self):
            return []

    with pytest.raises(TypeError, match="abstract"):
        Partial(input_space="tf", image_size=(8, 8), channels=3, name="partial")


def test_objectives_multiply_value_by_value():
    a = objectives.Objective(lambda acts, unit: acts["x"][unit], layers=["x"])
    b = objectives.Objective(lambda acts, unit: 2.0 + acts["x"][unit], layers=["x"])
    acts = {"x": jnp.array([3.0, -0.5])}
    assert float((a * b)(acts, 0)) == 15.0 and float((a * b)(acts, 1)) == -0.75


def test_jitter_shifts_cover_minus_d_to_d_evenly():
    d, size = 2, 9
    image = jnp.zeros((size, size, 1)).at[size // 2, size // 2, 0].set(1.0)
    shift = transforms.jitter(d, fill=0.0)
    seen = []
    for i in range(400):
        moved = np.asarray(shift(jax.random.key(i), image))[..., 0]
        y, x = np.argwhere(moved == 1.0)[0]
        seen.append((y - size // 2, x - size // 2))
    offsets = np.array(seen)
    assert set(offsets[:, 0]) == set(offsets[:, 1]) == set(range(-d, d + 1))
    assert abs(offsets.mean()) < 0.2  # symmetric: no side favoured


def test_long_run_folder_names_are_cut_to_the_limit_with_a_hash():
    short = cli.run_dir_name("lr=5,steps=30")
    long_overrides = ",".join(f"param.key{i}=value{i}" for i in range(20))
    name = cli.run_dir_name(long_overrides)
    assert short == "lr=5,steps=30"
    assert len(name) == 120 and name.startswith(long_overrides[:107]) and name[107] == "-"
    assert name != cli.run_dir_name(long_overrides + "x")  # different overrides, different folders


def test_display_defaults_are_the_references_layout():
    from fvis import Display
    assert (Display().mode, Display().crop, Display().margin) == ("seed", 25, 5)  # ../shared/seed: 25 px crop, 5 px margins


def test_whole_model_job_takes_the_given_objective_per_layer_and_records_channels(tiny, tmp_path):
    import functools
    import json

    import fvis

    kwargs = dict(settings=fvis.Settings(steps=1), display=fvis.Display(crop=2), quality=fvis.Quality(enabled=False))
    neuron = functools.partial(objectives.neuron, position=(1, 2))
    fvis.run_job(tiny, neuron, [0], tmp_path / "neuron", layers=["conv1", "conv2"], **kwargs)
    fvis.run_job(tiny, None, [0], tmp_path / "channel", layers=["conv1"], **kwargs)
    layers = json.loads((tmp_path / "neuron" / "results.json").read_text())["layers"]
    assert [(e["layer"], e["channels"]) for e in layers] == [("conv1", 8), ("conv2", 16)]
    first = json.loads((tmp_path / "neuron" / layers[0]["folder"] / "results.json").read_text())
    assert first["objective"] == "neuron(conv1)"
    default = json.loads((tmp_path / "channel" / "layers/000_conv1/results.json").read_text())
    assert default["objective"] == "channel(conv1)"


def test_the_loop_setting_chooses_the_compiled_form(tiny):
    import fvis

    scan = fvis.prepare(tiny, "conv2", [0], steps=2, loop="scan")
    host = fvis.prepare(tiny, "conv2", [0], steps=2, loop="host")
    weights = scan.placed_weights()
    assert isinstance(scan.compile(weights)[0].compiled, jax.stages.Compiled)  # one compiled call per chunk
    assert not hasattr(host.compile(weights)[0], "compiled")  # a Python loop over a compiled step


def test_messages_name_the_maps_height_and_width_in_order():
    from fvis import models
    from fvis.errors import InvalidValueError
    import fvis

    model = models.tiny_convnet(image_size=(8, 12))  # conv2: an 8x12 map of 16 channels; conv3: 4x6
    with pytest.raises(InvalidValueError, match="outputs a 4x6 map"):
        fvis.prepare(model, objectives.channel("conv3", border=2), [0])
    with pytest.raises(InvalidValueError, match=r"use 0 <= y < 8, 0 <= x < 12\."):
        fvis.prepare(model, objectives.neuron("conv2", position=(0, 20)), [0])


def test_direction_accepts_a_layer_of_more_than_256_channels():
    from fvis import models
    import fvis

    model = models.tiny_convnet(image_size=(8, 8), width=80)  # conv3: 320 channels (ints above CPython's cache)
    vectors = np.zeros((2, 320), np.float32)
    vectors[0, 5], vectors[1, 300] = 1.0, 1.0
    job = fvis.prepare(model, objectives.direction("conv3", vectors, border=0), "all")
    assert job.units.tolist() == [0, 1]


def test_robustness_defaults_are_the_reports_moves(tiny):
    from fvis import quality
    import fvis

    job = fvis.prepare(tiny, "conv2", [0, 1])
    images = np.random.default_rng(0).uniform(-0.5, 0.5, (2, 32, 32, 3)).astype(np.float32)
    default = quality.robustness(job.forward, job.objective, images, [0, 1], draws=2)
    explicit = quality.robustness(job.forward, job.objective, images, [0, 1], draws=2, jitter=8, scale=0.1)
    np.testing.assert_array_equal(default, explicit)  # the documented +-8 px, +-10 %


def test_each_image_of_a_unit_gets_its_own_tile_file(tiny, tmp_path):
    import fvis
    from fvis import images

    kwargs = dict(settings=fvis.Settings(steps=1, images_per_unit=3), display=fvis.Display(crop=2),
                  quality=fvis.Quality(enabled=False))
    fvis.run_job(tiny, "conv2", [4, 1], tmp_path, **kwargs)
    with np.load(tmp_path / "images.npz") as data:
        raw = data["images"]  # (2 units, 3 images, 32, 32, 3)
    for i, unit in enumerate([4, 1]):
        for j in range(3):
            tile = images.load_png(tmp_path / "filters" / f"filter_{unit:04d}_{j}.png")
            np.testing.assert_array_equal(tile, images.deprocess(raw[i, j], crop=2))


def test_unit_index_errors_name_the_last_index_as_an_integer():
    from fvis.errors import UnitIndexError
    from fvis.units import parse_units

    with pytest.raises(UnitIndexError, match=r"reaches index 2147483652;"):
        parse_units(f"0:{2**31 + 5}", None)


def test_a_crop_larger_than_half_the_image_is_refused():
    from fvis.errors import InvalidValueError
    from fvis.images import check_display

    for crop in (16, 20):
        with pytest.raises(InvalidValueError, match=f"crop={crop} leaves no pixels of a 32x32 image"):
            check_display((32, 32), crop=crop)
    check_display((32, 32), crop=15)
