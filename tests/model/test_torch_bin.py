"""load_torch_bin against torch.load(weights_only=True), in both torch.save containers.

Every file here is written by torch.save itself, or by rewriting one torch.save wrote (big-endian
records, dropped or cut records); the expected arrays always come from torch.load.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

from model.errors import CheckpointError, UnsafePickleError
from model.torch_bin import load_torch_bin

FORMATS = ["zip", "legacy"]


def save(state_dict, path: Path, fmt: str) -> Path:
    torch.save(state_dict, path, _use_new_zipfile_serialization=(fmt == "zip"))
    return path


# Element types numpy lacks, which torch.Tensor.numpy() refuses: the same bits under ml_dtypes' name.
ML_DTYPES = {
    torch.bfloat16: ml_dtypes.bfloat16,
    **{getattr(torch, name): getattr(ml_dtypes, name) for name in ("float8_e4m3fn", "float8_e5m2")},
    **{getattr(torch, name): getattr(ml_dtypes, name) for name in ("float8_e4m3fnuz", "float8_e5m2fnuz")},
}


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().resolve_conj().resolve_neg()
    if tensor.dtype in ML_DTYPES:
        bits = torch.int16 if tensor.dtype.itemsize == 2 else torch.uint8
        return tensor.view(bits).numpy().view(ML_DTYPES[tensor.dtype])
    return tensor.numpy()


def assert_matches_torch(path: Path, weights_only: bool = True) -> dict[str, np.ndarray]:
    """The reader gives what torch.load(weights_only=True) gives: keys, dtypes, shapes, bits."""
    expected = torch.load(path, weights_only=weights_only)
    got = load_torch_bin(path)
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        want = as_numpy(tensor)
        assert got[name].dtype == want.dtype, name
        assert got[name].shape == want.shape, name
        assert got[name].tobytes() == want.tobytes(), name  # bitwise, so NaNs and -0.0 count too
        assert got[name].flags.c_contiguous, name
    return got


def with_specials(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    tensor.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0])
    return tensor


def state_dicts() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, generator=g)
    cube = torch.randn(2, 3, 4, generator=g)
    complex_values = torch.randn(4, dtype=torch.complex64, generator=g)
    bf16 = torch.randn(6, generator=g).bfloat16()
    return {
        "dtypes": {
            "float32": with_specials(torch.randn(3, 7, generator=g)),
            "float16": with_specials(torch.randn(3, 7, generator=g).half()),
            "bfloat16": with_specials(torch.randn(3, 7, generator=g).bfloat16()),
            "float64": with_specials(torch.randn(3, 7, generator=g).double()),
            "int64": torch.randint(-(2**62), 2**62, (11,), generator=g),
            "int32": torch.randint(-(2**31), 2**31 - 1, (11,), generator=g, dtype=torch.int32),
            "int16": torch.randint(-(2**15), 2**15 - 1, (11,), generator=g, dtype=torch.int16),
            "int8": torch.randint(-128, 127, (11,), generator=g, dtype=torch.int8),
            "uint8": torch.randint(0, 255, (11,), generator=g, dtype=torch.uint8),
            "bool": torch.randint(0, 2, (11,), generator=g).bool(),
            "complex64": complex_values,
            "complex128": complex_values.to(torch.complex128),
        },
        "shapes": {
            "scalar": torch.tensor(2.5),
            "scalar_int": torch.tensor(7),
            "empty": torch.zeros(0),
            "empty_2d": torch.zeros(0, 3),
            "empty_middle": torch.zeros(2, 0, 3, dtype=torch.int64),
            "one": torch.ones(1, 1, 1),
            "cube": cube,
        },
        "views": {
            "transposed": w.t(),
            "column_stride": cube[:, :, ::2],
            "permuted": cube.permute(2, 0, 1),
            "expanded": torch.randn(3, 1, generator=g).expand(3, 4),  # stride 0
            "conj": complex_values.conj(),  # saved as a conj flag over the unconjugated values
            "neg": torch.randn(4, dtype=torch.complex64, generator=g).conj().imag,  # a negative view
        },
        "shared": {
            "weight": w,
            "tied": w,  # the same tensor under two names, like a tied decoder weight
            "rows": w[1:3],
            "element": w[2, 1],  # 0-d at offset 7
            "flat_window": w.view(-1)[4:10],
            "column": w[:, 2],
            "bf16": bf16,
            "bf16_tail": bf16[2:],
        },
        "parameters": {  # state_dict(keep_vars=True) keeps nn.Parameter objects
            "weight": torch.nn.Parameter(torch.randn(4, 3, generator=g)),
            "frozen": torch.nn.Parameter(torch.randn(3, generator=g), requires_grad=False),
            "buffer": torch.arange(4),
        },
    }


@pytest.fixture(params=sorted(state_dicts()))
def state_dict(request) -> dict[str, torch.Tensor]:
    state_dict = collections.OrderedDict(state_dicts()[request.param])
    state_dict._metadata = {"": {"version": 1}}  # as Module.state_dict() sets it: pickled as a BUILD
    return state_dict


@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_torch_load(state_dict, fmt, tmp_path):
    got = assert_matches_torch(save(state_dict, tmp_path / "pytorch_model.bin", fmt))
    arrays = list(got.values())  # shared storage comes out as independent, writeable copies
    assert all(array.flags.writeable for array in arrays)
    assert not any(np.shares_memory(a, b) for i, a in enumerate(arrays) for b in arrays[i + 1 :])


def test_untyped_storage_dtypes(tmp_path):
    # Newer dtypes sit on an untyped storage, rebuilt by _rebuild_tensor_v3 with a torch.<dtype> global.
    # (torch itself cannot read these back from the legacy container, so zip only.)
    g = torch.Generator().manual_seed(1)
    values = torch.randint(0, 2**15, (3, 5), generator=g)
    state_dict = {
        "uint16": values.to(torch.uint16),
        "uint32": values.to(torch.uint32).t(),
        "uint64": values.to(torch.uint64)[1:, 2:],
    }
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
        state_dict[name] = torch.randn(4, 3, generator=g).to(getattr(torch, name))[:, 1:]
    assert_matches_torch(save(state_dict, tmp_path / "pytorch_model.bin", "zip"))


def test_any_archive_name(tmp_path):
    # torch names the zip's top folder after the file it saved to.
    path = save({"w": torch.randn(3, 2)}, tmp_path / "my_weights.bin", "zip")
    assert zipfile.ZipFile(path).namelist()[0] == "my_weights/data.pkl"
    assert_matches_torch(path)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("protocol", [4, 5])
def test_newer_pickle_protocols(protocol, fmt, tmp_path):
    # torch's weights-only unpickler lacks the FRAME opcode of protocol >= 4; this file is our own.
    state_dict = {
        "w": torch.randn(3, 2),
        "w_t": torch.randn(2, 3).t(),
        "b": torch.ones(2, dtype=torch.bfloat16),
    }
    path = tmp_path / "pytorch_model.bin"
    torch.save(state_dict, path, pickle_protocol=protocol, _use_new_zipfile_serialization=(fmt == "zip"))
    assert_matches_torch(path, weights_only=False)


@pytest.mark.parametrize("fmt", FORMATS)
def test_albert_checkpoint(make_repo, fmt, tmp_path):
    directory, _ = make_repo("masked-lm", fmt="bin")
    path = directory / "pytorch_model.bin"
    if fmt == "legacy":  # the same state dict, tied weights and all, as torch < 1.6 wrote it
        path = save(torch.load(path, weights_only=True), tmp_path / "pytorch_model.bin", "legacy")
    got = assert_matches_torch(path)
    assert any(name.startswith("albert.encoder.albert_layer_groups.1.") for name in got)


def rewrite_zip(source: Path, target: Path, change: Callable[[str, bytes], bytes | None]) -> Path:
    """Copy a zip record by record; change(name, data) gives the new data, or None to drop the record."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for name in old.namelist():
            data = change(name, old.read(name))
            if data is not None:
                new.writestr(name, data)
    return target


