"""Who is calling: bearer tokens checked against static API keys or an OIDC issuer's signed JWTs.

API keys are stored as their sha256 only, in a JSON file that is re-read when it changes, and compared in
constant time. JWTs are verified with PyJWT (a small, well-kept library with JWKS support) against the keys
the issuer publishes (discovery, then its JWKS, cached); the tenant and roles come from configurable claims.
With neither configured every request is refused, unless authentication is explicitly off (MERGE_AUTH=none).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adapter_merge.core.access import ANONYMOUS, Principal, Role
from adapter_merge.core.problems import Problem, Problems
from adapter_merge.core.settings import Settings

log = logging.getLogger(__name__)
DISCOVERY_TIMEOUT_SECONDS = 5.0
JWKS_CACHE_SECONDS = 300
RETRY_SECONDS = 5
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]
"""Asymmetric algorithms only: a shared-secret (HS*) token could be forged by anyone holding the JWKS."""


class InvalidCredentials(Exception):
    """A token that proves nothing: unknown key, bad signature, expired, wrong issuer or audience."""


class _KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    tenant: str = Field(min_length=1, max_length=128)
    role: Role


class _KeyFileContent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[_KeyEntry]


class ApiKeys:
    """The keys file, re-read whenever its size or modification time changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._entries: list[_KeyEntry] = []
        self._load()  # a missing or malformed file stops the server at start, not at the first request

    def _load(self) -> None:
        stat = os.stat(self.path)
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return
        try:
            content = _KeyFileContent.model_validate(json.loads(self.path.read_text(encoding="utf-8")))
        except (ValueError, ValidationError) as error:
            raise ValueError(f"{self.path}: not a valid API keys file: {error}") from None
        self._entries, self._stamp = content.keys, stamp
        log.info("API keys loaded from %s: %d keys", self.path, len(self._entries))

    def lookup(self, token: str) -> Principal | None:
        with self._lock:
            try:
                self._load()
            except (OSError, ValueError) as error:  # keep serving with the keys we had
                log.error("API keys file not reloaded: %s", error)
            entries = self._entries
        digest = hashlib.sha256(token.encode()).hexdigest()
        found = None
        for entry in entries:  # every entry is compared, so the time taken does not tell which one matched
            if hmac.compare_digest(digest, entry.sha256):
                found = entry
        return Principal(f"key:{digest[:8]}", found.tenant, found.role) if found else None


@dataclass
class OidcTokens:
    """JWTs of one issuer and audience, verified against the issuer's published keys."""

    issuer: str
    audience: str
    tenant_claim: str
    roles_claim: str

    def __post_init__(self) -> None:
        self._jwks: jwt.PyJWKClient | None = None
        self._lock = threading.Lock()

    def _keys(self) -> jwt.PyJWKClient:
        with self._lock:
            if self._jwks is None:
                url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
                response = httpx.get(url, timeout=DISCOVERY_TIMEOUT_SECONDS)
                response.raise_for_status()
                self._jwks = jwt.PyJWKClient(response.json()["jwks_uri"], cache_keys=True,
                                             lifespan=JWKS_CACHE_SECONDS, timeout=int(DISCOVERY_TIMEOUT_SECONDS))
            return self._jwks

    def verify(self, token: str) -> Principal:
        try:
            key = self._keys().get_signing_key_from_jwt(token)
            claims = jwt.decode(token, key.key, algorithms=ALGORITHMS, audience=self.audience,
                                issuer=self.issuer, options={"require": ["exp", "iss", "aud", "sub"]})
        except (jwt.PyJWKClientConnectionError, httpx.HTTPError, KeyError) as error:
            raise Problem(Problems.AUTH_UNAVAILABLE, "the identity provider's keys cannot be fetched; try again",
                          retry_after=RETRY_SECONDS) from error
        except jwt.PyJWTError as error:
            raise InvalidCredentials(str(error)) from error
        tenant = claims.get(self.tenant_claim)
        if not isinstance(tenant, str) or not tenant:
            raise InvalidCredentials(f"the token has no {self.tenant_claim!r} claim naming a tenant")
        role = _highest_role(claims.get(self.roles_claim))
        if role is None:
            raise Problem(Problems.FORBIDDEN, f"the token's {self.roles_claim!r} claim grants none of the roles "
                          "read, submit, admin")
        return Principal(f"sub:{claims['sub']}", tenant, role)


def _highest_role(value: Any) -> Role | None:
    names = value.split() if isinstance(value, str) else value if isinstance(value, list) else []
    roles = [Role(name) for name in names if name in Role.__members__]
    return max(roles, key=lambda role: role.rank, default=None)


class Authenticator:
    """Turns a bearer token into a principal, by API key first, then as an OIDC JWT."""

    def __init__(self, settings: Settings) -> None:
        self.disabled = settings.auth == "none"
        self.keys = ApiKeys(settings.api_keys_file) if settings.api_keys_file else None
        self.oidc = OidcTokens(settings.oidc_issuer, settings.oidc_audience or "", settings.oidc_tenant_claim,
                               settings.oidc_roles_claim) if settings.oidc_issuer else None

    @property
    def may_wait(self) -> bool:
        """Whether `authenticate` may wait on the network (for an OIDC issuer's keys); API keys are a hash and a
        file that is re-read only when it changes."""
        return self.oidc is not None

    def authenticate(self, token: str | None) -> Principal:
        if self.disabled:
            return ANONYMOUS
        if not token:
            raise _unauthorized("send an Authorization: Bearer <token> header", error=None)
        principal = self.keys.lookup(token) if self.keys else None
        if principal is None and self.oidc is not None and token.count(".") == 2:
            try:
                principal = self.oidc.verify(token)
            except InvalidCredentials as error:
                raise _unauthorized(f"the token is not valid: {error}", error="invalid_token") from None
        if principal is None:
            raise _unauthorized("the token is not a known API key or a valid token", error="invalid_token")
        return principal


def _unauthorized(detail: str, error: str | None) -> Problem:
    challenge = 'Bearer realm="adapter-merge"' + (f', error="{error}"' if error else "")
    return Problem(Problems.UNAUTHORIZED, detail, headers={"WWW-Authenticate": challenge})


def forbid_unless(principal: Principal, needed: Role) -> None:
    if not principal.may(needed):
        raise Problem(Problems.FORBIDDEN, f"role {principal.role.value!r} may not do this; it needs "
                      f"{needed.value!r}", role=principal.role.value)
