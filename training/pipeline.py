"""The training stage's steps, each reading and writing one run folder, and the chain of them.

    runs/<name>/best.pt       train     the fine-tuned network (state, architecture, labels, recipe)
    runs/<name>/model.onnx    export    one self-contained ONNX file, checked against torch
    runs/<name>/report/       evaluate  val/test scores, calibration, latency (and INT8 vs FP32)
    model store               register  room_classifier:<version> with labels, preprocessing, metrics
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.model import INPUT_NAME, OUTPUT_NAME, ModelContract, OnnxClassifier
from inference.preprocess import Preprocessing, preprocess_batch
from training.backbones import StemTail, build_stem_tail
from training.data import dataset_fingerprint, discover_labels, list_samples, load_rgb
from training.evaluate import evaluate, headline, write_report
from training.export import OPSET, export_onnx, max_logit_difference
from training.latency import measure_latency_ms
from training.openset import other_scenes_of
from training.quantize import quantize_int8
from training.recipe import Recipe, recipe_from_checkpoint
from training.register import MODEL_NAME, save_to_model_store
from training.trainer import train

PARITY_TOLERANCE = 1e-3
INT8_MAX_ACCURACY_DROP = 0.005


def train_step(data: Path, run_dir: Path, recipe: Recipe, resume: bool = False, weights_dir: Path | None = None,
               soft_target_dir: Path | None = None) -> Path:
    labels = discover_labels(data)
    model, history = train(data, labels, recipe, run_dir, resume=resume, weights_dir=weights_dir,
                           soft_target_dir=soft_target_dir)
    if recipe.uses_teacher():
        from training.distill import label_audit, load_teacher_for
        history["label_audit"] = label_audit(data, load_teacher_for(labels, weights_dir), run_dir / "report",
                                             weights_dir, soft_target_dir)
    path = run_dir / "best.pt"
    torch.save({"state": model.state_dict(), "labels": labels, "recipe": asdict(recipe), "history": history,
                "dataset_fingerprint": dataset_fingerprint(data)}, path)
    return path


def load_trained(run_dir: Path) -> tuple[StemTail, dict[str, Any]]:
    checkpoint = torch.load(run_dir / "best.pt", weights_only=False)
    recipe = recipe_from_checkpoint(checkpoint["recipe"])
    model = build_stem_tail(recipe.arch, len(checkpoint["labels"]), pretrained=False, stem_blocks=recipe.stem_cut())
    model.load_state_dict(checkpoint["state"])
    return model.eval(), checkpoint


def calibration_batch(data: Path, labels: list[str], config: Preprocessing, per_class: int) -> np.ndarray:
    """A few training images per class, preprocessed as the service does (parity and INT8 calibration)."""
    samples = list_samples(data, "train", labels, per_class)
    return preprocess_batch([load_rgb(s.path) for s in samples], config)


def export_step(data: Path, run_dir: Path) -> dict[str, Any]:
    model, checkpoint = load_trained(run_dir)
    config = model_contract(checkpoint).preprocessing
    path = export_onnx(model, run_dir / "model.onnx", config.image_size)
    difference = max_logit_difference(model, path, calibration_batch(data, checkpoint["labels"], config, 4))
    print(f"exported {path} ({path.stat().st_size / 1e6:.1f} MB), max |torch - onnx| logit difference {difference:.2e}")
    if difference > PARITY_TOLERANCE:
        raise RuntimeError(f"ONNX export differs from torch by {difference} (> {PARITY_TOLERANCE})")
    info = {"path": str(path), "opset": OPSET, "max_logit_difference": difference, "bytes": path.stat().st_size}
    (run_dir / "export.json").write_text(json.dumps(info, indent=2))
    return info


def model_contract(checkpoint: dict[str, Any], temperature: float = 1.0) -> ModelContract:
    """The trained run's contract: its export is evaluated with it (temperature 1 until calibration fits one)
    and the model store gets it, so what was measured is what is served."""
    recipe = checkpoint["recipe"]
    return ModelContract(labels=tuple(checkpoint["labels"]),
                         preprocessing=Preprocessing.from_dict(recipe["preprocessing"]),
                         temperature=temperature, architecture=recipe["arch"])


def evaluate_model(onnx_path: Path, data: Path, checkpoint: dict[str, Any], out_dir: Path,
                   extra: dict[str, Any]) -> dict[str, Any]:
    """Score one ONNX file through the service's own classifier code; write its report."""
    labels = checkpoint["labels"]
    contract = model_contract(checkpoint)
    config = contract.preprocessing
    classifier = OnnxClassifier.from_files(onnx_path, contract)
    train_scenes = other_scenes_of(list_samples(data, "train", labels), labels)
    report = evaluate(classifier.logits, list_samples(data, "val", labels), list_samples(data, "test", labels),
                      labels, config, train_scenes, out_dir / "logits.npz")
    report["latency"] = measure_latency_ms(onnx_path, config.image_size)
    report["onnx_bytes"] = onnx_path.stat().st_size
    write_report(report, out_dir, extra)
    return report


