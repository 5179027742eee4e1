"""A local stand-in for Secret Manager's REST API, for tests and local runs.

It answers the one call the backend makes, ``access_secret_version``, the way the
real service does over REST (``transport="rest"``), so that pointing
``SECRET_MANAGER_EMULATOR_HOST`` at it exercises the real client library. An admin
API under ``/_stub/`` adds versions, changes their state, injects faults and counts
calls. Payloads are never logged.

    python -m local.secret_manager_stub serve --port 8282 \
        --secret projects/tini-local/secrets/tiki-client-secret=VALUE
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import re
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any
from urllib.parse import unquote, urlsplit

logger = logging.getLogger(__name__)

STATES = ("enabled", "disabled", "destroyed")

# gRPC status names that Google's JSON errors carry beside the HTTP status.
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

_ACCESS_PATH = re.compile(
    r"^/v1/(?P<secret>projects/[^/]+(?:/locations/[^/]+)?/secrets/[^/]+)"
    r"/versions/(?P<version>[^/:]+):access$"
)
_ADD_PATH = re.compile(r"^/_stub/secrets/(?P<project>[^/]+)/(?P<secret>[^/:]+)$")
_STATE_PATH = re.compile(
    r"^/_stub/secrets/(?P<project>[^/]+)/(?P<secret>[^/]+)"
    r"/versions/(?P<version>\d+):(?P<action>enable|disable|destroy)$"
)
_SECRET_NAME = re.compile(r"^projects/[^/]+(?:/locations/[^/]+)?/secrets/[^/]+$")
_ACTION_STATES = {"enable": "enabled", "disable": "disabled", "destroy": "destroyed"}

# Admin request bodies are small JSON documents; refuse anything larger.
_MAX_BODY = 1024 * 1024


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c_pure(data: bytes) -> int:
    """CRC32C (Castagnoli), bit-reflected, as Secret Manager's dataCrc32c."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


try:
    import google_crc32c
except ImportError:  # pragma: no cover - the dev requirements install it
    crc32c = crc32c_pure
else:

    def crc32c(data: bytes) -> int:
        """CRC32C (Castagnoli), bit-reflected, as Secret Manager's dataCrc32c."""
        return int(google_crc32c.value(data))


