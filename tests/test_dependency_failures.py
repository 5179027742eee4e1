"""Tiki, Firestore and Secret Manager failing: an envelope each, nothing half-written.

Issue 3, "Tiki failures" and "Firestore and Secret Manager failures". Tiki is the
simulator with queued faults; Firestore and Secret Manager are made unreachable by
pointing their hosts at a closed local port, or slow by a local server of ours that
accepts and never answers. Every address is on 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
from conftest import (
    CLIENT_SECRET,
    CLIENT_SECRET_NAME,
    PROJECT,
    SESSION_SECRET,
    SESSION_SECRET_NAME,
    Api,
    Sim,
    assert_error,
    raw_server,
    session_of,
)
from google.cloud import firestore

from auth import log as auth_log
from auth import secrets as auth_secrets

# --- helpers ------------------------------------------------------------------------


def closed_port() -> int:
    """A local port nothing listens on: connecting to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def silent_host() -> Iterator[str]:
    """``host:port`` of a local server that accepts connections and never answers."""
    with raw_server(lambda conn, stop: None) as port:
        yield f"127.0.0.1:{port}"


def documents(collection: str) -> dict[str, Any]:
    """Every stored document of ``collection``, by id, read from the emulator."""
    db = firestore.Client(project=PROJECT)
    try:
        return {snap.id: snap for snap in db.collection(collection).stream()}
    finally:
        db.close()


def assert_nothing_stored() -> None:
    assert documents("tiki_users") == {}
    assert documents("tiki_tokens") == {}


def logged(caplog: pytest.LogCaptureFixture) -> str:
    """What the backend logged during the test, as its JSON lines."""
    formatter = auth_log.logger.handlers[0].formatter
    assert formatter is not None
    return "\n".join(
        formatter.format(record) for record in caplog.records if record.name == "auth"
    )


def tiki_calls(simulator: Sim, endpoint: str = "token") -> int:
    return int(simulator.stats()["calls"][endpoint])


# --- Tiki failures ------------------------------------------------------------------


def test_exchange_tiki_connection_refused_is_503_after_one_retry(
    api: Api, simulator: Sim, monkeypatch, caplog
):
    monkeypatch.setenv("TIKI_BASE_URL", f"http://127.0.0.1:{closed_port()}/tiki")

    response = api.exchange(simulator.code(1))

    assert_error(response, 503, "unavailable")
    text = logged(caplog)
    assert "could not connect (attempt 1 of 2)" in text
    assert "could not connect (attempt 2 of 2)" in text
    assert_nothing_stored()


