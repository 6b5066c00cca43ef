"""The fine-tuning recipe, shaped for a small CPU box.

1. The frozen stem (the first, high-resolution blocks, most of the compute) runs once per cached view
   (training/features.py): one centre view and `views - 1` augmented views of every training image.
2. Head warm-up: the new classifier learns on those views with the rest frozen.
3. Fine-tune: the tail (last blocks + classifier) trains on the cached views, a random view per image
   each epoch, AdamW with warm-up + cosine decay, BatchNorm frozen, class-weighted label-smoothed loss,
   early stopping on validation macro-F1, a checkpoint after every epoch (`--resume` continues).

With `kd_alpha > 0` both stages learn from the Places365 teacher too, with `kd_scene_weight > 0` from its 365
scenes as well (training/losses.py). The teacher's logits come from the on-disk soft-target cache
(training/soft_targets.py), computed once on the centre view, which serves every cached view.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from data_prep.common import OTHER
from inference.preprocess import Preprocessing
from training.backbones import StemTail, build_stem_tail, freeze_batchnorm
from training.data import Sample, class_weights, list_samples
from training.features import cache_views, cached_batches, predict_tail
from training.losses import DistillationLoss, scene_head_for, tail_outputs
from training.metrics import macro_f1
from training.openset import set_operating_point
from training.recipe import Recipe, recipe_from_checkpoint

Scheduler = torch.optim.lr_scheduler.LRScheduler
STAGE_NAMES = {"warmup": "warm-up", "finetune": "fine-tune"}  # history key -> what the log says


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_trainable(module: nn.Module, trainable: bool) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(trainable)


@dataclass
class Prepared:
    """Everything the two training stages read: cached stem outputs, targets and teacher logits."""
    labels: list[str]
    train_samples: list[Sample]
    val_samples: list[Sample]
    train_cache: torch.Tensor  # [views, N, C, H, W] float16
    val_cache: torch.Tensor  # [N, C, H, W] float16
    teacher_logits: torch.Tensor | None  # [N, classes]: the teacher's room logits on the centre view
    teacher_scenes: torch.Tensor | None = None  # [N, 365]: all the teacher's Places logits, centre view
    teacher_cost: dict[str, Any] | None = None

    @property
    def train_targets(self) -> torch.Tensor:
        return torch.tensor([s.label for s in self.train_samples])


def build_model(recipe: Recipe, num_classes: int, device: torch.device) -> StemTail:
    model = build_stem_tail(recipe.arch, num_classes, recipe.pretrained, recipe.stem_cut())
    model = model.to(device, memory_format=torch.channels_last)
    model.eval()
    set_trainable(model.stem, False)
    return model


def prepare(model: StemTail, data_root: Path, labels: list[str], recipe: Recipe, device: torch.device,
            weights_dir: Path | None = None, soft_target_dir: Path | None = None) -> Prepared:
    """Cache the stem's outputs (and, when the recipe distils, the teacher's logits from the soft-target cache)."""
    from training.distill import centre_scene_logits, load_teacher_for
    from training.soft_targets import distillation_targets

    config = Preprocessing.from_dict(recipe.preprocessing)
    train_samples = list_samples(data_root, "train", labels, recipe.max_per_class)
    val_samples = list_samples(data_root, "val", labels, recipe.max_per_class)
    if not train_samples or not val_samples:
        raise ValueError(f"{data_root} has {len(train_samples)} train and {len(val_samples)} val images; need both")
    teacher_logits, scenes, cost = None, None, None
    if recipe.uses_teacher():
        teacher = load_teacher_for(labels, weights_dir)
        scenes, cost = centre_scene_logits(teacher, data_root, train_samples, soft_target_dir)
        if recipe.kd_alpha > 0:
            teacher_logits = distillation_targets(scenes, teacher, torch.tensor([s.label for s in train_samples]),
                                                  labels, recipe.kd_teacher)
    print(f"{recipe.arch}: {len(train_samples)} train / {len(val_samples)} val images, "
          f"stem = first {recipe.stem_cut()} blocks, {recipe.views} cached views, device {device}"
          + (f", distillation: {recipe.distillation()}" if recipe.uses_teacher() else ""))
    train_cache = cache_views(model.stem, train_samples, recipe, config, device, recipe.views, "train")
    val_cache = cache_views(model.stem, val_samples, recipe, config, device, 1, "val")[0]
    return Prepared(labels, train_samples, val_samples, train_cache, val_cache, teacher_logits, scenes, cost)


def train(data_root: Path, labels: list[str], recipe: Recipe, out_dir: Path, resume: bool = False,
          weights_dir: Path | None = None, soft_target_dir: Path | None = None) -> tuple[StemTail, dict]:
    """Fine-tune `recipe.arch` on `data_root`; return the best model (eval mode) and the training history."""
    started = time.perf_counter()
    seed_everything(recipe.seed)
    device = pick_device()
    model = build_model(recipe, len(labels), device)
    prepared = prepare(model, data_root, labels, recipe, device, weights_dir, soft_target_dir)
    model, history = fit(model, prepared, recipe, out_dir, device, resume)
    if OTHER in labels:
        val_logits = predict_tail(model.tail, prepared.val_cache, recipe.batch_size * 2, torch.device("cpu"))
        history["other_operating_point"] = set_operating_point(model.head, val_logits, prepared.val_samples,
                                                               prepared.train_samples, labels)
    history["train_minutes"] = (time.perf_counter() - started) / 60
    history["teacher_pass"] = prepared.teacher_cost
    (out_dir / "history.json").write_text(json.dumps(history, indent=2))
    return model, history


# ----------------------------------------------------------------------------------------------------
# The two stages


def fit(model: StemTail, prepared: Prepared, recipe: Recipe, out_dir: Path, device: torch.device,
        resume: bool = False) -> tuple[StemTail, dict]:
    """Head warm-up, then fine-tune the tail, keeping its best epoch by val macro-F1 and stopping early after
    `recipe.patience` epochs without a gain; a checkpoint after every fine-tune epoch lets `resume` continue."""
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out_dir / "checkpoint.pt"
    loss_fn = build_loss(prepared, recipe, device)
    scene_head = build_scene_head(model, prepared, recipe, device)
    rng = np.random.default_rng(recipe.seed)
    history: dict[str, Any] = {"recipe": asdict(recipe), "epochs": []}
    state = load_checkpoint(checkpoint_path, recipe) if resume else None

    if state is None:
        warm_up_head(model, scene_head, prepared, recipe, loss_fn, rng, device, history)
    optimizer, scheduler = start_fine_tune(model, scene_head, recipe, steps_per_epoch(prepared, recipe))
    best = Best(tail=copy.deepcopy(model.tail.state_dict()))
    start_epoch = 0
    if state is not None:
        start_epoch, rng, history, best = restore(state, model, scene_head, optimizer, scheduler)
        print(f"resumed from {checkpoint_path} after epoch {start_epoch}")

    for epoch in range(start_epoch, recipe.epochs):
        if best.stale >= recipe.patience:
            print(f"early stop: no val macro-F1 gain for {best.stale} epochs")
            break
        f1 = run_epoch(model, scene_head, prepared, recipe, "finetune", epoch, recipe.epochs, optimizer, scheduler,
                       loss_fn, rng, device, history)
        best.update(f1, model.tail)
        save_checkpoint(checkpoint_path, recipe, epoch + 1, rng, history, best, model, scene_head, optimizer,
                        scheduler)

    model.tail.load_state_dict(best.tail)
    model = model.cpu().to(memory_format=torch.contiguous_format).eval()
    history["best_val_macro_f1"] = best.f1
    return model, history


def build_loss(prepared: Prepared, recipe: Recipe, device: torch.device) -> DistillationLoss:
    cross_entropy = nn.CrossEntropyLoss(weight=class_weights(prepared.train_samples, len(prepared.labels)).to(device),
                                        label_smoothing=recipe.label_smoothing)
    return DistillationLoss(cross_entropy, recipe.kd_alpha, recipe.kd_temperature, recipe.kd_scene_weight)


def build_scene_head(model: StemTail, prepared: Prepared, recipe: Recipe, device: torch.device) -> nn.Module | None:
    """The training-only 365-scene head when the recipe has a scene term, else None."""
    if recipe.kd_scene_weight <= 0:
        return None
    if prepared.teacher_scenes is None:
        raise ValueError("kd_scene_weight > 0 needs the teacher's scene logits (prepare with the teacher)")
    return scene_head_for(model).to(device)


def auxiliary_parameters(scene_head: nn.Module | None) -> list[nn.Parameter]:
    return list(scene_head.parameters()) if scene_head is not None else []


def steps_per_epoch(prepared: Prepared, recipe: Recipe) -> int:
    return math.ceil(len(prepared.train_samples) / recipe.batch_size)


def warm_up_head(model: StemTail, scene_head: nn.Module | None, prepared: Prepared, recipe: Recipe,
                 loss_fn: DistillationLoss, rng: np.random.Generator, device: torch.device, history: dict) -> None:
    """Stage 1: the new classifier (and the scene head) learn, the tail body frozen."""
    set_trainable(model.tail, False)
    set_trainable(model.head, True)
    optimizer = torch.optim.AdamW([*model.head.parameters(), *auxiliary_parameters(scene_head)], lr=recipe.lr_head,
                                  weight_decay=recipe.weight_decay)
    for epoch in range(recipe.warmup_epochs):
        run_epoch(model, scene_head, prepared, recipe, "warmup", epoch, recipe.warmup_epochs, optimizer, None,
                  loss_fn, rng, device, history)


def start_fine_tune(model: StemTail, scene_head: nn.Module | None, recipe: Recipe, steps: int
                    ) -> tuple[torch.optim.Optimizer, Scheduler]:
    """Stage 2's optimizer: the whole tail trains, the classifier (and scene head) at head_lr_factor x lr_tail;
    at least an epoch (5 steps or more) of learning-rate warm-up, then cosine decay to zero."""
    set_trainable(model.tail, True)
    optimizer = torch.optim.AdamW([{"params": model.tail_body_parameters(), "lr": recipe.lr_tail},
                                   {"params": [*model.head.parameters(), *auxiliary_parameters(scene_head)],
                                    "lr": recipe.lr_tail * recipe.head_lr_factor}],
                                  weight_decay=recipe.weight_decay)
    return optimizer, warmup_then_cosine(optimizer, recipe.epochs * steps, max(steps, 5))


def warmup_then_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> Scheduler:
    """Per step: lr * (step + 1) / warmup_steps for the first `warmup_steps` steps, then cosine decay from lr to 0
    over the remaining `total_steps - warmup_steps`."""
    lr_scheduler = torch.optim.lr_scheduler
    warmup = lr_scheduler.LinearLR(optimizer, start_factor=1 / warmup_steps, total_iters=warmup_steps - 1)
    cosine = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps))
    return lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


def run_epoch(model: StemTail, scene_head: nn.Module | None, prepared: Prepared, recipe: Recipe, stage: str,
              epoch: int, epochs: int, optimizer: torch.optim.Optimizer, scheduler: Scheduler | None,
              loss_fn: DistillationLoss, rng: np.random.Generator, device: torch.device, history: dict) -> float:
    """One epoch of `stage` ("warmup" or "finetune") and its validation; logged and added to `history`.
    Returns the val macro-F1."""
    name = STAGE_NAMES[stage]
    batches = cached_batches(prepared.train_cache, recipe.batch_size, rng, device)
    loss = train_epoch(model.tail, scene_head, prepared, batches, steps_per_epoch(prepared, recipe), optimizer,
                       scheduler, loss_fn, device, f"{name} {epoch + 1}/{epochs}")
    f1 = val_macro_f1(model.tail, prepared, recipe.batch_size * 2, device)
    history["epochs"].append({"stage": stage, "epoch": epoch + 1, "train_loss": loss, "val_macro_f1": f1})
    print(f"{name} {epoch + 1}: loss {loss:.4f}  val macro-F1 {f1:.4f}")
    return f1


def train_epoch(tail: nn.Sequential, scene_head: nn.Module | None, prepared: Prepared,
                batches: Iterator[tuple[torch.Tensor, torch.Tensor]], num_batches: int,
                optimizer: torch.optim.Optimizer, scheduler: Scheduler | None, loss_fn: DistillationLoss,
                device: torch.device, desc: str) -> float:
    """One pass over the training images, each in the view `batches` drew; the teacher's centre-view logits serve
    every view. Returns the mean training loss."""
    tail.train()
    freeze_batchnorm(tail)
    targets, teacher_logits, teacher_scenes = prepared.train_targets, prepared.teacher_logits, prepared.teacher_scenes
    total, count = 0.0, 0
    for index, inputs in tqdm(batches, total=num_batches, desc=desc, unit="batch", leave=False):
        teacher = None if teacher_logits is None else teacher_logits[index].to(device).float()
        scene_targets = None if scene_head is None else teacher_scenes[index].to(device)
        logits, scenes = tail_outputs(tail, inputs, scene_head)
        loss = loss_fn(logits, targets[index].to(device), teacher, scenes, scene_targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += loss.item() * len(index)
        count += len(index)
    return total / max(count, 1)


def val_macro_f1(tail: nn.Module, prepared: Prepared, batch_size: int, device: torch.device) -> float:
    predictions = predict_tail(tail, prepared.val_cache, batch_size, device).argmax(axis=1)
    return macro_f1(np.array([s.label for s in prepared.val_samples]), predictions, len(prepared.labels))


# ----------------------------------------------------------------------------------------------------
# Early stopping and the resume checkpoint


@dataclass
class Best:
    """The fine-tune's best epoch so far: its tail and val macro-F1, and the epochs since it."""
    tail: dict[str, torch.Tensor]
    f1: float = -1.0
    stale: int = 0

    def update(self, f1: float, tail: nn.Module) -> None:
        if f1 > self.f1:
            self.f1, self.tail, self.stale = f1, copy.deepcopy(tail.state_dict()), 0
        else:
            self.stale += 1


