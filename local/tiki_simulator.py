"""A local stand-in for Tiki's sandbox OAuth API (SPEC Part 1), for tests and dev runs.

It checks every request's signature and timestamp the way Tiki documents them, with its
own implementation (nothing is imported from ``auth/``), so that it cross-checks the
backend's. Beside Tiki's three endpoints it serves a test API under ``/_sim/`` that
issues auth codes, queues faults, changes its configuration and counts calls:

==========  =====================  ==================================================
method      path                   does
==========  =====================  ==================================================
GET         /_sim/health           ``{"ok": true}``
GET, POST   /_sim/auth-code        a code, as ``my.getAuthCode`` would hand it out
GET, POST   /_sim/faults           list / queue a fault
DELETE      /_sim/faults           clear queued faults
GET, POST   /_sim/config           show / change window, TTLs, rotation, clients
GET         /_sim/stats            call and outcome counters
GET         /_sim/issued           every code and token issued (for leak checks)
POST        /_sim/reset            forget codes, tokens, faults and counters
==========  =====================  ==================================================

Run ``python -m local.tiki_simulator serve``; ``python -m local.tiki_simulator code``
then prints a fresh auth code for test customer 1.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import dataclasses
import hashlib
import hmac
import json
import math
import re
import secrets
import signal
import socket
import socketserver
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DEFAULT_CLIENT_ID = "tini-local-client"
# Known to anyone who reads this file and accepted nowhere but by this simulator.
DEFAULT_CLIENT_SECRET = (
    "local-sandbox-only.not-a-tiki-secret.never-deploy-this.012345678"
)
DEFAULT_BASE_PATH = "/tiniapp-sandbox-open-api"
DEFAULT_PORT = 9090

CLIENT_ID_HEADER = "X-Tiniapp-Client-Id"
TIMESTAMP_HEADER = "X-Tiniapp-Timestamp"
SIGNATURE_HEADER = "X-Tiniapp-Signature"

SERVICE_CODE = "tiniapp-sandbox-simulator"
KNOWN_SCOPES = ("offline", "user_profile")
DEFAULT_SCOPES = ["offline", "user_profile"]
# authErrorScopes values, as my.getAuthCode documents them.
SCOPE_NOT_GRANTED = 1
SCOPE_REFUSED = 2

MAX_BODY_BYTES = 1 << 20
# An idle keep-alive connection is closed after this, so threads do not pile up.
IDLE_TIMEOUT_SECONDS = 120
# How long `code` waits for a running simulator: it is local, so slow means hung.
CLI_TIMEOUT_SECONDS = 5

# customer id -> (name, scopes granted to the app for that customer)
TEST_CUSTOMERS: dict[int, tuple[str, frozenset[str]]] = {
    1: ("Ti Ni", frozenset(KNOWN_SCOPES)),
    2: ("Khách Thử", frozenset({"user_profile"})),
    3: ("Tiki Tester", frozenset(KNOWN_SCOPES)),
}

_ENDPOINT_PATHS = {
    "/oauth/auth/token": "token",
    "/oauth/auth/token/refresh": "refresh",
    "/oauth/me": "me",
}
_BODY_FIELDS = {"token": "code", "refresh": "refresh_token", "me": "access_token"}
_FAULT_ENDPOINTS = ("token", "refresh", "me", "any")
_TIMESTAMP = re.compile(r"[0-9]{1,16}")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")
_DIGITS = re.compile(r"[0-9]{1,18}")


def sign(
    secret: str, client_id: str, timestamp: int | str, content: str | bytes
) -> str:
    """Tiki's request signature: hex HMAC-SHA256 over the unpadded base64url payload."""
    if isinstance(content, str):
        content = content.encode()
    payload = f"{timestamp}.{client_id}.".encode() + content
    encoded = base64.urlsafe_b64encode(payload).rstrip(b"=")
    return hmac.new(secret.encode(), encoded, hashlib.sha256).hexdigest()


def _new_opaque() -> str:
    """A code or token shaped like Tiki's: two URL-safe base64 pieces and a dot."""
    return f"{secrets.token_urlsafe(32)}.{secrets.token_urlsafe(32)}"


