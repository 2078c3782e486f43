"""Errors raised by model/: each names the file, key or value at fault."""

from __future__ import annotations

from pathlib import Path


class ConfigError(ValueError):
    """config.json is missing, unreadable, or describes an impossible model."""


class CheckpointError(ValueError):
    """A weights or tokenizer file is missing, corrupt, truncated or does not fit the model."""

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        key: str | None = None,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
    ):
        super().__init__(message)
        self.file = str(file) if file is not None else None
        self.key = key
        self.missing = list(missing or [])
        self.unexpected = list(unexpected or [])


class UnsafePickleError(CheckpointError):
    """A pytorch_model.bin pickle asks for something other than tensors and plain containers."""


class SourceNotFoundError(FileNotFoundError):
    """A model source is neither a local directory nor a reachable (or cached) hub repository."""
