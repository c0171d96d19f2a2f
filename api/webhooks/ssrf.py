"""The SSRF guard: a webhook URL may only ever reach a public address of the public internet.

The rules (``../shared/DESIGN.md``, "Outbound calls"), checked when an endpoint is saved and again
before every delivery, since DNS answers change:

- ``https`` only in production (``http`` too elsewhere); no user name or password in the URL;
- the host is a public DNS name or a public IP address written the ordinary way: IPv4 as four
  decimal numbers, never the decimal (``2130706433``), hex (``0x7f000001``), octal (``0177.0.0.1``)
  or short (``127.1``) forms that resolvers also accept; IPv6 in brackets, without a zone;
- every address the name resolves to must be public: not private, loopback, link-local, shared
  (CGNAT), multicast, reserved, unspecified, a cloud metadata address, nor an IPv6 address that
  wraps an IPv4 one (mapped, compatible, NAT64, 6to4, Teredo);
- the name is resolved once and the connection goes to the checked address (see
  :mod:`api.webhooks.outbound`), so a second, different DNS answer cannot slip in between.

``allow_loopback`` (``SJAAK_WEBHOOKS_ALLOW_LOOPBACK``, refused in production) lets development
deliver to ``127.0.0.1``, ``::1`` and ``localhost``; nothing else is ever relaxed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_LENGTH = 2048
#: How long one DNS resolution may take.
RESOLVE_TIMEOUT_SECONDS = 5.0

#: Addresses of cloud instance-metadata services, named as such in refusals. Most are also
#: link-local or shared, but one (Azure's wire server) is otherwise a public address.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OCI, DigitalOcean, OpenStack …
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.169.123",  # AWS time sync
        "100.100.100.200",  # Alibaba Cloud
        "168.63.129.16",  # Azure wire server
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "fd00:ec2::123",
    )
)
METADATA_NAMES = frozenset({"metadata.google.internal", "metadata.goog", "instance-data"})
#: Suffixes that never name a public host (RFC 6761, RFC 6762, RFC 8375, ICANN's ``.internal``).
PRIVATE_SUFFIXES = (".internal", ".local", ".localdomain", ".home.arpa", ".lan", ".intranet")

_SHARED = ipaddress.ip_network("100.64.0.0/10")
_NOT_PUBLIC_V4 = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",  # "this network"
        "192.0.0.0/24",  # IETF protocol assignments
        "192.88.99.0/24",  # 6to4 relay anycast (deprecated)
        "198.18.0.0/15",  # benchmarking
        "240.0.0.0/4",  # reserved
    )
)
_V4_IN_V6 = tuple(
    ipaddress.ip_network(n)
    for n in (
        "::/96",  # IPv4-compatible (deprecated)
        "64:ff9b::/96",  # NAT64 well-known prefix
        "64:ff9b:1::/48",  # local-use NAT64
        "2002::/16",  # 6to4
        "2001::/32",  # Teredo
    )
)
_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_NUMBER = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")


class UnsafeUrl(ValueError):
    """The URL may not be called; the message says why, for the client to read."""


@dataclass(frozen=True)
class Target:
    """A checked URL: what to connect to and what to call it.

    ``address`` is set when the URL names an IP address; otherwise ``host`` is resolved (once)
    by :func:`resolve`. ``host_header`` is the ``Host`` header (and ``host`` the TLS server name)
    the request carries whichever address it connects to.
    """

    url: str
    scheme: str
    host: str
    port: int
    host_header: str
    address: IPAddress | None


def address_refusal(address: IPAddress, *, allow_loopback: bool = False) -> str | None:
    """Why ``address`` is not a public one (as "a … address"), or ``None`` when it is."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            return "a scoped IPv6 address"
        if address.ipv4_mapped is not None:
            return "an IPv4-mapped IPv6 address"
        if not (address.is_loopback or address.is_unspecified):
            for network in _V4_IN_V6:
                if address in network:
                    return "an IPv6 address wrapping an IPv4 one (compatible, NAT64, 6to4, Teredo)"
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if address.is_loopback:
        return None if allow_loopback else "a loopback address"
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_link_local:
        return "a link-local address"
    if address in _SHARED:
        return "a shared (CGNAT) address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_private:
        return "a private address"
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "a site-local address"
    if address.is_reserved or any(address in network for network in _NOT_PUBLIC_V4):
        return "a reserved address"
    if not address.is_global:
        return "not a public address"
    return None


