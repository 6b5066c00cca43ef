""""None of these rooms": the `other` answer's operating point and its evaluation.

Photos fall into three populations, each with its own target:
- rooms: the four room classes; answered `other` should be rare (<= 3 %), and a room answered `other` is wrong;
- known other: `other` photos of a scene type that training saw (dining rooms, entrance halls, ...);
- unseen other: `other` photos of a scene type that training never saw. data_prep holds whole scene types out
  of the training split (leave-scenes-out), so validation and test measure these like a user's new scenes.

The operating point is a bias added to the `other` logit, chosen on validation: the bias that maximises the
mean of the three populations' rates of right answers while validation rooms answered `other` stay within
ROOMS_AS_OTHER_MAX. It is folded into the classifier's bias, so the exported model's argmax is the answer
and serving stays one ONNX call with nothing extra to configure.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from data_prep.common import OTHER  # noqa: E402
from training.data import Sample  # noqa: E402
from training.metrics import softmax  # noqa: E402

ROOMS_AS_OTHER_MAX = 0.03
BIAS_GRID = np.round(np.arange(-4.0, 4.0001, 0.05), 2)
POPULATIONS = ("rooms", "known_other", "unseen_other")


def population(sample: Sample, other_index: int, train_scenes: set[str]) -> str:
    if sample.label != other_index:
        return "rooms"
    return "known_other" if sample.scene in train_scenes else "unseen_other"


def populations(samples: list[Sample], other_index: int, train_scenes: set[str]) -> np.ndarray:
    return np.array([population(sample, other_index, train_scenes) for sample in samples])


def population_rates(predictions: np.ndarray, targets: np.ndarray, groups: np.ndarray,
                     other_index: int) -> dict[str, float]:
    """Right answers per population (a room must get its own room; an other photo `other`) and rooms -> other."""
    rates = {group: float(np.mean(predictions[groups == group] == targets[groups == group]))
             for group in POPULATIONS if np.any(groups == group)}
    rooms = groups == "rooms"
    rates["rooms_as_other"] = float(np.mean(predictions[rooms] == other_index)) if rooms.any() else 0.0
    return rates


def with_bias(logits: np.ndarray, other_index: int, bias: float) -> np.ndarray:
    shifted = np.array(logits, dtype=np.float64)
    shifted[:, other_index] += bias
    return shifted


def choose_other_bias(logits: np.ndarray, samples: list[Sample], other_index: int,
                      train_scenes: set[str]) -> dict[str, Any]:
    """The validation bias on the `other` logit (see the module docstring) and the rates it gives."""
    targets = np.array([sample.label for sample in samples])
    groups = populations(samples, other_index, train_scenes)
    best: dict[str, Any] | None = None
    for bias in BIAS_GRID:
        rates = population_rates(with_bias(logits, other_index, bias).argmax(axis=1), targets, groups, other_index)
        score = float(np.mean([rates[group] for group in POPULATIONS if group in rates]))
        allowed = rates["rooms_as_other"] <= ROOMS_AS_OTHER_MAX
        key = (allowed, score if allowed else -rates["rooms_as_other"])
        if best is None or key > best["key"]:
            best = {"key": key, "bias": float(bias), "score": score, "rates": rates}
    assert best is not None
    unbiased = population_rates(logits.argmax(axis=1), targets, groups, other_index)
    return {"bias": best["bias"], "mean_rate": best["score"], "val_rates": best["rates"],
            "val_rates_without_bias": unbiased, "rooms_as_other_max": ROOMS_AS_OTHER_MAX}


def other_scenes_of(samples: list[Sample], labels: list[str]) -> set[str]:
    """The `other` scene types among `samples` (those of the training split: the scenes training saw)."""
    return {sample.scene for sample in samples if labels[sample.label] == OTHER}


def set_operating_point(classifier: nn.Module, val_logits: np.ndarray, val: list[Sample], train: list[Sample],
                        labels: list[str]) -> dict[str, Any]:
    """Choose the `other` bias on validation and fold it into `classifier`; returns the choice for the history."""
    other_index = labels.index(OTHER)
    choice = choose_other_bias(val_logits, val, other_index, other_scenes_of(train, labels))
    fold_other_bias(classifier, other_index, choice["bias"])
    print(f"'other' operating point: bias {choice['bias']:+.2f} on its logit; validation "
          + ", ".join(f"{name} {rate:.4f}" for name, rate in choice["val_rates"].items()))
    return choice


def fold_other_bias(classifier: nn.Module, other_index: int, bias: float) -> None:
    """Add `bias` to the `other` output of the classifier's last linear layer (in place)."""
    last = [layer for layer in classifier.modules() if isinstance(layer, nn.Linear)][-1]
    with torch.no_grad():
        last.bias[other_index] += bias


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for `positives` vs the rest (Mann-Whitney, ties counted half)."""
    positive, negative = scores[positives], scores[~positives]
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([positive, negative]), kind="mergesort")
    ranks = np.empty(len(order))
    ranks[order] = np.arange(1, len(order) + 1)
    values = np.concatenate([positive, negative])
    for value in np.unique(values):  # average ranks of ties
        tied = values == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return float((ranks[:len(positive)].sum() - len(positive) * (len(positive) + 1) / 2)
                 / (len(positive) * len(negative)))


def other_rate_by(samples: list[Sample], predictions: np.ndarray, other_index: int,
                  key: str) -> dict[str, dict[str, Any]]:
    """Share answered `other`, per scene or per source (`key` is a Sample attribute)."""
    answered: dict[str, list[bool]] = defaultdict(list)
    for sample, prediction in zip(samples, predictions):
        answered[getattr(sample, key)].append(bool(prediction == other_index))
    return {name: {"other_rate": float(np.mean(hits)), "num_images": len(hits)}
            for name, hits in sorted(answered.items())}


def room_accuracy_by_source(samples: list[Sample], predictions: np.ndarray, other_index: int) -> dict[str, Any]:
    """4-room accuracy on room photos per source, `other` counted as wrong."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for sample, prediction in zip(samples, predictions):
        if sample.label != other_index:
            hits[sample.source].append(bool(prediction == sample.label))
    return {source: {"accuracy": float(np.mean(h)), "num_images": len(h)} for source, h in sorted(hits.items())}


