"""`albert-serve-demo` / `python -m service.demo`: try the service where no hub can be reached.

Builds small ALBERT repositories with this project's own code only (no torch, no transformers, so it also
runs inside the container image): a SentencePiece tokenizer trained on a few thousand generated sentences,
and random weights for the parameter tree of the model's own `init`. One per endpoint (/classify,
/fill-mask, /qa, /ner), and the named models the README's examples call (`reviews`, `my-embedder` in
sentence-transformers layout, `splade` in SparseEncoder layout, `nli` for zero-shot, `cross` for rerank),
listed in a models file beside them. Then it starts `albert-serve` on them all.

The weights are random: every endpoint answers with the right shapes, offsets and status codes, but the
answers mean nothing. Each repository says so: `"demo": true` in config.json, labels named `DEMO_...`, a
README.md, and a warning in the service log.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import random
import shutil
import sys
from pathlib import Path

from .settings import model_env_var

log = logging.getLogger("albert_serve.demo")

DEFAULT_DIRECTORY = "demo-models"
MAX_LENGTH = 128

# endpoint -> (task, labels or None). The labels say "demo" so no one mistakes an answer for a prediction.
DEMO_REPOS: dict[str, tuple[str, list[str] | None]] = {
    "classify": ("sequence-classification", ["DEMO_NEGATIVE", "DEMO_POSITIVE"]),
    "fill-mask": ("masked-lm", None),
    "qa": ("question-answering", None),
    "ner": ("token-classification", ["O", "B-DEMO_PER", "I-DEMO_PER", "B-DEMO_LOC", "I-DEMO_LOC"]),
}
# The named models: name -> (model task, labels or None, service task, layout). Zero-shot needs the NLI labels
# by their names (it finds "entailment"); the others say "demo".
NAMED_REPOS: dict[str, tuple[str, list[str] | None, str, str]] = {
    "reviews": (
        "sequence-classification",
        [f"DEMO_{n}_STARS" for n in range(1, 6)],
        "classify",
        "plain",
    ),
    "my-embedder": ("base", None, "embed", "sentence-transformers"),
    "splade": ("masked-lm", None, "sparse-embed", "sparse-encoder"),
    "nli": ("sequence-classification", ["contradiction", "neutral", "entailment"], "zero-shot", "plain"),
    "cross": ("sequence-classification", ["DEMO_RELEVANCE"], "rerank", "plain"),
}
MODELS_FILE = "models.toml"
# Small enough that all four models load and compile their buckets in seconds on a laptop CPU.
DEMO_CONFIG = dict(
    embedding_size=32,
    hidden_size=64,
    num_hidden_layers=2,
    num_hidden_groups=1,
    inner_group_num=1,
    num_attention_heads=4,
    intermediate_size=128,
    hidden_act="gelu_new",
    max_position_embeddings=MAX_LENGTH,
    type_vocab_size=2,
    initializer_range=0.02,
    layer_norm_eps=1e-12,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    classifier_dropout_prob=0.1,
    position_embedding_type="absolute",
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=3,
)
# A small bucket grid (env defaults for the demo server): 4 shapes per endpoint instead of the full grid.
DEMO_SETTINGS = {
    "ALBERT_SEQ_BUCKETS": "32,128",
    "ALBERT_BATCH_SEQ_BUCKETS": "128",
    "ALBERT_BATCH_BUCKETS": "1,4",
}
# ALBERT's special pieces at the ids every ALBERT vocabulary has them.
SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "bos_token": "[CLS]",
    "eos_token": "[SEP]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}

_WORDS = """
the a an of to in on for with by from at as is was are were be been has have had will would can could
should may not no yes and or but if then than so because while when where who what which how why this
that these those it its they them their we our you your he she his her him i me my one two three four
five six seven eight nine ten hundred thousand model language service request answer question context
paris london berlin tokyo madrid rome lisbon vienna france germany japan spain italy portugal austria
europe river mountain city country capital bank market company university hospital station library
museum government president minister engineer doctor teacher student scientist writer artist singer
player team game season league match goal win lose draw john mary peter anna george alice robert maria
james linda michael sarah david laura thomas emma today tomorrow yesterday morning evening night week
month year century monday friday january june beautiful terrible excellent awful happy sad angry calm
quick slow large small new old good bad great poor running walking talking reading writing building
learning teaching playing singing film book song food weather price service staff room trip
"""
_TEMPLATES = [
    "{name} lives in {city} and works at the {place}.",
    "The {place} in {city} was {adj} this {time}.",
    "What is the capital of {country}? It is {city}.",
    "{name} said the {thing} was {adj}.",
    "I thought the {thing} was {adj}, but {name} did not.",
]
_FILL = {
    "name": "john mary peter anna george alice robert maria james linda michael sarah david laura",
    "city": "paris london berlin tokyo madrid rome lisbon vienna",
    "country": "france germany japan spain italy portugal austria",
    "place": "bank market company university hospital station library museum",
    "adj": "beautiful terrible excellent awful happy sad quick slow large small new old good bad",
    "time": "morning evening week month year",
    "thing": "film book song food weather price service staff room trip game match",
}


def demo_corpus(seed: int = 0, lines: int = 3000) -> list[str]:
    """Generated English-like sentences: enough for a SentencePiece vocabulary with real sub-words."""
    rng = random.Random(seed)
    words = _WORDS.split()
    fill = {slot: choices.split() for slot, choices in _FILL.items()}
    corpus = []
    for _ in range(lines):
        if rng.random() < 0.5:
            template = rng.choice(_TEMPLATES)
            sentence = template.format(**{slot: rng.choice(choices) for slot, choices in fill.items()})
        else:
            sentence = " ".join(rng.choices(words, k=rng.randint(4, 16))).capitalize() + rng.choice(
                [".", "!", "?", ""]
            )
        if rng.random() < 0.2:
            sentence += f" {rng.randint(0, 2030)}"
        corpus.append(sentence)
    return corpus


def train_spiece(
    vocab_size: int = 800, seed: int = 0, sentences=None, exact_vocab_size: bool = False
) -> bytes:
    """A unigram SentencePiece model (the bytes of spiece.model) with ALBERT's special pieces and ids,
    trained on `sentences` (default: the demo corpus)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(demo_corpus(seed) if sentences is None else sentences),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=exact_vocab_size,  # the demo corpus is small; a slightly smaller vocabulary is fine
        character_coverage=1.0,
        pad_id=0,
        pad_piece="<pad>",
        unk_id=1,
        unk_piece="<unk>",
        bos_id=2,
        bos_piece="[CLS]",
        eos_id=3,
        eos_piece="[SEP]",
        user_defined_symbols=["[MASK]"],
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def tokenizer_config() -> dict:
    """tokenizer_config.json as transformers' slow AlbertTokenizer.save_pretrained writes it."""

    def added(content: str, lstrip: bool = False) -> dict:
        flags = dict(lstrip=lstrip, normalized=False, rstrip=False, single_word=False, special=True)
        return {"content": content, **flags}

    return {
        "added_tokens_decoder": {
            "0": added("<pad>"),
            "1": added("<unk>"),
            "2": added("[CLS]"),
            "3": added("[SEP]"),
            # The mask behaves like a word: it takes the space before it.
            "4": added("[MASK]", lstrip=True),
        },
        **SPECIAL_TOKENS,
        "clean_up_tokenization_spaces": False,
        "do_lower_case": True,
        "keep_accents": False,
        "remove_space": True,
        "model_max_length": MAX_LENGTH,
        "sp_model_kwargs": {},
        "tokenizer_class": "AlbertTokenizer",
    }


