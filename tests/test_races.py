"""Races between real function instances: logins, one code twice, parallel refreshes.

Issue 3, "Races". Two functions-framework server processes share the emulator, the
simulator and the Secret Manager stand-in; requests go to both at once from threads.
Counts stay small: the emulator serialises contended writes to one document.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from conftest import (
    PROJECT,
    ROOT,
    Api,
    Sim,
    backend_environment,
    login_due_for_refresh,
    start_instance,
)
from google.cloud import firestore

from auth import flows
from local.firestore_emulator import free_port

# An instance is local: an answer slower than this is a hang, not a result.
REQUEST_TIMEOUT_SECONDS = 30


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        # The instance leads its own process group (start_new_session).
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def instances(firestore, stub, simulator) -> Iterator[list[str]]:
    """Base URLs of two running instances, each serving every function by path."""
    env = {
        **backend_environment(firestore, stub, simulator),
        "EXPOSE_TIKI_ACCESS_TOKEN": "true",
        "THREADS": "16",
    }
    ports = [free_port(), free_port()]
    log_dir = ROOT / ".local"
    log_dir.mkdir(exist_ok=True)
    processes: list[subprocess.Popen[bytes]] = []
    lock = threading.Lock()

    def start(port: int) -> None:
        process = start_instance(env, port, log_dir / f"race-instance-{port}.log")
        with lock:
            processes.append(process)

    try:
        with ThreadPoolExecutor(len(ports)) as pool:
            list(pool.map(start, ports))
        yield [f"http://127.0.0.1:{port}" for port in ports]
    finally:
        for process in processes:
            _stop(process)


def post(base: str, target: str, **kwargs: Any) -> requests.Response:
    return requests.post(f"{base}/{target}", timeout=REQUEST_TIMEOUT_SECONDS, **kwargs)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def session_of_response(response: requests.Response) -> str:
    return str(response.json()["data"]["session_token"])


def at_once(calls: list[Callable[[], requests.Response]]) -> list[requests.Response]:
    """Run the calls from as many threads, released together."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], requests.Response]) -> requests.Response:
        barrier.wait(timeout=10)
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def tokens_document() -> Any:
    db = firestore.Client(project=PROJECT)
    try:
        return db.collection("tiki_tokens").document("1").get()
    finally:
        db.close()


def ids(collection: str) -> list[str]:
    db = firestore.Client(project=PROJECT)
    try:
        return [snap.id for snap in db.collection(collection).stream()]
    finally:
        db.close()


def test_exchange_ten_parallel_logins_make_one_record(
    instances: list[str], simulator: Sim
):
    codes = [simulator.code(1) for _ in range(10)]
    calls = [
        lambda i=i, code=code: post(
            instances[i % 2], "exchange_auth_code", json={"code": code}
        )
        for i, code in enumerate(codes)
    ]

    responses = at_once(calls)
    lookup = requests.get(
        f"{instances[0]}/lookup_user",
        headers=bearer(session_of_response(responses[-1])),
        timeout=REQUEST_TIMEOUT_SECONDS,
    )

    assert [r.status_code for r in responses] == [200] * 10
    counts = [r.json()["data"]["user"]["login_count"] for r in responses]
    assert max(counts) == 10
    assert ids("tiki_users") == ["1"]
    assert ids("tiki_tokens") == ["1"]
    assert lookup.json()["data"]["user"]["login_count"] == 10
    assert simulator.stats()["codes_redeemed"] == 10


def test_exchange_same_code_twice_at_once_gives_one_session(
    instances: list[str], simulator: Sim
):
    code = simulator.code(1)
    calls = [
        lambda base=base: post(base, "exchange_auth_code", json={"code": code})
        for base in instances
    ]

    responses = at_once(calls)

    by_status = {r.status_code: r.json() for r in responses}
    assert sorted(by_status) == [200, 400]
    assert by_status[200]["data"]["user"]["login_count"] == 1
    assert by_status[400]["data"] is None
    assert by_status[400]["error"]["code"] == 400
    assert by_status[400]["error"]["reason"] == "invalid_code"
    assert ids("tiki_users") == ["1"]
    assert simulator.stats()["codes_redeemed"] == 1


