"""S3 on 127.0.0.1: moto's threaded server, with every request it answers counted per bucket and key.

moto's server keeps no request log, and a proxy in front of it would have to get S3's streaming, chunked and
`Expect: 100-continue` uploads right. Instead the WSGI app that `ThreadedMotoServer` serves is wrapped, in
the server's own thread, by `_Counting` (a few lines of WSGI): the log sees exactly what moto saw, status
included. `S3Server` sets nothing global; what a process needs to reach it is `S3Server.env`.

boto3 talks path-style to an IP endpoint (`http://127.0.0.1:PORT/BUCKET/KEY`), so the key is in the path.
"""

from __future__ import annotations

import base64
import hashlib
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import boto3
from boto3.s3.transfer import TransferConfig
from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

from tests.registries.request_log import RequestLog, RequestRecord

REGION = "us-east-1"
ACCESS_KEY = "registry-tests"
SECRET_KEY = "registry-tests-secret"

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


@dataclass(frozen=True)
class S3Object:
    """An uploaded file, with what S3 said about it and our own sha256 of the local bytes."""

    key: str
    size: int
    sha256: str
    """Hex sha256 of the local file (S3's ETag is no content hash; its checksum of a multipart upload is a
    checksum of part checksums, "...-N")."""
    etag: str
    """As S3 answers it, quotes stripped."""
    checksum_sha256: str | None
    """S3's x-amz-checksum-sha256 (base64) from HEAD with ChecksumMode=ENABLED."""
    version_id: str | None
    """None unless the bucket is versioned."""


BUCKET_OPERATIONS = {
    ("GET", "versioning"): "GetBucketVersioning", ("PUT", "versioning"): "PutBucketVersioning",
    ("GET", "versions"): "ListObjectVersions", ("GET", "uploads"): "ListMultipartUploads",
    ("POST", "delete"): "DeleteObjects",
}


def s3_operation(method: str, key: str, query: dict[str, list[str]], copy_source: bool) -> str:
    """The S3 API operation of a path-style request, for the common ones (else "METHOD bucket|object")."""
    if not key.partition("/")[2]:  # the bucket itself
        for (verb, marker), operation in BUCKET_OPERATIONS.items():
            if verb == method and marker in query:
                return operation
        if method == "GET":
            return "ListObjectsV2" if query.get("list-type") == ["2"] else "ListObjects"
        return {"PUT": "CreateBucket", "HEAD": "HeadBucket", "DELETE": "DeleteBucket"}.get(method, f"{method} bucket")
    if method == "PUT":
        return "UploadPart" if "partNumber" in query else "CopyObject" if copy_source else "PutObject"
    if method == "POST":
        return "CreateMultipartUpload" if "uploads" in query else "CompleteMultipartUpload"
    return {"GET": "GetObject", "HEAD": "HeadObject", "DELETE": "DeleteObject"}.get(method, f"{method} object")


class _Counting:
    """WSGI middleware: one RequestRecord per request, its status set when moto starts the response."""

    def __init__(self, app: WSGIApp, log: RequestLog) -> None:
        self.app = app
        self.log = log

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        # PATH_INFO is decoded as latin-1 by WSGI; S3 keys are UTF-8.
        path = environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8", "replace")
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        key = path.lstrip("/")
        method = environ["REQUEST_METHOD"]
        kind = ("moto-api" if key.startswith("moto-api") else
                s3_operation(method, key, query, "HTTP_X_AMZ_COPY_SOURCE" in environ))
        record = self.log.add(RequestRecord(server="s3", method=method, path=path, query=query, key=key or None,
                                            kind=kind, range=environ.get("HTTP_RANGE"),
                                            authorization="HTTP_AUTHORIZATION" in environ))

        def counting_start_response(status: str, headers: Any, *args: Any) -> Any:
            record.status = int(status.split()[0])
            return start_response(status, headers, *args)

        return self.app(environ, counting_start_response)


class _QuietRequestHandler(MotoRequestHandler):
    """No access log on stderr: the RequestLog is the record."""

    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


class _CountingMotoServer(ThreadedMotoServer):
    """ThreadedMotoServer whose app is wrapped by `_Counting` (its `_server_entry` is eight lines; this is it
    with the wrapper, so the server's own start/stop/ready logic stays moto's)."""

    def __init__(self, log: RequestLog) -> None:
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self.log = log

    def _server_entry(self) -> None:
        app = _Counting(DomainDispatcherApplication(create_backend_app), self.log)
        self._server = make_server(self._ip_address, self._port, app, True, request_handler=_QuietRequestHandler)
        self._server_ready_event.set()
        self._server.serve_forever()


class S3Server:
    """moto's S3 on loopback: `endpoint_url`, `env`, `client()`, `requests`, and helpers to fill buckets."""

    def __init__(self) -> None:
        self.requests = RequestLog()
        self._server = _CountingMotoServer(self.requests)
        self.endpoint_url = ""
        self._client: Any = None

    def start(self) -> S3Server:
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        self._server.stop()

    @property
    def env(self) -> dict[str, str]:
        """What a process (the service, a worker, a monkeypatched test) needs to reach this S3 with boto3 or any
        SDK that reads AWS_ENDPOINT_URL; the instance metadata lookup is off so nothing leaves loopback."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION,
                "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self) -> Any:
        """A boto3 S3 client for this server (explicit arguments: reads no environment or ~/.aws); one, shared
        (boto3 clients are thread-safe, and building one costs a few hundred ms)."""
        if self._client is None:
            session = boto3.session.Session(aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                                            region_name=REGION)
            self._client = session.client("s3", endpoint_url=self.endpoint_url)
        return self._client

    def reset(self) -> None:
        """Forget every bucket (moto's reset API; the request log is kept)."""
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")).close()

    def create_bucket(self, bucket: str, *, versioned: bool = False) -> None:
        client = self.client()
        client.create_bucket(Bucket=bucket)
        if versioned:
            client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})

    def upload_folder(self, folder: Path, bucket: str, prefix: str, *,
                      multipart_threshold: int = 8 * 1024 * 1024) -> list[S3Object]:
        """Upload every file under `folder` to `s3://bucket/prefix/<relative path>` with SHA256 checksums
        (files over `multipart_threshold` go multipart, as boto3 does by default); return them sorted by key."""
        client = self.client()
        config = TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=max(
            multipart_threshold, 5 * 1024 * 1024))
        uploaded = []
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            key = f"{prefix.strip('/')}/{path.relative_to(folder).as_posix()}".lstrip("/")
            client.upload_file(str(path), bucket, key, ExtraArgs={"ChecksumAlgorithm": "SHA256"}, Config=config)
            head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
            uploaded.append(S3Object(key, head["ContentLength"], _sha256(path), head["ETag"].strip('"'),
                                     head.get("ChecksumSHA256"), head.get("VersionId")))
        return uploaded

    def gets(self, bucket: str, key: str, *, ranged: bool | None = False) -> int:
        """GetObject requests answered for `bucket/key` (200 whole, or 206 ranged with `ranged=True`; None: both)."""
        statuses = {False: (200,), True: (206,), None: (200, 206)}[ranged]
        return self.requests.count(method="GET", key=f"{bucket}/{key}", statuses=statuses)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_base64(hex_digest: str) -> str:
    """A hex sha256 as S3 writes checksums (base64 of the raw digest)."""
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()
