"""Model repositories kept the way the Hugging Face hub keeps them, without HTTP: commits over a tree of files,
branches and tags that point at commits, and file contents stored once by sha256.

Identifiers follow git and Git LFS, so a client's checks hold: a file's `blob_id` is the git blob sha1 of its
content, or of its LFS pointer for an LFS file (`*.safetensors`, `*.bin`, ...), whose `sha256` is the LFS oid;
folders get a tree id; a commit sha is a 40-hex sha1 over its tree, parent and message. Commits are immutable:
files are copied into the store when committed, so changing a source folder afterwards changes nothing.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".pkl")
"""Files the hub's default `.gitattributes` sends to LFS (the model weights), by suffix."""
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
EPOCH = datetime(2025, 1, 1, tzinfo=UTC)


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

    def commit(self, repo_id: str, folder: Path | None = None, *, files: Mapping[str, bytes | Path] | None = None,
               delete: Iterable[str] = (), branch: str = "main", message: str = "Upload") -> str:
        """Commit on `branch` (created if missing) and move it to the new commit; return the commit sha.

        The new tree is `folder`'s files if a folder is given, else the branch's current tree; then `files`
        (path in repo -> bytes or a local file) are added or replaced and `delete`d paths removed."""
        tree: dict[str, HubFile] = {}
        if folder is not None:
            for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
                name = path.relative_to(folder).as_posix()
                tree[name] = self._ingest(name, path)
        for name, source in (files or {}).items():
            tree[name] = self._ingest(name, source)
        with self._lock:
            repo = self._repos[repo_id]
            parent = repo.branches.get(branch)
            if folder is None and parent is not None:
                tree = {**repo.commits[parent].files, **tree}
            for name in delete:
                tree.pop(name, None)
            date = self._tick()
            tree_id = hashlib.sha1("\n".join(f"{p}\0{f.blob_id}" for p, f in sorted(tree.items())).encode())
            sha = hashlib.sha1(
                f"tree {tree_id.hexdigest()}\nparent {parent}\ndate {date.isoformat()}\n\n{message}".encode()
            ).hexdigest()
            repo.commits[sha] = Commit(sha, parent, message, date, dict(sorted(tree.items())))
            repo.branches[branch] = sha
            return sha

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

    def _ingest(self, name: str, source: bytes | Path) -> HubFile:
        """Copy content into the blob store (hashing it on the way) and describe it as a file of a commit."""
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
        lfs = name.endswith(LFS_SUFFIXES)
        blob_id = git_blob_sha1(lfs_pointer(digest, size)) if lfs else git_sha1
        return HubFile(name, size, digest, blob_id, lfs, content)

