"""Reach any layer of a Keras model by name, nested sub-models included.

A layer path is a layer name (`conv3_block4_out`) or, for a layer inside a
sub-model, the names joined by "/" (`backbone/conv3_block4_out`). A layer (or
sub-model) that returns several tensors takes a ":i" suffix choosing the i-th
(`split:1`); without it, it is refused before anything compiles. The extractor
built here is a Functional model from the model's input to those layers'
outputs; fvis calls it with `stateless_call`, so weights stay arguments and the
model's variables are never written.
"""

import re

import keras
from keras.src.ops.function import make_node_key

from fvis.errors import FvisError, InvalidTypeError, InvalidValueError, UnknownNameError, did_you_mean


def _graph(model):
    """The Functional graph of a Functional or (built) Sequential model."""
    return getattr(model, "_functional", None) or model


def _is_model(layer):
    return isinstance(layer, keras.Model) and getattr(_graph(layer), "_nodes", None) is not None


def layer_paths(model, prefix=""):
    """All layer paths of `model`, nested sub-models' layers as "outer/inner".

    Args:
        model: a built Functional or Sequential `keras.Model`.

    Returns:
        list of str, in the model's layer order (input layers excluded).
    """
    paths = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        paths.append(prefix + layer.name)
        if _is_model(layer):
            paths.extend(layer_paths(layer, prefix + layer.name + "/"))
    return paths


def split_path(path):
    """"outer/inner:1" -> (["outer", "inner"], 1); the output index is None without a suffix.

    Raises:
        InvalidTypeError: a path that is not a string.
    """
    if not isinstance(path, str):
        raise InvalidTypeError(f"A layer path is a string such as 'conv2' or 'outer/inner'. Received: {path!r}")
    match = re.fullmatch(r"(.*):(\d+)", path)
    name, index = (match.group(1), int(match.group(2))) if match else (path, None)
    return name.split("/"), index


def get_layer(model, path):
    """Finds the layer at `path` ("name", "outer/inner", with or without an output suffix ":i").

    Raises:
        UnknownNameError: no such layer; the message lists the nearest names.
    """
    parts, _ = split_path(path)
    current = model
    for depth, name in enumerate(parts):
        names = [l.name for l in current.layers]
        if name not in names or (depth < len(parts) - 1 and not _is_model(current.get_layer(name))):
            raise UnknownNameError(did_you_mean(path, layer_paths(model), kind="layer"))
        current = current.get_layer(name)
    return current


def channel_axis(model, path):
    """The channel axis (of the batched output) of the layer at `path`: 1 or -1.

    It comes from the layer's own `data_format`; a layer without one (an activation,
    an addition) keeps the layout of the layer that feeds it; an input is channels-last.
    """
    layer = get_layer(model, path)
    while True:
        data_format = getattr(layer, "data_format", None)
        if data_format is not None:
            return 1 if data_format == "channels_first" else -1
        node = layer._inbound_nodes[0] if getattr(layer, "_inbound_nodes", None) else None
        tensors = node.input_tensors if node is not None else []
        if not tensors or isinstance(layer, keras.layers.InputLayer):
            return -1
        layer = tensors[0]._keras_history.operation


def _output_shape(layer):
    """A layer's output shape without the batch axis, or None (several outputs, shared layer)."""
    try:
        output = layer.output
    except (AttributeError, ValueError, RuntimeError):  # called several times, or never
        return None
    return tuple(output.shape[1:]) if hasattr(output, "shape") else None


def feature_map_paths(model):
    """Every layer path of `model` whose output is a feature map (H, W, C), nested ones included.

    Layers with several outputs or several calls are left out (name them explicitly).

    Returns:
        list of str, in layer order.
    """
    shapes = {path: _output_shape(get_layer(model, path)) for path in layer_paths(model)}
    return [path for path, shape in shapes.items() if shape is not None and len(shape) == 3]


