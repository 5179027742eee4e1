"""Errors that know their wire shape: one class per reason the frontend can act on.

Each is turned into the response envelope in exactly one place, ``auth.web``.
Messages are written for the frontend and must never contain a code, a token
or a secret; details for the operator go to the log, not to the message.
"""

from __future__ import annotations


class AuthError(Exception):
    """Base of every error the functions answer with."""

    status = 500
    reason = "internal"
    message = "Internal error."

    def __init__(self, message: str | None = None, *, log: str | None = None) -> None:
        self.message = message or type(self).message
        # Operator-facing detail: goes to the log line, never to the response.
        self.log = log
        super().__init__(self.message)

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(AuthError):
    status, reason, message = 400, "bad_request", "The request is malformed."


class InvalidCode(AuthError):
    status, reason = 400, "invalid_code"
    message = "The auth code is invalid, used or expired; get a new one."


class Unauthenticated(AuthError):
    status, reason = 401, "unauthenticated"
    message = "A valid session token is required."
    # RFC 6750 section 3.1: no error code when no token was sent at all.
    token_sent = True

    def headers(self) -> dict[str, str]:
        if not self.token_sent:
            return {"WWW-Authenticate": "Bearer"}
        return {"WWW-Authenticate": 'Bearer error="invalid_token"'}


class ReauthRequired(AuthError):
    status, reason = 401, "reauth_required"
    message = "The session can no longer be renewed; run my.getAuthCode again."

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer error="invalid_token"'}


class NotFound(AuthError):
    status, reason, message = 404, "not_found", "Not found."


class MethodNotAllowed(AuthError):
    status, reason, message = 405, "method_not_allowed", "Method not allowed."

    def __init__(self, allow: list[str], message: str | None = None) -> None:
        self.allow = allow
        super().__init__(message or f"Use {' or '.join(allow)}.")

    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(self.allow)}


class PayloadTooLarge(AuthError):
    status, reason, message = 413, "payload_too_large", "The request body is too large."


class UnsupportedMediaType(AuthError):
    status, reason = 415, "unsupported_media_type"
    message = "Send the body as application/json."


class UpstreamError(AuthError):
    """Tiki answered, but not with anything usable."""

    status, reason, message = 502, "upstream_error", "Tiki gave an unusable answer."


class Unavailable(AuthError):
    """A dependency (Tiki, Firestore, Secret Manager) could not be reached."""

    status, reason = 503, "unavailable"
    message = "A service the login depends on is unavailable; try again shortly."

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class UpstreamTimeout(AuthError):
    status, reason, message = 504, "upstream_timeout", "Tiki did not answer in time."
    # True when the abandoned call may still reach Tiki and be answered.
    may_complete = False


class Internal(AuthError):
    status, reason, message = 500, "internal", "Internal error."
