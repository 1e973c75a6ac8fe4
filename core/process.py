"""What every process kind (API server, embedded worker, Celery worker) does first: read the settings from
the environment and set up logging by them, in one place."""

from __future__ import annotations

import sys

from pydantic import ValidationError

from adapter_merge.core.logs import configure_logging
from adapter_merge.core.settings import Settings


def start_process(program: str) -> Settings:
    """The settings of this process; invalid ones end it with exit code 2 and a message naming them."""
    try:
        settings = Settings()
    except ValidationError as error:
        print(f"{program}: invalid settings:\n{error}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level, settings.log_format)
    return settings
