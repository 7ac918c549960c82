"""fvis: feature visualization for Keras 3 models, batched and compiled with JAX."""

from fvis._backend import ensure_jax_backend as _ensure_jax_backend

_ensure_jax_backend()

from fvis import (images, models, objectives, optim, outputs, params, quality, regularizers,  # noqa: E402
                  transforms)
from fvis.visualize import Result, prepare, visualize  # noqa: E402

__all__ = ["images", "models", "objectives", "optim", "outputs", "params", "quality", "regularizers", "transforms",
           "Result", "prepare", "visualize"]
