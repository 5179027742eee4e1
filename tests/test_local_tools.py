"""The local tooling itself: the Secret Manager stand-in (through the real client),
the Firestore emulator launcher, and the stack's prerequisite and port checks."""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import google_crc32c
import pytest
from google.api_core import exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import secretmanager

from local import firestore_emulator, secret_manager_stub

pytestmark = pytest.mark.no_backend

ROOT = Path(__file__).resolve().parent.parent
SECRET = "projects/tools-test/secrets/api-key"
OTHER = "projects/tools-test/secrets/other"
FIRST, SECOND, THIRD = "first-value-7f3a", "second-value-91bc", "third-value-c2d4"


@pytest.fixture(scope="module")
def stub() -> Iterator[secret_manager_stub.SecretStub]:
    server = secret_manager_stub.start(
        secrets={SECRET: [FIRST, SECOND, THIRD]}, quiet=False
    )
    yield server
    server.stop()


@pytest.fixture
def gsm(
    stub: secret_manager_stub.SecretStub,
) -> Iterator[secretmanager.SecretManagerServiceClient]:
    stub.reset()
    client = secretmanager.SecretManagerServiceClient(
        transport="rest",
        client_options={"api_endpoint": stub.url},
        credentials=AnonymousCredentials(),
    )
    yield client
    stub.reset()


def access(client: secretmanager.SecretManagerServiceClient, name: str) -> Any:
    # retry=None: the client retries 503 for up to a minute by default.
    return client.access_secret_version(name=name, retry=None, timeout=5)


