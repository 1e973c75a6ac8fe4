"""Publishing to S3 and S3-compatible stores: the merged folder under `s3://BUCKET/PREFIX/`, its manifest last.

The readers' contract: a prefix holds a complete model once `PREFIX/merge_manifest.json` exists, and never before.
The manifest goes up last, with `If-None-Match: *`: the first publish to complete wins, and a 412 tells a later one
that the prefix is taken (by this request's model: that publish is the result; by another: `publish-conflict`).
`merge_lineage.json` (the whole lineage) goes up just before it; every object carries the request digest, job id,
engine version and its own sha256 as metadata.

Before it writes anything into the prefix, a publish claims it: `PREFIX/.merge-publishing.json`, written with
`If-None-Match: *` and naming the request digest, so that publishers sharing no lock (two deployments, whose job
stores each keep one publish per target) cannot interleave two models' files. Another request's claim is a
`publish-conflict`; this request's (an attempt that died, or an identical request elsewhere) is taken over. The
claim is deleted when the publish ends; one left by a publisher that died keeps other models out until its own
request is published again or someone deletes it.

Every object is sent with a SHA256 checksum that S3 verifies on receipt (per part for a multipart upload, whose
object checksum is then one of the part checksums, `...-N`), computed from the bytes as they are read and compared
with the job's sha256 of the file, so what S3 stores is what the merge wrote. A crashed earlier attempt may have
left multipart uploads open under the prefix: they are aborted once the claim is taken (unless it was an identical
request's, whose publish may still be running); objects it completed with the same sha256 and request digest are
not sent again.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from functools import cached_property
from pathlib import Path
from typing import IO, Any

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

from adapter_merge.core.jobs import Published
from adapter_merge.core.problems import Problem, Problems
from adapter_merge.core.publish.base import ALIAS_FIELD, LINEAGE_FILE, TO_FIELD, ByteCounter, Lineage
from adapter_merge.core.refs import BadReference
from adapter_merge.core.request import PublishSpec
from adapter_merge.core.settings import Settings
from adapter_merge.core.sources.base import RegistryUnavailable
from adapter_merge.core.sources.s3 import FORBIDDEN_CODES, error_code, parse, reason, s3_client, transient
from adapter_merge.worker.engine.folder_survey import MANIFEST_FILE

MAX_PARTS = 10_000
"""S3's limit of parts per upload: a file too large for the configured part size gets larger parts."""
CLAIM_FILE = ".merge-publishing.json"
"""Under the prefix while a publish writes into it: the request that claimed it (see `S3Target._claim`)."""
CLAIM_ATTEMPTS = 3
"""Claims tried while other publishers' claims keep appearing and going away before ours is taken."""
DIGEST = "request-digest"
SHA256 = "sha256"
"""Object metadata keys (sent as x-amz-meta-*)."""


