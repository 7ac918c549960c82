"""Faithful pictures: the redirected ReLU, logits for a read softmax, the precision that ran,
and dead units counted as failures, each by value against a hand-worked expectation."""

import logging

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

import fvis
from fvis import models, objectives, quality
from fvis.models import Rewrites, jax_rewrites

IMAGE = (8, 8)


def keras_model(*layers, image_size=IMAGE):
    inputs = keras.Input((*image_size, 3))
    x = inputs
    for layer in layers:
        x = layer(x)
    return models.wrap(keras.Model(inputs, x), image_size=image_size)


def objective_grad(vis_model, path, unit, image, rewrites):
    """d(-activation of `unit` at `path`, summed)/d image and the activation, through the model interface."""
    forward = vis_model.forward([path], rewrites)
    weights = forward.weights()

    def loss(x):
        return -jnp.sum(forward(weights, x)[path][..., unit])

    value, grad = jax.value_and_grad(loss)(image)
    return -value, grad


def start_image(seed=0):
    return jax.random.uniform(jax.random.key(seed), (*IMAGE, 3), minval=-0.1, maxval=0.1)


# --- the redirect on one ReLU, by hand -------------------------------------------------------

def test_redirected_relu_values_and_gradients_by_hand():
    """Forward = max(x, 0); backward: exact where any gradient passes, else the incoming gradient
    except where it pushes an input below zero further down (loss convention: g > 0 lowers x)."""
    x = jnp.array([[-2.0, -1.0, 0.5, 3.0], [-2.0, -1.0, -0.5, -3.0]])
    g = jnp.array([[1.0, -1.0, 2.0, -3.0], [1.0, -1.0, 2.0, -3.0]])
    out, vjp = jax.vjp(jax_rewrites.redirected_relu, x)
    np.testing.assert_array_equal(out, jnp.maximum(x, 0))
    # row 0: alive (0.5 and 3.0 pass) -> exact; row 1: dead -> only -1 and -3 (towards firing) pass
    np.testing.assert_array_equal(vjp(g)[0], [[0.0, 0.0, 2.0, -3.0], [0.0, -1.0, 0.0, -3.0]])