def test_big_endian_zip(tmp_path):
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32]
    dtypes += [torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64]
    g = torch.Generator().manual_seed(2)
    state_dict = {str(dtype): (torch.randn(2, 3, generator=g) * 50).to(dtype) for dtype in dtypes}
    state_dict["transposed"] = state_dict["torch.float32"].t()  # a view shares record data/0
    source = save(state_dict, tmp_path / "little.bin", "zip")

    def to_big_endian(name: str, data: bytes) -> bytes:
        if name.endswith("/byteorder"):
            return b"big"
        if "/data/" in name:  # one storage per tensor, keyed by first appearance
            dtype = dtypes[int(name.rsplit("/", 1)[1])]
            unit = dtype.itemsize // 2 if dtype.is_complex else dtype.itemsize
            return np.frombuffer(data, f"<u{unit}").astype(f">u{unit}").tobytes()
        return data

    path = rewrite_zip(source, tmp_path / "big.bin", to_big_endian)
    assert zipfile.ZipFile(path).read("little/byteorder") == b"big"
    for name, tensor in torch.load(path, weights_only=True).items():  # the file is what torch means by big
        assert torch.equal(tensor, state_dict[name])
    assert_matches_torch(path)


# Refusing pickles that would run code


class RunsCode:
    """Pickles as a call to `function(*args)`, which a plain unpickler would make while loading."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def payloads(marker: Path) -> dict[str, tuple[RunsCode, str]]:
    return {
        "os.system": (RunsCode(os.system, f"touch {marker}"), f"{os.system.__module__}.system"),
        "builtins.exec": (RunsCode(exec, f"open({str(marker)!r}, 'w').close()"), "builtins.exec"),
        "builtins.eval": (RunsCode(eval, f"open({str(marker)!r}, 'w').close()"), "builtins.eval"),
        "subprocess.call": (RunsCode(subprocess.call, ["touch", str(marker)]), "subprocess.call"),
    }


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("payload", ["os.system", "builtins.exec", "builtins.eval", "subprocess.call"])
def test_refuses_code_and_runs_nothing(payload, fmt, tmp_path):
    marker = tmp_path / "ran"
    attack, forbidden = payloads(marker)[payload]
    state_dict = collections.OrderedDict(weight=torch.randn(2, 2), bias=attack)
    path = save(state_dict, tmp_path / "pytorch_model.bin", fmt)

    with pytest.raises(UnsafePickleError) as error:
        load_torch_bin(path)
    assert not marker.exists()
    assert str(path) in str(error.value) and forbidden in str(error.value)
    assert error.value.file == str(path)

    # The file is live: an unrestricted unpickler does run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_refuses_whole_module(fmt, tmp_path):
    # torch.save(model) pickles classes (torch.nn.modules...), which a state dict never needs.
    path = save(torch.nn.Linear(2, 3), tmp_path / "model.bin", fmt)
    with pytest.raises(UnsafePickleError, match=r"torch\.nn\.modules"):
        load_torch_bin(path)


def test_importing_the_reader_does_not_import_torch():
    code = "import sys, model.torch_bin; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# Broken files


def assert_checkpoint_error(path: Path, *words: str, key: str | None = None) -> CheckpointError:
    with pytest.raises(CheckpointError) as error:
        load_torch_bin(path)
    message = str(error.value)
    assert not isinstance(error.value, UnsafePickleError), message
    assert str(path) in message and error.value.file == str(path)
    for word in words:
        assert word in message, message
    if key is not None:
        assert error.value.key == key and repr(key) in message, message
    return error.value


def two_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"embeddings.weight": torch.randn(7, 5, generator=g), "dense.bias": torch.randn(5, generator=g)}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.9])
def test_truncated(fmt, fraction, tmp_path):
    path = save(two_tensors(), tmp_path / "pytorch_model.bin", fmt)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    assert_checkpoint_error(path, "truncated")


def test_truncated_legacy_storage_names_the_tensor(tmp_path):
    # Legacy storages follow the pickle in sorted-key order; cut into the last one.
    path = save(two_tensors(), tmp_path / "pytorch_model.bin", "legacy")
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match="truncated") as error:
        load_torch_bin(path)
    assert error.value.key in two_tensors() and repr(error.value.key) in str(error.value)


@pytest.mark.parametrize("size", [0, 7, 4096])
def test_random_bytes(size, tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(np.random.default_rng(size).bytes(size))
    assert_checkpoint_error(path, "not a PyTorch checkpoint")


def test_plain_pickle(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}))
    assert_checkpoint_error(path, "not a PyTorch checkpoint")


def test_zip_without_data_pkl(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("weights/notes.txt", "hello")
    assert_checkpoint_error(path, "data.pkl")


def test_zip_missing_storage_record(tmp_path):
    source = save(two_tensors(), tmp_path / "source.bin", "zip")
    path = rewrite_zip(
        source, tmp_path / "pytorch_model.bin", lambda name, data: None if name.endswith("/data/1") else data
    )
    assert_checkpoint_error(path, "data/1", "missing", key="dense.bias")


def test_zip_corrupt_storage_record(tmp_path):
    path = save(two_tensors(), tmp_path / "pytorch_model.bin", "zip")
    data = bytearray(path.read_bytes())
    offset = data.index(torch.load(path, weights_only=True)["embeddings.weight"].numpy().tobytes())
    data[offset + 5] ^= 0xFF  # the CRC no longer matches
    path.write_bytes(bytes(data))
    assert_checkpoint_error(path, "data/0", "corrupt", key="embeddings.weight")


def test_zip_storage_record_too_small(tmp_path):
    source = save(two_tensors(), tmp_path / "source.bin", "zip")
    path = rewrite_zip(
        source,
        tmp_path / "pytorch_model.bin",
        lambda name, data: data[:-4] if name.endswith("/data/0") else data,
    )
    assert_checkpoint_error(path, "data/0", "holds 136 bytes", key="embeddings.weight")


# Hand-written containers, for layouts today's torch.save no longer writes or never writes


class FakeStorage:
    """A float32 storage persisted the way torch.save persists one, with whatever numel we declare.

    view: (view key, offset, numel), the storage views torch < 1.? wrote in the legacy container.
    """

    def __init__(self, key: str, numel: int, view: tuple[str, int, int] | None = None):
        self.key, self.numel, self.view = key, numel, view


class FakeTensor:
    def __init__(self, storage: FakeStorage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self):
        args = (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict())
        return torch._utils._rebuild_tensor_v2, args


class FakePickler(pickle.Pickler):
    def __init__(self, file, legacy: bool):
        super().__init__(file, protocol=2)
        self.legacy = legacy

    def persistent_id(self, obj):
        if not isinstance(obj, FakeStorage):
            return None
        pid = ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return (*pid, obj.view) if self.legacy else pid  # the legacy id always has the view slot


def write_checkpoint(path: Path, fmt: str, state_dict: dict, storages: dict[str, np.ndarray]) -> Path:
    """Write `state_dict` (of FakeTensors) and the float32 `storages` by key, as torch.save lays them out."""
    pickled = io.BytesIO()
    FakePickler(pickled, legacy=(fmt == "legacy")).dump(state_dict)
    if fmt == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", pickled.getvalue())
            for key, values in storages.items():
                archive.writestr(f"archive/data/{key}", values.astype("<f4").tobytes())
        return path
    sys_info = {
        "protocol_version": 1001,
        "little_endian": True,
        "type_sizes": {"short": 2, "int": 4, "long": 4},
    }
    with open(path, "wb") as file:
        for header in (torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION, sys_info):
            pickle.dump(header, file, protocol=2)
        file.write(pickled.getvalue())
        pickle.dump(sorted(storages), file, protocol=2)
        for key in sorted(storages):
            file.write(storages[key].size.to_bytes(8, "little") + storages[key].astype("<f4").tobytes())
    return path


def test_legacy_storage_views(tmp_path):
    # Old torch saved a storage slice as a view of its root storage; tensor offsets count from the view.
    root = np.arange(12, dtype=np.float32) * 1.5
    state_dict = {
        "on_root": FakeTensor(FakeStorage("root", 12), 3, (2, 2), (4, 1)),
        "on_view": FakeTensor(FakeStorage("root", 12, ("v1", 2, 6)), 1, (2, 2), (2, 1)),
        "on_tail_view": FakeTensor(FakeStorage("root", 12, ("v2", 6, 6)), 0, (6,), (1,)),
    }
    path = write_checkpoint(tmp_path / "pytorch_model.bin", "legacy", state_dict, {"root": root})
    got = assert_matches_torch(path)
    np.testing.assert_array_equal(got["on_tail_view"], root[6:])  # the view really was used


@pytest.mark.parametrize("fmt", FORMATS)
def test_tensor_larger_than_its_storage(fmt, tmp_path):
    # Storage and record agree on 6 floats; the tensor's layout needs 2 + 2*3 + 1*1 + 1 = 10.
    storage = FakeStorage("0", 6)
    state_dict = {"ok": FakeTensor(storage, 0, (2, 3), (3, 1)), "big": FakeTensor(storage, 2, (3, 2), (3, 1))}
    path = write_checkpoint(
        tmp_path / "pytorch_model.bin", fmt, state_dict, {"0": np.arange(6, dtype=np.float32)}
    )
    assert_checkpoint_error(path, "needs 10 elements", "holds only 6", key="big")


def test_legacy_storage_count_disagrees(tmp_path):
    # The pickle declares 8 elements; the storage section holds 6 (torch: "storage has wrong byte size").
    state_dict = {"weight": FakeTensor(FakeStorage("0", 8), 0, (2, 3), (3, 1))}
    path = write_checkpoint(
        tmp_path / "pytorch_model.bin", "legacy", state_dict, {"0": np.arange(6, dtype=np.float32)}
    )
    assert_checkpoint_error(path, "holds 6 elements", "declares 8", key="weight")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "obj, words, key",
    [
        ([torch.ones(2)], ["list", "not a state dict"], None),
        ({"weight": torch.ones(2), "epoch": 3}, ["int", "not a tensor"], "epoch"),
        ({"state_dict": {"weight": torch.ones(2)}}, ["dict", "not a tensor"], "state_dict"),
        ({1: torch.ones(2)}, ["not a string"], None),
    ],
    ids=["list", "int-entry", "nested", "int-key"],
)
def test_not_a_state_dict(obj, words, key, fmt, tmp_path):
    path = save(obj, tmp_path / "pytorch_model.bin", fmt)
    assert_checkpoint_error(path, *words, key=key)
