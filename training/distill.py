"""Distillation from the Places365 teacher: its pass over the dataset, its zero-shot report (the compare
table's teacher row) and the label audit (photos whose label a confident teacher disputes)."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from data_prep.common import OTHER  # noqa: E402
from inference.postprocess import softmax  # noqa: E402
from training.data import Sample, dataset_fingerprint, discover_labels, list_samples, load_rgb  # noqa: E402
from training.evaluate import accuracy_by_source  # noqa: E402
from training.metrics import calibration_bins, classification_report, fit_temperature  # noqa: E402
from training.openset import openset_scores, other_scenes_of  # noqa: E402
from training.soft_targets import (  # noqa: E402
    SoftTargetCache,
    bf16_is_fast,
    default_cache_dir,
    file_digest,
    room_logits,
    teacher_key,
    teacher_scene_logits,
)
from training.teacher import TEACHER_TRANSFORM, Places365Teacher, load_teacher, scene_names  # noqa: E402
from training.teacher_head import fit_teacher_head  # noqa: E402

SPLITS = ("train", "val", "test")
AUDIT_CONFIDENCE = 0.9  # the teacher's probability (over our four rooms) for a class other than the label
AUDIT_GRID_MAX = 48


def load_teacher_for(labels: list[str], weights_dir: Path | None) -> Places365Teacher:
    return load_teacher(labels, weights_dir)


def centre_scene_logits(teacher: Places365Teacher, data_root: Path, samples: list[Sample],
                        cache_dir: Path | None) -> tuple[torch.Tensor, dict[str, Any]]:
    """[N, 365] Places logits of `samples` from the soft-target cache (computed there once)."""
    return teacher_scene_logits(teacher, samples, cache_dir or default_cache_dir(), dataset_fingerprint(data_root),
                                desc="teacher soft targets, train")


def audit_flags(room: np.ndarray, targets: np.ndarray, threshold: float = AUDIT_CONFIDENCE) -> np.ndarray:
    """True where the teacher gives a class other than the label a probability >= `threshold`."""
    probabilities = softmax(room)
    return (probabilities.argmax(axis=1) != targets) & (probabilities.max(axis=1) >= threshold)


def teacher_pass(data: Path, weights_dir: Path | None, cache_dir: Path | None = None, splits: tuple[str, ...] = SPLITS,
                 max_per_class: int | None = None) -> dict[str, Any]:
    """Scene logits of every image of `splits` (computed once, then read from the cache) and each split's cost."""
    labels = discover_labels(data)
    teacher = load_teacher(labels, weights_dir)
    fingerprint = dataset_fingerprint(data)
    result: dict[str, Any] = {"labels": labels, "teacher": teacher, "samples": {}, "scene_logits": {}, "cost": {}}
    for split in splits:
        samples = list_samples(data, split, labels, max_per_class)
        logits, cost = teacher_scene_logits(teacher, samples, cache_dir or default_cache_dir(), fingerprint,
                                            desc=f"teacher {split}")
        result["samples"][split], result["scene_logits"][split], result["cost"][split] = samples, logits.numpy(), cost
    return result


def cached_scene_logits(teacher: Places365Teacher, samples: list[Sample], cache_dir: Path | None
                        ) -> tuple[list[Sample], np.ndarray]:
    """The samples whose teacher outputs are already cached, and those outputs (nothing is computed)."""
    cache = SoftTargetCache(cache_dir or default_cache_dir(), teacher_key(teacher, bf16_is_fast()))
    digests = [file_digest(s.path) for s in samples]
    kept = [i for i, d in enumerate(digests) if d in cache.entries]
    if not kept:
        return [], np.zeros((0, 365), np.float32)
    return [samples[i] for i in kept], cache.lookup([digests[i] for i in kept]).numpy()


