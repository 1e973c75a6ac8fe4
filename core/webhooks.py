"""Callbacks of finished jobs, the Standard Webhooks way: which URLs may be called (the allow-list and the
SSRF rules), the signed request (headers, body) and the delivery record a job gets when it ends.

Pure rules, no I/O but name resolution: the API checks a `callback_url` with them at submission, and the
delivery (`core.notify`) checks the same URL again right before each attempt, since a name may resolve
elsewhere by then (DNS rebinding), and connects to the address it checked.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import ipaddress
import json
import socket
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote, urlsplit

import httpx

from adapter_merge.core.jobs import JobRecord, JobStatus, WebhookDelivery
from adapter_merge.core.problems import Problem, Problems
from adapter_merge.core.settings import Settings

FIELD = "callback_url"
DEFAULT_PORTS = {"http": 80, "https": 443}
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def sign(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: HMAC-SHA256 over `{id}.{timestamp}.{body}`, base64, version `v1`; the
    key is `Settings.webhook_key`."""
    digest = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Headers of one attempt: the id stays the same on every retry, the timestamp is the attempt's own (a
    receiver refuses stale timestamps, so a retry hours later must not carry the first one)."""
    return {"webhook-id": webhook_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(key, webhook_id, timestamp, body), "content-type": "application/json"}


def event_body(job: JobRecord, public_url: str | None = None) -> bytes:
    """The POST body, the same bytes on every attempt: built from the finished job, which no longer changes.
    Links are absolute under the API's `public_url` (`MERGE_PUBLIC_URL`), else paths on the API."""
    link = f"{public_url or ''}/jobs/{job.id}"
    succeeded = job.status is JobStatus.succeeded
    ended = job.finished_at or (job.webhook.created_at if job.webhook else None)
    data = {
        "id": job.id, "tenant": job.tenant, "status": job.status.value, "request_digest": job.request_digest,
        "reused_from": job.reused_from, "finished_at": _iso(ended),
        "artifacts": [{**artifact.model_dump(mode="json"), "url": f"{link}/artifacts/{quote(artifact.path)}"}
                      for artifact in job.artifacts] if succeeded else [],
        "published": job.published.model_dump(mode="json") if job.published else None,
        "error": job.error,
        "links": {"job": link, "archive": f"{link}/archive" if succeeded else None},
    }
    event = {"type": f"job.{job.status.value}", "timestamp": _iso(ended), "data": data}
    return json.dumps(event, separators=(",", ":")).encode()


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment else None


def pending_delivery(job: JobRecord, now: float) -> WebhookDelivery | None:
    """The delivery a job gets as it ends (any terminal status, however it got there), due at once; None
    without a `callback_url`, and the one it has if it has one already. `now` is the store's clock
    (`JobStore.now()`), against which due deliveries are found. The store's state rules call it for jobs that
    end; code that creates a job already finished (a reused result) calls it too."""
    if job.request.callback_url is None or job.webhook is not None:
        return job.webhook
    moment = datetime.fromtimestamp(now, UTC)
    return WebhookDelivery(id=f"msg_{uuid.uuid4().hex}", created_at=moment, next_attempt_at=moment)


class CallbackRefused(Exception):
    """The URL may not be called: its form, its host or an address it resolves to breaks the rules."""


@dataclass(frozen=True)
class HostPolicy:
    """`MERGE_WEBHOOK_ALLOWED_HOSTS`: host name patterns (`*` matches any text) and IP addresses or networks.
    Only a listed address or network admits a special (loopback, private, link-local, ...) address."""

    names: tuple[str, ...]
    networks: tuple[IPNetwork, ...]

    @classmethod
    def parse(cls, text: str) -> HostPolicy:
        names, networks = [], []
        for entry in (part.strip().lower() for part in text.split(",")):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                names.append(entry.rstrip("."))
        return cls(tuple(names), tuple(networks))

    def listed(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)

    def named(self, host: str) -> bool:
        return any(fnmatch.fnmatchcase(host, pattern) for pattern in self.names)


