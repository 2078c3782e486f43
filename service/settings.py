"""Every setting of the service, in one class: each is a `--flag` and an `ALBERT_*` environment variable.

Precedence: command-line flag, then environment variable, then the default below. The field's
description is its documentation (it is what `albert-serve --help` prints and what the README table lists).
"""

from __future__ import annotations

import argparse
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENDPOINTS = ("classify", "fill-mask", "qa", "ner")
# endpoint -> the setting that names its model source
MODEL_FIELDS = {
    "classify": "classify_model",
    "fill-mask": "fill_mask_model",
    "qa": "qa_model",
    "ner": "ner_model",
}

# Public checkpoints a user would deploy by default (the fill-mask default is fixed by the contract).
DEFAULT_MODELS = {
    "classify": "textattack/albert-base-v2-SST-2",
    "fill-mask": "albert/albert-base-v2",
    "qa": "twmkn9/albert-base-v2-squad2",
    "ner": "ArBert/albert-base-v2-finetuned-ner",
}


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "albert-serve" / "jax")


IntList = Annotated[list[int], NoDecode]
StrList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALBERT_", extra="ignore", validate_default=True)

    # --- HTTP -------------------------------------------------------------------------------------------
    host: str = Field("0.0.0.0", description="Address to listen on.")
    port: int = Field(8000, ge=1, le=65535, description="Port to listen on.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")

    # --- Models -----------------------------------------------------------------------------------------
    models_file: str = Field(
        "",
        description="TOML file of named models, one [models.<name>] table each (source, task, default, dtype).",
    )
    models: str = Field(
        "", description="Named models, short form: name=source,name=source (task from the checkpoint)."
    )
    classify_model: str | None = Field(
        None,
        description="Adds the model 'classify' (default of /classify): local directory or hub id; empty "
        "disables. With no model configured in any way, each endpoint serves its public default checkpoint.",
    )
    fill_mask_model: str | None = Field(
        None, description="Adds the model 'fill-mask' (default of /fill-mask): local directory or hub id."
    )
    qa_model: str | None = Field(
        None, description="Adds the model 'qa' (default of /qa): local directory or hub id."
    )
    ner_model: str | None = Field(
        None, description="Adds the model 'ner' (default of /ner): local directory or hub id."
    )
    strict_readiness: bool = Field(
        True,
        description="/ready is 200 only when every configured model is ready; false: when every model that did "
        "not fail is ready (and at least one is).",
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32",
        description="Compute dtype. LayerNorm and softmax always run in float32. auto: bfloat16 where the hardware "
        "runs it natively (a CPU with AVX512-BF16 or AMX, a GPU or TPU), float32 elsewhere.",
    )

    model_repository: str = Field(
        "",
        description="Directory of checkpoints, one per sub-directory (the model's name), each with an optional "
        "albert-serve.toml (task, default, dtype, pooling). Mode none: all served from start-up.",
    )
    model_control_mode: Literal["none", "explicit"] = Field(
        "none",
        description="explicit: models of the model repository load and unload at runtime (POST "
        "/v2/repository/models/<name>/load, /unload); none: refused.",
    )

    # --- Compilation ------------------------------------------------------------------------------------
    seq_buckets: IntList = Field(
        default_factory=list,
        description="Row lengths compiled for single-row batches (comma-separated); empty: a default grid "
        "up to the model's maximum length.",
    )
    batch_seq_buckets: IntList = Field(
        default_factory=list,
        description="Row lengths compiled for multi-row batches (comma-separated); empty: 32,64,128,256,512 "
        "within the model's maximum.",
    )
    batch_buckets: IntList = Field(
        default_factory=lambda: [1, 2, 4, 6, 8, 12, 16],
        description="Numbers of rows per batch compiled (comma-separated). Short sequences are packed "
        "several to a row.",
    )
    max_batch_tokens: int = Field(
        2048,
        ge=16,
        description="Most tokens (rows x row length) in one forward pass; bounds the bucket grid.",
    )
    compilation_cache_dir: str = Field(
        default_factory=_default_cache_dir,
        description="JAX persistent compilation cache directory (reused across restarts); empty disables.",
    )

    # --- Batching and limits ----------------------------------------------------------------------------
    max_batch_sequences: int = Field(256, ge=1, description="Most sequences in one forward pass.")
    max_wait_ms: float = Field(
        2.0,
        ge=0,
        description="Longest a batch waits for requests of its endpoint still being tokenized; never paid by "
        "an idle service or a lone client.",
    )
    max_queue_sequences: int = Field(
        4096, ge=1, description="Sequences allowed to wait for the model; beyond it requests get 429."
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="Default per-request deadline (504 past it); a request may ask for less."
    )
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body accepted (413 beyond).")
    max_list_items: int = Field(64, ge=1, description="Most inputs in one request's list (413 beyond).")
    max_top_k: int = Field(1000, ge=1, description="Largest top_k accepted.")
    max_targets: int = Field(100, ge=1, description="Most fill-mask targets accepted.")
    # text-embeddings-inference's two request limits, with its defaults.
    auto_truncate: bool = Field(
        True,
        description="Cut over-long inputs to the model's length on /embed, /embed_all, /predict, /rerank, "
        "/similarity and /v1/embeddings when a request does not say (truncate: false makes them a 413).",
    )
    max_client_batch_size: int = Field(
        32, ge=1, description="Most inputs in one request to a TEI route (422 beyond), as TEI's flag."
    )

    # --- Security and lifecycle -------------------------------------------------------------------------
    api_keys: StrList = Field(
        default_factory=list,
        description="API keys (comma-separated); when set, task endpoints need 'Authorization: Bearer <key>'.",
    )
    shutdown_timeout_s: float = Field(
        30.0, gt=0, description="On SIGTERM, how long accepted requests may take before the process exits."
    )

    @field_validator("seq_buckets", "batch_seq_buckets", "batch_buckets", mode="before")
    @classmethod
    def _int_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [int(v) for v in value.replace(" ", "").split(",") if v]
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _str_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("seq_buckets", "batch_seq_buckets", "batch_buckets")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(v < 1 for v in value):
            raise ValueError(f"bucket sizes must be positive, got {value}")
        return sorted(set(value))

    @model_validator(mode="after")
    def _some_batch(self) -> Settings:
        if not self.batch_buckets:
            raise ValueError("batch_buckets must not be empty")
        return self

    @staticmethod
    def env_name(field: str) -> str:
        return "ALBERT_" + field.upper()


