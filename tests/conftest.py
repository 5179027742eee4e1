"""Real local parts for every test: the Firestore emulator, the Tiki simulator and
the Secret Manager stand-in, started once per run; functions are called through
functions-framework's own app, as the platform calls them.

Every test starts from empty Firestore, a reset simulator and stand-in, cold
secret caches and the environment below; whatever it changes is restored.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from auth import secrets as auth_secrets
from local import firestore_emulator, secret_manager_stub, tiki_simulator

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "tini-test"
CLIENT_ID = tiki_simulator.DEFAULT_CLIENT_ID
CLIENT_SECRET = tiki_simulator.DEFAULT_CLIENT_SECRET
CLIENT_SECRET_NAME = f"projects/{PROJECT}/secrets/tiki-client-secret"
SESSION_SECRET_NAME = f"projects/{PROJECT}/secrets/session-secret"
SESSION_SECRET = "test-session-secret-0123456789abcdef0123456789abcdef"
ORIGIN = "https://app.example.test"


class Ledger:
    """Everything secret the run handled, and everything it logged and answered.

    ``test_no_leaks`` (run last) checks that no secret value reached a log line
    and that no Tiki token reached a response unless exposure was on.
    """

    def __init__(self) -> None:
        self.secrets: set[str] = {CLIENT_SECRET, SESSION_SECRET}
        self.access_tokens: set[str] = set()
        self.refresh_tokens: set[str] = set()
        self.log_lines: list[str] = []
        self.responses: list[tuple[bool, str]] = []
        self.log_files: list[Path] = []


LEDGER = Ledger()


class _Capture(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        LEDGER.log_lines.append(self.format(record))


@pytest.fixture(scope="session", autouse=True)
def _capture_logs() -> Iterator[None]:
    from auth import log as auth_log

    handler = _Capture()
    handler.setFormatter(auth_log.logger.handlers[0].formatter)
    auth_log.logger.addHandler(handler)
    yield
    auth_log.logger.removeHandler(handler)


@pytest.fixture(scope="session")
def firestore() -> Iterator[firestore_emulator.FirestoreEmulator]:
    log_path = ROOT / ".local" / "test-firestore.log"
    emulator = firestore_emulator.start(log_path=log_path)
    yield emulator
    emulator.stop()


@pytest.fixture(scope="session")
def stub() -> Iterator[secret_manager_stub.SecretStub]:
    server = secret_manager_stub.start(
        secrets={
            CLIENT_SECRET_NAME: [CLIENT_SECRET],
            SESSION_SECRET_NAME: [SESSION_SECRET + "\n"],
        },
        quiet=True,
    )
    yield server
    server.stop()


class Sim:
    """The Tiki simulator and its test API."""

    def __init__(self, handle: tiki_simulator.Simulator) -> None:
        self.handle = handle
        self.url = handle.url
        self.admin = handle.admin_url

    def code(self, customer_id: int = 1, scopes: list[str] | None = None) -> str:
        body: dict[str, Any] = {"customer_id": customer_id}
        if scopes is not None:
            body["scopes"] = scopes
        answer = self._post("/_sim/auth-code", body)
        LEDGER.secrets.add(answer["authCode"])
        return str(answer["authCode"])

    def fault(self, **fault: Any) -> None:
        self._post("/_sim/faults", fault)

    def config(self, **changes: Any) -> dict[str, Any]:
        return self._post("/_sim/config", changes)

    def stats(self) -> dict[str, Any]:
        return requests.get(self.admin + "/_sim/stats", timeout=5).json()

    def issued(self) -> dict[str, Any]:
        return requests.get(self.admin + "/_sim/issued", timeout=5).json()

    def reset(self) -> None:
        self._post("/_sim/reset", {})

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        response = requests.post(self.admin + path, json=body, timeout=5)
        response.raise_for_status()
        return response.json()


DEFAULT_SIM_CONFIG = {
    "window_ms": 60000,
    "rotate_refresh": True,
    "access_ttl": 3600,
    "code_ttl": 300,
    "clients": {CLIENT_ID: CLIENT_SECRET},
}


@pytest.fixture(scope="session")
def simulator() -> Iterator[Sim]:
    handle = tiki_simulator.start(port=0, quiet=True)
    yield Sim(handle)
    handle.stop()


def backend_environment(
    firestore: firestore_emulator.FirestoreEmulator,
    stub: secret_manager_stub.SecretStub,
    simulator: Sim,
) -> dict[str, str]:
    return {
        "TIKI_CLIENT_ID": CLIENT_ID,
        "TIKI_CLIENT_SECRET_RESOURCE": f"{CLIENT_SECRET_NAME}/versions/latest",
        "SESSION_SECRET_RESOURCE": f"{SESSION_SECRET_NAME}/versions/latest",
        "SECRET_MANAGER_EMULATOR_HOST": stub.host,
        "FIRESTORE_EMULATOR_HOST": firestore.host,
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "TIKI_BASE_URL": simulator.url,
        "ALLOWED_ORIGINS": ORIGIN,
        "TIKI_READ_TIMEOUT_SECONDS": "3",
        "FIRESTORE_TIMEOUT_SECONDS": "3",
    }


_BACKEND_VARIABLES = [
    "TIKI_CLIENT_ID",
    "TIKI_CLIENT_SECRET_RESOURCE",
    "SESSION_SECRET_RESOURCE",
    "TIKI_CLIENT_SECRET",
    "SESSION_SECRET",
    "TIKI_BASE_URL",
    "GOOGLE_CLOUD_PROJECT",
    "FIRESTORE_DATABASE",
    "FIRESTORE_EMULATOR_HOST",
    "SECRET_MANAGER_EMULATOR_HOST",
    "ALLOWED_ORIGINS",
    "SESSION_TTL_SECONDS",
    "EXPOSE_TIKI_ACCESS_TOKEN",
    "TIKI_REFRESH_LEEWAY_SECONDS",
    "SESSION_REFRESH_WINDOW_SECONDS",
    "SECRET_CACHE_SECONDS",
    "TIKI_CONNECT_TIMEOUT_SECONDS",
    "TIKI_READ_TIMEOUT_SECONDS",
    "FIRESTORE_TIMEOUT_SECONDS",
]


@pytest.fixture(autouse=True)
def backend(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str] | None]:
    """Fresh state and environment for a test that uses the backend."""
    if "no_backend" in request.keywords:
        yield None
        return
    firestore = request.getfixturevalue("firestore")
    stub = request.getfixturevalue("stub")
    simulator = request.getfixturevalue("simulator")
    for name in _BACKEND_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    env = backend_environment(firestore, stub, simulator)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    firestore.wipe(PROJECT)
    stub.reset()
    simulator.reset()
    simulator.config(**DEFAULT_SIM_CONFIG)
    auth_secrets.clear_cache()
    yield env
    _collect_issued(simulator)
    auth_secrets.clear_cache()


def _collect_issued(simulator: Sim) -> None:
    issued = simulator.issued()
    LEDGER.secrets.update(issued.get("codes", []))
    LEDGER.access_tokens.update(issued.get("access_tokens", []))
    LEDGER.refresh_tokens.update(issued.get("refresh_tokens", []))


class Response:
    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def data(self) -> Any:
        return self.json["data"]

    @property
    def error(self) -> Any:
        return self.json["error"]

    @property
    def reason(self) -> str | None:
        error = self.json["error"]
        return error["reason"] if error else None


class Api:
    """Calls the function targets through functions-framework's app."""

    def __init__(self, simulator: Sim) -> None:
        self.sim = simulator

    def call(
        self, target: str, method: str = "POST", path: str = "/", **kwargs: Any
    ) -> Response:
        from functions_framework import create_app

        client = create_app(target, str(ROOT / "main.py")).test_client()
        result = client.open(path, method=method, **kwargs)
        response = Response(result.status_code, result.headers, result.get_data())
        self._record(response)
        return response

    def exchange(self, code: str, **kwargs: Any) -> Response:
        return self.call("exchange_auth_code", json={"code": code}, **kwargs)

    def login(self, customer_id: int = 1, scopes: list[str] | None = None) -> Response:
        response = self.exchange(self.sim.code(customer_id, scopes))
        assert response.status == 200, response.body
        return response

    def with_session(self, target: str, token: str, method: str = "POST") -> Response:
        headers = {"Authorization": f"Bearer {token}"}
        return self.call(target, method=method, headers=headers)

    def refresh(self, token: str) -> Response:
        return self.with_session("refresh_auth_token", token)

    def lookup(self, token: str) -> Response:
        return self.with_session("lookup_user", token, method="GET")

    def revoke(self, token: str) -> Response:
        return self.with_session("revoke_sessions", token)

    def delete(self, token: str) -> Response:
        return self.with_session("delete_user", token)

    def _record(self, response: Response) -> None:
        text = response.body.decode("utf-8", "replace")
        exposed = os.environ.get("EXPOSE_TIKI_ACCESS_TOKEN", "").lower() == "true"
        LEDGER.responses.append((exposed, text))
        try:
            token = response.json["data"]["session_token"]
        except (ValueError, KeyError, TypeError):
            return
        LEDGER.secrets.add(token)


