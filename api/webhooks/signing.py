"""Signing secrets and the ``Sjaak-Signature`` header, as Stripe signs its webhooks.

``Sjaak-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>[,v1=<…>]``: each ``v1`` is the HMAC-SHA256
of ``"<t>." + body`` under a signing secret (the whole ``whsec_…`` string, as UTF-8). While a
rotated-out secret is still valid, the header carries one ``v1`` per secret, so a receiver that
knows either one accepts the delivery. The timestamp lets a receiver refuse replays of old
deliveries.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Sequence

from api.auth.key_format import BASE62

SIGNATURE_HEADER = "Sjaak-Signature"
SECRET_PREFIX = "whsec_"
_SECRET_LENGTH = 32
#: How old a signed timestamp may be before :func:`verify` refuses it (seconds).
DEFAULT_TOLERANCE = 300


def generate_secret() -> str:
    """A new signing secret: ``whsec_`` and 32 random base62 characters (190 bits)."""
    return SECRET_PREFIX + "".join(secrets.choice(BASE62) for _ in range(_SECRET_LENGTH))


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``"<timestamp>." + body`` under ``secret``."""
    signed = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def signature_header(timestamp: int, body: bytes, signing_secrets: Sequence[str]) -> str:
    """The ``Sjaak-Signature`` value: ``t=…`` then one ``v1=…`` per secret, newest first."""
    return ",".join(
        [f"t={timestamp}", *(f"v1={signature(s, timestamp, body)}" for s in signing_secrets)]
    )


def verify(
    header: str,
    body: bytes,
    secret: str,
    *,
    tolerance: int = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> bool:
    """Whether ``header`` signs ``body`` under ``secret`` within ``tolerance`` seconds of now.
    What a receiver does; the README shows the same recipe standing alone."""
    timestamp: int | None = None
    candidates: list[str] = []
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = signature(secret, timestamp, body)
    return any(hmac.compare_digest(expected, candidate) for candidate in candidates)