def evaluate_step(data: Path, run_dir: Path, int8: bool = False) -> dict[str, Any]:
    """FP32 report; with `int8`, also quantize, score it the same way, and pick the file to serve."""
    _, checkpoint = load_trained(run_dir)
    export = json.loads((run_dir / "export.json").read_text())
    extra = {"architecture": checkpoint["recipe"]["arch"], "dataset_fingerprint": checkpoint["dataset_fingerprint"]}
    recipe = recipe_from_checkpoint(checkpoint["recipe"])
    if recipe.uses_teacher():
        extra["distillation"] = f"Places365 teacher: {recipe.distillation()}"
    audit = checkpoint["history"].get("label_audit")
    if audit:
        extra["label_audit"] = f"{audit['flagged']} photos flagged, see ../report/label_audit.md"
    fp32 = evaluate_model(run_dir / "model.onnx", data, checkpoint, run_dir / "report", {**extra, "precision": "fp32"})
    chosen = {"precision": "fp32", "path": str(run_dir / "model.onnx"), "report": fp32}
    if int8:
        config = model_contract(checkpoint).preprocessing
        int8_path = quantize_int8(run_dir / "model.onnx", run_dir / "model.int8.onnx",
                                  calibration_batch(data, checkpoint["labels"], config, 64))
        quantized = evaluate_model(int8_path, data, checkpoint, run_dir / "report_int8", {**extra, "precision": "int8"})
        faster = quantized["latency"]["batch16_ms"] < fp32["latency"]["batch16_ms"]
        # Decided on validation accuracy: the test split only reports what was chosen.
        close = fp32["val"]["accuracy"] - quantized["val"]["accuracy"] <= INT8_MAX_ACCURACY_DROP
        comparison = {"fp32": {"val_accuracy": fp32["val"]["accuracy"], **headline(fp32), **fp32["latency"]},
                      "int8": {"val_accuracy": quantized["val"]["accuracy"], **headline(quantized),
                               **quantized["latency"]},
                      "int8_is_faster": faster, "int8_within_0.5_points": close}
        (run_dir / "int8_vs_fp32.json").write_text(json.dumps(comparison, indent=2))
        print(json.dumps(comparison, indent=2))
        if faster and close:
            chosen = {"precision": "int8", "path": str(int8_path), "report": quantized}
    chosen["export"] = export
    (run_dir / "chosen.json").write_text(json.dumps({k: v for k, v in chosen.items() if k != "report"}, indent=2))
    return chosen


def register_step(run_dir: Path, model_name: str = MODEL_NAME) -> str:
    """Save the chosen ONNX file with everything the service and a user need into the model store, as a new
    version of `model_name` (the service serves `RC_MODEL_TAG`, room_classifier:latest unless set)."""
    _, checkpoint = load_trained(run_dir)
    chosen = json.loads((run_dir / "chosen.json").read_text())
    report_dir = Path(chosen["path"]).parent / ("report_int8" if chosen["precision"] == "int8" else "report")
    report = json.loads((report_dir / "report.json").read_text())
    metadata = {
        **model_contract(checkpoint, report["temperature"]).to_metadata(),
        "precision": chosen["precision"],
        "metrics": {"test": headline(report, "test"), "val": headline(report, "val"),
                    "test_by_source": report["test_by_source"], "latency_ms": report["latency"]},
        "training": {key: value for key, value in checkpoint["recipe"].items() if value is not None},
        "best_val_macro_f1_during_training": checkpoint["history"].get("best_val_macro_f1"),
        "dataset_fingerprint": checkpoint["dataset_fingerprint"],
        "onnx": {"input": INPUT_NAME, "output": OUTPUT_NAME, "opset": chosen["export"]["opset"],
                 "max_logit_difference_vs_torch": chosen["export"]["max_logit_difference"]},
    }
    if checkpoint["history"].get("other_operating_point"):
        metadata["other_operating_point"] = checkpoint["history"]["other_operating_point"]
    tag = save_to_model_store(Path(chosen["path"]), metadata, model_name)
    (run_dir / "registered.json").write_text(json.dumps({"tag": str(tag)}, indent=2))
    print(f"registered {tag}")
    return str(tag)


def run_all(data: Path, run_dir: Path, recipe: Recipe, int8: bool = False, register: bool = True,
            resume: bool = False, weights_dir: Path | None = None, soft_target_dir: Path | None = None,
            register_if_val_above: float | None = None, model_name: str = MODEL_NAME) -> dict[str, Any]:
    train_step(data, run_dir, recipe, resume=resume, weights_dir=weights_dir, soft_target_dir=soft_target_dir)
    export_step(data, run_dir)
    chosen = evaluate_step(data, run_dir, int8=int8)
    summary = {"precision": chosen["precision"], "val_accuracy": chosen["report"]["val"]["accuracy"],
                **headline(chosen["report"]), **chosen["report"]["latency"]}
    if register and register_if_val_above is not None and summary["val_accuracy"] <= register_if_val_above:
        print(f"not registered: val accuracy {summary['val_accuracy']:.4f} does not beat {register_if_val_above:.4f}")
        register = False
    if register:
        summary["tag"] = register_step(run_dir, model_name)
    print(json.dumps(summary, indent=2))
    return summary
