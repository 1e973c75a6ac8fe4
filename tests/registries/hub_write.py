"""The fake hub's write side: what huggingface_hub 2.x sends to create a repo, a branch and a commit, answered as
the hub answers it (mixed into `hub_http.HubHandler`, which routes and authenticates):

    POST /api/repos/create                                   create_repo: the repo with a first commit of
                                                             .gitattributes; 409 if it exists
    POST /api/models/ORG/NAME/branch/BRANCH                  create_branch from `startingPoint` (default main); 409
    POST /api/validate-yaml                                  the README's metadata, checked before a commit
    POST /api/models/ORG/NAME/preupload/REV                  per file "lfs" or "regular", and the oid it has at REV
    POST /ORG/NAME.git/info/lfs/objects/batch                Git LFS batch API (upload): per object nothing (the
                                                             hub has it), a signed PUT on the CDN ("basic"), or
                                                             signed part PUTs and a completion URL ("multipart",
                                                             above `multipart_chunk_size`); and a "verify" action
    PUT  (CDN) /OID?...                                      the bytes, or one part; checked against the oid
    POST /ORG/NAME.git/info/lfs/complete_multipart?...       the parts joined, in order, checked against the oid
    POST /ORG/NAME.git/info/lfs/objects/verify               200 if the object is stored with that size, else 404
    POST /api/models/ORG/NAME/commit/BRANCH                  the NDJSON commit: a header line (summary,
                                                             description, parentCommit), then file (base64),
                                                             lfsFile (an uploaded oid), deletedFile, deletedFolder;
                                                             412 if parentCommit is no longer the branch head

Writing needs a valid token (401 without); any valid token may write anywhere. Not spoken: Xet (the client uploads
through Xet when hf_xet is installed and it is handed paths or bytes: its token request,
/api/models/ORG/NAME/xet-write-token/REV, gets a 404 here; given file objects it uses the LFS API above), pull
requests (`create_pr`), and .gitignore matching (`shouldIgnore` is always false).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import shutil
from collections.abc import Mapping
from math import ceil
from typing import Any

import yaml

from tests.registries.hub_repos import COMMIT_SHA, LFS_SUFFIXES, HubFile, Repo, StaleParent, upload_mode

LFS_JSON = "application/vnd.git-lfs+json"
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES).encode()
"""What the hub commits first in a new repo: its default LFS rules (the weights by suffix)."""
STALE_PARENT = "A commit has happened since. Please refresh and try again."
RELATIONS = ("adapter", "merge", "quantized", "finetune")
FRONT_MATTER = re.compile(r"\A---\r?\n(.*?)\r?\n---\r?\n", re.DOTALL)


class WriteRoutes:
    """The handlers named in the module docstring; `self` is a `HubHandler`."""

    # -- repos and branches -------------------------------------------------------------------------------------

    def _create_repo(self, body: bytes) -> None:
        self._writer()
        payload = _json_body(body)
        organization, name = payload.get("organization"), payload.get("name")
        if payload.get("type") not in (None, "model") or not organization or not name:
            self._error(400, "The fake hub creates model repos named ORG/NAME only")
            return
        repo_id = f"{organization}/{name}"
        url = f"{self.server.context.endpoint}/{repo_id}"
        store = self.server.context.store
        try:
            store.create_repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        except ValueError:
            status, message = (409, "You already created this model repo") if store.repo(repo_id) else (
                400, f"Invalid repo name {repo_id!r}")
            self._send(status, json.dumps({"error": message, "url": url}).encode(),
                       headers={"X-Error-Message": message})
            return
        store.commit(repo_id, files={".gitattributes": GITATTRIBUTES}, message="initial commit")
        self._json({"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _create_branch(self, repo: Repo, rest: list[str], body: bytes) -> None:
        if len(rest) != 2:
            self._send(404, b"Not Found", "text/plain")
            return
        branch = rest[1]
        if branch.startswith("refs/") or COMMIT_SHA.fullmatch(branch) or not branch:
            self._error(400, f"Invalid reference for a branch: {branch}")
            return
        if branch in repo.branches:
            self._error(409, "Reference already exists")
            return
        start = self._commit(repo, _json_body(body).get("startingPoint") or "main")
        self.server.context.store.set_ref(repo.repo_id, branch, start.sha)
        self._json({})

    # -- before a commit ----------------------------------------------------------------------------------------

    def _validate_yaml(self, body: bytes) -> None:
        """The checks a commit's README gets: YAML that parses to a mapping, and the model-tree fields typed."""
        match = FRONT_MATTER.match(_json_body(body).get("content", ""))
        if match is None:
            self._json({"errors": [], "warnings": [{"message": "Empty or missing yaml metadata in repo card"}]})
            return
        try:
            metadata = yaml.safe_load(match.group(1))
        except yaml.YAMLError as error:
            metadata, problem = None, f"Invalid YAML: {error}"
        else:
            problem = _metadata_problem(metadata)
        if problem:
            self._send(400, json.dumps({"errors": [{"message": problem}], "warnings": []}).encode(),
                       headers={"X-Error-Message": problem})
            return
        self._json({"errors": [], "warnings": []})

    def _preupload(self, repo: Repo, rest: list[str], body: bytes) -> None:
        if len(rest) != 2:
            self._send(404, b"Not Found", "text/plain")
            return
        commit = self._commit(repo, rest[1])
        answer = []
        for entry in _json_body(body).get("files", []):
            mode = upload_mode(entry["path"], int(entry["size"]), base64.b64decode(entry.get("sample", "")))
            existing = commit.files.get(entry["path"])
            file: dict[str, Any] = {"path": entry["path"], "uploadMode": mode, "shouldIgnore": False}
            if existing is not None:
                file["oid"] = existing.sha256 if existing.lfs else existing.blob_id
            answer.append(file)
        self._json({"files": answer, "commitOid": commit.sha})

    # -- Git LFS ------------------------------------------------------------------------------------------------

    def _lfs(self, repo: Repo, rest: list[str], body: bytes) -> None:
        routes = {("objects", "batch"): self._lfs_batch, ("objects", "verify"): self._lfs_verify}
        route = routes.get(tuple(rest))
        if route is None:
            self._send(404, b"Not Found", "text/plain")
            return
        route(repo, _json_body(body))

    def _lfs_batch(self, repo: Repo, payload: dict[str, Any]) -> None:
        if payload.get("operation") != "upload":
            self._send(422, json.dumps({"message": "The fake hub answers uploads only"}).encode(), LFS_JSON)
            return
        context = self.server.context
        multipart = "multipart" in payload.get("transfers", ["basic"])
        objects = []
        for item in payload.get("objects", []):
            oid, size = str(item["oid"]), int(item["size"])
            answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if context.store.blob(oid) is None:
                verify = {"href": f"{context.endpoint}/{repo.repo_id}.git/info/lfs/objects/verify",
                          "header": {"Authorization": self.headers.get("Authorization", "")}}
                answer["actions"] = {"upload": self._upload_action(repo.repo_id, oid, size, multipart),
                                     "verify": verify}
            objects.append(answer)
        self._send(200, json.dumps({"transfer": "multipart" if multipart else "basic", "objects": objects}).encode(),
                   LFS_JSON)

    def _upload_action(self, repo_id: str, oid: str, size: int, multipart: bool) -> dict[str, Any]:
        """One signed PUT on the CDN, or, for a big object, one per part and a completion URL on the hub."""
        context = self.server.context
        chunk = context.multipart_chunk_size
        if not multipart or size <= chunk:
            return {"href": context.signed_url(context.cdn_endpoint, oid, repo_id, "upload")}
        parts = {str(number): context.signed_url(context.cdn_endpoint, oid, repo_id, f"part {number}")
                 for number in range(1, ceil(size / chunk) + 1)}
        complete = context.signed_url(f"{context.endpoint}/{repo_id}.git/info/lfs/complete_multipart", oid, repo_id,
                                      "complete")
        return {"href": complete, "header": {"chunk_size": str(chunk), **parts}}

    def _lfs_verify(self, repo: Repo, payload: dict[str, Any]) -> None:
        content = self.server.context.store.blob(str(payload.get("oid")))
        if content is None or content.stat().st_size != payload.get("size"):
            self._send(404, json.dumps({"message": "Object not found"}).encode(), LFS_JSON)
            return
        self._send(200, b"{}", LFS_JSON)

    def _upload(self, oid: str, purpose: str, body: bytes) -> None:
        """A PUT on the CDN: the whole object (kept only if it hashes to its oid, as the hub's verify would
        insist), or part N of a multipart upload (kept aside, answered with its ETag like S3)."""
        context = self.server.context
        self.record.kind = "upload"
        pending = context.store.root / "uploads" / oid
        pending.mkdir(parents=True, exist_ok=True)
        if purpose == "upload":
            part = pending / "whole"
            part.write_bytes(body)
            kept = context.store.add_blob(oid, [part])
            part.unlink()
            if not kept:
                self._send(400, b"<Error><Code>BadDigest</Code></Error>", "application/xml")
                return
            self._send(200, b"", "text/plain", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})
            return
        number = int(purpose.removeprefix("part "))
        (pending / str(number)).write_bytes(body)
        self._send(200, b"", "text/plain", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})

    def _complete_multipart(self, repo_id: str, body: bytes) -> None:
        context = self.server.context
        fields = {name: self.query.get(name, [""])[-1] for name in ("oid", "expires", "signature")}
        if not context.signature_holds(fields["oid"], repo_id, "complete", fields["expires"], fields["signature"]):
            self._send(403, json.dumps({"message": "Invalid signature"}).encode(), LFS_JSON)
            return
        pending = context.store.root / "uploads" / fields["oid"]
        parts = _json_body(body).get("parts", [])
        paths = [pending / str(part["partNumber"]) for part in parts]
        if [part["partNumber"] for part in parts] != list(range(1, len(parts) + 1)) or not all(
                path.is_file() and f'"{hashlib.md5(path.read_bytes()).hexdigest()}"' == part["etag"]
                for path, part in zip(paths, parts, strict=True)):
            self._send(400, json.dumps({"message": "Parts missing or out of order"}).encode(), LFS_JSON)
            return
        if not context.store.add_blob(fields["oid"], paths):
            self._send(400, json.dumps({"message": "The parts do not hash to the oid"}).encode(), LFS_JSON)
            return
        shutil.rmtree(pending, ignore_errors=True)
        self._send(200, b"{}", LFS_JSON)

    # -- the commit ---------------------------------------------------------------------------------------------

    def _create_commit(self, repo: Repo, rest: list[str], body: bytes) -> None:
        """One atomic commit on a branch: every line is checked before anything moves."""
        context = self.server.context
        if len(rest) != 2:
            self._send(404, b"Not Found", "text/plain")
            return
        branch = rest[1].removeprefix("refs/heads/")
        if self.query.get("create_pr"):
            self._error(400, "The fake hub does not open pull requests")
            return
        head = self._commit(repo, branch)
        if branch not in repo.branches:
            self._error(400, f"Can only commit to a branch, not {rest[1]}")
            return
        try:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = lines[0]["value"] if lines and lines[0].get("key") == "header" else None
            if header is None:
                raise ValueError("the first line must be the header")
            files, delete = self._operations(head.files, lines[1:])
        except (ValueError, KeyError, TypeError, binascii.Error) as error:
            self._error(400, f"Invalid commit payload: {error}")
            return
        except _MissingEntry as missing:
            self._error(404, f"A file with this name doesn't exist: {missing}", "EntryNotFound", head.sha)
            return
        try:
            sha = context.store.commit(repo.repo_id, files=files, delete=delete, branch=branch,
                                       message=str(header.get("summary", "")),
                                       description=str(header.get("description", "")),
                                       parent=header.get("parentCommit"))
        except StaleParent:
            self._error(412, STALE_PARENT)
            return
        if context.faults.commit_answer_lost(repo.repo_id):
            self.close_connection = True
            return
        self._json({"success": True, "commitOid": sha, "commitUrl": f"{context.endpoint}/{repo.repo_id}/commit/{sha}",
                    "hookOutput": ""})

    def _operations(self, tree: Mapping[str, HubFile], lines: list[dict[str, Any]]
                    ) -> tuple[dict[str, HubFile], list[str]]:
        """The files a commit's lines add (regular ones stored now, LFS ones looked up) and the paths it deletes."""
        store = self.server.context.store
        files: dict[str, HubFile] = {}
        delete: list[str] = []
        for line in lines:
            key, value = line["key"], line["value"]
            path = _repo_path(value["path"])
            if key == "file":
                if value.get("encoding") != "base64":
                    raise ValueError(f"{path}: only base64 content is accepted")
                files[path] = store.regular_file(path, base64.b64decode(value["content"], validate=True))
            elif key == "lfsFile":
                if value.get("algo", "sha256") != "sha256":
                    raise ValueError(f"{path}: LFS objects are named by sha256")
                try:
                    files[path] = store.lfs_file(path, str(value["oid"]))
                except KeyError:
                    raise ValueError(f"{path}: the LFS object {value['oid']} was never uploaded") from None
                if "size" in value and files[path].size != value["size"]:
                    raise ValueError(f"{path}: the LFS object has {files[path].size} bytes, not {value['size']}")
            elif key == "deletedFile":
                if path not in tree:
                    raise _MissingEntry(path)
                delete.append(path)
            elif key == "deletedFolder":
                delete.append(path.rstrip("/"))
            else:
                raise ValueError(f"unknown operation {key!r}")
        return files, delete


class _MissingEntry(Exception):
    """A deletedFile line names a file the branch does not have."""


def _json_body(body: bytes) -> dict[str, Any]:
    value = json.loads(body or b"{}")
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def _repo_path(path: object) -> str:
    """A path in the repo as a commit may name it: relative, no `.` or `..` parts."""
    parts = path.rstrip("/").split("/") if isinstance(path, str) else [""]
    if not isinstance(path, str) or path.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"invalid path in repo: {path!r}")
    return path


def _metadata_problem(metadata: object) -> str | None:
    """Why the hub would refuse this card metadata (None: it would not)."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        return "The YAML metadata must be a mapping"
    base = metadata.get("base_model")
    if base is not None and not (isinstance(base, str) or (isinstance(base, list)
                                                          and all(isinstance(item, str) for item in base))):
        return '"base_model" must be a string or a list of strings'
    relation = metadata.get("base_model_relation")
    if relation is not None and (relation not in RELATIONS or base is None):
        return f'"base_model_relation" must be one of {", ".join(RELATIONS)}, with a "base_model"'
    return None
