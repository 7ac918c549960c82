"""Cheap initial values for Keras models built under the JAX backend.

Keras creates every variable from its initializer, eagerly: under JAX each random
initializer (and `jnp.zeros`/`jnp.ones` of each new shape) is a small XLA program
compiled on first use, ~30 programs for ResNet50V2 and ~115 for EfficientNet-Lite0,
seconds to tens of seconds of a cold start on a CPU. Three context managers avoid them:

- `skipped_initial_values()`, for a model whose weights are loaded right after it is
  built (both in the block): variables start as host zeros; when the block ends, any
  variable the load did not overwrite gets its real initial value, so a partial load
  behaves as it did without the context.
- `host_initial_values()`, for a model whose initial values ARE its weights
  (`weights=None`): Keras' own initializers run, but their random draws come from
  numpy and their constants are numpy arrays (see `host_initial_values`).
- `initial_values_in_one_program()`, where the initial values must stay Keras' own bits
  (the tiny test model, whose weights the golden outputs hold): constants on the host,
  every seeded random draw of the block in one compiled program.

Each patches Keras' variable class (`host_initial_values` also the random module of Keras'
initializers) for the duration of the block, in this process: build models in one thread
at a time.
"""

import contextlib
import dataclasses

import jax
import numpy as np
from keras.src import backend as keras_backend
from keras.src.initializers import constant_initializers, random_initializers
from keras.src.initializers.initializer import Initializer

from fvis import devices

_TRUNCATION = 2.0  # Keras' truncated_normal keeps draws within two standard deviations
_HOST_DTYPES = ("float16", "float32", "float64")  # numpy draws these; other dtypes use Keras' own programs


@dataclasses.dataclass
class Skipped:
    """What `skipped_initial_values` did.

    Attributes:
        entries: (variable, placeholder array, initializer) per variable built with a placeholder.
        refilled: paths of the variables nothing overwrote in the block, which were then given
            their initializer's value (filled when the block ends).
    """
    entries: list = dataclasses.field(default_factory=list)
    refilled: list = dataclasses.field(default_factory=list)

    def _finish(self):
        for variable, initializer in _unassigned(self.entries):
            _ORIGINAL(variable, initializer)
            self.refilled.append(variable.path)
        self.entries = []


_ORIGINAL = keras_backend.Variable._initialize_with_initializer


@contextlib.contextmanager
def skipped_initial_values():
    """Variables created in the block start as host zeros, not their initializers' values.

    For a model built and then overwritten in the block (`load_weights`,
    `weights="imagenet"`, a `.keras` file): no initializer program is compiled or run.
    When the block ends without an error, every variable nothing assigned in it gets its
    initializer's real value, so a load that misses variables leaves them as Keras would
    have. Initializers that are not Keras `Initializer`s (e.g. a seed generator's state)
    and distributed layouts keep Keras' own path.

    Yields:
        A `Skipped` record; its `refilled` lists the variables the block did not overwrite.
    """
    skipped = Skipped()

    def initialize(variable, initializer):
        if not (isinstance(initializer, Initializer) and _numpy_dtype(variable._dtype) and _no_layout(variable)):
            return _ORIGINAL(variable, initializer)
        skipped.entries.append((variable, _start_as_zeros(variable), initializer))

    with _patched(keras_backend.Variable, "_initialize_with_initializer", initialize):
        yield skipped
    skipped._finish()


@contextlib.contextmanager
def host_initial_values():
    """Keras' initializers compute their initial values on the host, in numpy.

    The values follow the same distributions as Keras' own but are not the same bits:
    Keras' `Initializer` classes run unchanged (so fans, scales and modes are Keras'
    own), while the three random draws they use are made with numpy, seeded with the
    initializer's integer seed (an initializer seeded with an int still gives the same
    values on every call):

    - normal(mean, stddev): `standard_normal * stddev + mean`;
    - truncated_normal(mean, stddev): a standard normal redrawn outside [-2, 2] (the
      same truncated distribution Keras' inverse-CDF draw samples), `* stddev + mean`;
    - uniform(minval, maxval): `minval + U[0, 1) * (maxval - minval)`.

    Zeros, Ones and scalar Constant are the same values as Keras'. Any other
    initializer, a `SeedGenerator` seed, a dtype numpy lacks (bfloat16) or a
    distributed layout keeps Keras' compiled path.
    """
    def initialize(variable, initializer):
        dtype = _numpy_dtype(variable._dtype)
        value = _host_value(initializer, tuple(variable._shape), dtype) if dtype and _no_layout(variable) else None
        if value is None:
            return _ORIGINAL(variable, initializer)
        variable._initialize(_on_device(np.asarray(value, dtype)))

    with _patched(keras_backend.Variable, "_initialize_with_initializer", initialize), \
            _patched(random_initializers, "random", _HostRandom(random_initializers.random)):
        yield