def _only_call(outer, layer):
    """The one node (call) of `layer` in `outer`'s graph.

    Raises:
        InvalidTypeError: `layer` is called several times (a shared layer or sub-model):
            which call's output to visualize would be ambiguous.
    """
    own = _graph(outer)._nodes
    nodes = [n for i, n in enumerate(layer._inbound_nodes) if make_node_key(layer, i) in own]
    if len(nodes) != 1:
        kind = "Sub-model" if _is_model(layer) else "Layer"
        raise InvalidTypeError(
            f"{kind} '{layer.name}' is called {len(nodes)} times in '{outer.name}' (a shared layer), so its "
            f"output is ambiguous; fvis can only visualize layers called exactly once. Choose a layer that "
            f"follows one of the calls.")
    return nodes[0]


def _feeding_tensors(outer, sub):
    """The symbolic tensors that feed sub-model `sub` in `outer`'s graph."""
    tensors = _only_call(outer, sub).input_tensors
    return tensors[0] if len(tensors) == 1 else tensors


def _cut(model, outputs):
    """A Functional model from `model`'s inputs to `outputs`, accepting any input size."""
    cut = keras.Model(model.inputs, outputs)
    cut.input_spec = None  # the model's own input size is checked by the layers, if they care
    return cut


def _output_of(model, parts, index, x, path):
    """Output of the layer at `parts` (its `index`-th output) when `model` is applied to symbolic `x`."""
    layer = model.get_layer(parts[0])
    if len(parts) == 1:
        outputs = _only_call(model, layer).output_tensors
        return _cut(model, outputs[_pick(outputs, index, path)])(x)
    feed = _cut(model, _feeding_tensors(model, layer))(x)
    return _output_of(layer, parts[1:], index, feed, path)


def _pick(outputs, index, path):
    """Which of a layer's outputs `path` reads: its only one, or the one its ":i" suffix names.

    Raises:
        InvalidValueError: several outputs and no suffix, or a suffix out of range.
    """
    base = path.rsplit(":", 1)[0] if index is not None else path
    if index is None and len(outputs) == 1:
        return 0
    if index is not None and 0 <= index < len(outputs):
        return index
    shapes = ", ".join(f"'{base}:{i}' {tuple(t.shape[1:])}" for i, t in enumerate(outputs))
    return_kind = "returns one tensor" if len(outputs) == 1 else f"returns {len(outputs)} tensors"
    raise InvalidValueError(f"Layer '{base}' {return_kind}: {shapes}. Name the one to visualize "
                            f"with its suffix. Received: layer='{path}'")


def feature_extractor(model, paths, image_size):
    """A Functional model from `model`'s input to the outputs of `paths`.

    Args:
        model: a built Functional or Sequential `keras.Model` with one input.
        paths: layer paths (see `get_layer`).
        image_size: (H, W) the extractor takes; it may differ from the size the model
            was built for wherever its layers allow (fully convolutional up to `paths`).

    Returns:
        `keras.Model` taking (N, H, W, C) and returning a list, one output per path;
        its `outputs` carry the static output shapes at `image_size`.

    Raises:
        UnknownNameError: an unknown path.
        InvalidTypeError: a model with several inputs, or a layer or sub-model called
            more than once (shared).
        InvalidValueError: the layers up to `paths` do not accept `image_size`.
    """
    for path in paths:
        get_layer(model, path)
    if len(model.inputs) != 1:
        raise InvalidTypeError(f"fvis needs a model with one image input; '{model.name}' has "
                               f"{len(model.inputs)}.")
    x = keras.Input(shape=(*image_size, model.inputs[0].shape[-1]), name="fvis_image")
    try:
        outputs = [_output_of(model, *split_path(path), x, path) for path in paths]
    except FvisError:
        raise
    except ValueError as e:
        built = tuple(model.inputs[0].shape[1:3])
        lines = [l.replace("\x1b[1m", "").replace("\x1b[0m", "").strip() for l in str(e).splitlines()]
        reason = next((l for l in lines if l and not l.startswith("Exception encountered")), "")
        raise InvalidValueError(
            f"The layers of '{model.name}' up to {list(paths)} do not accept "
            f"{image_size[0]}x{image_size[1]} images (the model was built for {built}): "
            f"{reason} Set image_size={list(built)} if the size is fixed. "
            f"Received: image_size={list(image_size)}") from e
    return keras.Model(x, outputs, name=f"{model.name}_features")