def _ok(data: Any) -> dict[str, Any]:
    return {"data": data, "error": None}


def _error(code: int, reason: str, message: str) -> dict[str, Any]:
    metadata = {"service_code": SERVICE_CODE, "request_id": str(uuid.uuid4())}
    error = {"code": code, "reason": reason, "message": message, "metadata": metadata}
    return {"data": None, "error": error}


class _InputError(ValueError):
    """An admin request the simulator cannot act on; the message says why."""


@dataclasses.dataclass(frozen=True)
class _Grant:
    customer_id: int
    name: str
    scopes: tuple[str, ...]
    client_id: str | None  # None: any configured client may redeem the code


@dataclasses.dataclass
class _Fault:
    endpoint: str
    times: int = 1
    before_signature: bool = False
    delay_ms: float = 0
    drop: bool = False
    status: int | None = None
    raw_body: str | None = None
    content_type: str = "text/html; charset=utf-8"
    error: dict[str, Any] | None = None
    data_override: dict[str, Any] | None = None
    data_remove: list[str] = dataclasses.field(default_factory=list)

    def replaces_answer(self) -> bool:
        """Whether the fault answers in place of the real handler."""
        if self.raw_body is not None or self.error is not None:
            return True
        altered = self.data_override is not None or bool(self.data_remove)
        return self.status is not None and not altered


@dataclasses.dataclass
class _Config:
    clients: dict[str, str]
    window_ms: int
    rotate_refresh: bool
    code_ttl: float
    access_ttl: float

    def public(self) -> dict[str, Any]:
        """The configuration without the secrets."""
        return {
            "window_ms": self.window_ms,
            "rotate_refresh": self.rotate_refresh,
            "code_ttl": self.code_ttl,
            "access_ttl": self.access_ttl,
            "client_ids": sorted(self.clients),
        }


def _empty_stats() -> dict[str, Any]:
    return {
        "calls": {"token": 0, "refresh": 0, "me": 0},
        "refresh_success": 0,
        "refresh_reuse_refused": 0,
        "signature_refused": 0,
        "codes_redeemed": 0,
    }


