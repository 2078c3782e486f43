"""from_pretrained: every weights format and naming variant, head selection, and every bad checkpoint.

The expected parameters come from the PyTorch model that wrote the checkpoint, mapped by the documented
conversion rules (Linear weight -> kernel transposed, Embedding weight -> embedding, LayerNorm weight ->
scale), written out here independently of model/params.py. Every format must load them bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from flax.traverse_util import flatten_dict
from safetensors import SafetensorError

from model import CheckpointError, SourceNotFoundError, from_pretrained
from model.modules import TASKS

REPO_ROOT = Path(__file__).resolve().parents[2]
FORMATS = ["safetensors", "sharded", "bin", "sharded-bin", "msgpack"]
CLS, SEP = 2, 3  # ids of [CLS] and [SEP] in the test SentencePiece model


def expected_params(torch_model, drop: tuple[str, ...] = ()) -> dict[tuple[str, ...], np.ndarray]:
    """The Flax tree of `torch_model`'s parameters (tied parameters once, as named_parameters lists them).

    A bare AlbertModel's names gain the `albert` prefix our head-less model uses. Names starting with a
    prefix in `drop` (weights of heads the loaded task does not use) are left out.
    """
    bare = type(torch_model).__name__ == "AlbertModel"
    expected = {}
    for name, param in torch_model.named_parameters():
        if name.startswith(drop):
            continue
        module_name, leaf = name.rsplit(".", 1)
        module = torch_model.get_submodule(module_name)
        value = param.detach().numpy()
        if isinstance(module, torch.nn.Linear) and leaf == "weight":
            leaf, value = "kernel", value.T
        elif isinstance(module, torch.nn.Embedding):
            leaf = "embedding"
        elif isinstance(module, torch.nn.LayerNorm) and leaf == "weight":
            leaf = "scale"
        path = ("albert",) * bare + (*module_name.split("."), leaf)
        expected[path] = value
    return expected


def assert_params_equal(params: dict, expected: dict[tuple[str, ...], np.ndarray]) -> None:
    got = {path: np.asarray(value) for path, value in flatten_dict(params).items()}
    assert sorted(got) == sorted(expected)
    for path, value in expected.items():
        assert got[path].dtype == np.float32, path
        np.testing.assert_array_equal(got[path], value, err_msg="/".join(path))


def _apply(module, params, **inputs):
    return module.apply({"params": params}, **inputs)


# One compilation per distinct module (modules are frozen dataclasses, equal when their configs are), so
# every variant of one checkpoint runs on the same compiled program.
forward = jax.jit(_apply, static_argnums=0)


def some_inputs(vocab_size: int) -> dict[str, jnp.ndarray]:
    ids = np.array([[CLS, 7, 8, 9, SEP, 10, 11, SEP], [CLS, 12, 13, SEP, 0, 0, 0, 0]]) % vocab_size
    mask = (ids > 0).astype(np.int32)
    types = np.array([[0, 0, 0, 0, 0, 1, 1, 1], [0] * 8])
    return dict(
        input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask), token_type_ids=jnp.asarray(types)
    )


def copy_repo(source: Path, directory: Path, *names: str) -> Path:
    """A new repository with config.json and the named files of `source`."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", *names):
        shutil.copy(source / name, directory / name)
    return directory