@pytest.fixture
def api(simulator: Sim) -> Api:
    return Api(simulator)


def session_of(response: Response) -> str:
    return str(response.data["session_token"])


def login_due_for_refresh(api: Api, simulator: Sim, customer_id: int = 1) -> str:
    """A session whose stored Tiki access token is already due for refresh."""
    simulator.config(access_ttl=1)
    token = session_of(api.login(customer_id))
    simulator.config(access_ttl=3600)
    return token


def break_secret_manager_after(stub: Any, seconds: float) -> threading.Thread:
    """A started thread that makes the secret stand-in fail after ``seconds``."""

    def run() -> None:
        time.sleep(seconds)
        stub.set_faults(times=50, status=503)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def assert_error(response: Response, status: int, reason: str) -> None:
    """An error envelope whose code is the HTTP status, never cached."""
    assert response.status == status, response.body
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["Cache-Control"] == "no-store"
    assert response.json["data"] is None
    assert response.error["code"] == status
    assert response.error["reason"] == reason
    assert isinstance(response.error["message"], str) and response.error["message"]


def stored_documents(project: str = PROJECT) -> list[str]:
    """Every user and tokens document in the emulator, as collection/id."""
    from google.cloud import firestore

    db = firestore.Client(project=project)
    return [
        f"{collection}/{document.id}"
        for collection in ("tiki_users", "tiki_tokens")
        for document in db.collection(collection).stream()
    ]


