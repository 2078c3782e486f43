"""An albert-base-v2-shaped checkpoint for each task: random weights, real shapes and vocabulary size.

Nothing is downloaded. A 30,000-piece SentencePiece model is trained on text made of the same English words
the load generator uses (so they tokenize like English does with the real vocabulary, about one piece per
word) plus made-up words to fill the vocabulary; weights are transformers' own random initialisation,
saved by `save_pretrained` as a hub repository would hold them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from model.config import PRESETS

from .texts import WORDS

VOCAB_SIZE = 30000
LABELS = {
    "classify": ["NEGATIVE", "POSITIVE"],
    "ner": ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"],
}
ARCHITECTURES = {
    "classify": "AlbertForSequenceClassification",
    "fill-mask": "AlbertForMaskedLM",
    "qa": "AlbertForQuestionAnswering",
    "ner": "AlbertForTokenClassification",
}


def _corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"] + [
        "th",
        "sh",
        "ch",
        "st",
        "tr",
        "pl",
        "gr",
    ]
    made_up = ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(60000)]
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 25))) for _ in range(120000)]
    lines += [" ".join(rng.choice(made_up) for _ in range(rng.randint(5, 20))) for _ in range(120000)]
    rng.shuffle(lines)
    return lines


def build_tokenizer(directory: Path) -> None:
    from transformers import AlbertTokenizerFast

    from service.demo import train_spiece

    directory.mkdir(parents=True, exist_ok=True)
    spiece = directory / "spiece.model"
    spiece.write_bytes(train_spiece(VOCAB_SIZE, sentences=_corpus(), exact_vocab_size=True))
    AlbertTokenizerFast(vocab_file=str(spiece), model_max_length=512).save_pretrained(str(directory))


def build(root: Path) -> dict[str, Path]:
    """endpoint -> repository directory (built once; reused when present)."""
    import transformers

    tokenizer_dir = root / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        build_tokenizer(tokenizer_dir)
    repos = {}
    for endpoint, architecture in ARCHITECTURES.items():
        directory = root / endpoint
        repos[endpoint] = directory
        if (directory / "model.safetensors").is_file():
            continue
        values = dict(PRESETS["albert-base-v2"], vocab_size=VOCAB_SIZE, architectures=[architecture])
        labels = LABELS.get(endpoint)
        if labels:
            values.update(
                id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)}
            )
        config = transformers.AlbertConfig(**values)
        import torch

        torch.manual_seed(0)
        model = getattr(transformers, architecture)(config).eval()
        model.save_pretrained(str(directory), safe_serialization=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model"):
            (directory / name).write_bytes((tokenizer_dir / name).read_bytes())
        (directory / "README.md").write_text(
            "Benchmark weights: random, albert-base-v2 shapes. Answers are meaningless.\n"
        )
    return repos


def build_extra(root: Path, name: str, endpoint: str, labels: list[str] | None = None, seed: int = 1) -> Path:
    """One more albert-base-shaped checkpoint of `endpoint`'s architecture (`labels`: its label names), at
    root/name, with the tokenizer of `build(root)` (built first)."""
    import torch
    import transformers

    directory = root / name
    if (directory / "model.safetensors").is_file():
        return directory
    tokenizer_dir = root / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        build_tokenizer(tokenizer_dir)
    architecture = ARCHITECTURES[endpoint]
    values = dict(PRESETS["albert-base-v2"], vocab_size=VOCAB_SIZE, architectures=[architecture])
    if labels:
        values.update(id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(transformers.AlbertConfig(**values)).eval()
    model.save_pretrained(str(directory), safe_serialization=True)
    for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model"):
        (directory / file).write_bytes((tokenizer_dir / file).read_bytes())
    return directory


def describe(repos: dict[str, Path]) -> dict:
    config = json.loads((repos["classify"] / "config.json").read_text())
    return {
        k: config[k]
        for k in ("vocab_size", "embedding_size", "hidden_size", "num_hidden_layers", "intermediate_size")
    }