class _State:
    """Codes, tokens, faults and counters; every access holds ``lock``."""

    def __init__(self, config: _Config) -> None:
        self.lock = threading.Lock()
        self.config = config
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.codes: dict[str, tuple[_Grant, float]] = {}
            self.access: dict[str, tuple[_Grant, float]] = {}
            self.refresh: dict[str, _Grant] = {}
            self.retired: set[str] = set()
            self.faults: list[_Fault] = []
            self.stats = _empty_stats()
            # Everything handed out since the last reset, used or not, so that a
            # test can prove none of it reached a log line or a response.
            self.issued: dict[str, list[str]] = {
                "codes": [],
                "access_tokens": [],
                "refresh_tokens": [],
            }

    def count(self, counter: str, endpoint: str | None = None) -> None:
        with self.lock:
            if endpoint is None:
                self.stats[counter] += 1
            else:
                self.stats[counter][endpoint] += 1

    def snapshot_stats(self) -> dict[str, Any]:
        with self.lock:
            return copy.deepcopy(self.stats)

    def signing_terms(self, client_id: str) -> tuple[str | None, int]:
        """The client's secret (None if unknown) and the timestamp window."""
        with self.lock:
            return self.config.clients.get(client_id), self.config.window_ms

    def add_fault(self, fault: _Fault) -> int:
        with self.lock:
            self.faults.append(fault)
            return len(self.faults)

    def clear_faults(self) -> int:
        with self.lock:
            cleared = len(self.faults)
            self.faults.clear()
            return cleared

    def list_faults(self) -> list[dict[str, Any]]:
        with self.lock:
            return [dataclasses.asdict(fault) for fault in self.faults]

    def take_fault(self, endpoint: str, before_signature: bool) -> _Fault | None:
        """The oldest queued fault of this kind for ``endpoint``, used up by one."""
        with self.lock:
            for fault in self.faults:
                if fault.before_signature != before_signature:
                    continue
                if fault.endpoint not in (endpoint, "any"):
                    continue
                fault.times -= 1
                if fault.times <= 0:
                    self.faults.remove(fault)
                return fault
        return None

    def issue_code(
        self,
        customer_id: int,
        name: str | None,
        requested: list[str],
        refused: list[str],
        client_id: str | None,
    ) -> dict[str, Any]:
        default_name, granted = TEST_CUSTOMERS.get(
            customer_id, (f"Khách Hàng {customer_id}", frozenset(KNOWN_SCOPES))
        )
        success: list[str] = []
        errors: dict[str, int] = {}
        for scope in dict.fromkeys(requested):
            if scope not in granted:
                errors[scope] = SCOPE_NOT_GRANTED
            elif scope in refused:
                errors[scope] = SCOPE_REFUSED
            else:
                success.append(scope)
        grant = _Grant(customer_id, name or default_name, tuple(success), client_id)
        code = _new_opaque()
        with self.lock:
            self.codes[code] = (grant, time.monotonic() + self.config.code_ttl)
            self.issued["codes"].append(code)
        return {
            "authCode": code,
            "authSuccessScopes": success,
            "authErrorScopes": errors,
        }

    def exchange(self, code: str, client_id: str) -> tuple[int, dict[str, Any]]:
        with self.lock:
            grant, expires_at = self.codes.get(code, (None, 0.0))
            if grant is None or grant.client_id not in (None, client_id):
                return 400, _error(400, "invalid_code", "Invalid auth code.")
            del self.codes[code]
            if time.monotonic() >= expires_at:
                return 400, _error(400, "invalid_code", "Auth code expired.")
            self.stats["codes_redeemed"] += 1
            grant = dataclasses.replace(grant, client_id=client_id)
            data: dict[str, Any] = {
                "access_token": self._new_access(grant),
                "expires_in": self._expires_in(),
            }
            if "offline" in grant.scopes:
                data["refresh_token"] = self._new_refresh(grant)
            data["scopes"] = list(grant.scopes)
            data["token_type"] = "bearer"
            data["customer"] = {"id": grant.customer_id, "name": grant.name}
            return 200, _ok(data)

    def refresh_access(self, token: str, client_id: str) -> tuple[int, dict[str, Any]]:
        with self.lock:
            grant = self.refresh.get(token)
            if grant is None or grant.client_id != client_id:
                if token in self.retired:
                    self.stats["refresh_reuse_refused"] += 1
                return 400, _error(400, "invalid_token", "Invalid refresh token.")
            if self.config.rotate_refresh:
                del self.refresh[token]
                self.retired.add(token)
                token = self._new_refresh(grant)
            self.stats["refresh_success"] += 1
            data = {
                "access_token": self._new_access(grant),
                "expires_in": self._expires_in(),
                "refresh_token": token,
                "scopes": list(grant.scopes),
                "token_type": "bearer",
            }
            return 200, _ok(data)

    def who(self, token: str, client_id: str) -> tuple[int, dict[str, Any]]:
        with self.lock:
            grant, expires_at = self.access.get(token, (None, 0.0))
            if grant is None or grant.client_id != client_id:
                return 400, _error(400, "invalid_token", "Invalid access token.")
            if time.monotonic() >= expires_at:
                del self.access[token]
                return 400, _error(400, "invalid_token", "Access token expired.")
            data = {
                "customer_id": grant.customer_id,
                "customer_name": grant.name,
                "scopes": list(grant.scopes),
            }
            return 200, _ok(data)

    def _new_access(self, grant: _Grant) -> str:
        token = _new_opaque()
        self.access[token] = (grant, time.monotonic() + self.config.access_ttl)
        self.issued["access_tokens"].append(token)
        return token

    def _new_refresh(self, grant: _Grant) -> str:
        token = _new_opaque()
        self.refresh[token] = grant
        self.issued["refresh_tokens"].append(token)
        return token

    def _expires_in(self) -> int:
        return math.ceil(self.config.access_ttl)


# --- admin input parsing -------------------------------------------------------------


