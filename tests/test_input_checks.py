"""Bad input found by testing: each is refused before any compute with one clear message."""

import io
import json
import subprocess
import sys

import keras
import numpy as np
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from PIL import Image

import fvis
from fvis import cli, devices, images, models, params, quality, summary, transforms
from fvis.errors import InvalidValueError, MissingFileError
from fvis.visualize import Job


@pytest.mark.parametrize("channels", [2, 4])
def test_tiny_model_with_other_than_1_or_3_channels_is_refused(channels):
    with pytest.raises(InvalidValueError, match=r"channels-last images with 1 \(grayscale\) or 3 \(RGB\).*"
                                                rf"Received: channels={channels}"):
        models.tiny_convnet(image_size=(16, 16), channels=channels)


def test_wrapped_two_channel_model_is_refused_naming_its_input_shape():
    x = keras.Input((8, 8, 2))
    with pytest.raises(InvalidValueError, match=r"1 \(grayscale\) or 3 \(RGB\).*input_shape=\(None, 8, 8, 2\)"):
        models.wrap(keras.Model(x, keras.layers.Conv2D(3, 3)(x)))


def test_channels_first_model_is_refused_with_a_hint():
    x = keras.Input((3, 16, 16))
    y = keras.layers.Conv2D(4, 3, data_format="channels_first", name="c")(x)
    with pytest.raises(InvalidValueError, match=r"channels_first.*Received: input_shape=\(None, 3, 16, 16\)"):
        models.wrap(keras.Model(x, y))


def test_sequential_built_here_with_bad_channels_is_refused():
    seq = keras.Sequential([keras.layers.Conv2D(4, 3, name="c")])
    with pytest.raises(InvalidValueError, match="Received: channels=4"):
        models.wrap(seq, image_size=(16, 16), channels=4)


@pytest.mark.parametrize("size", ["99", "32,32", [32.7, 32], [32, 32, 3], [32], 32, [0, 32], [True, 32],
                                  None, (32, "32")])
def test_image_size_must_be_two_positive_integers(size):
    with pytest.raises(InvalidValueError, match=r"two positive integers \[height, width\].*Received: image_size="):
        models.check_image_size(size)


@pytest.mark.parametrize("size", [(32, 24), [32, 24], np.array([32, 24])])
def test_image_size_accepts_integer_pairs(size):
    assert models.check_image_size(size) == (32, 24)


def _photo_folder(tmp_path, bad_name="broken.png", bad_bytes=b"not an image"):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.full((20, 20, 3), 100, np.uint8)).save(folder / "good.png")
    (folder / bad_name).write_bytes(bad_bytes)
    return folder


def _truncated_png():
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()[:120]


@pytest.mark.parametrize("bad_bytes", [b"not an image", _truncated_png()], ids=["garbage", "truncated"])
def test_corrupt_file_in_natural_images_folder_is_named(tmp_path, bad_bytes):
    folder = _photo_folder(tmp_path, bad_bytes=bad_bytes)
    with pytest.raises(MissingFileError, match=r"Cannot read '.*broken\.png' as an image, needed for the "
                                               r"natural-image comparison"):
        quality.load_photos(folder, (16, 16))


def test_corrupt_file_in_maco_magnitude_folder_is_refused_when_the_param_is_built(tmp_path):
    folder = _photo_folder(tmp_path, bad_name="broken.jpg")
    with pytest.raises(MissingFileError, match=r"broken\.jpg' as an image, needed for MaCo's magnitude"):
        params.maco(magnitude=str(folder))


