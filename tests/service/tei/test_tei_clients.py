"""Clients written for TEI, unchanged, against a started server: huggingface_hub's InferenceClient pointed at
the base URL (it posts to `/`), the openai client on a long input, and plain httpx calls copied from TEI's
README examples."""

from __future__ import annotations

import warnings

import httpx
import numpy as np
import pytest

from tests.service.support import SMALL_GRID, ServiceProcess, settings_env
from tests.service.tei.tei_schema import assert_tei_schema, models_toml

LONG = " ".join(f"The {i}th quick brown fox jumps over the lazy dog near the river bank." for i in range(30))


@pytest.fixture(scope="module")
def tei_server(tei_repos, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tei-server")
    (tmp / "models.toml").write_text(models_toml(tei_repos))
    env = {
        "ALBERT_MODELS_FILE": str(tmp / "models.toml"),
        "ALBERT_COMPILATION_CACHE_DIR": "",
        "HF_HUB_OFFLINE": "1",
    }
    env.update(settings_env(SMALL_GRID))
    process = ServiceProcess(env, tmp / "server.log")
    try:
        process.wait_ready()
        yield process
    finally:
        process.kill()


def _encode(directory, texts, **kwargs) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SentenceTransformer(str(directory), device="cpu").encode(texts, **kwargs)


def test_inference_client_feature_extraction_with_truncate(tei_server, tei_repos):
    import requests
    from huggingface_hub import InferenceClient, configure_http_backend
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils._http import _default_backend_factory

    configure_http_backend(requests.Session)  # the suite runs with HF_HUB_OFFLINE; this only reaches loopback
    try:
        client = InferenceClient(model=tei_server.url, timeout=60)  # as for a TEI deployment
        vector = client.feature_extraction(LONG, truncate=True, normalize=True)
        reference = _encode(tei_repos["st"], [LONG], normalize_embeddings=True)  # it truncates
        np.testing.assert_allclose(vector.reshape(1, -1), reference, atol=1e-5)
        default = client.feature_extraction(LONG)  # --auto-truncate: cut as well
        np.testing.assert_allclose(default.reshape(1, -1), reference, atol=1e-5)
        with pytest.raises(HfHubHTTPError) as refused:
            client.feature_extraction(LONG, truncate=False)
        assert refused.value.response.status_code == 413
    finally:
        configure_http_backend(_default_backend_factory)


def test_openai_client_embeds_a_long_input(tei_server, tei_repos):
    import openai

    client = openai.OpenAI(base_url=tei_server.url + "/v1", api_key="unused")
    answer = client.embeddings.create(model="st", input=[LONG, "short"])
    reference = _encode(tei_repos["st"], [LONG, "short"], normalize_embeddings=True)
    np.testing.assert_allclose(np.asarray([d.embedding for d in answer.data]), reference, atol=1e-5)


def test_httpx_calls_from_teis_readme(tei_server):
    # The README's curl lines (huggingface/text-embeddings-inference README.md), as httpx calls.
    headers = {"Content-Type": "application/json"}
    with httpx.Client(base_url=tei_server.url, timeout=60) as http:
        embed = http.post("/embed", content='{"inputs":"What is Deep Learning?"}', headers=headers)
        rerank = http.post(
            "/rerank",
            content='{"query": "What is Deep Learning?", "texts": ["Deep Learning is not...", '
            '"Deep learning is..."]}',
            headers=headers,
        )
        predict = http.post("/predict", content='{"inputs":"I like you."}', headers=headers)
        info = http.get("/info")
    for response, schema in [
        (embed, "EmbedResponse"),
        (rerank, "RerankResponse"),
        (predict, "PredictResponse"),
        (info, "Info"),
    ]:
        assert response.status_code == 200, response.text
        assert_tei_schema(response.json(), schema)
