"""Reading weight files into flat {name: numpy array} dicts, with errors that name the file and key.

Formats, in the order a repository's files are preferred (PyTorch weights first: they are what the
transformers models we match were loaded from):

    model.safetensors                          read here (header + byte ranges), memory-mapped
    model.safetensors.index.json + shards
    pytorch_model.bin                          zip or legacy pickle, weights-only (torch_bin.py)
    pytorch_model.bin.index.json + shards
    flax_model.msgpack                         flax.serialization's msgpack tree
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np

from .errors import CheckpointError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
FLAX_MSGPACK = "flax_model.msgpack"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX, FLAX_MSGPACK)

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
# A header larger than this is not a real checkpoint header; refuse before allocating it.
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


@dataclass
class Checkpoint:
    """Tensors by name, in the naming of `layout` ("torch": dotted state-dict names; "flax": path tuples
    joined with "/"), and the file each one came from (for error messages)."""

    layout: str
    tensors: dict[str, np.ndarray]
    origin: dict[str, Path] = field(default_factory=dict)
    description: str = ""


def find_weight_file(directory: Path) -> Path:
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(
        f"{directory}: no weights found (expected one of {', '.join(WEIGHT_FILES)})", file=directory
    )


def read_checkpoint(directory: str | Path) -> Checkpoint:
    directory = Path(directory)
    path = find_weight_file(directory)
    if path.name == SAFETENSORS:
        tensors, layout = read_safetensors(path)
        return Checkpoint(layout, tensors, dict.fromkeys(tensors, path), str(path))
    if path.name in (SAFETENSORS_INDEX, TORCH_BIN_INDEX):
        return _read_sharded(path)
    if path.name == TORCH_BIN:
        from .torch_bin import load_torch_bin

        tensors = load_torch_bin(path)
        return Checkpoint("torch", tensors, dict.fromkeys(tensors, path), str(path))
    tensors = read_msgpack(path)
    return Checkpoint("flax", tensors, dict.fromkeys(tensors, path), str(path))


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], str]:
    """Parse a .safetensors file: an 8-byte header length, a JSON header, then the tensor bytes."""
    try:
        with open(path, "rb") as f:
            size = path.stat().st_size
            if size < 8:
                raise CheckpointError(f"{path}: truncated ({size} bytes, no safetensors header)", file=path)
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > min(size - 8, _MAX_SAFETENSORS_HEADER):
                raise CheckpointError(
                    f"{path}: corrupt or truncated: header length {header_len} exceeds the file ({size} bytes)",
                    file=path,
                )
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, ValueError) as exc:
                raise CheckpointError(f"{path}: corrupt safetensors header ({exc})", file=path) from exc
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + header_len else b""
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc})", file=path) from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)", file=path)
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + header_len
    tensors = {}
    for name, info in header.items():
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{path}: corrupt header entry for {name!r}: {info!r}", file=path, key=name
            ) from exc
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if end - begin != expected or begin < 0:
            raise CheckpointError(
                f"{path}: tensor {name!r} has {end - begin} bytes for shape {list(shape)} {info['dtype']} "
                f"(expected {expected})",
                file=path,
                key=name,
            )
        if start + end > size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} needs bytes up to {start + end}, the file has {size}",
                file=path,
                key=name,
            )
        if expected == 0:
            tensors[name] = np.zeros(shape, dtype)
        else:
            raw = np.frombuffer(data, dtype=np.uint8, count=expected, offset=start + begin)
            tensors[name] = raw.view(dtype).reshape(shape)
    # transformers' Flax port writes metadata format "flax" with "."-joined tree paths.
    layout = "flax" if metadata.get("format") == "flax" else "torch"
    if layout == "flax":
        tensors = {name.replace(".", "/"): value for name, value in tensors.items()}
    return tensors, layout


def _read_sharded(index_path: Path) -> Checkpoint:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path}: not a valid shard index ({exc})", file=index_path) from exc
    tensors: dict[str, np.ndarray] = {}
    origin: dict[str, Path] = {}
    layouts = set()
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            keys = sorted(k for k, v in weight_map.items() if v == shard)
            raise CheckpointError(
                f"{index_path}: shard {shard} is missing (it holds {', '.join(keys[:5])}"
                f"{', ...' if len(keys) > 5 else ''})",
                file=shard_path,
                key=keys[0] if keys else None,
            )
        if index_path.name == SAFETENSORS_INDEX:
            shard_tensors, layout = read_safetensors(shard_path)
        else:
            from .torch_bin import load_torch_bin

            shard_tensors, layout = load_torch_bin(shard_path), "torch"
        layouts.add(layout)
        tensors.update(shard_tensors)
        origin.update(dict.fromkeys(shard_tensors, shard_path))
    missing = sorted(k for k in weight_map if k.replace(".", "/") not in tensors and k not in tensors)
    if missing:
        raise CheckpointError(
            f"{index_path}: the index lists tensors its shards do not hold: {', '.join(missing[:10])}",
            file=index_path,
            key=missing[0],
            missing=missing,
        )
    return Checkpoint(layouts.pop() if len(layouts) == 1 else "torch", tensors, origin, str(index_path))


def read_msgpack(path: Path) -> dict[str, np.ndarray]:
    """flax_model.msgpack: a nested dict of arrays, flattened to "/"-joined paths."""
    from flax import serialization

    try:
        tree = serialization.msgpack_restore(path.read_bytes())
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc})", file=path) from exc
    except Exception as exc:  # msgpack raises several unrelated types for corrupt or truncated data
        raise CheckpointError(
            f"{path}: corrupt or truncated msgpack ({type(exc).__name__}: {exc})", file=path
        ) from exc
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path}: expected a tree of parameters, got {type(tree).__name__}", file=path)
    flat: dict[str, np.ndarray] = {}

    def walk(node, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}/{key}" if prefix else str(key)
            if isinstance(value, dict):
                walk(value, name)
            else:
                try:
                    flat[name] = np.asarray(value)
                except Exception as exc:
                    raise CheckpointError(f"{path}: {name} is not an array", file=path, key=name) from exc

    walk(tree, "")
    return flat
