"""The ALBERT backbone and its task heads.

The parameter tree mirrors transformers' checkpoints (and its Flax port), e.g.
`albert/encoder/albert_layer_groups/0/albert_layers/0/attention/query/kernel`; `params.py` holds the one
table that maps checkpoint names onto it.

Every model takes `input_ids`, `attention_mask`, `token_type_ids` ([B, L] ints) like transformers. For
serving, several sequences can also be *packed* into one row: pass `segment_ids` (1, 2, ... per
sequence, 0 for padding) and `position_ids` restarting at 0 for each sequence; attention then stays
within each sequence, so every sequence gets exactly the result it would get alone. Heads that read one
vector per sequence (pooled classification) or a few positions (masked LM) take per-row token indices
[B, K] to read from (`cls_positions`, `positions`); only those tokens then go through the last layer, as
nothing else reads them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import AlbertConfig
from .layers import ACTIVATIONS, AlbertEmbeddings, AlbertLayer, Dense, LayerNorm, dense

Array = jax.Array


def attention_mask_from(attention_mask: Array, segment_ids: Array | None) -> Array:
    """Boolean [B, 1, Lq|1, Lk] mask: True where a query may attend to a key.

    Without segments this is transformers' key-padding mask. With segments a token attends only to keys of
    its own sequence; padding queries (segment 0) attend to every real key, as they do in transformers, so
    no softmax row is ever empty.
    """
    if segment_ids is None:
        return (attention_mask > 0)[:, None, None, :]
    query = segment_ids[:, None, :, None]
    key = segment_ids[:, None, None, :]
    return (key > 0) & ((query == key) | (query == 0))


class AlbertInnerLayers(nn.Module):
    """One layer group's stack of `inner_group_num` layers (transformers' `albert_layers`)."""

    config: AlbertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, hidden: Array, mask: Array, deterministic: bool, output_positions: Array | None = None
    ) -> Array:
        last = self.config.inner_group_num - 1
        for j in range(last + 1):
            positions = output_positions if j == last else None
            hidden = AlbertLayer(self.config, self.dtype, name=str(j))(hidden, mask, deterministic, positions)
        return hidden


class AlbertLayerGroup(nn.Module):
    """A shared layer group, in the (carry, broadcast) -> (carry, output) form that nn.scan needs."""

    config: AlbertConfig
    dtype: jnp.dtype = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(
        self, hidden: Array, mask: Array, output_positions: Array | None = None
    ) -> tuple[Array, None]:
        layers = AlbertInnerLayers(self.config, self.dtype, name="albert_layers")
        return layers(hidden, mask, self.deterministic, output_positions), None


def _apply_group(group: AlbertLayerGroup, hidden: Array, mask: Array) -> tuple[Array, None]:
    return group(hidden, mask)


class AlbertLayerGroups(nn.Module):
    """Applies `num_hidden_layers` layers, layer i using group `config.group_of_layer(i)`.

    Consecutive applications of the same group run as a loop (nn.scan with the parameters broadcast)
    rather than unrolled: albert-base applies one group 12 times, and a loop compiles ~12x faster, which
    matters when the service compiles a whole grid of shapes before it is ready.

    With `output_positions` [B, K], the very last layer computes only those tokens (see AlbertLayer): a
    head that reads a few tokens (the pooler reads [CLS]) skips most of the last layer's work.
    """

    config: AlbertConfig
    dtype: jnp.dtype = jnp.float32
    scan_layers: bool = True

    @nn.compact
    def __call__(
        self, hidden: Array, mask: Array, deterministic: bool, output_positions: Array | None = None
    ) -> Array:
        cfg = self.config
        runs: list[list[int]] = []  # [group, repeats]
        for layer in range(cfg.num_hidden_layers):
            group = cfg.group_of_layer(layer)
            if runs and runs[-1][0] == group:
                runs[-1][1] += 1
            else:
                runs.append([group, 1])
        for n, (group, repeats) in enumerate(runs):
            block = AlbertLayerGroup(cfg, self.dtype, deterministic, name=str(group))
            final = output_positions is not None and n == len(runs) - 1
            loop = repeats - 1 if final else repeats
            if loop > 1 and self.scan_layers:
                scanned = nn.scan(
                    _apply_group,
                    variable_broadcast="params",
                    split_rngs={"params": False, "dropout": True},
                    in_axes=(nn.broadcast,),
                    length=loop,
                )
                hidden, _ = scanned(block, hidden, mask)
            else:
                for _ in range(loop):
                    hidden, _ = block(hidden, mask)
            if final:
                hidden, _ = block(hidden, mask, output_positions)
        return hidden


class AlbertTransformer(nn.Module):
    config: AlbertConfig
    dtype: jnp.dtype = jnp.float32
    scan_layers: bool = True

    @nn.compact
    def __call__(
        self, embeddings: Array, mask: Array, deterministic: bool, output_positions: Array | None = None
    ) -> Array:
        hidden = dense(self.config, self.config.hidden_size, self.dtype, "embedding_hidden_mapping_in")(
            embeddings
        )
        groups = AlbertLayerGroups(self.config, self.dtype, self.scan_layers, name="albert_layer_groups")
        return groups(hidden, mask, deterministic, output_positions)  # [B, L|K, H]


class AlbertModel(nn.Module):
    """The backbone: embeddings, shared-layer encoder and (optionally) the pooler."""

    config: AlbertConfig
    dtype: jnp.dtype = jnp.float32
    add_pooling_layer: bool = True
    scan_layers: bool = True

    def setup(self):
        self.embeddings = AlbertEmbeddings(self.config, self.dtype)
        self.encoder = AlbertTransformer(self.config, self.dtype, self.scan_layers)
        if self.add_pooling_layer:
            self.pooler = dense(self.config, self.config.hidden_size, self.dtype)

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        position_ids: Array | None = None,
        segment_ids: Array | None = None,
        deterministic: bool = True,
        output_positions: Array | None = None,
    ) -> Array:
        """Returns the last hidden state [B, L, H]; with `output_positions` [B, K], only at those per-row
        token indices, [B, K, H], for less work (the last layer computes only those tokens)."""
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((batch, length), jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((batch, length), jnp.int32)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        embeddings = self.embeddings(input_ids, token_type_ids, position_ids, deterministic)  # [B, L, E]
        mask = attention_mask_from(attention_mask, segment_ids)
        return self.encoder(embeddings, mask, deterministic, output_positions)

    def pool(self, first_tokens: Array) -> Array:
        """The pooler: tanh(dense(hidden of [CLS])), [..., H] -> [..., H]."""
        return jnp.tanh(self.pooler(first_tokens))

    def vocab_projection(self, features: Array) -> Array:
        """Project [..., E] onto the vocabulary with the word embeddings (tied decoder)."""
        return self.embeddings.attend(features)


class AlbertMLMHead(nn.Module):
    """transformers' AlbertMLMHead: dense -> activation -> LayerNorm -> decoder (+ bias)."""

    config: AlbertConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.dense = dense(cfg, cfg.embedding_size, self.dtype)
        self.LayerNorm = LayerNorm(cfg.layer_norm_eps)
        if not cfg.tie_word_embeddings:
            self.decoder = Dense(cfg.vocab_size, self.dtype, use_bias=False)
        self.bias = self.param("bias", nn.initializers.zeros, (cfg.vocab_size,), jnp.float32)

    def transform(self, hidden: Array) -> Array:
        """[..., H] -> [..., E]: everything before the vocabulary projection."""
        return self.LayerNorm(ACTIVATIONS[self.config.hidden_act](self.dense(hidden)))

    def decode(self, features: Array, albert: AlbertModel) -> Array:
        """[..., E] -> logits [..., V] in float32."""
        if self.config.tie_word_embeddings:
            logits = albert.vocab_projection(features)
        else:
            logits = self.decoder(features)
        return logits.astype(jnp.float32) + self.bias


