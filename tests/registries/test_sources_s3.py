"""`s3://` references against moto's S3: pinned to every object under the prefix (size, ETag, version, sha256 when
S3 vouches for it), read by ranges, downloaded into the cache and verified; an object replaced after pinning is
still the pinned bytes in a versioned bucket and an error in a plain one; every missing reference a 422 naming
the field (malformed ones: test_sources_preflight); refused credentials 422, an absent S3 a 503."""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from adapter_merge.core.problems import Problems
from adapter_merge.core.sources.s3 import S3Source
from tests.registries.fixtures import TinyModels
from tests.registries.s3 import S3Server
from tests.registries.test_sources_common import closed_endpoint, fetch, files_of, problem_of, settings_for, use_env

SHARD = "model-00001-of-00003.safetensors"


@pytest.fixture
def s3_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    use_env(monkeypatch, s3)
    return s3


def test_pin_lists_every_object_under_the_prefix(s3_env: S3Server, s3_bucket: str, tiny_models: TinyModels,
                                                 tmp_path: Path) -> None:
    uploaded = {item.key: item for item in s3_env.upload_folder(tiny_models.base, s3_bucket, "models/base")}
    s3_env.upload_folder(tiny_models.adapter, s3_bucket, "models/base-lora")  # shares the prefix's characters
    source = S3Source(settings_for(tmp_path))
    pinned = source.pin(f"s3://{s3_bucket}/models/base/", "base_model")
    assert {file.path for file in pinned.files} == set(files_of(tiny_models.base))
    for file in pinned.files:
        item = uploaded[f"models/base/{file.path}"]
        assert (file.location, file.size, file.etag, file.version_id, file.sha256) == (
            item.key, item.size, item.etag, item.version_id, item.sha256)
    assert pinned.version["bucket"] == s3_bucket and pinned.version["prefix"] == "models/base"
    assert source.pin(f"s3://{s3_bucket}/models/base", "base_model").version == pinned.version
    settings = settings_for(tmp_path)
    assert files_of(fetch(settings, pinned)) == files_of(tiny_models.base)


def test_a_multipart_upload_has_no_sha256_and_still_downloads(s3_env: S3Server, s3_bucket: str,
                                                               tmp_path: Path) -> None:
    """Its checksum is one of part checksums and its ETag no MD5: only the size can be checked."""
    (tmp_path / "big").mkdir()
    data = os.urandom(6 * 1024 * 1024)
    (tmp_path / "big" / "weights.safetensors").write_bytes(data)
    [item] = s3_env.upload_folder(tmp_path / "big", s3_bucket, "mp", multipart_threshold=5 * 1024 * 1024)
    settings = settings_for(tmp_path)
    pinned = S3Source(settings).pin(f"s3://{s3_bucket}/mp", "base_model")
    [file] = pinned.files
    assert (file.sha256, file.etag) == (None, item.etag) and item.etag.endswith("-2")
    assert files_of(fetch(settings, pinned)) == {"weights.safetensors": data}


def test_an_object_replaced_after_pinning_in_a_versioned_bucket_is_still_the_pinned_one(
        s3_env: S3Server, s3_bucket: str, tiny_models: TinyModels, tmp_path: Path) -> None:
    s3_env.upload_folder(tiny_models.adapter, s3_bucket, "lora")
    settings = settings_for(tmp_path)
    pinned = S3Source(settings).pin(f"s3://{s3_bucket}/lora", "adapters[0].ref")
    s3_env.client().put_object(Bucket=s3_bucket, Key="lora/adapter_config.json", Body=b'{"r": 99}')
    assert files_of(fetch(settings, pinned, "adapters[0].ref")) == files_of(tiny_models.adapter)