def test_corrupt_photo_is_named_when_loaded(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(_truncated_png())
    with pytest.raises(MissingFileError, match=r"x\.png' as an image"):
        images.load_photo(path, (8, 8))


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_png_is_scaled_by_its_bit_depth(tmp_path, channels):
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    Image.fromarray(np.round(ramp / 257).astype(np.uint8)).save(tmp_path / "flat.png")
    deep, flat = (images.load_photo(tmp_path / f"{n}.png", (16, 16), channels=channels) for n in ("deep", "flat"))
    np.testing.assert_allclose(deep, flat, atol=1.5 / 127.5)
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(tmp_path / "gray.png")
    assert abs(float(images.load_photo(tmp_path / "gray.png", (8, 8), channels=1).mean())) < 0.01  # was 1.0
    np.testing.assert_array_equal(images.load_png(tmp_path / "deep.png"), images.load_png(tmp_path / "flat.png"))


def composed(*overrides):
    with initialize_config_module(config_module="fvis.conf", version_base="1.3"):
        return compose("config", overrides=["model=tiny", "steps=1", "filters=0:1", *overrides])


def one_line_error(capsys, cfg, out_dir):
    """Runs the command's job in-process; returns its exit status and stderr's one line."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run_command(cfg, str(out_dir))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return exit_info.value.code, lines[0]


@pytest.mark.parametrize("overrides, expected", [
    (["layer=[conv1,conv2]"], "layer must be one layer name (a string); for several layers use layers=[...]. "
                              "Received: layer=['conv1', 'conv2']"),
    (["objective.layer=[conv1]"], "objective.layer must be one layer name"),
    (["param.init_scale=abc"], "param.init_scale must be a number, like its default 0.125 in fvis.params.pixel. "
                               "Received: param.init_scale='abc'"),
    (["transform=standard", "transform.fill=abc"], "transform.fill must be a number"),
    (["param=fourier", "param.decay_power=abc"], "param.decay_power must be a number"),
    (["param=fourier", "param.decorrelate=3"], "param.decorrelate must be true or false"),
    (["model.width=8.5"], "model.width must be an integer, like its default 8 in fvis.models.tiny_convnet"),
    (["transform=maco", "transform.transforms.1.std=[1]"], "transform.transforms.1.std must be a number"),
    (["optimizer=adam", "+optimizer.mu_dtype=abc"], "optimizer: could not build optax._src.alias.adam("
                                                    "learning_rate=10.0, mu_dtype='abc'): data type 'abc'"),
    (["seed=99999999999999999999"], "seed must be an integer from 0 to 4294967295"),
    (["compilation_cache=/etc/passwd/x"], "compilation_cache: cannot create the folder '/etc/passwd/x'"),
    (["model.channels=4"], "fvis takes channels-last images with 1 (grayscale) or 3 (RGB) channels"),
    (['image_size="99"'], "image_size must be two positive integers [height, width], e.g. [180, 180]. "
                          "Received: image_size='99'"),
])
def test_command_prints_one_line_for_bad_values(capsys, tmp_path, overrides, expected):
    code, line = one_line_error(capsys, composed(*overrides), tmp_path / "run")
    assert code == 2 and line.startswith("fvis: error: ") and expected in line


def test_missing_values_are_still_reported_by_name(capsys, tmp_path):
    code, line = one_line_error(capsys, composed("model=saved"), tmp_path / "run")
    assert code == 2 and "Missing mandatory value: model.path" in line


def test_factory_type_error_names_the_config_group():
    node = OmegaConf.create({"param": {"_target_": "fvis.params.pixel", "init_scale": "abc"}}).param
    with pytest.raises(InvalidValueError, match=r"^param: could not build fvis\.params\.pixel\(init_scale='abc'\): "):
        cli._instantiate(node)


@pytest.mark.parametrize("fill", ["abc", float("nan"), None, True])
def test_transform_fill_must_be_a_number(fill):
    for make in (transforms.standard, lambda **kw: transforms.jitter(2, **kw), transforms.random_crop):
        with pytest.raises(InvalidValueError, match=r"fill must be a number.*Received: fill="):
            make(fill=fill)


@pytest.mark.parametrize("seed", [-1, 2**32, 99999999999999999999, 1.5])
def test_seed_outside_jax_range_is_refused_before_compute(tiny, seed):
    with pytest.raises(InvalidValueError, match=r"seed must be an integer from 0 to 4294967295.*Received: seed="):
        fvis.prepare(tiny, "conv1", [0], seed=seed)


def test_largest_seed_is_accepted(tiny):
    assert fvis.prepare(tiny, "conv1", [0], seed=2**32 - 1).seed == 2**32 - 1


def test_compilation_cache_folder_that_cannot_be_made_names_the_key(tmp_path):
    (tmp_path / "file").write_text("")
    for folder in (tmp_path / "file", tmp_path / "file" / "x"):
        with pytest.raises(InvalidValueError, match=r"compilation_cache: cannot create the folder .*file"):
            devices.use_compilation_cache(str(folder))


def test_ctrl_c_prints_one_line_and_exits_130(capsys, tmp_path, monkeypatch):
    def interrupted(self, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Job, "run", interrupted)
    code, line = one_line_error(capsys, composed("quality.enabled=false"), tmp_path / "run")
    assert code == 130
    assert line == (f"fvis: interrupted; finished chunks are saved in {tmp_path / 'run'}, run the same command "
                    "again to resume")
    assert json.loads((tmp_path / "run" / "run.json").read_text())["attempts"][-1]["status"] == "interrupted"


def test_unwritable_run_folder_prints_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    proc = subprocess.run([sys.executable, "-m", "fvis", "model=tiny", f"hydra.run.dir={tmp_path / 'file' / 'run'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"fvis: error: hydra.run.dir: cannot create the folder '{tmp_path / 'file' / 'run'}'" in proc.stderr


@pytest.mark.parametrize("name, text", [
    ("run.json", "[1, 2]"), ("run.json", "{not json"), ("run.json", '{"attempts": {"a": 1}}'),
    ("run.json", '{"attempts": [{"timings": [1]}]}'), ("results.json", '"a string"'), ("error.json", "[]"),
])
def test_summary_lists_a_job_with_malformed_records_as_unreadable(tmp_path, name, text):
    good, bad = tmp_path / "lr=1", tmp_path / "lr=2"
    for job in (good, bad):
        job.mkdir()
        (job / "run.json").write_text(json.dumps({"status": "done", "attempts": [{"status": "done"}]}))
    (bad / name).write_text(text)
    rows = {row["job"]: row for row in summary.write_summary(tmp_path)}
    assert rows["lr=1"]["status"] == "done"
    assert rows["lr=2"]["status"] == "unreadable" and rows["lr=2"]["error"].startswith(f"{name} is unreadable")
    assert "unreadable" in (tmp_path / "summary.html").read_text()


def test_summary_command_survives_a_malformed_run_json(tmp_path, capsys):
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "run.json").write_text('[{"status": "done"}]')
    assert summary.main([str(tmp_path)]) == 0
    assert "fvis-summary: 1 job -> " in capsys.readouterr().out
