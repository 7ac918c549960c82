"""The torch-free checkpoint reader: exact tensors, no code execution."""

import collections
import pickle
import sys
import types

import numpy as np
import pytest

from fvis.torch_checkpoint import load_legacy_state_dict


def _fake_torch():
    """Module objects with the names torch pickles, so pickle can write a legacy file."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while writing")

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2

    class FloatStorage:
        pass

    FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
    torch.FloatStorage, torch._utils = FloatStorage, utils
    return torch, utils


class _Tensor:
    def __init__(self, key, storage_numel, offset, size, stride):
        self.key, self.numel, self.args = key, storage_numel, (offset, size, stride)

    def __reduce__(self):
        utils = sys.modules["torch._utils"]
        return utils._rebuild_tensor_v2, ((self.key, self.numel), *self.args, False, collections.OrderedDict())


def write_legacy(path, tensors, storages, monkeypatch):
    """Writes the legacy torch.save layout: magic, protocol, sys info, pickle, keys, raw storages."""
    torch, utils = _fake_torch()
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, tuple) and len(obj) == 2 and obj[0] in storages:
                return ("storage", torch.FloatStorage, obj[0], "cpu", obj[1], None)
            return None

    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        Pickler(f, protocol=2).dump(collections.OrderedDict(tensors))
        pickle.dump(list(storages), f, protocol=2)
        for data in storages.values():
            f.write(len(data).to_bytes(8, "little") + data.astype("<f4").tobytes())


def test_reads_strided_tensors_exactly(tmp_path, monkeypatch):
    weight = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    channels_last = np.ascontiguousarray(weight.transpose(0, 2, 3, 1))  # stored (O, H, W, I)
    storages = {"k0": channels_last.ravel(), "k1": np.array([9, 1.5, -2, 4], np.float32)}
    tensors = {
        "conv.weight": _Tensor("k0", 24, 0, (2, 3, 2, 2), (12, 1, 6, 3)),
        "bn.bias": _Tensor("k1", 4, 1, (3,), (1,)),  # a view at an offset
    }
    path = tmp_path / "legacy.pth"
    write_legacy(path, tensors, storages, monkeypatch)
    state = load_legacy_state_dict(path)
    assert list(state) == ["conv.weight", "bn.bias"]
    np.testing.assert_array_equal(state["conv.weight"], weight)
    np.testing.assert_array_equal(state["bn.bias"], [1.5, -2, 4])


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_refuses_arbitrary_code(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        for obj in (0x1950A86A20F9469CFC6C, 1001, {}, {"w": _Evil()}):
            pickle.dump(obj, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=r"Refusing to load '(__builtin__|builtins)\.print'"):
        load_legacy_state_dict(path)


def test_refuses_zip_format(tmp_path):
    path = tmp_path / "new.pth"
    path.write_bytes(b"PK\x03\x04rest")
    with pytest.raises(ValueError, match="zip-format"):
        load_legacy_state_dict(path)
