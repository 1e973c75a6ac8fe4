"""Fixtures every test folder may use."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

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


@pytest.fixture(scope="module")
def redis_namespace(redis_server: RedisServer) -> Iterator[dict[str, str]]:
    """MERGE_* variables for a private namespace (key prefix and queue) in the session's Redis, removed
    afterwards, so the test modules sharing that Redis cannot see each other's jobs."""
    client = redis.Redis.from_url(redis_server.url())
    prefix = f"amtest-{uuid.uuid4().hex[:10]}"
    yield {"MERGE_REDIS_URL": redis_server.url(), "MERGE_REDIS_PREFIX": prefix, "MERGE_QUEUE": prefix}
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()