class S3Target:
    scheme = "s3"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.part_bytes = settings.publish_part_bytes
        self.threads = settings.publish_threads

    @cached_property
    def client(self) -> Any:
        """Built on first use: checking a request at submission needs none (and a client costs ~0.2 s)."""
        return s3_client(self.settings, self.threads)

    def check(self, spec: PublishSpec, field: str) -> None:
        _, prefix = parse(spec.to, field)
        if not prefix:
            raise BadReference(field, spec.to, Problems.REFERENCE_INVALID, "names a bucket's root: publish under a "
                               "prefix of its own (s3://BUCKET/PREFIX)")
        if spec.alias is not None:
            raise BadReference(ALIAS_FIELD, spec.alias, Problems.REFERENCE_INVALID, "applies to models:/ targets "
                               "only")

    def find(self, spec: PublishSpec, lineage: Lineage) -> Published | None:
        """The prefix's manifest, if there is one: this request's model (by its digest), or a conflict."""
        bucket, prefix = parse(spec.to, TO_FIELD)
        key = f"{prefix}/{MANIFEST_FILE}"
        try:
            head = self.client.head_object(Bucket=bucket, Key=key)
        except ClientError as error:
            if error_code(error)[1] == 404:
                return None
            raise _problem(error, spec) from None
        except BotoCoreError as error:
            raise _problem(error, spec) from None
        found = head.get("Metadata", {}).get(DIGEST)
        if found != lineage.request_digest:
            raise Problem(Problems.PUBLISH_CONFLICT, f"{TO_FIELD}: {spec.to!r} already holds another model (request "
                          f"digest {found or 'unknown'}); publish to a prefix of its own, or delete that one first",
                          field=TO_FIELD, ref=spec.to)
        return Published(uri=spec.to, version=head.get("VersionId") or head["ETag"].strip('"'),
                         url=f"s3://{bucket}/{key}")

    def publish(self, spec: PublishSpec, folder: Path, lineage: Lineage, progress: ByteCounter) -> Published:
        bucket, prefix = parse(spec.to, TO_FIELD)
        metadata = {DIGEST: lineage.request_digest, "job-id": lineage.job_id,
                    "engine-version": lineage.engine_version, "lineage": LINEAGE_FILE}
        lineage_json = lineage.model_dump_json(indent=2).encode()
        try:
            if self._claim(spec, bucket, prefix, metadata):
                self._abort_open_uploads(bucket, prefix)
            try:
                self._upload_all(bucket, prefix, folder, lineage, lineage_json, metadata, progress)
            finally:  # a crash keeps the claim, which the request's rerun takes over
                with suppress(BotoCoreError, ClientError):
                    self.client.delete_object(Bucket=bucket, Key=f"{prefix}/{CLAIM_FILE}")
        except (BotoCoreError, ClientError) as error:
            raise _problem(error, spec) from None
        found = self.find(spec, lineage)  # ours, or an earlier identical publish's (412): raises on another model
        if found is None:
            raise Problem(Problems.PUBLISH_FAILED, f"{TO_FIELD}: {spec.to!r}: the manifest vanished right after it "
                          "was written (deleted meanwhile?)", field=TO_FIELD, ref=spec.to)
        return found

    def _claim(self, spec: PublishSpec, bucket: str, prefix: str, metadata: dict[str, str]) -> bool:
        """Claim the prefix for this request before writing into it, with a conditional write S3 decides, so that
        publishers that share no lock (two deployments) cannot interleave two models' files: a claim with another
        request digest is a `publish-conflict`; one with this digest (a crashed attempt's, or an identical
        request's elsewhere) is taken over, since the files it leads to are the same.

        Whether the multipart uploads open under the prefix are orphans to abort: yes for a claim of our own making
        or of this job's earlier attempt; no for an identical request's, whose publish may be running."""
        key = f"{prefix}/{CLAIM_FILE}"
        body = json.dumps({"request_digest": metadata[DIGEST], "job_id": metadata["job-id"]}).encode()
        for _ in range(CLAIM_ATTEMPTS):
            try:
                self.client.put_object(Bucket=bucket, Key=key, Body=body, Metadata=metadata, IfNoneMatch="*")
                return True
            except ClientError as error:
                if error_code(error)[1] != 412:
                    raise
            try:
                holder = self.client.head_object(Bucket=bucket, Key=key).get("Metadata", {})
            except ClientError as error:
                if error_code(error)[1] != 404:
                    raise
                continue  # released between the two requests: claim it again
            if holder.get(DIGEST) == metadata[DIGEST]:
                return holder.get("job-id") == metadata["job-id"]
            raise Problem(Problems.PUBLISH_CONFLICT, f"{TO_FIELD}: {spec.to!r} is being published by another request "
                          f"(digest {holder.get(DIGEST) or 'unknown'}, job {holder.get('job-id') or 'unknown'}); if "
                          f"that publish died, delete {key!r} to free the prefix", field=TO_FIELD, ref=spec.to)
        raise Problem(Problems.PUBLISH_FAILED, f"{TO_FIELD}: {spec.to!r} could not be claimed: its claim {key!r} "
                      f"came and went {CLAIM_ATTEMPTS} times (other publishers keep taking it)", field=TO_FIELD,
                      ref=spec.to)

    def _upload_all(self, bucket: str, prefix: str, folder: Path, lineage: Lineage, lineage_json: bytes,
                    metadata: dict[str, str], progress: ByteCounter) -> None:
        """The merged files, then the lineage, then the manifest (first publish to complete wins)."""
        for path, sha256 in sorted(lineage.manifest_sha256.items()):
            if path != MANIFEST_FILE:
                with open(folder / path, "rb") as source:
                    self._upload(bucket, f"{prefix}/{path}", source, sha256, metadata, progress)
        self._upload(bucket, f"{prefix}/{LINEAGE_FILE}", io.BytesIO(lineage_json),  # not a merged file:
                     hashlib.sha256(lineage_json).hexdigest(), metadata, lambda count: None)  # not counted
        with open(folder / MANIFEST_FILE, "rb") as source:
            try:
                self._upload(bucket, f"{prefix}/{MANIFEST_FILE}", source, lineage.manifest_sha256[MANIFEST_FILE],
                             metadata, progress, IfNoneMatch="*")
            except ClientError as error:
                if error_code(error)[1] != 412:
                    raise

    # -- uploads ----------------------------------------------------------------------------------------------------

    def _abort_open_uploads(self, bucket: str, prefix: str) -> None:
        """What a crashed attempt left open under the prefix: never completed, invisible, but stored and billed."""
        for upload in self._open_uploads(bucket, prefix):
            with suppress(ClientError):  # finished or aborted meanwhile
                self.client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])

    def _open_uploads(self, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
        for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
            yield from page.get("Uploads", [])

    def _upload(self, bucket: str, key: str, source: IO[bytes], sha256: str, metadata: dict[str, str],
                progress: ByteCounter, **conditions: str) -> None:
        """One object, unless an earlier attempt of the same request stored it complete already."""
        size = source.seek(0, io.SEEK_END)
        source.seek(0)
        metadata = {**metadata, SHA256: sha256}
        if not conditions and self._stored(bucket, key, size, metadata):
            progress(size)
            return
        if size <= self.part_bytes or conditions:  # a conditional write is one PutObject (up to 5 GB)
            self._put(bucket, key, source.read(), sha256, metadata, conditions)
            progress(size)
        else:
            self._multipart(bucket, key, source, size, sha256, metadata, progress)

    def _stored(self, bucket: str, key: str, size: int, metadata: dict[str, str]) -> bool:
        try:
            head = self.client.head_object(Bucket=bucket, Key=key)
        except ClientError as error:
            if error_code(error)[1] == 404:
                return False
            raise
        stored = head.get("Metadata", {})
        return head["ContentLength"] == size and all(stored.get(name) == metadata[name] for name in (SHA256, DIGEST))

    def _put(self, bucket: str, key: str, data: bytes, sha256: str, metadata: dict[str, str],
             conditions: dict[str, str]) -> None:
        _check_same(key, hashlib.sha256(data).hexdigest(), sha256)
        checksum = _base64(bytes.fromhex(sha256))
        answer = self.client.put_object(Bucket=bucket, Key=key, Body=data, ChecksumAlgorithm="SHA256",
                                        ChecksumSHA256=checksum, Metadata=metadata, **conditions)
        _check_checksum(key, answer.get("ChecksumSHA256"), checksum)

    def _multipart(self, bucket: str, key: str, source: IO[bytes], size: int, sha256: str, metadata: dict[str, str],
                   progress: ByteCounter) -> None:
        """Parts read in order (hashed whole and per part), `threads` of them in flight; aborted on any failure,
        a cancelled job's included, so no upload is left open."""
        part_bytes = max(self.part_bytes, -(-size // MAX_PARTS))
        upload_id = self.client.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm="SHA256",
                                                        Metadata=metadata)["UploadId"]
        try:
            whole, digests, parts = hashlib.sha256(), [], []
            in_flight: deque[tuple[Future[dict[str, Any]], int]] = deque()
            with ThreadPoolExecutor(self.threads, thread_name_prefix="s3-part") as pool:
                try:
                    while chunk := source.read(part_bytes):
                        whole.update(chunk)
                        digests.append(hashlib.sha256(chunk).digest())
                        in_flight.append((pool.submit(self._part, bucket, key, upload_id, len(digests), chunk,
                                                      _base64(digests[-1])), len(chunk)))
                        while len(in_flight) >= self.threads:
                            parts.append(_sent(in_flight.popleft(), progress))
                    while in_flight:
                        parts.append(_sent(in_flight.popleft(), progress))
                finally:
                    pool.shutdown(cancel_futures=True)
            _check_same(key, whole.hexdigest(), sha256)
            self.client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                                  MultipartUpload={"Parts": parts})
        except BaseException:
            with suppress(BotoCoreError, ClientError):
                self.client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            raise
        stored = self.client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED").get("ChecksumSHA256")
        _check_checksum(key, (stored or "").split("-")[0] or None, _base64(hashlib.sha256(b"".join(digests)).digest()))

    def _part(self, bucket: str, key: str, upload_id: str, number: int, chunk: bytes,
              checksum: str) -> dict[str, Any]:
        answer = self.client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=chunk,
                                         ChecksumAlgorithm="SHA256", ChecksumSHA256=checksum)
        _check_checksum(f"{key} part {number}", answer.get("ChecksumSHA256"), checksum)
        return {"PartNumber": number, "ETag": answer["ETag"], "ChecksumSHA256": checksum}


