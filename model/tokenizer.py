"""The ALBERT tokenizer: a `tokenizers.Tokenizer` plus the facts the pipelines need about it.

Loaded from `tokenizer.json` when the repository has one, otherwise converted from `spiece.model` the
way transformers' `AlbertConverter` does (see `spm_convert.py`), so both give identical encodings.
transformers itself is never imported here.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Encoding, Tokenizer

from .errors import CheckpointError
from .spm_convert import register_config_tokens, special_tokens, tokenizer_from_spiece

# transformers' PreTrainedTokenizerBase uses this when tokenizer_config.json gives no model_max_length.
VERY_LARGE_INTEGER = int(1e30)

_SPECIAL_NAMES = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")


@dataclass(frozen=True)
class AlbertTokenizer:
    backend: Tokenizer  # never has truncation or padding enabled; see encode()
    model_max_length: int
    pad_token: str
    unk_token: str
    cls_token: str
    sep_token: str
    mask_token: str
    clean_up_tokenization_spaces: bool = False
    _truncating: dict = field(default_factory=dict, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def pad_token_id(self) -> int:
        return self.token_to_id(self.pad_token)

    @property
    def unk_token_id(self) -> int:
        return self.token_to_id(self.unk_token)

    @property
    def cls_token_id(self) -> int:
        return self.token_to_id(self.cls_token)

    @property
    def sep_token_id(self) -> int:
        return self.token_to_id(self.sep_token)

    @property
    def mask_token_id(self) -> int:
        return self.token_to_id(self.mask_token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        tokens = (self.pad_token, self.unk_token, self.cls_token, self.sep_token, self.mask_token)
        return sorted({self.token_to_id(t) for t in tokens})

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return [self.backend.id_to_token(int(i)) for i in ids]

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return self.backend.num_special_tokens_to_add(pair)

    def encode(
        self,
        text: str,
        text_pair: str | None = None,
        *,
        add_special_tokens: bool = True,
        max_length: int | None = None,
        truncation: str = "longest_first",
        stride: int = 0,
    ) -> list[Encoding]:
        """Encode one text (or pair) as transformers' fast tokenizer does; thread-safe.

        With max_length, the input is truncated by `truncation` ("longest_first", "only_first",
        "only_second") and the overflow comes back as further windows overlapping by `stride` tokens,
        in the order transformers returns them (`return_overflowing_tokens=True`). Returns the list of
        windows: one Encoding when nothing overflows.
        """
        # transformers encodes `[(text, text_pair)] if text_pair else [text]`: an empty pair is no pair.
        text_pair = text_pair or None
        if max_length is None:
            return [self.backend.encode(text, text_pair, add_special_tokens=add_special_tokens)]
        backend = self._truncating_backend(max_length, truncation, stride)
        with backend[1]:
            first = backend[0].encode(text, text_pair, add_special_tokens=add_special_tokens)
        return [first, *first.overflowing]

    def _truncating_backend(
        self, max_length: int, strategy: str, stride: int
    ) -> tuple[Tokenizer, threading.Lock]:
        # Truncation is state of a tokenizers.Tokenizer, so each setting gets its own copy with its own
        # lock instead of mutating the shared backend under concurrent requests.
        key = (max_length, strategy, stride)
        with self._lock:
            entry = self._truncating.get(key)
            if entry is None:
                copy = Tokenizer.from_str(self.backend.to_str())
                # Not part of the serialized form, so carried over by hand.
                copy.encode_special_tokens = self.backend.encode_special_tokens
                copy.enable_truncation(max_length, stride=stride, strategy=strategy, direction="right")
                entry = (copy, threading.Lock())
                if len(self._truncating) > 64:
                    self._truncating.clear()
                self._truncating[key] = entry
            return entry

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """As transformers' PreTrainedTokenizerFast.decode."""
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            text = clean_up_tokenization(text)
        return text


def clean_up_tokenization(text: str) -> str:
    """transformers' PreTrainedTokenizerBase.clean_up_tokenization."""
    return (
        text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})", file=path) from exc


def load_tokenizer(directory: str | Path) -> AlbertTokenizer:
    """Load the tokenizer of a local Hugging Face repository directory."""
    directory = Path(directory)
    config = _read_json(directory / "tokenizer_config.json")
    special_map = _read_json(directory / "special_tokens_map.json")
    tokenizer_json = directory / "tokenizer.json"
    spiece = directory / "spiece.model"
    if tokenizer_json.is_file():
        try:
            backend = Tokenizer.from_file(str(tokenizer_json))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise CheckpointError(
                f"{tokenizer_json}: cannot be read as a tokenizer ({exc})", file=tokenizer_json
            ) from exc
        # As PreTrainedTokenizerFast.__init__: config tokens missing from tokenizer.json are added (a no-op
        # for files transformers wrote itself).
        register_config_tokens(
            backend, config, special_map, legacy_added_tokens=backend.get_added_tokens_decoder()
        )
    elif spiece.is_file():
        backend = tokenizer_from_spiece(spiece, config, special_map)
    else:
        raise CheckpointError(
            f"{directory}: no tokenizer found (expected tokenizer.json or spiece.model)", file=directory
        )
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = bool(config.get("split_special_tokens", False))

    resolved, _ = special_tokens(config, special_map)
    specials = {}
    for name in _SPECIAL_NAMES:
        token = resolved[name]
        if token is None or backend.token_to_id(str(token)) is None:
            raise CheckpointError(
                f"{directory}: special token {name}={token!r} is not in the vocabulary", file=directory
            )
        specials[name] = str(token)
    # PreTrainedTokenizerBase falls back to the old `max_len` key.
    max_length = config.get("model_max_length", config.get("max_len"))
    return AlbertTokenizer(
        backend=backend,
        model_max_length=int(max_length) if isinstance(max_length, (int, float)) else VERY_LARGE_INTEGER,
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        **specials,
    )
