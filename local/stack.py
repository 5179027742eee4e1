"""Run the whole backend on this machine: ``python -m local.stack``.

Starts, all on 127.0.0.1: the Firestore emulator, the Secret Manager stand-in
(seeded with the simulator's client secret and a fresh session secret), the Tiki
sandbox simulator, and functions-framework serving ``main.local_router``. Ctrl-C
or SIGTERM stops every one of them; if one dies, the rest are stopped too.

Exit codes: 0 after Ctrl-C or SIGTERM, 1 when a part failed, 2 when a
prerequisite is missing or a port is taken.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from local import firestore_emulator, secret_manager_stub
from local.firestore_emulator import MissingTool

REPO_ROOT = firestore_emulator.REPO_ROOT
LOG_DIR = REPO_ROOT / ".local"
PROJECT = "tini-local"
CLIENT_SECRET = f"projects/{PROJECT}/secrets/tiki-client-secret"
SESSION_SECRET = f"projects/{PROJECT}/secrets/session-secret"
ALLOWED_ORIGINS = "http://127.0.0.1:3000,http://localhost:3000"

# Default port of each part, the flag and variable that move it, and its place
# after --ports-from N.
PARTS = ("functions", "firestore", "secrets", "simulator")
DEFAULT_PORTS = {
    "functions": 8080,
    "firestore": 8181,
    "secrets": 8282,
    "simulator": 9090,
}
PORT_ENV = {part: f"LOCAL_{part.upper()}_PORT" for part in PARTS}

# Importing main.py and its Google clients takes a few seconds on a cold machine.
FUNCTIONS_START_SECONDS = 60.0
# gunicorn finishes in-flight requests on SIGTERM; an idle one exits at once.
FUNCTIONS_STOP_SECONDS = 5.0
POLL_SECONDS = 0.5

EXIT_FAILED = 1
EXIT_SETUP = 2


class SetupError(Exception):
    """Something to fix before the stack can run; exit code 2."""


class PartFailed(Exception):
    """A part did not start or died; exit code 1."""


def functions_framework_path() -> Path:
    """The functions-framework script of the running virtualenv."""
    return Path(sys.executable).parent / "functions-framework"


def check_prerequisites() -> list[str]:
    """One line per tool found; MissingTool naming all that is missing."""
    problems: list[str] = []
    found: list[str] = []
    try:
        java, jar = firestore_emulator.find_emulator()
        found.append(f"Java: {java} ({firestore_emulator.java_version(java)})")
        found.append(f"Firestore emulator: {jar}")
    except MissingTool as exc:
        problems.append(str(exc))
    ff = functions_framework_path()
    if os.access(ff, os.X_OK):
        found.append(f"functions-framework: {ff}")
    else:
        problems.append(
            f"functions-framework is not installed next to {sys.executable}. "
            "Run local/bootstrap.sh (make run does) and use .venv/bin/python."
        )
    if problems:
        raise MissingTool("\n".join(problems))
    return found


def choose_ports(args: argparse.Namespace) -> dict[str, int]:
    """Each part's port: its flag, else --ports-from, else its variable, else 8xxx."""
    ports: dict[str, int] = {}
    for offset, part in enumerate(PARTS):
        flag = getattr(args, f"{part}_port")
        env = os.environ.get(PORT_ENV[part])
        if flag is not None:
            ports[part] = flag
        elif args.ports_from is not None:
            ports[part] = args.ports_from + offset
        elif env:
            try:
                ports[part] = int(env)
            except ValueError as exc:
                raise SetupError(f"{PORT_ENV[part]}={env!r} is not a port.") from exc
        else:
            ports[part] = DEFAULT_PORTS[part]
    if len(set(ports.values())) != len(ports):
        raise SetupError(f"Two parts were given the same port: {ports}.")
    for part, port in ports.items():
        if not 0 < port < 65536:
            raise SetupError(f"Port {port} for {part} is not a TCP port.")
        if firestore_emulator.port_in_use(port):
            raise SetupError(
                f"Port {port} on 127.0.0.1 ({part}) is already in use. Stop what "
                f"holds it, or move {part} with --{part}-port, {PORT_ENV[part]} "
                "or --ports-from N."
            )
    return ports


