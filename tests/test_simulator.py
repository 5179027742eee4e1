"""The Tiki sandbox simulator (local/tiki_simulator.py) against SPEC Part 1.

Requests are signed here with the test's own formula, not the module's ``sign``, so
that the two implementations check each other.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.client import HTTPConnection, HTTPException
from pathlib import Path
from typing import Any

import pytest
import requests

from local import tiki_simulator
from local.tiki_simulator import DEFAULT_CLIENT_ID as CLIENT_ID
from local.tiki_simulator import DEFAULT_CLIENT_SECRET as SECRET

pytestmark = pytest.mark.no_backend  # starts its own simulator and nothing else

REPO_ROOT = Path(__file__).resolve().parent.parent
OTHER_CLIENT = "other-app"
OPAQUE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
TOKEN = "/oauth/auth/token"
REFRESH = "/oauth/auth/token/refresh"
ME = "/oauth/me"
DEFAULT_CONFIG = {
    "window_ms": 60000,
    "rotate_refresh": True,
    "code_ttl": 300,
    "access_ttl": 3600,
    "clients": {CLIENT_ID: SECRET, OTHER_CLIENT: None},
}

# SPEC Part 1, "Request signing": the published vectors.
VECTOR_CLIENT_ID = "RLCKb7Ae9kx4DXtXsCWjnDXtggFnM43W"
VECTOR_SECRET = "EhjGcsUUuRSJTHiYPbW5fxzyaKEx0JuAZIKRQ4HnIfNFidB2kMg6locQbTIEz3Vf"
VECTOR_TIMESTAMP = "1620621619569"


def tiki_signature(secret: str, client_id: str, timestamp: str, content: bytes) -> str:
    """The test's own signature: padding removed by hand from standard base64."""
    payload = f"{timestamp}.{client_id}.".encode() + content
    standard = base64.b64encode(payload).decode()
    encoded = standard.replace("+", "-").replace("/", "_").split("=")[0]
    return hmac.new(secret.encode(), encoded.encode(), hashlib.sha256).hexdigest()


def now_ms() -> str:
    return str(int(time.time() * 1000))


@pytest.fixture(scope="module")
def sim() -> Iterator[tiki_simulator.Simulator]:
    simulator = tiki_simulator.start(port=0, quiet=True)
    yield simulator
    simulator.stop()


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    session = requests.Session()
    session.trust_env = False  # never a proxy for 127.0.0.1
    yield session
    session.close()


@pytest.fixture(autouse=True)
def fresh(sim: tiki_simulator.Simulator, http: requests.Session) -> None:
    http.post(f"{sim.admin_url}/_sim/config", json=DEFAULT_CONFIG).raise_for_status()
    http.post(f"{sim.admin_url}/_sim/reset").raise_for_status()


def call(
    sim: tiki_simulator.Simulator,
    http: requests.Session,
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    secret: str = SECRET,
    client_id: str = CLIENT_ID,
    timestamp: str | None = None,
    signature: str | None = None,
    timeout: float = 5,
) -> requests.Response:
    """POST to a Tiki endpoint, signed over exactly the bytes sent."""
    content = raw if raw is not None else json.dumps(body, separators=(",", ":"))
    content = content if isinstance(content, bytes) else content.encode()
    timestamp = timestamp or now_ms()
    headers = {
        "Content-Type": "application/json",
        "X-Tiniapp-Client-Id": client_id,
        "X-Tiniapp-Timestamp": timestamp,
        "X-Tiniapp-Signature": signature
        or tiki_signature(secret, client_id, timestamp, content),
    }
    return http.post(sim.url + path, data=content, headers=headers, timeout=timeout)


def admin(
    sim: tiki_simulator.Simulator, http: requests.Session, path: str, body: Any = None
) -> Any:
    response = http.post(f"{sim.admin_url}/_sim/{path}", json=body)
    response.raise_for_status()
    return response.json()


def new_code(
    sim: tiki_simulator.Simulator, http: requests.Session, **request: Any
) -> str:
    request.setdefault("customer_id", 1)
    return str(admin(sim, http, "auth-code", request)["authCode"])


