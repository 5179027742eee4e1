"""Tiki tokens sealed with AES-GCM before they reach Firestore.

The customer's document id is the associated data, so a ciphertext copied to
another customer's document does not open. The document keeps, beside each
sealed value, the id of its key: the session-secret version it came from.
"""

from __future__ import annotations

import json
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from auth import keys
from auth.secrets import Secret

_NONCE_BYTES = 12


class Unsealable(Exception):
    """The sealed value does not open with the key it names."""


def seal(secret: Secret, customer_key: str, tokens: dict[str, str | None]) -> bytes:
    aead = AESGCM(keys.derive(secret.value, keys.TOKEN_SEALING))
    nonce = os.urandom(_NONCE_BYTES)
    plaintext = json.dumps(tokens, separators=(",", ":")).encode()
    return nonce + aead.encrypt(nonce, plaintext, _aad(customer_key))


def open_sealed(secret: Secret, customer_key: str, sealed: bytes) -> dict[str, str]:
    aead = AESGCM(keys.derive(secret.value, keys.TOKEN_SEALING))
    try:
        plaintext = aead.decrypt(
            sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], _aad(customer_key)
        )
    except (InvalidTag, ValueError) as exc:
        raise Unsealable("stored tokens do not open with their key") from exc
    try:
        tokens = json.loads(plaintext)
    except ValueError as exc:
        raise Unsealable("stored tokens are malformed") from exc
    if not isinstance(tokens, dict) or not isinstance(tokens.get("access_token"), str):
        raise Unsealable("stored tokens are malformed")
    return tokens


def _aad(customer_key: str) -> bytes:
    return f"tiki_tokens/{customer_key}".encode()
