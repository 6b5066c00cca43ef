"""The two steps of a bulk job that run on Ray workers, each one call into `inference/`, like the service:

- `load_batch` (Ray tasks): input (path or URL) -> bytes -> model input. URLs go through the SSRF-safe
  `inference.fetch.fetch_url`, every image through the hardened decoder and preprocessing
  (`to_model_input`). A bad input becomes an error code + message in its row, never an exception.
- `Classify` (a pool of Ray actors): model inputs -> logits (`OnnxClassifier.logits`) -> result rows
  (`to_results`, i.e. `inference.postprocess.postprocess`).

With `explain` (`--explain`) the load step also records where the model's view lies on each photo and the
actors fetch the class-activation maps: each row gets `heatmap`, the top class's grid as the API gives it (a
list of rows), and `heatmap_crop_box`, the part of the photo it covers ([left, top, right, bottom] pixels).

Limits, URL allow-list, timeouts and threshold come from `inference.config.KernelConfig` (`LoadSettings.
from_config`), the kernel settings the service extends. Nothing here imports bentoml.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
from PIL import Image

from inference.config import KernelConfig
from inference.decode import ImageLimits
from inference.errors import ErrorCode, InputError, ServiceError
from inference.fetch import UrlPolicy, fetch_url
from inference.model import ModelInfo
from inference.postprocess import Prediction, heatmap_grid, postprocess
from inference.preprocess import Preprocessing, bytes_to_pixels, bytes_to_pixels_and_view

OK = ""  # error_code of a row that was classified


@dataclass(frozen=True)
class LoadSettings:
    """What turning one input into a model input needs; built on the driver, shipped to the tasks."""

    preprocessing: Preprocessing
    limits: ImageLimits
    url_policy: UrlPolicy
    url_fetch: bool
    base_dir: str  # relative paths of a list file are read from here
    explain: bool = False  # also record each photo's crop box (for the heatmaps)

    @classmethod
    def from_config(cls, config: KernelConfig, info: ModelInfo, base_dir: Path,
                    explain: bool = False) -> "LoadSettings":
        return cls(preprocessing=info.preprocessing, limits=config.image_limits(), url_policy=config.url_policy(),
                   url_fetch=config.url_fetch, base_dir=str(base_dir), explain=explain)


# ----------------------------------------------------------------------------------------------------
# Step 1: input -> model input (Ray tasks)


def to_model_input(data: bytes, settings: LoadSettings) -> np.ndarray:
    """Untrusted image bytes -> uint8 pixels, the service's own decode + resize + crop in one call (4x fewer
    bytes through Ray's object store than float32; the model actor normalises them as the service does)."""
    return bytes_to_pixels(data, settings.preprocessing, settings.limits)


def is_url(text: str) -> bool:
    """`scheme://...` is a URL (fetch_url refuses schemes other than http/https); anything else a path."""
    return "://" in text


def read_input(text: str, settings: LoadSettings) -> bytes:
    """The bytes of one input: downloaded under the URL policy, or read from a file under the byte limit."""
    if is_url(text):
        if not settings.url_fetch:
            raise InputError(ErrorCode.URL_FETCH_DISABLED, "URL inputs are switched off (RC_URL_FETCH=false)")
        return fetch_url(text, settings.url_policy)
    return read_file(Path(settings.base_dir) / text, settings.limits.max_bytes)


