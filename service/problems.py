"""Problems over HTTP: every failure of a request becomes an `application/problem+json` answer (RFC 9457).

The problem kinds come from the core's catalogue; this module only maps exceptions (our `Problem`, request
validation, routing errors, an unreachable store, bugs) to responses. Unexpected errors become a bare 500
and are logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapter_merge.core.problems import Problem, Problems, ProblemType

PROBLEM_MEDIA_TYPE = "application/problem+json"
STORE_RETRY_SECONDS = 5

log = logging.getLogger(__name__)


def problem_response(problem: Problem, request: Request | None = None) -> JSONResponse:
    instance = request.url.path if request is not None else None
    headers = dict(problem.headers)
    if problem.retry_after is not None:
        headers["Retry-After"] = str(problem.retry_after)
    return JSONResponse(problem.to_dict(instance), status_code=problem.status, headers=headers,
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


def _message(error: dict[str, Any]) -> str:
    """A validation error's message for clients: our own validators' text without pydantic's prefix."""
    if error.get("type") == "extra_forbidden":
        return "unknown field (not part of the request schema)"
    if error.get("type") == "value_error":
        return str((error.get("ctx") or {}).get("error") or error.get("msg"))
    return str(error.get("msg", "invalid"))


def validation_problem(errors: Sequence[dict[str, Any]]) -> Problem:
    """Pydantic/FastAPI validation errors -> 400 for unparsable JSON, else 422 listing every bad field."""
    for error in errors:
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error") or error.get("msg")
            position = error["loc"][-1] if len(error.get("loc", ())) > 1 else None
            where = f" at character {position}" if isinstance(position, int) else ""
            return Problem(Problems.MALFORMED_JSON, f"request body is not valid JSON: {reason}{where}")
    items = []
    for error in errors:
        name = field_name(error.get("loc", ()))
        message = _message(error)
        if name == "body" and error.get("type") in ("model_attributes_type", "missing"):
            message = "the request body must be a JSON object"
        items.append({"field": name, "message": message, "type": error.get("type")})
    detail = "; ".join(f"{item['field']}: {item['message']}" for item in items) or "invalid request"
    return Problem(Problems.VALIDATION_ERROR, detail, errors=items)


async def _on_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return problem_response(exc, request)


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return problem_response(validation_problem(exc.errors()), request)


BODY_PARSE_ERRORS = (ValueError, RecursionError)
"""What FastAPI's JSON parsing raises besides JSONDecodeError: a number of thousands of digits, nesting deeper
than the interpreter's stack, bytes that are not UTF-8 (UnicodeDecodeError is a ValueError)."""


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    """Routing errors (unknown path, wrong method), unparsable bodies, and any other HTTPException."""
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    headers = dict(exc.headers or {})
    if exc.status_code == 400 and isinstance(exc.__cause__, BODY_PARSE_ERRORS):
        reason = type(exc.__cause__).__name__
        kind, detail = Problems.MALFORMED_JSON, f"request body is not valid JSON ({reason}: {exc.__cause__})"[:300]
    elif exc.status_code == 404:
        kind = Problems.NOT_FOUND
        detail = f"no resource at {request.url.path}" if detail == "Not Found" else detail
    elif exc.status_code == 405:
        kind, detail = Problems.METHOD_NOT_ALLOWED, f"{request.method} is not allowed on {request.url.path}"
        headers["Allow"] = ", ".join(_allowed_methods(request))
    else:
        kind = ProblemType(detail.lower().replace(" ", "-"), exc.status_code, detail)
    return problem_response(Problem(kind, detail, headers=headers), request)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (the router names only the first route's)."""
    path = request.url.path
    return sorted({method for route in request.app.state.api_routes if route.path_regex.match(path)
                   for method in route.methods})


async def _on_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("job store unavailable on %s %s: %s", request.method, request.url.path, exc)
    problem = Problem(Problems.STORE_UNAVAILABLE, f"the job store cannot be reached ({type(exc).__name__}: "
                      f"{exc}); try again shortly", retry_after=STORE_RETRY_SECONDS)
    return problem_response(problem, request)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(Problem(Problems.INTERNAL_ERROR, "the server failed; the error has been logged"), request)


def install_problem_handlers(app: FastAPI, unavailable: Sequence[type[Exception]] = ()) -> None:
    """Every error becomes a problem document; `unavailable` errors (store down) become 503s."""
    app.add_exception_handler(Problem, _on_problem)
    for error in unavailable:
        app.add_exception_handler(error, _on_unavailable)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_unexpected)