def test_refresh_five_parallel_callers_make_one_tiki_refresh(
    instances: list[str], api: Api, simulator: Sim, monkeypatch
):
    token = login_due_for_refresh(api, simulator)
    calls = [
        lambda i=i: post(instances[i % 2], "refresh_auth_token", headers=bearer(token))
        for i in range(5)
    ]

    responses = at_once(calls)
    race_stats = simulator.stats()
    sessions = [r.json()["data"]["session_token"] for r in responses]
    lookups = [
        requests.get(
            f"{instances[i % 2]}/lookup_user",
            headers=bearer(session),
            timeout=REQUEST_TIMEOUT_SECONDS,
        )
        for i, session in enumerate(sessions)
    ]
    # Due again at once: only the newest refresh token, if stored, still works.
    monkeypatch.setenv("TIKI_REFRESH_LEEWAY_SECONDS", "7200")
    later = api.refresh(sessions[0])
    final_stats = simulator.stats()

    assert [r.status_code for r in responses] == [200] * 5, [r.text for r in responses]
    assert len({r.json()["data"]["tiki_access_token"] for r in responses}) == 1
    assert [r.status_code for r in lookups] == [200] * 5
    assert race_stats["calls"]["refresh"] == 1
    assert race_stats["refresh_success"] == 1
    assert race_stats["refresh_reuse_refused"] == 0
    assert later.status == 200, later.body
    assert final_stats["refresh_success"] == 2
    assert final_stats["refresh_reuse_refused"] == 0


def _slow_refresh_overtaken(
    instances: list[str], api: Api, simulator: Sim, monkeypatch
) -> tuple[Any, requests.Response, Any]:
    """A's refresh answer comes back after its lease lapsed and B refreshed.

    A runs in this process with a short lease; Tiki holds A's refresh for 4 s.
    Returns A's answer, B's answer and the tokens document right after B.
    """
    monkeypatch.setattr(flows, "_lease_seconds", lambda settings: 2.5)
    monkeypatch.setenv("EXPOSE_TIKI_ACCESS_TOKEN", "true")
    monkeypatch.setenv("TIKI_READ_TIMEOUT_SECONDS", "8")
    token = login_due_for_refresh(api, simulator)
    simulator.fault(endpoint="refresh", delay_ms=4000)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(api.refresh, token)
        lease_until = _wait_for_lease()
        time.sleep(max(0.0, lease_until - time.time()) + 0.2)
        fast = post(instances[0], "refresh_auth_token", headers=bearer(token))
        after_fast = tokens_document()
        return slow.result(timeout=REQUEST_TIMEOUT_SECONDS), fast, after_fast


def _wait_for_lease() -> float:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        stored = tokens_document().to_dict()
        if stored.get("lease_until") is not None:
            return float(stored["lease_until"].timestamp())
        time.sleep(0.05)
    raise AssertionError("the slow refresh never took the lease")


def test_refresh_slow_answer_never_overwrites_newer_tokens(
    instances: list[str], api: Api, simulator: Sim, monkeypatch
):
    simulator.config(rotate_refresh=False)

    slow, fast, after_fast = _slow_refresh_overtaken(
        instances, api, simulator, monkeypatch
    )
    final = tokens_document()

    assert fast.status_code == 200, fast.text
    assert slow.status == 200, slow.body
    assert slow.data["tiki_access_token"] == fast.json()["data"]["tiki_access_token"]
    assert final.update_time == after_fast.update_time
    assert final.to_dict()["sealed"] == after_fast.to_dict()["sealed"]
    assert simulator.stats()["refresh_success"] == 2


def test_refresh_slow_answer_with_rotation_keeps_the_newest_tokens(
    instances: list[str], api: Api, simulator: Sim, monkeypatch
):
    slow, fast, after_fast = _slow_refresh_overtaken(
        instances, api, simulator, monkeypatch
    )
    final = tokens_document()
    monkeypatch.setenv("TIKI_REFRESH_LEEWAY_SECONDS", "7200")
    later = api.refresh(session_of_response(fast))

    assert fast.status_code == 200, fast.text
    assert slow.status < 500, slow.body
    assert final.exists
    assert final.update_time == after_fast.update_time
    assert final.to_dict()["lease_owner"] is None
    assert later.status == 200, later.body


def test_refresh_slow_answer_with_rotation_still_gets_a_session(
    instances: list[str], api: Api, simulator: Sim, monkeypatch
):
    slow, fast, _ = _slow_refresh_overtaken(instances, api, simulator, monkeypatch)

    assert fast.status_code == 200, fast.text
    assert slow.status == 200, slow.body
