"""Room Classifier: a BentoML service that tells whether a photo shows a bathroom, bedroom, kitchen or living
room, or none of them (`other`, with a model trained on a fifth label).

`RoomClassifier` takes image URLs and uploads, fetches/decodes/validates/resizes each image on its own
(`inference/`), so one bad image never fails a batch, and answers with softmax probabilities. The ONNX
Runtime session lives in the same process: concurrent requests are merged into one ONNX call by
`serving.batching.GreedyBatcher` (adaptive batching that never holds a request back while the model is
idle), with no hop to a second process (README, "Serving speed", says what that hop cost). Scale out with
RC_WORKERS (one model session per worker process). Also serves `GET /health`, the web page at `GET /` and
Swagger UI at `GET /docs` (`serving/web.py`).

Everything is configured by `RC_*` environment variables, listed in `serving/config.py`. With
RC_API_KEYS_FILE set, the classify routes need an API key with quota left (`serving/api_keys.py`).
Run: `bentoml serve service:RoomClassifier` (add `--port 3000`).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import anyio
import bentoml
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from inference.errors import ErrorCode, InputError, ServiceError, service_error_response
from inference.fetch import fetch_url
from inference.model import ModelInfo, OnnxClassifier
from inference.postprocess import OTHER_LABEL, Prediction, explained_labels, heatmap_grid, postprocess
from inference.preprocess import PhotoView, bytes_to_pixels, bytes_to_pixels_and_view
from serving import metrics
from serving.api_keys import ApiKeys, pay_for_batch
from serving.batching import GreedyBatcher, QueueTimeout
from serving.config import ServiceConfig
from serving.http_guards import (
    ApiKeyMiddleware,
    ErrorEnvelopeMiddleware,
    LoadSheddingMiddleware,
    RequestGuardMiddleware,
    RequestTimeoutMiddleware,
    uploaded_files,
)
from serving.web import web_routes

logger = logging.getLogger("bentoml.service.room_classifier")

CONFIG = ServiceConfig.from_env()
MODEL = bentoml.models.BentoModel(CONFIG.model_tag)
UPLOAD_FIELDS = {"/classify": "image", "/classify_batch": "images"}  # the routes that run the model: their file field
CLASSIFY_ROUTES = tuple(UPLOAD_FIELDS)
FILE_FIELDS = tuple(UPLOAD_FIELDS.values())
HEALTH_ROUTES = ("/health",)
# RequestTimeoutMiddleware answers at RC_REQUEST_TIMEOUT_S in our error shape; BentoML's own timeout
# (another shape) only catches what it could not, e.g. a decode still running when the time is up.
BENTOML_TIMEOUT_S = CONFIG.request_timeout_s + 5.0


def explain_missing_model(tag: str) -> None:
    """BentoML refuses to serve or build without the model (exit 1); say plainly what to do about it."""
    try:
        bentoml.models.get(tag)
    except bentoml.exceptions.NotFound as exc:
        print(f"room_classifier: MODEL {tag} NOT FOUND ({exc}). Train and register a model first, or point "
              "RC_MODEL_TAG at an existing one (`bentoml models list`).", file=sys.stderr)


explain_missing_model(CONFIG.model_tag)
# Off unless RC_API_KEYS_FILE is set; a bad file stops the service here, at start-up, naming the problem.
API_KEYS = ApiKeys(CONFIG.api_keys_file) if CONFIG.api_keys_file is not None else None


# ----------------------------------------------------------------------------------------------------
# Response shapes (they become the OpenAPI schema)


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable error code, e.g. not_an_image, url_host_not_allowed")
    message: str = Field(description="what is wrong, for humans")


class ClassHeatmap(BaseModel):
    """One class's activation map."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    label: str = Field(alias="class", description="the class this map explains")
    grid: list[list[float]] = Field(
        description="rows (top to bottom) of cells (left to right), 0..1: how much each part of `crop_box` spoke "
                    "for this class (1 = the most, 0 = not at all or against it); 7x7 for MobileNetV2")


