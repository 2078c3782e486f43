"""Filling a model's parameter tree from a checkpoint.

The model is built first (its abstract parameter tree comes from `jax.eval_shape` of `init`); every leaf
is then looked up in the checkpoint by the one table below, checked for shape, and copied. Loading never
guesses: a leaf the checkpoint lacks is an error naming it, never a random head.

Naming, PyTorch state dict -> Flax tree (transformers' own conversion rules):

    a.b.weight   (Linear)        -> a/b/kernel      transposed [out, in] -> [in, out]
    a.b.weight   (Embedding)     -> a/b/embedding
    a.b.weight / a.b.gamma (LN)  -> a/b/scale
    a.b.bias / a.b.beta (LN)     -> a/b/bias
    predictions.bias             -> predictions/bias (or predictions.decoder.bias, the same tied tensor)

A flax_model.msgpack already uses the tree's names and layouts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np

from .errors import CheckpointError
from .weights import Checkpoint

log = logging.getLogger(__name__)

# Flax leaf name -> (PyTorch leaf names to try, transpose?)
_LEAF_RULES: dict[str, tuple[tuple[str, ...], bool]] = {
    "kernel": (("weight",), True),
    "embedding": (("weight",), False),
    "scale": (("weight", "gamma"), False),
    "bias": (("bias", "beta"), False),
}
# Whole-name exceptions, PyTorch side: alternative names for the same tensor.
_ALIASES: dict[str, tuple[str, ...]] = {
    "predictions.bias": ("predictions.bias", "predictions.decoder.bias"),
}
# Present in some checkpoints, never parameters of ours: buffers, and tensors tied to others we load.
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
_TIED_COPIES = ("predictions.decoder.weight", "predictions.decoder.bias")
# Weights of ALBERT heads or layers a given task does not use: dropped with a log line, as transformers does.
_OTHER_HEADS = ("predictions.", "sop_classifier.", "classifier.", "qa_outputs.", "albert.pooler.")

BACKBONE_PREFIX = "albert"


def flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    flat = {}
    for key, value in tree.items():
        path = (*prefix, str(key))
        if isinstance(value, dict):
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def unflatten(flat: dict[tuple[str, ...], object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _with_backbone_prefix(names: Iterable[str], separator: str) -> dict[str, str]:
    """Map checkpoint names to names with the `albert` prefix our trees use.

    A bare AlbertModel checkpoint names its tensors `embeddings...`, `encoder...`, `pooler...`; head models
    prefix them with `albert.`. Accept both, as transformers does.
    """
    names = list(names)
    bare = (f"embeddings{separator}", f"encoder{separator}", f"pooler{separator}")
    mapping = {}
    for name in names:
        mapping[name] = f"{BACKBONE_PREFIX}{separator}{name}" if name.startswith(bare) else name
    return mapping


def _torch_candidates(path: tuple[str, ...]) -> tuple[list[str], bool]:
    dotted = ".".join(path[:-1])
    leaf_names, transpose = _LEAF_RULES[path[-1]]
    full = f"{dotted}.{path[-1]}"
    if full in ("predictions.bias",):
        return list(_ALIASES[full]), False
    return [f"{dotted}.{leaf}" for leaf in leaf_names], transpose


def fill_params(
    abstract: dict,
    checkpoint: Checkpoint,
    *,
    tie_word_embeddings: bool = True,
    absolute_positions: bool = True,
) -> dict:
    """Return a parameter tree shaped like `abstract` (a tree of ShapeDtypeStruct) from `checkpoint`.

    Raises CheckpointError naming the file and key for a shape mismatch, and listing every missing and
    unexpected name when the checkpoint lacks something the model needs.
    """
    if checkpoint.layout == "flax":
        return _fill_from_flax(abstract, checkpoint)
    rename = _with_backbone_prefix(checkpoint.tensors, ".")
    tensors = {rename[name]: value for name, value in checkpoint.tensors.items()}
    origin = {rename[name]: path for name, path in checkpoint.origin.items()}

    filled: dict[tuple[str, ...], np.ndarray] = {}
    used: set[str] = set()
    missing: list[str] = []
    for path, spec in flatten(abstract).items():
        candidates, transpose = _torch_candidates(path)
        name = next((c for c in candidates if c in tensors), None)
        if name is None:
            missing.append(candidates[0])
            continue
        used.update(c for c in candidates if c in tensors)
        value = tensors[name]
        if transpose:
            value = value.T if value.ndim == 2 else value
        filled[path] = _checked(value, spec, name, origin.get(name), transposed=transpose)

    unexpected = sorted(set(tensors) - used - _ignorable(tensors, tie_word_embeddings, absolute_positions))
    return _finish(filled, missing, unexpected, checkpoint)


def _ignorable(tensors: dict, tie_word_embeddings: bool, absolute_positions: bool = True) -> set[str]:
    ignorable = {f"{BACKBONE_PREFIX}.{b}" for b in _BUFFERS}
    if tie_word_embeddings:
        ignorable.update(_TIED_COPIES)
    if not absolute_positions:
        # transformers creates (and saves) position_embeddings whatever position_embedding_type says; a
        # relative_key(_query) model never reads it, so it is not worth a warning on every load.
        ignorable.add(f"{BACKBONE_PREFIX}.embeddings.position_embeddings.weight")
    return ignorable & set(tensors)


def _fill_from_flax(abstract: dict, checkpoint: Checkpoint) -> dict:
    rename = _with_backbone_prefix(checkpoint.tensors, "/")
    tensors = {rename[name]: value for name, value in checkpoint.tensors.items()}
    origin = {rename[name]: path for name, path in checkpoint.origin.items()}
    filled, missing = {}, []
    for path, spec in flatten(abstract).items():
        name = "/".join(path)
        if name not in tensors:
            missing.append(name)
            continue
        filled[path] = _checked(tensors[name], spec, name, origin.get(name), transposed=False)
    unexpected = sorted(set(tensors) - {"/".join(p) for p in filled})
    return _finish(filled, missing, unexpected, checkpoint)


def _finish(filled: dict, missing: list[str], unexpected: list[str], checkpoint: Checkpoint) -> dict:
    if missing:
        raise CheckpointError(
            f"{checkpoint.description}: missing {len(missing)} weight(s) the model needs: {', '.join(missing)}"
            + (f"; unexpected weight(s): {', '.join(unexpected)}" if unexpected else ""),
            file=checkpoint.description,
            key=missing[0],
            missing=missing,
            unexpected=unexpected,
        )
    if unexpected:
        known = [u for u in unexpected if u.replace("/", ".").startswith(_OTHER_HEADS)]
        other = [u for u in unexpected if u not in known]
        if known:
            log.info("%s: not used by this head: %s", checkpoint.description, ", ".join(known))
        if other:
            log.warning("%s: unexpected weights ignored: %s", checkpoint.description, ", ".join(other))
    return unflatten(filled)


def _checked(value: np.ndarray, spec, name: str, file, *, transposed: bool) -> np.ndarray:
    expected = tuple(spec.shape)
    if tuple(value.shape) != expected:
        shown = tuple(reversed(value.shape)) if transposed else tuple(value.shape)
        wanted = tuple(reversed(expected)) if transposed else expected
        raise CheckpointError(
            f"{file}: {name} has shape {list(shown)}, the model expects {list(wanted)}",
            file=file,
            key=name,
        )
    if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
        raise CheckpointError(
            f"{file}: {name} has dtype {value.dtype}, expected a float tensor", file=file, key=name
        )
    return np.ascontiguousarray(value, dtype=np.float32)
