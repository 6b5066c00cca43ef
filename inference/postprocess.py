"""Logits -> what a client reads: softmax probabilities, top class, top-k, the uncertain flag.

`softmax(logits, temperature)` is the calibrated probability the model's metadata asks for
(probabilities = softmax(logits / temperature)). `postprocess` builds one `Prediction` per image with
`probabilities` as `[(label, p), ...]` sorted by p, highest first, summing to 1.

How a prediction is written on the wire (the API's `class` field, bulk's result columns) is not decided here:
service.py's `Classification` owns the API's shape, bulk/stages.py's `result_row` the bulk output's.

`explained_labels` and `heatmap_grid` turn a model's class-activation maps (`activation_maps` [labels, h, w])
into what an answer shows: the top class's map, and the second class's when the answer is uncertain, each
scaled to 0..1 as Grad-CAM does: cells that speak against the class are 0, the one that speaks most for it 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

# The label of "none of these rooms" (data_prep.common.OTHER names the dataset folder it comes from). A request
# with `rooms_only` leaves it out: the rooms' probabilities renormalised, the best room as the answer.
OTHER_LABEL = "other"


@dataclass(frozen=True)
class Prediction:
    """One image's answer."""

    label: str
    confidence: float
    probabilities: list[tuple[str, float]]
    top_k: list[tuple[str, float]]
    uncertain: bool


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature, computed in float64 so each row sums to 1."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=-1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=-1, keepdims=True)


def postprocess(logits: np.ndarray, labels: Sequence[str], temperature: float, top_k: int,
                threshold: float, leave_out: Sequence[str] = ()) -> list[Prediction]:
    """[N, num_labels] logits -> N predictions. `top_k` is clamped to 1..num_labels. Labels in `leave_out`
    are dropped before the softmax, so the others' probabilities are renormalised among themselves."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] != len(labels):
        raise ValueError(f"expected logits of shape [N, {len(labels)}], got {list(logits.shape)}")
    keep = [index for index, label in enumerate(labels) if label not in leave_out]
    logits, labels = logits[:, keep], [labels[index] for index in keep]
    k = max(1, min(int(top_k), len(labels)))
    return [prediction(row, labels, k, threshold) for row in softmax(logits, temperature)]


def explained_labels(prediction: Prediction) -> list[str]:
    """The classes whose maps an answer shows: the top one, and the runner-up when the answer is uncertain."""
    ranked = [label for label, _ in prediction.probabilities]
    return ranked[:2] if prediction.uncertain else ranked[:1]


def heatmap_grid(class_map: np.ndarray, decimals: int = 3) -> list[list[float]]:
    """One class's activation map [h, w] -> rows of cells, 0..1, rounded: the positive evidence for the class
    over its largest value (all 0 when no cell is for it). Negative cells are clipped, not scaled in: with
    min-max scaling a neutral background would light up wherever it is less against the class than the rest."""
    values = np.maximum(np.asarray(class_map, dtype=np.float64), 0.0)
    peak = values.max()
    scaled = values / peak if peak > 0 else values
    return np.round(scaled, decimals).tolist()


def prediction(probabilities: np.ndarray, labels: Sequence[str], top_k: int, threshold: float) -> Prediction:
    ranked = sorted(zip(labels, (float(p) for p in probabilities)), key=lambda pair: pair[1], reverse=True)
    label, confidence = ranked[0]
    return Prediction(label=label, confidence=confidence, probabilities=ranked, top_k=ranked[:top_k],
                      uncertain=confidence < threshold)
