"""Any Keras model a researcher has: saved files with custom code, several outputs, channels_first
layers, plain keras.Model objects, and rewrites that leave the model and Keras as they were."""

import sys
import textwrap

import jax.numpy as jnp
import keras
import numpy as np
import pytest
from hydra import compose, initialize_config_module

import fvis
from fvis import cli, models
from fvis.errors import InvalidTypeError, InvalidValueError, MissingFileError
from fvis.models import keras_ops

CUSTOM_MODULE = textwrap.dedent('''
    import keras

    @keras.saving.register_keras_serializable(package="fvis_test")
    class Doubler(keras.layers.Layer):
        def call(self, x):
            return 2.0 * x
''')


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    """An importable module `fvis_test_layers` defining (and registering) the layer class `Doubler`."""
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "fvis_test_layers.py").write_text(CUSTOM_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    yield "fvis_test_layers"
    sys.modules.pop("fvis_test_layers", None)


def _conv_model(middle, name="m"):
    x = keras.Input((16, 16, 3))
    y = keras.layers.Conv2D(4, 3, padding="same", name="conv")(x)
    return keras.Model(x, middle(y), name=name)


def _saved_with_custom_layer(tmp_path, custom_module):
    module = __import__(custom_module)
    path = tmp_path / "custom.keras"
    _conv_model(module.Doubler(name="double")).save(path)
    sys.modules.pop(custom_module)  # a fresh process would not know the class
    keras.saving.get_custom_objects().pop("fvis_test>Doubler", None)
    return path


def composed(*overrides):
    with initialize_config_module(config_module="fvis.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_custom_layer_file_names_the_two_ways_out(tmp_path, custom_module):
    path = _saved_with_custom_layer(tmp_path, custom_module)
    with pytest.raises(InvalidValueError) as info:
        models.saved_model(path)
    message = str(info.value)
    assert not isinstance(info.value, MissingFileError)
    assert "Doubler" in message and "model.modules=" in message and "model.custom_objects=" in message


def test_custom_layer_loads_with_custom_objects_or_modules(tmp_path, custom_module):
    path = _saved_with_custom_layer(tmp_path, custom_module)
    by_object = models.saved_model(path, custom_objects={"Doubler": f"{custom_module}:Doubler"})
    by_module = models.saved_model(path, modules=[custom_module])
    x = np.random.default_rng(0).normal(size=(1, 16, 16, 3)).astype("float32")
    conv = by_module.model.get_layer("conv")(x)
    np.testing.assert_allclose(by_module.model(x), 2.0 * np.asarray(conv), rtol=1e-6)
    np.testing.assert_allclose(by_object.model(x), by_module.model(x), rtol=1e-6)


def test_custom_layer_through_the_command(tmp_path, custom_module):
    path = _saved_with_custom_layer(tmp_path, custom_module)
    cfg = composed("model=saved", f"model.path={path}", f"model.modules=[{custom_module}]", "layer=double",
                   "filters=0:2", "steps=2", "quality.enabled=false", "display.crop=2")
    summary, record = cli.run(cfg, tmp_path / "run")
    assert record["status"] == "done" and summary["units"] == [0, 1]


def test_lambda_layer_needs_an_explicit_unsafe_load(tmp_path):
    path = tmp_path / "lambda.keras"
    _conv_model(keras.layers.Lambda(lambda t: t * 3.0, name="triple")).save(path)
    with pytest.raises(InvalidValueError, match="model.safe_mode=false"):
        models.saved_model(path)
    cfg = composed("model=saved", f"model.path={path}", "model.safe_mode=false", "layer=triple", "filters=[1]",
                   "steps=1", "quality.enabled=false", "display.crop=2")
    summary, _ = cli.run(cfg, tmp_path / "run")
    assert summary["units"] == [1]


def test_corrupt_keras_file_is_one_error_naming_it(tmp_path):
    path = tmp_path / "broken.keras"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InvalidValueError, match="broken.keras.*truncated or corrupt"):
        models.saved_model(path)


class Halves(keras.layers.Layer):
    """Returns the first and the second half of the channels as two tensors."""

    def call(self, x):
        half = x.shape[-1] // 2
        return x[..., :half], 10.0 * x[..., half:]

    def compute_output_shape(self, shape):
        half = shape[-1] // 2
        return (*shape[:-1], half), (*shape[:-1], shape[-1] - half)


def _two_outputs():
    x = keras.Input((16, 16, 3))
    y = keras.layers.Conv2D(6, 3, padding="same", name="conv")(x)
    a, b = Halves(name="halves")(y)
    inner = keras.Model(x, [a, b], name="inner")
    outer_in = keras.Input((16, 16, 3))
    p, q = inner(outer_in)
    return models.wrap(keras.Model(outer_in, [p, q], name="outer"), input_space="tf")


@pytest.mark.parametrize("path", ["inner/halves", "inner"])
def test_a_layer_with_several_outputs_is_refused_before_compiling(path, step_traces):
    with pytest.raises(InvalidValueError, match=rf"returns 2 tensors: '{path}:0' \(16, 16, 3\), '{path}:1'"):
        fvis.prepare(_two_outputs(), path, "all")
    assert step_traces == []


@pytest.mark.parametrize("path", ["inner/halves:1", "inner:1"])
def test_an_output_suffix_picks_that_output(path):
    model = _two_outputs()
    job = fvis.prepare(model, path, "all", steps=1)
    assert job.units.tolist() == [0, 1, 2]
    image = np.random.default_rng(0).uniform(-0.5, 0.5, (16, 16, 3)).astype("float32")
    conv = np.asarray(model.model.get_layer("inner").get_layer("conv")(image[None]))[0]
    act = job.forward(job.forward.weights(), jnp.asarray(image))[path]
    np.testing.assert_allclose(act, 10.0 * conv[..., 3:], rtol=1e-5, atol=1e-6)
    with pytest.raises(InvalidValueError, match="returns 2 tensors"):
        fvis.prepare(model, "inner/halves:2", "all")


def test_channel_axis_comes_from_the_layers_data_format():
    x = keras.Input((12, 10, 3))
    y = keras.layers.Permute((3, 1, 2))(x)  # (3, 12, 10)
    y = keras.layers.Conv2D(5, 3, padding="same", data_format="channels_first", name="conv_cf")(y)
    y = keras.layers.ReLU(name="relu_cf")(y)  # no data_format: keeps its input's layout
    model = models.wrap(keras.Model(x, y), input_space="tf")
    job = fvis.prepare(model, "relu_cf", "all", steps=1)
    assert job.units.tolist() == [0, 1, 2, 3, 4] and job.forward.shapes() == {"relu_cf": (12, 10, 5)}
    image = np.random.default_rng(1).uniform(-1, 1, (12, 10, 3)).astype("float32")
    nchw = np.asarray(model.model(image[None]))[0]  # (5, 12, 10)
    acts = job.forward(job.forward.weights(), jnp.asarray(image))
    for unit in range(5):
        assert float(job.objective(acts, unit)) == pytest.approx(float(nchw[unit, 2:-2, 2:-2].mean()), rel=1e-5)


def test_visualize_takes_a_keras_application_model_as_is():
    net = keras.applications.MobileNet(alpha=0.25, weights=None, include_top=False, input_shape=(64, 64, 3))
    result = fvis.visualize(net, "conv_pw_1_relu", [0, 1], steps=2, progress=False)
    wrapped = fvis.visualize(models.wrap(net, input_space="tf"), "conv_pw_1_relu", [0, 1], steps=2, progress=False)
    np.testing.assert_array_equal(result.images, wrapped.images)
    assert result.images.shape == (2, 1, 64, 64, 3)


def test_a_plain_model_of_unknown_input_range_is_asked_for_it():
    net = _conv_model(keras.layers.ReLU(name="relu"), name="my_net")
    with pytest.raises(InvalidValueError, match=r"input range.*fvis.models.wrap\(model, input_space="):
        fvis.visualize(net, "relu", [0], steps=1)


def test_a_subclassed_model_gets_a_clear_error():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(4, 3)

        def call(self, x):
            return self.conv(x)

    net = Net()
    net(np.zeros((1, 16, 16, 3), "float32"))
    with pytest.raises(InvalidTypeError, match="subclassed keras.Model.*Functional"):
        fvis.visualize(net, "conv2d", [0], steps=1)


def test_an_unbuilt_sequential_is_asked_for_its_input_shape():
    net = keras.Sequential([keras.layers.Conv2D(4, 3, name="c")], name="mobilenet_1.00_224")
    with pytest.raises(InvalidValueError, match="input_shape"):
        fvis.visualize(net, "c", [0], steps=1)
    with pytest.raises(InvalidValueError, match="input_shape"):
        models.wrap(keras.Sequential([keras.layers.Conv2D(4, 3, name="c")]))


def _state(model):
    """Everything a rewrite could leave changed: the layers' policies, the variables, Keras' globals."""
    from keras.src import backend as keras_backend
    return ([layer.dtype_policy.name for layer in model._flatten_layers()],
            [np.asarray(v.value).copy() for v in model.variables],
            keras.config.dtype_policy().name, keras_backend.nn.max_pool, keras_backend.nn.conv)


def test_rewrites_leave_the_users_model_and_keras_as_they_were():
    x = keras.Input((16, 16, 3))
    y = keras.layers.Conv2D(4, 3, padding="same", name="conv")(x)
    y = keras.layers.BatchNormalization(name="bn")(y)
    y = keras.layers.MaxPooling2D(2, name="pool")(y)
    y = keras.layers.Conv2D(6, 1, name="pointwise")(y)
    net = keras.Model(x, y)
    net.get_layer("bn").moving_mean.assign(np.full(4, 0.3, "float32"))
    model = models.wrap(net, input_space="tf")
    probe = np.random.default_rng(2).normal(size=(1, 16, 16, 3)).astype("float32")
    before, out_before = _state(net), np.asarray(net(probe))
    for precision in ("float32", "bfloat16"):
        job = fvis.prepare(model, "pointwise", [0, 1], steps=2, precision=precision)
        assert job.forward.rewrites == models.Rewrites(precision, cpu_ops=True, fold_batchnorm=True,
                                                       winograd=True)  # the CPU defaults
        job.run(progress=False)
    after = _state(net)
    assert before[0] == after[0] and before[2:] == after[2:]
    assert after[3] is not keras_ops.max_pool_by_slices
    for a, b in zip(before[1], after[1]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.asarray(net(probe)), out_before)
