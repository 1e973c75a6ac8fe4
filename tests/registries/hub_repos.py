"""Model repositories kept the way the Hugging Face hub keeps them, without HTTP: commits over a tree of files,
branches and tags that point at commits, and file contents stored once by sha256.

Identifiers follow git and Git LFS, so a client's checks hold: a file's `blob_id` is the git blob sha1 of its
content, or of its LFS pointer for an LFS file (`*.safetensors`, `*.bin`, ...), whose `sha256` is the LFS oid;
folders get a tree id; a commit sha is a 40-hex sha1 over its tree, parent, date and message. Commits are
immutable: files are copied into the store when committed, so changing a source folder afterwards changes nothing.
A commit may name the parent it was built on; if the branch has moved since, it is refused (`StaleParent`).
"""

from __future__ import annotations

import hashlib
import re
import tempfile
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".pkl")
"""Files the hub's default `.gitattributes` sends to LFS (the model weights), by suffix."""
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
SHA256 = re.compile(r"[0-9a-f]{64}")
EPOCH = datetime(2025, 1, 1, tzinfo=UTC)
LFS_THRESHOLD = 10 * 1024 * 1024
"""The hub takes files from 10 MB up through LFS only, whatever their name."""
AUTHOR = "fake-hub-user"


class StaleParent(Exception):
    """The branch no longer points at the parent a commit was built on (someone committed in between)."""


def upload_mode(path: str, size: int, sample: bytes) -> str:
    """"lfs" or "regular", as the hub's preupload decides: weights by name, big files, and binary content (a NUL
    in the first 512 bytes) go to LFS."""
    return "lfs" if path.endswith(LFS_SUFFIXES) or size >= LFS_THRESHOLD or b"\0" in sample else "regular"


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The text git stores in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class HubFile:
    """One file of a commit."""

    path: str
    """Posix path relative to the repo root."""
    size: int
    sha256: str
    blob_id: str
    """Git blob sha1: of the content, or of the LFS pointer for an LFS file."""
    lfs: bool
    content: Path
    """Where the store keeps the bytes (shared by every commit and repo holding the same content)."""

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))

    @property
    def etag(self) -> str:
        """What the hub's resolve answers as the file's ETag (X-Linked-Etag for LFS): sha256 or git sha1."""
        return self.sha256 if self.lfs else self.blob_id


@dataclass(frozen=True)
class Commit:
    sha: str
    parent: str | None
    message: str
    date: datetime
    files: Mapping[str, HubFile]
    description: str = ""
    author: str = AUTHOR

    def folders(self) -> set[str]:
        """Every folder that holds a file of this commit, at any depth ("" is the root, not included)."""
        found: set[str] = set()
        for path in self.files:
            found.update(str(parent) for parent in PurePosixPath(path).parents if str(parent) != ".")
        return found

    def tree_id(self, folder: str) -> str:
        """A stable id for a folder's content (git would hash the tree object; any function of content will do)."""
        prefix = f"{folder}/" if folder else ""
        entries = sorted(f"{path}\0{file.blob_id}" for path, file in self.files.items() if path.startswith(prefix))
        return hashlib.sha1("\n".join(entries).encode()).hexdigest()


@dataclass
class Repo:
    repo_id: str
    private: bool
    created: datetime
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """The commit a revision names, as the hub reads it: a full commit sha, a branch, a tag, or their long
        forms `refs/heads/NAME` and `refs/tags/NAME`; None if it names nothing."""
        if COMMIT_SHA.fullmatch(revision):
            return self.commits.get(revision)
        for prefix, refs in (("refs/heads/", self.branches), ("refs/tags/", self.tags)):
            if revision.startswith(prefix):
                sha = refs.get(revision.removeprefix(prefix))
                return self.commits[sha] if sha else None
        sha = self.branches.get(revision) or self.tags.get(revision)
        return self.commits[sha] if sha else None


