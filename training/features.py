"""The stem-output cache: the frozen stem (the first, high-resolution blocks, most of the compute) runs once per
cached view of every image; training and validation then run only the tail on those stored activations."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from inference.preprocess import Preprocessing
from training.data import ImageDataset, Sample, train_augmentation
from training.recipe import Recipe


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
