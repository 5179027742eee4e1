"""Issue 4, the token lifecycle: refresh on time and once across instances,
expired sessions, logout, erasure, and the rotation of every secret.

Expired sessions are minted here with the session key, rather than waited for,
so the file stays fast; each minted token copies a real session's claims.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    CLIENT_SECRET_NAME,
    LEDGER,
    SESSION_SECRET,
    SESSION_SECRET_NAME,
    Api,
    Response,
    Sim,
    break_secret_manager_after,
    login_due_for_refresh,
    raw_server,
    session_of,
    start_instance,
)
from google.cloud import firestore

from auth import keys, vault
from auth import secrets as auth_secrets
from auth.secrets import Secret

NEW_SESSION_SECRET = "rotated-session-secret-fedcba9876543210fedcba9876543210"
NEW_CLIENT_SECRET = "rotated-client-secret.not-a-tiki-secret.0123456789abcdef"
LEDGER.secrets.update({NEW_SESSION_SECRET, NEW_CLIENT_SECRET})

DAY = 86400
INSTANCES = 3
PARALLEL_REFRESHES = 6


def _db(backend: dict[str, str]) -> Any:
    return firestore.Client(project=backend["GOOGLE_CLOUD_PROJECT"])


def _doc(backend: dict[str, str], collection: str, key: str) -> Any:
    return _db(backend).collection(collection).document(key).get()


def _mint(
    like: str, *, secret: str = SESSION_SECRET, kid: Any = "1", **claims: Any
) -> str:
    """A session signed with ``secret``: ``like``'s claims with ``claims`` changed.

    Signed by hand so that the header may carry any ``kid`` (None: no kid).
    """
    payload = jwt.decode(like, options={"verify_signature": False})
    payload.update(jti=uuid.uuid4().hex, **claims)
    header = {"alg": "HS256", "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    signing_input = f"{_b64(header)}.{_b64(payload)}"
    key = keys.derive(secret, keys.SESSION_SIGNING)
    mac = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    token = signing_input + "." + base64.urlsafe_b64encode(mac).decode().rstrip("=")
    LEDGER.secrets.add(token)
    return token


def _b64(part: dict[str, Any]) -> str:
    raw = json.dumps(part, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _expired(like: str, seconds_ago: int) -> str:
    now = int(time.time())
    return _mint(like, iat=now - seconds_ago - 3600, exp=now - seconds_ago)


def _kid(token: str) -> Any:
    return jwt.get_unverified_header(token).get("kid")


def _every_function(api: Api, token: str) -> dict[str, Response]:
    return {
        "lookup_user": api.lookup(token),
        "refresh_auth_token": api.refresh(token),
        "revoke_sessions": api.revoke(token),
        "delete_user": api.delete(token),
    }


def _refusals(answers: dict[str, Response]) -> dict[str, tuple[int, str | None]]:
    """The functions that did not refuse with 401 reauth_required and no data."""
    return {
        name: (answer.status, answer.reason)
        for name, answer in answers.items()
        if (answer.status, answer.reason) != (401, "reauth_required")
        or answer.json["data"] is not None
    }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def instances(
    backend: dict[str, str], tmp_path: Path, request: pytest.FixtureRequest
) -> Callable[..., list[str]]:
    """Starts more function instances (real processes); gives their base URLs."""
    processes: list[subprocess.Popen[bytes]] = []

    def stop() -> None:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)

    request.addfinalizer(stop)

    def start(**env: str) -> list[str]:
        urls = []
        for _ in range(INSTANCES):
            port = _free_port()
            log_path = tmp_path / f"instance-{len(processes)}.log"
            processes.append(start_instance({**backend, **env}, port, log_path))
            urls.append(f"http://127.0.0.1:{port}")
        return urls

    return start


def _refresh_all(urls: list[str], token: str) -> list[requests.Response]:
    """PARALLEL_REFRESHES refreshes of one session, released at once, round robin."""
    barrier = threading.Barrier(PARALLEL_REFRESHES)

    def one(number: int) -> requests.Response:
        barrier.wait()
        return _refresh_at(urls[number % len(urls)], token)

    with ThreadPoolExecutor(PARALLEL_REFRESHES) as pool:
        return list(pool.map(one, range(PARALLEL_REFRESHES)))


def _warm(urls: list[str], token: str) -> None:
    """One lookup per instance, so that no instance pays its cold start mid-burst."""
    for url in urls:
        headers = {"Authorization": f"Bearer {token}"}
        answer = requests.get(f"{url}/lookup_user", headers=headers, timeout=30)
        assert answer.status_code == 200, answer.text


def _slow_tiki_refresh(simulator: Sim) -> None:
    """Tiki takes a second over the next refresh, so every caller of a burst
    arrives while that refresh is still in flight (not after it ended)."""
    simulator.fault(endpoint="refresh", delay_ms=1000)


def _refresh_at(url: str, token: str) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"}
    response = requests.post(f"{url}/refresh_auth_token", headers=headers, timeout=60)
    LEDGER.responses.append((False, response.text))
    if response.status_code == 200:
        LEDGER.secrets.add(response.json()["data"]["session_token"])
    return response


# --- refresh on time ---------------------------------------------------------------


def test_refresh_fresh_token_skips_tiki(api: Api, simulator: Sim):
    token = session_of(api.login(1))

    refreshed = api.refresh(token)

    assert refreshed.status == 200
    assert simulator.stats()["calls"]["refresh"] == 0
    assert api.lookup(session_of(refreshed)).status == 200


def test_refresh_due_token_refreshes_once_and_stores_expiry(
    api: Api, simulator: Sim, backend
):
    simulator.config(access_ttl=60)
    token = session_of(api.login(1))
    simulator.config(access_ttl=3600)

    first = api.refresh(token)
    second = api.refresh(session_of(first))

    stored = _doc(backend, "tiki_tokens", "1").to_dict()
    remaining = stored["expires_at"].timestamp() - time.time()
    assert first.status == 200 and second.status == 200
    assert simulator.stats()["calls"]["refresh"] == 1
    assert simulator.stats()["refresh_success"] == 1
    assert 3500 < remaining <= 3600


def test_refresh_leeway_is_configurable(api: Api, simulator: Sim, monkeypatch):
    token = session_of(api.login(1))
    monkeypatch.setenv("TIKI_REFRESH_LEEWAY_SECONDS", "7200")

    refreshed = api.refresh(token)

    assert refreshed.status == 200
    assert simulator.stats()["refresh_success"] == 1


def test_refresh_without_offline_scope_is_reauth_naming_offline(
    api: Api, simulator: Sim
):
    token = session_of(api.login(2, scopes=["user_profile"]))

    refreshed = api.refresh(token)

    assert refreshed.status == 401
    assert refreshed.reason == "reauth_required"
    assert "offline" in refreshed.error["message"]
    assert refreshed.json["data"] is None
    assert simulator.stats()["calls"]["refresh"] == 0


def test_refresh_refused_by_tiki_is_reauth_and_drops_tokens(
    api: Api, simulator: Sim, backend
):
    simulator.config(access_ttl=60)
    token = session_of(api.login(1))
    simulator.fault(
        endpoint="refresh",
        status=400,
        error={"code": 400, "reason": "invalid_token", "message": "Revoked."},
    )

    refreshed = api.refresh(token)
    again = api.refresh(token)

    assert refreshed.status == 401
    assert refreshed.reason == "reauth_required"
    assert simulator.stats()["calls"]["refresh"] == 1
    assert not _doc(backend, "tiki_tokens", "1").exists
    assert (again.status, again.reason) == (401, "reauth_required")
    assert simulator.stats()["calls"]["refresh"] == 1


# --- single flight across instances ------------------------------------------------


def test_refresh_parallel_on_instances_calls_tiki_once(
    api: Api, simulator: Sim, instances, monkeypatch
):
    urls = instances()
    simulator.config(access_ttl=60)
    token = session_of(api.login(1))
    simulator.config(access_ttl=3600)
    _warm(urls, token)
    _slow_tiki_refresh(simulator)

    answers = _refresh_all(urls, token)
    parallel = simulator.stats()
    # Due again: this refresh needs the newest (rotated) refresh token.
    monkeypatch.setenv("TIKI_REFRESH_LEEWAY_SECONDS", "7200")
    later = api.refresh(token)

    assert [a.status_code for a in answers] == [200] * PARALLEL_REFRESHES
    assert parallel["calls"]["refresh"] == 1
    assert parallel["refresh_reuse_refused"] == 0
    sessions = {a.json()["data"]["session_token"] for a in answers}
    assert all(api.lookup(s).status == 200 for s in sessions)
    assert later.status == 200
    assert simulator.stats()["refresh_success"] == 2
    assert simulator.stats()["refresh_reuse_refused"] == 0


def test_refresh_parallel_with_long_leeway_calls_tiki_once(
    api: Api, simulator: Sim, instances
):
    # Tokens due again as soon as they are refreshed (leeway > Tiki's lifetime):
    # callers that overlap still share the one refresh.
    urls = instances(TIKI_REFRESH_LEEWAY_SECONDS="7200")
    token = session_of(api.login(1))
    _warm(urls, token)
    _slow_tiki_refresh(simulator)

    answers = _refresh_all(urls, token)

    stats = simulator.stats()
    assert [a.status_code for a in answers] == [200] * PARALLEL_REFRESHES
    assert stats["refresh_reuse_refused"] == 0
    assert stats["calls"]["refresh"] == 1


# --- expired sessions --------------------------------------------------------------


def test_mint_unexpired_session_is_accepted(api: Api):
    real = session_of(api.login(1))
    now = int(time.time())

    minted = _mint(real, iat=now, exp=now + 600)

    assert api.lookup(minted).status == 200


def test_refresh_expired_within_window_gives_new_session(api: Api):
    expired = _expired(session_of(api.login(1)), seconds_ago=DAY)

    refreshed = api.refresh(expired)
    looked_up = api.lookup(expired)

    assert refreshed.status == 200
    assert api.lookup(session_of(refreshed)).status == 200
    assert (looked_up.status, looked_up.reason) == (401, "unauthenticated")


def test_refresh_expired_past_default_window_is_reauth(api: Api):
    expired = _expired(session_of(api.login(1)), seconds_ago=7 * DAY + 60)

    refreshed = api.refresh(expired)

    assert (refreshed.status, refreshed.reason) == (401, "reauth_required")
    assert refreshed.json["data"] is None


@pytest.mark.parametrize(
    ("seconds_ago", "expected"), [(300, (200, None)), (900, (401, "reauth_required"))]
)
def test_refresh_window_is_configurable(
    api: Api, monkeypatch, seconds_ago: int, expected: tuple[int, str | None]
):
    monkeypatch.setenv("SESSION_REFRESH_WINDOW_SECONDS", "600")
    expired = _expired(session_of(api.login(1)), seconds_ago=seconds_ago)

    refreshed = api.refresh(expired)

    assert (refreshed.status, refreshed.reason) == expected


def test_delete_with_expired_but_refreshable_session_erases(api: Api, backend):
    expired = _expired(session_of(api.login(1)), seconds_ago=60)

    answer = api.delete(expired)

    assert answer.status == 200, answer.body
    assert not _doc(backend, "tiki_users", "1").exists
    assert not _doc(backend, "tiki_tokens", "1").exists


def test_delete_with_session_expired_past_window_is_refused_and_keeps_data(
    api: Api, backend
):
    expired = _expired(session_of(api.login(1)), seconds_ago=7 * DAY + 60)

    answer = api.delete(expired)

    assert (answer.status, answer.reason) == (401, "reauth_required")
    assert _doc(backend, "tiki_users", "1").exists
    assert _doc(backend, "tiki_tokens", "1").exists


def test_revoke_with_expired_but_refreshable_session_ends_it(api: Api, backend):
    session = session_of(api.login(1))
    expired = _expired(session, seconds_ago=DAY)

    revoked = api.revoke(expired)
    refreshed = api.refresh(expired)

    assert revoked.status == 200, revoked.body
    assert (refreshed.status, refreshed.reason) == (401, "reauth_required")
    assert not _doc(backend, "tiki_tokens", "1").exists


# --- logout -------------------------------------------------------------------------


def test_revoke_ends_every_session_of_the_customer(api: Api, backend):
    earlier = session_of(api.login(1))
    current = session_of(api.login(1))

    revoked = api.revoke(current)

    assert revoked.status == 200 and revoked.error is None
    assert not _doc(backend, "tiki_tokens", "1").exists
    for token in (earlier, current):
        assert _refusals(_every_function(api, token)) == {}
    assert _doc(backend, "tiki_users", "1").exists  # a refused delete did nothing


def test_revoke_then_new_login_works_and_old_sessions_stay_out(api: Api):
    old = session_of(api.login(1))
    api.revoke(old)

    fresh = api.login(1)
    old_lookup = api.lookup(old)

    assert fresh.data["user"]["login_count"] == 2
    assert api.lookup(session_of(fresh)).status == 200
    assert api.refresh(session_of(fresh)).status == 200
    assert (old_lookup.status, old_lookup.reason) == (401, "reauth_required")


def test_revoke_leaves_other_customers_alone(api: Api):
    mine = session_of(api.login(1))
    theirs = session_of(api.login(3))

    api.revoke(mine)

    assert api.lookup(theirs).status == 200
    assert api.refresh(theirs).status == 200


# --- delete my data -----------------------------------------------------------------


def test_delete_removes_record_and_tokens(api: Api, backend):
    token = session_of(api.login(1))

    deleted = api.delete(token)

    assert deleted.status == 200 and deleted.error is None
    assert not _doc(backend, "tiki_users", "1").exists
    assert not _doc(backend, "tiki_tokens", "1").exists


def test_delete_refuses_every_earlier_session_everywhere(api: Api):
    earlier = session_of(api.login(1))
    current = session_of(api.login(1))

    api.delete(current)

    for token in (earlier, current):
        assert _refusals(_every_function(api, token)) == {}


def test_delete_then_login_starts_a_new_record_and_old_sessions_stay_out(
    api: Api, backend
):
    earlier = session_of(api.login(1))
    current = session_of(api.login(1))
    api.delete(current)

    fresh = api.login(1)

    assert fresh.data["user"]["login_count"] == 1
    assert api.lookup(session_of(fresh)).status == 200
    for token in (earlier, current):
        assert _refusals(_every_function(api, token)) == {}
    assert _doc(backend, "tiki_users", "1").exists  # the old sessions deleted nothing
    assert api.lookup(session_of(fresh)).status == 200  # nor revoked anything


def test_delete_then_login_then_revoke_keeps_old_sessions_out(api: Api):
    old = session_of(api.login(1))
    api.delete(old)
    api.revoke(session_of(api.login(1)))

    fresh = session_of(api.login(1))
    old_lookup = api.lookup(old)

    assert api.lookup(fresh).status == 200
    assert (old_lookup.status, old_lookup.reason) == (401, "reauth_required")


# --- session key rotation -----------------------------------------------------------


def _rotate_session_secret(stub) -> int:
    version = stub.add_version(SESSION_SECRET_NAME, NEW_SESSION_SECRET + "\n")
    auth_secrets.clear_cache()
    return version


def test_session_key_rotation_signs_new_sessions_with_new_version(api: Api, stub):
    old = session_of(api.login(1))

    version = _rotate_session_secret(stub)
    new = session_of(api.login(1))

    assert (_kid(old), version, _kid(new)) == ("1", 2, "2")
    key = keys.derive(NEW_SESSION_SECRET, keys.SESSION_SIGNING)
    jwt.decode(new, key, algorithms=["HS256"], audience=CLIENT_ID)
    assert api.lookup(old).status == 200
    assert api.lookup(new).status == 200
    assert api.refresh(old).status == 200


@pytest.mark.parametrize("state", ["disabled", "destroyed"])
def test_session_key_unusable_version_is_401_not_500(api: Api, stub, state: str):
    old = session_of(api.login(1))
    _rotate_session_secret(stub)
    new = session_of(api.login(1))

    stub.set_state(SESSION_SECRET_NAME, 1, state)
    auth_secrets.clear_cache()
    answers = [api.lookup(old), api.refresh(old), api.revoke(old)]

    assert [(a.status, a.reason) for a in answers] == [(401, "unauthenticated")] * 3
    assert api.lookup(new).status == 200


def test_session_key_rotation_reaches_instance_within_cache_life(
    api: Api, stub, monkeypatch
):
    monkeypatch.setenv("SECRET_CACHE_SECONDS", "0")
    old = session_of(api.login(1))

    stub.add_version(SESSION_SECRET_NAME, NEW_SESSION_SECRET)
    new = session_of(api.login(1))

    assert (_kid(old), _kid(new)) == ("1", "2")
    assert api.lookup(old).status == 200


@pytest.mark.parametrize(
    "kid", ["abc", "latest", "-1", "1.0", " 1", "", "1/2", "01", 1, None]
)
def test_session_key_id_not_a_known_version_is_refused_without_lookup(
    api: Api, stub, kid: Any
):
    real = session_of(api.login(1))
    _rotate_session_secret(stub)
    assert api.lookup(real).status == 200  # versions "latest", 1 and 2 now cached
    calls_before = stub.stats()["access_calls"]
    forged = _mint(real, kid=kid)

    answer = api.lookup(forged)

    assert (answer.status, answer.reason) == (401, "unauthenticated")
    assert stub.stats()["access_calls"] == calls_before


@pytest.mark.parametrize("kid", ["3", "999999999"])
def test_session_key_id_newer_than_any_version_costs_one_reload_per_second(
    api: Api, stub, kid: str
):
    real = session_of(api.login(1))
    _rotate_session_secret(stub)
    assert api.lookup(real).status == 200
    before = dict(stub.stats()["by_name"])
    forged = _mint(real, kid=kid)

    answers = [api.lookup(forged) for _ in range(5)]

    after = stub.stats()["by_name"]
    asked = {name: n - before.get(name, 0) for name, n in after.items()}
    asked = {name: n for name, n in asked.items() if n}
    assert {(a.status, a.reason) for a in answers} == {(401, "unauthenticated")}
    assert asked in ({}, {f"{SESSION_SECRET_NAME}/versions/latest": 1})


def test_session_signed_with_a_version_this_instance_has_not_seen_works(api: Api, stub):
    real = session_of(api.login(1))  # this instance now caches version 1
    stub.add_version(SESSION_SECRET_NAME, NEW_SESSION_SECRET)
    key = keys.derive(NEW_SESSION_SECRET, keys.SESSION_SIGNING)
    claims = jwt.decode(real, options={"verify_signature": False})
    from_other_instance = jwt.encode(claims, key, "HS256", headers={"kid": "2"})

    looked_up = api.lookup(from_other_instance)
    refreshed = api.refresh(from_other_instance)

    assert looked_up.status == 200, looked_up.body
    assert refreshed.status == 200, refreshed.body
    assert _kid(session_of(refreshed)) == "2"


def test_session_key_id_of_another_version_does_not_verify(api: Api, stub):
    real = session_of(api.login(1))
    _rotate_session_secret(stub)

    forged = _mint(real, kid="2")  # signed with version 1's key

    answer = api.lookup(forged)

    assert (answer.status, answer.reason) == (401, "unauthenticated")


# --- token encryption key rotation --------------------------------------------------


def test_tokens_sealed_under_old_key_are_read_and_resealed_on_refresh(
    api: Api, simulator: Sim, stub, backend, monkeypatch
):
    token = session_of(api.login(1))
    assert _doc(backend, "tiki_tokens", "1").to_dict()["key_id"] == "1"
    _rotate_session_secret(stub)

    not_due = api.refresh(token)
    monkeypatch.setenv("TIKI_REFRESH_LEEWAY_SECONDS", "7200")
    due = api.refresh(token)
    monkeypatch.delenv("TIKI_REFRESH_LEEWAY_SECONDS")
    after = api.refresh(token)

    assert (not_due.status, due.status, after.status) == (200, 200, 200)
    assert simulator.stats()["refresh_success"] == 1
    stored = _doc(backend, "tiki_tokens", "1").to_dict()
    assert stored["key_id"] == "2"
    opened = vault.open_sealed(Secret(NEW_SESSION_SECRET, "2"), "1", stored["sealed"])
    assert opened["refresh_token"] in simulator.issued()["refresh_tokens"]
    with pytest.raises(vault.Unsealable):
        vault.open_sealed(Secret(SESSION_SECRET, "1"), "1", stored["sealed"])


def test_tokens_under_old_key_are_resealed_by_a_refresh_that_needs_no_tiki(
    api: Api, simulator: Sim, stub, backend
):
    token = session_of(api.login(1))
    before = _doc(backend, "tiki_tokens", "1").to_dict()
    _rotate_session_secret(stub)

    refreshed = api.refresh(token)
    stored = _doc(backend, "tiki_tokens", "1").to_dict()

    assert refreshed.status == 200, refreshed.body
    assert simulator.stats()["calls"]["refresh"] == 0
    assert stored["key_id"] == "2"
    assert stored["expires_at"] == before["expires_at"]
    old = vault.open_sealed(Secret(SESSION_SECRET, "1"), "1", before["sealed"])
    new = vault.open_sealed(Secret(NEW_SESSION_SECRET, "2"), "1", stored["sealed"])
    assert new == old
    assert api.lookup(session_of(refreshed)).status == 200


def test_tokens_of_login_after_rotation_use_new_key(api: Api, stub, backend):
    api.login(1)
    _rotate_session_secret(stub)

    api.login(3)

    assert _doc(backend, "tiki_tokens", "1").to_dict()["key_id"] == "1"
    assert _doc(backend, "tiki_tokens", "3").to_dict()["key_id"] == "2"


# --- client secret rotation ---------------------------------------------------------


def _rotate_client_secret(simulator: Sim, stub) -> None:
    simulator.config(clients={CLIENT_ID: NEW_CLIENT_SECRET})
    stub.add_version(CLIENT_SECRET_NAME, NEW_CLIENT_SECRET)


def test_client_secret_rotation_login_retries_with_new_version(
    api: Api, simulator: Sim, stub
):
    api.login(1)  # the old client secret is now cached, and only just
    _rotate_client_secret(simulator, stub)
    code = simulator.code(1)

    answer = api.exchange(code)

    stats = simulator.stats()
    assert answer.status == 200
    assert answer.data["user"]["login_count"] == 2
    assert stats["signature_refused"] == 1
    assert stats["codes_redeemed"] == 2
    assert api.login(3).status == 200
    assert simulator.stats()["signature_refused"] == 1  # the new secret was kept


def test_client_secret_rotation_refresh_retries_with_new_version(
    api: Api, simulator: Sim, stub
):
    simulator.config(access_ttl=60)
    token = session_of(api.login(1))
    _rotate_client_secret(simulator, stub)

    refreshed = api.refresh(token)

    stats = simulator.stats()
    assert refreshed.status == 200
    assert stats["signature_refused"] == 1
    assert stats["refresh_success"] == 1
    assert stats["refresh_reuse_refused"] == 0


def test_client_secret_rotated_at_tiki_only_is_502_and_keeps_the_code(
    api: Api, simulator: Sim
):
    api.login(1)
    simulator.config(clients={CLIENT_ID: NEW_CLIENT_SECRET})
    code = simulator.code(1)

    refused = api.exchange(code)
    simulator.config(clients={CLIENT_ID: CLIENT_SECRET})
    retried = api.exchange(code)

    assert (refused.status, refused.reason) == (502, "upstream_error")
    assert refused.json["data"] is None
    assert retried.status == 200
    assert simulator.stats()["codes_redeemed"] == 2


# --- failures around a refresh -------------------------------------------------------


def test_refresh_secret_manager_failing_during_tiki_call_keeps_rotated_token(
    api: Api, simulator: Sim, stub, monkeypatch
):
    monkeypatch.setenv("SECRET_CACHE_SECONDS", "1")
    token = login_due_for_refresh(api, simulator)
    simulator.fault(endpoint="refresh", delay_ms=1500)

    breaker = break_secret_manager_after(stub, 0.5)
    first = api.refresh(token)
    breaker.join()
    stub.clear_faults()
    started = time.monotonic()
    second = api.refresh(session_of(first) if first.status == 200 else token)

    assert first.status == 200, first.body
    assert second.status == 200, second.body
    assert time.monotonic() - started < 3
    assert simulator.stats()["refresh_reuse_refused"] == 0


def test_exchange_secret_cache_expiring_during_tiki_call_still_answers(
    api: Api, simulator: Sim, stub, backend, monkeypatch
):
    monkeypatch.setenv("SECRET_CACHE_SECONDS", "1")
    simulator.fault(endpoint="token", delay_ms=1500)

    breaker = break_secret_manager_after(stub, 0.5)
    answer = api.exchange(simulator.code(1))
    breaker.join()
    stub.clear_faults()

    assert answer.status == 200, answer.body
    assert _doc(backend, "tiki_users", "1").to_dict()["login_count"] == 1


def test_refresh_parallel_callers_share_a_failed_tiki_call(
    api: Api, simulator: Sim, instances
):
    urls = instances()
    token = login_due_for_refresh(api, simulator)
    _warm(urls, token)
    simulator.fault(endpoint="refresh", status=500, delay_ms=1000, times=10)
    started = time.monotonic()

    answers = _refresh_all(urls, token)

    elapsed = time.monotonic() - started
    assert all(a.status_code in (502, 503) for a in answers), [a.text for a in answers]
    assert simulator.stats()["calls"]["refresh"] == 1
    assert elapsed < 5


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param({"data_remove": ["access_token"]}, id="no-access-token"),
        pytest.param({"data_override": {"expires_in": -5}}, id="bad-expires-in"),
        pytest.param({"status": 500}, id="success-data-with-500"),
    ],
)
def test_refresh_unusable_answer_keeps_the_rotated_refresh_token(
    api: Api, simulator: Sim, fault: dict[str, Any]
):
    token = login_due_for_refresh(api, simulator)
    if fault.get("status") == 500:
        # A success envelope sent with HTTP 500: the real handler's data, bad status.
        fault = {"data_override": {}, "status": 500}
    simulator.fault(endpoint="refresh", **fault)

    failed = api.refresh(token)
    retried = api.refresh(token)

    assert (failed.status, failed.reason) == (502, "upstream_error")
    assert retried.status == 200, retried.body
    stats = simulator.stats()
    assert stats["refresh_success"] == 2
    assert stats["refresh_reuse_refused"] == 0


def test_refresh_answers_401_when_logout_lands_during_the_tiki_call(
    api: Api, simulator: Sim
):
    token = login_due_for_refresh(api, simulator)
    simulator.fault(endpoint="refresh", delay_ms=1500)
    results: dict[str, Any] = {}

    def refresh_in_background() -> None:
        results["refresh"] = api.refresh(token)

    worker = threading.Thread(target=refresh_in_background)
    worker.start()
    time.sleep(0.5)
    revoked = api.revoke(token)
    worker.join()

    assert revoked.status == 200, revoked.body
    assert (results["refresh"].status, results["refresh"].reason) == (
        401,
        "reauth_required",
    )


def test_refresh_write_rides_out_a_brief_firestore_outage(
    api: Api, simulator: Sim, monkeypatch
):
    from google.api_core import exceptions as gexc
    from google.cloud.firestore_v1.document import DocumentReference

    token = login_due_for_refresh(api, simulator)
    real_update = DocumentReference.update
    failures = {"left": 2}

    def flaky_update(self: Any, *args: Any, **kwargs: Any) -> Any:
        if "sealed" in args[0] and failures["left"]:
            failures["left"] -= 1
            raise gexc.ServiceUnavailable("Firestore is briefly unreachable")
        return real_update(self, *args, **kwargs)

    monkeypatch.setattr(DocumentReference, "update", flaky_update)

    refreshed = api.refresh(token)
    again = api.refresh(session_of(refreshed))

    assert refreshed.status == 200, refreshed.body
    assert failures["left"] == 0
    assert again.status == 200
    assert simulator.stats()["refresh_reuse_refused"] == 0


def test_refresh_invalid_token_inside_a_500_is_reauth(api: Api, simulator: Sim):
    token = login_due_for_refresh(api, simulator)
    simulator.fault(endpoint="refresh", status=500, error={"reason": "invalid_token"})

    refreshed = api.refresh(token)

    assert (refreshed.status, refreshed.reason) == (401, "reauth_required")


def _slow_header_proxy(target: str) -> Callable[[socket.socket, threading.Event], None]:
    """Forwards one request to ``target`` at once, then answers with slow headers."""

    def handle(conn: socket.socket, stop: threading.Event) -> None:
        raw = b""
        while b"\r\n\r\n" not in raw:
            raw += conn.recv(65536)
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        while len(body) < int(headers["Content-Length"]):
            body += conn.recv(65536)
        path = lines[0].split(" ")[1]
        passed = {k: v for k, v in headers.items() if k.lower().startswith("x-tiniapp")}
        passed["Content-Type"] = "application/json"
        answer = requests.post(target + path, data=body, headers=passed, timeout=5)
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        for _ in range(12):  # 3.6 s of headers: past the call's whole deadline
            if stop.wait(0.3):
                return
            conn.sendall(b"X-Slow: 1\r\n")
        length = len(answer.content)
        conn.sendall(f"Content-Length: {length}\r\n\r\n".encode() + answer.content)

    return handle


def test_refresh_answer_arriving_after_the_deadline_is_stored(
    api: Api, simulator: Sim, backend, monkeypatch
):
    token = login_due_for_refresh(api, simulator)
    before = _doc(backend, "tiki_tokens", "1").to_dict()["sealed"]
    base_path = urllib.parse.urlsplit(simulator.url).path
    monkeypatch.setenv("TIKI_CONNECT_TIMEOUT_SECONDS", "0.5")
    monkeypatch.setenv("TIKI_READ_TIMEOUT_SECONDS", "1")

    with raw_server(_slow_header_proxy(simulator.admin)) as port:
        monkeypatch.setenv("TIKI_BASE_URL", f"http://127.0.0.1:{port}{base_path}")
        timed_out = api.refresh(token)
        deadline = time.monotonic() + 5
        while _doc(backend, "tiki_tokens", "1").to_dict()["sealed"] == before:
            assert time.monotonic() < deadline, "the late answer was never stored"
            time.sleep(0.1)
    monkeypatch.setenv("TIKI_BASE_URL", simulator.url)
    later = api.refresh(token)

    assert (timed_out.status, timed_out.reason) == (504, "upstream_timeout")
    assert later.status == 200, later.body
    stats = simulator.stats()
    assert stats["refresh_success"] == 1
    assert stats["refresh_reuse_refused"] == 0
    assert _doc(backend, "tiki_tokens", "1").to_dict()["lease_owner"] is None
