"""The embedding task against sentence-transformers 5.x on checkpoints sentence-transformers itself saved.

Our path is the one the service runs: read_embedding_config, EmbedTask.prepare, the ALBERT backbone of
model.from_pretrained(task="base") with the pooling head of service/tasks/embed/pooling.py inside one jitted
function, on rows packed by service.engine.Packer (several sequences per row) and on one sequence per row,
then EmbedTask.finish. The reference is `SentenceTransformer(path).encode(texts)`, float32 on the CPU.
"""

from __future__ import annotations

import base64
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from embed_builders import build_backbone, build_sentence_transformer, write_json
from hlo import compiled_dots
from pydantic import ValidationError

from model import from_pretrained, load_tokenizer
from service.engine import Bucket, Packer, Plan
from service.errors import InvalidInput, PayloadTooLarge
from service.settings import Settings
from service.tasks.embed import (
    POOLING_MODES,
    EmbeddingConfigError,
    EmbedParams,
    EmbedRequest,
    EmbedTask,
    OpenAIEmbeddingsRequest,
    SimilarityRequest,
    cosine_similarities,
    embedding_fn,
    embedding_params,
    encode_base64,
    finish_vector,
    openai_response,
    prompt_lengths_for,
    read_embedding_config,
)
from service.tasks.embed.dense import decode_embed, decode_openai, decode_similarity

TOLERANCE = 1e-5
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "an excellent and beautiful museum",
    "Zürich, café and crème brûlée: déjà vu.",
    "hello",
    "John and Mary went to Paris in January, and then to Berlin and Rome with the team.",
    "terrible, awful, bad!",
    "日本語のテキスト and 中文",
]
LONG_TEXT = " ".join(["the university library and the museum near the river"] * 12)
PROMPTS = {"query": "query: ", "passage": "Represent this passage for retrieval: "}
PACKED_BUCKETS = [Bucket(1, 32), Bucket(2, 128), Bucket(4, 128)]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory, spiece_model):
    return build_backbone(tmp_path_factory.mktemp("embed-backbone"), spiece_model, seed=4)


@pytest.fixture(scope="module")
def st_repo(tmp_path_factory, backbone):
    """st_repo(name, **build_sentence_transformer kwargs) -> directory, built once per name."""
    cache = {}

    def make(name: str, **kwargs):
        if name not in cache:
            cache[name] = build_sentence_transformer(
                tmp_path_factory.mktemp(f"st-{name}"), backbone, **kwargs
            )
        return cache[name]

    return make


class Ours:
    """The service's path for one checkpoint directory."""

    def __init__(self, directory, dtype: str = "float32"):
        self.config = read_embedding_config(directory)
        self.model = from_pretrained(self.config.backbone_dir, task="base", dtype=dtype)
        self.tokenizer = load_tokenizer(self.config.backbone_dir)
        cfg = self.model.config
        self.task = EmbedTask(self.tokenizer, self.config, cfg.max_position_embeddings, cfg.hidden_size)
        self.fn = jax.jit(embedding_fn(self.model.module, self.config))
        self.params = embedding_params(self.model.params, self.config, self.model.dtype)

    def run(self, sequences, plan=None):
        buckets = PACKED_BUCKETS if plan is None else [plan.bucket]
        batch = Packer(buckets, 0.0).pack(sequences, plan)
        out = self.fn(
            self.params,
            batch.input_ids,
            batch.token_type_ids,
            batch.position_ids,
            batch.segment_ids,
            batch.first_tokens,
            prompt_lengths_for(batch, sequences),
        )["embedding"]
        out = np.asarray(out)
        assert np.isfinite(out).all()  # empty slots included
        return [{"embedding": out[r, k]} for r, k in batch.slots], batch

    def embed(self, texts, params: EmbedParams, *, packed: bool = True):
        prepared = self.task.prepare(texts, params)
        sequences = prepared.model_inputs
        if packed:
            outputs, batch = self.run(sequences)
            rows = [r for r, _ in batch.slots]
            assert max(rows.count(r) for r in rows) > 1, "expected several sequences in one row"
        else:
            plan = Plan(Bucket(max(8, len(sequences)), 128), [[i] for i in range(len(sequences))])
            outputs, _ = self.run(sequences, plan)
        return np.asarray(self.task.finish(prepared, outputs), dtype=np.float32)


