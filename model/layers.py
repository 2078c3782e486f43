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


def accumulation(dtype) -> jnp.dtype | None:
    """The `preferred_element_type` of a matmul computing in `dtype`: float32 for half precision (the only
    bfloat16 path XLA's CPU backend runs fast, bf16 x bf16 -> f32, and no precision lost in the sums); None
    (the operands' own type) for float32, whose programs stay exactly what they were."""
    return None if jnp.dtype(dtype) == jnp.float32 else jnp.float32


def einsum(equation: str, *operands: Array, dtype) -> Array:
    """`jnp.einsum` with the operands in the compute dtype and the result accumulated in float32."""
    return jnp.einsum(
        equation, *(x.astype(dtype) for x in operands), preferred_element_type=accumulation(dtype)
    )


class Dense(nn.Module):
    """`nn.Dense` (same parameters, `kernel` [in, out] and `bias`) whose matmul takes its operands in `dtype`
    and returns float32 accumulated in float32; the bias is added in float32. In float32 it computes exactly
    what nn.Dense does."""

    features: int
    dtype: jnp.dtype = jnp.float32
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        y = jax.lax.dot_general(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            (((x.ndim - 1,), (0,)), ((), ())),
            preferred_element_type=accumulation(self.dtype),
        )
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return y


def dense(config: AlbertConfig, features: int, dtype, name: str | None = None) -> Dense:
    return Dense(features, dtype, kernel_init=nn.initializers.normal(config.initializer_range), name=name)


class LayerNorm(nn.Module):
    """PyTorch's LayerNorm: exact variance, given epsilon, computed and returned in float32 (the residual
    stream stays float32 in every compute dtype; matmuls cast their operands)."""

    epsilon: float

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
        return y


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
        embeddings = LayerNorm(cfg.layer_norm_eps, name="LayerNorm")(embeddings)
        return nn.Dropout(cfg.hidden_dropout_prob)(embeddings, deterministic=deterministic)

    def attend(self, hidden: Array) -> Array:
        """Project onto the vocabulary with the (tied) word embeddings: [..., E] -> [..., V]."""
        embedding = self.variables["params"]["word_embeddings"]["embedding"]  # [V, E]
        return einsum("...e,ve->...v", hidden, embedding, dtype=self.dtype)


class AlbertSelfAttention(nn.Module):
    """Multi-head self-attention with its output projection, residual and LayerNorm (AlbertAttention)."""

    config: AlbertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, hidden: Array, mask: Array, deterministic: bool, query_positions: Array | None = None
    ) -> Array:
        # hidden: [B, L, H]; mask: bool [B, 1, L|1, L], True where query q may attend to key k.
        # With query_positions [B, K], only those tokens are computed as queries (keys and values still
        # come from every token): the result is [B, K, H], what the full layer gives at those positions.
        cfg = self.config
        batch = hidden.shape[0]
        heads, head_dim = cfg.num_attention_heads, cfg.head_dim
        queries_in = hidden
        if query_positions is not None:
            queries_in = jnp.take_along_axis(hidden, query_positions[..., None], axis=1)  # [B, K, H]
            if mask.shape[2] > 1:
                rows = jnp.broadcast_to(
                    query_positions[:, None, :, None], (batch, 1, query_positions.shape[1], mask.shape[3])
                )
                mask = jnp.take_along_axis(mask, rows, axis=2)  # [B, 1, K, L]

        def project(name: str, x: Array) -> Array:
            return dense(cfg, cfg.hidden_size, self.dtype, name)(x).reshape(
                batch, x.shape[1], heads, head_dim
            )

        query = project("query", queries_in)  # [B, Q, N, D]
        key, value = project("key", hidden), project("value", hidden)  # [B, L, N, D]
        scores = einsum("bqnd,bknd->bnqk", query, key, dtype=self.dtype)  # [B, N, Q, L]
        scores = scores / math.sqrt(head_dim)
        if cfg.position_embedding_type != "absolute":
            # Added after the scaling, unscaled, as transformers does.
            scores = scores + self._relative_scores(query, key, query_positions)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = nn.Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        context = einsum("bnqk,bknd->bqnd", probs, value, dtype=self.dtype)  # [B, Q, N, D]
        context = context.reshape(batch, queries_in.shape[1], cfg.hidden_size)
        projected = dense(cfg, cfg.hidden_size, self.dtype, "dense")(context)
        projected = nn.Dropout(cfg.hidden_dropout_prob)(projected, deterministic=deterministic)
        return LayerNorm(cfg.layer_norm_eps, name="LayerNorm")(queries_in + projected)

    def _relative_scores(self, query: Array, key: Array, query_positions: Array | None) -> Array:
        """relative_key / relative_key_query terms (Shaw et al.), as transformers' eager attention.

        Distances are taken between row indices; within one packed sequence they equal the distances
        between its own positions, and across sequences the mask removes them.
        """
        cfg = self.config
        length = key.shape[1]
        distance_embedding = nn.Embed(
            2 * cfg.max_position_embeddings - 1,
            cfg.head_dim,
            embedding_init=nn.initializers.normal(cfg.initializer_range),
            name="distance_embedding",
        )
        keys = jnp.arange(length)
        if query_positions is None:
            distance = keys[:, None] - keys[None, :]  # [Q, L]
            equation = "qkd"
        else:
            distance = query_positions[:, :, None] - keys  # [B, Q, L]: each row has its own queries
            equation = "bqkd"
        table = distance_embedding(distance + cfg.max_position_embeddings - 1)  # [(B,) Q, L, D]
        scores = einsum(f"bqnd,{equation}->bnqk", query, table, dtype=self.dtype)
        if cfg.position_embedding_type == "relative_key_query":
            scores = scores + einsum(f"bknd,{equation}->bnqk", key, table, dtype=self.dtype)
        return scores


class AlbertLayer(nn.Module):
    config: AlbertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, hidden: Array, mask: Array, deterministic: bool, query_positions: Array | None = None
    ) -> Array:
        """[B, L, H] -> [B, L, H], or [B, K, H] at `query_positions` [B, K] only (see the attention)."""
        cfg = self.config
        attended = AlbertSelfAttention(cfg, self.dtype, name="attention")(
            hidden, mask, deterministic, query_positions
        )  # [B, L|K, H]
        ffn = dense(cfg, cfg.intermediate_size, self.dtype, "ffn")(attended)  # [B, L|K, I]
        ffn = ACTIVATIONS[cfg.hidden_act](ffn)
        ffn = dense(cfg, cfg.hidden_size, self.dtype, "ffn_output")(ffn)  # [B, L|K, H]
        ffn = nn.Dropout(cfg.hidden_dropout_prob)(ffn, deterministic=deterministic)
        return LayerNorm(cfg.layer_norm_eps, name="full_layer_layer_norm")(ffn + attended)
