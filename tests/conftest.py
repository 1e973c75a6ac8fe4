"""Fixtures every test folder may use."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.redis_server import RedisServer, start_redis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """This session's own Redis (started on first use, once)."""
    try:
        server = start_redis(tmp_path_factory.mktemp("redis"))
    except RuntimeError as error:
        pytest.fail(str(error))
    yield server
    server.stop()
