"""Models by name, in process: the configuration checks, routing by "model", per-model states and failures.

The end-to-end side (InferenceClient, signals) is in test_models_e2e.py.
"""

from __future__ import annotations

import shutil
import warnings

import pytest
from compare import assert_matches_pipeline
from fastapi.testclient import TestClient

from service.app import create_app
from service.models import ConfigError, configured_models
from service.runtime import Runtime
from service.settings import Settings
from tests.service.support import SERVICE_REPOS, SHALLOW, SMALL_GRID

NO_ENDPOINT_MODELS = dict(classify_model=None, fill_mask_model=None, qa_model=None, ner_model=None)


def _settings(tmp_path, toml: str | None = None, **overrides) -> Settings:
    fields = {**SMALL_GRID, **NO_ENDPOINT_MODELS, **overrides}
    if toml is not None:
        path = tmp_path / "models.toml"
        path.write_text(toml)
        fields["models_file"] = str(path)
    return Settings(**fields)


# --- configuration: every mistake is refused at start-up, naming the entry ------------------------------------


def test_models_file_short_form_and_endpoint_variables_combine(tmp_path, service_repos):
    classify = service_repos["classify"][0]
    ner = service_repos["ner"][0]
    toml = f'[models.sentiment]\nsource = "{classify}"\ndefault = true\n\n[models.tags]\nsource = "{ner}"\n'
    specs = configured_models(
        _settings(tmp_path, toml, models=f"other={classify}", qa_model="", ner_model=str(ner))
    )
    by_name = {s.name: s for s in specs}
    assert list(by_name) == ["sentiment", "tags", "other", "ner"]
    assert by_name["sentiment"].task == "classify" and by_name["sentiment"].default
    assert by_name["tags"].task == "ner" and not by_name["tags"].default  # task from the checkpoint
    assert by_name["other"].task == "classify" and not by_name["other"].default
    assert by_name["ner"].task == "ner" and by_name["ner"].default  # an endpoint variable: its task's default


def test_public_defaults_only_when_nothing_is_configured(tmp_path, service_repos):
    assert [s.name for s in configured_models(Settings(**NO_ENDPOINT_MODELS))] == [
        "classify",
        "fill-mask",
        "qa",
        "ner",
    ]
    only = configured_models(Settings(**{**NO_ENDPOINT_MODELS, "models": f"x={service_repos['qa'][0]}"}))
    assert [(s.name, s.task) for s in only] == [("x", "qa")]


@pytest.mark.parametrize(
    "toml, expected",
    [
        ('[models.a]\nsource = "{classify}"\ncolour = "red"\n', ["models.a", "unknown key", "colour"]),
        ('[models."bad name!"]\nsource = "{classify}"\n', ["bad name!", "A-Za-z0-9._-"]),
        ('[models.{long}]\nsource = "{classify}"\n', ["1-64 characters"]),
        (
            '[models.a]\nsource = "{classify}"\ndefault = true\n[models.b]\nsource = "{classify}"\ndefault = true\n',
            ["two default models for task classify", "'a'", "'b'"],
        ),
        ('[models.a]\nsource = "{classify}"\ntask = "translate"\n', ["models.a", "unknown task 'translate'"]),
        (
            '[models.a]\nsource = "{classify}"\ntask = "qa"\n',
            ["models.a", "task qa needs", "AlbertForQuestionAnswering", "AlbertForSequenceClassification"],
        ),
        ('[models.a]\nsource = ""\n', ["models.a", "`source` must be a non-empty string"]),
        ('[models.a]\nsource = "{classify}"\ndtype = "int8"\n', ["models.a", "dtype", "int8"]),
        (
            '[models.a]\nsource = "{classify}"\ndefault = "yes"\n',
            ["models.a", "`default` must be true or false"],
        ),
        ("[models.a\nsource = 1\n", ["not valid TOML"]),
        ('[model.a]\nsource = "{classify}"\n', ["unknown top-level key", "model"]),
    ],
)
def test_bad_models_file_is_refused_naming_the_entry(tmp_path, service_repos, toml, expected):
    toml = toml.replace("{classify}", str(service_repos["classify"][0])).replace("{long}", "m" * 65)
    with pytest.raises(ConfigError) as caught:
        configured_models(_settings(tmp_path, toml))
    for fragment in expected:
        assert fragment in str(caught.value)


