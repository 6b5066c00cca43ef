"""Room Classifier: a BentoML service that classifies indoor photos (bathroom, bedroom, kitchen, living room).

Two BentoML services, one bento:

- `RoomClassifier` (the API, public): takes image URLs and uploads, fetches/decodes/validates/preprocesses
  each image on its own (`inference/`), so one bad image never fails a batch, then asks the model
  service for logits and answers with softmax probabilities. Also serves `GET /health`, the web page
  at `GET /` and Swagger UI at `GET /docs` (`inference/web.py`).
- `RoomClassifierModel` (internal, reached through `bentoml.depends`): holds the ONNX Runtime session and
  exposes `logits` as a `batchable=True` API, so concurrent requests are merged into one ONNX call by
  BentoML's adaptive batcher.

Everything is configured by `RC_*` environment variables, listed in `inference/config.py`.
Run: `bentoml serve service:RoomClassifier` (add `--port 3000`).
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import aiohttp
import anyio
import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException, ServiceUnavailable
from pydantic import BaseModel, ConfigDict, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from inference.config import ServiceConfig
from inference.decode import ImageLimits
from inference.errors import InputError, ServiceError, error_body
from inference.fetch import UrlPolicy, fetch_url
from inference.http_guards import (ErrorEnvelopeMiddleware, LoadSheddingMiddleware, RequestGuardMiddleware,
                                   RequestTimeoutMiddleware)
from inference.model import ModelInfo, OnnxClassifier
from inference.postprocess import Prediction, postprocess
from inference.preprocess import bytes_to_input
from inference.web import web_routes

logger = logging.getLogger("bentoml.service.room_classifier")

CONFIG = ServiceConfig.from_env()
MODEL = bentoml.models.BentoModel(CONFIG.model_tag)
CLASSIFY_ROUTES = ("/classify", "/classify_batch")
HEALTH_ROUTES = ("/health",)
FILE_FIELDS = ("image", "images")
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


# ----------------------------------------------------------------------------------------------------
# Response shapes (they become the OpenAPI schema)


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable error code, e.g. not_an_image, url_host_not_allowed")
    message: str = Field(description="what is wrong, for humans")


class Classification(BaseModel):
    """One image's answer."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    label: str = Field(alias="class", description="the most probable room type")
    confidence: float = Field(description="probability of `class`")
    probabilities: list[tuple[str, float]] = Field(
        description="[[label, p], ...] for every label, highest p first; softmax(logits / temperature), sums to 1")
    top_k: list[tuple[str, float]] = Field(description="the first `top_k` entries of `probabilities`")
    uncertain: bool = Field(description="true when `confidence` is below the threshold")
    model: str = Field(description="model-store tag of the model that answered")


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


@dataclass(frozen=True)
class ImageInput:
    """One image of a request, before it is read: a URL or an uploaded temp file."""

    name: str
    url: Optional[str] = None
    path: Optional[Path] = None


# ----------------------------------------------------------------------------------------------------
# The model service: ONNX Runtime behind BentoML's adaptive batcher

# RC_MAX_BATCH_SIZE=1 turns adaptive batching off (BentoML wants batchable APIs to allow batches > 1).
BATCHING: dict[str, Any] = (
    {"batchable": True, "max_batch_size": CONFIG.max_batch_size, "max_latency_ms": CONFIG.max_latency_ms}
    if CONFIG.max_batch_size > 1 else {})


# runner_connection: BentoML recycles the caller's HTTP session every 100 requests / 300 s by default and
# closes it under requests still in flight ("Server disconnected"). The caller is a local process on a
# Unix socket, so there is nothing to rebalance: keep one session.
@bentoml.service(name="room_classifier_model", workers=1, threads=1,
                 traffic={"timeout": CONFIG.request_timeout_s},
                 runner_connection={"max_requests": 2**31 - 1, "max_age": float(365 * 24 * 3600)})
