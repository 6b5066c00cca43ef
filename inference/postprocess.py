"""Logits -> what a client reads: softmax probabilities, top class, top-k, the uncertain flag.

`softmax(logits, temperature)` is the calibrated probability the model's metadata asks for
(probabilities = softmax(logits / temperature)). `postprocess` builds one `Prediction` per image with
`probabilities` as `[(label, p), ...]` sorted by p, highest first, summing to 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Prediction:
    """One image's answer."""

    label: str
    confidence: float
    probabilities: list[tuple[str, float]]
    top_k: list[tuple[str, float]]
    uncertain: bool

    def to_dict(self) -> dict[str, object]:
        """JSON shape of the API (`class` is a Python keyword, hence `label` in here)."""
        return {"class": self.label, "confidence": self.confidence,
                "probabilities": [list(pair) for pair in self.probabilities],
                "top_k": [list(pair) for pair in self.top_k], "uncertain": self.uncertain}


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature, computed in float64 so each row sums to 1."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=-1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=-1, keepdims=True)


def postprocess(logits: np.ndarray, labels: Sequence[str], temperature: float, top_k: int,
                threshold: float) -> list[Prediction]:
    """[N, num_labels] logits -> N predictions. `top_k` is clamped to 1..num_labels."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] != len(labels):
        raise ValueError(f"expected logits of shape [N, {len(labels)}], got {list(logits.shape)}")
    k = max(1, min(int(top_k), len(labels)))
    return [prediction(row, labels, k, threshold) for row in softmax(logits, temperature)]


def prediction(probabilities: np.ndarray, labels: Sequence[str], top_k: int, threshold: float) -> Prediction:
    ranked = sorted(zip(labels, (float(p) for p in probabilities)), key=lambda pair: pair[1], reverse=True)
    label, confidence = ranked[0]
    return Prediction(label=label, confidence=confidence, probabilities=ranked, top_k=ranked[:top_k],
                      uncertain=confidence < threshold)
