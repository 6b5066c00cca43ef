"""The recipe's loss: the label's cross-entropy and, when distilling from the Places365 teacher (Hinton et al.
2015), alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(label).

With a scene weight, an auxiliary head on the tail's pooled features also learns the teacher's full 365-scene
distribution (+ weight * T^2 * KL over all Places scenes): "dining room" or "hotel room" tells the student more
than four room logits do. That head exists only in training; the exported network is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.backbones import StemTail


def softened_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch. T^2 keeps the
    gradients on the scale of a cross-entropy's whatever T is (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True) * t * t


class DistillationLoss(nn.Module):
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(label) [+ scene_weight * T^2 * KL(scenes)].

    The CE part is the recipe's own (class weights, label smoothing). At alpha = 0 and scene_weight = 0 it
    is exactly the CE. The scene term compares the auxiliary head's 365 outputs with the teacher's 365.
    """

    def __init__(self, cross_entropy: nn.Module, alpha: float, temperature: float, scene_weight: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0 or temperature <= 0 or scene_weight < 0:
            raise ValueError(f"need 0 <= kd_alpha <= 1, kd_temperature > 0 and kd_scene_weight >= 0, "
                             f"got {alpha}, {temperature}, {scene_weight}")
        self.cross_entropy, self.alpha, self.temperature = cross_entropy, alpha, temperature
        self.scene_weight = scene_weight

    def forward(self, student_logits: torch.Tensor, targets: torch.Tensor,
                teacher_logits: torch.Tensor | None = None, student_scenes: torch.Tensor | None = None,
                teacher_scenes: torch.Tensor | None = None) -> torch.Tensor:
        loss = self.cross_entropy(student_logits, targets)
        if self.alpha > 0.0 and teacher_logits is not None:
            soft = softened_kl(student_logits, teacher_logits, self.temperature)
            loss = self.alpha * soft + (1.0 - self.alpha) * loss
        if self.scene_weight > 0.0 and student_scenes is not None and teacher_scenes is not None:
            loss = loss + self.scene_weight * softened_kl(student_scenes, teacher_scenes, self.temperature)
        return loss


def scene_head_for(model: StemTail) -> nn.Linear:
    """The auxiliary head of scene distillation: pooled tail features -> 365 Places scenes (training only)."""
    from training.teacher import NUM_SCENES

    first_linear = next(layer for layer in model.head.modules() if isinstance(layer, nn.Linear))
    return nn.Linear(first_linear.in_features, NUM_SCENES)


def tail_outputs(tail: nn.Sequential, inputs: torch.Tensor, scene_head: nn.Module | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tail's class logits and, with `scene_head`, its 365 scene logits from the same pooled features."""
    if scene_head is None:
        return tail(inputs), None
    features = tail[:-1](inputs)
    return tail[-1](features), scene_head(features)
