"""Requests an attacker would send, against the app in process and over a real socket: each gets its
documented 4xx (never a 500), and none can hold the server."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient

from adapter_merge.core.problems import Problem
from adapter_merge.core.settings import Settings
from adapter_merge.service.app import create_app
from adapter_merge.service.files import parse_range
from tests.service.checks import problem
from tests.service.conftest import ModelSet
from tests.service.harness import launch_server, service_env, start_server, wait_for

JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def client(models: ModelSet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("hardening"), model_roots=[models.root], auth="none")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


@pytest.mark.parametrize(("body", "status", "slug"), [
    (b"[" * 30000 + b"]" * 30000, 400, "malformed-json"),  # nested deeper than the parser's stack
    (b'{"base_model": ' + b"9" * 5000 + b', "adapters": ["a"]}', 400, "malformed-json"),  # too many digits
    ('{"base_model": "é", "adapters": ["a"]}'.encode("latin-1"), 400, "malformed-json"),  # not UTF-8
    (b"x" * (64 * 1024 + 1), 413, "request-too-large"),
    (json.dumps({"base_model": "small/base", "adapters": ["small/lora"], "max_shard_size": ""}).encode(), 422,
     "validation-error"),
    (json.dumps({"base_model": "~abc", "adapters": ["small/lora"]}).encode(), 422, "reference-not-found"),
    (json.dumps({"base_model": "a" * 256, "adapters": ["small/lora"]}).encode(), 422, "reference-invalid"),
    (json.dumps({"base_model": "../../etc", "adapters": ["small/lora"]}).encode(), 422, "reference-outside-roots"),
])
def test_bad_bodies_get_their_4xx(client: TestClient, body: bytes, status: int, slug: str) -> None:
    response = client.post("/merge", content=body, headers=JSON)
    assert problem(response, status)["type"].endswith(slug)
    assert "/tmp" not in response.text and socket.gethostname() not in response.text  # no server paths or host


def test_a_huge_declared_body_is_refused_before_it_is_read(client: TestClient) -> None:
    response = client.post("/merge", content=b"{}", headers={**JSON, "content-length": "200000000"})
    problem(response, 413, "200000000")


def test_query_and_header_extremes(client: TestClient) -> None:
    problem(client.get("/jobs?offset=9223372036854775808"), 422, "offset")
    problem(client.get("/jobs?limit=0"), 422, "limit")
    response = client.put("/jobs/x")
    problem(response, 405)
    assert response.headers["allow"] == "DELETE, GET"


def test_range_with_thousands_of_digits() -> None:
    huge = "9" * 5000
    assert parse_range(f"bytes=0-{huge}", 100) == parse_range("bytes=0-", 100)
    with pytest.raises(Problem) as caught:
        parse_range(f"bytes={huge}-", 100)
    assert caught.value.status == 416


def test_slow_clients_are_cut_off(models: ModelSet, tmp_path: Path) -> None:
    env = service_env(tmp_path, models.root, MERGE_REQUEST_READ_SECONDS="1")
    process, api = start_server(env, tmp_path / "server.log")
    port = int(api.base_url.rsplit(":", 1)[1])
    try:
        with socket.create_connection(("127.0.0.1", port)) as slow_headers:
            started = time.monotonic()
            slow_headers.sendall(b"GET /healthz HTTP/1.1\r\n")  # and never the rest
            slow_headers.settimeout(10)
            assert slow_headers.recv(100) == b""  # closed by the server
            assert time.monotonic() - started < 5
        with socket.create_connection(("127.0.0.1", port)) as slow_body:
            slow_body.sendall(b"POST /merge HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Content-Length: 100\r\n\r\n{")
            slow_body.settimeout(10)
            assert slow_body.recv(100).startswith(b"HTTP/1.1 408")
    finally:
        api.close()
        process.stop()


def test_serve_refuses_to_run_unprotected(tmp_path: Path) -> None:
    base = {key: value for key, value in os.environ.items() if not key.startswith("MERGE_")}
    for env, needle in (({"MERGE_AUTH": "required"}, "no authentication is configured"),
                        ({"MERGE_AUTH": "none", "MERGE_HOST": "0.0.0.0"}, "not a loopback address")):
        result = subprocess.run([sys.executable, "-m", "adapter_merge.cli", "serve"], capture_output=True, text=True,
                                env={**base, "MERGE_DATA_DIR": str(tmp_path), **env}, timeout=60)
        assert result.returncode == 2 and needle in result.stderr, result.stderr


def test_links_out_of_the_roots_inside_a_model_folder_are_refused(models: ModelSet, tmp_path: Path) -> None:
    root = tmp_path / "root"
    for name in ("base", "lora"):
        (root / name).mkdir(parents=True)
        for file in (models.root / "small" / name).iterdir():
            (root / name / file.name).symlink_to(file)  # links within the roots are fine (the hub cache uses them)
    leaky = root / "leaky"
    leaky.mkdir()
    for file in (root / "base").iterdir():
        (leaky / file.name).symlink_to(file)
    (leaky / "tokenizer.json").symlink_to("/etc/passwd")
    swapped = root / "swapped"
    swapped.mkdir()
    (swapped / "config.json").symlink_to(root / "base" / "config.json")
    (swapped / "model.safetensors").symlink_to(models.outside / "base" / "model.safetensors")
    settings = Settings(data_dir=tmp_path / "data", model_roots=[root, models.root], auth="none")
    with TestClient(create_app(settings)) as client:
        assert client.post("/merge", json={"base_model": "base", "adapters": ["lora"]}).status_code == 202
        for base, needle in (("leaky", "tokenizer.json"), ("swapped", "model.safetensors")):
            response = client.post("/merge", json={"base_model": base, "adapters": ["lora"]})
            body = problem(response, 422, needle, "outside the model roots")
            assert body["field"] == "base_model" and "/etc" not in response.text


def write_self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=1))
                   .not_valid_after(now + timedelta(hours=1))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_serve_speaks_tls_when_given_a_certificate(models: ModelSet, tmp_path: Path) -> None:
    cert, key = write_self_signed(tmp_path)
    env = service_env(tmp_path, models.root, MERGE_TLS_CERTFILE=str(cert),
                      MERGE_TLS_KEYFILE=str(key))
    process, api = launch_server(env, tmp_path / "server.log")
    url = api.base_url.replace("http://", "https://")
    try:
        def answers() -> bool:
            try:
                return httpx.get(f"{url}/healthz", verify=ssl.create_default_context(cafile=str(cert))).is_success
            except httpx.TransportError:
                return False

        wait_for(answers, 30, lambda: f"TLS health: {process.tail()}")
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{api.base_url}/healthz")  # plain HTTP is not spoken
    finally:
        api.close()
        process.stop()