@dataclass
class Stack:
    """Everything started so far, so that stop() can end exactly that."""

    emulator: firestore_emulator.FirestoreEmulator | None = None
    stub: secret_manager_stub.SecretStub | None = None
    simulator: Any = None
    functions: subprocess.Popen[bytes] | None = None
    functions_log: Path = LOG_DIR / "functions.log"
    _copier: threading.Thread | None = field(default=None, repr=False)

    def started(self) -> bool:
        parts = (self.emulator, self.stub, self.simulator, self.functions)
        return any(part is not None for part in parts)

    def check(self) -> None:
        """PartFailed naming the first part that has died, with its log."""
        if self.functions is not None and self.functions.poll() is not None:
            raise PartFailed(
                f"functions-framework exited with code {self.functions.returncode}. "
                f"Log: {_shown(self.functions_log)}"
            )
        if self.emulator is not None and self.emulator.poll() is not None:
            raise PartFailed(
                f"The Firestore emulator exited with code {self.emulator.poll()}. "
                f"Log: {_shown(self.emulator.log_path)}"
            )
        if self.stub is not None and not self.stub.alive():
            raise PartFailed("The Secret Manager stand-in's thread has stopped.")

    def stop(self) -> None:
        """Stop every part started, newest first; each step runs even if one fails."""
        steps = [self._stop_functions]
        if self.simulator is not None:
            steps.append(self.simulator.stop)
        if self.stub is not None:
            steps.append(self.stub.stop)
        if self.emulator is not None:
            steps.append(self.emulator.stop)
        for step in steps:
            try:
                step()
            except Exception as exc:  # the other parts must still stop
                print(f"stack: while stopping: {exc!r}", file=sys.stderr)

    def _stop_functions(self) -> None:
        process = self.functions
        if process is None:
            return
        # gunicorn's master and workers share the group started for them.
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=FUNCTIONS_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait()
        # The master is gone; make sure no worker outlived it.
        _signal_group(process.pid, signal.SIGKILL)
        if self._copier is not None:
            self._copier.join(timeout=2)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _copy_output(source: IO[bytes], log_path: Path) -> None:
    """Show functions-framework's output and keep it in its log file.

    The pipe is read to its end whatever happens to our stdout: a pipe left
    unread fills up and blocks the server.
    """
    show = True
    with log_path.open("wb") as log:
        for line in iter(source.readline, b""):
            log.write(line)
            log.flush()
            if show:
                try:
                    sys.stdout.buffer.write(line)
                    sys.stdout.flush()
                except (OSError, ValueError):
                    show = False
    source.close()


def functions_env(stack: Stack, simulator: Any, client_id: str) -> dict[str, str]:
    """The environment main.py runs with: every setting points at a local part."""
    assert stack.stub is not None and stack.emulator is not None
    env = dict(os.environ)
    # Read through Secret Manager like production, never from leftover variables.
    for name in ("TIKI_CLIENT_SECRET", "SESSION_SECRET"):
        env.pop(name, None)
    env.update(
        {
            "TIKI_CLIENT_ID": client_id,
            "TIKI_CLIENT_SECRET_RESOURCE": f"{CLIENT_SECRET}/versions/latest",
            "SESSION_SECRET_RESOURCE": f"{SESSION_SECRET}/versions/latest",
            "SECRET_MANAGER_EMULATOR_HOST": stack.stub.host,
            "FIRESTORE_EMULATOR_HOST": stack.emulator.host,
            "GOOGLE_CLOUD_PROJECT": PROJECT,
            "TIKI_BASE_URL": simulator.url,
            "ALLOWED_ORIGINS": ALLOWED_ORIGINS,
            "PYTHONUNBUFFERED": "1",
            # A safety net: nothing local needs Google credentials, so any lookup
            # that slips through fails at once on loopback instead of probing
            # the metadata server.
            "NO_GCE_CHECK": "True",
            "GCE_METADATA_HOST": "127.0.0.1:1",
            "GCE_METADATA_IP": "127.0.0.1:1",
        }
    )
    return env


def start_functions(
    stack: Stack, port: int, source: str, target: str, env: dict[str, str]
) -> None:
    """functions-framework in its own process group, output copied to a log."""
    LOG_DIR.mkdir(exist_ok=True)
    # Named by port, so two stacks from one clone keep separate logs.
    stack.functions_log = LOG_DIR / f"functions-{port}.log"
    command = [
        str(functions_framework_path()),
        f"--target={target}",
        f"--source={source}",
        "--host=127.0.0.1",
        f"--port={port}",
    ]
    stack.functions = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert stack.functions.stdout is not None
    stack._copier = threading.Thread(
        target=_copy_output,
        args=(stack.functions.stdout, stack.functions_log),
        name="functions-output",
        daemon=True,
    )
    stack._copier.start()


def wait_for_port(stack: Stack, port: int, stopping: threading.Event) -> None:
    deadline = time.monotonic() + FUNCTIONS_START_SECONDS
    while time.monotonic() < deadline and not stopping.is_set():
        stack.check()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    if not stopping.is_set():
        raise PartFailed(
            f"functions-framework did not listen on port {port} within "
            f"{FUNCTIONS_START_SECONDS:.0f} s. Log: {_shown(stack.functions_log)}"
        )


def _python_for_banner() -> str:
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(REPO_ROOT))
    except ValueError:
        return str(exe)