class RoomClassifierModel:
    """Runs the ONNX model. Internal: only RoomClassifier calls it."""

    model_ref = MODEL

    def __init__(self) -> None:
        self.classifier: OnnxClassifier | None = None
        self.load_error: str | None = None
        # logits() counts in the model's worker thread while batch_stats() reads on the event loop
        self.images_per_run: collections.Counter[int] = collections.Counter()
        self.images_per_run_lock = threading.Lock()
        try:
            self.classifier = OnnxClassifier.from_bento_model(self.model_ref, intra_op_threads=CONFIG.ort_threads)
        except Exception as exc:  # noqa: BLE001 - any load failure must leave a clear, not-ready service
            self.load_error = f"model {CONFIG.model_tag} cannot be served: {exc}"
            logger.error("MODEL NOT LOADED, the service stays not ready (/readyz 503): %s", self.load_error)
            return
        info = self.classifier.info
        logger.info("model %s loaded (%s, labels %s, %d ONNX Runtime threads)",
                    info.tag, info.architecture, list(info.labels), CONFIG.ort_threads)

    def __is_ready__(self) -> bool:
        return self.classifier is not None

    @bentoml.api(**BATCHING)
    def logits(self, batch: np.ndarray) -> np.ndarray:
        """float32 [N, 3, S, S] preprocessed images -> float32 [N, num_labels] logits."""
        if self.classifier is None:
            raise ServiceUnavailable(self.load_error or "model not loaded")
        with self.images_per_run_lock:
            self.images_per_run[len(batch)] += 1
        return self.classifier.logits(batch)

    @bentoml.api
    async def describe(self) -> dict[str, Any]:
        """The model's description, or why there is none."""
        if self.classifier is None:
            return {"model": None, "error": self.load_error}
        return {"model": self.classifier.info.to_dict(), "error": None}

    @bentoml.api
    async def batch_stats(self) -> dict[str, Any]:
        """How many images each ONNX Runtime call received (adaptive batching at work)."""
        with self.images_per_run_lock:  # a copy: iterating while logits() adds a size would raise
            counts = dict(self.images_per_run)
        runs = sum(counts.values())
        images = sum(size * count for size, count in counts.items())
        return {"onnx_runs": runs, "images": images, "largest_batch": max(counts, default=0),
                "images_per_run": {str(size): count for size, count in sorted(counts.items())}}


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