@pytest.fixture(scope="module")
def ours():
    cache = {}

    def get(directory):
        if directory not in cache:
            cache[directory] = Ours(directory)
        return cache[directory]

    return get


_LOADED: dict = {}


def _sentence_transformer(directory):
    from sentence_transformers import SentenceTransformer

    if directory not in _LOADED:
        _LOADED[directory] = SentenceTransformer(str(directory), device="cpu")
    return _LOADED[directory]


def _reference(directory, texts, **kwargs):
    return _sentence_transformer(directory).encode(texts, **kwargs)


def _check(ours_, directory, texts, prompt_name=None, truncate=True):
    reference = _reference(directory, texts, prompt_name=prompt_name)
    figures = []
    for packed in (True, False):
        got = ours_.embed(
            texts, EmbedParams(normalize=False, prompt_name=prompt_name, truncate=truncate), packed=packed
        )
        assert got.shape == reference.shape
        diff = float(np.abs(got - reference).max())
        figures.append(diff)
        assert diff < TOLERANCE, (packed, diff)
    return max(figures)


# --- parity with SentenceTransformer.encode -------------------------------------------------------------


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_each_pooling_mode_matches_encode(st_repo, ours, mode):
    directory = st_repo(f"{mode}-excluding-prompt", pooling_mode=mode, include_prompt=False, prompts=PROMPTS)
    runner = ours(directory)
    assert runner.config.pooling_modes == (mode,) and not runner.config.include_prompt
    plain = _check(runner, directory, TEXTS)
    prompted = _check(runner, directory, TEXTS, prompt_name="passage")  # prompt tokens not pooled
    print(f"{mode}: max |diff| {plain:.2e} without prompt, {prompted:.2e} with the prompt excluded")


def test_several_modes_concatenated_with_prompt_included(st_repo, ours):
    directory = st_repo("multi", pooling_mode=("cls", "mean", "max"), prompts=PROMPTS)
    runner = ours(directory)
    assert runner.config.pooling_modes == ("cls", "mean", "max") and runner.config.include_prompt
    assert runner.task.dimension == 3 * runner.model.config.hidden_size
    _check(runner, directory, TEXTS)
    _check(runner, directory, TEXTS, prompt_name="query")


def test_dense_normalize_and_default_prompt(st_repo, ours):
    directory = st_repo(
        "dense-normalize",
        pooling_mode="mean",
        dense=[(13, "Tanh", True), (9, None, False)],
        normalize=True,
        prompts=PROMPTS,
        default_prompt_name="query",
        max_seq_length=48,
    )
    runner = ours(directory)
    assert [s.out_features for s in runner.config.dense_layers] == [13, 9]
    assert runner.config.normalized and runner.task.dimension == 9 and runner.task.max_length == 48
    assert runner.config.default_prompt_name == "query"
    # The default prompt applies when none is named, as in encode(); LONG_TEXT is cut at 48 tokens.
    _check(runner, directory, [*TEXTS, LONG_TEXT])
    _check(runner, directory, TEXTS, prompt_name="passage")
    vectors = runner.embed(TEXTS, EmbedParams(normalize=False))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)  # the Normalize module


