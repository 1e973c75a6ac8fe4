"""Distributed-mode job store: one JSON document per job in Redis plus sorted sets (by creation time) of all
jobs and of each status, overall and per tenant.

Changes use WATCH/MULTI (optimistic transactions) so the API, many workers and many reapers can race on
the same job and exactly one of them wins each transition. Lease expiry is judged by the Redis server's
clock (TIME), so skew between worker hosts cannot make a live job look dead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Collection
from typing import TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from adapter_merge.core.jobs import ACTIVE_STATUSES, FINISHED_STATUSES, JobRecord, JobStatus
from adapter_merge.core.store.base import Change, Cursor, IdempotencyRecord, JobStore, QuotaExceeded

_T = TypeVar("_T")
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
"""Take or renew a lock (by the Redis server's clock: its key expires); 0 while another owner holds it."""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_CLAIM_KEY = """
local record = redis.call('GET', KEYS[1])
if record then return record end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""
"""An idempotency key's live record, or nil once it is the caller's (expired records are gone: EXPIRE)."""
_SETTLE_KEY = """
local record = redis.call('GET', KEYS[1])
if not record then return 0 end
local fields = cjson.decode(record)
if fields['owner'] ~= ARGV[1] or fields['job_id'] ~= cjson.null then return 0 end
if ARGV[2] == '' then return redis.call('DEL', KEYS[1]) end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""
"""Replace (or with an empty record, delete) a key's record still being processed by ARGV[1]."""


class RedisJobStore(JobStore):
    def __init__(self, url: str, prefix: str) -> None:
        # A refused or reset connection is tried twice more within ~0.3 s, then reported: callers retry at their
        # own pace (a heartbeat every poll interval, a reaper every pass), so no call sleeps through the store's
        # return, as redis-py's default backoff (seconds) would.
        self.redis = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=15, socket_connect_timeout=5, health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), retries=2),
        )
        self.prefix = prefix

    def _job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def _status_key(self, status: JobStatus, tenant: str | None = None) -> str:
        scope = f"{self.prefix}:tenant:{tenant}" if tenant is not None else self.prefix
        return f"{scope}:status:{JobStatus(status).value}"

    def _all_key(self, tenant: str | None = None) -> str:
        return f"{self.prefix}:tenant:{tenant}:jobs" if tenant is not None else f"{self.prefix}:jobs"

    def _digest_key(self, tenant: str, digest: str) -> str:
        """The tenant's jobs of one request digest (a sorted set by creation time, kept by create and delete)."""
        return f"{self.prefix}:tenant:{tenant}:digest:{digest}"

    def _idempotency_key(self, tenant: str, key: str) -> str:
        """Hashed: a client's key may hold any printable text, ':' included."""
        name = hashlib.sha256(json.dumps([tenant, key]).encode()).hexdigest()
        return f"{self.prefix}:idempotency:{name}"

    def _webhooks_key(self) -> str:
        """Jobs whose callback is pending, scored by when its next attempt is due (`due_webhooks`)."""
        return f"{self.prefix}:webhooks:due"

    def _index_webhook(self, pipe: redis.client.Pipeline, job: JobRecord) -> None:
        due = self.webhook_due(job)
        if due is None:
            pipe.zrem(self._webhooks_key(), job.id)
        else:
            pipe.zadd(self._webhooks_key(), {job.id: due})

    def _index(self, pipe: redis.client.Pipeline, job: JobRecord) -> None:
        """Queue the writes that list `job` under its status and tenant."""
        score = {job.id: job.created_at.timestamp()}
        for tenant in (None, job.tenant):
            pipe.zadd(self._status_key(job.status, tenant), score)
            pipe.zadd(self._all_key(tenant), score)

    def _unindex(self, pipe: redis.client.Pipeline, job: JobRecord, status: JobStatus, everywhere: bool) -> None:
        for tenant in (None, job.tenant):
            pipe.zrem(self._status_key(status, tenant), job.id)
            if everywhere:
                pipe.zrem(self._all_key(tenant), job.id)

    def create(self, job: JobRecord, max_active: int | None = None) -> None:
        active_keys = [self._status_key(status, job.tenant) for status in ACTIVE_STATUSES]
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(*active_keys)
                    if max_active is not None:
                        active = sum(pipe.zcard(key) for key in active_keys)
                        if active >= max_active:
                            raise QuotaExceeded(job.tenant, active, max_active)
                    if pipe.exists(self._job_key(job.id)):
                        raise KeyError(f"job {job.id} already exists")
                    pipe.multi()
                    pipe.set(self._job_key(job.id), job.to_json())
                    self._index_webhook(pipe, job)
                    self._index(pipe, job)
                    if job.request_digest is not None:
                        pipe.zadd(self._digest_key(job.tenant, job.request_digest),
                                  {job.id: job.created_at.timestamp()})
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.redis.get(self._job_key(job_id))
        return JobRecord.from_json(raw) if raw else None

    def list(
        self, statuses: Collection[JobStatus] | None = None, limit: int = 50, offset: int = 0,
        oldest_first: bool = False, tenant: str | None = None,
    ) -> tuple[list[JobRecord], int]:
        keys = [self._all_key(tenant)] if statuses is None else [self._status_key(s, tenant) for s in set(statuses)]
        if not keys:
            return [], 0
        if len(keys) == 1:
            total = self.redis.zcard(keys[0])
            ids = self.redis.zrange(keys[0], offset, offset + limit - 1, desc=not oldest_first)
        else:
            scored = self.redis.zunion(keys, withscores=True)
            scored.sort(key=lambda item: (item[1], item[0]), reverse=not oldest_first)
            total = len(scored)
            ids = [job_id for job_id, _ in scored[offset:offset + limit]]
        if not ids:
            return [], total
        docs = self.redis.mget([self._job_key(job_id) for job_id in ids])
        return [JobRecord.from_json(doc) for doc in docs if doc], total

    def page_after(
        self, statuses: Collection[JobStatus] | None, tenant: str | None, oldest_first: bool, after: Cursor | None,
        limit: int,
    ) -> tuple[list[JobRecord], Cursor | None]:
        keys = [self._all_key(tenant)] if statuses is None else [self._status_key(s, tenant) for s in set(statuses)]
        if not keys:
            return [], None
        # Members of equal score are ordered by id, as the cursor compares them.
        if len(keys) == 1:
            scored = self._scored_after(keys[0], oldest_first, after, limit)
        else:
            scored = sorted(((score, job_id) for job_id, score in self.redis.zunion(keys, withscores=True)),
                            reverse=not oldest_first)
            scored = [item for item in scored if after is None or _beyond(item, after, oldest_first)][:limit]
        docs = self.redis.mget([self._job_key(job_id) for _, job_id in scored]) if scored else []
        cursor = scored[-1] if len(scored) == limit else None
        return [JobRecord.from_json(doc) for doc in docs if doc], cursor

    def _scored_after(self, key: str, oldest_first: bool, after: Cursor | None, limit: int) -> list[Cursor]:
        """Up to `limit` (score, id) of one sorted set after `after`: from its score on (members sharing it
        with the cursor that come before or at it are skipped, a batch at a time)."""
        start: float | str = after[0] if after is not None else ("-inf" if oldest_first else "+inf")
        end = "+inf" if oldest_first else "-inf"
        found: list[Cursor] = []
        offset = 0
        while len(found) < limit:
            batch = self.redis.zrange(key, start, end, desc=not oldest_first, byscore=True, offset=offset,
                                      num=limit, withscores=True)
            found += [(score, job_id) for job_id, score in batch
                      if after is None or _beyond((score, job_id), after, oldest_first)]
            if len(batch) < limit:
                break
            offset += len(batch)
        return found[:limit]

    def _transact(self, job_id: str, body: Callable[[redis.client.Pipeline, JobRecord], _T | None]) -> _T | None:
        """Run `body` on the job's current record in a WATCH/MULTI transaction, retried when another client
        changed the record meanwhile. `body` queues its writes after `pipe.multi()` and returns the result,
        or returns None to leave the record alone; a missing job is None too."""
        key = self._job_key(job_id)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        return None
                    result = body(pipe, JobRecord.from_json(raw))
                    if result is None:
                        pipe.unwatch()
                        return None
                    pipe.execute()
                    return result
                except redis.WatchError:
                    continue

    def update(self, job_id: str, change: Change, durable: bool = True) -> JobRecord | None:
        # Every write is as durable as the Redis server's own persistence settings make it.
        def write(pipe: redis.client.Pipeline, old: JobRecord) -> JobRecord | None:
            new = change(old, _seconds(pipe.time()))
            if new is None:
                return None
            pipe.multi()
            pipe.set(self._job_key(job_id), new.to_json())
            self._index_webhook(pipe, new)
            if new.status is not old.status:
                self._unindex(pipe, old, old.status, everywhere=False)
                self._index(pipe, new)
            return new

        return self._transact(job_id, write)

    def delete(self, job_id: str, only: Collection[JobStatus] = FINISHED_STATUSES) -> bool:
        def remove(pipe: redis.client.Pipeline, job: JobRecord) -> bool | None:
            if job.status not in only:
                return None
            pipe.multi()
            pipe.delete(self._job_key(job_id))
            pipe.zrem(self._webhooks_key(), job_id)
            self._unindex(pipe, job, job.status, everywhere=True)
            if job.request_digest is not None:
                pipe.zrem(self._digest_key(job.tenant, job.request_digest), job_id)
            return True

        return bool(self._transact(job_id, remove))

    def with_digest(self, tenant: str, digest: str, statuses: Collection[JobStatus]) -> list[JobRecord]:
        ids = self.redis.zrange(self._digest_key(tenant, digest), 0, -1, desc=True)
        docs = self.redis.mget([self._job_key(job_id) for job_id in ids]) if ids else []
        jobs = [JobRecord.from_json(doc) for doc in docs if doc]
        return [job for job in jobs if job.status in statuses]

    def claim_key(self, tenant: str, key: str, fingerprint: str, owner: str,
                  hold_seconds: float) -> IdempotencyRecord | None:
        record = json.dumps(dataclasses.asdict(IdempotencyRecord(fingerprint, owner)))
        found = self.redis.eval(_CLAIM_KEY, 1, self._idempotency_key(tenant, key), record, _millis(hold_seconds))
        return IdempotencyRecord(**json.loads(found)) if found else None

    def settle_key(self, tenant: str, key: str, owner: str, job_id: str, status_code: int,
                   ttl_seconds: float) -> None:
        record = self.redis.get(self._idempotency_key(tenant, key))
        if record is None:
            return
        settled = dataclasses.replace(IdempotencyRecord(**json.loads(record)), job_id=job_id, status_code=status_code)
        self.redis.eval(_SETTLE_KEY, 1, self._idempotency_key(tenant, key), owner,
                        json.dumps(dataclasses.asdict(settled)), _millis(ttl_seconds))

    def release_key(self, tenant: str, key: str, owner: str) -> None:
        self.redis.eval(_SETTLE_KEY, 1, self._idempotency_key(tenant, key), owner, "", 0)

    def due_webhooks(self, now: float, limit: int) -> list[str]:
        return self.redis.zrange(self._webhooks_key(), "-inf", now, byscore=True, offset=0, num=limit)

    def _lock_key(self, name: str) -> str:
        return f"{self.prefix}:lock:{name}"

    def acquire_lock(self, name: str, owner: str, seconds: float) -> bool:
        taken = self.redis.eval(_ACQUIRE, 1, self._lock_key(name), owner, _millis(seconds))
        return bool(taken)

    def release_lock(self, name: str, owner: str) -> None:
        self.redis.eval(_RELEASE, 1, self._lock_key(name), owner)

    def worker_seen(self, worker: str, seconds: float) -> None:
        """A sorted set of workers scored by when they stop counting as alive (Redis' clock)."""
        now = self.now()
        with self.redis.pipeline() as pipe:
            pipe.zremrangebyscore(f"{self.prefix}:workers", "-inf", now)
            pipe.zadd(f"{self.prefix}:workers", {worker: now + seconds})
            pipe.execute()

    def live_workers(self) -> list[str]:
        return sorted(self.redis.zrangebyscore(f"{self.prefix}:workers", f"({self.now()}", "+inf"))

    def now(self) -> float:
        return _seconds(self.redis.time())

    def ping(self) -> None:
        self.redis.ping()

    def close(self) -> None:
        self.redis.close()


def _beyond(item: Cursor, after: Cursor, oldest_first: bool) -> bool:
    return item > after if oldest_first else item < after


def _millis(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _seconds(redis_time: tuple[int, int]) -> float:
    seconds, micros = redis_time
    return seconds + micros / 1e6
