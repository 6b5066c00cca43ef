"""The teacher's outputs, computed once per image and cached on disk.

The teacher costs about 20x a MobileNet forward pass, so its outputs are never recomputed: every entry is keyed
by the sha256 of the image file's bytes (and the cache folder by the teacher checkpoint, its preprocessing and
precision). A second run, another student, or a rebuilt dataset holding the same photos reads them back; a
changed or new photo is computed, nothing else. Entries are written in chunks, so an interrupted pass
resumes where it stopped. Each pass appends its measured cost to `passes.jsonl`, tagged with the dataset
fingerprint it ran for.

The cache holds all 365 Places logits (float16): the room logits are a slice, the rest tells the label
audit what the teacher thinks a photo shows.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data_prep.common import OTHER
from training.data import Sample, load_rgb
from training.places365 import CHECKPOINT_NAME
from training.teacher import (
    NUM_SCENES,
    PROBABILITY_FLOOR,
    TEACHER_TRANSFORM,
    Places365Teacher,
    grouped_log_probabilities,
    teacher_preprocess,
)
from training.teacher_head import cross_fitted_logits

CHUNK_SIZE = 256  # images per file written: what an interrupted pass can lose at most


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def default_cache_dir() -> Path:
    """`$TORCH_HOME/soft_targets`: next to the hub cache that holds the teacher's checkpoint."""
    return Path(torch.hub.get_dir()).parent / "soft_targets"


def teacher_key(teacher: Places365Teacher, bf16: bool) -> str:
    """Identifies what computed the entries: the weights themselves, the preprocessing, the precision."""
    digest = hashlib.sha256()
    for name, tensor in sorted(teacher.network.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes()[:4096])  # a fingerprint, not a full hash
    digest.update(TEACHER_TRANSFORM.cache_key_text().encode())
    digest.update(b"bf16" if bf16 else b"fp32")
    return f"{CHECKPOINT_NAME.split('.')[0]}-{digest.hexdigest()[:16]}"


