"""Start and stop the official Firestore emulator for tests and local runs.

The emulator's jar is run with Java directly: it starts in about 2 s, where the
``gcloud emulators firestore start`` wrapper is slower and, on SIGTERM, leaves the
Java process serving. Facts behind each choice: SPEC.md, "Local development".
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

REPO_ROOT = Path(__file__).resolve().parent.parent
JAR_RELATIVE = Path("platform/cloud-firestore-emulator/cloud-firestore-emulator.jar")
MAIN_CLASS = "com.google.cloud.datastore.emulator.firestore.CloudFirestore"

# About 2 s is usual; a cold JVM on a busy CI machine can take several times that.
START_TIMEOUT_SECONDS = 30.0
# Plain-HTTP admin calls on loopback answer at once; waiting longer hides a hang.
ADMIN_TIMEOUT_SECONDS = 5.0
# How long a clean POST /shutdown may take before the process is signalled.
SHUTDOWN_GRACE_SECONDS = 5.0

INSTALL_JAVA = "apt-get install -y openjdk-17-jre-headless"
INSTALL_EMULATOR = (
    "gcloud components install cloud-firestore-emulator, or, where gcloud came "
    "from Debian packages (gcloud components is disabled there), "
    "apt-get install -y google-cloud-cli-firestore-emulator"
)


class MissingTool(RuntimeError):
    """Java, gcloud or the emulator is not installed; the message says what to do."""


class EmulatorError(RuntimeError):
    """The emulator did not start, or an admin call to it failed."""


def find_java() -> str:
    """The ``java`` to run: ``$JAVA_HOME/bin/java``, else the one on PATH."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and os.access(Path(java_home, "bin", "java"), os.X_OK):
        return str(Path(java_home, "bin", "java"))
    java = shutil.which("java")
    if java is None:
        raise MissingTool(
            "Java is not installed; the Firestore emulator needs it. "
            f"Install it with: {INSTALL_JAVA}"
        )
    return java


def find_jar() -> str:
    """The emulator jar: $FIRESTORE_EMULATOR_JAR, else inside the gcloud SDK."""
    override = os.environ.get("FIRESTORE_EMULATOR_JAR")
    if override:
        if not Path(override).is_file():
            raise MissingTool(f"FIRESTORE_EMULATOR_JAR={override} is not a file.")
        return override
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        raise MissingTool(
            "The Google Cloud CLI (gcloud) is not on PATH, and the Firestore "
            "emulator comes with it. Install the CLI (Debian package "
            "google-cloud-cli) and then the emulator: "
            f"{INSTALL_EMULATOR}. Or set FIRESTORE_EMULATOR_JAR to the jar."
        )
    # <sdk root>/bin/gcloud, reached through /usr/bin/gcloud on Debian installs.
    sdk_root = Path(gcloud).resolve().parent.parent
    jar = sdk_root / JAR_RELATIVE
    if not jar.is_file():
        raise MissingTool(
            f"The Firestore emulator is not installed (no {jar}). "
            f"Install it with: {INSTALL_EMULATOR}"
        )
    return str(jar)


def find_emulator() -> tuple[str, str]:
    """(java path, jar path), or MissingTool naming everything to install."""
    found: list[str] = []
    problems: list[str] = []
    for finder in (find_java, find_jar):
        try:
            found.append(finder())
        except MissingTool as exc:
            problems.append(str(exc))
    if problems:
        raise MissingTool("\n".join(problems))
    return found[0], found[1]