def save_checkpoint(path: Path, recipe: Recipe, epoch: int, rng: np.random.Generator, history: dict, best: Best,
                    model: StemTail, scene_head: nn.Module | None, optimizer: torch.optim.Optimizer,
                    scheduler: Scheduler) -> None:
    torch.save({"recipe": asdict(recipe), "epoch": epoch, "rng": rng, "history": history,
                "best_f1": best.f1, "best_tail": best.tail, "stale": best.stale, "tail": model.tail.state_dict(),
                "scene_head": scene_head.state_dict() if scene_head is not None else None,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, path)


def load_checkpoint(path: Path, recipe: Recipe) -> dict[str, Any] | None:
    """The run folder's checkpoint (None if there is none yet); it must have been written by `recipe`."""
    if not path.exists():
        return None
    state = torch.load(path, weights_only=False)
    if recipe_from_checkpoint(state["recipe"]) != recipe:
        raise ValueError(f"{path} was written by another recipe; remove it or drop --resume")
    return state


def restore(state: dict[str, Any], model: StemTail, scene_head: nn.Module | None, optimizer: torch.optim.Optimizer,
            scheduler: Scheduler) -> tuple[int, np.random.Generator, dict, Best]:
    """Load a checkpoint into the fine-tune: returns the epochs done, the batch-order generator, the history and
    the best epoch so far."""
    model.tail.load_state_dict(state["tail"])
    if scene_head is not None:
        scene_head.load_state_dict(state["scene_head"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["epoch"], state["rng"], state["history"], Best(state["best_tail"], state["best_f1"], state["stale"])
