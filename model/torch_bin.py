"""Read a PyTorch `pytorch_model.bin` state dict into numpy arrays, without torch and without running
any pickled code.

`torch.save` writes a pickle in which every tensor is a call such as
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and every storage is a persistent
id naming a separate block of raw bytes. Two containers hold them:

- zip (torch >= 1.6): `<archive>/data.pkl`, one record `<archive>/data/<key>` per storage, and a
  `<archive>/byteorder` record ("little" or "big"; torch reads a file without one as little-endian);
- legacy (torch < 1.6, or `_use_new_zipfile_serialization=False`): consecutive pickles (magic number,
  protocol version, sys info, the object, the sorted storage keys), then each storage as an int64
  element count followed by its bytes, all little-endian.

The unpickler resolves only the globals a state dict needs, and to inert stand-ins: a tensor comes out
as a `_TensorRef` saying where its values live. Once the whole pickle is read, the values are cut out
of the storage bytes with numpy. Any other global is refused before anything is imported, so nothing
in the file can run.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
import sys
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO, NamedTuple

import ml_dtypes
import numpy as np

from .errors import CheckpointError, UnsafePickleError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001
_ZIP_MAGIC = b"PK\x03\x04"

# Element types by the storage class name torch pickles (torch.FloatStorage, or torch.cuda.FloatStorage
# in old checkpoints saved from a GPU). None: a torch type numpy cannot represent.
_STORAGE_DTYPES: dict[str, np.dtype | None] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "QInt8Storage": None,
    "QInt32Storage": None,
    "QUInt8Storage": None,
    "QUInt4x2Storage": None,
    "QUInt2x4Storage": None,
}
_STORAGE_MODULES = ("torch", "torch.cuda")
# Tensors of dtypes newer than the typed storage classes sit on an untyped (byte) storage.
_UNTYPED_STORAGE_MODULES = ("torch", "torch.storage")

# `torch.<name>` dtype globals, which _rebuild_tensor_v3 passes for tensors on an untyped storage.
_TORCH_DTYPES: dict[str, np.dtype | None] = {
    **{name: np.dtype(name) for name in ("float64", "float32", "float16", "complex64", "complex128")},
    **{name: np.dtype(name) for name in ("int64", "int32", "int16", "int8", "uint8", "bool")},
    **{name: np.dtype(name) for name in ("uint16", "uint32", "uint64")},
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    **{
        name: np.dtype(getattr(ml_dtypes, name))
        for name in ("float8_e5m2", "float8_e4m3fn", "float8_e5m2fnuz", "float8_e4m3fnuz", "float8_e8m0fnu")
    },
    **{
        name: None
        for name in ("complex32", "float4_e2m1fn_x2", "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2")
    },
}

# torch's own rebuild functions for tensors that are not plain dense host arrays.
_UNSUPPORTED_REBUILDS = {
    "_rebuild_qtensor",
    "_rebuild_sparse_tensor",
    "_rebuild_nested_tensor",
    "_rebuild_meta_tensor_no_storage",
    "_rebuild_wrapper_subclass",
    "_rebuild_device_tensor_from_numpy",
    "_rebuild_device_tensor_from_cpu_tensor",
}


# Stand-ins the unpickler builds. NamedTuples, so a BUILD opcode in a hostile pickle cannot alter them
# after they were checked.
class _StorageType(NamedTuple):
    name: str  # the global, for messages
    dtype: np.dtype | None


class _DType(NamedTuple):
    name: str
    dtype: np.dtype | None


class _StorageRef(NamedTuple):
    key: str  # names the storage's bytes: zip record data/<key>, or the legacy key list entry
    dtype: np.dtype  # element type it was saved as (uint8 for an untyped storage)
    numel: int  # elements of the whole storage, as the pickle declares
    view_offset: int  # legacy storage views: where the view starts in the storage, in elements
    view_numel: int | None  # legacy storage views: their length; None for the whole storage


class _TensorRef(NamedTuple):
    storage: _StorageRef
    dtype: np.dtype
    offset: int  # in elements of dtype, like size and stride
    size: tuple[int, ...]
    stride: tuple[int, ...]
    conj: bool  # torch saves conjugate and negative views lazily, as flags on the stored values
    neg: bool


def _text(value) -> str:
    # Pickles written by Python 2 give persistent-id strings as bytes.
    return value.decode("ascii") if isinstance(value, bytes) else value


def _is_index(value) -> bool:
    return type(value) is int and value >= 0


def _is_shape(value) -> bool:
    return isinstance(value, tuple) and all(_is_index(v) for v in value)


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles the object of a torch.save file into dicts of `_TensorRef`s, resolving nothing else."""

    def __init__(self, file: BinaryIO, path: Path):
        # torch.load decodes Python 2 strings as utf-8 too.
        super().__init__(file, encoding="utf-8")
        self.path = path
        # key -> (element type, numel) of every storage the pickle refers to
        self.storages: dict[str, tuple[np.dtype, int]] = {}
        self._rebuilds: dict[str, Callable] = {
            "_rebuild_tensor": self._rebuild_tensor,
            "_rebuild_tensor_v2": self._rebuild_tensor_v2,
            "_rebuild_tensor_v3": self._rebuild_tensor_v3,
            "_rebuild_parameter": self._rebuild_parameter,
            "_rebuild_parameter_with_state": self._rebuild_parameter_with_state,
        }

    def _corrupt(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: corrupt pickle: {what}", file=self.path)

    def find_class(self, module: str, name: str):
        written = f"{module}.{name}"
        # Protocol-2 pickles (torch's default) spell globals the Python 2 way, e.g. __builtin__.exec; map
        # them as torch's own weights-only unpickler does, for matching and for the message.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        qualified = f"{module}.{name}"
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in self._rebuilds:
            return self._rebuilds[name]
        if module == "torch._utils" and name in _UNSUPPORTED_REBUILDS:
            raise CheckpointError(
                f"{self.path}: holds a tensor rebuilt by {qualified} (quantized, sparse, nested or "
                "device-only); only dense tensors can be read",
                file=self.path,
            )
        if module in _STORAGE_MODULES and name in _STORAGE_DTYPES:
            return _StorageType(qualified, _STORAGE_DTYPES[name])
        if module in _UNTYPED_STORAGE_MODULES and name == "UntypedStorage":
            return _StorageType(qualified, np.dtype(np.uint8))
        if module == "torch" and name in _TORCH_DTYPES:
            return _DType(qualified, _TORCH_DTYPES[name])
        raise UnsafePickleError(
            f"{self.path}: the pickle asks for the global {qualified}"
            + (f" (written {written})" if written != qualified else "")
            + ", which a state dict never needs; refusing to load it (nothing was run)",
            file=self.path,
        )

    def persistent_load(self, pid):
        # zip: ("storage", type, key, location, numel); legacy adds view metadata (key, offset, numel).
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and _text(pid[0]) == "storage"):
            raise self._corrupt(f"unexpected persistent id {pid!r:.100}")
        storage_type, key, _location, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        key = _text(key)
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not _is_index(numel):
            raise self._corrupt(f"malformed storage id {pid!r:.100}")
        if storage_type.dtype is None:
            raise CheckpointError(
                f"{self.path}: storage {key} is a {storage_type.name}, which has no numpy equivalent",
                file=self.path,
                key=key,
            )
        if self.storages.setdefault(key, (storage_type.dtype, numel)) != (storage_type.dtype, numel):
            raise self._corrupt(f"storage {key} is declared twice, with different types or sizes")
        if view is None:
            return _StorageRef(key, storage_type.dtype, numel, 0, None)
        if not (isinstance(view, tuple) and len(view) == 3 and _is_index(view[1]) and _is_index(view[2])):
            raise self._corrupt(f"malformed storage view {view!r:.100}")
        return _StorageRef(key, storage_type.dtype, numel, view[1], view[2])

    def _tensor_ref(self, storage, dtype, offset, size, stride, metadata=None) -> _TensorRef:
        if not isinstance(storage, _StorageRef):
            raise self._corrupt(f"a tensor's storage is a {type(storage).__name__}")
        if not (_is_index(offset) and _is_shape(size) and _is_shape(stride) and len(size) == len(stride)):
            raise self._corrupt(
                f"bad tensor layout: offset {offset!r:.40}, size {size!r:.60}, stride {stride!r:.60}"
            )
        metadata = metadata or {}
        if not (isinstance(metadata, dict) and set(metadata) <= {"conj", "neg"}):
            raise self._corrupt(f"unknown tensor metadata {metadata!r:.100}")
        return _TensorRef(
            storage, dtype, offset, size, stride, bool(metadata.get("conj")), bool(metadata.get("neg"))
        )

    def _rebuild_tensor(self, storage, storage_offset, size, stride):
        dtype = storage.dtype if isinstance(storage, _StorageRef) else None
        return self._tensor_ref(storage, dtype, storage_offset, size, stride)

    def _rebuild_tensor_v2(
        self, storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
    ):
        # requires_grad and backward hooks are training state, irrelevant to the values.
        dtype = storage.dtype if isinstance(storage, _StorageRef) else None
        return self._tensor_ref(storage, dtype, storage_offset, size, stride, metadata)

    def _rebuild_tensor_v3(
        self, storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
    ):
        if not isinstance(dtype, _DType):
            raise self._corrupt(f"tensor dtype is a {type(dtype).__name__}")
        if dtype.dtype is None:
            raise CheckpointError(
                f"{self.path}: holds a {dtype.name} tensor, which has no numpy equivalent", file=self.path
            )
        return self._tensor_ref(storage, dtype.dtype, storage_offset, size, stride, metadata)

    def _rebuild_parameter(self, data, requires_grad, backward_hooks):
        if not isinstance(data, _TensorRef):
            raise self._corrupt(f"a parameter wraps a {type(data).__name__}")
        return data

    def _rebuild_parameter_with_state(self, data, requires_grad, backward_hooks, state):
        # state holds Python attributes set on the Parameter object, not values.
        return self._rebuild_parameter(data, requires_grad, backward_hooks)


