"""Our tokenizer against transformers' `AutoTokenizer.from_pretrained` on the same repository.

Repositories with tokenizer.json, with only spiece.model (converted by model/spm_convert.py), a cased
one that keeps accents, and older layouts (no `added_tokens_decoder`, or no tokenizer_config.json at
all) must all encode, truncate into windows and decode exactly as transformers does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from model.errors import CheckpointError
from model.tokenizer import load_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "HELLO World, Paris and LONDON! Marie Curie",
    "café naïve Zürich São Paulo résumé crème brûlée",
    "cafe\u0301 and e\u0301le\u0300ve with combining marks",
    "日本語のテキスト and 中文 mixed with English.",
    "emoji 😀 and flags 🇫🇷 ✨ sparkle",
    "``Quoted'' text and 'single quotes' and \"double quotes\".",
    "many     spaces   between  words",
    "tabs\tand\nnewlines\r\nand\u00a0no-break space",
    "   leading and trailing spaces   ",
    "The capital of France is [MASK].",
    "glued[MASK]word, [MASK][MASK] twice and [MASK]",
    "  [MASK] at the start and at the end [MASK]  ",
    "It costs $3.50, or 3,50 € (about 12%) in 1879; 2,000,000 people.",
    "the price was 5, 10, 1879, 20,4, 100,50 and 12, total",
    "literal [CLS] and [SEP] and <pad> <unk> in text",
    "ligature ﬁ, circled ①, roman Ⅻ, full-width ＡＢＣ１２３",
    "I do n't think so , he said ! Are n't you ?",
    "a",
    " ",
    "",
]

PAIRS = [
    ("Where was Albert Einstein born?", "Albert Einstein was born in Ulm, Germany, in 1879."),
    ("café São Paulo?", "[MASK] is in Zürich,   not in  München."),
    ("", "only the second text"),
    ("only the first text", ""),
    ("  spaces  ", "\ttabs\n"),
]

LONG = " ".join(
    ["The university in Zürich and the museum of São Paulo were built in 1879, 2,000 years later."] * 6
)

# Old hub repositories (before transformers 4.34) have no added_tokens_decoder: special_tokens_map.json
# gives the special tokens, the mask token as a dict. Its lstrip=False differs from AlbertTokenizer's
# default, so a loader that ignored this file would encode "is [MASK]" differently.
LEGACY_CONFIG = {"do_lower_case": True, "remove_space": True, "keep_accents": False, "model_max_length": 512}
LEGACY_SPECIAL_MAP = {
    "bos_token": "[CLS]",
    "eos_token": "[SEP]",
    "unk_token": "<unk>",
    "sep_token": "[SEP]",
    "pad_token": "<pad>",
    "cls_token": "[CLS]",
    "mask_token": {
        "content": "[MASK]",
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
    },
}


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value), encoding="utf-8")


_NUMBERS_CORPUS_WORDS = "the price was per item and about total sum in year for of to one two three seven"


def _train_numbers_spiece(directory: Path) -> Path:
    """A SentencePiece model with other special ids (<unk> 0, <pad> 3) and pieces like "▁10,".

    AlbertConverter scores "<digit>," pieces 100 lower; the shared model has none, this one has many.
    """
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    words = _NUMBERS_CORPUS_WORDS.split()
    numbers = ["1", "2", "3", "4", "5", "10", "12", "20", "50", "100", "1879"]
    lines = [
        " ".join(
            rng.choice(words) if rng.random() < 0.4 else rng.choice(numbers) + rng.choice([",", ",", "", "."])
            for _ in range(rng.randint(3, 10))
        )
        for _ in range(2000)
    ]
    (directory / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(directory / "corpus.txt"),
        model_prefix=str(directory / "spiece"),
        model_type="unigram",
        vocab_size=80,
        hard_vocab_limit=False,
        unk_id=0,
        unk_piece="<unk>",
        bos_id=1,
        bos_piece="[CLS]",
        eos_id=2,
        eos_piece="[SEP]",
        pad_id=3,
        pad_piece="<pad>",
        user_defined_symbols=["[MASK]"],
        num_threads=1,
        minloglevel=2,
    )
    for name in ("corpus.txt", "spiece.vocab"):
        (directory / name).unlink()
    return directory / "spiece.model"


@pytest.fixture(scope="module")
def repos(make_repo, spiece_model, tmp_path_factory) -> dict[str, Path]:
    from transformers import AlbertTokenizer as SlowAlbertTokenizer

    cased = tmp_path_factory.mktemp("tokenizer-cased")
    shutil.copy(spiece_model, cased / "spiece.model")
    SlowAlbertTokenizer(
        vocab_file=str(cased / "spiece.model"),
        keep_accents=True,
        do_lower_case=False,
        clean_up_tokenization_spaces=True,
        model_max_length=64,
    ).save_pretrained(str(cased))

    legacy = tmp_path_factory.mktemp("tokenizer-legacy")
    shutil.copy(spiece_model, legacy / "spiece.model")
    _write_json(legacy / "tokenizer_config.json", LEGACY_CONFIG)
    _write_json(legacy / "special_tokens_map.json", LEGACY_SPECIAL_MAP)
    _write_json(legacy / "config.json", {"model_type": "albert"})  # how AutoTokenizer picks the class

    bare = tmp_path_factory.mktemp("tokenizer-bare")  # spiece.model alone: every default applies
    shutil.copy(spiece_model, bare / "spiece.model")
    _write_json(bare / "config.json", {"model_type": "albert"})

    numbers = tmp_path_factory.mktemp("tokenizer-numbers")
    SlowAlbertTokenizer(vocab_file=str(_train_numbers_spiece(numbers))).save_pretrained(str(numbers))

    return {
        "numbers": numbers,
        "tokenizer.json": make_repo("masked-lm", fast_tokenizer=True)[0],
        "spiece.model": make_repo("masked-lm", fast_tokenizer=False)[0],
        "cased": cased,
        "legacy": legacy,
        "bare": bare,
    }


@pytest.fixture(
    scope="module", params=["tokenizer.json", "spiece.model", "cased", "legacy", "bare", "numbers"]
)
def tokenizers(request, repos):
    """(ours, transformers') for one repository."""
    from transformers import AutoTokenizer

    directory = repos[request.param]
    if request.param != "tokenizer.json":
        assert not (directory / "tokenizer.json").exists()
    reference = AutoTokenizer.from_pretrained(str(directory))
    assert reference.is_fast
    return load_tokenizer(directory), reference


def _reference_windows(reference, text, text_pair=None, **kwargs) -> list[dict]:
    batch = reference(
        text,
        text_pair,
        return_token_type_ids=True,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        **kwargs,
    )
    encodings = batch.encodings
    if "overflow_to_sample_mapping" not in batch:  # one window: transformers returns flat lists
        batch = {key: [value] for key, value in batch.items()}
    return [
        {
            "ids": batch["input_ids"][i],
            "type_ids": batch["token_type_ids"][i],
            "offsets": [tuple(o) for o in batch["offset_mapping"][i]],
            "special_tokens_mask": batch["special_tokens_mask"][i],
            "attention_mask": batch["attention_mask"][i],
            "tokens": encodings[i].tokens,
            "word_ids": encodings[i].word_ids,
            "sequence_ids": encodings[i].sequence_ids,
        }
        for i in range(len(encodings))
    ]


def _our_windows(tokenizer, text, text_pair=None, **kwargs) -> list[dict]:
    return [
        {
            "ids": e.ids,
            "type_ids": e.type_ids,
            "offsets": list(e.offsets),
            "special_tokens_mask": e.special_tokens_mask,
            "attention_mask": e.attention_mask,
            "tokens": e.tokens,
            "word_ids": e.word_ids,
            "sequence_ids": e.sequence_ids,
        }
        for e in tokenizer.encode(text, text_pair, **kwargs)
    ]


def test_special_tokens_and_limits(tokenizers):
    ours, ref = tokenizers
    for name in ("pad", "unk", "cls", "sep", "mask"):
        assert getattr(ours, f"{name}_token") == str(getattr(ref, f"{name}_token")), name
        assert getattr(ours, f"{name}_token_id") == getattr(ref, f"{name}_token_id"), name
    assert set(ours.all_special_ids) == set(ref.all_special_ids)
    assert ours.model_max_length == ref.model_max_length
    assert ours.clean_up_tokenization_spaces == ref.clean_up_tokenization_spaces
    assert ours.get_vocab() == ref.get_vocab()
    assert ours.vocab_size == len(ref)
    for pair in (False, True):
        assert ours.num_special_tokens_to_add(pair) == ref.num_special_tokens_to_add(pair)
    ids = list(range(0, len(ref), 7))
    assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)