class _Forwarder(BaseHTTPRequestHandler):
    """Passes Tiki calls on to the simulator and notes each signing timestamp."""

    protocol_version = "HTTP/1.1"
    server: _ForwardingServer

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.timestamps.append(int(self.headers["X-Tiniapp-Timestamp"]))
        passed = {
            name: value
            for name, value in self.headers.items()
            if name.lower().startswith("x-tiniapp-") or name.lower() == "content-type"
        }
        answer = requests.post(
            self.server.target + self.path, data=body, headers=passed, timeout=5
        )
        self.send_response(answer.status_code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ForwardingServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    target: str
    timestamps: list[int]


class _OpenOnFirstRefusal(logging.Handler):
    """On the backend's first 'could not connect' warning, starts listening."""

    def __init__(self, port: int, target: str) -> None:
        super().__init__()
        self.port = port
        self.target = target
        self.server: _ForwardingServer | None = None
        self.warned_ms = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        if self.server or "(attempt 1 of 2)" not in record.getMessage():
            return
        self.warned_ms = time.time() * 1000
        self.server = _ForwardingServer(("127.0.0.1", self.port), _Forwarder)
        self.server.target = self.target
        self.server.timestamps = []
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_exchange_retry_after_refused_connection_signs_a_fresh_timestamp(
    api: Api, simulator: Sim, monkeypatch
):
    port = closed_port()
    base_path = urllib.parse.urlsplit(simulator.url).path
    monkeypatch.setenv("TIKI_BASE_URL", f"http://127.0.0.1:{port}{base_path}")
    opener = _OpenOnFirstRefusal(port, simulator.admin)
    logging.getLogger("auth").addHandler(opener)
    code = simulator.code(1)

    try:
        response = api.exchange(code)
    finally:
        logging.getLogger("auth").removeHandler(opener)
        if opener.server is not None:
            opener.server.shutdown()
            opener.server.server_close()

    assert response.status == 200, response.body
    assert opener.server is not None
    assert len(opener.server.timestamps) == 1
    # The first attempt's timestamp was made before the refusal was logged; the
    # retry's comes after the pause, so a reused one would be older than this.
    assert opener.server.timestamps[0] >= opener.warned_ms + 100
    assert tiki_calls(simulator) == 1


def test_exchange_tiki_timeout_is_504_and_the_code_is_sent_once(
    api: Api, simulator: Sim, monkeypatch
):
    monkeypatch.setenv("TIKI_READ_TIMEOUT_SECONDS", "1")
    simulator.fault(endpoint="token", delay_ms=3000)
    started = time.monotonic()

    response = api.exchange(simulator.code(1))

    assert_error(response, 504, "upstream_timeout")
    assert time.monotonic() - started < 2.8
    assert tiki_calls(simulator) == 1
    assert_nothing_stored()


@pytest.fixture
def dripping_tiki() -> Iterator[str]:
    """Base URL of a local server that answers at once, then drips its body."""
    body = b'{"data": null, "error": {"code": 400, "reason": "invalid_code"}}'

    def drip(conn: socket.socket, stop: threading.Event) -> None:
        conn.recv(65536)
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        for byte in body:
            if stop.wait(0.2):
                return
            conn.sendall(bytes([byte]))

    with raw_server(drip) as port:
        yield f"http://127.0.0.1:{port}/tiniapp-open-api"


def test_exchange_tiki_dripping_its_answer_is_504_near_the_timeout(
    api: Api, simulator: Sim, monkeypatch, dripping_tiki
):
    monkeypatch.setenv("TIKI_BASE_URL", dripping_tiki)
    monkeypatch.setenv("TIKI_READ_TIMEOUT_SECONDS", "1")
    started = time.monotonic()

    response = api.exchange(simulator.code(1))

    assert_error(response, 504, "upstream_timeout")
    assert time.monotonic() - started < 3
    assert_nothing_stored()


@pytest.mark.parametrize(
    ("fault", "status", "reason"),
    [
        pytest.param({"status": 500}, 502, "upstream_error", id="500-envelope"),
        pytest.param(
            {"status": 502, "raw_body": "<html>Bad Gateway</html>"},
            502,
            "upstream_error",
            id="502-html",
        ),
        pytest.param(
            {"status": 503, "raw_body": "<html>Service Unavailable</html>"},
            503,
            "unavailable",
            id="503-html",
        ),
        pytest.param(
            {"status": 504, "raw_body": "<html>Gateway Timeout</html>"},
            504,
            "upstream_timeout",
            id="504-html",
        ),
        pytest.param({"drop": True}, 502, "upstream_error", id="dropped"),
    ],
)
def test_exchange_tiki_failure_after_sending_is_not_retried(
    api: Api, simulator: Sim, fault, status, reason
):
    simulator.fault(endpoint="token", **fault)

    response = api.exchange(simulator.code(1))

    assert_error(response, status, reason)
    assert tiki_calls(simulator) == 1
    assert_nothing_stored()


def test_exchange_tiki_503_error_envelope_is_503(api: Api, simulator: Sim):
    simulator.fault(
        endpoint="token",
        status=503,
        error={"reason": "service_unavailable", "message": "Try later."},
    )

    response = api.exchange(simulator.code(1))

    assert_error(response, 503, "unavailable")
    assert tiki_calls(simulator) == 1


def test_exchange_tiki_html_body_with_200_is_502(api: Api, simulator: Sim):
    simulator.fault(endpoint="token", status=200, raw_body="<html>Welcome</html>")

    response = api.exchange(simulator.code(1))

    assert_error(response, 502, "upstream_error")
    assert_nothing_stored()


def test_exchange_tiki_error_envelope_inside_200_is_502(api: Api, simulator: Sim):
    simulator.fault(endpoint="token", status=200, error={"reason": "server_error"})

    response = api.exchange(simulator.code(1))

    assert_error(response, 502, "upstream_error")
    assert_nothing_stored()


def test_exchange_tiki_invalid_code_inside_200_is_invalid_code(
    api: Api, simulator: Sim
):
    simulator.fault(
        endpoint="token", status=200, error={"code": 400, "reason": "invalid_code"}
    )

    response = api.exchange(simulator.code(1))

    assert_error(response, 400, "invalid_code")
    assert_nothing_stored()


def test_exchange_tiki_invalid_signature_is_502_with_operator_advice(
    api: Api, simulator: Sim, caplog
):
    code = simulator.code(1)
    simulator.config(clients={"tini-local-client": "another-secret-entirely"})

    response = api.exchange(code)

    assert_error(response, 502, "upstream_error")
    text = logged(caplog)
    assert "invalid_signature" in text
    assert "check TIKI_CLIENT_ID" in text
    assert "sandbox and production keys differ" in text
    assert CLIENT_SECRET not in text
    stats = simulator.stats()
    assert stats["calls"]["token"] == 1
    assert stats["signature_refused"] == 1
    assert stats["codes_redeemed"] == 0
    assert_nothing_stored()


@pytest.mark.parametrize("missing", ["access_token", "customer"])
def test_exchange_tiki_success_missing_a_field_is_502(
    api: Api, simulator: Sim, missing
):
    simulator.fault(endpoint="token", data_remove=[missing])

    response = api.exchange(simulator.code(1))

    assert_error(response, 502, "upstream_error")
    assert tiki_calls(simulator) == 1
    assert_nothing_stored()


@pytest.mark.parametrize(
    "customer_id",
    [None, -1, 0, 1.5, 1.0, "a/b", "..", "__x__", "01", "1 ", True, "", "9" * 2048],
    ids=[
        "null",
        "negative",
        "zero",
        "float",
        "whole-float",
        "slash",
        "dotdot",
        "dunder",
        "leading-zero",
        "trailing-space",
        "true",
        "empty",
        "2KB",
    ],
)
def test_exchange_tiki_customer_id_not_a_positive_integer_is_502(
    api: Api, simulator: Sim, customer_id
):
    simulator.fault(endpoint="token", data_override={"customer": {"id": customer_id}})

    response = api.exchange(simulator.code(1))

    assert_error(response, 502, "upstream_error")
    assert_nothing_stored()


def test_refresh_tiki_5xx_is_502_and_the_next_refresh_works(
    api: Api, simulator: Sim, monkeypatch
):
    token = session_of(api.login(1))
    monkeypatch.setenv("TIKI_REFRESH_LEEWAY_SECONDS", "7200")
    simulator.fault(endpoint="refresh", status=500)

    failed = api.refresh(token)
    started = time.monotonic()
    again = api.refresh(token)

    assert_error(failed, 502, "upstream_error")
    # The failed refresh gave its lease back: the next one does not wait it out.
    assert again.status == 200, again.body
    assert time.monotonic() - started < 3
    assert simulator.stats()["refresh_success"] == 1


# --- Firestore failures -------------------------------------------------------------


def test_exchange_firestore_unreachable_is_503_and_recovers(
    api: Api, simulator: Sim, backend, monkeypatch
):
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", f"127.0.0.1:{closed_port()}")

    response = api.exchange(simulator.code(1))
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", backend["FIRESTORE_EMULATOR_HOST"])
    stored_after_failure = (documents("tiki_users"), documents("tiki_tokens"))
    recovered = api.exchange(simulator.code(1))

    assert_error(response, 503, "unavailable")
    assert stored_after_failure == ({}, {})
    assert recovered.status == 200, recovered.body
    assert recovered.data["user"]["login_count"] == 1


def test_exchange_firestore_timeout_is_503_and_recovers(
    api: Api, simulator: Sim, backend, monkeypatch, silent_host
):
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", silent_host)
    monkeypatch.setenv("FIRESTORE_TIMEOUT_SECONDS", "1")
    started = time.monotonic()

    response = api.exchange(simulator.code(1))
    elapsed = time.monotonic() - started
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", backend["FIRESTORE_EMULATOR_HOST"])
    stored_after_failure = (documents("tiki_users"), documents("tiki_tokens"))
    recovered = api.exchange(simulator.code(1))

    assert_error(response, 503, "unavailable")
    assert elapsed < 4
    assert stored_after_failure == ({}, {})
    assert recovered.status == 200, recovered.body
    assert recovered.data["user"]["login_count"] == 1


def test_exchange_firestore_down_leaves_the_earlier_login_whole(
    api: Api, simulator: Sim, backend, monkeypatch
):
    token = session_of(api.login(1))
    before = documents("tiki_tokens")["1"]
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", f"127.0.0.1:{closed_port()}")

    response = api.exchange(simulator.code(1))
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", backend["FIRESTORE_EMULATOR_HOST"])
    users, tokens = documents("tiki_users"), documents("tiki_tokens")
    lookup = api.lookup(token)

    assert_error(response, 503, "unavailable")
    assert list(users) == ["1"] and list(tokens) == ["1"]
    assert users["1"].to_dict()["login_count"] == 1
    assert tokens["1"].update_time == before.update_time
    assert tokens["1"].to_dict()["sealed"] == before.to_dict()["sealed"]
    assert lookup.status == 200
    assert lookup.data["user"]["login_count"] == 1


def test_lookup_firestore_unreachable_is_503_and_recovers(
    api: Api, backend, monkeypatch
):
    token = session_of(api.login(1))
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", f"127.0.0.1:{closed_port()}")

    response = api.lookup(token)
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", backend["FIRESTORE_EMULATOR_HOST"])
    recovered = api.lookup(token)

    assert_error(response, 503, "unavailable")
    assert recovered.status == 200
    assert recovered.data["user"]["customer_id"] == 1


def test_refresh_firestore_unreachable_is_503_without_calling_tiki(
    api: Api, simulator: Sim, backend, monkeypatch
):
    token = session_of(api.login(1))
    monkeypatch.setenv("TIKI_REFRESH_LEEWAY_SECONDS", "7200")
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", f"127.0.0.1:{closed_port()}")

    response = api.refresh(token)
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", backend["FIRESTORE_EMULATOR_HOST"])
    recovered = api.refresh(token)

    assert_error(response, 503, "unavailable")
    assert recovered.status == 200, recovered.body
    assert tiki_calls(simulator, "refresh") == 1


# --- Secret Manager failures --------------------------------------------------------


def _unreachable(monkeypatch, stub) -> None:
    monkeypatch.setenv("SECRET_MANAGER_EMULATOR_HOST", f"127.0.0.1:{closed_port()}")


def _failing(monkeypatch, stub) -> None:
    stub.set_faults(status=503)


def _slow(monkeypatch, stub) -> None:
    monkeypatch.setattr(auth_secrets, "ACCESS_TIMEOUT_SECONDS", 1.0)
    stub.set_faults(delay_ms=2500)


def _bad_checksum(monkeypatch, stub) -> None:
    stub.set_faults(bad_crc=True)


@pytest.mark.parametrize(
    "break_secrets",
    [_unreachable, _failing, _slow, _bad_checksum],
    ids=["unreachable", "failing", "slow", "bad-checksum"],
)
def test_exchange_secret_manager_failure_is_503_and_keeps_the_code(
    api: Api, simulator: Sim, stub, backend, monkeypatch, break_secrets
):
    code = simulator.code(1)
    break_secrets(monkeypatch, stub)

    response = api.exchange(code)
    calls_while_broken = tiki_calls(simulator)
    monkeypatch.setenv(
        "SECRET_MANAGER_EMULATOR_HOST", backend["SECRET_MANAGER_EMULATOR_HOST"]
    )
    recovered = api.exchange(code)

    assert_error(response, 503, "unavailable")
    # Secrets are read before the code goes to Tiki, so the code is still good.
    assert calls_while_broken == 0
    assert recovered.status == 200, recovered.body


def test_lookup_secret_manager_failing_is_503(api: Api, stub):
    token = session_of(api.login(1))
    auth_secrets.clear_cache()
    stub.set_faults(status=503)

    response = api.lookup(token)

    assert_error(response, 503, "unavailable")


@pytest.mark.parametrize(
    ("name", "version", "state", "variable"),
    [
        (CLIENT_SECRET_NAME, "1", "disabled", "TIKI_CLIENT_SECRET_RESOURCE"),
        (CLIENT_SECRET_NAME, "latest", "disabled", "TIKI_CLIENT_SECRET_RESOURCE"),
        (CLIENT_SECRET_NAME, "7", None, "TIKI_CLIENT_SECRET_RESOURCE"),
        (SESSION_SECRET_NAME, "1", "destroyed", "SESSION_SECRET_RESOURCE"),
        (SESSION_SECRET_NAME, "7", None, "SESSION_SECRET_RESOURCE"),
    ],
    ids=[
        "client-disabled",
        "client-latest-none-enabled",
        "client-missing",
        "session-destroyed",
        "session-missing",
    ],
)
def test_exchange_unusable_secret_version_is_503_naming_the_resource(
    api: Api, simulator: Sim, stub, monkeypatch, caplog, name, version, state, variable
):
    resource = f"{name}/versions/{version}"
    monkeypatch.setenv(variable, resource)
    if state is not None:
        stub.set_state(name, 1, state)

    response = api.exchange(simulator.code(1))

    assert_error(response, 503, "unavailable")
    text = logged(caplog)
    assert resource in text
    assert CLIENT_SECRET not in text and SESSION_SECRET not in text
    assert tiki_calls(simulator) == 0
    assert_nothing_stored()


@pytest.mark.parametrize(
    "override",
    [
        pytest.param({"expires_in": 10**12}, id="expires-in-huge"),
        pytest.param({"expires_in": -1}, id="expires-in-negative"),
        pytest.param({"expires_in": "soon"}, id="expires-in-text"),
        pytest.param({"expires_in": 3600.5}, id="expires-in-float"),
        pytest.param({"scopes": ["offline", 1]}, id="scopes-not-text"),
        pytest.param({"scopes": 42}, id="scopes-a-number"),
        pytest.param({"refresh_token": 42}, id="refresh-token-not-text"),
    ],
)
def test_exchange_tiki_success_with_unusable_fields_is_502(
    api: Api, simulator: Sim, override
):
    simulator.fault(endpoint="token", data_override=override)

    response = api.exchange(simulator.code(1))

    assert_error(response, 502, "upstream_error")
    assert_nothing_stored()


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"error": None}, id="no-data"),
        pytest.param({"data": None, "error": None}, id="null-data"),
        pytest.param({"data": [], "error": None}, id="list-data"),
        pytest.param({"result": {"access_token": "a"}}, id="not-an-envelope"),
    ],
)
def test_exchange_tiki_body_without_usable_data_is_502(
    api: Api, simulator: Sim, body: dict[str, Any]
):
    simulator.fault(
        endpoint="token", raw_body=json.dumps(body), content_type="application/json"
    )

    response = api.exchange(simulator.code(5))

    assert_error(response, 502, "upstream_error")
    assert_nothing_stored()


