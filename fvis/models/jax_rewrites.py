"""Model rewrites at the level of JAX functions, for every framework that calls them.

Keras on the JAX backend (`keras.layers.ReLU`, `Activation("relu")`, fused
`activation="relu"`, their "relu6" forms, softmax activations and layers) and
Flax (`nnx.relu`, `flax.linen.relu`, `jax.nn.relu`, ...) all end in `jax.nn.relu`,
`jax.nn.relu6` and `jax.nn.softmax`. While a model is traced inside `applied`,
those names are swapped in the modules that export them, so one rewrite serves
both frameworks; the swap is undone when the block ends.

- Redirected ReLU (Lucid's `redirected_relu_grad`; Olah et al., Distill 2017,
  "Feature Visualization", https://distill.pub/2017/feature-visualization/): the
  same forward values; in the backward pass, an example whose ReLU passes no
  gradient at all (every input below zero: a dead unit) gets the incoming gradient
  wherever it would move the input towards firing, so a unit that is zero on the
  start image can still be optimised. Where any gradient passes, it is the exact one.
- Logits for a read softmax: a layer whose output is a softmax gives its input,
  the pre-softmax logits, as tf-keras-vis does by making the last activation
  linear. Probabilities saturate and depend on every other class.

`trace_facts` reads back from the traced computation what actually ran: the
dtypes the convolutions and matrix products computed in, the ReLUs in a form the
redirect does not know (a bare `jnp.maximum(x, 0)`, say), and the softmaxes read
as logits.
"""

import contextlib
import sys

import jax
import jax.numpy as jnp

_RELU, _RELU6, _SOFTMAX = jax.nn.relu, jax.nn.relu6, jax.nn.softmax
# Modules that export jax.nn's functions under the same name (by import, so by identity).
# Keras' JAX backend looks them up on jax.nn at call time.
_EXPORTERS = ("jax.nn", "flax.nnx", "flax.nnx.nn.activations", "flax.linen", "flax.linen.activation")


def _per_example_flows(exact):
    """(N, 1, ..., 1) bool: whether any gradient passes the exact ReLU for each example (axis 0)."""
    return jnp.any(exact != 0, axis=tuple(range(1, exact.ndim)), keepdims=True)


@jax.jit
def _redirected_relu_forward(x):
    return jnp.maximum(x, 0).astype(x.dtype)


@jax.custom_vjp
def redirected_relu(x):
    """ReLU whose gradient is redirected for dead examples (see the module docstring).

    Args:
        x: float array (N, ...), the batch axis first.

    Returns:
        max(x, 0), as `jax.nn.relu`. The vector-Jacobian product, written for a
        minimised loss (as optax and fvis' render loop use), is `jax.nn.relu`'s for
        every example where it is non-zero anywhere; for an example where it is zero
        everywhere, it is the incoming gradient except where that would push an
        input already below zero further down (x < 0 and gradient > 0).
    """
    return _redirected_relu_forward(x)


def _relu_fwd(x):
    return _redirected_relu_forward(x), x


def _relu_bwd(x, g):
    exact = jnp.where(x > 0, g, 0)
    towards_firing = jnp.where((x < 0) & (g > 0), 0, g)
    return (jnp.where(_per_example_flows(exact), exact, towards_firing),)


redirected_relu.defvjp(_relu_fwd, _relu_bwd)


@jax.jit
def _redirected_relu6_forward(x):
    return jnp.minimum(jnp.maximum(x, 0), 6).astype(x.dtype)


@jax.custom_vjp
def redirected_relu6(x):
    """ReLU6 (min(max(x, 0), 6)) with the redirect of `redirected_relu` at both ends.

    For an example where no gradient passes (every input outside (0, 6)), the incoming
    gradient passes except where it would push an input below 0 further down or an
    input above 6 further up (Lucid's `redirected_relu6_grad`).
    """
    return _redirected_relu6_forward(x)


def _relu6_fwd(x):
    return _redirected_relu6_forward(x), x


def _relu6_bwd(x, g):
    exact = jnp.where((x > 0) & (x < 6), g, 0)
    away = ((x < 0) & (g > 0)) | ((x > 6) & (g < 0))
    return (jnp.where(_per_example_flows(exact), exact, jnp.where(away, 0, g)),)


