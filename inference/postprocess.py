"""Logits -> what a client reads: softmax probabilities, top class, top-k, the uncertain flag.

`softmax(logits, temperature)` is the calibrated probability the model's metadata asks for
(probabilities = softmax(logits / temperature)). `postprocess` builds one `Prediction` per image with
`probabilities` as `[(label, p), ...]` sorted by p, highest first, summing to 1.

How a prediction is written on the wire (the API's `class` field, bulk's result columns) is not decided here:
service.py's `Classification` owns the API's shape, bulk/stages.py's `result_row` the bulk output's.
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


def prediction(probabilities: np.ndarray, labels: Sequence[str], top_k: int, threshold: float) -> Prediction:
    ranked = sorted(zip(labels, (float(p) for p in probabilities)), key=lambda pair: pair[1], reverse=True)
    label, confidence = ranked[0]
    return Prediction(label=label, confidence=confidence, probabilities=ranked, top_k=ranked[:top_k],
                      uncertain=confidence < threshold)
