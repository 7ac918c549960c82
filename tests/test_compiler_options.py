"""XLA compiler options (`fvis.devices.compiler_options`, `Job.compiler_options`): they reach every
program fvis compiles, the CPU's level gives the images of XLA's defaults bit for bit, and
results.json records them."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import fvis
from fvis import chunks, devices, params, quality
from fvis.settings import Display, Quality

UNKNOWN = {"xla_fvis_no_such_option": 1}
XLA_DEFAULT = {"xla_backend_optimization_level": 3}  # XLA's own (the tests' XLA_FLAGS lower the process' level)


@pytest.fixture
def cpu_options(monkeypatch):
    """Sets the CPU row's compiler options for one test: `cpu_options(options)`."""
    row = dict(devices.AUTO["cpu"])
    monkeypatch.setitem(devices.AUTO, "cpu", row)
    return lambda options: row.update(compiler_options=options)


def test_the_cpu_compiles_at_xla_optimisation_level_1_and_accelerators_at_xlas_defaults():
    assert devices.compiler_options("cpu") == {"xla_backend_optimization_level": 1}
    assert devices.compiler_options("gpu") == devices.compiler_options("tpu") == {}
    devices.compiler_options("cpu")["xla_backend_optimization_level"] = 3  # a copy: the table stays
    assert devices.AUTO["cpu"]["compiler_options"] == {"xla_backend_optimization_level": 1}


def test_the_backends_options_reach_each_chunk_program_and_the_quality_program(tiny, cpu_options):
    cpu_options(UNKNOWN)
    job = fvis.prepare(tiny, "conv2", "0:2", steps=1, batch_size=1)
    assert job.compiler_options == UNKNOWN
    for loop in ("host", "scan"):
        lowered, _ = chunks.lower_chunk(job.renderer, steps=1, loop=loop, mesh=job.mesh, seed=0, images_per_unit=1,
                                        weights=job.placed_weights(), units=job._placed(job.units[:1]),
                                        value_units=job.units, compiler_options=job.compiler_options)
        assert set(lowered) == ({"init", "step", "finish"} if loop == "host" else {"scan"})
        for program in lowered.values():
            with pytest.raises(Exception, match="xla_fvis_no_such_option"):
                program.compile()
    future = quality.compile_in_background(job.forward, job.objective, job.units, job.image_shape,
                                           compiler_options=job.compiler_options)
    with pytest.raises(Exception, match="xla_fvis_no_such_option"):
        future.result()
    function = quality.values_function(job.forward, job.objective)  # the backend's options by default
    with pytest.raises(Exception, match="xla_fvis_no_such_option"):
        function(job.forward.weights(), jnp.zeros((1, 32, 32, 3)), jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32),
                 jnp.full(1, -1, jnp.int32))


@pytest.mark.parametrize("param", ["pixel", "fourier"])
def test_the_cpus_level_gives_the_images_values_and_quality_of_xlas_defaults_bit_for_bit(tiny, cpu_options, param):
    def run():
        chosen = params.fourier() if param == "fourier" else params.pixel()
        result = fvis.visualize(tiny, "conv2", "0:3", steps=4, batch_size=2, param=chosen, progress=False)
        job = fvis.prepare(tiny, "conv2", "0:3")
        draws = quality.robustness(job.forward, job.objective, result.images[:, 0], result.units, draws=3)
        return result, job.compiler_options, draws

    level_1, options, draws_1 = run()
    assert options == {"xla_backend_optimization_level": 1}
    cpu_options(XLA_DEFAULT)
    default, options, draws_default = run()
    assert options == XLA_DEFAULT
    for field in ("images", "curves", "final", "grad_norms", "transparency", "unit_values"):
        np.testing.assert_array_equal(getattr(level_1, field), getattr(default, field), err_msg=field)
    np.testing.assert_array_equal(draws_1, draws_default)
    assert np.ptp(level_1.images) > 0 and np.isfinite(draws_1).any()


def test_results_json_records_the_options_the_programs_were_compiled_with(tiny, tmp_path, cpu_options):
    fvis.run_job(tiny, "conv2", "0:2", tmp_path / "level1", settings=fvis.Settings(steps=1),
                 quality=Quality(enabled=False), display=Display(crop=2), progress=False)
    cpu_options({"xla_backend_optimization_level": 2})
    fvis.run_job(tiny, "conv2", "0:2", tmp_path / "level2", settings=fvis.Settings(steps=1),
                 quality=Quality(enabled=False), display=Display(crop=2), progress=False)
    recorded = [json.loads((tmp_path / name / "results.json").read_text())["compiler_options"]
                for name in ("level1", "level2")]
    assert recorded == [{"xla_backend_optimization_level": 1}, {"xla_backend_optimization_level": 2}]
