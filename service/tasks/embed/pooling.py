"""The dense embedding head, in JAX: sentence-transformers' Pooling, Dense and Normalize inside the compiled
program.

It runs on *packed* rows (see service/engine/): `pool` reduces the backbone's last hidden state [R, L, H]
to one vector per sequence slot [R, K, P] with sentence-transformers' own formulas, `apply_head` runs the
Dense layers and the Normalize module (their weights are arguments of the program, not constants).
`embedding_fn` is the whole jitted function for the engine; only the [R, K, D] vectors leave the device.

What the engine passes to the head, per packed batch (R rows of L tokens, K = sequences_per_row(L) slots):
`input_ids`, `token_type_ids`, `position_ids`, `segment_ids` [R, L] and `first_tokens` [R, K] exactly as
`Packer.pack` lays them out, plus `prompt_lengths` [R, K] int32 (`prompt_lengths_for(batch, sequences)`):
how many leading tokens of each slot's sequence are its prompt, counted as sentence-transformers counts
them ([CLS] included), 0 for no prompt and for empty slots. The answer of slot (r, k) is sequence
`batch.slots.index((r, k))`'s embedding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..base import ModelInput
from .layout import ACTIVATION_NAMES, DenseLayer, EmbeddingConfig

Array = jax.Array

# Modes that read one token per sequence: with only these, the backbone's last layer runs on those tokens.
_SINGLE_TOKEN_MODES = ("cls", "lasttoken")

# Dense activation functions, by the names the layout reader gives them, each with torch's default arguments.
ACTIVATIONS = {
    "Identity": lambda x: x,
    "Tanh": jnp.tanh,
    "ReLU": jax.nn.relu,
    "GELU": lambda x: jax.nn.gelu(x, approximate=False),
    "Sigmoid": jax.nn.sigmoid,
    "SiLU": jax.nn.silu,
    "LeakyReLU": lambda x: jax.nn.leaky_relu(x, 0.01),
}
NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's eps
assert set(ACTIVATIONS) == set(ACTIVATION_NAMES)

_HIGHEST = jax.lax.Precision.HIGHEST  # pooling sums and Dense matmuls in full float32 on every backend


def _slot_masks(
    segment_ids: Array, position_ids: Array, slots: int, prompt_lengths: Array | None, include_prompt: bool
) -> tuple[Array, Array]:
    """(member, pooled), both bool [R, K, L]: the tokens of each slot's sequence, and those pooled (without
    the prompt when `include_prompt` is false)."""
    k = jnp.arange(1, slots + 1, dtype=segment_ids.dtype)
    member = segment_ids[:, None, :] == k[None, :, None]
    if include_prompt or prompt_lengths is None:
        return member, member
    return member, member & (position_ids[:, None, :] >= prompt_lengths[:, :, None])


def token_indices(
    mode: str,
    segment_ids: Array,
    first_tokens: Array,
    prompt_lengths: Array | None = None,
    *,
    include_prompt: bool = True,
) -> Array:
    """Row indices [R, K] of the token that `cls` or `lasttoken` pooling reads in each slot.

    cls: the sequence's first pooled token (with the prompt excluded, the first after it, as
    sentence-transformers' argmax over its mask); lasttoken: the sequence's last token."""
    slots = first_tokens.shape[1]
    k = jnp.arange(1, slots + 1, dtype=segment_ids.dtype)
    lengths = jnp.sum(segment_ids[:, None, :] == k[None, :, None], axis=-1).astype(jnp.int32)  # [R, K]
    last = first_tokens + jnp.maximum(lengths - 1, 0)
    if mode == "lasttoken":
        return last
    if mode != "cls":
        raise ValueError(f"{mode!r} does not read a single token")
    if include_prompt or prompt_lengths is None:
        return first_tokens
    return jnp.minimum(first_tokens + prompt_lengths, last)


def _gather(hidden: Array, indices: Array) -> Array:
    return jnp.take_along_axis(hidden, indices[..., None], axis=1)  # [R, K, H]


def pool(
    hidden: Array,
    segment_ids: Array,
    position_ids: Array,
    first_tokens: Array,
    prompt_lengths: Array | None = None,
    *,
    config: EmbeddingConfig,
) -> Array:
    """Pool packed rows: hidden [R, L, H] -> [R, K, H * len(config.pooling_modes)] float32.

    segment_ids [R, L] (0 = padding, k + 1 = the row's k-th sequence), position_ids [R, L] (restarting at 0
    for each sequence), first_tokens [R, K] (offset of each slot's sequence), prompt_lengths [R, K] (leading
    prompt tokens per slot; only read when the Pooling module has include_prompt false). The formulas are
    sentence-transformers' `Pooling._forward_padded`, per sequence; empty slots come out as zeros.
    """
    hidden = hidden.astype(jnp.float32)
    slots = first_tokens.shape[1]
    member, pooled = _slot_masks(segment_ids, position_ids, slots, prompt_lengths, config.include_prompt)
    weights = pooled.astype(jnp.float32)  # [R, K, L]
    counts = jnp.sum(weights, axis=-1, keepdims=True)  # [R, K, 1]
    vectors = []
    mean_sum = None
    for mode in config.pooling_modes:
        if mode in _SINGLE_TOKEN_MODES:
            index = token_indices(
                mode, segment_ids, first_tokens, prompt_lengths, include_prompt=config.include_prompt
            )
            vectors.append(_gather(hidden, index))
        elif mode == "max":
            masked = jnp.where(pooled[..., None], hidden[:, None, :, :], -jnp.inf)  # [R, K, L, H], fused
            vectors.append(jnp.max(masked, axis=2))
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            if mean_sum is None:
                mean_sum = jnp.einsum("rkl,rlh->rkh", weights, hidden, precision=_HIGHEST)
            denominator = jnp.maximum(counts, 1e-9)
            vectors.append(mean_sum / (denominator if mode == "mean" else jnp.sqrt(denominator)))
        elif mode == "weightedmean":
            weighted = weights * (position_ids[:, None, :] + 1).astype(jnp.float32)  # positions 1..n
            total = jnp.einsum("rkl,rlh->rkh", weighted, hidden, precision=_HIGHEST)
            vectors.append(total / jnp.maximum(jnp.sum(weighted, axis=-1, keepdims=True), 1e-9))
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    out = jnp.concatenate(vectors, axis=-1)
    used = jnp.any(member, axis=-1, keepdims=True)  # [R, K, 1]
    return jnp.where(used, out, 0.0)


def head_params(config: EmbeddingConfig) -> list[dict[str, np.ndarray]]:
    """The Dense layers' parameters, one {"kernel" [in, out], "bias" [out]} per layer, float32 (a layer
    without bias gets zeros, which adds nothing)."""
    return [
        {
            "kernel": np.ascontiguousarray(layer.weight.T, dtype=np.float32),
            "bias": (layer.bias if layer.bias is not None else np.zeros(layer.out_features)).astype(
                np.float32
            ),
        }
        for layer in config.dense_layers
    ]


def apply_head(params: list[dict[str, Array]], pooled: Array, *, config: EmbeddingConfig) -> Array:
    """The modules after pooling, in order: Dense (activation(x @ kernel + bias)) and Normalize. [..., P] ->
    [..., D] float32; `params` as embedding_params returns them. A float32 kernel multiplies in full float32;
    a half-precision one takes its input in that dtype, accumulating in float32 (as the backbone's matmuls
    do); bias, activation and Normalize run in float32."""
    x = pooled.astype(jnp.float32)
    dense = iter(params)
    for step in config.steps:
        if isinstance(step, DenseLayer):
            layer = next(dense)
            kernel = layer["kernel"]
            if kernel.dtype == jnp.float32:
                product = jnp.matmul(x, kernel, precision=_HIGHEST)
            else:
                product = jnp.matmul(x.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32)
            x = ACTIVATIONS[step.activation](product + layer["bias"])
        else:
            norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
            x = x / jnp.maximum(norm, NORMALIZE_EPS)
    return x


def embedding_params(model_params: dict, config: EmbeddingConfig, dtype=jnp.float32) -> dict:
    """The one parameter tree `embedding_fn` takes: the backbone's (as from_pretrained loaded them) and the
    head's, its kernels in the model's compute `dtype` (biases float32)."""
    head = [
        {"kernel": jnp.asarray(p["kernel"], dtype), "bias": jnp.asarray(p["bias"])}
        for p in head_params(config)
    ]
    return {"model": model_params, "head": head}


def embedding_fn(module, config: EmbeddingConfig):
    """The function for the engine to jit, one per bucket shape:

        fn(params, input_ids, token_type_ids, position_ids, segment_ids, first_tokens, prompt_lengths)
            -> {"embedding": float32 [R, K, D]}

    `params` = embedding_params(model.params, config); every other argument is int32, [R, L] or [R, K] as
    Packer.pack and prompt_lengths_for build them. `module` is any model of model.TASKS with an `albert`
    backbone (task "base" for a sentence-transformers checkpoint). With only cls/lasttoken pooling, the
    backbone's last layer runs only on the tokens read (as classification does).
    """
    single_token = all(mode in _SINGLE_TOKEN_MODES for mode in config.pooling_modes)

    def fn(params, input_ids, token_type_ids, position_ids, segment_ids, first_tokens, prompt_lengths):
        if single_token:
            indices = [
                token_indices(
                    m, segment_ids, first_tokens, prompt_lengths, include_prompt=config.include_prompt
                )
                for m in config.pooling_modes
            ]
            slots = first_tokens.shape[1]

            def backbone(m):
                return m.albert(
                    input_ids,
                    None,
                    token_type_ids,
                    position_ids,
                    segment_ids,
                    output_positions=jnp.concatenate(indices, axis=1),
                )  # [R, K * modes, H]

            picked = module.apply({"params": params["model"]}, method=backbone).astype(jnp.float32)
            pooled = jnp.concatenate(
                [picked[:, i * slots : (i + 1) * slots] for i in range(len(indices))], axis=-1
            )
            k = jnp.arange(1, slots + 1, dtype=segment_ids.dtype)
            used = jnp.any(segment_ids[:, None, :] == k[None, :, None], axis=-1, keepdims=True)
            pooled = jnp.where(used, pooled, 0.0)
        else:

            def backbone(m):
                return m.albert(input_ids, None, token_type_ids, position_ids, segment_ids)  # [R, L, H]

            hidden = module.apply({"params": params["model"]}, method=backbone)
            pooled = pool(hidden, segment_ids, position_ids, first_tokens, prompt_lengths, config=config)
        return {"embedding": apply_head(params["head"], pooled, config=config)}

    return fn


def prompt_lengths_for(batch, sequences: list[ModelInput]) -> np.ndarray:
    """int32 [R, K]: each slot's prompt length (0 where none), for a PackedBatch of `sequences`."""
    lengths = np.zeros(batch.first_tokens.shape, np.int32)
    for sequence, (r, k) in zip(sequences, batch.slots, strict=True):
        lengths[r, k] = getattr(sequence, "prompt_length", 0)
    return lengths