class _HeaderUnpickler(pickle.Unpickler):
    """For the legacy format's plain-data pickles (magic, version, sys info, key list): no globals."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"unexpected global {module}.{name} in a header pickle")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("unexpected persistent id in a header pickle")


def _unpickle(unpickler: pickle.Unpickler, path: Path, what: str):
    """unpickler.load(), with every failure turned into a CheckpointError naming the file."""
    try:
        return unpickler.load()
    except CheckpointError:
        raise
    except Exception as exc:
        # Data running out mid-pickle is an UnpicklingError ("pickle data was truncated"), at its start an EOFError.
        if isinstance(exc, EOFError) or "truncated" in str(exc):
            raise CheckpointError(f"{path}: {what} ends early; the file is truncated", file=path) from exc
        raise CheckpointError(f"{path}: {what} is corrupt ({type(exc).__name__}: {exc})", file=path) from exc


def _state_dict_refs(obj, path: Path) -> dict[str, _TensorRef]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)",
            file=path,
        )
    for name, value in obj.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{path}: state dict key {name!r:.80} is not a string", file=path)
        if not isinstance(value, _TensorRef):
            raise CheckpointError(
                f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor; a state dict maps names to tensors",
                file=path,
                key=name,
            )
    return dict(obj)


def _native_storage(
    path: Path, name: str, storage: _StorageRef, record: np.ndarray, where: str, byteorder: str
) -> np.ndarray:
    """The storage's declared bytes from its record, in native byte order. name: the tensor needing it."""
    declared = storage.numel * storage.dtype.itemsize
    if record.size < declared:
        raise CheckpointError(
            f"{path}: tensor {name!r}: {where} holds {record.size} bytes, "
            f"but the pickle declares {storage.numel} elements of {storage.dtype} ({declared} bytes)",
            file=path,
            key=name,
        )
    raw = record[:declared]  # [declared] uint8
    if byteorder == sys.byteorder:
        return raw
    # torch swaps by the storage's element type, so a tensor on an untyped storage is never swapped.
    unit = storage.dtype.itemsize // 2 if storage.dtype.kind == "c" else storage.dtype.itemsize
    return raw if unit == 1 else raw.view(np.dtype(f"u{unit}")).byteswap().view(np.uint8)