@contextlib.contextmanager
def initial_values_in_one_program():
    """Keras' own initial values, bit for bit, from one compiled program for the whole block.

    Zeros, Ones and scalar Constant initializers give their values on the host; random
    initializers with an integer seed (Keras gives each one such a seed from Python's
    global `random`, which `keras.utils.set_random_seed` seeds) start as host zeros, and
    when the block ends they are all drawn in one jitted program: the same JAX draws with
    the same keys, so the same bits as one small program per variable, at the cost of one
    compilation instead of one per shape (the tiny model: about ten programs), at fvis'
    XLA options (`fvis.devices.compiler_options`: on a CPU, level 1, where XLA's default
    level 3 takes seconds per random draw and gives the same bits). Use it
    around building a model, not around code that reads initial values (they are zeros
    until the block ends); a variable assigned in the block keeps what it was assigned.
    Other initializers (a `SeedGenerator` seed), dtypes numpy lacks and distributed
    layouts keep Keras' own path.
    """
    pending = []

    def initialize(variable, initializer):
        shape, dtype = tuple(variable._shape), _numpy_dtype(variable._dtype)
        if not (dtype and _no_layout(variable)):
            return _ORIGINAL(variable, initializer)
        value = _constant_value(initializer, shape, dtype)
        if value is not None:
            return variable._initialize(_on_device(value))
        if not (isinstance(initializer, random_initializers.RandomInitializer) and _int_seed(initializer.seed)):
            return _ORIGINAL(variable, initializer)
        pending.append((variable, _start_as_zeros(variable), initializer))

    with _patched(keras_backend.Variable, "_initialize_with_initializer", initialize):
        yield
    unassigned = _unassigned(pending)
    if unassigned:
        draw = lambda: [init(tuple(v._shape), dtype=v._dtype) for v, init in unassigned]
        values = jax.jit(draw, compiler_options=devices.compiler_options())()  # fvis' level: same bits
        for (variable, _), value in zip(unassigned, values):
            variable._initialize(value)


def _start_as_zeros(variable):
    """Gives the variable host zeros of its shape and dtype as a placeholder value; returns the placeholder."""
    variable._initialize(_on_device(np.zeros(tuple(variable._shape), _numpy_dtype(variable._dtype))))
    return variable._value


def _unassigned(entries):
    """(variable, initializer) of the (variable, placeholder, initializer) entries still holding their
    placeholder: nothing assigned them since they were built."""
    return [(variable, initializer) for variable, placeholder, initializer in entries
            if variable._value is placeholder]


def _constant_value(initializer, shape, dtype):
    """Zeros, Ones and scalar Constant initializers' values in numpy (Keras' values), else None."""
    if type(initializer) is constant_initializers.Zeros:
        return np.zeros(shape, dtype)
    if type(initializer) is constant_initializers.Ones:
        return np.ones(shape, dtype)
    if type(initializer) is constant_initializers.Constant and np.ndim(initializer.value) == 0:
        return np.full(shape, initializer.value, dtype)
    return None


def _int_seed(seed):
    return isinstance(seed, int) and not isinstance(seed, bool)


def _host_value(initializer, shape, dtype):
    """`initializer(shape)` computed in numpy, or None where that would not be Keras' value or distribution."""
    constant = _constant_value(initializer, shape, dtype)
    if constant is not None:
        return constant
    random_class = isinstance(initializer, random_initializers.RandomInitializer)
    if random_class and isinstance(initializer.seed, int) and dtype.name in _HOST_DTYPES:
        return initializer(shape, dtype=dtype.name)  # draws through `_HostRandom`
    return None


class _HostRandom:
    """Stands in for Keras' backend random module inside its initializers: normal,
    truncated_normal and uniform drawn with numpy for integer seeds; everything else
    (and other seeds) is the real module's."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)

    def normal(self, shape, mean=0.0, stddev=1.0, dtype=None, seed=None):
        if not _host_draw(seed, dtype):
            return self._module.normal(shape, mean=mean, stddev=stddev, dtype=dtype, seed=seed)
        return _cast(np.random.default_rng(seed).standard_normal(shape) * stddev + mean, dtype)

    def truncated_normal(self, shape, mean=0.0, stddev=1.0, dtype=None, seed=None):
        if not _host_draw(seed, dtype):
            return self._module.truncated_normal(shape, mean=mean, stddev=stddev, dtype=dtype, seed=seed)
        return _cast(truncated_standard_normal(np.random.default_rng(seed), shape) * stddev + mean, dtype)

    def uniform(self, shape, minval=0.0, maxval=1.0, dtype=None, seed=None):
        if not _host_draw(seed, dtype):
            return self._module.uniform(shape, minval=minval, maxval=maxval, dtype=dtype, seed=seed)
        return _cast(minval + np.random.default_rng(seed).random(shape) * (maxval - minval), dtype)


def truncated_standard_normal(rng, shape):
    """Standard normal draws truncated to [-2, 2] (rejection: out-of-range draws are drawn again).

    Args:
        rng: a `numpy.random.Generator`.
        shape: the output shape.

    Returns:
        float64 array of `shape`.
    """
    x = rng.standard_normal(shape)
    out = np.abs(x) > _TRUNCATION
    while out.any():
        x[out] = rng.standard_normal(int(out.sum()))
        out = np.abs(x) > _TRUNCATION
    return x


def _host_draw(seed, dtype):
    return _int_seed(seed) and (dtype or keras_backend.floatx()) in _HOST_DTYPES


def _cast(value, dtype):
    return value.astype(dtype or keras_backend.floatx())


def _on_device(array):
    """A numpy array as an uncommitted JAX array, by a plain copy (`jnp.asarray` compiles a small
    program per shape for it)."""
    return jax.device_put(array)


def _numpy_dtype(dtype):
    """The numpy dtype for a Keras dtype name, or None (bfloat16 and other dtypes numpy lacks)."""
    try:
        return np.dtype(dtype)
    except TypeError:
        return None


def _no_layout(variable):
    """Whether the variable has no distributed layout (then Keras creates it on one device, as here)."""
    variable._initialize_layout()
    return variable._layout is None


@contextlib.contextmanager
def _patched(owner, name, value):
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)
