"""Training stage, end to end on a small real subset: data_prep -> quick recipe -> ONNX -> model store."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from data_prep.common import CLASSES
from training.metrics import calibration_bins, classification_report, fit_temperature

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
EXTRA = SHARED / "data" / "extra"
WEIGHTS = SHARED / "weights"
PER_CLASS_PER_SOURCE = 30

needs_shared = pytest.mark.skipif(not (EXTRA.is_dir() and WEIGHTS.is_dir()), reason=f"{SHARED} (data, weights) absent")


def run(args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def small_sources(root: Path) -> list[Path]:
    """ImageFolder trees of real photos (symlinks) from both extra sources: 30 per class per source."""
    trees = []
    for source in ("places365", "house_rooms"):
        for label in CLASSES:
            target = root / source / label
            target.mkdir(parents=True)
            for image in sorted((EXTRA / source / label).glob("*.jpg"))[:PER_CLASS_PER_SOURCE]:
                (target / image.name).symlink_to(image)
        trees.append(root / source)
    return trees


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One quick-profile run of the real pipeline, shared by the assertions below."""
    if not (EXTRA.is_dir() and WEIGHTS.is_dir()):
        pytest.skip(f"{SHARED} (data, weights) absent")
    root = tmp_path_factory.mktemp("training")
    env = {**os.environ, "BENTOML_HOME": str(root / "bentoml"), "TORCH_HOME": str(root / "torch"),
           "BENTOML_DO_NOT_TRACK": "true"}
    extras = [arg for tree in small_sources(root / "sources") for arg in ("--extra", str(tree))]
    prep = run(["-m", "data_prep", *extras, "--out", str(root / "dataset")], env)
    assert prep.returncode == 0, prep.stderr[-3000:]
    result = run(["-m", "training", "run", "--data", str(root / "dataset"), "--run-dir", str(root / "run"),
                  "--profile", "quick", "--weights-dir", str(WEIGHTS)], env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    listing = run(["-m", "bentoml", "models", "list", "-o", "json"], env)
    assert listing.returncode == 0, listing.stderr
    return {"root": root, "env": env, "dataset": root / "dataset", "run": root / "run",
            "models": json.loads(listing.stdout)}


def model_store_entry(trained: dict) -> tuple[Path, dict]:
    """Path and metadata of the one registered version, read the way the service reads them."""
    code = ("import bentoml, json; m = bentoml.models.get('room_classifier:latest'); "
            "print(json.dumps({'path': m.path, 'metadata': m.info.metadata}))")
    result = run(["-c", code], trained["env"])
    assert result.returncode == 0, result.stderr
    entry = json.loads(result.stdout)
    return Path(entry["path"]), entry["metadata"]


def test_model_is_in_the_store_with_complete_metadata(trained: dict) -> None:
    assert [m["tag"].split(":")[0] for m in trained["models"]] == ["room_classifier"]
    path, metadata = model_store_entry(trained)
    assert metadata["labels"] == list(CLASSES)
    assert metadata["architecture"] == "mobilenet_v3_small"
    assert metadata["preprocessing"]["image_size"] == 224 and len(metadata["preprocessing"]["mean"]) == 3
    assert 0.05 < metadata["temperature"] < 20
    assert set(metadata["metrics"]["test"]) >= {"accuracy", "macro_f1", "f1_living_room", "ece_before", "ece_after"}
    assert metadata["training"]["arch"] == "mobilenet_v3_small" and metadata["training"]["seed"] == 1337
    manifest = trained["dataset"] / "manifest.csv"
    assert metadata["dataset_fingerprint"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert metadata["onnx"]["max_logit_difference_vs_torch"] < 1e-3
    assert sorted(p.name for p in path.iterdir() if p.suffix in {".onnx", ".data"}) == ["model.onnx"]


def test_exported_onnx_is_one_file_with_dynamic_batch(trained: dict) -> None:
    path, metadata = model_store_entry(trained)
    proto = onnx.load(str(path / "model.onnx"), load_external_data=False)
    assert not any(init.external_data for init in proto.graph.initializer), "weights must live inside the file"
    assert max(opset.version for opset in proto.opset_import if opset.domain in ("", "ai.onnx")) >= 17
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value
    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        logits = session.run(["logits"], {"input": np.zeros((batch, 3, 224, 224), np.float32)})[0]
        assert logits.shape == (batch, len(CLASSES))


def test_onnx_matches_torch_on_real_images(trained: dict) -> None:
    from inference.preprocess import Preprocessing, preprocess_batch
    from training.data import list_samples, load_rgb
    from training.pipeline import load_trained

    model, checkpoint = load_trained(trained["run"])
    samples = list_samples(trained["dataset"], "test", list(CLASSES))[:8]
    batch = preprocess_batch([load_rgb(s.path) for s in samples],
                             Preprocessing.from_dict(checkpoint["recipe"]["preprocessing"]))
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    path, _ = model_store_entry(trained)
    actual = ort.InferenceSession(str(path / "model.onnx")).run(["logits"], {"input": batch})[0]
    assert np.abs(expected - actual).max() < 1e-3


def test_report_numbers_match_the_confusion_matrix(trained: dict) -> None:
    report_dir = trained["run"] / "report"
    for name in ("report.json", "report.md", "confusion_matrix.png", "reliability.png"):
        assert (report_dir / name).stat().st_size > 0, name
    report = json.loads((report_dir / "report.json").read_text())
    matrix = np.array(report["test"]["confusion_matrix"])
    with open(trained["dataset"] / "manifest.csv", newline="") as handle:
        test_rows = [row for row in csv.DictReader(handle) if row["split"] == "test"]
    assert matrix.sum() == len(test_rows) == report["test"]["num_images"]
    assert report["test"]["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    for i, label in enumerate(CLASSES):
        scores = report["test"]["per_class"][label]
        assert scores["recall"] == pytest.approx(matrix[i, i] / matrix[i].sum())
        assert scores["precision"] == pytest.approx(matrix[i, i] / max(matrix[:, i].sum(), 1))
        assert scores["support"] == matrix[i].sum()
    assert f"{report['test']['accuracy']:.4f}" in (report_dir / "report.md").read_text()
    assert report["test"]["accuracy"] > 0.5, "a quick real fine-tune beats chance (0.25) by far"


def test_missing_weights_is_a_clear_error(tmp_path: Path) -> None:
    """No cached weights and no way to download them: exit 2 naming the file to provide, no random start."""
    dataset = tmp_path / "dataset"
    for split in ("train", "val"):
        for label in CLASSES:
            (dataset / split / label).mkdir(parents=True)
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "empty"), "https_proxy": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    result = run(["-m", "training", "train", "--data", str(dataset), "--run-dir", str(tmp_path / "run"),
                  "--arch", "mobilenet_v3_small"], env, timeout=120)
    assert result.returncode == 2
    assert "mobilenet_v3_small-047dcff4.pth" in result.stderr and "Traceback" not in result.stderr


def test_classification_report_on_known_predictions() -> None:
    targets = np.array([0, 0, 0, 1, 1, 2])
    predictions = np.array([0, 0, 1, 1, 1, 0])
    report = classification_report(targets, predictions, ["a", "b", "c"])
    assert report["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["per_class"]["a"] == {"precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3),
                                        "f1": pytest.approx(2 / 3), "support": 3}
    assert report["per_class"]["c"]["f1"] == 0.0
    assert report["macro"]["f1"] == pytest.approx((2 / 3 + 0.8 + 0) / 3)


def test_temperature_fit_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(size=(4000, 4)) * 2
    targets = np.array([rng.choice(4, p=np.exp(row) / np.exp(row).sum()) for row in true_logits])
    assert fit_temperature(true_logits * 3.0, targets) == pytest.approx(3.0, rel=0.1)


def test_ece_is_zero_for_calibrated_and_large_for_overconfident() -> None:
    targets = np.array([0] * 80 + [1] * 20)
    calibrated = np.tile([0.8, 0.2], (100, 1))
    assert calibration_bins(calibrated, targets)["ece"] == pytest.approx(0.0, abs=1e-9)
    overconfident = np.tile([0.99, 0.01], (100, 1))
    assert calibration_bins(overconfident, targets)["ece"] == pytest.approx(0.19, abs=1e-6)


def test_register_needs_no_dataset(trained: dict) -> None:
    """`register` reads only the run folder: it runs without --data and adds a second version."""
    result = run(["-m", "training", "register", "--run-dir", str(trained["run"])], trained["env"], timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    listing = run(["-m", "bentoml", "models", "list", "-o", "json"], trained["env"])
    assert listing.returncode == 0, listing.stderr
    tags = [model["tag"] for model in json.loads(listing.stdout)]
    registered = json.loads((trained["run"] / "registered.json").read_text())["tag"]
    assert len(tags) == 2 and registered in tags


def test_the_stored_contract_is_what_training_stored_before_it_was_typed() -> None:
    """Training builds the store's metadata from `ModelContract`: the same keys and values as the dict it used to
    copy from the checkpoint, so models registered before and after read alike."""
    from inference.preprocess import Preprocessing
    from training.pipeline import model_contract

    for preprocessing in (Preprocessing(), Preprocessing(image_size=160, resize_size=183)):
        recipe = {"arch": "mobilenet_v3_small", "preprocessing": preprocessing.to_dict(), "seed": 1337}
        checkpoint = {"labels": list(CLASSES), "recipe": json.loads(json.dumps(recipe))}  # as a checkpoint holds it
        before = {"labels": checkpoint["labels"], "preprocessing": recipe["preprocessing"], "temperature": 1.7,
                  "architecture": "mobilenet_v3_small"}
        assert json.dumps(model_contract(checkpoint, 1.7).to_metadata()) == json.dumps(before)


def old_warmup_then_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """The hand-written schedule SequentialLR(LinearLR, CosineAnnealingLR) replaced, as a factor of the lr."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@pytest.mark.parametrize(("total_steps", "warmup_steps"), [(12 * 181, 181), (24, 5), (5, 5), (3, 5), (40, 1)])
def test_fine_tune_schedule_is_linear_warm_up_then_cosine_step_by_step(total_steps: int, warmup_steps: int) -> None:
    """The learning rate each optimizer step uses equals the formula's, in both parameter groups, and a scheduler
    restored from a checkpoint halfway continues on the same curve."""
    from training.trainer import warmup_then_cosine

    def optimizer_and_scheduler():
        optimizer = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 3e-4},
                                       {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 9e-4}])
        return optimizer, warmup_then_cosine(optimizer, total_steps, warmup_steps)

    optimizer, scheduler = optimizer_and_scheduler()
    halfway = total_steps // 2
    for step in range(total_steps):
        if step == halfway:
            saved = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            optimizer, scheduler = optimizer_and_scheduler()
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
        expected = old_warmup_then_cosine(step, total_steps, warmup_steps)
        for group, base in zip(optimizer.param_groups, (3e-4, 9e-4)):
            assert group["lr"] == pytest.approx(base * expected, rel=1e-9, abs=1e-15), step
        optimizer.step()
        scheduler.step()


def test_a_checkpoint_from_before_the_experiments_were_removed_still_loads() -> None:
    """best.pt files written with the soup, fresh-view, audit-drop and teacher-view settings load as the same
    network; a setting nobody knows is still an error."""
    from dataclasses import asdict

    from training.recipe import PROFILES, recipe_from_checkpoint

    saved = {**asdict(PROFILES["default"]), "kd_teacher_views": "centre", "soup": 1, "drop_audited": False,
             "fresh_views": False}
    assert recipe_from_checkpoint(saved) == PROFILES["default"]
    with pytest.raises(ValueError, match="unknown settings"):
        recipe_from_checkpoint({**saved, "mystery": 1})


def test_the_scene_head_profile_freezes_every_block_and_trains_only_a_new_classifier() -> None:
    """`scene_head`: the Places365 network's whole body is the cached stem (at its own 224 px); the fine-tune's
    optimizer holds the classifier alone, and the exported network is still stem + tail."""
    from dataclasses import replace

    from training.recipe import PROFILES
    from training.trainer import build_model, start_fine_tune

    recipe = replace(PROFILES["scene_head"], pretrained=False)
    model = build_model(recipe, 5, torch.device("cpu"))
    assert model.tail_body_parameters() == []
    optimizer, _ = start_fine_tune(model, None, recipe, steps=3)
    trained = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    assert {id(p) for p in trained} == {id(p) for p in model.head.parameters()}
    with torch.no_grad():
        features = model.stem(torch.zeros(1, 3, 224, 224))
        assert features.shape == (1, 512, 14, 14) and model(torch.zeros(1, 3, 224, 224)).shape == (1, 5)
