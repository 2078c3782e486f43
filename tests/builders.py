"""Builders for the artefacts the tests need: a SentencePiece tokenizer and tiny ALBERT checkpoints.

Nothing is downloaded. The tokenizer is trained offline on text written here; checkpoints are written
by transformers' own PyTorch `save_pretrained` (and its Flax port for `flax_model.msgpack`), so the
files are real Hugging Face layouts produced by code we did not write.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

# Words chosen so the trained vocabulary has real sub-words, accents, names and numbers to split.
_WORDS = """
the a an of to in on for with by from at as is was are were be been has have had will would can
could should may might must do does did not no yes and or but if then than so because while when
where who what which how why this that these those it its they them their we our you your he she
his her him i me my one two three four five six seven eight nine ten hundred thousand million
model language service request answer question context paris london berlin tokyo madrid rome
france germany japan spain italy europe river mountain city country capital bank market company
university hospital station library museum government president minister engineer doctor teacher
student scientist writer artist singer player team game season league match goal win lose draw
john mary peter anna george alice robert maria james linda michael sarah david laura thomas emma
microsoft google amazon apple siemens toyota nestle airbus netflix spotify
tomorrow yesterday today morning evening night week month year century monday friday january
beautiful terrible excellent awful happy sad angry calm quick slow large small new old good bad
running walking talking reading writing building learning teaching playing singing
café naïve résumé über zürich münchen são paulo françois josé müller crème brûlée garçon
piñata señor año niño façade coöperate élan déjà vu fiancée
""".split()

_EXTRA_LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "Albert Einstein was born in Ulm, Germany, in 1879.",
    "Marie Curie worked in Paris and won two Nobel prizes.",
    "It costs $3.50, or 3,50 € in Zürich (about 12%).",
    "Hello, world! How are you? I'm fine -- thanks.",
    "``Quoted'' text and 'single quotes' and \"double quotes\".",
    "日本語のテキスト and 中文 mixed with English.",
    "email: someone@example.com, url: https://example.org/path?q=1",
]

SPECIAL_PIECES = {"pad": "<pad>", "unk": "<unk>", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}


def _corpus(seed: int = 0, n_lines: int = 3000) -> list[str]:
    rng = random.Random(seed)
    lines = list(_EXTRA_LINES)
    for _ in range(n_lines):
        words = rng.choices(_WORDS, k=rng.randint(4, 18))
        if rng.random() < 0.5:
            words[0] = words[0].capitalize()
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 3000)))
        lines.append(" ".join(words) + rng.choice([".", "!", "?", ",", ""]))
    return lines


def train_sentencepiece(directory: Path, vocab_size: int = 600, seed: int = 0) -> Path:
    """Train a unigram SentencePiece model with ALBERT's special pieces and ids; returns spiece.model."""
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    text = directory / "corpus.txt"
    text.write_text("\n".join(_corpus(seed)), encoding="utf-8")
    prefix = directory / "spiece"
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(prefix),
        model_type="unigram",
        vocab_size=vocab_size,
        character_coverage=0.9995,
        pad_id=0,
        pad_piece=SPECIAL_PIECES["pad"],
        unk_id=1,
        unk_piece=SPECIAL_PIECES["unk"],
        bos_id=2,
        bos_piece=SPECIAL_PIECES["cls"],
        eos_id=3,
        eos_piece=SPECIAL_PIECES["sep"],
        user_defined_symbols=[SPECIAL_PIECES["mask"]],
        num_threads=1,
        minloglevel=2,
    )
    text.unlink()
    (directory / "spiece.vocab").unlink()
    return prefix.with_suffix(".model")


def save_tokenizer(
    directory: Path, spiece_model: Path, *, fast: bool = True, model_max_length: int = 128
) -> None:
    """Save an ALBERT tokenizer the way a hub repository holds one.

    fast=True writes tokenizer.json (plus spiece.model); fast=False writes only the slow tokenizer's
    files (spiece.model and tokenizer_config.json), as many fine-tuned repositories do.
    """
    from transformers import AlbertTokenizer, AlbertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    cls = AlbertTokenizerFast if fast else AlbertTokenizer
    tokenizer = cls(vocab_file=str(spiece_model), model_max_length=model_max_length)
    tokenizer.save_pretrained(str(directory))


