""""None of these rooms": the `other` label from data_prep through training's choices to the served answer.

- data_prep: --other trees are labelled `other`, keep their scene, and whole scene types are held out of
  training (known scenes split photo by photo);
- training: the teacher's five-way targets, the low-resolution augmentation, the operating point and the
  open-set metrics, each on known values;
- serving: a real `bentoml serve` on a five-label model, through the generated client: `other` answered,
  `rooms_only` renormalising the four rooms.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep import CLASSES, prepare_dataset
from data_prep.common import KNOWN_OTHER_SCENES, OTHER
from data_prep.manifest import read_manifest
from data_prep.split import scene_splits
from inference.postprocess import OTHER_LABEL, postprocess, softmax
from testkit.images import jpeg_bytes, write_solid_jpegs
from testkit.model_home import register_tiny_model_in
from testkit.server import serve_model_home
from tests.data_prep_fixtures import build_fixture, photo, write
from training.data import RandomLowResolution, Sample
from training.openset import (
    ROOMS_AS_OTHER_MAX,
    auroc,
    choose_other_bias,
    fold_other_bias,
    openset_scores,
    with_bias,
)
from training.teacher import NUM_SCENES, ROOM_SCENES, grouped_log_probabilities, scene_membership

HELD_OUT_SCENES = [f"scene_{index:02d}" for index in range(10)]
LABELS = [*CLASSES, OTHER]


# ---- data_prep ------------------------------------------------------------------------------------------


def build_other_tree(root: Path) -> None:
    """An --other tree: 21 dining rooms (a known scene) and 10 scene types of 3 photos each."""
    for index in range(21):
        write(root / "dining_room" / f"{index:03d}.jpg", jpeg_bytes(photo(70_000 + index)))
    for number, scene in enumerate(HELD_OUT_SCENES):
        for index in range(3):
            write(root / scene / f"{index:03d}.jpg", jpeg_bytes(photo(71_000 + 10 * number + index)))


@pytest.fixture(scope="module")
def other_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("other_inputs")
    sunrgbd, extra, _ = build_fixture(base)
    build_other_tree(base / "scenes")
    out = tmp_path_factory.mktemp("other_out") / "dataset"
    prepare_dataset(out, sunrgbd=sunrgbd, extras=[extra], others=[base / "scenes"])
    return out


def test_other_photos_keep_their_source_and_scene_in_the_manifest(other_dataset: Path) -> None:
    rows = [row for row in read_manifest(other_dataset / "manifest.csv") if row["class"] == OTHER]
    assert len(rows) == 21 + 3 * len(HELD_OUT_SCENES)
    assert {row["source"] for row in rows} == {"other_scenes"}
    assert {row["scene"] for row in rows} == {"dining_room", *HELD_OUT_SCENES}
    assert all(row["output_path"].startswith(f"{row['split']}/{OTHER}/") for row in rows)
    rooms = [row for row in read_manifest(other_dataset / "manifest.csv") if row["class"] in CLASSES]
    assert all(row["scene"] == row["class"] for row in rooms)


def test_unknown_scene_types_go_whole_into_one_split_and_known_ones_are_split_by_photo(other_dataset: Path) -> None:
    splits_of: dict[str, set[str]] = defaultdict(set)
    for row in read_manifest(other_dataset / "manifest.csv"):
        if row["class"] == OTHER:
            splits_of[row["scene"]].add(row["split"])
    assert all(len(splits_of[scene]) == 1 for scene in HELD_OUT_SCENES)
    assert {split for scene in HELD_OUT_SCENES for split in splits_of[scene]} == {"train", "val", "test"}
    assert "dining_room" in KNOWN_OTHER_SCENES and splits_of["dining_room"] == {"train", "val", "test"}
    assert sorted(path.name for path in (other_dataset / "train").iterdir()) == LABELS


def test_the_report_names_the_held_out_scene_types(other_dataset: Path) -> None:
    report = (other_dataset / "report" / "report.md").read_text()
    assert "## `other`: photos per scene type" in report and "Held out whole (never in training)" in report


def test_scene_splits_are_seeded_and_seventy_twenty_ten_by_scene_count() -> None:
    scenes = {f"s{index}" for index in range(20)}
    first, again = scene_splits(scenes, 1337), scene_splits(set(sorted(scenes, reverse=True)), 1337)
    assert first == again
    assert [list(first.values()).count(split) for split in ("train", "val", "test")] == [14, 4, 2]
    assert scene_splits(scenes, 7) != first


def test_a_dataset_without_other_trees_keeps_four_classes(tmp_path: Path) -> None:
    sunrgbd, extra, _ = build_fixture(tmp_path / "in")
    prepare_dataset(tmp_path / "out", sunrgbd=sunrgbd, extras=[extra])
    assert sorted(path.name for path in (tmp_path / "out" / "train").iterdir()) == list(CLASSES)


# ---- training's choices ---------------------------------------------------------------------------------


def test_every_places_scene_belongs_to_exactly_one_of_the_five_labels() -> None:
    membership = scene_membership(LABELS)
    assert membership.shape == (NUM_SCENES, 5) and np.all(membership.sum(axis=1) == 1)
    for column, label in enumerate(CLASSES):
        assert set(np.flatnonzero(membership[:, column])) == set(ROOM_SCENES[label].values())
    four = scene_membership(list(CLASSES))  # without other: the rooms' scenes only
    assert four.sum() == sum(len(scenes) for scenes in ROOM_SCENES.values())
    with pytest.raises(ValueError, match="knows no class"):
        scene_membership(["garage"])


def test_the_teacher_label_probabilities_are_sums_over_their_scenes() -> None:
    scene_logits = torch.randn(3, NUM_SCENES, generator=torch.Generator().manual_seed(0))
    membership = torch.from_numpy(scene_membership(LABELS))
    grouped = grouped_log_probabilities(scene_logits, membership).exp()
    probabilities = torch.softmax(scene_logits, dim=1)
    assert torch.allclose(grouped.sum(dim=1), torch.ones(3), atol=1e-5)
    bedroom = list(ROOM_SCENES["bedroom"].values())
    assert torch.allclose(grouped[:, 1], probabilities[:, bedroom].sum(dim=1), atol=1e-6)


def test_distillation_targets_keep_to_the_labels_side_of_room_or_other() -> None:
    from training.soft_targets import on_the_labels_side

    log_probabilities = torch.log(torch.tensor([[[0.5, 0.1, 0.1, 0.1, 0.2],     # a bathroom photo
                                                 [0.1, 0.1, 0.1, 0.3, 0.4]]]))  # an other photo like a living room
    targets = on_the_labels_side(log_probabilities, torch.tensor([0, 4]), other_index=4).softmax(dim=-1)[0]
    assert targets[0, :4] == pytest.approx(torch.tensor([0.625, 0.125, 0.125, 0.125]), abs=1e-6)  # rooms renormalised
    assert targets[0, 4] < 1e-9 and targets[1, 4] > 1 - 1e-6
    assert torch.equal(on_the_labels_side(log_probabilities, torch.tensor([0, 3]), None), log_probabilities)


def test_low_resolution_augmentation_shrinks_large_photos_only() -> None:
    large, small = Image.new("RGB", (640, 480)), Image.new("RGB", (128, 96))
    assert RandomLowResolution(p=1.0)(large).size == (171, 128)
    assert RandomLowResolution(p=0.0)(large).size == (640, 480)
    assert RandomLowResolution(p=1.0)(small).size == (128, 96)


def sample(folder: str, name: str, label: int) -> Sample:
    return Sample(Path(f"/data/val/{folder}/{name}"), label)


def test_a_sample_knows_its_scene_and_source() -> None:
    other = sample(OTHER, "other_miniplaces__corridor__00001.jpg", 4)
    room = sample("kitchen", "places365__kitchen__00001.jpg", 2)
    assert (other.scene, other.source) == ("corridor", "other_miniplaces")
    assert (room.scene, room.source) == ("kitchen", "places365")


def test_auroc_equals_the_share_of_correctly_ordered_pairs() -> None:
    rng = np.random.default_rng(0)
    scores, positives = np.round(rng.random(60), 1), rng.random(60) < 0.4  # rounded: ties included
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p in scores[positives] for n in scores[~positives]]
    assert auroc(scores, positives) == pytest.approx(np.mean(pairs))
    assert auroc(np.arange(4.0), np.array([False, False, True, True])) == 1.0


def open_set_validation() -> tuple[np.ndarray, list[Sample]]:
    """100 rooms (3 % of them look like other) and 40 other photos of an unseen scene that look half-room."""
    samples = [sample("bedroom", f"x__bedroom__{i}.jpg", 1) for i in range(100)]
    samples += [sample(OTHER, f"other_x__yard__{i}.jpg", 4) for i in range(40)]
    logits = np.zeros((140, 5))
    logits[:100, 1] = 3.0
    logits[:3, 4] = 4.0  # three rooms the model already calls other
    logits[100:, 1] = 2.0
    logits[100:, 4] = np.linspace(0.0, 3.0, 40)  # the other photos: other logit below the room's for most
    return logits, samples


def test_the_other_bias_raises_unseen_scene_recall_without_passing_the_rooms_cap() -> None:
    logits, samples = open_set_validation()
    choice = choose_other_bias(logits, samples, 4, train_scenes=set())
    assert choice["bias"] > 0
    assert choice["val_rates"]["rooms_as_other"] <= ROOMS_AS_OTHER_MAX
    assert choice["val_rates"]["unseen_other"] > choice["val_rates_without_bias"]["unseen_other"]
    too_far = with_bias(logits, 4, choice["bias"] + 1.5).argmax(axis=1)[:100]
    assert np.mean(too_far == 4) > ROOMS_AS_OTHER_MAX  # a larger bias would break the cap


def test_folding_the_bias_into_the_classifier_shifts_only_the_other_logit() -> None:
    head = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(8, 5)).eval()
    features = torch.randn(4, 8)
    before = head(features).detach()
    fold_other_bias(head, 4, 1.25)
    after = head(features).detach()
    assert torch.allclose(after[:, :4], before[:, :4]) and torch.allclose(after[:, 4], before[:, 4] + 1.25)


def test_open_set_scores_count_other_as_wrong_on_room_photos() -> None:
    logits, samples = open_set_validation()
    scores = openset_scores(logits, samples, LABELS, 1.0, train_scenes=set())
    assert scores["rates"]["rooms_as_other"] == pytest.approx(0.03)
    assert scores["room_accuracy"] == pytest.approx(0.97)
    assert scores["unseen_scenes"] == ["yard"]
    assert scores["other_rate_by_scene"]["yard"]["num_images"] == 40


def test_the_evaluation_report_scores_other_per_population_and_scene(other_dataset: Path, tmp_path: Path) -> None:
    """The exported-model evaluation on a five-label split: a fixed linear map of the mean colour as the model."""
    from inference.preprocess import Preprocessing
    from training.data import discover_labels, list_samples
    from training.evaluate import evaluate, write_report
    from training.openset import other_scenes_of

    labels = discover_labels(other_dataset)
    assert labels == LABELS
    weights = np.random.default_rng(0).standard_normal((3, len(labels))).astype(np.float32)
    train_scenes = other_scenes_of(list_samples(other_dataset, "train", labels), labels)
    report = evaluate(lambda batch: batch.mean(axis=(2, 3)) @ weights, list_samples(other_dataset, "val", labels),
                      list_samples(other_dataset, "test", labels), labels, Preprocessing(), train_scenes)
    held_out = {split: {row["scene"] for row in read_manifest(other_dataset / "manifest.csv")
                        if row["class"] == OTHER and row["split"] == split and row["scene"] not in train_scenes}
                for split in ("val", "test")}
    for split in ("val", "test"):
        scores = report["openset"][split]
        assert set(scores["unseen_scenes"]) == held_out[split] and held_out[split]
        assert all(0.0 <= rate <= 1.0 for rate in scores["rates"].values())
    assert 0.0 <= report["openset"]["test_rooms_at_128px"]["rooms_as_other"] <= 1.0
    assert "ece" in report["calibration"]["val_after"]
    write_report(report, tmp_path, {"precision": "fp32"})
    assert "## None of these rooms (`other`)" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "other_rates.png").stat().st_size > 0


# ---- serving --------------------------------------------------------------------------------------------


def test_rooms_only_renormalises_the_four_rooms() -> None:
    logits = np.array([[1.0, 2.0, 0.5, 0.0, 3.0]])
    [five] = postprocess(logits, LABELS, 1.0, 5, 0.5)
    [four] = postprocess(logits, LABELS, 1.0, 5, 0.5, leave_out=(OTHER_LABEL,))
    assert five.label == OTHER and four.label == "bedroom"
    assert dict(four.probabilities) == pytest.approx(dict(zip(CLASSES, softmax(logits[:, :4])[0])))
    assert OTHER_LABEL == OTHER  # the service's name for the label is the dataset folder's


@pytest.fixture(scope="module")
def other_server(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("bentoml-home-other")
    register_tiny_model_in(home, with_other=True)
    with serve_model_home(home, tmp_path_factory.mktemp("logs") / "server.log") as server:
        yield server


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_solid_jpegs(tmp_path_factory.mktemp("colours"), {"white": (255, 255, 255), "red": (255, 0, 0)})


def test_the_service_answers_other_and_rooms_only_through_the_generated_client(other_server, photos) -> None:
    with other_server.client() as client:
        white = client.classify(image=photos["white"])
        assert white["class"] == OTHER and [label for label, _ in white["probabilities"]][0] == OTHER
        assert {label for label, _ in white["probabilities"]} == set(LABELS)
        rooms = client.classify(image=photos["white"], rooms_only=True)
        assert rooms["class"] == "bathroom" and {label for label, _ in rooms["probabilities"]} == set(CLASSES)
        assert sum(p for _, p in rooms["probabilities"]) == pytest.approx(1.0)
        assert client.classify(image=photos["red"])["class"] == "bedroom"
        batch = client.classify_batch(images=[photos["white"], photos["red"]], rooms_only=True)
        assert [item["result"]["class"] for item in batch["results"]] == ["bathroom", "bedroom"]


def test_health_lists_the_five_labels(other_server) -> None:
    import requests

    health = requests.get(f"{other_server.url}/health", timeout=10).json()
    assert health["labels"] == LABELS