@pytest.mark.parametrize("text", TEXTS)
def test_single_text_encodes_as_transformers(tokenizers, text):
    ours, ref = tokenizers
    assert _our_windows(ours, text) == _reference_windows(ref, text)
    assert _our_windows(ours, text, add_special_tokens=False) == _reference_windows(
        ref, text, add_special_tokens=False
    )


@pytest.mark.parametrize(("text", "text_pair"), PAIRS)
def test_pair_encodes_as_transformers(tokenizers, text, text_pair):
    ours, ref = tokenizers
    assert _our_windows(ours, text, text_pair) == _reference_windows(ref, text, text_pair)


def test_mask_token_is_one_special_token_inside_text(tokenizers):
    # Guards the comparison itself: [MASK] must survive lower-casing and take the space before it.
    ours, ref = tokenizers
    (window,) = ours.encode("The capital is [MASK].")
    assert window.ids.count(ours.mask_token_id) == 1
    assert window.ids == ref("The capital is [MASK].")["input_ids"]


@pytest.mark.parametrize("text", [t for t in TEXTS if t.strip()] + [LONG])
def test_decode_as_transformers(tokenizers, text):
    ours, ref = tokenizers
    ids = ref(text, "second [MASK] part, isn't it ?")["input_ids"] + [ref.pad_token_id, ref.unk_token_id]
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize(
    ("truncation", "max_length", "stride", "pair"),
    [
        ("only_second", 24, 5, True),
        ("only_second", 31, 0, True),
        ("only_first", 20, 3, False),
        ("longest_first", 17, 4, False),
        ("longest_first", 200, 8, False),  # fits: one window
    ],
)
def test_truncation_windows_as_transformers(tokenizers, truncation, max_length, stride, pair):
    ours, ref = tokenizers
    args = ("the price, when?", LONG) if pair else (LONG,)
    kwargs = dict(max_length=max_length, stride=stride, truncation=truncation)
    expected = _reference_windows(ref, *args, return_overflowing_tokens=True, **kwargs)
    got = _our_windows(ours, *args, **kwargs)
    assert len(got) == len(expected)
    assert got == expected
    # Truncating state lives in copies: the plain encoding is unaffected afterwards.
    assert _our_windows(ours, *args) == _reference_windows(ref, *args)