def model_config(task: str, vocab_size: int, labels: list[str] | None) -> dict:
    from model.modules import TASKS

    config = {
        "model_type": "albert",
        "architectures": [TASKS[task][1]],
        "demo": True,
        "demo_note": "random weights for trying albert-serve offline; answers are meaningless",
        "vocab_size": vocab_size,
        **DEMO_CONFIG,
    }
    if labels is not None:
        config["id2label"] = {str(i): label for i, label in enumerate(labels)}
        config["label2id"] = {label: i for i, label in enumerate(labels)}
    return config


def random_weights(config: dict, task: str, seed: int) -> bytes:
    """flax_model.msgpack: the model's own parameter tree, filled at random, serialized by flax.

    The tree (names, shapes) comes from the module's `init` traced abstractly; the values follow the same
    initialisers (normal(initializer_range) for weights, LayerNorm at 1 and 0, zero biases) but are drawn
    with numpy, which skips compiling `init` for every model.
    """
    import jax
    import numpy as np
    from flax import serialization

    from model.config import AlbertConfig
    from model.modules import TASKS
    from model.pretrained import init_params_shape

    albert_config = AlbertConfig.from_dict(config, source="demo")
    module_cls, _ = TASKS[task]
    abstract = init_params_shape(module_cls(albert_config), task)
    rng = np.random.default_rng(seed)

    def draw(path, leaf) -> np.ndarray:
        name = path[-1].key
        if name == "scale":
            return np.ones(leaf.shape, np.float32)
        if name == "bias":
            return np.zeros(leaf.shape, np.float32)
        return rng.normal(0.0, albert_config.initializer_range, leaf.shape).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(draw, abstract)
    return serialization.to_bytes(params)


