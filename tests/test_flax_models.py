"""Flax NNX and linen models: twins of a Keras CNN, inference mode, layer paths, Orbax checkpoints."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

flax = pytest.importorskip("flax")
ocp = pytest.importorskip("orbax.checkpoint")

import flax.linen as nn  # noqa: E402
from flax import nnx  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402

import fvis  # noqa: E402
import fvis.cli  # noqa: E402
from fvis import models  # noqa: E402
from fvis.errors import InvalidValueError, UnknownNameError  # noqa: E402

SIZE = (32, 32)
RUN = dict(steps=4, seed=3, progress=False)


class NnxCNN(nnx.Module):
    """The NNX twin of `fvis.models.tiny_convnet` (width 8): same layers, same names."""

    def __init__(self, width=8, *, rngs):
        self.conv1 = nnx.Conv(3, width, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(width, epsilon=1e-3, rngs=rngs)  # NNX default: batch statistics
        self.conv2 = nnx.Conv(width, 2 * width, (3, 3), rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)  # NNX default: active
        self.conv3 = nnx.Conv(2 * width, 4 * width, (3, 3), rngs=rngs)
        self.logits = nnx.Linear(4 * width, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.drop(self.conv2(nnx.relu(self.bn1(self.conv1(x))))))
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        return self.logits(jnp.mean(nnx.relu(self.conv3(x)), axis=(1, 2)))


class LinenCNN(nn.Module):
    """The linen twin of `tiny_convnet`, training mode by default (train=True), as linen code often is."""

    width: int = 8

    @nn.compact
    def __call__(self, x, train=True):
        x = nn.Conv(self.width, (3, 3), name="conv1")(x)
        x = nn.relu(nn.BatchNorm(epsilon=1e-3, name="bn1")(x, use_running_average=not train))
        x = nn.Conv(2 * self.width, (3, 3), name="conv2")(x)
        x = nn.relu(nn.Dropout(0.5, name="drop")(x, deterministic=not train))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(4 * self.width, (3, 3), name="conv3")(x))
        return nn.Dense(10, name="logits")(jnp.mean(x, axis=(1, 2)))


class Outer(nnx.Module):
    """Nested containers: paths through a dict and a list."""

    def __init__(self):
        self.inner = nnx.Dict(blocks=nnx.List([nnx.Conv(3, 3, (1, 1), rngs=nnx.Rngs(i)) for i in range(2)]))

    def __call__(self, x):
        return self.inner["blocks"][1](self.inner["blocks"][0](x))


def make_cnn(seed=0, width=8):
    """The factory the config names (model.factory=tests.test_flax_models:make_cnn)."""
    return NnxCNN(width, rngs=nnx.Rngs(seed))


def keras_weights(keras_model):
    """{layer: {variable: array}} of tiny_convnet's Keras layers."""
    return {layer.name: {v.path.split("/")[-1]: np.asarray(v.value) for v in layer.weights}
            for layer in keras_model.layers if layer.weights}


def nnx_twin(tiny):
    module = nnx.eval_shape(lambda: NnxCNN(rngs=nnx.Rngs(1)))  # shapes only (no random init): values set below
    module.drop = nnx.Dropout(0.5, rngs=nnx.Rngs(1))
    w = keras_weights(tiny.model)
    for name in ("conv1", "conv2", "conv3", "logits"):
        getattr(module, name).kernel.set_value(jnp.asarray(w[name]["kernel"]))
        getattr(module, name).bias.set_value(jnp.asarray(w[name]["bias"]))
    for ours, theirs in (("scale", "gamma"), ("bias", "beta"), ("mean", "moving_mean"), ("var", "moving_variance")):
        getattr(module.bn1, ours).set_value(jnp.asarray(w["bn1"][theirs]))
    return module


def linen_twin_variables(tiny):
    w = keras_weights(tiny.model)
    params = {n: {"kernel": w[n]["kernel"], "bias": w[n]["bias"]} for n in ("conv1", "conv2", "conv3", "logits")}
    params["bn1"] = {"scale": w["bn1"]["gamma"], "bias": w["bn1"]["beta"]}
    return {"params": params, "batch_stats": {"bn1": {"mean": w["bn1"]["moving_mean"],
                                                      "var": w["bn1"]["moving_variance"]}}}


