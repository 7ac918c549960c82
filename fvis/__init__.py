"""fvis: feature visualization for Keras 3 models, batched and compiled with JAX."""

from importlib import metadata as _metadata

from fvis._backend import ensure_jax_backend as _ensure_jax_backend

_ensure_jax_backend()

try:
    __version__ = _metadata.version("fvis")
except _metadata.PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "unknown"

from fvis import (images, models, notebook, objectives, optim, outputs, params, quality,  # noqa: E402
                  regularizers, transforms)
from fvis.notebook import show  # noqa: E402
from fvis.runs import Outcome, run_job  # noqa: E402
from fvis.settings import Display, Quality, Settings  # noqa: E402
from fvis.visualize import Result, prepare, visualize  # noqa: E402

__all__ = ["images", "models", "notebook", "objectives", "optim", "outputs", "params", "quality", "regularizers",
           "transforms", "Display", "Outcome", "Quality", "Result", "Settings", "prepare", "run_job", "show", "visualize"]