def test_redirected_relu6_values_and_gradients_by_hand():
    """ReLU6: an example with every input outside (0, 6) gets the gradient that moves inputs inside."""
    x = jnp.array([[-1.0, 7.0, 7.0, -1.0], [-1.0, 3.0, 7.0, 8.0]])
    g = jnp.array([[-1.0, 1.0, -1.0, 1.0], [-1.0, 1.0, -1.0, 1.0]])
    out, vjp = jax.vjp(jax_rewrites.redirected_relu6, x)
    np.testing.assert_array_equal(out, jnp.clip(x, 0, 6))
    # row 0: nothing inside (0, 6): -1 at x=-1 raises it, +1 at x=7 lowers it, the others are zeroed
    np.testing.assert_array_equal(vjp(g)[0], [[-1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])


# --- every ReLU form: the same forward, the exact gradient where alive, a gradient where dead ---

DEAD_BIAS, LIVE_BIAS = -50.0, 0.0  # live: some positions fire, some not (where exact and redirect would differ)


def keras_forms(bias):
    """(name, model, path): a Dense-free conv whose unit 0 has bias `bias`, in each Keras ReLU form."""
    init = keras.initializers.Constant(bias)
    conv = lambda act=None: keras.layers.Conv2D(2, 3, padding="same", activation=act, bias_initializer=init,
                                                kernel_initializer=keras.initializers.RandomNormal(seed=1))
    return [
        ("fused relu", keras_model(conv("relu")), None),
        ("fused relu6", keras_model(conv("relu6")), None),
        ("ReLU layer", keras_model(conv(), keras.layers.ReLU()), None),
        ("ReLU(max_value=6)", keras_model(conv(), keras.layers.ReLU(max_value=6.0)), None),
        ("Activation relu", keras_model(conv(), keras.layers.Activation("relu")), None),
        ("Activation relu6", keras_model(conv(), keras.layers.Activation("relu6")), None),
    ]


def flax_forms(bias):
    nnx = pytest.importorskip("flax.nnx")
    nn = pytest.importorskip("flax.linen")

    class Net(nnx.Module):
        def __init__(self, act):
            self.conv = nnx.Conv(3, 2, (3, 3), rngs=nnx.Rngs(1))
            self.conv.bias.value = jnp.full((2,), bias)
            self.act = act

        def __call__(self, x):
            return self.act(self.conv(x))

    class LinenNet(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.relu(nn.Conv(2, (3, 3), bias_init=nn.initializers.constant(bias), name="conv")(x))

    as_model = lambda module: models.from_nnx(module, image_size=IMAGE)
    forms = [("nnx.relu", as_model(Net(lambda x: nnx.relu(x))), None),
             ("jax.nn.relu", as_model(Net(lambda x: jax.nn.relu(x))), None),
             ("jax.nn.relu6", as_model(Net(lambda x: jax.nn.relu6(x))), None)]
    linen = LinenNet()
    variables = linen.init(jax.random.key(1), jnp.zeros((1, *IMAGE, 3)))
    forms.append(("linen relu", models.from_linen(linen, variables, image_size=IMAGE), None))
    return forms


@pytest.mark.parametrize("framework", ["keras", "flax"])
def test_every_relu_form_is_redirected_only_where_dead(framework):
    """For each ReLU form: forward values identical; a live unit's gradient bit-identical to the exact
    one; a dead unit's exact gradient is zero and the redirected one is not, and raises the unit."""
    forms = keras_forms if framework == "keras" else flax_forms
    image = start_image()
    for (name, live, _), (_, dead, _) in zip(forms(LIVE_BIAS), forms(DEAD_BIAS), strict=True):
        path = live.default_path
        forward = live.forward([path])
        unit0 = np.asarray(forward(forward.weights(), image)[path][..., 0])
        assert np.any(unit0 == 0) and np.any(unit0 > 0), name  # partly firing: the case that tells them apart
        exact_value, exact_live = objective_grad(live, path, 0, image, Rewrites())
        value, redirected_live = objective_grad(live, path, 0, image, Rewrites(redirect_relu=True))
        assert value == exact_value and np.array_equal(exact_live, redirected_live), name
        path = dead.default_path
        exact_value, exact_dead = objective_grad(dead, path, 0, image, Rewrites())
        value, redirected_dead = objective_grad(dead, path, 0, image, Rewrites(redirect_relu=True))
        assert value == exact_value == 0.0, name
        assert not np.any(exact_dead) and np.any(redirected_dead), name
        facts = dead.forward([path], Rewrites(redirect_relu=True)).facts()
        assert facts["relus"] == {"redirected": 1, "exact": 0, "unknown_form": 0}, (name, facts)
        # one step against the redirected gradient raises the pre-activation of unit 0
        pre = lambda x: _pre_activation(dead, x)
        assert pre(image - 0.01 * redirected_dead) > pre(image), name


def _pre_activation(vis_model, image):
    """Unit 0's summed pre-activation: the ReLU's input, by turning the ReLU off (identity) in a trace."""
    with _relu_as_identity():
        forward = vis_model.forward([vis_model.default_path])
        return float(jnp.sum(forward(forward.weights(), image)[vis_model.default_path][..., 0]))


def _relu_as_identity():
    identity = lambda x: x
    stack = __import__("contextlib").ExitStack()
    stack.enter_context(jax_rewrites._swapped(jax_rewrites._RELU, identity))
    stack.enter_context(jax_rewrites._swapped(jax_rewrites._RELU6, identity))
    return stack


def test_a_relu_the_redirect_cannot_reach_is_logged(caplog):
    """jnp.maximum(x, 0) in a custom layer keeps its exact gradient, and the log says so."""

    class BareRelu(keras.layers.Layer):
        def call(self, x):
            return keras.ops.maximum(x, 0.0)

    model = keras_model(keras.layers.Conv2D(2, 3, padding="same", activation="relu"), BareRelu(name="bare"))
    with caplog.at_level(logging.WARNING, logger="fvis"):
        job = fvis.prepare(model, "bare", "0:2", steps=1, redirect_relu=True)
    assert job.facts["relus"] == {"redirected": 1, "exact": 0, "unknown_form": 1}
    assert "1 ReLU(s) in a form the redirect does not reach" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fvis"):
        fvis.prepare(model, "bare", "0:2", steps=1)  # without the redirect there is nothing to say
    assert "redirect" not in caplog.text


def test_a_dead_conv_stack_comes_alive_with_the_redirect():
    """Fused ReLUs with negative biases: every unit dead at the start. Exact gradients leave all 16
    gray; with the redirect at least 90 % end with a positive activation (the issue's target)."""
    negative = keras.initializers.Constant(-3.0)
    kernel = lambda seed: keras.initializers.HeNormal(seed=seed)
    model = keras_model(
        keras.layers.Conv2D(8, 3, padding="same", activation="relu", bias_initializer=negative,
                            kernel_initializer=kernel(1)),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu", bias_initializer=negative,
                            kernel_initializer=kernel(2), name="top"), image_size=(16, 16))
    settings = dict(steps=20, progress=False)
    exact = fvis.visualize(model, "top", "all", **settings)
    redirected = fvis.visualize(model, "top", "all", redirect_relu=True, **settings)
    assert exact.dead.all() and np.all(exact.final == 0)
    assert np.mean(redirected.final[:, 0] > 0) >= 0.9, redirected.final[:, 0]


# --- a softmax at the end is read as logits ---------------------------------------------------

def dense_head(*layers):
    """Global-average-pooled image -> Dense(5) -> layers; the Dense weights seeded."""
    dense = keras.layers.Dense(5, name="dense", kernel_initializer=keras.initializers.RandomNormal(seed=3),
                               bias_initializer=keras.initializers.RandomNormal(seed=4))
    return keras_model(keras.layers.GlobalAveragePooling2D(), dense, *layers)


def by_numpy_logits(vis_model, image):
    dense = vis_model.model.get_layer("dense")
    kernel, bias = (np.asarray(w) for w in dense.get_weights())
    return np.asarray(image).mean(axis=(0, 1)) @ kernel + bias


@pytest.mark.parametrize("form", ["fused", "Activation", "Softmax layer"])
def test_a_keras_softmax_at_the_end_is_read_as_logits(form):
    """class_logit on a softmax output optimises the logits: the read value equals x @ W + b by numpy."""
    if form == "fused":
        vis_model = dense_head()
        vis_model.model.get_layer("dense").activation = keras.activations.softmax
    else:
        vis_model = dense_head(keras.layers.Activation("softmax") if form == "Activation" else keras.layers.Softmax())
    path, image = vis_model.default_path, start_image() * 5
    forward = vis_model.forward([path])
    read = np.asarray(forward(forward.weights(), image)[path])
    np.testing.assert_allclose(read, by_numpy_logits(vis_model, image), rtol=1e-5, atol=1e-6)
    assert abs(read.sum() - 1.0) > 1e-3  # not probabilities
    assert forward.facts()["read_as_logits"] == [path]
    probabilities = vis_model.forward([path], Rewrites(logits=False))
    np.testing.assert_allclose(np.asarray(probabilities(forward.weights(), image)[path]).sum(), 1.0, rtol=1e-5)


def test_a_flax_model_ending_in_softmax_is_read_as_logits():
    nnx = pytest.importorskip("flax.nnx")

    class Classifier(nnx.Module):
        def __init__(self):
            self.dense = nnx.Linear(3, 5, rngs=nnx.Rngs(3))

        def __call__(self, x):
            return jax.nn.softmax(self.dense(jnp.mean(x, axis=(1, 2))))

    module = Classifier()
    vis_model = models.from_nnx(module, image_size=IMAGE)
    image = start_image() * 5
    forward = vis_model.forward([vis_model.default_path])
    read = np.asarray(forward(forward.weights(), image)[vis_model.default_path])
    expected = np.asarray(image).mean(axis=(0, 1)) @ np.asarray(module.dense.kernel.value) + np.asarray(
        module.dense.bias.value)
    np.testing.assert_allclose(read, expected, rtol=1e-5, atol=1e-6)
    assert forward.facts()["read_as_logits"] == [vis_model.default_path]


def test_an_inner_softmax_is_left_alone():
    """Only a read output that IS a softmax result is replaced: a softmax feeding a later layer stays."""
    vis_model = keras_model(keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(5, activation="softmax"),
                            keras.layers.Dense(4, name="after"))
    forward = vis_model.forward(["after"])
    assert forward.facts()["read_as_logits"] == []


def test_class_logit_run_records_the_logits_in_results(tmp_path):
    vis_model = dense_head(keras.layers.Softmax(name="probs"))
    outcome = fvis.run_job(vis_model, objectives.class_logit("probs"), [1, 3], tmp_path,
                           settings=fvis.Settings(steps=2), quality=fvis.Quality(enabled=False),
                           display=fvis.Display(crop=0), progress=False)
    facts = outcome.results["model_facts"]
    assert facts["read_as_logits"] == ["probs"] and facts["compute_dtypes"] == ["float32"]
    images = np.load(tmp_path / "images.npz")["images"]
    for row, unit in enumerate([1, 3]):
        expected = by_numpy_logits(vis_model, images[row, 0])[unit]
        np.testing.assert_allclose(outcome.results["filters"][row]["final"], expected, rtol=1e-4)


# --- precision: float32 means float32, and the record says what ran ---------------------------

def test_mixed_float16_model_runs_in_float32_at_precision_float32():
    """A model built under mixed_float16 computes in float16 by itself; fvis at precision=float32 computes
    in float32 (equal to the same weights in a float32 model) and records it; bfloat16 records bfloat16."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        half = keras_model(keras.layers.Conv2D(4, 3, padding="same", name="conv",
                                               kernel_initializer=keras.initializers.RandomNormal(seed=5)))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    full = keras_model(keras.layers.Conv2D(4, 3, padding="same", name="conv"))
    full.model.get_layer("conv").set_weights(half.model.get_layer("conv").get_weights())
    image = start_image() * 10
    read = lambda m, r: np.asarray(m.forward(["conv"], r)(m.forward(["conv"]).weights(), image)["conv"])
    assert half.model.get_layer("conv").compute_dtype == "float16"  # what the model does alone
    np.testing.assert_array_equal(read(half, Rewrites()), read(full, Rewrites()))
    assert half.forward(["conv"]).facts()["compute_dtypes"] == ["float32"]
    assert half.forward(["conv"], Rewrites(precision="bfloat16")).facts()["compute_dtypes"] == ["bfloat16"]
    assert half.model.get_layer("conv").compute_dtype == "float16"  # and the user's model is as it was


def test_flax_layers_built_in_float16_compute_in_float32():
    nnx = pytest.importorskip("flax.nnx")
    conv = nnx.Conv(3, 4, (3, 3), dtype=jnp.float16, rngs=nnx.Rngs(0))
    vis_model = models.from_nnx(conv, image_size=IMAGE)
    forward = vis_model.forward([vis_model.default_path])
    assert forward.facts()["compute_dtypes"] == ["float32"]
    image = start_image() * 10
    expected = jax.lax.conv_general_dilated(image[None], conv.kernel.value, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))[0] + conv.bias.value
    np.testing.assert_allclose(forward(forward.weights(), image)[vis_model.default_path], expected, rtol=1e-5,
                               atol=1e-6)
    assert conv.dtype == jnp.float16


# --- failed images count as failures in every summary figure ----------------------------------

def test_dead_units_cannot_flatter_the_summary():
    """4 units, 3 of them dead (all-zero columns that tie at the top of the ranking): rank-1 over all
    images is at most 1/4, robustness and slope count the dead as 0, the live figures stand beside."""
    inputs = keras.Input((16, 16, 3))
    conv = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")
    model = keras.Model(inputs, conv(inputs))
    kernel, bias = conv.get_weights()
    conv.set_weights([kernel, np.array([0.5, -100.0, -100.0, -100.0], np.float32)])
    vis_model = models.wrap(model, image_size=(16, 16))
    result = fvis.visualize(vis_model, "conv", "all", steps=5, progress=False)
    assert result.dead[:, 0].tolist() == [False, True, True, True]
    forward = vis_model.forward(["conv"])
    records, summary = quality.measure(forward, objectives.channel("conv"), result.units, result.images,
                                       dead=result.dead, draws=2)
    assert [r["failed"] for r in records] == [False, True, True, True]
    assert records[1]["selectivity_rank"] == 1  # the flattering tie the summary must not count
    assert summary["rank1_fraction"] == 0.25 and summary["live"]["rank1_fraction"] == 1.0
    live_robustness = records[0]["robustness"]
    assert summary["robustness_median"] == 0.0 and summary["live"]["robustness_median"] == live_robustness
    assert summary["spectral_slope_median"] == 0.0
    assert summary["live"]["spectral_slope_median"] == records[0]["spectral_slope"]
    assert summary["failed_images"] == 3 and summary["failed_units"] == [1, 2, 3]


def test_redirect_relu_reaches_the_job_from_the_command_line(tmp_path):
    """`redirect_relu=true`: the bias -100 channels of the dead-unit model move (their gradient is no longer
    zero) while the live ones keep the exact run's images bit for bit; results.json records the setting."""
    from tests.test_model_values import DEAD, composed, save_model_with_dead_channels

    from fvis import cli
    save_model_with_dead_channels(tmp_path / "deadnet.keras")
    base = ["model=saved", f"model.path={tmp_path / 'deadnet.keras'}", "layer=relu", "image_size=[32,32]",
            "filters=all", "steps=3", "quality.enabled=false", "display.crop=2"]
    exact, _ = cli.run(composed(*base), tmp_path / "exact")
    redirected, _ = cli.run(composed(*base, "redirect_relu=true"), tmp_path / "redirected")
    assert exact["dead_filters"] == DEAD and redirected["dead_filters"] == []
    assert (exact["redirect_relu"], redirected["redirect_relu"]) == (False, True)
    images = {name: np.load(tmp_path / name / "images.npz")["images"] for name in ("exact", "redirected")}
    live = [u for u in range(6) if u not in DEAD]
    np.testing.assert_array_equal(images["exact"][live], images["redirected"][live])
    assert np.all(np.abs(images["exact"][DEAD] - images["redirected"][DEAD]).max(axis=(1, 2, 3, 4)) > 1e-3)
