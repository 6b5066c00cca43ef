"""The ASGI guards on their own: error envelopes, load shedding, body limits, file-field checks."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.datastructures import UploadFile

from serving.http_guards import (
    LoadSheddingMiddleware,
    RequestGuardMiddleware,
    RequestTimeoutMiddleware,
    enveloped,
    file_field_problem,
    uploaded_files,
)


def test_bentoml_and_starlette_error_bodies_get_our_envelope() -> None:
    validation = json.dumps({"error": "1 validation error for Input", "detail": [
        {"type": "greater_than_equal", "loc": ["top_k"], "msg": "Input should be greater than or equal to 1"}]})
    body = enveloped(400, validation.encode())
    assert body["error"]["code"] == "invalid_request"
    assert body["error"]["message"] == "invalid request: top_k: Input should be greater than or equal to 1"
    assert enveloped(415, b'[{"error": "pickle is not allowed"}]')["error"] == {
        "code": "unsupported_media_type", "message": "pickle is not allowed"}
    assert enveloped(404, b"Not Found")["error"] == {"code": "not_found", "message": "Not Found"}
    assert enveloped(500, b"")["error"] == {"code": "internal_error", "message": "Internal Server Error"}
    ours = {"error": {"code": "not_an_image", "message": "nope"}}
    assert enveloped(415, json.dumps(ours).encode()) == ours


def test_file_fields_must_be_real_files() -> None:
    upload = UploadFile(file=None, filename="photo.jpg")  # type: ignore[arg-type]
    assert file_field_problem([("images", upload), ("top_k", "3")], frozenset({"images"})) is None
    assert "must be a file part" in file_field_problem([("images", "http://10.0.0.1/")], frozenset({"images"}))
    long_name = UploadFile(file=None, filename="x" * 300)  # type: ignore[arg-type]
    assert "longer than" in file_field_problem([("images", long_name)], frozenset({"images"}))


class Recorder:
    """An ASGI `send` that keeps what was sent."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def __call__(self, message: dict[str, Any]) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int:
        return self.messages[0]["status"]


