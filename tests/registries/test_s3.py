"""moto's S3 on loopback answers what boto3 asks for model files (listing, HEAD with checksums, ranged GETs,
versions, conditional writes), and the request log counts what it served, per key."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from tests.registries.fixtures import TinyModels
from tests.registries.s3 import S3Server, sha256_base64

SHARD = "model-00001-of-00003.safetensors"


def test_upload_list_and_head_with_sha256_checksums(s3: S3Server, s3_bucket: str, tiny_models: TinyModels) -> None:
    uploaded = s3.upload_folder(tiny_models.base, s3_bucket, "models/base")
    local = sorted(p.relative_to(tiny_models.base).as_posix() for p in tiny_models.base.rglob("*") if p.is_file())
    assert [item.key for item in uploaded] == [f"models/base/{name}" for name in local]
    client = s3.client()
    listed = client.list_objects_v2(Bucket=s3_bucket, Prefix="models/base/")["Contents"]
    assert {(item["Key"], item["Size"]) for item in listed} == {(item.key, item.size) for item in uploaded}
    for item in uploaded:
        head = client.head_object(Bucket=s3_bucket, Key=item.key, ChecksumMode="ENABLED")
        assert head["ChecksumSHA256"] == sha256_base64(item.sha256)  # single-part: the whole file's sha256
        assert head["ResponseMetadata"]["HTTPHeaders"]["x-amz-checksum-sha256"] == head["ChecksumSHA256"]
        assert head["VersionId"] == item.version_id is not None
    assert s3.requests.count(kind="PutObject") == len(local) and s3.requests.count(kind="HeadObject") == 2 * len(local)


def test_ranged_get_reads_a_safetensors_header(s3: S3Server, s3_bucket: str, tiny_models: TinyModels) -> None:
    s3.upload_folder(tiny_models.base, s3_bucket, "base")
    client, key = s3.client(), f"base/{SHARD}"
    first = client.get_object(Bucket=s3_bucket, Key=key, Range="bytes=0-7")
    size = (tiny_models.base / SHARD).stat().st_size
    assert first["ResponseMetadata"]["HTTPStatusCode"] == 206 and first["ContentRange"] == f"bytes 0-7/{size}"
    (length,) = struct.unpack("<Q", first["Body"].read())
    header = json.loads(client.get_object(Bucket=s3_bucket, Key=key, Range=f"bytes=8-{7 + length}")["Body"].read())
    assert "model.embed_tokens.weight" in header
    assert s3.gets(s3_bucket, key, ranged=True) == 2 and s3.gets(s3_bucket, key) == 0
    body = client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
    assert body == (tiny_models.base / SHARD).read_bytes() and s3.gets(s3_bucket, key) == 1
    with pytest.raises(ClientError) as past_end:
        client.get_object(Bucket=s3_bucket, Key=key, Range=f"bytes={size}-")
    assert past_end.value.response["Error"]["Code"] == "InvalidRange"


def test_versions_keep_old_bytes_readable(s3: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "adapter_config.json").write_text('{"r": 8}')
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "adapter_config.json").write_text('{"r": 16}')
    [old] = s3.upload_folder(tmp_path / "v1", s3_bucket, "lora")
    [new] = s3.upload_folder(tmp_path / "v2", s3_bucket, "lora")
    client = s3.client()
    versions = client.list_object_versions(Bucket=s3_bucket, Prefix="lora/")["Versions"]
    assert {item["VersionId"] for item in versions} == {old.version_id, new.version_id}
    pinned = client.get_object(Bucket=s3_bucket, Key="lora/adapter_config.json", VersionId=old.version_id)
    assert pinned["Body"].read() == b'{"r": 8}'
    assert client.get_object(Bucket=s3_bucket, Key="lora/adapter_config.json")["Body"].read() == b'{"r": 16}'


def test_multipart_etags_and_checksums_are_not_the_files_sha256(s3: S3Server, s3_bucket: str,
                                                                tmp_path: Path) -> None:
    """Over the threshold boto3 goes multipart: the ETag is an md5 of part md5s, "-N", and the checksum is one of
    part checksums (AWS adds "-N" to it, moto does not): neither is the file's sha256, so keep our own."""
    (tmp_path / "big").mkdir()
    data = os.urandom(6 * 1024 * 1024)
    (tmp_path / "big" / "weights.safetensors").write_bytes(data)
    [item] = s3.upload_folder(tmp_path / "big", s3_bucket, "mp", multipart_threshold=5 * 1024 * 1024)
    assert s3.requests.count(kind="UploadPart") == 2 and item.etag.endswith("-2")
    assert item.sha256 == hashlib.sha256(data).hexdigest()
    assert item.checksum_sha256 is not None and item.checksum_sha256 != sha256_base64(item.sha256)
    assert s3.client().get_object(Bucket=s3_bucket, Key=item.key)["Body"].read() == data


def test_conditional_put_refuses_to_overwrite(s3: S3Server, s3_bucket: str) -> None:
    """`If-None-Match: *` makes a manifest written last a commit marker: the second writer gets 412."""
    client = s3.client()
    client.put_object(Bucket=s3_bucket, Key="done.json", Body=b"{}", IfNoneMatch="*")
    with pytest.raises(ClientError) as second:
        client.put_object(Bucket=s3_bucket, Key="done.json", Body=b"{}", IfNoneMatch="*")
    assert second.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412


def test_the_env_is_all_a_process_needs(s3: S3Server, s3_bucket: str) -> None:
    """A fresh process with only `s3.env` (no endpoint argument) reaches this server: AWS_ENDPOINT_URL."""
    s3.client().put_object(Bucket=s3_bucket, Key="hello.txt", Body=b"hi")
    script = ("import boto3, sys; print(boto3.client('s3').get_object(Bucket=sys.argv[1], Key='hello.txt')"
              "['Body'].read().decode())")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/"), **s3.env}
    out = subprocess.run([sys.executable, "-c", script, s3_bucket], env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "hi"
    assert s3.gets(s3_bucket, "hello.txt") == 1
