"""Distillation from the Places365 teacher: the teacher's pass over the dataset, its zero-shot report, the label audit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from training.data import dataset_fingerprint, discover_labels, list_samples
from training.soft_targets import default_cache_dir, room_logits, teacher_scene_logits
from training.teacher import load_teacher

SPLITS = ("train", "val", "test")


def teacher_pass(data: Path, weights_dir: Path | None, cache_dir: Path | None = None, splits: tuple[str, ...] = SPLITS,
                 max_per_class: int | None = None) -> dict[str, Any]:
    """Scene logits of every image of `splits` (computed once, then read from the cache) and the pass's cost."""
    labels = discover_labels(data)
    teacher = load_teacher(labels, weights_dir)
    fingerprint = dataset_fingerprint(data)
    result: dict[str, Any] = {"labels": labels, "teacher": teacher, "samples": {}, "scene_logits": {}, "cost": {}}
    for split in splits:
        samples = list_samples(data, split, labels, max_per_class)
        logits, cost = teacher_scene_logits(teacher, samples, cache_dir or default_cache_dir(), fingerprint,
                                            desc=f"teacher {split}")
        result["samples"][split], result["scene_logits"][split], result["cost"][split] = samples, logits, cost
    return result
