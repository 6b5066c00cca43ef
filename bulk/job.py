"""A bulk job: list SOURCE, skip what earlier runs wrote, classify the rest on Ray, write RESULTS, summarise.

The Ray Data pipeline streams (nothing is materialised; Ray's backpressure keeps a bounded number of blocks in
flight, so memory stays flat however many inputs there are):

    numbered inputs (object store, blocks put by the driver)
      -> map_batches(load_batch)    Ray tasks: read file / fetch URL, decode, preprocess   [num_cpus=load_cpus]
      -> map_batches(Classify)      a fixed pool of actors, one ONNX Runtime session each  [num_cpus=actor_cpus]
      -> iter_batches on the driver -> atomic Parquet parts (resumable) -> RESULTS at the end

The two map stages ask for different CPU amounts, so Ray Data keeps them apart (it would otherwise fuse the
decode into the actors and lose the task parallelism). Result rows are small (~200 bytes), so the driver is
the one writer: RESULTS needs no storage shared by the workers, and parts are whole or absent.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from bulk.model import ModelBundle, read_model_bundle
from bulk.results import JobSpec, PartWriter, WorkDir, consolidate
from bulk.sources import base_dir, write_input_list
from bulk.stages import Classify, LoadSettings, blank_model_input, load_batch, result_schema
from inference.config import KernelConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_PACKAGES = ("bulk", "inference")  # what remote workers import, sent along by Ray (py_modules)
FORMATS = ("parquet", "csv")
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": every Ray address is 127.0.0.1
LEFTOVER_GRACE_S = 10.0  # after Ray's shutdown returns, before a local Ray process still running is killed
ACTOR_START_TIMEOUT_S = 600  # model actors waiting for a node (autoscaling clusters add one within minutes)
logger = logging.getLogger("bulk")


@dataclass(frozen=True)
class JobOptions:
    """The command line, parsed. None means: derive from the cores present (see `Resources`)."""

    source: Path
    out: Path
    model: str | None = None
    address: str | None = None
    format: str | None = None
    column: str | None = None
    batch_size: int = 32
    actors: int | None = None
    actor_cpus: float = 0.5
    load_cpus: float = 0.25
    load_tasks: int | None = None
    ort_threads: int = 1
    fetch_threads: int = 16
    part_rows: int = 5000
    progress: bool = True
    explain: bool = False  # add the top class's heatmap grid and crop box to every row (Parquet only)


@dataclass(frozen=True)
class Resources:
    """How the job uses the cluster's CPUs: per core, one inference actor and at most one decode task.

    Each is a worker process (a few hundred MB); capping the decode tasks keeps memory per core fixed, and
    Ray's backpressure keeps the decode from running far ahead of the model. Their fractional `num_cpus`
    (0.5 + 0.25 per core) lets both run on every core: the OS shares the core between them. `node_cpus` is
    where the actors go (`ActorPlacement`).
    """

    node_cpus: dict[str, float]
    cpus: float
    actors: int
    load_tasks: int

    @classmethod
    def plan(cls, node_cpus: dict[str, float], options: JobOptions) -> "Resources":
        cpus = sum(node_cpus.values()) or 1.0
        per_core = max(1, int(cpus))
        return cls(node_cpus=node_cpus, cpus=cpus, actors=options.actors or per_core,
                   load_tasks=options.load_tasks or per_core)


def output_format(options: JobOptions) -> str:
    if options.format:
        return options.format
    return "csv" if options.out.suffix.lower() == ".csv" else "parquet"


def run_job(options: JobOptions) -> dict[str, Any]:
    """Run (or resume) the job to the end; return the summary. Raises on bad arguments, never on bad inputs."""
    started = time.monotonic()
    config = KernelConfig.from_env()
    bundle = read_model_bundle(options.model or config.model_tag)
    info = bundle.info
    fmt = output_format(options)
    if options.explain:
        check_can_explain(bundle, fmt)
    work = WorkDir(options.out.resolve())
    resumed = work.start(JobSpec(source=str(options.source.resolve()), column=options.column, model=bundle.tag,
                                 format=fmt, explain=options.explain))
    if not work.inputs.exists():
        write_input_list(options.source, work.inputs, options.column)
    total = read_input_count(work)
    done = work.done_rows(total)
    pending = total - int(done.sum())
    schema = result_schema(info.labels, options.explain)
    settings = LoadSettings.from_config(config, info, base_dir(options.source), options.explain)
    stream = StreamStats()
    if pending:
        stream = classify_pending(work, done, pending, bundle, settings, config.uncertain_threshold, schema,
                                  options)
    outcomes = consolidate(work, total, schema, fmt)
    seconds = time.monotonic() - started
    summary = {"results": str(work.results), "model": bundle.tag, "inputs": total, "ok": outcomes.pop("ok", 0),
               "errors": dict(sorted(outcomes.items())), "resumed": resumed, "already_done": total - pending,
               "classified_now": stream.rows, "wall_s": round(seconds, 2),
               "images_per_s": round(stream.rows / seconds, 2) if seconds else 0.0,
               "pipeline_images_per_s": stream.pipeline_rate()}
    work.write_summary(summary)
    return summary


def check_can_explain(bundle: ModelBundle, fmt: str) -> None:
    """--explain needs a model with activation maps (its metadata says so) and a format with list columns."""
    if not bundle.metadata.get("explainable", False):
        raise ValueError(f"model {bundle.tag} has no activation maps (metadata 'explainable' is not true), so it "
                         "cannot explain; run without --explain or use a model exported with them")
    if fmt != "parquet":
        raise ValueError("--explain writes the heatmap as a list column, which CSV cannot hold: use a .parquet "
                         "RESULTS file")


def read_input_count(work: WorkDir) -> int:
    return pq.ParquetFile(work.inputs).metadata.num_rows


@dataclass
class StreamStats:
    """How many result rows arrived, and the time from Ray being up to the last one (Ray's start left out)."""

    rows: int = 0
    ray_ready_at: float = 0.0
    last_at: float = 0.0

    def add(self, rows: int) -> None:
        self.rows += rows
        self.last_at = time.monotonic()

    def pipeline_rate(self) -> float | None:
        seconds = self.last_at - self.ray_ready_at
        return round(self.rows / seconds, 2) if self.rows and seconds > 0 else None


def classify_pending(work: WorkDir, done, pending: int, bundle: ModelBundle, settings: LoadSettings,
                     threshold: float, schema: pa.Schema, options: JobOptions) -> StreamStats:
    """Run the Ray pipeline over the inputs without a result; return how many rows arrived, and when."""
    local = start_ray(options.address)
    import ray  # after start_ray, which sets what Ray reads at import
    writer = PartWriter(work.path, schema, options.part_rows)
    stream = StreamStats(ray_ready_at=time.monotonic())
    progress = tqdm(total=pending, unit="img", desc="bulk", disable=not options.progress, file=sys.stderr,
                    smoothing=0.05)
    errors = 0
    try:
        resources = Resources.plan(cpus_per_node(), options)
        rows_per_block = block_rows(pending, resources.cpus, options.batch_size)
        blocks = [ray.put(table) for table in work.pending_inputs(done, rows_per_block)]
        for table in classified_batches(blocks, ray.put(bundle), settings, threshold, resources, options):
            writer.add(table)
            stream.add(table.num_rows)
            errors += table.num_rows - table.column("error_code").null_count
            progress.update(table.num_rows)
            progress.set_postfix(errors=errors, refresh=False)
    finally:
        writer.flush()  # rows already received are kept, even on Ctrl-C
        progress.close()
        stop_ray(local)
    return stream


def classified_batches(blocks: list, bundle_ref: Any, settings: LoadSettings, threshold: float,
                       resources: Resources, options: JobOptions) -> Iterator[pa.Table]:
    import ray

    context = ray.data.DataContext.get_current()
    context.target_max_block_size = decoded_block_bytes(settings, options.batch_size)
    # Every model actor is up (one per node first, SPREAD) before the first batch is sent, so a short job
    # still uses every node; a cluster that cannot host the pool fails with Ray's "Timed out while starting
    # actors" instead of waiting forever.
    context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    dataset = ray.data.from_arrow_refs(blocks).map_batches(
        load_batch, fn_kwargs={"settings": settings, "fetch_threads": options.fetch_threads},
        batch_size=options.batch_size, batch_format="numpy", num_cpus=options.load_cpus,
        compute=ray.data.TaskPoolStrategy(size=resources.load_tasks))
    with warnings.catch_warnings():  # deprecated in Ray 2.60 with no replacement yet; pyproject pins Ray < 2.64
        warnings.filterwarnings("ignore", message="`ray_remote_args(_fn)?` is deprecated", category=DeprecationWarning)
        dataset = dataset.map_batches(
            Classify, fn_constructor_args=(bundle_ref, options.ort_threads, threshold, options.explain),
            compute=ray.data.ActorPoolStrategy(size=resources.actors), batch_size=options.batch_size,
            batch_format="numpy", num_cpus=options.actor_cpus, scheduling_strategy="SPREAD",
            ray_remote_args_fn=ActorPlacement(resources.node_cpus))
    return dataset.iter_batches(batch_size=None, batch_format="pyarrow")


def cpus_per_node() -> dict[str, float]:
    """The live nodes' CPUs, by node id (nodes without CPUs, such as a head kept for the driver, left out)."""
    import ray

    return {node["NodeID"]: node["Resources"].get("CPU", 0.0) for node in ray.nodes()
            if node["Alive"] and node["Resources"].get("CPU", 0.0) > 0}


def dealt_slots(cpus: dict[str, float]) -> list[str]:
    """Each node once per whole core, dealt in turn (A, B, A, B, A): the n-th model actor goes to slot n."""
    left = {node: max(1, int(count)) for node, count in cpus.items()}
    slots: list[str] = []
    while left:
        for node in list(left):
            slots.append(node)
            left[node] -= 1
            if not left[node]:
                del left[node]
    return slots


class ActorPlacement:
    """Ray Data asks this for each new model actor's remote args: the actors follow `dealt_slots`.

    One model per node comes before two on one, and each node gets actors in proportion to its cores.
    Ray's SPREAD alone does not promise that: its round-robin also counts the decode tasks, so two actors
    could share one node while another node's cores had no model. The node affinity is soft: an actor whose
    node is gone or full starts wherever Ray finds room; with no node known yet, SPREAD applies.
    """

    def __init__(self, cpus: dict[str, float]) -> None:
        self.slots = dealt_slots(cpus)
        self.started = 0

    def __call__(self) -> dict[str, Any]:
        if not self.slots:
            return {}
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = self.slots[self.started % len(self.slots)]
        self.started += 1
        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=True)}


