"""The client secret and the session secret, from Secret Manager or the environment.

Values are cached per instance for ``SECRET_CACHE_SECONDS`` (minutes), so a
rotation reaches running instances without a redeploy and a request does not
call Secret Manager. A value never reaches a log line, a response or Firestore.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from auth import log
from auth.config import Settings
from auth.errors import Internal, Unavailable

# Secret Manager is in the request path only on a cache miss; a slow one should
# fail the request quickly rather than hold it.
ACCESS_TIMEOUT_SECONDS = 5.0
# The key id given to a secret read from the environment (local development).
# Secret Manager numbers versions from 1, so "0" never names a real version.
ENV_VERSION = "0"
# A session token may name any earlier version; cap how many we keep at once.
MAX_CACHED_VERSIONS = 32

_RESOURCE = re.compile(r"(projects/[^/]+/secrets/[^/]+)/versions/([^/]+)")


@dataclass(frozen=True)
class Secret:
    value: str = field(repr=False)
    # The Secret Manager version number that holds it (the key id), as text.
    version: str


class VersionUnusable(Exception):
    """That version is missing, disabled or destroyed."""


# At most one forced reload of the session secret per this many seconds.
RELOAD_SECONDS = 1.0

_cache: dict[tuple[str, str], tuple[float, Secret | None]] = {}
_fetch_locks: dict[tuple[str, str], threading.Lock] = {}
_last_reload = -RELOAD_SECONDS
_lock = threading.Lock()
_client: Any = None
_client_host: str | None = None


def client_secret(settings: Settings, *, refused: Secret | None = None) -> Secret:
    """Tini Console's client secret for TIKI_CLIENT_ID.

    With ``refused`` (Tiki just refused a signature made with it) the cache is
    bypassed unless it already holds another value: of many requests refused
    at once after a rotation, the first reloads and the others take its value.
    """
    return _current(
        settings,
        settings.client_secret_resource,
        settings.client_secret_env,
        "TIKI_CLIENT_SECRET",
        refused,
    )


def session_secret(settings: Settings) -> Secret:
    """The newest session secret: signs new sessions and seals stored tokens."""
    return _current(
        settings,
        settings.session_secret_resource,
        settings.session_secret_env,
        "SESSION_SECRET",
        None,
    )


def session_secret_at_least(settings: Settings, version: int) -> Secret:
    """The newest session secret, reloaded if another instance has seen a newer one.

    After a rotation, instances learn the new version at different times; a
    session signed with it must not fail on an instance whose cache lags. The
    reload is limited to one per RELOAD_SECONDS, so forged key ids cannot make
    an instance call Secret Manager on every request.
    """
    current = session_secret(settings)
    resource = settings.session_secret_resource
    if resource is None or version <= int(current.version):
        return current
    global _last_reload
    now = time.monotonic()
    if now - _last_reload < RELOAD_SECONDS:
        return current
    _last_reload = now
    base, pinned = _split(resource, "SESSION_SECRET_RESOURCE")
    try:
        return _cached(settings, base, pinned, None, force=True)
    except VersionUnusable as exc:
        raise Unavailable(log=f"{resource} cannot be read: {exc}.") from exc


def session_secret_version(settings: Settings, version: str) -> Secret | None:
    """An earlier (or the current) session secret by version; None if unusable.

    The caller has checked that ``version`` is a plain number no newer than the
    current version, so a forged key id cannot make us look up arbitrary names.
    """
    current = session_secret(settings)
    if version == current.version:
        return current
    if settings.session_secret_resource is None:
        return None
    base = _split(settings.session_secret_resource, "SESSION_SECRET_RESOURCE")[0]
    try:
        return _cached(settings, base, version, None)
    except VersionUnusable:
        return None


def clear_cache() -> None:
    global _last_reload
    with _lock:
        _cache.clear()
        _last_reload = -RELOAD_SECONDS


def _current(
    settings: Settings,
    resource: str | None,
    env_value: str | None,
    env_name: str,
    refused: Secret | None,
) -> Secret:
    if resource:
        base, version = _split(resource, f"{env_name}_RESOURCE")
        try:
            secret = _cached(settings, base, version, refused)
        except VersionUnusable as exc:
            raise Unavailable(
                log=f"{resource} cannot be read: {exc} (add or enable a version)."
            ) from exc
        assert secret is not None
        return secret
    if env_value:
        return Secret(_clean(env_value.encode(), env_name), ENV_VERSION)
    raise Internal(
        log=f"Neither {env_name}_RESOURCE nor {env_name} (local only) is set."
    )


def _split(resource: str, variable: str) -> tuple[str, str]:
    match = _RESOURCE.fullmatch(resource.strip())
    if not match:
        raise Internal(
            log=f"{variable} must look like projects/P/secrets/S/versions/latest."
        )
    return match.group(1), match.group(2)


def _cached(
    settings: Settings,
    base: str,
    version: str,
    refused: Secret | None,
    *,
    force: bool = False,
) -> Secret:
    key = (base, version)
    asked_at = time.monotonic()
    hit = _usable_hit(settings, key, refused, force, asked_at)
    if hit is not None:
        return hit
    # One fetch per name at a time, and none under the global lock: a slow
    # Secret Manager holds up only the requests that need that very secret.
    with _fetch_lock(key):
        # Another thread may have fetched it while we waited for the lock.
        with _lock:
            fetched = _cache.get(key)
        if fetched and fetched[0] >= asked_at and fetched[1] is not None:
            return fetched[1]
        now = time.monotonic()
        try:
            secret = _access(settings, f"{base}/versions/{version}")
        except VersionUnusable:
            # A session's old key id may stay refused for the cache's life;
            # the current secret is asked again next time, so an operator's
            # quick fix (re-enabling a version) is seen at once.
            if version != "latest":
                _remember(key, now, None)
            raise
        _remember(key, now, secret)
        if version == "latest":
            # The same value also answers for its own number (a session's kid).
            _remember((base, secret.version), now, secret)
        return secret


def _usable_hit(
    settings: Settings,
    key: tuple[str, str],
    refused: Secret | None,
    force: bool,
    now: float,
) -> Secret | None:
    with _lock:
        hit = _cache.get(key)
    if hit is None or force:
        return None
    if refused is not None:
        usable = hit[1] != refused
    else:
        usable = now - hit[0] < settings.secret_cache_seconds
    if not usable:
        return None
    if hit[1] is None:
        raise VersionUnusable("not usable (cached answer)")
    return hit[1]


def _fetch_lock(key: tuple[str, str]) -> threading.Lock:
    with _lock:
        return _fetch_locks.setdefault(key, threading.Lock())


def _remember(key: tuple[str, str], now: float, secret: Secret | None) -> None:
    with _lock:
        _remember_locked(key, now, secret)


def _remember_locked(key: tuple[str, str], now: float, secret: Secret | None) -> None:
    if len(_cache) >= MAX_CACHED_VERSIONS and key not in _cache:
        oldest = min(_cache, key=lambda k: _cache[k][0])
        del _cache[oldest]
    _cache[key] = (now, secret)


def _access(settings: Settings, name: str) -> Secret:
    from google.api_core import exceptions as gexc

    try:
        response = _secret_client(settings).access_secret_version(
            name=name, timeout=ACCESS_TIMEOUT_SECONDS, retry=None
        )
    # Over REST PermissionDenied and Unauthenticated arrive as these bases.
    except (gexc.Forbidden, gexc.Unauthorized) as exc:
        raise Unavailable(
            log=f"Secret Manager refused access to {name}: grant the function's "
            "service account roles/secretmanager.secretAccessor on it."
        ) from exc
    # A disabled or destroyed version is FAILED_PRECONDITION over gRPC; over REST
    # the client raises it as a plain BadRequest (HTTP 400), its base class. Any
    # other refusal of this one name (4xx but rate limits) is the same to us.
    except gexc.ClientError as exc:
        if isinstance(exc, gexc.TooManyRequests):
            raise Unavailable(log=f"Secret Manager is rate-limiting {name}.") from exc
        state = (
            "missing"
            if isinstance(exc, gexc.NotFound)
            else "disabled, destroyed or not a valid name"
        )
        log.warning(f"Secret Manager: {name} is {state}.", resource=name)
        raise VersionUnusable(state) from exc
    except Exception as exc:  # transport failures arrive in several types
        raise Unavailable(
            log=f"Secret Manager unreachable reading {name}: {type(exc).__name__}."
        ) from exc
    payload = response.payload
    _check_crc(payload, name)
    version = response.name.rsplit("/", 1)[-1]
    if not version.isdigit():
        # Secret Manager always names the version it served; a stand-in that
        # does not is taken to serve the version asked for (or the first).
        requested = name.rsplit("/", 1)[-1]
        version = requested if requested.isdigit() else "1"
        log.warning(f"Secret Manager answered {name} without its version number.")
    return Secret(_clean(payload.data, name), version)


def _check_crc(payload: Any, name: str) -> None:
    # The client library does not verify the checksum it is given; we do.
    import google_crc32c

    if "data_crc32c" not in payload:
        return
    if google_crc32c.value(payload.data) != payload.data_crc32c:
        raise Unavailable(log=f"Secret Manager payload of {name} failed its checksum.")


def _clean(data: bytes, name: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Unavailable(log=f"The secret in {name} is not UTF-8 text.") from exc
    # `gcloud secrets versions add --data-file` keeps an editor's final newline.
    text = text.rstrip("\r\n")
    if not text:
        raise Unavailable(log=f"The secret in {name} is empty.")
    return text


def _secret_client(settings: Settings) -> Any:
    global _client, _client_host
    if _client is None or _client_host != settings.secret_manager_host:
        from google.cloud import secretmanager

        if settings.secret_manager_host:
            from google.auth.credentials import AnonymousCredentials

            _client = secretmanager.SecretManagerServiceClient(
                transport="rest",
                credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
                client_options={
                    "api_endpoint": f"http://{settings.secret_manager_host}"
                },
            )
        else:
            _client = secretmanager.SecretManagerServiceClient()
        _client_host = settings.secret_manager_host
    return _client
