"""Authentication, roles, tenants and quotas, against the app in process (embedded mode, no worker), with
API keys from a real file and JWTs from a real OIDC issuer on loopback (discovery + JWKS over HTTP)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient

from adapter_merge.core.context import JobContext
from adapter_merge.core.jobs import Artifact, JobRecord, JobStatus
from adapter_merge.core.settings import Settings
from adapter_merge.service.app import create_app
from tests.service.checks import problem
from tests.service.conftest import ModelSet

KEYS = {"a-submit": ("team-a", "submit"), "a-read": ("team-a", "read"), "b-submit": ("team-b", "submit"),
        "root": ("ops", "admin")}
AUDIENCE = "adapter-merge-test"


def write_keys(path: Path, keys: dict[str, tuple[str, str]]) -> None:
    entries = [{"sha256": hashlib.sha256(key.encode()).hexdigest(), "tenant": tenant, "role": role}
               for key, (tenant, role) in keys.items()]
    path.write_text(json.dumps({"keys": entries}))


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


class Issuer:
    """A minimal OIDC issuer on loopback: discovery document, JWKS, and tokens signed with its RSA key."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        jwks = json.dumps({"keys": [{**jwk, "kid": "test-key", "use": "sig", "alg": "RS256"}]}).encode()
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = {"/.well-known/openid-configuration": json.dumps(
                    {"issuer": issuer.url, "jwks_uri": issuer.url + "/jwks"}).encode(), "/jwks": jwks}.get(self.path)
                self.send_response(200 if body else 404)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(body or b"{}")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def token(self, tenant: str | None = "team-c", roles: object = ("submit",), **overrides: object) -> str:
        claims = {"iss": self.url, "aud": AUDIENCE, "sub": "someone", "exp": int(time.time()) + 300,
                  "tenant": tenant, "roles": list(roles) if isinstance(roles, tuple) else roles, **overrides}
        return jwt.encode({k: v for k, v in claims.items() if v is not None}, self.key, algorithm="RS256",
                          headers={"kid": "test-key"})


@pytest.fixture(scope="module")
def issuer() -> Iterator[Issuer]:
    issuer = Issuer()
    yield issuer
    issuer.server.shutdown()


@pytest.fixture(scope="module")
def settings(models: ModelSet, tmp_path_factory: pytest.TempPathFactory, issuer: Issuer) -> Settings:
    data = tmp_path_factory.mktemp("auth-data")
    write_keys(data / "keys.json", KEYS)
    return Settings(data_dir=data, model_roots=[models.root], auth="required", api_keys_file=data / "keys.json",
                    oidc_issuer=issuer.url, oidc_audience=AUDIENCE, tenant_max_active_jobs=3)


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


def submit(client: TestClient, token: str, request: dict) -> dict:
    response = client.post("/merge", json=request, headers=bearer(token))
    assert response.status_code == 202, response.text
    return response.json()


def test_no_or_bad_token_is_401_with_a_bearer_challenge(client: TestClient, small_request: dict) -> None:
    for headers in ({}, bearer("not-a-key"), {"authorization": "Basic YTpi"}):
        for method, path in (("GET", "/jobs"), ("GET", "/jobs/x"), ("POST", "/merge")):
            response = client.request(method, path, headers=headers, json=small_request)
            problem(response, 401)
            assert response.headers["www-authenticate"].startswith("Bearer")
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200


def test_roles_limit_what_a_key_may_do(client: TestClient, small_request: dict) -> None:
    problem(client.post("/merge", json=small_request, headers=bearer("a-read")), 403, "'read'")
    job = submit(client, "a-submit", small_request)
    assert job["tenant"] == "team-a"
    assert client.get(f"/jobs/{job['id']}", headers=bearer("a-read")).status_code == 200
    problem(client.post(f"/jobs/{job['id']}/cancel", headers=bearer("a-read")), 403)
    assert client.post(f"/jobs/{job['id']}/cancel", headers=bearer("a-submit")).json()["status"] == "cancelled"


def test_tenants_cannot_see_or_touch_each_others_jobs(client: TestClient, small_request: dict) -> None:
    mine = submit(client, "a-submit", small_request)
    theirs = submit(client, "b-submit", small_request)
    for path in (f"/jobs/{theirs['id']}", f"/jobs/{theirs['id']}/archive",
                 f"/jobs/{theirs['id']}/artifacts/config.json"):
        problem(client.get(path, headers=bearer("a-submit")), 404, "does not exist")
    problem(client.post(f"/jobs/{theirs['id']}/cancel", headers=bearer("a-submit")), 404)
    problem(client.delete(f"/jobs/{theirs['id']}", headers=bearer("a-submit")), 404)
    listed = {job["id"] for job in client.get("/jobs?limit=500", headers=bearer("a-submit")).json()["items"]}
    assert mine["id"] in listed and theirs["id"] not in listed
    assert client.get(f"/jobs/{theirs['id']}", headers=bearer("b-submit")).json()["status"] == "queued"
    everything = client.get("/jobs?limit=500", headers=bearer("root")).json()
    assert {mine["id"], theirs["id"]} <= {job["id"] for job in everything["items"]}
    for token, job in (("a-submit", mine), ("b-submit", theirs)):
        client.post(f"/jobs/{job['id']}/cancel", headers=bearer(token))


