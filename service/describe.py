"""The OpenAPI document the app serves, shaped for client generators: FastAPI's own, with one short
operationId per route (its name) and the enums that pydantic leaves inline (Literal types) named as components,
so a generated client gets `JobPhase`, `OutputDtype` ... instead of one anonymous enum per field."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, get_args

from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel

from adapter_merge.core.jobs import Progress, WebhookDelivery
from adapter_merge.core.request import MergeRequest
from adapter_merge.service.schemas import SCHEMAS, Readiness

NAMED_ENUMS: dict[str, tuple[type[BaseModel], str, str]] = {
    "JobPhase": (Progress, "phase", "What a job is doing: waiting, fetching remote inputs, merging, publishing."),
    "OutputDtype": (MergeRequest, "output_dtype", "dtype of the merged weights; auto keeps the base's."),
    "WebhookState": (WebhookDelivery, "state", "Delivery of a job's callback."),
    "ServiceMode": (Readiness, "mode", "embedded (one machine) or distributed (Redis and Celery workers)."),
}
"""Component name -> the model field whose Literal type it names, and what it means."""


def operation_id(route: APIRoute) -> str:
    """`submit_merge`, `get_job`, ...: generated clients name their functions after these."""
    return route.name


def _values(model: type[BaseModel], field: str) -> tuple[str, ...]:
    return get_args(model.model_fields[field].annotation)


def with_named_enums(document: dict[str, Any]) -> dict[str, Any]:
    """Every inline string enum with the values of a NAMED_ENUMS entry becomes a `$ref` to that component."""
    names = {_values(model, field): name for name, (model, field, _) in NAMED_ENUMS.items()}

    def rewrite(node: Any) -> Any:
        if isinstance(node, list):
            return [rewrite(item) for item in node]
        if not isinstance(node, dict):
            return node
        name = names.get(tuple(node.get("enum", ()))) if node.get("type") == "string" else None
        if name is not None:
            rest = {key: value for key, value in node.items() if key not in ("enum", "type", "title")}
            return {"$ref": SCHEMAS + name, **rest}
        return {key: rewrite(value) for key, value in node.items()}

    named = rewrite(document)
    schemas = named.setdefault("components", {}).setdefault("schemas", {})
    for name, (model, field, description) in NAMED_ENUMS.items():
        schemas[name] = {"type": "string", "enum": list(_values(model, field)), "title": name,
                         "description": description}
    return named


def install_openapi(app: FastAPI) -> None:
    """Serve (and cache) the rewritten document at /openapi.json and from `app.openapi()`."""
    generate: Callable[[], dict[str, Any]] = app.openapi  # FastAPI's; it caches its result in app.openapi_schema

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = with_named_enums(generate())
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]
