"""Resolving a model source (a local directory or a Hugging Face hub id) to a local directory.

Hub repositories are fetched once into the usual Hugging Face cache (HF_HOME / HF_HUB_CACHE) and only the
files a model needs: config, tokenizer, and one weights format. `HF_HUB_OFFLINE=1` uses the cache only.
Without a reachable hub, a cached copy is used; with neither, the error says so instead of hanging.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from .errors import SourceNotFoundError
from .weights import FLAX_MSGPACK, SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# A failing hub should answer in seconds, not the library's default of minutes of retries.
os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")


def resolve_source(source: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A local directory as-is; otherwise download (or find in the cache) the hub repository `source`."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise SourceNotFoundError(f"{text}: is a file; a model source must be a directory or a hub id")
    if text.startswith((".", "/", "~")) or os.sep in text.replace("/", "") or not _REPO_ID.match(text):
        raise SourceNotFoundError(f"{text}: no such directory, and not a valid hub repository id")
    return _from_hub(text, revision)


def _weights_patterns(files: set[str]) -> list[str]:
    """The one weights format to fetch, in the order from_pretrained prefers them."""
    if SAFETENSORS in files:
        return [SAFETENSORS]
    if SAFETENSORS_INDEX in files:
        return [SAFETENSORS_INDEX, "model-*.safetensors"]
    if TORCH_BIN in files:
        return [TORCH_BIN]
    if TORCH_BIN_INDEX in files:
        return [TORCH_BIN_INDEX, "pytorch_model-*.bin"]
    if FLAX_MSGPACK in files:
        return [FLAX_MSGPACK]
    return []


def _from_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

    base = ["config.json", *TOKENIZER_FILES]
    # Why the hub could not be used, in one line: the client's own exceptions nest several layers deep
    # (MaxRetryError inside ConnectionError ...), and their text is kept for debug logs only.
    hub_problem = None
    if not HF_HUB_OFFLINE:
        try:
            files = set(HfApi().list_repo_files(repo_id, revision=revision))
        except Exception as exc:  # network errors, 404s and auth errors all arrive as different types
            hub_problem = _hub_problem(exc)
            log.debug("hub lookup of %s failed: %r", repo_id, exc)
        else:
            patterns = base + _weights_patterns(files)
            try:
                return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
            except Exception as exc:
                hub_problem = f"download failed: {_hub_problem(exc)}"
                log.debug("download of %s failed: %r", repo_id, exc)
    try:
        path = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=[*base, "*.safetensors", "*.index.json", "*.bin", "*.msgpack"],
                local_files_only=True,
            )
        )
    except Exception as exc:
        mode = (
            "HF_HUB_OFFLINE is set"
            if HF_HUB_OFFLINE
            else f"the Hugging Face Hub could not be reached ({hub_problem})"
        )
        raise SourceNotFoundError(
            f"{repo_id}: {mode} and the repository is not in the local cache ({HF_HUB_CACHE}); "
            "download it once with network access, or give a local directory in Hugging Face layout"
        ) from exc
    if hub_problem is not None:
        log.warning(
            "%s: the Hugging Face Hub could not be reached (%s); using the cached copy", repo_id, hub_problem
        )
    return path


def _hub_problem(exc: Exception) -> str:
    """A short reason: the HTTP status where there is one, else the kind of error."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status is not None:
        return f"HTTP {status}"
    if isinstance(exc, OSError) or "Connection" in type(exc).__name__:
        return f"cannot connect ({type(exc).__name__})"
    return type(exc).__name__
