"""config.json: read as transformers reads it, and refused with a message that names the problem.

The reference for every value is transformers' own AlbertConfig loaded from the same file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers
from builders import build_torch_model, tiny_config

from model import AlbertConfig, ConfigError, from_pretrained

# Fields compared one to one with transformers' config attributes.
PLAIN_FIELDS = [
    f.name for f in dataclasses.fields(AlbertConfig) if f.name not in ("extra", "id2label", "architectures")
]


def assert_same_as_transformers(ours: AlbertConfig, directory: Path) -> None:
    reference = transformers.AutoConfig.from_pretrained(str(directory))
    for name in PLAIN_FIELDS:
        assert getattr(ours, name) == getattr(reference, name), name
    assert ours.id2label == tuple(reference.id2label[i] for i in range(reference.num_labels))
    assert ours.num_labels == reference.num_labels
    assert list(ours.architectures) == list(reference.architectures or [])


def write_config(directory: Path, values: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(values))
    return directory


@pytest.mark.parametrize(
    "task, overrides",
    [
        ("masked-lm", {}),
        (
            "token-classification",
            dict(
                hidden_act="gelu", position_embedding_type="relative_key_query", classifier_dropout_prob=None
            ),
        ),
        ("sequence-classification", dict(num_hidden_groups=3, num_hidden_layers=7)),
        ("pretraining", dict(tie_word_embeddings=False, layer_norm_eps=1e-6, problem_type="regression")),
    ],
)
def test_saved_config_reads_as_transformers_reads_it(make_repo, task, overrides):
    directory, _ = make_repo(task, **overrides)
    assert_same_as_transformers(AlbertConfig.from_json(directory / "config.json"), directory)


def test_omitted_fields_take_transformers_defaults(tmp_path):
    """transformers' AlbertConfig defaults are xxlarge-sized: a config.json that omits a field means those."""
    directory = write_config(tmp_path, {"model_type": "albert"})
    config = AlbertConfig.from_json(directory / "config.json")
    assert_same_as_transformers(config, directory)
    assert config.architectures == ()


def test_num_labels_without_id2label(tmp_path):
    directory = write_config(tmp_path, {"model_type": "albert", "num_labels": 5})
    config = AlbertConfig.from_json(directory / "config.json")
    assert config.id2label == tuple(f"LABEL_{i}" for i in range(5))
    assert_same_as_transformers(config, directory)


def test_unknown_fields_are_kept_aside(tmp_path):
    directory = write_config(
        tmp_path, {"model_type": "albert", "down_scale_factor": 1, "gradient_checkpointing": False}
    )
    config = AlbertConfig.from_json(directory / "config.json")
    assert config.extra["down_scale_factor"] == 1 and config.extra["gradient_checkpointing"] is False


@pytest.mark.parametrize("layers, groups", [(7, 3), (12, 5), (5, 5), (6, 4), (12, 1), (4, 2)])
def test_layer_to_group_assignment_matches_transformers(layers, groups):
    """Which shared group each layer applies, as transformers' forward pass actually calls them."""
    config = tiny_config(23, num_hidden_layers=layers, num_hidden_groups=groups, inner_group_num=1)
    torch_model = build_torch_model("base", config)
    called: list[int] = []
    for index, group in enumerate(torch_model.encoder.albert_layer_groups):
        group.register_forward_pre_hook(lambda _module, _args, index=index: called.append(index))
    with torch.no_grad():
        torch_model(input_ids=torch.tensor([[2, 7, 3]]))
    ours = AlbertConfig.from_dict(config.to_dict())
    assert [ours.group_of_layer(i) for i in range(layers)] == called


# ---------------------------------------------------------------------------------------------------
# Refused configurations: from_pretrained raises ConfigError naming the file and the problem, before
# it touches any weights.
# ---------------------------------------------------------------------------------------------------


def broken_repo(make_repo, tmp_path: Path, change) -> Path:
    """A copy of a tiny masked-lm repository whose config.json `change(values)` edits."""
    source, _ = make_repo("masked-lm")
    values = json.loads((source / "config.json").read_text())
    change(values)
    directory = write_config(tmp_path / "repo", values)
    (directory / "model.safetensors").symlink_to(source / "model.safetensors")
    return directory


def set_values(**values):
    return lambda config: config.update(values)


BAD_CONFIGS = {
    "heads do not divide hidden": (
        set_values(hidden_size=20, num_attention_heads=3),
        ["hidden_size (20)", "num_attention_heads (3)"],
    ),
    "unknown activation": (set_values(hidden_act="gelu_newest"), ["'gelu_newest'", "gelu_new", "relu"]),
    "bert": (set_values(model_type="bert"), ["model_type is 'bert'", "'albert'"]),
    "more groups than layers": (
        set_values(num_hidden_groups=5, num_hidden_layers=4),
        ["num_hidden_groups (5)", "num_hidden_layers (4)"],
    ),
    "position embedding type": (
        set_values(position_embedding_type="rotary"),
        ["'rotary'", "relative_key_query"],
    ),
    "zero vocabulary": (set_values(vocab_size=0), ["vocab_size", "positive integer", "0"]),
    "size as text": (set_values(hidden_size="21"), ["hidden_size", "'21'"]),
    "size as bool": (set_values(num_hidden_layers=True), ["num_hidden_layers", "True"]),
    "size as float": (set_values(intermediate_size=29.5), ["intermediate_size", "29.5"]),
    "dropout of 1.5": (set_values(hidden_dropout_prob=1.5), ["hidden_dropout_prob", "1.5"]),
    "negative epsilon": (set_values(layer_norm_eps=-1e-12), ["layer_norm_eps", "-1e-12"]),
    "problem type": (set_values(problem_type="ranking"), ["problem_type", "'ranking'"]),
    "id2label keys": (set_values(id2label={"first": "A"}), ["id2label", "first"]),
    "id2label gaps": (set_values(id2label={"0": "A", "2": "C"}), ["id2label", "[0, 2]"]),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_config(make_repo, tmp_path, name):
    change, words = BAD_CONFIGS[name]
    directory = broken_repo(make_repo, tmp_path, change)
    with pytest.raises(ConfigError) as error:
        from_pretrained(directory)
    message = str(error.value)
    assert str(directory / "config.json") in message
    for word in words:
        assert word in message, message


def test_missing_config_json(make_repo, tmp_path):
    source, _ = make_repo("masked-lm")
    directory = tmp_path / "weights-only"
    directory.mkdir()
    (directory / "model.safetensors").symlink_to(source / "model.safetensors")
    with pytest.raises(ConfigError, match=r"config\.json not found") as error:
        from_pretrained(directory)
    assert str(directory / "config.json") in str(error.value)


@pytest.mark.parametrize(
    "text, words",
    [
        ('{"model_type": "albert", "hidden_size": 21,', "not valid JSON"),
        ("\xff\xfe not text", "not valid JSON"),
        ("[1, 2, 3]", "expected a JSON object, got list"),
    ],
)
def test_unreadable_config_json(tmp_path, text, words):
    (tmp_path / "config.json").write_text(text, encoding="latin-1")
    with pytest.raises(ConfigError, match=words) as error:
        from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(error.value)
