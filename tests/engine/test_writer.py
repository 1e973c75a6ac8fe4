"""The shard writer's direct-I/O path: bytes land in order across staging-buffer boundaries, an unaligned
tail included, and a filesystem that refuses O_DIRECT (at open or at the first write) gets the same file."""

from __future__ import annotations

import errno
import mmap
import os
import random
from pathlib import Path

import pytest

from adapter_merge.worker.engine import writer


def _chunks(total: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    chunks, left = [], total
    while left:
        size = min(left, rng.choice([1, 7, 4096, 5000, 3 * 4096 + 11, 70_000]))
        chunks.append(rng.randbytes(size))
        left -= size
    return chunks


@pytest.mark.parametrize("refuse", ["nothing", "flag", "write"])
def test_direct_file_writes_every_byte_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                refuse: str) -> None:
    stage = memoryview(mmap.mmap(-1, 4 * writer.DIRECT_ALIGNMENT))
    data = _chunks(10 * len(stage) + 123, seed=len(refuse))
    if refuse == "flag":
        monkeypatch.setattr(writer, "_set_direct", lambda fd, on: False)
    if refuse == "write":
        original = writer.write_all

        def write_all(fd: int, view: memoryview) -> None:
            if writer.fcntl.fcntl(fd, writer.fcntl.F_GETFL) & os.O_DIRECT:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            original(fd, view)

        monkeypatch.setattr(writer, "write_all", write_all)
    out = writer._DirectFile(tmp_path / "shard", stage)
    for chunk in data:
        out.write(memoryview(chunk))
    out.close(fsync=True)
    assert (tmp_path / "shard").read_bytes() == b"".join(data)
    assert out.direct is False  # the unaligned tail always goes through the page cache
