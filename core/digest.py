"""The request digest: one sha256 naming everything a merge's result depends on, so that two requests with
the same digest would produce the same bytes and the second can share the first's result (README: Reuse).

It covers the inputs as pinned (never the references as written: a branch that moved is another digest), the
adapters' weights and order, the output options and the engine version; not where the result goes or who is
told (`publish`, `callback_url`) nor `reuse` itself.

- A remote input is named by its scheme, its pinned version and, per file, path, size, sha256, ETag and
  version id: what the registry vouches for.
- A local folder has no version, so it is named by its real path and every regular file under it
  (recursively: relative path, size, mtime_ns). These are the facts the engine's checksum cache trusts
  (`worker/engine/checksums.py`, which adds device and inode; those are left out here because API nodes that
  mount one shared folder see different device numbers): a file rewritten in place with its size and mtime
  kept would go unnoticed by both, which is acceptable for model folders. Computed in the preflight process
  (a big folder's stat calls stay off the API's event loop).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from adapter_merge.core.request import MergeRequest
from adapter_merge.core.sources.base import PinnedInput
from adapter_merge.worker.engine.manifest import engine_version

DIGEST_FORMAT = 1
"""Part of the digested document: a change of what the digest covers must not match digests made before it."""


def request_digest(request: MergeRequest, inputs: list[PinnedInput]) -> str:
    """sha256 (hex) of the canonical JSON (sorted keys, no whitespace) of what the merge depends on; `inputs`
    are the base, then the adapters, as pinned (local ones with their folder)."""
    document = {
        "format": DIGEST_FORMAT,
        "engine": engine_version(),
        "inputs": [_input_identity(pinned) for pinned in inputs],
        "weights": [adapter.weight for adapter in request.adapters],
        "output_dtype": request.output_dtype,
        "max_shard_size": request.max_shard_size,
    }
    return hashlib.sha256(canonical_json(document)).hexdigest()


def canonical_json(value: Any) -> bytes:
    """The one serialization digests are taken of: sorted keys, no whitespace, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _input_identity(pinned: PinnedInput) -> dict[str, Any]:
    if pinned.local_path is not None:
        return {"scheme": pinned.scheme, "path": pinned.local_path, "files": folder_files(Path(pinned.local_path))}
    files = [{"path": file.path, "size": file.size, "sha256": file.sha256, "etag": file.etag,
              "version_id": file.version_id} for file in pinned.files]
    return {"scheme": pinned.scheme, "version": pinned.version, "files": files}


def folder_files(root: Path) -> list[list[Any]]:
    """[relative path, size, mtime_ns] of every regular file under `root` (links to files followed, as the
    engine reads through them), sorted by path."""
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            try:
                info = os.stat(path)
            except FileNotFoundError:  # a dangling link, or a file removed while walking
                continue
            if stat.S_ISREG(info.st_mode):
                found.append([os.path.relpath(path, root), info.st_size, info.st_mtime_ns])
    return sorted(found)