def _sent(entry: tuple[Future[dict[str, Any]], int], progress: ByteCounter) -> dict[str, Any]:
    future, size = entry
    part = future.result()
    progress(size)
    return part


def _base64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _check_same(key: str, read: str, merged: str) -> None:
    """The bytes read for upload are the bytes the merge wrote (its sha256 in the job's artifacts)."""
    if read != merged:
        raise Problem(Problems.PUBLISH_FAILED, f"{TO_FIELD}: {key!r} was not published: the merged file changed on "
                      f"the server's disk since it was written (sha256 {read}, the merge wrote {merged})",
                      field=TO_FIELD)


def _check_checksum(what: str, stored: str | None, sent: str) -> None:
    """S3 answers with the checksum it computed of what it received."""
    if stored != sent:
        raise Problem(Problems.PUBLISH_FAILED, f"{TO_FIELD}: {what!r}: S3 stored SHA256 checksum {stored or 'none'}, "
                      f"not the {sent} sent", field=TO_FIELD)


def _problem(error: Exception, spec: PublishSpec) -> Problem:
    """An S3 failure while publishing: a registry out of reach is a 503 (try again); a refusal is publish-failed."""
    if transient(error):
        return RegistryUnavailable(TO_FIELD, spec.to, reason(error))
    why = f"S3 refused it ({reason(error)})"
    if isinstance(error, NoCredentialsError | PartialCredentialsError):
        why = "the service has no AWS credentials"
    elif isinstance(error, ClientError):
        code, status = error_code(error)
        if code == "NoSuchBucket":
            why = "its bucket does not exist"
        elif code in FORBIDDEN_CODES or status in (401, 403):
            why = f"S3 refused the service's credentials ({reason(error)})"
    return Problem(Problems.PUBLISH_FAILED, f"{TO_FIELD}: {spec.to!r} could not be published: {why}",
                   field=TO_FIELD, ref=spec.to)
