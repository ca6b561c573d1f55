"""Who may call what: an optional bearer token, and model changes only from loopback without one."""

from __future__ import annotations

import hmac
import ipaddress

# Paths that need the token when one is configured.
PROTECTED = frozenset({"/parse", "/reindex", "/metrics"})
# Paths that change what the service serves: never from an unauthenticated remote caller.
MUTATING = frozenset({"/reindex"})


def is_loopback(remote: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; False for anything unparsable."""
    if not remote:
        return False
    try:
        addr = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def authorize(path: str, remote: str | None, authorization: str | None, token: str | None) -> str | None:
    """None when allowed, else the error code (``unauthorized`` → 401, ``forbidden`` → 403)."""
    if token:
        if path not in PROTECTED:
            return None
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            return "unauthorized"
        return None
    if path in MUTATING and not is_loopback(remote):
        return "forbidden"
    return None
