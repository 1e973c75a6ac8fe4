"""The Hugging Face hub's HTTP protocol, as huggingface_hub 2.x speaks it, over a `RepoStore`.

Two listeners share one `HubContext`: the hub itself and a "CDN" on another port, where LFS files live, as on
the real hub (resolve answers 302 to a signed URL on another host, and the client, seeing another origin, stops
there for metadata and drops its token when it downloads). Answered on the hub:

    GET  /api/models/ORG/NAME[/revision/REV][?blobs=true]   model_info / repo_info (sha, siblings)
    GET  /api/models/ORG/NAME/tree/REV[/PATH][?recursive=true][&cursor=N]   list_repo_tree (Link: rel="next")
    POST /api/models/ORG/NAME/paths-info/REV                get_paths_info (form or JSON `paths`)
    GET  /api/models/ORG/NAME/refs                          list_repo_refs
    GET  /api/models/ORG/NAME/commits/REV                   list_repo_commits (newest first, Link: rel="next")
    HEAD|GET /ORG/NAME/resolve/REV/PATH                     hf_hub_download, file_exists, ranged reads

and what creating repos, branches and commits takes (`hub_write`).

REV arrives percent-encoded (`refs%2Fpr%2F1`), so paths are split before they are decoded. Errors carry the
hub's `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound), `X-Error-Message` and a JSON `error`:
the client maps the codes to its exception classes. A missing or private repo asked without a token is 401
RepoNotFound (the hub does not say which), with a valid token 404; an unknown token is 401 "Invalid credentials
in Authorization header" (which the client does not take for RepoNotFound).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import mimetypes
import secrets
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from tests.registries.byte_ranges import Unsatisfiable, parse_range
from tests.registries.hub_faults import Fault, FaultKind, Faults
from tests.registries.hub_repos import Commit, HubFile, Repo, RepoStore
from tests.registries.hub_write import WriteRoutes
from tests.registries.request_log import RequestLog, RequestRecord

CHUNK = 64 * 1024
TRICKLE_TICK = 0.1
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


@dataclass
class HubContext:
    """What both listeners share."""

    store: RepoStore
    log: RequestLog
    faults: Faults
    tokens: frozenset[str]
    tree_page_size: int = 1000
    multipart_chunk_size: int = 1 << 20
    """LFS uploads bigger than this are multipart, in parts of this size (the real hub picks its own)."""
    commits_page_size: int = 50
    endpoint: str = ""
    cdn_endpoint: str = ""
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(16))
    url_lifetime: float = 3600.0

    def signed_blob_url(self, repo_id: str, file: HubFile) -> str:
        """Where the hub redirects an LFS resolve: the CDN, with an expiring signature over what it serves."""
        return self.signed_url(self.cdn_endpoint, file.sha256, repo_id, file.path)

    def signed_url(self, base: str, sha256: str, repo_id: str, path: str) -> str:
        """`base/sha256` (a CDN object) or `base?oid=sha256`, valid for what `path` names: a file to read, or an
        upload ("upload", "part N", "complete")."""
        expires = str(int(time.time() + self.url_lifetime))
        query = {"repo": repo_id, "path": path, "expires": expires,
                 "signature": self.signature(sha256, repo_id, path, expires)}
        if base == self.cdn_endpoint:
            return f"{base}/{sha256}?{urlencode(query)}"
        return f"{base}?{urlencode({'oid': sha256, **query})}"

    def signature(self, sha256: str, repo_id: str, path: str, expires: str) -> str:
        message = "\n".join((sha256, repo_id, path, expires)).encode()
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()

    def signature_holds(self, sha256: str, repo_id: str, path: str, expires: str, signature: str) -> bool:
        """A signed URL's fields, unexpired and signed by us."""
        fresh = expires.isdigit() and int(expires) >= time.time()
        return fresh and hmac.compare_digest(self.signature(sha256, repo_id, path, expires), signature)


