"""The baseline a user would otherwise write: FastAPI around the transformers 4.57 pipelines on PyTorch.

One request at a time (a lock around the pipelines: concurrent PyTorch calls on the same CPU only thrash),
same request and response shapes as albert-serve. Run: `python -m bench.baseline_server` with
BASELINE_MODELS='{"classify": "/path", ...}' and BASELINE_PORT.
"""

from __future__ import annotations

import json
import os
import threading

import uvicorn
from fastapi import FastAPI
from transformers import pipeline

PIPELINE_TASKS = {
    "classify": "text-classification",
    "fill-mask": "fill-mask",
    "qa": "question-answering",
    "ner": "token-classification",
}


def create_app(models: dict[str, str]) -> FastAPI:
    pipes = {
        e: pipeline(PIPELINE_TASKS[e], model=path, tokenizer=path, device="cpu") for e, path in models.items()
    }
    lock = threading.Lock()
    app = FastAPI()

    def run(endpoint: str, inputs, parameters: dict):
        with lock:
            pipe = pipes[endpoint]
            if endpoint == "qa":
                items = inputs if isinstance(inputs, list) else [inputs]
                answers = [pipe(question=i["question"], context=i["context"], **parameters) for i in items]
                return answers if isinstance(inputs, list) else answers[0]
            if endpoint == "classify":
                parameters = {"top_k": None, **parameters}
            if endpoint == "ner":
                parameters = {"aggregation_strategy": "simple", **parameters}
            result = pipe(inputs, **parameters)
        return _plain(result)

    @app.get("/ready")
    def ready():
        return {"ready": True}

    for endpoint in pipes:

        def handler(body: dict, endpoint=endpoint):  # sync: FastAPI runs it on its thread pool
            return run(endpoint, body["inputs"], body.get("parameters") or {})

        app.post("/" + endpoint)(handler)
    return app


def _plain(value):
    """numpy scalars (NER scores) -> Python numbers, as a JSON response needs."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "item"):
        return value.item()
    return value


if __name__ == "__main__":
    uvicorn.run(
        create_app(json.loads(os.environ["BASELINE_MODELS"])),
        host="127.0.0.1",
        port=int(os.environ.get("BASELINE_PORT", "8001")),
        log_level="warning",
    )