def _tensor(path: Path, name: str, ref: _TensorRef, raw: np.ndarray, where: str) -> np.ndarray:
    """Cut tensor `name` out of its storage's native-order bytes, as a contiguous copy."""
    storage, itemsize = ref.storage, ref.dtype.itemsize
    if storage.view_numel is not None:  # legacy storage view: a window on the storage
        start = storage.view_offset * storage.dtype.itemsize
        stop = start + storage.view_numel * storage.dtype.itemsize
        if stop > raw.size:
            raise CheckpointError(
                f"{path}: tensor {name!r}: storage view [{start}:{stop}] bytes runs past {where} ({raw.size} bytes)",
                file=path,
                key=name,
            )
        raw = raw[start:stop]
    if 0 in ref.size:
        return np.empty(ref.size, dtype=ref.dtype)
    available = raw.size // itemsize  # whole elements in the storage
    extent = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True)) + 1
    if extent > available:
        raise CheckpointError(
            f"{path}: tensor {name!r} of size {list(ref.size)}, stride {list(ref.stride)} at offset {ref.offset} "
            f"needs {extent} elements, but {where} holds only {available} {ref.dtype} elements",
            file=path,
            key=name,
        )
    try:
        # Stride over bytes, each element its own trailing axis: numpy's as_strided cannot take the
        # ml_dtypes types (float8) directly.
        element_bytes = np.lib.stride_tricks.as_strided(
            raw[ref.offset * itemsize :],
            shape=(*ref.size, itemsize),
            strides=(*(s * itemsize for s in ref.stride), 1),
            writeable=False,
        )  # [*size, itemsize] uint8
        # A copy, so no result pins the storage buffer or aliases another tensor on the same storage.
        array = np.array(element_bytes, order="C", copy=True).view(ref.dtype).reshape(ref.size)
    except (MemoryError, ValueError, OverflowError) as exc:  # e.g. a huge size over a stride-0 storage
        raise CheckpointError(
            f"{path}: tensor {name!r} cannot be built ({exc})", file=path, key=name
        ) from exc
    if ref.conj:
        array = np.conj(array)
    if ref.neg:
        array = np.negative(array)
    return array