def banner(stack: Stack, simulator: Any, ports: dict[str, int]) -> str:
    """What to know and what to paste, once everything answers."""
    api = f"http://127.0.0.1:{ports['functions']}"
    python = shlex.quote(_python_for_banner())
    sim_flag = ""
    if ports["simulator"] != DEFAULT_PORTS["simulator"]:
        sim_flag = f" --url http://127.0.0.1:{ports['simulator']}"
    code = f"{python} -m local.tiki_simulator code{sim_flag}"
    token = (
        f"{python} -c 'import json,sys; "
        'print(json.load(sys.stdin)["data"]["session_token"])\''
    )
    assert stack.emulator is not None and stack.stub is not None
    exchange = (
        f"curl -s -X POST {api}/exchange_auth_code "
        '-H \'Content-Type: application/json\' -d "{\\"code\\":\\"$CODE\\"}"'
    )
    return f"""
Local Tini App auth backend is up (project {PROJECT}).
  functions           {api}/exchange_auth_code, /refresh_auth_token, /lookup_user,
                      /revoke_sessions, /delete_user
  Tiki simulator      {simulator.url}
  Firestore emulator  FIRESTORE_EMULATOR_HOST={stack.emulator.host}
  Secret Manager      SECRET_MANAGER_EMULATOR_HOST={stack.stub.host}
  CORS origins        {ALLOWED_ORIGINS}
  logs                {_shown(stack.functions_log)}, {_shown(stack.emulator.log_path)}

Log in from another terminal, in {REPO_ROOT}:

  # Customer 1 consents to offline + user_profile.
  CODE=$({code} --customer 1)
  RESP=$({exchange}); echo "$RESP"
  TOKEN=$(echo "$RESP" | {token})

  # Your own user record, then a new session (Tiki is called only when its
  # token is near expiry; the refresh token never leaves the backend).
  curl -s {api}/lookup_user -H "Authorization: Bearer $TOKEN"
  curl -s -X POST {api}/refresh_auth_token -H "Authorization: Bearer $TOKEN"

  # Customer 2 has no offline scope: the login works, a refresh cannot.
  CODE=$({code} --customer 2)
  RESP=$({exchange}); echo "$RESP"
  TOKEN=$(echo "$RESP" | {token})
  curl -s -X POST {api}/refresh_auth_token -H "Authorization: Bearer $TOKEN"

Ctrl-C stops everything.
"""


def run(args: argparse.Namespace, stack: Stack, stopping: threading.Event) -> None:
    """Start every part, wait for a signal or a death; the caller stops them."""
    try:
        from local import tiki_simulator
    except ImportError as exc:
        raise SetupError(f"The Tiki simulator cannot be imported: {exc}") from exc
    source = Path(args.source)
    if not (REPO_ROOT / source).is_file():
        raise SetupError(f"No {source} in {REPO_ROOT} to serve.")
    ports = choose_ports(args)

    stack.stub = secret_manager_stub.start(
        port=ports["secrets"],
        secrets={
            CLIENT_SECRET: [tiki_simulator.DEFAULT_CLIENT_SECRET],
            # A new session key each run: sessions do not outlive the stack.
            SESSION_SECRET: [secrets.token_hex(32)],
        },
        quiet=not args.verbose,
    )
    simulator = tiki_simulator.start(host="127.0.0.1", port=ports["simulator"])
    stack.simulator = simulator
    if stopping.is_set():
        return
    stack.emulator = firestore_emulator.start(
        port=ports["firestore"],
        log_path=LOG_DIR / f"firestore-{ports['firestore']}.log",
    )
    if stopping.is_set():
        return
    env = functions_env(stack, simulator, tiki_simulator.DEFAULT_CLIENT_ID)
    start_functions(stack, ports["functions"], str(source), args.target, env)
    wait_for_port(stack, ports["functions"], stopping)
    if stopping.is_set():
        return

    print(banner(stack, simulator, ports), flush=True)
    while not stopping.wait(POLL_SECONDS):
        stack.check()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m local.stack", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--check", action="store_true", help="only check the prerequisites"
    )
    parser.add_argument(
        "--ports-from",
        type=int,
        metavar="N",
        help="functions on N, Firestore N+1, secrets N+2, simulator N+3",
    )
    for part in PARTS:
        parser.add_argument(
            f"--{part}-port",
            type=int,
            metavar="PORT",
            help=f"default {DEFAULT_PORTS[part]}, or ${PORT_ENV[part]}",
        )
    parser.add_argument(
        "--source", default="main.py", help="relative to the repository root"
    )
    parser.add_argument("--target", default="local_router")
    parser.add_argument(
        "--verbose", action="store_true", help="log every Secret Manager call"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        found = check_prerequisites()
    except MissingTool as exc:
        print(f"Cannot run the local stack:\n{exc}", file=sys.stderr)
        return EXIT_SETUP
    if args.check:
        print("\n".join(found))
        return 0

    stopping = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    previous = {
        signum: signal.signal(signum, _on_signal)
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    stack = Stack()
    code = 0
    try:
        run(args, stack, stopping)
    except SetupError as exc:
        print(f"Cannot run the local stack: {exc}", file=sys.stderr)
        code = EXIT_SETUP
    except (PartFailed, firestore_emulator.EmulatorError, OSError) as exc:
        print(f"Local stack failed: {exc}", file=sys.stderr)
        code = EXIT_FAILED
    finally:
        # Ignore further signals while stopping, so nothing is left half-stopped.
        for signum in previous:
            signal.signal(signum, signal.SIG_IGN)
        if stack.started():
            print("Stopping the local stack...", file=sys.stderr, flush=True)
        stack.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
