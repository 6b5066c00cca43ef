"""Class-activation maps of a real network: ImageNet MobileNetV2 with a head fitted on real room photos, exported
to ONNX with the maps output as training exports it (training/export.py), then quantized as training does.

- The maps are what they claim: their spatial mean plus the bias is the logits.
- The logits are the same bit for bit with and without the maps (FP32 and INT8 files), fetched or not.
- The sanity check of saliency methods (Adebayo et al., 2018): randomising the final layer's weights changes
  the map (rank correlation with the real map below 0.5 on real photos).
- Localisation: a room photo pasted into the left (right) half of a neutral canvas puts >= 70 % of its map's
  mass on that half.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from PIL import Image

from inference.model import MAPS_OUTPUT_NAME, OUTPUT_NAME
from inference.postprocess import heatmap_grid
from inference.preprocess import IMAGENET_MEAN, Preprocessing, preprocess_batch
from testkit.photos import REAL_PHOTOS_DIR, resize_to_fill
from training.activation_maps import add_activation_maps, find_final_layer, remove_activation_maps

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO.parent / "shared" / "weights"
FIT_PER_CLASS = 16
TEST_PER_CLASS = 4
CONFIG = Preprocessing()

pytestmark = pytest.mark.skipif(not (WEIGHTS / "mobilenet_v2-b0353104.pth").is_file() or not REAL_PHOTOS_DIR.is_dir(),
                                reason="needs ../shared/weights (ImageNet MobileNetV2) and real photos")


def photo_folders() -> dict[str, list[Path]]:
    """label -> photos, for every class folder of the real photos (the labels come from the data, not code)."""
    folders = {path.name: sorted(path.glob("*.jpg")) for path in sorted(REAL_PHOTOS_DIR.iterdir()) if path.is_dir()}
    return {label: photos for label, photos in folders.items() if len(photos) >= FIT_PER_CLASS + TEST_PER_CLASS}


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """ImageNet MobileNetV2, its new head fitted on pooled features of real photos, exported with maps."""
    import torch

    from training.backbones import build_stem_tail, seed_hub_cache
    from training.export import export_onnx

    folder = tmp_path_factory.mktemp("cam")
    torch.hub.set_dir(str(folder / "hub"))
    seed_hub_cache(WEIGHTS)
    photos = photo_folders()
    labels = list(photos)
    torch.manual_seed(0)  # the new head's initial weights: the same fit whatever ran before in this process
    model = build_stem_tail("mobilenet_v2", len(labels)).eval()
    fit = [(load_rgb(path), index) for index, label in enumerate(labels) for path in photos[label][:FIT_PER_CLASS]]
    batch = torch.from_numpy(preprocess_batch([image for image, _ in fit], CONFIG))
    with torch.no_grad():
        pooled = model.tail[:3](model.stem(batch))  # blocks, pooling, flatten: the head's input
    targets = torch.tensor([index for _, index in fit])
    linear = model.head[-1]
    optimiser = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-4)
    torch.manual_seed(0)
    for _ in range(150):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(linear(pooled), targets).backward()
        optimiser.step()
    path = export_onnx(model, folder / "model.onnx", CONFIG.image_size)
    held_out = [path for label in labels for path in photos[label][FIT_PER_CLASS:FIT_PER_CLASS + TEST_PER_CLASS]]
    return {"path": path, "labels": labels, "folder": folder,
            "calibration": batch.numpy()[::2], "photos": preprocess_batch([load_rgb(p) for p in held_out], CONFIG),
            "targets": np.repeat(np.arange(len(labels)), TEST_PER_CLASS)}


def session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho of two maps (ranks of their cells; maps of real photos have no ties that matter)."""
    ranks_a, ranks_b = (np.argsort(np.argsort(x.ravel())).astype(float) for x in (a, b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def test_the_exported_file_has_maps_that_add_up_to_the_logits(exported: dict) -> None:
    logits, maps = session(exported["path"]).run([OUTPUT_NAME, MAPS_OUTPUT_NAME], {"input": exported["photos"]})
    assert maps.shape == (len(exported["photos"]), len(exported["labels"]), 7, 7)
    bias = find_final_layer(onnx.load(str(exported["path"]))).bias
    np.testing.assert_allclose(maps.mean(axis=(2, 3)) + bias, logits, atol=1e-4)
    accuracy = float((logits.argmax(axis=1) == exported["targets"]).mean())
    assert accuracy > 1.5 / len(exported["labels"]), f"the fitted head beats chance by far ({accuracy:.2f})"


def test_logits_are_bit_identical_with_and_without_the_maps_fp32_and_int8(exported: dict) -> None:
    from training.quantize import quantize_int8

    images = exported["photos"]
    with_maps = onnx.load(str(exported["path"]))
    plain = remove_activation_maps(with_maps)
    reference = session(plain).run([OUTPUT_NAME], {"input": images})[0]
    explaining = session(with_maps)
    assert np.array_equal(explaining.run([OUTPUT_NAME], {"input": images})[0], reference)
    assert np.array_equal(explaining.run([OUTPUT_NAME, MAPS_OUTPUT_NAME], {"input": images})[0], reference)

    folder = exported["folder"]
    onnx.save(plain, str(folder / "plain.onnx"))
    plain_int8 = quantize_int8(folder / "plain.onnx", folder / "plain.int8.onnx", exported["calibration"])
    maps_int8 = quantize_int8(exported["path"], folder / "model.int8.onnx", exported["calibration"])
    reference_int8 = session(plain_int8).run([OUTPUT_NAME], {"input": images})[0]
    int8 = session(maps_int8)
    logits_int8, maps = int8.run([OUTPUT_NAME, MAPS_OUTPUT_NAME], {"input": images})
    assert np.array_equal(logits_int8, reference_int8)
    assert np.array_equal(int8.run([OUTPUT_NAME], {"input": images})[0], reference_int8)
    # the INT8 maps explain the INT8 model and look like the FP32 ones
    fp32_maps = explaining.run([MAPS_OUTPUT_NAME], {"input": images})[0]
    top = logits_int8.argmax(axis=1)
    agreement = [rank_correlation(maps[i, c], fp32_maps[i, c]) for i, c in enumerate(top)]
    assert np.median(agreement) > 0.8, agreement


def randomised_final_layer(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """The same network with the final layer's weights redrawn (same shape and spread), maps added anew."""
    plain = remove_activation_maps(model)
    gemm = next(node for node in plain.graph.node if OUTPUT_NAME in node.output)
    for init in plain.graph.initializer:
        if init.name == gemm.input[1]:
            weight = numpy_helper.to_array(init)
            rng = np.random.default_rng(seed)
            init.CopyFrom(numpy_helper.from_array(rng.normal(0, weight.std(), weight.shape).astype(np.float32),
                                                  init.name))
    return add_activation_maps(plain)


def test_randomising_the_final_layer_changes_the_maps(exported: dict) -> None:
    """Adebayo et al.'s model-randomisation test, on the layer the map is made of: if the map stayed the same
    with random class weights, it would show the image's edges, not what the model uses."""
    images = exported["photos"]
    model = onnx.load(str(exported["path"]))
    logits, maps = session(model).run([OUTPUT_NAME, MAPS_OUTPUT_NAME], {"input": images})
    top = logits.argmax(axis=1)
    correlations = []
    for seed in range(3):
        random_maps = session(randomised_final_layer(model, seed)).run([MAPS_OUTPUT_NAME], {"input": images})[0]
        correlations += [rank_correlation(maps[i, c], random_maps[i, c]) for i, c in enumerate(top)]
    assert np.mean(correlations) < 0.5, correlations
    assert np.mean(np.abs(correlations)) < 0.5, correlations


def pasted(photo: Image.Image, side: str) -> Image.Image:
    """`photo` filling one half of a square mean-grey canvas (scaled and centre-cropped to 224x448, no
    stretching); the model's view keeps most of both halves."""
    canvas = Image.new("RGB", (448, 448), tuple(round(255 * m) for m in IMAGENET_MEAN))
    canvas.paste(resize_to_fill(photo, (224, 448)), (0 if side == "left" else 224, 0))
    return canvas


def left_mass(grid: list[list[float]]) -> float:
    """Share of the map's mass on the left half of the view (the middle column of 7 counts half)."""
    values = np.asarray(grid)
    columns = values.sum(axis=0)
    middle = len(columns) // 2
    return float((columns[:middle].sum() + columns[middle] / 2) / columns.sum())


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_photo_in_one_half_of_a_canvas_puts_the_map_on_that_half(exported: dict, side: str) -> None:
    """The map of the photo's own room (the pointing game's rule: the top class of a half-grey picture may
    rightly be 'bathroom' because of the grey wall), as the API scales it, for 4 held-out photos per class."""
    photos = photo_folders()
    chosen = [(index, path) for index, label in enumerate(exported["labels"])
              for path in photos[label][FIT_PER_CLASS:FIT_PER_CLASS + TEST_PER_CLASS]]
    images = preprocess_batch([pasted(load_rgb(path), side) for _, path in chosen], CONFIG)
    maps = session(exported["path"]).run([MAPS_OUTPUT_NAME], {"input": images})[0]
    shares = [left_mass(heatmap_grid(maps[i, label])) for i, (label, _) in enumerate(chosen)]
    on_side = [round(share if side == "left" else 1 - share, 3) for share in shares]
    assert min(on_side) >= 0.7, on_side


def test_a_network_without_a_feature_map_has_no_maps(tmp_path: Path) -> None:
    from testkit.tiny_model import build_tiny_onnx
    from training.activation_maps import NoActivationMaps

    with pytest.raises(NoActivationMaps):
        add_activation_maps(onnx.load(str(build_tiny_onnx(tmp_path / "tiny.onnx"))))
    explainable = onnx.load(str(build_tiny_onnx(tmp_path / "explainable.onnx", explainable=True)))
    assert [output.name for output in explainable.graph.output] == [OUTPUT_NAME, MAPS_OUTPUT_NAME]

