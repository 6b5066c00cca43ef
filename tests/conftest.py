"""Shared fixtures over `testkit` (the support code tests and benchmarks share): the tiny real model in a
temporary BentoML home, a real `bentoml serve` of this repo's service, and a local image host on 127.0.0.1
(which misbehaves on request).

Servers start once per session; a server that does not become ready fails with the tail of its log.
Nothing here talks to any address outside the loopback range.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testkit.image_host import ImageHost, serving_images
from testkit.images import solid_jpeg
from testkit.model_home import TinyModel, register_tiny_model_in
from testkit.server import BentoServer, serve_model_home


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return register_tiny_model_in(tmp_path_factory.mktemp("bentoml_home"))


@pytest.fixture(scope="session")
def server(tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BentoServer]:
    """The main test server: URL images from `localhost` allowed, short fetch timeouts."""
    with serve_model_home(tiny_model.home, tmp_path_factory.mktemp("logs") / "server.log",
                          RC_URL_ALLOWLIST="localhost", RC_FETCH_TOTAL_TIMEOUT_S="2", RC_FETCH_READ_TIMEOUT_S="1",
                          RC_FETCH_CONNECT_TIMEOUT_S="1", RC_MAX_CONCURRENCY="24", RC_MAX_QUEUED="0",
                          RC_MAX_IMAGE_BYTES=str(4 << 20), RC_MAX_REQUEST_BYTES=str(16 << 20),
                          RC_MAX_PIXELS="30000000") as srv:
        yield srv


@pytest.fixture(scope="session")
def image_host() -> Iterator[ImageHost]:
    """Serves red.jpg at /img/red.jpg (the /hops/ redirects end there); tests add their own files."""
    with serving_images() as host:
        host.add("red.jpg", solid_jpeg((255, 0, 0)))
        yield host