def _materialize_all(
    path: Path,
    refs: dict[str, _TensorRef],
    read_storage: Callable[[str], np.ndarray],
    describe: Callable[[str], str],
    byteorder: str,
) -> dict[str, np.ndarray]:
    """Every tensor as an array. read_storage(key) gives a storage's record bytes, describe(key) its name."""
    # Keep a storage's bytes only until its last tensor is cut out, so memory peaks near one copy.
    uses = collections.Counter(ref.storage.key for ref in refs.values())
    storages: dict[str, np.ndarray] = {}
    tensors = {}
    for name, ref in refs.items():
        key = ref.storage.key
        if key not in storages:
            try:
                record = read_storage(key)
            except CheckpointError as exc:
                raise CheckpointError(f"{exc} (needed by tensor {name!r})", file=path, key=name) from exc
            storages[key] = _native_storage(path, name, ref.storage, record, describe(key), byteorder)
        tensors[name] = _tensor(path, name, ref, storages[key], describe(key))
        uses[key] -= 1
        if not uses[key]:
            del storages[key]
    return tensors


def _load_zip(path: Path) -> dict[str, np.ndarray]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: truncated or corrupt zip archive (zipfile: {exc})", file=path
        ) from exc
    with archive:
        names = archive.namelist()
        # torch names the archive's top folder after the file it was saved to; any name is valid.
        pickles = [name for name in names if name.count("/") == 1 and name.endswith("/data.pkl")]
        if not pickles:
            raise CheckpointError(
                f"{path}: a zip archive without <archive>/data.pkl, so not a PyTorch checkpoint", file=path
            )
        prefix = pickles[0][: -len("data.pkl")]

        def read_record(record: str) -> bytes:
            try:
                return archive.read(record)
            except KeyError as exc:
                raise CheckpointError(f"{path}: record {record} is missing", file=path, key=record) from exc
            # RuntimeError: encrypted; NotImplementedError: a compression zipfile lacks.
            except (
                zipfile.BadZipFile,
                zlib.error,
                OSError,
                EOFError,
                ValueError,
                RuntimeError,
                NotImplementedError,
            ) as exc:
                raise CheckpointError(
                    f"{path}: record {record} is corrupt ({exc})", file=path, key=record
                ) from exc

        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = read_record(prefix + "byteorder").decode("ascii", "replace")
            if byteorder not in ("little", "big"):
                raise CheckpointError(f"{path}: unknown byteorder record {byteorder!r:.40}", file=path)

        unpickler = _StateDictUnpickler(io.BytesIO(read_record(pickles[0])), path)
        refs = _state_dict_refs(_unpickle(unpickler, path, pickles[0]), path)

        def read_storage(key: str) -> np.ndarray:
            return np.frombuffer(read_record(f"{prefix}data/{key}"), dtype=np.uint8)

        return _materialize_all(path, refs, read_storage, lambda key: f"record {prefix}data/{key}", byteorder)


