"""Read PyTorch's `.pth` / `.pt` / `.bin` files into numpy, without PyTorch and without running
pickle code.

torch.save (since torch 1.6) writes a zip archive: `<archive>/data.pkl`, a pickle of the object in
which every tensor is a call `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`
and every storage a persistent id `('storage', torch.FloatStorage, key, location, numel)` whose
bytes are the entry `<archive>/data/<key>`; `<archive>/byteorder` says "little" or "big".

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
from typing import Any

import ml_dtypes
import numpy as np

from jax_diffusion.errors import InputFileError, UnsafePickleError

# torch's legacy storage classes -> element type of their bytes.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
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


class _StorageType:
    """What `torch.FloatStorage` (etc.) resolves to: only its element type matters."""

    def __init__(self, dtype: Any):
        self.dtype = np.dtype(dtype)


class _Storage:
    """The flat elements of one `data/<key>` entry, shared by every tensor that views it."""

    def __init__(self, elements: np.ndarray):
        self.elements = elements


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
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
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
    """Resolves only the globals torch writes for tensors and state dicts; storages come from
    the zip through `persistent_load`."""

    def __init__(self, file, path: str, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(file)
        self._path, self._archive, self._prefix = path, archive, prefix
        self._byteorder = "<" if byteorder == "little" else ">"
        self._storages: dict[str, _Storage] = {}
        self._globals = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_tensor_v3"): self._rebuild_tensor_v3,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
            ("torch", "Size"): tuple,
            ("torch", "device"): str,
            ("torch.storage", "UntypedStorage"): _StorageType(np.uint8),
            ("builtins", "set"): set,
            ("builtins", "complex"): complex,
            ("builtins", "bytearray"): bytearray,
            ("_codecs", "encode"): _latin1_bytes,  # how protocol 2 pickles a bytes object
        }
        self._globals.update({("torch", name): _StorageType(dtype)
                              for name, dtype in _STORAGE_DTYPES.items()})
        self._globals.update({("torch", name): np.dtype(dtype)
                              for name, dtype in _TORCH_DTYPES.items()})

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
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise InputFileError(f"{self._path}: unknown persistent record {pid!r:.80}: not a "
                                 f"PyTorch tensor file")
        storage_type, key = pid[1], str(pid[2])
        if key not in self._storages:
            entry = f"{self._prefix}data/{key}"
            try:
                raw = self._archive.read(entry)
            except KeyError:
                raise InputFileError(f"{self._path}: storage {entry} is missing: the file is "
                                     f"truncated or corrupt") from None
            dtype = storage_type.dtype.newbyteorder(self._byteorder)
            if len(raw) % dtype.itemsize:
                raise InputFileError(f"{self._path}: storage {entry} has {len(raw)} bytes, not a "
                                     f"multiple of its {dtype.itemsize}-byte elements")
            self._storages[key] = _Storage(np.frombuffer(raw, dtype))
        return self._storages[key]

    def _rebuild_tensor_v2(self, storage: _Storage, offset: int, size: tuple, stride: tuple,
                           requires_grad: bool = False, backward_hooks: Any = None,
                           metadata: Any = None) -> np.ndarray:
        return _strided_copy(self._path, storage.elements, offset, size, stride)

    def _rebuild_tensor_v3(self, storage: _Storage, offset: int, size: tuple, stride: tuple,
                           requires_grad: bool, backward_hooks: Any, dtype: np.dtype,
                           metadata: Any = None) -> np.ndarray:
        """Tensors of dtypes without a legacy storage class: their storage is untyped bytes."""
        raw = storage.elements
        dtype = np.dtype(dtype).newbyteorder(self._byteorder)
        if raw.dtype != np.uint8 or len(raw) % dtype.itemsize:
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


def _not_a_zip_message(path: str, head: bytes) -> str:
    if head[:1] == b"\x80":
        return (f"{path}: a PyTorch file in the legacy format (written by torch < 1.6 or with "
                f"_use_new_zipfile_serialization=False), which is not supported: re-save it with "
                f"a current torch (torch.save(torch.load(path, weights_only=True), path))")
    return f"{path}: not a PyTorch file (no zip archive of torch.save: .pth, .pt or .bin)"


def load(path: str | os.PathLike) -> Any:
    """The object torch.save wrote to `path`, with a numpy array in place of every tensor and
    parameter (contiguous copies in native byte order; views of one storage become independent
    arrays). Raises UnsafePickleError for a pickle that asks for anything else than tensors and
    containers, InputFileError for a missing, truncated or malformed file."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as file:
            head = file.read(4)
    except OSError as error:
        raise InputFileError(f"{path}: cannot read the file ({error.strerror or error})") from error
    if head != b"PK\x03\x04":
        raise InputFileError(_not_a_zip_message(path, head))
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _archive_prefix(path, archive)
            byteorder = "little"
            if f"{prefix}byteorder" in archive.namelist():
                byteorder = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise InputFileError(f"{path}: unknown byteorder record {byteorder!r}")
            with archive.open(f"{prefix}data.pkl") as pickled:
                return _RestrictedUnpickler(pickled, path, archive, prefix, byteorder).load()
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
