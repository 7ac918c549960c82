"""Where and how a job runs: devices, the unit mesh, per-backend defaults, the compile cache.

fvis shards the unit (filter) axis of each chunk over all devices with a 1-D
`jax.sharding.Mesh` named "units"; model weights are replicated. Units are
independent, so the compiled step needs no communication between devices and
each unit's image is the one a single-device run gives.

Multi-host (a TPU pod slice, several GPU hosts): start the same command on every
host after `jax.distributed.initialize()`; `jax.devices()` then lists every
host's devices and the mesh spans them all (see README, "Performance").
"""

import os
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fvis.errors import InvalidValueError

UNITS = "units"  # the mesh axis the unit (filter) axis is sharded over

# Defaults per backend, chosen from experiments/results (see its README): units per
# compiled chunk (at most), the loop form, the CPU-friendly pooling, 1x1 and depthwise convolutions
# (`Rewrites.cpu_ops`), batch norms folded into convolutions (`Rewrites.fold_batchnorm`), 3x3 convolutions
# by Winograd's F(2x2, 3x3) (`Rewrites.winograd`; experiments/results/README.md, "Winograd"), and the images
# per compiled call of the quality report's forwards and the threads that make those calls
# (fvis.quality; experiments/results/README.md, "The quality report's cost"), and the chunks optimised at
# once from their own threads (`fvis.Settings.workers`; experiments/results/README.md, "Two chunks at once"),
# and the XLA compiler options of fvis' programs (`compiler_options`; experiments/results/README.md, "XLA's
# optimisation level").
# GPU and TPU values are not measured yet (no accelerator was lent to the benchmark).
AUTO = {
    "cpu": {"batch_size": 1, "loop": "host", "cpu_ops": True, "fold_batchnorm": True, "winograd": True,
            "quality_batch_size": 1, "quality_workers": 2, "workers": 2,
            "compiler_options": {"xla_backend_optimization_level": 1}},
    "gpu": {"batch_size": 128, "loop": "scan", "cpu_ops": False, "fold_batchnorm": False, "winograd": False,
            "quality_batch_size": 16, "quality_workers": 1, "workers": 1, "compiler_options": {}},
    "tpu": {"batch_size": 128, "loop": "scan", "cpu_ops": False, "fold_batchnorm": False, "winograd": False,
            "quality_batch_size": 16, "quality_workers": 1, "workers": 1, "compiler_options": {}},
}


def auto_loop(model, platform=None):
    """The loop form for loop="auto": the backend's `AUTO` row.

    On CPU a step compiled on its own ("host") beat the same step inside `lax.scan` for
    ResNet50V2 (1.46x). EfficientNet-Lite0 and MobileNet once ran 2.2-2.8x faster in
    "scan", because XLA's CPU backend ran their depthwise convolutions' input gradients
    slowly outside a loop; with those convolutions as slices and their batch norms folded
    (`cpu_ops`, `fold_batchnorm`) "host" is as fast or faster for all three
    (experiments/results/loop_by_model.json).

    Args:
        model: the `fvis.models.VisModel` being visualized (kept for model-specific rules).
        platform: "cpu", "gpu" or "tpu"; default JAX's backend.
    """
    return auto_setting("loop", platform)


def unit_mesh(devices=None):
    """A 1-D mesh over `devices` (default: all of `jax.devices()`), axis "units"."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (UNITS,))


def shardings(mesh):
    """(replicated, by_unit) `NamedSharding`s of `mesh`: for weights, and for per-unit arrays."""
    return NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec(UNITS))


def auto_setting(name, platform=None):
    """The default of `name` (a key of `AUTO`'s rows) on `platform` (default: JAX's backend)."""
    platform = platform or jax.default_backend()
    return AUTO.get(platform, AUTO["gpu"])[name]


def compiler_options(platform=None):
    """The XLA compiler options fvis compiles its programs with on `platform` (default: JAX's
    backend): a new dict, for `jax.jit(..., compiler_options=...)`.

    On CPU, `xla_backend_optimization_level` 1 (XLA's default is 3): the reference job's four
    programs compiled in 8.5 CPU-seconds instead of 13.0 on a 2-core AMD EPYC (Zen 3), their
    outputs bit for bit the same (pixel and Fourier parameterizations), the step as fast (its
    convolutions are library calls, which the level does not touch; the loops XLA generates
    between them measured as fast). GPU and TPU: XLA's defaults ({}), not measured.
    Measured in experiments/results/README.md, "XLA's optimisation level".
    """
    return dict(auto_setting("compiler_options", platform))


def auto_batch_size(num_units, num_devices=1, platform=None):
    """Units per chunk when batch_size="auto": the backend's measured best per device,
    times the number of devices, and never more than the units there are (rounded
    up to a multiple of the device count)."""
    per_device = auto_setting("batch_size", platform)
    return round_up(max(1, min(num_units, per_device * num_devices)), num_devices)


def round_up(n, multiple):
    """The smallest multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple


MIN_COMPILE_TIME_S = 0.2  # programs that compile faster than this are not worth a cache file


def cache_dir():
    """The user's fvis cache folder: $FVIS_CACHE_DIR, else $XDG_CACHE_HOME/fvis, else ~/.cache/fvis."""
    root = os.environ.get("FVIS_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fvis"
    return Path(root)


def default_compilation_cache():
    """The persistent compilation cache folder: <fvis cache dir>/jax (see `cache_dir`)."""
    return cache_dir() / "jax"


def use_compilation_cache(setting=True):
    """Turns on JAX's persistent compilation cache, so a repeated job skips compiling.

    Call it before building the model to cache the model's initializers too (the
    `fvis` command does); `fvis.prepare` calls it for the optimisation itself.

    Args:
        setting: True: JAX's own cache folder if one is already configured, else
            `default_compilation_cache()`; a path: that folder; False or None: leave
            JAX's configuration as it is.

    The folder is set as its absolute path, links resolved: JAX's cache key covers the
    folder's name (the compile options name XLA's autotuning cache inside it), so
    `cache` and `/home/me/cache`, one folder, would otherwise hold two copies of every
    program and the jobs of a sweep that name it differently would not share them.

    Returns:
        The cache folder in use (an absolute `Path`), or None.

    Raises:
        InvalidValueError: a setting that is neither a bool nor a path, or a folder that
            cannot be created.
    """
    if setting is None or setting is False:
        return None
    if setting is True:
        configured = jax.config.jax_compilation_cache_dir
        folder = Path(configured) if configured else default_compilation_cache()
    elif isinstance(setting, (str, os.PathLike)):
        folder = Path(setting).expanduser()
    else:
        raise InvalidValueError(f"compilation_cache must be true, false or a folder path. "
                                f"Received: compilation_cache={setting!r}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        folder = folder.resolve()
    except OSError as e:
        raise InvalidValueError(f"compilation_cache: cannot create the folder '{folder}' ({type(e).__name__}: "
                                f"{e.strerror or e}). Pass a folder you can write to, true (the default folder) "
                                f"or false (no cache). Received: compilation_cache={setting!r}") from e
    # Keras' weight initializers compile ~30 small programs when a model is built (23 s of
    # ResNet50V2's 28 s build on a busy 2-core CPU), each under JAX's 1 s default threshold.
    threshold = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min(threshold, MIN_COMPILE_TIME_S))
    if jax.config.jax_compilation_cache_dir != str(folder):
        jax.config.update("jax_compilation_cache_dir", str(folder))
        from jax.experimental.compilation_cache import compilation_cache
        compilation_cache.reset_cache()  # a cache opened earlier in this process used another folder
    return folder
