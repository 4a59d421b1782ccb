"""Read the tensors of a `torch.save` file, either format, without `torch.load`.

A pickle may name any importable callable (`os.system`, ...) and have the loader call it. This
reader's unpickler resolves only an explicit list of names: the two functions that rebuild tensors
and parameters (replaced by our own, which only slice the file's bytes), torch's storage classes
(mapped to their dtypes), `OrderedDict`, `set` and `object`, and whatever classes the caller
declares inert (each mapped to `Record`, which keeps attributes and runs nothing). Every other
name is refused before anything from the file is called.

Both layouts torch has written since version 1.0 are read:
- zip (the default since torch 1.6): `NAME/data.pkl` and one entry `NAME/data/KEY` per storage;
- legacy: five pickles in a row (magic number, protocol version, system info, the object, the
  storage keys), then each storage as a little-endian int64 element count and its bytes.
"""
from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
DTYPES = {"DoubleStorage": torch.float64, "FloatStorage": torch.float32,
          "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
          "LongStorage": torch.int64, "IntStorage": torch.int32, "ShortStorage": torch.int16,
          "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool}


class Record:
    """Stands in for an object of an inert class (a pickled nn.Module, say): keeps its
    attributes, runs nothing."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class _Storage:
    """A storage's dtype and element count; its bytes arrive once the file has been read."""

    def __init__(self, dtype: torch.dtype, numel: int) -> None:
        self.dtype, self.numel = dtype, numel
        self.data: bytes | None = None

    def flat(self) -> torch.Tensor:
        if self.data is None:
            raise pickle.UnpicklingError("a tensor refers to a storage the file does not hold")
        size = torch.empty((), dtype=self.dtype).element_size()
        if len(self.data) != self.numel * size:
            raise pickle.UnpicklingError(f"a storage holds {len(self.data)} bytes, its "
                                         f"{self.numel} elements need {self.numel * size}")
        return torch.frombuffer(bytearray(self.data), dtype=self.dtype) if self.data else \
            torch.empty(0, dtype=self.dtype)


class TensorRef:
    """A tensor of the file: a view (offset, size, stride) of one of its storages."""

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...],
                 stride: tuple[int, ...]) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def tensor(self) -> torch.Tensor:
        """The tensor itself, a copy (strides and offset checked against the storage)."""
        try:
            return torch.as_strided(self.storage.flat(), self.size, self.stride,
                                    self.offset).clone()
        except (RuntimeError, TypeError) as err:
            raise pickle.UnpicklingError(f"a tensor does not fit its storage: "
                                         f"{str(err).splitlines()[0]}") from None


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple[int, ...],
                    stride: tuple[int, ...], *_: Any) -> TensorRef:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor without a storage")
    return TensorRef(storage, offset, tuple(size), tuple(stride))


def _rebuild_parameter(data: TensorRef, *_: Any) -> TensorRef:
    return data


def _reconstructor(cls: type, base: type, state: object) -> Record:
    return Record()


_ALLOWED: dict[tuple[str, str], object] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("builtins", "object"): object,
    ("builtins", "set"): set,
    **{("torch", name): _StorageType(dtype) for name, dtype in DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, inert: Callable[[str, str], bool],
                 storage: Callable[[tuple], object]) -> None:
        super().__init__(file)
        self.inert, self.storage = inert, storage

    def find_class(self, module: str, name: str) -> object:
        module = "builtins" if module == "__builtin__" else module   # protocol 2's old name
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if self.inert(module, name):
            return Record
        raise pickle.UnpicklingError(f"refusing global {module}.{name}: only tensors, plain "
                                     "values and inert modules are read")

    def persistent_load(self, pid: object) -> object:
        return self.storage(pid)


def _no_storage(pid: object) -> object:
    raise pickle.UnpicklingError("unexpected persistent id in a header pickle")


def _new_storage(pid: tuple, storages: dict[str, _Storage]) -> _Storage:
    kind, storage_type, key, _location, numel = pid[:5]
    if kind != "storage" or not isinstance(storage_type, _StorageType) \
            or not isinstance(numel, int) or numel < 0:
        raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
    if len(pid) > 5 and pid[5] is not None:
        raise pickle.UnpicklingError("storage views (torch < 1.0 files) are not read")
    return storages.setdefault(str(key), _Storage(storage_type.dtype, numel))


def _read_zip(path: Path, inert: Callable[[str, str], bool]) -> Any:
    storages: dict[str, _Storage] = {}

    def storage(pid: object) -> object:
        if not isinstance(pid, tuple) or len(pid) != 5:
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        return _new_storage(pid, storages)

    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise pickle.UnpicklingError("a zip archive, but not one torch.save wrote "
                                         "(no single NAME/data.pkl)")
        prefix = pickles[0][:-len("data.pkl")]
        if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder") != b"little":
            raise pickle.UnpicklingError("written on a big-endian machine: not read here")
        with archive.open(pickles[0]) as f:
            obj = _Unpickler(f, inert, storage).load()
        for key, s in storages.items():
            s.data = archive.read(f"{prefix}data/{key}")
    return obj


def _read_legacy(path: Path, inert: Callable[[str, str], bool]) -> Any:
    storages: dict[str, _Storage] = {}

    def storage(pid: object) -> object:
        if isinstance(pid, tuple) and pid and pid[0] == "module":
            return pid[1] if len(pid) > 1 else None      # (class, source file, source): the class
        if not isinstance(pid, tuple) or len(pid) != 6:
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        return _new_storage(pid, storages)

    size = path.stat().st_size
    with open(path, "rb") as f:
        header = [_Unpickler(f, inert, _no_storage).load() for _ in range(3)]
        magic, _protocol, info = header
        if magic != LEGACY_MAGIC:
            raise pickle.UnpicklingError("not a file torch.save wrote (no torch magic number)")
        if not isinstance(info, dict) or info.get("little_endian") is not True:
            raise pickle.UnpicklingError("written on a big-endian machine: not read here")
        obj = _Unpickler(f, inert, storage).load()
        keys = _Unpickler(f, inert, _no_storage).load()
        if not isinstance(keys, list):
            raise pickle.UnpicklingError("no storage list after the object")
        for key in keys:
            if str(key) not in storages:
                raise pickle.UnpicklingError(f"storage {key!r} is not used by the object")
            s = storages[str(key)]
            head = f.read(8)
            count = struct.unpack("<q", head)[0] if len(head) == 8 else -1
            nbytes = s.numel * torch.empty((), dtype=s.dtype).element_size()
            if count != s.numel or nbytes > size - f.tell() \
                    or len(data := f.read(nbytes)) != nbytes:
                raise pickle.UnpicklingError(f"storage {key!r} is truncated or the wrong size")
            s.data = data
    return obj


def read_torch_file(path: str | Path, inert: Callable[[str, str], bool]) -> Any:
    """The object pickled in `path` (zip or legacy `torch.save` format), with each tensor a
    `TensorRef` (`.tensor()` gives it) and each object of a class for which
    `inert(module, name)` is true a `Record`. pickle.UnpicklingError for anything else."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        return _read_zip(path, inert)
    return _read_legacy(path, inert)
