import atexit
import os
import shutil
import tempfile
from pathlib import Path

# XLA's CPU backend compiles at its optimisation level 3 unless told otherwise; fvis compiles its own
# programs at level 1 (fvis.devices.compiler_options). Everything else the tests compile (the test models'
# Keras and Flax initializers, eager ops) takes the process' level: at level 3 one random initializer of a
# few thousand values compiles in 1-6 s on a CPU, at level 1 in 0.2 s, the same values bit for bit. Set
# before JAX starts its backend; subprocesses inherit it; a program's own options still win.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=1".strip()

import pytest  # noqa: E402

import fvis  # noqa: F401  (selects Keras' JAX backend before any test module imports keras)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

# JAX's persistent compilation cache, one folder per test process (removed at exit), every program in it:
# tests that compile the same program (same model, shapes and settings) compile it once. Tests of the
# cache itself set their own folder (fvis.devices.use_compilation_cache) or run in a subprocess.
_JAX_CACHE = tempfile.mkdtemp(prefix="fvis-tests-jax-cache-")
atexit.register(shutil.rmtree, _JAX_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _JAX_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
# The `fvis` subprocesses of a test process share FVIS_CACHE_DIR's cache (see _isolated_cache); every
# program in it: at level 1 most of the tiny model's initializers compile in under fvis' 0.2 s threshold,
# and each subprocess compiled them again (0.4 s of a warm 5.7 s `fvis model=tiny` job).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Model conversions go to a per-session cache, never the user's."""
    os.environ.setdefault("FVIS_CACHE_DIR", str(tmp_path_factory.mktemp("fvis_cache")))


def cpu_devices_env(count, **extra):
    """This process' environment for a subprocess whose JAX sees `count` CPU devices (XLA_FLAGS keeps
    the flags set above), plus `extra` variables."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}".strip()
    return {**os.environ, "XLA_FLAGS": flags, **extra}


def value_and_input_gradient(f, x):
    """`f(x)` and the input gradient of `sum(sin(f(x)))` (a loss whose gradient varies with every output),
    in one compiled call, as a job runs them: op by op, each of their operations would compile alone."""
    return jax.jit(lambda x: (f(x), jax.grad(lambda v: jnp.sum(jnp.sin(f(v))))(x)))(x)


def shared_path(*parts):
    """A path under ../shared, or skip the test where that folder is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared is not part of every checkout)")
    return path


@pytest.fixture(scope="session")
def tiny():
    import fvis  # noqa: F401  (sets the JAX backend)
    from fvis import models
    return models.tiny_convnet(image_size=(32, 32))


@pytest.fixture
def step_traces(monkeypatch):
    """A list that grows by one each time a job's optimisation step is traced (compiled)."""
    import importlib

    visualize = importlib.import_module("fvis.visualize")  # the module; fvis.visualize is the function
    traces, real = [], visualize.make_renderer

    def counted(*args, **kwargs):
        renderer = real(*args, **kwargs)

        def step(*step_args):
            traces.append(1)
            return renderer.step(*step_args)

        return renderer._replace(step=step)

    monkeypatch.setattr(visualize, "make_renderer", counted)
    return traces