def test_an_object_replaced_after_pinning_in_a_plain_bucket_is_a_failed_download(
        s3_env: S3Server, tiny_models: TinyModels, tmp_path: Path) -> None:
    bucket = "plain-replaced"
    s3_env.create_bucket(bucket)
    s3_env.upload_folder(tiny_models.adapter, bucket, "lora")
    source = S3Source(settings_for(tmp_path))
    pinned = source.pin(f"s3://{bucket}/lora", "adapters[0].ref")
    config = next(file for file in pinned.files if file.path == "adapter_config.json")
    assert config.version_id is None and config.etag
    s3_env.client().put_object(Bucket=bucket, Key="lora/adapter_config.json", Body=b'{"r": 99}')
    for call in (lambda: source.download(pinned, config, tmp_path / "config", lambda count: None),
                 lambda: source.read_range(pinned, config, 0, 8)):
        problem = problem_of(call)
        assert (problem.status, problem.kind, problem.members) == (
            502, Problems.DOWNLOAD_FAILED, {"ref": f"s3://{bucket}/lora", "file": "adapter_config.json"})
        assert "changed since it was pinned" in problem.detail


def test_read_range_reads_a_safetensors_header_and_no_tensor(s3_env: S3Server, s3_bucket: str,
                                                             tiny_models: TinyModels, tmp_path: Path) -> None:
    s3_env.upload_folder(tiny_models.base, s3_bucket, "base")
    source = S3Source(settings_for(tmp_path))
    pinned = source.pin(f"s3://{s3_bucket}/base", "base_model")
    shard = next(file for file in pinned.files if file.path == SHARD)
    (length,) = struct.unpack("<Q", source.read_range(pinned, shard, 0, 8))
    assert "model.embed_tokens.weight" in json.loads(source.read_range(pinned, shard, 8, length))
    assert s3_env.gets(s3_bucket, f"base/{SHARD}", ranged=True) == 2 and s3_env.gets(s3_bucket, f"base/{SHARD}") == 0


def test_a_key_that_is_no_path_makes_the_prefix_invalid(s3_env: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    s3_env.client().put_object(Bucket=s3_bucket, Key="odd/a/../b.json", Body=b"{}")
    problem = problem_of(lambda: S3Source(settings_for(tmp_path)).pin(f"s3://{s3_bucket}/odd", "base_model"))
    assert (problem.kind, problem.members["field"]) == (Problems.REFERENCE_INVALID, "base_model")
    assert "'a/../b.json'" in problem.detail


def test_a_missing_bucket_or_an_empty_prefix_is_422_reference_not_found(s3_env: S3Server, s3_bucket: str,
                                                                        tmp_path: Path) -> None:
    s3_env.client().put_object(Bucket=s3_bucket, Key="present/config.json", Body=b"{}")
    source = S3Source(settings_for(tmp_path))
    for ref in ("s3://no-such-bucket-here/x", f"s3://{s3_bucket}/absent", f"s3://{s3_bucket}/present/config.json"):
        problem = problem_of(lambda ref=ref: source.pin(ref, "adapters[2].ref"))
        assert (problem.status, problem.kind, problem.members) == (422, Problems.REFERENCE_NOT_FOUND,
                                                                   {"field": "adapters[2].ref", "ref": ref})


def test_missing_or_refused_credentials_are_422_reference_forbidden(tmp_path: Path, refusing_s3: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", refusing_s3)
    none = problem_of(lambda: S3Source(settings_for(tmp_path)).pin("s3://bucket/base", "base_model"))
    assert (none.kind, none.members["field"]) == (Problems.REFERENCE_FORBIDDEN, "base_model")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAREFUSED")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "refused-secret")
    refused = problem_of(lambda: S3Source(settings_for(tmp_path)).pin("s3://bucket/base", "base_model"))
    assert (refused.status, refused.kind) == (422, Problems.REFERENCE_FORBIDDEN) and "AccessDenied" in refused.detail
    assert "AKIA" not in refused.detail and "secret" not in refused.detail


def test_an_unreachable_endpoint_is_503(s3_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed_endpoint())
    problem = problem_of(lambda: S3Source(settings_for(tmp_path, download_timeout_seconds=1)).pin(
        "s3://bucket/base", "base_model"))
    assert (problem.status, problem.kind, problem.retry_after) == (503, Problems.REGISTRY_UNAVAILABLE, 15)
    assert problem.members == {"field": "base_model", "ref": "s3://bucket/base"} and "127.0.0.1" not in problem.detail


class _Refusing(BaseHTTPRequestHandler):
    """S3 refusing every request as it refuses unknown or unauthorised credentials."""

    def do_GET(self) -> None:
        body = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def refusing_s3() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
