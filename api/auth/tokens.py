"""Access tokens: RFC 9068 JWTs signed with a rotating set of RSA keys, verified locally.

The newest key signs. A key is retired (stops signing) after ``signing_key_rotation_days`` and
stays published in the JWKS for as long as a token it signed can live, so rotation never breaks
a token in flight. Private keys are stored encrypted with the service secret.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, RSAKey

from api.auth.secrets import Keyring
from api.config import Settings
from api.db import ControlConn, Database

ALGORITHM = "RS256"
TOKEN_TYPE = "at+jwt"
#: Advisory lock serialising key creation across workers ("sjaak-jwks").
_ROTATION_LOCK = 0x736A6A776B73
_LEEWAY = 5
_RELOAD_SECONDS = 300
_VERIFIED_LIMIT = 10_000


class InvalidToken(Exception):
    """The bearer token is not one of ours, or no longer valid; the message says why."""


@dataclass(frozen=True)
class AccessTokenClaims:
    subject: str
    client_id: str
    tenant_id: uuid.UUID
    scopes: frozenset[str]
    jti: str
    expires_at: int
    issued_at: int


class TokenService:
    """Issues and verifies access tokens; keeps the signing keys in memory."""

    def __init__(
        self,
        db: Database,
        keyring: Keyring,
        *,
        issuer: str,
        audience: str,
        ttl_seconds: int,
        rotation_days: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = db
        self._keyring = keyring
        self.issuer = issuer
        self.audience = audience
        self.ttl_seconds = ttl_seconds
        self._rotation_seconds = rotation_days * 86400
        self._clock = clock
        self._signing: RSAKey | None = None
        self._published = KeySet([])
        self._loaded_at = 0.0
        self._load_lock = asyncio.Lock()
        self._verified: dict[str, AccessTokenClaims] = {}

    async def ensure_loaded(self) -> None:
        """Load the key set on first use and every few minutes (keys live in the database)."""
        if self._stale():
            async with self._load_lock:
                if self._stale():
                    await self.load()

    def _stale(self) -> bool:
        # Reloading now and then is how a long-running worker rotates its signing key when it is
        # due, and picks up keys that other workers made.
        return self._signing is None or self._clock() - self._loaded_at > _RELOAD_SECONDS

    async def load(self) -> None:
        """Read the key set; make a new signing key when there is none or the newest is due."""
        async with self._db.control() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _ROTATION_LOCK)
            newest = await conn.fetchrow(
                "SELECT kid, extract(epoch FROM created_at)::float8 AS created"
                " FROM sjaak.signing_keys WHERE retired_at IS NULL"
                " ORDER BY created_at DESC LIMIT 1"
            )
            if newest is None or self._clock() - newest["created"] > self._rotation_seconds:
                await self._create_key(conn)
            rows = await conn.fetch(
                "SELECT kid, public_jwk, private_jwk_encrypted, retired_at IS NULL AS signing"
                " FROM sjaak.signing_keys"
                " WHERE retired_at IS NULL OR retired_at > now() - make_interval(secs => $1)"
                " ORDER BY created_at DESC",
                float(self.ttl_seconds),
            )
        public_keys: list[Any] = [RSAKey.import_key(r["public_jwk"]) for r in rows]
        signing_row = next(r for r in rows if r["signing"])
        private = json.loads(self._keyring.decrypt(signing_row["private_jwk_encrypted"]))
        self._signing = RSAKey.import_key(private)
        self._published = KeySet(public_keys)
        self._loaded_at = self._clock()

    async def _create_key(self, conn: ControlConn) -> None:
        kid = f"k{int(self._clock())}-{secrets.token_hex(4)}"
        key = RSAKey.generate_key(2048, parameters={"kid": kid, "use": "sig", "alg": ALGORITHM})
        await conn.execute(
            "UPDATE sjaak.signing_keys SET retired_at = now() WHERE retired_at IS NULL"
        )
        await conn.execute(
            "INSERT INTO sjaak.signing_keys (kid, algorithm, public_jwk, private_jwk_encrypted)"
            " VALUES ($1, $2, $3, $4)",
            kid,
            ALGORITHM,
            key.as_dict(private=False),
            self._keyring.encrypt(json.dumps(key.as_dict(private=True)).encode()),
        )

    async def jwks(self) -> dict[str, Any]:
        await self.ensure_loaded()
        return {"keys": [k.as_dict(private=False) for k in self._published.keys]}

    async def issue(
        self, *, subject: str, client_id: str, tenant_id: uuid.UUID, scopes: frozenset[str]
    ) -> tuple[str, AccessTokenClaims]:
        await self.ensure_loaded()
        assert self._signing is not None
        now = int(self._clock())
        claims = AccessTokenClaims(
            subject=subject,
            client_id=client_id,
            tenant_id=tenant_id,
            scopes=scopes,
            jti=uuid.uuid4().hex,
            expires_at=now + self.ttl_seconds,
            issued_at=now,
        )
        header = {"alg": ALGORITHM, "typ": TOKEN_TYPE, "kid": self._signing.kid}
        payload = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": subject,
            "client_id": client_id,
            "tenant": str(tenant_id),
            "scope": " ".join(sorted(scopes)),
            "jti": claims.jti,
            "iat": now,
            "nbf": now,
            "exp": claims.expires_at,
        }
        return jwt.encode(header, payload, self._signing, algorithms=[ALGORITHM]), claims

    async def verify(self, token: str) -> AccessTokenClaims:
        """Check signature, type, issuer, audience and lifetime; raise :class:`InvalidToken`.

        A token that verified once is remembered until it expires: the same bytes verify the
        same way, and RSA verification is the dearest step of a request. Expiry is still checked
        on every use, and revocation is checked by the caller.
        """
        verified = self._verified.get(token)
        if verified is not None:
            if verified.expires_at + _LEEWAY <= self._clock():
                del self._verified[token]
                raise InvalidToken("The access token has expired.")
            return verified
        claims = await self._verify_signed(token)
        self._verified[token] = claims
        if len(self._verified) > _VERIFIED_LIMIT:
            del self._verified[next(iter(self._verified))]
        return claims

    async def _verify_signed(self, token: str) -> AccessTokenClaims:
        await self.ensure_loaded()
        try:
            decoded = jwt.decode(token, self._published, algorithms=[ALGORITHM])
        except JoseError as exc:
            if "kid" in str(exc).lower() and self._clock() - self._loaded_at > 1:
                # A key made by another worker since we loaded: reload once, then decide.
                await self.load()
                return await self._verify_signed(token)
            raise InvalidToken("The access token's signature or format is invalid.") from exc
        except ValueError as exc:
            raise InvalidToken("The access token is not a well-formed JWT.") from exc
        if decoded.header.get("typ", "").lower() not in (TOKEN_TYPE, "application/at+jwt"):
            raise InvalidToken("The token is not an access token (typ must be at+jwt).")
        registry = jwt.JWTClaimsRegistry(
            now=lambda: int(self._clock()),
            leeway=_LEEWAY,
            iss={"essential": True, "value": self.issuer},
            aud={"essential": True, "value": self.audience},
            exp={"essential": True},
            jti={"essential": True},
            tenant={"essential": True},
            client_id={"essential": True},
        )
        try:
            registry.validate(decoded.claims)
        except JoseError as exc:
            raise InvalidToken(f"The access token is not valid here: {exc}.") from exc
        claims = decoded.claims
        try:
            return AccessTokenClaims(
                subject=str(claims.get("sub", "")),
                client_id=str(claims["client_id"]),
                tenant_id=uuid.UUID(str(claims["tenant"])),
                scopes=frozenset(str(claims.get("scope", "")).split()),
                jti=str(claims["jti"]),
                expires_at=int(claims["exp"]),
                issued_at=int(claims.get("iat", 0)),
            )
        except (KeyError, ValueError) as exc:
            raise InvalidToken("The access token's claims are malformed.") from exc


def token_service(settings: Settings, db: Database, keyring: Keyring) -> TokenService:
    """The token service as the settings configure it (API workers and the worker alike)."""
    return TokenService(
        db,
        keyring,
        issuer=settings.token_issuer,
        audience=settings.token_issuer,
        ttl_seconds=settings.access_token_ttl_seconds,
        rotation_days=settings.signing_key_rotation_days,
    )
