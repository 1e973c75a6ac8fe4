"""A full disk under MERGE_DATA_DIR, for real: the embedded server's data dir on a small filesystem of its own
(tmpfs, or a loop-mounted ext4 image where tmpfs cannot be mounted), filled up with a file.

Reading, downloading and deleting keep working (deleting is how space is freed), new merges are refused with
507 storage-full, /readyz says why it is not ready, and a merge that runs out of space fails as storage-full
with nothing half-written left behind.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.checks import assert_no_leftovers, problem
from tests.service.conftest import ModelSet
from tests.service.harness import FINISHED, Api, Proc, service_env, serving

DISK_BYTES = 64 << 20
MIN_FREE_BYTES = 1 << 20
# A float32 merge of the small model writes ~15 MB: more than what is left free, plus the store's reserve.
LEFT_FOR_A_MERGE = 3 << 20
OUT_OF_SPACE_REQUEST = {"base_model": "small/base", "adapters": ["small/lora"], "output_dtype": "float32"}


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A filesystem of DISK_BYTES mounted for this module: tmpfs, else an ext4 image on a loop device."""
    mountpoint = tmp_path_factory.mktemp("small-disk")
    tmpfs = _run("mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mountpoint))
    if tmpfs.returncode != 0:
        image = mountpoint.with_name(mountpoint.name + ".ext4")
        with image.open("wb") as file:
            file.truncate(DISK_BYTES)
        made = _run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
        loop = _run("mount", "-o", "loop", str(image), str(mountpoint)) if made.returncode == 0 else made
        if loop.returncode != 0:
            pytest.skip(f"cannot mount a small filesystem here: tmpfs: {tmpfs.stderr.strip()}; ext4 image: "
                        f"{loop.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        if _run("umount", str(mountpoint)).returncode != 0:
            _run("umount", "-l", str(mountpoint))


@pytest.fixture(scope="module")
def server(disk: Path, models: ModelSet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Api]]:
    logs = tmp_path_factory.mktemp("small-disk-logs")  # off the small disk: logging must not need its space
    env = service_env(disk, models.root, MERGE_MIN_FREE_BYTES=str(MIN_FREE_BYTES))
    with serving(env, logs / "server.log") as running:
        yield running


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def fill(disk: Path, leave: int = 0) -> Path:
    """Write a file until at most `leave` bytes are free (with 0: until the filesystem refuses more)."""
    filler = disk / f"filler-{uuid.uuid4().hex[:8]}"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        while (room := free_bytes(disk) - leave) > 0 or leave == 0:
            try:
                os.write(fd, bytes(min(1 << 20, max(room, 4096))))
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
                break
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_keeps_reads_and_deletes_working_and_refuses_new_jobs(
        server: tuple[Proc, Api], disk: Path, small_request: dict) -> None:
    api = server[1]
    job = api.wait(api.submit(small_request)["id"], FINISHED, timeout=60)
    assert job["status"] == "succeeded", job["error"]
    result_bytes = sum(artifact["size"] for artifact in job["artifacts"])
    filler = fill(disk)
    try:
        assert free_bytes(disk) < 64 << 10
        listed = api.http.get("/jobs")
        assert listed.status_code == 200, listed.text
        assert job["id"] in [item["id"] for item in listed.json()["items"]]
        assert api.job(job["id"]) == job
        api.download_all(job)  # every byte, checked against its size, sha256 and ETag
        first = job["artifacts"][0]
        head = api.http.head(first["url"])
        assert head.status_code == 200 and int(head.headers["content-length"]) == first["size"]
        archive = api.http.get(job["archive_url"])
        assert archive.status_code == 200 and len(archive.content) > result_bytes

        total = listed.json()["total"]
        refused = api.http.post("/merge", json=small_request)
        body = problem(refused, 507, "MERGE_MIN_FREE_BYTES")
        assert body["type"].endswith(":storage-full")
        assert body["min_free_bytes"] == MIN_FREE_BYTES and body["free_bytes"] < MIN_FREE_BYTES
        assert api.http.get("/jobs").json()["total"] == total  # nothing was queued

        ready = api.http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["data_dir"].endswith(
            f"less than the {MIN_FREE_BYTES} MERGE_MIN_FREE_BYTES asks for"), ready.text
        assert ready.json()["checks"]["store"] == "ok"

        before = free_bytes(disk)
        deleted = api.http.delete(f"/jobs/{job['id']}")
        assert deleted.status_code == 204, deleted.text
        assert api.http.get(f"/jobs/{job['id']}").status_code == 404
        assert not (disk / "artifacts" / job["id"]).exists()
        assert free_bytes(disk) >= before + result_bytes  # the space came back
    finally:
        filler.unlink()
    assert api.http.get("/readyz").status_code == 200


def test_a_merge_that_runs_out_of_space_fails_as_storage_full_and_leaves_nothing(
        server: tuple[Proc, Api], disk: Path) -> None:
    api = server[1]
    filler = fill(disk, leave=LEFT_FOR_A_MERGE)
    try:
        left = free_bytes(disk)
        assert MIN_FREE_BYTES <= left <= LEFT_FOR_A_MERGE
        job = api.wait(api.submit(OUT_OF_SPACE_REQUEST)["id"], FINISHED, timeout=60)
        assert job["status"] == "failed" and job["attempts"] == 1, job
        error = job["error"]
        assert error["type"].endswith(":storage-full") and error["status"] == 507, error
        assert "disk filled up" in error["detail"] and str(disk) not in error["detail"]  # no server paths
        assert job["artifacts"] == [] and job["progress"]["bytes_done"] < job["progress"]["bytes_total"]
        assert_no_leftovers(disk, job["id"])
        assert not (disk / "artifacts" / job["id"]).exists()
        assert free_bytes(disk) >= left - (256 << 10)  # the partial output's space is back (the store grew a bit)
    finally:
        filler.unlink()