def test_bfloat16_embeddings_within_cosine_0_999_with_bf16_dots(st_repo):
    """--dtype bfloat16: the backbone and the Dense head multiply bf16 x bf16 -> f32 (read from the compiled
    program), and the embeddings stay within cosine 0.999 of sentence-transformers' float32 ones, while
    differing by more than float32 could (so bfloat16 was really used)."""
    directory = st_repo("dense-normalize-bf16", pooling_mode="mean", dense=[(13, "Tanh", True)])
    runner = Ours(directory, dtype="bfloat16")
    assert all(layer["kernel"].dtype == jnp.bfloat16 for layer in runner.params["head"])
    reference = _reference(directory, TEXTS)
    got = runner.embed(TEXTS, EmbedParams(normalize=False, truncate=True))
    cosine = np.sum(got * reference, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
    print(
        f"bfloat16 embeddings: min cosine to float32 {cosine.min():.6f}, max |diff| "
        f"{np.abs(got - reference).max():.3g}"
    )
    assert cosine.min() >= 0.999, cosine
    assert np.abs(got - reference).max() > 1e-5
    sequences = runner.task.prepare(TEXTS, EmbedParams()).model_inputs
    batch = Packer(PACKED_BUCKETS, 0.0).pack(sequences)
    args = (batch.input_ids, batch.token_type_ids, batch.position_ids, batch.segment_ids, batch.first_tokens)
    hlo = runner.fn.lower(runner.params, *args, prompt_lengths_for(batch, sequences)).compile().as_text()
    dots = compiled_dots(hlo)
    head = [d for d in dots if d[3] == 13]  # the Dense head [.., 13]
    assert head and all(d[:3] == ("bf16", "bf16", "f32") for d in head), dots
    assert sum(d[:3] == ("bf16", "bf16", "f32") for d in dots) >= 8, dots


def test_dense_activations(st_repo, ours):
    activations = ["ReLU", "GELU", "Sigmoid", "SiLU", "LeakyReLU", "Identity"]
    directory = st_repo("dense-activations", pooling_mode="cls", dense=[(7, a, True) for a in activations])
    runner = ours(directory)
    assert [layer.activation for layer in runner.config.dense_layers] == activations
    _check(runner, directory, TEXTS)


def test_legacy_layout_subfolder_bin_weights_and_pooling_flags(tmp_path, st_repo, ours):
    """An older layout: the Transformer in 0_Transformer/ with max_seq_length in sentence_bert_config.json,
    pooling as pooling_mode_* flags, Dense weights in pytorch_model.bin."""
    source = st_repo(
        "legacy-source", pooling_mode=("cls", "mean"), dense=[(8, "Tanh", True)], safe_serialization=False
    )
    directory = tmp_path / "legacy"
    shutil.copytree(source, directory)
    transformer = directory / "0_Transformer"
    transformer.mkdir()
    for path in list(directory.iterdir()):
        if path.is_file() and path.name not in (
            "modules.json",
            "config_sentence_transformers.json",
            "README.md",
        ):
            shutil.move(str(path), transformer / path.name)
    modules = json.loads((directory / "modules.json").read_text())
    modules[0].update(path="0_Transformer", type="sentence_transformers.models.Transformer")
    modules[1]["type"] = "sentence_transformers.models.Pooling"
    modules[2]["type"] = "sentence_transformers.models.Dense"
    write_json(directory / "modules.json", modules)
    write_json(transformer / "sentence_bert_config.json", {"max_seq_length": 20, "do_lower_case": False})
    write_json(
        directory / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": 21,
            "pooling_mode_cls_token": True,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        },
    )
    assert (directory / "2_Dense" / "pytorch_model.bin").is_file()
    runner = ours(directory)
    assert runner.config.backbone_dir == transformer
    assert runner.config.pooling_modes == ("cls", "mean") and runner.task.max_length == 20
    _check(runner, directory, [*TEXTS, LONG_TEXT])


def test_plain_checkpoint_is_mean_pooled(backbone, ours):
    from sentence_transformers import SentenceTransformer

    config = read_embedding_config(backbone)
    assert config.pooling_modes == ("mean",) and config.steps == () and config.backbone_dir == backbone
    assert not config.sentence_transformers
    runner = ours(backbone)
    reference = SentenceTransformer(str(backbone), device="cpu").encode(TEXTS)  # Transformer + mean pooling
    got = runner.embed(TEXTS, EmbedParams(normalize=False))
    assert float(np.abs(got - reference).max()) < TOLERANCE
    assert read_embedding_config(backbone, pooling_default="cls+max").pooling_modes == ("cls", "max")


# --- configuration errors -------------------------------------------------------------------------------


def _copy(source, tmp_path):
    directory = tmp_path / "copy"
    shutil.copytree(source, directory)
    return directory


def test_unsupported_module_is_named(st_repo, tmp_path):
    directory = _copy(st_repo("multi", pooling_mode=("cls", "mean", "max"), prompts=PROMPTS), tmp_path)
    modules = json.loads((directory / "modules.json").read_text())
    modules.append(
        {"idx": 2, "name": "2", "path": "2_LayerNorm", "type": "sentence_transformers.models.LayerNorm"}
    )
    write_json(directory / "modules.json", modules)
    with pytest.raises(EmbeddingConfigError, match=r"modules.json.*LayerNorm.*not supported") as info:
        read_embedding_config(directory)
    assert info.value.field == "[2].type" and info.value.file.endswith("modules.json")


