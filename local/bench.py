"""Cold-start, latency and memory benchmark of one real function instance.

``make bench`` starts the Firestore emulator, the Tiki simulator and the secret
stand-in on loopback, then one functions-framework process, and measures:

- importing ``main`` in a fresh interpreter, beyond functions-framework itself
  (what every cold start pays for our code);
- the first login after the process starts (lazy imports, first connections);
- warm latency of login, lookup and a refresh that needs no Tiki call;
- the instance's resident memory afterwards.

Each figure is checked against a target below; the exit status says whether
all were met. Bounded: a fixed number of sequential requests, loopback only.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from local import firestore_emulator, secret_manager_stub, tiki_simulator

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "tini-bench"
SECRETS = f"projects/{PROJECT}/secrets"
WARM_REQUESTS = 100
# Measured on this project's 2-core machine: about 0.01 s, 1.2 s, 25 ms, 9 ms,
# 15 ms and 110 MiB; the targets leave room for a slower or busier machine.
TARGETS = {
    "import main (s, median of 5)": 0.05,
    "first login after start (s)": 2.5,
    "warm login p95 (ms)": 60.0,
    "warm lookup p95 (ms)": 25.0,
    "warm refresh p95 (ms)": 40.0,
    "instance RSS (MiB)": 160.0,
}


def import_time() -> float:
    # The framework is imported before it loads main; what main adds is ours.
    code = (
        "import functions_framework, time; t = time.perf_counter(); import main; "
        "import sys; print(time.perf_counter() - t); "
        "print('google.cloud.firestore' in sys.modules)"
    )
    times = []
    for _ in range(5):
        out = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        if out[1] != "False":
            raise SystemExit("importing main imported Firestore: it must stay lazy")
        times.append(float(out[0]))
    return statistics.median(times)


def call(url: str, body: dict[str, str] | None = None, token: str = "") -> Any:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    method = "GET" if url.endswith("lookup_user") else "POST"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def p95(samples: list[float]) -> float:
    return sorted(samples)[int(len(samples) * 0.95) - 1] * 1000


def rss_mib(pid: int) -> float:
    total = 0
    children = subprocess.run(
        ["pgrep", "-g", str(os.getpgid(pid))], capture_output=True, text=True
    ).stdout.split()
    for child in children or [str(pid)]:
        for line in Path(f"/proc/{child}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def main() -> int:
    results: dict[str, float] = {"import main (s, median of 5)": import_time()}
    emulator = firestore_emulator.start(
        log_path=ROOT / ".local" / "bench-firestore.log"
    )
    sim = tiki_simulator.start(port=0, quiet=True)
    stub = secret_manager_stub.start(
        secrets={
            f"{SECRETS}/client": [tiki_simulator.DEFAULT_CLIENT_SECRET],
            f"{SECRETS}/session": ["bench-session-secret-" + "x" * 32],
        },
        quiet=True,
    )
    port = firestore_emulator.free_port()
    env = {
        **os.environ,
        "TIKI_CLIENT_ID": tiki_simulator.DEFAULT_CLIENT_ID,
        "TIKI_CLIENT_SECRET_RESOURCE": f"{SECRETS}/client/versions/latest",
        "SESSION_SECRET_RESOURCE": f"{SECRETS}/session/versions/latest",
        "SECRET_MANAGER_EMULATOR_HOST": stub.host,
        "FIRESTORE_EMULATOR_HOST": emulator.host,
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "TIKI_BASE_URL": sim.url,
    }
    log = (ROOT / ".local" / "bench-functions.log").open("wb")
    started = time.perf_counter()
    process = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("functions-framework")),
            "--target",
            "local_router",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        code_url = f"{sim.admin_url}/_sim/auth-code?customer_id=1"

        def login() -> Any:
            code = json.loads(urllib.request.urlopen(code_url, timeout=5).read())
            return call(f"{base}/exchange_auth_code", {"code": code["authCode"]})

        while True:
            try:
                session = login()["data"]["session_token"]
                break
            except (urllib.error.URLError, ConnectionError):
                if time.perf_counter() - started > 30 or process.poll() is not None:
                    raise SystemExit(
                        "the instance did not start; see .local/"
                    ) from None
                time.sleep(0.05)
        results["first login after start (s)"] = time.perf_counter() - started
        for name, run in (
            ("warm login p95 (ms)", login),
            (
                "warm lookup p95 (ms)",
                lambda: call(f"{base}/lookup_user", token=session),
            ),
            (
                "warm refresh p95 (ms)",
                lambda: call(f"{base}/refresh_auth_token", token=session),
            ),
        ):
            samples = []
            for _ in range(WARM_REQUESTS):
                t = time.perf_counter()
                run()
                samples.append(time.perf_counter() - t)
            results[name] = p95(samples)
        results["instance RSS (MiB)"] = rss_mib(process.pid)
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=10)
        log.close()
        stub.stop()
        sim.stop()
        emulator.stop()
    met = True
    for name, value in results.items():
        ok = value <= TARGETS[name]
        met &= ok
        mark = "ok  " if ok else "MISS"
        print(f"{mark} {name:32} {value:9.3f}  (target ≤ {TARGETS[name]})")
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