def block_rows(pending: int, cpus: float, batch_size: int) -> int:
    """Rows per input block (one decode task each): a few blocks per core, at most 8 batches each, so the
    driver holds few object references even for millions of inputs."""
    return max(batch_size, min(8 * batch_size, math.ceil(pending / max(1.0, 4 * cpus))))


def decoded_block_bytes(settings: LoadSettings, batch_size: int) -> int:
    """Ray Data's block size target: one batch of model inputs per block (a bit under it, as Ray cuts a block
    only past 1.5x the target), so the actors start on a decode task's first batch, not on its last."""
    return int(0.8 * batch_size * blank_model_input(settings).nbytes)


def start_ray(address: str | None) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS), else start Ray on this machine, on 127.0.0.1 only;
    return whether Ray was started here.

    On a cluster, the `bulk` and `inference` packages travel with the job (Ray's py_modules): the workers'
    image needs only the Python dependencies (the bento's image plus Ray). Locally, RAY_ENABLE_WINDOWS_OR_OSX_
    CLUSTER=0 makes every Ray process bind and dial the loopback address (a local job needs no network); Ray
    reads it when it is imported, so it is set before the import.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        os.environ.setdefault(LOOPBACK_ONLY, "0")
    import ray
    from ray._private import ray_constants

    if address:
        ray.init(address=address, logging_level=logging.WARNING,
                 runtime_env={"py_modules": [str(REPO_ROOT / name) for name in SHIPPED_PACKAGES]})
    else:
        if ray_constants.ENABLE_RAY_CLUSTER:
            logger.warning("Ray was imported before %s=0 was set: local Ray may listen beyond 127.0.0.1",
                           LOOPBACK_ONLY)
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, logging_level=logging.WARNING,
                 object_store_memory=local_object_store_bytes(os.cpu_count() or 1))
    quiet_ray_data()
    return not address


def stop_ray(local: bool) -> None:
    """Disconnect from Ray; a Ray started by this job stops with every process of it.

    Ray's shutdown kills the raylet and the GCS; the workers are the raylet's children and exit when they
    notice it is gone. Once, on a loaded CI machine, a model actor was still running 30 s after the job had
    ended. So the local processes are listed before the shutdown, and any of them still running after a grace
    period is killed: a local job leaves nothing behind.
    """
    import ray

    ours = local_ray_processes() if local else []
    ray.shutdown()
    kill_leftovers(ours, LEFTOVER_GRACE_S)


def local_ray_processes() -> list[psutil.Process]:
    """The Ray this process started: its raylet, GCS and agents (children of this process), and every worker
    under them."""
    found = []
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.name() in ("raylet", "gcs_server") or child.name().startswith("ray::"):
                found += [child, *child.children(recursive=True)]
    return found


def kill_leftovers(processes: list[psutil.Process], grace_s: float) -> None:
    """Kill those of `processes` that have not exited within `grace_s`."""
    for process in still_running(processes, grace_s):
        logger.warning("Ray process %d outlived Ray's shutdown by %.0f s: killing it", process.pid, grace_s)
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def still_running(processes: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Those of `processes` still running (a zombie has exited) after waiting up to `timeout_s` for them."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [process for process in processes if is_running(process)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.2)


def is_running(process: psutil.Process) -> bool:
    try:  # is_running() also tells a reused pid from the process seen before
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def local_object_store_bytes(cpus: int) -> int:
    """256 MiB per core, at least 1 GiB: room for every actor's next batches, not for the whole catalogue.

    Ray's default (30 % of the machine's memory) would let the fast decode step run far ahead of the model
    and park gigabytes of decoded images; Ray Data buffers at most about half of the object store.
    """
    return max(1 << 30, cpus * (256 << 20))


def quiet_ray_data() -> None:
    """Our own progress bar and summary replace Ray Data's per-operator logs."""
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_auto_log_stats = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    # "the operator only received N input(s)": small jobs have fewer blocks than workers, which is fine
    warnings.filterwarnings("ignore", category=UserWarning, module=r"ray\.data\.")


def format_summary(summary: dict[str, Any]) -> str:
    errors = ", ".join(f"{code} {count}" for code, count in summary["errors"].items()) or "none"
    lines = [f"results: {summary['results']} (model {summary['model']})",
             f"inputs {summary['inputs']}: ok {summary['ok']}, errors {sum(summary['errors'].values())} ({errors})",
             f"this run: {summary['classified_now']} classified, {summary['already_done']} already done; "
             f"{summary['images_per_s']} images/s over the wall time of {summary['wall_s']} s "
             f"({summary['pipeline_images_per_s']} images/s once Ray was up)"]
    return "\n".join(lines)

