"""Hostile inputs for the Winograd rewrite (`fvis.models.winograd`, `Rewrites.winograd`): convolutions it must
leave to the library, the edges of the sizes it picks, Flax padding forms, and whole jobs with it on and off."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fvis
from fvis.models import winograd


def _relative(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def _forward_with(forward, **rewrites):
    return dataclasses.replace(forward, rewrites=fvis.models.Rewrites(**rewrites))


def _dots(forward, weights, x, path):
    """Batched matrix products in the forward program: Winograd's (the library convolution has none)."""
    return jax.jit(lambda x: forward(weights, x)[path]).lower(x).as_text().count("stablehlo.dot_general")


def _nnx_conv_net(conv):
    """An NNX model: a 3x3 'SAME' nnx.Conv 3 -> 32 (too few channels in for Winograd), ReLU, then `conv(rngs)`
    (a callable: the module's second layer, called on the first's output)."""
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Conv(3, 32, (3, 3), padding="SAME", rngs=rngs)
            self.b = conv(rngs)

        def __call__(self, x):
            return self.b(nnx.relu(self.a(x)))

    return Net


@pytest.mark.parametrize("rewrites", [dict(winograd=True), dict(cpu_ops=True), dict(cpu_ops=True, winograd=True)])
@pytest.mark.parametrize("rank", [1, 3])
def test_flax_1d_and_3d_convolutions_pass_through_the_cpu_rewrites(rank, rewrites):
    """A 1-D or 3-D nnx.Conv in an image model: the CPU rewrites (on by default on CPU) leave it to lax,
    with the values of the model without them, rather than failing on NHWC dimension numbers."""
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Conv(3, 32, (3, 3), padding="SAME", rngs=rngs)
            self.b = nnx.Conv(32, 32, (3,) * rank, padding="SAME", rngs=rngs)

        def __call__(self, x):
            y = nnx.relu(self.a(x))
            shape = (-1, 32) if rank == 1 else (20, 20, 1, 32)  # a sequence of 400 pixels, or a 20x20x1 volume
            return self.b(y.reshape(*y.shape[:-3], *shape))

    forward = fvis.models.from_nnx(Net(nnx.Rngs(0)), image_size=(20, 20)).forward(["b"])
    w = forward.weights()
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (20, 20, 3)), jnp.float32)
    ours, plain = _forward_with(forward, **rewrites), _forward_with(forward)
    expected = jax.jit(lambda x: plain(w, x)["b"])(x)
    assert _relative(jax.jit(lambda x: ours(w, x)["b"])(x), expected) < 1e-6