def exchange(sim: tiki_simulator.Simulator, http: requests.Session, code: str) -> Any:
    return call(sim, http, TOKEN, {"code": code}).json()


def login(sim: tiki_simulator.Simulator, http: requests.Session, **request: Any) -> Any:
    return exchange(sim, http, new_code(sim, http, **request))["data"]


def reason(response: requests.Response) -> str:
    return str(response.json()["error"]["reason"])


def stats(sim: tiki_simulator.Simulator, http: requests.Session) -> Any:
    return http.get(f"{sim.admin_url}/_sim/stats").json()


def add_fault(
    sim: tiki_simulator.Simulator, http: requests.Session, **fault: Any
) -> None:
    admin(sim, http, "faults", fault)


# --- sign ----------------------------------------------------------------------------


def test_sign_post_vector() -> None:
    body = b'{"id":123}'

    payload = f"{VECTOR_TIMESTAMP}.{VECTOR_CLIENT_ID}.".encode() + body
    encoded = base64.urlsafe_b64encode(payload).rstrip(b"=")
    signature = tiki_simulator.sign(
        VECTOR_SECRET, VECTOR_CLIENT_ID, VECTOR_TIMESTAMP, body.decode()
    )

    assert encoded == (
        b"MTYyMDYyMTYxOTU2OS5STENLYjdBZTlreDREWHRYc0NXam5EWHRnZ0ZuTTQzVy57ImlkIjoxMjN9"
    )
    assert signature == (
        "8ebd092b9df2cf90e8ccbcab2ba87ee14f2abb25eb8f18b4d7286d42adcd45c2"
    )
    assert tiki_signature(VECTOR_SECRET, VECTOR_CLIENT_ID, VECTOR_TIMESTAMP, body) == (
        signature
    )


def test_sign_get_vector() -> None:
    content = "/order?location=H%C3%A0%20N%E1%BB%99i&order_id=88062110977884170"

    signature = tiki_simulator.sign(
        VECTOR_SECRET, VECTOR_CLIENT_ID, int(VECTOR_TIMESTAMP), content
    )

    assert signature == (
        "e1e0d63f7f8296dd31b2c082e611351a6c41a3bc0309a9299832f70b693722c8"
    )


@pytest.mark.parametrize("remainder", [0, 1, 2])
def test_sign_every_padding_remainder(remainder: int) -> None:
    prefix = f"{VECTOR_TIMESTAMP}.{VECTOR_CLIENT_ID}.".encode()
    content = b"x" * ((remainder - len(prefix)) % 3 + 3)
    payload = prefix + content
    expected = hmac.new(
        VECTOR_SECRET.encode(),
        base64.urlsafe_b64encode(payload).rstrip(b"="),
        hashlib.sha256,
    ).hexdigest()

    signature = tiki_simulator.sign(
        VECTOR_SECRET, VECTOR_CLIENT_ID, VECTOR_TIMESTAMP, content
    )

    assert len(payload) % 3 == remainder
    assert base64.b64encode(payload).count(b"=") == (3 - remainder) % 3
    assert signature == expected


@pytest.mark.parametrize("remainder", [0, 1, 2])
def test_signature_accepts_every_padding_remainder(
    sim: tiki_simulator.Simulator, http: requests.Session, remainder: int
) -> None:
    timestamp = now_ms()
    prefix = f"{timestamp}.{CLIENT_ID}.".encode()
    base = len(prefix) + len(b'{"access_token":""}')
    body = {"access_token": "t" * ((remainder - base) % 3 + 3)}
    raw = json.dumps(body, separators=(",", ":")).encode()

    response = call(sim, http, ME, raw=raw, timestamp=timestamp)

    assert len(prefix + raw) % 3 == remainder
    assert reason(response) == "invalid_token"


# --- signature check -----------------------------------------------------------------


