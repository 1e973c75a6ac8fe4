"""RFC 9457 problem details: the one error format of the API, and the handlers that map every failure to it.

Each problem names what is at fault (a body field, a query parameter, a reference, a header) so a client
can fix its request without reading server logs. Unexpected errors become a bare 500 and are logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_PREFIX = "urn:adapter-merge:problem:"

log = logging.getLogger(__name__)

_HTTP_TITLES = {
    400: "Bad request", 404: "Not found", 405: "Method not allowed", 406: "Not acceptable",
    409: "Conflict", 413: "Content too large", 415: "Unsupported media type", 416: "Range not satisfiable",
    422: "Unprocessable content", 500: "Internal server error", 503: "Service unavailable",
}


class Problem(Exception):
    """Raise anywhere in a request to answer with a problem document."""

    def __init__(
        self, status: int, slug: str, detail: str, *, title: str | None = None,
        headers: dict[str, str] | None = None, **extensions: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.title = title or _HTTP_TITLES.get(status, "Error")
        self.detail = detail
        self.headers = headers or {}
        self.extensions = extensions

    def to_dict(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": PROBLEM_TYPE_PREFIX + self.slug, "title": self.title, "status": self.status,
            "detail": self.detail,
        }
        if instance:
            body["instance"] = instance
        body.update(self.extensions)
        return body


def problem_response(problem: Problem, request: Request | None = None) -> JSONResponse:
    instance = request.url.path if request is not None else None
    return JSONResponse(problem.to_dict(instance), status_code=problem.status, headers=problem.headers,
                        media_type=PROBLEM_MEDIA_TYPE)


def field_name(loc: Sequence[str | int]) -> str:
    """('body', 'adapters', 0, 'ref') -> 'adapters[0].ref'; ('query', 'status') -> "query parameter 'status'"."""
    if not loc:
        return "request"
    where, *rest = loc
    if where != "body":
        names = [str(part) for part in rest if not isinstance(part, int)]
        return f"{where} parameter {'.'.join(names)!r}" if names else str(where)
    text = ""
    for part in rest:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


def validation_problem(errors: Sequence[dict[str, Any]]) -> Problem:
    """Pydantic/FastAPI validation errors -> 400 for unparsable JSON, else 422 listing every bad field."""
    for error in errors:
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error") or error.get("msg")
            position = error["loc"][-1] if len(error.get("loc", ())) > 1 else None
            where = f" at character {position}" if isinstance(position, int) else ""
            return Problem(400, "malformed-json", f"request body is not valid JSON: {reason}{where}",
                           title="Malformed JSON")
    items = []
    for error in errors:
        name = field_name(error.get("loc", ()))
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if error.get("type") == "extra_forbidden":
            message = "unknown field (not part of the request schema)"
        elif name == "body" and error.get("type") in ("model_attributes_type", "missing"):
            message = "the request body must be a JSON object"
        items.append({"field": name, "message": message, "type": error.get("type")})
    detail = "; ".join(f"{item['field']}: {item['message']}" for item in items) or "invalid request"
    return Problem(422, "validation-error", detail, title="Invalid request", errors=items)


async def _on_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return problem_response(exc, request)


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return problem_response(validation_problem(exc.errors()), request)


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    slug = _HTTP_TITLES.get(exc.status_code, "error").lower().replace(" ", "-")
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no resource at {request.url.path}"
    if exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}"
    return problem_response(Problem(exc.status_code, slug, detail, headers=dict(exc.headers or {})), request)


async def _on_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("job store unavailable on %s %s: %s", request.method, request.url.path, exc)
    problem = Problem(503, "store-unavailable", f"the job store cannot be reached ({type(exc).__name__}: {exc}); "
                      "try again shortly", title="Service unavailable", headers={"Retry-After": "5"})
    return problem_response(problem, request)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(Problem(500, "internal-error", "the server failed; the error has been logged"), request)


def install_problem_handlers(app: FastAPI, unavailable: Sequence[type[Exception]] = ()) -> None:
    """Every error becomes a problem document; `unavailable` errors (store down) become 503s."""
    app.add_exception_handler(Problem, _on_problem)
    for error in unavailable:
        app.add_exception_handler(error, _on_unavailable)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_unexpected)