def test_unsupported_pooling_mode_is_named(st_repo, tmp_path):
    directory = _copy(st_repo("multi", pooling_mode=("cls", "mean", "max"), prompts=PROMPTS), tmp_path)
    write_json(directory / "1_Pooling" / "config.json", {"embedding_dimension": 21, "pooling_mode": "median"})
    with pytest.raises(EmbeddingConfigError, match=r"1_Pooling/config.json: pooling_mode 'median'") as info:
        read_embedding_config(directory)
    assert info.value.field == "pooling_mode"
    with pytest.raises(EmbeddingConfigError, match="pooling 'median'"):
        read_embedding_config(tmp_path, pooling_default="median")


def test_unsupported_dense_settings_are_named(st_repo, tmp_path):
    directory = _copy(st_repo("dense-relu", pooling_mode="cls", dense=[(7, "ReLU", True)]), tmp_path)
    path = directory / "2_Dense" / "config.json"
    config = json.loads(path.read_text())
    write_json(path, {**config, "activation_function": "torch.nn.modules.activation.Hardshrink"})
    with pytest.raises(EmbeddingConfigError, match=r"activation_function.*Hardshrink") as info:
        read_embedding_config(directory)
    assert info.value.field == "activation_function"
    write_json(path, {**config, "in_features": 5})
    with pytest.raises(EmbeddingConfigError, match="in_features is 5 but the vector before it has 21"):
        read_embedding_config(directory)
    write_json(path, {**config, "out_features": 6})
    with pytest.raises(EmbeddingConfigError, match=r"linear.weight has shape \[7, 21\], expected \[6, 21\]"):
        read_embedding_config(directory)


def test_unknown_default_prompt_is_named(st_repo, tmp_path):
    directory = _copy(st_repo("multi", pooling_mode=("cls", "mean", "max"), prompts=PROMPTS), tmp_path)
    path = directory / "config_sentence_transformers.json"
    write_json(path, {**json.loads(path.read_text()), "default_prompt_name": "nope"})
    with pytest.raises(EmbeddingConfigError, match="default_prompt_name 'nope'"):
        read_embedding_config(directory)


# --- tokenization: limits, truncation, prompts, bad inputs ----------------------------------------------


@pytest.fixture(scope="module")
def limited(st_repo, ours):
    directory = st_repo("limited", pooling_mode="mean", max_seq_length=64, prompts=PROMPTS)
    return directory, ours(directory)


def test_too_long_is_413_naming_limit_and_count(limited):
    _, runner = limited
    with pytest.raises(
        PayloadTooLarge, match=r"input 1: the input has \d+ tokens, more than the limit of 64"
    ):
        runner.task.prepare(["short", LONG_TEXT], EmbedParams())
    assert PayloadTooLarge.status == 413
    count = len(runner.tokenizer.encode(LONG_TEXT)[0].ids)
    with pytest.raises(PayloadTooLarge, match=f"has {count} tokens"):
        runner.task.prepare([LONG_TEXT], EmbedParams())


def test_truncation_directions_match_the_tokenizer(limited):
    from transformers import AutoTokenizer

    directory, runner = limited
    for side in ("right", "left"):
        reference = AutoTokenizer.from_pretrained(str(directory), truncation_side=side)
        expected = reference(LONG_TEXT, truncation=True, max_length=64)["input_ids"]
        prepared = runner.task.prepare([LONG_TEXT], EmbedParams(truncate=True, truncation_direction=side))
        assert prepared.model_inputs[0].input_ids.tolist() == expected
    # Right truncation is what encode() does.
    got = runner.embed([LONG_TEXT, *TEXTS], EmbedParams(normalize=False, truncate=True))
    assert float(np.abs(got - _reference(directory, [LONG_TEXT, *TEXTS])).max()) < TOLERANCE


