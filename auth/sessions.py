"""Session tokens this backend issues: JWTs pinned to HS256 (PyJWT).

Claims: ``aud`` = the Tini App's client id, ``sub`` = the customer's document
id, ``iat``/``exp``, a random ``jti``, ``sv`` = the user record's session
version (logout and erasure change it), and the key id in the header: the
Secret Manager version of the session secret that signed it.
"""

from __future__ import annotations

import re
import secrets as _random
import time
from dataclasses import dataclass

import jwt

from auth import keys, log
from auth.config import Settings
from auth.errors import ReauthRequired, Unauthenticated
from auth.secrets import (
    ENV_VERSION,
    Secret,
    session_secret_at_least,
    session_secret_version,
)

ALGORITHM = "HS256"
ISSUER = "tiniapp-auth"
# Clocks of two instances may differ by a few seconds; no more is forgiven.
LEEWAY_SECONDS = 5
MAX_TOKEN_CHARS = 4096

# A version number as Secret Manager writes it: no sign, no leading zero.
_KID = re.compile(r"0|[1-9][0-9]{0,8}")
_SUB = re.compile(r"[1-9][0-9]{0,18}")
_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_REQUIRED = ["aud", "sub", "exp", "iat", "jti", "iss", "sv"]


@dataclass(frozen=True)
class Session:
    customer_key: str
    session_version: str
    expires_at: int


def issue(
    settings: Settings, secret: Secret, customer_key: str, session_version: str
) -> str:
    """A session signed with ``secret``, the current session secret."""
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": settings.client_id,
        "sub": customer_key,
        "iat": now,
        "exp": now + settings.session_ttl,
        "jti": _random.token_urlsafe(12),
        "sv": session_version,
    }
    key = keys.derive(secret.value, keys.SESSION_SIGNING)
    return jwt.encode(claims, key, algorithm=ALGORITHM, headers={"kid": secret.version})


def verify(
    settings: Settings, token: str, *, refresh_window: int | None = None
) -> Session:
    """The session a token proves, or 401.

    With ``refresh_window`` (the refresh path) a token that expired less than
    that many seconds ago is accepted; an older one needs a new login.
    """
    if len(token) > MAX_TOKEN_CHARS or not _SHAPE.fullmatch(token):
        raise _refused("not a JWT")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise _refused("unreadable header") from None
    if header.get("alg") != ALGORITHM:
        raise _refused("algorithm is not HS256")
    secret = _key_for(settings, header.get("kid"))
    try:
        claims = jwt.decode(
            token,
            keys.derive(secret.value, keys.SESSION_SIGNING),
            algorithms=[ALGORITHM],
            audience=settings.client_id,
            issuer=ISSUER,
            leeway=LEEWAY_SECONDS,
            options={"require": _REQUIRED, "verify_exp": refresh_window is None},
        )
    except jwt.ExpiredSignatureError:
        raise _refused("expired") from None
    except jwt.PyJWTError as exc:
        raise _refused(type(exc).__name__) from None
    return _checked(claims, settings, refresh_window)


def _key_for(settings: Settings, kid: object) -> Secret:
    # Only a plain version number no newer than the current one is looked up,
    # so a forged kid can neither name another secret nor flood Secret Manager.
    if not isinstance(kid, str) or not _KID.fullmatch(kid):
        raise _refused("key id is not a version number")
    current = session_secret_at_least(settings, int(kid))
    if current.version == ENV_VERSION or kid == ENV_VERSION:
        if kid != current.version:
            raise _refused("unknown key id")
        return current
    if int(kid) > int(current.version):
        raise _refused("key id is newer than the current key")
    secret = session_secret_version(settings, kid)
    if secret is None:
        raise _refused("key version is disabled or gone")
    return secret


def _checked(
    claims: dict[str, object], settings: Settings, window: int | None
) -> Session:
    now = time.time()
    iat, exp, sub, aud = claims["iat"], claims["exp"], claims["sub"], claims["aud"]
    nbf = claims.get("nbf", iat)
    if aud != settings.client_id:
        raise _refused("audience is not exactly this app")
    for value in (iat, exp, nbf):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _refused("time claims are not whole seconds")
    assert isinstance(iat, int) and isinstance(exp, int) and isinstance(nbf, int)
    if iat > now + LEEWAY_SECONDS or nbf > now + LEEWAY_SECONDS:
        raise _refused("issued in the future")
    if not isinstance(sub, str) or not _SUB.fullmatch(sub):
        raise _refused("subject is not a customer id")
    if not isinstance(claims["sv"], str):
        raise _refused("session version is malformed")
    if exp <= now - LEEWAY_SECONDS:
        if window is None:
            raise _refused("expired")
        if now - exp > window:
            log.info("Session expired past the refresh window.", customer=sub)
            raise ReauthRequired("The session expired too long ago; log in again.")
    return Session(sub, claims["sv"], exp)


def _refused(why: str) -> Unauthenticated:
    return Unauthenticated(
        "The session token is invalid or expired.", log=f"Session refused: {why}."
    )
