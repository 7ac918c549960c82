"""Read PyTorch checkpoints without torch and without running pickled code.

The legacy (non-zip) `torch.save` format is a stream of pickles followed by raw
storage bytes. `pickle.load` on such a file would import and call whatever the
file names; this reader allows only the handful of classes a tensor state dict
needs and raises for anything else, so a hostile checkpoint cannot execute code.
"""

import collections
import pickle

import numpy as np

from fvis.errors import FvisError, InvalidValueError

_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class RefusedCodeError(FvisError, pickle.UnpicklingError):
    """A checkpoint's pickle names a class or function other than the few a tensor state dict
    needs: it may be trying to run code, so nothing of it is loaded."""


class _Storage:
    """A storage named in the pickle; its bytes follow the pickles."""

    def __init__(self, dtype, numel):
        self.dtype, self.numel, self.data = dtype, numel, None


class _StorageType:
    def __init__(self, name):
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _TensorRef:
    """A tensor view onto a storage, resolved once the storage bytes are read."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset = storage, offset
        self.size, self.stride = tuple(size), tuple(stride)

    def to_numpy(self):
        flat = self.storage.data
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :],
            shape=self.size,
            strides=tuple(s * itemsize for s in self.stride),
        )
        return np.array(view)  # a contiguous copy, detached from the storage


def _rebuild_tensor(storage, offset, size, stride, *unused):
    return _TensorRef(storage, offset, size, stride)


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, storages):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise RefusedCodeError(
                f"Refusing to load '{module}.{name}' from a checkpoint: only "
                "tensor state dicts are read (allowed: "
                f"{sorted('.'.join(k) for k in _ALLOWED)})."
            ) from None

    def persistent_load(self, saved_id):
        kind, storage_type, key, _location, numel = saved_id[:5]
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"Unsupported persistent id {saved_id!r}.")
        if key not in self._storages:
            self._storages[key] = _Storage(storage_type.dtype, numel)
        return self._storages[key]


def load_legacy_state_dict(path):
    """Reads a legacy-format `torch.save` state dict as NumPy arrays.

    Args:
        path: a `.pth` file written by `torch.save(..., _use_new_zipfile_serialization=False)`
            (the format of torch < 1.6 and of many published checkpoints).

    Returns:
        dict name -> np.ndarray, in the checkpoint's order, with the checkpoint's
        dtypes and shapes (PyTorch layout, e.g. conv kernels (O, I, kh, kw)).

    Raises:
        InvalidValueError (a ValueError): the file is not a legacy torch checkpoint (a
            zip-format file, a wrong magic number or protocol), or it is truncated or corrupt;
            the message names the file.
        RefusedCodeError (a pickle.UnpicklingError): the file names a class other than the
            few a tensor state dict needs (it may be trying to run code); nothing is run.
    """
    try:
        return _load(path)
    except (RefusedCodeError, InvalidValueError):
        raise
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise InvalidValueError(f"'{path}' is truncated or corrupt: it cannot be read as a legacy torch "
                                f"checkpoint ({type(e).__name__}: {e}). Received: path='{path}'") from e


def _load(path):
    storages = {}
    with open(path, "rb") as f:
        if f.read(2) == b"PK":
            raise InvalidValueError(
                f"'{path}' is a zip-format torch checkpoint; only the legacy "
                "format is supported. Re-save it with "
                "torch.save(sd, path, _use_new_zipfile_serialization=False)."
            )
        f.seek(0)
        header = _RestrictedUnpickler(f, storages)
        magic, protocol = header.load(), header.load()
        if magic != _MAGIC_NUMBER or protocol != _PROTOCOL_VERSION:
            raise InvalidValueError(
                f"'{path}' is not a legacy torch checkpoint (magic={magic!r}, "
                f"protocol={protocol!r}; expected {_MAGIC_NUMBER}, {_PROTOCOL_VERSION})."
            )
        header.load()  # sys info: endianness and type sizes
        result = _RestrictedUnpickler(f, storages).load()
        keys = _RestrictedUnpickler(f, storages).load()
        for key in keys:
            storage = storages[key]
            numel = int.from_bytes(f.read(8), "little")
            raw = f.read(numel * storage.dtype.itemsize)
            if numel != storage.numel or len(raw) != numel * storage.dtype.itemsize:
                raise InvalidValueError(f"'{path}' is truncated or corrupt at storage {key}.")
            storage.data = np.frombuffer(raw, dtype=storage.dtype.newbyteorder("<"))
    return {name: ref.to_numpy() for name, ref in result.items()}