def test_prompt_length_counts_as_sentence_transformers(limited):

    directory, runner = limited
    st = _sentence_transformer(directory)
    features = st.preprocess(["hello"], prompt=PROMPTS["passage"])
    prepared = runner.task.prepare(["hello"], EmbedParams(prompt_name="passage"))
    assert prepared.model_inputs[0].prompt_length == features["prompt_length"]
    assert prepared.model_inputs[0].input_ids.tolist() == features["input_ids"][0].tolist()
    # Cut from the left, the prompt loses tokens first; the [CLS] token stays.
    left = runner.task.prepare(
        [LONG_TEXT], EmbedParams(prompt_name="passage", truncate=True, truncation_direction="left")
    )
    assert left.model_inputs[0].prompt_length == 1


def test_bad_inputs_are_422(limited):
    _, runner = limited
    for bad in ("", "   "):
        with pytest.raises(InvalidInput, match="empty"):
            runner.task.prepare(["fine", bad], EmbedParams())
    with pytest.raises(
        InvalidInput,
        match=r"prompt_name 'nope' is not one of the model's prompts \('query', 'document', 'passage'\)",
    ):
        runner.task.prepare(["fine"], EmbedParams(prompt_name="nope"))
    with pytest.raises(InvalidInput, match="truncation_direction"):
        runner.task.prepare(["fine"], EmbedParams(truncation_direction="up"))
    with pytest.raises(InvalidInput, match="token id 99999 is not in the vocabulary"):
        runner.task.prepare([[2, 99999, 3]], EmbedParams())
    with pytest.raises(InvalidInput, match="no input"):
        runner.task.prepare([], EmbedParams())
    assert InvalidInput.status == 422


def test_token_ids_are_used_as_given(limited):
    _, runner = limited
    ids = runner.tokenizer.encode("hello world")[0].ids
    from_ids = runner.embed([ids, ids], EmbedParams())
    from_text = runner.embed(["hello world", "hello world"], EmbedParams())
    np.testing.assert_allclose(from_ids, from_text, atol=1e-6)
    assert OpenAIEmbeddingsRequest(input=ids, model="m").items() == [ids]
    assert OpenAIEmbeddingsRequest(input=[ids, ids[:2]], model="m").items() == [ids, ids[:2]]


# --- finish: normalize and dimensions -------------------------------------------------------------------


def test_normalize_and_dimensions(limited):
    _, runner = limited
    raw = runner.embed(TEXTS, EmbedParams(normalize=False))
    unit = runner.embed(TEXTS, EmbedParams())  # TEI's default: normalized
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    short = runner.embed(TEXTS, EmbedParams(dimensions=5))
    assert short.shape == (len(TEXTS), 5)
    np.testing.assert_allclose(
        short, raw[:, :5] / np.linalg.norm(raw[:, :5], axis=1, keepdims=True), atol=1e-6
    )
    full = runner.task.dimension
    with pytest.raises(InvalidInput, match=f"dimensions must be between 1 and {full} .*got {full + 1}"):
        runner.task.prepare(["x y"], EmbedParams(dimensions=full + 1))
    with pytest.raises(ValidationError):
        OpenAIEmbeddingsRequest(input="x", model="m", dimensions=0)
    np.testing.assert_array_equal(finish_vector(np.ones(4), normalize=False, dimensions=2), [1.0, 1.0])


# --- answers and schemas --------------------------------------------------------------------------------


def test_openai_response_float_and_base64():
    vectors = [np.array([0.1, -2.5, 3.0], np.float32), np.array([1e-8, 7.0, -0.0], np.float32)]
    answer = openai_response(vectors, model="albert", prompt_tokens=11, encoding_format="float")
    assert answer["object"] == "list" and answer["model"] == "albert"
    assert answer["usage"] == {"prompt_tokens": 11, "total_tokens": 11}
    assert [d["index"] for d in answer["data"]] == [0, 1] and answer["data"][0]["object"] == "embedding"
    assert answer["data"][0]["embedding"] == [float(x) for x in vectors[0]]
    packed = openai_response(vectors, model="albert", prompt_tokens=11, encoding_format="base64")
    for entry, vector in zip(packed["data"], vectors, strict=True):
        decoded = np.frombuffer(base64.b64decode(entry["embedding"]), dtype="float32")
        np.testing.assert_array_equal(decoded, vector)
    assert encode_base64(vectors[0]) == packed["data"][0]["embedding"]


