"""The page a person sees at `GET /`, and BentoML's Swagger UI at `GET /docs`, as Starlette routes.

service.py mounts these next to `GET /health` in its small Starlette app. Everything the page needs is a
file in `serving/static/` (plain HTML, CSS and JS, no framework), served from `/web/`: no CDN, no external
font, so the page works offline and behind a firewall, and bentofile.yaml ships the folder in the bento.

`/docs` reuses the Swagger UI that BentoML ships and serves (`/static_content/*`, `/docs.json`; BentoML 1.4
serves both unless its `new_index` feature is turned on) with our own small HTML and initializer instead of
BentoML's index page, which loads Google Tag Manager.

Every answer carries a strict Content-Security-Policy (scripts, styles, images and requests from this origin
only; no inline script or style, except the inline styles Swagger UI needs on /docs),
`X-Content-Type-Options: nosniff`, no framing and no referrer.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGE_PATH = "/"
DOCS_PATH = "/docs"
ASSETS_PATH = "/web"

# blob: for thumbnails of the user's own files (object URLs); nothing from other origins.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
            "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
# Swagger UI (React) applies inline styles (it breaks without 'unsafe-inline') and uses data: SVG icons;
# still nothing from other origins.
DOCS_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
COMMON_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}


def secure_headers(csp: str) -> dict[str, str]:
    return {"Content-Security-Policy": csp, **COMMON_HEADERS}


async def page(_: Request) -> Response:
    """The classifier page; `no-cache` so a new release's page is picked up at once."""
    return FileResponse(STATIC_DIR / "index.html", headers={**secure_headers(PAGE_CSP), "Cache-Control": "no-cache"})


async def docs_page(_: Request) -> Response:
    """Swagger UI on BentoML's own assets and OpenAPI document."""
    return FileResponse(STATIC_DIR / "docs.html", headers={**secure_headers(DOCS_CSP), "Cache-Control": "no-cache"})


class SecureStaticFiles(StaticFiles):
    """StaticFiles whose files carry the page's security headers (a missing file is a JSON 404 upstream)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(secure_headers(PAGE_CSP))
        return response


def web_routes() -> list[BaseRoute]:
    """`GET /` (the page), `GET /docs` (Swagger UI) and `/web/*` (the page's files)."""
    return [Route(PAGE_PATH, page, methods=["GET"]),
            Route(DOCS_PATH, docs_page, methods=["GET"]),
            Mount(ASSETS_PATH, app=SecureStaticFiles(directory=STATIC_DIR), name="web")]
