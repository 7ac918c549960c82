"""Models fvis can visualize: the model interface and its implementations.

`VisModel` (`fvis.models.base`) is everything the rest of fvis knows about a
model; Keras models are one implementation (`fvis.models.keras_models`):

    model = fvis.models.keras_application("ResNet50V2", image_size=(180, 180))
    model = fvis.models.wrap(my_keras_model, input_space="unit")
"""

from fvis.models.base import (INPUT_SPACES, PRECISIONS, Forward, Rewrites, VisModel, check_image_size,
                              check_precision)
from fvis.models.keras_models import (KerasModel, efficientnet_lite0, framework_versions, from_keras,
                                      keras_application, saved_model, tiny_convnet, wrap)

__all__ = ["INPUT_SPACES", "PRECISIONS", "Forward", "KerasModel", "Rewrites", "VisModel", "as_vis_model",
           "check_image_size", "check_precision", "framework_versions", "efficientnet_lite0", "from_keras", "keras_application",
           "saved_model", "tiny_convnet", "wrap"]


def as_vis_model(model):
    """`model` as a `VisModel`: itself, or a plain Keras model through `from_keras`.

    Raises:
        InvalidTypeError: neither a `VisModel` nor a Functional/Sequential keras.Model.
        InvalidValueError: a Keras model whose input range or size cannot be known (see `from_keras`).
    """
    return model if isinstance(model, VisModel) else from_keras(model)