def read_file(path: Path, max_bytes: int) -> bytes:
    """A file's bytes under the byte limit (checked before reading, as the service checks uploads); a file
    that cannot be read is a fetch_failed, like a URL that answers 404."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise InputError(ErrorCode.IMAGE_TOO_LARGE, f"the image is {size} bytes; the limit is {max_bytes} bytes")
        return path.read_bytes()
    except OSError as exc:
        raise InputError(ErrorCode.FETCH_FAILED,
                         f"cannot read {path} ({type(exc).__name__}: {exc.strerror or exc})") from None


def read_or_error(text: str, settings: LoadSettings) -> bytes | ServiceError:
    try:
        return read_input(text, settings)
    except ServiceError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - one input's surprise must not fail the job
        return ServiceError(ErrorCode.INTERNAL_ERROR, f"reading the input failed ({type(exc).__name__}: {exc})")


def model_input_and_box(data: bytes, settings: LoadSettings) -> tuple[np.ndarray, tuple[float, ...]]:
    """`to_model_input`, and the crop box of the model's view in the photo's pixels."""
    pixels, view = bytes_to_pixels_and_view(data, settings.preprocessing, settings.limits)
    return pixels, view.crop_box


def model_input_or_error(data: bytes | ServiceError, settings: LoadSettings
                         ) -> np.ndarray | tuple[np.ndarray, tuple[float, ...]] | ServiceError:
    if isinstance(data, ServiceError):
        return data
    try:
        return model_input_and_box(data, settings) if settings.explain else to_model_input(data, settings)
    except ServiceError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001
        return ServiceError(ErrorCode.INTERNAL_ERROR, f"decoding the image failed ({type(exc).__name__}: {exc})")


def load_batch(batch: dict[str, np.ndarray], settings: LoadSettings, fetch_threads: int) -> dict[str, np.ndarray]:
    """(row, input) -> (row, input, pixels, error_code, error_message), one output row per input row.

    Downloads and file reads run `fetch_threads` at a time (waiting on the network costs no CPU); decoding
    runs one image at a time, the CPU this task was given. Failed rows carry zeros in `pixels` (skipped by
    the model) so the column stays one fixed-shape tensor.
    """
    inputs = [str(text) for text in batch["input"]]
    with ThreadPoolExecutor(max_workers=max(1, min(fetch_threads, len(inputs)))) as pool:
        fetched = list(pool.map(partial(read_or_error, settings=settings), inputs))
    loaded = [model_input_or_error(data, settings) for data in fetched]
    errors = [value if isinstance(value, ServiceError) else None for value in loaded]
    boxes = [value[1] if isinstance(value, tuple) else (0.0,) * 4 for value in loaded]
    loaded = [value[0] if isinstance(value, tuple) else value for value in loaded]
    arrays = [value for value in loaded if isinstance(value, np.ndarray)]
    blank = np.zeros_like(arrays[0]) if arrays else blank_model_input(settings)
    crop_boxes = {"crop_box": np.asarray(boxes, dtype=np.float64)} if settings.explain else {}
    return {
        "row": np.asarray(batch["row"], dtype=np.int64),
        "input": np.asarray(inputs, dtype=object),
        "pixels": np.stack([blank if error else value for value, error in zip(loaded, errors)]),
        "error_code": np.asarray([error.code if error else OK for error in errors], dtype=object),
        "error_message": np.asarray([error.message if error else OK for error in errors], dtype=object),
        **crop_boxes,
    }


_BLANKS: dict[LoadSettings, np.ndarray] = {}


def blank_model_input(settings: LoadSettings) -> np.ndarray:
    """A model input of the right shape and dtype, for batches in which every input failed."""
    if settings not in _BLANKS:
        buffer = io.BytesIO()
        Image.new("RGB", (settings.preprocessing.resize_size,) * 2).save(buffer, "PNG")
        _BLANKS[settings] = np.zeros_like(bytes_to_pixels(buffer.getvalue(), settings.preprocessing, settings.limits))
    return _BLANKS[settings]


# ----------------------------------------------------------------------------------------------------
# Step 2: model inputs -> result rows (a pool of Ray actors)


class Classify:
    """A Ray Data actor holding one ONNX Runtime session, built once from the shipped model bundle."""

    def __init__(self, bundle_ref: Any, ort_threads: int, threshold: float, explain: bool = False) -> None:
        import ray

        from bulk.model import load_classifier

        self.classifier = load_classifier(ray.get(bundle_ref), ort_threads)  # one copy per node, via Ray
        self.threshold = threshold
        self.explain = explain

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        good = np.asarray([code == OK for code in batch["error_code"]], dtype=bool)
        pixels = batch["pixels"][good]
        if not self.explain:
            return to_results(batch, good, self.classifier.logits_for_pixels(pixels), self.classifier.info,
                              self.threshold)
        logits, maps = (self.classifier.logits_and_maps_for_pixels(pixels) if len(pixels) else
                        (np.zeros((0, len(self.classifier.info.labels)), np.float32), None))
        return to_results(batch, good, logits, self.classifier.info, self.threshold, maps)


def to_results(batch: dict[str, np.ndarray], good: np.ndarray, logits: np.ndarray, info: ModelInfo,
               threshold: float, maps: np.ndarray | None = None) -> pa.Table:
    """Logits (and, to explain, activation maps) of the good rows -> one result row per input row (errors
    keep their code and message). A batch with a `crop_box` column is explained."""
    explain = "crop_box" in batch
    predictions = postprocess(logits, info.labels, info.temperature, len(info.labels), threshold)
    grids = top_class_heatmaps(predictions, maps, info) if explain else [None] * len(predictions)
    answers = iter(zip(predictions, grids))
    rows = []
    for index, ok in enumerate(good):
        prediction, grid = next(answers) if ok else (None, None)
        row = result_row(batch["row"][index], batch["input"][index], prediction, batch["error_code"][index],
                         batch["error_message"][index], info)
        if grid is not None:
            row.update(heatmap=grid, heatmap_crop_box=[round(float(edge), 1) for edge in batch["crop_box"][index]])
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=result_schema(info.labels, explain))


def top_class_heatmaps(predictions: list[Prediction], maps: np.ndarray | None,
                       info: ModelInfo) -> list[list[list[float]]]:
    """The top class's grid of each prediction, scaled as the API scales it."""
    if maps is None:
        return []
    return [heatmap_grid(maps[row, info.labels.index(prediction.label)])
            for row, prediction in enumerate(predictions)]


def result_row(row: int, text: str, prediction: Prediction | None, code: str, message: str,
               info: ModelInfo) -> dict[str, Any]:
    """One input's line of the result file."""
    if prediction is None:
        return {"row": int(row), "input": str(text), "model": info.tag, "error_code": str(code),
                "error_message": str(message)}  # the other columns stay null
    probabilities = dict(prediction.probabilities)
    return {"row": int(row), "input": str(text), "class": prediction.label, "confidence": prediction.confidence,
            **{probability_column(label): probabilities[label] for label in info.labels},
            "uncertain": prediction.uncertain, "model": info.tag}


def probability_column(label: str) -> str:
    return f"p_{label}"


def result_schema(labels: Sequence[str], explain: bool = False) -> pa.Schema:
    """The result file's columns; nulls in class..uncertain for an input that failed (error_code says why).
    With `explain`, two list columns follow: the top class's heatmap grid (rows of cells) and its crop box."""
    heatmap = [("heatmap", pa.list_(pa.list_(pa.float32()))), ("heatmap_crop_box", pa.list_(pa.float64()))]
    return pa.schema([("row", pa.int64()), ("input", pa.string()), ("class", pa.string()),
                      ("confidence", pa.float64()),
                      *[(probability_column(label), pa.float64()) for label in labels],
                      ("uncertain", pa.bool_()), ("model", pa.string()),
                      ("error_code", pa.string()), ("error_message", pa.string()),
                      *(heatmap if explain else [])])