def _is_legacy_header(head: bytes) -> bool:
    # The first pickle is the magic number, a 10-byte LONG1 (opcode 0x8a, length 10) at any protocol >= 2.
    return head.startswith(b"\x80") and b"\x8a\x0a" + _LEGACY_MAGIC.to_bytes(10, "little") in head[:32]


def _load_legacy(path: Path, file: BinaryIO) -> dict[str, np.ndarray]:
    for what, expected in (("magic number", _LEGACY_MAGIC), ("protocol version", _LEGACY_PROTOCOL_VERSION)):
        value = _unpickle(_HeaderUnpickler(file), path, f"legacy {what}")
        if value != expected:
            raise CheckpointError(f"{path}: legacy {what} is {value!r:.40}, expected {expected}", file=path)
    _unpickle(
        _HeaderUnpickler(file), path, "legacy sys info"
    )  # endianness there is moot: data is little-endian
    unpickler = _StateDictUnpickler(file, path)
    refs = _state_dict_refs(_unpickle(unpickler, path, "pickle"), path)
    keys = _unpickle(_HeaderUnpickler(file), path, "storage key list")
    storages_start = file.tell()
    if not (isinstance(keys, list) and all(isinstance(key, str) for key in keys)):
        raise CheckpointError(
            f"{path}: storage key list is a {type(keys).__name__}, not a list of keys", file=path
        )

    # Each storage is an int64 element count then its bytes, in key-list order. Locate them all
    # first, so a truncation is reported against the tensor whose storage it cut.
    file_size = file.seek(0, io.SEEK_END)
    position = file.seek(storages_start)
    records: dict[str, tuple[int, int]] = {}  # key -> (file offset of the bytes, element count)
    for key in keys:
        if key not in unpickler.storages:
            raise CheckpointError(
                f"{path}: storage key list names {key}, which no tensor uses", file=path, key=key
            )
        if position + 8 > file_size:
            break
        count = int.from_bytes(file.read(8), "little", signed=True)
        nbytes = count * unpickler.storages[key][0].itemsize
        if count < 0 or position + 8 + nbytes > file_size:
            break
        records[key] = (position + 8, count)
        position = file.seek(position + 8 + nbytes)

    def read_storage(key: str) -> np.ndarray:
        if key not in records:
            reason = "is cut off, the file is truncated" if key in keys else "is not in the storage key list"
            raise CheckpointError(f"{path}: storage {key} {reason}", file=path)
        start, count = records[key]
        dtype, numel = unpickler.storages[key]
        if count != numel:
            raise CheckpointError(
                f"{path}: storage {key} holds {count} elements, but the pickle declares {numel}", file=path
            )
        file.seek(start)
        return np.frombuffer(file.read(count * dtype.itemsize), dtype=np.uint8)

    return _materialize_all(path, refs, read_storage, lambda key: f"storage {key}", "little")


def load_torch_bin(path: str | Path) -> dict[str, np.ndarray]:
    """Read a PyTorch checkpoint (state dict) into numpy arrays without importing torch and without
    executing any pickled code.

    Reads both torch.save containers (zip and legacy). Tensors come out as contiguous arrays in the
    saved dtype (bfloat16 as ml_dtypes.bfloat16), one copy each even where the file shares storage.
    Raises UnsafePickleError if the pickle asks for anything but tensors and plain containers, and
    CheckpointError (naming the file, and the tensor or record at fault) for anything unreadable.
    """
    path = Path(path)
    try:
        with open(path, "rb") as file:
            head = file.read(512)
            if _is_legacy_header(head):
                file.seek(0)
                return _load_legacy(path, file)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc})", file=path) from exc
    if head.startswith(_ZIP_MAGIC):
        return _load_zip(path)
    if head[257:262] == b"ustar":
        raise CheckpointError(
            f"{path}: a tar-format checkpoint (torch < 0.4), which is not supported", file=path
        )
    raise CheckpointError(
        f"{path}: not a PyTorch checkpoint (neither a zip archive nor a legacy torch.save pickle)", file=path
    )