class Heatmap(BaseModel):
    """Why the model answered as it did: class-activation maps over the part of the photo it looked at."""

    crop_box: tuple[float, float, float, float] = Field(
        description="[left, top, right, bottom] in the original photo's pixels (EXIF orientation applied): the "
                    "centre crop the model saw, which the grid covers; the photo outside it was not looked at")
    image_size: tuple[int, int] = Field(description="[width, height] of the original photo, as crop_box measures it")
    maps: list[ClassHeatmap] = Field(
        description="the top class's map, then the second class's when the answer is `uncertain`")


class Classification(BaseModel):
    """One image's answer: the API's JSON shape. The top class is `class` on the wire; `label` in Python,
    where `class` is a keyword. `heatmap` is there only when the request asked for it (`explain=true`)."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    label: str = Field(alias="class", description="the most probable label: a room type, or `other` (none of the "
                                                  "rooms) when the model has that label and `rooms_only` is off")
    confidence: float = Field(description="probability of `class`")
    probabilities: list[tuple[str, float]] = Field(
        description="[[label, p], ...] for every label, highest p first; softmax(logits / temperature), sums to 1")
    top_k: list[tuple[str, float]] = Field(description="the first `top_k` entries of `probabilities`")
    uncertain: bool = Field(description="true when `confidence` is below the threshold")
    model: str = Field(description="model-store tag of the model that answered")
    heatmap: Optional[Heatmap] = Field(
        default=None, description="only with explain=true: what drove the answer (class-activation maps)")

    @model_serializer(mode="wrap")
    def leave_out_absent_heatmap(self, handler: SerializerFunctionWrapHandler) -> Any:
        """Without explain=true the answer is byte for byte what it was before heatmaps existed."""
        data = handler(self)
        if self.heatmap is None:
            data.pop("heatmap", None)
        return data


class BatchItem(BaseModel):
    """One image of a classify_batch request: `result` or `error`, never both."""

    input: str = Field(description="which input this is: image_urls[i] or images[i]")
    result: Optional[Classification] = None
    error: Optional[ErrorDetail] = None


class BatchClassification(BaseModel):
    model: str = Field(description="model-store tag of the model that answered")
    results: list[BatchItem] = Field(description="one entry per image: image_urls first, then images, in order")


TopK = Annotated[Optional[int], Field(ge=1, le=100, description="how many [label, p] pairs in top_k")]
Threshold = Annotated[Optional[float], Field(ge=0.0, le=1.0, description="uncertain below this probability")]
RoomsOnly = Annotated[bool, Field(description="answer one of the rooms even for a photo that is none of them: "
                                              "`other` is left out and the rooms' probabilities renormalised")]
Explain = Annotated[bool, Field(description="add `heatmap`: what drove the answer, for the top class (and the "
                                            "second when uncertain); error explain_not_supported if the model "
                                            "has no activation maps (/health's `explain`)")]


@dataclass(frozen=True)
class AnswerOptions:
    """How a request wants its answers: top_k, the uncertain threshold, labels left out (rooms_only), heatmaps."""

    top_k: int
    threshold: float
    leave_out: tuple[str, ...] = ()
    explain: bool = False


def answer_options(top_k: Optional[int], threshold: Optional[float], rooms_only: bool,
                   explain: bool = False) -> AnswerOptions:
    """A request's options with the server's defaults filled in."""
    return AnswerOptions(top_k if top_k is not None else CONFIG.default_top_k,
                         threshold if threshold is not None else CONFIG.uncertain_threshold,
                         (OTHER_LABEL,) if rooms_only else (), explain)


@dataclass(frozen=True)
class ImageInput:
    """One image of a request, before it is read: a URL, or an upload (its bytes, as the request guard read
    them, or the temp file BentoML wrote when the guard passed the request on as it came)."""

    name: str
    url: Optional[str] = None
    upload: bytes | Path | None = None


# ----------------------------------------------------------------------------------------------------
# GET /health, the web page and /docs (BentoML APIs are POST; these come from a small mounted Starlette app)


async def health(_: Request) -> JSONResponse:
    """Status, model tag, labels, batching statistics; 503 while the model is not available."""
    service: RoomClassifier = bentoml.get_current_service()
    payload = await service.health_payload()
    return JSONResponse(payload, status_code=200 if payload["status"] == "ok" else 503)


health_app = Starlette(routes=[Route(path, health, methods=["GET"]) for path in HEALTH_ROUTES] + web_routes())


# ----------------------------------------------------------------------------------------------------
# The API service


# The OCI image. BentoML's default Debian recipe first installs build-essential and git (about 800 MB) for
# packages that compile at install time; every dependency here installs from a wheel, so `distro=None`
# (no distro recipe) leaves that step out. The base stays BentoML's default, python:<version>-slim, unless
# bentofile.yaml's docker.base_image names another (scripts/container/build_image.sh does, offline).
IMAGE = bentoml.images.Image(base_image=f"python:{sys.version_info.major}.{sys.version_info.minor}-slim",
                             distro=None)  # type: ignore[arg-type]


# BentoML's tracing middleware opens three spans per request even when none is sampled (its default): 0.3-0.6 ms
# of CPU per request (docs/serving-profile.md). The classify routes skip it unless RC_REQUEST_TRACING is on.
TRACING = {} if CONFIG.request_tracing else {"tracing": {"excluded_urls": list(CLASSIFY_ROUTES)}}


@bentoml.service(name="room_classifier", workers=CONFIG.workers, traffic={"timeout": BENTOML_TIMEOUT_S},
                 image=IMAGE, **TRACING)  # type: ignore[arg-type]
@bentoml.asgi_app(health_app, path="/")
class RoomClassifier:
    """Classifies photos as bathroom / bedroom / kitchen / living_room, or `other`: none of them."""

    model_ref = MODEL  # `bentoml build` packs the model; the service loads it from the store

    def __init__(self) -> None:
        self.image_limits = CONFIG.image_limits()
        self.url_policy = CONFIG.url_policy()
        self._decode_limiter: anyio.CapacityLimiter | None = None
        self._fetch_limiter: anyio.CapacityLimiter | None = None
        self.classifier: OnnxClassifier | None = None
        self.load_error: str | None = None
        try:
            self.classifier = OnnxClassifier.from_bento_model(self.model_ref, intra_op_threads=CONFIG.ort_threads)
        except Exception as exc:  # noqa: BLE001 - any load failure must leave a clear, not-ready service
            self.load_error = f"model {CONFIG.model_tag} cannot be served: {exc}"
            logger.error("MODEL NOT LOADED, the service stays not ready (/readyz 503): %s", self.load_error)
            return
        # Adaptive batching in this process: no hop to another one (see serving/batching.py)
        self.batcher = GreedyBatcher(self.run_batch, max_batch_size=CONFIG.max_batch_size,
                                     max_wait_s=CONFIG.max_latency_ms / 1000.0, observe=metrics.observe)
        info = self.classifier.info
        logger.info("model %s loaded (%s, labels %s, %d ONNX Runtime threads)",
                    info.tag, info.architecture, list(info.labels), CONFIG.ort_threads)

    def __is_ready__(self) -> bool:
        return self.classifier is not None

    @bentoml.api(route="/classify")
    async def classify(
        self,
        image_url: Optional[str] = Field(default=None, description="http(s) URL of a photo"),
        # Path, not Optional[Path]: BentoML cannot build a schema for an optional file; None means absent.
        image: Path = Field(default=None, description="an uploaded photo (multipart file)"),
        top_k: TopK = None,
        threshold: Threshold = None,
        rooms_only: RoomsOnly = False,
        explain: Explain = False,
    ) -> Classification:
        """Classify one photo, given by `image_url` (JSON or form field) or uploaded as `image` (multipart).

        Answers `class`, `confidence`, `probabilities` ([[label, p], ...] sorted by p, summing to 1),
        `top_k`, `uncertain` (confidence below `threshold`, default RC_UNCERTAIN_THRESHOLD) and the model tag.
        `class` is `other` for a photo that is none of the rooms; `rooms_only=true` answers the best room instead.
        With `explain=true` also `heatmap` (class-activation maps and the crop box they cover).
        Errors are 4xx/503 with `{"error": {"code": ..., "message": ...}}`; codes are stable
        (e.g. missing_image, not_an_image, image_too_many_pixels, url_host_not_allowed, fetch_timeout).
        """
        try:
            with metrics.timed("handler"):
                info = await self.require_model(explain)
                uploads = uploaded_files("image")
                item = single_input(image_url, uploads[0] if uploads else image)
                pixels, view = await self.load_input(item, info, explain)
                options = answer_options(top_k, threshold, rooms_only, explain)
                predictions, maps = await self.predict(pixels[None], info, options)
        except ServiceError as exc:
            return self.error_response(exc)  # type: ignore[return-value]  # BentoML sends Responses as they are
        first_maps = None if maps is None else maps[0]
        return to_classification(predictions[0], info, heatmap(predictions[0], first_maps, view, info))

    @bentoml.api(route="/classify_batch")
    async def classify_batch(
        self,
        image_urls: list[str] = Field(default_factory=list, description="http(s) URLs of photos"),
        images: list[Path] = Field(default_factory=list, description="uploaded photos (multipart files)"),
        top_k: TopK = None,
        threshold: Threshold = None,
        rooms_only: RoomsOnly = False,
        explain: Explain = False,
    ) -> BatchClassification:
        """Classify several photos at once (a listing's gallery): `image_urls` and/or uploaded `images`.

        Every image gets its own entry in `results`, in input order (URLs first, then uploads), holding
        either `result` (as /classify answers) or `error` ({code, message}): one bad image does not fail
        the others. The whole request fails (4xx) only for request-level problems: no images, more than
        RC_MAX_IMAGES_PER_REQUEST, a malformed body.
        """
        try:
            with metrics.timed("handler"):
                info = await self.require_model(explain)
                items = batch_inputs(image_urls, uploaded_files("images") or images)
                pay_for_batch(len(items))  # with API keys on: one image per image
                results = await self.classify_items(items, info, answer_options(top_k, threshold, rooms_only, explain))
        except ServiceError as exc:
            return self.error_response(exc)  # type: ignore[return-value]
        return BatchClassification(model=info.tag, results=results)

    # ---- steps ---------------------------------------------------------------------------------------

    async def classify_items(self, items: list[ImageInput], info: ModelInfo,
                             options: AnswerOptions) -> list[BatchItem]:
        """Load every image concurrently; run the model once on the good ones; keep errors per image."""
        arrays: list[np.ndarray | ServiceError] = [None] * len(items)  # type: ignore[list-item]
        views: list[PhotoView | None] = [None] * len(items)

        async def load(index: int) -> None:
            try:
                arrays[index], views[index] = await self.load_input(items[index], info, options.explain)
            except ServiceError as exc:
                arrays[index] = exc

        async with anyio.create_task_group() as group:
            for index in range(len(items)):
                group.start_soon(load, index)
        good = [index for index, value in enumerate(arrays) if isinstance(value, np.ndarray)]
        predictions: dict[int, Prediction] = {}
        heatmaps: dict[int, Heatmap | None] = {}
        if good:
            pixels = np.stack([arrays[index] for index in good])
            answers, maps = await self.predict(pixels, info, options)
            predictions = dict(zip(good, answers))
            heatmaps = {index: heatmap(predictions[index], None if maps is None else maps[row], views[index], info)
                        for row, index in enumerate(good)}
        return [BatchItem(input=item.name, result=to_classification(predictions[index], info, heatmaps[index]))
                if index in predictions else
                BatchItem(input=item.name, error=ErrorDetail(**arrays[index].to_dict()))  # type: ignore[union-attr]
                for index, item in enumerate(items)]

    async def load_input(self, item: ImageInput, info: ModelInfo,
                         explain: bool) -> tuple[np.ndarray, PhotoView | None]:
        """URL or upload -> uint8 pixels [S, S, 3] (and, to explain, where they lie on the photo); raises
        InputError for anything wrong with it."""
        if item.url is not None:
            if not CONFIG.url_fetch:
                raise InputError(ErrorCode.URL_FETCH_DISABLED, "this server accepts uploads only (RC_URL_FETCH=false)")
            # abandon_on_cancel: a request timeout answers at once; the thread ends by the fetch deadline
            with metrics.timed("fetch"):
                data: bytes | Path = await anyio.to_thread.run_sync(
                    fetch_url, item.url, self.url_policy, limiter=self.fetch_limiter, abandon_on_cancel=True)
        elif isinstance(item.upload, bytes):  # in memory: its size is checked here, the temp file's in the thread
            data = read_upload(item.upload, self.image_limits.max_bytes)
        else:
            assert item.upload is not None
            data = item.upload
        with metrics.timed("decode"):
            return await anyio.to_thread.run_sync(self.decode_to_pixels, data, info, explain,
                                                  limiter=self.decode_limiter)

    def decode_to_pixels(self, data: bytes | Path, info: ModelInfo,
                         explain: bool) -> tuple[np.ndarray, PhotoView | None]:
        """Runs in a worker thread: Pillow releases the GIL for the heavy parts. Normalisation happens in
        the model process, on the whole batch: uint8 pixels are 4x fewer bytes to send there."""
        if isinstance(data, Path):
            data = read_upload(data, self.image_limits.max_bytes)
        if explain:
            return bytes_to_pixels_and_view(data, info.preprocessing, self.image_limits)
        return bytes_to_pixels(data, info.preprocessing, self.image_limits), None

    async def predict(self, pixels: np.ndarray, info: ModelInfo,
                      options: AnswerOptions) -> tuple[list[Prediction], np.ndarray | None]:
        """Predictions for uint8 pixels, and with `options.explain` the activation maps [N, labels, h, w]."""
        with metrics.timed("model_call"):
            logits, maps = await self.run_model(pixels, options.explain)
        return postprocess(logits, info.labels, info.temperature, options.top_k, options.threshold,
                           options.leave_out), maps

    async def run_model(self, pixels: np.ndarray, explain: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits (and maps, with `explain`) for uint8 pixels, batched with the other requests in flight;
        failures become 503s. A batch that another call asked maps for carries them: dropped here unless asked."""
        try:
            outputs = await self.batcher(pixels, explain=explain)
        except QueueTimeout as exc:
            raise ServiceError(ErrorCode.MODEL_OVERLOADED, f"the model is busy, retry shortly ({exc})") from None
        except Exception:  # noqa: BLE001 - whatever ONNX Runtime raised: a 503 with a log line, never a 500
            logger.exception("the model failed on a batch of %s", list(pixels.shape))
            raise ServiceError(ErrorCode.MODEL_UNAVAILABLE, "the model failed; see the server log") from None
        if isinstance(outputs, tuple):
            return outputs[0], outputs[1] if explain else None
        return outputs, None

    def run_batch(self, pixels: np.ndarray, explain: bool) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """One ONNX Runtime call on a batch (in the batcher's thread); the maps only when a call asked."""
        metrics.observe_batch_size(len(pixels))
        if explain:
            return self.classifier.logits_and_maps_for_pixels(pixels)  # type: ignore[union-attr]
        return self.classifier.logits_for_pixels(pixels)  # type: ignore[union-attr]

    async def require_model(self, explain: bool = False) -> ModelInfo:
        if self.classifier is None:
            raise ServiceError(ErrorCode.MODEL_UNAVAILABLE, f"the model is not available: {self.load_error}")
        if explain and not self.classifier.can_explain:
            raise InputError(ErrorCode.EXPLAIN_NOT_SUPPORTED,
                             f"model {self.classifier.info.tag} ({self.classifier.info.architecture}) has no "
                             "activation maps to explain with; ask without explain")
        return self.classifier.info

    async def health_payload(self) -> dict[str, Any]:
        if self.classifier is None:
            return {"status": "unavailable", "error": self.load_error, "model": CONFIG.model_tag, "labels": []}
        info = self.classifier.info
        return {"status": "ok", "model": info.tag, "labels": list(info.labels), "architecture": info.architecture,
                "explain": self.classifier.can_explain, "model_info": info.to_dict(), "batching": self.batcher.stats(),
                "config": {"max_batch_size": CONFIG.max_batch_size, "max_latency_ms": CONFIG.max_latency_ms,
                           "max_concurrency": CONFIG.max_concurrency, "max_queued": CONFIG.max_queued,
                           "workers": CONFIG.workers, "ort_threads": CONFIG.ort_threads,
                           "decode_threads": CONFIG.decode_threads, "url_fetch": CONFIG.url_fetch,
                           # the web page reads these four
                           "max_images_per_request": CONFIG.max_images_per_request,
                           "max_image_bytes": CONFIG.max_image_bytes,
                           "uncertain_threshold": CONFIG.uncertain_threshold,
                           "api_key_required": API_KEYS is not None}}

    def error_response(self, exc: ServiceError) -> JSONResponse:
        return service_error_response(exc, CONFIG.retry_after_s)

    @property
    def decode_limiter(self) -> anyio.CapacityLimiter:
        if self._decode_limiter is None:  # created lazily: anyio wants a running event loop
            self._decode_limiter = anyio.CapacityLimiter(CONFIG.decode_threads)
        return self._decode_limiter

    @property
    def fetch_limiter(self) -> anyio.CapacityLimiter:
        if self._fetch_limiter is None:
            self._fetch_limiter = anyio.CapacityLimiter(CONFIG.max_concurrency)
        return self._fetch_limiter


RoomClassifier.add_asgi_middleware(ErrorEnvelopeMiddleware, retry_after_s=CONFIG.retry_after_s,
                                   own_paths=HEALTH_ROUTES)
RoomClassifier.add_asgi_middleware(RequestTimeoutMiddleware, timeout_s=CONFIG.request_timeout_s)
if API_KEYS is not None:  # at the door, before load shedding: a key over its quota never takes a slot
    RoomClassifier.add_asgi_middleware(ApiKeyMiddleware, keys=API_KEYS, paths=CLASSIFY_ROUTES)
RoomClassifier.add_asgi_middleware(LoadSheddingMiddleware, max_concurrency=CONFIG.max_concurrency,
                                   paths=CLASSIFY_ROUTES, retry_after_s=CONFIG.retry_after_s,
                                   max_waiting=CONFIG.max_queued, max_wait_s=CONFIG.queue_timeout_s)
RoomClassifier.add_asgi_middleware(RequestGuardMiddleware, max_body_bytes=CONFIG.max_request_bytes,
                                   file_fields=FILE_FIELDS, max_parts=CONFIG.max_images_per_request + 8,
                                   upload_fields=UPLOAD_FIELDS)


# ----------------------------------------------------------------------------------------------------
# Small helpers


def single_input(image_url: Optional[str], image: bytes | Path | None) -> ImageInput:
    if image_url is not None and image is not None:
        raise InputError(ErrorCode.CONFLICTING_INPUTS, "send either image_url or image, not both (use /classify_batch)")
    if image_url is not None:
        return ImageInput(name="image_url", url=image_url)
    if image is not None:
        return ImageInput(name="image", upload=image)
    raise InputError(ErrorCode.MISSING_IMAGE, "send image_url (JSON or form field) or image (multipart file upload)")


def batch_inputs(image_urls: list[str], images: list[bytes] | list[Path]) -> list[ImageInput]:
    items = [ImageInput(name=f"image_urls[{i}]", url=url) for i, url in enumerate(image_urls)]
    items += [ImageInput(name=f"images[{i}]", upload=image) for i, image in enumerate(images)]
    if not items:
        raise InputError(ErrorCode.MISSING_IMAGE, "send image_urls and/or images (multipart files)")
    if len(items) > CONFIG.max_images_per_request:
        raise InputError(ErrorCode.TOO_MANY_IMAGES,
                         f"{len(items)} images; at most {CONFIG.max_images_per_request} per request")
    return items


def read_upload(upload: bytes | Path, max_bytes: int) -> bytes:
    """An upload's bytes (read from BentoML's temp file if need be), refused beyond `max_bytes`."""
    size = len(upload) if isinstance(upload, bytes) else upload.stat().st_size
    if size > max_bytes:
        raise InputError(ErrorCode.IMAGE_TOO_LARGE, f"the image is {size} bytes; the limit is {max_bytes} bytes")
    return upload if isinstance(upload, bytes) else upload.read_bytes()


def to_classification(prediction: Prediction, info: ModelInfo, heatmap: Heatmap | None = None) -> Classification:
    return Classification(label=prediction.label, confidence=prediction.confidence,
                          probabilities=prediction.probabilities, top_k=prediction.top_k,
                          uncertain=prediction.uncertain, model=info.tag, heatmap=heatmap)


def heatmap(prediction: Prediction, maps: np.ndarray | None, view: PhotoView | None,
            info: ModelInfo) -> Heatmap | None:
    """The answer's `heatmap` from its activation maps [labels, h, w]; None when the request did not ask."""
    if maps is None or view is None:
        return None
    return Heatmap(crop_box=tuple(round(edge, 1) for edge in view.crop_box), image_size=view.size,
                   maps=[ClassHeatmap(label=label, grid=heatmap_grid(maps[info.labels.index(label)]))
                         for label in explained_labels(prediction)])