def model_env_var(endpoint: str) -> str:
    """The environment variable naming `endpoint`'s model source, e.g. ALBERT_QA_MODEL."""
    return Settings.env_name(MODEL_FIELDS[endpoint])


def _default_text(field) -> str:
    value = field.default_factory() if field.default_factory is not None else field.default
    if value is None:
        return "unset"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "empty"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if value != "" else "empty"


def _choices(annotation) -> tuple | None:
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if annotation is bool:
        return ("true", "false")
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="albert-serve",
        description="Serve ALBERT models over HTTP, any number by name (see --models-file). Every flag can also be "
        "set with the ALBERT_* environment variable named after it; a flag wins over its variable.",
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        choices = _choices(field.annotation)
        help_text = field.description
        if choices:
            help_text += f" Choices: {', '.join(map(str, choices))}."
        help_text += f" Default: {_default_text(field)}. [env {Settings.env_name(name)}]"
        # %% : argparse formats help strings with %-formatting.
        literal = typing.get_origin(field.annotation) is Literal
        parser.add_argument(
            flag,
            dest=name,
            default=argparse.SUPPRESS,
            choices=choices if literal else None,  # argparse refuses anything else, naming the choices
            help=help_text.replace("%", "%%"),
        )
    return parser


def load_settings(argv: list[str] | None = None) -> Settings:
    """Settings from flags (highest precedence), then ALBERT_* variables, then defaults."""
    args = vars(build_parser().parse_args(argv))
    return Settings(**args)