def http_scope(path: str = "/classify", headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": path, "headers": headers or []}


def app_answering_after(release: asyncio.Event):
    """An ASGI app that answers 200 once `release` is set: requests stay in flight as long as a test wants."""
    async def slow_app(scope: Any, receive: Any, send: Any) -> None:
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return slow_app


def test_load_shedding_answers_429_with_retry_after_beyond_the_limit() -> None:
    release = asyncio.Event()
    slow_app = app_answering_after(release)

    async def scenario() -> list[int]:
        guard = LoadSheddingMiddleware(slow_app, max_concurrency=2, paths=["/classify"], retry_after_s=3)
        recorders = [Recorder() for _ in range(4)]
        tasks = [asyncio.create_task(guard(http_scope(), None, recorder)) for recorder in recorders[:2]]
        await asyncio.sleep(0.01)
        await guard(http_scope(), None, recorders[2])  # over the limit: answered at once
        other_path = asyncio.create_task(guard(http_scope("/health"), None, recorders[3]))
        release.set()
        await asyncio.gather(*tasks, other_path)
        assert (b"retry-after", b"3") in recorders[2].messages[0]["headers"]
        assert guard.in_flight == 0
        return [recorder.status for recorder in recorders]

    assert asyncio.run(scenario()) == [200, 200, 429, 200]


def test_request_guard_stops_bodies_over_the_limit_while_streaming() -> None:
    reached_app = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached_app.append((await receive())["body"])

    async def scenario(chunks: list[bytes], headers: list[tuple[bytes, bytes]]) -> int:
        pending = [{"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
                   for i, chunk in enumerate(chunks)]

        async def receive() -> dict[str, Any]:
            return pending.pop(0)

        recorder = Recorder()
        await RequestGuardMiddleware(app, max_body_bytes=10, file_fields=(), max_parts=4)(
            http_scope(headers=headers), receive, recorder)
        return recorder.status if recorder.messages else 0

    assert asyncio.run(scenario([b"12345", b"678901"], [])) == 413  # no Content-Length: counted
    assert asyncio.run(scenario([b"1"], [(b"content-length", b"99")])) == 413  # declared: not read
    assert asyncio.run(scenario([b"12345", b"67890"], [])) == 0 and reached_app == [b"1234567890"]


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "xyz") -> bytes:
    """A multipart/form-data body of (field, filename or None, content) parts."""
    body = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


def through_guard(path: str, body: bytes) -> dict[str, Any]:
    """What the app behind RequestGuardMiddleware receives for a multipart POST of `body` to `path`."""
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        headers = dict(scope["headers"])
        seen.update(content_type=headers[b"content-type"], length=int(headers[b"content-length"]),
                    body=(await receive())["body"], image=uploaded_files("image"), images=uploaded_files("images"))

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    headers = [(b"content-type", b"multipart/form-data; boundary=xyz"), (b"content-length", str(len(body)).encode())]
    guard = RequestGuardMiddleware(app, max_body_bytes=1 << 20, file_fields=("image", "images"), max_parts=8,
                                   upload_fields={"/classify": "image", "/classify_batch": "images"})
    asyncio.run(guard(http_scope(path, headers), receive, Recorder()))
    return seen


def test_uploads_reach_the_handler_in_memory_and_the_other_fields_as_json() -> None:
    photo = b"\xff\xd8 photo bytes \r\n--not-the-boundary"
    seen = through_guard("/classify", multipart([("image", "a.jpg", photo), ("top_k", None, b"2"),
                                                 ("rooms_only", None, b"true"), ("image_url", None, b"http://x/")]))
    assert seen["content_type"] == b"application/json" and seen["length"] == len(seen["body"])
    assert json.loads(seen["body"]) == {"top_k": 2, "rooms_only": True, "image_url": "http://x/"}
    assert seen["image"] == [photo] and seen["images"] == []
    batch = through_guard("/classify_batch", multipart([("images", "a.jpg", b"one"), ("images", "b.jpg", b"two")]))
    assert json.loads(batch["body"]) == {} and batch["images"] == [b"one", b"two"]


def test_forms_bentoml_reads_otherwise_are_passed_on_as_they_came() -> None:
    for path, parts in [("/classify", [("images", "a.jpg", b"one")]),  # a file in another route's file field
                        ("/classify", [("image", "a.jpg", b"one"), ("top_k", "k.txt", b"2")]),  # a file as a value
                        ("/classify", [("image", "a.jpg", b"one"), ("threshold", None, b"NaN")]),  # not JSON
                        ("/other", [("image", "a.jpg", b"one")])]:  # a route without in-memory uploads
        body = multipart(parts)
        seen = through_guard(path, body)
        assert seen["content_type"].startswith(b"multipart/form-data") and seen["body"] == body
        assert seen["image"] == [] and seen["images"] == []


def test_request_timeout_answers_504_in_our_envelope_unless_the_answer_started() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/streaming":  # starts answering in time, finishes late: not cut
            await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(0.2 if scope["path"] != "/quick" else 0)
        if scope["path"] != "/streaming":
            await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def status_and_body(path: str) -> tuple[int, Any]:
        recorder = Recorder()
        await RequestTimeoutMiddleware(app, timeout_s=0.05)(http_scope(path), None, recorder)
        body = recorder.messages[-1]["body"]
        return recorder.status, json.loads(body) if recorder.status != 200 else body

    status, body = asyncio.run(status_and_body("/slow"))
    assert status == 504 and body["error"]["code"] == "timeout" and body["error"]["message"]
    assert asyncio.run(status_and_body("/quick")) == (200, b"ok")
    assert asyncio.run(status_and_body("/streaming")) == (200, b"ok")


def test_load_shedding_lets_a_few_wait_in_line_then_refuses_at_once() -> None:
    release = asyncio.Event()
    slow_app = app_answering_after(release)

    async def scenario() -> list[int]:
        guard = LoadSheddingMiddleware(slow_app, max_concurrency=2, paths=["/classify"], retry_after_s=1,
                                       max_waiting=2, max_wait_s=5.0)
        recorders = [Recorder() for _ in range(5)]
        tasks = [asyncio.create_task(guard(http_scope(), None, recorder)) for recorder in recorders[:4]]
        await asyncio.sleep(0.01)
        assert guard.in_flight == 2 and len(guard.line) == 2
        await guard(http_scope(), None, recorders[4])  # the line is full: answered at once
        release.set()
        await asyncio.gather(*tasks)
        assert guard.in_flight == 0 and not guard.line
        return [recorder.status for recorder in recorders]

    assert asyncio.run(scenario()) == [200, 200, 200, 200, 429]


def test_load_shedding_refuses_after_the_longest_wait_and_frees_the_line() -> None:
    release = asyncio.Event()
    slow_app = app_answering_after(release)

    async def scenario() -> list[int]:
        guard = LoadSheddingMiddleware(slow_app, max_concurrency=1, paths=["/classify"], retry_after_s=1,
                                       max_waiting=4, max_wait_s=0.05)
        recorders = [Recorder() for _ in range(3)]
        holder = asyncio.create_task(guard(http_scope(), None, recorders[0]))
        await asyncio.sleep(0.01)
        await guard(http_scope(), None, recorders[1])  # waits 50 ms, then 429
        assert not guard.line and guard.in_flight == 1
        waiter = asyncio.create_task(guard(http_scope(), None, recorders[2]))
        await asyncio.sleep(0.01)
        waiter.cancel()  # the client went away while in line: its place is freed
        await asyncio.gather(waiter, return_exceptions=True)
        assert not guard.line and guard.in_flight == 1
        release.set()
        await holder
        assert guard.in_flight == 0
        return [recorder.status for recorder in recorders[:2]]

    assert asyncio.run(scenario()) == [200, 429]
