"""The training recipe's settings: the `Recipe` dataclass, its named profiles and the command line's overrides.

How the recipe trains is training/trainer.py; how it was chosen (sweeps, probes, what gained nothing) is
docs/experiments.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from inference.preprocess import Preprocessing
from training.backbones import backbone


@dataclass(frozen=True)
class Recipe:
    arch: str = "mobilenet_v2"  # the most accurate backbone within the time budget here (runs/compare)
    stem_blocks: int | None = None  # None: the architecture's default cut
    views: int = 4  # cached views per training image: 1 centre + (views - 1) augmented
    warmup_epochs: int = 4
    epochs: int = 12
    batch_size: int = 64
    lr_head: float = 3e-3  # warm-up of the new classifier
    lr_tail: float = 3e-4  # fine-tune: pretrained blocks (the classifier gets head_lr_factor x this)
    head_lr_factor: float = 3.0
    weight_decay: float = 0.02
    label_smoothing: float = 0.1
    patience: int = 4
    seed: int = 1337
    max_per_class: int | None = None  # a subset for quick runs
    kd_alpha: float = 0.0  # weight of the distillation term; 0 = no teacher, plain cross-entropy
    kd_temperature: float = 2.0
    kd_scene_weight: float = 0.0  # weight of the all-365-scenes term (auxiliary head, not exported); 0 = off
    kd_teacher: str = "zero_shot"  # the teacher's belief among our labels: see KD_TEACHERS
    workers: int = 2
    pretrained: bool = True
    preprocessing: dict[str, Any] = field(default_factory=lambda: Preprocessing().to_dict())

    def stem_cut(self) -> int:
        return self.stem_blocks if self.stem_blocks is not None else backbone(self.arch).default_stem_blocks

    def uses_teacher(self) -> bool:
        return self.kd_alpha > 0 or self.kd_scene_weight > 0

    def distillation(self) -> str:
        """The teacher settings in words, one wording for the compare table, the training log and the model's
        metadata; "no" without a teacher."""
        if not self.uses_teacher():
            return "no"
        parts = [f"alpha {self.kd_alpha}, T {self.kd_temperature}, {self.kd_teacher.replace('_', '-')} teacher"
                 ] if self.kd_alpha > 0 else []
        if self.kd_scene_weight > 0:
            parts.append(f"all-scenes weight {self.kd_scene_weight}")
        return ", ".join(parts)

    def __post_init__(self) -> None:
        if self.kd_teacher not in KD_TEACHERS:
            raise ValueError(f"kd_teacher must be one of {KD_TEACHERS}, got {self.kd_teacher!r}")


DISTILL_CHOICES = ("off", "on", "both")  # `compare`: students without and/or with the teacher
# What the student learns from the teacher on our labels (training/soft_targets.py `distillation_targets`):
# "zero_shot": its grouped scenes, on the label's side of room-or-other; "fine_tuned": the five-way belief of a
# linear head fitted on its scene outputs (training/teacher_head.py), cross-fitted on the training photos.
KD_TEACHERS = ("zero_shot", "fine_tuned")

# Settings of experiments that were removed (docs/experiments.md): checkpoints written before hold them.
RETIRED_FIELDS = ("kd_teacher_views", "soup", "drop_audited", "fresh_views")

# Distillation as chosen on validation (docs/experiments.md): the default profile distils from the fine-tuned
# teacher; the quick profile is a smoke run that needs no teacher file.
KD_ALPHA = 0.5
KD_TEMPERATURE = 4.0
KD_SCENE_WEIGHT = 0.3  # the all-365-scenes term

PROFILES: dict[str, Recipe] = {
    "default": Recipe(kd_alpha=KD_ALPHA, kd_temperature=KD_TEMPERATURE, kd_scene_weight=KD_SCENE_WEIGHT,
                      kd_teacher="fine_tuned"),
    "quick": Recipe(arch="mobilenet_v3_small", views=2, warmup_epochs=3, epochs=8, max_per_class=60, patience=4),
    # CSAIL's Places365 network fine-tuned (issue 21). Its stem is ~10x MobileNetV2's cost on 2 cores, so fewer
    # cached views and epochs; the pretrained layers get a gentler learning rate than the MobileNets' ImageNet ones.
    # "scene": the network as trained (no max-pool) at 160 px, layer4 + classifier fine-tuned;
    # "scene_maxpool": the max-pool put back (a standard ResNet-18's cost) at 224 px, layer3 + layer4 fine-tuned.
    "scene": Recipe(arch="places365_resnet18", kd_alpha=KD_ALPHA, kd_temperature=KD_TEMPERATURE,
                    kd_scene_weight=KD_SCENE_WEIGHT, views=2, warmup_epochs=2, epochs=5, patience=2, lr_tail=1e-4,
                    head_lr_factor=10.0, preprocessing=Preprocessing(image_size=160, resize_size=183).to_dict()),
    # "scene_head": the network as trained at its own 224 px, frozen through layer4 (its output cached once, the
    # centre view only: a view costs ~15 min here); only a new classifier on the pooled features learns.
    "scene_head": Recipe(arch="places365_resnet18", stem_blocks=8, views=1, warmup_epochs=4, epochs=4, patience=2,
                         lr_tail=1e-4, head_lr_factor=10.0),
    "scene_maxpool": Recipe(arch="places365_resnet18_maxpool", kd_alpha=KD_ALPHA, kd_temperature=KD_TEMPERATURE,
                            kd_scene_weight=KD_SCENE_WEIGHT, views=2, warmup_epochs=2, epochs=5, patience=2,
                            lr_tail=2e-4, head_lr_factor=5.0),
}


def recipe_from_args(profile: str, **overrides: Any) -> Recipe:
    """A named profile with the non-None overrides applied."""
    return replace(PROFILES[profile], **{k: v for k, v in overrides.items() if v is not None})


def recipe_from_checkpoint(saved: dict[str, Any]) -> Recipe:
    """The recipe a checkpoint was trained with; settings of removed experiments are left out (they changed how
    the network was trained, not what it is)."""
    known = {f.name for f in fields(Recipe)}
    unknown = set(saved) - known - set(RETIRED_FIELDS)
    if unknown:
        raise ValueError(f"the checkpoint's recipe has unknown settings {sorted(unknown)}")
    return Recipe(**{key: value for key, value in saved.items() if key in known})
