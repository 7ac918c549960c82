"""Models fvis can visualize: the model interface and its implementations.

`VisModel` (`fvis.models.base`) is everything the rest of fvis knows about a
model; Keras models are one implementation (`fvis.models.keras_models`):

    model = fvis.models.keras_application("ResNet50V2", image_size=(180, 180))
    model = fvis.models.wrap(my_keras_model, input_space="unit")

Flax NNX and linen modules are another (`fvis.models.flax_models`, the extra
`fvis[flax]`): `from_nnx(module, image_size=...)`, `from_linen(module, variables,
image_size=...)`, and the offline `efficientnet_lite0_flax()`.
"""

from fvis.models.base import (INPUT_SPACES, PRECISIONS, Forward, Rewrites, VisModel, check_image_size,
                              check_precision)
from fvis.models import flax_models, keras_models
from fvis.models.flax_models import FlaxModel, flax_model, from_linen, from_nnx
from fvis.models.keras_models import (KerasModel, efficientnet_lite0, from_keras, keras_application, saved_model,
                                      tiny_convnet, wrap)

__all__ = ["INPUT_SPACES", "PRECISIONS", "FlaxModel", "Forward", "KerasModel", "Rewrites", "VisModel", "as_vis_model",
           "check_image_size", "check_precision", "framework_versions", "efficientnet_lite0",
           "efficientnet_lite0_flax", "flax_model", "from_keras", "from_linen", "from_nnx", "keras_application",
           "saved_model", "tiny_convnet", "wrap"]


def framework_versions():
    """{framework: version} of the model sources in use (Keras, and Flax where installed), for run records."""
    return {**keras_models.framework_versions(), **flax_models.framework_versions()}


def __getattr__(name):
    """`efficientnet_lite0_flax`, imported on first use (its module needs Flax)."""
    if name == "efficientnet_lite0_flax":
        flax_models.require_flax()
        from fvis.models.flax_zoo import efficientnet_lite0_flax
        return efficientnet_lite0_flax
    raise AttributeError(f"module 'fvis.models' has no attribute '{name}'")


def as_vis_model(model):
    """`model` as a `VisModel`: itself, or a plain Keras model through `from_keras`.

    Raises:
        InvalidTypeError: neither a `VisModel` nor a Functional/Sequential keras.Model.
        InvalidValueError: a Keras model whose input range or size cannot be known (see `from_keras`).
    """
    return model if isinstance(model, VisModel) else from_keras(model)