def write_safetensors(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    # save_file refuses tensors that share memory (tied weights): give each its own copy.
    tensors = {name: value.detach().clone().contiguous() for name, value in tensors.items()}
    safetensors.torch.save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory / "model.safetensors"


def with_state_dict(source: Path, directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    copy_repo(source, directory)
    write_safetensors(directory, tensors)
    return directory


# ---------------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_loads_identical_parameters(make_repo, fmt):
    directory, torch_model = make_repo("pretraining", fmt=fmt)  # backbone, pooler, MLM and SOP heads
    if fmt.startswith("sharded"):
        assert len(list(directory.glob("*-of-*"))) > 1, "the builder should have written several shards"
    model = from_pretrained(directory)
    assert model.task == "pretraining"
    assert_params_equal(model.params, expected_params(torch_model))


def test_bare_model_in_flax_msgpack(make_repo):
    """transformers' FlaxAlbertModel writes the backbone at the root of the tree (no `albert`)."""
    directory, torch_model = make_repo("base", fmt="msgpack")
    assert_params_equal(from_pretrained(directory).params, expected_params(torch_model))


def test_legacy_pytorch_bin(make_repo, tmp_path):
    """torch < 1.6 wrote a sequence of pickles, not a zip."""
    source, torch_model = make_repo("pretraining", fmt="bin")
    directory = copy_repo(source, tmp_path / "legacy")
    state_dict = torch.load(source / "pytorch_model.bin", weights_only=True)
    torch.save(state_dict, directory / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(directory / "pytorch_model.bin")
    assert_params_equal(from_pretrained(directory).params, expected_params(torch_model))


def test_pytorch_bin_without_torch(make_repo, tmp_path):
    """A pytorch_model.bin loads in a process where `import torch` fails, and torch is never imported."""
    directory, torch_model = make_repo("masked-lm", fmt="bin")
    code = textwrap.dedent(
        """
        import importlib.abc, sys

        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
                return None

        sys.meta_path.insert(0, NoTorch())
        try:
            import torch
        except ImportError:
            pass
        else:
            raise AssertionError("the import blocker does not work")

        import numpy as np
        from flax.traverse_util import flatten_dict
        from model import from_pretrained

        model = from_pretrained(sys.argv[1])
        assert "torch" not in sys.modules, "loading imported torch"
        flat = flatten_dict(model.params, sep="/")
        np.savez(sys.argv[2], **{name: np.asarray(value) for name, value in flat.items()})
        """
    )
    saved = tmp_path / "params.npz"
    subprocess.run([sys.executable, "-c", code, str(directory), str(saved)], check=True, cwd=REPO_ROOT)
    with np.load(saved) as flat:
        params = {tuple(name.split("/")): flat[name] for name in flat.files}
    expected = expected_params(torch_model)
    assert sorted(params) == sorted(expected)
    for path, value in expected.items():
        np.testing.assert_array_equal(params[path], value, err_msg="/".join(path))


# ---------------------------------------------------------------------------------------------------
# Naming variants: each loads the same parameters, hence gives the same outputs, as the original.
# ---------------------------------------------------------------------------------------------------


def _decoder(*kept: str):
    """Keep only the named MLM bias/decoder tensors (the rest of the state dict stays)."""
    optional = {"predictions.bias", "predictions.decoder.weight", "predictions.decoder.bias"}
    return lambda sd: {k: v for k, v in sd.items() if k not in optional or k in kept}


def _gamma_beta(sd):
    renamed = {}
    for name, value in sd.items():
        if ".LayerNorm." in name:
            name = name.replace(".LayerNorm.weight", ".LayerNorm.gamma").replace(
                ".LayerNorm.bias", ".LayerNorm.beta"
            )
        renamed[name] = value
    return renamed


def _with_position_ids(sd):
    return {**sd, "albert.embeddings.position_ids": torch.arange(160)[None]}  # int64 [1, max positions]


def _old_style(sd):
    """All old habits at once: LayerNorm gamma/beta, the position_ids buffer, both decoder copies."""
    return _with_position_ids(_gamma_beta(sd))


MLM_VARIANTS = {
    "bias only (save_pretrained)": _decoder("predictions.bias"),
    "decoder.bias instead of bias": _decoder("predictions.decoder.bias"),
    "bias + decoder.weight": _decoder("predictions.bias", "predictions.decoder.weight"),
    "bias + decoder.bias": _decoder("predictions.bias", "predictions.decoder.bias"),
    "decoder.weight + decoder.bias": _decoder("predictions.decoder.weight", "predictions.decoder.bias"),
    "bias + decoder.weight + decoder.bias": _decoder(
        "predictions.bias", "predictions.decoder.weight", "predictions.decoder.bias"
    ),
    "position_ids buffer": lambda sd: _with_position_ids(_decoder("predictions.bias")(sd)),
    "LayerNorm gamma/beta": lambda sd: _gamma_beta(_decoder("predictions.bias")(sd)),
    "old style": _old_style,
}


@pytest.fixture(scope="module")
def mlm_original(make_repo):
    directory, torch_model = make_repo("masked-lm")
    model = from_pretrained(directory)
    inputs = some_inputs(torch_model.config.vocab_size)
    return directory, torch_model, model, np.asarray(forward(model.module, model.params, **inputs)["logits"])


@pytest.mark.parametrize("variant", list(MLM_VARIANTS))
def test_masked_lm_name_variants(mlm_original, variant, tmp_path, caplog):
    source, torch_model, _, original_logits = mlm_original
    state_dict = MLM_VARIANTS[variant](torch_model.state_dict())  # the full state dict, tied copies too
    directory = with_state_dict(source, tmp_path / "variant", state_dict)
    with caplog.at_level("WARNING", logger="model"):
        model = from_pretrained(directory)
    assert not caplog.records, "known variants load without warnings"
    assert_params_equal(model.params, expected_params(torch_model))
    inputs = some_inputs(torch_model.config.vocab_size)
    logits = np.asarray(forward(model.module, model.params, **inputs)["logits"])
    np.testing.assert_array_equal(logits, original_logits)


@pytest.mark.parametrize("prefixed", [False, True], ids=["bare", "albert-prefixed"])
def test_base_model_names(make_repo, prefixed, tmp_path):
    """AlbertModel.save_pretrained writes `embeddings.`, `encoder.`, `pooler.` (no `albert.`); checkpoints
    cut from a head model carry `albert.`. Both load as the base model."""
    source, torch_model = make_repo("base")
    state_dict = torch_model.state_dict()
    assert not any(name.startswith("albert.") for name in state_dict)
    if prefixed:
        state_dict = {f"albert.{name}": value for name, value in state_dict.items()}
    directory = with_state_dict(source, tmp_path / "base", state_dict)
    assert_params_equal(from_pretrained(directory).params, expected_params(torch_model))


def test_relative_positions_checkpoint_loads_quietly(make_repo, caplog):
    """transformers saves position_embeddings even for relative_key(_query) models, which never read it:
    a normal checkpoint, so no warning."""
    directory, torch_model = make_repo(
        "masked-lm", position_embedding_type="relative_key", attn_implementation="eager"
    )
    with caplog.at_level("WARNING", logger="model"):
        model = from_pretrained(directory)
    assert not caplog.records, caplog.text
    assert_params_equal(model.params, expected_params(torch_model, drop=("albert.embeddings.position_",)))


def test_unexpected_weights_are_named_in_a_warning(mlm_original, tmp_path, caplog):
    source, torch_model, *_ = mlm_original
    state_dict = {**torch_model.state_dict(), "cls.extra.weight": torch.zeros(3)}
    directory = with_state_dict(source, tmp_path / "extra", state_dict)
    with caplog.at_level("WARNING", logger="model"):
        model = from_pretrained(directory)
    assert "cls.extra.weight" in caplog.text
    assert_params_equal(model.params, expected_params(torch_model))


# ---------------------------------------------------------------------------------------------------
# Choosing the head
# ---------------------------------------------------------------------------------------------------

ALIASES = {
    "fill-mask": "masked-lm",
    "mlm": "masked-lm",
    "classify": "sequence-classification",
    "text-classification": "sequence-classification",
    "ner": "token-classification",
    "qa": "question-answering",
    "model": "base",
}


@pytest.mark.parametrize("alias", list(ALIASES))
def test_task_aliases(make_repo, alias):
    task = ALIASES[alias]
    directory, torch_model = make_repo(task)
    model = from_pretrained(directory, task=alias)
    assert model.task == task
    assert type(model.module) is TASKS[task][0]
    assert_params_equal(model.params, expected_params(torch_model))


def test_architectures_choose_the_head(make_repo, tmp_path):
    """config.json's `architectures` picks the head; without it the base model; task= overrides it."""
    source, torch_model = make_repo("sequence-classification")  # its pooler is the base model's
    assert from_pretrained(source).task == "sequence-classification"
    assert from_pretrained(source, task="base").task == "base"

    config = json.loads((source / "config.json").read_text())
    del config["architectures"]
    directory = copy_repo(source, tmp_path / "no-architectures", "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config))
    model = from_pretrained(directory)
    assert model.task == "base"
    assert_params_equal(model.params, expected_params(torch_model, drop=("classifier.",)))


def test_unknown_architecture(make_repo, tmp_path):
    source, _ = make_repo("masked-lm")
    config = json.loads((source / "config.json").read_text())
    config["architectures"] = ["AlbertForCausalLM"]
    directory = copy_repo(source, tmp_path / "odd", "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'AlbertForCausalLM'.*task="):
        from_pretrained(directory)
    assert from_pretrained(directory, task="masked-lm").task == "masked-lm"


def test_head_missing_from_checkpoint_is_an_error(make_repo):
    """A bare AlbertModel checkpoint has no MLM head: loading it as masked-lm must fail, naming the
    missing weights, never fill the head with random values."""
    directory, _ = make_repo("base")
    with pytest.raises(CheckpointError) as error:
        from_pretrained(directory, task="masked-lm")
    message = str(error.value)
    expected_missing = {
        "predictions.bias",
        "predictions.dense.weight",
        "predictions.dense.bias",
        "predictions.LayerNorm.weight",
        "predictions.LayerNorm.bias",
    }
    assert expected_missing <= set(error.value.missing)
    assert all(name.startswith("predictions.") for name in error.value.missing)
    assert all(name in message for name in expected_missing), message
    assert str(directory / "model.safetensors") in message
    # The pooler the checkpoint has and masked-lm does not use is listed as unexpected.
    assert "albert.pooler.weight" in error.value.unexpected


@pytest.mark.parametrize(
    "task, checkpoint_task", [("question-answering", "masked-lm"), ("sequence-classification", "base")]
)
def test_other_missing_heads(make_repo, task, checkpoint_task):
    directory, _ = make_repo(checkpoint_task)
    with pytest.raises(CheckpointError) as error:
        from_pretrained(directory, task=task)
    head = "qa_outputs." if task == "question-answering" else "classifier."
    assert any(name.startswith(head) for name in error.value.missing)
    assert head in str(error.value)


def test_extra_heads_are_ignored(make_repo):
    """A pre-training checkpoint (MLM + SOP heads, pooler) loads as masked-lm: what it needs is there."""
    directory, torch_model = make_repo("pretraining")
    model = from_pretrained(directory, task="masked-lm")
    expected = expected_params(torch_model, drop=("albert.pooler.", "sop_classifier."))
    assert_params_equal(model.params, expected)


# ---------------------------------------------------------------------------------------------------
# Bad checkpoints: each error names the file, and the key or shape at fault.
# ---------------------------------------------------------------------------------------------------


def safetensors_layout(path: Path) -> tuple[int, dict]:
    """(start of the data, header) of a .safetensors file: u64 header length, JSON header, data."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return 8 + length, json.loads(raw[8 : 8 + length])


def test_no_weights(make_repo, tmp_path):
    source, _ = make_repo("masked-lm")
    directory = copy_repo(source, tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no weights found") as error:
        from_pretrained(directory)
    assert str(directory) in str(error.value)
    assert "model.safetensors" in str(error.value) and "pytorch_model.bin" in str(error.value)


@pytest.mark.parametrize("fraction", [0.3, 0.9])
def test_truncated_safetensors(make_repo, tmp_path, fraction):
    source, _ = make_repo("masked-lm")
    directory = copy_repo(source, tmp_path / "cut", "model.safetensors")
    path = directory / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * fraction)])
    with pytest.raises(SafetensorError):  # the reference reader refuses it too
        safetensors.numpy.load_file(path)

    start, header = safetensors_layout(source / "model.safetensors")
    size = path.stat().st_size
    cut = {
        name
        for name, info in header.items()
        if name != "__metadata__" and start + info["data_offsets"][1] > size
    }
    with pytest.raises(CheckpointError, match="truncated") as error:
        from_pretrained(directory)
    assert error.value.key in cut
    assert str(path) in str(error.value) and repr(error.value.key) in str(error.value)


def corrupt_header(raw: bytes) -> bytes:
    (length,) = struct.unpack("<Q", raw[:8])
    return raw[:8] + b"{" + b"\x00" * (length - 1) + raw[8 + length :]  # not JSON


def huge_header_length(raw: bytes) -> bytes:
    return struct.pack("<Q", 2**40) + raw[8:]


def shorter_than_header_length(raw: bytes) -> bytes:
    return raw[:6]


@pytest.mark.parametrize(
    "damage, words",
    [
        (corrupt_header, "corrupt safetensors header"),
        (huge_header_length, "header length"),
        (shorter_than_header_length, "truncated"),
    ],
)
def test_corrupt_safetensors(make_repo, tmp_path, damage, words):
    source, _ = make_repo("masked-lm")
    directory = copy_repo(source, tmp_path / "bad", "model.safetensors")
    path = directory / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(SafetensorError):  # the reference reader refuses it too
        safetensors.numpy.load_file(path)
    with pytest.raises(CheckpointError, match=words) as error:
        from_pretrained(directory)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    "name",
    [
        "albert.encoder.albert_layer_groups.0.albert_layers.1.ffn.weight",  # a Linear, [out, in]
        "albert.embeddings.word_embeddings.weight",  # an Embedding
        "predictions.LayerNorm.weight",
    ],
)
def test_wrong_shape(mlm_original, tmp_path, name):
    """The message gives the key and both shapes in the checkpoint's (PyTorch) layout."""
    source, torch_model, *_ = mlm_original
    state_dict = torch_model.state_dict()
    expected_shape = list(state_dict[name].shape)
    torch_shape = (*expected_shape[:-1], expected_shape[-1] - 1)
    state_dict[name] = torch.zeros(torch_shape)
    directory = with_state_dict(source, tmp_path / "shape", state_dict)
    with pytest.raises(CheckpointError) as error:
        from_pretrained(directory)
    message = str(error.value)
    assert error.value.key == name and name in message
    assert str(list(torch_shape)) in message and str(expected_shape) in message, message
    assert str(directory / "model.safetensors") in message


def test_config_and_checkpoint_disagree_on_labels(make_repo, tmp_path):
    """config.json says 5 labels, the checkpoint's classifier has 3: transformers refuses it too."""
    source, _ = make_repo("sequence-classification")
    config = json.loads((source / "config.json").read_text())
    config["id2label"] = {str(i): f"L{i}" for i in range(5)}
    config["label2id"] = {f"L{i}": i for i in range(5)}
    directory = copy_repo(source, tmp_path / "labels", "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as error:
        from_pretrained(directory)
    found, expected = {"classifier.weight": ("[3, 21]", "[5, 21]"), "classifier.bias": ("[3]", "[5]")}[
        error.value.key
    ]
    assert f"{error.value.key} has shape {found}, the model expects {expected}" in str(error.value)


def test_config_and_checkpoint_disagree_on_groups(make_repo, tmp_path):
    """A config with 2 layer groups over a checkpoint with 1: every weight of group 1 is missing."""
    source, _ = make_repo("masked-lm", num_hidden_groups=1)
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_groups"] = 2
    directory = copy_repo(source, tmp_path / "groups", "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as error:
        from_pretrained(directory)
    missing = error.value.missing
    assert missing and all(name.startswith("albert.encoder.albert_layer_groups.1.") for name in missing)
    assert "albert.encoder.albert_layer_groups.1.albert_layers.0.attention.query.weight" in missing
    assert missing[0] in str(error.value)


def test_missing_and_unexpected_are_both_listed(mlm_original, tmp_path):
    source, torch_model, *_ = mlm_original
    state_dict = torch_model.state_dict()
    name = "albert.encoder.embedding_hidden_mapping_in.weight"
    state_dict["albert.encoder.embedding_hidden_mapping_in.wieght"] = state_dict.pop(name)
    directory = with_state_dict(source, tmp_path / "typo", state_dict)
    with pytest.raises(CheckpointError) as error:
        from_pretrained(directory)
    assert error.value.missing == [name]
    assert error.value.unexpected == ["albert.encoder.embedding_hidden_mapping_in.wieght"]
    assert name in str(error.value) and "wieght" in str(error.value)


def test_shard_missing_from_index(make_repo, tmp_path):
    source, _ = make_repo("pretraining", fmt="sharded")
    directory = tmp_path / "sharded"
    shutil.copytree(source, directory)
    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    shard = sorted(set(weight_map.values()))[1]
    (directory / shard).unlink()
    with pytest.raises(CheckpointError) as error:
        from_pretrained(directory)
    message = str(error.value)
    assert shard in message and error.value.key in weight_map and weight_map[error.value.key] == shard
    assert error.value.key in message


def test_index_names_a_tensor_no_shard_holds(make_repo, tmp_path):
    source, _ = make_repo("pretraining", fmt="sharded")
    directory = tmp_path / "sharded"
    shutil.copytree(source, directory)
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = next(iter(index["weight_map"].values()))
    index["weight_map"]["albert.embeddings.ghost.weight"] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"albert\.embeddings\.ghost\.weight"):
        from_pretrained(directory)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_msgpack(make_repo, tmp_path, damage):
    source, _ = make_repo("pretraining", fmt="msgpack")
    directory = copy_repo(source, tmp_path / "msgpack", "flax_model.msgpack")
    path = directory / "flax_model.msgpack"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"\xc1" + bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match="msgpack") as error:
        from_pretrained(directory)
    assert str(path) in str(error.value)


def test_truncated_pytorch_bin(make_repo, tmp_path):
    source, _ = make_repo("masked-lm", fmt="bin")
    directory = copy_repo(source, tmp_path / "bin", "pytorch_model.bin")
    path = directory / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as error:
        from_pretrained(directory)
    assert str(path) in str(error.value)


# ---------------------------------------------------------------------------------------------------
# Sources, tasks and dtypes
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def _refuse_connections(monkeypatch) -> list:
    """Make every socket connection fail, recording where it was going."""
    import socket

    attempts: list = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def test_hub_offline_and_not_cached(empty_hub_cache, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    attempts = _refuse_connections(monkeypatch)
    with pytest.raises(SourceNotFoundError) as error:
        from_pretrained("albert-serve-tests/no-such-model")
    assert attempts == [], "offline, yet it tried the network"
    message = str(error.value)
    assert "albert-serve-tests/no-such-model" in message and "HF_HUB_OFFLINE" in message


def test_hub_offline_env_in_a_fresh_process(tmp_path):
    """HF_HUB_OFFLINE=1 set in the environment (as a user would) before anything is imported."""
    code = (
        "import socket, sys\n"
        "attempts = []\n"
        "def refuse(self, address, *args):\n"
        "    attempts.append(address)\n"
        "    raise OSError('no network in this test')\n"
        "socket.socket.connect = socket.socket.connect_ex = refuse\n"
        "from model import SourceNotFoundError, from_pretrained\n"
        "try:\n"
        "    from_pretrained('albert-serve-tests/no-such-model')\n"
        "except SourceNotFoundError as error:\n"
        "    assert 'HF_HUB_OFFLINE' in str(error), error\n"
        "else:\n"
        "    sys.exit('no error')\n"
        "assert not attempts, f'offline, yet it tried the network: {attempts}'\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    # The lookup never touches the network (checked in the child); the timeout only bounds a hang.
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, env=env, timeout=300)


def test_hub_unreachable(empty_hub_cache, monkeypatch):
    """Online mode with nothing listening at the hub's address: a clear error in seconds, not a hang."""
    import socket

    import huggingface_hub.constants

    with socket.socket() as probe:  # a port nothing listens on: connections are refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)  # straight to the closed port, not via a proxy
    attempts, sleeps = [], []
    real_connect = socket.socket.connect

    def connect(self, address, *args):
        attempts.append(address)
        return real_connect(self, address, *args)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(
        time, "sleep", lambda seconds: sleeps.append(seconds)
    )  # back-offs, recorded, not slept
    with pytest.raises(SourceNotFoundError) as error:
        from_pretrained("albert-serve-tests/no-such-model")
    assert "could not be reached" in str(error.value)
    # It tried the hub's address, and gave up at once rather than retrying and backing off: a clear error
    # in seconds, not a hang (counted, not timed).
    assert any(address[1] == port for address in attempts if isinstance(address, tuple)), attempts
    assert len(attempts) <= 5 and sum(sleeps) <= 5, (attempts, sleeps)


def test_hub_cache_is_used_offline(make_repo, empty_hub_cache, monkeypatch):
    """A repository in the Hugging Face cache layout loads by its id with HF_HUB_OFFLINE."""
    import huggingface_hub.constants

    source, torch_model = make_repo("masked-lm")
    commit = "0123456789abcdef0123456789abcdef01234567"
    storage = empty_hub_cache / "models--albert-serve-tests--tiny-mlm"
    shutil.copytree(source, storage / "snapshots" / commit)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = from_pretrained("albert-serve-tests/tiny-mlm")
    assert_params_equal(model.params, expected_params(torch_model))


def test_path_that_does_not_exist(tmp_path):
    for source in (tmp_path / "missing", "./missing-model-dir", "~/missing-model-dir"):
        with pytest.raises(SourceNotFoundError, match="no such directory"):
            from_pretrained(source)


def test_path_to_a_file(make_repo):
    source, _ = make_repo("masked-lm")
    with pytest.raises(SourceNotFoundError, match="is a file"):
        from_pretrained(source / "model.safetensors")


def test_unknown_task(make_repo):
    source, _ = make_repo("masked-lm")
    with pytest.raises(ValueError, match=r"'summarization'.*masked-lm") as error:
        from_pretrained(source, task="summarization")
    assert "fill-mask" in str(error.value)  # the choices include the aliases


@pytest.mark.parametrize("dtype", ["int8", "float64", "fp16", np.float64])
def test_unsupported_dtype(make_repo, dtype):
    source, _ = make_repo("masked-lm")
    with pytest.raises(ValueError, match=r"dtype .* is not supported.*bfloat16"):
        from_pretrained(source, dtype=dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", jnp.bfloat16, np.dtype("float16")])
def test_dtype_spellings(make_repo, dtype):
    source, _ = make_repo("masked-lm")
    model = from_pretrained(source, dtype=dtype)
    assert jnp.dtype(model.dtype) == jnp.dtype(dtype)
