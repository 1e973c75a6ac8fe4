"""Where a job's files live under MERGE_DATA_DIR, and the moves that make results appear atomically.

    <data_dir>/work/<job>/attempt-<n>/model   scratch of one attempt (the engine's out_dir)
    <data_dir>/artifacts/<job>/attempt-<n>/   the published result, renamed into place in one step

The data dir must be one filesystem (shared by all nodes in distributed mode) so the final rename is atomic.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path

from adapter_merge.core.problems import Problem, Problems


class DataLayout:
    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir.absolute()
        self.work_root = self.root / "work"
        self.artifacts_root = self.root / "artifacts"
        self.checksum_cache = self.root / "cache"
        """Input checksums remembered between merges (the engine's cache)."""

    def ensure(self) -> None:
        for folder in (self.root, self.work_root, self.artifacts_root):
            folder.mkdir(parents=True, exist_ok=True)

    def work_dir(self, job_id: str) -> Path:
        return self.work_root / job_id

    def attempt_dir(self, job_id: str, attempt: int) -> Path:
        return self.work_dir(job_id) / f"attempt-{attempt}"

    def attempt_output(self, job_id: str, attempt: int) -> Path:
        """The engine writes here (through its own temporary sibling), never straight into artifacts."""
        return self.attempt_dir(job_id, attempt) / "model"

    def job_artifacts(self, job_id: str) -> Path:
        """Everything published for a job."""
        return self.artifacts_root / job_id

    def result_dir(self, job_id: str, attempt: int) -> Path:
        """What one run published. Per attempt, so a run that lost its lease can never clobber the result of
        the run that replaced it; the job record names the attempt whose files are served."""
        return self.job_artifacts(job_id) / f"attempt-{attempt}"

    def clean_work(self, job_id: str) -> None:
        """Drop whatever earlier (dead or cancelled) attempts left, so a rerun starts clean."""
        _remove_tree(self.work_dir(job_id))

    def clean_attempt(self, job_id: str, attempt: int) -> None:
        """Drop one run's scratch only: a later run of the same job may already be writing beside it."""
        _remove_tree(self.attempt_dir(job_id, attempt))
        with contextlib.suppress(OSError):
            self.work_dir(job_id).rmdir()  # only if empty

    def publish(self, job_id: str, attempt: int, output: Path) -> Path:
        """Move a finished output into place with one rename; readers see all of it or nothing."""
        target = self.result_dir(job_id, attempt)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(output, target)
        _fsync_dir(target.parent)  # the rename itself must survive a crash once success is reported
        return target

    def share(self, src_job: str, src_attempt: int, new_job: str, new_attempt: int = 0) -> Path:
        """Give `new_job` the result of `src_job`'s run `src_attempt`, as `result_dir(new_job, new_attempt)`: every
        file hard-linked (copied where links cannot be made, e.g. across filesystems) into a temporary folder,
        then one rename, so readers see all of it or nothing. The files are immutable results, so the two jobs
        share their bytes safely, and deleting either job leaves the other's links.

        A reused job is created with attempt 0, its files at `result_dir(job, 0)`. One that must still publish
        (queued with `reused_from` set) is claimed like any job, which raises its attempt: its run must not
        merge, and links its result into its own attempt with `share(job, 0, job, job.attempt)` before it
        finishes (artifacts are always served from the finishing attempt's folder). Raises FileNotFoundError
        when the source's files are gone."""
        source = self.result_dir(src_job, src_attempt)
        target = self.result_dir(new_job, new_attempt)
        target.parent.mkdir(parents=True, exist_ok=True)
        draft = target.with_name(f".sharing-{target.name}-{uuid.uuid4().hex[:8]}")
        try:
            for folder, _, names in os.walk(source, onerror=_raise):
                into = draft / os.path.relpath(folder, source)
                into.mkdir(parents=True, exist_ok=True)
                for name in names:
                    _link_or_copy(Path(folder) / name, into / name)
            os.replace(draft, target)
        except BaseException:
            shutil.rmtree(draft, ignore_errors=True)
            raise
        _fsync_dir(target.parent)
        return target

    def remove_job(self, job_id: str) -> None:
        _remove_tree(self.job_artifacts(job_id))
        _remove_tree(self.work_dir(job_id))

    def free_bytes(self) -> int:
        """Space left for unprivileged writers on the data dir's filesystem (what a merge can use)."""
        return shutil.disk_usage(self.root).free

    def require_free_space(self, min_free_bytes: int) -> None:
        """Refuse new work (507 storage-full) while less than `min_free_bytes` are free; reading, downloading
        and deleting go on, so space can be freed through the API."""
        free = self.free_bytes()
        if free < min_free_bytes:
            raise Problem(Problems.STORAGE_FULL, f"the data dir has {free} bytes free, less than the "
                          f"{min_free_bytes} it must keep (MERGE_MIN_FREE_BYTES); delete finished jobs or add "
                          "space, then try again", free_bytes=free, min_free_bytes=min_free_bytes)

    def is_writable(self) -> bool:
        probe = self.root / f".probe-{uuid.uuid4().hex}"
        try:
            self.ensure()
            probe.write_bytes(b"ok")
            probe.unlink()
            return True
        except OSError:
            return False


def _raise(error: OSError) -> None:
    raise error


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link; a copy where the filesystem cannot link (another device, no link support, link limit)."""
    try:
        os.link(source, target)
    except OSError as error:
        if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copy2(source, target)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_tree(path: Path) -> None:
    """Remove a folder by first renaming it aside, so nobody can observe it half-deleted."""
    if not path.exists():
        return
    doomed = path.with_name(f".deleting-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(path, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)