@pytest.fixture
def firestore_uses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts every time the backend reaches for its Firestore client."""
    from auth import store

    uses: list[str] = []
    real = store._db

    def spy(settings: Any) -> Any:
        uses.append("firestore")
        return real(settings)

    monkeypatch.setattr(store, "_db", spy)
    return uses


def start_instance(
    env: dict[str, str], port: int, log_path: Path
) -> subprocess.Popen[bytes]:
    """One more function instance: a real functions-framework server process."""
    executable = Path(sys.executable).with_name("functions-framework")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("wb")
    LEDGER.log_files.append(log_path)
    process = subprocess.Popen(
        [
            str(executable),
            "--target",
            "local_router",
            "--source",
            str(ROOT / "main.py"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env={**os.environ, **env},
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/none", timeout=1)
        except urllib.error.HTTPError:
            return process
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"instance exited; see {log_path}") from None
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"instance did not start; see {log_path}")


@contextlib.contextmanager
def raw_server(
    handle: Callable[[socket.socket, threading.Event], None],
) -> Iterator[int]:
    """A local TCP server that gives each connection to ``handle``; yields its port.

    ``handle`` runs on the accept thread and should return soon after the event
    is set; connections are closed when the server stops.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()
    held: list[socket.socket] = []

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)
            with contextlib.suppress(OSError):
                handle(conn, stop)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        listener.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_instance(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


@pytest.fixture(scope="module")
def instance(
    firestore: firestore_emulator.FirestoreEmulator,
    stub: secret_manager_stub.SecretStub,
    simulator: Sim,
) -> Iterator[str]:
    """Base URL of one running instance serving every function by path."""
    port = free_port()
    env = backend_environment(firestore, stub, simulator)
    process = start_instance(env, port, ROOT / ".local" / f"instance-{port}.log")
    yield f"http://127.0.0.1:{port}"
    stop_instance(process)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The leak check reads what every other test logged and answered: run it last.
    items.sort(key=lambda item: item.get_closest_marker("run_last") is not None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "no_backend: needs none of the local services")
    config.addinivalue_line("markers", "run_last: runs after every other test")