redirected_relu6.defvjp(_relu6_fwd, _relu6_bwd)


@contextlib.contextmanager
def _swapped(original, replacement):
    """Replaces `original` by `replacement` in every loaded module of `_EXPORTERS` that exports it."""
    saved = []
    for name in _EXPORTERS:
        module = sys.modules.get(name)
        for attr, value in list(vars(module).items()) if module is not None else []:
            if value is original:
                saved.append((module, attr))
                setattr(module, attr, replacement)
    try:
        yield
    finally:
        for module, attr in saved:
            setattr(module, attr, original)


class SoftmaxRecord:
    """The softmaxes computed inside `applied`, to find a read output that is one."""

    def __init__(self):
        self._by_id = {}

    def softmax(self, x, axis=-1, **kwargs):
        out = _SOFTMAX(x, axis=axis, **kwargs)
        self._by_id[id(out)] = (out, x)
        return out

    def logits(self, output):
        """The softmax's input if `output` is a recorded softmax's result, else None."""
        found = self._by_id.get(id(output))
        return found[1] if found is not None and found[0] is output else None


@contextlib.contextmanager
def applied(redirect_relu=False, logits=True):
    """Inside the block (while a model is traced), jax.nn's ReLU and ReLU6 are the
    redirected ones (with `redirect_relu`) and softmaxes are recorded (with `logits`).

    Yields:
        A `SoftmaxRecord` (None without `logits`): pass the model's outputs through
        `read_logits` with it.
    """
    with contextlib.ExitStack() as stack:
        if redirect_relu:
            stack.enter_context(_swapped(_RELU, redirected_relu))
            stack.enter_context(_swapped(_RELU6, redirected_relu6))
        record = None
        if logits:
            record = SoftmaxRecord()
            stack.enter_context(_swapped(_SOFTMAX, record.softmax))
        yield record


def read_logits(outputs, paths, record, swapped):
    """`outputs` with every softmax result replaced by its logits; the paths so read go into `swapped`.

    Args:
        outputs: list of arrays, one per path.
        paths: their layer paths.
        record: the `SoftmaxRecord` of `applied` (None: nothing is replaced).
        swapped: a set collecting the paths read as logits.
    """
    if record is None:
        return outputs
    result = []
    for path, output in zip(paths, outputs, strict=True):
        logits = record.logits(output)
        if logits is not None:
            swapped.add(path)
        result.append(output if logits is None else logits)
    return result


_MATMULS = ("conv_general_dilated", "dot_general")
_REDIRECTED = ("_redirected_relu_forward", "_redirected_relu6_forward")


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


def _is_zero(var):
    return isinstance(var, jax.extend.core.Literal) and jnp.ndim(var.val) == 0 and float(var.val) == 0.0


def _scan(jaxpr, facts):
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in _MATMULS:
            facts["compute_dtypes"].update(str(v.aval.dtype) for v in eqn.invars)
        if name in ("pjit", "jit") and eqn.params.get("name") in ("relu", "relu6"):
            facts["jax_nn_relus"] += 1
            continue
        if name in ("pjit", "jit") and eqn.params.get("name") in _REDIRECTED:
            facts["redirected_relus"] += 1
            continue
        if name == "max" and any(_is_zero(v) for v in eqn.invars):
            facts["bare_relus"] += 1
        for sub in _sub_jaxprs(eqn):
            _scan(sub, facts)


def trace_facts(fn, *args):
    """What `fn(*args)` computes, read from its traced jaxpr (nothing runs).

    `fn` must be a new function object (a closure made for this trace): JAX reuses
    the trace of a function it has seen, whatever has been swapped since.

    Returns:
        dict with "compute_dtypes" (sorted dtype names of the convolutions' and matrix
        products' operands), "redirected_relus" (redirected ReLU/ReLU6 calls),
        "jax_nn_relus" (jax.nn ReLU/ReLU6 calls left exact) and "bare_relus"
        (`max(x, 0)` written out: a ReLU in a form the redirect does not know).
    """
    facts = {"compute_dtypes": set(), "redirected_relus": 0, "jax_nn_relus": 0, "bare_relus": 0}
    _scan(jax.make_jaxpr(fn)(*args).jaxpr, facts)
    facts["compute_dtypes"] = sorted(facts["compute_dtypes"])
    return facts
