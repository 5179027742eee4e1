"""Firestore: ``tiki_users/{customer}`` and ``tiki_tokens/{customer}``.

Login bookkeeping uses server-side transforms (they never contend); the token
refresh takes a short lease guarded by the document's update time, so that of
many instances refreshing one customer exactly one calls Tiki, and a slow one
never overwrites newer tokens. A login writes the user record and its tokens
in one batch, and an erasure deletes both in one batch; a logout deletes the
tokens alone, on purpose.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from auth import log
from auth.config import Settings
from auth.errors import Internal, ReauthRequired, Unavailable

USERS = "tiki_users"
TOKENS = "tiki_tokens"
# Reads retry a refused connection for at most this long before answering 503.
READ_RETRY_SECONDS = 2.0
# Refreshed tokens are the only copy of a rotated refresh token: their write
# rides out a Firestore outage this long.
WRITE_RETRY_SECONDS = 10.0
WRITE_RETRY_PAUSE = 0.5

_client: Any = None
_client_key: tuple[str | None, ...] | None = None
_client_lock = threading.Lock()


@dataclass(frozen=True)
class UserRecord:
    customer_id: int | str
    name: str | None
    scopes: list[str]
    created_at: dt.datetime
    last_login_at: dt.datetime | None
    login_count: int
    # Changes on logout and when the record is deleted and made again.
    session_version: str


@dataclass(frozen=True)
class StoredTokens:
    sealed: bytes
    key_id: str
    expires_at: dt.datetime
    has_refresh_token: bool
    scopes: list[str]
    lease_owner: str | None
    lease_until: dt.datetime | None
    # The document's update time: the version that guards every later write.
    update_time: Any


def save_login(
    settings: Settings,
    key: str,
    customer_id: int | str,
    name: str | None,
    scopes: list[str],
    tokens: dict[str, Any],
) -> None:
    from google.cloud import firestore

    db = _db(settings)
    batch = db.batch()
    user = {
        "customer_id": customer_id,
        "name": name,
        "scopes": scopes,
        "last_login_at": firestore.SERVER_TIMESTAMP,
        "login_count": firestore.Increment(1),
    }
    batch.set(db.collection(USERS).document(key), user, merge=True)
    batch.set(db.collection(TOKENS).document(key), _token_fields(customer_id, tokens))
    with _guard(settings, "saving the login"):
        # Not retried: a commit that did land would count the login twice.
        batch.commit(timeout=settings.firestore_timeout, retry=None)


def get_user(settings: Settings, key: str) -> UserRecord | None:
    snapshot = _read(settings, USERS, key)
    if snapshot is None:
        return None
    data = snapshot.to_dict()
    counter = data.get("session_version", 0)
    return UserRecord(
        customer_id=data.get("customer_id", key),
        name=data.get("name"),
        scopes=list(data.get("scopes") or []),
        created_at=snapshot.create_time,
        last_login_at=data.get("last_login_at"),
        login_count=int(data.get("login_count", 0)),
        session_version=f"{_micros(snapshot.create_time)}.{counter}",
    )


def get_tokens(settings: Settings, key: str) -> StoredTokens | None:
    snapshot = _read(settings, TOKENS, key)
    if snapshot is None:
        return None
    return _tokens(snapshot.to_dict(), snapshot.update_time)


def take_lease(
    settings: Settings, key: str, seen: StoredTokens, owner: str, seconds: float
) -> StoredTokens | None:
    """Mark the tokens as being refreshed by ``owner``; None if they changed."""
    until = _now() + dt.timedelta(seconds=seconds)
    result = _write_if_unchanged(
        settings, key, seen.update_time, {"lease_owner": owner, "lease_until": until}
    )
    if result is None:
        return None
    return StoredTokens(
        seen.sealed,
        seen.key_id,
        seen.expires_at,
        seen.has_refresh_token,
        seen.scopes,
        owner,
        until,
        result.update_time,
    )


def store_refreshed(
    settings: Settings, key: str, leased: StoredTokens, tokens: dict[str, Any]
) -> bool:
    """Write refreshed tokens unless someone wrote since our lease was taken.

    Tiki may have retired the old refresh token, so this write is retried
    through a short outage; retrying is safe because it is guarded: an attempt
    that did land makes the next one fail its precondition, not write twice.
    """
    fields = _token_fields(None, tokens)
    del fields["customer_id"]
    deadline = time.monotonic() + WRITE_RETRY_SECONDS
    while True:
        try:
            return (
                _write_if_unchanged(settings, key, leased.update_time, fields)
                is not None
            )
        except Unavailable:
            if time.monotonic() + WRITE_RETRY_PAUSE >= deadline:
                raise
            log.warning("Retrying the write of refreshed tokens.", customer=key)
            time.sleep(WRITE_RETRY_PAUSE)


def write_if_unchanged(
    settings: Settings, key: str, seen: StoredTokens, tokens: dict[str, Any]
) -> bool:
    """One guarded write of tokens; False if they changed or Firestore failed."""
    fields = _token_fields(None, tokens)
    del fields["customer_id"]
    try:
        return _write_if_unchanged(settings, key, seen.update_time, fields) is not None
    except Unavailable:
        return False


def release_lease(settings: Settings, key: str, leased: StoredTokens) -> None:
    with contextlib.suppress(Unavailable):
        _write_if_unchanged(
            settings,
            key,
            leased.update_time,
            {"lease_owner": None, "lease_until": None},
        )


def drop_tokens(settings: Settings, key: str, leased: StoredTokens) -> bool:
    """Forget tokens Tiki no longer honours; False if newer ones arrived meanwhile."""
    from google.api_core import exceptions as gexc

    db = _db(settings)
    ref = db.collection(TOKENS).document(key)
    option = db.write_option(last_update_time=leased.update_time)
    try:
        with _guard(settings, "dropping dead tokens"):
            ref.delete(option=option, timeout=settings.firestore_timeout, retry=None)
    except (gexc.FailedPrecondition, gexc.NotFound):
        return False
    return True


def revoke_sessions(settings: Settings, key: str) -> None:
    """Bump the session version (ending every session) and drop the tokens."""
    from google.api_core import exceptions as gexc
    from google.cloud import firestore

    db = _db(settings)
    batch = db.batch()
    batch.update(
        db.collection(USERS).document(key), {"session_version": firestore.Increment(1)}
    )
    batch.delete(db.collection(TOKENS).document(key))
    try:
        with _guard(settings, "revoking sessions"):
            batch.commit(timeout=settings.firestore_timeout, retry=None)
    except gexc.NotFound:
        raise ReauthRequired(log="The user record is gone.") from None


def delete_user(settings: Settings, key: str) -> None:
    db = _db(settings)
    batch = db.batch()
    batch.delete(db.collection(USERS).document(key))
    batch.delete(db.collection(TOKENS).document(key))
    with _guard(settings, "deleting the user"):
        batch.commit(timeout=settings.firestore_timeout, retry=None)


def _token_fields(
    customer_id: int | str | None, tokens: dict[str, Any]
) -> dict[str, Any]:
    from google.cloud import firestore

    return {
        "customer_id": customer_id,
        "sealed": tokens["sealed"],
        "key_id": tokens["key_id"],
        "expires_at": tokens["expires_at"],
        "has_refresh_token": tokens["has_refresh_token"],
        "scopes": tokens["scopes"],
        "updated_at": firestore.SERVER_TIMESTAMP,
        "lease_owner": None,
        "lease_until": None,
    }


def _tokens(data: dict[str, Any], update_time: Any) -> StoredTokens:
    return StoredTokens(
        sealed=bytes(data["sealed"]),
        key_id=str(data["key_id"]),
        expires_at=data["expires_at"],
        has_refresh_token=bool(data.get("has_refresh_token")),
        scopes=list(data.get("scopes") or []),
        lease_owner=data.get("lease_owner"),
        lease_until=data.get("lease_until"),
        update_time=update_time,
    )


def _read(settings: Settings, collection: str, key: str) -> Any:
    from google.api_core import exceptions as gexc
    from google.api_core.retry import Retry, if_exception_type

    retry = Retry(
        predicate=if_exception_type(gexc.ServiceUnavailable),
        initial=0.1,
        maximum=0.5,
        timeout=min(READ_RETRY_SECONDS, settings.firestore_timeout),
    )
    ref = _db(settings).collection(collection).document(key)
    with _guard(settings, f"reading {collection}"):
        snapshot = ref.get(timeout=settings.firestore_timeout, retry=retry)
    return snapshot if snapshot.exists else None


def _write_if_unchanged(
    settings: Settings, key: str, update_time: Any, fields: dict[str, Any]
) -> Any:
    from google.api_core import exceptions as gexc

    db = _db(settings)
    ref = db.collection(TOKENS).document(key)
    option = db.write_option(last_update_time=update_time)
    try:
        with _guard(settings, "updating tokens"):
            return ref.update(
                fields, option=option, timeout=settings.firestore_timeout, retry=None
            )
    except (gexc.FailedPrecondition, gexc.NotFound):
        return None


@contextlib.contextmanager
def _guard(settings: Settings, what: str) -> Iterator[None]:
    """Firestore failures become 503; precondition answers pass through."""
    from google.api_core import exceptions as gexc

    client = _client
    try:
        yield
    except (gexc.FailedPrecondition, gexc.NotFound):
        raise
    except (gexc.PermissionDenied, gexc.Unauthenticated) as exc:
        raise Internal(
            log=f"Firestore refused access while {what}: grant the function's "
            "service account roles/datastore.user."
        ) from exc
    except Exception as exc:
        _drop_client(client)
        log.warning(f"Firestore failed while {what}.", error=type(exc).__name__)
        raise Unavailable(log=f"Firestore failed while {what}.") from exc


def _db(settings: Settings) -> Any:
    global _client, _client_key
    key = (
        settings.project,
        settings.database,
        os.environ.get("FIRESTORE_EMULATOR_HOST"),
    )
    with _client_lock:
        if _client is None or _client_key != key:
            from google.cloud import firestore

            _client = firestore.Client(
                project=settings.project, database=settings.database
            )
            _client_key = key
        return _client


def _drop_client(failed: Any) -> None:
    # A gRPC channel that failed backs off for seconds to minutes before trying
    # again; a new client reconnects at once when Firestore is back. The old
    # one is not closed (other threads may be mid-call on it), only forgotten,
    # and only if no other thread has replaced it already.
    global _client
    with _client_lock:
        if _client is failed:
            _client = None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _micros(moment: dt.datetime) -> int:
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (moment - epoch) // dt.timedelta(microseconds=1)