def test_wrong_method_with_bad_configuration_is_still_405(api: Api, monkeypatch):
    monkeypatch.setenv("SESSION_TTL_SECONDS", "abc")

    response = api.call("lookup_user", method="PUT")

    assert_error(response, 405, "method_not_allowed")


def test_exchange_tiki_deeply_nested_answer_is_502(api: Api, simulator: Sim):
    simulator.fault(
        endpoint="token", raw_body="[" * 100000, content_type="application/json"
    )

    response = api.exchange(simulator.code(1))

    assert_error(response, 502, "upstream_error")
    assert_nothing_stored()


@pytest.fixture
def dripping_headers() -> Iterator[str]:
    """Base URL of a local server that sends one header line every 0.3 s, forever."""

    def drip(conn: socket.socket, stop: threading.Event) -> None:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        while not stop.wait(0.3):
            conn.sendall(b"X-Slow: 1\r\n")

    with raw_server(drip) as port:
        yield f"http://127.0.0.1:{port}/tiniapp-open-api"


def test_exchange_tiki_dripping_headers_is_504_within_the_total(
    api: Api, simulator: Sim, monkeypatch, dripping_headers
):
    monkeypatch.setenv("TIKI_BASE_URL", dripping_headers)
    monkeypatch.setenv("TIKI_CONNECT_TIMEOUT_SECONDS", "0.5")
    monkeypatch.setenv("TIKI_READ_TIMEOUT_SECONDS", "1")
    started = time.monotonic()

    response = api.exchange(simulator.code(1))

    assert_error(response, 504, "upstream_timeout")
    assert time.monotonic() - started < 2.2 + 1.0  # 2 x 0.5 + 0.2 + 1, and slack
    assert_nothing_stored()


