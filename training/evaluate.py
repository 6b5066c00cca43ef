"""Honest evaluation of the exported model, through the service's own decode and preprocessing code.

The temperature is fitted on the validation split only; the test split is scored once with it.
Writes `report.json`, `report.md`, `confusion_matrix.png` and `reliability.png`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data_prep.common import OTHER  # noqa: E402
from inference.config import KernelConfig  # noqa: E402
from inference.preprocess import Preprocessing, bytes_to_input, preprocess  # noqa: E402
from training.data import RandomLowResolution, Sample, load_rgb  # noqa: E402
from training.metrics import calibration_bins, classification_report, fit_temperature, negative_log_likelihood, softmax  # noqa: E402
from training.openset import (  # noqa: E402
    openset_markdown,
    openset_scores,
    plot_other_rates,
    population_rates,
    populations,
)

LogitsFn = Callable[[np.ndarray], np.ndarray]
SERVICE_DEFAULTS = KernelConfig()  # the service's default settings: decoder limits


def load_input(sample: Sample, config: Preprocessing) -> np.ndarray:
    """Exactly what the service does with an uploaded file (default settings): decode the bytes (at reduced
    scale when the model's `config.jpeg_draft` says so), preprocess."""
    return bytes_to_input(sample.path.read_bytes(), config, SERVICE_DEFAULTS.image_limits())


def load_shrunk_input(sample: Sample, config: Preprocessing) -> np.ndarray:
    """The photo at the MiniPlaces size (shorter side 128 px), then the service's preprocessing: for the shortcut
    check "is a small photo called `other` because it is small?"."""
    return preprocess(RandomLowResolution(p=1.0)(load_rgb(sample.path)), config)


def predict_logits(logits_fn: LogitsFn, samples: list[Sample], config: Preprocessing, desc: str,
                   batch_size: int = 32, loader: Callable[[Sample, Preprocessing], np.ndarray] = load_input
                   ) -> np.ndarray:
    outputs = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for start in tqdm(range(0, len(samples), batch_size), desc=desc, unit="batch"):
            batch = list(pool.map(lambda s: loader(s, config), samples[start:start + batch_size]))
            outputs.append(logits_fn(np.stack(batch)))
    return np.concatenate(outputs)


def accuracy_by_source(samples: list[Sample], targets: np.ndarray, predictions: np.ndarray) -> dict[str, Any]:
    """Test accuracy per data source: a model that only works on one source does not generalise."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for sample, target, prediction in zip(samples, targets, predictions):
        groups[sample.source].append(bool(target == prediction))
    return {source: {"accuracy": float(np.mean(hits)), "num_images": len(hits)}
            for source, hits in sorted(groups.items())}


def evaluate_openset(logits_fn: LogitsFn, logits: dict[str, np.ndarray], samples: dict[str, list[Sample]],
                     labels: list[str], config: Preprocessing, temperature: float,
                     train_scenes: set[str]) -> dict[str, Any]:
    """The `other` scores of val and test, and the shortcut check on test rooms shrunk to 128 px."""
    report = {split: openset_scores(logits[split], samples[split], labels, temperature, train_scenes)
              for split in ("val", "test")}
    other_index = labels.index(OTHER)
    rooms = [sample for sample in samples["test"] if sample.label != other_index]
    if rooms:
        shrunk = predict_logits(logits_fn, rooms, config, "evaluate test rooms at 128 px", loader=load_shrunk_input)
        targets = np.array([sample.label for sample in rooms])
        rates = population_rates(shrunk.argmax(axis=1), targets, populations(rooms, other_index, train_scenes),
                                 other_index)
        report["test_rooms_at_128px"] = {"rooms_as_other": rates["rooms_as_other"], "room_accuracy": rates["rooms"]}
    return report


def evaluate(logits_fn: LogitsFn, val: list[Sample], test: list[Sample], labels: list[str],
             config: Preprocessing, train_scenes: set[str] | None = None,
             logits_file: Path | None = None) -> dict[str, Any]:
    """Scores for the model behind `logits_fn`: val (also used to fit the temperature) and test. With an
    `other` label, also the open-set scores (`train_scenes`: the other scene types training saw). With
    `logits_file`, the raw logits are kept there (.npz: val, test) to study calibration without a rerun."""
    val_logits = predict_logits(logits_fn, val, config, "evaluate val")
    test_logits = predict_logits(logits_fn, test, config, "evaluate test")
    if logits_file is not None:
        logits_file.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(logits_file, val=val_logits, test=test_logits)
    val_targets = np.array([s.label for s in val])
    test_targets = np.array([s.label for s in test])
    temperature = fit_temperature(val_logits, val_targets)
    test_predictions = test_logits.argmax(axis=1)
    report = {
        "labels": labels,
        "temperature": temperature,
        "val": classification_report(val_targets, val_logits.argmax(axis=1), labels),
        "test": classification_report(test_targets, test_predictions, labels),
        "test_by_source": accuracy_by_source(test, test_targets, test_predictions),
        "calibration": {
            "before": {**calibration_bins(softmax(test_logits), test_targets),
                       "nll": negative_log_likelihood(test_logits, test_targets, 1.0)},
            "after": {**calibration_bins(softmax(test_logits, temperature), test_targets),
                      "nll": negative_log_likelihood(test_logits, test_targets, temperature)},
            "val_after": {**calibration_bins(softmax(val_logits, temperature), val_targets),
                          "nll": negative_log_likelihood(val_logits, val_targets, temperature)},
        },
    }
    if OTHER in labels:
        report["openset"] = evaluate_openset(logits_fn, {"val": val_logits, "test": test_logits},
                                             {"val": val, "test": test}, labels, config, temperature,
                                             train_scenes or set())
    return report


def headline(report: dict[str, Any], split: str = "test") -> dict[str, float]:
    """The numbers people compare models by."""
    scores = report[split]
    summary = {"accuracy": scores["accuracy"], "macro_f1": scores["macro"]["f1"]}
    summary.update({f"f1_{label}": scores["per_class"][label]["f1"] for label in report["labels"]})
    if split == "test":
        summary.update({"ece_before": report["calibration"]["before"]["ece"],
                        "ece_after": report["calibration"]["after"]["ece"], "temperature": report["temperature"]})
    if "val_after" in report["calibration"] and split == "val":
        summary["ece_after"] = report["calibration"]["val_after"]["ece"]
    if "openset" in report:
        scores = report["openset"][split]
        summary.update({"room_accuracy": scores["room_accuracy"], "rooms_as_other": scores["rates"]["rooms_as_other"],
                        "auroc_other": scores["auroc_other"]})
        summary.update({f"{group}_as_other": scores["rates"][group] for group in ("known_other", "unseen_other")
                        if group in scores["rates"]})
    return summary


def plot_confusion_matrix(report: dict[str, Any], path: Path) -> None:
    matrix = np.array(report["test"]["confusion_matrix"])
    labels = report["labels"]
    figure, axis = plt.subplots(figsize=(5.5, 4.8))
    axis.imshow(matrix, cmap="Blues")
    for (row, column), count in np.ndenumerate(matrix):
        axis.text(column, row, str(count), ha="center", va="center",
                  color="white" if count > matrix.max() / 2 else "black")
    axis.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    axis.set_yticks(range(len(labels)), labels)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(f"Test confusion matrix (accuracy {report['test']['accuracy']:.1%})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_reliability(report: dict[str, Any], path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
    for axis, stage in zip(axes, ("before", "after")):
        bins = report["calibration"][stage]
        edges = np.array(bins["edges"])
        centers, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
        filled = np.array(bins["counts"]) > 0
        axis.bar(centers[filled], np.array(bins["accuracy"])[filled], width=width * 0.9, label="accuracy")
        axis.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        axis.plot(centers[filled], np.array(bins["confidence"])[filled], "r.", label="mean confidence")
        title = "before" if stage == "before" else f"after T={report['temperature']:.2f}"
        axis.set_title(f"Test reliability {title}: ECE {bins['ece']:.3f}")
        axis.set_xlabel("confidence")
        axis.set_xlim(0, 1)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def format_markdown(report: dict[str, Any], extra: dict[str, Any]) -> str:
    labels, test = report["labels"], report["test"]
    lines = ["# Room classifier evaluation", ""]
    lines += [f"- {key}: {value}" for key, value in extra.items()]
    lines += ["", "Scored through the exported ONNX model and the service's own decode + preprocessing.",
              f"Temperature {report['temperature']:.3f} fitted on validation (lowest top-label ECE).", "",
              "| split | images | accuracy | macro-F1 | weighted-F1 |", "|---|---|---|---|---|"]
    for split in ("val", "test"):
        scores = report[split]
        lines.append(f"| {split} | {scores['num_images']} | {scores['accuracy']:.4f} | {scores['macro']['f1']:.4f} "
                     f"| {scores['weighted']['f1']:.4f} |")
    lines += ["", "## Test, per class", "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for label in labels:
        scores = test["per_class"][label]
        lines.append(f"| {label} | {scores['precision']:.4f} | {scores['recall']:.4f} | {scores['f1']:.4f} "
                     f"| {scores['support']} |")
    lines += ["", "## Test confusion matrix (rows true, columns predicted)", "",
              "| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for label, row in zip(labels, test["confusion_matrix"]):
        lines.append(f"| {label} | " + " | ".join(str(v) for v in row) + " |")
    lines += ["", "## Test accuracy by source", "", "| source | images | accuracy |", "|---|---|---|"]
    for source, scores in report["test_by_source"].items():
        lines.append(f"| {source} | {scores['num_images']} | {scores['accuracy']:.4f} |")
    before, after = report["calibration"]["before"], report["calibration"]["after"]
    lines += ["", "## Calibration (test)", "", "| | ECE | NLL |", "|---|---|---|",
              f"| raw softmax | {before['ece']:.4f} | {before['nll']:.4f} |",
              f"| temperature {report['temperature']:.3f} | {after['ece']:.4f} | {after['nll']:.4f} |", "",
              "![confusion matrix](confusion_matrix.png)", "", "![reliability](reliability.png)", ""]
    if "val_after" in report["calibration"]:
        val_after = report["calibration"]["val_after"]
        lines.insert(-5, f"| validation, temperature {report['temperature']:.3f} | {val_after['ece']:.4f} "
                         f"| {val_after['nll']:.4f} |")
    if "openset" in report:
        lines += openset_markdown(report["openset"])
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: Path, extra: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps({**extra, **report}, indent=2))
    (out_dir / "report.md").write_text(format_markdown(report, extra))
    plot_confusion_matrix(report, out_dir / "confusion_matrix.png")
    plot_reliability(report, out_dir / "reliability.png")
    if "openset" in report:
        plot_other_rates(report["openset"], out_dir / "other_rates.png")
