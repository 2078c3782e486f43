"""The README's curl lines, copied as they are, against a started server with the models they name; and
Prometheus' own `promtool check metrics` on /metrics."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from builders import build_repo
from embed_builders import SHALLOW, build_backbone, build_sentence_transformer, build_sparse_encoder

from tests.service.support import SERVICE_REPOS, SMALL_GRID, ServiceProcess, settings_env

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_curl_commands() -> list[str]:
    """Every `curl` command in the README's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.DOTALL):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("curl "):
                commands.append(line)
    return commands


@pytest.fixture(scope="module")
def readme_server(service_repos, make_repo, spiece_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("readme-server")
    backbone = build_backbone(tmp / "backbone", spiece_model, seed=4)
    embedder = build_sentence_transformer(tmp / "embedder", backbone, pooling_mode="mean", normalize=True)
    reviews = make_repo("sequence-classification", seed=6, labels=list("abcde"), **SHALLOW)[0]
    nli = make_repo(
        "sequence-classification", seed=7, labels=["contradiction", "neutral", "entailment"], **SHALLOW
    )[0]
    cross = make_repo("sequence-classification", seed=8, labels=["score"], **SHALLOW)[0]
    build_repo(tmp / "mlm", "masked-lm", spiece_model, seed=9, **SHALLOW)
    splade = build_sparse_encoder(tmp / "splade", tmp / "mlm")
    (tmp / "models.toml").write_text(
        f'[models.reviews]\nsource = "{reviews}"\n'
        f'[models.my-embedder]\nsource = "{embedder}"\n'
        f'[models.nli]\nsource = "{nli}"\ntask = "zero-shot"\n'
        f'[models.cross]\nsource = "{cross}"\ntask = "rerank"\n'
        f'[models.splade]\nsource = "{splade}"\n'
    )
    env = {f"ALBERT_{e.replace('-', '_').upper()}_MODEL": str(service_repos[e][0]) for e in SERVICE_REPOS}
    env.update({"ALBERT_MODELS_FILE": str(tmp / "models.toml"), "HF_HUB_OFFLINE": "1"})
    env.update(settings_env(SMALL_GRID))
    process = ServiceProcess(env, tmp / "server.log")
    try:
        process.wait_ready()
        yield process
    finally:
        process.kill()


def test_the_readme_has_curl_lines_for_every_task():
    commands = " ".join(readme_curl_commands())
    for path in (
        "/classify",
        "/fill-mask",
        "/qa",
        "/ner",
        "/embed",
        "/similarity",
        "/zero-shot",
        "/rerank",
        "/v1/embeddings",
        "/predict",
        "/embed_all",
        "/embed_sparse",
        "/tokenize",
        "/decode",
        "/models/reviews",
        "/models",
    ):
        assert f"localhost:8000{path}" in commands, path


def _every_curl_line_answers(url: str) -> None:
    host = url.removeprefix("http://")
    for command in readme_curl_commands():
        done = subprocess.run(
            command.replace("localhost:8000", host) + " -w '\\n%{http_code}'",
            shell=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        body, _, status = done.stdout.rpartition("\n")
        assert done.returncode == 0 and status == "200", f"{command}\n-> {status} {body[:500]} {done.stderr}"
        json.loads(body)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_every_readme_curl_line_works_as_written(readme_server):
    _every_curl_line_answers(readme_server.url)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_every_readme_curl_line_answers_on_the_demo(tmp_path):
    """`albert-serve-demo` serves every task, under the names the README's examples use."""
    demo = ServiceProcess(
        {"ALBERT_COMPILATION_CACHE_DIR": ""},
        tmp_path / "demo.log",
        command=[sys.executable, "-m", "service.demo", "--models-dir", str(tmp_path / "demo-models")],
    )
    try:
        demo.wait_ready()
        _every_curl_line_answers(demo.url)
    finally:
        demo.kill()


def test_promtool_accepts_the_metrics(readme_server):
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool (Debian's prometheus package) is not installed; .ci/run installs it")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    httpx.post(readme_server.url + "/classify", json={"inputs": "warm the histograms"})
    metrics = httpx.get(readme_server.url + "/metrics").text
    assert "albert_model_state" in metrics
    done = subprocess.run(
        [promtool, "check", "metrics"], input=metrics, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
