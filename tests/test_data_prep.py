"""data_prep on small fixtures built here: every planted case gets its decision, the output tree and
report are right and deterministic, bad input gets one clear line. Runs in the default (fast) test run."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from data_prep import CLASSES, SPLITS, DataPrepError, Settings, prepare_dataset
from data_prep.__main__ import main
from data_prep.dedup import UnionFind, group_near_duplicates, resolve_duplicates
from data_prep.manifest import COLUMNS, read_manifest
from data_prep.sources import Candidate, assign_output_names, scan_sunrgbd
from testkit.images import jpeg_bytes
from tests.data_prep_fixtures import add_scene, build_fixture, photo, tree_digest, tree_state

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[tuple[str, str], str]]:
    return build_fixture(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def run(inputs, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """One run with default settings: (dataset, source tree state before, after)."""
    sunrgbd, extra, _ = inputs
    out = tmp_path_factory.mktemp("run") / "dataset"
    before = tree_state(sunrgbd.parent)
    prepare_dataset(out, sunrgbd=sunrgbd, extras=[extra])
    return out, before, tree_state(sunrgbd.parent)


@pytest.fixture(scope="module")
def dataset(run) -> Path:
    return run[0]


@pytest.fixture(scope="module")
def manifest(dataset: Path) -> dict[tuple[str, str], dict[str, str]]:
    return {(row["source"], row["source_path"]): row for row in read_manifest(dataset / "manifest.csv")}


# --- extract -------------------------------------------------------------------------------------------

def test_scenes_are_found_at_any_depth_with_normalised_labels(inputs):
    scan = scan_sunrgbd(inputs[0])
    paths = {candidate.source_path: candidate for candidate in scan.candidates}
    assert paths["kv2/kinect2data/000001_upper_newline/image/0000001.jpg"].label == "bedroom"  # "  Bedroom\n"
    assert paths["xtion/sun3ddata/site_a/scan_1/0000001-000000000001/image/0000001.jpg"].label == "living_room"
    assert scan.scenes_by_label["office"] == 1 and all(candidate.label != "office" for candidate in scan.candidates)
    assert scan.scenes_with_several_images == 1


def test_a_scene_with_two_images_uses_the_first_in_sorted_order(manifest):
    scene_rows = [key for key in manifest if key[1].startswith("kv1/b3dodata/img_two/")]
    assert scene_rows == [("sunrgbd", "kv1/b3dodata/img_two/image/a_first.jpg")]


def test_output_names_come_from_the_scene_path_and_never_collide(manifest):
    lg = manifest[("sunrgbd", "realsense/lg/0001/image/0001.jpg")]["output_path"]
    sa = manifest[("sunrgbd", "realsense/sa/0001/image/0001.jpg")]["output_path"]
    assert lg.endswith("/kitchen/sunrgbd__realsense__lg__0001.jpg")
    assert sa.endswith("/kitchen/sunrgbd__realsense__sa__0001.jpg")
    extra = manifest[("myrooms", "kitchen/sub/deeper.jpg")]["output_path"]
    assert extra.endswith("/kitchen/myrooms__kitchen__sub__deeper.jpg")
    names = [Path(row["output_path"]).name for row in manifest.values() if row["output_path"]]
    assert len(names) == len(set(names))


def test_names_that_clash_after_sanitising_get_a_digest():
    clashing = [Candidate("x", "bed room/a.jpg", "bedroom", Path("1")),
                Candidate("x", "bed:room/a.jpg", "bedroom", Path("2"))]
    first, second = assign_output_names(clashing)
    assert first.output_name != second.output_name
    assert first.output_name.startswith("x__bed_room__a__") and first.output_name.endswith(".jpg")


# --- clean ---------------------------------------------------------------------------------------------

def test_every_planted_case_gets_its_decision(inputs, manifest):
    expected = inputs[2]
    got = {key: row["reason"] for key, row in manifest.items()}
    assert got == expected
    for key, reason in expected.items():
        assert manifest[key]["decision"] == ("dropped" if reason else "kept"), key


def test_same_class_duplicate_keeps_exactly_one_copy(manifest):
    kept = manifest[("sunrgbd", "kv1/b3dodata/img_dup_a/image/a.jpg")]
    dropped = manifest[("sunrgbd", "xtion/sun3ddata/site_b/scan_9/0000009-000000000009/image/b.jpg")]
    assert kept["decision"] == "kept" and dropped["reason"] == "duplicate"
    assert "kv1/b3dodata/img_dup_a/image/a.jpg" in dropped["detail"]
    # Across sources, SUN RGB-D's copy is the one kept.
    assert manifest[("sunrgbd", "kv1/NYUdata/NYU0100/image/NYU0100.jpg")]["decision"] == "kept"


def test_a_photo_under_two_labels_loses_every_copy(manifest):
    rows = [row for row in manifest.values() if row["reason"] == "label_conflict"]
    assert len(rows) == 4
    assert all("and" in row["detail"] for row in rows)
    assert {row["class"] for row in rows} == {"bedroom", "kitchen", "bathroom"}


def test_a_different_dark_threshold_changes_the_decision(inputs, tmp_path):
    sunrgbd, extra, _ = inputs
    prepare_dataset(tmp_path / "out", sunrgbd=sunrgbd, extras=[extra], settings=Settings(dark_threshold=0.0, workers=1))
    rows = {row["source_path"]: row for row in read_manifest(tmp_path / "out" / "manifest.csv")}
    dark = rows["kv1/b3dodata/img_dark/image/d.jpg"]
    assert dark["reason"] != "dark" and float(dark["brightness"]) < 0.06


def test_multi_index_dedup_matches_brute_force():
    rng = random.Random(3)
    for bits, max_distance in [(64, 6), (64, 0), (64, 12), (16, 3), (9, 8), (36, 5)]:
        hashes = [rng.getrandbits(bits) for _ in range(400)]
        for _ in range(80):  # near copies, some just inside and some just outside the distance
            flipped = rng.sample(range(bits), rng.randint(0, min(max_distance + 2, bits)))
            hashes.append(rng.choice(hashes) ^ sum(1 << bit for bit in flipped))
        components = UnionFind(len(hashes))
        for first in range(len(hashes)):
            for second in range(first + 1, len(hashes)):
                if (hashes[first] ^ hashes[second]).bit_count() <= max_distance:
                    components.union(first, second)
        groups: dict[int, list[int]] = {}
        for index in range(len(hashes)):
            groups.setdefault(components.find(index), []).append(index)
        brute = sorted((group for group in groups.values() if len(group) > 1), key=lambda group: group[0])
        assert group_near_duplicates(hashes, bits, max_distance) == brute, (bits, max_distance)
        assert brute, "the planted copies must form groups"


def test_resolve_duplicates_keeps_the_first_of_a_class_and_drops_conflicts():
    decisions = resolve_duplicates([[0, 2, 5], [1, 3]], ["bed", "bed", "bed", "kitchen", "x", "bed"],
                                   ["a", "b", "c", "d", "e", "f"])
    assert decisions == {2: ("duplicate", "same photo as a"), 5: ("duplicate", "same photo as a"),
                         1: ("label_conflict", "same photo labelled bed and kitchen: d"),
                         3: ("label_conflict", "same photo labelled bed and kitchen: b")}


# --- split and output ----------------------------------------------------------------------------------

def test_output_tree_holds_the_original_bytes_split_70_20_10(inputs, dataset, manifest):
    assert sorted(path.name for path in dataset.iterdir()) == ["manifest.csv", "report", "test", "train", "val"]
    for split in SPLITS:
        assert sorted(path.name for path in (dataset / split).iterdir()) == list(CLASSES)
    roots = {"sunrgbd": inputs[0], "myrooms": inputs[1]}
    kept = [row for row in manifest.values() if row["decision"] == "kept"]
    on_disk = sorted(path.relative_to(dataset).as_posix() for path in dataset.glob("*/*/*") if path.is_file())
    assert sorted(row["output_path"] for row in kept) == on_disk
    for row in kept:
        assert (dataset / row["output_path"]).read_bytes() == (roots[row["source"]] / row["source_path"]).read_bytes()
        assert row["output_path"].split("/")[:2] == [row["split"], row["class"]]
    for label in CLASSES:
        total = sum(row["class"] == label for row in kept)
        counts = [sum(row["class"] == label and row["split"] == split for row in kept) for split in SPLITS]
        assert counts[0] == int(0.7 * total) and counts[1] == int(0.2 * total) and sum(counts) == total


def test_same_input_gives_identical_trees_whatever_the_listing_order(inputs, dataset, tmp_path, monkeypatch):
    real_scandir, real_listdir = os.scandir, os.listdir

    class ReversedScandir:
        def __init__(self, path="."):
            with real_scandir(path) as entries:
                self.entries = iter(sorted(entries, key=lambda entry: entry.name, reverse=True))

        def __iter__(self):
            return self

        def __next__(self):
            return next(self.entries)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def close(self):
            return None

    monkeypatch.setattr(os, "scandir", ReversedScandir)
    monkeypatch.setattr(os, "listdir", lambda path=".": sorted(real_listdir(path), reverse=True))
    sunrgbd, extra, _ = inputs
    prepare_dataset(tmp_path / "again", sunrgbd=sunrgbd, extras=[extra], settings=Settings(workers=1))
    monkeypatch.undo()
    assert tree_digest(tmp_path / "again") == tree_digest(dataset)


def test_manifest_and_report_hold_no_absolute_paths_or_times(dataset, inputs):
    for path in [dataset / "manifest.csv", dataset / "report" / "report.md", dataset / "report" / "summary.json"]:
        text = path.read_text(encoding="utf-8")
        assert str(inputs[0].parent) not in text and str(dataset) not in text, path


def test_report_is_generated_from_the_manifest(dataset, manifest):
    assert read_manifest(dataset / "manifest.csv")[0].keys() == set(COLUMNS)
    summary = json.loads((dataset / "report" / "summary.json").read_text())
    kept = [row for row in manifest.values() if row["decision"] == "kept"]
    for split in SPLITS:
        for label in CLASSES:
            counted = sum(row["split"] == split and row["class"] == label for row in kept)
            assert summary["splits"][split][label] == counted
    assert summary["dropped_by_reason"]["no_image"] == 2 and summary["dropped_by_reason"]["corrupt"] == 2
    assert summary["sources"]["sunrgbd"]["scenes"] == {"bathroom": 14, "bedroom": 16, "kitchen": 15, "living_room": 14}
    assert summary["sources"]["myrooms"]["ignored_folders"] == ["garage"]
    report = (dataset / "report" / "report.md").read_text()
    assert f"| bedroom | {summary['splits']['train']['bedroom']} | {summary['splits']['val']['bedroom']} |" in report
    for chart in ["class_distribution.png", "drops_by_reason.png", "samples.png"]:
        with Image.open(dataset / "report" / chart) as image:
            assert image.format == "PNG" and image.width > 400


def test_source_trees_are_never_modified(run):
    _, before, after = run
    assert after == before


def test_rerun_replaces_the_dataset_and_an_interrupted_run_leaves_the_old_one(inputs, tmp_path, monkeypatch):
    sunrgbd, extra, _ = inputs
    out = tmp_path / "dataset"
    prepare_dataset(out, sunrgbd=sunrgbd, settings=Settings(workers=1))
    first = tree_digest(out)
    prepare_dataset(out, sunrgbd=sunrgbd, extras=[extra], settings=Settings(workers=1))
    second = tree_digest(out)
    assert second != first and any(name.startswith("train/bedroom/myrooms__") for name in second)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("data_prep.pipeline.write_report", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(out, sunrgbd=sunrgbd, settings=Settings(workers=1, seed=1))
    assert tree_digest(out) == second
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(tmp_path / "fresh", sunrgbd=sunrgbd, settings=Settings(workers=1))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dataset"]  # no partial folders left


def test_nothing_usable_left_is_a_clear_error(tmp_path):
    add_scene(tmp_path / "sun", "a/scene", "bedroom", {"x.jpg": b"garbage"})
    with pytest.raises(DataPrepError, match="no usable image"):
        prepare_dataset(tmp_path / "out", sunrgbd=tmp_path / "sun", settings=Settings(workers=1))
    assert not (tmp_path / "out").exists()


# --- CLI -----------------------------------------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "data_prep", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_cli_builds_the_dataset_and_prints_timings(inputs, tmp_path):
    sunrgbd, extra, _ = inputs
    result = run_cli("--sunrgbd", str(sunrgbd), "--extra", str(extra), "--out", str(tmp_path / "out"), "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert "decode+hash" in result.stdout and "total" in result.stdout and "kept " in result.stdout
    assert (tmp_path / "out" / "report" / "report.md").is_file()


def bad_input_cases(tmp: Path, sunrgbd: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (CLI arguments, expected words in the error line)."""
    (tmp / "empty").mkdir()
    (tmp / "no_scenes" / "kv1").mkdir(parents=True)
    (tmp / "no_scenes" / "kv1" / "readme.txt").write_text("hello")
    add_scene(tmp / "offices", "kv1/office_1", "office", {"o.jpg": jpeg_bytes(photo(1))})
    (tmp / "a_file").write_text("x")
    (tmp / "foreign").mkdir()
    (tmp / "foreign" / "thesis.tex").write_text("precious")
    (tmp / "no_classes" / "garage").mkdir(parents=True)
    (tmp / "no_classes" / "garage" / "car.jpg").write_bytes(jpeg_bytes(photo(2)))
    out = str(tmp / "out")
    return {
        "missing path": (["--sunrgbd", str(tmp / "nope"), "--out", out], "no such folder"),
        "empty folder": (["--sunrgbd", str(tmp / "empty"), "--out", out], "empty"),
        "a file, not a folder": (["--sunrgbd", str(tmp / "a_file"), "--out", out], "not a folder"),
        "no scene.txt": (["--sunrgbd", str(tmp / "no_scenes"), "--out", out], "no scene.txt"),
        "no scene of the classes": (["--sunrgbd", str(tmp / "offices"), "--out", out], "office (1)"),
        "extra without class folders": (["--extra", str(tmp / "no_classes"), "--out", out],
                                        "no files in folders named"),
        "unwritable output": (["--sunrgbd", str(sunrgbd), "--out", str(tmp / "a_file" / "out")], "cannot write"),
        "output inside the source": (["--sunrgbd", str(sunrgbd), "--out", str(sunrgbd / "kv1" / "out")],
                                     "inside the source"),
        "output containing the source": (["--sunrgbd", str(sunrgbd), "--out", str(sunrgbd.parent)],
                                         "contains the source"),
        "output is someone's folder": (["--sunrgbd", str(sunrgbd), "--out", str(tmp / "foreign")], "did not write"),
        "two sources with one name": (["--extra", str(tmp / "no_classes"), "--extra", str(tmp / "no_classes"),
                                       "--out", out], "two sources are named"),
    }


def test_bad_input_gets_one_clear_line_and_a_non_zero_exit(inputs, tmp_path, capsys):
    for name, (args, words) in bad_input_cases(tmp_path, inputs[0]).items():
        assert main([*args, "--workers", "1"]) == 2, name
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("data_prep: error:") and words in lines[0], (name, lines)
        assert not (tmp_path / "out").exists(), name
    assert (tmp_path / "foreign" / "thesis.tex").read_text() == "precious"


def test_the_process_exits_2_without_a_traceback(tmp_path):
    result = run_cli("--sunrgbd", str(tmp_path / "missing"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr == f"data_prep: error: --sunrgbd {tmp_path / 'missing'}: no such folder\n"


@pytest.mark.parametrize("args", [["--out", "x"], ["--sunrgbd", "x", "--out", "y", "--max-distance", "64"],
                                  ["--sunrgbd", "x", "--out", "y", "--dark-threshold", "2"]])
def test_bad_options_get_a_usage_error(args, capsys):
    with pytest.raises(SystemExit) as exit_status:
        main(args)
    assert exit_status.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("python -m data_prep: error:")
