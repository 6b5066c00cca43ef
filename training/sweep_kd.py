"""Choose the distillation weight and temperature on validation (never test), on a training subset.

    python -m training.sweep_kd --data DIR --weights-dir DIR --max-per-class 200 --out runs/kd_sweep

The stem caches (and the teacher's logits on the augmented views) are computed once; every setting then trains
the same student tail from the same start, so the settings differ only in the loss. Also measured here: whether
the teacher should see the augmented views (`all`) or only the centre view, the weight of the all-365-scenes
term (`scenes=W`), and whether dropping the photos the label audit flags helps. Results go to
`<out>/sweep.json` and `<out>/sweep.md`.
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
from training.backbones import BACKBONES, seed_hub_cache
from training.data import discover_labels, list_samples
from training.distill import audit_flags
from training.evaluate import accuracy_by_source
from training.metrics import classification_report
from training.recipe import (
    KD_TEACHER_VIEWS,
    PROFILES,
    Prepared,
    Recipe,
    build_model,
    cache_views,
    fit,
    pick_device,
    predict_tail,
    prepare,
    seed_everything,
)

GRID = ["0:2", "0.5:2", "0.5:4", "0.8:2", "0.8:4", "0.3:2"]


@dataclass(frozen=True)
class Setting:
    """One point of the grid: the loss's weights, and what the teacher sees."""
    alpha: float
    temperature: float
    teacher_views: str = "centre"
    scene_weight: float = 0.0

    def name(self) -> str:
        scenes = f" scenes {self.scene_weight}" if self.scene_weight else ""
        return f"alpha {self.alpha} T {self.temperature} {self.teacher_views}{scenes}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.sweep_kd", description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--weights-dir", type=Path)
    parser.add_argument("--soft-target-dir", type=Path)
    parser.add_argument("--arch", choices=list(BACKBONES), default=PROFILES["default"].arch)
    parser.add_argument("--max-per-class", type=int, default=200, help="training images per class (0: all)")
    parser.add_argument("--val-max-per-class", type=int, help="validation images per class (default: all)")
    parser.add_argument("--grid", nargs="+", type=parse_setting,
                        help="settings alpha:T[:all][:scenes=W] (default: a small grid of alpha:T; ':all' runs the "
                             "teacher on every augmented view, ':scenes=W' adds the 365-scene term with weight W)")
    parser.add_argument("--no-follow-ups", action="store_true",
                        help="only the --grid settings: skip the best setting's all-views and audit-drop runs")
    parser.add_argument("--no-teacher-views", action="store_true", help="skip the teacher-on-augmented-views setting")
    parser.add_argument("--out", type=Path, default=Path("runs/kd_sweep"))
    return parser.parse_args()


def parse_setting(item: str) -> Setting:
    """'alpha:T', then optionally ':all' (teacher on every augmented view) and ':scenes=W' (365-scene term)."""
    alpha, temperature, *options = item.split(":")
    teacher_views, scene_weight = "centre", 0.0
    try:
        for option in options:
            if option in KD_TEACHER_VIEWS:
                teacher_views = option
            elif option.startswith("scenes="):
                scene_weight = float(option.removeprefix("scenes="))
            else:
                raise ValueError(option)
        return Setting(float(alpha), float(temperature), teacher_views, scene_weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{item!r}: expected alpha:T[:all][:scenes=W]") from None


def subset(prepared: Prepared, keep: np.ndarray) -> Prepared:
    index = torch.from_numpy(np.flatnonzero(keep))
    return replace(prepared, train_samples=[s for s, k in zip(prepared.train_samples, keep) if k],
                   train_cache=prepared.train_cache[:, index],
                   teacher_logits=None if prepared.teacher_logits is None else prepared.teacher_logits[:, index],
                   teacher_scenes=None if prepared.teacher_scenes is None else prepared.teacher_scenes[index])


def score(model, prepared: Prepared, recipe, device) -> dict:
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
    needs_all_views = not args.no_teacher_views or any(setting.teacher_views == "all" for setting in grid)
    # One fine-tune per setting (no soup): the settings differ only in the loss.
    base = replace(PROFILES["default"], arch=args.arch, max_per_class=args.max_per_class or None,
                   kd_teacher_views="all" if needs_all_views else "centre", soup=1)
    seed_everything(base.seed)
    device = pick_device()
    started = time.perf_counter()
    model = build_model(base, len(labels), device)
    prepared = prepare(model, args.data, labels, base, device, args.weights_dir, args.soft_target_dir)
    # Validation: every image (or the asked subset), not the training subset's cap.
    val_samples = list_samples(args.data, "val", labels, args.val_max_per_class)
    config = Preprocessing.from_dict(base.preprocessing)
    val_cache = cache_views(model.stem, val_samples, base, config, device, 1, "val (full)")[0][0]
    prepared = replace(prepared, val_samples=val_samples, val_cache=val_cache)
    cache_minutes = (time.perf_counter() - started) / 60
    print(f"caches ready in {cache_minutes:.1f} min: {len(prepared.train_samples)} train, {len(val_samples)} val")
    centre_only = replace(prepared, teacher_logits=prepared.teacher_logits[:1])

    def recipe_for(setting: Setting) -> Recipe:
        return replace(base, kd_alpha=setting.alpha, kd_temperature=setting.temperature,
                       kd_teacher_views=setting.teacher_views, kd_scene_weight=setting.scene_weight)

    results = []
    args.out.mkdir(parents=True, exist_ok=True)

    def run(name, recipe, data) -> dict:
        seed_everything(recipe.seed)
        fit_started = time.perf_counter()
        student, history = fit(build_model(recipe, len(labels), device), data, recipe, args.out / "scratch", device,
                               quiet=True, checkpoints=False)
        result = {"setting": name, "kd_alpha": recipe.kd_alpha, "kd_temperature": recipe.kd_temperature,
                  "teacher_views": recipe.kd_teacher_views, "kd_scene_weight": recipe.kd_scene_weight,
                  "train_images": len(data.train_samples),
                  **score(student, data, recipe, device), "fit_minutes": (time.perf_counter() - fit_started) / 60}
        print(json.dumps(result))
        results.append(result)
        (args.out / "sweep.json").write_text(json.dumps({"cache_minutes": cache_minutes, "results": results}, indent=2))
        return result

    for setting in grid:
        run(setting.name(), recipe_for(setting), prepared if setting.teacher_views == "all" else centre_only)
    if not args.no_follow_ups:  # the best grid setting with the teacher on every view, then without audited photos
        kd_results = [r for r in results if r["kd_alpha"] > 0]
        best = max(kd_results, key=lambda r: (r["val_accuracy"], r["val_macro_f1"]))
        best_setting = Setting(best["kd_alpha"], best["kd_temperature"], "centre", best["kd_scene_weight"])
        if not args.no_teacher_views:
            all_views = replace(best_setting, teacher_views="all")
            run(all_views.name(), recipe_for(all_views), prepared)
        keep = ~audit_flags(centre_only.teacher_logits[0].numpy(),
                            np.array([s.label for s in prepared.train_samples]))
        run(f"{best_setting.name()}, audit-flagged dropped ({int((~keep).sum())})",
            replace(recipe_for(best_setting), drop_audited=True), subset(centre_only, keep))
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