class SoftTargetCache:
    """Content-addressed store of 365 Places logits per image: `<dir>/<teacher key>/part-*.pt`."""

    def __init__(self, cache_dir: Path, key: str) -> None:
        self.folder = Path(cache_dir) / key
        self.entries: dict[str, torch.Tensor] = {}
        for part in sorted(self.folder.glob("part-*.pt")):
            chunk = torch.load(part, weights_only=True)
            self.entries.update(zip(chunk["digests"], chunk["logits"]))

    def missing(self, digests: list[str]) -> list[int]:
        return [i for i, digest in enumerate(digests) if digest not in self.entries]

    def add_chunk(self, digests: list[str], logits: torch.Tensor) -> None:
        """Write one chunk atomically (temp file, then rename): a killed pass never leaves a broken part."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"part-{time.time_ns()}-{os.getpid()}.pt"
        temporary = path.with_suffix(".tmp")
        torch.save({"digests": list(digests), "logits": logits.half().contiguous()}, temporary)
        os.replace(temporary, path)
        self.entries.update(zip(digests, logits.half()))

    def lookup(self, digests: list[str]) -> torch.Tensor:
        return torch.stack([self.entries[digest] for digest in digests]).float()

    def record_pass(self, record: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "passes.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")


class TeacherInputs(torch.utils.data.Dataset):
    """Images in CSAIL's own transform (`TeacherTransform`: squash to 256x256, centre crop 224)."""

    def __init__(self, samples: list[Sample]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(teacher_preprocess(load_rgb(self.samples[index].path)))


@torch.no_grad()
def run_teacher(teacher: Places365Teacher, images: torch.Tensor, bf16: bool) -> torch.Tensor:
    """365 scene logits, float32 on the CPU. bfloat16 on CPUs that have it: about 2x faster, and the
    room probabilities differ from float32 by ~1e-3 (measured), far below what distillation can notice."""
    device = next(teacher.parameters()).device
    images = images.to(device).float().contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return teacher.scene_logits(images).float().cpu()


def bf16_is_fast() -> bool:
    """bfloat16 autocast pays off on GPUs and on CPUs with native bf16 instructions (AVX512-BF16, AMX)."""
    if torch.cuda.is_available():
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def teacher_scene_logits(teacher: Places365Teacher, samples: list[Sample], cache_dir: Path, dataset_fingerprint: str,
                         batch_size: int = 32, workers: int = 2, desc: str = "teacher") -> tuple[torch.Tensor, dict]:
    """[N, 365] Places logits of `samples` (centre view, CSAIL preprocessing): cached entries are read back,
    the rest computed in chunks and written as they finish. Returns the logits and this pass's cost."""
    bf16 = bf16_is_fast()
    cache = SoftTargetCache(cache_dir, teacher_key(teacher, bf16))
    digests = [file_digest(sample.path) for sample in samples]
    todo = cache.missing(digests)
    started = time.perf_counter()
    if todo:
        teacher = teacher.to(memory_format=torch.channels_last).eval()
        loader = torch.utils.data.DataLoader(TeacherInputs([samples[i] for i in todo]), batch_size=batch_size,
                                             shuffle=False, num_workers=workers)
        pending_digests: list[str] = []
        pending_logits: list[torch.Tensor] = []
        done = 0
        for images in tqdm(loader, desc=f"{desc}: {len(todo)} of {len(samples)} images to compute", unit="batch"):
            logits = run_teacher(teacher, images, bf16)
            pending_digests += [digests[i] for i in todo[done:done + len(images)]]
            pending_logits.append(logits)
            done += len(images)
            if len(pending_digests) >= CHUNK_SIZE:
                cache.add_chunk(pending_digests, torch.cat(pending_logits))
                pending_digests, pending_logits = [], []
        if pending_digests:
            cache.add_chunk(pending_digests, torch.cat(pending_logits))
    seconds = time.perf_counter() - started
    cost = {"dataset_fingerprint": dataset_fingerprint, "images": len(samples), "computed": len(todo),
            "reused": len(samples) - len(todo), "seconds": round(seconds, 2),
            "images_per_second": round(len(todo) / seconds, 2) if todo else None, "bf16": bf16,
            "threads": torch.get_num_threads(), "cache": str(cache.folder), "desc": desc}
    if todo:
        cache.record_pass(cost)
    print(f"{desc}: {cost['computed']} computed, {cost['reused']} reused from {cache.folder} in {seconds:.1f} s")
    logits = cache.lookup(digests)
    assert logits.shape == (len(samples), NUM_SCENES)
    return logits, cost


LOG_ZERO = float(np.log(PROBABILITY_FLOOR))  # the log-probability of "not this one" in a target


def on_the_labels_side(log_probabilities: torch.Tensor, targets: torch.Tensor, other_index: int | None) -> torch.Tensor:
    """Distillation targets that agree with the label on "room or not": for a room photo the teacher's belief among
    the rooms (its mass on every other scene removed, since the label says it is a room: a living room that looks
    a bit like a dining room must not learn `other`), for an `other` photo `other` (its resemblance to a room must
    not teach a room). [..., N, labels] log-probabilities, `targets` [N]; unchanged without an `other` label."""
    if other_index is None:
        return log_probabilities
    is_other = (targets == other_index)[:, None]
    column_is_other = torch.arange(log_probabilities.shape[-1]) == other_index
    keep = torch.where(is_other, column_is_other, ~column_is_other)
    return torch.where(keep, log_probabilities, torch.full_like(log_probabilities, LOG_ZERO))


def room_logits(scene_logits: torch.Tensor | np.ndarray, teacher: Places365Teacher) -> np.ndarray:
    """The teacher's log-probabilities of our classes, in the model's label order (logits for a softmax)."""
    return grouped_log_probabilities(torch.as_tensor(scene_logits), teacher.membership.cpu()).numpy()


def distillation_targets(scene_logits: torch.Tensor, teacher: Places365Teacher, targets: torch.Tensor,
                         labels: list[str], kind: str) -> torch.Tensor:
    """[N, labels] what the student learns from the teacher on each training photo (`Recipe.kd_teacher`):
    "zero_shot", the teacher's grouped scenes on the label's side of room-or-other; "fine_tuned", the five-way
    logits of a linear head on its scene outputs, each photo's from a head fitted without it."""
    if kind == "fine_tuned":
        return cross_fitted_logits(scene_logits.float(), targets, len(labels))
    other_index = labels.index(OTHER) if OTHER in labels else None
    return on_the_labels_side(torch.from_numpy(room_logits(scene_logits, teacher)).float(), targets, other_index)