class _WithBackbone(nn.Module):
    """Shared plumbing: every head model owns an `albert` backbone."""

    config: AlbertConfig
    dtype: jnp.dtype = jnp.float32
    scan_layers: bool = True

    def _backbone(self, add_pooling_layer: bool) -> AlbertModel:
        return AlbertModel(self.config, self.dtype, add_pooling_layer, self.scan_layers)

    def _dropout(self, rate: float | None) -> nn.Dropout:
        return nn.Dropout(rate if rate is not None else self.config.hidden_dropout_prob)


class AlbertBase(_WithBackbone):
    """transformers' AlbertModel: {"last_hidden_state" [B, L, H], "pooler_output" [B, H]}."""

    def setup(self):
        self.albert = self._backbone(add_pooling_layer=True)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        segment_ids=None,
        deterministic: bool = True,
    ) -> dict[str, Array]:
        hidden = self.albert(
            input_ids, attention_mask, token_type_ids, position_ids, segment_ids, deterministic
        )
        return {"last_hidden_state": hidden, "pooler_output": self.albert.pool(hidden[:, 0])}


class AlbertForMaskedLM(_WithBackbone):
    def setup(self):
        self.albert = self._backbone(add_pooling_layer=False)
        self.predictions = AlbertMLMHead(self.config, self.dtype)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        segment_ids=None,
        positions: Array | None = None,
        deterministic: bool = True,
    ) -> dict[str, Array]:
        """{"logits"}: [B, L, V], or [B, K, V] at per-row token indices `positions` [B, K] only (then only
        those tokens go through the last layer)."""
        features = self.mlm_features(
            input_ids, attention_mask, token_type_ids, position_ids, segment_ids, deterministic, positions
        )  # [B, L|K, E]
        return {"logits": self.vocab_logits(features)}

    def mlm_features(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        segment_ids=None,
        deterministic: bool = True,
        positions: Array | None = None,
    ) -> Array:
        """Everything before the vocabulary projection: [B, L, E], or [B, K, E] at `positions` [B, K].
        Cheap (E is small), so serving runs it on every token and projects only the mask positions with
        `vocab_logits`."""
        hidden = self.albert(
            input_ids, attention_mask, token_type_ids, position_ids, segment_ids, deterministic, positions
        )
        return self.predictions.transform(hidden)

    def vocab_logits(self, features: Array) -> Array:
        """[..., E] -> [..., V] float32."""
        return self.predictions.decode(features, self.albert)


