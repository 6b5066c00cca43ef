"""The fine-tuning recipe, shaped for a small CPU box.

1. The frozen stem (the first, high-resolution blocks, most of the compute) runs once per cached view:
   one centre view and `views - 1` augmented views of every training image, stored in half precision.
2. Head warm-up: the new classifier learns on pooled features of those views with the rest frozen.
3. Fine-tune: the tail (last blocks + classifier) trains on the cached views, a random view per image
   each epoch, AdamW with warm-up + cosine decay, BatchNorm frozen, class-weighted label-smoothed loss,
   early stopping on validation macro-F1, a checkpoint after every epoch (`--resume` continues).

With `kd_alpha > 0` both stages learn from the Places365 teacher too (knowledge distillation, Hinton et al.
2015): loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(label).
With `kd_scene_weight > 0` an auxiliary head on the tail's pooled features also learns the teacher's full
365-scene distribution (+ weight * T^2 * KL over all Places scenes): "dining room" or "hotel room" tells the
student more than four room logits do. That head exists only in training; the exported network is unchanged.
The teacher's logits come from the on-disk soft-target cache (training/soft_targets.py), computed once on the
centre view, which serves every cached view.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from data_prep.common import OTHER
from inference.preprocess import Preprocessing
from training.backbones import StemTail, backbone, build_stem_tail, freeze_batchnorm
from training.data import ImageDataset, Sample, class_weights, list_samples, train_augmentation
from training.metrics import macro_f1
from training.openset import set_operating_point


@dataclass(frozen=True)
class Recipe:
    arch: str = "mobilenet_v2"  # the most accurate backbone within the time budget here (runs/compare)
    stem_blocks: int | None = None  # None: the architecture's default cut
    # cached views per training image: 1 centre + (views - 1) augmented. Validation did not tell 8 from 4
    # (two runs each, README "Distillation"); with the `other` photos the training split is 44 % larger, and
    # 4 views keep `make all` within its hour
    views: int = 4
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
    workers: int = 2
    pretrained: bool = True
    preprocessing: dict[str, Any] = field(default_factory=lambda: Preprocessing().to_dict())

    def stem_cut(self) -> int:
        return self.stem_blocks if self.stem_blocks is not None else backbone(self.arch).default_stem_blocks

    def uses_teacher(self) -> bool:
        return self.kd_alpha > 0 or self.kd_scene_weight > 0


DISTILL_CHOICES = ("off", "on", "both")  # `compare`: students without and/or with the teacher

# Settings of experiments that were removed (README "Distillation"): checkpoints written before hold them.
RETIRED_FIELDS = ("kd_teacher_views", "soup", "drop_audited", "fresh_views")

# Distillation as chosen on validation (`python -m experiments.sweep_kd`, README "Distillation"): the default
# profile distils; the quick profile is a smoke run that needs no teacher file.
KD_ALPHA = 0.5
KD_TEMPERATURE = 4.0
KD_SCENE_WEIGHT = 0.3  # the all-365-scenes term: val 0.9165 vs 0.9130 without, 0.9148 at weight 1 (full split)

PROFILES: dict[str, Recipe] = {
    "default": Recipe(kd_alpha=KD_ALPHA, kd_temperature=KD_TEMPERATURE, kd_scene_weight=KD_SCENE_WEIGHT),
    "quick": Recipe(arch="mobilenet_v3_small", views=2, warmup_epochs=3, epochs=8, max_per_class=60, patience=4),
    # CSAIL's Places365 network fine-tuned (issue 21). Its stem is ~10x MobileNetV2's cost on 2 cores, so fewer
    # cached views and epochs; the pretrained layers get a gentler learning rate than the MobileNets' ImageNet ones.
    # "scene": the network as trained (no max-pool) at 160 px, layer4 + classifier fine-tuned;
    # "scene_maxpool": the max-pool put back (a standard ResNet-18's cost) at 224 px, layer3 + layer4 fine-tuned.
    "scene": Recipe(arch="places365_resnet18", kd_alpha=KD_ALPHA, kd_temperature=KD_TEMPERATURE,
                    kd_scene_weight=KD_SCENE_WEIGHT, views=2, warmup_epochs=2, epochs=5, patience=2, lr_tail=1e-4,
                    head_lr_factor=10.0, preprocessing=Preprocessing(image_size=160, resize_size=183).to_dict()),
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


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Float32, channels-last on `device`: depthwise convolutions run about twice as fast so on CPU."""
    return batch.to(device).float().contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def cache_stem_outputs(stem: nn.Module, dataset: ImageDataset, recipe: Recipe, seed: int, desc: str,
                       device: torch.device) -> torch.Tensor:
    """Stem activations of every image in `dataset`, in order, as float16 on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=recipe.batch_size, shuffle=False,
                                         num_workers=recipe.workers, generator=generator,
                                         persistent_workers=False)
    return torch.cat([stem(to_device(images, device)).half().cpu().contiguous()
                      for images, _ in tqdm(loader, desc=desc, unit="batch")])


def cache_views(stem: nn.Module, samples: list[Sample], recipe: Recipe, config: Preprocessing,
                device: torch.device, views: int, split: str) -> torch.Tensor:
    """[views, N, C, H, W]: view 0 is the service's own preprocessing, the others are augmented."""
    cached = [cache_stem_outputs(stem, ImageDataset(samples, config), recipe, recipe.seed,
                                 f"{split} stem, centre view", device)]
    augment = train_augmentation(config)
    for view in range(1, views):
        cached.append(cache_stem_outputs(stem, ImageDataset(samples, config, augment), recipe, recipe.seed + view,
                                         f"{split} stem, view {view + 1}/{views}", device))
    return torch.stack(cached)


def cached_batches(train_cache: torch.Tensor, batch_size: int, rng: np.random.Generator,
                   device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled batches (sample indices, stem outputs on `device`): each sample once per epoch, in a random one
    of its cached views."""
    views, num_samples = train_cache.shape[:2]
    order = rng.permutation(num_samples)
    chosen_views = rng.integers(0, views, size=num_samples)
    for start in range(0, num_samples, batch_size):
        index = order[start:start + batch_size]
        view, index = torch.from_numpy(chosen_views[index]), torch.from_numpy(index)
        yield index, to_device(train_cache[view, index], device)


@torch.no_grad()
def predict_tail(tail: nn.Module, features: torch.Tensor, batch_size: int, device: torch.device) -> np.ndarray:
    tail.eval()
    logits = [tail(to_device(features[i:i + batch_size], device)).cpu()
              for i in range(0, len(features), batch_size)]
    return torch.cat(logits).numpy()


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
    from training.soft_targets import on_the_labels_side, room_logits

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
            teacher_logits = on_the_labels_side(torch.from_numpy(room_logits(scenes, teacher)).float(),
                                                torch.tensor([s.label for s in train_samples]),
                                                labels.index(OTHER) if OTHER in labels else None)
    print(f"{recipe.arch}: {len(train_samples)} train / {len(val_samples)} val images, "
          f"stem = first {recipe.stem_cut()} blocks, {recipe.views} cached views, device {device}"
          + (f", distillation alpha {recipe.kd_alpha} T {recipe.kd_temperature}" if recipe.kd_alpha > 0 else "")
          + (f", scene distillation weight {recipe.kd_scene_weight}" if recipe.kd_scene_weight > 0 else ""))
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


def warmup_then_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
    if state["recipe"] != asdict(recipe):
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
