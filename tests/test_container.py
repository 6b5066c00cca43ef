"""The bento and its OCI image.

Fast tests: the committed bentofile.yaml is a valid BentoML build config that packs only serving code and
serving dependencies. End-to-end (`-m e2e`, needs root podman, a few minutes): a temporary BentoML home
gets a model (the tiny test model, or a trained one named by RC_E2E_MODEL_HOME / RC_E2E_MODEL_TAG),
scripts/container/build_image.sh builds the bento and containerizes it with podman, the container runs
on a free loopback port, and BentoML's generated client gets the same answers from it as from
`bentoml serve` of the same bento; then the image runs as the Helm chart's pod would (the rendered
Deployment's CPU/memory limits, user, read-only root, settings: needs helm), answers its probes, sizes its
threads from the CPU limit, and drains a burst of uploads on SIGTERM. Images, containers and the temporary
home are removed afterwards.

On a machine without a registry, run scripts/container/setup_podman.sh first (the test runs it when
podman or the local base image is missing and it is root). RC_BASE_IMAGE and RC_EXTRA_CA_CERTS are
passed on to the build; when unset, the local base image and /usr/local/share/ca-certificates are used
if they exist.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts" / "container"
LOCAL_BASE_IMAGE = "localhost/bento-base:bookworm"
HOST_EXTRA_CA_DIR = Path("/usr/local/share/ca-certificates")
BUILD_TIMEOUT_S = 1200


def load_bentofile() -> dict:
    return yaml.safe_load((REPO / "bentofile.yaml").read_text())


def repo_files() -> list[str]:
    """Every file git knows or would add (tracked + untracked, minus .gitignore'd), relative to the repo."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\n")
    return [path for path in listed if path and (REPO / path).is_file()]


def included_by_bentofile(paths: list[str]) -> set[str]:
    """The paths `bentoml build` copies into the bento, decided by BentoML's own include/exclude matcher."""
    from bentoml._internal.bento.build_config import BentoPathSpec

    config = load_bentofile()
    spec = BentoPathSpec(config["include"], config.get("exclude", []), str(REPO))
    return {path for path in paths if spec.includes(path)}


# ----------------------------------------------------------------------------------------------------
# Fast checks of the committed build configuration


def test_bentofile_is_a_valid_bentoml_build_config():
    from bentoml._internal.bento.build_config import BentoBuildConfig

    config = BentoBuildConfig.from_yaml(io.StringIO((REPO / "bentofile.yaml").read_text()))
    assert config.service == "service:RoomClassifier"
    assert config.docker.python_version is None  # the image, its Python included, is declared in service.py only
    # users elsewhere keep BentoML's default base image; local bases come from build_image.sh
    assert config.docker.base_image is None


def serving_requirements() -> list[str]:
    lines = (REPO / "serving-requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_the_serving_dependencies_are_declared_once():
    """serving-requirements.txt is the package's dependency list and the bento's: nothing repeats it."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "dependencies" not in pyproject["project"] and "dependencies" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["serving-requirements.txt"]}
    assert load_bentofile()["python"] == {"requirements_txt": "./serving-requirements.txt"}
    installed = {Requirement(r).name for r in importlib.metadata.requires("room-classifier") or []
                 if "extra ==" not in r}
    assert installed == {Requirement(line).name for line in serving_requirements()}


def test_bentofile_packs_exactly_the_serving_dependencies():
    packages = serving_requirements()
    names = {Requirement(package).name for package in packages}
    # no training stack; only what serving imports, plus uvicorn's fast event loop and HTTP parser
    assert names == {"bentoml", "onnxruntime", "numpy", "pillow", "anyio", "starlette", "pydantic",
                     "pydantic-settings", "prometheus-client", "uvloop", "httptools"}


def test_bentofile_includes_only_serving_code():
    included = included_by_bentofile(repo_files())
    assert "service.py" in included
    assert {"inference/preprocess.py", "serving/config.py", "serving/http_guards.py"} <= included
    assert {"serving/static/index.html", "serving/static/app.js", "serving/static/style.css"} <= included
    assert all(path == "service.py" or (path.startswith(("inference/", "serving/")) and path.endswith(".py"))
               or path.startswith("serving/static/") for path in included), sorted(included)


def test_bentofile_leaves_out_data_venv_tests_training_and_build_output():
    lookalikes = [".venv/lib/python3.11/site-packages/bentoml/service.py", "tests/test_service.py",
                  "tests/inference/fixture.py", "training/export.py", "data_prep/service.py",
                  "artifacts/model.onnx", "artifacts/dataset/train/kitchen/a.jpg", "inference/__pycache__/x.pyc",
                  "benchmarks/speed.py", "testkit/server.py", "bentoml_home/models/room_classifier/x/model.onnx",
                  "inference/model.onnx", "inference/notes.md", "serving/static/__pycache__/x.pyc"]
    assert included_by_bentofile(lookalikes) == set()


# ----------------------------------------------------------------------------------------------------
# End to end: build, containerize, run, compare with `bentoml serve`


def run(command: list[str], timeout: float = 120, env: dict | None = None, check: bool = True,
        ) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}"
                             f"\n--- stderr\n{result.stderr[-8000:]}")
    return result


def podman_works() -> bool:
    return shutil.which("podman") is not None and run(["podman", "info"], check=False).returncode == 0


def image_exists(name: str) -> bool:
    return run(["podman", "image", "exists", name], check=False).returncode == 0


@pytest.fixture(scope="module")
def podman() -> None:
    """Podman able to build and run; set up with setup_podman.sh when missing (root only), else skip."""
    needs_setup = not podman_works() or ("RC_BASE_IMAGE" not in os.environ and not image_exists(LOCAL_BASE_IMAGE))
    if needs_setup and os.geteuid() == 0:
        setup = run([str(SCRIPTS / "setup_podman.sh")], timeout=900, check=False)
        if setup.returncode != 0:
            pytest.skip(f"podman could not be set up (setup_podman.sh exited {setup.returncode}):\n"
                        f"{setup.stderr[-2000:]}")
    if not podman_works():
        pytest.skip("podman is not installed or cannot run here (scripts/container/setup_podman.sh needs root)")


def build_settings() -> dict[str, str]:
    """RC_BASE_IMAGE / RC_EXTRA_CA_CERTS from the environment, else this machine's local base and extra CAs."""
    settings = {}
    if "RC_BASE_IMAGE" in os.environ:
        settings["RC_BASE_IMAGE"] = os.environ["RC_BASE_IMAGE"]
    elif image_exists(LOCAL_BASE_IMAGE):
        settings["RC_BASE_IMAGE"] = LOCAL_BASE_IMAGE
    if "RC_EXTRA_CA_CERTS" in os.environ:
        settings["RC_EXTRA_CA_CERTS"] = os.environ["RC_EXTRA_CA_CERTS"]
    elif list(HOST_EXTRA_CA_DIR.glob("*.crt")):
        settings["RC_EXTRA_CA_CERTS"] = str(HOST_EXTRA_CA_DIR)
    return settings


@pytest.fixture(scope="module")
def model_home(podman) -> Iterator[str]:
    from testkit.model_home import temporary_model_home

    with temporary_model_home(os.environ.get("RC_E2E_MODEL_HOME"),
                              os.environ.get("RC_E2E_MODEL_TAG", "room_classifier:latest")) as home:
        yield home


@pytest.fixture(scope="module")
def image(model_home) -> Iterator[tuple[str, str]]:
    """(image name, bento tag) built by build_image.sh into a uniquely named image; removed afterwards."""
    name = f"localhost/rc-e2e-{uuid.uuid4().hex[:8]}"
    env = {"BENTOML_HOME": model_home, "RC_IMAGE": name, "PYTHON": sys.executable,
           "BENTOML": str(Path(sys.executable).parent / "bentoml"), **build_settings()}
    try:
        result = run([str(SCRIPTS / "build_image.sh")], timeout=BUILD_TIMEOUT_S, env=env)
        print("\n".join(line for line in result.stderr.splitlines() if line.startswith("[build_image]")))
        image_name = result.stdout.strip().splitlines()[-1]
        assert image_name.startswith(f"{name}:")
        yield image_name, "room-classifier:" + image_name.rsplit(":", 1)[1]
    finally:
        for leftover in run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"]).stdout.split():
            if leftover.startswith(name):
                run(["podman", "rmi", "-f", leftover], check=False)


@pytest.fixture(scope="module")
def container_url(image) -> Iterator[str]:
    from testkit.server import free_port

    name, port = f"rc-e2e-{uuid.uuid4().hex[:8]}", free_port()
    try:
        result = run([str(SCRIPTS / "run_container.sh"), image[0], str(port)], timeout=180,
                     env={"RC_CONTAINER_NAME": name})
        print(result.stderr)
        yield f"http://127.0.0.1:{port}"
    finally:
        run(["podman", "rm", "-f", name], check=False)


@pytest.fixture(scope="module")
def served_url(image, model_home, tmp_path_factory) -> Iterator[str]:
    """`bentoml serve <bento tag>` of the very bento in the image, from outside the repo."""
    from testkit.server import start_bento_server

    with start_bento_server(image[1], env={"BENTOML_HOME": model_home},
                            cwd=tmp_path_factory.mktemp("serve")) as server:
        yield server.url


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Real room photos re-encoded at 640x480 when the shared data is here, else plain-colour JPEGs and a PNG."""
    from PIL import Image

    from testkit.photos import DEFAULT_DATA, find_room_photos, write_jpegs

    folder = tmp_path_factory.mktemp("photos")
    try:
        return write_jpegs(find_room_photos(DEFAULT_DATA, 4), (640, 480), folder)
    except FileNotFoundError:
        paths = []
        for index, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (10, 10, 10)]):
            path = folder / f"colour{index}.{'png' if index == 3 else 'jpg'}"
            Image.new("RGB", (640, 480), colour).save(path)
            paths.append(path)
        return paths


def classify_each_and_all(url: str, photos: list[Path]) -> tuple[list[dict], list[dict]]:
    """One /classify upload per photo and one /classify_batch with all of them, through the generated client."""
    import bentoml

    with bentoml.SyncHTTPClient(url, timeout=60) as client:
        singles = [as_dict(client.classify(image=path, top_k=2)) for path in photos]
        batch = as_dict(client.classify_batch(images=photos, top_k=2))
    return singles, [item["result"] for item in batch["results"]]


def as_dict(answer) -> dict:
    return answer if isinstance(answer, dict) else answer.model_dump(by_alias=True)


def assert_same_answers(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected):
        assert mine["class"] == theirs["class"]
        assert mine["model"] == theirs["model"]
        assert [label for label, _ in mine["probabilities"]] == [label for label, _ in theirs["probabilities"]]
        assert [p for _, p in mine["probabilities"]] == pytest.approx([p for _, p in theirs["probabilities"]],
                                                                      abs=1e-5)
        assert len(mine["top_k"]) == 2


@pytest.mark.e2e
def test_image_packs_serving_code_only_and_no_torch(image):
    code = ("import importlib.util as u, json, os; print(json.dumps({'torch': u.find_spec('torch') is not None, "
            "'onnxruntime': u.find_spec('onnxruntime') is not None, 'src': sorted(os.listdir('src'))}))")
    result = run(["podman", "run", "--rm", "--entrypoint", "/app/.venv/bin/python", image[0], "-c", code])
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["torch"] is False and found["onnxruntime"] is True
    assert set(found["src"]) <= {"service.py", "inference", "serving", "bentofile.yaml", "wheels"}, found["src"]
    assert {"service.py", "inference", "serving"} <= set(found["src"])


@pytest.mark.e2e
def test_container_answers_like_bentoml_serve(container_url, served_url, photos):
    container_singles, container_batch = classify_each_and_all(container_url, photos)
    served_singles, served_batch = classify_each_and_all(served_url, photos)
    for answer in container_singles:
        assert sum(p for _, p in answer["probabilities"]) == pytest.approx(1.0, abs=1e-6)
    assert_same_answers(container_singles, served_singles)
    assert_same_answers(container_batch, served_batch)
    assert_same_answers(container_batch, container_singles)  # batching does not change answers


MAX_IMAGE_MB = 600  # BentoML's default recipe made 1.34 GB, mostly compilers that no wheel needs


@pytest.mark.e2e
def test_image_is_small_and_has_no_compilers(image):
    size = int(run(["podman", "image", "inspect", "--format", "{{.Size}}", image[0]]).stdout.strip())
    assert size <= MAX_IMAGE_MB * 1_000_000, f"{image[0]} is {size / 1e6:.0f} MB"
    found = run(["podman", "run", "--rm", "--entrypoint", "/bin/sh", image[0], "-c",
                 "command -v gcc cc git make || true"]).stdout.split()
    assert found == [], found


# ----------------------------------------------------------------------------------------------------
# The pod the Helm chart makes (deploy/helm/room-classifier), with podman: the rendered Deployment's CPU and
# memory limits, user, read-only root filesystem with its /tmp emptyDir, environment and ConfigMap.

BURST = 48  # requests of 4 photos at 1600x1200 in flight when SIGTERM arrives (RC_MAX_CONCURRENCY + RC_MAX_QUEUED
# is 96: none is shed)


@pytest.fixture(scope="module")
def chart_pod() -> dict:
    """The container and ConfigMap of the chart rendered with its defaults (needs helm, see test_deploy.py)."""
    from tests.test_deploy import one, render, the_container

    objects = render()
    return {"container": the_container(objects), "config": one(objects, "ConfigMap")["data"],
            "pod": one(objects, "Deployment")["spec"]["template"]["spec"]}


def podman_args_for(chart_pod: dict, cpus: float | None = None) -> list[str]:
    """`podman run` options that give a container what the chart gives the pod (`cpus` overrides the limit)."""
    from tests.test_deploy import parse_bytes, parse_cpu

    container, pod = chart_pod["container"], chart_pod["pod"]
    limits, memory = container["resources"]["limits"], str(parse_bytes(container["resources"]["limits"]["memory"]))
    args = ["--cpus", str(cpus or parse_cpu(limits["cpu"])), "--memory", memory, "--memory-swap", memory,
            "--user", f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
    if container["securityContext"]["readOnlyRootFilesystem"]:
        args.append("--read-only")
    for mount in container["volumeMounts"]:  # every volume of the pod is an emptyDir
        args += ["--tmpfs", mount["mountPath"]]
    for name, value in [*((item["name"], item["value"]) for item in container["env"]), *chart_pod["config"].items()]:
        args += ["--env", f"{name}={value}"]
    return args


def startup_budget_s(chart_pod: dict) -> float:
    probe = chart_pod["container"]["startupProbe"]
    return probe["periodSeconds"] * probe["failureThreshold"]


@contextmanager
def pod_container(image_name: str, chart_pod: dict, cpus: float | None = None) -> Iterator[tuple[str, str, float]]:
    """(container name, URL, seconds until /readyz answered) of the image run as the chart's pod; removed after."""
    from testkit.server import free_port, wait_for_http

    name, port = f"rc-e2e-pod-{uuid.uuid4().hex[:8]}", free_port()
    try:
        start = time.monotonic()
        run(["podman", "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:3000",
             *podman_args_for(chart_pod, cpus), image_name])
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for_http(url + "/readyz", startup_budget_s(chart_pod))
        except Exception:
            print(run(["podman", "logs", name], check=False).stderr[-4000:])
            raise
        yield name, url, time.monotonic() - start
    finally:
        run(["podman", "rm", "-f", name], check=False)


@pytest.fixture(scope="module")
def large_photos(photos, tmp_path_factory) -> list[Path]:
    from PIL import Image

    folder = tmp_path_factory.mktemp("large")
    paths = []
    for photo in photos:
        path = folder / (photo.stem + ".jpg")
        Image.open(photo).convert("RGB").resize((1600, 1200)).save(path, quality=90)
        paths.append(path)
    return paths


@pytest.mark.e2e
def test_the_pod_serves_its_probes_under_the_chart_limits(image, chart_pod, photos):
    import requests

    with pod_container(image[0], chart_pod) as (name, url, ready_s):
        print(f"ready in {ready_s:.1f} s under the chart's limits (startup budget {startup_budget_s(chart_pod)} s)")
        assert requests.get(url + "/livez", timeout=5).status_code == 200
        assert requests.get(url + "/readyz", timeout=5).status_code == 200
        singles, _ = classify_each_and_all(url, photos)
        assert all(answer["model"] for answer in singles)
        host = json.loads(run(["podman", "inspect", name]).stdout)[0]["HostConfig"]
        assert host["ReadonlyRootfs"] is True
        assert run(["podman", "exec", name, "id", "-u"]).stdout.strip() == str(
            chart_pod["pod"]["securityContext"]["runAsUser"])


@pytest.mark.e2e
@pytest.mark.parametrize("cpus", [None, 1.0], ids=["chart-limit", "one-cpu"])
def test_threads_follow_the_cpu_limit(image, chart_pod, cpus):
    """RC_ORT_THREADS and RC_DECODE_THREADS are left unset by the chart: their defaults come from the CPU limit
    (serving.config.available_cores reads the cgroup quota), never from the host's core count."""
    import math

    import requests

    from tests.test_deploy import parse_cpu

    limit = cpus or parse_cpu(chart_pod["container"]["resources"]["limits"]["cpu"])
    cores = min(len(os.sched_getaffinity(0)), math.ceil(limit))
    with pod_container(image[0], chart_pod, cpus) as (_, url, _):
        config = requests.get(url + "/health", timeout=10).json()["config"]
    assert (config["workers"], config["decode_threads"], config["ort_threads"]) == (1, cores, max(1, cores // 2))


@pytest.mark.e2e
def test_sigterm_during_a_burst_fails_no_request(image, chart_pod, large_photos):
    """What the pod does after its preStop pause: SIGTERM with uploads in flight; each one is answered, then
    the server exits 0 well within the grace period."""
    import threading

    import bentoml

    grace_s = chart_pod["pod"]["terminationGracePeriodSeconds"]
    with pod_container(image[0], chart_pod) as (name, url, _):
        clients = [bentoml.SyncHTTPClient(url, timeout=60) for _ in range(BURST)]
        answers: list[tuple[float, str]] = []
        go, first_answer = threading.Barrier(BURST + 1), threading.Event()

        def upload(index: int) -> None:
            go.wait()
            try:
                results = as_dict(clients[index].classify_batch(images=large_photos))["results"]
                answers.append((time.monotonic(), "ok" if all(item["result"] for item in results) else str(results)))
            except Exception as exc:  # the assertion below lists it
                answers.append((time.monotonic(), f"failed: {exc!r}"[:200]))
            first_answer.set()

        threads = [threading.Thread(target=upload, args=(i,)) for i in range(BURST)]
        for thread in threads:
            thread.start()
        go.wait()
        assert first_answer.wait(30)
        time.sleep(0.1)  # every request sent and read by the server: in flight, as after the preStop pause
        signalled = time.monotonic()
        run(["podman", "kill", "--signal", "TERM", name])
        for thread in threads:
            thread.join(60)
        exit_code = run(["podman", "wait", name], timeout=grace_s).stdout.strip()
        stopped_s = time.monotonic() - signalled
        for client in clients:
            client.close()
    failures = [outcome for _, outcome in answers if outcome != "ok"]
    after_signal = sum(1 for at, _ in answers if at > signalled)
    print(f"{after_signal} of {BURST} answered after SIGTERM; stopped {stopped_s:.1f} s after it")
    assert len(answers) == BURST and failures == []
    assert after_signal > 0  # else the signal came after the burst and this test proved nothing
    assert exit_code == "0" and stopped_s < grace_s