def readme(name: str, task: str) -> str:
    return (
        f"# albert-serve demo model {name} ({task})\n\n"
        "**Demo weights: random, not trained.** This repository was generated by `albert-serve-demo` so the\n"
        "service can be tried where no model hub is reachable. Every answer it gives is meaningless; the\n"
        "labels are named `DEMO_...` to make that plain. The tokenizer is a small SentencePiece model trained\n"
        "on generated sentences.\n"
    )


def _complete(repo: Path) -> bool:
    # flax_model.msgpack is written last, so its presence means the repository is whole.
    return all((repo / name).is_file() for name in ("config.json", "spiece.model", "flax_model.msgpack"))


def _sentence_transformers_files(staging: Path, layout: str, config: dict) -> None:
    """The module files of a sentence-transformers layout around the checkpoint in `staging` (its root is the
    Transformer module): mean pooling then Normalize, or SparseEncoder's SPLADE pooling."""
    bert_config = {"max_seq_length": MAX_LENGTH, "do_lower_case": False}
    if layout == "sentence-transformers":
        modules = [
            ("0", "", "sentence_transformers.models.Transformer"),
            ("1", "1_Pooling", "sentence_transformers.models.Pooling"),
            ("2", "2_Normalize", "sentence_transformers.models.Normalize"),
        ]
        module_configs = {
            "1_Pooling": {"word_embedding_dimension": config["hidden_size"], "pooling_mode": "mean"}
        }
    else:
        modules = [
            ("0", "", "sentence_transformers.sparse_encoder.models.MLMTransformer"),
            ("1", "1_SpladePooling", "sentence_transformers.sparse_encoder.models.SpladePooling"),
        ]
        module_configs = {
            "1_SpladePooling": {
                "pooling_strategy": "max",
                "activation_function": "relu",
                "word_embedding_dimension": config["vocab_size"],
            }
        }
    entries = [{"idx": int(i), "name": i, "path": path, "type": kind} for i, path, kind in modules]
    (staging / "modules.json").write_text(json.dumps(entries, indent=2) + "\n")
    (staging / "sentence_bert_config.json").write_text(json.dumps(bert_config, indent=2) + "\n")
    # Which class saved it, as sentence-transformers writes it: without "SparseEncoder" here,
    # `SparseEncoder(path)` takes the directory for a dense model and appends a random SparseAutoEncoder.
    kind = "SentenceTransformer" if layout == "sentence-transformers" else "SparseEncoder"
    st_config = {"model_type": kind, "prompts": {"query": "", "document": ""}, "default_prompt_name": None}
    st_config["similarity_fn_name"] = "cosine" if kind == "SentenceTransformer" else None  # None: dot
    (staging / "config_sentence_transformers.json").write_text(json.dumps(st_config, indent=2) + "\n")
    for _, path, _ in modules[1:]:
        (staging / path).mkdir()
        (staging / path / "config.json").write_text(json.dumps(module_configs.get(path, {}), indent=2) + "\n")


