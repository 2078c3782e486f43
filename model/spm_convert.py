"""Build ALBERT's fast tokenizer from a SentencePiece `spiece.model`, exactly as transformers 4.57 does.

Many fine-tuned hub repositories ship `spiece.model` and `tokenizer_config.json` but no `tokenizer.json`.
transformers then builds the fast tokenizer in two steps, both repeated here with `tokenizers` alone:

1. `AlbertConverter` (convert_slow_tokenizer.py) turns the SentencePiece proto into a Unigram tokenizer
   with ALBERT's normalizers, Metaspace pre-tokenizer and decoder, and `[CLS] A [SEP] B [SEP]` template.
2. `PreTrainedTokenizerFast.__init__` registers the tokens of `tokenizer_config.json`
   (`added_tokens_decoder`) and the special tokens (`[MASK]` matched with `lstrip=True`, ...), which is
   what makes `[MASK]` inside a text a single token and lets decode skip special tokens.
   `register_config_tokens` is that step alone; `load_tokenizer` also runs it on `tokenizer.json`.
"""

from __future__ import annotations

import copy
from pathlib import Path

from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram

from .errors import CheckpointError

SPIECE_UNDERLINE = "▁"

_CONTROL = sentencepiece_model_pb2.ModelProto.SentencePiece.Type.CONTROL
_USER_DEFINED = sentencepiece_model_pb2.ModelProto.SentencePiece.Type.USER_DEFINED
_UNIGRAM = sentencepiece_model_pb2.TrainerSpec.ModelType.UNIGRAM

# transformers' SpecialTokensMixin.SPECIAL_TOKENS_ATTRIBUTES, in its order (the order decides which of two
# equal special tokens is kept), with AlbertTokenizer's defaults for a key the config does not give.
ALBERT_SPECIAL_TOKENS = {
    "bos_token": "[CLS]",
    "eos_token": "[SEP]",
    "unk_token": "<unk>",
    "sep_token": "[SEP]",
    "pad_token": "<pad>",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
    "additional_special_tokens": None,
}


def tokenizer_from_spiece(
    spiece_path: Path, tokenizer_config: dict, special_tokens_map: dict | None = None
) -> Tokenizer:
    """The fast tokenizer transformers builds from `spiece.model` and the repository's tokenizer files.

    tokenizer_config: the parsed tokenizer_config.json ({} when absent); special_tokens_map: the parsed
    special_tokens_map.json, which transformers reads only for configs without `added_tokens_decoder`.
    """
    spiece_path = Path(spiece_path)
    proto = _read_proto(spiece_path)
    if proto.trainer_spec.model_type != _UNIGRAM:
        # AlbertConverter would build a BPE model here; no ALBERT checkpoint uses one.
        raise CheckpointError(f"{spiece_path}: not a unigram SentencePiece model", file=spiece_path)

    tokenizer = Tokenizer(
        # byte_fallback stays off even if the proto asks for it: AlbertConverter does not handle it.
        Unigram(_albert_vocab(proto), unk_id=proto.trainer_spec.unk_id, byte_fallback=False)
    )
    # SentencePiece control symbols are special, user-defined ones are not; neither is normalized. Added
    # before the normalizer is set, in id order, as SpmConverter.tokenizer does.
    tokenizer.add_tokens(
        [
            AddedToken(piece.piece, normalized=False, special=piece.type == _CONTROL)
            for piece in proto.pieces
            if piece.type in (_CONTROL, _USER_DEFINED)
        ]
    )
    tokenizer.normalizer = _albert_normalizer(
        proto,
        do_lower_case=bool(tokenizer_config.get("do_lower_case", True)),
        keep_accents=bool(tokenizer_config.get("keep_accents", False)),
    )
    # The slow AlbertTokenizer has no add_prefix_space or legacy attribute, so the converter always
    # prepends "▁" to every word ("always"). `remove_space` only affects the slow tokenizer.
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE_UNDERLINE, prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement=SPIECE_UNDERLINE, prepend_scheme="always")

    register_config_tokens(tokenizer, tokenizer_config, special_tokens_map or {})
    # AlbertConverter names "[CLS]" and "[SEP]" literally, whatever cls_token and sep_token say, and asks the
    # slow tokenizer for their ids: added tokens first, then the SentencePiece vocabulary, else <unk>.
    cls_id, sep_id = (_id_or_unk(tokenizer, proto, token) for token in ("[CLS]", "[SEP]"))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tokenizer


def _read_proto(spiece_path: Path) -> sentencepiece_model_pb2.ModelProto:
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(spiece_path.read_bytes())
    except (OSError, DecodeError) as exc:
        raise CheckpointError(
            f"{spiece_path}: cannot be read as a SentencePiece model ({exc})", file=spiece_path
        ) from exc
    if not proto.pieces:
        raise CheckpointError(f"{spiece_path}: SentencePiece model has no pieces", file=spiece_path)
    return proto


def _albert_vocab(proto) -> list[tuple[str, float]]:
    # AlbertConverter.vocab: a piece ending in "<digit>," is pushed 100 down in score, so that "3,50" is
    # not cut as "3," + "50" (check_number_comma).
    def ends_with_number_comma(piece: str) -> bool:
        return len(piece) >= 2 and piece[-1] == "," and piece[-2].isdigit()

    return [(p.piece, p.score - 100 if ends_with_number_comma(p.piece) else p.score) for p in proto.pieces]