def test_openai_client_decodes_base64():
    openai = pytest.importorskip("openai")
    from openai._types import omit
    from openai.lib._parsing._embeddings import parse_embedding_response
    from openai.types import CreateEmbeddingResponse

    vectors = [np.array([0.25, -1.5, 3.0e-3], np.float32)]
    body = openai_response(vectors, model="albert", prompt_tokens=3, encoding_format="base64")
    parsed = parse_embedding_response(CreateEmbeddingResponse.construct(**body), encoding_format=omit)
    assert parsed.data[0].embedding == vectors[0].tolist()
    assert openai.__version__


def test_request_schemas():
    settings = Settings()
    request = EmbedRequest(inputs="hello", truncation_direction="Left", prompt_name="query")
    assert request.items() == ["hello"]
    # No truncate in the request: the server's --auto-truncate (true by default, as TEI's) decides.
    assert decode_embed(request, settings).params == EmbedParams(True, True, "left", "query", None)
    strict = Settings(auto_truncate=False)
    assert decode_embed(request, strict).params.truncate is False
    assert decode_embed(request.model_copy(update={"truncate": True}), strict).params.truncate is True
    assert decode_embed(EmbedRequest(inputs=["a", "b"], normalize=False), settings).params.normalize is False
    for bad in (
        {"inputs": []},
        {"inputs": "a", "normalise": True},
        {"inputs": "a", "truncation_direction": "up"},
    ):
        with pytest.raises(ValidationError):
            EmbedRequest(**bad)
    openai = OpenAIEmbeddingsRequest(input=["a", "b"], model="m", encoding_format="base64", dimensions=3)
    assert openai.items() == ["a", "b"]
    assert decode_openai(openai, settings).params == EmbedParams(truncate=True, dimensions=3)
    with pytest.raises(ValidationError):
        OpenAIEmbeddingsRequest(input="a", encoding_format="hex")
    similarity = SimilarityRequest(inputs={"source_sentence": "s", "sentences": ["a", "b"]})
    assert similarity.items() == ["s", "a", "b"]
    with pytest.raises(ValidationError):
        SimilarityRequest(inputs={"source_sentence": "s", "sentences": []})


def test_cosine_similarities_match_cos_sim(limited):
    from sentence_transformers.util import cos_sim

    rng = np.random.default_rng(0)
    source, others = rng.normal(size=21).astype(np.float32), rng.normal(size=(5, 21)).astype(np.float32)
    others[2] = 0.0  # a zero vector: eps, not a division by zero
    expected = cos_sim(source, others)[0].numpy()
    np.testing.assert_allclose(cosine_similarities(source, others), expected, atol=1e-6)
    # The whole /similarity story on a model.
    directory, runner = limited
    request = SimilarityRequest(inputs={"source_sentence": TEXTS[0], "sentences": TEXTS[1:]})
    decoded = decode_similarity(request, Settings())
    vectors = runner.embed(decoded.items, decoded.params)
    got = cosine_similarities(vectors[0], vectors[1:])
    st = _sentence_transformer(directory)
    reference = cos_sim(st.encode(TEXTS[0]), st.encode(TEXTS[1:]))[0].numpy()
    np.testing.assert_allclose(got, reference, atol=TOLERANCE)


def test_do_lower_case_adds_lowercasing_only_when_the_tokenizer_lacks_it(limited):
    import dataclasses

    from tokenizers import Tokenizer

    _, runner = limited
    cased = json.loads(runner.tokenizer.backend.to_str())
    steps = cased["normalizer"]["normalizers"]
    cased["normalizer"]["normalizers"] = [n for n in steps if n["type"] != "Lowercase"]
    tokenizer = dataclasses.replace(runner.tokenizer, backend=Tokenizer.from_str(json.dumps(cased)))
    hidden = runner.model.config.hidden_size

    def ids(config, text):
        task = EmbedTask(tokenizer, config, 160, hidden)
        return task.prepare([text], EmbedParams()).model_inputs[0].input_ids.tolist()

    lowering = dataclasses.replace(runner.config, do_lower_case=True)
    assert ids(lowering, "HELLO Paris") == ids(lowering, "hello paris")
    assert ids(runner.config, "HELLO Paris") != ids(runner.config, "hello paris")
    assert not EmbedTask(runner.tokenizer, lowering, 160, hidden)._lowercase  # ALBERT's normalizer lowercases
