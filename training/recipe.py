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
The teacher's logits come from the on-disk soft-target cache (training/soft_targets.py), computed once.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

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
    kd_teacher_views: str = "centre"  # "centre": one teacher pass per image serves every view; "all": teacher per view
    kd_scene_weight: float = 0.0  # weight of the all-365-scenes term (auxiliary head, not exported); 0 = off
    soup: int = 1  # fine-tunes from the one warm start, greedy-souped on validation; 3 gained nothing (README)
    drop_audited: bool = False  # drop training images a confident teacher disagrees with (label audit)
    # True: nothing is cached; every epoch draws a new augmented view of each image and runs the (short)
    # frozen stem live, so the blocks after it learn on fresh views (profile "fresh", README "Distillation")
    fresh_views: bool = False
    workers: int = 2
    pretrained: bool = True
    preprocessing: dict[str, Any] = field(default_factory=lambda: Preprocessing().to_dict())

    def stem_cut(self) -> int:
        return self.stem_blocks if self.stem_blocks is not None else backbone(self.arch).default_stem_blocks


KD_TEACHER_VIEWS = ("centre", "all")
DISTILL_CHOICES = ("off", "on", "both")  # `compare`: students without and/or with the teacher


# Distillation as chosen on validation (`python -m training.sweep_kd`, README "Distillation"): the default
# profile distils; the quick profile is a smoke run that needs no teacher file.
KD_ALPHA = 0.5
KD_TEMPERATURE = 4.0
KD_SCENE_WEIGHT = 0.3  # the all-365-scenes term: val 0.9165 vs 0.9130 without, 0.9148 at weight 1 (full split)

PROFILES: dict[str, Recipe] = {
    "default": Recipe(kd_alpha=KD_ALPHA, kd_temperature=KD_TEMPERATURE, kd_scene_weight=KD_SCENE_WEIGHT),
    # all but the first 4 blocks (the 112/56 px ones) fine-tuned on a new augmented view every epoch: ~4 min
    # an epoch on 2 cores, no cache to build; val 0.9126 INT8 vs 0.9143 for the default's served run (README)
    "fresh": Recipe(kd_alpha=KD_ALPHA, kd_temperature=KD_TEMPERATURE, kd_scene_weight=KD_SCENE_WEIGHT,
                    fresh_views=True, stem_blocks=4, views=1, warmup_epochs=0, epochs=10, lr_tail=2e-4,
                    head_lr_factor=10.0),
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Float32, channels-last on `device`: depthwise convolutions run about twice as fast so on CPU."""
    return batch.to(device).float().contiguous(memory_format=torch.channels_last)


TeacherFn = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def cache_stem_outputs(stem: nn.Module, dataset: ImageDataset, recipe: Recipe, seed: int, desc: str,
                       device: torch.device, teacher: TeacherFn | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stem activations of every image in `dataset`, in order, as float16 on the CPU; with `teacher`, also
    its logits on exactly the same (augmented) inputs."""
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=recipe.batch_size, shuffle=False,
                                         num_workers=recipe.workers, generator=generator,
                                         persistent_workers=False)
    outputs, teacher_outputs = [], []
    for images, _ in tqdm(loader, desc=desc, unit="batch"):
        outputs.append(stem(to_device(images, device)).half().cpu().contiguous())
        if teacher is not None:
            teacher_outputs.append(teacher(images))
    return torch.cat(outputs), (torch.cat(teacher_outputs) if teacher is not None else None)


