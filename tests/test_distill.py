"""Distillation from CSAIL's Places365 network: the real teacher on real photos, the soft-target cache, the
KD loss, the label audit and the compare table's teacher row. A few photos only: the full teacher pass is a
training-time cost, never a test's."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from data_prep.common import CLASSES
from testkit.photos import REAL_PHOTOS_DIR
from training.losses import DistillationLoss

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO.parent / "shared" / "weights"
TEACHER_FILE = WEIGHTS / "places365" / "wideresnet18_places365.pth.tar"
needs_teacher = pytest.mark.skipif(not TEACHER_FILE.is_file() or not REAL_PHOTOS_DIR.is_dir(),
                                   reason=f"{TEACHER_FILE} or real photos in {REAL_PHOTOS_DIR} absent "
                                          "(CI has ../shared beside the clone)")


def photos(label: str, count: int, start: int = 0) -> list[Path]:
    return sorted((REAL_PHOTOS_DIR / label).glob("*.jpg"))[start:start + count]


@pytest.fixture(scope="module")
def teacher():
    from training.teacher import load_teacher

    return load_teacher(list(CLASSES), WEIGHTS)


def split_tree(root: Path, per_split: dict[str, int]) -> Path:
    """A tiny dataset folder of copied real photos: `per_split[split]` per class, disjoint across splits."""
    offset = 0
    for split, count in per_split.items():
        for label in CLASSES:
            folder = root / split / label
            folder.mkdir(parents=True)
            for photo in photos(label, count, offset):
                shutil.copyfile(photo, folder / f"house_rooms__{photo.name}")
        offset += count
    return root


# ----------------------------------------------------------------------------------------------------
# The teacher


@needs_teacher
def test_teacher_loads_strictly_and_knows_rooms_zero_shot(teacher) -> None:
    """CSAIL's file maps onto torchvision's ResNet-18 without the stem max-pool; its four room outputs
    name the room of real listing photos with no training on our data."""
    from training.data import load_rgb
    from training.soft_targets import run_teacher
    from training.teacher import teacher_preprocess

    assert isinstance(teacher.network.maxpool, nn.Identity)
    assert teacher.membership[[45, 52, 203, 215], range(4)].tolist() == [1.0] * 4  # each room's own scene
    hits = {}
    for index, label in enumerate(CLASSES):
        batch = torch.from_numpy(np.stack([teacher_preprocess(load_rgb(p)) for p in photos(label, 3)]))
        scenes = run_teacher(teacher, batch, bf16=False)
        assert scenes.shape == (3, 365)
        predictions = teacher(batch).argmax(dim=1)
        hits[label] = int((predictions == index).sum())
    assert hits["bathroom"] >= 2 and min(hits.values()) >= 2, hits


@needs_teacher
def test_a_bathroom_photo_is_a_bathroom(teacher) -> None:
    from training.data import load_rgb
    from training.teacher import teacher_preprocess

    photo = photos("bathroom", 1)[0]
    logits = teacher(torch.from_numpy(teacher_preprocess(load_rgb(photo)))[None])
    assert CLASSES[int(logits.argmax())] == "bathroom"
    assert torch.softmax(logits, dim=1)[0, 0] > 0.5


@needs_teacher
def test_category_file_agrees_with_the_room_scenes() -> None:
    from training.teacher import ROOM_SCENES, scene_names

    names = scene_names(WEIGHTS)
    assert {label: names[scenes[label]] for label, scenes in ROOM_SCENES.items()} == {label: label for label in CLASSES}
    assert all(names[index] == name for scenes in ROOM_SCENES.values() for name, index in scenes.items())


@needs_teacher
def test_a_checkpoint_missing_a_weight_is_refused(tmp_path: Path) -> None:
    """Strict load: a file that does not fill every parameter is an error, never a half-random teacher."""
    from training.teacher import load_teacher

    checkpoint = torch.load(TEACHER_FILE, map_location="cpu", weights_only=True)
    del checkpoint["state_dict"]["module.layer4.1.bn2.weight"]
    (tmp_path / "places365").mkdir()
    torch.save(checkpoint, tmp_path / "places365" / TEACHER_FILE.name)
    with pytest.raises(RuntimeError, match="layer4.1.bn2.weight"):
        load_teacher(CLASSES, tmp_path)


def test_missing_teacher_is_a_clear_error(tmp_path: Path) -> None:
    """No file and no way to download it: exit 2 naming the file and where to put it, no traceback."""
    for label in CLASSES:
        (tmp_path / "dataset" / "train" / label).mkdir(parents=True)
    (tmp_path / "weights").mkdir()
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "empty"), "http_proxy": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    result = subprocess.run([sys.executable, "-m", "training", "teacher", "--data", str(tmp_path / "dataset"),
                             "--run-dir", str(tmp_path / "run"), "--weights-dir", str(tmp_path / "weights")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "wideresnet18_places365.pth.tar" in result.stderr and "places365" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_teacher_transform_squashes_and_keeps_its_cache_key() -> None:
    """The teacher sees the whole photo squashed to 256x256 (not the student's shorter-side resize), and the
    soft-target cache's key text for it is the one every cached teacher output was written under."""
    import hashlib

    from PIL import Image

    from inference.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, preprocess
    from training.teacher import TEACHER_TRANSFORM, teacher_preprocess

    assert hashlib.sha256(TEACHER_TRANSFORM.cache_key_text().encode()).hexdigest() == (
        "d39be917d13348dfd403b5edf1a65253b184dddb8b797c60a8f31bd66523fe05")  # changed: every cached output is lost
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    squashed = np.asarray(image.resize((256, 256), Image.BILINEAR).crop((16, 16, 240, 240)), dtype=np.float32)
    expected = ((squashed / 255.0 - np.asarray(IMAGENET_MEAN, dtype=np.float32))
                / np.asarray(IMAGENET_STD, dtype=np.float32)).transpose(2, 0, 1)
    assert np.array_equal(teacher_preprocess(image), expected)
    assert not np.array_equal(teacher_preprocess(image), preprocess(image, Preprocessing()))


# ----------------------------------------------------------------------------------------------------
# The soft-target cache


@needs_teacher
def test_soft_targets_are_computed_once_resumed_and_recomputed_only_for_changed_photos(
        teacher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    from training import soft_targets
    from training.data import list_samples

    monkeypatch.setattr(soft_targets, "CHUNK_SIZE", 2)  # several part files, as a long pass writes them
    data = split_tree(tmp_path / "data", {"train": 2})
    samples = list_samples(data, "train", CLASSES)
    cache_dir = tmp_path / "cache"

    first, cost = soft_targets.teacher_scene_logits(teacher, samples, cache_dir, "fp-1", batch_size=2, workers=0)
    assert (cost["computed"], cost["reused"]) == (8, 0)
    parts = sorted(Path(cost["cache"]).glob("part-*.pt"))
    assert len(parts) == 4

    # A second run (or another student) computes nothing and reads the same numbers back.
    second, cost = soft_targets.teacher_scene_logits(teacher, samples, cache_dir, "fp-1", batch_size=2, workers=0)
    assert (cost["computed"], cost["reused"]) == (0, 8)
    assert torch.equal(first, second)

    # An interrupted pass lost its last chunk: only that chunk is computed again.
    parts[-1].unlink()
    _, cost = soft_targets.teacher_scene_logits(teacher, samples, cache_dir, "fp-1", batch_size=2, workers=0)
    assert (cost["computed"], cost["reused"]) == (2, 6)

    # The data changed: a photo replaced by another picture is recomputed, the rest reused.
    changed = samples[0].path
    Image.open(photos("kitchen", 1, 10)[0]).convert("RGB").save(changed, "JPEG")
    third, cost = soft_targets.teacher_scene_logits(teacher, samples, cache_dir, "fp-2", batch_size=2, workers=0)
    assert (cost["computed"], cost["reused"]) == (1, 7)
    assert not torch.allclose(third[0], first[0]) and torch.allclose(third[1:], first[1:])
    assert len((Path(cost["cache"]) / "passes.jsonl").read_text().splitlines()) == 3


# ----------------------------------------------------------------------------------------------------
# The distillation loss


def test_kd_loss_at_weight_zero_is_the_recipes_cross_entropy() -> None:
    torch.manual_seed(0)
    student, teacher, targets = torch.randn(16, 4), torch.randn(16, 4) * 3, torch.randint(0, 4, (16,))
    cross_entropy = nn.CrossEntropyLoss(weight=torch.tensor([0.5, 1.0, 1.5, 1.0]), label_smoothing=0.1)
    loss = DistillationLoss(cross_entropy, alpha=0.0, temperature=4.0)
    assert torch.equal(loss(student, targets, teacher), cross_entropy(student, targets))
    assert torch.equal(loss(student, targets, None), cross_entropy(student, targets))


def test_kd_loss_matches_a_hand_computation() -> None:
    student = np.array([[2.0, 0.5, -1.0, 0.0], [0.0, 1.0, 0.0, -2.0]])
    teacher = np.array([[4.0, 1.0, 0.0, -1.0], [-1.0, 3.0, 2.0, 0.0]])
    targets = np.array([0, 2])
    alpha, t = 0.7, 3.0

    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p_teacher, p_student = softmax(teacher / t), softmax(student / t)
    kl = (p_teacher * (np.log(p_teacher) - np.log(p_student))).sum(axis=1).mean()
    ce = -np.log(softmax(student)[np.arange(2), targets]).mean()
    expected = alpha * t * t * kl + (1 - alpha) * ce

    loss = DistillationLoss(nn.CrossEntropyLoss(), alpha, t)
    actual = loss(torch.tensor(student), torch.tensor(targets), torch.tensor(teacher))
    assert float(actual) == pytest.approx(expected, rel=1e-9)
    # A student that copies the teacher pays no distillation term, only the label's.
    copy = DistillationLoss(nn.CrossEntropyLoss(), 1.0, t)(torch.tensor(teacher), torch.tensor(targets),
                                                            torch.tensor(teacher))
    assert float(copy) == pytest.approx(0.0, abs=1e-12)


def test_kd_loss_refuses_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        DistillationLoss(nn.CrossEntropyLoss(), 1.5, 2.0)
    with pytest.raises(ValueError):
        DistillationLoss(nn.CrossEntropyLoss(), 0.5, 0.0)
    with pytest.raises(ValueError):
        DistillationLoss(nn.CrossEntropyLoss(), 0.5, 2.0, scene_weight=-1.0)


def test_scene_term_adds_a_hand_computed_kl_over_all_365_scenes() -> None:
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(3, 4)), rng.normal(size=(3, 4)) * 2
    student_scenes, teacher_scenes = rng.normal(size=(3, 365)), rng.normal(size=(3, 365)) * 3
    targets = np.array([0, 3, 1])
    alpha, t, weight = 0.5, 4.0, 0.3

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
        log_p, log_q = log_softmax(p_logits / t), log_softmax(q_logits / t)
        return float((np.exp(log_p) * (log_p - log_q)).sum(axis=1).mean())

    ce = -log_softmax(student)[np.arange(3), targets].mean()
    expected = alpha * t * t * kl(teacher, student) + (1 - alpha) * ce + weight * t * t * kl(teacher_scenes,
                                                                                            student_scenes)
    tensors = [torch.tensor(x) for x in (student, targets, teacher, student_scenes, teacher_scenes)]
    with_scenes = DistillationLoss(nn.CrossEntropyLoss(), alpha, t, scene_weight=weight)
    assert float(with_scenes(*tensors)) == pytest.approx(expected, rel=1e-9)
    # Weight 0 (the default) is the room-only loss, whatever scene logits are passed.
    room_only = DistillationLoss(nn.CrossEntropyLoss(), alpha, t)
    assert torch.equal(room_only(*tensors), room_only(*tensors[:3]))


def test_scene_head_reads_the_pooled_features_and_leaves_the_class_logits_alone() -> None:
    """The auxiliary head only adds an output: the class logits (what is exported) are the tail's own."""
    from training.backbones import build_stem_tail
    from training.losses import scene_head_for, tail_outputs

    torch.manual_seed(0)
    model = build_stem_tail("mobilenet_v2", 4, pretrained=False).eval()
    head = scene_head_for(model)
    assert (head.in_features, head.out_features) == (1280, 365)
    features = model.stem(torch.randn(2, 3, 96, 96))
    logits, scenes = tail_outputs(model.tail, features, head)
    assert torch.equal(logits, model.tail(features)) and scenes.shape == (2, 365)
    assert tail_outputs(model.tail, features, None)[1] is None
    assert not any("scene" in key for key in model.state_dict())


# ----------------------------------------------------------------------------------------------------
# The teacher's report: compare-table row and label audit


@needs_teacher
def test_compare_has_the_teacher_row_a_distilled_student_and_the_audit(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`compare` on a tiny real split: the teacher's zero-shot and fine-tuned-head rows, a student distilled from
    the fine-tuned teacher through the real recipe (reusing the teacher's cached outputs: another student computes
    nothing), and the label audit listing a photo filed under the wrong class without dropping it."""
    from dataclasses import replace

    from training.backbones import seed_hub_cache
    from training.compare import compare
    from training.recipe import PROFILES

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    seed_hub_cache(WEIGHTS)
    data = split_tree(tmp_path / "data", {"train": 3, "val": 2, "test": 2})
    wrong = photos("kitchen", 1, 25)[0]  # a kitchen photo (the teacher: kitchen 1.00) filed as a bedroom
    shutil.copyfile(wrong, data / "train" / "bedroom" / f"house_rooms__{wrong.name}")
    recipe = replace(PROFILES["quick"], warmup_epochs=1, epochs=2, views=2, kd_alpha=0.5, kd_temperature=2.0,
                     kd_teacher="fine_tuned")
    arguments = dict(teacher=True, weights_dir=WEIGHTS, soft_target_dir=tmp_path / "cache")
    rows = compare(data, tmp_path / "compare", ["mobilenet_v3_small"], recipe, "on", **arguments)

    assert [row["kd"] for row in rows] == ["zero-shot", "fine-tuned head", "alpha 0.5, T 2.0, fine-tuned teacher"]
    teacher_row, head_row, student_row = rows
    assert head_row["ort_batch1_ms"] == teacher_row["ort_batch1_ms"]  # the same network, a head of 365 x 4 weights
    assert 0.0 <= head_row["test_accuracy"] <= 1.0
    table = (tmp_path / "compare" / "compare.md").read_text()
    teacher_line = next(line for line in table.splitlines() if "(teacher)" in line)
    assert f"{teacher_row['test_accuracy']:.4f}" in teacher_line
    assert f"{teacher_row['val_ece_after']:.4f}" in teacher_line
    assert 0.5 <= teacher_row["test_accuracy"] <= 1.0 and teacher_row["ort_batch1_ms"] > 0
    assert teacher_row["params_m"] == pytest.approx(11.36, abs=0.01)  # ResNet-18 with a 365-way head
    assert student_row["arch"] == "mobilenet_v3_small" and 0.0 <= student_row["test_accuracy"] <= 1.0
    assert student_row["int8_batch1_ms"] > 0 and student_row["int8_batch16_ms"] > 0  # FP32 and INT8 side by side

    history = torch.load(tmp_path / "compare" / "mobilenet_v3_small-kd" / "best.pt", weights_only=False)["history"]
    assert history["teacher_pass"]["computed"] == 0 and history["teacher_pass"]["reused"] == 13

    for audit_dir in (tmp_path / "compare" / "teacher", tmp_path / "compare" / "mobilenet_v3_small-kd" / "report"):
        with open(audit_dir / "label_audit.csv", newline="") as handle:
            flagged = list(csv.DictReader(handle))
        assert any(row["path"].endswith(wrong.name) and row["label"] == "bedroom" and row["teacher_class"] == "kitchen"
                   for row in flagged), flagged
        assert (audit_dir / "label_audit.png").stat().st_size > 0
    assert len(list((data / "train" / "bedroom").iterdir())) == 4  # listed, not dropped

    # The same recipe on the same data again: the rows are reused, nothing is retrained.
    before = (tmp_path / "compare" / "mobilenet_v3_small-kd" / "best.pt").stat().st_mtime_ns
    again = compare(data, tmp_path / "compare", ["mobilenet_v3_small"], recipe, "on", **{**arguments, "teacher": False})
    assert again == [student_row]
    assert (tmp_path / "compare" / "mobilenet_v3_small-kd" / "best.pt").stat().st_mtime_ns == before


@needs_teacher
def test_training_with_the_scene_term_resumes_and_exports_only_the_student(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real recipe with the 365-scene term on a tiny real split: the auxiliary head trains beside the
    student, goes into the resume checkpoint, and never into the model that is exported; a resumed finished
    run rebuilds the same model."""
    from dataclasses import replace

    from training.backbones import seed_hub_cache
    from training.recipe import PROFILES
    from training.trainer import train

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    seed_hub_cache(WEIGHTS)
    data = split_tree(tmp_path / "data", {"train": 3, "val": 2})
    recipe = replace(PROFILES["quick"], warmup_epochs=1, epochs=2, views=2, kd_alpha=0.5, kd_temperature=4.0,
                     kd_scene_weight=0.5)
    arguments = dict(weights_dir=WEIGHTS, soft_target_dir=tmp_path / "cache")
    model, history = train(data, list(CLASSES), recipe, tmp_path / "run", **arguments)

    assert [epoch["stage"] for epoch in history["epochs"]] == ["warmup", "finetune", "finetune"]
    assert all(np.isfinite(epoch["train_loss"]) for epoch in history["epochs"])
    assert history["best_val_macro_f1"] == max(epoch["val_macro_f1"] for epoch in history["epochs"][1:])
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert checkpoint["scene_head"]["weight"].shape == (365, 576)  # MobileNetV3-Small's pooled features
    assert not any("scene" in key for key in model.state_dict())
    resumed, _ = train(data, list(CLASSES), recipe, tmp_path / "run", resume=True, **arguments)
    assert resumed.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(resumed.state_dict()[key], value) for key, value in model.state_dict().items())

