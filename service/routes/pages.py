"""The jobs page and the API docs (Swagger UI, ReDoc), all from files shipped inside the package.

Nothing is loaded from anywhere else: the docs' assets are vendored in `static/vendor` (with their licences), so
the docs render on a machine without internet access, and every page carries a Content-Security-Policy that
allows this origin only. The pages themselves are public and hold no data: their scripts ask the API, with the
caller's own token, for everything they show.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
STATIC_PATH = "/static"
SWAGGER = f"{STATIC_PATH}/vendor/swagger-ui"
REDOC = f"{STATIC_PATH}/vendor/redoc"

PAGE_POLICY = ("default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
               "form-action 'self'; frame-ancestors 'none'")
"""Scripts, styles, fetches and images from this origin only; no inline script, no plugins, never framed."""
REDOC_POLICY = f"{PAGE_POLICY}; style-src 'self' 'unsafe-inline'; worker-src 'self' blob:"
"""ReDoc writes its styles at run time (styled-components) and searches in a worker made from a blob; scripts
stay this origin's only."""
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)

router = APIRouter(include_in_schema=False)


def _page_headers(policy: str) -> dict[str, str]:
    return {"Content-Security-Policy": policy, "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def _secured(page: HTMLResponse, policy: str) -> HTMLResponse:
    page.headers.update(_page_headers(policy))
    return page


@router.get("/")
def jobs_page() -> FileResponse:
    """The jobs page: static HTML whose script polls the API with the token the user types in."""
    return FileResponse(STATIC_DIR / "index.html", headers=_page_headers(PAGE_POLICY))


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI from the vendored files. FastAPI starts it with an inline script; the policy allows exactly
    that script, by its hash, and no other."""
    root = request.scope.get("root_path", "").rstrip("/")
    page = get_swagger_ui_html(
        openapi_url=root + (request.app.openapi_url or ""), title=f"{request.app.title} API",
        swagger_js_url=f"{root}{SWAGGER}/swagger-ui-bundle.js", swagger_css_url=f"{root}{SWAGGER}/swagger-ui.css",
        swagger_favicon_url=f"{root}{SWAGGER}/favicon-32x32.png")
    hashes = " ".join(f"'sha256-{_digest(script)}'" for script in _INLINE_SCRIPT.findall(bytes(page.body).decode()))
    return _secured(page, f"{PAGE_POLICY}; script-src 'self' {hashes}")


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    """ReDoc from the vendored bundle, without Google's fonts."""
    root = request.scope.get("root_path", "").rstrip("/")
    page = get_redoc_html(openapi_url=root + (request.app.openapi_url or ""), title=f"{request.app.title} API",
                          redoc_js_url=f"{root}{REDOC}/redoc.standalone.js",
                          redoc_favicon_url=f"{root}{SWAGGER}/favicon-32x32.png", with_google_fonts=False)
    return _secured(page, REDOC_POLICY)


def _digest(script: str) -> str:
    return base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()


class StaticAssets(StaticFiles):
    """The pages' scripts, styles and the vendored docs assets. Revalidated on every load (a 304 when
    unchanged), so a browser never runs last release's script against this release's API."""

    def __init__(self) -> None:
        super().__init__(directory=STATIC_DIR)

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update({"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})
        return response
