"""Select Keras' JAX backend before Keras is imported.

fvis compiles one `jax.jit` function per job and calls Keras models through
`stateless_call`, which only the JAX backend provides. Importing `fvis` sets
`KERAS_BACKEND=jax`; if Keras was already imported with another backend, the
import fails at once with the fix rather than later with a cryptic trace.
"""

import os
import sys
import warnings


def ensure_jax_backend():
    """Sets Keras' backend to JAX, or raises if Keras already runs another one.

    Raises:
        ImportError: Keras was imported before fvis with a backend other than
            JAX (it cannot be switched after import).
    """
    if "keras" in sys.modules:
        backend = sys.modules["keras"].backend.backend()
        if backend != "jax":
            raise ImportError(
                "fvis needs Keras' JAX backend, but Keras was already imported "
                f"with backend '{backend}'. Import fvis before keras, or set "
                "KERAS_BACKEND=jax in the environment before starting Python. "
                f"Received: keras.backend.backend()='{backend}'"
            )
        return
    requested = os.environ.get("KERAS_BACKEND")
    if requested not in (None, "", "jax"):
        warnings.warn(
            f"KERAS_BACKEND='{requested}' is set, but fvis runs on JAX only; "
            "using KERAS_BACKEND='jax' for this process.",
            stacklevel=3,
        )
    os.environ["KERAS_BACKEND"] = "jax"
