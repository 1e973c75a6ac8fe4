"""Every knob of the service in one pydantic-settings object, read from `MERGE_*` environment variables.

The API, the embedded worker and the Celery worker all build their settings here, so a deployment sets a
variable once and every process agrees on it (data dir, roots, lease timings, Redis prefix).
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Service configuration; see the README for the table of variables."""

    model_config = SettingsConfigDict(env_prefix="MERGE_", extra="ignore")

    data_dir: Path = Field(Path("var/merge"), description="Job state (embedded mode), scratch and artifacts.")
    model_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Folders references may point into, separated by ':'; default <data_dir>/models.",
    )
    redis_url: str | None = Field(None, description="Set to run distributed: Celery broker and job store.")
    redis_prefix: str = Field("adapter-merge", description="Prefix of every Redis key (job store and broker).")
    queue: str = Field("adapter-merge", description="Celery queue the API publishes to and workers consume.")

    host: str = Field("127.0.0.1", description="Listen address of `adapter-merge serve`.")
    port: int = Field(8000, ge=0, le=65535, description="Listen port of `adapter-merge serve`.")
    log_level: str = Field("info", description="Python log level of every process.")
    log_format: Literal["text", "json"] = Field("text", description="`json`: every log line is a JSON object "
                                                "(time, level, logger, message, job_id, exception).")
    metrics_public: bool = Field(False, description="Serve `/metrics` without authentication (keep it from the "
                                 "outside at your proxy); otherwise it needs an admin token.")

    worker_concurrency: int = Field(1, ge=1, description="Merges at once per worker (each is CPU/RAM-heavy).")
    worker_nice: int = Field(10, ge=0, le=19, description="Niceness of the processes that merge (the embedded "
                             "worker's, Celery's pool): whatever else runs on their cores (the API, the worker's "
                             "own heartbeats, other services) is scheduled first; merges are batch work and take "
                             "longer only on a machine busy with other work. 0 treats them as any other process.")
    worker_max_tasks_per_child: int = Field(
        1, ge=0, description="Recycle a Celery pool process after this many jobs to hand its memory back; 0 never."
    )
    lease_seconds: float = Field(60.0, gt=0, description="A running job whose lease is not renewed for this long "
                                 "is considered lost (its worker died) and is re-run.")
    heartbeat_seconds: float = Field(10.0, gt=0, description="How often a running job renews its lease.")
    reap_interval_seconds: float = Field(15.0, gt=0, description="How often lost jobs are looked for.")
    max_recoveries: int = Field(3, ge=0, description="Re-runs after lost workers before a job is failed.")
    poll_seconds: float = Field(0.5, gt=0, description="Cancel checks, progress updates, embedded queue polling.")
    retention_seconds: float = Field(7 * 24 * 3600.0, ge=0, description="Finished jobs and their artifacts are "
                                     "deleted this long after they finish; 0 keeps them forever.")
    cleanup_interval_seconds: float = Field(300.0, gt=0, description="How often retention runs.")
    visibility_timeout_seconds: int = Field(
        6 * 3600, gt=0, description="Celery/Redis redelivery of unacknowledged messages. Leases, not this, "
        "recover lost jobs; it only has to exceed the queueing time of a job."
    )
    requeue_grace_seconds: float = Field(
        600.0, gt=0, description="Distributed mode: a job still queued this long after its message was published "
        "(by the store's clock) gets the message again, in case it was lost (the API died before publishing, the "
        "queue was deleted); at most once per grace period. A job that is only waiting its turn gets a duplicate, "
        "which a worker drops at once (the job's claim is the only gate): keep it well above usual queue waits."
    )
    min_free_bytes: int = Field(
        1 << 30, ge=0, description="Free space the data dir must keep: below it `POST /merge` answers 507 "
        "storage-full and `/readyz` 503. 1 GiB by default; set it to at least the largest output you expect, "
        "or a merge may still run out of space (it then fails as storage-full and its partial output is removed)."
    )

    auth: Literal["required", "none"] = Field(
        "required", description="`none` turns authentication off (every caller is an admin of the default "
        "tenant); `adapter-merge serve` then listens on loopback only.")
    api_keys_file: Path | None = Field(None, description="JSON file of API keys (sha256, tenant, role); "
                                       "reloaded when it changes.")
    oidc_issuer: str | None = Field(None, description="Accept JWTs from this OIDC issuer (keys from its JWKS).")
    oidc_audience: str | None = Field(None, description="The `aud` a JWT must carry (required with an issuer).")
    oidc_tenant_claim: str = Field("tenant", description="JWT claim that names the caller's tenant.")
    oidc_roles_claim: str = Field("roles", description="JWT claim listing the caller's roles (read, submit, admin).")
    allowed_sources: str = Field("", description="Remote sources references may name, comma-separated patterns "
                                 "such as `hf://myorg/*,s3://models-bucket/*,models:/*`; empty: local paths only.")
    tenant_allowed_sources: dict[str, str] = Field(
        default_factory=dict, description="Per tenant, patterns its references must also match (JSON, e.g. "
        '`{"team-a": "hf://team-a/*,s3://team-a-models/*"}`); a tenant not listed may use all of '
        "MERGE_ALLOWED_SOURCES.")
    cache_dir: Path | None = Field(None, description="Where workers keep downloaded inputs; default "
                                   "<data_dir>/cache/sources. Local disk or one shared volume.")
    cache_max_bytes: int | None = Field(None, ge=0, description="Byte budget of the download cache: least recently "
                                        "used entries no running job holds are evicted past it; unset: no limit.")
    download_timeout_seconds: float = Field(30.0, gt=0, description="Connect and read timeout of every registry "
                                            "request; a transfer that stalls this long fails (after retries).")
    download_retries: int = Field(3, ge=0, description="Retries, with backoff, of a failed registry request.")
    publish_part_bytes: int = Field(32 << 20, ge=5 << 20, description="Part size of S3 multipart uploads when "
                                    "publishing (S3's minimum is 5 MiB); larger files go multipart.")
    publish_threads: int = Field(4, ge=1, description="Uploads at once while publishing: parts of one S3 "
                                 "file, files of one hub commit.")
    publish_bytes_per_second: int | None = Field(None, gt=0, description="Upper bound of a job's publishing "
                                                 "rate (a shared uplink); unset: as fast as the registry takes it.")
    publish_ready_seconds: float = Field(300.0, gt=0, description="How long a new MLflow model version may take "
                                         "to become READY before publishing fails.")
    publish_mlflow_experiment: str = Field("adapter-merge", min_length=1, description="MLflow experiment that "
                                           "holds the runs of published models (created if missing).")
    tls_certfile: Path | None = Field(None, description="PEM certificate: `adapter-merge serve` speaks HTTPS.")
    tls_keyfile: Path | None = Field(None, description="PEM private key of the TLS certificate.")
    max_request_bytes: int = Field(64 * 1024, ge=1024, description="Largest request body; larger ones get 413 "
                                   "before they are read.")
    request_read_seconds: float = Field(10.0, gt=0, description="Time a client has to send a request's headers, "
                                        "and again its body; slower ones are cut off (408 for a body).")
    preflight_seconds: float = Field(30.0, gt=0, description="Time limit of checking a request's inputs before "
                                     "it is queued; past it, 503.")
    preflight_workers: int = Field(2, ge=1, description="Processes that check requests' inputs (per API process).")
    tenant_max_active_jobs: int = Field(100, ge=1, description="Queued + running jobs a tenant may have at once.")
    tenant_max_artifact_bytes: int | None = Field(None, ge=0, description="Bytes of results a tenant may keep; "
                                                  "unset: no limit.")
    webhook_secret: SecretStr | None = Field(
        None, description="Signing secret of job callbacks (Standard Webhooks): `whsec_` and base64 of at least 24 "
        "random bytes. Unset: requests with a `callback_url` are refused.")
    webhook_allowed_hosts: str = Field(
        "", description="Hosts callback URLs may name: comma-separated name patterns (`*` matches any text) and IP "
        "addresses or networks; only a listed address or network admits loopback, private, link-local and other "
        "special addresses. Empty: no callbacks.")
    webhook_timeout_seconds: float = Field(10.0, gt=0, description="Connect, send and answer timeout of one "
                                           "callback attempt.")
    webhook_backoff_seconds: float = Field(5.0, gt=0, description="Wait before the first retry of a callback; "
                                           "doubled each retry (with jitter), at most an hour.")
    webhook_retry_seconds: float = Field(86400.0, gt=0, description="A callback not delivered this long after the "
                                         "job ended is given up (`failed`).")
    webhook_concurrency: int = Field(4, ge=1, description="Callbacks one process sends at once: a receiver that "
                                     "does not answer holds up one sender for its timeouts, not every callback.")
    public_url: str | None = Field(None, description="The API's address as its clients reach it "
                                   "(`https://merge.example.com`, behind any proxy; a path prefix may follow): the "
                                   "links in job callbacks are absolute URLs under it. Unset: they are paths on the "
                                   "API (`/jobs/<id>`), which a receiver must know the API's address to follow.")

    @field_validator("model_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return [part for part in value.split(":") if part.strip()]
        return value

    @field_validator("redis_url", "api_keys_file", "tls_certfile", "tls_keyfile", "oidc_issuer", "oidc_audience",
                     "tenant_max_artifact_bytes", "webhook_secret", "public_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _heartbeat_fits_lease(self) -> Settings:
        if self.heartbeat_seconds * 2 > self.lease_seconds:
            raise ValueError(
                f"MERGE_HEARTBEAT_SECONDS ({self.heartbeat_seconds}) must be at most half of "
                f"MERGE_LEASE_SECONDS ({self.lease_seconds}), or a busy worker loses its lease"
            )
        return self

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret_decodes(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            _webhook_key(value.get_secret_value())
        return value

    @field_validator("public_url")
    @classmethod
    def _public_url_is_a_base(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"MERGE_PUBLIC_URL {value!r}: give the API's http(s) address, e.g. "
                             "https://merge.example.com, with no query or fragment")
        return value.strip().rstrip("/")

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("MERGE_TLS_CERTFILE and MERGE_TLS_KEYFILE go together")
        return self

    @model_validator(mode="after")
    def _audience_with_issuer(self) -> Settings:
        if self.oidc_issuer and not self.oidc_audience:
            raise ValueError("MERGE_OIDC_AUDIENCE must be set with MERGE_OIDC_ISSUER: a token for another "
                             "service of the same issuer must not be accepted here")
        return self

    @property
    def cache_root(self) -> Path:
        return (self.cache_dir or self.data_dir / "cache" / "sources").absolute()

    @property
    def authenticated(self) -> bool:
        """Callers prove who they are: API keys or an OIDC issuer are configured."""
        return self.api_keys_file is not None or self.oidc_issuer is not None

    @property
    def distributed(self) -> bool:
        """Redis configured: Celery workers on Redis; otherwise the embedded one-machine mode."""
        return self.redis_url is not None

    @property
    def roots(self) -> list[Path]:
        """Model roots as absolute paths (the default root is created on first use)."""
        roots = self.model_roots or [self.data_dir / "models"]
        return [root.expanduser().absolute() for root in roots]

    @property
    def recovery_bound_seconds(self) -> float:
        """Worst case from a worker's death until its job is queued again (a free worker starts it at once)."""
        return self.lease_seconds + self.reap_interval_seconds

    @property
    def webhook_key(self) -> bytes | None:
        """The HMAC key of MERGE_WEBHOOK_SECRET; None when callbacks cannot be signed."""
        return None if self.webhook_secret is None else _webhook_key(self.webhook_secret.get_secret_value())


WEBHOOK_SECRET_PREFIX = "whsec_"
MIN_WEBHOOK_SECRET_BYTES = 24
"""Standard Webhooks' lower bound for a secret (192 bits)."""


def _webhook_key(secret: str) -> bytes:
    """A secret as Standard Webhooks writes them, `whsec_` and base64 (the prefix optional), decoded as the
    receiver decodes the same string, so that both hold the same key."""
    try:
        key = base64.b64decode(secret.removeprefix(WEBHOOK_SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("MERGE_WEBHOOK_SECRET is `whsec_` followed by base64; make one with: python -c 'import "
                         "base64, secrets; print(\"whsec_\" + base64.b64encode(secrets.token_bytes(32)).decode())'"
                         ) from None
    if len(key) < MIN_WEBHOOK_SECRET_BYTES:
        raise ValueError(f"MERGE_WEBHOOK_SECRET must hold at least {MIN_WEBHOOK_SECRET_BYTES} random bytes, this "
                         f"one has {len(key)}")
    return key

