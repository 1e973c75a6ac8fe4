"""S3 and S3-compatible stores: `s3://BUCKET/PREFIX`, the objects under the prefix as one folder.

Pinned to every object under the prefix as it is at submit time: its size, ETag, version id (versioned buckets)
and, when S3 vouches for it, its sha256 (the full-object SHA256 checksum of a single-part upload; a multipart
upload's checksum is one of part checksums, and its ETag no MD5, so neither is the file's). Every read names the
pinned ETag (`IfMatch`) and version, so an object replaced after submission is an error, not other bytes.

boto3 rather than obstore: botocore's retry modes and timeouts are the documented knobs for exactly what this
needs, it reads the ecosystem's own configuration (AWS_ENDPOINT_URL[_S3], AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
/ AWS_SESSION_TOKEN, profiles and instance roles, AWS_DEFAULT_REGION, AWS_CA_BUNDLE), and moto, which the tests
run, emulates exactly what boto3 sends.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

from adapter_merge.core.problems import Problem, Problems
from adapter_merge.core.refs import MAX_DEPTH, MAX_ENTRIES, BadReference
from adapter_merge.core.settings import Settings
from adapter_merge.core.sources.base import PinnedFile, PinnedInput, RegistryUnavailable, listed_file
from adapter_merge.core.sources.transfer import (
    StreamedSource,
    fetch_failed,
    range_header,
)

PREFIX = "s3://"
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
"""S3's bucket naming rules (lowercase letters, digits, dots and hyphens, 3 to 63 characters)."""
HEAD_THREADS = 8
CHUNK_BYTES = 1 << 20
FORBIDDEN_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                             "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "AccountProblem"})
TRANSIENT_CODES = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling"})


class S3Source(StreamedSource):
    scheme = "s3"
    STREAM_ERRORS = (BotoCoreError,)

    def __init__(self, settings: Settings) -> None:
        self.client = s3_client(settings, HEAD_THREADS)
        self.retries = settings.download_retries

    # -- pin ----------------------------------------------------------------------------------------------------

    def pin(self, ref: str, field: str) -> PinnedInput:
        bucket, prefix = parse(ref, field)
        try:
            keys = self._keys(bucket, prefix, field, ref)
            with ThreadPoolExecutor(HEAD_THREADS) as pool:
                heads = list(pool.map(lambda key: self.client.head_object(Bucket=bucket, Key=key,
                                                                          ChecksumMode="ENABLED"), keys))
        except (BotoCoreError, ClientError) as error:
            raise _pin_problem(error, field, ref) from None
        files = [_pinned_file(key[len(prefix) + 1 if prefix else 0:], key, head, field, ref)
                 for key, head in zip(keys, heads, strict=True)]
        listing = json.dumps(sorted((file.location, file.size, file.etag, file.version_id) for file in files))
        version = {"bucket": bucket, "prefix": prefix, "listing": hashlib.sha256(listing.encode()).hexdigest()}
        return PinnedInput(ref=ref, scheme=self.scheme, version=version, files=files)

    def _keys(self, bucket: str, prefix: str, field: str, ref: str) -> list[str]:
        """Every object key under the prefix (folder markers left out), at most as many as a local folder may
        hold."""
        keys = []
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                      Prefix=f"{prefix}/" if prefix else "")
        for page in pages:
            keys += [item["Key"] for item in page.get("Contents", []) if not item["Key"].endswith("/")]
            if len(keys) > MAX_ENTRIES:
                raise BadReference(field, ref, Problems.REFERENCE_INVALID, f"holds more than {MAX_ENTRIES} objects")
        if not keys:
            raise BadReference(field, ref, Problems.REFERENCE_NOT_FOUND, "has no objects under its prefix")
        return keys

    # -- bytes --------------------------------------------------------------------------------------------------

    @contextmanager
    def open_stream(self, pinned: PinnedInput, file: PinnedFile, first: int, last: int | None, *,
                    reading: bool) -> Iterator[Iterator[bytes]]:
        """A GetObject of the pinned version, on condition that it still has the pinned ETag (botocore retries
        the request itself)."""
        conditions = {"IfMatch": f'"{file.etag}"'} if file.etag else {}
        if file.version_id:
            conditions["VersionId"] = file.version_id
        try:
            body = self.client.get_object(Bucket=pinned.version["bucket"], Key=file.location, **conditions,
                                          **range_header(first, last))["Body"]
        except (BotoCoreError, ClientError) as error:
            raise _fetch_failed(error, pinned, file, reading) from None
        try:
            yield body.iter_chunks(CHUNK_BYTES)
        finally:
            body.close()

    def describe(self, error: Exception) -> str:
        return reason(error)


