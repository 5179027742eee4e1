"""The HTTP edge: methods, CORS, body and Authorization parsing, the envelope.

Every function goes through ``serve``; it is the one place where an error
becomes a response, and the one place an unexpected exception is logged with
its traceback and answered as a plain ``internal``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from auth import config, log
from auth.errors import (
    AuthError,
    BadRequest,
    Internal,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Unauthenticated,
    UnsupportedMediaType,
)

if TYPE_CHECKING:
    import flask

    from auth.config import Settings

    Flow = Callable[[Settings, str], dict[str, Any]]

# A login body is {"code": "..."}; nothing legitimate comes near this.
MAX_BODY_BYTES = 16 * 1024
MAX_CODE_CHARS = 4096
# Tiki's codes are URL-safe base64 pieces joined by dots; allow standard
# base64 too, so a format change on Tiki's side does not lock customers out.
_CODE = re.compile(r"[A-Za-z0-9._~+/=-]+")
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9._-]+)")
PREFLIGHT_MAX_AGE = "3600"


@dataclass(frozen=True)
class Endpoint:
    name: str
    method: str
    run: Callable[[Settings, flask.Request], dict[str, Any]]

    @property
    def allow(self) -> list[str]:
        extra = ["HEAD"] if self.method == "GET" else []
        return [self.method, *extra, "OPTIONS"]


def serve(request: flask.Request, endpoint: Endpoint) -> flask.Response:
    started = time.monotonic()
    token = log.bind(**_trace_fields(request), function=endpoint.name)
    headers: dict[str, str]
    try:
        if request.method == "OPTIONS":
            _leave_unread_body(request)
            return _preflight(request, endpoint)
        if request.method not in endpoint.allow:
            raise MethodNotAllowed(endpoint.allow)
        settings = config.load()
        data = endpoint.run(settings, request)
        status, body, headers = 200, {"data": data, "error": None}, {}
        log.info(f"{endpoint.name}: 200", status=200, latency_ms=_ms(started))
    except AuthError as exc:
        status, body, headers = _failure(exc, endpoint, started)
    except Exception:  # noqa: BLE001 - the one place a crash becomes a 500
        log.error(f"{endpoint.name}: unexpected failure.", exc=True)
        status, body, headers = _failure(Internal(), endpoint, started)
    finally:
        log.reset(token)
    response = _json(body, status, headers)
    _cors(response, request)
    _leave_unread_body(request)
    return response


def _leave_unread_body(request: flask.Request) -> None:
    # NOTE: functions-framework reads the whole request body after every
    # response (its after_request hook calls request.get_data()), which would
    # buffer a huge or endless body we refused unread. Marking the body as
    # already read keeps it out of memory; the server discards the rest.
    length = request.content_length
    if length is None or length > MAX_BODY_BYTES:
        request._cached_data = b""


def not_found(request: flask.Request) -> flask.Response:
    error = NotFound("No such function here.")
    body = {
        "data": None,
        "error": {"code": 404, "reason": error.reason, "message": error.message},
    }
    response = _json(body, 404, {})
    _cors(response, request)
    return response


def code_from_body(request: flask.Request) -> str:
    body = _json_body(request)
    if "code" not in body:
        raise BadRequest("Missing 'code' in the request body.")
    code = body["code"]
    if not isinstance(code, str) or not code:
        raise BadRequest("'code' must be a non-empty string.")
    if len(code) > MAX_CODE_CHARS:
        raise BadRequest("'code' is too long to be an auth code.")
    if not _CODE.fullmatch(code):
        raise BadRequest("'code' has characters an auth code never has.")
    return code


def bearer_token(request: flask.Request) -> str:
    values = request.headers.getlist("Authorization")
    if not values:
        missing = Unauthenticated(
            "Send the session as 'Authorization: Bearer <token>'."
        )
        missing.token_sent = False
        raise missing
    match = _BEARER.fullmatch(values[0].strip()) if len(values) == 1 else None
    if match is None:
        raise Unauthenticated(
            "The Authorization header must be 'Bearer <session token>'.",
            log="Malformed Authorization header.",
        )
    return match.group(1)


def no_body(request: flask.Request) -> None:
    """Functions that take no body still refuse a huge one unread."""
    length = request.content_length
    if length is not None and length > MAX_BODY_BYTES:
        raise PayloadTooLarge()


def _json_body(request: flask.Request) -> dict[str, Any]:
    length = request.content_length
    if length is not None and length > MAX_BODY_BYTES:
        raise PayloadTooLarge()
    if request.mimetype != "application/json":
        raise UnsupportedMediaType()
    charset = request.mimetype_params.get("charset", "utf-8").lower()
    if charset not in ("utf-8", "utf8"):
        raise UnsupportedMediaType("Send the body as UTF-8 JSON.")
    raw = request.stream.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise PayloadTooLarge()
    if not raw.strip():
        raise BadRequest('The request body is empty; send {"code": "..."}.')
    try:
        body = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constants,
        )
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadRequest("The request body is not valid UTF-8 JSON.") from None
    if not isinstance(body, dict):
        raise BadRequest(
            'The request body must be a JSON object such as {"code": "..."}.'
        )
    return body


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key")
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _failure(
    exc: AuthError, endpoint: Endpoint, started: float
) -> tuple[int, dict[str, Any], dict[str, str]]:
    fields: dict[str, Any] = {
        "status": exc.status,
        "reason": exc.reason,
        "latency_ms": _ms(started),
    }
    if exc.log:
        fields["detail"] = exc.log
    if exc.status >= 500:
        log.error(f"{endpoint.name}: {exc.status} {exc.reason}.", **fields)
    else:
        log.info(f"{endpoint.name}: {exc.status} {exc.reason}.", **fields)
    error = {"code": exc.status, "reason": exc.reason, "message": exc.message}
    return exc.status, {"data": None, "error": error}, exc.headers()


def _preflight(request: flask.Request, endpoint: Endpoint) -> flask.Response:
    response = _empty(204)
    response.headers["Allow"] = ", ".join(endpoint.allow)
    origin = request.headers.get("Origin")
    if origin and origin.rstrip("/") in config.allowed_origins():
        response.headers["Access-Control-Allow-Methods"] = ", ".join(endpoint.allow)
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
        response.headers["Access-Control-Max-Age"] = PREFLIGHT_MAX_AGE
    _cors(response, request)
    return response


def _cors(response: flask.Response, request: flask.Request) -> None:
    response.headers.add("Vary", "Origin")
    origin = request.headers.get("Origin")
    if origin and origin.rstrip("/") in config.allowed_origins():
        response.headers["Access-Control-Allow-Origin"] = origin


def _json(body: dict[str, Any], status: int, headers: dict[str, str]) -> flask.Response:
    import flask

    response = flask.Response(
        json.dumps(body, ensure_ascii=False, separators=(",", ":")),
        status=status,
        mimetype="application/json",
    )
    response.headers.update(headers)
    # Sessions and user records must not sit in any shared cache.
    response.headers["Cache-Control"] = "no-store"
    return response


def _empty(status: int) -> flask.Response:
    import flask

    response = flask.Response(status=status)
    del response.headers["Content-Type"]  # no body, so no type
    response.headers["Cache-Control"] = "no-store"
    return response


def _trace_fields(request: flask.Request) -> dict[str, str]:
    import os

    project = os.environ.get("GOOGLE_CLOUD_PROJECT", "")
    header = request.headers.get("X-Cloud-Trace-Context", "")
    trace = header.split("/", 1)[0]
    if not trace:
        parts = request.headers.get("traceparent", "").split("-")
        trace = parts[1] if len(parts) == 4 else ""
    if not re.fullmatch(r"[0-9a-fA-F]{1,32}", trace) or not project:
        return {}
    return {"logging.googleapis.com/trace": f"projects/{project}/traces/{trace}"}


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


# auth.flows (and with it PyJWT, cryptography and, for two of them, requests)
# is imported on a function's first call, so importing main stays cheap.


def _exchange(settings: Settings, request: flask.Request) -> dict[str, Any]:
    code = code_from_body(request)
    from auth import flows

    return flows.exchange(settings, code)


def _with_session(
    pick: Callable[[ModuleType], Flow],
) -> Callable[[Settings, flask.Request], dict[str, Any]]:
    """A function that takes no body and a Bearer session, then runs its flow."""

    def run(settings: Settings, request: flask.Request) -> dict[str, Any]:
        no_body(request)
        token = bearer_token(request)
        from auth import flows

        return pick(flows)(settings, token)

    return run


EXCHANGE = Endpoint("exchange_auth_code", "POST", _exchange)
REFRESH = Endpoint("refresh_auth_token", "POST", _with_session(lambda f: f.refresh))
LOOKUP = Endpoint("lookup_user", "GET", _with_session(lambda f: f.lookup))
REVOKE = Endpoint("revoke_sessions", "POST", _with_session(lambda f: f.revoke))
DELETE = Endpoint("delete_user", "POST", _with_session(lambda f: f.delete))
ENDPOINTS = {e.name: e for e in (EXCHANGE, REFRESH, LOOKUP, REVOKE, DELETE)}