def admin(
    stub: secret_manager_stub.SecretStub, method: str, path: str, body: Any = None
) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(stub.url + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


def raw_error(stub: secret_manager_stub.SecretStub, name: str) -> dict[str, Any]:
    try:
        urllib.request.urlopen(f"{stub.url}/v1/{name}:access", timeout=5)
    except urllib.error.HTTPError as exc:
        return dict(json.load(exc))
    raise AssertionError(f"{name} was readable")


def test_stub_access_returns_payload_and_name(gsm: Any) -> None:
    response = access(gsm, f"{SECRET}/versions/1")

    assert response.name == f"{SECRET}/versions/1"
    assert response.payload.data == FIRST.encode()


def test_stub_crc_is_crc32c_of_payload(
    gsm: Any, stub: secret_manager_stub.SecretStub
) -> None:
    raw = admin(stub, "GET", f"/v1/{SECRET}/versions/2:access")

    data = base64.b64decode(raw["payload"]["data"])
    assert data == SECOND.encode()
    assert raw["payload"]["dataCrc32c"] == str(google_crc32c.value(data))
    assert access(
        gsm, f"{SECRET}/versions/2"
    ).payload.data_crc32c == google_crc32c.value(data)


@pytest.mark.parametrize("data", [b"", b"a", b"123456789", bytes(range(256)) * 3])
def test_stub_pure_crc32c_matches_library(data: bytes) -> None:
    assert secret_manager_stub.crc32c_pure(data) == google_crc32c.value(data)


def test_stub_pure_crc32c_known_vector() -> None:
    assert secret_manager_stub.crc32c_pure(b"123456789") == 0xE3069283


def test_stub_latest_is_highest_enabled_version(
    gsm: Any, stub: secret_manager_stub.SecretStub
) -> None:
    stub.set_state(SECRET, 3, "disabled")

    response = access(gsm, f"{SECRET}/versions/latest")

    assert response.name == f"{SECRET}/versions/2"
    assert response.payload.data == SECOND.encode()


def test_stub_added_version_becomes_latest(
    gsm: Any, stub: secret_manager_stub.SecretStub
) -> None:
    number = stub.add_version(SECRET, "fourth")

    response = access(gsm, f"{SECRET}/versions/latest")

    assert number == 4
    assert response.name == f"{SECRET}/versions/4"
    assert response.payload.data == b"fourth"


def test_stub_disabled_version_is_failed_precondition(
    gsm: Any, stub: secret_manager_stub.SecretStub
) -> None:
    stub.set_state(SECRET, 1, "disabled")

    # Over REST, api_core picks the class from the HTTP status alone: 400 is
    # BadRequest (FailedPrecondition's parent), as against the real service.
    with pytest.raises(exceptions.BadRequest, match="is in DISABLED state"):
        access(gsm, f"{SECRET}/versions/1")
    error = raw_error(stub, f"{SECRET}/versions/1")["error"]
    assert error["code"] == 400
    assert error["status"] == "FAILED_PRECONDITION"


def test_stub_destroyed_version_is_failed_precondition_and_final(
    gsm: Any, stub: secret_manager_stub.SecretStub
) -> None:
    admin(stub, "POST", "/_stub/secrets/tools-test/api-key/versions/2:destroy", {})

    with pytest.raises(exceptions.BadRequest, match="is in DESTROYED state"):
        access(gsm, f"{SECRET}/versions/2")
    with pytest.raises(urllib.error.HTTPError):
        admin(stub, "POST", "/_stub/secrets/tools-test/api-key/versions/2:enable", {})


def test_stub_reenabled_version_is_readable(
    gsm: Any, stub: secret_manager_stub.SecretStub
) -> None:
    admin(stub, "POST", "/_stub/secrets/tools-test/api-key/versions/1:disable", {})
    admin(stub, "POST", "/_stub/secrets/tools-test/api-key/versions/1:enable", {})

    assert access(gsm, f"{SECRET}/versions/1").payload.data == FIRST.encode()


@pytest.mark.parametrize(
    "name",
    [f"{OTHER}/versions/1", f"{OTHER}/versions/latest", f"{SECRET}/versions/9"],
)
def test_stub_missing_secret_or_version_is_not_found(gsm: Any, name: str) -> None:
    with pytest.raises(exceptions.NotFound):
        access(gsm, name)


def test_stub_admin_adds_versions(
    gsm: Any, stub: secret_manager_stub.SecretStub
) -> None:
    text = admin(stub, "POST", "/_stub/secrets/tools-test/other", {"data": "plain"})
    binary = admin(
        stub,
        "POST",
        "/_stub/secrets/tools-test/other",
        {"data_base64": base64.b64encode(b"\x00\xff").decode()},
    )

    assert (text, binary) == ({"version": 1}, {"version": 2})
    assert access(gsm, f"{OTHER}/versions/1").payload.data == b"plain"
    assert access(gsm, f"{OTHER}/versions/latest").payload.data == b"\x00\xff"


def test_stub_fault_status_fails_next_calls_then_clears(
    gsm: Any, stub: secret_manager_stub.SecretStub
) -> None:
    admin(stub, "POST", "/_stub/faults", {"times": 2, "status": 503})

    for _ in range(2):
        with pytest.raises(exceptions.ServiceUnavailable):
            access(gsm, f"{SECRET}/versions/1")
    assert access(gsm, f"{SECRET}/versions/1").payload.data == FIRST.encode()


def test_stub_fault_bad_crc_breaks_checksum(
    gsm: Any, stub: secret_manager_stub.SecretStub
) -> None:
    stub.set_faults(bad_crc=True)

    response = access(gsm, f"{SECRET}/versions/1")

    assert response.payload.data == FIRST.encode()
    assert response.payload.data_crc32c != google_crc32c.value(FIRST.encode())


def test_stub_fault_delay_slows_call(
    gsm: Any, stub: secret_manager_stub.SecretStub
) -> None:
    stub.set_faults(delay_ms=300)
    started = time.monotonic()

    access(gsm, f"{SECRET}/versions/1")

    assert time.monotonic() - started >= 0.3


def test_stub_delete_faults_clears_them(
    gsm: Any, stub: secret_manager_stub.SecretStub
) -> None:
    stub.set_faults(times=5, status=500)

    admin(stub, "DELETE", "/_stub/faults")

    assert access(gsm, f"{SECRET}/versions/1").payload.data == FIRST.encode()


def test_stub_stats_count_by_requested_name(
    gsm: Any, stub: secret_manager_stub.SecretStub
) -> None:
    access(gsm, f"{SECRET}/versions/latest")
    access(gsm, f"{SECRET}/versions/latest")
    with pytest.raises(exceptions.NotFound):
        access(gsm, f"{OTHER}/versions/1")

    stats = admin(stub, "GET", "/_stub/stats")

    assert stats == {
        "access_calls": 3,
        "by_name": {f"{SECRET}/versions/latest": 2, f"{OTHER}/versions/1": 1},
    }


def test_stub_reset_restores_seeded_secrets(
    gsm: Any, stub: secret_manager_stub.SecretStub
) -> None:
    stub.set_state(SECRET, 3, "destroyed")
    stub.add_version(OTHER, "x")
    access(gsm, f"{SECRET}/versions/1")

    admin(stub, "POST", "/_stub/reset", {})

    assert access(gsm, f"{SECRET}/versions/latest").payload.data == THIRD.encode()
    with pytest.raises(exceptions.NotFound):
        access(gsm, f"{OTHER}/versions/1")
    assert stub.stats()["by_name"] == {
        f"{SECRET}/versions/latest": 1,
        f"{OTHER}/versions/1": 1,
    }


def test_stub_never_logs_payloads(
    gsm: Any, stub: secret_manager_stub.SecretStub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=secret_manager_stub.__name__)
    admin(stub, "POST", "/_stub/secrets/tools-test/other", {"data": "logged-never-5e1"})

    access(gsm, f"{OTHER}/versions/1")
    access(gsm, f"{SECRET}/versions/latest")

    assert "/versions/1:access" in caplog.text
    for value in ("logged-never-5e1", FIRST, SECOND, THIRD):
        assert value not in caplog.text
        assert base64.b64encode(value.encode()).decode() not in caplog.text


def test_stub_cli_serves_given_secrets() -> None:
    port = firestore_emulator.free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "local.secret_manager_stub",
            "serve",
            "--quiet",
            "--port",
            str(port),
            "--secret",
            f"{SECRET}=cli-a",
            "--secret",
            f"{SECRET}=cli-b",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert process.stdout is not None
        banner = process.stdout.readline().decode()
        url = f"http://127.0.0.1:{port}/v1/{SECRET}/versions/latest:access"
        with urllib.request.urlopen(url, timeout=5) as response:
            answer = json.load(response)
    finally:
        process.terminate()
        code = process.wait(timeout=5)

    assert f"127.0.0.1:{port}" in banner
    assert base64.b64decode(answer["payload"]["data"]) == b"cli-b"
    assert code == 0


def test_emulator_lifecycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from google.cloud import firestore

    emulator = firestore_emulator.start(log_path=tmp_path / "firestore.log")
    try:
        monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", emulator.host)
        client = firestore.Client(project="tools-test")
        document = client.collection("things").document("one")
        document.set({"n": 1})
        assert document.get(timeout=5).to_dict() == {"n": 1}

        emulator.wipe("tools-test")

        assert not document.get(timeout=5).exists
    finally:
        emulator.stop()

    assert emulator.poll() is not None
    assert not Path(f"/proc/{emulator.pid}").exists()
    with pytest.raises(ProcessLookupError):
        os.kill(emulator.pid, 0)
    emulator.stop()  # Idempotent.


def test_emulator_refuses_a_taken_port() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]

        with pytest.raises(firestore_emulator.EmulatorError, match=str(port)):
            firestore_emulator.start(port=port)


