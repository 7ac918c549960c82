"""Flax models (NNX and linen) behind the model interface (`fvis.models.base.VisModel`).

    model = fvis.models.from_nnx(MyCNN(rngs=nnx.Rngs(0)), image_size=(64, 64), input_space="unit")
    model = fvis.models.from_linen(module, variables, image_size=(64, 64))
    fvis.visualize(model, "blocks/3/conv", units="0:16")

A layer path is a module path joined by "/": the output of `blocks[3].conv`'s
`__call__` is "blocks/3/conv"; another method's output adds its name
("encoder/features"), a value stored with `sow` adds the sow's name, and the
whole model's output is "output". A module called several times (or returning
several arrays) takes a ":i" suffix per value. Flax layers are channels-last,
so the activations are read as they are.

Every call is in inference mode, whatever the module's own flags: NNX modules
are viewed with `use_running_average=True` and `deterministic=True`
(`nnx.view`), linen BatchNorm and Dropout get the same flags at call time; no
state is written back and no RNG is drawn. The weights (the module's state or
the linen variables) are an argument of the compiled call: the NNX module is
split with `nnx.split` and merged inside the traced function.
"""

import functools
import importlib
from importlib import metadata
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

from fvis.errors import InvalidTypeError, InvalidValueError, MissingFileError, UnknownNameError, did_you_mean
from fvis.models import slices
from fvis.models import winograd as winograd_lib
from fvis.models.base import VisModel, check_channels, check_image_size

OUTPUT = "output"  # the path of the whole model's output


def require_flax():
    """Imports Flax (only when a Flax model is built: importing it takes a second); raises
    InvalidTypeError, saying how to install it, where the extra `fvis[flax]` is missing."""
    try:
        import flax.linen  # noqa: F401
        import flax.nnx  # noqa: F401
        import orbax.checkpoint  # noqa: F401
    except ImportError as e:
        raise InvalidTypeError("Flax models need the optional dependencies: pip install 'fvis[flax]' "
                               "(flax and orbax-checkpoint).") from e


class FlaxModel(VisModel):
    """A Flax NNX module, or a linen module with its variables, behind fvis' model interface.

    Built by `from_nnx`, `from_linen` or `flax_model`. `Rewrites.precision`
    "bfloat16" casts the weights and the image to bfloat16 inside the call (so every
    layer computes in bfloat16) and returns float32 activations. `Rewrites.cpu_ops`
    runs the stride-1 1x1 `nnx.Conv`s of an NNX module as dot products, as it does for
    Keras (`fvis.models.keras_ops`: the same values, faster gradients on XLA's CPU
    backend, and the same arithmetic as the Keras twin of a model), `Rewrites.winograd`
    its 3x3 ones by Winograd (`fvis.models.winograd`); they leave max pooling (a
    function in Flax, not a module) and linen modules as they are.

    Attributes:
        module: the user's `nnx.Module` or `linen.Module`, never modified.
        input_space, image_size, channels, name: see `VisModel`.
    """

    def __init__(self, source, *, input_space, image_size, channels, name):
        super().__init__(input_space=input_space, image_size=image_size, channels=channels, name=name)
        self._source = source
        self.module = source.module
        self._listing = None

    def __repr__(self):
        return (f"FlaxModel({self.name!r}, {type(self.module).__name__}, input_space={self.input_space!r}, "
                f"image_size={self.image_size}, channels={self.channels})")

    def _layers(self):
        """{path: shape without batch} in the order the model computes them, and the grouped-conv flag."""
        if self._listing is None:
            x = jax.ShapeDtypeStruct((2, *self.image_size, self.channels), jnp.float32)  # 2: tells the batch axis
            run, names = self._source.capture(), []

            def leaves(weights, x):
                found = run(weights, x)
                names[:] = found
                return list(found.values())

            jaxpr, shapes = jax.make_jaxpr(leaves, return_shape=True)(self._source.weights(), x)
            order = _computation_order(jaxpr.jaxpr)
            listed = sorted(range(len(names)), key=lambda i: (order[i], -names[i].count("/")))  # inner first
            layers = {names[i]: tuple(shapes[i].shape[1:]) for i in listed
                      if shapes[i].ndim >= 1 and shapes[i].shape[0] == 2}
            self._listing = layers, _has_grouped_conv(jaxpr.jaxpr)
        return self._listing

    def layer_paths(self):
        return list(self._layers()[0])

    def output_shapes(self, paths):
        layers = self._layers()[0]
        for path in paths:
            if not isinstance(path, str):
                raise InvalidTypeError(f"A layer path is a string such as 'blocks/3/conv'. Received: {path!r}")
            if path not in layers:
                raise UnknownNameError(did_you_mean(path, layers, kind="layer"))
        return {p: layers[p] for p in paths}

    def feature_map_paths(self):
        return [p for p, shape in self._layers()[0].items() if len(shape) == 3]

    def weights(self, paths):
        return self._source.weights()

    def call(self, paths, rewrites):
        float32 = rewrites.precision == "float32"
        run = self._source.capture(cpu_ops=rewrites.cpu_ops, winograd=rewrites.winograd and float32, float32=float32)
        paths = list(paths)

        def fn(weights, x):
            weights, x = _cast((weights, x), jnp.float32 if float32 else jnp.bfloat16)
            found = run(weights, x)
            return [found[p].astype(jnp.float32) for p in paths]

        return fn

    @property
    def default_path(self):
        return OUTPUT if OUTPUT in self._layers()[0] else self.layer_paths()[-1]

    @property
    def has_grouped_convolutions(self):
        return self._layers()[1]


