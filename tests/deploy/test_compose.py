"""docker-compose.yml: its defaults are the service's own, and its volumes are where the image keeps caches.

The compose file is run for real by scripts/container-check.sh; these checks need no container engine.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from service.models import configured_models  # noqa: E402
from service.settings import DEFAULT_MODELS, MODEL_FIELDS, Settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# ${NAME-default}: the default applies only when NAME is unset, so an empty value (disabling a model) passes.
SUBSTITUTION = re.compile(r"^\$\{([A-Z_][A-Z0-9_]*)-([^}]*)\}$")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def dockerfile_env() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text()
    return dict(re.findall(r"^\s*(?:ENV\s+)?([A-Z][A-Z0-9_]*)=(\S+?)\s*\\?$", text, re.MULTILINE))


def servers(compose: dict) -> list[dict]:
    """The services that run the server (not the one-shot `albert-serve compile`)."""
    return [s for s in compose["services"].values() if "command" not in s]


def environment_defaults(service: dict) -> dict[str, str]:
    defaults = {}
    for name, value in service["environment"].items():
        match = SUBSTITUTION.match(str(value))
        assert match and match.group(1) == name, f"{name}: expected ${{{name}-default}}, got {value!r}"
        defaults[name] = match.group(2)
    return defaults


def test_defaults_are_the_services_defaults(compose):
    defaults = environment_defaults(compose["services"]["albert-serve"])
    fields = {Settings.env_name(name): name for name in Settings.model_fields}
    albert = {k: v for k, v in defaults.items() if k.startswith("ALBERT_")}
    assert set(albert) <= set(fields), f"not settings: {sorted(set(albert) - set(fields))}"
    from_compose = Settings(**{fields[k]: v for k, v in albert.items()})
    built_in = Settings()
    model_fields = {Settings.env_name(field): endpoint for endpoint, field in MODEL_FIELDS.items()}
    for name in albert:
        if name in model_fields:  # built in: unset, meaning the public default when no model is configured
            assert getattr(from_compose, fields[name]) == DEFAULT_MODELS[model_fields[name]], name
        else:
            assert getattr(from_compose, fields[name]) == getattr(built_in, fields[name]), name
    assert {m.name: m.source for m in configured_models(from_compose)} == DEFAULT_MODELS
    assert {m.name: m.source for m in configured_models(built_in)} == DEFAULT_MODELS


def test_caches_are_volumes_at_the_images_cache_paths(compose):
    env = dockerfile_env()
    for service in compose["services"].values():
        targets = {volume.split(":")[1]: volume.split(":")[0] for volume in service["volumes"]}
        for path in (env["HF_HOME"], env["ALBERT_COMPILATION_CACHE_DIR"]):
            assert targets.get(path) in compose["volumes"], f"{path} is not on a named volume"


def test_healthcheck_is_the_images_and_waits_for_ready(compose):
    image_check = re.search(
        r"^HEALTHCHECK .*?CMD (\[[^\n]*\])$", (ROOT / "Dockerfile").read_text(), re.MULTILINE | re.DOTALL
    )
    assert image_check
    for service in servers(compose):
        test = service["healthcheck"]["test"]
        assert test == ["CMD", *json.loads(image_check.group(1))]
        assert "/ready" in test[-1]
        # podman's Docker API splits healthcheck arguments on whitespace.
        assert not any(" " in arg for arg in test)


def test_ports_are_published(compose):
    for service in servers(compose):
        assert any(str(p).endswith(":" + dockerfile_env()["ALBERT_PORT"]) for p in service["ports"])


def test_gpu_profile_reserves_the_gpu_with_the_cuda_image(compose):
    gpu = compose["services"]["albert-serve-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["args"]["ACCELERATOR"] == "cuda12"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    cpu = compose["services"]["albert-serve"]
    assert "profiles" not in cpu and cpu["build"]["args"]["ACCELERATOR"] == "cpu"


def test_dockerfile_accepts_exactly_the_accelerators_compose_uses(compose):
    accepted = re.search(r'case "\$ACCELERATOR" in ([\w|]+)\)', (ROOT / "Dockerfile").read_text())
    assert accepted
    used = {s["build"]["args"]["ACCELERATOR"] for s in servers(compose)}
    assert used == set(accepted.group(1).split("|"))


def test_a_one_shot_service_fills_the_compilation_cache_volume(compose):
    server, compile_ = compose["services"]["albert-serve"], compose["services"]["albert-serve-compile"]
    assert compile_["command"] == ["albert-serve", "compile"]
    assert compile_["restart"] == "no" and compile_["healthcheck"] == {"disable": True}
    assert compile_["profiles"] == ["compile"]  # `docker compose up` alone is unchanged
    # The server's settings, image and volumes (the anchor), so it compiles what the server will load.
    assert compile_["environment"] == server["environment"] and compile_["volumes"] == server["volumes"]
    assert compile_["image"] == server["image"]


def test_the_dockerfile_can_compile_at_build_time():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG PRECOMPILE=false$", text, re.MULTILINE)
    assert "true) albert-serve compile" in text
