"""Speed features keep the numbers: loop forms, mixed precision, per-backend defaults, compile cache."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fvis
from fvis import chunks, devices, render
from fvis.errors import InvalidValueError, UnknownNameError


def test_host_loop_equals_scan_loop(tiny):
    scan = fvis.visualize(tiny, "conv3", "0:6", steps=4, batch_size=4, loop="scan", progress=False)
    host = fvis.visualize(tiny, "conv3", "0:6", steps=4, batch_size=4, loop="host", progress=False)
    for field in ("images", "curves", "final", "grad_norms"):
        np.testing.assert_allclose(getattr(host, field), getattr(scan, field), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loop", chunks.LOOPS)
def test_no_device_to_host_transfer_inside_a_chunk(tiny, loop):
    job = fvis.prepare(tiny, "conv2", "0:2", steps=3, loop=loop, batch_size=2)
    weights, units = job.placed_weights(), job._placed(job.units)
    chunk, _ = job.compile(weights)
    with jax.transfer_guard_device_to_host("disallow"):
        out = chunk(weights, units)
        jax.block_until_ready(out)
    assert out.curves.shape == (2, 1, 3)


def test_bfloat16_computes_the_model_in_bfloat16_and_changes_images_little(tiny):
    run = lambda steps, **kw: fvis.visualize(tiny, "conv3", "0:8", steps=steps, progress=False, **kw)
    start = run(1, optimizer=fvis.optim.normalized_ascent(1e-9)).images
    f32, bf16 = run(1), run(1, precision="bfloat16")
    assert bf16.images.dtype == np.float32 and bf16.final.dtype == np.float32
    u32, u16 = ((r.images - start).reshape(8, -1) for r in (f32, bf16))
    cosine = np.sum(u32 * u16, 1) / np.linalg.norm(u32, axis=1) / np.linalg.norm(u16, axis=1)
    assert np.all(cosine > 0.99) and np.all(cosine < 1 - 1e-6)  # the same step, at bf16's 8-bit mantissa
    np.testing.assert_allclose(run(5, precision="bfloat16").final, run(5).final, rtol=0.05, atol=0.02)
    job = fvis.prepare(tiny, "conv3", [0], precision="bfloat16")
    hlo = jax.jit(job.forward).lower(job.forward.weights(), jnp.zeros((32, 32, 3))).as_text()
    assert "bf16" in hlo and "convolution" in hlo
    assert all(layer.dtype_policy.name == "float32" for layer in tiny.model.layers)  # user model untouched


def test_bad_loop_and_precision_are_refused_before_compiling(tiny):
    with pytest.raises(UnknownNameError, match="Did you mean 'host'"):
        fvis.prepare(tiny, "conv2", [0], loop="hots")
    with pytest.raises(UnknownNameError, match="Received: precision='bf16'"):
        fvis.prepare(tiny, "conv2", [0], precision="bf16")
    with pytest.raises(InvalidValueError, match="compilation_cache"):
        devices.use_compilation_cache(3)


def test_auto_settings_follow_the_backend_table():
    assert devices.auto_batch_size(64, 1, "cpu") == devices.AUTO["cpu"]["batch_size"]
    assert devices.auto_batch_size(64, 1, "gpu") == 64
    assert devices.auto_batch_size(3, 1, "gpu") == 3  # never more units than requested
    assert devices.auto_batch_size(5, 4, "gpu") == 8  # a multiple of the device count
    assert devices.auto_setting("loop", "cpu") in chunks.LOOPS


def test_auto_loop_follows_the_backend_table_whatever_the_convolutions(tiny):
    """loop=auto is the backend's row: host on CPU also for depthwise and grouped models (their depthwise
    convolutions run as slices there), scan on GPU."""
    import keras
    inputs = keras.Input((16, 16, 3))
    inner = keras.Sequential([keras.Input((16, 16, 4)), keras.layers.DepthwiseConv2D(3, name="depthwise")],
                             name="backbone")
    nested = fvis.models.wrap(keras.Model(inputs, inner(keras.layers.Conv2D(4, 1)(inputs))), input_space="unit")
    assert nested.has_grouped_convolutions and not tiny.has_grouped_convolutions
    assert devices.auto_loop(tiny, "cpu") == devices.auto_loop(nested, "cpu") == devices.AUTO["cpu"]["loop"] == "host"
    assert devices.auto_loop(nested, "gpu") == "scan"
    job = fvis.prepare(nested, "backbone/depthwise", [0], steps=1)
    assert job.loop == devices.auto_loop(nested)


def test_auto_batch_size_is_used_by_prepare(tiny):
    job = fvis.prepare(tiny, "conv3", "all", steps=1)
    assert job.batch_size == devices.auto_batch_size(32, 1) and job.loop == devices.auto_setting("loop")


CACHE_SCRIPT = textwrap.dedent("""
    import json, sys
    import fvis, jax
    fvis.devices.use_compilation_cache()  # the entry point's job (the fvis command does it); the library never does
    hits = []
    jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event) if "cache_hits" in event else None)
    model = fvis.models.tiny_convnet(image_size=(32, 32))
    result = fvis.visualize(model, "conv2", "0:4", steps=3, progress=False)
    print(json.dumps({"hits": len(hits), "dir": jax.config.jax_compilation_cache_dir,
                      "images": result.images.ravel()[:50].tolist()}))
