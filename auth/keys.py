"""Keys derived from one session secret, one per purpose (HKDF-SHA256).

Signing sessions and sealing stored Tiki tokens never share a key, so a flaw
in one use cannot be turned against the other.
"""

from __future__ import annotations

import functools

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SESSION_SIGNING = b"tiniapp-auth/session-signing/v1"
TOKEN_SEALING = b"tiniapp-auth/token-sealing/v1"
_SALT = b"tiniapp-auth"


@functools.lru_cache(maxsize=64)
def derive(secret: str, purpose: bytes) -> bytes:
    """A 32-byte key for ``purpose`` from ``secret``."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=purpose)
    return hkdf.derive(secret.encode())
