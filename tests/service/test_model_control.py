"""Runtime model control (Triton's model repository extension) through `tritonclient.http` against a real
uvicorn server in explicit mode with an API key: index, load, reload, unload, the path checks, a failing
load, and loads and unloads while other clients keep calling (none of their requests may fail).
"""

from __future__ import annotations

import gc
import json
import shutil
import threading
import time
import weakref
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.engine import program_sets
from service.models import ConfigError
from service.repository import ControlRefused, repository_path
from service.runtime import Runtime
from service.settings import Settings
from tests.service.support import SHALLOW, SMALL_GRID
from tests.service.test_oip import start_server, stop_server, texts_input

tritonhttp = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

KEY = "control-key"


def auth() -> dict:
    """A fresh header dict each call: tritonclient adds its own headers to the dict it is given."""
    return {"Authorization": f"Bearer {KEY}"}


TEXTS = ["A delightful, moving film.", "The plot made no sense at all."]


@pytest.fixture(scope="module")
def repository(tmp_path_factory, service_repos, make_repo):
    root = tmp_path_factory.mktemp("repository")
    classifier = service_repos["classify"][0]
    shutil.copytree(classifier, root / "sst2")
    shutil.copytree(classifier, root / "sst3")  # a second classifier of the same shape
    wide, _ = make_repo("sequence-classification", seed=7, hidden_size=48, num_attention_heads=4, **SHALLOW)
    shutil.copytree(wide, root / "wide")  # a backbone shape nothing else has
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text("{not json")
    (root / "broken" / "albert-serve.toml").write_text('task = "classify"\n')
    shutil.copytree(service_repos["ner"][0], root / "tagger2")
    (root / "tagger2" / "albert-serve.toml").write_text("default = true\n")  # the configured `ner` is default
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(classifier, outside / "model")
    (root / "escape").symlink_to(outside / "model")
    return root


@pytest.fixture(scope="module")
def control(repository, service_repos):
    settings = Settings(
        ner_model=str(service_repos["ner"][0]),
        classify_model="",
        fill_mask_model="",
        qa_model="",
        model_repository=str(repository),
        model_control_mode="explicit",
        api_keys=[KEY],
        **SMALL_GRID,
    )
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


def index(control) -> dict[str, dict]:
    return {row["name"]: row for row in control.client.get_model_repository_index(headers=auth())}


def classify_oip(control, name: str) -> np.ndarray:
    result = control.client.infer(name, [texts_input("text", TEXTS)], headers=auth())
    return result.as_numpy("scores")


def test_routes_need_the_key(control):
    for path in [
        "/v2/repository/index",
        "/v2/repository/models/sst2/load",
        "/v2/repository/models/sst2/unload",
        "/v2/models/ner/infer",
    ]:
        response = httpx.post(control.url + path, timeout=30)
        assert response.status_code == 401, (path, response.text)
        assert "API key" in response.json()["error"]


