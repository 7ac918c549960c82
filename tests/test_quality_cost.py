"""The batched, compile-once quality report against a plain per-image, per-draw re-statement,
and the number of model programs one `quality.measure` call traces and compiles."""

import jax
import keras
import numpy as np
import pytest

import fvis
from fvis import objectives, quality, transforms

UNITS = np.array([1, 6, 12, 15])  # conv2 channels of the tiny model: positive, negative, near zero, positive
DRAWS, SEED = 3, 5


def job_parts(model, units):
    """The forward pass and objective a job measures with (the one internal access)."""
    job = fvis.prepare(model, objectives.channel("conv2"), units)
    return job.forward, job.objective


def keras_conv2_means(model, images):
    """(M, H, W, C) images in [-1, 1] -> (M, 16): the channel objective (border 2) of conv2, by Keras."""
    sub = keras.Model(model.model.inputs, model.model.get_layer("conv2").output)
    return np.asarray(sub(np.asarray(images, np.float32), training=False))[:, 2:-2, 2:-2].mean(axis=(1, 2))


def numpy_slope(image):
    """The spectral slope of one (H, W, C) image, restated in numpy (float64, np.polyfit)."""
    h, w = image.shape[:2]
    x = image.mean(-1)
    x = (x - x.mean()) * np.outer(np.hanning(h), np.hanning(w))
    power = np.abs(np.fft.fft2(x)) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
    rings = np.rint(np.hypot(fy, fx) * min(h, w)).astype(int)
    top = min(h, w) // 2
    ring_power = [power[rings == k].mean() for k in range(1, top + 1)]
    return np.polyfit(np.log(np.arange(1, top + 1)), np.log(ring_power), 1)[0]


def plain_robustness(model, image, unit, index):
    """Median over the draws of value(moved) / value(image), each draw moved and measured alone."""
    move = transforms.compose([transforms.jitter(8), transforms.random_scale((0.9, 1.1))])
    keys = jax.random.split(jax.random.fold_in(jax.random.key(SEED), index), DRAWS)
    base = keras_conv2_means(model, image[None])[0, unit]
    if base <= 0:
        return None
    moved = [keras_conv2_means(model, np.asarray(move(k, image))[None])[0, unit] for k in keys]
    return float(np.median(np.array(moved) / base))


@pytest.fixture(scope="module")
def case(tiny):
    model = tiny
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (4, 2, 32, 32, 3)).astype(np.float32)  # 4 units x 2 images
    photos = rng.uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32) * np.float32([[[[0.3]]], [[[0.6]]], [[[1.0]]]])
    forward, objective = job_parts(model, UNITS)
    records, summary = quality.measure(forward, objective, UNITS, images, natural=(["a", "b", "c"], photos),
                                       draws=DRAWS, seed=SEED, top_k=2, batch_size=3)  # 8 images, 18 draws: padded
    return model, images, photos, records, summary, (forward, objective)


def test_measure_equals_a_plain_per_image_per_draw_restatement(case):
    """Activation, rank, robustness (per draw, alone), spectral slope, natural ratio and the summary."""
    model, images, photos, records, summary, _ = case
    flat, own = images.reshape(8, 32, 32, 3), np.repeat(np.arange(4), 2)
    values = keras_conv2_means(model, flat)[:, UNITS]  # (8 images, 4 units)
    activation = values[np.arange(8), own]
    assert np.abs(activation).min() > 1e-3  # no sign of a base is left to rounding
    np.testing.assert_allclose([r["activation"] for r in records], activation, rtol=1e-4, atol=1e-6)
    z = (values - values.mean(0)) / values.std(0)
    ranks = 1 + (z > z[np.arange(8), own][:, None]).sum(axis=1)
    assert [r["selectivity_rank"] for r in records] == ranks.tolist()
    robust = [plain_robustness(model, flat[i], UNITS[own[i]], i) for i in range(8)]
    assert any(b is None for b in robust) and sum(b is not None for b in robust) >= 4  # both kinds are checked
    for record, expected in zip(records, robust):
        assert (record["robustness"] is None) == (expected is None)
        if expected is not None:
            assert record["robustness"] == pytest.approx(expected, rel=1e-3, abs=1e-4)
    slopes = [numpy_slope(x) for x in flat]
    np.testing.assert_allclose([r["spectral_slope"] for r in records], slopes, atol=1e-3)
    photo_values = keras_conv2_means(model, photos)[:, UNITS]  # (3 photos, 4 units)
    for record, column, a in zip(records, own, activation):
        best = photo_values[:, column].max()
        assert record["natural_ratio"] == (pytest.approx(a / best, rel=1e-3) if best > 0 else None)
        order = np.argsort(-photo_values[:, column])[:2]
        assert [t["name"] for t in record["top_natural"]] == [["a", "b", "c"][m] for m in order]
    assert summary["rank1_fraction"] == pytest.approx(np.mean(ranks == 1))
    assert summary["activation_median"] == pytest.approx(float(np.median(activation)), rel=1e-4)
    assert summary["robustness_median"] == pytest.approx(float(np.median([b for b in robust if b is not None])),
                                                         rel=1e-3, abs=1e-4)
    assert summary["spectral_slope_median"] == pytest.approx(float(np.median(slopes)), abs=1e-3)


