"""Train and evaluate several backbones on the same split with the same recipe; write the table."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from training.backbones import WeightsUnavailable
from training.pipeline import evaluate_step, export_step, load_trained, train_step
from training.recipe import Recipe

COLUMNS = ("arch", "val_accuracy", "test_accuracy", "test_macro_f1", "test_f1_living_room", "params_m", "onnx_mb",
           "ort_batch1_ms", "ort_batch16_ms", "train_minutes")


def compare_one(data: Path, run_dir: Path, recipe: Recipe) -> dict[str, Any]:
    start = time.perf_counter()
    train_step(data, run_dir, recipe)
    minutes = (time.perf_counter() - start) / 60
    export = export_step(data, run_dir)
    report = evaluate_step(data, run_dir)["report"]
    model, _ = load_trained(run_dir)
    return {"arch": recipe.arch, "val_accuracy": report["val"]["accuracy"], "test_accuracy": report["test"]["accuracy"],
            "test_macro_f1": report["test"]["macro"]["f1"],
            "test_f1_living_room": report["test"]["per_class"].get("living_room", {}).get("f1"),
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "onnx_mb": export["bytes"] / 1e6,
            "ort_batch1_ms": report["latency"]["batch1_ms"], "ort_batch16_ms": report["latency"]["batch16_ms"],
            "train_minutes": minutes}


def format_cell(column: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if "accuracy" in column or "f1" in column else f"{value:.2f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['arch']} | " + f"not run: {row['error']} |")
            continue
        cells = [row["arch"]] + [format_cell(column, row[column]) for column in COLUMNS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(data: Path, out_dir: Path, archs: list[str], recipe: Recipe) -> list[dict[str, Any]]:
    """One row per architecture; an architecture whose weights are missing is reported, not fatal."""
    rows = []
    for arch in archs:
        try:
            rows.append(compare_one(data, out_dir / arch, replace(recipe, arch=arch, stem_blocks=None)))
        except WeightsUnavailable as error:
            print(error)
            rows.append({"arch": arch, "error": "ImageNet weights unavailable offline"})
        (out_dir / "compare.json").write_text(json.dumps(rows, indent=2))
    table = format_table(rows)
    (out_dir / "compare.md").write_text("# Backbone comparison (same split, same recipe)\n\nChoose on the val "
                                        "columns; the test columns only report.\n\n" + table + "\n")
    print(table)
    return rows
