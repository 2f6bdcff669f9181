"""Read PyTorch's `.pth` / `.pt` / `.bin` files into numpy, without PyTorch and without running
pickle code.

torch.save (since torch 1.6) writes a zip archive: `<archive>/data.pkl`, a pickle of the object in
which every tensor is a call `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`
and every storage a persistent id `('storage', torch.FloatStorage, key, location, numel)` whose
bytes are the entry `<archive>/data/<key>`; `<archive>/byteorder` says "little" or "big". Older
files (the legacy format, still read by torch.load) hold the same pickle followed by the storages'
bytes; both are read here.

A pickle can call any importable function, so `torch.load(weights_only=False)` on a file from the
internet runs whatever the file asks for. Here `find_class` resolves only the tensor-rebuild
functions, the storage and dtype names and plain containers, each to a numpy replacement written
below; any other global is refused with `UnsafePickleError` before it is called.
"""
from __future__ import annotations

import _compat_pickle
import collections
import os
import pickle
import zipfile
from collections.abc import Callable
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from jax_diffusion.errors import InputFileError, UnsafePickleError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization's MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001
# torch's legacy storage classes -> element type of their bytes.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128, "UntypedStorage": np.uint8,
}
# torch dtypes named in the pickle (by _rebuild_tensor_v3, which reads an untyped byte storage).
_TORCH_DTYPES = {
    "float64": np.float64, "float32": np.float32, "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16, "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2, "int64": np.int64, "int32": np.int32,
    "int16": np.int16, "int8": np.int8, "uint64": np.uint64, "uint32": np.uint32,
    "uint16": np.uint16, "uint8": np.uint8, "bool": np.bool_, "complex64": np.complex64,
    "complex128": np.complex128,
}


class _Storage(NamedTuple):
    """The flat elements of one storage, shared by every tensor that views it; None while the
    elements are not read yet (the first pass over a legacy file). Immutable, like every object
    the pickle gets hold of, so that its BUILD opcode cannot alter it."""
    elements: np.ndarray | None


# read_storage(key, element dtype, element count) -> the elements in the file's byte order, or
# None to only record which storages the pickle names.
_StorageReader = Callable[[str, np.dtype, int], "np.ndarray | None"]


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(size):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _strided_copy(path: str, elements: np.ndarray, offset: int, size: tuple, stride: tuple
                  ) -> np.ndarray:
    """A contiguous, native-byte-order copy of the view (offset, size, stride), counted in
    elements, after checking that the view stays inside its storage."""
    offset, size, stride = int(offset), tuple(int(n) for n in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
        raise InputFileError(f"{path}: malformed tensor record (offset {offset}, size {size}, "
                             f"stride {stride}): not a valid PyTorch file")
    native = elements.dtype.newbyteorder("=")
    if 0 in size:
        return np.zeros(size, native)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= len(elements):
        raise InputFileError(f"{path}: a tensor of size {size} at offset {offset} needs "
                             f"{last + 1} elements but its storage holds {len(elements)}: "
                             f"the file is truncated or corrupt")
    if stride == _contiguous_strides(size):
        view = elements[offset:last + 1].reshape(size)
    else:  # gather through an index array: numpy checks every index, nothing reads raw memory
        index = np.asarray(offset, np.int64)
        for n, s in zip(size, stride, strict=True):
            index = index[..., None] + np.arange(n, dtype=np.int64) * s
        view = elements[index]
    return view.astype(native, copy=True)


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals torch writes for tensors and state dicts; the storages named by
    persistent ids come from `read_storage`."""

    def __init__(self, file, path: str, read_storage: _StorageReader | None = None,
                 byteorder: str = "<"):
        super().__init__(file)
        self._path, self._read_storage, self._byteorder = path, read_storage, byteorder
        self._storages: dict[str, _Storage] = {}
        self._globals = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_tensor_v3"): self._rebuild_tensor_v3,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
            ("torch", "Size"): tuple,
            ("torch", "device"): str,
            ("torch.storage", "UntypedStorage"): "UntypedStorage",
            ("builtins", "set"): set,
            ("builtins", "complex"): complex,
            ("builtins", "bytearray"): bytearray,
            ("_codecs", "encode"): _latin1_bytes,  # how protocol 2 pickles a bytes object
        }
        # Storage types and dtypes resolve to their names: immutable strings, which the pickle's
        # BUILD opcode cannot alter (numpy's dtype objects are process-wide singletons).
        self._globals.update({("torch", name): name for name in _STORAGE_DTYPES})
        self._globals.update({("torch", name): name for name in _TORCH_DTYPES})

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 2 (torch's) writes Python 2 names: map them back as pickle itself does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        try:
            return self._globals[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._path}: refused to load: its pickle asks for the global "
                f"{module}.{name}, which is not a tensor-rebuild function, storage type or plain "
                f"container; nothing was run. A weights file never needs it; re-save only the "
                f"state dict (torch.save(model.state_dict(), path)) if you trust the file"
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        """('storage', storage type, key, location, numel[, view]) -> the storage; the legacy
        format's optional view (view key, offset, size) is a slice of it."""
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and pid[1] in _STORAGE_DTYPES and self._read_storage is not None):
            raise InputFileError(f"{self._path}: unknown persistent record {pid!r:.80}: not a "
                                 f"PyTorch tensor file")
        dtype, key, numel = np.dtype(_STORAGE_DTYPES[pid[1]]), str(pid[2]), int(pid[4])
        if key not in self._storages:
            self._storages[key] = _Storage(self._read_storage(key, dtype, numel))
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return self._storages[key]
        view_key, view_offset, view_size = view
        elements = self._storages[key].elements
        return _Storage(None if elements is None
                        else elements[int(view_offset):int(view_offset) + int(view_size)])

    def _rebuild_tensor_v2(self, storage: _Storage, offset: int, size: tuple, stride: tuple,
                           requires_grad: bool = False, backward_hooks: Any = None,
                           metadata: Any = None) -> np.ndarray | None:
        if storage.elements is None:
            return None
        return _strided_copy(self._path, storage.elements, offset, size, stride)

    def _rebuild_tensor_v3(self, storage: _Storage, offset: int, size: tuple, stride: tuple,
                           requires_grad: bool, backward_hooks: Any, dtype: str,
                           metadata: Any = None) -> np.ndarray | None:
        """Tensors of dtypes without a legacy storage class: their storage is untyped bytes."""
        raw = storage.elements
        if raw is None:
            return None
        if dtype not in _TORCH_DTYPES:
            raise InputFileError(f"{self._path}: unknown tensor dtype {dtype!r:.40}")
        dtype = np.dtype(_TORCH_DTYPES[dtype]).newbyteorder(self._byteorder)
        if raw.dtype.itemsize != 1 or len(raw) % dtype.itemsize:
            raise InputFileError(f"{self._path}: a {dtype} tensor on a storage of "
                                 f"{raw.dtype} x {len(raw)}: not a valid PyTorch file")
        return _strided_copy(self._path, raw.view(dtype), offset, size, stride)


