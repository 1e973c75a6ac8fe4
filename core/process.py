"""What every process kind (API server, embedded worker, Celery worker) does first: read the settings from
the environment and set up logging by them, in one place."""

from __future__ import annotations

import logging
import sys

from pydantic import ValidationError

from adapter_merge.core.settings import Settings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def start_process(program: str) -> Settings:
    """The settings of this process; invalid ones end it with exit code 2 and a message naming them."""
    try:
        settings = Settings()
    except ValidationError as error:
        print(f"{program}: invalid settings:\n{error}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    return settings
