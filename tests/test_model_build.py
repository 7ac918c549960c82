"""Building Keras models without compiling their initializers: loaded weights are the file's, a
load that misses variables leaves Keras' initial values, and random weights keep Keras' distributions."""

import math

import h5py
import jax
import keras
import numpy as np
import pytest

from fvis import models
from fvis.models import keras_init
from tests.conftest import shared_path

ALPHA = 1e-6  # false-alarm rate of each statistical check
SHAPE = (3, 3, 64, 128)  # a conv kernel: fan_in 576, fan_out 1152
FAN_IN, FAN_OUT = 3 * 3 * 64, 3 * 3 * 128
N = math.prod(SHAPE)


class Compiles:
    """Counts XLA compilations while it is active."""

    def __init__(self):
        self.count, self.active = 0, False
        jax.monitoring.register_event_duration_secs_listener(self._event)

    def _event(self, event, duration, **kwargs):
        if self.active and event == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __enter__(self):
        self.count, self.active = 0, True
        return self

    def __exit__(self, *exc):
        self.active = False


@pytest.fixture(scope="module")
def compiles():
    return Compiles()


def _file_arrays(path):
    arrays = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: arrays.append(obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return arrays


def _keyed(arrays):
    return sorted((a.shape, a.dtype.str, a.tobytes()) for a in map(np.asarray, arrays))


def test_mobilenet_weights_file_fills_every_variable(compiles):
    """Every weight of MobileNet built from a weights file is one of the file's arrays (all of them used once),
    and no initializer program was compiled for values the file replaces."""
    path = shared_path("weights", "mobilenet_0.25_224.weights.h5")
    with compiles:
        model = models.keras_application("MobileNet", alpha=0.25, weights=str(path), include_top=True,
                                         image_size=(224, 224))
    assert compiles.count <= 2  # Keras' own initializers compile ~28 programs here
    weights = [v.value for v in model.model.weights]
    assert _keyed(weights) == _keyed(_file_arrays(path))
    assert not any(np.all(np.asarray(w) == 0) for w in weights)


def _small_model():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Dropout(0.5, name="drop")(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="dense")(x))


def test_saved_keras_file_restores_every_variable(tmp_path):
    """A `.keras` file loads with each variable equal to the saved model's (BatchNorm statistics included)."""
    original = _small_model()
    rng = np.random.default_rng(0)
    for v in original.variables:
        if v.dtype == "float32":
            v.assign(rng.normal(1.0, 0.5, v.shape).astype("float32"))
    original.save(tmp_path / "m.keras")
    loaded = models.saved_model(tmp_path / "m.keras", image_size=(8, 8)).model
    assert len(loaded.weights) == len(original.weights) == 8
    for a, b in zip(loaded.weights, original.weights, strict=True):
        assert a.path == b.path
        np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value))


def test_variables_a_load_misses_get_keras_initial_values():
    """Inside `skipped_initial_values`, a variable nothing assigns gets its initializer's value at the end."""
    kernel = np.arange(3 * 3 * 3 * 4, dtype="float32").reshape(3, 3, 3, 4)
    with keras_init.skipped_initial_values() as skipped:
        model = _small_model()
        model.get_layer("conv").kernel.assign(kernel)
    np.testing.assert_array_equal(np.asarray(model.get_layer("conv").kernel.value), kernel)
    bn = model.get_layer("bn")
    for variable, value in ((bn.gamma, 1.0), (bn.beta, 0.0), (bn.moving_mean, 0.0), (bn.moving_variance, 1.0),
                            (model.get_layer("conv").bias, 0.0)):
        np.testing.assert_array_equal(np.asarray(variable.value), np.full(variable.shape, value, "float32"))
    dense = np.asarray(model.get_layer("dense").kernel.value)  # glorot uniform, limit sqrt(6 / (4 + 2))
    assert 0 < np.abs(dense).max() <= 1.0 and np.std(dense) > 0.1
    assert sorted(skipped.refilled) == sorted(v.path for v in model.weights if v.path != "conv/kernel")


def _normal_cdf(z):
    return 0.5 * (1 + np.vectorize(math.erf)(np.asarray(z) / math.sqrt(2)))


def _truncated_cdf(mean, sd):
    """CDF of a normal(mean, sd) truncated to mean +- 2 sd."""
    lo, hi = _normal_cdf(-2.0), _normal_cdf(2.0)
    return lambda x: np.clip((_normal_cdf((x - mean) / sd) - lo) / (hi - lo), 0, 1)


def _uniform(lo, hi):
    return dict(cdf=lambda x: np.clip((x - lo) / (hi - lo), 0, 1), low=lo, high=hi,
                mean=(lo + hi) / 2, std=(hi - lo) / math.sqrt(12))


def _truncated(mean, sd):
    # variance of a standard normal truncated to [-2, 2]: 1 - 2 * 2 phi(2) / (2 Phi(2) - 1)
    phi2 = math.exp(-2) / math.sqrt(2 * math.pi)
    std = sd * math.sqrt(1 - 4 * phi2 / (math.erf(2 / math.sqrt(2))))
    return dict(cdf=_truncated_cdf(mean, sd), low=mean - 2 * sd, high=mean + 2 * sd, mean=mean, std=std)


def _normal(mean, sd):
    return dict(cdf=lambda x: _normal_cdf((x - mean) / sd), low=-np.inf, high=np.inf, mean=mean, std=sd)