def label_audit(data: Path, teacher: Places365Teacher, out_dir: Path, weights_dir: Path | None,
                cache_dir: Path | None = None, splits: tuple[str, ...] = SPLITS) -> dict[str, Any]:
    """CSV + thumbnail grid of the photos a confident teacher labels otherwise, over every split whose
    teacher outputs are cached (the train split always is when distilling). Lists, never drops."""
    labels = teacher.labels
    names = scene_names(weights_dir)
    rows, checked = [], {}
    for split in splits:
        samples, scenes = cached_scene_logits(teacher, list_samples(data, split, labels), cache_dir)
        checked[split] = len(samples)
        if not samples:
            continue
        room = room_logits(scenes, teacher)
        targets = np.array([s.label for s in samples])
        probabilities = softmax(room)
        scene_probabilities = softmax(scenes)
        for i in np.flatnonzero(audit_flags(room, targets)):
            top_scene = int(scenes[i].argmax())
            rows.append({"split": split, "path": str(samples[i].path.relative_to(data)), "source": samples[i].source,
                         "label": labels[targets[i]], "teacher_class": labels[int(probabilities[i].argmax())],
                         "teacher_confidence": round(float(probabilities[i].max()), 4),
                         "teacher_top_scene": names[top_scene],
                         "teacher_top_scene_probability": round(float(scene_probabilities[i, top_scene]), 4)})
    rows.sort(key=lambda row: -row["teacher_confidence"])
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = ["split", "path", "source", "label", "teacher_class", "teacher_confidence", "teacher_top_scene",
              "teacher_top_scene_probability"]
    with open(out_dir / "label_audit.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    plot_audit_grid(data, rows[:AUDIT_GRID_MAX], out_dir / "label_audit.png")
    summary = {"threshold": AUDIT_CONFIDENCE, "checked": checked, "flagged": len(rows),
               "flagged_by_split": {s: sum(r["split"] == s for r in rows) for s in splits},
               "flagged_by_source": {src: sum(r["source"] == src for r in rows)
                                     for src in sorted({r["source"] for r in rows})},
               "csv": "label_audit.csv", "grid": "label_audit.png"}
    (out_dir / "label_audit.json").write_text(json.dumps(summary, indent=2))
    lines = ["# Label audit: photos a confident teacher labels otherwise", "",
             f"The Places365 teacher gives another of our classes a probability >= {AUDIT_CONFIDENCE} "
             "(softmax over the four room outputs). Listed for people to review; nothing is dropped or relabelled "
             "automatically.", "",
             f"Checked: {checked}; flagged: {len(rows)} ({summary['flagged_by_split']}, "
             f"by source {summary['flagged_by_source']}).", "",
             f"All rows: [label_audit.csv](label_audit.csv). "
             f"The {min(len(rows), AUDIT_GRID_MAX)} most confident:", "",
             "![label audit](label_audit.png)", ""]
    (out_dir / "label_audit.md").write_text("\n".join(lines))
    print(f"label audit: {len(rows)} flagged of {sum(checked.values())} checked -> {out_dir / 'label_audit.csv'}")
    return summary


def plot_audit_grid(data: Path, rows: list[dict[str, Any]], path: Path, columns: int = 8) -> None:
    count = max(len(rows), 1)
    lines = (count + columns - 1) // columns
    figure, axes = plt.subplots(lines, columns, figsize=(2.1 * columns, 2.9 * lines), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, row in zip(axes.flat, rows):
        image = load_rgb(data / row["path"])
        image.thumbnail((160, 160))
        axis.imshow(image)
        axis.set_title(f"label {row['label']}\nteacher {row['teacher_class']} {row['teacher_confidence']:.2f}\n"
                       f"({row['teacher_top_scene']})", fontsize=7)
    if not rows:
        axes.flat[0].text(0.5, 0.5, "no photo flagged", ha="center", va="center")
    figure.suptitle(f"Label audit: {len(rows)} most confident disagreements (label vs teacher)", fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 0.97), h_pad=1.5)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def teacher_report(data: Path, weights_dir: Path | None, out_dir: Path, cache_dir: Path | None = None,
                   latency: bool = True) -> dict[str, Any]:
    """Zero-shot scores of the teacher's room outputs (each room the sum of its scenes, `other` every other
    scene; temperature fitted on val), with `other` its open-set scores too, its latency in ONNX Runtime as the
    students are measured, and the label audit; the compare table's teacher row. `fine_tuned`: the same scores
    for the teacher with a linear head fitted on its training photos' scene outputs (training/teacher_head.py),
    the teacher a `fine_tuned` recipe distils from."""
    passed = teacher_pass(data, weights_dir, cache_dir, ("train", "val", "test"))
    teacher, labels = passed["teacher"], passed["labels"]
    scenes = passed["scene_logits"]
    report: dict[str, Any] = {"labels": labels, **scores(room_logits(scenes["val"], teacher),
                                                         room_logits(scenes["test"], teacher), passed)}
    train_targets = torch.tensor([s.label for s in passed["samples"]["train"]])
    head = fit_teacher_head(torch.from_numpy(scenes["train"]), train_targets, len(labels))
    with torch.no_grad():
        report["fine_tuned"] = scores(head(torch.from_numpy(scenes["val"])).numpy(),
                                      head(torch.from_numpy(scenes["test"])).numpy(), passed)
    report["teacher_pass"] = passed["cost"]
    report["params_m"] = sum(p.numel() for p in teacher.parameters()) / 1e6
    if latency:
        report["latency"], report["onnx_bytes"] = teacher_latency(teacher, out_dir)
    report["label_audit"] = label_audit(data, teacher, out_dir, weights_dir, cache_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "teacher_report.json").write_text(json.dumps(report, indent=2))
    return report


def scores(val_logits: np.ndarray, test_logits: np.ndarray, passed: dict[str, Any]) -> dict[str, Any]:
    """The teacher's val/test report on our labels from its logits on them (temperature fitted on val)."""
    labels = passed["labels"]
    val_targets = np.array([s.label for s in passed["samples"]["val"]])
    test_targets = np.array([s.label for s in passed["samples"]["test"]])
    temperature = fit_temperature(val_logits, val_targets)
    result: dict[str, Any] = {
        "temperature": temperature,
        "val": classification_report(val_targets, val_logits.argmax(axis=1), labels),
        "test": classification_report(test_targets, test_logits.argmax(axis=1), labels),
        "test_by_source": accuracy_by_source(passed["samples"]["test"], test_targets, test_logits.argmax(axis=1)),
        "calibration": {"before": calibration_bins(softmax(test_logits), test_targets),
                        "after": calibration_bins(softmax(test_logits, temperature), test_targets),
                        "val_after": calibration_bins(softmax(val_logits, temperature), val_targets)},
    }
    if OTHER in labels:
        seen = other_scenes_of(passed["samples"]["train"], labels)
        result["openset"] = {split: openset_scores(logits, passed["samples"][split], labels, temperature, seen)
                             for split, logits in (("val", val_logits), ("test", test_logits))}
    return result


def teacher_latency(teacher: Places365Teacher, out_dir: Path) -> tuple[dict[str, float], int]:
    """ONNX Runtime FP32 latency of the teacher, measured like the students (batch 1 and 16, 2 threads)."""
    from training.export import export_onnx
    from training.latency import measure_latency_ms

    size = TEACHER_TRANSFORM.image_size
    started = time.perf_counter()
    path = export_onnx(teacher.cpu().eval(), out_dir / "teacher.onnx", size)
    print(f"exported the teacher to {path} in {time.perf_counter() - started:.0f} s")
    return measure_latency_ms(path, size, repeats=5), path.stat().st_size
