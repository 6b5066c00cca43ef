"""The backbone registry: every entry builds offline, splits into a stem and a tail that compute the network,
keeps the checkpoint layout that existing runs and `--resume` load, and one entry is all a new backbone needs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision import models

from training.__main__ import STEPS_READING_DATA, main, parse_args
from training.backbones import BACKBONES, Backbone, StemTail, build_backbone, build_stem_tail
from training.recipe import Recipe

NUM_CLASSES = 4


def images(batch: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def parameter_ids(module: nn.Module) -> set[int]:
    return {id(parameter) for parameter in module.parameters()}


@pytest.mark.parametrize("arch", list(BACKBONES))
def test_stem_then_tail_computes_the_whole_network(arch: str) -> None:
    spec = BACKBONES[arch]
    network = build_backbone(arch, NUM_CLASSES, pretrained=False).eval()
    split = StemTail(spec.feature_blocks(network), spec.classifier(network), spec.default_stem_blocks).eval()
    with torch.no_grad():
        expected, actual = network(images()), split(images())
    assert actual.shape == (2, NUM_CLASSES)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", list(BACKBONES))
def test_head_parameters_are_exactly_the_classifiers(arch: str) -> None:
    model = build_stem_tail(arch, NUM_CLASSES, pretrained=False)
    linears = [layer for layer in model.head.modules() if isinstance(layer, nn.Linear)]
    assert linears[-1].out_features == NUM_CLASSES  # ImageNet's 1000 outputs replaced
    head, tail = parameter_ids(model.head), parameter_ids(model.tail)
    body = {id(parameter) for parameter in model.tail_body_parameters()}
    assert head and body and not head & body and head | body == tail
    assert body == parameter_ids(model.tail[0])  # the blocks after the cut, nothing of the pooling or the head
    assert not parameter_ids(model.stem) & tail
    assert len(model.stem) == BACKBONES[arch].default_stem_blocks == Recipe(arch=arch).stem_cut()


@pytest.mark.parametrize("arch", list(BACKBONES))
def test_checkpoints_keep_their_stem_and_tail_keys(arch: str) -> None:
    """best.pt and checkpoint.pt hold StemTail's state_dict: blocks keep their own index after the cut."""
    model = build_stem_tail(arch, NUM_CLASSES, pretrained=False)
    keys = list(model.state_dict())
    cut = BACKBONES[arch].default_stem_blocks
    assert all(key.startswith(("stem.", "tail.")) for key in keys)
    first_block = BACKBONES[arch].blocks[0] if isinstance(BACKBONES[arch].blocks, tuple) else "0"
    last_block = BACKBONES[arch].blocks[cut] if isinstance(BACKBONES[arch].blocks, tuple) else str(cut)
    assert keys[0].startswith(f"stem.{first_block}.") and any(key.startswith(f"tail.0.{last_block}.") for key in keys)
    assert model.state_dict()[keys[-1]].shape == (NUM_CLASSES,) and keys[-1].startswith("tail.3.")


def test_one_registry_entry_adds_a_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A network without `.features` / `.classifier` (ResNet-18): its entry names the blocks and the head."""
    entry = Backbone(models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1, 5,
                     blocks=("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"), head="fc")
    monkeypatch.setitem(BACKBONES, "resnet18", entry)
    network = build_backbone("resnet18", NUM_CLASSES, pretrained=False).eval()
    split = StemTail(entry.feature_blocks(network), entry.classifier(network), 5).eval()
    with torch.no_grad():
        torch.testing.assert_close(split(images()), network(images()), rtol=0, atol=0)
    model = build_stem_tail("resnet18", NUM_CLASSES, pretrained=False)
    assert isinstance(model.head, nn.Linear) and model.head.out_features == NUM_CLASSES
    assert list(model.state_dict())[0] == "stem.conv1.weight" and Recipe(arch="resnet18").stem_cut() == 5
    assert parse_args(["train", "--data", "d", "--arch", "resnet18"]).arch == "resnet18"
    assert "resnet18" in parse_args(["compare", "--data", "d"]).archs


def test_unknown_backbone_and_impossible_cut_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'resnet9000'"):
        build_stem_tail("resnet9000", NUM_CLASSES, pretrained=False)
    with pytest.raises(ValueError, match="stem_blocks must be between 0 and"):
        build_stem_tail("mobilenet_v3_small", NUM_CLASSES, pretrained=False, stem_blocks=99)


def test_command_line_backbones_come_from_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args(["compare", "--data", "d"]).archs == list(BACKBONES)
    assert list(BACKBONES) == ["mobilenet_v3_small", "mobilenet_v2", "mobilenet_v3_large", "places365_resnet18",
                               "places365_resnet18_maxpool"]
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["compare", "--data", "d", "--archs", "mobilenet_v2", "resnet9000"])
    assert exit_info.value.code == 2 and "invalid choice: 'resnet9000'" in capsys.readouterr().err


def test_register_runs_without_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`register` reads only the run folder: no --data needed; here it gets as far as the missing best.pt."""
    assert parse_args(["register", "--run-dir", str(tmp_path)]).data is None
    assert main(["register", "--run-dir", str(tmp_path)]) == 2
    assert "best.pt" in capsys.readouterr().err