class HubHTTPServer(ThreadingHTTPServer):
    """One listener (role "hub" or "cdn"); a thread per connection, so a stalled request holds only its own."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, context: HubContext, role: str) -> None:
        self.context = context
        self.role = role
        super().__init__(("127.0.0.1", 0), HubHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Refused(Exception):
    """The request was answered with an error already; stop handling it."""


class HubHandler(WriteRoutes, BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-hub/1"
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stall between
    timeout = 120  # idle keep-alive connections end on their own
    server: HubHTTPServer

    # -- plumbing -----------------------------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the RequestLog is the record

    record: RequestRecord
    _answering: RequestRecord | None = None
    """The record whose status `send_response` sets: None before `_dispatch` (the stdlib's own errors)."""

    def handle_one_request(self) -> None:
        self._answering = None  # a keep-alive connection's next request is a new record
        super().handle_one_request()

    def send_response(self, code: int, message: str | None = None) -> None:
        if self._answering is not None:
            self._answering.status = code
        super().send_response(code, message)

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        segments = [unquote(part) for part in split.path.split("/")[1:]]
        query = parse_qs(split.query, keep_blank_values=True)
        self.query = query
        self.record = self._answering = self.server.context.log.add(RequestRecord(
            server=self.server.role, method=self.command, path=unquote(split.path), query=query,
            range=self.headers.get("Range"), authorization="Authorization" in self.headers))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            if self.server.role == "cdn":
                self._blob(segments, body)
            else:
                self._hub(segments, body)
        except _Refused:
            pass
        except (ValueError, KeyError, TypeError) as error:  # a body the handler could not read: nothing sent yet
            self._error(400, f"Bad request: {error!r}")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Request-Id", f"Root={uuid.uuid4()}")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any, headers: dict[str, str] | None = None) -> None:
        self._send(200, json.dumps(data).encode(), headers=headers)

    def _error(self, status: int, message: str, code: str | None = None, commit: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(status, json.dumps({"error": message}).encode(), headers=headers)

    # -- the hub ------------------------------------------------------------------------------------------------

    def _hub(self, segments: list[str], body: bytes) -> None:
        if segments[:2] == ["api", "models"] and len(segments) >= 4:
            repo_id, rest = "/".join(segments[2:4]), segments[4:]
            routes = {("GET", ""): self._model_info, ("GET", "revision"): self._model_info,
                      ("GET", "tree"): self._tree, ("POST", "paths-info"): self._paths_info,
                      ("GET", "refs"): self._refs, ("GET", "commits"): self._commits,
                      ("POST", "branch"): self._create_branch, ("POST", "preupload"): self._preupload,
                      ("POST", "commit"): self._create_commit}
            route = routes.get((self.command, rest[0] if rest else ""))
        elif len(segments) >= 5 and segments[2] == "resolve" and self.command in ("GET", "HEAD"):
            repo_id, rest, route = "/".join(segments[:2]), segments[3:], self._resolve
        elif len(segments) >= 4 and segments[1].endswith(".git") and segments[2:4] == ["info", "lfs"]:
            repo_id, rest = f"{segments[0]}/{segments[1].removesuffix('.git')}", segments[4:]
            if rest == ["complete_multipart"] and self.command == "POST":  # signed: no token comes with it
                self.record.kind = "complete_multipart"
                self._complete_multipart(repo_id, body)
                return
            route = self._lfs if self.command == "POST" else None
        elif segments == ["api", "repos", "create"] and self.command == "POST":
            self.record.kind = "create_repo"
            self.server.context.faults.run_before(self.record.kind)
            self._create_repo(body)
            return
        elif segments == ["api", "validate-yaml"] and self.command == "POST":
            self.record.kind = "validate_yaml"
            self._validate_yaml(body)
            return
        else:
            route = None
        if route is None:
            self._send(404, b"Not Found", "text/plain")
            return
        self.record.key = repo_id
        self.record.kind = route.__name__.lstrip("_")
        self.server.context.faults.run_before(self.record.kind)
        repo = self._access(repo_id, write=route in (self._create_branch, self._preupload, self._create_commit,
                                                     self._lfs))
        self._apply_fault(repo_id, None)
        route(repo, rest, body)

    def _token(self) -> str | None:
        """The request's token: None without one; an unknown one is answered with 401 here."""
        authorization = self.headers.get("Authorization")
        token = authorization.removeprefix("Bearer ").strip() if authorization else None
        if token is not None and token not in self.server.context.tokens:
            self._error(401, INVALID_CREDENTIALS)
            raise _Refused
        return token

    def _writer(self) -> str:
        """The token of a request that changes something (every valid token may write)."""
        token = self._token()
        if token is None:
            self._error(401, "You must be authenticated to write to the hub")
            raise _Refused
        return token

    def _access(self, repo_id: str, *, write: bool = False) -> Repo:
        """The repo, if this request may read it (or write to it); else answer as the hub does and stop."""
        token = self._writer() if write else self._token()
        repo = self.server.context.store.repo(repo_id)
        if repo is None or (repo.private and token is None):
            if token is None:
                self._error(401, "Invalid username or password.", "RepoNotFound")
            else:
                self._error(404, "Repository not found", "RepoNotFound")
            raise _Refused
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            raise _Refused
        self.record.fields["commit"] = commit.sha
        return commit

    def _model_info(self, repo: Repo, rest: list[str], body: bytes) -> None:
        if rest and len(rest) != 2:
            self._send(404, b"Not Found", "text/plain")
            return
        commit = self._commit(repo, rest[1] if rest else "main")
        blobs = self.query.get("blobs", ["false"])[-1].lower() in ("true", "1")
        siblings = []
        for file in commit.files.values():
            sibling: dict[str, Any] = {"rfilename": file.path}
            if blobs:
                sibling.update(size=file.size, blobId=file.blob_id)
                if file.lfs:
                    sibling["lfs"] = {"size": file.size, "sha256": file.sha256, "pointerSize": file.pointer_size}
            siblings.append(sibling)
        org = repo.repo_id.split("/")[0]
        self._json({
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
            "modelId": repo.repo_id, "author": org, "sha": commit.sha, "lastModified": _iso(commit.date),
            "createdAt": _iso(repo.created), "private": repo.private, "gated": False, "disabled": False,
            "downloads": 0, "likes": 0, "tags": [], "siblings": siblings, "spaces": [],
            "usedStorage": sum(file.size for file in commit.files.values()),
        })

    def _tree(self, repo: Repo, rest: list[str], body: bytes) -> None:
        if len(rest) < 2:
            self._send(404, b"Not Found", "text/plain")
            return
        commit = self._commit(repo, rest[1])
        folder = "/".join(rest[2:]).strip("/")
        recursive = self.query.get("recursive", ["false"])[-1].lower() in ("true", "1")
        if folder and folder not in commit.folders():
            self._error(404, f"Path {folder} not found in revision {rest[1]}", "EntryNotFound", commit.sha)
            return
        entries = list(_entries(commit, _under(commit, folder, recursive)))
        self._page(repo, rest, entries, self.server.context.tree_page_size)

    def _commits(self, repo: Repo, rest: list[str], body: bytes) -> None:
        if len(rest) != 2:
            self._send(404, b"Not Found", "text/plain")
            return
        self._commit(repo, rest[1])
        entries = [{"id": commit.sha, "title": commit.message, "message": commit.description,
                    "authors": [{"user": commit.author, "avatar": None}], "date": _iso(commit.date)}
                   for commit in self.server.context.store.history(repo.repo_id, rest[1])]
        self._page(repo, rest, entries, self.server.context.commits_page_size)

    def _page(self, repo: Repo, rest: list[str], entries: list[Any], size: int) -> None:
        """One page of a listing, with a Link to the next as the hub gives it (the client follows it)."""
        start = int(self.query.get("cursor", ["0"])[-1])
        page = entries[start:start + size]
        headers = {}
        if start + len(page) < len(entries):
            query = {key: values[-1] for key, values in self.query.items() if key != "cursor"}
            query["cursor"] = str(start + len(page))
            quoted = "/".join(quote(part, safe="") for part in ["api", "models", *repo.repo_id.split("/"), *rest])
            headers["Link"] = f'<{self.server.context.endpoint}/{quoted}?{urlencode(query)}>; rel="next"'
        self._json(page, headers)

    def _paths_info(self, repo: Repo, rest: list[str], body: bytes) -> None:
        if len(rest) != 2:
            self._send(404, b"Not Found", "text/plain")
            return
        commit = self._commit(repo, rest[1])
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = json.loads(body or b"{}").get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        folders = commit.folders()
        wanted = [path.strip("/") for path in paths]
        self._json(list(_entries(commit, [path for path in wanted if path in commit.files or path in folders])))

    def _refs(self, repo: Repo, rest: list[str], body: bytes) -> None:
        def refs(names: dict[str, str], kind: str) -> list[dict[str, str]]:
            return [{"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha}
                    for name, sha in sorted(names.items())]

        answer: dict[str, Any] = {"branches": refs(repo.branches, "heads"), "converts": [],
                                  "tags": refs(repo.tags, "tags")}
        if self.query.get("include_prs"):
            answer["pullRequests"] = []
        self._json(answer)

    def _resolve(self, repo: Repo, rest: list[str], body: bytes) -> None:
        revision, path = rest[0], "/".join(rest[1:])
        commit = self._commit(repo, revision)
        self.record.key = f"{repo.repo_id}/{path}"
        file = commit.files.get(path)
        if file is None:
            self._error(404, "Entry not found", "EntryNotFound", commit.sha)
            return
        headers = {"X-Repo-Commit": commit.sha}
        if file.lfs:
            location = self.server.context.signed_blob_url(repo.repo_id, file)
            headers.update({"Location": location, "X-Linked-Size": str(file.size),
                            "X-Linked-Etag": f'"{file.sha256}"', "ETag": f'"{file.blob_id}"',
                            "Vary": "Origin, Accept-Encoding"})
            self._send(302, f"Found. Redirecting to {location}".encode(), "text/plain; charset=utf-8", headers)
            return
        self._content(repo.repo_id, file, {**headers, "ETag": f'"{file.blob_id}"'})

    # -- the CDN ------------------------------------------------------------------------------------------------

    def _blob(self, segments: list[str], body: bytes) -> None:
        """A signed GET of an object, or a signed PUT of an upload (`hub_write`)."""
        context = self.server.context
        fields = {name: self.query.get(name, [""])[-1] for name in ("repo", "path", "expires", "signature")}
        sha256 = segments[0] if len(segments) == 1 else ""
        self.record.kind = "blob"
        self.record.key = f"{fields['repo']}/{fields['path']}"
        uploading = fields["path"] == "upload" or fields["path"].startswith("part ")
        allowed = self.command == "PUT" if uploading else self.command in ("GET", "HEAD")
        content = context.store.root / "blobs" / sha256
        if not allowed or not context.signature_holds(sha256, fields["repo"], fields["path"], fields["expires"],
                                                      fields["signature"]):
            self._send(403, b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>",
                       "application/xml")
            return
        if uploading:
            self._upload(sha256, fields["path"], body)
            return
        if not content.is_file():
            self._send(404, b"<Error><Code>NoSuchKey</Code></Error>", "application/xml")
            return
        file = HubFile(fields["path"], content.stat().st_size, sha256, "", True, content)
        self._apply_fault(fields["repo"], None)
        self._content(fields["repo"], file, {"ETag": f'"{sha256}"'})

    # -- bytes --------------------------------------------------------------------------------------------------

    def _content(self, repo_id: str, file: HubFile, headers: dict[str, str]) -> None:
        """A file's bytes (or a range of them), as the hub and S3-backed CDNs answer: Accept-Ranges, ETag,
        206 with Content-Range, 416 past the end; and whatever fault the test set on this file."""
        try:
            selected = parse_range(self.headers.get("Range"), file.size)
        except Unsatisfiable:
            self._send(416, b"", "text/plain", {**headers, "Content-Range": f"bytes */{file.size}"})
            return
        first, last = selected if selected else (0, file.size - 1)
        length = last - first + 1 if file.size else 0
        fault = self.server.context.faults.get(repo_id, file.path) if self.command == "GET" else None
        if fault is not None and fault.kind is FaultKind.STALL:
            self._stall()
        self.send_response(206 if selected else 200)
        content_type = mimetypes.guess_type(file.path)[0] or "application/octet-stream"
        name = PurePosixPath(file.path).name
        for header, value in {**headers, "Content-Type": content_type, "Content-Length": str(length),
                              "Accept-Ranges": "bytes", "Content-Disposition":
                              f"inline; filename*=UTF-8''{quote(name)}; filename=\"{name}\";"}.items():
            self.send_header(header, value)
        if selected:
            self.send_header("Content-Range", f"bytes {first}-{last}/{file.size}")
        self.end_headers()
        if self.command == "HEAD" or length == 0:
            return
        # Taken once per response: a heal() at any point of it (even between two chunks) ends a trickle.
        released = self.server.context.faults.release_event()
        with open(file.content, "rb") as source:
            source.seek(first)
            for offset, chunk in _chunks(source, first, length):
                if fault is not None and fault.kind is FaultKind.CORRUPT:
                    chunk = _flip_middle_byte(chunk, offset, file.size)
                if fault is not None and fault.kind is FaultKind.TRICKLE:
                    self._trickle(chunk, fault, released)
                else:
                    self.wfile.write(chunk)

    def _apply_fault(self, repo_id: str, path: str | None) -> None:
        fault = self.server.context.faults.get(repo_id, path)
        if fault is not None and fault.kind is FaultKind.STALL:
            self._stall()

    def _stall(self) -> None:
        """Accept and never answer: wait until the test heals the hub, then drop the connection."""
        self.server.context.faults.release_event().wait()
        self.close_connection = True
        raise _Refused

    def _trickle(self, chunk: bytes, fault: Fault, released: threading.Event) -> None:
        step = max(1, int(fault.bytes_per_second * TRICKLE_TICK))
        for start in range(0, len(chunk), step):
            if released.wait(TRICKLE_TICK):
                self.close_connection = True
                raise _Refused
            self.wfile.write(chunk[start:start + step])
            self.wfile.flush()


def _iso(moment: Any) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _under(commit: Commit, folder: str, recursive: bool) -> list[str]:
    """Paths of the files and folders in `folder` ("" is the root): its children, or everything below it."""
    prefix = f"{folder}/" if folder else ""
    paths = [path for path in [*commit.files, *commit.folders()] if path.startswith(prefix)]
    if not recursive:
        paths = [path for path in paths if "/" not in path[len(prefix):]]
    return sorted(paths)


def _entries(commit: Commit, paths: Iterable[str]) -> Iterable[dict[str, Any]]:
    """Tree entries as /tree and /paths-info give them (RepoFile / RepoFolder in the client)."""
    for path in paths:
        file = commit.files.get(path)
        if file is None:
            yield {"type": "directory", "oid": commit.tree_id(path), "size": 0, "path": path}
            continue
        entry: dict[str, Any] = {"type": "file", "oid": file.blob_id, "size": file.size, "path": path}
        if file.lfs:
            entry["lfs"] = {"oid": file.sha256, "size": file.size, "pointerSize": file.pointer_size}
        yield entry


def _chunks(source: Any, first: int, length: int) -> Iterable[tuple[int, bytes]]:
    offset, remaining = first, length
    while remaining:
        chunk = source.read(min(CHUNK, remaining))
        if not chunk:
            return
        yield offset, chunk
        offset += len(chunk)
        remaining -= len(chunk)


def _flip_middle_byte(chunk: bytes, offset: int, size: int) -> bytes:
    """The chunk with the file's middle byte inverted, if this chunk holds it (the safetensors header, at the
    start, stays intact: only the checksum of the whole file can tell)."""
    middle = size // 2
    if not offset <= middle < offset + len(chunk):
        return chunk
    at = middle - offset
    return chunk[:at] + bytes([chunk[at] ^ 0xFF]) + chunk[at + 1:]
