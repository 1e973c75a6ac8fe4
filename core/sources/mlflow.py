"""MLflow model registry versions: `models:/NAME/VERSION` and `models:/NAME@ALIAS`.

Pinned to the version number, its run id and source: an alias moved after submission changes nothing. Its files
are the version's artifacts (recursively, with their sizes; MLflow keeps no checksums), or the one sub-folder
among them that holds the model or adapter (`config.json` or `adapter_config.json`), the layout that
`mlflow.transformers` and `log_artifacts(dir, "model")` leave. The bytes come through the tracking server's
artifact proxy (`/api/2.0/mlflow-artifacts/artifacts/...`, what `mlflow server` serves by default), which
honours `Range`: preflight reads safetensors headers without fetching the tensors.

The registry is asked through mlflow-skinny's own transport (`rest_utils.http_request`, with the credentials
and TLS settings the client reads: MLFLOW_TRACKING_URI, MLFLOW_TRACKING_TOKEN or _USERNAME/_PASSWORD,
MLFLOW_TRACKING_INSECURE_TLS, ...) rather than `MlflowClient`'s methods: those take their timeout and retries
only from MLFLOW_HTTP_REQUEST_* (120 s and 7 retries with doubling backoff by default, minutes per call), and
every request here must keep to the service's own timeout and retries. Tracking servers over HTTP(S) only.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote, urlsplit

import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import get_tracking_uri
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import MlflowHostCreds, http_request

from adapter_merge.core.problems import Problem, Problems
from adapter_merge.core.refs import ADAPTER_MARKER, BASE_MARKER, MAX_DEPTH, MAX_ENTRIES, BadReference
from adapter_merge.core.settings import Settings
from adapter_merge.core.sources.base import PinnedFile, PinnedInput, RegistryUnavailable, listed_file
from adapter_merge.core.sources.transfer import (
    StreamedSource,
    backoff_seconds,
    fetch_failed,
    range_header,
    skip_bytes,
)

REFERENCE = re.compile(r"models:/(?P<name>[^/@:\x00-\x1f]+)(?:/(?P<version>[1-9][0-9]*)|@(?P<alias>[\w-]+))")
"""Names hold no `/` or `:` (MLflow refuses them); versions are positive integers; aliases are word characters
and dashes."""
API = "/api/2.0/mlflow"
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"
PROXIED = "mlflow-artifacts"
MARKERS = (BASE_MARKER, ADAPTER_MARKER)
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_RETRIES = 10
"""MLflow's transport refuses more retries than this (_MLFLOW_HTTP_REQUEST_MAX_RETRIES_LIMIT)."""
CHUNK_BYTES = 1 << 20


class MlflowFailed(Exception):
    """A request that got no usable answer: `status` None when none came at all."""

    def __init__(self, status: int | None, code: str = "", reason: str = "") -> None:
        super().__init__(reason or f"HTTP {status} {code}".strip())
        self.status = status
        self.code = code


