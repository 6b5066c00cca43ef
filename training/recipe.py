"""The fine-tuning recipe, shaped for a small CPU box.

1. The frozen stem (the first, high-resolution blocks, most of the compute) runs once per cached view:
   one centre view and `views - 1` augmented views of every training image, stored in half precision.
2. Head warm-up: the new classifier learns on pooled features of those views with the rest frozen.
3. Fine-tune: the tail (last blocks + classifier) trains on the cached views, a random view per image
   each epoch, AdamW with warm-up + cosine decay, BatchNorm frozen, class-weighted label-smoothed loss,
   early stopping on validation macro-F1, a checkpoint after every epoch (`--resume` continues).
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from inference.preprocess import Preprocessing
from training.backbones import BACKBONES, StemTail, build_backbone, freeze_batchnorm
from training.data import ImageDataset, Sample, class_weights, list_samples, train_augmentation
from training.metrics import macro_f1


@dataclass(frozen=True)
class Recipe:
    arch: str = "mobilenet_v2"  # the most accurate backbone within the time budget here (runs/compare)
    stem_blocks: int | None = None  # None: the architecture's default cut
    views: int = 4  # cached views per training image: 1 centre + (views - 1) augmented
    warmup_epochs: int = 4
    epochs: int = 12
    batch_size: int = 64
    lr_head: float = 3e-3  # warm-up of the new classifier
    lr_tail: float = 3e-4  # fine-tune: pretrained blocks (the classifier gets 3x this)
    weight_decay: float = 0.02
    label_smoothing: float = 0.1
    patience: int = 4
    seed: int = 1337
    max_per_class: int | None = None  # a subset for quick runs
    workers: int = 2
    pretrained: bool = True
    preprocessing: dict[str, Any] = field(default_factory=lambda: Preprocessing().to_dict())

    def stem_cut(self) -> int:
        return self.stem_blocks if self.stem_blocks is not None else BACKBONES[self.arch].default_stem_blocks


PROFILES: dict[str, Recipe] = {
    "default": Recipe(),
    "quick": Recipe(arch="mobilenet_v3_small", views=2, warmup_epochs=3, epochs=8, max_per_class=60, patience=4),
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


@torch.no_grad()
def cache_stem_outputs(stem: nn.Module, dataset: ImageDataset, recipe: Recipe, seed: int, desc: str,
                       device: torch.device) -> torch.Tensor:
    """Stem activations of every image in `dataset`, in order, as float16 on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=recipe.batch_size, shuffle=False,
                                         num_workers=recipe.workers, generator=generator,
                                         persistent_workers=False)
    outputs = [stem(to_device(images, device)).half().cpu().contiguous()
               for images, _ in tqdm(loader, desc=desc, unit="batch")]
    return torch.cat(outputs)


def cache_views(stem: nn.Module, samples: list[Sample], recipe: Recipe, config: Preprocessing,
                device: torch.device, views: int, split: str) -> torch.Tensor:
    """[views, N, C, H, W]: view 0 is the service's own preprocessing, the others are augmented."""
    cached = [cache_stem_outputs(stem, ImageDataset(samples, config), recipe, recipe.seed,
                                 f"{split} stem, centre view", device)]
    augment = train_augmentation(config)
    for view in range(1, views):
        cached.append(cache_stem_outputs(stem, ImageDataset(samples, config, augment), recipe,
                                         recipe.seed + view, f"{split} stem, view {view + 1}/{views}", device))
    return torch.stack(cached)


@torch.no_grad()
def predict_tail(tail: nn.Module, features: torch.Tensor, batch_size: int, device: torch.device) -> np.ndarray:
    tail.eval()
    logits = [tail(to_device(features[i:i + batch_size], device)).cpu()
              for i in range(0, len(features), batch_size)]
    return torch.cat(logits).numpy()


def epoch_batches(num_samples: int, views: int, batch_size: int, rng: np.random.Generator):
    """Shuffled (view index, sample index) batches: each sample once per epoch, in a random cached view."""
    order = rng.permutation(num_samples)
    chosen_views = rng.integers(0, views, size=num_samples)
    for start in range(0, num_samples, batch_size):
        index = order[start:start + batch_size]
        yield torch.from_numpy(chosen_views[index]), torch.from_numpy(index)


def train_epoch(tail: nn.Module, train_cache: torch.Tensor, targets: torch.Tensor, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler | None, loss_fn: nn.Module, recipe: Recipe,
                rng: np.random.Generator, device: torch.device, desc: str) -> float:
    tail.train()
    freeze_batchnorm(tail)
    total, count = 0.0, 0
    batches = list(epoch_batches(train_cache.shape[1], train_cache.shape[0], recipe.batch_size, rng))
    for views, index in tqdm(batches, desc=desc, unit="batch", leave=False):
        inputs = to_device(train_cache[views, index], device)
        loss = loss_fn(tail(inputs), targets[index].to(device))
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