def activations(vis_model, paths, image, precision="float32"):
    """The one place these tests read activations directly (the model interface's Forward)."""
    forward = vis_model.forward(paths, models.Rewrites(precision=precision))
    return jax.jit(forward)(forward.weights(), image)


@pytest.fixture(scope="module")
def twins(tiny):
    nnx_model = models.from_nnx(nnx_twin(tiny), image_size=SIZE)
    linen_model = models.from_linen(LinenCNN(), linen_twin_variables(tiny), image_size=SIZE)
    return nnx_model, linen_model


def test_nnx_and_linen_twins_of_a_keras_cnn_give_its_images(tiny, twins):
    """Identical weights give the same images (1e-5 absolute; BatchNorm's arithmetic order differs)."""
    expected = fvis.visualize(tiny, "conv3", "0:4", **RUN)  # conv3 reads through BatchNorm and Dropout
    for twin in twins:
        result = fvis.visualize(twin, "conv3", "0:4", **RUN)
        np.testing.assert_allclose(result.images, expected.images, atol=1e-5, err_msg=twin.name)
        np.testing.assert_allclose(result.curves, expected.curves, rtol=1e-4, atol=1e-5, err_msg=twin.name)


def test_nnx_batchnorm_uses_running_statistics_for_one_image():
    """NNX's default BatchNorm (batch statistics) is read with its running mean and variance."""
    bn = nnx.BatchNorm(3, epsilon=1e-3, rngs=nnx.Rngs(0))
    mean, var = np.array([0.5, -1.0, 2.0], "float32"), np.array([0.25, 4.0, 1.0], "float32")
    scale, bias = np.array([2.0, 1.0, -1.0], "float32"), np.array([0.0, 1.0, 3.0], "float32")
    for variable, value in zip((bn.mean, bn.var, bn.scale, bn.bias), (mean, var, scale, bias)):
        variable.set_value(jnp.asarray(value))
    image = np.random.default_rng(0).uniform(-1, 1, (4, 4, 3)).astype("float32")
    got = activations(models.from_nnx(bn, image_size=(4, 4)), ["output"], image)["output"]
    np.testing.assert_allclose(got, (image - mean) / np.sqrt(var + 1e-3) * scale + bias, rtol=1e-6, atol=1e-6)


def test_user_modules_and_their_statistics_are_untouched(tiny, twins):
    """After a job, the module's BatchNorm statistics and its own (training) flags are as they were."""
    module = twins[0].module
    mean, var = np.asarray(module.bn1.mean.get_value()), np.asarray(module.bn1.var.get_value())
    fvis.visualize(twins[0], "conv2", [0, 1], **RUN)
    np.testing.assert_array_equal(module.bn1.mean.get_value(), mean)
    np.testing.assert_array_equal(module.bn1.var.get_value(), var)
    assert module.bn1.use_running_average is False and module.drop.deterministic is False


def test_a_module_that_forces_training_mode_is_refused():
    """A call that passes use_running_average=False itself writes batch statistics: refused, not visualized."""

    class Forced(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)

        def __call__(self, x):
            return self.bn(self.conv(x), use_running_average=False)

    with pytest.raises(InvalidValueError, match="training mode"):
        fvis.visualize(models.from_nnx(Forced(nnx.Rngs(0)), image_size=(8, 8)), "conv", [0], steps=1)


def test_linen_module_with_its_flag_fixed_as_attribute_needs_call_kwargs(tiny):
    """BatchNorm(use_running_average=not train) as an attribute: an error naming call_kwargs, and with them it runs."""

    class Attr(nn.Module):
        @nn.compact
        def __call__(self, x, train=True):
            return nn.BatchNorm(use_running_average=not train, name="bn")(nn.Conv(4, (3, 3), name="conv")(x))

    module = Attr()
    variables = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
    with pytest.raises(InvalidValueError, match="call_kwargs"):
        models.from_linen(module, variables, image_size=(8, 8)).output_shapes(["bn"])
    fixed = models.from_linen(module, variables, image_size=(8, 8), call_kwargs={"train": False})
    image = np.random.default_rng(0).uniform(-1, 1, (8, 8, 3)).astype("float32")
    expected = module.apply(variables, image[None], train=False)[0]
    np.testing.assert_allclose(activations(fixed, ["bn"], image)["bn"], expected, rtol=1e-6, atol=1e-6)