def test_robustness_alone_equals_the_restatement_and_measure(case):
    """The public `robustness` (base computed itself, rows batched by 2) gives the same figures as `measure`."""
    _, images, _, records, _, (forward, objective) = case
    flat, own = images.reshape(8, 32, 32, 3), np.repeat(np.arange(4), 2)
    robust = quality.robustness(forward, objective, flat, UNITS[own], draws=DRAWS, seed=SEED, batch_size=2)
    from_measure = np.array([np.nan if r["robustness"] is None else r["robustness"] for r in records])
    np.testing.assert_allclose(robust, from_measure, rtol=1e-5, equal_nan=True)


class CountingForward:
    """A forward pass that counts how often it is traced (each trace of a program calls it once)."""

    def __init__(self, forward):
        self.forward, self.traces = forward, 0

    def weights(self):
        return self.forward.weights()

    def shapes(self):
        return self.forward.shapes()

    def __call__(self, weights, image):
        self.traces += 1
        return self.forward(weights, image)


def test_one_measure_traces_and_compiles_the_model_once(case):
    """Images, photos and robustness draws share one model program; batches and calls add none."""
    _, images, photos, _, _, (forward, objective) = case
    counting = CountingForward(forward)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event) if event.endswith("backend_compile_duration") else None)
    measure = lambda: quality.measure(counting, objective, UNITS, images, natural=(["a", "b", "c"], photos),
                                      draws=DRAWS, seed=SEED, batch_size=2)  # 4 + 2 + 12 batches of 2
    measure()
    assert counting.traces == 1
    del compiles[:]
    measure()  # everything else (spectral slopes, ranks) was compiled in the first call
    assert counting.traces == 2 and len(compiles) <= 1, compiles


def test_a_program_compiled_in_the_background_gives_the_same_report_and_measure_traces_nothing(case):
    """`compile_in_background` (what a run starts before its job): one trace before the job, none in
    `measure`, and the same figures as a `measure` that compiles its own program."""
    _, images, photos, records, summary, (forward, objective) = case
    counting = CountingForward(forward)
    program = quality.compile_in_background(counting, objective, UNITS, images.shape[2:], draws=DRAWS, seed=SEED,
                                            batch_size=3)
    assert counting.traces == 1 and hasattr(program, "result")
    again = quality.measure(counting, objective, UNITS, images, natural=(["a", "b", "c"], photos), draws=DRAWS,
                            seed=SEED, top_k=2, batch_size=3, program=program)
    assert counting.traces == 1
    assert again == (records, summary)


def test_a_run_compiles_its_quality_program_before_its_job_runs_and_measures_with_it(tiny, tmp_path, monkeypatch):
    import importlib

    from fvis.settings import Display, Quality, Settings

    visualize = importlib.import_module("fvis.visualize")  # the module; fvis.visualize is the function

    events, real_compile, real_run, real_measure = [], quality.compile_in_background, visualize.Job.run, quality.measure

    def compile_(*args, **kwargs):
        events.append("compile")
        events.append(real_compile(*args, **kwargs))
        return events[-1]

    def run(self, **kwargs):
        events.append("run")
        return real_run(self, **kwargs)

    def measure(*args, program=None, **kwargs):
        events.append(("measure", program))
        return real_measure(*args, program=program, **kwargs)

    monkeypatch.setattr(quality, "compile_in_background", compile_)
    monkeypatch.setattr(visualize.Job, "run", run)
    monkeypatch.setattr(quality, "measure", measure)
    fvis.run_job(tiny, "conv2", "0:3", tmp_path, settings=Settings(steps=1), quality=Quality(draws=2),
                 display=Display(crop=2), progress=False)
    program = events[1]
    assert events == ["compile", program, "run", ("measure", program)]