class StubError(Exception):
    """A request the stand-in refuses, in Google's JSON error shape."""

    def __init__(self, code: int, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or _STATUS_NAMES.get(code, "UNKNOWN")

    def body(self) -> dict[str, Any]:
        return {
            "error": {"code": self.code, "message": self.message, "status": self.status}
        }


@dataclass
class _Version:
    data: bytes
    state: str = "enabled"


@dataclass
class _Faults:
    times: int = 0
    delay_ms: int = 0
    status: int | None = None
    bad_crc: bool = False


@dataclass
class _Store:
    """The stand-in's state; every method takes the lock."""

    seed: dict[str, list[bytes]]
    lock: threading.Lock = field(default_factory=threading.Lock)
    secrets: dict[str, list[_Version]] = field(default_factory=dict)
    faults: _Faults = field(default_factory=_Faults)
    calls: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.secrets = {
                name: [_Version(data) for data in versions]
                for name, versions in self.seed.items()
            }
            self.faults = _Faults()
            self.calls = Counter()

    def add_version(self, name: str, data: bytes) -> int:
        if not _SECRET_NAME.match(name):
            raise StubError(400, f"Invalid secret name [{name}].")
        with self.lock:
            versions = self.secrets.setdefault(name, [])
            versions.append(_Version(data))
            return len(versions)

    def set_state(self, name: str, version: int, state: str) -> None:
        if state not in STATES:
            raise StubError(400, f"Unknown state [{state}]; use one of {STATES}.")
        with self.lock:
            current = self._version(name, str(version))
            if current.state == "destroyed" and state != "destroyed":
                raise StubError(
                    400,
                    f"Secret Version [{name}/versions/{version}] is in DESTROYED "
                    "state.",
                    "FAILED_PRECONDITION",
                )
            current.state = state
            if state == "destroyed":
                current.data = b""

    def set_faults(self, faults: _Faults) -> None:
        with self.lock:
            self.faults = faults

    def take_fault(self) -> _Faults | None:
        with self.lock:
            if self.faults.times <= 0:
                return None
            self.faults.times -= 1
            return _Faults(
                1, self.faults.delay_ms, self.faults.status, self.faults.bad_crc
            )

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "access_calls": sum(self.calls.values()),
                "by_name": dict(self.calls),
            }

    def access(self, name: str, version: str) -> tuple[str, bytes]:
        """The version's full name and data, or the error real GSM would give."""
        with self.lock:
            self.calls[f"{name}/versions/{version}"] += 1
            number = self._resolve(name, version)
            found = self.secrets[name][number - 1]
            full_name = f"{name}/versions/{number}"
            if found.state != "enabled":
                raise StubError(
                    400,
                    f"Secret Version [{full_name}] is in {found.state.upper()} state.",
                    "FAILED_PRECONDITION",
                )
            return full_name, found.data

    def _resolve(self, name: str, version: str) -> int:
        versions = self.secrets.get(name)
        if not versions:
            raise StubError(404, f"Secret [{name}] not found or has no versions.")
        if version == "latest":
            enabled = [i for i, v in enumerate(versions, 1) if v.state == "enabled"]
            if not enabled:
                raise StubError(404, f"Secret [{name}] has no enabled versions.")
            return enabled[-1]
        if not version.isdigit() or int(version) < 1:
            raise StubError(400, f"Invalid secret version [{version}].")
        if int(version) > len(versions):
            raise StubError(
                404, f"Secret Version [{name}/versions/{version}] not found."
            )
        return int(version)

    def _version(self, name: str, version: str) -> _Version:
        return self.secrets[name][self._resolve(name, version) - 1]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    store: _Store
    quiet: bool

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, addr = super().get_request()
        # Without this, a keep-alive client waits ~40 ms on every call for the
        # delayed ACK (Nagle's algorithm meeting a split header/body write).
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, addr


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def log_message(self, format: str, *args: Any) -> None:
        # Only the request line and status reach the log, never a body.
        if not self.server.quiet:
            logger.info("%s %s", self.address_string(), format % args)

    def _dispatch(self, method: str) -> None:
        path = unquote(urlsplit(self.path).path)
        try:
            body = self._read_body()
            status, answer = self._route(method, path, body)
        except StubError as exc:
            status, answer = exc.code, exc.body()
        try:
            self._send(status, answer)
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up first (a delay fault outlasting its timeout).
            self.close_connection = True

    def _route(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        store = self.server.store
        if path.startswith("/v1/"):
            match = _ACCESS_PATH.match(path)
            if not match:
                raise StubError(404, f"Unknown method: {method} {path}", "NOT_FOUND")
            self._only(method, "GET")
            return 200, self._access(match["secret"], match["version"])
        if path == "/_stub/faults":
            if method == "DELETE":
                store.set_faults(_Faults())
                return 200, {}
            self._only(method, "POST")
            store.set_faults(_parse_faults(_json(body)))
            return 200, {}
        if path == "/_stub/stats":
            self._only(method, "GET")
            return 200, store.stats()
        if path == "/_stub/reset":
            self._only(method, "POST")
            store.reset()
            return 200, {}
        if match := _ADD_PATH.match(path):
            self._only(method, "POST")
            name = f"projects/{match['project']}/secrets/{match['secret']}"
            return 200, {"version": store.add_version(name, _payload(_json(body)))}
        if match := _STATE_PATH.match(path):
            self._only(method, "POST")
            name = f"projects/{match['project']}/secrets/{match['secret']}"
            store.set_state(
                name, int(match["version"]), _ACTION_STATES[match["action"]]
            )
            return 200, {}
        raise StubError(404, f"Unknown path: {path}")

    def _access(self, secret: str, version: str) -> dict[str, Any]:
        store = self.server.store
        fault = store.take_fault()
        try:
            # Counted on arrival, so a slow call is never counted late.
            full_name, data = store.access(secret, version)
        finally:
            if fault and fault.delay_ms:
                time.sleep(fault.delay_ms / 1000)
        if fault and fault.status:
            raise StubError(fault.status, "Injected fault from the local stand-in.")
        checksum = crc32c(data)
        if fault and fault.bad_crc:
            checksum ^= 0x1
        return {
            "name": full_name,
            "payload": {
                "data": base64.b64encode(data).decode("ascii"),
                "dataCrc32c": str(checksum),
            },
        }

    def _only(self, method: str, allowed: str) -> None:
        if method != allowed:
            raise StubError(405, f"Method {method} not allowed here.", "UNIMPLEMENTED")

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            self.close_connection = True
            raise StubError(413, "Request body too large.")
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, answer: Any) -> None:
        raw = json.dumps(answer).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


