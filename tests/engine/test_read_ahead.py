"""The reader thread reads the inputs ahead of the computation. Its reads are the ones the merge then takes, in
order; a read that fails mid-merge (a base shard truncated after planning) fails the merge naming the file;
a failed or cancelled merge leaves none of its threads behind; buffers read but never taken go back to their
pool."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from adapter_merge.worker.engine import AdapterSpec, InputError, MergeCancelled, Progress, merge
from adapter_merge.worker.engine.input_files import InputFiles
from adapter_merge.worker.engine.read_ahead import ReadAhead
from adapter_merge.worker.engine.tensor_info import SafetensorsBytes, TensorInfo
from adapter_merge.worker.engine.tensor_io import BufferPool, ByteRange, TensorReader
from tests.engine.conftest import Inputs


def merge_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("merge-")]


def base_shard(inputs: Inputs) -> Path:
    (shard,) = inputs.base.glob("*.safetensors")
    return shard


def test_a_base_truncated_while_merging_fails_the_merge_naming_the_file(inputs: Inputs) -> None:
    shard = base_shard(inputs)

    def truncate_after_the_first_tensor(progress: Progress) -> None:
        if progress.tensors_done == 1:
            os.truncate(shard, shard.stat().st_size // 2)

    with pytest.raises(InputError, match="file ended early") as raised:
        merge(inputs.base, [AdapterSpec(inputs.lora)], inputs.out, progress=truncate_after_the_first_tensor)
    assert raised.value.file == shard and raised.value.input == "base"
    assert os.listdir(inputs.out_parent) == []
    assert merge_threads() == []


def test_a_cancelled_merge_stops_every_thread(inputs: Inputs) -> None:
    seen: list[int] = []

    def stop_after_two_tensors() -> bool:
        return len(seen) >= 2

    with pytest.raises(MergeCancelled):
        merge(inputs.base, [AdapterSpec(inputs.lora)], inputs.out,
              progress=lambda progress: seen.append(progress.tensors_done), should_stop=stop_after_two_tensors)
    assert seen == [1, 2]
    assert os.listdir(inputs.out_parent) == []
    assert merge_threads() == []


@pytest.fixture
def numbered_file(tmp_path: Path) -> TensorInfo:
    """A 'tensor' of 64 bytes 0..63, at offset 8 of its file."""
    path = tmp_path / "bytes.bin"
    path.write_bytes(b"\xff" * 8 + bytes(range(64)))
    return TensorInfo("numbers", "U8", (64,), SafetensorsBytes(path, 8), "base")


def test_reads_arrive_in_order_and_out_of_order_takes_are_refused(numbered_file: TensorInfo) -> None:
    ranges = [ByteRange(numbered_file, start, 16) for start in range(0, 64, 16)]
    pool = BufferPool(16, 3)
    with TensorReader(InputFiles(None)) as reader, ReadAhead(reader, ranges, pool, depth=2) as read_ahead:
        for expected in ranges[:2]:
            buffer, release = read_ahead.take(expected)
            assert bytes(buffer.numpy()) == bytes(range(expected.start, expected.start + 16))
            release()
        with pytest.raises(RuntimeError, match="read ahead"):
            read_ahead.take(ranges[3])
    assert pool._free.qsize() == 3  # what was read but not taken went back to the pool
    assert merge_threads() == []
