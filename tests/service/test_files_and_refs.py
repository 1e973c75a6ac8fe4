"""Byte ranges, the streamed tar, and reference resolution: the pieces that guard what leaves and enters."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from adapter_merge.core.problems import Problem
from adapter_merge.core.refs import BadReference, LocalRootsResolver
from adapter_merge.service.files import ByteRange, parse_range, tar_stream


@pytest.mark.parametrize(("header", "expected"), [
    (None, None),
    ("bytes=0-9", ByteRange(0, 9)),
    ("bytes=10-", ByteRange(10, 99)),
    ("bytes=-5", ByteRange(95, 99)),
    ("bytes=-500", ByteRange(0, 99)),
    ("bytes=90-1000", ByteRange(90, 99)),
    ("items=0-5", None),  # unknown unit: ignored, the whole file is sent (RFC 9110)
])
def test_parse_range(header: str | None, expected: ByteRange | None) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=5-2", "bytes=0-1,5-6", "bytes=abc", "bytes=-0", "bytes=-"])
def test_bad_ranges_are_416_naming_the_header(header: str) -> None:
    with pytest.raises(Problem) as caught:
        parse_range(header, 100)
    assert caught.value.status == 416
    assert header in caught.value.detail and caught.value.headers["Content-Range"] == "bytes */100"


def test_tar_stream_has_exact_length_and_contents(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"x" * 1000)
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / ("n" * 150)).write_bytes(b"long name")  # needs a PAX header
    names = ["a.bin", "empty", "n" * 150]
    length, chunks = tar_stream(tmp_path, names, "job", 0.0)
    data = b"".join(chunks)
    assert len(data) == length
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        members = archive.getmembers()
        assert [member.name for member in members] == [f"job/{name}" for name in names]
        assert [archive.extractfile(member).read() for member in members] == [
            (tmp_path / name).read_bytes() for name in names]


def test_references_stay_inside_the_roots(tmp_path: Path) -> None:
    root, second, outside = tmp_path / "root", tmp_path / "second", tmp_path / "outside"
    for folder in (root / "model", second / "model", outside):
        folder.mkdir(parents=True)
    (root / "link-out").symlink_to(outside)
    (root / "link-in").symlink_to(second / "model")
    resolver = LocalRootsResolver([root, second])
    assert resolver.resolve("model", "base_model") == root / "model"
    assert resolver.resolve(str(second / "model"), "base_model") == second / "model"
    assert resolver.resolve("link-in", "base_model") == second / "model"  # a link into another root is fine
    assert resolver.resolve("x/../model", "base_model") == root / "model"
    for ref, slug in [("../outside", "reference-outside-roots"), ("link-out", "reference-outside-roots"),
                      (str(outside), "reference-outside-roots"), ("missing", "reference-not-found"),
                      ("a\x00b", "reference-invalid")]:
        with pytest.raises(BadReference) as caught:
            resolver.resolve(ref, "adapters[1].ref")
        assert caught.value.kind.slug == slug and caught.value.detail.startswith("adapters[1].ref: ")


def test_a_deep_git_folder_does_not_refuse_a_base(tmp_path: Path) -> None:
    """The merge never enters `.git` or an export folder, so neither counts against the folder limits; a
    sub-folder the merge copies still does."""
    root = tmp_path / "models"
    base = root / "base"
    (base / ".git" / "objects" / "ab" / "cd").mkdir(parents=True)
    (base / ".git" / "objects" / "ab" / "cd" / "blob").write_bytes(b"x")
    (base / "onnx" / "a" / "b" / "c").mkdir(parents=True)
    resolver = LocalRootsResolver([root])
    assert resolver.resolve("base", "base_model") == base.resolve()
    (base / "1_Pooling" / "a" / "b" / "c").mkdir(parents=True)
    with pytest.raises(BadReference, match="nested deeper"):
        resolver.resolve("base", "base_model")
