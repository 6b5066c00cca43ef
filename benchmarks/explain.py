"""What explain=true costs per image at batch 1: the service's own steps, with and without the heatmap.

    python -m benchmarks.explain                         # the served model (RC_MODEL_TAG) from the model store
    python -m benchmarks.explain --onnx runs/x/model.int8.onnx --onnx runs/x/model.onnx   # files (labels: generic)

For each photo (real room photos re-encoded at 640x480, as in `benchmarks.speed`), alternating in rounds so both
see the same machine load:
- off: decode + resize + crop (`bytes_to_pixels`), ONNX Runtime on the logits only, postprocess;
- on: the same with the crop box (`bytes_to_pixels_and_view`), logits and maps in one call, and the
  uncertain-case heatmap grids (two classes, the most an answer carries) as the service builds them.
Prints the median ms per image of each and their difference, for the model call alone and for the whole chain.
One ONNX Runtime thread, as the service runs on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from inference.config import KernelConfig
from inference.model import ModelContract, OnnxClassifier
from inference.postprocess import explained_labels, heatmap_grid, postprocess
from inference.preprocess import Preprocessing, bytes_to_pixels, bytes_to_pixels_and_view
from testkit.photos import DEFAULT_DATA, find_room_photos, write_jpegs


def classifiers(args: argparse.Namespace) -> list[OnnxClassifier]:
    """The model(s) to measure: ONNX files given on the command line, else the served model from the store."""
    if args.onnx:
        return [file_classifier(Path(path)) for path in args.onnx]
    import bentoml

    return [OnnxClassifier.from_bento_model(bentoml.models.get(args.model), intra_op_threads=1)]


def file_classifier(path: Path) -> OnnxClassifier:
    import onnxruntime as ort

    outputs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_outputs()
    count = outputs[0].shape[1]
    contract = ModelContract(labels=tuple(f"class_{i}" for i in range(count)), preprocessing=Preprocessing(),
                             temperature=1.0, architecture=path.name)
    return OnnxClassifier.from_files(path, contract, tag=str(path), intra_op_threads=1)


def time_off(classifier: OnnxClassifier, blob: bytes, config: KernelConfig) -> tuple[float, float]:
    """(model call, whole chain) seconds for one image without explain."""
    info = classifier.info
    started = time.perf_counter()
    pixels = bytes_to_pixels(blob, info.preprocessing, config.image_limits())[None]
    model_started = time.perf_counter()
    logits = classifier.logits_for_pixels(pixels)
    model_s = time.perf_counter() - model_started
    postprocess(logits, info.labels, info.temperature, 3, 1.0)
    return model_s, time.perf_counter() - started


def time_on(classifier: OnnxClassifier, blob: bytes, config: KernelConfig) -> tuple[float, float]:
    """(model call, whole chain) seconds for one image with explain (two maps: threshold 1 makes it unsure)."""
    info = classifier.info
    started = time.perf_counter()
    pixels, _ = bytes_to_pixels_and_view(blob, info.preprocessing, config.image_limits())
    model_started = time.perf_counter()
    logits, maps = classifier.logits_and_maps_for_pixels(pixels[None])
    model_s = time.perf_counter() - model_started
    prediction = postprocess(logits, info.labels, info.temperature, 3, 1.0)[0]
    for label in explained_labels(prediction):
        heatmap_grid(maps[0, info.labels.index(label)])
    return model_s, time.perf_counter() - started


def measure(classifier: OnnxClassifier, blobs: Sequence[bytes], rounds: int) -> dict[str, float]:
    config = KernelConfig.from_env({})
    times: dict[str, list[float]] = {"off_model": [], "on_model": [], "off_total": [], "on_total": []}
    for blob in blobs[:4]:  # warm-up
        time_off(classifier, blob, config)
        time_on(classifier, blob, config)
    for _ in range(rounds):
        for blob in blobs:
            for name, timer in (("off", time_off), ("on", time_on)):
                model_s, total_s = timer(classifier, blob, config)
                times[f"{name}_model"].append(model_s)
                times[f"{name}_total"].append(total_s)
    medians = {name: statistics.median(values) * 1000 for name, values in times.items()}
    return {**{f"{name}_ms": round(value, 3) for name, value in medians.items()},
            "extra_model_ms": round(medians["on_model"] - medians["off_model"], 3),
            "extra_total_ms": round(medians["on_total"] - medians["off_total"], 3),
            "images": len(blobs) * rounds}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=KernelConfig.from_env().model_tag, help="model-store tag")
    parser.add_argument("--onnx", action="append", help="an ONNX file with activation maps (repeatable)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared data folder (real photos)")
    parser.add_argument("--photos", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rc-explain-bench-") as folder:
        files = write_jpegs(find_room_photos(args.data, args.photos), (640, 480), Path(folder))
        blobs = [path.read_bytes() for path in files]
    for classifier in classifiers(args):
        if not classifier.can_explain:
            print(f"{classifier.info.tag}: no activation maps, nothing to measure", file=sys.stderr)
            return 2
        print(json.dumps({"model": classifier.info.tag, **measure(classifier, blobs, args.rounds)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