def _demo_repos() -> dict[str, tuple[str, list[str] | None, str]]:
    """Every demo repository: name -> (model task, labels, layout)."""
    repos = {endpoint: (task, labels, "plain") for endpoint, (task, labels) in DEMO_REPOS.items()}
    repos.update({name: (task, labels, layout) for name, (task, labels, _, layout) in NAMED_REPOS.items()})
    return repos


def models_file(root: Path) -> str:
    """The models file naming the named demo models with their service tasks."""
    return "".join(
        f'[models.{name}]\nsource = "{root / name}"\ntask = "{task}"\n\n'
        for name, (_, _, task, _) in NAMED_REPOS.items()
    )


def build_demo_models(
    directory: str | os.PathLike, *, rebuild: bool = False, seed: int = 0
) -> dict[str, Path]:
    """Build the demo repositories under `directory` (kept if already there), and the models file naming the
    named ones; name -> path (the four endpoints first)."""
    import sentencepiece as spm

    root = Path(directory).resolve()
    specs = _demo_repos()
    repos = {name: root / name for name in specs}
    if not rebuild and all(_complete(repo) for repo in repos.values()) and (root / MODELS_FILE).is_file():
        return repos

    spiece = train_spiece(seed=seed)
    vocab_size = spm.SentencePieceProcessor(model_proto=spiece).get_piece_size()
    root.mkdir(parents=True, exist_ok=True)
    for index, (name, (task, labels, layout)) in enumerate(specs.items()):
        if not rebuild and _complete(repos[name]):
            continue
        # Written beside the target and renamed into place, so a half-written repository is never served.
        staging = root / f".{name}.building-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        config = model_config(task, vocab_size, labels)
        (staging / "spiece.model").write_bytes(spiece)
        (staging / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (staging / "README.md").write_text(readme(name, task))
        if layout != "plain":
            _sentence_transformers_files(staging, layout, config)
        (staging / "flax_model.msgpack").write_bytes(random_weights(config, task, seed + index))
        shutil.rmtree(repos[name], ignore_errors=True)
        staging.rename(repos[name])
    (root / MODELS_FILE).write_text(models_file(root))
    return repos


def demo_environment(repos: dict[str, Path]) -> dict[str, str]:
    """The ALBERT_* variables that point the service at the demo repositories (the four endpoints' variables,
    the models file for the named ones), with a small bucket grid."""
    env = {model_env_var(endpoint): str(repos[endpoint]) for endpoint in DEMO_REPOS}
    env["ALBERT_MODELS_FILE"] = str(repos["classify"].parent / MODELS_FILE)
    return {**DEMO_SETTINGS, **env}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="albert-serve-demo",
        description="Build small demo checkpoints (random weights: answers are meaningless) and serve them "
        "with albert-serve, so the service can be tried without a model hub. Other flags go to albert-serve.",
    )
    parser.add_argument(
        "--models-dir",
        default=os.environ.get("ALBERT_DEMO_MODELS_DIR", DEFAULT_DIRECTORY),
        help=f"Where the demo repositories are built (kept if present) [env ALBERT_DEMO_MODELS_DIR; "
        f"default ./{DEFAULT_DIRECTORY}]",
    )
    parser.add_argument("--rebuild", action="store_true", help="Build the repositories even if present.")
    parser.add_argument(
        "--build-only", action="store_true", help="Build the repositories, print their paths and exit."
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    from .app import configure_logging

    args, serve_args = build_parser().parse_known_args(argv)
    configure_logging(os.environ.get("ALBERT_LOG_LEVEL", "info"))
    repos = build_demo_models(args.models_dir, rebuild=args.rebuild)
    if args.build_only:
        for endpoint, path in repos.items():
            print(f"{endpoint}\t{path}")
        return
    for name, value in demo_environment(repos).items():
        # Model sources always point at the demo repositories (a flag still overrides them); bucket
        # settings only where the caller set none.
        if name.endswith(("_MODEL", "_MODELS_FILE")):
            os.environ[name] = value
        else:
            os.environ.setdefault(name, value)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    log.warning(
        "serving DEMO models from %s: random weights, every answer is meaningless", repos["classify"].parent
    )

    from .__main__ import main as serve

    serve(serve_args)


if __name__ == "__main__":
    sys.exit(main())