def test_oidc_tokens_carry_tenant_and_role(client: TestClient, issuer: Issuer, small_request: dict) -> None:
    job = submit(client, issuer.token(tenant="team-c", roles=("read", "submit")), small_request)
    assert job["tenant"] == "team-c"
    problem(client.get(f"/jobs/{job['id']}", headers=bearer("a-submit")), 404)
    assert client.get(f"/jobs/{job['id']}", headers=bearer(issuer.token(roles="read"))).status_code == 200
    problem(client.post("/merge", json=small_request, headers=bearer(issuer.token(roles=("read",)))), 403)
    problem(client.get("/jobs", headers=bearer(issuer.token(roles=["viewer"]))), 403, "grants none")
    for bad in (issuer.token(exp=int(time.time()) - 10), issuer.token(aud="another-service"),
                issuer.token(iss="http://elsewhere"), issuer.token(tenant=None),
                issuer.token()[:-4] + "AAAA"):
        response = client.get("/jobs", headers=bearer(bad))
        problem(response, 401)
        assert 'error="invalid_token"' in response.headers["www-authenticate"]
    forged = jwt.encode({"iss": issuer.url, "aud": AUDIENCE, "sub": "x", "exp": int(time.time()) + 60,
                         "tenant": "team-a", "roles": ["admin"]}, "a-guessed-shared-secret-32-bytes-long",
                        algorithm="HS256")
    problem(client.get("/jobs", headers=bearer(forged)), 401)
    client.post(f"/jobs/{job['id']}/cancel", headers=bearer("root"))


def test_keys_file_is_reloaded_when_it_changes(client: TestClient, settings: Settings) -> None:
    problem(client.get("/jobs", headers=bearer("new-key")), 401)
    assert settings.api_keys_file is not None
    write_keys(settings.api_keys_file, {**KEYS, "new-key": ("team-d", "read")})
    try:
        assert client.get("/jobs", headers=bearer("new-key")).status_code == 200
    finally:
        write_keys(settings.api_keys_file, KEYS)
    problem(client.get("/jobs", headers=bearer("new-key")), 401)


def test_active_job_quota_is_429(client: TestClient, small_request: dict) -> None:
    small_request = {**small_request, "reuse": False}  # each a job of its own, not attached to the first
    jobs = [submit(client, "b-submit", small_request) for _ in range(3)]
    response = client.post("/merge", json=small_request, headers=bearer("b-submit"))
    problem(response, 429, "team-b", "limit is 3")
    assert int(response.headers["retry-after"]) > 0
    assert submit(client, "a-submit", small_request)["tenant"] == "team-a"  # other tenants are not affected
    client.post(f"/jobs/{jobs[0]['id']}/cancel", headers=bearer("b-submit"))
    jobs.append(submit(client, "b-submit", small_request))  # room again once one is no longer active
    for job in jobs:
        client.post(f"/jobs/{job['id']}/cancel", headers=bearer("root"))


def test_artifact_quota_is_507(models: ModelSet, tmp_path: Path, small_request: dict) -> None:
    write_keys(tmp_path / "keys.json", KEYS)
    settings = Settings(data_dir=tmp_path, model_roots=[models.root], auth="required",
                        api_keys_file=tmp_path / "keys.json", tenant_max_artifact_bytes=1000)
    context = JobContext.open(settings)
    kept = JobRecord(id="kept", tenant="team-a", request=small_request, status=JobStatus.succeeded,
                     artifacts=[Artifact(path="model.safetensors", size=1000, sha256="0" * 64)])
    context.store.create(kept)
    with TestClient(create_app(settings)) as client:
        problem(client.post("/merge", json=small_request, headers=bearer("a-submit")), 507, "1000 bytes")
        submit(client, "b-submit", small_request)
        assert client.delete("/jobs/kept", headers=bearer("a-submit")).status_code == 204
        submit(client, "a-submit", small_request)


def test_the_schema_declares_bearer_auth(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert {"HTTPBearer": []} in schema["paths"]["/merge"]["post"]["security"]
