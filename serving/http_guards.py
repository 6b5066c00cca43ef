"""ASGI middlewares that keep the HTTP surface predictable under hostile input and overload.

Added to the BentoML service with `add_asgi_middleware`, outermost first:

1. `ErrorEnvelopeMiddleware` rewrites every error answer that is not already in our shape - BentoML's
   validation errors, Starlette's 404/405, anything unexpected - into
   `{"error": {"code", "message"[, "detail"]}}`, and adds `Retry-After` to 429/503.
2. `RequestTimeoutMiddleware` answers 504 `timeout` in that shape when a request runs too long.
   BentoML's own traffic timeout sits outside every middleware and answers `{"error": "..."}`, so the
   service sets it a little longer, as a backstop only.
3. `ApiKeyMiddleware` (only with RC_API_KEYS_FILE) lets classify requests in with a valid key that has
   quota left, and answers 401/429 otherwise, before the load shedder: a flooding key is refused at the
   door and never takes a slot from the others (`serving/api_keys.py` holds the keys and quotas).
4. `LoadSheddingMiddleware` caps classify requests in flight; a few more may wait briefly for a slot,
   and the rest get 429 + Retry-After at once (BentoML's own `max_concurrency` answers 429 without
   Retry-After, in another shape, so the limit lives here).
5. `RequestGuardMiddleware` reads the request body before BentoML does: bodies over the byte limit get
   413 (from Content-Length when declared, else while streaming), and form bodies must send file
   fields as real file parts. That last check closes a hole: given a *text* value for a file field,
   BentoML's form parser downloads it as a URL itself, outside our URL vetting, limits and timeouts.
   Having parsed a multipart upload to a classify route (in memory: the body is in memory already), it
   hands the files to the handler as bytes (`uploaded_files`) and BentoML the other fields as a JSON body,
   so BentoML neither parses the body again nor writes each file to a temp file that the handler reads back
   (together about a tenth of a request's CPU time, docs/serving-profile.md). Forms that BentoML would read
   differently (a file in a field that is not this route's file field) are passed on as they came.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
from contextvars import ContextVar
from http import HTTPStatus
from typing import Any, Awaitable, Callable, Iterable, Mapping, MutableMapping

import anyio
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from starlette.responses import JSONResponse

from inference.errors import (
    CODE_FOR_STATUS,
    ErrorCode,
    InputError,
    ServiceError,
    error_body,
    error_response,
    service_error_response,
)
from serving.api_keys import CURRENT_ADMISSION, WWW_AUTHENTICATE, ApiKeys, count_request

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger(__name__)

SYSTEM_PATHS = frozenset({"/livez", "/healthz", "/readyz", "/metrics"})
MAX_FILENAME_BYTES = 200  # BentoML keeps the upload's name as a temp-file suffix; NAME_MAX is 255

# The files of the request being handled, by field, as RequestGuardMiddleware read them; None when it passed
# the request on as it came (then BentoML gives the handler temp-file paths).
UPLOADS: ContextVar[Mapping[str, list[bytes]] | None] = ContextVar("rc_uploads", default=None)


def uploaded_files(field: str) -> list[bytes]:
    """The files this request sent in multipart field `field`, in memory; [] when there are none here."""
    uploads = UPLOADS.get()
    return uploads.get(field, []) if uploads is not None else []


async def send_error(scope: Scope, receive: Receive, send: Send, error: ServiceError, retry_after_s: int | None = None,
                     close: bool = False) -> None:
    """Answer with our JSON error body (`inference.errors.service_error_response` makes it)."""
    await service_error_response(error, retry_after_s, close=close)(scope, receive, send)


class ErrorEnvelopeMiddleware:
    """Every 4xx/5xx answer outside the system paths leaves in the `{"error": {code, message}}` shape."""

    def __init__(self, app: ASGIApp, retry_after_s: int, own_paths: Iterable[str] = ()) -> None:
        self.app = app
        self.retry_after_s = retry_after_s
        self.skip_paths = SYSTEM_PATHS | frozenset(own_paths)  # answers that have their own shape

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.skip_paths:
            return await self.app(scope, receive, send)
        held_start: Message | None = None
        held_body: list[bytes] = []

        async def envelope_send(message: Message) -> None:
            nonlocal held_start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held_start = message
                return
            if held_start is None:
                return await send(message)
            held_body.append(message.get("body", b""))
            if not message.get("more_body", False):
                await self.enveloped_response(held_start, b"".join(held_body))(scope, receive, send)

        await self.app(scope, receive, envelope_send)

    def enveloped_response(self, start: Message, body: bytes) -> JSONResponse:
        """The held answer again, with our body; its other headers (Retry-After, Allow, ...) are kept."""
        status = start["status"]
        payload = enveloped(status, body)
        if status >= 500 and payload["error"]["code"] == ErrorCode.INTERNAL_ERROR:
            logger.error("answering %s: %s", status, body[:500])
        kept = {name.decode("latin-1"): value.decode("latin-1") for name, value in start.get("headers", [])
                if name.lower() not in (b"content-length", b"content-type")}
        return error_response(status, payload, self.retry_after_s, kept)


def enveloped(status: int, body: bytes) -> dict[str, Any]:
    """Our error body for any error body: kept if already ours, else built from BentoML's/Starlette's."""
    try:
        data = json.loads(body) if body else None
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), dict) and "code" in data["error"]:
        return data
    if isinstance(data, list) and len(data) == 1:  # BentoML answers 4xx exceptions as [{"error": ...}]
        data = data[0]
    code = CODE_FOR_STATUS.get(status, ErrorCode.INTERNAL_ERROR if status >= 500 else ErrorCode.INVALID_REQUEST)
    detail = data.get("detail") if isinstance(data, dict) else None
    if isinstance(detail, list) and detail:
        message = "invalid request: " + "; ".join(describe_validation_error(item) for item in detail)
        return error_body(code, message, detail=detail)
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return error_body(code, data["error"])
    text = body.decode("utf-8", "replace").strip()[:300]
    return error_body(code, text or HTTPStatus(status).phrase)


def describe_validation_error(item: Any) -> str:
    """One pydantic error -> 'top_k: Input should be greater than or equal to 1'."""
    if not isinstance(item, dict):
        return str(item)
    location = ".".join(str(part) for part in item.get("loc", ()) if part not in ("body", "root"))
    return f"{location}: {item.get('msg', 'invalid')}" if location else str(item.get("msg", "invalid"))


class RequestTimeoutMiddleware:
    """Cancel a request still unanswered after `timeout_s` and answer 504 `timeout` instead.

    An answer that has started is not cut (its status line is already out). Work in threads that
    cannot be interrupted (decoding) is waited for before the 504 goes out.
    """

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False
        with anyio.move_on_after(self.timeout_s) as deadline:
            async def send_untimed(message: Message) -> None:
                nonlocal started
                if message["type"] == "http.response.start":
                    started = True
                    deadline.deadline = math.inf  # never cut an answer half-way
                await send(message)

            await self.app(scope, receive, send_untimed)
        if deadline.cancelled_caught and not started:
            await send_error(scope, receive, send,
                             ServiceError(ErrorCode.TIMEOUT, f"the request took longer than {self.timeout_s:g} s"))


class ApiKeyMiddleware:
    """Requests to `paths` need a valid API key with quota left (`ApiKeys.admit`): 401 `missing_api_key` /
    `invalid_api_key` or 429 `quota_exceeded` otherwise, at once and without reading the body.

    The admission is the request's `CURRENT_ADMISSION` (a context variable), through which classify_batch
    pays for its other images (`pay_for_batch`); every answer is counted per key name and status
    (`rc_api_key_requests_total`).
    """

    def __init__(self, app: ASGIApp, keys: ApiKeys, paths: Iterable[str]) -> None:
        self.app = app
        self.keys = keys
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        try:
            admission = self.keys.admit(headers.get("authorization"), headers.get("x-api-key"))
        except ServiceError as exc:
            count_request(getattr(exc, "key_name", ""), exc.status, images=0)
            challenge = {"WWW-Authenticate": WWW_AUTHENTICATE} if exc.status == 401 else None
            return await service_error_response(exc, None, close=True, headers=challenge)(scope, receive, send)
        admitted = CURRENT_ADMISSION.set(admission)
        status: int | None = None

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            CURRENT_ADMISSION.reset(admitted)
            count_request(admission.key.name, status, admission.images)


class LoadSheddingMiddleware:
    """At most `max_concurrency` requests to `paths` run at once; up to `max_waiting` more wait for a slot
    (at most `max_wait_s`); beyond that, 429 + Retry-After at once.

    The short wait absorbs bursts and clients that ignore Retry-After: refusing costs a connection, a
    header parse and an answer, about as much CPU as the work itself, so a storm of instant refusals would
    crowd out the requests being served. Waiting requests are not read yet (the body guard is inside).
    """

    def __init__(self, app: ASGIApp, max_concurrency: int, paths: Iterable[str], retry_after_s: int,
                 max_waiting: int = 0, max_wait_s: float = 0.0) -> None:
        self.app = app
        self.max_concurrency = max_concurrency
        self.paths = frozenset(paths)
        self.retry_after_s = retry_after_s
        self.max_waiting = max_waiting
        self.max_wait_s = max_wait_s
        self.in_flight = 0
        self.line: collections.deque[asyncio.Future[None]] = collections.deque()  # waiting, first come first

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        if not await self.take_slot():
            overloaded = ServiceError(ErrorCode.OVERLOADED,
                                      f"the server is at its limit of {self.max_concurrency} requests in flight; "
                                      f"retry after {self.retry_after_s} s")
            return await send_error(scope, receive, send, overloaded, self.retry_after_s, close=True)
        try:
            await self.app(scope, receive, send)
        finally:
            self.release_slot()

    async def take_slot(self) -> bool:
        """A slot now, or after a bounded wait in line; False when the line is full or the wait ran out."""
        if self.in_flight < self.max_concurrency and not self.line:
            self.in_flight += 1
            return True
        if len(self.line) >= self.max_waiting:
            return False
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.line.append(turn)
        try:
            with anyio.move_on_after(self.max_wait_s):
                await turn
        except BaseException:  # the request itself was cancelled while it waited
            if not self.leave_line(turn):
                self.release_slot()  # handed over just then: pass it on
            raise
        return not self.leave_line(turn)

    def leave_line(self, turn: asyncio.Future[None]) -> bool:
        """Step out of line after waiting; True if no slot was handed over (one handed over is kept)."""
        if turn.done() and not turn.cancelled():
            return False
        turn.cancel()
        if turn in self.line:
            self.line.remove(turn)
        return True

    def release_slot(self) -> None:
        """Hand the slot to the first request in line (in_flight stays), or free it."""
        while self.line:
            turn = self.line.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.in_flight -= 1


class RequestGuardMiddleware:
    """Bounded request bodies, and form bodies whose file fields carry files (see module docstring).

    `upload_fields` maps a route to its file field (`/classify` -> `image`): multipart uploads to those routes
    reach the handler in memory, through `uploaded_files`.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, file_fields: Iterable[str], max_parts: int,
                 upload_fields: Mapping[str, str] | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.file_fields = frozenset(file_fields)
        self.max_parts = max_parts
        self.upload_fields = dict(upload_fields or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self.too_large(scope, receive, send)
        body = await read_body(receive, self.max_body_bytes)
        if body is None:
            return await self.too_large(scope, receive, send)
        form, problem = await self.read_form(headers, body)
        if problem is not None:
            return await send_error(scope, receive, send, InputError(ErrorCode.INVALID_UPLOAD, problem))
        taken = None
        if form is not None:
            taken = in_memory_request(form, self.upload_fields.get(scope["path"]), self.file_fields)
            await form.close()
        if taken is None:
            return await self.app(scope, replay(body, receive), send)
        del body, form  # the files were copied out: the raw body need not stay in memory while the handler runs
        fields_json, files = taken
        token = UPLOADS.set(files)
        try:
            await self.app(as_json_request(scope, len(fields_json)), replay(fields_json, receive), send)
        finally:
            UPLOADS.reset(token)

    async def too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_error(scope, receive, send, InputError(
            ErrorCode.REQUEST_TOO_LARGE, f"the request body is larger than {self.max_body_bytes} bytes"))

    async def read_form(self, headers: Headers, body: bytes) -> tuple[FormData | None, str | None]:
        """A form body parsed with Starlette's parser (the one BentoML uses), files kept in memory, and what is
        wrong with it (None: nothing); (None, None) for a body that is not a form."""
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type not in ("multipart/form-data", "application/x-www-form-urlencoded"):
            return None, None
        if media_type == "multipart/form-data":
            parser: MultiPartParser | FormParser = MultiPartParser(
                headers, single_chunk(body), max_files=self.max_parts, max_fields=self.max_parts)
            parser.spool_max_size = self.max_body_bytes  # type: ignore[misc]  # files stay in memory, like the body
        else:
            parser = FormParser(headers, single_chunk(body), max_fields=self.max_parts)
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            return None, f"malformed form body: {exc.message}"
        except Exception as exc:  # noqa: BLE001 - any parser failure on hostile bytes is the body's fault
            return None, f"malformed form body ({type(exc).__name__})"
        problem = file_field_problem(form.multi_items(), self.file_fields)
        if problem is not None:
            await form.close()
            return None, problem
        return form, None


def in_memory_request(form: FormData, file_field: str | None,
                      file_fields: frozenset[str]) -> tuple[bytes, dict[str, list[bytes]]] | None:
    """A multipart form as BentoML would read it, split into its other fields as a JSON body and its files
    (in `file_field`) as bytes; None when the route takes no uploads in memory or BentoML would read the form
    another way (a file part elsewhere, a value JSON cannot carry)."""
    if file_field is None:
        return None
    files: dict[str, list[bytes]] = {}
    fields: dict[str, Any] = {}
    for name in form.keys():
        if name == file_field:
            values = form.getlist(name)
            if not all(isinstance(value, UploadFile) for value in values):
                return None
            files[name] = [value.file.read() for value in values]  # type: ignore[union-attr]
            continue
        value = form[name]  # a field's last value, as BentoML reads it
        if name in file_fields or isinstance(value, UploadFile):
            return None
        try:
            fields[name] = json.loads(value)  # what BentoML does with form values: JSON, else the text
        except json.JSONDecodeError:
            fields[name] = value
        except Exception:  # noqa: BLE001 - e.g. nesting too deep: leave such a form to BentoML
            return None
    try:
        return json.dumps(fields, allow_nan=False).encode(), files
    except ValueError:
        return None


def as_json_request(scope: Scope, length: int) -> Scope:
    """The request's scope with a JSON body of `length` bytes instead of its form body."""
    headers = [(name, value) for name, value in scope["headers"]
               if name.lower() not in (b"content-type", b"content-length")]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(length).encode())]
    return {**scope, "headers": headers}


def file_field_problem(items: list[tuple[str, str | UploadFile]], file_fields: frozenset[str]) -> str | None:
    for name, value in items:
        if name not in file_fields:
            continue
        if not isinstance(value, UploadFile):
            return (f"'{name}' must be a file part (multipart with a filename); "
                    "send image URLs in 'image_url' or 'image_urls'")
        if len((value.filename or "").encode("utf-8")) > MAX_FILENAME_BYTES:
            return f"the file name of '{name}' is longer than {MAX_FILENAME_BYTES} bytes"
        if "\x00" in (value.filename or ""):
            return f"the file name of '{name}' contains a NUL character"
    return None


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None as soon as it passes `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that hands the already-read body over once, then defers to the real one."""
    sent = False

    async def replay_receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay_receive


async def single_chunk(body: bytes):  # -> AsyncGenerator[bytes, None]
    yield body
