"""`from_pretrained`: a Hugging Face ALBERT repository -> a Flax module with its parameters filled."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import tokenizer as tokenizer_lib
from .config import AlbertConfig
from .errors import ConfigError
from .hub import resolve_source
from .modules import ARCHITECTURE_TO_TASK, TASK_ALIASES, TASKS
from .params import fill_params, flatten, unflatten
from .weights import read_checkpoint

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype: Any) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; expected one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    dtype = jnp.dtype(dtype)
    if dtype.name not in DTYPES:
        raise ValueError(f"dtype {dtype.name!r} is not supported; expected one of {', '.join(DTYPES)}")
    return dtype.type


def resolve_task(task: str | None, config: AlbertConfig, source: str) -> str:
    if task is not None:
        name = TASK_ALIASES.get(task, task)
        if name not in TASKS:
            choices = sorted({*TASKS, *TASK_ALIASES})
            raise ValueError(f"task {task!r} is not supported; expected one of {', '.join(choices)}")
        return name
    if not config.architectures:
        return "base"
    architecture = config.architectures[0]
    if architecture not in ARCHITECTURE_TO_TASK:
        raise ConfigError(
            f"{source}: architecture {architecture!r} is not an ALBERT model this package provides "
            f"({', '.join(ARCHITECTURE_TO_TASK)}); pass task= to choose a head"
        )
    return ARCHITECTURE_TO_TASK[architecture]


def dummy_inputs(task: str, batch: int = 1, length: int = 4) -> dict[str, jax.ShapeDtypeStruct]:
    shape = (batch, 2, length) if task == "multiple-choice" else (batch, length)
    spec = jax.ShapeDtypeStruct(shape, jnp.int32)
    return {"input_ids": spec, "attention_mask": spec, "token_type_ids": spec}


@dataclass
class PretrainedAlbert:
    """A loaded model: call it with numpy int arrays [B, L] to get numpy outputs named as transformers does."""

    config: AlbertConfig
    task: str
    module: Any  # a flax.linen Module from modules.TASKS
    params: dict
    dtype: Any
    directory: Path
    _jitted: dict = field(default_factory=dict, repr=False)

    def __call__(
        self, input_ids, attention_mask=None, token_type_ids=None, **inputs
    ) -> dict[str, np.ndarray]:
        inputs.update(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        inputs = {k: jnp.asarray(v, jnp.int32) for k, v in inputs.items() if v is not None}
        key = tuple(sorted(inputs))
        if key not in self._jitted:
            self._jitted[key] = jax.jit(partial(_apply, self.module))
        outputs = self._jitted[key](self.params, **inputs)
        return {name: np.asarray(value) for name, value in outputs.items()}

    def apply(self, *args, method=None, **kwargs):
        """flax `apply` with this model's parameters (for jitting custom serving functions)."""
        return self.module.apply({"params": self.params}, *args, method=method, **kwargs)


def _apply(module, params, **inputs):
    return module.apply({"params": params}, **inputs)


def init_params_shape(module, task: str) -> dict:
    """The abstract parameter tree of `module` (shapes and dtypes only; nothing is computed)."""
    specs = dummy_inputs(task)
    variables = jax.eval_shape(
        lambda: module.init(jax.random.key(0), **{k: jnp.zeros(v.shape, v.dtype) for k, v in specs.items()})
    )
    return variables["params"]


def cast_for_compute(params: dict, dtype) -> dict:
    """Matmul weights (kernels, embeddings) in the compute dtype; LayerNorm parameters and biases stay float32."""
    if dtype == jnp.float32:
        return jax.tree_util.tree_map(jnp.asarray, params)
    flat = flatten(params)
    return unflatten(
        {
            path: jnp.asarray(value, dtype if path[-1] in ("kernel", "embedding") else jnp.float32)
            for path, value in flat.items()
        }
    )


def from_pretrained(
    source: str | os.PathLike,
    task: str | None = None,
    dtype: Any = "float32",
    *,
    revision: str | None = None,
    scan_layers: bool = True,
) -> PretrainedAlbert:
    """Load an ALBERT checkpoint in Hugging Face layout (local directory or hub id).

    task: "masked-lm", "sequence-classification", "token-classification", "question-answering",
    "multiple-choice", "pretraining" or "base" (aliases: fill-mask, classify, ner, qa); by default the head
    named by config.json's `architectures`. dtype: compute dtype, "float32" (default), "bfloat16" or
    "float16"; LayerNorm and softmax always run in float32.
    """
    directory = resolve_source(source, revision=revision)
    config = AlbertConfig.from_json(directory / "config.json")
    task = resolve_task(task, config, str(directory))
    compute_dtype = resolve_dtype(dtype)
    module_cls, _ = TASKS[task]
    module = module_cls(config, dtype=compute_dtype, scan_layers=scan_layers)
    abstract = init_params_shape(module, task)
    checkpoint = read_checkpoint(directory)
    params = fill_params(
        abstract,
        checkpoint,
        tie_word_embeddings=config.tie_word_embeddings,
        absolute_positions=config.position_embedding_type == "absolute",
    )
    return PretrainedAlbert(
        config, task, module, cast_for_compute(params, compute_dtype), compute_dtype, directory
    )


def load_tokenizer(
    source: str | os.PathLike, *, revision: str | None = None
) -> tokenizer_lib.AlbertTokenizer:
    """The tokenizer of a local directory or hub repository."""
    return tokenizer_lib.load_tokenizer(resolve_source(source, revision=revision))