def test_clean_up_tokenization_spaces_is_honoured(repos):
    from transformers import AutoTokenizer

    ours, ref = load_tokenizer(repos["cased"]), AutoTokenizer.from_pretrained(str(repos["cased"]))
    assert ours.clean_up_tokenization_spaces and ref.clean_up_tokenization_spaces
    ids = ref("I do n't know , he said !")["input_ids"]
    assert ours.decode(ids) == ref.decode(ids)
    assert ours.decode(ids) != ours.backend.decode(ids)  # the clean-up actually changed something


def test_no_tokenizer_files_is_a_checkpoint_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no tokenizer found") as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert info.value.file == str(tmp_path)


def test_corrupt_tokenizer_json_is_a_checkpoint_error(tmp_path, repos):
    shutil.copy(repos["tokenizer.json"] / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    path = tmp_path / "tokenizer.json"
    path.write_text('{"version": "1.0", "model": {"type": "Unigram", "vocab": [[')
    with pytest.raises(CheckpointError) as info:
        load_tokenizer(tmp_path)
    assert str(path) in str(info.value)
    assert info.value.file == str(path)


@pytest.mark.parametrize("content", [b"", b"this is not a protobuf \xff\xfe\x00\x01"])
def test_corrupt_spiece_model_is_a_checkpoint_error(tmp_path, content):
    path = tmp_path / "spiece.model"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_tokenizer(tmp_path)
    assert str(path) in str(info.value)
    assert info.value.file == str(path)


def test_corrupt_tokenizer_config_is_a_checkpoint_error(tmp_path, spiece_model):
    shutil.copy(spiece_model, tmp_path / "spiece.model")
    path = tmp_path / "tokenizer_config.json"
    path.write_text("{not json")
    with pytest.raises(CheckpointError) as info:
        load_tokenizer(tmp_path)
    assert str(path) in str(info.value)


MASK_TEXTS = ["The capital of France is [MASK].", "glued[MASK]word, [MASK][MASK] twice", "no mask at all"]


def test_split_special_tokens_is_honoured(repos, tmp_path):
    # With split_special_tokens, "[MASK]" in a text is ordinary text, in truncated windows too.
    from transformers import AutoTokenizer

    for name in ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (repos["tokenizer.json"] / name).exists():
            shutil.copy(repos["tokenizer.json"] / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    _write_json(tmp_path / "tokenizer_config.json", {**config, "split_special_tokens": True})
    ours, ref = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    for text in MASK_TEXTS:
        assert _our_windows(ours, text) == _reference_windows(ref, text)
        kwargs = dict(max_length=8, stride=2, truncation="longest_first")
        assert _our_windows(ours, text, **kwargs) == _reference_windows(
            ref, text, return_overflowing_tokens=True, **kwargs
        )
    assert ours.mask_token_id not in ours.encode(MASK_TEXTS[0])[0].ids


def test_tokenizer_json_without_mask_token_gets_it_registered(repos, tmp_path):
    # An older tokenizer.json that lists no added [MASK]: transformers registers the special tokens itself.
    from transformers import AutoTokenizer

    shutil.copy(repos["tokenizer.json"] / "spiece.model", tmp_path / "spiece.model")
    tokenizer_json = json.loads((repos["tokenizer.json"] / "tokenizer.json").read_text())
    tokenizer_json["added_tokens"] = [t for t in tokenizer_json["added_tokens"] if t["content"] != "[MASK]"]
    _write_json(tmp_path / "tokenizer.json", tokenizer_json)
    _write_json(tmp_path / "tokenizer_config.json", LEGACY_CONFIG)
    _write_json(tmp_path / "config.json", {"model_type": "albert"})
    ours, ref = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    for text in MASK_TEXTS:
        assert _our_windows(ours, text) == _reference_windows(ref, text)
    assert ours.encode(MASK_TEXTS[0])[0].ids.count(ours.mask_token_id) == 1