def _json(body: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(body or b"{}")
    except ValueError as exc:
        raise StubError(400, "The request body is not JSON.") from exc
    if not isinstance(parsed, dict):
        raise StubError(400, "The request body must be a JSON object.")
    return parsed


def _payload(body: Mapping[str, Any]) -> bytes:
    if isinstance(body.get("data"), str):
        return str(body["data"]).encode("utf-8")
    if isinstance(body.get("data_base64"), str):
        try:
            return base64.b64decode(body["data_base64"], validate=True)
        except binascii.Error as exc:
            raise StubError(400, "'data_base64' is not valid base64.") from exc
    raise StubError(400, "Give the version's text as 'data' or 'data_base64'.")


def _parse_faults(body: Mapping[str, Any]) -> _Faults:
    try:
        faults = _Faults(
            times=int(body.get("times", 1)),
            delay_ms=int(body.get("delay_ms", 0)),
            status=int(body["status"]) if body.get("status") is not None else None,
            bad_crc=bool(body.get("bad_crc", False)),
        )
    except (TypeError, ValueError) as exc:
        raise StubError(
            400, "Faults take integers 'times', 'delay_ms', 'status'."
        ) from exc
    if faults.status is not None and not 400 <= faults.status <= 599:
        raise StubError(400, "A fault's 'status' must be an HTTP error status.")
    return faults


class SecretStub:
    """A running stand-in: ``.host`` is the value for SECRET_MANAGER_EMULATOR_HOST."""

    def __init__(self, server: _Server) -> None:
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="secret-manager-stub", daemon=True
        )
        self._stopped = False
        host, port = server.server_address[:2]
        self.port: int = int(port)
        self.host: str = f"{host!s}:{self.port}"
        self.url: str = f"http://{self.host}"

    def add_version(self, name: str, data: str | bytes) -> int:
        """Add an enabled version to ``projects/P/secrets/S``; returns its number."""
        raw = data.encode("utf-8") if isinstance(data, str) else data
        return self._server.store.add_version(name, raw)

    def set_state(self, name: str, version: int, state: str) -> None:
        """Make a version "enabled", "disabled" or "destroyed"."""
        self._server.store.set_state(name, version, state)

    def set_faults(
        self,
        times: int = 1,
        delay_ms: int = 0,
        status: int | None = None,
        bad_crc: bool = False,
    ) -> None:
        """Make the next ``times`` access calls slow, fail, or carry a wrong CRC."""
        self._server.store.set_faults(_Faults(times, delay_ms, status, bad_crc))

    def clear_faults(self) -> None:
        self._server.store.set_faults(_Faults())

    def stats(self) -> dict[str, Any]:
        """``{"access_calls": n, "by_name": {requested name: n}}``."""
        return self._server.store.stats()

    def reset(self) -> None:
        """Back to the secrets given at start, with no faults and no calls counted."""
        self._server.store.reset()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start(
    host: str = "127.0.0.1",
    port: int = 0,
    secrets: Mapping[str, Sequence[str | bytes]] | None = None,
    quiet: bool = False,
) -> SecretStub:
    """Serve the stand-in on a thread; ``secrets`` maps names to versions' texts."""
    seed = {
        name: [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in versions]
        for name, versions in (secrets or {}).items()
    }
    for name in seed:
        if not _SECRET_NAME.match(name):
            raise ValueError(f"Not a secret name (projects/P/secrets/S): {name!r}")
    server = _Server((host, port), _Handler)
    server.store = _Store(seed)
    server.quiet = quiet
    stub = SecretStub(server)
    stub._thread.start()
    return stub


def _parse_secret(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not _SECRET_NAME.match(name):
        raise argparse.ArgumentTypeError(
            f"expected projects/P/secrets/S=VALUE, got {name!r}"
        )
    return name, value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m local.secret_manager_stub")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve until Ctrl-C or SIGTERM")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8282)
    serve.add_argument(
        "--secret",
        type=_parse_secret,
        action="append",
        default=[],
        metavar="projects/P/secrets/S=VALUE",
        help="add a version (repeat a name for more versions)",
    )
    serve.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    secrets: dict[str, list[str]] = {}
    for name, value in args.secret:
        secrets.setdefault(name, []).append(value)
    try:
        stub = start(args.host, args.port, secrets, quiet=args.quiet)
    except OSError as exc:
        print(f"Cannot listen on {args.host}:{args.port}: {exc.strerror}")
        return 2
    print(f"Secret Manager stand-in on {stub.url}", flush=True)
    print(f"  SECRET_MANAGER_EMULATOR_HOST={stub.host}", flush=True)

    done = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    while not done.wait(0.5):
        pass
    stub.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
