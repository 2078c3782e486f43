"""Measured bucket run times, kept beside the compilation cache (one table per program set and code version),
so that a restart neither compiles nor times again."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)


def read_costs(costs_file: Path, key: str) -> dict[str, float]:
    if not costs_file.is_file():
        return {}
    try:
        found = json.loads(costs_file.read_text()).get(key, {})
        return found if isinstance(found, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}  # a damaged file only costs the measurement


_COSTS_LOCK = threading.Lock()


def write_costs(costs_file: Path, key: str, costs: dict[str, float]) -> None:
    with _COSTS_LOCK:
        try:
            costs_file.parent.mkdir(parents=True, exist_ok=True)
            try:
                table = json.loads(costs_file.read_text()) if costs_file.is_file() else {}
            except ValueError:
                table = {}
            table[key] = costs
            partial = costs_file.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(json.dumps(table, indent=1))
            partial.replace(costs_file)
        except OSError as exc:
            log.warning("could not save bucket costs to %s: %s", costs_file, exc)
