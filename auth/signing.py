"""Tiki's request signature (SPEC Part 1, "Request signing").

Tiki's prose says the HMAC is taken over the payload; its samples and published
outputs show it is taken over the *base64url-encoded* payload, without padding.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from urllib.parse import quote

# encodeURIComponent leaves these unescaped besides letters, digits and "-_.~".
_URI_COMPONENT_SAFE = "!*'()"


def sign(client_secret: str, client_id: str, timestamp: str, content: str) -> str:
    """Lowercase hex HMAC-SHA256 of base64url(timestamp.client_id.content)."""
    payload = f"{timestamp}.{client_id}.{content}".encode()
    encoded = base64.urlsafe_b64encode(payload).rstrip(b"=")
    return hmac.new(client_secret.encode(), encoded, hashlib.sha256).hexdigest()


def headers(client_id: str, client_secret: str, content: str) -> dict[str, str]:
    """The three signing headers, with a timestamp made now (one per attempt)."""
    timestamp = str(time.time_ns() // 1_000_000)
    return {
        "X-Tiniapp-Client-Id": client_id,
        "X-Tiniapp-Timestamp": timestamp,
        "X-Tiniapp-Signature": sign(client_secret, client_id, timestamp, content),
    }


def query_string(params: list[tuple[str, str]]) -> str:
    """Percent-encode a query the way JavaScript's encodeURIComponent does."""
    return "&".join(
        f"{quote(k, safe=_URI_COMPONENT_SAFE)}={quote(v, safe=_URI_COMPONENT_SAFE)}"
        for k, v in params
    )
