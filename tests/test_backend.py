"""fvis selects JAX before Keras loads, and says so when Keras already runs another backend."""

import subprocess
import sys


def python(code, **env):
    import os
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_keras_imported_with_another_backend_is_named():
    proc = python("import keras; import fvis", KERAS_BACKEND="numpy")
    assert proc.returncode != 0
    assert "fvis needs Keras' JAX backend, but Keras was already imported with backend 'numpy'" in proc.stderr


def test_importing_fvis_first_selects_jax_even_if_the_environment_asks_otherwise():
    proc = python("import fvis, keras; print(keras.backend.backend())", KERAS_BACKEND="numpy")
    assert proc.returncode == 0 and proc.stdout.strip() == "jax"
    assert "using KERAS_BACKEND='jax'" in proc.stderr