def test_load_serves_everywhere_and_unload_removes(control, pipelines):
    client = control.client
    assert index(control)["sst2"]["state"] == "UNAVAILABLE"
    with pytest.raises(InferenceServerException, match="no model is named 'sst2'"):
        client.get_model_metadata("sst2", headers=auth())

    client.load_model("sst2", headers=auth())
    assert client.is_model_ready("sst2")
    assert index(control)["sst2"] == {"name": "sst2", "state": "READY", "reason": "", "version": "1"}
    # Served like a configured model: its answers are the transformers pipeline's on the same checkpoint.
    expected = pipelines["classify"](TEXTS, top_k=None)
    labels = control.runtime.models["sst2"].labels
    scores = classify_oip(control, "sst2")
    for row, ranked in enumerate(expected):
        by_label = {entry["label"]: entry["score"] for entry in ranked}
        np.testing.assert_allclose(scores[row], [by_label[label] for label in labels], atol=1e-4)
    answer = httpx.post(
        control.url + "/classify", json={"inputs": TEXTS[0], "model": "sst2"}, headers=auth(), timeout=30
    )
    assert answer.status_code == 200, answer.text
    models = httpx.get(control.url + "/models").json()["models"]
    assert {"name": "sst2", "task": "classify", "state": "ready"}.items() <= next(
        m for m in models if m["name"] == "sst2"
    ).items()
    assert httpx.get(control.url + "/info").json()["models"]["sst2"]["labels"] == labels
    metrics = httpx.get(control.url + "/metrics").text
    assert 'albert_model_state{model="sst2",state="ready",task="classify"} 1.0' in metrics
    assert 'albert_model_control_total{operation="load",outcome="ok"}' in metrics

    wait_for_grid(control, "sst2")
    runner = weakref.ref(control.runtime.models["sst2"].runner)
    client.unload_model("sst2", headers=auth())
    gc.collect()
    assert runner() is None, "the unloaded model's runner (its weights) is still referenced"
    assert index(control)["sst2"]["state"] == "UNAVAILABLE"
    assert index(control)["sst2"]["reason"] == "unloaded"
    response = httpx.post(
        control.url + "/v2/models/sst2/infer",
        json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}]},
        headers=auth(),
        timeout=30,
    )
    assert response.status_code == 404 and "no model is named 'sst2'" in response.json()["error"]
    assert "sst2" not in {m["name"] for m in httpx.get(control.url + "/models").json()["models"]}
    assert 'albert_model_state{model="sst2"' not in httpx.get(control.url + "/metrics").text
    assert "sst2" not in control.runtime.batcher.runners and "sst2" not in control.runtime.tasks


def wait_for_grid(control, name: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        entry = httpx.get(control.url + f"/models/{name}", timeout=30).json()
        if entry["grid"]["complete"]:
            return
        assert time.monotonic() < deadline, entry
        time.sleep(0.1)


def test_second_model_of_a_served_shape_compiles_nothing(control):
    client = control.client
    client.load_model("sst2", headers=auth())
    wait_for_grid(control, "sst2")  # a loaded model's grid completes in the background, as at start-up
    before = sum(s.compiles for s in program_sets())
    client.load_model("sst3", headers=auth())
    assert sum(s.compiles for s in program_sets()) == before
    np.testing.assert_allclose(classify_oip(control, "sst3"), classify_oip(control, "sst2"), atol=1e-6)
    client.unload_model("sst3", headers=auth())


@pytest.mark.parametrize(
    ("name", "status", "message"),
    [
        ("%2E%2E", 400, "not 1-64 characters"),  # ".." (clients resolve a literal one)
        ("%2Fetc", 404, "Not Found"),  # "/etc": no route takes a name with a slash
        ("escape", 400, "outside the model repository"),
        ("a%20b", 400, "not 1-64 characters"),
        ("missing", 404, "has no model directory 'missing'"),
        ("ner", 404, "has no model directory 'ner'"),  # configured, not in the repository
    ],
)
def test_names_outside_the_repository_are_refused(control, name, status, message):
    response = httpx.post(control.url + f"/v2/repository/models/{name}/load", headers=auth(), timeout=30)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_absolute_and_parent_paths_are_refused_before_the_filesystem(control):
    for name in ["/etc", "..", ".", "../sst2", "sst2/../.."]:
        with pytest.raises(ControlRefused, match="not 1-64 characters"):
            repository_path(control.runtime.settings, name)


def test_failing_load_is_reported_and_the_server_keeps_serving(control):
    with pytest.raises(InferenceServerException, match="failed to load"):
        control.client.load_model("broken", headers=auth())
    row = index(control)["broken"]
    assert row["state"] == "UNAVAILABLE" and "config.json" in row["reason"]
    assert "broken" not in control.runtime.models
    with pytest.raises(InferenceServerException, match="'ner' is already the default of task ner"):
        control.client.load_model("tagger2", headers=auth())
    assert "tagger2" not in control.runtime.models and index(control)["tagger2"]["state"] == "UNAVAILABLE"
    response = httpx.post(control.url + "/ner", json={"inputs": "Paris is nice."}, headers=auth(), timeout=30)
    assert response.status_code == 200, response.text
    assert httpx.get(control.url + "/v2/health/ready").status_code == 200


def test_model_control_off_without_explicit_mode():
    app = create_app(Settings(compilation_cache_dir=""), start_runtime=False)
    with TestClient(app) as client:
        response = client.post("/v2/repository/models/x/load")
        assert response.status_code == 400 and "no model repository" in response.json()["error"]
        assert client.post("/v2/repository/index").json() == []


def test_load_reload_unload_under_load(control):
    """Clients call the configured model and the one being changed while it loads (a new shape), reloads and
    unloads: every request on the other model succeeds; each on the changing one is answered or refused
    cleanly (404 before it exists and after it goes, never a 5xx or a dropped request)."""
    client = control.client
    stop = threading.Event()
    outcomes: dict[str, Counter] = {"ner": Counter(), "wide": Counter()}
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": TEXTS}]}

    def hammer(kind: str) -> None:
        with httpx.Client(base_url=control.url, headers=auth(), timeout=60) as http:
            while not stop.is_set():
                if kind == "ner":
                    response = http.post("/ner", json={"inputs": TEXTS})
                else:
                    response = http.post("/v2/models/wide/infer", json=body)
                outcomes[kind][response.status_code] += 1

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(hammer, kind) for kind in ("ner", "ner", "wide", "wide")]
        time.sleep(0.3)
        client.load_model("wide", headers=auth())
        time.sleep(0.5)
        client.load_model("wide", headers=auth())  # reload: swapped with no failed request
        time.sleep(0.5)
        client.unload_model("wide", headers=auth())
        time.sleep(0.3)
        stop.set()
        for future in futures:
            future.result()
    assert set(outcomes["ner"]) == {200}, outcomes
    assert set(outcomes["wide"]) <= {200, 404}, outcomes
    assert outcomes["wide"][200] > 0 and outcomes["wide"][404] > 0, outcomes
    assert json.loads(json.dumps(index(control)["wide"]))["state"] == "UNAVAILABLE"


