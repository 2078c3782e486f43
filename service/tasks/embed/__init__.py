"""The embedding family: models read from sentence-transformers layouts, whose heads run inside the compiled
program so that only what is answered leaves the device.

    layout.py   the sentence-transformers layout reader (modules.json and each module's config)
    pooling.py  the dense head in JAX: Pooling, Dense and Normalize on packed rows (`embedding_fn`)
    dense.py    the `embed` task: prompts, tokenization, truncation, finishing; its registry entry
    schemas.py  the routes' requests and answers (TEI's /embed, OpenAI's /v1/embeddings, /similarity)
"""

from .dense import TASK, EmbedInput, EmbedParams, EmbedTask, cosine_similarities, finish_vector, l2_normalize
from .layout import POOLING_MODES, DenseLayer, EmbeddingConfig, EmbeddingConfigError, read_embedding_config
from .pooling import apply_head, embedding_fn, embedding_params, head_params, pool, prompt_lengths_for
from .schemas import (
    EmbedRequest,
    OpenAIEmbeddingsRequest,
    SimilarityRequest,
    encode_base64,
    openai_response,
)

__all__ = [
    "POOLING_MODES",
    "TASK",
    "DenseLayer",
    "EmbedInput",
    "EmbedParams",
    "EmbedRequest",
    "EmbedTask",
    "EmbeddingConfig",
    "EmbeddingConfigError",
    "OpenAIEmbeddingsRequest",
    "SimilarityRequest",
    "apply_head",
    "cosine_similarities",
    "embedding_fn",
    "embedding_params",
    "encode_base64",
    "finish_vector",
    "head_params",
    "l2_normalize",
    "openai_response",
    "pool",
    "prompt_lengths_for",
    "read_embedding_config",
]
