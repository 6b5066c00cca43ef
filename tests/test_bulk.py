"""Bulk tagging (`python -m bulk`) for real: Ray clusters on this machine, real photos, the tiny real model.

A two-node Ray cluster (`ray.cluster_utils.Cluster`: a head and a second node, each its own raylet) runs on
127.0.0.1 only (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0); the jobs are `python -m bulk --address ...` subprocesses,
as a user runs them, so the code reaches the workers through Ray (py_modules) and the model through the object
store. The job's answers must equal the running service's answers for the same images. A worker and then the
driver are killed mid-job, and the rerun must end with every input exactly once. Every Ray process started
here is stopped, and checked gone, at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bulk.job import ActorPlacement, dealt_slots, kill_leftovers, local_ray_processes, still_running
from bulk.results import JobMismatch, JobSpec, PartWriter, WorkDir, consolidate
from bulk.sources import SourceError, write_input_list
from bulk.stages import result_schema
from data_prep.common import CLASSES
from testkit.image_host import ImageHost
from testkit.images import encode, solid_jpeg, truncated
from testkit.model_home import TinyModel
from testkit.photos import real_photos
from testkit.server import REPO_ROOT, BentoServer

LABELS = CLASSES
COLOURS = {"red": ((255, 0, 0), "bedroom"), "green": ((0, 255, 0), "kitchen"), "blue": ((0, 0, 255), "bathroom"),
           "black": ((0, 0, 0), "living_room")}
# The same RC_* settings as the `server` fixture: the job and the service must run the same configuration.
RC_SETTINGS = {"RC_URL_ALLOWLIST": "localhost", "RC_FETCH_TOTAL_TIMEOUT_S": "2", "RC_FETCH_READ_TIMEOUT_S": "1",
               "RC_FETCH_CONNECT_TIMEOUT_S": "1", "RC_MAX_IMAGE_BYTES": str(4 << 20), "RC_MAX_PIXELS": "30000000"}
JOB_TIMEOUT_S = 300
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


# ----------------------------------------------------------------------------------------------------
# Ray processes: who they are, what they listen on, that they are gone


def descendants(pids: set[int]) -> set[int]:
    found = set(pids)
    for pid in list(pids):
        try:
            found |= {child.pid for child in psutil.Process(pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
    return found


def non_loopback_listeners(pids: set[int]) -> list[str]:
    """Listening TCP sockets of `pids` bound to anything but the loopback address."""
    return [f"{conn.laddr.ip}:{conn.laddr.port} (pid {conn.pid})" for conn in psutil.net_connections(kind="tcp")
            if conn.status == psutil.CONN_LISTEN and conn.pid in pids and conn.laddr.ip not in LOOPBACK]


def wait_gone(pids: set[int], timeout_s: float = 30.0) -> list[str]:
    """The processes of `pids` still running (zombies do not count) after up to `timeout_s`."""
    return [f"{process.pid} {process_name(process)}"
            for process in still_running(existing_processes(pids), timeout_s)]


def existing_processes(pids: set[int]) -> list[psutil.Process]:
    """Handles that tell these processes from later ones that reuse their pids."""
    processes = []
    for pid in pids:
        try:
            processes.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return processes


def process_name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.NoSuchProcess:
        return "(gone)"


class ProcessWatch:
    """Samples a process tree while a job runs: every pid seen, non-loopback listeners, where workers ran."""

    def __init__(self, roots: set[int], raylets: dict[int, str] | None = None) -> None:
        self.roots, self.raylets = roots, raylets or {}
        self.pids: set[int] = set()
        self.listeners: set[str] = set()
        self.nodes_with_model_actors: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "ProcessWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(0.5)

    def sample(self) -> None:
        pids = descendants(self.roots)
        self.pids |= pids
        self.listeners |= set(non_loopback_listeners(pids))
        for raylet, node in self.raylets.items():
            for child in descendants({raylet}) - {raylet}:
                try:
                    if psutil.Process(child).name().startswith("ray::MapWorker"):  # a model actor, not a decode task
                        self.nodes_with_model_actors.add(node)
                except psutil.NoSuchProcess:
                    pass


# ----------------------------------------------------------------------------------------------------
# The two-node cluster


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    """Head + one more node, 1 CPU each, every address 127.0.0.1; stopped and checked gone afterwards."""
    saved = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray then binds and dials 127.0.0.1 only
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="rc-ray-")  # short: Ray's socket paths must fit in 107 bytes
    cluster = Cluster(initialize_head=True, shutdown_at_exit=False, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "object_store_memory": 300 << 20, "temp_dir": temp_dir})
    started: set[int] = set()
    try:
        cluster.add_node(num_cpus=1, object_store_memory=300 << 20)
        cluster.wait_for_nodes()
        cluster.raylets = {info.process.pid: f"node{index}" for index, node in enumerate(cluster.list_all_nodes())
                           for info in node.all_processes["raylet"]}
        started = {info.process.pid for node in cluster.list_all_nodes()
                   for infos in node.all_processes.values() for info in infos}
        yield cluster
    finally:
        started |= descendants(started)  # the workers the raylets started
        processes = existing_processes(started)
        cluster.shutdown()
        if saved is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = saved
        left = wait_gone(started)
        if left:  # Ray 2.60's exit can deadlock a worker (bulk/job.py stop_ray): stop it as a job does
            print(f"\nRay processes still running 30 s after the cluster's shutdown, killed: {left}")
            kill_leftovers(processes, grace_s=0)
            left = wait_gone(started, 5)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes left running after the cluster's shutdown: {left}"


def test_cluster_has_two_nodes_on_loopback_only(ray_cluster: Any) -> None:
    nodes = ray_cluster.list_all_nodes()
    assert len(nodes) == 2 and len(ray_cluster.raylets) == 2
    assert {node.node_ip_address for node in nodes} == {"127.0.0.1"}
    assert ray_cluster.address.startswith("127.0.0.1:")
    raylets = set(ray_cluster.raylets)
    assert not non_loopback_listeners(descendants(raylets | {info.process.pid for node in nodes
                                                             for infos in node.all_processes.values()
                                                             for info in infos}))


# ----------------------------------------------------------------------------------------------------
# Running jobs


def job_env(tiny_model: TinyModel, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RC_", "RAY_ADDRESS"))}
    env.update({"BENTOML_HOME": str(tiny_model.home), "BENTOML_DO_NOT_TRACK": "true",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **RC_SETTINGS, **extra})
    return env


def bulk_command(source: Path, out: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "bulk", str(source), "--out", str(out), "--json", "--no-progress", *options]


def run_bulk(command: list[str], env: dict[str, str], watch: ProcessWatch | None = None) -> dict[str, Any]:
    """Run a job to its end; return its summary (fails the test with the job's stderr otherwise)."""
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    if watch is not None:
        watch.roots.add(process.pid)
    try:
        stdout, stderr = process.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    assert process.returncode == 0, f"bulk job failed ({process.returncode}):\n{stderr[-6000:]}"
    return json.loads(stdout.strip().splitlines()[-1])


def read_results(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".csv":  # an empty CSV field is a null (no result string is empty)
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    else:
        table = pq.read_table(path)
    return sorted(table.to_pylist(), key=lambda row: row["row"])


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real photos (links, never copies), plain colours, a PNG in a subfolder, a corrupt JPEG, a text file."""
    folder = tmp_path_factory.mktemp("catalogue")
    for photo in real_photos(per_class=2):
        (folder / f"real_{photo.parent.name}_{photo.name}").symlink_to(photo)
    for name, (colour, _) in COLOURS.items():
        (folder / f"{name}.jpg").write_bytes(solid_jpeg(colour))
    (folder / "sub").mkdir()
    (folder / "sub" / "green.png").write_bytes(encode(Image.new("RGB", (300, 200), (0, 255, 0)), "PNG"))
    (folder / "sub" / "broken.jpg").write_bytes(truncated(solid_jpeg((10, 20, 30), (800, 600)), 0.3))
    (folder / "notes.txt").write_text("not a photo\n")
    return folder


@pytest.fixture(scope="module")
def folder_job(ray_cluster: Any, tiny_model: TinyModel, photo_folder: Path,
               tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("folder_job") / "results.parquet"
    with ProcessWatch(set(ray_cluster.raylets), ray_cluster.raylets) as watch:
        summary = run_bulk(bulk_command(photo_folder, out, "--address", ray_cluster.address, "--batch-size", "4"),
                           job_env(tiny_model), watch)
    return {"summary": summary, "rows": read_results(out), "watch": watch, "out": out}


def test_folder_job_gives_one_row_per_file(folder_job: dict[str, Any], photo_folder: Path,
                                           tiny_model: TinyModel) -> None:
    rows = folder_job["rows"]
    files = sorted(str(path) for path in photo_folder.rglob("*") if path.is_file())
    assert [row["input"] for row in rows] == files  # sorted, recursive, nothing skipped
    assert [row["row"] for row in rows] == list(range(len(files)))
    by_name = {Path(row["input"]).relative_to(photo_folder).as_posix(): row for row in rows}
    assert by_name["sub/broken.jpg"]["error_code"] == "corrupt_image"
    assert by_name["notes.txt"]["error_code"] == "not_an_image"
    for name, (_, label) in COLOURS.items():
        assert by_name[f"{name}.jpg"]["class"] == label
    assert by_name["sub/green.png"]["class"] == "kitchen"
    for row in rows:
        assert row["model"] == tiny_model.tag
        if row["error_code"] is None:
            probabilities = [row[f"p_{label}"] for label in LABELS]
            assert sum(probabilities) == pytest.approx(1.0, abs=1e-9)
            assert row["confidence"] == max(probabilities) and row[f"p_{row['class']}"] == row["confidence"]
            assert row["uncertain"] == (row["confidence"] < 0.5) and row["error_message"] is None
        else:
            assert row["class"] is None and row["confidence"] is None and row["error_message"]
    summary = folder_job["summary"]
    assert summary["inputs"] == len(files) and summary["ok"] == len(files) - 2
    assert summary["errors"] == {"corrupt_image": 1, "not_an_image": 1}
    assert summary["classified_now"] == len(files) and summary["already_done"] == 0


def test_folder_job_ran_on_both_nodes_on_loopback(folder_job: dict[str, Any], ray_cluster: Any) -> None:
    watch = folder_job["watch"]
    assert watch.nodes_with_model_actors == set(ray_cluster.raylets.values())
    assert not watch.listeners


def test_a_job_knows_every_process_of_the_ray_it_started(folder_job: dict[str, Any], ray_cluster: Any) -> None:
    """`local_ray_processes` from the process that started Ray (here pytest, the cluster's parent): the raylets,
    the GCS, and nothing that is not Ray's."""
    found = {process.pid: process.name() for process in local_ray_processes()}
    assert set(ray_cluster.raylets) <= set(found) and "gcs_server" in found.values()
    ray_tree = descendants(set(ray_cluster.raylets) | {pid for pid, name in found.items() if name == "gcs_server"})
    outside = {pid: name for pid, name in found.items() if pid not in ray_tree}
    assert not outside, outside


def test_leftover_processes_are_killed_after_the_grace_period() -> None:
    lingering = subprocess.Popen(["sleep", "60"])
    quick = subprocess.Popen(["sleep", "0.2"])
    started = time.monotonic()
    kill_leftovers([psutil.Process(lingering.pid), psutil.Process(quick.pid)], grace_s=1.0)
    assert lingering.wait(timeout=5) == -signal.SIGKILL and quick.wait(timeout=5) == 0
    assert 1.0 <= time.monotonic() - started < 5.0


def test_bulk_answers_equal_the_service(folder_job: dict[str, Any], server: BentoServer, photo_folder: Path) -> None:
    """The same files through the running service (classify_batch) and through the bulk job."""
    rows = folder_job["rows"]
    paths = [Path(row["input"]) for row in rows]
    with server.client() as client:
        answers = []
        for start in range(0, len(paths), 16):
            answers += client.classify_batch(images=paths[start:start + 16])["results"]
    assert len(answers) == len(rows)
    for row, answer in zip(rows, answers):
        if answer.get("error"):
            assert row["error_code"] == answer["error"]["code"], row["input"]
            continue
        result = answer["result"]
        assert row["class"] == result["class"] and row["uncertain"] == result["uncertain"], row["input"]
        service = dict(result["probabilities"])
        for label in LABELS:
            assert abs(row[f"p_{label}"] - service[label]) <= 1e-5, (row["input"], label)
    assert sum(1 for answer in answers if not answer.get("error")) >= 8


@pytest.fixture(scope="module")
def url_job(ray_cluster: Any, tiny_model: TinyModel, image_host: ImageHost,
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("url_job")
    (folder / "local.jpg").write_bytes(solid_jpeg((0, 0, 255)))
    inputs = [image_host.add("blue-url.jpg", solid_jpeg((0, 0, 255))),
              image_host.add("green-url.png", encode(Image.new("RGB", (64, 48), (0, 255, 0)), "PNG")),
              image_host.url("/status/404"),
              "http://10.1.2.3/private.jpg",  # refused before any connection: a private address
              "ftp://localhost/photo.jpg",
              "local.jpg",  # relative to the list file's folder
              "missing.jpg",
              image_host.url("/img/blue-url.jpg")]  # a second time: a second row
    source = folder / "inputs.txt"
    source.write_text("# photos of one listing\n" + "\n".join(inputs) + "\n\n")
    out = folder / "results.csv"
    summary = run_bulk(bulk_command(source, out, "--address", ray_cluster.address), job_env(tiny_model))
    return {"inputs": inputs, "rows": read_results(out), "summary": summary}


def test_url_list_job_fetches_safely_and_keeps_every_input(url_job: dict[str, Any]) -> None:
    rows = url_job["rows"]
    assert [row["input"] for row in rows] == url_job["inputs"]
    assert [(row["class"], row["error_code"]) for row in rows] == [
        ("bathroom", None), ("kitchen", None), (None, "fetch_failed"), (None, "url_host_not_allowed"),
        (None, "url_scheme_not_allowed"), ("bathroom", None), (None, "fetch_failed"), ("bathroom", None)]
    assert url_job["summary"]["errors"] == {"fetch_failed": 2, "url_host_not_allowed": 1, "url_scheme_not_allowed": 1}


def test_url_errors_equal_the_service(url_job: dict[str, Any], server: BentoServer) -> None:
    urls = [row for row in url_job["rows"] if "://" in row["input"]]
    with server.client() as client:
        answers = client.classify_batch(image_urls=[row["input"] for row in urls])["results"]
    for row, answer in zip(urls, answers):
        if answer.get("error"):
            assert row["error_code"] == answer["error"]["code"], row["input"]
        else:
            assert row["class"] == answer["result"]["class"]
            for label, probability in answer["result"]["probabilities"]:
                assert abs(row[f"p_{label}"] - probability) <= 1e-5


# ----------------------------------------------------------------------------------------------------
# Killed mid-job, then resumed


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def classify_actor_pids(raylets: set[int]) -> list[int]:
    found = []
    for pid in descendants(raylets) - raylets:
        try:
            if "MapBatches(Classify)" in psutil.Process(pid).name():
                found.append(pid)
        except psutil.NoSuchProcess:
            pass
    return found


def test_killed_worker_then_killed_driver_then_resume_keeps_every_input_once(
        ray_cluster: Any, tiny_model: TinyModel, photo_folder: Path, tmp_path: Path) -> None:
    photos = sorted(str(path) for path in photo_folder.glob("*.jpg"))
    inputs = [photos[index % len(photos)] for index in range(1200)]
    source = tmp_path / "catalogue.txt"
    source.write_text("\n".join(inputs) + "\n")
    out = tmp_path / "results.parquet"
    command = bulk_command(source, out, "--address", ray_cluster.address, "--batch-size", "16", "--part-rows", "32")
    work = WorkDir(out)
    log = tmp_path / "driver.log"
    with log.open("w") as log_file:
        driver = subprocess.Popen(command, cwd=REPO_ROOT, env=job_env(tiny_model), stdout=log_file,
                                  stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(work.parts()) >= 1 or driver.poll() is not None, 180, "the first part")
        actors = classify_actor_pids(set(ray_cluster.raylets))
        assert actors and driver.poll() is None, "the job ended before a worker could be killed"
        os.kill(actors[0], signal.SIGKILL)  # an inference worker dies mid-job: Ray restarts it
        parts_after_kill = len(work.parts())
        wait_for(lambda: len(work.parts()) >= parts_after_kill + 3 or driver.poll() is not None, 180,
                 "parts after the worker was killed")
        assert driver.poll() is None, f"the job did not survive its worker's death:\n{log.read_text()[-4000:]}"
        driver.send_signal(signal.SIGKILL)  # then the driver dies: the job stops, half done
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert not out.exists()
    done_before = int(work.done_rows(len(inputs)).sum())
    assert 0 < done_before < len(inputs)

    summary = run_bulk(command, job_env(tiny_model))  # the same command again

    assert summary["resumed"] and summary["already_done"] == done_before
    assert summary["classified_now"] == len(inputs) - done_before
    rows = read_results(out)
    assert [row["row"] for row in rows] == list(range(len(inputs)))  # every input once, none twice
    assert [row["input"] for row in rows] == inputs
    assert all(row["error_code"] is None for row in rows) and summary["ok"] == len(inputs)
    expected = {path: label for name, (_, label) in COLOURS.items() for path in photos if path.endswith(f"/{name}.jpg")}
    assert all(row["class"] == expected[row["input"]] for row in rows if row["input"] in expected)


# ----------------------------------------------------------------------------------------------------
# Local mode: Ray started by the job itself, on 127.0.0.1, and stopped by it


def test_local_job_starts_and_stops_its_own_ray_on_loopback(tiny_model: TinyModel, photo_folder: Path,
                                                             tmp_path: Path) -> None:
    ray_tmp = Path(tempfile.mkdtemp(prefix="rc-ray-local-"))
    out = tmp_path / "local.parquet"
    env = job_env(tiny_model, RAY_TMPDIR=str(ray_tmp))
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")  # the job must keep to loopback by itself
    try:
        with ProcessWatch(set()) as watch:
            summary = run_bulk(bulk_command(photo_folder / "sub", out), env, watch)
        assert summary["inputs"] == 2 and summary["ok"] == 1 and summary["errors"] == {"corrupt_image": 1}
        assert len(watch.pids) > 3  # the driver plus Ray's own processes were seen
        assert not watch.listeners
        assert not wait_gone(watch.pids)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# Sources and resume bookkeeping, without Ray


def test_sources_list_folders_text_csv_and_parquet(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    for name in ("b/2.jpg", "a.jpg", "b/1.jpg"):
        (tmp_path / name).write_bytes(b"x")
    target = tmp_path / "work" / "inputs.parquet"
    assert write_input_list(tmp_path / "b", target) == 2
    assert pq.read_table(target).to_pylist() == [{"row": 0, "input": str(tmp_path / "b/1.jpg")},
                                                 {"row": 1, "input": str(tmp_path / "b/2.jpg")}]
    (tmp_path / "list.txt").write_text("# comment\nhttp://x/1.jpg\n\n  a.jpg  \n")
    write_input_list(tmp_path / "list.txt", target)
    assert pq.read_table(target).column("input").to_pylist() == ["http://x/1.jpg", "a.jpg"]
    (tmp_path / "list.csv").write_text("id,url\n1,http://x/1.jpg\n2,\n3,http://x/3.jpg\n")
    write_input_list(tmp_path / "list.csv", target)
    assert pq.read_table(target).column("input").to_pylist() == ["http://x/1.jpg", "http://x/3.jpg"]
    pq.write_table(pa.table({"id": [1, 2], "photo": ["p1.jpg", "p2.jpg"]}), tmp_path / "list.parquet")
    with pytest.raises(SourceError, match="--column"):
        write_input_list(tmp_path / "list.parquet", target)
    write_input_list(tmp_path / "list.parquet", target, column="photo")
    assert pq.read_table(target).column("input").to_pylist() == ["p1.jpg", "p2.jpg"]
    with pytest.raises(SourceError, match="neither"):
        write_input_list(tmp_path / "nowhere", target)
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(SourceError, match="no inputs"):
        write_input_list(tmp_path / "empty.txt", target)


def result_table(rows: list[int]) -> pa.Table:
    schema = result_schema(LABELS)
    return pa.Table.from_pylist([{"row": row, "input": f"in{row}", "class": "kitchen", "model": "m"} for row in rows],
                                schema=schema)


def test_consolidation_keeps_one_row_per_input_and_refuses_gaps(tmp_path: Path) -> None:
    work = WorkDir(tmp_path / "results.parquet")
    assert not work.start(JobSpec(source="s", column=None, model="m", format="parquet"))
    (tmp_path / "list.txt").write_text("".join(f"in{i}\n" for i in range(5)))
    write_input_list(tmp_path / "list.txt", work.inputs)
    writer = PartWriter(work.path, result_schema(LABELS), part_rows=3)
    writer.add(result_table([0, 1, 2]))
    writer.add(result_table([4, 2]))  # row 2 a second time, as after a retried block
    writer.flush()
    assert len(work.parts()) == 2
    with pytest.raises(RuntimeError, match="1 of 5 inputs"):
        consolidate(work, 5, result_schema(LABELS), "parquet")
    assert not work.results.exists()
    writer.add(result_table([3]))
    writer.flush()
    assert work.done_rows(5).all()
    assert consolidate(work, 5, result_schema(LABELS), "parquet") == Counter({"ok": 5})
    assert sorted(pq.read_table(work.results).column("row").to_pylist()) == [0, 1, 2, 3, 4]
    assert work.start(JobSpec(source="s", column=None, model="m", format="parquet"))  # resuming
    with pytest.raises(JobMismatch, match="model was 'm', now 'other'"):
        work.start(JobSpec(source="s", column=None, model="other", format="parquet"))


def test_pending_inputs_skip_done_rows(tmp_path: Path) -> None:
    (tmp_path / "list.txt").write_text("".join(f"{i}.jpg\n" for i in range(10)))
    work = WorkDir(tmp_path / "results.parquet")
    write_input_list(tmp_path / "list.txt", work.inputs)
    done = np.zeros(10, dtype=bool)
    done[[0, 3, 4, 9]] = True
    blocks = list(work.pending_inputs(done, rows_per_block=4))
    assert [block.column("row").to_pylist() for block in blocks] == [[1, 2], [5, 6, 7], [8]]


def test_model_actors_go_one_per_node_first_then_by_cores() -> None:
    assert dealt_slots({"a": 4.0, "b": 2.0, "c": 0.5}) == ["a", "b", "c", "a", "b", "a", "a"]
    node_a, node_b = "a" * 56, "b" * 56  # Ray's node ids are 28 bytes in hex
    placement = ActorPlacement({node_a: 1.0, node_b: 1.0})
    nodes = [placement()["scheduling_strategy"].node_id for _ in range(3)]
    assert nodes == [node_a, node_b, node_a]
    assert all(placement()["scheduling_strategy"].soft for _ in range(2))  # a lost node does not stall the job
    assert ActorPlacement({})() == {}  # no node known yet: Ray's SPREAD decides


# ----------------------------------------------------------------------------------------------------
# A bigger run (make test-e2e)


@pytest.mark.e2e
def test_two_thousand_real_photos_on_the_cluster_match_the_offline_model(ray_cluster: Any, tiny_model: TinyModel,
                                                                          tmp_path: Path) -> None:
    from inference.config import KernelConfig
    from inference.decode import decode_image
    from inference.model import OnnxClassifier
    from testkit.photos import DEFAULT_DATA, find_room_photos

    photos = [str(path) for path in find_room_photos(DEFAULT_DATA, 2000)]
    source = tmp_path / "catalogue.csv"
    source.write_text("id,path\n" + "".join(f"{index},{path}\n" for index, path in enumerate(photos)))
    out = tmp_path / "results.parquet"
    summary = run_bulk(bulk_command(source, out, "--address", ray_cluster.address), job_env(tiny_model))
    rows = read_results(out)
    assert summary["ok"] == len(photos) and [row["input"] for row in rows] == photos
    offline = OnnxClassifier.from_info(tiny_model.onnx_path, tiny_model.info)
    settings = KernelConfig.from_env(RC_SETTINGS)  # what the job read
    limits = settings.image_limits()
    for row in rows[::40]:  # 50 spread over the run, through the offline reference path
        image = decode_image(Path(row["input"]).read_bytes(), limits, min_size=offline.info.preprocessing.resize_size)
        prediction = offline.predict([image], top_k=4, threshold=settings.uncertain_threshold)[0]
        assert row["class"] == prediction.label
        for label, probability in prediction.probabilities:
            assert abs(row[f"p_{label}"] - probability) <= 1e-5
