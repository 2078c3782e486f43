"""TEI's own OpenAPI document (tests/service/tei/openapi.json: docs/openapi.json of
huggingface/text-embeddings-inference, main at 0d124dc, July 2026), to validate answers against; and the
models file of the TEI tests' service."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema

OPENAPI = json.loads((Path(__file__).parent / "openapi.json").read_text())


def _json_schema(node):
    """OpenAPI 3.0's `nullable: true` as JSON Schema's `type: [t, "null"]` (jsonschema knows only the latter)."""
    if isinstance(node, dict):
        node = {k: _json_schema(v) for k, v in node.items()}
        if node.pop("nullable", False) and "type" in node:
            node["type"] = [node["type"], "null"]
        return node
    if isinstance(node, list):
        return [_json_schema(v) for v in node]
    return node


_COMPONENTS = _json_schema(copy.deepcopy(OPENAPI["components"]))


def assert_tei_schema(value, name: str) -> None:
    """`value` is valid against TEI's components.schemas[name]."""
    schema = {"$ref": f"#/components/schemas/{name}", "components": _COMPONENTS}
    jsonschema.validate(value, schema)


LABELS = ["contradiction", "neutral", "entailment"]


def models_toml(repos) -> str:
    return "\n".join(
        [
            f'[models.st]\nsource = "{repos["st"]}"\ndefault = true',
            f'[models.nli]\nsource = "{repos["nli"]}"\ntask = "classify"\ndefault = true',
            f'[models.one]\nsource = "{repos["one"]}"\ntask = "classify"',
            f'[models.cross]\nsource = "{repos["one"]}"\ntask = "rerank"',
            "",
        ]
    )