def _albert_normalizer(proto, *, do_lower_case: bool, keep_accents: bool) -> normalizers.Normalizer:
    # AlbertConverter.normalizer: the slow tokenizer's preprocess_text, then SentencePiece's own charsmap.
    steps = [normalizers.Replace("``", '"'), normalizers.Replace("''", '"')]
    if not keep_accents:
        steps += [normalizers.NFKD(), normalizers.StripAccents()]
    if do_lower_case:
        steps.append(normalizers.Lowercase())
    charsmap = proto.normalizer_spec.precompiled_charsmap
    if charsmap:
        steps.append(normalizers.Precompiled(charsmap))
    steps.append(normalizers.Replace(Regex(" {2,}"), " "))
    return normalizers.Sequence(steps)


def _id_or_unk(tokenizer: Tokenizer, proto, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    return proto.trainer_spec.unk_id if token_id is None else token_id


def special_tokens(
    tokenizer_config: dict, special_tokens_map: dict, legacy_added_tokens: dict[int, AddedToken] | None = None
) -> tuple[dict, dict[int, AddedToken]]:
    """The special tokens and added tokens transformers' `from_pretrained` hands the tokenizer.

    Returns ({attribute: str | AddedToken | list | None}, {id: AddedToken}), following
    `PreTrainedTokenizerBase._from_pretrained` and `AlbertTokenizer(Fast).__init__`. A config with
    `added_tokens_decoder` (transformers >= 4.34) is authoritative; an older one is completed by
    special_tokens_map.json and by `legacy_added_tokens` (the added tokens of tokenizer.json, if any).
    """
    config = copy.deepcopy(tokenizer_config)
    if "added_tokens_decoder" in config:
        decoder = {int(i): _added_token(t) for i, t in config["added_tokens_decoder"].items()}
    else:
        decoder = dict(legacy_added_tokens or {})
        for key, value in copy.deepcopy(special_tokens_map).items():
            if isinstance(value, dict):
                value = _added_token({**value, "special": True})
            elif key == "additional_special_tokens" and isinstance(value, list):
                merged = config.pop("additional_special_tokens", None) or []
                for token in value:
                    token = _added_token({**token, "special": True}) if isinstance(token, dict) else token
                    if token not in merged:
                        merged.append(token)
                value = merged
            config[key] = value
    config = _convert_typed_tokens(config)

    # Special tokens given as strings are replaced by the added token of the same content.
    by_content = {t.content: t for t in decoder.values()}
    specials = {}
    for key, default in ALBERT_SPECIAL_TOKENS.items():
        value = config.get(key, default)
        if by_content and key in config and value is not None and key != "additional_special_tokens":
            value = by_content.get(str(value), value)
        specials[key] = value
    # The mask token behaves like a word: it takes the space before it (lstrip) and is matched before
    # normalization.
    if isinstance(specials["mask_token"], str):
        specials["mask_token"] = AddedToken(
            specials["mask_token"], lstrip=True, rstrip=False, normalized=False
        )
    extra = config.get("extra_special_tokens")
    if isinstance(extra, dict):  # named special tokens of multimodal tokenizers; ALBERT's are empty
        specials.update(extra)
    return specials, decoder


def register_config_tokens(
    tokenizer: Tokenizer,
    tokenizer_config: dict,
    special_tokens_map: dict,
    legacy_added_tokens: dict[int, AddedToken] | None = None,
) -> None:
    """Add the config's added tokens and the special tokens, as `PreTrainedTokenizerFast.__init__` does.

    Mirrors transformers' comparisons on purpose (by repr, and AddedToken never equal to a str), since
    re-adding a token with other flags changes how it is matched.
    """
    specials, decoder = special_tokens(tokenizer_config, special_tokens_map, legacy_added_tokens)
    present = tokenizer.get_added_tokens_decoder()
    present_reprs = {repr(token) for token in present.values()}
    to_add = [token for _, token in sorted(decoder.items()) if repr(token) not in present_reprs]
    known = [token.content for _, token in sorted(present.items())] + [str(token) for token in to_add]
    extended = all_special_tokens_extended(specials)
    to_add += [token for token in extended if token not in known and token not in to_add]

    special_names = {str(token) for token in extended}
    tokens = []
    for token in to_add:
        if isinstance(token, str):
            token = AddedToken(token, special=token in special_names)
        else:
            token.special = token.special or str(token) in special_names
        tokens.append(token)
    if tokens:
        tokenizer.add_tokens(tokens)


def all_special_tokens_extended(specials: dict) -> list:
    """transformers' `all_special_tokens_extended`: unique by content, in attribute order."""
    tokens, seen = [], set()
    for value in specials.values():
        if not value:
            continue
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if str(token) not in seen:
                seen.add(str(token))
                tokens.append(token)
    return tokens


def _added_token(fields: dict) -> AddedToken:
    fields = {k: v for k, v in fields.items() if k != "__type"}
    return AddedToken(**fields)


def _convert_typed_tokens(obj):
    # PreTrainedTokenizerBase.convert_added_tokens: {"__type": "AddedToken", ...} anywhere becomes an AddedToken.
    if isinstance(obj, dict) and obj.get("__type") == "AddedToken":
        return _added_token(obj)
    if isinstance(obj, (list, tuple)):
        return [_convert_typed_tokens(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _convert_typed_tokens(v) for k, v in obj.items()}
    return obj
