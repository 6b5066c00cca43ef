"""The fine-tuned teacher (training/teacher_head.py): a linear head on the Places365 teacher's scene outputs whose
targets for a training photo never come from a head that saw that photo."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from training.teacher import NUM_SCENES

LABELS = ["bathroom", "bedroom", "kitchen", "living_room", "other"]


def scene_logits_that_name(labels: torch.Tensor, noise: float, seed: int) -> torch.Tensor:
    """[N, 365] scene logits where scene k rises for label k, plus noise: what a scene network gives our photos."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(labels), NUM_SCENES, generator=generator) * noise
    logits[torch.arange(len(labels)), labels] += 6.0
    return logits


def test_the_head_learns_which_scenes_mean_which_label() -> None:
    from training.teacher_head import fit_teacher_head

    generator = torch.Generator().manual_seed(0)
    train_labels, test_labels = (torch.randint(0, 5, (n,), generator=generator) for n in (1000, 200))
    head = fit_teacher_head(scene_logits_that_name(train_labels, 1.0, 1), train_labels, len(LABELS))
    with torch.no_grad():
        predicted = head(scene_logits_that_name(test_labels, 1.0, 2)).argmax(dim=1)
    assert (predicted == test_labels).float().mean() > 0.95


def test_cross_fitted_targets_never_echo_the_photos_own_label() -> None:
    """Labels that the scene outputs do not predict at all: a head fitted on the photos themselves memorises them
    (365 inputs, 150 photos), so its targets would be the labels echoed back; cross-fitted targets stay at chance."""
    from training.teacher_head import cross_fitted_logits, fit_teacher_head

    generator = torch.Generator().manual_seed(0)
    scenes = torch.randn(150, NUM_SCENES, generator=generator)
    labels = torch.randint(0, 5, (150,), generator=generator)
    with torch.no_grad():
        in_sample = fit_teacher_head(scenes, labels, len(LABELS))(scenes).argmax(dim=1)
    cross_fitted = cross_fitted_logits(scenes, labels, len(LABELS)).argmax(dim=1)
    assert (in_sample == labels).float().mean() > 0.95
    assert (cross_fitted == labels).float().mean() < 0.4


def test_folds_cover_every_photo_once_in_equal_sizes() -> None:
    from training.teacher_head import fold_of_each

    fold = fold_of_each(103, 5, seed=0)
    assert torch.bincount(fold).tolist() == [21, 21, 21, 20, 20]
    assert torch.equal(fold, fold_of_each(103, 5, seed=0))


def test_the_zero_shot_teacher_is_unchanged_and_the_fine_tuned_one_is_five_way() -> None:
    from training.soft_targets import distillation_targets, on_the_labels_side, room_logits
    from training.teacher import Places365Teacher

    teacher = Places365Teacher(torch.nn.Identity(), LABELS)
    labels = torch.arange(60) % 5
    scenes = scene_logits_that_name(labels, 1.0, 3)
    zero_shot = distillation_targets(scenes, teacher, labels, LABELS, "zero_shot")
    expected = on_the_labels_side(torch.from_numpy(room_logits(scenes, teacher)).float(), labels, 4)
    assert torch.equal(zero_shot, expected)
    fine_tuned = distillation_targets(scenes, teacher, labels, LABELS, "fine_tuned")
    assert fine_tuned.shape == (60, 5) and torch.isfinite(fine_tuned).all()


def test_the_recipe_names_its_teacher_and_old_checkpoints_read_as_zero_shot() -> None:
    from training.recipe import PROFILES, Recipe, recipe_from_checkpoint

    saved = asdict(PROFILES["default"])
    saved.pop("kd_teacher")
    assert recipe_from_checkpoint(saved).kd_teacher == "zero_shot"
    with pytest.raises(ValueError, match="kd_teacher"):
        Recipe(kd_teacher="oracle")
    # one wording wherever the settings are shown (compare table, training log, model metadata)
    assert PROFILES["default"].distillation() == "alpha 0.5, T 4.0, fine-tuned teacher, all-scenes weight 0.3"
    assert Recipe(kd_alpha=0.3, kd_scene_weight=0.1).distillation() == "alpha 0.3, T 2.0, zero-shot teacher, " \
                                                                      "all-scenes weight 0.1"
    assert Recipe().distillation() == "no"
