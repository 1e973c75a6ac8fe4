"""`python -m adapter_merge.service.openapi > openapi.json`: the API description, generated from the app itself."""

from __future__ import annotations

import json
import sys

from adapter_merge.core.settings import Settings
from adapter_merge.service.app import create_app


def openapi_text() -> str:
    """Deterministic JSON (the settings do not leak into it), so the committed file can be checked."""
    schema = create_app(Settings(_env_file=None)).openapi()
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(openapi_text())