def _get(body: dict[str, Any], key: str, kinds: tuple[type, ...], default: Any) -> Any:
    """``body[key]`` checked against ``kinds`` (a bool is not an int here)."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(kind.__name__ for kind in kinds)
        raise _InputError(f"'{key}' must be {names}.")
    return value


def _non_negative(body: dict[str, Any], key: str, default: Any) -> Any:
    value = _get(body, key, (int, float), default)
    if value is not None and (not math.isfinite(value) or value < 0):
        raise _InputError(f"'{key}' must be a number >= 0.")
    return value


def _string_list(body: dict[str, Any], key: str, default: list[str]) -> list[str]:
    value = _get(body, key, (list,), default)
    if not all(isinstance(item, str) for item in value):
        raise _InputError(f"'{key}' must be a list of strings.")
    return list(value)


def _reject_unknown(body: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise _InputError(f"Unknown field(s): {', '.join(unknown)}.")


def _json_object(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise _InputError("Body must be JSON.") from exc
    if not isinstance(body, dict):
        raise _InputError("Body must be a JSON object.")
    return body


def _customer_id(value: Any) -> int:
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _InputError("'customer_id' must be a positive integer.")
    return value


def _parse_fault(body: dict[str, Any]) -> _Fault:
    _reject_unknown(body, {field.name for field in dataclasses.fields(_Fault)})
    endpoint = _get(body, "endpoint", (str,), None)
    if endpoint not in _FAULT_ENDPOINTS:
        raise _InputError(f"'endpoint' must be one of {', '.join(_FAULT_ENDPOINTS)}.")
    fault = _Fault(
        endpoint=endpoint,
        times=_get(body, "times", (int,), 1),
        before_signature=_get(body, "before_signature", (bool,), False),
        delay_ms=_non_negative(body, "delay_ms", 0),
        drop=_get(body, "drop", (bool,), False),
        status=_get(body, "status", (int,), None),
        raw_body=_get(body, "raw_body", (str,), None),
        content_type=_get(body, "content_type", (str,), _Fault.content_type),
        error=_get(body, "error", (dict,), None),
        data_override=_get(body, "data_override", (dict,), None),
        data_remove=_string_list(body, "data_remove", []),
    )
    if fault.times < 1:
        raise _InputError("'times' must be at least 1.")
    if fault.status is not None and not 100 <= fault.status <= 599:
        raise _InputError("'status' must be an HTTP status (100-599).")
    effects = (fault.delay_ms, fault.drop, fault.replaces_answer(), fault.data_remove)
    if not any(effects) and fault.data_override is None:
        raise _InputError(
            "A fault needs delay_ms, drop, status, raw_body, error, "
            "data_override or data_remove."
        )
    return fault


def _apply_config(state: _State, body: dict[str, Any]) -> dict[str, Any]:
    """Check every field first, then apply them all under the lock."""
    _reject_unknown(
        body, {"window_ms", "rotate_refresh", "access_ttl", "code_ttl", "clients"}
    )
    clients = _get(body, "clients", (dict,), {})
    for client_id, secret in clients.items():
        if not client_id or not (secret is None or isinstance(secret, str) and secret):
            message = "'clients' maps a client id to a secret (null removes it)."
            raise _InputError(message)
    changes = {
        "window_ms": _get(body, "window_ms", (int,), None),
        "rotate_refresh": _get(body, "rotate_refresh", (bool,), None),
        "access_ttl": _non_negative(body, "access_ttl", None),
        "code_ttl": _non_negative(body, "code_ttl", None),
    }
    if changes["window_ms"] is not None and changes["window_ms"] < 0:
        raise _InputError("'window_ms' must be >= 0.")
    with state.lock:
        config = state.config
        for name, value in changes.items():
            if value is not None:
                setattr(config, name, value)
        for client_id, secret in clients.items():
            if secret is None:
                config.clients.pop(client_id, None)
            else:
                config.clients[client_id] = secret
        return config.public()


def _auth_code_request(state: _State, body: dict[str, Any]) -> dict[str, Any]:
    _reject_unknown(body, {"customer_id", "name", "scopes", "refuse", "client_id"})
    if "customer_id" not in body:
        raise _InputError("'customer_id' is required.")
    customer_id = _customer_id(body["customer_id"])
    name = _get(body, "name", (str,), None)
    scopes = _string_list(body, "scopes", DEFAULT_SCOPES)
    refused = _string_list(body, "refuse", [])
    client_id = _get(body, "client_id", (str,), None)
    if client_id is not None and state.signing_terms(client_id)[0] is None:
        raise _InputError("'client_id' is not a configured client.")
    return state.issue_code(customer_id, name, scopes, refused, client_id)


def _query_as_body(query: str) -> dict[str, Any]:
    """``customer_id=1&scopes=offline,user_profile`` as an auth-code request body."""
    pairs = urllib.parse.parse_qs(query, keep_blank_values=True)
    body: dict[str, Any] = {key: values[-1] for key, values in pairs.items()}
    for key in ("scopes", "refuse"):
        if key in body:
            body[key] = [scope for scope in body[key].split(",") if scope]
    return body


def _merge(data: dict[str, Any], override: dict[str, Any]) -> None:
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            _merge(data[key], value)
        else:
            data[key] = copy.deepcopy(value)


def _remove(data: Any, dotted: str) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        data = data.get(key) if isinstance(data, dict) else None
    if isinstance(data, dict):
        data.pop(last, None)


def _alter(
    fault: _Fault, status: int, envelope: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    """Apply a fault's data changes to a real success answer (errors pass through)."""
    data = envelope.get("data")
    if envelope.get("error") is None and isinstance(data, dict):
        _merge(data, fault.data_override or {})
        for dotted in fault.data_remove:
            _remove(data, dotted)
    return (fault.status or status), envelope