class MlflowSource(StreamedSource):
    scheme = "models"
    STREAM_ERRORS = (requests.RequestException,)

    def __init__(self, settings: Settings) -> None:
        self.rest = MlflowRest(settings)
        self.tracking_uri = self.rest.tracking_uri
        self.retries = settings.download_retries

    # -- pin ----------------------------------------------------------------------------------------------------

    def pin(self, ref: str, field: str) -> PinnedInput:
        match = REFERENCE.fullmatch(ref)
        if match is None:
            raise BadReference(field, ref, Problems.REFERENCE_INVALID, "is not an MLflow registry reference "
                               "(models:/NAME/VERSION or models:/NAME@ALIAS)")
        name, number, alias = match.group("name", "version", "alias")
        if urlsplit(self.tracking_uri).scheme not in ("http", "https"):
            raise RegistryUnavailable(field, ref, "MLFLOW_TRACKING_URI names no tracking server (http or https)")
        try:
            if alias:
                found = self.rest.json(f"{API}/registered-models/alias", {"name": name, "alias": alias})
            else:
                found = self.rest.json(f"{API}/model-versions/get", {"name": name, "version": number})
            version = found["model_version"]
            if version.get("status", "READY") != "READY":
                raise BadReference(field, ref, Problems.REFERENCE_NOT_FOUND, f"is version {version['version']}, "
                                   f"which is not ready (status {version['status']})")
            folder = self._artifact_folder(name, version, field, ref)
            files = self._files(folder, field, ref)
        except MlflowFailed as error:
            raise _pin_problem(error, field, ref, alias) from None
        if not files:
            raise BadReference(field, ref, Problems.REFERENCE_NOT_FOUND, f"is version {version['version']}, "
                               "which has no artifacts")
        pin = {"name": name, "version": str(version["version"]), "source": str(version.get("source", ""))}
        if version.get("run_id"):
            pin["run_id"] = str(version["run_id"])
        return PinnedInput(ref=ref, scheme=self.scheme, version=pin, files=files)

    def _artifact_folder(self, name: str, version: dict[str, Any], field: str, ref: str) -> str:
        """The version's artifacts as a path under the artifact proxy; MLflow resolves a logged model's source, a
        run's is resolved here (`runs:/RUN/PATH` -> the run's artifact root + PATH)."""
        uri = self.rest.json(f"{API}/model-versions/get-download-uri",
                             {"name": name, "version": version["version"]})["artifact_uri"]
        if uri.startswith("runs:/"):
            run_id, _, path = uri.removeprefix("runs:/").partition("/")
            root = self.rest.json(f"{API}/runs/get", {"run_id": run_id})["run"]["info"]["artifact_uri"]
            uri = posixpath.join(root, path) if path else root
        return self._proxied_path(uri, field, ref)

    def _proxied_path(self, uri: str, field: str, ref: str) -> str:
        """`mlflow-artifacts:/1/RUN/artifacts/model` -> `1/RUN/artifacts/model`; artifacts stored elsewhere
        (s3://, a path) are out of reach of a client that talks only to the tracking server."""
        path = proxied_path(uri, self.tracking_uri)
        if path is None:
            raise BadReference(field, ref, Problems.REFERENCE_INVALID, f"cannot be fetched: its artifacts are at a "
                               f"{urlsplit(uri).scheme or 'local'} location, not behind the tracking server's "
                               "artifact proxy (mlflow server --serve-artifacts)")
        return path

    def _files(self, folder: str, field: str, ref: str) -> list[PinnedFile]:
        """The artifacts under `folder`, or under its one sub-folder that holds a model or an adapter."""
        listed = self._listing(folder, "", field, ref)
        top = {path for path, _ in listed if "/" not in path}
        holders = {head for head, _, rest in (path.partition("/") for path, _ in listed) if rest in MARKERS}
        if not top & set(MARKERS) and len(holders) == 1:
            (holder,) = holders
            listed = [(path.removeprefix(f"{holder}/"), size) for path, size in listed
                      if path.startswith(f"{holder}/")]
            folder = f"{folder}/{holder}"
        return [listed_file(field, ref, path=path, size=size, location=f"{folder}/{path}")
                for path, size in listed]

    def _listing(self, folder: str, below: str, field: str, ref: str, depth: int = 1) -> list[tuple[str, int]]:
        """(path relative to `folder`, size) of every artifact under `folder/below`, as deep as a local folder may
        nest."""
        answer = self.rest.json(ARTIFACTS, {"path": posixpath.join(folder, below) if below else folder})
        found: list[tuple[str, int]] = []
        for entry in answer.get("files", []):
            path = posixpath.join(below, entry["path"]) if below else entry["path"]
            if entry.get("is_dir"):
                if depth >= MAX_DEPTH:
                    raise BadReference(field, ref, Problems.REFERENCE_INVALID, f"holds {path!r}, nested deeper "
                                       f"than {MAX_DEPTH}")
                found += self._listing(folder, path, field, ref, depth + 1)
            else:
                found.append((path, int(entry.get("file_size", 0))))
            if len(found) > MAX_ENTRIES:
                raise BadReference(field, ref, Problems.REFERENCE_INVALID, f"holds more than {MAX_ENTRIES} files")
        return found

    # -- bytes --------------------------------------------------------------------------------------------------

    @contextmanager
    def open_stream(self, pinned: PinnedInput, file: PinnedFile, first: int, last: int | None, *,
                    reading: bool) -> Iterator[Iterator[bytes]]:
        """A GET through the artifact proxy, which answers a Range with 206; a server that ignores it (a proxy
        in front of another store may) sends the whole file, whose head is skipped and whose tail is never
        read."""
        try:
            response = self.rest.request(f"{ARTIFACTS}/{quote(file.location or file.path)}",
                                         headers=range_header(first, last), stream=True)
        except MlflowFailed as error:
            why = "it is gone since it was pinned" if error.status == 404 else str(error)
            raise fetch_failed(pinned, file, why, unreachable=reading and transient(error)) from None
        with response:
            yield skip_bytes(response.iter_content(CHUNK_BYTES), first if response.status_code == 200 else 0)

    def describe(self, error: Exception) -> str:
        return describe(error)


