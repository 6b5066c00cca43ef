"""The teacher fine-tuned to our labels: a linear head on its 365 Places log-probabilities.

Zero-shot, the teacher's belief among our labels is a sum over hand-picked scenes (`ROOM_SCENES`) with every
other scene counted as `other`, so it calls a third of our room photos `other` and only its belief among the
rooms is worth learning (`on_the_labels_side`). A linear head fitted on the training photos learns what each
scene means here instead (an open-plan "dining room" scene is often our living room); its five-way belief is a
teacher of room-or-other too. The head reads the cached scene logits, so fitting it costs seconds, not a pass.

A training photo's target comes from a head fitted without that photo (K-fold cross-fitting): a head fitted on
the photo itself would echo its label back and teach the student nothing the label does not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FOLDS = 5
WEIGHT_DECAY = 1e-4  # L2 on the standardised inputs' weights; chosen on validation (docs/experiments.md)
MAX_ITERATIONS = 300


class TeacherHead(nn.Module):
    """Standardised Places log-probabilities -> one logit per label."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = nn.Linear(mean.numel(), num_classes)

    def standardise(self, scene_logits: torch.Tensor) -> torch.Tensor:
        return (torch.log_softmax(scene_logits.float(), dim=1) - self.mean) / self.std

    def forward(self, scene_logits: torch.Tensor) -> torch.Tensor:
        return self.linear(self.standardise(scene_logits))


def fit_teacher_head(scene_logits: torch.Tensor, targets: torch.Tensor, num_classes: int,
                     weight_decay: float = WEIGHT_DECAY) -> TeacherHead:
    """Multinomial logistic regression by L-BFGS (deterministic: no batches, no random start). The inputs are
    standardised once; L-BFGS evaluates the loss hundreds of times on them."""
    log_probabilities = torch.log_softmax(scene_logits.float(), dim=1)
    head = TeacherHead(log_probabilities.mean(0), log_probabilities.std(0) + 1e-6, num_classes)
    inputs = head.standardise(scene_logits)
    nn.init.zeros_(head.linear.weight)
    nn.init.zeros_(head.linear.bias)
    optimizer = torch.optim.LBFGS(head.linear.parameters(), max_iter=MAX_ITERATIONS, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(head.linear(inputs), targets) + weight_decay * head.linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head.eval()


def fold_of_each(count: int, folds: int, seed: int) -> torch.Tensor:
    """Which of `folds` folds each of `count` photos falls in: a seeded shuffle, equal sizes."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    fold = torch.empty(count, dtype=torch.long)
    fold[order] = torch.arange(count) % folds
    return fold


def cross_fitted_logits(scene_logits: torch.Tensor, targets: torch.Tensor, num_classes: int,
                        folds: int = FOLDS, seed: int = 0) -> torch.Tensor:
    """[N, num_classes] logits of the fine-tuned teacher for each training photo, each from a head fitted on the
    other folds only."""
    fold = fold_of_each(len(targets), folds, seed)
    logits = torch.empty(len(targets), num_classes)
    for k in range(folds):
        held_out = fold == k
        head = fit_teacher_head(scene_logits[~held_out], targets[~held_out], num_classes)
        with torch.no_grad():
            logits[held_out] = head(scene_logits[held_out])
    return logits