@bentoml.service(name="room_classifier", workers=CONFIG.workers, traffic={"timeout": BENTOML_TIMEOUT_S})
@bentoml.asgi_app(health_app, path="/")
class RoomClassifier:
    """Classifies indoor photos as bathroom / bedroom / kitchen / living_room."""

    model = bentoml.depends(RoomClassifierModel)

    def __init__(self) -> None:
        self.info: ModelInfo | None = None
        self.model_error: str | None = "model service not reached yet"
        self.image_limits = ImageLimits(max_bytes=CONFIG.max_image_bytes, max_pixels=CONFIG.max_pixels,
                                        formats=tuple(name.upper() for name in CONFIG.image_formats))
        self.url_policy = UrlPolicy.with_allowlist(
            CONFIG.url_allowlist, connect_timeout_s=CONFIG.fetch_connect_timeout_s,
            read_timeout_s=CONFIG.fetch_read_timeout_s, total_timeout_s=CONFIG.fetch_total_timeout_s,
            max_redirects=CONFIG.fetch_max_redirects, max_bytes=CONFIG.max_image_bytes)
        self._decode_limiter: anyio.CapacityLimiter | None = None
        self._fetch_limiter: anyio.CapacityLimiter | None = None

    async def __is_ready__(self) -> bool:
        return await self.model_info() is not None

    @bentoml.api(route="/classify")
    async def classify(
        self,
        image_url: Optional[str] = Field(default=None, description="http(s) URL of a photo"),
        # Path, not Optional[Path]: BentoML cannot build a schema for an optional file; None means absent.
        image: Path = Field(default=None, description="an uploaded photo (multipart file)"),
        top_k: TopK = None,
        threshold: Threshold = None,
    ) -> Classification:
        """Classify one photo, given by `image_url` (JSON or form field) or uploaded as `image` (multipart).

        Answers `class`, `confidence`, `probabilities` ([[label, p], ...] sorted by p, summing to 1),
        `top_k`, `uncertain` (confidence below `threshold`, default RC_UNCERTAIN_THRESHOLD) and the model tag.
        Errors are 4xx/503 with `{"error": {"code": ..., "message": ...}}`; codes are stable
        (e.g. missing_image, not_an_image, image_too_many_pixels, url_host_not_allowed, fetch_timeout).
        """
        try:
            info = await self.require_model()
            item = single_input(image_url, image)
            batch = (await self.load_input(item, info))[None]
            prediction = (await self.predict(batch, info, top_k, threshold))[0]
        except ServiceError as exc:
            return self.error_response(exc)  # type: ignore[return-value]  # BentoML sends Responses as they are
        return to_classification(prediction, info)

    @bentoml.api(route="/classify_batch")
    async def classify_batch(
        self,
        image_urls: list[str] = Field(default_factory=list, description="http(s) URLs of photos"),
        images: list[Path] = Field(default_factory=list, description="uploaded photos (multipart files)"),
        top_k: TopK = None,
        threshold: Threshold = None,
    ) -> BatchClassification:
        """Classify several photos at once (a listing's gallery): `image_urls` and/or uploaded `images`.

        Every image gets its own entry in `results`, in input order (URLs first, then uploads), holding
        either `result` (as /classify answers) or `error` ({code, message}): one bad image does not fail
        the others. The whole request fails (4xx) only for request-level problems: no images, more than
        RC_MAX_IMAGES_PER_REQUEST, a malformed body.
        """
        try:
            info = await self.require_model()
            items = batch_inputs(image_urls, images)
            results = await self.classify_items(items, info, top_k, threshold)
        except ServiceError as exc:
            return self.error_response(exc)  # type: ignore[return-value]
        return BatchClassification(model=info.tag, results=results)

    # ---- steps ---------------------------------------------------------------------------------------

    async def classify_items(self, items: list[ImageInput], info: ModelInfo, top_k: Optional[int],
                             threshold: Optional[float]) -> list[BatchItem]:
        """Load every image concurrently; run the model once on the good ones; keep errors per image."""
        arrays: list[np.ndarray | ServiceError] = [None] * len(items)  # type: ignore[list-item]

        async def load(index: int) -> None:
            try:
                arrays[index] = await self.load_input(items[index], info)
            except ServiceError as exc:
                arrays[index] = exc

        async with anyio.create_task_group() as group:
            for index in range(len(items)):
                group.start_soon(load, index)
        good = [index for index, value in enumerate(arrays) if isinstance(value, np.ndarray)]
        predictions: dict[int, Prediction] = {}
        if good:
            batch = np.stack([arrays[index] for index in good])
            predictions = dict(zip(good, await self.predict(batch, info, top_k, threshold)))
        return [BatchItem(input=item.name, result=to_classification(predictions[index], info))
                if index in predictions else
                BatchItem(input=item.name, error=ErrorDetail(**arrays[index].to_dict()))  # type: ignore[union-attr]
                for index, item in enumerate(items)]

    async def load_input(self, item: ImageInput, info: ModelInfo) -> np.ndarray:
        """URL or upload -> preprocessed float32 [3, S, S]; raises InputError for anything wrong with it."""
        if item.url is not None:
            if not CONFIG.url_fetch:
                raise InputError("url_fetch_disabled", "this server accepts uploads only (RC_URL_FETCH=false)")
            # abandon_on_cancel: a request timeout answers at once; the thread ends by the fetch deadline
            data: bytes | Path = await anyio.to_thread.run_sync(fetch_url, item.url, self.url_policy,
                                                                limiter=self.fetch_limiter, abandon_on_cancel=True)
        else:
            assert item.path is not None
            data = item.path
        return await anyio.to_thread.run_sync(self.decode_and_preprocess, data, info, limiter=self.decode_limiter)

    def decode_and_preprocess(self, data: bytes | Path, info: ModelInfo) -> np.ndarray:
        """Runs in a worker thread: Pillow and NumPy release the GIL for the heavy parts."""
        if isinstance(data, Path):
            data = read_upload(data, self.image_limits.max_bytes)
        return bytes_to_input(data, info.preprocessing, self.image_limits, jpeg_draft=CONFIG.jpeg_draft)

    async def predict(self, batch: np.ndarray, info: ModelInfo, top_k: Optional[int],
                      threshold: Optional[float]) -> list[Prediction]:
        logits = await self.run_model(batch)
        return postprocess(logits, info.labels, info.temperature,
                           top_k if top_k is not None else CONFIG.default_top_k,
                           threshold if threshold is not None else CONFIG.uncertain_threshold)

    async def run_model(self, batch: np.ndarray) -> np.ndarray:
        """Call the batchable model API; its refusals become 503s with a clear code.

        A dropped connection is retried once (inference is idempotent): the model process may have
        closed an idle keep-alive connection just as it was reused.
        """
        try:
            try:
                return await self.model.to_async.logits(batch)
            except aiohttp.ClientConnectionError as exc:
                logger.warning("model call lost its connection (%s); retrying once", exc)
                return await self.model.to_async.logits(batch)
        except ServiceUnavailable as exc:
            raise ServiceError("model_overloaded", f"the model is busy, retry shortly ({exc})") from None
        except BentoMLException as exc:
            logger.error("model service failed: %s", exc)
            raise ServiceError("model_unavailable", "the model service failed; see the server log") from None
        except Exception:  # noqa: BLE001 - the model process may be restarting: a 503, never a 500
            logger.exception("model service unreachable")
            raise ServiceError("model_unavailable", "the model service is unreachable; retry shortly") from None

    async def require_model(self) -> ModelInfo:
        info = await self.model_info()
        if info is None:
            raise ServiceError("model_unavailable", f"the model is not available: {self.model_error}")
        return info

    async def model_info(self) -> ModelInfo | None:
        """The model's metadata, asked once from the model service (the one source of truth)."""
        if self.info is None:
            try:
                described = await self.model.to_async.describe()
            except Exception as exc:  # noqa: BLE001 - not up yet
                self.model_error = f"model service not reachable ({type(exc).__name__})"
                return None
            if described.get("model") is None:
                self.model_error = described.get("error") or "unknown error"
                return None
            self.info = ModelInfo.from_dict(described["model"])
            self.model_error = None
        return self.info

    async def health_payload(self) -> dict[str, Any]:
        info = await self.model_info()
        if info is None:
            return {"status": "unavailable", "error": self.model_error, "model": CONFIG.model_tag, "labels": []}
        try:
            batching = await self.model.to_async.batch_stats()
        except Exception as exc:  # noqa: BLE001
            batching = {"error": f"model service not reachable ({type(exc).__name__})"}
        return {"status": "ok", "model": info.tag, "labels": list(info.labels), "architecture": info.architecture,
                "model_info": info.to_dict(), "batching": batching,
                "config": {"max_batch_size": CONFIG.max_batch_size, "max_latency_ms": CONFIG.max_latency_ms,
                           "max_concurrency": CONFIG.max_concurrency, "workers": CONFIG.workers,
                           "ort_threads": CONFIG.ort_threads, "url_fetch": CONFIG.url_fetch,
                           # the web page reads these three
                           "max_images_per_request": CONFIG.max_images_per_request,
                           "max_image_bytes": CONFIG.max_image_bytes,
                           "uncertain_threshold": CONFIG.uncertain_threshold}}

    def error_response(self, exc: ServiceError) -> JSONResponse:
        headers = {"Retry-After": str(CONFIG.retry_after_s)} if exc.status in (429, 503) else None
        return JSONResponse(error_body(exc.code, exc.message), status_code=exc.status, headers=headers)

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
RoomClassifier.add_asgi_middleware(LoadSheddingMiddleware, max_concurrency=CONFIG.max_concurrency,
                                   paths=CLASSIFY_ROUTES, retry_after_s=CONFIG.retry_after_s)
