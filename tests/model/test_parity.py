"""Every head against transformers' PyTorch `AlbertFor...` on the same checkpoint.

The reference is always the in-memory PyTorch model that wrote the checkpoint (builders.build_torch_model
gives every parameter a random value, LayerNorm included), run on the same ids. Batches are padded
(rows of different lengths, attention_mask zeros) and mix sentence pairs (token type 1 on the second
segment) with single sentences, and every position of every output is compared, padding included.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from builders import TASK_CLASSES, build_torch_model, save_checkpoint, tiny_config
from flax.traverse_util import flatten_dict
from hlo import compiled_dots

from model import from_pretrained

ATOL = 1e-4
CLS, SEP = 2, 3  # ids of [CLS] and [SEP] in the test SentencePiece model (builders.train_sentencepiece)
# albert-base's layout: one shared layer applied num_hidden_layers times. It compiles to a single scanned
# layer, so tests whose subject is not the layer sharing use it to keep compile time down.
BASE_LAYOUT = dict(num_hidden_groups=1, inner_group_num=1)

# (tokens in segment A, tokens in segment B or 0 for a single sentence), one per row.
ROWS = [(5, 6), (7, 0), (2, 3)]
# Multiple choice: 2 examples x 2 choices, flattened row-major into [2, 2, L].
CHOICE_ROWS = [(4, 5), (6, 0), (3, 2), (2, 0)]
# Long padding: rows 0 and 2 hold 5 and 3 real tokens of 22, so masked keys dominate their softmax rows.
LONG_PADDING_ROWS = [(3, 0), (10, 9), (1, 0)]


def encode(layouts, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """[CLS] A [SEP] (B [SEP]) then <pad> (id 0) up to the longest row; int64 [rows, L] arrays."""
    rng = np.random.default_rng(seed)
    rows = []
    for len_a, len_b in layouts:
        ids = [CLS, *rng.integers(5, vocab_size, len_a), SEP]
        types = [0] * len(ids)
        if len_b:
            ids += [*rng.integers(5, vocab_size, len_b), SEP]
            types += [1] * (len_b + 1)
        rows.append((ids, types))
    length = max(len(ids) for ids, _ in rows)
    batch = {
        name: np.zeros((len(rows), length), np.int64)
        for name in ("input_ids", "attention_mask", "token_type_ids")
    }
    for i, (ids, types) in enumerate(rows):
        batch["input_ids"][i, : len(ids)] = ids
        batch["attention_mask"][i, : len(ids)] = 1
        batch["token_type_ids"][i, : len(ids)] = types
    return batch


def batch_for(task: str, vocab_size: int, long_padding: bool = False) -> dict[str, np.ndarray]:
    if task == "multiple-choice":
        batch = encode(CHOICE_ROWS, vocab_size)
        return {name: value.reshape(2, 2, -1) for name, value in batch.items()}  # [B, K, L]
    return encode(LONG_PADDING_ROWS if long_padding else ROWS, vocab_size)


def torch_outputs(torch_model, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        outputs = torch_model(**{name: torch.from_numpy(value) for name, value in batch.items()})
    return {name: value.numpy() for name, value in outputs.items()}  # ModelOutput skips None (loss)


def max_diffs(ours: dict, reference: dict) -> dict[str, float]:
    """max |ours - reference| per output, after checking that names and shapes agree."""
    assert set(ours) == set(reference), f"outputs {sorted(ours)} != transformers' {sorted(reference)}"
    for name, value in reference.items():
        assert ours[name].shape == value.shape, f"{name}: shape {ours[name].shape} != {value.shape}"
    return {
        name: float(np.max(np.abs(ours[name].astype(np.float32) - ref))) for name, ref in reference.items()
    }


_loaded: dict = {}


def load(directory, **kwargs):
    """from_pretrained, cached: a loaded model keeps its compiled forward pass, so tests that call the
    same model with the same input names share one compilation."""
    key = (str(directory), tuple(sorted(kwargs.items())))
    if key not in _loaded:
        _loaded[key] = from_pretrained(directory, **kwargs)
    return _loaded[key]


def assert_parity(model, torch_model, batch, atol: float = ATOL) -> None:
    diffs = max_diffs(model(**batch), torch_outputs(torch_model, batch))
    assert all(diff <= atol for diff in diffs.values()), f"max |diff| per output {diffs} > {atol}"


@pytest.mark.parametrize("task", list(TASK_CLASSES))
def test_every_head(make_repo, task):
    """Default tiny config: 2 hidden groups x 2 inner layers over 4 layers, embedding 11 != hidden 21."""
    directory, torch_model = make_repo(task)
    model = load(directory)  # the head comes from config.json's `architectures`
    assert model.task == task
    assert_parity(model, torch_model, batch_for(task, torch_model.config.vocab_size))


# name: (task, config overrides, from_pretrained keyword arguments). Each configuration combines several
# features to keep the number of compiled programs small; test_every_head has already covered the
# default (2 groups x 2 inner layers, embedding 11 != hidden 21, gelu_new, absolute positions, tied
# decoder, scanned layers) with every head.
CONFIGURATIONS = {
    # 7 layers over 3 groups: transformers' int(i / (7 / 3)) gives groups 0,0,0,1,1,2,2 (uneven), each a
    # stack of 2 inner layers. The pre-training head reads everything: MLM head, pooler, SOP classifier.
    "groups3-layers7-gelu-relative_key": (
        "pretraining",
        dict(
            num_hidden_groups=3,
            num_hidden_layers=7,
            hidden_act="gelu",
            position_embedding_type="relative_key",
            attn_implementation="eager",  # transformers' relative positions exist only in eager attention
        ),
        {},
    ),
    "groups1-layers4-relu-relative_key_query-untied-eps": (
        "masked-lm",
        dict(
            BASE_LAYOUT,
            hidden_act="relu",
            position_embedding_type="relative_key_query",
            attn_implementation="eager",
            tie_word_embeddings=False,  # the MLM decoder has its own weight
            layer_norm_eps=1e-3,  # large enough to matter: a LayerNorm that ignored it would be off by ~1e-3
        ),
        {},
    ),
    "groups1-layers4-unrolled": ("pretraining", BASE_LAYOUT, dict(scan_layers=False)),
}


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_configuration(make_repo, name):
    task, overrides, load_kwargs = CONFIGURATIONS[name]
    directory, torch_model = make_repo(task, **overrides)
    model = load(directory, **load_kwargs)
    assert_parity(model, torch_model, batch_for(task, torch_model.config.vocab_size))


def test_gelu_and_gelu_new_are_told_apart():
    """The two GELUs differ by up to ~1e-3 per activation; at the parity tolerance a model that used
    one for the other must fail, or the `gelu` configuration above would prove nothing."""
    batch = encode(ROWS, vocab_size=50)
    outputs = {
        act: torch_outputs(build_torch_model("base", tiny_config(50, hidden_act=act)), batch)
        for act in ("gelu", "gelu_new")
    }
    diffs = max_diffs(outputs["gelu"], outputs["gelu_new"])
    assert max(diffs.values()) > 5 * ATOL, diffs


def test_defaults_without_mask_and_token_types(make_repo):
    """Only input_ids: attention_mask defaults to ones and token types to zeros, as in transformers."""
    directory, torch_model = make_repo("base")
    model = load(directory)
    ids = encode([(6, 5), (4, 7)], torch_model.config.vocab_size)["input_ids"]  # [2, 13], no padding
    assert_parity(model, torch_model, {"input_ids": ids})


# ---------------------------------------------------------------------------------------------------
# Half precision.
#
# Tolerance from first principles. Rounding to a p-bit significand has relative error up to u = 2^-p:
# bfloat16 p = 8 (u ~ 3.9e-3), float16 p = 11 (u ~ 4.9e-4). Each layer rounds ~6 times (inputs and
# outputs of its matmuls); the float32 LayerNorm after every sub-layer renormalises, so errors of random
# sign add up rather than compound: over the 4 layers plus embeddings and head, ~30 roundings give an
# RMS error ~ sqrt(30) * u / 2 ~ 3u on O(1) activations, and the largest of the ~10^3..10^4 output
# elements sits ~4 sigma out: ~11u (measured: 4u..15u). We allow 32u, about 3x that, on the output's
# natural scale max(1, rms(reference)): 0.125 for bfloat16, 0.0156 for float16. Any real error (a wrong
# weight, a lost mask, a wrong activation) moves outputs by O(0.1..1) in float32 and far more here.
# ---------------------------------------------------------------------------------------------------
HALF_DTYPES = {"bfloat16": (jnp.bfloat16, 2.0**-8), "float16": (jnp.float16, 2.0**-11)}
HALF_ROUNDINGS_ALLOWED = 32


def assert_close_in_half(ours: dict, reference: dict, unit_roundoff: float) -> dict[str, float]:
    diffs = max_diffs(ours, reference)
    for name, ref in reference.items():
        assert np.isfinite(ours[name].astype(np.float32)).all(), f"{name} has inf/nan"
        scale = max(1.0, float(np.sqrt(np.mean(ref**2))))
        tolerance = HALF_ROUNDINGS_ALLOWED * unit_roundoff * scale
        assert diffs[name] <= tolerance, f"{name}: max |diff| {diffs[name]:.3g} > {tolerance:.3g}"
    return diffs


def assert_mixed_precision_params(params: dict, dtype) -> None:
    """Matmul weights in the compute dtype; LayerNorm parameters (and biases) stay float32."""
    flat = flatten_dict(params)
    layer_norms = {path: v for path, v in flat.items() if "LayerNorm" in path[-2] or "layer_norm" in path[-2]}
    assert len(layer_norms) >= 4
    assert all(v.dtype == jnp.float32 for v in layer_norms.values())
    kernels = [v for path, v in flat.items() if path[-1] in ("kernel", "embedding")]
    assert kernels and all(v.dtype == dtype for v in kernels)


@pytest.mark.parametrize("dtype_name", list(HALF_DTYPES))
@pytest.mark.parametrize("task", list(TASK_CLASSES))
def test_half_precision(make_repo, task, dtype_name):
    dtype, unit_roundoff = HALF_DTYPES[dtype_name]
    directory, torch_model = make_repo(task, **BASE_LAYOUT)
    model = load(directory, dtype=dtype_name)
    assert model.dtype == dtype
    assert_mixed_precision_params(model.params, dtype)
    batch = batch_for(task, torch_model.config.vocab_size, long_padding=True)
    diffs = assert_close_in_half(model(**batch), torch_outputs(torch_model, batch), unit_roundoff)
    # The compute really ran in half precision: float32 agrees to ~1e-6, this cannot.
    assert max(diffs.values()) > 1e-5, diffs


@pytest.mark.parametrize("dtype_name", ["float32", *HALF_DTYPES])
def test_half_precision_compute_graph(make_repo, dtype_name):
    """Every matmul takes its operands in the compute dtype and accumulates in float32 (bf16 x bf16 -> f32,
    the path XLA's CPU backend runs fast); every exp (softmax) and rsqrt (LayerNorm) runs in float32.

    Read from the lowered program and from the program XLA compiled (which could still upcast the dots):
    at these sizes a half-precision softmax could not be told apart by its values, and weights rounded to
    half would pass the value checks even if the compute were float32. float32 is the control: all f32.
    """
    directory, torch_model = make_repo("pretraining", **BASE_LAYOUT)
    model = load(directory, dtype=dtype_name)
    batch = batch_for("pretraining", torch_model.config.vocab_size)
    inputs = {name: jnp.asarray(value, jnp.int32) for name, value in batch.items()}
    lowered = jax.jit(lambda params: model.module.apply({"params": params}, **inputs)).lower(model.params)
    text = lowered.as_text()  # StableHLO
    half = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}[dtype_name]

    def signatures(op: str) -> list[tuple[str, ...]]:
        lines = [line for line in text.splitlines() if f"stablehlo.{op} " in line]
        return [tuple(re.findall(r"tensor<(?:[^>]*x)?(\w+)>", line.split(" : ")[-1])) for line in lines]

    # embedding projection, Q, K, V, scores, context, output, FFN in/out, pooler, MLM dense and decoder, SOP
    dots = signatures("dot_general")
    assert len(dots) >= 13 and all(types == (half, half, "f32") for types in dots), dots
    for op in ("exponential", "rsqrt"):
        found = signatures(op)
        assert found and all(set(types) == {"f32"} for types in found), (op, found)
    if dtype_name == "float16":
        return  # XLA's CPU backend computes float16 dots in float32; the fast float16 path is on GPUs
    compiled = compiled_dots(lowered.compile().as_text())
    # XLA may upcast a dot too narrow to gain (the 2-label SOP head, [B, 2]); every wider one stays bf16.
    wide = [dot[:3] for dot in compiled if dot[3] > 2]
    assert len(wide) >= 12 and all(types == (half, half, "f32") for types in wide), compiled


def test_float16_layer_norm_survives_large_activations(make_repo, tmp_path):
    """LayerNorm runs in float32: its input here reaches |x| > 256, so x^2 overflows float16 (max 65504)
    and a float16 LayerNorm would return inf/nan or just its bias. Ours stays close to float32 PyTorch."""
    _, source = make_repo("base", **BASE_LAYOUT)
    torch_model = build_torch_model("base", source.config)
    with torch.no_grad():
        for name, param in torch_model.named_parameters():
            if ".ffn_output." in name:
                param.mul_(100.0)
    directory = save_checkpoint(torch_model, tmp_path / "loud")

    largest = []
    for module in torch_model.modules():
        if type(module).__name__ == "AlbertLayer":
            module.full_layer_layer_norm.register_forward_pre_hook(
                lambda _module, args: largest.append(float(args[0].abs().max()))
            )
    batch = batch_for("base", torch_model.config.vocab_size, long_padding=True)
    reference = torch_outputs(torch_model, batch)
    assert max(largest) > 256, largest  # the premise: squares overflow float16

    model = from_pretrained(directory, dtype="float16")
    assert_close_in_half(model(**batch), reference, HALF_DTYPES["float16"][1])


# ---------------------------------------------------------------------------------------------------
# Dropout only in training mode.
# ---------------------------------------------------------------------------------------------------


def test_dropout_only_in_training_mode(make_repo):
    directory, torch_model = make_repo("sequence-classification")  # dropout 0.1 everywhere
    config = torch_model.config
    assert config.hidden_dropout_prob > 0 and config.attention_probs_dropout_prob > 0
    model = load(directory)
    batch = batch_for("sequence-classification", config.vocab_size)

    inference = [model(**batch)["logits"] for _ in range(2)]
    np.testing.assert_array_equal(inference[0], inference[1])
    assert_parity(model, torch_model, batch)  # and it is transformers' eval-mode answer

    @jax.jit
    def train(params, key):
        inputs = {name: jnp.asarray(value, jnp.int32) for name, value in batch.items()}
        out = model.module.apply({"params": params}, **inputs, deterministic=False, rngs={"dropout": key})
        return out["logits"]

    first, again, other = (train(model.params, jax.random.key(seed)) for seed in (0, 0, 1))
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))  # reproducible for one key
    assert np.max(np.abs(np.asarray(first) - np.asarray(other))) > 1e-3  # a new key, new masks
    assert np.max(np.abs(np.asarray(first) - inference[0])) > 1e-3  # dropout did something