@pytest.mark.parametrize("step", STEPS_READING_DATA)
def test_steps_that_read_the_dataset_require_data(step: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args([step, "--run-dir", "r"])
    assert exit_info.value.code == 2 and f"the {step} step needs --data DIR" in capsys.readouterr().err


REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO.parent / "shared" / "weights"
PLACES365_FILE = WEIGHTS / "places365" / "wideresnet18_places365.pth.tar"
needs_places365 = pytest.mark.skipif(not PLACES365_FILE.is_file(),
                                     reason=f"{PLACES365_FILE} absent (CI has ../shared beside the clone)")


@pytest.fixture
def empty_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache for this test only. Another test may have pinned the hub folder with
    torch.hub.set_dir (which wins over TORCH_HOME); monkeypatch restores whatever was there."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    return tmp_path / "hub"


@needs_places365
def test_the_scene_student_is_csails_network_loaded_strictly(empty_hub: Path) -> None:
    """Seeded from --weights-dir into the hub cache, the student is the teacher's network (every weight the
    same, no stem max-pool) with a fresh 5-way head; the max-pool variant differs only by that layer."""
    from training.backbones import seed_hub_cache
    from training.teacher import load_teacher

    copied = seed_hub_cache(WEIGHTS)
    assert PLACES365_FILE.name in {path.name for path in copied}
    teacher = load_teacher(["bathroom", "bedroom", "kitchen", "living_room"], WEIGHTS).network
    student = build_backbone("places365_resnet18", 5)
    assert isinstance(student.maxpool, nn.Identity) and student.fc.out_features == 5
    body = {key: value for key, value in teacher.state_dict().items() if not key.startswith("fc.")}
    for key, value in body.items():
        torch.testing.assert_close(student.state_dict()[key], value, rtol=0, atol=0)
    pooled = build_backbone("places365_resnet18_maxpool", 5)
    assert isinstance(pooled.maxpool, nn.MaxPool2d)
    torch.testing.assert_close(pooled.layer4[1].conv2.weight, teacher.layer4[1].conv2.weight, rtol=0, atol=0)
    model = build_stem_tail("places365_resnet18_maxpool", 5).eval()
    assert [name for name, _ in model.stem.named_children()][-1] == "layer2"  # layer3 and layer4 fine-tuned


def test_scene_student_without_its_file_is_a_clear_error(empty_hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No checkpoint and no network: a WeightsUnavailable naming the file and where to put it."""
    from training.backbones import WeightsUnavailable

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *args, **kwargs: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(WeightsUnavailable, match="wideresnet18_places365.pth.tar"):
        build_backbone("places365_resnet18", 5)


def test_the_scene_student_exports_with_activation_maps_and_quantizes(tmp_path: Path) -> None:
    """The ResNet tail (blocks, pooling, fc) gets the class-activation-map output like MobileNetV2, and the
    INT8 file runs through the same ONNX Runtime session code (random weights: the path, not accuracy)."""
    import onnxruntime as ort

    from inference.model import INPUT_NAME, OUTPUT_NAME
    from training.export import export_onnx, max_logit_difference
    from training.quantize import quantize_int8

    model = build_stem_tail("places365_resnet18", 5, pretrained=False).eval()
    path = export_onnx(model, tmp_path / "model.onnx", 64)
    batch = np.random.default_rng(0).standard_normal((4, 3, 64, 64), dtype=np.float32)
    assert max_logit_difference(model, path, batch) < 1e-3
    outputs = [output.name for output in ort.InferenceSession(str(path)).get_outputs()]
    assert outputs[0] == OUTPUT_NAME and len(outputs) == 2
    int8 = quantize_int8(path, tmp_path / "model.int8.onnx", batch)
    logits = ort.InferenceSession(str(int8)).run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
    assert logits.shape == (4, 5) and np.isfinite(logits).all()