class MlflowRest:
    """Requests to a tracking server through mlflow-skinny's transport, with the service's timeout and retries;
    shared by the source and the publish target."""

    def __init__(self, settings: Settings) -> None:
        self.tracking_uri = get_tracking_uri()
        self.timeout = settings.download_timeout_seconds
        self.retries = settings.download_retries

    def request(self, endpoint: str, *, method: str = "GET", params: dict[str, str] | None = None,
                json: dict[str, Any] | None = None, data: Any = None, headers: dict[str, str] | None = None,
                stream: bool = False) -> requests.Response:
        """One request, with MLflow's retries (5xx, 429, timeouts, refused connections; a file body is rewound)
        and the service's timeout; `MlflowFailed` for a refusal or no answer. An exception raised by the caller's
        own code while the body is read (a cancelled upload) comes out as itself, not as a transport failure."""
        try:
            response = http_request(self._creds(), endpoint, method, params=params, json=json, data=data,
                                    extra_headers=headers, stream=stream, timeout=self.timeout,
                                    raise_on_status=False, max_retries=min(self.retries, MAX_RETRIES),
                                    backoff_factor=backoff_seconds(0), backoff_jitter=0.0)
        except (MlflowException, requests.RequestException) as error:  # MLflow wraps transport failures
            cause = error.__cause__ or error.__context__
            if isinstance(error, MlflowException) and cause is not None and not _transport(cause):
                raise cause from None
            raise MlflowFailed(None, reason=describe(error)) from None
        if response.status_code >= 400:
            with response:
                raise MlflowFailed(response.status_code, _error_code(response))
        return response

    def json(self, endpoint: str, params: dict[str, str] | None = None, *, method: str = "GET",
             body: dict[str, Any] | None = None) -> dict[str, Any]:
        with self.request(endpoint, method=method, params=params, json=body) as response:
            return dict(response.json())

    def _creds(self) -> MlflowHostCreds:
        """Read on every request, as the client does (a token file or variable may change)."""
        return get_default_host_creds(self.tracking_uri)


def proxied_path(uri: str, tracking_uri: str) -> str | None:
    """An artifact URI as a path under the tracking server's artifact proxy (`ARTIFACTS`), None for one stored
    elsewhere."""
    parts = urlsplit(uri)
    if parts.scheme == PROXIED and not parts.netloc:
        return parts.path.strip("/")
    tracking = urlsplit(tracking_uri)
    if (parts.scheme, parts.netloc) == (tracking.scheme, tracking.netloc) and ARTIFACTS in parts.path:
        return parts.path.split(ARTIFACTS, 1)[1].strip("/")
    return None


def describe(error: Exception) -> str:
    return "no answer in time" if _timed_out(error) else "connection failed"


def _transport(error: BaseException) -> bool:
    """A failure of the connection itself, as opposed to an exception raised by the code that feeds the body."""
    return isinstance(error, requests.RequestException | OSError | MlflowException)


def _error_code(response: requests.Response) -> str:
    try:
        return str(response.json().get("error_code", ""))
    except ValueError:
        return ""


def _timed_out(error: BaseException) -> bool:
    """Whether a transport failure (which MLflow wraps in a bare MlflowException) was a timeout."""
    chain: BaseException | None = error
    while chain is not None:
        if isinstance(chain, requests.Timeout):
            return True
        chain = chain.__cause__ or chain.__context__
    return False


def transient(error: MlflowFailed) -> bool:
    return error.status is None or error.status in TRANSIENT_STATUSES


def _pin_problem(error: MlflowFailed, field: str, ref: str, alias: str | None) -> Problem:
    if transient(error):
        return RegistryUnavailable(field, ref, str(error))
    if error.status in (401, 403):
        return BadReference(field, ref, Problems.REFERENCE_FORBIDDEN, f"cannot be read: the registry refused the "
                            f"service's credentials ({error})")
    if error.status == 404 or (alias and error.code == "INVALID_PARAMETER_VALUE"):
        # An alias that does not exist is a 400 INVALID_PARAMETER_VALUE (its form was checked here already).
        what = f"has no alias {alias!r}" if alias else "has no such version"
        return BadReference(field, ref, Problems.REFERENCE_NOT_FOUND, f"is not in the registry: the model does "
                            f"not exist or {what}")
    return BadReference(field, ref, Problems.REFERENCE_INVALID, f"was refused by the registry ({error})")