def train(data_root: Path, labels: list[str], recipe: Recipe, out_dir: Path, resume: bool = False) -> tuple[StemTail, dict]:
    """Fine-tune `recipe.arch` on `data_root`; return the best model (eval mode) and the training history."""
    started = time.perf_counter()
    seed_everything(recipe.seed)
    device = pick_device()
    config = Preprocessing.from_dict(recipe.preprocessing)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out_dir / "checkpoint.pt"

    model = StemTail(build_backbone(recipe.arch, len(labels), recipe.pretrained), recipe.stem_cut())
    model = model.to(device, memory_format=torch.channels_last)
    model.eval()
    set_trainable(model.stem, False)

    train_samples = list_samples(data_root, "train", labels, recipe.max_per_class)
    val_samples = list_samples(data_root, "val", labels, recipe.max_per_class)
    if not train_samples or not val_samples:
        raise ValueError(f"{data_root} has {len(train_samples)} train and {len(val_samples)} val images; need both")
    print(f"{recipe.arch}: {len(train_samples)} train / {len(val_samples)} val images, stem = features[:{recipe.stem_cut()}], "
          f"{recipe.views} cached views, device {device}")
    train_cache = cache_views(model.stem, train_samples, recipe, config, device, recipe.views, "train")
    val_cache = cache_views(model.stem, val_samples, recipe, config, device, 1, "val")[0]
    train_targets = torch.tensor([s.label for s in train_samples])
    val_targets = np.array([s.label for s in val_samples])

    loss_fn = nn.CrossEntropyLoss(weight=class_weights(train_samples, len(labels)).to(device),
                                  label_smoothing=recipe.label_smoothing)
    rng = np.random.default_rng(recipe.seed)
    history: dict[str, Any] = {"recipe": asdict(recipe), "epochs": []}
    steps_per_epoch = math.ceil(len(train_samples) / recipe.batch_size)

    def validate() -> float:
        predictions = predict_tail(model.tail, val_cache, recipe.batch_size * 2, device).argmax(axis=1)
        return macro_f1(val_targets, predictions, len(labels))

    state = torch.load(checkpoint_path, weights_only=False) if resume and checkpoint_path.exists() else None
    if state is not None and state["recipe"] != asdict(recipe):
        raise ValueError(f"{checkpoint_path} was written by another recipe; remove it or drop --resume")

    # Stage 1: head warm-up, the tail body frozen.
    head = model.tail[-1]
    if state is None:
        set_trainable(model.tail, False)
        set_trainable(head, True)
        optimizer = torch.optim.AdamW(head.parameters(), lr=recipe.lr_head, weight_decay=recipe.weight_decay)
        for epoch in range(recipe.warmup_epochs):
            loss = train_epoch(model.tail, train_cache, train_targets, optimizer, None, loss_fn, recipe, rng, device,
                               f"warm-up {epoch + 1}/{recipe.warmup_epochs}")
            f1 = validate()
            history["epochs"].append({"stage": "warmup", "epoch": epoch + 1, "train_loss": loss, "val_macro_f1": f1})
            print(f"warm-up {epoch + 1}: loss {loss:.4f}  val macro-F1 {f1:.4f}")

    # Stage 2: fine-tune the whole tail.
    set_trainable(model.tail, True)
    body = [p for name, p in model.tail.named_parameters() if not name.startswith(f"{len(model.tail) - 1}.")]
    optimizer = torch.optim.AdamW([{"params": body, "lr": recipe.lr_tail},
                                   {"params": head.parameters(), "lr": recipe.lr_tail * 3}],
                                  weight_decay=recipe.weight_decay)
    scheduler = warmup_then_cosine(optimizer, recipe.epochs * steps_per_epoch, max(steps_per_epoch, 5))
    best_f1, best_tail, start_epoch, stale = -1.0, copy.deepcopy(model.tail.state_dict()), 0, 0
    if state is not None:
        model.tail.load_state_dict(state["tail"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        best_f1, best_tail, start_epoch, stale = state["best_f1"], state["best_tail"], state["epoch"], state["stale"]
        history, rng = state["history"], state["rng"]
        print(f"resumed from {checkpoint_path} after epoch {start_epoch}")

    for epoch in range(start_epoch, recipe.epochs):
        loss = train_epoch(model.tail, train_cache, train_targets, optimizer, scheduler, loss_fn, recipe, rng, device,
                           f"fine-tune {epoch + 1}/{recipe.epochs}")
        f1 = validate()
        history["epochs"].append({"stage": "finetune", "epoch": epoch + 1, "train_loss": loss, "val_macro_f1": f1})
        print(f"fine-tune {epoch + 1}: loss {loss:.4f}  val macro-F1 {f1:.4f}")
        if f1 > best_f1:
            best_f1, best_tail, stale = f1, copy.deepcopy(model.tail.state_dict()), 0
        else:
            stale += 1
        torch.save({"recipe": asdict(recipe), "tail": model.tail.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "best_f1": best_f1, "best_tail": best_tail,
                    "epoch": epoch + 1, "stale": stale, "history": history, "rng": rng}, checkpoint_path)
        if stale >= recipe.patience:
            print(f"early stop: no val macro-F1 gain for {stale} epochs")
            break

    model.tail.load_state_dict(best_tail)
    model = model.cpu().to(memory_format=torch.contiguous_format).eval()
    history["best_val_macro_f1"] = best_f1
    history["train_minutes"] = (time.perf_counter() - started) / 60
    (out_dir / "history.json").write_text(json.dumps(history, indent=2))
    return model, history


def recipe_from_args(profile: str, **overrides: Any) -> Recipe:
    """A named profile with the non-None overrides applied."""
    return replace(PROFILES[profile], **{k: v for k, v in overrides.items() if v is not None})