def test_signature_wrong_secret_refused(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    code = new_code(sim, http)

    response = call(sim, http, TOKEN, {"code": code}, secret="not-the-secret")

    assert response.status_code == 400
    assert reason(response) == "invalid_signature"
    assert exchange(sim, http, code)["error"] is None


@pytest.mark.parametrize("skew_ms", [-61_000, 61_000])
def test_signature_timestamp_outside_window_refused(
    sim: tiki_simulator.Simulator, http: requests.Session, skew_ms: int
) -> None:
    timestamp = str(int(time.time() * 1000) + skew_ms)

    response = call(sim, http, ME, {"access_token": "x"}, timestamp=timestamp)

    assert reason(response) == "invalid_signature"
    assert "window" in response.json()["error"]["message"]


@pytest.mark.parametrize("skew_ms", [-55_000, 55_000])
def test_signature_timestamp_inside_window_accepted(
    sim: tiki_simulator.Simulator, http: requests.Session, skew_ms: int
) -> None:
    timestamp = str(int(time.time() * 1000) + skew_ms)

    response = call(sim, http, ME, {"access_token": "x"}, timestamp=timestamp)

    assert reason(response) == "invalid_token"


@pytest.mark.parametrize(
    "timestamp",
    ["1620621619.569", "", "-1620621619569", "1620621619569 ms", "١٦٢٠٦٢١٦١٩٥٦٩"],
)
def test_signature_garbled_timestamp_refused(
    sim: tiki_simulator.Simulator, http: requests.Session, timestamp: str
) -> None:
    raw = b'{"access_token":"x"}'
    signature = tiki_signature(SECRET, CLIENT_ID, timestamp, raw)
    headers = {
        "X-Tiniapp-Client-Id": CLIENT_ID,
        "X-Tiniapp-Timestamp": timestamp.encode().decode("latin-1"),
        "X-Tiniapp-Signature": signature,
    }

    response = http.post(sim.url + ME, data=raw, headers=headers)

    assert reason(response) == "invalid_signature"


@pytest.mark.parametrize(
    "header", ["X-Tiniapp-Client-Id", "X-Tiniapp-Timestamp", "X-Tiniapp-Signature"]
)
def test_signature_missing_header_refused(
    sim: tiki_simulator.Simulator, http: requests.Session, header: str
) -> None:
    raw = b'{"access_token":"x"}'
    timestamp = now_ms()
    headers = {
        "X-Tiniapp-Client-Id": CLIENT_ID,
        "X-Tiniapp-Timestamp": timestamp,
        "X-Tiniapp-Signature": tiki_signature(SECRET, CLIENT_ID, timestamp, raw),
    }
    del headers[header]

    response = http.post(sim.url + ME, data=raw, headers=headers)

    assert reason(response) == "invalid_signature"


def test_signature_uppercase_hex_refused(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    raw = b'{"access_token":"x"}'
    timestamp = now_ms()
    signature = tiki_signature(SECRET, CLIENT_ID, timestamp, raw).upper()

    response = call(sim, http, ME, raw=raw, timestamp=timestamp, signature=signature)

    assert reason(response) == "invalid_signature"


def test_signature_unknown_client_refused(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    response = call(sim, http, ME, {"access_token": "x"}, client_id="someone-else")

    assert reason(response) == "invalid_signature"
    assert stats(sim, http)["signature_refused"] == 1


def test_signature_changed_body_keeps_code(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    code = new_code(sim, http)
    raw = json.dumps({"code": code}, separators=(",", ":")).encode()
    timestamp = now_ms()
    signature = tiki_signature(SECRET, CLIENT_ID, timestamp, raw)
    changed = raw[:-3] + bytes([raw[-3] ^ 1]) + raw[-2:]  # the code's last character

    refused = call(
        sim, http, TOKEN, raw=changed, timestamp=timestamp, signature=signature
    )
    accepted = call(sim, http, TOKEN, raw=raw, timestamp=timestamp, signature=signature)

    assert len(changed) == len(raw) and changed != raw
    assert reason(refused) == "invalid_signature"
    assert accepted.json()["data"]["customer"]["id"] == 1


def test_signature_refused_keeps_refresh_token(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    refresh_token = login(sim, http)["refresh_token"]

    refused = call(sim, http, REFRESH, {"refresh_token": refresh_token}, secret="bad")
    accepted = call(sim, http, REFRESH, {"refresh_token": refresh_token})

    assert reason(refused) == "invalid_signature"
    assert accepted.json()["error"] is None


def test_signature_checked_before_body(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    response = call(sim, http, TOKEN, raw=b"not json", secret="bad")

    assert reason(response) == "invalid_signature"


# --- request body and routing --------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b"[]", b"null", b'{"code":1}', b'{"token":"x"}', b"\xff\xfe"],
)
def test_request_bad_body_refused(
    sim: tiki_simulator.Simulator, http: requests.Session, raw: bytes
) -> None:
    response = call(sim, http, TOKEN, raw=raw)

    assert response.status_code == 400
    assert reason(response) == "invalid_request"


def test_request_unknown_path_is_404_envelope(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    response = call(sim, http, "/api/v1/oauth/me", {"access_token": "x"})

    assert response.status_code == 404
    assert response.json()["data"] is None
    assert reason(response) == "not_found"


def test_request_wrong_method_is_405_envelope(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    response = http.get(sim.url + TOKEN)

    assert response.status_code == 405
    assert reason(response) == "method_not_allowed"
    assert response.headers["Allow"] == "POST"


def test_request_error_carries_metadata(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    first = call(sim, http, ME, {"access_token": "x"}).json()["error"]
    second = call(sim, http, ME, {"access_token": "x"}).json()["error"]

    assert first["code"] == 400
    assert first["metadata"]["service_code"]
    assert first["metadata"]["request_id"] != second["metadata"]["request_id"]


# --- exchange ------------------------------------------------------------------------


def test_exchange_success(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    code = new_code(sim, http)

    response = call(sim, http, TOKEN, {"code": code})

    assert OPAQUE.fullmatch(code)
    assert response.status_code == 200
    body = response.json()
    assert body["error"] is None
    data = body["data"]
    assert OPAQUE.fullmatch(data["access_token"])
    assert OPAQUE.fullmatch(data["refresh_token"])
    assert data["expires_in"] == 3600
    assert data["scopes"] == ["offline", "user_profile"]
    assert data["token_type"] == "bearer"
    assert data["customer"] == {"id": 1, "name": "Ti Ni"}


def test_exchange_code_reused_refused(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    code = new_code(sim, http)
    exchange(sim, http, code)

    response = call(sim, http, TOKEN, {"code": code})

    assert response.status_code == 400
    assert reason(response) == "invalid_code"
    assert stats(sim, http)["codes_redeemed"] == 1


def test_exchange_code_expired_refused(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    admin(sim, http, "config", {"code_ttl": 0})
    code = new_code(sim, http)

    response = call(sim, http, TOKEN, {"code": code})

    assert reason(response) == "invalid_code"


def test_exchange_unknown_code_refused(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    response = call(sim, http, TOKEN, {"code": "abc.def"})

    assert reason(response) == "invalid_code"


def test_exchange_without_offline_has_no_refresh_token(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    data = login(sim, http, scopes=["user_profile"])

    assert "refresh_token" not in data
    assert data["scopes"] == ["user_profile"]


def test_exchange_code_for_other_client_refused(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    admin(sim, http, "config", {"clients": {OTHER_CLIENT: "other-secret"}})
    code = new_code(sim, http, client_id=OTHER_CLIENT)

    refused = call(sim, http, TOKEN, {"code": code})
    accepted = call(
        sim, http, TOKEN, {"code": code}, client_id=OTHER_CLIENT, secret="other-secret"
    )

    assert reason(refused) == "invalid_code"
    assert accepted.json()["error"] is None


def test_exchange_concurrent_redeems_once(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    code = new_code(sim, http)
    results: list[Any] = []

    def redeem() -> None:
        with requests.Session() as session:
            session.trust_env = False
            results.append(call(sim, session, TOKEN, {"code": code}).json())

    threads = [threading.Thread(target=redeem) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sum(result["error"] is None for result in results) == 1


# --- refresh -------------------------------------------------------------------------


def test_refresh_rotates_token(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    first = login(sim, http)

    data = call(sim, http, REFRESH, {"refresh_token": first["refresh_token"]}).json()[
        "data"
    ]

    assert data["refresh_token"] != first["refresh_token"]
    assert data["access_token"] != first["access_token"]
    assert data["expires_in"] == 3600
    assert data["scopes"] == ["offline", "user_profile"]
    assert data["token_type"] == "bearer"
    assert "customer" not in data
    assert stats(sim, http)["refresh_success"] == 1


def test_refresh_rotated_out_token_refused(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    old = login(sim, http)["refresh_token"]
    call(sim, http, REFRESH, {"refresh_token": old})

    response = call(sim, http, REFRESH, {"refresh_token": old})

    assert reason(response) == "invalid_token"
    assert stats(sim, http)["refresh_reuse_refused"] == 1


def test_refresh_without_rotation_returns_same_token(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    admin(sim, http, "config", {"rotate_refresh": False})
    token = login(sim, http)["refresh_token"]

    first = call(sim, http, REFRESH, {"refresh_token": token}).json()["data"]
    second = call(sim, http, REFRESH, {"refresh_token": token}).json()["data"]

    assert first["refresh_token"] == second["refresh_token"] == token


def test_refresh_unknown_token_refused(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    response = call(sim, http, REFRESH, {"refresh_token": "abc.def"})

    assert reason(response) == "invalid_token"
    assert stats(sim, http)["refresh_reuse_refused"] == 0


def test_refresh_new_access_token_works(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    token = login(sim, http, customer_id=3)["refresh_token"]
    data = call(sim, http, REFRESH, {"refresh_token": token}).json()["data"]

    response = call(sim, http, ME, {"access_token": data["access_token"]})

    assert response.json()["data"]["customer_id"] == 3


# --- me ------------------------------------------------------------------------------


def test_me_success(sim: tiki_simulator.Simulator, http: requests.Session) -> None:
    token = login(sim, http, customer_id=2, scopes=["user_profile"])["access_token"]

    response = call(sim, http, ME, {"access_token": token})

    assert response.json() == {
        "data": {
            "customer_id": 2,
            "customer_name": "Khách Thử",
            "scopes": ["user_profile"],
        },
        "error": None,
    }


def test_me_expired_token_refused(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    admin(sim, http, "config", {"access_ttl": 0})
    data = login(sim, http)

    response = call(sim, http, ME, {"access_token": data["access_token"]})

    assert data["expires_in"] == 0
    assert reason(response) == "invalid_token"


def test_me_unknown_token_refused(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    response = call(sim, http, ME, {"access_token": "abc.def"})

    assert reason(response) == "invalid_token"


# --- auth codes ----------------------------------------------------------------------


def test_auth_code_customer_two_lacks_offline(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    answer = admin(sim, http, "auth-code", {"customer_id": 2})

    assert answer["authSuccessScopes"] == ["user_profile"]
    assert answer["authErrorScopes"] == {"offline": 1}


def test_auth_code_get_form(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    url = f"{sim.admin_url}/_sim/auth-code?customer_id=3&scopes=user_profile"

    answer = http.get(url).json()

    assert answer["authSuccessScopes"] == ["user_profile"]
    assert exchange(sim, http, answer["authCode"])["data"]["customer"]["id"] == 3


def test_auth_code_other_customer_gets_a_name(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    data = login(sim, http, customer_id=100102261)

    assert data["customer"]["id"] == 100102261
    assert data["customer"]["name"]


def test_auth_code_custom_name(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    data = login(sim, http, customer_id=7, name="Chị Bảy")

    assert data["customer"] == {"id": 7, "name": "Chị Bảy"}


def test_auth_code_unknown_and_refused_scopes(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    request = {
        "customer_id": 1,
        "scopes": ["offline", "user_profile", "auth_zhima"],
        "refuse": ["offline"],
    }

    answer = admin(sim, http, "auth-code", request)

    assert answer["authSuccessScopes"] == ["user_profile"]
    assert answer["authErrorScopes"] == {"offline": 2, "auth_zhima": 1}


@pytest.mark.parametrize(
    "request_body",
    [
        {},
        {"customer_id": 0},
        {"customer_id": -1},
        {"customer_id": "abc"},
        {"customer_id": True},
        {"customer_id": 1, "scope": ["offline"]},
        {"customer_id": 1, "client_id": "nobody"},
    ],
)
def test_auth_code_bad_request_refused(
    sim: tiki_simulator.Simulator, http: requests.Session, request_body: Any
) -> None:
    response = http.post(f"{sim.admin_url}/_sim/auth-code", json=request_body)

    assert response.status_code == 400
    assert reason(response) == "invalid_request"


# --- faults --------------------------------------------------------------------------


def test_fault_error_envelope_in_200(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    code = new_code(sim, http)
    error = {"reason": "internal_error", "message": "boom"}
    add_fault(sim, http, endpoint="token", error=error)

    response = call(sim, http, TOKEN, {"code": code})

    assert response.status_code == 200
    assert response.json()["data"] is None
    assert response.json()["error"]["reason"] == "internal_error"
    assert response.json()["error"]["metadata"]["request_id"]
    assert exchange(sim, http, code)["error"] is None


def test_fault_error_with_status(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    add_fault(sim, http, endpoint="me", status=503, error={"reason": "unavailable"})

    response = call(sim, http, ME, {"access_token": "x"})

    assert response.status_code == 503
    assert response.json()["error"]["code"] == 503


def test_fault_status_only(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    add_fault(sim, http, endpoint="refresh", status=502)

    response = call(sim, http, REFRESH, {"refresh_token": "x"})

    assert response.status_code == 502
    assert reason(response) == "server_error"


def test_fault_raw_body(sim: tiki_simulator.Simulator, http: requests.Session) -> None:
    add_fault(
        sim,
        http,
        endpoint="token",
        status=502,
        raw_body="<html>Bad Gateway</html>",
        content_type="text/html",
    )

    response = call(sim, http, TOKEN, {"code": "x"})

    assert response.status_code == 502
    assert response.headers["Content-Type"] == "text/html"
    assert response.text == "<html>Bad Gateway</html>"


def test_fault_delay_then_real_answer(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    code = new_code(sim, http)
    add_fault(sim, http, endpoint="token", delay_ms=150)
    started = time.monotonic()

    body = exchange(sim, http, code)

    assert time.monotonic() - started >= 0.15
    assert body["error"] is None


def test_fault_drop_closes_without_answer(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    code = new_code(sim, http)
    add_fault(sim, http, endpoint="token", drop=True)

    with pytest.raises(requests.ConnectionError):
        call(sim, http, TOKEN, {"code": code})

    assert exchange(sim, http, code)["error"] is None


def test_fault_data_override_consumes_code(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    code = new_code(sim, http)
    add_fault(sim, http, endpoint="token", data_override={"customer": {"id": None}})

    data = exchange(sim, http, code)["data"]

    assert data["customer"] == {"id": None, "name": "Ti Ni"}
    assert exchange(sim, http, code)["error"]["reason"] == "invalid_code"


def test_fault_data_remove(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    add_fault(sim, http, endpoint="token", data_remove=["access_token", "customer.id"])

    data = login(sim, http)

    assert "access_token" not in data
    assert data["customer"] == {"name": "Ti Ni"}


def test_fault_times_in_fifo_order(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    add_fault(sim, http, endpoint="me", times=2, error={"reason": "first"})
    add_fault(sim, http, endpoint="any", error={"reason": "second"})

    reasons = [reason(call(sim, http, ME, {"access_token": "x"})) for _ in range(4)]

    assert reasons == ["first", "first", "second", "invalid_token"]


def test_fault_other_endpoint_untouched(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    add_fault(sim, http, endpoint="refresh", error={"reason": "later"})

    first = reason(call(sim, http, ME, {"access_token": "x"}))
    second = reason(call(sim, http, REFRESH, {"refresh_token": "x"}))

    assert (first, second) == ("invalid_token", "later")


def test_fault_waits_for_good_signature(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    add_fault(sim, http, endpoint="me", error={"reason": "injected"})

    first = reason(call(sim, http, ME, {"access_token": "x"}, secret="bad"))
    second = reason(call(sim, http, ME, {"access_token": "x"}))

    assert (first, second) == ("invalid_signature", "injected")


def test_fault_before_signature(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    add_fault(
        sim, http, endpoint="me", before_signature=True, error={"reason": "injected"}
    )

    response = call(sim, http, ME, {"access_token": "x"}, secret="bad")

    assert reason(response) == "injected"


def test_fault_list_and_clear(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    add_fault(sim, http, endpoint="me", status=500)
    listed = http.get(f"{sim.admin_url}/_sim/faults").json()["faults"]

    cleared = http.delete(f"{sim.admin_url}/_sim/faults").json()

    assert [fault["status"] for fault in listed] == [500]
    assert cleared["cleared"] == 1
    assert reason(call(sim, http, ME, {"access_token": "x"})) == "invalid_token"


@pytest.mark.parametrize(
    "fault",
    [
        {"status": 500},
        {"endpoint": "login", "status": 500},
        {"endpoint": "me", "times": 0, "status": 500},
        {"endpoint": "me", "status": 42},
        {"endpoint": "me"},
        {"endpoint": "me", "stauts": 500},
        {"endpoint": "me", "delay_ms": -1},
        {"endpoint": "me", "drop": "yes"},
    ],
)
def test_fault_bad_request_refused(
    sim: tiki_simulator.Simulator, http: requests.Session, fault: Any
) -> None:
    response = http.post(f"{sim.admin_url}/_sim/faults", json=fault)

    assert response.status_code == 400
    assert http.get(f"{sim.admin_url}/_sim/faults").json()["faults"] == []


# --- config, stats, reset ------------------------------------------------------------


def test_config_new_secret_replaces_old(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    code = new_code(sim, http)

    admin(sim, http, "config", {"clients": {CLIENT_ID: "regenerated-secret"}})
    old = call(sim, http, TOKEN, {"code": code})
    new = call(sim, http, TOKEN, {"code": code}, secret="regenerated-secret")

    assert reason(old) == "invalid_signature"
    assert new.json()["error"] is None


def test_config_window_narrowed(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    shown = admin(sim, http, "config", {"window_ms": 1000})
    timestamp = str(int(time.time() * 1000) - 5000)

    response = call(sim, http, ME, {"access_token": "x"}, timestamp=timestamp)

    assert shown["window_ms"] == 1000
    assert reason(response) == "invalid_signature"


def test_config_shows_no_secret(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    response = http.get(f"{sim.admin_url}/_sim/config")

    assert response.json()["client_ids"] == [CLIENT_ID]
    assert SECRET not in response.text


@pytest.mark.parametrize(
    "change",
    [
        {"window_ms": -1},
        {"access_ttl": "long"},
        {"rotate_refresh": 1},
        {"clients": {CLIENT_ID: ""}},
        {"windows_ms": 5},
    ],
)
def test_config_bad_request_refused(
    sim: tiki_simulator.Simulator, http: requests.Session, change: Any
) -> None:
    response = http.post(f"{sim.admin_url}/_sim/config", json=change)

    assert response.status_code == 400
    assert http.get(f"{sim.admin_url}/_sim/config").json()["window_ms"] == 60000


def test_stats_count_calls_and_outcomes(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    token = login(sim, http)["refresh_token"]
    call(sim, http, REFRESH, {"refresh_token": token})
    call(sim, http, REFRESH, {"refresh_token": token})
    call(sim, http, ME, {"access_token": "x"}, secret="bad")

    counted = stats(sim, http)

    assert counted == {
        "calls": {"token": 1, "refresh": 2, "me": 1},
        "refresh_success": 1,
        "refresh_reuse_refused": 1,
        "signature_refused": 1,
        "codes_redeemed": 1,
    }


def test_reset_forgets_codes_and_keeps_config(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    admin(sim, http, "config", {"access_ttl": 60})
    code = new_code(sim, http)
    add_fault(sim, http, endpoint="any", status=500)

    admin(sim, http, "reset")

    assert reason(call(sim, http, TOKEN, {"code": code})) == "invalid_code"
    assert login(sim, http)["expires_in"] == 60
    assert stats(sim, http)["calls"]["token"] == 2


def test_issued_lists_codes_and_tokens(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    code = new_code(sim, http)
    data = exchange(sim, http, code)["data"]

    issued = http.get(f"{sim.admin_url}/_sim/issued").json()

    assert issued == {
        "codes": [code],
        "access_tokens": [data["access_token"]],
        "refresh_tokens": [data["refresh_token"]],
    }


def test_health_ok(sim: tiki_simulator.Simulator, http: requests.Session) -> None:
    assert http.get(f"{sim.admin_url}/_sim/health").json() == {"ok": True}


def test_admin_unknown_path_and_method(
    sim: tiki_simulator.Simulator, http: requests.Session
) -> None:
    missing = http.get(f"{sim.admin_url}/_sim/nothing")
    wrong = http.get(f"{sim.admin_url}/_sim/reset")

    assert (missing.status_code, wrong.status_code) == (404, 405)
    assert wrong.headers["Allow"] == "POST"


# --- HTTP behaviour ------------------------------------------------------------------


def test_http_keep_alive_and_no_nagle_delay(sim: tiki_simulator.Simulator) -> None:
    connection = HTTPConnection("127.0.0.1", sim.port, timeout=5)
    connection.connect()
    first_socket = connection.sock
    started = time.monotonic()

    for _ in range(10):
        connection.request("GET", "/_sim/health")
        response = connection.getresponse()
        assert response.getheader("Content-Length") == str(len(response.read()))

    # With Nagle's algorithm on, each answer waits ~40 ms for a delayed ACK.
    assert time.monotonic() - started < 0.2
    assert connection.sock is first_socket
    connection.close()


def test_http_chunked_body_refused(sim: tiki_simulator.Simulator) -> None:
    connection = HTTPConnection("127.0.0.1", sim.port, timeout=5)
    connection.putrequest("POST", "/tiniapp-sandbox-open-api/oauth/me")
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()  # the answer comes before any chunk is sent

    response = connection.getresponse()

    assert response.status == 411
    assert response.getheader("Connection") == "close"
    connection.close()


def test_http_oversized_body_refused(sim: tiki_simulator.Simulator) -> None:
    connection = HTTPConnection("127.0.0.1", sim.port, timeout=5)
    connection.putrequest("POST", "/tiniapp-sandbox-open-api/oauth/me")
    connection.putheader("Content-Length", str(2 << 20))
    connection.endheaders()

    response = connection.getresponse()

    assert response.status == 413
    connection.close()


def test_http_log_line_hides_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    loud = tiki_simulator.start(port=0)
    with requests.Session() as session:
        session.trust_env = False
        code = new_code(loud, session)
        data = exchange(loud, session, code)["data"]
    loud.stop()

    lines = capsys.readouterr().err.splitlines()

    assert len(lines) == 2
    assert lines[1].startswith(
        "tiki-sim POST /tiniapp-sandbox-open-api/oauth/auth/token"
    )
    hidden = [code, data["access_token"], data["refresh_token"], SECRET]
    assert not any(value in line for value in hidden for line in lines)


def test_http_stop_ends_open_connections() -> None:
    short = tiki_simulator.start(port=0, quiet=True)
    connection = HTTPConnection("127.0.0.1", short.port, timeout=5)
    connection.request("GET", "/_sim/health")
    connection.getresponse().read()

    short.stop()

    with pytest.raises((ConnectionError, HTTPException)):
        connection.request("GET", "/_sim/health")
        connection.getresponse()
    connection.close()


# --- command line --------------------------------------------------------------------


def test_cli_code_prints_code(
    sim: tiki_simulator.Simulator,
    http: requests.Session,
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = tiki_simulator.main(["code", "--url", sim.url, "--customer", "3"])

    code = capsys.readouterr().out.strip()
    assert status == 0
    assert OPAQUE.fullmatch(code)
    assert exchange(sim, http, code)["data"]["customer"]["id"] == 3


def test_cli_code_without_simulator(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    status = tiki_simulator.main(["code", "--url", f"http://127.0.0.1:{port}"])

    captured = capsys.readouterr()
    assert status == 1
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1


def test_cli_serve_until_sigterm() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "local.tiki_simulator", "serve", "--port", "0"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        admin_url = url.removesuffix("/tiniapp-sandbox-open-api")
        with requests.Session() as session:
            session.trust_env = False
            health = session.get(f"{admin_url}/_sim/health", timeout=5).json()

        process.send_signal(signal.SIGTERM)

        assert process.wait(timeout=5) == 0
        assert health == {"ok": True}
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
