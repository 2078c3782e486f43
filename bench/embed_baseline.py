"""The embedding baseline a user would otherwise write: FastAPI around `SentenceTransformer.encode`.

One request at a time (a lock around the model: concurrent PyTorch calls on the same CPU only thrash), with
text-embeddings-inference's body, `{"inputs": str | list[str], "normalize": bool}`, and its answer, one vector
per input (a single input included). Run: `python -m bench.embed_baseline` with BASELINE_MODEL=/path (a
sentence-transformers directory) and BASELINE_PORT.
"""

from __future__ import annotations

import os
import threading

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from sentence_transformers import SentenceTransformer


class EmbedRequest(BaseModel):
    inputs: str | list[str]
    normalize: bool = True


def create_app(path: str) -> FastAPI:
    model = SentenceTransformer(path, device="cpu")
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/ready")
    def ready():
        return {"ready": True}

    @app.post("/embed")
    def embed(body: EmbedRequest):  # sync: FastAPI runs it on its thread pool
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        with lock:
            return model.encode(texts, normalize_embeddings=body.normalize).tolist()

    return app


if __name__ == "__main__":
    uvicorn.run(
        create_app(os.environ["BASELINE_MODEL"]),
        host="127.0.0.1",
        port=int(os.environ.get("BASELINE_PORT", "8001")),
        log_level="warning",
    )