@pytest.fixture(scope="module")
def job_result(tiny):
    """A tiny job (2 steps, 2 images per unit, 3 chunks of 2 units: the value units span chunks)."""
    return fvis.visualize(tiny, objectives.channel("conv2"), UNITS, steps=2, images_per_unit=2, batch_size=2,
                          progress=False)


@pytest.mark.parametrize("loop", ["host", "scan"])
def test_a_jobs_final_images_are_scored_on_every_unit_as_the_quality_report_and_keras_score_them(tiny, loop):
    """Result.unit_values (N, D, N): each final image's objective for every unit of the job, from the
    finish program's forward; its own unit's column is `final`, bit for bit, and every entry equals the
    quality program's value and Keras' own forward of the image."""
    result = fvis.visualize(tiny, objectives.channel("conv2"), UNITS, steps=2, images_per_unit=2, batch_size=3,
                            loop=loop, progress=False)
    n = len(UNITS)
    assert result.unit_values.shape == (n, 2, n) and result.unit_values.dtype == np.float32
    own = result.unit_values[np.arange(n), :, np.arange(n)]  # (N, D): image (i, j) on unit i
    np.testing.assert_array_equal(own, result.final)
    flat = result.images.reshape(n * 2, 32, 32, 3)
    forward, objective = job_parts(tiny, UNITS)
    by_quality = quality.unit_values(forward, objective, flat, UNITS).reshape(n, 2, n)
    np.testing.assert_allclose(result.unit_values, by_quality, rtol=1e-5, atol=1e-6)
    by_keras = keras_conv2_means(tiny, flat)[:, UNITS].reshape(n, 2, n)
    np.testing.assert_allclose(result.unit_values, by_keras, rtol=1e-4, atol=1e-5)
    assert np.ptp(result.unit_values, axis=2).min() > 0  # the units differ: no column stands in for another


class CountingProgram:
    """A `values_function` program that counts the image rows it evaluates as is (draw < 0) and moved."""

    def __init__(self, function):
        self.function, self.as_is, self.moved = function, 0, 0

    def __call__(self, weights, images, units, index, draw):
        self.as_is += int(np.sum(np.asarray(draw) < 0))
        self.moved += int(np.sum(np.asarray(draw) >= 0))
        return self.function(weights, images, units, index, draw)


def test_measure_with_the_jobs_unit_values_runs_the_images_only_for_the_draws_and_gives_the_same_report(
        tiny, job_result):
    forward, objective = job_parts(tiny, UNITS)
    args = (forward, objective, UNITS, job_result.images)
    settings = dict(dead=job_result.dead, draws=DRAWS, seed=SEED, batch_size=1)
    fresh, reused = (CountingProgram(quality.values_function(forward, objective, draws=DRAWS, seed=SEED))
                     for _ in range(2))
    records, summary = quality.measure(*args, **settings, program=fresh)
    again, again_summary = quality.measure(*args, **settings, program=reused, values=job_result.unit_values)
    live = sum(r["activation"] > 0 for r in records)
    assert 0 < live < len(records)  # both branches of robustness are exercised
    assert (fresh.as_is, fresh.moved) == (8, live * DRAWS)
    assert (reused.as_is, reused.moved) == (0, live * DRAWS)  # the as-is forwards came with the job
    assert [r["selectivity_rank"] for r in again] == [r["selectivity_rank"] for r in records]
    assert [r["failed"] for r in again] == [r["failed"] for r in records]
    column = lambda rs, key: np.array([np.nan if r[key] is None else r[key] for r in rs])  # None: not live
    for key in ("activation", "robustness", "spectral_slope"):
        np.testing.assert_allclose(column(again, key), column(records, key), rtol=1e-5, atol=1e-6, err_msg=key)
    assert again_summary["rank1_fraction"] == summary["rank1_fraction"]
    assert [r["activation"] for r in again] == [float(v) for v in job_result.final.reshape(-1)]


@pytest.mark.parametrize("shape", [(4, 2), (4, 2, 3), (2, 4, 4)])
def test_measure_refuses_unit_values_of_another_shape_before_any_forward(tiny, job_result, shape):
    forward, objective = job_parts(tiny, UNITS)
    counting = CountingProgram(quality.values_function(forward, objective))
    with pytest.raises(ValueError, match=rf"\(N, D, N\) = \(4, 2, 4\).*Received: shape \({shape[0]}, {shape[1]}"):
        quality.measure(forward, objective, UNITS, job_result.images, values=np.zeros(shape, np.float32),
                        program=counting)
    assert counting.as_is + counting.moved == 0