class AlbertForSequenceClassification(_WithBackbone):
    def setup(self):
        self.albert = self._backbone(add_pooling_layer=True)
        self.dropout = self._dropout(self.config.classifier_dropout_prob)
        self.classifier = dense(self.config, self.config.num_labels, self.dtype)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        segment_ids=None,
        cls_positions: Array | None = None,
        deterministic: bool = True,
    ) -> dict[str, Array]:
        """{"logits"}: [B, C]; with packed rows, [B, K, C] for the sequences starting at per-row indices
        `cls_positions` [B, K]."""
        # Only the [CLS] tokens are pooled, so only they go through the last layer.
        positions = jnp.zeros((input_ids.shape[0], 1), jnp.int32) if cls_positions is None else cls_positions
        hidden = self.albert(
            input_ids, attention_mask, token_type_ids, position_ids, segment_ids, deterministic, positions
        )  # [B, K, H]
        first = hidden[:, 0] if cls_positions is None else hidden
        pooled = self.dropout(self.albert.pool(first), deterministic=deterministic)  # [B, (K,) H]
        return {"logits": self.classifier(pooled).astype(jnp.float32)}


class AlbertForTokenClassification(_WithBackbone):
    def setup(self):
        self.albert = self._backbone(add_pooling_layer=False)
        self.dropout = self._dropout(self.config.classifier_dropout_prob)
        self.classifier = dense(self.config, self.config.num_labels, self.dtype)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        segment_ids=None,
        deterministic: bool = True,
    ) -> dict[str, Array]:
        """{"logits"}: [B, L, C]."""
        hidden = self.albert(
            input_ids, attention_mask, token_type_ids, position_ids, segment_ids, deterministic
        )
        hidden = self.dropout(hidden, deterministic=deterministic)
        return {"logits": self.classifier(hidden).astype(jnp.float32)}