def _fault_envelope(fault: _Fault) -> dict[str, Any]:
    given = fault.error or {}
    status = fault.status or 200
    code = given.get("code", max(status, 400))
    envelope = _error(
        code,
        given.get("reason", "server_error"),
        given.get("message", "Simulated fault."),
    )
    if "metadata" in given:
        if given["metadata"] is None:
            del envelope["error"]["metadata"]
        else:
            envelope["error"]["metadata"] = given["metadata"]
    return envelope


def _signature_refusal(state: _State, headers: Any, body: bytes) -> str | None:
    """Why the request's signature is refused, or None when it is good."""
    values = []
    for name in (CLIENT_ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER):
        found = headers.get_all(name) or []
        if len(found) != 1:
            return f"Expected exactly one {name} header."
        values.append(found[0].strip())
    client_id, timestamp, signature = values
    secret, window_ms = state.signing_terms(client_id)
    if secret is None:
        return "Unknown client id."
    if not _TIMESTAMP.fullmatch(timestamp):
        return "Timestamp must be milliseconds since the epoch, in decimal digits."
    if abs(time.time() * 1000 - int(timestamp)) > window_ms:
        return f"Timestamp is outside the {window_ms} ms window."
    if not _SIGNATURE.fullmatch(signature):
        return "Signature must be 64 lowercase hex digits."
    expected = sign(secret, client_id, timestamp, body)
    if not hmac.compare_digest(expected, signature):
        return "Signature does not match."
    return None


# --- HTTP ----------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], state: _State, base_path: str, quiet: bool
    ) -> None:
        self.host = address[0]
        self.state = state
        self.quiet = quiet
        self.endpoints = {
            base_path + path: name for path, name in _ENDPOINT_PATHS.items()
        }
        self.stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, a DNS lookup that a local
        # test server has no use for.
        socketserver.TCPServer.server_bind(self)
        self.server_name = self.host
        self.server_port = self.port

    @property
    def port(self) -> int:
        return int(self.socket.getsockname()[1])

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, address = super().get_request()
        # Headers and body leave in two writes; with Nagle's algorithm on, the second
        # waits for the client's delayed ACK, about 40 ms per response.
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._connections_lock:
            self._connections.add(conn)
        return conn, address

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client resetting an idle keep-alive connection is routine, not a fault.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    def close_connections(self) -> None:
        """End idle keep-alive connections, which would otherwise outlive stop()."""
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


