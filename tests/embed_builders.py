"""Sentence-transformers checkpoints for the embedding tests, written by sentence-transformers itself.

The backbone is a tiny random ALBERT saved by transformers' `save_pretrained` (builders.build_repo); the
sentence-transformers modules around it (Pooling of a given mode, Dense, Normalize, prompts) are built
with sentence-transformers' own classes and saved with `SentenceTransformer.save`, so the layout is the
one sentence-transformers writes, not one we wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import builders

# Shallow (2 layers, one group): random weights in deeper tiny models squash every token onto nearly the
# same state, which would make different pooling modes hard to tell apart.
SHALLOW = dict(num_hidden_layers=2, num_hidden_groups=1, inner_group_num=1)


def build_backbone(directory: Path, spiece_model: Path, *, seed: int = 0, **overrides) -> Path:
    """A plain ALBERT checkpoint (AlbertModel weights, config.json, tokenizer)."""
    builders.build_repo(directory, "base", spiece_model, seed=seed, **{**SHALLOW, **overrides})
    return directory


def build_sentence_transformer(
    directory: Path,
    backbone: Path,
    *,
    pooling_mode: str | tuple[str, ...] = "mean",
    include_prompt: bool = True,
    dense: list[tuple[int, str | None, bool]] | None = None,
    normalize: bool = False,
    max_seq_length: int | None = None,
    prompts: dict[str, str] | None = None,
    default_prompt_name: str | None = None,
    seed: int = 0,
    safe_serialization: bool = True,
) -> Path:
    """Save SentenceTransformer(modules=[Transformer(backbone), Pooling, *Dense, Normalize?]) to `directory`.

    dense: (out_features, activation class name in torch.nn or None for Identity, bias) per layer, with
    random weights.
    """
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Transformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    torch.manual_seed(seed)
    transformer = Transformer(str(backbone), max_seq_length=max_seq_length)
    width = transformer.get_embedding_dimension()
    pooling = Pooling(width, pooling_mode=pooling_mode, include_prompt=include_prompt)
    modules = [transformer, pooling]
    width = pooling.get_embedding_dimension()
    for out_features, activation, bias in dense or []:
        function = getattr(torch.nn, activation)() if activation else torch.nn.Identity()
        layer = Dense(width, out_features, bias=bias, activation_function=function)
        with torch.no_grad():
            layer.linear.weight.copy_(0.5 * torch.randn_like(layer.linear.weight))
            if bias:
                layer.linear.bias.copy_(0.5 * torch.randn_like(layer.linear.bias))
        modules.append(layer)
        width = out_features
    if normalize:
        modules.append(Normalize())
    model = SentenceTransformer(
        modules=modules, prompts=prompts, default_prompt_name=default_prompt_name, device="cpu"
    )
    model.save(str(directory), safe_serialization=safe_serialization)
    return directory


def build_sparse_encoder(
    directory: Path, mlm: Path, *, pooling_strategy: str = "max", activation_function: str = "relu"
) -> Path:
    """A SPLADE checkpoint in sentence-transformers 5's SparseEncoder layout (MLMTransformer on the masked-LM
    repository `mlm`, then SpladePooling), saved by SparseEncoder itself."""
    import warnings

    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.models import MLMTransformer, SpladePooling

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        modules = [
            MLMTransformer(str(mlm)),
            SpladePooling(pooling_strategy=pooling_strategy, activation_function=activation_function),
        ]
        SparseEncoder(modules=modules, device="cpu").save(str(directory))
    return directory


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2))