@dataclass(frozen=True)
class Callback:
    """A URL that passed the rules, as the HTTP client parses it, and the checked address to connect to."""

    url: httpx.URL
    host: str
    address: IPAddress


def resolve_callback(url: str, policy: HostPolicy) -> Callback:
    """Check `url` against the rules and the addresses its host has now; raises `CallbackRefused`, or
    `OSError` when the name does not resolve (which may pass). The URL is read by the parser of the client that
    will send the request (and refused where the standard library's reads it otherwise), so the host checked
    is the host connected to."""
    try:
        parsed, parts = httpx.URL(url), urlsplit(url)
        port = parts.port
    except (httpx.InvalidURL, ValueError) as error:
        raise CallbackRefused(f"is not a valid URL ({error})") from None
    if parsed.scheme not in DEFAULT_PORTS:
        raise CallbackRefused(f"must be an http or https URL, not {parsed.scheme or 'scheme-less'}")
    if parsed.userinfo or parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise CallbackRefused("must not carry a user name or password")
    host = parsed.host.rstrip(".")
    if not host:
        raise CallbackRefused("has no host")
    default = DEFAULT_PORTS[parsed.scheme]
    if (parsed.port or default) != (port or default) or port == 0:
        raise CallbackRefused(f"has an invalid port ({port})")
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        kind = _special_kind(literal)
        if policy.listed(_canonical(literal)) or (kind is None and policy.named(host)):
            return Callback(parsed, host, literal)
        raise CallbackRefused(_not_allowed(host) if kind is None else f"{host} is {kind}{_UNLESS_LISTED}")
    if not policy.named(host):
        raise CallbackRefused(_not_allowed(host))
    try:
        found = socket.getaddrinfo(parsed.raw_host.decode("ascii").rstrip("."), port, type=socket.SOCK_STREAM)
    except UnicodeError as error:
        raise CallbackRefused(f"has an invalid host name ({error})") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in found]
    for address in addresses:
        kind = _special_kind(address)
        if kind is not None and not policy.listed(_canonical(address)):
            raise CallbackRefused(f"host {host!r} resolves to {address}, {kind}{_UNLESS_LISTED}")
    return Callback(parsed, host, addresses[0])


_UNLESS_LISTED = ", which callbacks may reach only where MERGE_WEBHOOK_ALLOWED_HOSTS lists it (the address or " \
    "its network)"


def _not_allowed(host: str) -> str:
    return f"host {host!r} is not among the hosts callbacks may go to (MERGE_WEBHOOK_ALLOWED_HOSTS)"


def _canonical(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one stands for (IPv4-mapped, NAT64), judged as that."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def _special_kind(address: IPAddress) -> str | None:
    """What makes an address one that callbacks must not reach unless listed (None: a public address)."""
    address = _canonical(address)
    for kind, flag in (("a loopback", address.is_loopback), ("a link-local", address.is_link_local),
                       ("a multicast", address.is_multicast), ("the unspecified", address.is_unspecified),
                       ("a private", address.is_private), ("a reserved", address.is_reserved),
                       ("a non-public", not address.is_global)):
        if flag:
            return f"{kind} address"
    return None


def check_callback_url(url: str | None, settings: Settings) -> None:
    """At submission: a 422 naming `callback_url` unless the service can sign callbacks and may call this URL
    (the same rules the delivery applies again before each attempt)."""
    if url is None:
        return
    if settings.webhook_key is None:
        raise _refused("callbacks are off: MERGE_WEBHOOK_SECRET is not set, and this service sends no unsigned "
                       "callbacks")
    if not settings.webhook_allowed_hosts.strip():
        raise _refused("callbacks are off: MERGE_WEBHOOK_ALLOWED_HOSTS lists no host")
    try:
        resolve_callback(url, HostPolicy.parse(settings.webhook_allowed_hosts))
    except CallbackRefused as error:
        raise _refused(str(error)) from None
    except OSError as error:
        raise _refused(f"its host does not resolve ({error.strerror or error})") from None


def _refused(reason: str) -> Problem:
    return Problem(Problems.CALLBACK_REFUSED, f"{FIELD}: {reason}", field=FIELD)
