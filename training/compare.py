"""Train and evaluate several backbones on the same split with the same recipe, each without and with
distillation from the Places365 teacher, plus the teacher's own zero-shot row; write the table.

A student whose run folder already holds a row made by the same recipe on the same data is not retrained.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from training.backbones import WeightsUnavailable
from training.data import dataset_fingerprint
from training.pipeline import evaluate_step, export_step, load_trained, train_step
from training.recipe import (  # noqa: F401 (re-exported for callers)
    DISTILL_CHOICES,
    KD_ALPHA,
    KD_SCENE_WEIGHT,
    KD_TEMPERATURE,
    PROFILES,
    Recipe,
    recipe_from_checkpoint,
)

COLUMNS = ("arch", "input_px", "kd", "val_accuracy", "test_accuracy", "test_room_accuracy", "test_macro_f1",
           "test_f1_living_room", "test_room_accuracy_house_rooms", "val_ece_after", "test_rooms_as_other",
           "test_unseen_other_as_other", "test_known_other_as_other", "params_m", "onnx_mb", "ort_batch1_ms",
           "ort_batch16_ms", "int8_batch1_ms", "int8_batch16_ms", "train_minutes")


def row_from_report(arch: str, input_px: int, kd: str, report: dict[str, Any], params_m: float, onnx_bytes: int,
                    train_minutes: float | None, int8: dict[str, Any] | None = None) -> dict[str, Any]:
    """One table row. Room accuracy counts `other` as wrong on room photos (the rooms' rate); for a four-label
    model it is the plain accuracy. `int8`: the quantized file's latency, where one was made."""
    openset = report.get("openset", {}).get("test")
    by_source = openset["room_accuracy_by_source"] if openset else report["test_by_source"]
    calibration = report["calibration"]
    row = {"arch": arch, "input_px": input_px, "kd": kd, "val_accuracy": report["val"]["accuracy"],
           "test_accuracy": report["test"]["accuracy"],
           "test_room_accuracy": openset["room_accuracy"] if openset else report["test"]["accuracy"],
           "test_macro_f1": report["test"]["macro"]["f1"],
           "test_f1_living_room": report["test"]["per_class"].get("living_room", {}).get("f1"),
           "test_room_accuracy_house_rooms": by_source.get("house_rooms", {}).get("accuracy"),
           "val_ece_after": calibration.get("val_after", calibration["after"])["ece"], "params_m": params_m,
           "onnx_mb": onnx_bytes / 1e6, "ort_batch1_ms": report["latency"]["batch1_ms"],
           "ort_batch16_ms": report["latency"]["batch16_ms"], "train_minutes": train_minutes}
    if openset:
        row.update({f"test_{group}": openset["rates"].get(name) for group, name in
                    (("rooms_as_other", "rooms_as_other"), ("unseen_other_as_other", "unseen_other"),
                     ("known_other_as_other", "known_other"))})
    if int8:
        row.update({"int8_batch1_ms": int8["batch1_ms"], "int8_batch16_ms": int8["batch16_ms"]})
    return row


def trained_by(run_dir: Path, recipe: Recipe, fingerprint: str) -> dict[str, Any] | None:
    """The run folder's best.pt checkpoint when `recipe` on the same data made it (so an hour-long scene network
    trained by `make train PROFILE=scene` is scored, not trained again), else None."""
    if not (run_dir / "best.pt").is_file():
        return None
    _, checkpoint = load_trained(run_dir)
    same = recipe_from_checkpoint(checkpoint["recipe"]) == recipe and checkpoint["dataset_fingerprint"] == fingerprint
    return checkpoint if same else None


def evaluated_since_training(run_dir: Path) -> bool:
    """Whether the run's export, FP32 report and INT8 comparison were written after its best.pt."""
    trained_at = (run_dir / "best.pt").stat().st_mtime
    made = [run_dir / "export.json", run_dir / "report" / "report.json", run_dir / "int8_vs_fp32.json"]
    return all(path.is_file() and path.stat().st_mtime >= trained_at for path in made)


def compare_one(data: Path, run_dir: Path, recipe: Recipe, weights_dir: Path | None = None,
                soft_target_dir: Path | None = None) -> dict[str, Any]:
    kd = recipe.distillation()
    saved = run_dir / "compare_row.json"
    fingerprint = dataset_fingerprint(data)
    if saved.is_file():
        previous = json.loads(saved.read_text())
        if recipe_from_checkpoint(previous["recipe"]) == recipe and previous["dataset_fingerprint"] == fingerprint:
            print(f"{run_dir}: reusing the row of an earlier run with the same recipe and data")
            return previous["row"]
    trained = trained_by(run_dir, recipe, fingerprint)
    if trained is not None:
        print(f"{run_dir}: reusing the network trained there with the same recipe and data")
        minutes = trained["history"].get("train_minutes")
    else:
        start = time.perf_counter()
        train_step(data, run_dir, recipe, weights_dir=weights_dir, soft_target_dir=soft_target_dir)
        minutes = (time.perf_counter() - start) / 60
    if not evaluated_since_training(run_dir):
        export_step(data, run_dir)
        evaluate_step(data, run_dir, int8=True)
    export = json.loads((run_dir / "export.json").read_text())
    report = json.loads((run_dir / "report" / "report.json").read_text())
    int8 = json.loads((run_dir / "int8_vs_fp32.json").read_text())["int8"]
    model, _ = load_trained(run_dir)
    row = row_from_report(recipe.arch, recipe.preprocessing["image_size"], kd, report,
                          sum(p.numel() for p in model.parameters()) / 1e6, export["bytes"], minutes, int8)
    saved.write_text(json.dumps({"recipe": asdict(recipe), "dataset_fingerprint": fingerprint, "row": row}, indent=2))
    return row


def teacher_rows(data: Path, out_dir: Path, weights_dir: Path | None, soft_target_dir: Path | None
                 ) -> list[dict[str, Any]]:
    """The teacher zero-shot, and with a linear head fitted on its training photos' scene outputs (seconds of
    fitting: the network itself is untouched, so its cost is the same)."""
    from training.distill import teacher_report
    from training.teacher import TEACHER_TRANSFORM

    report = teacher_report(data, weights_dir, out_dir, soft_target_dir)
    minutes = sum(cost["seconds"] for cost in report["teacher_pass"].values()) / 60
    rows = []
    for kd, scored in (("zero-shot", report), ("fine-tuned head", {**report, **report["fine_tuned"]})):
        row = row_from_report("places365_wideresnet18 (teacher)", TEACHER_TRANSFORM.image_size, kd, scored,
                              report["params_m"], report["onnx_bytes"], None)
        row["teacher_pass_minutes"] = minutes
        rows.append(row)
    return rows


def format_cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (str, int)):
        return str(value)
    scores = ("accuracy", "f1", "ece", "as_other")
    return f"{value:.4f}" if any(score in column for score in scores) else f"{value:.2f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['arch']} | - | {row.get('kd', '-')} | " + f"not run: {row['error']} |")
            continue
        cells = [format_cell(column, row.get(column)) for column in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def distill_variants(recipe: Recipe, distill: str) -> list[Recipe]:
    """The recipe without and/or with distillation (a recipe without a KD weight gets the chosen alpha, T and
    scene weight)."""
    with_kd = recipe if recipe.kd_alpha > 0 else replace(recipe, kd_alpha=KD_ALPHA, kd_temperature=KD_TEMPERATURE,
                                                         kd_scene_weight=KD_SCENE_WEIGHT)
    without = replace(recipe, kd_alpha=0.0, kd_scene_weight=0.0)
    return {"off": [without], "on": [with_kd], "both": [without, with_kd]}[distill]


def variants_of(arch: str, recipe: Recipe, distill: str, out_dir: Path) -> list[tuple[Path, Recipe]]:
    """What `compare` trains for `arch`, and where: its own profiles where it has any (the scene networks: their
    input sizes, views, epochs and learning rates, one row each; a second, undistilled row each would cost as much
    again here) in each profile's run folder beside `out_dir` (runs/scene: what `make scene` trains is scored, not
    retrained), else `recipe` on that backbone without and/or with distillation, in `out_dir`/<arch>[-kd]."""
    own = [(name, profile) for name, profile in PROFILES.items()
           if profile.arch == arch and profile.max_per_class is None]
    if own and arch != recipe.arch:
        return [(out_dir.parent / name, profile) for name, profile in own]
    return [(out_dir / (arch + ("-kd" if variant.kd_alpha > 0 else "")), variant)
            for variant in distill_variants(replace(recipe, arch=arch, stem_blocks=None), distill)]


def compare(data: Path, out_dir: Path, archs: list[str], recipe: Recipe, distill: str = "both", teacher: bool = True,
            weights_dir: Path | None = None, soft_target_dir: Path | None = None) -> list[dict[str, Any]]:
    """One row per architecture and distillation setting (missing weights are reported, not fatal), plus the teacher."""
    rows = []
    out_dir.mkdir(parents=True, exist_ok=True)
    if teacher:
        rows += teacher_rows(data, out_dir / "teacher", weights_dir, soft_target_dir)
    for arch in archs:
        for run_dir, variant in variants_of(arch, recipe, distill, out_dir):
            try:
                rows.append(compare_one(data, run_dir, variant, weights_dir, soft_target_dir))
            except WeightsUnavailable as error:
                print(error)
                rows.append({"arch": arch, "kd": "yes" if variant.kd_alpha > 0 else "no",
                             "error": "ImageNet weights unavailable offline"})
            (out_dir / "compare.json").write_text(json.dumps(rows, indent=2))
    (out_dir / "compare.json").write_text(json.dumps(rows, indent=2))
    table = format_table(rows)
    (out_dir / "compare.md").write_text("# Backbone comparison (same split)\n\nChoose on the val columns; the test "
                                        "columns only report. Room accuracy counts `other` as wrong on room photos. "
                                        "The teacher rows are the Places365 network's scenes grouped into our labels "
                                        "with no training on our data (zero-shot), and a linear head on its scene "
                                        "outputs fitted on the training photos (fine-tuned head).\n\n" + table + "\n")
    print(table)
    return rows