# Prime-sized dimensions (head_dim 7, embedding 11 != hidden 21) so that a transposed or mis-split
# weight cannot go unnoticed.
TINY = dict(
    embedding_size=11,
    hidden_size=21,
    num_attention_heads=3,
    intermediate_size=29,
    num_hidden_layers=4,
    num_hidden_groups=2,
    inner_group_num=2,
    max_position_embeddings=160,
    type_vocab_size=2,
    hidden_act="gelu_new",
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    classifier_dropout_prob=0.1,
    initializer_range=0.02,
)

NER_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
CLASSIFY_LABELS = ["negative", "neutral", "positive"]

TASK_CLASSES = {
    "base": "AlbertModel",
    "masked-lm": "AlbertForMaskedLM",
    "sequence-classification": "AlbertForSequenceClassification",
    "token-classification": "AlbertForTokenClassification",
    "question-answering": "AlbertForQuestionAnswering",
    "multiple-choice": "AlbertForMultipleChoice",
    "pretraining": "AlbertForPreTraining",
}


def tiny_config(vocab_size: int, **overrides):
    from transformers import AlbertConfig

    values = dict(TINY, vocab_size=vocab_size)
    values.update(overrides)
    return AlbertConfig(**values)


def build_torch_model(task: str, config, seed: int = 0, scale: float = 0.3):
    """A transformers PyTorch model with every parameter random (LayerNorm scales and biases too).

    The default init leaves LayerNorm at 1/0 and weights tiny; random values everywhere make parity
    tests sensitive to every weight, and give the pipelines well-separated scores to rank.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, TASK_CLASSES[task])(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("LayerNorm.weight") or name.endswith("layer_norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.copy_(scale * torch.randn_like(param))
    model.eval()
    return model


def save_checkpoint(model, directory: Path, fmt: str = "safetensors") -> Path:
    """Write `model` in one of the Hugging Face weight layouts.

    fmt: "safetensors" (model.safetensors), "sharded" (model-0000x-of-0000y.safetensors + index),
    "bin" (pytorch_model.bin), "sharded-bin", or "msgpack" (flax_model.msgpack written by
    transformers' own Flax port).
    """
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        model.save_pretrained(str(directory), safe_serialization=True)
    elif fmt == "sharded":
        model.save_pretrained(str(directory), safe_serialization=True, max_shard_size="20KB")
    elif fmt == "bin":
        model.save_pretrained(str(directory), safe_serialization=False)
    elif fmt == "sharded-bin":
        model.save_pretrained(str(directory), safe_serialization=False, max_shard_size="20KB")
    elif fmt == "msgpack":
        import transformers

        staging = directory.parent / (directory.name + ".pt-staging")
        model.save_pretrained(str(staging), safe_serialization=True)
        flax_cls = getattr(transformers, "Flax" + type(model).__name__)
        flax_cls.from_pretrained(str(staging), from_pt=True).save_pretrained(str(directory))
        shutil.rmtree(staging)
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}")
    return directory


def build_repo(
    directory: Path,
    task: str,
    spiece_model: Path,
    *,
    fmt: str = "safetensors",
    fast_tokenizer: bool = True,
    seed: int = 0,
    labels: list[str] | None = None,
    **config_overrides,
):
    """A complete hub-style repository: config.json, weights and tokenizer. Returns the torch model."""
    import sentencepiece as spm

    vocab_size = spm.SentencePieceProcessor(model_file=str(spiece_model)).get_piece_size()
    if labels is None:
        labels = {"sequence-classification": CLASSIFY_LABELS, "token-classification": NER_LABELS}.get(task)
    if labels is not None:
        config_overrides.setdefault("id2label", dict(enumerate(labels)))
        config_overrides.setdefault("label2id", {label: i for i, label in enumerate(labels)})
    config = tiny_config(vocab_size, **config_overrides)
    model = build_torch_model(task, config, seed=seed)
    save_checkpoint(model, directory, fmt)
    save_tokenizer(
        directory, spiece_model, fast=fast_tokenizer, model_max_length=config.max_position_embeddings
    )
    return model


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