class RepoStore:
    """Every repo the fake hub serves, thread-safe; content lives under `root/blobs/<sha256>`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._blobs = root / "blobs"
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._repos: dict[str, Repo] = {}
        self._lock = threading.RLock()
        self._clock = 0

    # -- reading ------------------------------------------------------------------------------------------------

    def repo(self, repo_id: str) -> Repo | None:
        with self._lock:
            return self._repos.get(repo_id)

    def commit_of(self, repo_id: str, revision: str = "main") -> Commit:
        """The commit a revision resolves to now (KeyError if the repo or revision does not exist)."""
        with self._lock:
            repo = self._repos[repo_id]
            commit = repo.resolve(revision)
            if commit is None:
                raise KeyError(f"{repo_id}: no revision {revision!r}")
            return commit

    # -- writing ------------------------------------------------------------------------------------------------

    def create_repo(self, repo_id: str, *, private: bool = False) -> Repo:
        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise ValueError(f"repo ids are ORG/NAME here, not {repo_id!r}")
        with self._lock:
            if repo_id in self._repos:
                raise ValueError(f"repo {repo_id} exists already")
            repo = Repo(repo_id, private, self._tick())
            self._repos[repo_id] = repo
            return repo

    def commit(self, repo_id: str, folder: Path | None = None, *,
               files: Mapping[str, bytes | Path | HubFile] | None = None, delete: Iterable[str] = (),
               branch: str = "main", message: str = "Upload", description: str = "",
               parent: str | None = None) -> str:
        """Commit on `branch` (created if missing) and move it to the new commit; return the commit sha.

        The new tree is `folder`'s files if a folder is given, else the branch's current tree; then `files`
        (path in repo -> bytes, a local file, or a file already stored, e.g. an uploaded LFS object) are added or
        replaced and `delete`d paths removed (a folder's path removes everything under it). With `parent`, the
        branch must still point there, else `StaleParent`."""
        tree: dict[str, HubFile] = {}
        if folder is not None:
            for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
                name = path.relative_to(folder).as_posix()
                tree[name] = self._ingest(name, path)
        for name, source in (files or {}).items():
            tree[name] = replace(source, path=name) if isinstance(source, HubFile) else self._ingest(name, source)
        with self._lock:
            repo = self._repos[repo_id]
            head = repo.branches.get(branch)
            if parent is not None and parent != head:
                raise StaleParent(f"{repo_id}@{branch} is at {head}, not {parent}")
            if folder is None and head is not None:
                tree = {**repo.commits[head].files, **tree}
            for name in delete:
                tree = {path: file for path, file in tree.items() if path != name and not path.startswith(f"{name}/")}
            date = self._tick()
            tree_id = hashlib.sha1("\n".join(f"{p}\0{f.blob_id}" for p, f in sorted(tree.items())).encode())
            sha = hashlib.sha1(f"tree {tree_id.hexdigest()}\nparent {head}\ndate {date.isoformat()}\n\n{message}"
                               f"\n\n{description}".encode()).hexdigest()
            repo.commits[sha] = Commit(sha, head, message, date, dict(sorted(tree.items())), description)
            repo.branches[branch] = sha
            return sha

    def history(self, repo_id: str, revision: str) -> list[Commit]:
        """The commits `revision` reaches, newest first (KeyError as `commit_of`)."""
        with self._lock:
            commits = [self.commit_of(repo_id, revision)]
            while commits[-1].parent is not None:
                commits.append(self._repos[repo_id].commits[commits[-1].parent])
            return commits

    # -- content ------------------------------------------------------------------------------------------------

    def blob(self, sha256: str) -> Path | None:
        """Where content with this sha256 is kept, if the store has it."""
        path = self._blobs / sha256
        return path if SHA256.fullmatch(sha256) and path.is_file() else None

    def add_blob(self, sha256: str, parts: Iterable[Path]) -> bool:
        """Keep the concatenation of `parts` as content `sha256` if that is its sha256 (else keep nothing and say
        so): how an LFS upload lands."""
        digest = hashlib.sha256()
        with tempfile.NamedTemporaryFile(dir=self._blobs, delete=False) as out:
            for part in parts:
                with open(part, "rb") as source:
                    while chunk := source.read(1 << 20):
                        out.write(chunk)
                        digest.update(chunk)
        if not SHA256.fullmatch(sha256) or digest.hexdigest() != sha256:
            Path(out.name).unlink()
            return False
        Path(out.name).replace(self._blobs / sha256)
        return True

    def lfs_file(self, name: str, sha256: str) -> HubFile:
        """Stored content `sha256` as LFS file `name` of a commit (KeyError if it was never uploaded)."""
        content = self.blob(sha256)
        if content is None:
            raise KeyError(f"no LFS object {sha256}")
        size = content.stat().st_size
        return HubFile(name, size, sha256, git_blob_sha1(lfs_pointer(sha256, size)), True, content)

    def regular_file(self, name: str, data: bytes) -> HubFile:
        """`data` stored as a plain git file `name` (a regular upload: whatever its name, no LFS pointer)."""
        return self._ingest(name, data, lfs=False)

    def set_ref(self, repo_id: str, name: str, revision: str, *, tag: bool = False) -> str:
        """Point branch (or tag) `name` at the commit `revision` resolves to; return that commit's sha."""
        with self._lock:
            repo = self._repos[repo_id]
            commit = repo.resolve(revision)
            if commit is None:
                raise KeyError(f"{repo_id}: no revision {revision!r}")
            (repo.tags if tag else repo.branches)[name] = commit.sha
            return commit.sha

    def _tick(self) -> datetime:
        """Commit dates one minute apart, in order: stable across runs, and distinct."""
        with self._lock:
            self._clock += 1
            return EPOCH + timedelta(minutes=self._clock)

    def _ingest(self, name: str, source: bytes | Path, lfs: bool | None = None) -> HubFile:
        """Copy content into the blob store (hashing it on the way) and describe it as a file of a commit: an LFS
        file if `lfs`, by default if its name says weights."""
        sha256, size, git_sha1 = hashlib.sha256(), 0, None
        with tempfile.NamedTemporaryFile(dir=self._blobs, delete=False) as out:
            if isinstance(source, bytes):
                out.write(source)
                sha256.update(source)
                size = len(source)
                git_sha1 = git_blob_sha1(source)
            else:
                size = source.stat().st_size
                blob_hash = hashlib.sha1(b"blob %d\0" % size)
                with open(source, "rb") as src:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
                        sha256.update(chunk)
                        blob_hash.update(chunk)
                git_sha1 = blob_hash.hexdigest()
        digest = sha256.hexdigest()
        content = self._blobs / digest
        Path(out.name).replace(content)
        lfs = name.endswith(LFS_SUFFIXES) if lfs is None else lfs
        blob_id = git_blob_sha1(lfs_pointer(digest, size)) if lfs else git_sha1
        return HubFile(name, size, digest, blob_id, lfs, content)