def java_version(java: str) -> str:
    """The first line of ``java -version``, or MissingTool if Java cannot run."""
    try:
        result = subprocess.run(
            [java, "-version"],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MissingTool(
            f"{java} does not run ({exc}). Install Java with: {INSTALL_JAVA}"
        ) from exc
    lines = (result.stderr or result.stdout).strip().splitlines()
    if result.returncode != 0 or not lines:
        raise MissingTool(f"{java} -version failed. Install Java with: {INSTALL_JAVA}")
    return lines[0]


def free_port() -> int:
    """A port free on 127.0.0.1 right now (another process may take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int) -> bool:
    """Whether something already listens on 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


class FirestoreEmulator:
    """A running emulator; ``.host`` is the value for FIRESTORE_EMULATOR_HOST."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        port: int,
        log_path: Path,
        log: IO[bytes],
        remove_log: bool,
    ) -> None:
        self._process = process
        self._log = log
        # A log under a default name is removed when stop() ends a live emulator,
        # so test runs do not pile up one file per port; a named log is kept.
        self._remove_log = remove_log
        self.port = port
        self.host = f"127.0.0.1:{port}"
        self.url = f"http://{self.host}"
        self.pid = process.pid
        self.log_path = log_path

    def poll(self) -> int | None:
        """The exit code if the Java process has ended, else None."""
        return self._process.poll()

    def wipe(self, project: str) -> None:
        """Delete every document of ``project`` in its (default) database."""
        path = f"/emulator/v1/projects/{project}/databases/(default)/documents"
        status = self._admin("DELETE", path)
        if status != 200:
            raise EmulatorError(f"Wiping {project} answered HTTP {status}.")

    def stop(self) -> None:
        """Shut down cleanly, then signal the process if it lingers. Idempotent."""
        atexit.unregister(self.stop)
        running = self._process.poll() is None
        if running:
            # Already going, or wedged: the signals below settle it either way.
            with contextlib.suppress(OSError, EmulatorError):
                self._admin("POST", "/shutdown")
            self._wait_or_signal()
        self._log.close()
        if running and self._remove_log:
            self.log_path.unlink(missing_ok=True)

    def _wait_or_signal(self) -> None:
        try:
            self._process.wait(timeout=SHUTDOWN_GRACE_SECONDS)
            return
        except subprocess.TimeoutExpired:
            self._process.terminate()
        try:
            self._process.wait(timeout=SHUTDOWN_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def _admin(self, method: str, path: str) -> int:
        request = urllib.request.Request(self.url + path, method=method)
        try:
            with urllib.request.urlopen(request, timeout=ADMIN_TIMEOUT_SECONDS) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except urllib.error.URLError as exc:
            raise EmulatorError(f"{method} {path}: {exc.reason}") from exc


def start(
    port: int | None = None,
    log_path: str | os.PathLike[str] | None = None,
    timeout: float = START_TIMEOUT_SECONDS,
) -> FirestoreEmulator:
    """Run the emulator on 127.0.0.1 and return once it answers ``GET /``."""
    java, jar = find_emulator()
    if port is None:
        port = free_port()
    elif port_in_use(port):
        # Otherwise the readiness check could be answered by whoever holds it.
        raise EmulatorError(f"Port {port} on 127.0.0.1 is already in use.")
    path = (
        Path(log_path) if log_path else REPO_ROOT / ".local" / f"firestore-{port}.log"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    # A file, never a pipe: unread, a pipe fills and the emulator hangs.
    log = path.open("wb")
    command = [
        java,
        "-cp",
        jar,
        MAIN_CLASS,
        "start",
        "--host=127.0.0.1",
        f"--port={port}",
    ]
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        # Its own session: a Ctrl-C meant for the caller must not kill it before
        # the caller has shut it down in order.
        start_new_session=True,
    )
    emulator = FirestoreEmulator(process, port, path, log, remove_log=not log_path)
    atexit.register(emulator.stop)
    try:
        _wait_ready(emulator, timeout)
    except BaseException:
        emulator._remove_log = False  # The error names it.
        emulator.stop()
        raise
    return emulator


def _wait_ready(emulator: FirestoreEmulator, timeout: float) -> None:
    # Poll plain HTTP only: a Firestore call made before the emulator is ready
    # leaves the client's gRPC channel in back-off for about 2 s.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = emulator.poll()
        if code is not None:
            raise EmulatorError(
                f"The Firestore emulator exited with code {code} while starting. "
                f"Log {emulator.log_path}:\n{log_tail(emulator.log_path)}"
            )
        try:
            with urllib.request.urlopen(emulator.url + "/", timeout=1) as resp:
                if resp.read().strip() == b"Ok":
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.1)
    raise EmulatorError(
        f"The Firestore emulator did not answer on {emulator.url} within "
        f"{timeout:.0f} s. Log {emulator.log_path}:\n{log_tail(emulator.log_path)}"
    )
