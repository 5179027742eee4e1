"""Settings read from the environment, as SPEC Part 2 "Configuration" lists them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from auth.errors import Internal

PRODUCTION_BASE_URL = "https://api.tiki.vn/tiniapp-open-api"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


@dataclass(frozen=True)
class Settings:
    client_id: str
    client_secret_resource: str | None
    client_secret_env: str | None
    session_secret_resource: str | None
    session_secret_env: str | None
    tiki_base_url: str
    project: str | None
    database: str
    allowed_origins: tuple[str, ...]
    session_ttl: int
    expose_tiki_access_token: bool
    refresh_leeway: int
    session_refresh_window: int
    secret_cache_seconds: int
    tiki_connect_timeout: float
    tiki_read_timeout: float
    firestore_timeout: float
    secret_manager_host: str | None


def load(env: Mapping[str, str] | None = None) -> Settings:
    """Read and check the settings; a bad value is the operator's, so it is logged."""
    env = os.environ if env is None else env
    client_id = env.get("TIKI_CLIENT_ID", "").strip()
    if not client_id:
        raise Internal(
            log="TIKI_CLIENT_ID is not set: give the client key from Tini Console."
        )
    return Settings(
        client_id=client_id,
        client_secret_resource=env.get("TIKI_CLIENT_SECRET_RESOURCE") or None,
        client_secret_env=env.get("TIKI_CLIENT_SECRET") or None,
        session_secret_resource=env.get("SESSION_SECRET_RESOURCE") or None,
        session_secret_env=env.get("SESSION_SECRET") or None,
        tiki_base_url=(env.get("TIKI_BASE_URL") or PRODUCTION_BASE_URL).rstrip("/"),
        project=env.get("GOOGLE_CLOUD_PROJECT") or env.get("GCLOUD_PROJECT") or None,
        database=env.get("FIRESTORE_DATABASE") or "(default)",
        allowed_origins=allowed_origins(env),
        session_ttl=_int(env, "SESSION_TTL_SECONDS", 3600, 30, 7 * 86400),
        expose_tiki_access_token=_bool(env, "EXPOSE_TIKI_ACCESS_TOKEN"),
        refresh_leeway=_int(env, "TIKI_REFRESH_LEEWAY_SECONDS", 300, 0, 86400),
        session_refresh_window=_int(
            env, "SESSION_REFRESH_WINDOW_SECONDS", 7 * 86400, 0, 90 * 86400
        ),
        secret_cache_seconds=_int(env, "SECRET_CACHE_SECONDS", 300, 0, 3600),
        tiki_connect_timeout=_float(env, "TIKI_CONNECT_TIMEOUT_SECONDS", 3.05),
        tiki_read_timeout=_float(env, "TIKI_READ_TIMEOUT_SECONDS", 10.0),
        firestore_timeout=_float(env, "FIRESTORE_TIMEOUT_SECONDS", 5.0),
        secret_manager_host=env.get("SECRET_MANAGER_EMULATOR_HOST") or None,
    )


def allowed_origins(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """ALLOWED_ORIGINS alone: CORS headers need it even when other settings are bad."""
    env = os.environ if env is None else env
    raw = env.get("ALLOWED_ORIGINS", "")
    return tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise Internal(
            log=f"{name}={raw!r} is not a whole number from {low} to {high}."
        )
    return int(raw)


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 120:
        raise Internal(log=f"{name}={raw!r} is not a number of seconds from 0 to 120.")
    return value


def _bool(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise Internal(log=f"{name}={raw!r} is not true or false.")
