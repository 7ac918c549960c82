"""Objectives for one image: known values, the algebra, diversity, regularizers, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fvis
from fvis import models, objectives as obj, params, regularizers as reg
from fvis.errors import InvalidTypeError, InvalidValueError

ACT = jax.random.normal(jax.random.key(0), (6, 8, 5))  # one image's (h, w, c) feature map
IMAGE = jax.random.uniform(jax.random.key(1), (10, 12, 3), jnp.float32, -1, 1)
ACTS = {"f": ACT, "v": jnp.arange(7.0), obj.INPUT: IMAGE}


def test_channel_neuron_class_logit_and_deepdream_values():
    assert float(obj.channel("f")(ACTS, 3)) == pytest.approx(float(ACT[2:4, 2:6, 3].mean()), rel=1e-6)
    assert float(obj.channel("f", border=0)(ACTS, 3)) == pytest.approx(float(ACT[..., 3].mean()), rel=1e-6)
    assert float(obj.neuron("f")(ACTS, 2)) == float(ACT[3, 4, 2])  # centre by default
    assert float(obj.neuron("f", position=(1, 5))(ACTS, 2)) == float(ACT[1, 5, 2])
    assert float(obj.neuron("v")(ACTS, 4)) == 4.0 == float(obj.class_logit("v")(ACTS, 4))
    assert float(obj.deepdream("f")(ACTS, 0)) == pytest.approx(float(jnp.mean(ACT ** 2)), rel=1e-6)


def test_direction_with_one_hot_vectors_equals_channel():
    d = obj.direction("f", np.eye(5))
    for unit in range(5):
        assert float(d(ACTS, unit)) == pytest.approx(float(obj.channel("f")(ACTS, unit)), rel=1e-6)
    mixed = obj.direction("f", [[0.5, 0, 0, 0, -2]], border=0)
    assert float(mixed(ACTS, 0)) == pytest.approx(float(jnp.mean(0.5 * ACT[..., 0] - 2 * ACT[..., 4])), rel=1e-5)


def test_algebra_matches_the_arithmetic():
    a, b = obj.channel("f"), obj.neuron("f")
    va, vb = float(a(ACTS, 1)), float(b(ACTS, 1))
    assert float((a + b)(ACTS, 1)) == pytest.approx(va + vb)
    assert float((a - 0.5 * b)(ACTS, 1)) == pytest.approx(va - 0.5 * vb)
    assert float((-a / 4)(ACTS, 1)) == pytest.approx(-va / 4)
    assert float(obj.weighted_sum([a, b], [2, -3])(ACTS, 1)) == pytest.approx(2 * va - 3 * vb)
    assert (a + reg.total_variation()).layers == ("f", obj.INPUT)
    with pytest.raises(TypeError, match="received int"):
        a + 1
    with pytest.raises(InvalidValueError, match="one weight per term"):
        obj.weighted_sum([a, b], [1.0])


def test_regularizers_on_known_images():
    flat, stripes = jnp.full((6, 8, 3), 0.5), jnp.tile(jnp.array([1.0, -1.0]), (6, 4))[..., None]
    value = lambda o, x: float(o({obj.INPUT: x}, 0))
    assert value(reg.l1(), flat) == pytest.approx(0.5) and value(reg.l1(constant=0.5), flat) == 0
    assert value(reg.l2(), stripes) == pytest.approx(1.0)
    assert value(reg.total_variation(), flat) == 0
    assert value(reg.total_variation(), stripes) == pytest.approx(2.0)  # every horizontal step is 2, vertical 0
    assert value(reg.blur(), flat) == pytest.approx(0, abs=1e-12) and value(reg.blur(), stripes) > 0.1


def binomial_blur(x):
    """The 3x3 binomial blur, (1, 2, 1) / 4 along each axis, edges replicated: a numpy restatement."""
    x = np.asarray(x, np.float64)
    h, w = x.shape[:2]
    padded, k = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge"), np.array([1.0, 2.0, 1.0]) / 4
    return sum(k[i] * k[j] * padded[i: i + h, j: j + w] for i in range(3) for j in range(3))


def test_blur_gradient_moves_the_image_towards_its_blur():
    grad = jax.grad(lambda x: reg.blur()({obj.INPUT: x}, 0))(IMAGE)
    np.testing.assert_allclose(grad, (IMAGE - binomial_blur(IMAGE)) / IMAGE.size, atol=1e-7)
    # A dot in the middle blurs to 4/16 there, 2/16 beside it, 1/16 diagonally; one in a corner, with the edge
    # replicated, keeps 4/16 + 2 * 2/16 + 1/16 = 9/16.
    dots = jnp.zeros((5, 5, 1)).at[2, 2, 0].set(1.0).at[0, 0, 0].set(1.0)
    grad = np.asarray(jax.grad(lambda x: reg.blur()({obj.INPUT: x}, 0))(dots))[..., 0] * 25  # x - blur(x)
    assert grad[2, 2] == pytest.approx(1 - 4 / 16) and grad[2, 3] == pytest.approx(-2 / 16)
    assert grad[1, 3] == pytest.approx(-1 / 16) and grad[2, 4] == 0
    assert grad[0, 0] == pytest.approx(1 - 9 / 16) and grad[0, 1] == pytest.approx(-(2 + 1) / 16)


def test_diversity_is_minus_pairwise_gram_similarity():
    same = {"f": jnp.stack([ACT, ACT, ACT])}
    assert float(obj.diversity("f").group(same, 0)) == pytest.approx(-2.0, rel=1e-5)  # -(D - 1) for copies
    disjoint = jnp.zeros((2, 4, 4, 2)).at[0, ..., 0].set(1.0).at[1, ..., 1].set(1.0)
    assert float(obj.diversity("f").group({"f": disjoint}, 0)) == 0
    assert float(obj.diversity("f")(ACTS, 0)) == 0  # a group term has no per-image value


def gram_similarity(acts):
    grams = np.stack([a.reshape(-1, a.shape[-1]).T @ a.reshape(-1, a.shape[-1]) for a in acts]).reshape(len(acts), -1)
    grams /= np.linalg.norm(grams, axis=1, keepdims=True)
    sim = grams @ grams.T
    return (sim.sum() - np.trace(sim)) / (len(acts) * (len(acts) - 1))


def test_diversity_lowers_gram_similarity_in_the_loop():
    model = models.tiny_convnet(image_size=(24, 24))
    settings = dict(images_per_unit=2, param=params.fourier(), optimizer=optax.adam(0.05), steps=10, progress=False)
    plain = fvis.visualize(model, obj.channel("conv2"), [0, 1], **settings)
    diverse = fvis.visualize(model, obj.channel("conv2") + 5.0 * obj.diversity("relu1"), [0, 1], **settings)
    forward = fvis.prepare(model, obj.channel("relu1"), [0]).forward
    acts = lambda result, u: np.asarray(jax.vmap(lambda x: forward(forward.weights(), x)["relu1"])(result.images[u]))
    for unit in range(2):  # measured: about 0.999 without, 0.06 with diversity
        assert gram_similarity(acts(plain, unit)) > 0.9 > 0.5 > gram_similarity(acts(diverse, unit))


def test_layer_checks_name_the_problem(tiny):
    with pytest.raises(InvalidTypeError, match="outputs shape \\(10,\\)"):
        fvis.prepare(tiny, obj.channel("logits"), [0])
    with pytest.raises(InvalidValueError, match="5 entries, layer 'conv2' has 16 channels"):
        fvis.prepare(tiny, obj.direction("conv2", np.ones((2, 5))), [0])
    job = fvis.prepare(tiny, obj.channel("conv2") - 0.1 * reg.total_variation() + obj.diversity("conv1"), "all",
                       images_per_unit=2)
    assert len(job.units) == 16  # regularizers and diversity take no unit; the channel sets the count