_AdminHandler = Callable[["_Handler", bytes], dict[str, Any]]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "TikiSandboxSimulator/1"
    timeout = IDLE_TIMEOUT_SECONDS
    server: _Server

    def do_POST(self) -> None:
        started = time.monotonic()
        self._outcome = ""
        try:
            self._dispatch()
        except OSError:
            # The client went away (a timeout on its side, typically): nothing to say.
            self.close_connection = True
            self._outcome = "client gone"
        self._log(started)

    do_GET = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_POST

    def _dispatch(self) -> None:
        path, _, query = self.path.partition("?")
        body = self._read_body()
        if body is None:
            return
        if path.startswith("/_sim/"):
            self._admin(path, query, body)
        elif path in self.server.endpoints:
            self._tiki(self.server.endpoints[path], body)
        else:
            self._send_json(404, _error(404, "not_found", "No such endpoint."))

    def _read_body(self) -> bytes | None:
        """The raw body, or None once an error has been answered."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            message = "Send a Content-Length; chunked bodies are not supported."
            self._send_json(411, _error(411, "invalid_request", message))
            return None
        lengths = self.headers.get_all("Content-Length") or ["0"]
        if len(lengths) != 1 or not _DIGITS.fullmatch(lengths[0].strip()):
            self.close_connection = True
            self._send_json(400, _error(400, "invalid_request", "Bad Content-Length."))
            return None
        length = int(lengths[0])
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            self._send_json(413, _error(413, "invalid_request", "Body too large."))
            return None
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True
            self._outcome = "short body"
            return None
        return body

    def _tiki(self, endpoint: str, body: bytes) -> None:
        state = self.server.state
        if self.command != "POST":
            envelope = _error(405, "method_not_allowed", "Use POST.")
            self._send_json(405, envelope, {"Allow": "POST"})
            return
        state.count("calls", endpoint)
        before = state.take_fault(endpoint, before_signature=True)
        if before is not None and self._interrupt(before):
            return
        # The signature is checked before the body is read as JSON, so a refused
        # request never uses up a code or a refresh token: the backend relies on this
        # to retry an exchange after a clock or secret problem.
        refusal = _signature_refusal(state, self.headers, body)
        if refusal is not None:
            state.count("signature_refused")
            self._send_json(400, _error(400, "invalid_signature", refusal))
            return
        after = state.take_fault(endpoint, before_signature=False)
        if after is not None and self._interrupt(after):
            return
        status, envelope = self._run(endpoint, body)
        for fault in (before, after):
            if fault is not None:
                status, envelope = _alter(fault, status, envelope)
        self._send_json(status, envelope)

    def _run(self, endpoint: str, body: bytes) -> tuple[int, dict[str, Any]]:
        field = _BODY_FIELDS[endpoint]
        try:
            value = json.loads(body)
        except ValueError:
            value = None
        if not isinstance(value, dict) or not isinstance(value.get(field), str):
            message = f"Body must be a JSON object with a string '{field}'."
            return 400, _error(400, "invalid_request", message)
        state = self.server.state
        actions = {
            "token": state.exchange,
            "refresh": state.refresh_access,
            "me": state.who,
        }
        return actions[endpoint](value[field], self.headers[CLIENT_ID_HEADER].strip())

    def _interrupt(self, fault: _Fault) -> bool:
        """Delay, then drop or answer for the fault; False lets the real handler run."""
        if fault.delay_ms:
            self.server.stopping.wait(fault.delay_ms / 1000)
        if fault.drop:
            self.close_connection = True
            self._outcome = "fault: dropped"
            return True
        if fault.raw_body is not None:
            self._outcome = "fault: raw body"
            self._send(fault.status or 200, fault.raw_body.encode(), fault.content_type)
            return True
        if fault.replaces_answer():
            self._send_json(fault.status or 200, _fault_envelope(fault))
            self._outcome += " (fault)"
            return True
        return False

    def _admin(self, path: str, query: str, body: bytes) -> None:
        routes = _ADMIN_ROUTES.get(path)
        if routes is None:
            self._send_json(
                404, _error(404, "not_found", "No such simulator endpoint.")
            )
            return
        action = routes.get(self.command)
        if action is None:
            allow = ", ".join(sorted(routes))
            envelope = _error(405, "method_not_allowed", f"Use {allow}.")
            self._send_json(405, envelope, {"Allow": allow})
            return
        self._query = query
        try:
            answer = action(self, body)
        except _InputError as exc:
            self._send_json(400, _error(400, "invalid_request", str(exc)))
            return
        self._send_json(200, answer)

    def _send_json(
        self,
        status: int,
        payload: dict[str, Any],
        headers: dict[str, str] | None = None,
    ) -> None:
        error = payload.get("error")
        if isinstance(error, dict):
            self._outcome = str(error.get("reason"))
        text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        self._send(status, text.encode(), "application/json; charset=utf-8", headers)

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _log(self, started: float) -> None:
        # The path only: no query, body, header or answer, which may hold codes,
        # tokens or signatures.
        if self.server.quiet:
            return
        status = getattr(self, "_status", "-")
        millis = (time.monotonic() - started) * 1000
        path = self.path.partition("?")[0]
        line = f"tiki-sim {self.command} {path} {status} {self._outcome} {millis:.1f}ms"
        print(" ".join(line.split()), file=sys.stderr, flush=True)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # _log writes one line per request instead

    def log_error(self, format: str, *args: Any) -> None:
        # http.server's own errors (a malformed request line) quote the raw request.
        if not self.server.quiet:
            print(
                f"tiki-sim refused a malformed request ({args[0] if args else '?'})",
                file=sys.stderr,
                flush=True,
            )

    # --- admin actions ---

    def _health(self, body: bytes) -> dict[str, Any]:
        return {"ok": True}

    def _auth_code_get(self, body: bytes) -> dict[str, Any]:
        return _auth_code_request(self.server.state, _query_as_body(self._query))

    def _auth_code_post(self, body: bytes) -> dict[str, Any]:
        return _auth_code_request(self.server.state, _json_object(body))

    def _faults_list(self, body: bytes) -> dict[str, Any]:
        return {"faults": self.server.state.list_faults()}

    def _faults_add(self, body: bytes) -> dict[str, Any]:
        queued = self.server.state.add_fault(_parse_fault(_json_object(body)))
        return {"ok": True, "queued": queued}

    def _faults_clear(self, body: bytes) -> dict[str, Any]:
        return {"ok": True, "cleared": self.server.state.clear_faults()}

    def _config_show(self, body: bytes) -> dict[str, Any]:
        with self.server.state.lock:
            return self.server.state.config.public()

    def _config_change(self, body: bytes) -> dict[str, Any]:
        return _apply_config(self.server.state, _json_object(body))

    def _stats(self, body: bytes) -> dict[str, Any]:
        return self.server.state.snapshot_stats()

    def _issued(self, body: bytes) -> dict[str, Any]:
        with self.server.state.lock:
            return copy.deepcopy(self.server.state.issued)

    def _reset(self, body: bytes) -> dict[str, Any]:
        self.server.state.reset()
        return {"ok": True}


_ADMIN_ROUTES: dict[str, dict[str, _AdminHandler]] = {
    "/_sim/health": {"GET": _Handler._health},
    "/_sim/auth-code": {
        "GET": _Handler._auth_code_get,
        "POST": _Handler._auth_code_post,
    },
    "/_sim/faults": {
        "GET": _Handler._faults_list,
        "POST": _Handler._faults_add,
        "DELETE": _Handler._faults_clear,
    },
    "/_sim/config": {"GET": _Handler._config_show, "POST": _Handler._config_change},
    "/_sim/stats": {"GET": _Handler._stats},
    "/_sim/issued": {"GET": _Handler._issued},
    "/_sim/reset": {"POST": _Handler._reset},
}


# --- Python API ----------------------------------------------------------------------


class Simulator:
    """A running simulator; give ``url`` to the backend as TIKI_BASE_URL."""

    def __init__(
        self, server: _Server, thread: threading.Thread, base_path: str
    ) -> None:
        self._server = server
        self._thread = thread
        self.port = server.port
        self.admin_url = f"http://{server.host}:{self.port}"
        self.url = self.admin_url + base_path

    def stop(self) -> None:
        """Stop serving, end open connections and cut short any fault delay."""
        if self._server.stopping.is_set():
            return
        self._server.stopping.set()
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        self._thread.join(timeout=5)


def start(
    host: str = "127.0.0.1",
    port: int = 0,
    clients: dict[str, str] | None = None,
    base_path: str = DEFAULT_BASE_PATH,
    window_ms: int = 60000,
    rotate_refresh: bool = True,
    code_ttl: float = 300,
    access_ttl: float = 3600,
    quiet: bool = False,
) -> Simulator:
    """Serve a simulator from a daemon thread (port 0 picks a free port)."""
    base_path = "/" + base_path.strip("/") if base_path.strip("/") else ""
    if base_path.startswith("/_sim"):
        raise ValueError("The base path may not lie under /_sim.")
    config = _Config(
        clients=dict(clients or {DEFAULT_CLIENT_ID: DEFAULT_CLIENT_SECRET}),
        window_ms=window_ms,
        rotate_refresh=rotate_refresh,
        code_ttl=code_ttl,
        access_ttl=access_ttl,
    )
    server = _Server((host, port), _State(config), base_path, quiet)
    thread = threading.Thread(
        target=server.serve_forever,
        # How often the loop looks for stop(): also how long stop() can take.
        kwargs={"poll_interval": 0.1},
        name="tiki-simulator",
        daemon=True,
    )
    thread.start()
    return Simulator(server, thread, base_path)


# --- command line --------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    try:
        simulator = start(
            host=args.host,
            port=args.port,
            clients={args.client_id: args.client_secret},
            base_path=args.base_path,
            window_ms=args.window_ms,
            rotate_refresh=not args.no_rotate,
            code_ttl=args.code_ttl,
            access_ttl=args.access_ttl,
        )
    except OSError as exc:
        print(
            f"Cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr
        )
        return 1
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    print(simulator.url, flush=True)
    secret_note = (
        "DEFAULT_CLIENT_SECRET in local/tiki_simulator.py"
        if args.client_secret == DEFAULT_CLIENT_SECRET
        else "as given"
    )
    print(
        f"Tiki sandbox simulator: TIKI_BASE_URL={simulator.url} "
        f"TIKI_CLIENT_ID={args.client_id} (secret: {secret_note}); Ctrl-C stops it.",
        file=sys.stderr,
        flush=True,
    )
    while not stopping.wait(0.5):
        pass
    simulator.stop()
    return 0


def _code(args: argparse.Namespace) -> int:
    parts = urllib.parse.urlsplit(args.url)
    admin_url = f"{parts.scheme}://{parts.netloc}"
    query = urllib.parse.urlencode(
        {"customer_id": args.customer, "scopes": args.scopes}
    )
    # No proxy: the simulator is local, whatever HTTP_PROXY says.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(
            f"{admin_url}/_sim/auth-code?{query}", timeout=CLI_TIMEOUT_SECONDS
        ) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as exc:
        print(f"The simulator refused: {_error_message(exc)}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        print(
            f"No Tiki simulator answers at {admin_url} ({reason}); "
            "start one with: python -m local.tiki_simulator serve",
            file=sys.stderr,
        )
        return 1
    if answer["authErrorScopes"]:
        print(f"Scopes not granted: {answer['authErrorScopes']}", file=sys.stderr)
    print(answer["authCode"])
    return 0


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.load(exc)["error"]["message"])
    except (ValueError, KeyError, TypeError, OSError):
        return f"HTTP {exc.code}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m local.tiki_simulator",
        description="Local Tiki sandbox OAuth simulator.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the simulator in the foreground")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve.add_argument("--client-id", default=DEFAULT_CLIENT_ID)
    serve.add_argument("--client-secret", default=DEFAULT_CLIENT_SECRET)
    serve.add_argument("--base-path", default=DEFAULT_BASE_PATH)
    serve.add_argument("--window-ms", type=int, default=60000)
    serve.add_argument(
        "--no-rotate",
        action="store_true",
        help="return the same refresh token on refresh",
    )
    serve.add_argument("--access-ttl", type=float, default=3600)
    serve.add_argument("--code-ttl", type=float, default=300)
    code = commands.add_parser("code", help="print an auth code from a running one")
    code.add_argument("--url", default=f"http://127.0.0.1:{DEFAULT_PORT}")
    code.add_argument("--customer", type=int, default=1)
    code.add_argument("--scopes", default=",".join(DEFAULT_SCOPES))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m local.tiki_simulator``."""
    args = _parser().parse_args(argv)
    return _serve(args) if args.command == "serve" else _code(args)


if __name__ == "__main__":
    sys.exit(main())
