"""Who is calling: the credential a request was authenticated with, and the shop it acts for."""

from __future__ import annotations

from typing import Literal

import msgspec

from api.db import Tenant

CredentialKind = Literal["publishable", "secret", "restricted", "oauth"]


class Principal(msgspec.Struct, frozen=True):
    """The authenticated caller. ``tenant`` comes from the credential and nothing else."""

    tenant: Tenant
    #: Stable id of the credential, for rate limits and audit: ``key:<uuid>`` or ``client:<id>``.
    credential_id: str
    kind: CredentialKind
    scopes: frozenset[str]
    allowed_origins: tuple[str, ...] = ()
    client_id: str | None = None

    @property
    def shop_bucket(self) -> str:
        """The rate-limit bucket all of this shop's credentials share."""
        return f"shop:{self.tenant.id}"

    def has_scopes(self, required: frozenset[str]) -> bool:
        return required <= self.scopes
