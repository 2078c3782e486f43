"""Comparing our answers with the transformers pipelines' answers.

Scores may differ by up to `atol` (float32 JAX vs PyTorch); everything else must be equal. Where two
reference candidates score within `tie` of each other their order is not meaningful, so a swap
between them is accepted; any other difference in order fails.
"""

from __future__ import annotations

import math
from typing import Any

ATOL = 1e-4


def _close(a: Any, b: Any, atol: float, path: str) -> None:
    if isinstance(b, dict):
        assert isinstance(a, dict), f"{path}: expected a dict, got {a!r}"
        assert set(a) == set(b), f"{path}: keys {sorted(a)} != reference {sorted(b)}"
        for key in b:
            _close(a[key], b[key], atol, f"{path}.{key}")
    elif isinstance(b, (list, tuple)):
        assert isinstance(a, (list, tuple)), f"{path}: expected a list, got {a!r}"
        assert len(a) == len(b), f"{path}: {len(a)} items != reference {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, atol, f"{path}[{i}]")
    elif isinstance(b, float) or (hasattr(b, "dtype") and "float" in str(b.dtype)):
        assert math.isclose(float(a), float(b), abs_tol=atol), f"{path}: {a} != reference {b} (atol {atol})"
    else:
        if hasattr(b, "item"):
            b = b.item()
        if hasattr(a, "item"):
            a = a.item()
        assert a == b, f"{path}: {a!r} != reference {b!r}"


def _reorder_ties(ours: list, ref: list, tie: float) -> list:
    """Reorder `ours` to follow `ref` inside groups of reference candidates whose scores are tied."""
    if not ours or not all(isinstance(x, dict) and "score" in x for x in ref):
        return ours
    result = list(ours)
    start = 0
    while start < len(ref):
        end = start + 1
        while end < len(ref) and abs(ref[end]["score"] - ref[end - 1]["score"]) <= tie:
            end += 1
        if end - start > 1:
            group = result[start:end]
            ordered = []
            for item in ref[start:end]:
                key = {k: v for k, v in item.items() if k != "score"}
                match = next((g for g in group if {k: v for k, v in g.items() if k != "score"} == key), None)
                if match is None:
                    return ours  # not a pure reordering: let the strict comparison report it
                group.remove(match)
                ordered.append(match)
            result[start:end] = ordered
        start = end
    return result


def assert_matches_pipeline(
    ours: Any, ref: Any, atol: float = ATOL, tie: float = 1e-5, path: str = "answer"
) -> None:
    """Assert that `ours` equals the pipeline's `ref`, scores within atol, ties in any order."""
    if isinstance(ref, list) and isinstance(ours, list) and len(ours) == len(ref):
        if all(isinstance(x, list) for x in ref):
            for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
                assert_matches_pipeline(a, b, atol, tie, f"{path}[{i}]")
            return
        ours = _reorder_ties(ours, ref, tie)
    _close(ours, ref, atol, path)
