"""The `Idempotency-Key` header of POST /merge (IETF draft-ietf-httpapi-idempotency-key-header): a client that
retries a submission with the same key gets the first answer again instead of a second job.

Per tenant, a key names one request body (compared as validated, so `"a"` and `{"ref": "a"}` are one adapter)
for `TTL_SECONDS`: the same body again is answered with the first answer's job (as it is now) and status
code; another body is a 422; a second request while the first is still being processed is a 409. A request
that fails (any problem) gives its key up, so that the client can retry it with the same key. The records live
in the job store, so every API process of a deployment agrees.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Annotated

from fastapi import Header

from adapter_merge.core.digest import canonical_json
from adapter_merge.core.problems import Problem, Problems
from adapter_merge.core.request import MergeRequest
from adapter_merge.core.store.base import IdempotencyRecord, JobStore

TTL_SECONDS = 24 * 3600.0
"""How long a key's answer is kept (the draft suggests 24 h as a minimum expiry)."""
FIELD = "Idempotency-Key"
IN_USE_RETRY_SECONDS = 1

IdempotencyKey = Annotated[str | None, Header(
    alias=FIELD, min_length=1, max_length=255, pattern=r"^[\x20-\x7e]+$",
    description="Any 1 to 255 printable ASCII characters, unique per submission (a UUID). Sent again with the "
    "same body within 24 h: the first answer again, no new job; with another body: 422; while the first is still "
    "being processed: 409.")]


class KeyedSubmission:
    """One submission under an idempotency key: `begin` it, then `settle` it with its answer or `abandon` it."""

    def __init__(self, store: JobStore, tenant: str, key: str, hold_seconds: float) -> None:
        self.store, self.tenant, self.key = store, tenant, key
        self.hold_seconds = hold_seconds
        """How long the key stays this request's while it is processed (a crashed API process gives it up then)."""
        self.owner = uuid.uuid4().hex

    def begin(self, body: MergeRequest) -> IdempotencyRecord | None:
        """None when this request is the key's first (go ahead); the earlier answer to replay; or a 422 / 409."""
        fingerprint = hashlib.sha256(canonical_json(body.model_dump(mode="json"))).hexdigest()
        earlier = self.store.claim_key(self.tenant, self.key, fingerprint, self.owner, self.hold_seconds)
        if earlier is None:
            return None
        if earlier.fingerprint != fingerprint:
            raise Problem(Problems.IDEMPOTENCY_KEY_REUSED, f"{FIELD}: this key was sent with another request body "
                          "in the last 24 h; use a new key for a new request", field=FIELD)
        if earlier.job_id is None:
            raise Problem(Problems.IDEMPOTENCY_KEY_IN_USE, f"{FIELD}: a request with this key is still being "
                          "processed; retry once it is answered", field=FIELD, retry_after=IN_USE_RETRY_SECONDS)
        return earlier

    def settle(self, job_id: str, status_code: int) -> None:
        self.store.settle_key(self.tenant, self.key, self.owner, job_id, status_code, TTL_SECONDS)

    def abandon(self) -> None:
        self.store.release_key(self.tenant, self.key, self.owner)