# initializer -> its distribution, worked out from Keras' documented definitions
DISTRIBUTIONS = {
    "glorot_uniform": (lambda s: keras.initializers.GlorotUniform(seed=s),
                       _uniform(-math.sqrt(6 / (FAN_IN + FAN_OUT)), math.sqrt(6 / (FAN_IN + FAN_OUT)))),
    "he_normal": (lambda s: keras.initializers.HeNormal(seed=s),
                  _truncated(0.0, math.sqrt(2 / FAN_IN) / 0.87962566103423978)),
    "lecun_uniform": (lambda s: keras.initializers.LecunUniform(seed=s),
                      _uniform(-math.sqrt(3 / FAN_IN), math.sqrt(3 / FAN_IN))),
    "variance_scaling_normal": (lambda s: keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal",
                                                                             seed=s),
                                _normal(0.0, math.sqrt(2 / FAN_OUT))),
    "random_normal": (lambda s: keras.initializers.RandomNormal(0.5, 0.2, seed=s), _normal(0.5, 0.2)),
    "truncated_normal": (lambda s: keras.initializers.TruncatedNormal(1.0, 0.3, seed=s), _truncated(1.0, 0.3)),
    "random_uniform": (lambda s: keras.initializers.RandomUniform(-0.2, 0.6, seed=s), _uniform(-0.2, 0.6)),
}


def check_distribution(values, dist):
    """Support, mean, std and the Kolmogorov-Smirnov distance of `values` against `dist`, each at ALPHA."""
    x = np.sort(np.asarray(values, "float64").ravel())
    n, z = x.size, math.sqrt(2) * _erfinv(1 - ALPHA)  # two-sided normal quantile
    assert dist["low"] <= x[0] and x[-1] <= dist["high"]
    assert abs(x.mean() - dist["mean"]) <= z * dist["std"] / math.sqrt(n)
    assert abs(x.std() - dist["std"]) <= z * dist["std"] / math.sqrt(2 * n)  # SE of a std at kurtosis <= 3
    f = dist["cdf"](x)
    ks = max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n))
    assert ks <= math.sqrt(-math.log(ALPHA / 2) / (2 * n)), ks


def _erfinv(y):
    lo, hi = 0.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if math.erf(mid) < y else (lo, mid)
    return lo


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_host_initial_values_keep_keras_distributions(name, compiles):
    """Host-drawn initial values follow the initializer's distribution (as Keras' own draws do), without
    compiling anything; an integer seed gives the same values again, another seed other values."""
    make, dist = DISTRIBUTIONS[name]
    with keras_init.host_initial_values(), compiles:
        host = [keras.Variable(make(seed), shape=SHAPE, dtype="float32") for seed in (7, 7, 8)]
    assert compiles.count == 0
    check_distribution(host[0].value, dist)
    np.testing.assert_array_equal(np.asarray(host[0].value), np.asarray(host[1].value))
    assert not np.array_equal(np.asarray(host[0].value), np.asarray(host[2].value))
    check_distribution(make(7)(SHAPE, dtype="float32"), dist)  # the oracle holds for Keras' own draws too


def test_random_resnet_has_keras_initial_values(compiles):
    """ResNet50V2 with weights=None: a conv kernel is glorot-uniform, BatchNorm starts at gamma 1, beta 0,
    moving mean 0, variance 1, with next to no compiled programs."""
    with compiles:
        model = models.keras_application("ResNet50V2", weights=None, image_size=(32, 32)).model
    assert compiles.count <= 2  # Keras' own initializers compile ~28 programs here
    kernel = model.get_layer("conv3_block1_2_conv").kernel  # (3, 3, 128, 128)
    fan_in, fan_out = 3 * 3 * 128, 3 * 3 * 128
    limit = math.sqrt(6 / (fan_in + fan_out))
    check_distribution(kernel.value, _uniform(-limit, limit))
    bn = model.get_layer("conv3_block1_preact_bn")
    for variable, value in ((bn.gamma, 1.0), (bn.beta, 0.0), (bn.moving_mean, 0.0), (bn.moving_variance, 1.0)):
        np.testing.assert_array_equal(np.asarray(variable.value), np.full(variable.shape, value, "float32"))


def _seeded_small_model(seed):
    keras.utils.set_random_seed(seed)  # every initializer gets an integer seed from Python's `random`
    return _small_model()


def test_initial_values_in_one_program_are_keras_own_bits(compiles):
    """Inside `initial_values_in_one_program`, a model's initial values are the ones Keras' own path gives,
    bit for bit, from one compiled program (Keras compiles one per random initializer and constant shape);
    a variable assigned in the block keeps what it was assigned."""
    own = [np.asarray(v.value) for v in _seeded_small_model(3).weights]
    with compiles:
        with keras_init.initial_values_in_one_program():
            model = _seeded_small_model(3)
            model.get_layer("dense").bias.assign(np.array([5.0, 6.0], "float32"))
    assert compiles.count == 1
    for variable, value in zip(model.weights, own, strict=True):
        expected = np.array([5.0, 6.0], "float32") if variable.path == "dense/bias" else value
        np.testing.assert_array_equal(np.asarray(variable.value), expected, err_msg=variable.path)
        assert variable.value.dtype == expected.dtype
    assert np.std(np.asarray(model.get_layer("conv").kernel.value)) > 0.1  # drawn, not the zeros it started as
