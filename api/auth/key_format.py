"""The shape of an API key: ``sjk_<kind>_<mode>_<30 random base62><6 base62 CRC32>``.

The checksum lets a typo fail before any database look-up, and the fixed prefix lets secret
scanners recognise a leaked key.
"""

from __future__ import annotations

import re
import secrets
import string
import zlib
from typing import Literal

KeyKind = Literal["publishable", "secret", "restricted"]
KeyMode = Literal["live", "test"]

BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
KIND_CODES: dict[KeyKind, str] = {"publishable": "pk", "secret": "sk", "restricted": "rk"}
_KINDS_BY_CODE = {code: kind for kind, code in KIND_CODES.items()}
_RANDOM_LENGTH = 30
_CHECKSUM_LENGTH = 6
KEY_PATTERN = re.compile(r"^sjk_(pk|sk|rk)_(live|test)_([0-9A-Za-z]{30})([0-9A-Za-z]{6})$")


class KeyFormatError(ValueError):
    """``reason`` is ``malformed`` or ``checksum``."""

    def __init__(self, reason: Literal["malformed", "checksum"], message: str) -> None:
        super().__init__(message)
        self.reason = reason


def base62(number: int, width: int) -> str:
    digits = []
    while number:
        number, rest = divmod(number, 62)
        digits.append(BASE62[rest])
    return "".join(reversed(digits)).rjust(width, "0")


def checksum(body: str) -> str:
    return base62(zlib.crc32(body.encode()), _CHECKSUM_LENGTH)


def generate_key(kind: KeyKind, mode: KeyMode = "live") -> str:
    body = f"sjk_{KIND_CODES[kind]}_{mode}_" + "".join(
        secrets.choice(BASE62) for _ in range(_RANDOM_LENGTH)
    )
    return body + checksum(body)


def parse_key(key: str) -> tuple[KeyKind, KeyMode]:
    """The kind and mode of a well-formed key; :class:`KeyFormatError` otherwise."""
    match = KEY_PATTERN.fullmatch(key)
    if match is None:
        raise KeyFormatError(
            "malformed", "The API key is malformed: expected sjk_<pk|sk|rk>_<live|test>_…"
        )
    if checksum(key[:-_CHECKSUM_LENGTH]) != match[4]:
        raise KeyFormatError("checksum", "The API key's checksum does not match: it is mistyped.")
    mode: KeyMode = "live" if match[2] == "live" else "test"
    return _KINDS_BY_CODE[match[1]], mode


def masked(kind: KeyKind, mode: str, last4: str) -> str:
    return f"sjk_{KIND_CODES[kind]}_{mode}_…{last4}"


def looks_like_api_key(token: str) -> bool:
    return token.startswith("sjk_")