def _cast(tree, dtype):
    """Floating-point leaves of `tree` as `dtype`; others (integers, RNG keys) as they are."""
    floating = lambda a: jnp.issubdtype(a.dtype, jnp.floating)
    return jax.tree_util.tree_map(lambda a: a.astype(dtype) if floating(a) else a, tree)


def _computation_order(jaxpr):
    """For each output of `jaxpr`, the index of the equation computing it (-1: an input or constant)."""
    made = {v: i for i, eqn in enumerate(jaxpr.eqns) for v in eqn.outvars}
    return [made.get(v, -1) if isinstance(v, jax_core.Var) else -1 for v in jaxpr.outvars]


def _has_grouped_conv(jaxpr):
    """Whether a convolution in `jaxpr` (nested calls included) has feature groups (depthwise, grouped)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated" and eqn.params["feature_group_count"] > 1:
            return True
        for sub in jax_core.jaxprs_in_params(eqn.params):
            if _has_grouped_conv(sub):
                return True
    return False


def _paths(captured):
    """{layer path: array} from a nested capture dict ({name: {"__call__": (value, ...)}, ...})."""
    entries = {}

    def walk(tree, prefix):
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, (*prefix, str(key)))
            else:
                parts = prefix if key == "__call__" else (*prefix, str(key))
                entries["/".join(parts)] = jax.tree_util.tree_leaves(value)

    walk(captured, ())
    top = entries.pop("", None)
    if top is not None:
        entries["__call__" if OUTPUT in entries else OUTPUT] = top
    found = {}
    for path, leaves in entries.items():
        found.update({path: leaves[0]} if len(leaves) == 1 else {f"{path}:{i}": a for i, a in enumerate(leaves)})
    return found


class _Nnx:
    """An NNX module, viewed in inference mode, as (weights, capture)."""

    def __init__(self, module):
        self.module = module

    def _split(self):
        from flax import nnx

        viewed = nnx.view(self.module, use_running_average=True, deterministic=True, raise_if_not_found=False)
        return nnx.split(viewed, nnx.RngState, ...)  # RNG keys stay out of the weights (never drawn)

    def weights(self):
        return self._split()[2]

    def capture(self, cpu_ops=False, float32=False, winograd=False):
        """`run(weights, x) -> {path: output}`; `cpu_ops` runs 1x1 convolutions as dots and depthwise
        ones as slices, `winograd` the 3x3 ones `fvis.models.winograd.worthwhile` picks by Winograd,
        `float32` makes every layer built with a 16-bit `dtype` compute in float32 (on a copy)."""
        from flax import nnx

        graphdef, rng_state, _ = self._split()
        conv = functools.partial(_cpu_conv, cpu_ops=cpu_ops, winograd=winograd)

        def run(state, x):
            module = nnx.merge(graphdef, rng_state, state)  # a copy, inside the trace: it may be changed
            for _, layer in nnx.iter_modules(module):
                if (cpu_ops or winograd) and isinstance(layer, nnx.Conv):
                    layer.conv_general_dilated = conv
                if float32 and getattr(layer, "dtype", None) is not None:
                    layer.dtype = jnp.float32  # a layer built to compute in (b)float16
            before = _state_leaves(module)
            _, captured = nnx.capture(module, nnx.Intermediate, method_outputs=nnx.Intermediate)(x)
            _check_unchanged(before, _state_leaves(module), type(self.module).__name__)
            return _paths(captured.to_pure_dict())

        return run


def _cpu_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
              dimension_numbers=None, feature_group_count=1, precision=None, *, cpu_ops=True, winograd=False,
              **kwargs):
    """`lax.conv_general_dilated` with, under `cpu_ops`, a stride-1 1x1 NHWC convolution as a dot product
    (`keras_ops.conv_pointwise_as_dot`'s arithmetic) and an NHWC depthwise convolution as slices
    (`fvis.models.slices.depthwise_conv`), and under `winograd` an NHWC stride-1 3x3 one that
    `winograd.worthwhile` picks by Winograd (`keras_ops.conv_3x3_by_winograd`'s arithmetic); any
    other convolution is passed on unchanged."""
    ones = lambda v: v is None or all(d == 1 for d in v)
    nhwc = (jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
            if lhs.ndim == rhs.ndim == 4 else None)  # a 1-D or 3-D convolution is never NHWC
    pointwise = (rhs.ndim == 4 and rhs.shape[:2] == (1, 1) and ones(window_strides) and ones(lhs_dilation)
                 and ones(rhs_dilation) and feature_group_count == 1 and precision is None
                 and all(v is None for v in kwargs.values())
                 and (isinstance(padding, str) or all(tuple(p) == (0, 0) for p in padding))  # 1x1: no padding
                 and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc)
    plain = (ones(lhs_dilation) and precision is None and all(v is None for v in kwargs.values())
             and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc)
    depthwise = (cpu_ops and plain and feature_group_count == lhs.shape[-1] > 1 and rhs.shape[-2] == 1
                 and (padding in ("SAME", "VALID") or not isinstance(padding, str)))
    if plain and (winograd or depthwise):
        spatial = lhs.shape[1:-1]
        strides = tuple(window_strides or (1,) * len(spatial))
        dilation = tuple(rhs_dilation or (1,) * len(spatial))
        extent = [(w - 1) * d + 1 for w, d in zip(rhs.shape[:-2], dilation)]
        pads = (jax.lax.padtype_to_pads(spatial, extent, strides, padding) if isinstance(padding, str)
                else [tuple(int(v) for v in p) for p in padding])
        if winograd and winograd_lib.takes(lhs.shape, rhs.shape, strides, dilation, pads):
            return winograd_lib.conv3x3(lhs, rhs, pads)
        if depthwise:  # HWIO (kh, kw, 1, C * m) -> (kh, kw, C, m): output channel i * m + j in both
            kernel = rhs.reshape(*rhs.shape[:-2], lhs.shape[-1], rhs.shape[-1] // lhs.shape[-1])
            return slices.depthwise_conv(lhs, kernel, strides, pads, dilation)
    if not (cpu_ops and pointwise):
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                            dimension_numbers, feature_group_count, precision=precision, **kwargs)
    return jnp.tensordot(lhs, rhs.reshape(rhs.shape[-2:]), axes=1)


def _state_leaves(module):
    from flax import nnx

    state = nnx.state(module, nnx.Not(nnx.Intermediate))
    return {jax.tree_util.keystr(p): a for p, a in jax.tree_util.tree_leaves_with_path(state)}


def _check_unchanged(before, after, name):
    """Refuses a module that wrote its state while called: it ran in training mode."""
    written = [path for path, value in after.items() if before.get(path) is not value]
    if written:
        raise InvalidValueError(
            f"Module {name} writes its state when called ({', '.join(written[:3])}), so it runs in training "
            "mode: BatchNorm with batch statistics, or Dropout drawing random numbers. fvis sets "
            "use_running_average=True and deterministic=True on every submodule (nnx.view); a module that "
            "passes these flags when it calls its layers must take them from its own attributes "
            f"(e.g. self.bn(x) rather than self.bn(x, use_running_average=False)). Received: {name}")


class _Linen:
    """A linen module and its variables, called in inference mode, as (weights, capture)."""

    def __init__(self, module, variables, call_kwargs):
        self.module, self.variables, self.call_kwargs = module, variables, dict(call_kwargs or {})

    def weights(self):
        return self.variables

    def capture(self, cpu_ops=False, float32=False, winograd=False):
        """See `_Nnx.capture` (`cpu_ops` and `winograd` are for NNX modules only); a Linen module's
        `dtype` fields are frozen, so `float32` casts only the weights and the input (a layer built
        with dtype=float16 stays float16, and `Forward.facts` records it)."""
        import flax
        import flax.linen as nn

        def run(variables, x):
            try:
                with nn.intercept_methods(_linen_inference):
                    _, state = self.module.apply(variables, x, capture_intermediates=True,
                                                 mutable=["intermediates"], **self.call_kwargs)
            except (flax.errors.ModifyScopeVariableError, flax.errors.InvalidRngError) as e:
                raise InvalidValueError(
                    f"Linen module {type(self.module).__name__} runs in training mode ({e.__class__.__name__}: "
                    f"{str(e).splitlines()[0]}). fvis calls BatchNorm with use_running_average=True and Dropout "
                    "with deterministic=True unless the module fixes them as attributes; pass the module's own "
                    "flag, e.g. call_kwargs={'train': False}. Received: "
                    f"call_kwargs={self.call_kwargs}") from e
            return _paths(flax.core.unfreeze(state["intermediates"]))

        return run


def _linen_inference(next_fun, args, kwargs, context):
    """Interceptor: linen BatchNorm and Dropout run in inference mode where the call decides."""
    import flax.linen as nn

    module = context.module
    if context.method_name == "__call__":
        if isinstance(module, nn.BatchNorm) and module.use_running_average is None:
            args, kwargs = args[:1], {**kwargs, "use_running_average": True}
        elif isinstance(module, nn.Dropout) and module.deterministic is None:
            args, kwargs = args[:1], {**kwargs, "deterministic": True}
    return next_fun(*args, **kwargs)


def from_nnx(module, *, image_size, input_space="tf", channels=3, name=None):
    """A Flax NNX module as a `VisModel`.

    Args:
        module: an `nnx.Module` taking (N, H, W, C) float32 images, channels-last.
            It is used as it is (not copied): weights changed later are those visualized.
        image_size: (H, W) of the optimised images.
        input_space: the module's input range (see `fvis.models.INPUT_SPACES`).
        channels: image channels, 1 or 3.
        name: label for outputs; default the module's class name.

    Raises:
        InvalidTypeError: not an `nnx.Module`, or Flax not installed.
        InvalidValueError, UnknownNameError: bad arguments; a module that writes its state
            when called (training mode), when its layers are listed.
    """
    require_flax()
    from flax import nnx

    if not isinstance(module, nnx.Module):
        raise InvalidTypeError(f"from_nnx takes a flax.nnx.Module (for a linen module use from_linen). "
                               f"Received: {type(module).__name__}")
    return FlaxModel(_Nnx(module), input_space=input_space, image_size=check_image_size(image_size),
                     channels=check_channels(channels), name=name or type(module).__name__)


def from_linen(module, variables, *, image_size, input_space="tf", channels=3, call_kwargs=None, name=None):
    """A flax.linen module with its variables as a `VisModel`.

    Args:
        module: a `linen.Module` taking (N, H, W, C) float32 images, channels-last.
        variables: its variables ({"params": ..., "batch_stats": ...}), e.g. from `module.init`.
        image_size, input_space, channels, name: see `from_nnx`.
        call_kwargs: keyword arguments of every call, e.g. {"train": False} for a module
            whose own flag decides BatchNorm's and Dropout's mode.

    Raises:
        InvalidTypeError: not a `linen.Module`, or Flax not installed.
    """
    require_flax()
    import flax.linen as nn

    if not isinstance(module, nn.Module):
        raise InvalidTypeError(f"from_linen takes a flax.linen.Module (for an NNX module use from_nnx). "
                               f"Received: {type(module).__name__}")
    return FlaxModel(_Linen(module, variables, call_kwargs), input_space=input_space,
                     image_size=check_image_size(image_size), channels=check_channels(channels),
                     name=name or type(module).__name__)


def flax_model(factory, *, image_size, kwargs=None, checkpoint=None, input_space="tf", channels=3,
               call_kwargs=None, name=None):
    """A Flax model built by the user's own function, with weights from an Orbax checkpoint (for configs).

    Args:
        factory: "package.module:function", importable from the command line's working
            directory or the environment; `function(**kwargs)` returns an `nnx.Module`, a
            linen module, or a (linen module, variables) pair.
        image_size: (H, W) of the optimised images.
        kwargs: keyword arguments of the factory.
        checkpoint: a folder written by `orbax.checkpoint.StandardCheckpointer().save(folder,
            state)` with `state = nnx.state(module)` (NNX) or the linen variables; its
            values replace the module's. None keeps the factory's weights.
        input_space, channels, call_kwargs, name: see `from_nnx` and `from_linen`; the
            name defaults to the function's.

    Raises:
        InvalidValueError: a factory that cannot be imported or returns something else,
            a checkpoint that does not fit the module.
        MissingFileError: no checkpoint folder at `checkpoint`.
    """
    require_flax()
    import flax.linen as nn
    from flax import nnx

    image_size, channels = check_image_size(image_size), check_channels(channels)
    function = _import_factory(factory)
    built = _build(function, dict(kwargs or {}), abstract=checkpoint is not None)
    options = dict(image_size=image_size, input_space=input_space, channels=channels,
                   name=name or function.__name__)
    if isinstance(built, nnx.Module):
        if checkpoint is not None:
            nnx.update(built, restore_checkpoint(checkpoint, nnx.state(built)))
        return from_nnx(built, **options)
    module, variables = built if isinstance(built, tuple) and len(built) == 2 else (built, None)
    if not isinstance(module, nn.Module):
        raise InvalidValueError(f"The factory {factory} must return an nnx.Module, a linen Module or a (linen "
                                f"Module, variables) pair. Received: {type(built).__name__}")
    if variables is None:
        x = jnp.zeros((1, *image_size, channels), jnp.float32)
        variables = jax.eval_shape(lambda: module.init(jax.random.key(0), x, **dict(call_kwargs or {})))
        if checkpoint is None:
            raise InvalidValueError(f"The factory {factory} returns a linen module without variables; give its "
                                    "weights with checkpoint=<Orbax folder>. Received: checkpoint=None")
    if checkpoint is not None:
        variables = restore_checkpoint(checkpoint, variables)
    return from_linen(module, variables, call_kwargs=call_kwargs, **options)


def _build(function, kwargs, *, abstract):
    """`function(**kwargs)`; with `abstract`, an NNX module of shapes only (`nnx.eval_shape`: no random
    initialisation, the checkpoint gives every value), falling back to a real call for a linen result."""
    from flax import nnx

    if abstract:
        try:
            return nnx.eval_shape(lambda: function(**kwargs))
        except TypeError:  # a linen module is not a JAX value: build it for real
            pass
    return function(**kwargs)


def _import_factory(spec):
    module_name, _, attribute = str(spec).partition(":")
    if not attribute:
        raise InvalidValueError(f"factory must be an import path 'package.module:function'. Received: "
                                f"factory={spec!r}")
    try:
        found = importlib.import_module(module_name)
    except ImportError as e:
        raise InvalidValueError(f"factory: cannot import '{module_name}' ({e}). Give a module importable from "
                                f"here (on PYTHONPATH or installed). Received: factory={spec!r}") from e
    if not callable(getattr(found, attribute, None)):
        raise InvalidValueError(f"factory: module '{module_name}' has no function '{attribute}'. "
                                f"Received: factory={spec!r}")
    return getattr(found, attribute)


def restore_checkpoint(folder, target):
    """The values of an Orbax checkpoint `folder`, laid out like `target` (a pytree of arrays or shapes).

    Raises:
        MissingFileError: no such folder.
        InvalidValueError: the checkpoint does not hold `target`'s structure and shapes.
    """
    import orbax.checkpoint as ocp

    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise MissingFileError(f"Orbax checkpoint folder not found: '{folder}'. Received: checkpoint='{folder}'")
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), target)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(folder, abstract)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
        raise InvalidValueError(f"The Orbax checkpoint '{folder}' does not fit the model: {str(e).splitlines()[0]} "
                                "It must be saved with orbax.checkpoint.StandardCheckpointer().save(folder, "
                                "nnx.state(model)) (linen: the variables) for the same architecture. "
                                f"Received: checkpoint='{folder}'") from e


def framework_versions():
    """{framework: version} of Flax where it is installed (read without importing it), for run records."""
    try:
        return {"flax": metadata.version("flax")}
    except metadata.PackageNotFoundError:
        return {}
