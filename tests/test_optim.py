"""The optimisers: the learning rate held in the optimiser state gives the updates of the rate compiled
in, bit for bit, and a step program that does not depend on it."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fvis import optim
from fvis.errors import InvalidValueError

FACTORIES = {"normalized_ascent": (optim.normalized_ascent, 10), "adam": (optax.adam, 0.05),
             "nadam": (optax.nadam, 0.05), "sgd_momentum": (lambda learning_rate: optax.sgd(learning_rate, 0.9), 0.3),
             "adamw": (optax.adamw, 0.05)}


def three_updates(optimizer, grads):
    """The parameters after three updates from zero, one gradient per update, in one compiled program:
    (3, ...) float32."""
    def run(grads):
        params = jnp.zeros_like(grads[0])
        state = optimizer.init(params)
        out = []
        for g in grads:
            updates, state = optimizer.update(g, state, params)
            params = optax.apply_updates(params, updates)
            out.append(params)
        return jnp.stack(out)
    return np.asarray(jax.jit(run)(grads))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_rate_in_state_gives_the_updates_of_the_rate_compiled_in(name):
    factory, rate = FACTORIES[name]
    grads = jax.random.normal(jax.random.key(0), (3, 4, 5, 3))
    held = optim.learning_rate_in_state(factory, learning_rate=rate)
    assert isinstance(held.init(jnp.zeros(2)), optax.InjectStatefulHyperparamsState)
    assert held.init(jnp.zeros(2)).hyperparams["learning_rate"] == np.float32(rate)
    np.testing.assert_array_equal(three_updates(held, grads), three_updates(factory(learning_rate=rate), grads))


def test_the_step_program_is_the_same_for_every_rate():
    """Lowered for two rates, the update is one program; with the rate compiled in, two."""
    params, grads = jnp.zeros((4, 3)), jnp.ones((4, 3))

    def update_text(optimizer):
        state = optimizer.init(params)
        return jax.jit(optimizer.update).lower(grads, state, params).as_text()

    for factory in (optim.normalized_ascent, optax.adam):
        held = [optim.learning_rate_in_state(factory, learning_rate=r) for r in (1.0, 5.0)]
        assert update_text(held[0]) == update_text(held[1])
        assert update_text(factory(learning_rate=1.0)) != update_text(factory(learning_rate=5.0))


def needs_a_number(learning_rate=1.0):
    """A user's optimiser that reads its rate as a Python number."""
    return optax.scale(-float(learning_rate))


def checks_its_type(learning_rate=1.0):
    """A user's optimiser that refuses anything but a Python number, with a ValueError."""
    if not isinstance(learning_rate, (int, float)):
        raise ValueError(f"learning_rate must be a Python number, got {type(learning_rate).__name__}")
    return optax.sgd(learning_rate)


def wants_images(learning_rate=1.0):
    """A user's optimiser whose update asserts image-shaped (H, W, C) parameters."""
    def update(updates, state, params=None):
        assert updates.ndim >= 3, "image-shaped parameters only"
        return jax.tree.map(lambda u: -learning_rate * u, updates), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


@pytest.mark.parametrize("factory, kwargs", [
    (needs_a_number, {"learning_rate": 2.0}),  # fails when traced with an array
    (checks_its_type, {"learning_rate": 2.0}),  # refuses the traced rate with a ValueError
    (optax.adam, {"learning_rate": optax.constant_schedule(0.1)}),  # a schedule: the factory keeps it
    (lambda *args, **kwargs: optax.adam(*args, **kwargs), {"learning_rate": 0.1}),  # no signature to bind
])
def test_factories_it_cannot_wrap_are_returned_as_they_are(factory, kwargs):
    """The factory's own transformation, whose update runs (no traced rate reaches it)."""
    optimizer = optim.learning_rate_in_state(factory, **kwargs)
    assert not isinstance(optimizer.init(jnp.zeros(2)), optax.InjectStatefulHyperparamsState)
    updates, _ = optimizer.update(jnp.ones(2), optimizer.init(jnp.zeros(2)), jnp.zeros(2))
    assert updates.shape == (2,)


def test_an_optimiser_for_image_shaped_parameters_is_probed_with_an_image_shape():
    """The check that the rate can be traced runs the optimiser on an (H, W, C)-shaped probe."""
    optimizer = optim.learning_rate_in_state(wants_images, learning_rate=2.0)
    assert isinstance(optimizer.init(jnp.zeros((2, 2, 3))), optax.InjectStatefulHyperparamsState)


@pytest.mark.parametrize("rate", [0, -1, float("nan"), float("inf"), 1e39, "fast", "0.05", True, None])
def test_a_bad_rate_is_refused_naming_it(rate):
    """Not a number > 0 that float32 holds: a string (even of a number), a bool, 1e39 (inf in float32)."""
    for build in (lambda: optim.normalized_ascent(rate),
                  lambda: optim.learning_rate_in_state(optim.normalized_ascent, learning_rate=rate)):
        with pytest.raises(InvalidValueError, match=re.escape(f"Received: lr={rate!r}")):
            build()