def test_layer_paths_are_module_paths_in_computation_order(twins):
    """Feature maps in the order computed; nested paths with '/'; the model's output is 'output'."""
    assert twins[0].feature_map_paths() == ["conv1", "bn1", "conv2", "drop", "conv3"]
    assert twins[1].feature_map_paths() == ["conv1", "bn1", "conv2", "drop", "conv3"]
    assert twins[0].layer_paths()[-2:] == ["logits", "output"] and twins[0].default_path == "output"
    outer = models.from_nnx(Outer(), image_size=(4, 4))
    assert outer.feature_map_paths() == ["inner/blocks/0", "inner/blocks/1", "output"]


def test_unknown_layer_says_did_you_mean(twins):
    with pytest.raises(UnknownNameError, match="Did you mean 'conv2'"):
        fvis.visualize(twins[0], "conv_2", [0], steps=1)


def test_bfloat16_computes_in_bfloat16_and_returns_float32(twins):
    """precision=bfloat16: activations float32, off the float32 ones by bfloat16 rounding only."""
    image = np.random.default_rng(1).uniform(-1, 1, (*SIZE, 3)).astype("float32")
    for twin in twins:
        full = activations(twin, ["conv3"], image)["conv3"]
        half = activations(twin, ["conv3"], image, precision="bfloat16")["conv3"]
        assert half.dtype == jnp.float32
        error = float(jnp.max(jnp.abs(half - full)) / jnp.max(jnp.abs(full)))
        assert 1e-4 < error < 3e-2, (twin.name, error)


def test_the_step_traces_once_per_job(twins, step_traces):
    """Two chunks of one job share one compilation, for NNX and linen."""
    for twin in twins:
        step_traces.clear()
        fvis.visualize(twin, "conv3", "0:4", batch_size=2, **RUN)
        assert len(step_traces) == 1, twin.name


def test_whole_model_job_and_atlas(tmp_path):
    """layers=all walks every feature map of an NNX model and writes the atlas."""
    outcome = fvis.run_job(models.from_nnx(Outer(), image_size=(8, 8)), fvis.objectives.channel, "0:2", tmp_path,
                           layers="all",
                           settings=fvis.Settings(steps=2), display=fvis.Display(crop=2),
                           quality=fvis.Quality(enabled=False), progress=False)
    summary = json.loads((tmp_path / "results.json").read_text())
    assert [entry["layer"] for entry in summary["layers"]] == ["inner/blocks/0", "inner/blocks/1", "output"]
    assert (tmp_path / "atlas.png").is_file() and outcome is not None


def composed(*overrides):
    with initialize_config_module(config_module="fvis.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_cli_restores_an_orbax_checkpoint(tmp_path):
    """model=flax with a factory and an Orbax checkpoint visualizes the checkpoint's weights."""
    trained = nnx.eval_shape(lambda: make_cnn(width=4))  # (random init compiles for seconds on a CPU)
    rng = np.random.default_rng(7)
    for _, variable in nnx.to_flat_state(nnx.state(trained, nnx.Param)):
        variable.set_value(jnp.asarray(rng.normal(0, 0.3, variable.shape), jnp.float32))
    for _, variable in nnx.to_flat_state(nnx.state(trained, nnx.BatchStat)):
        variable.set_value(jnp.asarray(rng.uniform(0.5, 1.5, variable.shape), jnp.float32))
    trained.drop = nnx.Dropout(0.5, rngs=nnx.Rngs(1))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "ckpt", nnx.state(trained))
    cfg = composed("model=flax", "model.factory=tests.test_flax_models:make_cnn", "model.kwargs={width: 4}",
                   f"model.checkpoint={tmp_path / 'ckpt'}", "layer=conv3", "image_size=[32,32]", "filters=0:3",
                   "steps=3", "quality.enabled=false", "display.crop=2")
    fvis.cli.run(cfg, tmp_path / "run")
    expected = fvis.visualize(models.from_nnx(trained, image_size=SIZE), "conv3", "0:3", steps=3, progress=False)
    with np.load(tmp_path / "run" / "images.npz") as data:
        np.testing.assert_array_equal(data["images"], expected.images)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["attempts"][-1]["versions"]["flax"]