def ipv4_in_any_notation(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address ``host`` denotes under the classic ``inet_aton`` rules (which resolvers
    and the WHATWG URL standard apply): one to four parts, each decimal, octal (leading ``0``) or
    hex (``0x``), the last filling the remaining bytes. ``None`` when it is not such a number."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(_NUMBER.match(p) for p in parts):
        return None
    values = []
    for part in parts:
        if part.startswith("0x"):
            values.append(int(part[2:] or "0", 16))
        elif len(part) > 1 and part.startswith("0"):
            if not set(part) <= set("01234567"):
                return None
            values.append(int(part, 8))
        else:
            values.append(int(part))
    *leading, last = values
    if any(v > 255 for v in leading) or last >= 256 ** (4 - len(leading)):
        return None
    number = last
    for index, value in enumerate(leading):
        number += value << (8 * (3 - index))
    return ipaddress.IPv4Address(number)


def check_url(url: str, *, allow_http: bool, allow_loopback: bool = False) -> Target:
    """Check everything that can be checked without DNS; :class:`UnsafeUrl` says what failed."""
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeUrl(f"must be at most {MAX_URL_LENGTH} characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F or c == "\\" for c in url):
        raise UnsafeUrl("must not contain spaces, control characters or backslashes")
    if not url.isascii():
        raise UnsafeUrl("must be ASCII: write an international host name in its xn-- form")
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # an unbalanced [ or ] in the host
        raise UnsafeUrl("is not a valid URL") from exc
    scheme = parts.scheme.lower()
    if scheme != "https" and not (scheme == "http" and allow_http):
        raise UnsafeUrl("must be an https:// URL")
    if "@" in parts.netloc:
        raise UnsafeUrl("must not contain a user name or password")
    if parts.fragment or url.endswith("#"):
        raise UnsafeUrl("must not have a #fragment")
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError as exc:
        raise UnsafeUrl("has an invalid port") from exc
    if not host:
        raise UnsafeUrl("must name a host")
    if port == 0:
        raise UnsafeUrl("has an invalid port")
    default_port = 443 if scheme == "https" else 80
    port = port or default_port

    address: IPAddress | None
    if "[" in parts.netloc:
        address = _ipv6_literal(host)
        shown = f"[{address.compressed}]"
    else:
        name = host[:-1] if host.endswith(".") else host
        address = _ipv4_literal(name)
        shown = name
        if address is None:
            _check_name(name, allow_loopback=allow_loopback)
    if address is not None:
        reason = address_refusal(address, allow_loopback=allow_loopback)
        if reason:
            raise UnsafeUrl(f"points at {address}, {reason}")
    host_header = shown if port == default_port else f"{shown}:{port}"
    return Target(
        url=url,
        scheme=scheme,
        host=address.compressed if address else shown,
        port=port,
        host_header=host_header,
        address=address,
    )


def _ipv6_literal(host: str) -> ipaddress.IPv6Address:
    if "%" in host:
        raise UnsafeUrl("must not name an IPv6 zone")
    try:
        return ipaddress.IPv6Address(host)
    except ValueError as exc:
        raise UnsafeUrl("has an invalid IPv6 address") from exc


def _ipv4_literal(name: str) -> ipaddress.IPv4Address | None:
    """The address of a numeric host; any form but four decimal numbers is refused."""
    labels = name.split(".")
    if not _NUMBER.match(labels[-1]):
        return None
    address = ipv4_in_any_notation(name)
    if address is None:
        # A name whose last label is a number is parsed as an address by URL parsers.
        raise UnsafeUrl("has a host that is neither a valid name nor a valid IPv4 address")
    if name != str(address):
        reason = address_refusal(address)
        meaning = f" ({reason})" if reason else ""
        raise UnsafeUrl(
            f"has {name!r} as its host, which is {address}{meaning} in another notation: write "
            "IPv4 addresses as four decimal numbers (a.b.c.d)"
        )
    return address


def _check_name(name: str, *, allow_loopback: bool) -> None:
    if name == "localhost" or name.endswith(".localhost"):
        if allow_loopback:
            return
        raise UnsafeUrl(f"names {name}, a loopback host")
    if name in METADATA_NAMES:
        raise UnsafeUrl(f"names {name}, a cloud metadata host")
    if len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        raise UnsafeUrl("has an invalid host name")
    if "." not in name:
        raise UnsafeUrl(f"names {name}, which is not a fully qualified public host name")
    if name.endswith(PRIVATE_SUFFIXES):
        raise UnsafeUrl(f"names {name}, which is not a public host name")


async def resolve(target: Target, *, allow_loopback: bool = False) -> list[IPAddress]:
    """Every address ``target`` resolves to, once, each checked: :class:`UnsafeUrl` when it does
    not resolve or any address is not public (one bad answer is enough to refuse)."""
    if target.address is not None:
        return [target.address]
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(
                target.host, target.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            ),
            RESOLVE_TIMEOUT_SECONDS,
        )
    except (OSError, TimeoutError) as exc:
        raise UnsafeUrl(f"{target.host} does not resolve") from exc
    addresses: list[IPAddress] = []
    for info in infos:
        try:
            address = ipaddress.ip_address(str(info[4][0]))
        except ValueError as exc:  # pragma: no cover - the resolver hands out addresses
            raise UnsafeUrl(f"{target.host} resolves to something that is not an address") from exc
        reason = address_refusal(address, allow_loopback=allow_loopback)
        if reason:
            raise UnsafeUrl(f"{target.host} resolves to {address}, {reason}")
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise UnsafeUrl(f"{target.host} does not resolve")
    return addresses


async def checked_target(url: str, *, allow_http: bool, allow_loopback: bool) -> Target:
    """:func:`check_url` and :func:`resolve` together, for validating a URL being saved."""
    target = check_url(url, allow_http=allow_http, allow_loopback=allow_loopback)
    await resolve(target, allow_loopback=allow_loopback)
    return target