def s3_client(settings: Settings, threads: int) -> Any:
    """A boto3 S3 client with the service's timeouts and retries (botocore's standard mode), from the ecosystem's own
    configuration, with a connection per thread that uses it (`threads`). Built per source or target: a client is
    thread-safe, and costs a few hundred ms to build."""
    timeout = settings.download_timeout_seconds
    config = Config(connect_timeout=timeout, read_timeout=timeout,
                    retries={"max_attempts": settings.download_retries + 1, "mode": "standard"},
                    max_pool_connections=max(10, threads))
    return boto3.session.Session().client("s3", config=config)


def parse(ref: str, field: str) -> tuple[str, str]:
    """(bucket, prefix without its trailing slash) of an `s3://` reference."""
    bucket, _, prefix = ref.removeprefix(PREFIX).partition("/")
    prefix = prefix.rstrip("/")
    if not ref.startswith(PREFIX) or not BUCKET_NAME.fullmatch(bucket) or ".." in bucket:
        raise BadReference(field, ref, Problems.REFERENCE_INVALID, "is not an S3 reference (s3://BUCKET/PREFIX, "
                           "BUCKET named by S3's rules)")
    if prefix and any(part in ("", ".", "..") or "\x00" in part for part in prefix.split("/")):
        raise BadReference(field, ref, Problems.REFERENCE_INVALID, "has a prefix that is not a folder path (an "
                           "empty, '.' or '..' part)")
    return bucket, prefix


def _pinned_file(path: str, key: str, head: dict[str, Any], field: str, ref: str) -> PinnedFile:
    """One object as pinned; one nested deeper than a local folder may be makes the prefix unusable."""
    if path.count("/") >= MAX_DEPTH:
        raise BadReference(field, ref, Problems.REFERENCE_INVALID, f"holds {path!r}, nested deeper than {MAX_DEPTH}")
    etag = head["ETag"].strip('"')
    return listed_file(field, ref, path=path, size=head["ContentLength"], sha256=_full_object_sha256(head, etag),
                       etag=etag, md5=_content_md5(head, etag), version_id=head.get("VersionId"), location=key)


def _content_md5(head: dict[str, Any], etag: str) -> str | None:
    """An S3 ETag is the content's MD5 only for a single-part upload stored without KMS or customer keys."""
    encrypted = head.get("ServerSideEncryption") == "aws:kms" or head.get("SSECustomerAlgorithm")
    single_part = len(etag) == 32 and all(c in "0123456789abcdef" for c in etag)
    return etag if single_part and not encrypted else None


def _full_object_sha256(head: dict[str, Any], etag: str) -> str | None:
    """The object's own sha256, if S3 has it: a SHA256 checksum of the full object from a single-part upload."""
    checksum = head.get("ChecksumSHA256")
    if not checksum or "-" in checksum or "-" in etag or head.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":
        return None
    try:
        digest = base64.b64decode(checksum, validate=True)
    except binascii.Error:
        return None
    return digest.hex() if len(digest) == 32 else None


def error_code(error: ClientError) -> tuple[str, int]:
    """The S3 error code and HTTP status of a refusal."""
    return (str(error.response.get("Error", {}).get("Code", "")),
            int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)))


def transient(error: Exception) -> bool:
    """A failure that retries might have mended (and botocore did retry): no answer, or a busy or failing S3."""
    if isinstance(error, ClientError):
        code, status = error_code(error)
        return code in TRANSIENT_CODES or status >= 500 or status == 429
    return isinstance(error, BotoCoreError) and not isinstance(error, NoCredentialsError | PartialCredentialsError)


def reason(error: Exception) -> str:
    """Why a request failed, naming no endpoint or credential."""
    if isinstance(error, ClientError):
        code, status = error_code(error)
        return f"{code or 'HTTP'} {status}"
    return type(error).__name__


def _pin_problem(error: Exception, field: str, ref: str) -> Problem:
    if isinstance(error, NoCredentialsError | PartialCredentialsError):
        return BadReference(field, ref, Problems.REFERENCE_FORBIDDEN, "cannot be read: the service has no AWS "
                            "credentials")
    if transient(error):
        return RegistryUnavailable(field, ref, reason(error))
    if isinstance(error, ClientError):
        code, status = error_code(error)
        if code == "NoSuchBucket":
            return BadReference(field, ref, Problems.REFERENCE_NOT_FOUND, "names a bucket that does not exist")
        if code in FORBIDDEN_CODES or status in (401, 403):
            return BadReference(field, ref, Problems.REFERENCE_FORBIDDEN, f"cannot be read: S3 refused the "
                                f"service's credentials ({reason(error)})")
        if status == 404:
            return RegistryUnavailable(field, ref, "its objects changed while they were listed")
    return BadReference(field, ref, Problems.REFERENCE_INVALID, f"was refused by S3 ({reason(error)})")


def _fetch_failed(error: Exception, pinned: PinnedInput, file: PinnedFile, reading: bool) -> Problem:
    status = error_code(error)[1] if isinstance(error, ClientError) else 0
    why = {412: "it changed since it was pinned", 404: "it is gone since it was pinned"}.get(status)
    return fetch_failed(pinned, file, why or reason(error), unreachable=reading and transient(error))