def cache_views(stem: nn.Module, samples: list[Sample], recipe: Recipe, config: Preprocessing,
                device: torch.device, views: int, split: str,
                teacher: TeacherFn | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[views, N, C, H, W]: view 0 is the service's own preprocessing, the others are augmented. With
    `teacher`, also [views - 1, N, classes]: the teacher's logits on the augmented views."""
    cached = [cache_stem_outputs(stem, ImageDataset(samples, config), recipe, recipe.seed,
                                 f"{split} stem, centre view", device)[0]]
    augment = train_augmentation(config)
    teacher_views = []
    for view in range(1, views):
        stem_out, teacher_out = cache_stem_outputs(
            stem, ImageDataset(samples, config, augment), recipe, recipe.seed + view,
            f"{split} stem{' + teacher' if teacher else ''}, view {view + 1}/{views}", device, teacher)
        cached.append(stem_out)
        teacher_views.append(teacher_out)
    return torch.stack(cached), (torch.stack(teacher_views) if teacher is not None and teacher_views else None)


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


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (view index, sample index, stem outputs on device)


def cached_batches(train_cache: torch.Tensor, batch_size: int, rng: np.random.Generator,
                   device: torch.device) -> Iterator[Batch]:
    """Shuffled batches: each sample once per epoch, in a random one of its cached views."""
    views, num_samples = train_cache.shape[:2]
    order = rng.permutation(num_samples)
    chosen_views = rng.integers(0, views, size=num_samples)
    for start in range(0, num_samples, batch_size):
        index = order[start:start + batch_size]
        view, index = torch.from_numpy(chosen_views[index]), torch.from_numpy(index)
        yield view, index, to_device(train_cache[view, index], device)


def fresh_batches(stem: nn.Module, samples: list[Sample], config: Preprocessing, batch_size: int, workers: int,
                  rng: np.random.Generator, device: torch.device) -> Iterator[Batch]:
    """Each sample once, in a new augmented view: the frozen stem runs live and nothing is cached."""
    order = rng.permutation(len(samples))
    batches = [order[start:start + batch_size].tolist() for start in range(0, len(order), batch_size)]
    loader = torch.utils.data.DataLoader(ImageDataset(samples, config, train_augmentation(config)),
                                         batch_sampler=batches, num_workers=workers,
                                         generator=torch.Generator().manual_seed(int(rng.integers(2**62))))
    for index, (images, _) in zip(batches, loader):
        with torch.no_grad():
            inputs = stem(to_device(images, device))
        yield torch.zeros(len(index), dtype=torch.long), torch.tensor(index), inputs


def train_epoch(tail: nn.Sequential, batches: Iterator[Batch], num_batches: int, targets: torch.Tensor,
                optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler | None,
                loss_fn: DistillationLoss, device: torch.device, desc: str,
                teacher_logits: torch.Tensor | None = None, scene_head: nn.Module | None = None,
                teacher_scenes: torch.Tensor | None = None) -> float:
    """One pass over the training images. `teacher_logits` is [1 or views, N, classes]: one teacher view
    (the centre) serves every student view, or one per cached view. `teacher_scenes` is [N, 365] (centre)."""
    tail.train()
    freeze_batchnorm(tail)
    total, count = 0.0, 0
    for views, index, inputs in tqdm(batches, total=num_batches, desc=desc, unit="batch", leave=False):
        teacher = None
        if teacher_logits is not None:
            teacher = teacher_logits[views if teacher_logits.shape[0] > 1 else 0, index].to(device).float()
        logits, scenes = tail_outputs(tail, inputs, scene_head)
        loss = loss_fn(logits, targets[index].to(device), teacher, scenes,
                       None if teacher_scenes is None else teacher_scenes[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += loss.item() * len(index)
        count += len(index)
    return total / max(count, 1)


def warmup_then_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def set_trainable(module: nn.Module, trainable: bool) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(trainable)


@dataclass
class Prepared:
    """Everything the two training stages read: cached stem outputs, targets and teacher logits."""
    labels: list[str]
    train_samples: list[Sample]
    val_samples: list[Sample]
    train_cache: torch.Tensor | None  # [views, N, C, H, W] float16; None with fresh_views (nothing cached)
    val_cache: torch.Tensor  # [N, C, H, W] float16
    teacher_logits: torch.Tensor | None  # [1 or views, N, classes]: the teacher's room logits
    teacher_scenes: torch.Tensor | None = None  # [N, 365]: all the teacher's Places logits, centre view
    teacher_cost: dict[str, Any] | None = None
    dropped: int = 0


def build_model(recipe: Recipe, num_classes: int, device: torch.device) -> StemTail:
    model = build_stem_tail(recipe.arch, num_classes, recipe.pretrained, recipe.stem_cut())
    model = model.to(device, memory_format=torch.channels_last)
    model.eval()
    set_trainable(model.stem, False)
    return model


def uses_teacher(recipe: Recipe) -> bool:
    return recipe.kd_alpha > 0 or recipe.kd_scene_weight > 0 or recipe.drop_audited


def prepare(model: StemTail, data_root: Path, labels: list[str], recipe: Recipe, device: torch.device,
            weights_dir: Path | None = None, soft_target_dir: Path | None = None) -> Prepared:
    """Cache the stem's outputs (and, when the recipe distils, the teacher's logits from the soft-target cache)."""
    from training.distill import audit_flags, centre_scene_logits, load_teacher_for, teacher_room_fn
    from training.soft_targets import on_the_labels_side, room_logits

    if recipe.kd_teacher_views not in KD_TEACHER_VIEWS:
        raise ValueError(f"kd_teacher_views must be one of {KD_TEACHER_VIEWS}, got {recipe.kd_teacher_views!r}")
    if recipe.fresh_views and recipe.kd_teacher_views != "centre":
        raise ValueError("fresh_views trains on views that are never cached: the teacher serves them from its "
                         "centre view (kd_teacher_views='centre')")
    config = Preprocessing.from_dict(recipe.preprocessing)
    train_samples = list_samples(data_root, "train", labels, recipe.max_per_class)
    val_samples = list_samples(data_root, "val", labels, recipe.max_per_class)
    if not train_samples or not val_samples:
        raise ValueError(f"{data_root} has {len(train_samples)} train and {len(val_samples)} val images; need both")
    teacher, centre, scenes, cost, dropped = None, None, None, None, 0
    if uses_teacher(recipe):
        teacher = load_teacher_for(labels, weights_dir)
        scenes, cost = centre_scene_logits(teacher, data_root, train_samples, soft_target_dir)
        centre = torch.from_numpy(room_logits(scenes, teacher)).float()
        if recipe.drop_audited:
            keep = ~audit_flags(centre.numpy(), np.array([s.label for s in train_samples]))
            dropped = int((~keep).sum())
            train_samples = [s for s, k in zip(train_samples, keep) if k]
            kept = torch.from_numpy(keep)
            centre, scenes = centre[kept], scenes[kept]
            print(f"dropped {dropped} training images a confident teacher disagrees with (label audit)")
    distilling = recipe.kd_alpha > 0
    print(f"{recipe.arch}: {len(train_samples)} train / {len(val_samples)} val images, "
          f"stem = first {recipe.stem_cut()} blocks, "
          f"{'a fresh view each epoch' if recipe.fresh_views else f'{recipe.views} cached views'}, device {device}"
          + (f", distillation alpha {recipe.kd_alpha} T {recipe.kd_temperature} "
             f"teacher on {recipe.kd_teacher_views} view(s)" if distilling else "")
          + (f", scene distillation weight {recipe.kd_scene_weight}" if recipe.kd_scene_weight > 0 else ""))
    per_view_teacher = teacher_room_fn(teacher, device) if distilling and recipe.kd_teacher_views == "all" else None
    train_cache, augmented = None, None
    if not recipe.fresh_views:
        train_cache, augmented = cache_views(model.stem, train_samples, recipe, config, device, recipe.views,
                                             "train", per_view_teacher)
    val_cache = cache_views(model.stem, val_samples, recipe, config, device, 1, "val")[0][0]
    teacher_logits = None
    if recipe.kd_alpha > 0:
        teacher_logits = centre.unsqueeze(0)
        if augmented is not None:
            teacher_logits = torch.cat([teacher_logits, augmented.float()])
        teacher_logits = on_the_labels_side(teacher_logits, torch.tensor([s.label for s in train_samples]),
                                            labels.index(OTHER) if OTHER in labels else None)
    return Prepared(labels, train_samples, val_samples, train_cache, val_cache, teacher_logits, scenes, cost, dropped)


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
    history["dropped_by_audit"] = prepared.dropped
    (out_dir / "history.json").write_text(json.dumps(history, indent=2))
    return model, history


def average_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform average of same-shaped state dicts; integer buffers (BatchNorm's counters) from the first."""
    return {key: torch.stack([state[key].float() for state in states]).mean(0).to(value.dtype)
            if value.is_floating_point() else value.clone() for key, value in states[0].items()}


def greedy_soup(ingredients: list[tuple[float, dict[str, torch.Tensor]]], score: Callable[[dict], float]
                ) -> tuple[dict[str, torch.Tensor], float, list[int]]:
    """Greedy model soup (Wortsman et al. 2022): fine-tunes of one start, best validation score first, each
    added to the weight average only if the average scores no worse on validation. Returns the souped
    state, its score and the indices it averages; a single ingredient is its own soup."""
    order = sorted(range(len(ingredients)), key=lambda i: -ingredients[i][0])
    kept = [order[0]]
    souped, best = ingredients[order[0]][1], ingredients[order[0]][0]
    for index in order[1:]:
        candidate = average_states([ingredients[i][1] for i in kept + [index]])
        candidate_score = score(candidate)
        if candidate_score >= best:
            kept, souped, best = kept + [index], candidate, candidate_score
    return souped, best, kept


def fit(model: StemTail, prepared: Prepared, recipe: Recipe, out_dir: Path, device: torch.device,
        resume: bool = False, quiet: bool = False, checkpoints: bool = True) -> tuple[StemTail, dict]:
    """Head warm-up, then `recipe.soup` fine-tunes of the tail from that warm start (each with its own seed,
    each keeping its best epoch by val macro-F1), greedy-souped on validation into one tail: same network,
    same latency. `checkpoints=False` (sweeps) skips the per-epoch checkpoint file that `--resume` needs."""
    labels = prepared.labels
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out_dir / "checkpoint.pt"
    train_cache, val_cache, teacher_logits = prepared.train_cache, prepared.val_cache, prepared.teacher_logits
    train_targets = torch.tensor([s.label for s in prepared.train_samples])
    val_targets = np.array([s.label for s in prepared.val_samples])
    train_samples = prepared.train_samples
    log = (lambda *a: None) if quiet else print

    cross_entropy = nn.CrossEntropyLoss(weight=class_weights(train_samples, len(labels)).to(device),
                                        label_smoothing=recipe.label_smoothing)
    loss_fn = DistillationLoss(cross_entropy, recipe.kd_alpha, recipe.kd_temperature, recipe.kd_scene_weight)
    scene_head, teacher_scenes = None, None
    if recipe.kd_scene_weight > 0:
        if prepared.teacher_scenes is None:
            raise ValueError("kd_scene_weight > 0 needs the teacher's scene logits (prepare with the teacher)")
        scene_head, teacher_scenes = scene_head_for(model).to(device), prepared.teacher_scenes
    auxiliary = list(scene_head.parameters()) if scene_head is not None else []
    rng = np.random.default_rng(recipe.seed)
    history: dict[str, Any] = {"recipe": asdict(recipe), "epochs": []}
    steps_per_epoch = math.ceil(len(train_samples) / recipe.batch_size)
    config = Preprocessing.from_dict(recipe.preprocessing)

    def epoch_inputs() -> Iterator[Batch]:
        """This epoch's batches, drawn from `rng` as it stands (each soup ingredient reseeds it)."""
        if train_cache is None:
            return fresh_batches(model.stem, train_samples, config, recipe.batch_size, recipe.workers, rng, device)
        return cached_batches(train_cache, recipe.batch_size, rng, device)

    def validate(tail_state: dict[str, torch.Tensor] | None = None) -> float:
        if tail_state is not None:
            model.tail.load_state_dict(tail_state)
        predictions = predict_tail(model.tail, val_cache, recipe.batch_size * 2, device).argmax(axis=1)
        return macro_f1(val_targets, predictions, len(labels))

    state = torch.load(checkpoint_path, weights_only=False) if resume and checkpoint_path.exists() else None
    if state is not None and state["recipe"] != asdict(recipe):
        raise ValueError(f"{checkpoint_path} was written by another recipe; remove it or drop --resume")

    def save_checkpoint(**progress: Any) -> None:
        if checkpoints:
            torch.save({"recipe": asdict(recipe), "warm": warm, "ingredients": ingredients, "history": history,
                        **progress}, checkpoint_path)

    # Stage 1: head warm-up, the tail body frozen.
    head = model.head
    if state is None:
        set_trainable(model.tail, False)
        set_trainable(head, True)
        optimizer = torch.optim.AdamW([*head.parameters(), *auxiliary], lr=recipe.lr_head,
                                      weight_decay=recipe.weight_decay)
        for epoch in range(recipe.warmup_epochs):
            loss = train_epoch(model.tail, epoch_inputs(), steps_per_epoch, train_targets, optimizer, None, loss_fn,
                               device, f"warm-up {epoch + 1}/{recipe.warmup_epochs}", teacher_logits, scene_head,
                               teacher_scenes)
            f1 = validate()
            history["epochs"].append({"stage": "warmup", "epoch": epoch + 1, "train_loss": loss, "val_macro_f1": f1})
            log(f"warm-up {epoch + 1}: loss {loss:.4f}  val macro-F1 {f1:.4f}")
        warm = {"tail": copy.deepcopy(model.tail.state_dict()),
                "scene_head": copy.deepcopy(scene_head.state_dict()) if scene_head is not None else None}
        ingredients: list[tuple[float, dict[str, torch.Tensor]]] = []
    else:
        warm, ingredients, history = state["warm"], state["ingredients"], state["history"]

    # Stage 2: fine-tune the whole tail, once per soup ingredient, each from the warm start.
    set_trainable(model.tail, True)
    for ingredient in range(len(ingredients), recipe.soup):
        model.tail.load_state_dict(warm["tail"])
        if scene_head is not None:
            scene_head.load_state_dict(warm["scene_head"])
        if ingredient > 0:  # the first continues the warm-up's random stream: soup = 1 is the plain recipe
            rng = np.random.default_rng([recipe.seed, ingredient])
            torch.manual_seed(recipe.seed + ingredient)
        name = f"fine-tune{f' (soup {ingredient + 1}/{recipe.soup})' if recipe.soup > 1 else ''}"
        optimizer = torch.optim.AdamW([{"params": model.tail_body_parameters(), "lr": recipe.lr_tail},
                                       {"params": [*head.parameters(), *auxiliary],
                                        "lr": recipe.lr_tail * recipe.head_lr_factor}],
                                      weight_decay=recipe.weight_decay)
        scheduler = warmup_then_cosine(optimizer, recipe.epochs * steps_per_epoch, max(steps_per_epoch, 5))
        best_f1, best_tail, start_epoch, stale = -1.0, copy.deepcopy(model.tail.state_dict()), 0, 0
        if state is not None and state.get("ingredient") == ingredient and state.get("tail") is not None:
            model.tail.load_state_dict(state["tail"])
            if scene_head is not None:
                scene_head.load_state_dict(state["scene_head"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            best_f1, best_tail, stale = state["best_f1"], state["best_tail"], state["stale"]
            start_epoch, rng = state["epoch"], state["rng"]
            log(f"resumed from {checkpoint_path} after epoch {start_epoch}{name.removeprefix('fine-tune')}")

        for epoch in range(start_epoch, recipe.epochs):
            if stale >= recipe.patience:
                log(f"early stop: no val macro-F1 gain for {stale} epochs")
                break
            loss = train_epoch(model.tail, epoch_inputs(), steps_per_epoch, train_targets, optimizer, scheduler,
                               loss_fn, device, f"{name} {epoch + 1}/{recipe.epochs}", teacher_logits, scene_head,
                               teacher_scenes)
            f1 = validate()
            history["epochs"].append({"stage": "finetune", "ingredient": ingredient, "epoch": epoch + 1,
                                      "train_loss": loss, "val_macro_f1": f1})
            log(f"{name} {epoch + 1}: loss {loss:.4f}  val macro-F1 {f1:.4f}")
            if f1 > best_f1:
                best_f1, best_tail, stale = f1, copy.deepcopy(model.tail.state_dict()), 0
            else:
                stale += 1
            save_checkpoint(ingredient=ingredient, tail=model.tail.state_dict(), optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict(), best_f1=best_f1, best_tail=best_tail, epoch=epoch + 1,
                            stale=stale, rng=rng,
                            scene_head=scene_head.state_dict() if scene_head is not None else None)
        ingredients.append((best_f1, best_tail))
        save_checkpoint(ingredient=ingredient + 1, tail=None)

    souped, best_f1, kept = greedy_soup(ingredients, validate)
    if recipe.soup > 1:
        history["soup"] = {"ingredients_val_macro_f1": [f1 for f1, _ in ingredients], "kept": kept,
                           "soup_val_macro_f1": best_f1}
        log(f"soup of fine-tunes {kept}: val macro-F1 {best_f1:.4f} "
            f"(each alone: {', '.join(f'{f1:.4f}' for f1, _ in ingredients)})")
    model.tail.load_state_dict(souped)
    model = model.cpu().to(memory_format=torch.contiguous_format).eval()
    history["best_val_macro_f1"] = best_f1
    return model, history


def recipe_from_args(profile: str, **overrides: Any) -> Recipe:
    """A named profile with the non-None overrides applied."""
    return replace(PROFILES[profile], **{k: v for k, v in overrides.items() if v is not None})
