"""Choose the distillation weight, temperature and all-365-scenes weight on validation (never test), on a
training subset.

    python -m experiments.sweep_kd --data DIR --weights-dir DIR --max-per-class 200 --out runs/kd_sweep

The stem caches are computed once; every setting then trains the same student tail from the same start, so the
settings differ only in the loss. Results go to `<out>/sweep.json` and `<out>/sweep.md`; what it found is in
docs/experiments.md. (Its follow-ups of the time, the teacher on every augmented view and dropping the photos the
label audit flags, gained nothing and were removed with their training code.)
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from inference.preprocess import Preprocessing
from training.backbones import BACKBONES, StemTail, seed_hub_cache
from training.data import discover_labels, list_samples
from training.evaluate import accuracy_by_source
from training.features import cache_views, predict_tail
from training.metrics import classification_report
from training.recipe import PROFILES, Recipe
from training.trainer import Prepared, build_model, fit, pick_device, prepare, seed_everything

GRID = ["0:2", "0.5:2", "0.5:4", "0.8:2", "0.8:4", "0.3:2"]


@dataclass(frozen=True)
class Setting:
    """One point of the grid: the loss's weights."""
    alpha: float
    temperature: float
    scene_weight: float = 0.0

    def name(self) -> str:
        scenes = f" scenes {self.scene_weight}" if self.scene_weight else ""
        return f"alpha {self.alpha} T {self.temperature}{scenes}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.sweep_kd", description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--weights-dir", type=Path)
    parser.add_argument("--soft-target-dir", type=Path)
    parser.add_argument("--arch", choices=list(BACKBONES), default=PROFILES["default"].arch)
    parser.add_argument("--max-per-class", type=int, default=200, help="training images per class (0: all)")
    parser.add_argument("--val-max-per-class", type=int, help="validation images per class (default: all)")
    parser.add_argument("--grid", nargs="+", type=parse_setting,
                        help="settings alpha:T[:scenes=W] (default: a small grid of alpha:T; ':scenes=W' adds the "
                             "365-scene term with weight W)")
    parser.add_argument("--out", type=Path, default=Path("runs/kd_sweep"))
    return parser.parse_args()


def parse_setting(item: str) -> Setting:
    """'alpha:T', then optionally ':scenes=W' (the 365-scene term with weight W)."""
    alpha, temperature, *options = item.split(":")
    scene_weight = 0.0
    try:
        for option in options:
            if not option.startswith("scenes="):
                raise ValueError(option)
            scene_weight = float(option.removeprefix("scenes="))
        return Setting(float(alpha), float(temperature), scene_weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{item!r}: expected alpha:T[:scenes=W]") from None


def score(model: StemTail, prepared: Prepared, recipe: Recipe, device: torch.device) -> dict:
    logits = predict_tail(model.tail.to(device, memory_format=torch.channels_last), prepared.val_cache,
                          recipe.batch_size * 2, device)
    targets = np.array([s.label for s in prepared.val_samples])
    report = classification_report(targets, logits.argmax(axis=1), prepared.labels)
    by_source = accuracy_by_source(prepared.val_samples, targets, logits.argmax(axis=1))
    return {"val_accuracy": report["accuracy"], "val_macro_f1": report["macro"]["f1"],
            "val_f1_living_room": report["per_class"]["living_room"]["f1"],
            "val_accuracy_by_source": {k: v["accuracy"] for k, v in by_source.items()}}


def main() -> None:
    args = parse_args()
    if args.weights_dir is not None:
        seed_hub_cache(args.weights_dir)
    labels = discover_labels(args.data)
    grid = args.grid or [parse_setting(item) for item in GRID]
    base = replace(PROFILES["default"], arch=args.arch, max_per_class=args.max_per_class or None)
    seed_everything(base.seed)
    device = pick_device()
    started = time.perf_counter()
    model = build_model(base, len(labels), device)
    prepared = prepare(model, args.data, labels, base, device, args.weights_dir, args.soft_target_dir)
    # Validation: every image (or the asked subset), not the training subset's cap.
    val_samples = list_samples(args.data, "val", labels, args.val_max_per_class)
    config = Preprocessing.from_dict(base.preprocessing)
    val_cache = cache_views(model.stem, val_samples, base, config, device, 1, "val (full)")[0]
    prepared = replace(prepared, val_samples=val_samples, val_cache=val_cache)
    cache_minutes = (time.perf_counter() - started) / 60
    print(f"caches ready in {cache_minutes:.1f} min: {len(prepared.train_samples)} train, {len(val_samples)} val")

    results = []
    args.out.mkdir(parents=True, exist_ok=True)
    for setting in grid:
        recipe = replace(base, kd_alpha=setting.alpha, kd_temperature=setting.temperature,
                         kd_scene_weight=setting.scene_weight)
        seed_everything(recipe.seed)
        fit_started = time.perf_counter()
        # fit writes its resume checkpoint into the scratch folder; each setting overwrites it
        student, _ = fit(build_model(recipe, len(labels), device), prepared, recipe, args.out / "scratch", device)
        result = {"setting": setting.name(), "kd_alpha": recipe.kd_alpha, "kd_temperature": recipe.kd_temperature,
                  "kd_scene_weight": recipe.kd_scene_weight, "train_images": len(prepared.train_samples),
                  **score(student, prepared, recipe, device), "fit_minutes": (time.perf_counter() - fit_started) / 60}
        print(json.dumps(result))
        results.append(result)
        (args.out / "sweep.json").write_text(json.dumps({"cache_minutes": cache_minutes, "results": results}, indent=2))
    write_report(args, prepared, cache_minutes, results)


def write_report(args: argparse.Namespace, prepared: Prepared, cache_minutes: float, results: list[dict]) -> None:
    val_samples = prepared.val_samples
    sources = sorted({s for r in results for s in r["val_accuracy_by_source"]})
    lines = [f"# Distillation sweep ({args.arch}, {len(prepared.train_samples)} training images, "
             f"{len(val_samples)} validation images; chosen on validation)", "",
             f"Stem and teacher caches: {cache_minutes:.1f} min.", "",
             "| setting | val acc | val macro-F1 | val F1 living room | " + " | ".join(f"val acc {s}" for s in sources)
             + " | fit min |", "|---" * (5 + len(sources)) + "|"]
    for r in results:
        lines.append(f"| {r['setting']} | {r['val_accuracy']:.4f} | {r['val_macro_f1']:.4f} | "
                     f"{r['val_f1_living_room']:.4f} | "
                     + " | ".join(f"{r['val_accuracy_by_source'].get(s, float('nan')):.4f}" for s in sources)
                     + f" | {r['fit_minutes']:.1f} |")
    (args.out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
