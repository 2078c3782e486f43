"""Real `albert-serve` processes over the tiny checkpoints, and a fresh headless Chromium per test.

The browser tests need Debian's chromium and chromedriver (`apt-get install -y chromium chromium-driver`);
without /usr/bin/chromium they are skipped, saying so.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from tests.pages.browser import API_KEY, CHROMEDRIVER, CHROMIUM, console_errors, start_chromium
from tests.service.support import SERVICE_REPOS, SMALL_GRID, ServiceProcess

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    if CHROMIUM.exists():
        return
    skip = pytest.mark.skip(
        reason=f"{CHROMIUM} is absent: the browser tests need Debian's chromium and chromium-driver "
        "(apt-get install -y chromium chromium-driver)"
    )
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(skip)


def service_env(models: dict[str, str], cache_dir: Path, **extra: str) -> dict[str, str]:
    """Environment for an `albert-serve` child: the given models (endpoint -> source), the small grid."""
    env = {
        "ALBERT_CLASSIFY_MODEL": models.get("classify", ""),
        "ALBERT_FILL_MASK_MODEL": models.get("fill-mask", ""),
        "ALBERT_QA_MODEL": models.get("qa", ""),
        "ALBERT_NER_MODEL": models.get("ner", ""),
        "ALBERT_COMPILATION_CACHE_DIR": str(cache_dir),
        "HF_HUB_OFFLINE": "1",
        # The child runs the checkout under test, whatever the virtual environment has installed.
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
        **extra,
    }
    for key, value in SMALL_GRID.items():
        if key != "compilation_cache_dir":
            env["ALBERT_" + key.upper()] = (
                ",".join(map(str, value)) if isinstance(value, list) else str(value)
            )
    return env


@pytest.fixture(scope="session")
def page_repos(make_repo) -> dict[str, str]:
    return {endpoint: str(make_repo(task, **kwargs)[0]) for endpoint, (task, kwargs) in SERVICE_REPOS.items()}


def _splade(mlm: Path, directory: Path) -> Path:
    """A SPLADE checkpoint as sentence-transformers 5's SparseEncoder saves it (task sparse-embed)."""
    import warnings

    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.models import MLMTransformer, SpladePooling

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        SparseEncoder(modules=[MLMTransformer(str(mlm)), SpladePooling()], device="cpu").save(str(directory))
    return directory


@pytest.fixture(scope="session")
def more_tasks_file(make_repo, tmp_path_factory) -> Path:
    """A models file adding an embedder, an NLI classifier for zero-shot and a one-label cross-encoder.

    Read by builds with named models and these tasks (ALBERT_MODELS_FILE); a build without them ignores it, and
    the tests of those tasks skip.
    """
    shallow = SERVICE_REPOS["classify"][1]
    base = make_repo("base", **{**shallow, "seed": 4})[0]
    nli = make_repo(
        "sequence-classification", labels=["contradiction", "neutral", "entailment"], **{**shallow, "seed": 7}
    )[0]
    cross = make_repo("sequence-classification", labels=["score"], **{**shallow, "seed": 8})[0]
    splade = _splade(
        make_repo("masked-lm", **{**shallow, "seed": 9})[0], tmp_path_factory.mktemp("pages-splade")
    )
    path = tmp_path_factory.mktemp("pages-models") / "models.toml"
    path.write_text(
        f'[models.embed]\nsource = "{base}"\ntask = "embed"\n\n'
        f'[models.zero-shot]\nsource = "{nli}"\ntask = "zero-shot"\n\n'
        f'[models.rerank]\nsource = "{cross}"\ntask = "rerank"\n\n'
        f'[models.splade]\nsource = "{splade}"\n'
    )
    return path


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory) -> Path:
    # Shared by the servers of this session: the keyed server's classify model compiles from it.
    return tmp_path_factory.mktemp("pages-jax-cache")


def _serve(env: dict[str, str], log_path: Path):
    server = ServiceProcess(env, log_path)
    try:
        server.wait_ready()
    except BaseException:
        server.kill()
        raise
    return server


@pytest.fixture(scope="session")
def server(page_repos, jax_cache, tmp_path_factory):
    """The service with the four tiny models, no API keys."""
    log = tmp_path_factory.mktemp("pages-server") / "server.log"
    process = _serve(service_env(page_repos, jax_cache), log)
    yield process
    process.kill()


@pytest.fixture(scope="session")
def more_server(more_tasks_file, jax_cache, tmp_path_factory):
    """The service with the embed, zero-shot and rerank models only (none, on a build without those tasks).

    Waited for until each model is ready or failed, not for /ready: a model that fails fails its own test.
    """
    log = tmp_path_factory.mktemp("pages-more-server") / "server.log"
    process = ServiceProcess(service_env({}, jax_cache, ALBERT_MODELS_FILE=str(more_tasks_file)), log)
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.process.poll() is not None:
                raise RuntimeError(
                    f"albert-serve exited with {process.process.returncode}:\n{process.log()[-3000:]}"
                )
            try:
                response = httpx.get(process.url + "/models", timeout=5)
            except httpx.TransportError:
                response = None
            if response is not None and response.status_code == 404:  # a build without named models
                process.wait_ready()
                break
            settled = ("ready", "failed")
            if (
                response is not None
                and response.status_code == 200
                and all(m["state"] in settled for m in response.json()["models"])
            ):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"models not settled after 300s:\n{process.log()[-3000:]}")
            time.sleep(0.2)
    except BaseException:
        process.kill()
        raise
    yield process
    process.kill()


@pytest.fixture(scope="session")
def keyed_server(page_repos, jax_cache, tmp_path_factory):
    """The service with API keys configured, serving the classifier only (quick to start)."""
    log = tmp_path_factory.mktemp("pages-keyed-server") / "server.log"
    env = service_env({"classify": page_repos["classify"]}, jax_cache, ALBERT_API_KEYS=f"other-key,{API_KEY}")
    process = _serve(env, log)
    yield process
    process.kill()


@pytest.fixture
def browser(tmp_path, request):
    if not CHROMEDRIVER.exists():
        pytest.fail(f"{CHROMIUM} is installed but {CHROMEDRIVER} is not: apt-get install -y chromium-driver")
    driver = start_chromium(tmp_path / "chrome-profile", tmp_path / "chromedriver.log")
    yield driver
    try:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            errors = console_errors(driver)
            if errors:
                print("browser console errors:\n" + "\n".join(errors))
    finally:
        driver.quit()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    # Keeps the call's report on the item, so that the browser fixture can print the console on a failure.
    report = yield
    if report.when == "call":
        item.rep_call = report
    return report