""")


def test_persistent_compilation_cache_is_hit_on_the_second_run(tmp_path):
    env = {**os.environ, "FVIS_CACHE_DIR": str(tmp_path), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    runs = [json.loads(subprocess.run([sys.executable, "-c", CACHE_SCRIPT], env=env, capture_output=True, text=True,
                                      check=True).stdout.strip().splitlines()[-1]) for _ in range(2)]
    assert runs[0]["dir"] == str(tmp_path / "jax") and any((tmp_path / "jax").iterdir())
    assert runs[0]["hits"] == 0 and runs[1]["hits"] > 0
    assert runs[0]["images"] == runs[1]["images"]


def test_one_cache_folder_however_named_holds_one_entry_per_program(tmp_path, monkeypatch):
    """JAX's cache key covers the folder's name, so the folder is set by its absolute path, links resolved:
    a program compiled with the folder named relatively is found again when it is named absolutely or
    through a link, rather than compiled and stored a second time."""
    from jax.experimental.compilation_cache import compilation_cache
    (tmp_path / "cache").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    before = jax.config.jax_compilation_cache_dir
    try:
        for name in ("cache", tmp_path / "cache", "link"):
            assert devices.use_compilation_cache(name) == (tmp_path / "cache").resolve()
            assert jax.config.jax_compilation_cache_dir == str((tmp_path / "cache").resolve())
            compilation_cache.reset_cache()
            jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)(jnp.arange(7.0))  # a new function: looked up in the folder
        assert len([p for p in (tmp_path / "cache").iterdir() if p.name.startswith("jit__lambda")]) == 1
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        compilation_cache.reset_cache()


def test_visualize_leaves_the_compilation_cache_setting_alone(tiny):
    """Side effects belong to the entry points: the library never switches JAX's global cache."""
    before = jax.config.jax_compilation_cache_dir
    fvis.visualize(tiny, "conv2", [0], steps=1, progress=False)
    assert jax.config.jax_compilation_cache_dir == before


def test_compilation_cache_false_leaves_jax_alone(tiny):
    before = jax.config.jax_compilation_cache_dir
    assert devices.use_compilation_cache(False) is None
    assert jax.config.jax_compilation_cache_dir == before


def test_steady_state_step_is_the_render_step(tiny):
    """The step the benchmark times is the one the loop runs: same values as a 1-step job."""
    job = fvis.prepare(tiny, "conv2", "0:2", steps=1, loop="scan", batch_size=2)
    units = job._placed(job.units)
    keys = render.image_keys(jax.random.key(job.seed), units, 1)
    state, (values, norms) = jax.jit(job.renderer.step)(job.forward.weights(), job.renderer.init(units, keys),
                                                        units, np.int32(0))
    result = job.run(progress=False)
    np.testing.assert_allclose(values, result.curves[..., 0], rtol=1e-5)
    np.testing.assert_allclose(state[0], result.images, rtol=1e-5, atol=1e-6)