def test_mode_none_serves_the_whole_repository_from_start_up(repository):
    from service.models import configured_models

    settings = Settings(model_repository=str(repository), compilation_cache_dir="")
    with pytest.raises(ControlRefused, match="outside the model repository"):  # the symlink out is refused
        configured_models(settings)
    (repository / "escape").rename(repository.parent / f"{repository.name}-escape-link")
    try:
        specs = {spec.name: spec for spec in configured_models(settings)}
    finally:
        (repository.parent / f"{repository.name}-escape-link").rename(repository / "escape")
    # No public default checkpoint is added: the repository is the configuration.
    assert set(specs) == {"sst2", "sst3", "wide", "broken", "tagger2"}
    assert specs["sst2"].task == "classify" and specs["sst2"].source == str((repository / "sst2").resolve())
    explicit = Settings(
        model_repository=str(repository), model_control_mode="explicit", compilation_cache_dir=""
    )
    assert configured_models(explicit) == []
    missing = Settings(model_repository=str(repository / "nowhere"), model_control_mode="explicit")
    with pytest.raises(ConfigError, match="is not a directory"):
        configured_models(missing)


def test_loads_and_unloads_racing_from_many_clients(control):
    """Loads and unloads of one name from many clients at once: each is done whole, one after the other (a
    load 200; an unload 200, or 404 when the name is not loaded at its turn); the end state is consistent."""

    def churn(seed: int) -> list[int]:
        statuses = []
        with httpx.Client(base_url=control.url, headers=auth(), timeout=120) as http:
            for step in range(3):
                operation = "load" if (seed + step) % 2 == 0 else "unload"
                statuses.append(http.post(f"/v2/repository/models/sst3/{operation}").status_code)
        return statuses

    with ThreadPoolExecutor(6) as pool:
        statuses = [s for result in pool.map(churn, range(6)) for s in result]
    assert set(statuses) <= {200, 404} and 200 in statuses, statuses
    loaded = "sst3" in control.runtime.models
    assert index(control)["sst3"]["state"] == ("READY" if loaded else "UNAVAILABLE")
    assert ("sst3" in control.runtime.batcher.runners) == loaded == ("sst3" in control.runtime.tasks)
    if loaded:
        assert classify_oip(control, "sst3").shape == (len(TEXTS), len(control.runtime.models["sst3"].labels))
        control.client.unload_model("sst3", headers=auth())
