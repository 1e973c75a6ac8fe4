"""Who may do what: a caller's tenant and role, and the rules that keep tenants apart.

A job belongs to the tenant of the caller that submitted it. Callers see, cancel, download and delete their
own tenant's jobs only (another tenant's job is reported as not existing); admins see every tenant's.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from adapter_merge.core.jobs import DEFAULT_TENANT, JobRecord


class Role(StrEnum):
    read = "read"
    """See the tenant's jobs and download their results."""
    submit = "submit"
    """read, plus submit, cancel and delete."""
    admin = "admin"
    """Everything, for every tenant."""

    @property
    def rank(self) -> int:
        return list(Role).index(self)


@dataclass(frozen=True)
class Principal:
    subject: str
    """Who the caller is, for logs: a key's fingerprint or a token's `sub`."""
    tenant: str
    role: Role

    def may(self, needed: Role) -> bool:
        return self.role.rank >= needed.rank

    def sees(self, job: JobRecord) -> bool:
        return self.role is Role.admin or job.tenant == self.tenant

    @property
    def listed_tenant(self) -> str | None:
        """The tenant whose jobs a listing shows; None (all tenants) for an admin."""
        return None if self.role is Role.admin else self.tenant


ANONYMOUS = Principal("anonymous", DEFAULT_TENANT, Role.admin)
"""Every caller when authentication is off (MERGE_AUTH=none, loopback only)."""
