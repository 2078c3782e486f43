"""Building blocks of ALBERT: activations, LayerNorm, embeddings, self-attention, the transformer layer.

Axis names in shape comments: B batch, L sequence, E embedding size, H hidden size, N heads, D head dim,
I intermediate size.

Numerics follow PyTorch ALBERT: LayerNorm uses the exact (two-pass) variance and `layer_norm_eps`, and
runs in float32 whatever the compute dtype; attention masks are boolean and the softmax runs in float32,
so bfloat16/float16 serving loses no precision there.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import AlbertConfig

Array = jax.Array


def _gelu_exact(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=True)


# transformers' ACT2FN names. "gelu" is the exact erf form; "gelu_new" and friends the tanh approximation
# (Flax's nn.gelu defaults to the approximation, hence the explicit mapping).
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": _gelu_exact,
    "gelu_python": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "linear": lambda x: x,
}


def dense(config: AlbertConfig, features: int, dtype, name: str | None = None) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.normal(config.initializer_range),
        name=name,
    )


class LayerNorm(nn.Module):
    """PyTorch's LayerNorm: exact variance, given epsilon, computed in float32, returned in `dtype`."""

    epsilon: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        centered = x - mean
        variance = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
        y = centered * jax.lax.rsqrt(variance + self.epsilon) * scale + bias
        return y.astype(self.dtype)


class AlbertEmbeddings(nn.Module):
    config: AlbertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, input_ids: Array, token_type_ids: Array, position_ids: Array, deterministic: bool
    ) -> Array:
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        word = nn.Embed(cfg.vocab_size, cfg.embedding_size, embedding_init=init, name="word_embeddings")
        token_type = nn.Embed(
            cfg.type_vocab_size, cfg.embedding_size, embedding_init=init, name="token_type_embeddings"
        )
        embeddings = word(input_ids) + token_type(token_type_ids)  # [B, L, E] float32
        if cfg.position_embedding_type == "absolute":
            position = nn.Embed(
                cfg.max_position_embeddings,
                cfg.embedding_size,
                embedding_init=init,
                name="position_embeddings",
            )
            embeddings = embeddings + position(position_ids)
        embeddings = LayerNorm(cfg.layer_norm_eps, self.dtype, name="LayerNorm")(embeddings)
        return nn.Dropout(cfg.hidden_dropout_prob)(embeddings, deterministic=deterministic)

    def attend(self, hidden: Array) -> Array:
        """Project onto the vocabulary with the (tied) word embeddings: [..., E] -> [..., V]."""
        embedding = self.variables["params"]["word_embeddings"]["embedding"]  # [V, E]
        return jnp.einsum("...e,ve->...v", hidden, embedding.astype(self.dtype))


class AlbertSelfAttention(nn.Module):
    """Multi-head self-attention with its output projection, residual and LayerNorm (AlbertAttention)."""

    config: AlbertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, mask: Array, deterministic: bool) -> Array:
        # hidden: [B, L, H]; mask: bool [B, 1, L|1, L], True where query q may attend to key k.
        cfg = self.config
        batch, length, _ = hidden.shape
        heads, head_dim = cfg.num_attention_heads, cfg.head_dim

        def project(name: str) -> Array:
            return dense(cfg, cfg.hidden_size, self.dtype, name)(hidden).reshape(
                batch, length, heads, head_dim
            )

        query, key, value = project("query"), project("key"), project("value")  # [B, L, N, D]
        scores = jnp.einsum("bqnd,bknd->bnqk", query, key).astype(jnp.float32)  # [B, N, L, L]
        scores = scores / math.sqrt(head_dim)
        if cfg.position_embedding_type != "absolute":
            # Added after the scaling, unscaled, as transformers does.
            scores = scores + self._relative_scores(query, key)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = nn.Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        context = jnp.einsum("bnqk,bknd->bqnd", probs.astype(self.dtype), value)  # [B, L, N, D]
        context = context.reshape(batch, length, cfg.hidden_size)
        projected = dense(cfg, cfg.hidden_size, self.dtype, "dense")(context)
        projected = nn.Dropout(cfg.hidden_dropout_prob)(projected, deterministic=deterministic)
        return LayerNorm(cfg.layer_norm_eps, self.dtype, name="LayerNorm")(hidden + projected)

    def _relative_scores(self, query: Array, key: Array) -> Array:
        """relative_key / relative_key_query terms (Shaw et al.), as transformers' eager attention.

        Distances are taken between row indices; within one packed sequence they equal the distances
        between its own positions, and across sequences the mask removes them.
        """
        cfg = self.config
        length = query.shape[1]
        distance_embedding = nn.Embed(
            2 * cfg.max_position_embeddings - 1,
            cfg.head_dim,
            embedding_init=nn.initializers.normal(cfg.initializer_range),
            name="distance_embedding",
        )
        positions = jnp.arange(length)
        distance = positions[:, None] - positions[None, :]  # [L, L]
        table = distance_embedding(distance + cfg.max_position_embeddings - 1).astype(self.dtype)  # [L, L, D]
        scores = jnp.einsum("bqnd,qkd->bnqk", query, table)
        if cfg.position_embedding_type == "relative_key_query":
            scores = scores + jnp.einsum("bknd,qkd->bnqk", key, table)
        return scores.astype(jnp.float32)


class AlbertLayer(nn.Module):
    config: AlbertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, mask: Array, deterministic: bool) -> Array:
        cfg = self.config
        attended = AlbertSelfAttention(cfg, self.dtype, name="attention")(
            hidden, mask, deterministic
        )  # [B, L, H]
        ffn = dense(cfg, cfg.intermediate_size, self.dtype, "ffn")(attended)  # [B, L, I]
        ffn = ACTIVATIONS[cfg.hidden_act](ffn)
        ffn = dense(cfg, cfg.hidden_size, self.dtype, "ffn_output")(ffn)  # [B, L, H]
        ffn = nn.Dropout(cfg.hidden_dropout_prob)(ffn, deterministic=deterministic)
        return LayerNorm(cfg.layer_norm_eps, self.dtype, name="full_layer_layer_norm")(ffn + attended)
