"""The SHA-256 of an attachment's name, from CPython's own implementation: hashlib's OpenSSL
backend loads libcrypto, about 3 ms of every CNI call, for the same digest."""

from __future__ import annotations

try:
    from _sha2 import sha256  # CPython 3.12 and later
except ImportError:
    try:
        from _sha256 import sha256  # CPython 3.11
    except ImportError:  # an interpreter without them
        from hashlib import sha256


def attachment_digest(container_id: str, ifname: str) -> str:
    """Hex SHA-256 of "containerID NUL ifname": names records, locks and temporary links."""
    return sha256(f"{container_id}\0{ifname}".encode()).hexdigest()
