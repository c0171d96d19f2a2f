"""From an ``Authorization`` header to a :class:`Principal`, in one place.

API keys are looked up by HMAC once and then cached in process; access tokens are verified
locally against the JWKS. Either way the hot path usually costs no database round trip.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal
from uuid import UUID

from api.auth import api_keys
from api.auth.key_format import KeyFormatError, looks_like_api_key, parse_key
from api.auth.principal import Principal
from api.auth.revocations import RevocationFeed
from api.auth.secrets import Keyring
from api.auth.tokens import InvalidToken, TokenService
from api.db import Database, Tenant
from api.errors import Problem

log = logging.getLogger("sjaak.auth")

FailureReason = Literal[
    "missing", "malformed", "checksum", "unknown", "expired", "revoked", "invalid_token"
]
_CACHE_LIMIT = 10_000
_LAST_USED_EVERY = 60.0


class AuthenticationFailed(Problem):
    """401 with a ``WWW-Authenticate`` challenge and the reason, never whose key it was."""

    def __init__(self, reason: FailureReason, detail: str) -> None:
        challenge = 'Bearer realm="sjaak"'
        if reason != "missing":
            challenge += f', error="invalid_token", error_description="{reason}"'
        super().__init__("unauthenticated", detail, headers={"WWW-Authenticate": challenge})
        self.reason = reason


_MISSING = object()


class _CachedKey:
    """A verified key as the hot path needs it: the principal built once, times as epochs."""

    __slots__ = ("expires_at", "key_id", "principal", "revoked", "tenant_status")

    def __init__(
        self,
        key_id: UUID,
        principal: Principal,
        expires_at: float | None,
        revoked: bool,
        tenant_status: str,
    ) -> None:
        self.key_id = key_id
        self.principal = principal
        self.expires_at = expires_at
        self.revoked = revoked
        self.tenant_status = tenant_status

    @classmethod
    def of(cls, found: api_keys.VerifiedKey) -> _CachedKey:
        return cls(
            key_id=found.id,
            principal=Principal(
                tenant=Tenant(id=found.tenant_id, schema=found.schema_name),
                credential_id=f"key:{found.id}",
                kind=found.kind,
                scopes=found.scopes,
                allowed_origins=found.allowed_origins,
            ),
            expires_at=found.expires_at.timestamp() if found.expires_at else None,
            revoked=found.revoked_at is not None,
            tenant_status=found.tenant_status,
        )


class Authenticator:
    def __init__(
        self,
        db: Database,
        keyring: Keyring,
        tokens: TokenService,
        feed: RevocationFeed,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = db
        self._keyring = keyring
        self.tokens = tokens
        self._feed = feed
        self._clock = clock
        # HMAC digest -> key row (None: known not to exist), in least-recently-used order.
        self._keys: OrderedDict[bytes, _CachedKey | None] = OrderedDict()
        self._tenants: OrderedDict[UUID, tuple[str, str]] = OrderedDict()
        self._revoked_jti: dict[str, float] = {}
        self._revoked_clients: dict[str, float] = {}
        self._revoked_jti_loaded = False
        self._last_used: dict[UUID, datetime] = {}
        self._last_used_written: dict[UUID, float] = {}
        self._feed_lock = asyncio.Lock()

    async def authenticate(self, authorization: str | None) -> Principal:
        token = _bearer_token(authorization)
        if self._feed.due():
            await self.refresh_revocations()
        if looks_like_api_key(token):
            return await self._from_api_key(token)
        return await self._from_access_token(token)

    async def _from_api_key(self, key: str) -> Principal:
        cache_key = self._keyring.digest(key)
        cached = self._keys.get(cache_key, _MISSING)
        if cached is _MISSING:
            try:
                parse_key(key)
            except KeyFormatError as exc:
                raise AuthenticationFailed(exc.reason, str(exc)) from exc
            found = await api_keys.find_key(self._db, self._keyring.candidate_digests(key))
            cached = None if found is None else _CachedKey.of(found)
            self._remember(cache_key, cached)
        else:
            # Only a well-formed key with a valid checksum was ever looked up and cached.
            self._keys.move_to_end(cache_key)
        if cached is None:
            raise AuthenticationFailed("unknown", "The API key is not recognised.")
        assert isinstance(cached, _CachedKey)
        now = self._clock()
        if cached.revoked:
            raise AuthenticationFailed("revoked", "The API key has been revoked.")
        if cached.expires_at is not None and cached.expires_at <= now:
            raise AuthenticationFailed("expired", "The API key has expired.")
        if cached.tenant_status != "active":
            _ensure_shop_serves(cached.tenant_status)
        if now - self._last_used_written.get(cached.key_id, 0.0) >= _LAST_USED_EVERY:
            self._last_used[cached.key_id] = datetime.fromtimestamp(now, UTC)
        return cached.principal

    async def _from_access_token(self, token: str) -> Principal:
        if token.count(".") != 2:
            raise AuthenticationFailed(
                "malformed", "The bearer token is neither an API key nor an access token."
            )
        try:
            claims = await self.tokens.verify(token)
        except InvalidToken as exc:
            raise AuthenticationFailed("invalid_token", str(exc)) from exc
        if self.is_revoked(claims.jti, claims.client_id):
            raise AuthenticationFailed("revoked", "The access token has been revoked.")
        tenant = await self._tenant_for_token(claims.tenant_id)
        return Principal(
            tenant=tenant,
            credential_id=f"client:{claims.client_id}",
            kind="oauth",
            scopes=claims.scopes,
            client_id=claims.client_id,
        )

    async def _tenant_for_token(self, tenant_id: UUID) -> Tenant:
        """The token's shop, cached like keys are (and dropped on suspension or deletion)."""
        cached = self._tenants.get(tenant_id)
        if cached is None:
            async with self._db.control() as conn:
                row = await conn.fetchrow(
                    "SELECT schema_name, status FROM sjaak.tenants WHERE id = $1", tenant_id
                )
            if row is None:
                raise AuthenticationFailed("invalid_token", "The token's shop does not exist.")
            cached = (row["schema_name"], row["status"])
            self._tenants[tenant_id] = cached
            while len(self._tenants) > _CACHE_LIMIT:
                self._tenants.popitem(last=False)
        schema, status = cached
        _ensure_shop_serves(status)
        return Tenant(id=tenant_id, schema=schema)

    def _remember(self, digest: bytes, found: _CachedKey | None) -> None:
        self._keys[digest] = found
        while len(self._keys) > _CACHE_LIMIT:
            self._keys.popitem(last=False)

    def forget_key(self, key_id: str) -> None:
        """Drop a key from the cache so its next use reads the database again."""
        for digest, found in list(self._keys.items()):
            if found is not None and str(found.key_id) == key_id:
                del self._keys[digest]

    def forget_tenant(self, tenant_id: str) -> None:
        self._tenants.pop(UUID(tenant_id), None)
        for digest, found in list(self._keys.items()):
            if found is not None and str(found.principal.tenant.id) == tenant_id:
                del self._keys[digest]

    def forget_access_token(self, jti: str, expires_at: float) -> None:
        self._revoked_jti[jti] = expires_at

    def forget_client(self, client_id: str) -> None:
        """Refuse the client's access tokens from now on (they live at most one token TTL)."""
        self._revoked_clients[client_id] = self._clock() + self.tokens.ttl_seconds

    def is_revoked(self, jti: str, client_id: str | None = None) -> bool:
        return jti in self._revoked_jti or (
            client_id is not None and client_id in self._revoked_clients
        )

    async def refresh_revocations(self) -> None:
        """Apply revocations made elsewhere, at most once per poll interval."""
        if not self._feed.due():
            return
        async with self._feed_lock:
            if not self._feed.due():
                return
            # The first poll only marks where the feed stands; reading the standing revocations
            # after it means one made in between is seen twice rather than missed.
            revocations = await self._feed.poll()
            if not self._revoked_jti_loaded:
                self._revoked_jti.update(await self._feed.revoked_access_tokens())
                for client_id in await self._feed.recently_revoked_clients(self.tokens.ttl_seconds):
                    self.forget_client(client_id)
                self._revoked_jti_loaded = True
            for revocation in revocations:
                if revocation.kind == "api_key":
                    self.forget_key(revocation.subject)
                elif revocation.kind == "tenant":
                    self.forget_tenant(revocation.subject)
                elif revocation.kind == "access_token":
                    self._revoked_jti[revocation.subject] = self._clock() + 3600
                elif revocation.kind == "oauth_client":
                    self.forget_client(revocation.subject)
            now = self._clock()
            for revoked in (self._revoked_jti, self._revoked_clients):
                for subject in [s for s, expires in revoked.items() if expires < now]:
                    del revoked[subject]

    async def flush_last_used(self) -> None:
        """Write pending ``last_used_at`` values; run periodically by the app, off requests."""
        pending, self._last_used = self._last_used, {}
        if not pending:
            return
        try:
            await api_keys.record_last_used(self._db, pending)
        except Exception:
            log.warning("could not record key use; will retry", exc_info=True)
            self._last_used.update(pending)
            return
        written_at = self._clock()
        for key_id in pending:
            self._last_used_written[key_id] = written_at


def _ensure_shop_serves(status: str) -> None:
    if status == "suspended":
        raise Problem(
            "tenant-suspended", "This shop is suspended. Contact support to have it resumed."
        )
    if status != "active":
        raise AuthenticationFailed("unknown", "The API key is not recognised.")


def _bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise AuthenticationFailed(
            "missing", "Send a credential: `Authorization: Bearer <API key or access token>`."
        )
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed(
            "malformed", "The Authorization header must be `Bearer <API key or access token>`."
        )
    return token.strip()
