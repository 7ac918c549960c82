"""Hostile and damaged model files: nothing in them runs unless asked; a damaged one is one line naming it."""

import os
import pickle

import keras
import numpy as np
import pytest
from hydra import compose, initialize_config_module

from fvis import cli, models
from fvis.errors import InvalidValueError
from fvis.torch_checkpoint import RefusedCodeError, load_legacy_state_dict
from tests.test_torch_checkpoint import _Tensor, write_legacy

MAGIC, PROTOCOL = 0x1950A86A20F9469CFC6C, 1001


def composed(*overrides):
    with initialize_config_module(config_module="fvis.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


class _Touch:
    """Unpickled by plain `pickle`, this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def command_line_error(capsys, cfg, out):
    """Runs a job as the `fvis` command does; returns its exit status and stderr."""
    with pytest.raises(SystemExit) as exit_:
        cli.run_command(cfg, out)
    return exit_.value.code, capsys.readouterr().err


def test_pth_whose_pickle_runs_a_command_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    payload = pickle.dumps({"w": _Touch(marker)}, protocol=2)
    pickle.loads(payload)                     # the payload is live: plain pickle runs the command
    assert marker.exists()
    marker.unlink()
    path = tmp_path / "evil.pth"
    path.write_bytes(b"".join(pickle.dumps(h, protocol=2) for h in (MAGIC, PROTOCOL, {})) + payload)
    with pytest.raises(RefusedCodeError, match=r"Refusing to load '(posix|os|nt)\.system' from a checkpoint"):
        load_legacy_state_dict(path)
    assert not marker.exists()


def test_truncated_pth_is_one_error_naming_the_file_at_every_cut(tmp_path, monkeypatch):
    """Cut in the header, in the tensor pickle, in the key list and in the raw storage."""
    whole = tmp_path / "whole.pth"
    write_legacy(whole, {"w": _Tensor("0", 6, 0, (2, 3), (3, 1))}, {"0": np.arange(6, dtype="float32")}, monkeypatch)
    np.testing.assert_array_equal(load_legacy_state_dict(whole)["w"], [[0, 1, 2], [3, 4, 5]])
    data = whole.read_bytes()
    for cut in (5, 40, 80, len(data) - 30, len(data) - 1):
        path = tmp_path / f"cut_{cut}.pth"
        path.write_bytes(data[:cut])
        with pytest.raises(InvalidValueError, match=f"'{path}' is truncated or corrupt"):
            load_legacy_state_dict(path)


def _lambda_model(marker):
    """A Functional model whose Lambda layer creates `marker` whenever its Python code runs."""
    touch_and_double = eval(f"lambda t: (open({str(marker)!r}, 'a').close(), t * 2.0)[1]")  # no closure to save
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    return keras.Model(inputs, keras.layers.Lambda(touch_and_double, name="double")(x))


def test_keras_lambda_file_is_never_deserialized_unsafely_unless_asked(tmp_path, capsys):
    """Refused by default from Python and from the command (its code not run: no marker); runs when asked."""
    marker, path = tmp_path / "ran", tmp_path / "lambda.keras"
    _lambda_model(marker).save(path)
    marker.unlink()                            # building the model ran the code once
    with pytest.raises(InvalidValueError, match="has a Lambda layer"):
        models.saved_model(path)
    assert composed("model=saved", "model.path=x").model.safe_mode is True
    status, err = command_line_error(capsys, composed("model=saved", f"model.path={path}", "layer=double",
                                                      "quality.enabled=false"), tmp_path / "run")
    assert status == 2 and err.count("\n") == 1 and err.startswith(f"fvis: error: '{path}' has a Lambda layer")
    assert not marker.exists()
    models.saved_model(path, safe_mode=False)   # asked: the code is loaded (and runs when Keras rebuilds)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(InvalidValueError, match="has a Lambda layer"):
        models.saved_model(path)                # the explicit unsafe load left no global switch on
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_truncated_keras_model_file_is_one_line_naming_it(tmp_path, tiny, capsys, suffix):
    path = tmp_path / f"m{suffix}"
    tiny.model.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    cfg = composed("model=saved", f"model.path={path}", "layer=conv2", "quality.enabled=false")
    status, err = command_line_error(capsys, cfg, tmp_path / "run")
    assert status == 2 and err.count("\n") == 1
    assert err.startswith(f"fvis: error: Cannot read '{path}' as a Keras model file") and "truncated or corrupt" in err


def test_truncated_weights_h5_is_one_line_naming_it(tmp_path, tiny, capsys):
    path = tmp_path / "mobilenet.weights.h5"
    tiny.model.save_weights(path)              # an HDF5 weights file, cut in half below
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    cfg = composed("model=mobilenet", f"model.weights={path}", "model.include_top=false", "image_size=[32,32]",
                   "quality.enabled=false")
    status, err = command_line_error(capsys, cfg, tmp_path / "run")
    assert status == 2 and err.count("\n") == 1
    assert err.startswith(f"fvis: error: The weights file '{path}' cannot be loaded into MobileNet(alpha=0.25)")