def openset_scores(logits: np.ndarray, samples: list[Sample], labels: list[str], temperature: float,
                   train_scenes: set[str]) -> dict[str, Any]:
    """Everything the `other` targets are judged by, for one split."""
    other_index = labels.index(OTHER)
    targets = np.array([sample.label for sample in samples])
    predictions = logits.argmax(axis=1)
    groups = populations(samples, other_index, train_scenes)
    p_other = softmax(logits, temperature)[:, other_index]
    is_other = targets == other_index
    rooms = ~is_other
    rates = population_rates(predictions, targets, groups, other_index)
    return {
        "rates": rates,
        "room_accuracy": rates.get("rooms", float("nan")),
        "auroc_other": auroc(p_other, is_other),
        "auroc_other_unseen_scenes": auroc(p_other[rooms | (groups == "unseen_other")],
                                           is_other[rooms | (groups == "unseen_other")]),
        "other_rate_by_scene": other_rate_by([s for s in samples if s.label == other_index],
                                             predictions[is_other], other_index, "scene"),
        "unseen_scenes": sorted({s.scene for s, g in zip(samples, groups) if g == "unseen_other"}),
        "other_rate_by_source": other_rate_by(list(samples), predictions, other_index, "source"),
        "room_accuracy_by_source": room_accuracy_by_source(samples, predictions, other_index),
    }


def plot_other_rates(openset: dict[str, Any], path: Path) -> None:
    """Per scene type, the share answered `other` (test and val; unseen scene types marked), and rooms -> other."""
    rows: list[tuple[str, float, str]] = []
    for split in ("test", "val"):
        scores = openset[split]
        unseen = set(scores["unseen_scenes"])
        rows += [(f"{split}: {scene}{' (unseen)' if scene in unseen else ''}", entry["other_rate"],
                  "tab:green" if scene in unseen else "tab:blue")
                 for scene, entry in scores["other_rate_by_scene"].items() if scene in unseen or split == "test"]
        rows.append((f"{split}: ROOM photos answered other", scores["rates"]["rooms_as_other"], "tab:red"))
    figure, axis = plt.subplots(figsize=(8, max(3.0, 0.22 * len(rows) + 1)))
    axis.barh([name for name, _, _ in rows], [rate for _, rate, _ in rows], color=[c for _, _, c in rows])
    axis.axvline(0.95, color="k", linestyle="--", linewidth=1)
    axis.axvline(ROOMS_AS_OTHER_MAX, color="tab:red", linestyle=":", linewidth=1)
    axis.invert_yaxis()
    axis.set_xlim(0, 1)
    axis.tick_params(axis="y", labelsize=7)
    axis.set_xlabel("share answered 'other'")
    axis.set_title("'None of these rooms': other rate per scene type (green: never seen in training)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def openset_markdown(openset: dict[str, Any]) -> list[str]:
    """The report section: population rates, AUROC, per-source and per-scene tables."""
    lines = ["", "## None of these rooms (`other`)", "",
             "Rooms answered `other` count as wrong. Unseen scene types: held out of training whole by data_prep.",
             "", "| split | room accuracy | rooms answered other | known other -> other "
             "| unseen scenes -> other | AUROC p(other) | AUROC, unseen scenes |", "|---|---|---|---|---|---|---|"]
    for split in ("val", "test"):
        scores = openset[split]
        rates = scores["rates"]
        lines.append(f"| {split} | {scores['room_accuracy']:.4f} | {rates['rooms_as_other']:.4f} "
                     f"| {rates.get('known_other', float('nan')):.4f} "
                     f"| {rates.get('unseen_other', float('nan')):.4f} | {scores['auroc_other']:.4f} "
                     f"| {scores['auroc_other_unseen_scenes']:.4f} |")
    shrunk = openset.get("test_rooms_at_128px")
    if shrunk:
        full_size = openset["test"]["rates"]["rooms_as_other"]
        lines += ["", f"Shortcut check: test room photos shrunk to 128 px (as MiniPlaces): "
                  f"{shrunk['rooms_as_other']:.4f} answered `other` (at full size {full_size:.4f}), "
                  f"room accuracy {shrunk['room_accuracy']:.4f}."]
    lines += ["", "### Test, per source", "", "| source | images | answered other | room accuracy |",
              "|---|---|---|---|"]
    rooms = openset["test"]["room_accuracy_by_source"]
    for source, entry in openset["test"]["other_rate_by_source"].items():
        accuracy = f"{rooms[source]['accuracy']:.4f}" if source in rooms else "-"
        lines.append(f"| {source} | {entry['num_images']} | {entry['other_rate']:.4f} | {accuracy} |")
    lines += ["", "### `other` photos answered `other`, per scene type", "", "| split | scene | images | rate |",
              "|---|---|---|---|"]
    for split in ("val", "test"):
        unseen = set(openset[split]["unseen_scenes"])
        for scene, entry in openset[split]["other_rate_by_scene"].items():
            lines.append(f"| {split} | {scene}{' (unseen)' if scene in unseen else ''} | {entry['num_images']} "
                         f"| {entry['other_rate']:.4f} |")
    return lines + ["", "![other rates](other_rates.png)", ""]