def test_find_emulator_missing_java_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(firestore_emulator.MissingTool) as caught:
        firestore_emulator.find_emulator()

    message = str(caught.value)
    assert "apt-get install -y openjdk-17-jre-headless" in message
    assert "gcloud" in message


def test_find_emulator_missing_jar_names_both_installs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sdk_bin = tmp_path / "sdk" / "bin"
    sdk_bin.mkdir(parents=True)
    (sdk_bin / "gcloud").write_text("#!/bin/sh\n")
    (sdk_bin / "gcloud").chmod(0o755)
    monkeypatch.delenv("FIRESTORE_EMULATOR_JAR", raising=False)
    monkeypatch.setenv("PATH", f"{sdk_bin}{os.pathsep}{os.environ['PATH']}")

    with pytest.raises(firestore_emulator.MissingTool) as caught:
        firestore_emulator.find_jar()

    message = str(caught.value)
    assert "gcloud components install cloud-firestore-emulator" in message
    assert "apt-get install -y google-cloud-cli-firestore-emulator" in message


def test_find_emulator_honours_jar_override(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    jar = tmp_path / "emulator.jar"
    jar.write_bytes(b"")
    monkeypatch.setenv("FIRESTORE_EMULATOR_JAR", str(jar))

    assert firestore_emulator.find_jar() == str(jar)


def run_stack(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "local.stack", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_stack_check_finds_prerequisites() -> None:
    result = run_stack("--check")

    assert result.returncode == 0, result.stderr
    assert "Firestore emulator:" in result.stdout


def test_stack_names_a_taken_port_and_exits() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]

        others = [str(firestore_emulator.free_port()) for _ in range(3)]
        result = run_stack(
            "--functions-port",
            others[0],
            "--firestore-port",
            others[1],
            "--simulator-port",
            others[2],
            "--secrets-port",
            str(port),
        )

    assert result.returncode == 2
    assert f"Port {port} on 127.0.0.1 (secrets) is already in use" in result.stderr
    assert "Traceback" not in result.stderr