class AlbertForQuestionAnswering(_WithBackbone):
    def setup(self):
        self.albert = self._backbone(add_pooling_layer=False)
        # Always (start, end), whatever num_labels says; a checkpoint of another width fails to load.
        self.qa_outputs = dense(self.config, 2, self.dtype)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        segment_ids=None,
        deterministic: bool = True,
    ) -> dict[str, Array]:
        """{"start_logits", "end_logits"}: [B, L] each."""
        hidden = self.albert(
            input_ids, attention_mask, token_type_ids, position_ids, segment_ids, deterministic
        )
        logits = self.qa_outputs(hidden).astype(jnp.float32)  # [B, L, 2]
        return {"start_logits": logits[..., 0], "end_logits": logits[..., 1]}


class AlbertForMultipleChoice(_WithBackbone):
    def setup(self):
        self.albert = self._backbone(add_pooling_layer=True)
        self.dropout = self._dropout(self.config.classifier_dropout_prob)
        self.classifier = dense(self.config, 1, self.dtype)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        segment_ids=None,
        deterministic: bool = True,
    ) -> dict[str, Array]:
        """Inputs [B, K, L] (K choices) -> {"logits"}: [B, K]."""
        batch, choices, length = input_ids.shape

        def flat(x):
            return None if x is None else x.reshape(batch * choices, length)

        first = self.albert(
            flat(input_ids),
            flat(attention_mask),
            flat(token_type_ids),
            flat(position_ids),
            flat(segment_ids),
            deterministic,
            output_positions=jnp.zeros((batch * choices, 1), jnp.int32),  # only [CLS] is pooled
        )[:, 0]
        pooled = self.dropout(self.albert.pool(first), deterministic=deterministic)  # [B*K, H]
        return {"logits": self.classifier(pooled).astype(jnp.float32).reshape(batch, choices)}


class AlbertSOPHead(nn.Module):
    config: AlbertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pooled: Array, deterministic: bool) -> Array:
        pooled = nn.Dropout(self.config.classifier_dropout_prob or 0.0)(pooled, deterministic=deterministic)
        return dense(self.config, self.config.num_labels, self.dtype, "classifier")(pooled)


class AlbertForPreTraining(_WithBackbone):
    def setup(self):
        self.albert = self._backbone(add_pooling_layer=True)
        self.predictions = AlbertMLMHead(self.config, self.dtype)
        self.sop_classifier = AlbertSOPHead(self.config, self.dtype)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        segment_ids=None,
        deterministic: bool = True,
    ) -> dict[str, Array]:
        """{"prediction_logits": [B, L, V], "sop_logits": [B, num_labels]}."""
        hidden = self.albert(
            input_ids, attention_mask, token_type_ids, position_ids, segment_ids, deterministic
        )
        prediction_logits = self.predictions.decode(self.predictions.transform(hidden), self.albert)
        sop_logits = self.sop_classifier(self.albert.pool(hidden[:, 0]), deterministic)
        return {"prediction_logits": prediction_logits, "sop_logits": sop_logits.astype(jnp.float32)}


# Task names accepted by from_pretrained(task=...), with the transformers architecture each corresponds to.
TASKS: dict[str, tuple[type[nn.Module], str]] = {
    "base": (AlbertBase, "AlbertModel"),
    "masked-lm": (AlbertForMaskedLM, "AlbertForMaskedLM"),
    "sequence-classification": (AlbertForSequenceClassification, "AlbertForSequenceClassification"),
    "token-classification": (AlbertForTokenClassification, "AlbertForTokenClassification"),
    "question-answering": (AlbertForQuestionAnswering, "AlbertForQuestionAnswering"),
    "multiple-choice": (AlbertForMultipleChoice, "AlbertForMultipleChoice"),
    "pretraining": (AlbertForPreTraining, "AlbertForPreTraining"),
}
TASK_ALIASES = {
    "fill-mask": "masked-lm",
    "mlm": "masked-lm",
    "classify": "sequence-classification",
    "text-classification": "sequence-classification",
    "ner": "token-classification",
    "qa": "question-answering",
    "model": "base",
}
ARCHITECTURE_TO_TASK = {arch: task for task, (_, arch) in TASKS.items()}