def _rebuild_parameter(data: np.ndarray, *unused: Any) -> np.ndarray:
    """nn.Parameter(data, requires_grad): the array is all that a weights file needs."""
    return data


def _latin1_bytes(text: str, encoding: str = "utf-8") -> bytes:
    if encoding != "latin1":
        raise UnsafePickleError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _archive_prefix(path: str, archive: zipfile.ZipFile) -> str:
    """'<archive>/' of the single '<archive>/data.pkl' entry."""
    pickles = [name for name in archive.namelist()
               if name.endswith("data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        raise InputFileError(f"{path}: a zip file but not one torch.save wrote (expected one "
                             f"<archive>/data.pkl entry, found {len(pickles)})")
    return pickles[0][:-len("data.pkl")]


def _load_zip(path: str) -> Any:
    """The format of torch.save since torch 1.6: storages are the entries <archive>/data/<key>."""
    with zipfile.ZipFile(path) as archive:
        prefix = _archive_prefix(path, archive)
        byteorder = "little"  # what torch assumes when the record is absent
        if f"{prefix}byteorder" in archive.namelist():
            byteorder = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise InputFileError(f"{path}: unknown byteorder record {byteorder!r}")
        order = "<" if byteorder == "little" else ">"

        def read_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
            entry = f"{prefix}data/{key}"
            try:
                raw = archive.read(entry)
            except KeyError:
                raise InputFileError(f"{path}: storage {entry} is missing: the file is "
                                     f"truncated or corrupt") from None
            dtype = dtype.newbyteorder(order)
            if len(raw) % dtype.itemsize:
                raise InputFileError(f"{path}: storage {entry} has {len(raw)} bytes, not a "
                                     f"multiple of its {dtype.itemsize}-byte elements")
            return np.frombuffer(raw, dtype)

        with archive.open(f"{prefix}data.pkl") as pickled:
            return _RestrictedUnpickler(pickled, path, read_storage, order).load()


def _load_legacy(path: str, file) -> Any:
    """The format of torch.save before torch 1.6 (pytorch-fid's Inception weights use it): the
    pickles of a magic number, the protocol version and sys_info, the object, the sorted list of
    storage keys, then each storage as an int64 element count and its little-endian bytes. The
    object's pickle is read twice: first to learn each storage's type and size, then, with the
    storages read, to build the arrays."""
    header = _RestrictedUnpickler(file, path)
    if header.load() != _LEGACY_MAGIC or header.load() != _LEGACY_PROTOCOL:
        raise InputFileError(f"{path}: not a PyTorch file (no torch.save magic number)")
    sys_info = header.load()
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
        raise InputFileError(f"{path}: a legacy PyTorch file from a big-endian machine, which is "
                             f"not supported: re-save it with torch >= 1.6")
    start = file.tell()
    wanted: dict[str, tuple[np.dtype, int]] = {}

    def record(key: str, dtype: np.dtype, numel: int) -> None:
        wanted[key] = (dtype, numel)

    _RestrictedUnpickler(file, path, record).load()
    storages = {}
    for key in _RestrictedUnpickler(file, path).load():
        if key not in wanted:
            raise InputFileError(f"{path}: storage {key!r} is listed but never used: corrupt")
        dtype, numel = wanted[key]
        count = int.from_bytes(file.read(8), "little")
        raw = file.read(numel * dtype.itemsize)
        if count != numel or len(raw) != numel * dtype.itemsize:
            raise InputFileError(f"{path}: storage {key!r} should hold {numel} elements but the "
                                 f"file gives {count} and {len(raw)} bytes: truncated or corrupt")
        storages[key] = np.frombuffer(raw, dtype.newbyteorder("<"))
    missing = sorted(set(wanted) - set(storages))
    if missing:
        raise InputFileError(f"{path}: storages {missing[:5]} are missing: truncated or corrupt")
    file.seek(start)
    return _RestrictedUnpickler(file, path, lambda key, dtype, numel: storages[key]).load()


def load(path: str | os.PathLike) -> Any:
    """The object torch.save wrote to `path`, with a numpy array in place of every tensor and
    parameter (contiguous copies in native byte order; views of one storage become independent
    arrays). Reads the zip format (torch >= 1.6) and the legacy one. Raises UnsafePickleError
    for a pickle that asks for anything else than tensors and containers, InputFileError for a
    missing, truncated or malformed file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputFileError(f"{path}: no such file")
    try:
        with open(path, "rb") as file:
            head = file.read(4)
            if head == b"PK\x03\x04":
                return _load_zip(path)
            if head[:1] == b"\x80":  # a pickle: the legacy format's magic number
                file.seek(0)
                return _load_legacy(path, file)
            raise InputFileError(f"{path}: not a PyTorch file (neither the zip nor the legacy "
                                 f"format of torch.save)")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, pickle.UnpicklingError,
            ValueError, TypeError, IndexError, KeyError, AttributeError, OSError) as error:
        if isinstance(error, InputFileError | UnsafePickleError):
            raise
        raise InputFileError(f"{path}: not a readable PyTorch file, truncated or corrupt "
                             f"({type(error).__name__}: {error})") from error


def _is_state_dict(value: Any) -> bool:
    return (isinstance(value, dict) and len(value) > 0
            and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in value.items()))


def _state_dicts(value: Any, where: str = "") -> dict[str, dict]:
    """{dotted key path: state dict} of every state dict nested under `value` through string
    keys (an optimizer's per-parameter states sit under integer keys and are not model weights)."""
    if _is_state_dict(value):
        return {where: value}
    found = {}
    if isinstance(value, dict):
        for key, child in value.items():
            if isinstance(key, str):
                found.update(_state_dicts(child, f"{where}.{key}" if where else key))
    return found


def load_state_dict(path: str | os.PathLike, key: str | None = None) -> dict[str, np.ndarray]:
    """{parameter name: array} from a PyTorch weights file, read safely (see `load`).

    A state dict is a dict of str -> tensor. The file may hold it at the top level or nested in
    dicts, e.g. {"state_dict": {...}} or {"model": {...}, "epoch": 3}: when exactly one state dict
    is found it is returned; when several are (e.g. "model" and "ema"), `key` picks one by its
    dotted path ("ema", "checkpoint.model") and without it the error lists them."""
    path = os.fspath(path)
    found = _state_dicts(load(path))
    if key is not None:
        if key not in found:
            raise InputFileError(f"{path}: no state dict at key {key!r}; state dicts found at: "
                                 f"{sorted(found) or 'none'}")
        return dict(found[key])
    if len(found) == 1:
        return dict(next(iter(found.values())))
    if not found:
        raise InputFileError(f"{path}: holds no state dict (a dict of names to tensors)")
    raise InputFileError(f"{path}: holds {len(found)} state dicts, at keys {sorted(found)}: "
                         f"say which one to read")
