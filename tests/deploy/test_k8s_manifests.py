"""The Kubernetes manifests of deploy/k8s: valid against the Kubernetes schemas, and wired to the service.

Schemas come from the `kubernetes-validate` package, which bundles them (nothing is downloaded). Wiring is
checked against the sources of truth: the Dockerfile (user, port, cache paths) and service/settings.py
(every ALBERT_* variable is a real setting with a valid value).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from service.models import configured_models  # noqa: E402
from service.settings import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
# The oldest Kubernetes the manifests are written for (the preStop `sleep` action is 1.30), and the newest
# whose schemas the package bundles.
KUBERNETES_VERSIONS = ["1.30", kubernetes_validate.latest_version()]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def load_documents() -> list[dict]:
    documents = []
    for path in manifest_files():
        documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return documents


def one(kind: str) -> dict:
    found = [doc for doc in load_documents() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container() -> dict:
    containers = one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def dockerfile_env() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text()
    return dict(re.findall(r"^\s*(?:ENV\s+)?([A-Z][A-Z0-9_]*)=(\S+?)\s*\\?$", text, re.MULTILINE))


def container_env() -> dict[str, str]:
    """The service's environment in the pod: image ENV, then the ConfigMap, then the container's env."""
    env = dict(dockerfile_env())
    config_maps = {
        doc["metadata"]["name"]: doc["data"] for doc in load_documents() if doc["kind"] == "ConfigMap"
    }
    for source in container().get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]])
    env.update({item["name"]: item["value"] for item in container().get("env", [])})
    return env


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_is_valid_against_the_kubernetes_schema(path, version):
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert documents
    for doc in documents:
        # strict: unknown fields (a typo, a misplaced key) are errors too.
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_rejects_a_broken_manifest():
    deployment = one("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/ready"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)
    hpa = one("HorizontalPodAutoscaler")
    hpa["spec"]["minReplicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(hpa, KUBERNETES_VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in manifest_files())


def test_probes_point_at_ready_and_health_on_the_service_port():
    c = container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == int(dockerfile_env()["ALBERT_PORT"])
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    for probe in (c["readinessProbe"], c["livenessProbe"]):
        port = probe["httpGet"]["port"]
        assert ports.get(port, port) == ports["http"]


def test_resources_are_set():
    resources = container()["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])  # the HPA's CPU target needs a CPU request
    assert "memory" in resources["limits"]


def test_hpa_scales_the_deployment():
    deployment, hpa = one("Deployment"), one("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        deployment["kind"],
        deployment["metadata"]["name"],
    )
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"


def test_service_selects_the_pods_on_the_named_port():
    deployment, service = one("Deployment"), one("Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    port_names = {p["name"] for p in container()["ports"]}
    assert all(p["targetPort"] in port_names for p in service["spec"]["ports"])


def test_caches_are_on_persistent_volumes_where_the_service_looks_for_them():
    env = container_env()
    pod = one("Deployment")["spec"]["template"]["spec"]
    claims = {doc["metadata"]["name"] for doc in load_documents() if doc["kind"] == "PersistentVolumeClaim"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container()["volumeMounts"]}
    for path in (env["HF_HOME"], env["ALBERT_COMPILATION_CACHE_DIR"]):
        assert path in mounts, f"{path} is not on a volume"
        volume = volumes[mounts[path]]
        assert volume["persistentVolumeClaim"]["claimName"] in claims


def test_pod_runs_as_the_image_user_with_a_read_only_root():
    user = re.search(r"^USER\s+(\d+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert user, "the Dockerfile sets no numeric USER"
    pod = one("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(user.group(1))
    # Everything the service writes goes to a volume.
    assert container()["securityContext"]["readOnlyRootFilesystem"] is True
    assert "/tmp" in {m["mountPath"] for m in container()["volumeMounts"]}


def test_every_albert_variable_is_a_valid_setting():
    env = {k: v for k, v in container_env().items() if k.startswith("ALBERT_")}
    fields = {Settings.env_name(name): name for name in Settings.model_fields}
    unknown = sorted(set(env) - set(fields))
    assert not unknown, f"not settings of the service: {unknown}"
    settings = Settings(**{fields[k]: v for k, v in env.items()})
    assert {m.name for m in configured_models(settings)} == {"classify", "fill-mask", "qa", "ner"}


def test_grace_period_outlasts_the_drain():
    pod = one("Deployment")["spec"]["template"]["spec"]
    drain = float(
        container_env().get("ALBERT_SHUTDOWN_TIMEOUT_S", Settings.model_fields["shutdown_timeout_s"].default)
    )
    pre_stop = container()["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > drain + pre_stop


def test_an_init_container_fills_the_shared_compilation_cache_with_the_servers_settings():
    pod = one("Deployment")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    server = container()
    assert init["command"] == ["albert-serve", "compile"]
    assert init["image"] == server["image"]
    # The same settings (so the same programs), and the same cache volumes at the same paths.
    assert init["envFrom"] == server["envFrom"] and init["env"] == server["env"]
    init_mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    server_mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    cache = container_env()["ALBERT_COMPILATION_CACHE_DIR"]
    assert init_mounts[cache] == server_mounts[cache]
    assert init_mounts[container_env()["HF_HOME"]] == server_mounts[container_env()["HF_HOME"]]
    assert init["securityContext"]["readOnlyRootFilesystem"] is True and "/tmp" in init_mounts
