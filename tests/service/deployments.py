"""A whole deployment for the reuse and Idempotency-Key tests, in either mode: embedded (`serve` with its own
worker, SQLite) or distributed (`serve` + one Celery worker on the session's Redis), with API keys for two
tenants, a client per tenant, and the job store the processes share (to look at, or to hold a lock in)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from adapter_merge.core.store import JobStore
from adapter_merge.core.store.local import SQLiteJobStore
from adapter_merge.core.store.redis import RedisJobStore
from tests.service.harness import Api, Proc, running_cluster, service_env, start_server
from tests.service.test_auth import bearer, write_keys

KEYS = {"a-submit": ("team-a", "submit"), "b-submit": ("team-b", "submit")}


@dataclass
class Deployment:
    mode: str
    api: Api
    """Tenant team-a's client."""
    other_tenant: Api
    """Tenant team-b's client."""
    store: JobStore
    processes: list[Proc]

    def log_text(self) -> str:
        return "".join(proc.log_text() for proc in self.processes)

    def key_taken(self, tenant: str, key: str) -> bool:
        """Whether the store holds a record of this idempotency key (looked at in the store's own layout)."""
        if isinstance(self.store, RedisJobStore):
            return bool(self.store.redis.exists(self.store._idempotency_key(tenant, key)))
        assert isinstance(self.store, SQLiteJobStore)
        with sqlite3.connect(self.store.path) as db:
            return db.execute("SELECT 1 FROM idempotency_keys WHERE tenant = ? AND key = ?", (tenant, key)
                              ).fetchone() is not None

    def post(self, body: dict, key: str | None = None, api: Api | None = None) -> httpx.Response:
        headers = {"Idempotency-Key": key} if key is not None else {}
        return (api or self.api).http.post("/merge", json=body, headers=headers)


def _client(api: Api, token: str) -> Api:
    api.http.headers.update(bearer(token))
    return api


@contextlib.contextmanager
def deployment(mode: str, data_dir: Path, models_root: Path, redis_namespace: dict[str, str] | None,
               **settings: str) -> Iterator[Deployment]:
    """`settings`: more MERGE_* variables for every process."""
    write_keys(data_dir / "keys.json", KEYS)
    env = service_env(data_dir, models_root, MERGE_AUTH="required", MERGE_API_KEYS_FILE=str(data_dir / "keys.json"),
                      **(redis_namespace or {}), **settings)
    if mode == "embedded":
        server, api = start_server(env, data_dir / "server.log")
        store: JobStore = SQLiteJobStore(data_dir / "jobs.sqlite3")
        other = _client(Api(api.base_url), "b-submit")
        try:
            yield Deployment(mode, _client(api, "a-submit"), other, store, [server])
        finally:
            other.close()
            api.close()
            server.stop()
        return
    assert redis_namespace is not None
    store = RedisJobStore(redis_namespace["MERGE_REDIS_URL"], redis_namespace["MERGE_REDIS_PREFIX"])
    with running_cluster(data_dir, env, [env]) as (server, api, workers):
        other = _client(Api(api.base_url), "b-submit")
        try:
            yield Deployment(mode, _client(api, "a-submit"), other, store, [server, *workers])
        finally:
            other.close()
            store.close()


def weighted(weight: float) -> dict:
    """The small merge with the DoRA adapter at `weight`: each test its own digest, so tests cannot reuse each
    other's results."""
    return {"base_model": "small/base", "adapters": ["small/lora", {"ref": "small/dora", "weight": weight}]}


def digests(job: dict) -> dict[str, str]:
    return {artifact["path"]: artifact["sha256"] for artifact in job["artifacts"]}