RoomClassifier.add_asgi_middleware(RequestGuardMiddleware, max_body_bytes=CONFIG.max_request_bytes,
                                   file_fields=FILE_FIELDS, max_parts=CONFIG.max_images_per_request + 8)


# ----------------------------------------------------------------------------------------------------
# Small helpers


def single_input(image_url: Optional[str], image: Optional[Path]) -> ImageInput:
    if image_url is not None and image is not None:
        raise InputError("conflicting_inputs", "send either image_url or image, not both (use /classify_batch)")
    if image_url is not None:
        return ImageInput(name="image_url", url=image_url)
    if image is not None:
        return ImageInput(name="image", path=image)
    raise InputError("missing_image", "send image_url (JSON or form field) or image (multipart file upload)")


def batch_inputs(image_urls: list[str], images: list[Path]) -> list[ImageInput]:
    items = [ImageInput(name=f"image_urls[{i}]", url=url) for i, url in enumerate(image_urls)]
    items += [ImageInput(name=f"images[{i}]", path=path) for i, path in enumerate(images)]
    if not items:
        raise InputError("missing_image", "send image_urls and/or images (multipart files)")
    if len(items) > CONFIG.max_images_per_request:
        raise InputError("too_many_images",
                         f"{len(items)} images; at most {CONFIG.max_images_per_request} per request")
    return items


def read_upload(path: Path, max_bytes: int) -> bytes:
    size = path.stat().st_size
    if size > max_bytes:
        raise InputError("image_too_large", f"the image is {size} bytes; the limit is {max_bytes} bytes")
    return path.read_bytes()


def to_classification(prediction: Prediction, info: ModelInfo) -> Classification:
    return Classification.model_validate({**prediction.to_dict(), "model": info.tag})