def test_bad_short_form_and_duplicates_are_refused(tmp_path, service_repos):
    classify = service_repos["classify"][0]
    with pytest.raises(ConfigError, match=r"ALBERT_MODELS entry 1.*expected name=source"):
        configured_models(_settings(tmp_path, models=str(classify)))
    with pytest.raises(ConfigError, match="'classify' is already used by ALBERT_MODELS entry 1"):
        configured_models(_settings(tmp_path, models=f"classify={classify}", classify_model=str(classify)))
    with pytest.raises(ConfigError, match=r"models file .*cannot be read"):
        configured_models(Settings(**NO_ENDPOINT_MODELS, models_file=str(tmp_path / "missing.toml")))


def test_a_bad_configuration_stops_before_anything_compiles(tmp_path, service_repos):
    from service.metrics import COMPILES

    before = COMPILES.compilations
    with pytest.raises(ConfigError):
        Runtime(_settings(tmp_path, '[models.a]\nsource = "x"\nsurprise = 1\n'))
    assert COMPILES.compilations == before


# --- several models of one task, routing by name --------------------------------------------------------------


@pytest.fixture(scope="module")
def repository(make_repo, service_repos, tmp_path_factory):
    """Two classifiers (2 and 5 labels), the four endpoint models, and three broken models."""
    tmp = tmp_path_factory.mktemp("repository")
    two = make_repo("sequence-classification", seed=5, labels=["neg", "pos"], **SHALLOW)[0]
    five = make_repo("sequence-classification", seed=6, labels=list("abcde"), **SHALLOW)[0]
    corrupt = tmp / "corrupt"
    shutil.copytree(service_repos["ner"][0], corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    headless = tmp / "headless"  # config says classifier, weights lack the classifier head
    shutil.copytree(service_repos["classify"][0], headless)
    shutil.copy(service_repos["fill-mask"][0] / "model.safetensors", headless / "model.safetensors")
    toml = "\n".join(
        [
            f'[models.two]\nsource = "{two}"',
            f'[models.five]\nsource = "{five}"',
            f'[models.missing]\nsource = "{tmp / "nowhere"}"\ntask = "ner"',
            f'[models.corrupt]\nsource = "{corrupt}"',
            f'[models.headless]\nsource = "{headless}"',
            "",
        ]
    )
    (tmp / "models.toml").write_text(toml)
    settings = Settings(
        **SMALL_GRID,
        models_file=str(tmp / "models.toml"),
        **{f"{e.replace('-', '_')}_model": str(service_repos[e][0]) for e in SERVICE_REPOS},
    )
    runtime = Runtime(settings)
    runtime.start(background=False)
    yield runtime, {"two": two, "five": five}
    runtime.stop()


@pytest.fixture
def repo_client(repository):
    runtime, _ = repository
    with TestClient(create_app(runtime.settings, runtime=runtime, start_runtime=False)) as client:
        yield client


def test_each_failure_is_its_own_and_the_others_serve(repo_client):
    states = {m["name"]: m for m in repo_client.get("/models").json()["models"]}
    assert {name: m["state"] for name, m in states.items()} == {
        "two": "ready",
        "five": "ready",
        "missing": "failed",
        "corrupt": "failed",
        "headless": "failed",
        "classify": "ready",
        "fill-mask": "ready",
        "qa": "ready",
        "ner": "ready",
    }
    assert "nowhere" in states["missing"]["reason"] and "models.missing" in states["missing"]["reason"]
    assert "model.safetensors" in states["corrupt"]["reason"]
    assert "classifier" in states["headless"]["reason"].lower()
    # Each reason once: only under its own model.
    ready = repo_client.get("/ready")
    assert ready.status_code == 503  # strict by default: a bad rollout takes no traffic
    body = ready.json()
    assert set(body["failed"]) == {"missing", "corrupt", "headless"}
    for name in ("missing", "corrupt", "headless"):
        assert ready.text.count(states[name]["reason"].replace('"', '\\"')) == 1, name
    # A failed model's requests: 503 model_unavailable with its reason, no Retry-After.
    for name, path, body_ in [
        ("missing", "/ner", {"inputs": "Anna lives in Rome."}),
        ("headless", "/classify", {"inputs": "a"}),
    ]:
        response = repo_client.post(path, json={**body_, "model": name})
        assert response.status_code == 503, response.text
        assert response.json()["error_type"] == "model_unavailable"
        assert states[name]["reason"] in response.json()["error"]
        assert "retry-after" not in response.headers
        assert repo_client.get(f"/models/{name}").status_code == 503
    assert repo_client.get("/models/two").status_code == 200
    assert repo_client.get("/models/unknown").status_code == 404


def test_relaxed_readiness_ignores_failed_models(repository):
    runtime, _ = repository
    relaxed = runtime.settings.model_copy(update={"strict_readiness": False})
    original = runtime.settings
    runtime.settings = relaxed
    try:
        assert runtime.ready
    finally:
        runtime.settings = original
    assert not runtime.ready


def test_requests_go_to_the_named_model(repository, repo_client):
    from transformers import pipeline

    _, dirs = repository
    text = "The museum in Paris is excellent."
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = {
            name: pipeline("text-classification", model=str(d))(text, top_k=None) for name, d in dirs.items()
        }
    for name in ("two", "five"):
        response = repo_client.post("/classify", json={"inputs": text, "model": name})
        assert response.status_code == 200 and response.headers["x-model"] == name
        assert_matches_pipeline(response.json(), expected[name])
    # No name: the task's default, here the model ALBERT_CLASSIFY_MODEL adds.
    assert repo_client.post("/classify", json={"inputs": text}).headers["x-model"] == "classify"


def test_routing_errors(repository, repo_client):
    wrong_task = repo_client.post("/ner", json={"inputs": "a", "model": "two"})
    assert wrong_task.status_code == 422 and "serves task classify" in wrong_task.json()["error"]
    unknown = repo_client.post("/classify", json={"inputs": "a", "model": "nope"})
    assert unknown.status_code == 404 and unknown.json()["error_type"] == "model_not_found"
    assert "two" in unknown.json()["error"]
    assert repo_client.post("/models/nope", json={"inputs": "a"}).status_code == 404


def test_several_models_and_no_default_is_a_422_naming_them(tmp_path, make_repo):
    a = make_repo("sequence-classification", seed=5, labels=["neg", "pos"], **SHALLOW)[0]
    settings = _settings(tmp_path, models=f"a={a},b={a}")
    runtime = Runtime(settings)
    runtime.start(background=False)
    try:
        with TestClient(create_app(settings, runtime=runtime, start_runtime=False)) as client:
            response = client.post("/classify", json={"inputs": "x"})
            assert response.status_code == 422
            assert "'a'" in response.json()["error"] and "'b'" in response.json()["error"]
            assert client.post("/classify", json={"inputs": "x", "model": "b"}).status_code == 200
            # Models of one shape share nothing they should not: both answer the same (same checkpoint).
            one = client.post("/classify", json={"inputs": "x", "model": "a"}).json()
            two = client.post("/classify", json={"inputs": "x", "model": "b"}).json()
            assert one == two
            missing = client.post("/ner", json={"inputs": "x"})
            assert missing.status_code == 404 and "ALBERT_NER_MODEL" in missing.json()["error"]
    finally:
        runtime.stop()


def test_hub_shapes_through_models_name(repository, repo_client, pipelines):
    """POST /models/{name}: the Inference API's shapes (classification wraps a single input once more)."""
    text = "Marie Curie worked in Paris."
    one = repo_client.post("/models/classify", json={"inputs": text}).json()
    assert isinstance(one, list) and len(one) == 1 and isinstance(one[0], list)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_matches_pipeline(one[0], pipelines["classify"](text, top_k=None))
    many = repo_client.post("/models/classify", json={"inputs": [text, "another one"]}).json()
    assert len(many) == 2 and all(isinstance(x, list) and "label" in x[0] for x in many)
    ner = repo_client.post("/models/ner", json={"inputs": text}).json()
    assert isinstance(ner, list)
    bad = repo_client.post("/models/qa", json={"inputs": "not a question"})
    assert bad.status_code == 422
    not_object = repo_client.post("/models/qa", json=["x"])
    assert not_object.status_code == 422