def test_exchange_current_secret_missing_once_recovers_at_once(
    api: Api, simulator: Sim, stub, monkeypatch
):
    monkeypatch.setenv("SECRET_CACHE_SECONDS", "300")
    stub.set_faults(times=1, status=404)

    failed = api.exchange(simulator.code(1))
    recovered = api.exchange(simulator.code(1))

    assert_error(failed, 503, "unavailable")
    assert recovered.status == 200, recovered.body


@pytest.mark.parametrize(
    "override",
    [
        pytest.param({"expires_in": "3600"}, id="expires-in-digits"),
        pytest.param({"expires_in": 3600.0}, id="expires-in-whole-float"),
        pytest.param({"scopes": None}, id="scopes-null"),
        pytest.param({"scopes": "offline user_profile"}, id="scopes-oauth-string"),
        pytest.param({"refresh_token": ""}, id="refresh-token-empty"),
    ],
)
def test_exchange_tiki_success_in_a_tolerable_spelling_logs_in(
    api: Api, simulator: Sim, override
):
    simulator.fault(endpoint="token", data_override=override)

    response = api.exchange(simulator.code(1))

    assert response.status == 200, response.body
    assert documents("tiki_users").keys() == {"1"}


def test_exchange_invalid_code_inside_a_500_is_still_invalid_code(
    api: Api, simulator: Sim
):
    simulator.fault(endpoint="token", status=500, error={"reason": "invalid_code"})

    response = api.exchange(simulator.code(1))

    assert_error(response, 400, "invalid_code")
