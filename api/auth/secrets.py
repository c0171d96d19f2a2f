"""The service secret: HMACs of API keys and client secrets, encryption of signing keys."""

from __future__ import annotations

import base64
import hmac
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from api.config import Settings


def resolve_secret_key(settings: Settings) -> str:
    """The configured secret, or (outside production) one generated once into the data dir."""
    if settings.secret_key:
        return settings.secret_key
    path = Path(settings.data_dir).expanduser() / "secret_key"
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    # Created 0600 from the start: the secret is never world-readable, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret)
    return secret


class Keyring:
    """HMAC-SHA256 under the current secret and any previous ones (for secret rotation)."""

    def __init__(self, current: str, previous: tuple[str, ...] = ()) -> None:
        self._macs = tuple(s.encode() for s in (current, *previous) if s)
        self._aead = AESGCM(_derive(current.encode(), b"sjaak signing-key encryption"))
        self._previous_aeads = tuple(
            AESGCM(_derive(s.encode(), b"sjaak signing-key encryption")) for s in previous if s
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Keyring:
        previous = tuple(p.strip() for p in settings.previous_secret_keys.split(",") if p.strip())
        return cls(resolve_secret_key(settings), previous)

    def digest(self, value: str) -> bytes:
        """The digest stored for a new credential (current secret)."""
        return hmac.digest(self._macs[0], value.encode(), "sha256")

    def candidate_digests(self, value: str) -> list[bytes]:
        """Digests under every accepted secret, for look-ups during a rotation."""
        return [hmac.digest(mac, value.encode(), "sha256") for mac in self._macs]

    def encrypt(self, plaintext: bytes) -> bytes:
        nonce = secrets.token_bytes(12)
        return nonce + self._aead.encrypt(nonce, plaintext, None)

    def decrypt(self, blob: bytes) -> bytes:
        nonce, ciphertext = blob[:12], blob[12:]
        for aead in (self._aead, *self._previous_aeads):
            try:
                return aead.decrypt(nonce, ciphertext, None)
            except Exception:  # noqa: S112 - try the next secret; InvalidTag is the expected miss
                continue
        raise ValueError("cannot decrypt with the current or previous secrets")


def _derive(secret: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=SHA256(), length=32, salt=None, info=purpose).derive(secret)


def constant_time_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def urlsafe(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
