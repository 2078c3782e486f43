"""The Open Inference Protocol v2 routes, through the client users call (`tritonclient.http`) against a real
uvicorn server, and through raw HTTP for the error bodies. Every answer is compared with the task endpoint's
answer for the same inputs on the same server: the protocol is a translation, not a second implementation.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import uvicorn

from service.app import create_app
from service.runtime import Runtime
from service.settings import Settings
from tests.service.support import SHALLOW, SMALL_GRID, free_port

tritonhttp = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

MAX_ITEMS = 8


def start_server(runtime: Runtime) -> SimpleNamespace:
    app = create_app(runtime.settings, runtime=runtime, start_runtime=False)
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, lifespan="off", log_config=None, access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    return SimpleNamespace(
        server=server, thread=thread, url=f"http://127.0.0.1:{port}", host=f"127.0.0.1:{port}"
    )


def stop_server(served: SimpleNamespace) -> None:
    served.server.should_exit = True
    served.thread.join(10)


@pytest.fixture(scope="module")
def oip(service_repos, make_repo, tmp_path_factory):
    encoder, _ = make_repo("base", seed=4, **SHALLOW)
    cross_encoder, _ = make_repo("sequence-classification", seed=5, labels=["LABEL_0"], **SHALLOW)
    nli, _ = make_repo(
        "sequence-classification", seed=6, labels=["contradiction", "neutral", "entailment"], **SHALLOW
    )
    models = {
        "sst": (service_repos["classify"][0], "classify"),
        "tagger": (service_repos["ner"][0], "ner"),
        "reader": (service_repos["qa"][0], "qa"),
        "mlm": (service_repos["fill-mask"][0], "fill-mask"),
        "encoder": (encoder, "embed"),
        "ranker": (cross_encoder, "rerank"),
        "nli": (nli, "zero-shot"),
    }
    models_file = tmp_path_factory.mktemp("oip") / "models.toml"
    models_file.write_text(
        "".join(
            f'[models.{name}]\nsource = "{path}"\ntask = "{task}"\n' for name, (path, task) in models.items()
        )
    )
    settings = Settings(models_file=str(models_file), max_list_items=MAX_ITEMS, **SMALL_GRID)
    runtime = Runtime(settings)
    runtime.start(background=False)
    assert not runtime.failed, runtime.failed
    served = start_server(runtime)
    served.runtime = runtime
    served.client = tritonhttp.InferenceServerClient(served.host)
    try:
        yield served
    finally:
        served.client.close()
        stop_server(served)
        runtime.stop()


def texts_input(name: str, texts: list[str], binary: bool = True):
    tensor = tritonhttp.InferInput(name, [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object), binary_data=binary)
    return tensor


def endpoint(oip, path: str, body: dict):
    response = httpx.post(oip.url + path, json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def assert_close(got, expected, path="answer"):
    """Same structure, same strings, floats within float32 rounding (a batch packed otherwise may differ
    in the last bits)."""
    if isinstance(expected, float):
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), path
    elif isinstance(expected, dict):
        assert set(got) == set(expected), path
        for key in expected:
            assert_close(got[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert len(got) == len(expected), path
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            assert_close(g, e, f"{path}[{i}]")
    else:
        assert got == expected, path


TEXTS = ["A delightful, moving film.", "The plot made no sense at all.", "Paris is in France."]


def test_server_health_and_metadata(oip):
    client = oip.client
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "albert-serve" and "binary_tensor_data" in meta["extensions"]
    assert client.is_model_ready("sst") and client.is_model_ready("sst", "1")
    assert not client.is_model_ready("sst", "2")

    classifier = client.get_model_metadata("sst")
    assert [i["name"] for i in classifier["inputs"]] == ["text", "text_pair"]
    labels = len(oip.runtime.models["sst"].labels)
    assert {o["name"]: o["shape"] for o in classifier["outputs"]} == {"scores": [-1, labels], "label": [-1]}
    dimension = len(endpoint(oip, "/embed", {"inputs": ["x"], "model": "encoder"})[0])
    encoder = client.get_model_metadata("encoder", "1")
    assert encoder["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, dimension]}]
    assert client.get_model_metadata("tagger")["outputs"][0]["name"] == "answer"
    with pytest.raises(InferenceServerException, match="no model is named"):
        client.get_model_metadata("nope")


@pytest.mark.parametrize("binary", [True, False])
def test_embed_equals_embed_endpoint(oip, binary):
    outputs = [tritonhttp.InferRequestedOutput("embedding", binary_data=binary)]
    result = oip.client.infer("encoder", [texts_input("text", TEXTS, binary)], outputs=outputs)
    got = result.as_numpy("embedding")
    assert got.dtype == np.float32 and got.shape[0] == len(TEXTS)
    expected = np.asarray(endpoint(oip, "/embed", {"inputs": TEXTS, "model": "encoder"}), dtype=np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_classify_scores_in_label_order_and_best_label(oip):
    pairs = ["It was great.", "Nothing works.", "France is in Europe."]
    # No outputs named: tritonclient asks for every output in binary.
    result = oip.client.infer("sst", [texts_input("text", TEXTS), texts_input("text_pair", pairs)])
    scores, best = result.as_numpy("scores"), result.as_numpy("label")
    labels = oip.runtime.models["sst"].labels
    expected = endpoint(
        oip,
        "/classify",
        {"inputs": [{"text": t, "text_pair": p} for t, p in zip(TEXTS, pairs, strict=True)], "model": "sst"},
    )
    for row, ranked in enumerate(expected):
        by_label = {entry["label"]: entry["score"] for entry in ranked}
        np.testing.assert_allclose(scores[row], [by_label[label] for label in labels], rtol=1e-5, atol=1e-6)
        assert best[row].decode() == ranked[0]["label"]


def test_other_tasks_answer_the_endpoint_json(oip):
    ner = oip.client.infer(
        "tagger", [texts_input("text", TEXTS)], parameters={"aggregation_strategy": "simple"}
    )
    expected = endpoint(
        oip, "/ner", {"inputs": TEXTS, "model": "tagger", "parameters": {"aggregation_strategy": "simple"}}
    )
    assert_close([json.loads(x) for x in ner.as_numpy("answer")], expected)

    questions = [
        {"question": "Where is Paris?", "context": "Paris is in France."},
        {"question": "What moved me?", "context": "A delightful, moving film."},
    ]
    qa = oip.client.infer(
        "reader",
        [texts_input("text", [json.dumps(q) for q in questions], binary=False)],
        outputs=[tritonhttp.InferRequestedOutput("answer", binary_data=False)],
    )
    expected = endpoint(oip, "/qa", {"inputs": questions, "model": "reader"})
    assert_close([json.loads(x) for x in qa.as_numpy("answer")], expected)

    labels = {"candidate_labels": ["cinema", "geography", "food"], "multi_label": True}
    zero_shot = oip.client.infer("nli", [texts_input("text", TEXTS)], parameters=labels)
    expected = endpoint(oip, "/zero-shot", {"inputs": TEXTS, "model": "nli", "parameters": labels})
    assert_close([json.loads(x) for x in zero_shot.as_numpy("answer")], expected)

    masked = ["Paris is the [MASK] of France.", "I [MASK] this film."]
    fill = oip.client.infer("mlm", [texts_input("text", masked)], parameters={"top_k": 3})
    expected = endpoint(oip, "/fill-mask", {"inputs": masked, "model": "mlm", "parameters": {"top_k": 3}})
    assert_close([json.loads(x) for x in fill.as_numpy("answer")], expected)


def test_rerank_each_element_is_a_rerank_body(oip):
    bodies = [
        {"query": "capital of France", "texts": ["Paris is in France.", "Berlin is in Germany.", "Rome."]},
        {"query": "a moving film", "texts": ["A delightful, moving film.", "The plot made no sense."]},
    ]
    result = oip.client.infer(
        "ranker", [texts_input("text", [json.dumps(b) for b in bodies])], parameters={"return_text": True}
    )
    got = [json.loads(x) for x in result.as_numpy("answer")]
    for answer, body in zip(got, bodies, strict=True):
        assert_close(answer, endpoint(oip, "/rerank", {**body, "model": "ranker", "return_text": True}))
    response = infer_raw(oip, "ranker", {"inputs": [tensor(data=[json.dumps({"query": "q", "text": "t"})])]})
    assert response.status_code == 400 and "JSON object with query and texts" in response.json()["error"]


def infer_raw(oip, name: str, body: dict | bytes, headers: dict | None = None, path: str | None = None):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    url = oip.url + (path or f"/v2/models/{name}/infer")
    return httpx.post(url, content=content, headers=headers or {}, timeout=60)


def tensor(name="text", datatype="BYTES", shape=None, data=None):
    data = ["a text"] if data is None else data
    return {
        "name": name,
        "datatype": datatype,
        "shape": [len(data)] if shape is None else shape,
        "data": data,
    }


@pytest.mark.parametrize(
    ("name", "body", "status", "message"),
    [
        ("nope", {"inputs": [tensor()]}, 404, "no model is named 'nope'"),
        ("encoder", {"inputs": [tensor(name="txt")]}, 400, "unknown input 'txt'"),
        ("encoder", {"inputs": [tensor(name="text_pair")]}, 400, "unknown input 'text_pair'"),
        ("sst", {"inputs": [tensor(datatype="FP32")]}, 400, "must have datatype BYTES, got 'FP32'"),
        ("sst", {"inputs": [tensor(shape=[1, 2])]}, 400, "must have shape [n]"),
        ("sst", {"inputs": [tensor(shape=[2])]}, 400, "has shape [2] but 1 elements"),
        ("sst", {"inputs": [tensor(data=[3])]}, 400, "must be a string"),
        ("sst", {"inputs": [tensor(data=["   "])]}, 400, "must not be empty"),
        ("sst", {"inputs": []}, 400, "non-empty 'inputs'"),
        ("sst", {"inputs": [tensor(data=["x"] * (MAX_ITEMS + 1))]}, 413, f"the limit is {MAX_ITEMS}"),
        ("sst", {"inputs": [tensor()], "outputs": [{"name": "logits"}]}, 400, "unknown output 'logits'"),
        ("sst", {"inputs": [tensor()], "parameters": {"top_k": 1}}, 400, "top_k is not taken"),
        ("reader", {"inputs": [tensor(data=["not json"])]}, 400, "JSON input"),
    ],
)
def test_errors_in_the_protocol_body(oip, name, body, status, message):
    response = infer_raw(oip, name, body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_unknown_version_and_bad_json(oip):
    response = infer_raw(oip, "sst", {"inputs": [tensor()]}, path="/v2/models/sst/versions/7/infer")
    assert response.status_code == 404 and "no version '7'" in response.json()["error"]
    response = infer_raw(oip, "sst", b"{not json")
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]
    assert httpx.get(oip.url + "/v2/models/nope/ready").status_code == 404


def binary_request(elements: list[bytes]) -> tuple[bytes, dict]:
    blob = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "text",
                    "datatype": "BYTES",
                    "shape": [len(elements)],
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        }
    ).encode()
    return header + blob, {"Inference-Header-Content-Length": str(len(header))}


def test_binary_input_checks(oip):
    body, headers = binary_request([b"fine", b"caf\xe9"])  # Latin-1, not UTF-8
    response = infer_raw(oip, "sst", body, headers)
    assert (
        response.status_code == 400 and "element 1 is not valid UTF-8: byte 0xe9" in response.json()["error"]
    )
    body, headers = binary_request(["Deux mots café".encode()])
    response = infer_raw(oip, "sst", body[:-3], headers)  # the body ends before the tensor does
    assert response.status_code == 400 and "binary_data_size 19 does not fit" in response.json()["error"]
    lying = body.replace(struct.pack("<I", 15), struct.pack("<I", 40))  # an element longer than its tensor
    response = infer_raw(oip, "sst", lying, headers)
    assert response.status_code == 400 and "declares 40 bytes but only 15 remain" in response.json()["error"]
    response = infer_raw(oip, "sst", body, {"Inference-Header-Content-Length": str(len(body) + 1)})
    assert response.status_code == 400 and "Inference-Header-Content-Length" in response.json()["error"]
    # Binary in, JSON out when no output asks for binary.
    response = infer_raw(oip, "sst", body, headers)
    assert response.status_code == 200, response.text
    assert [o["name"] for o in response.json()["outputs"]] == ["scores", "label"]
