"""What each function does, between the HTTP edge (``auth.web``) and Tiki/Firestore."""

from __future__ import annotations

import datetime as dt
import secrets as _random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from auth import log, sessions, store, vault
from auth.config import Settings
from auth.errors import (
    InvalidCode,
    ReauthRequired,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
)
from auth.secrets import Secret, client_secret, session_secret, session_secret_version
from auth.store import StoredTokens, UserRecord

if TYPE_CHECKING:
    from auth.tiki import TikiClient, TikiTokens

T = TypeVar("T")

# How long one instance may hold the refresh lease before another may take it:
# longer than the slowest Tiki call (see _lease_seconds), short enough that a
# crashed instance does not block the customer for long.
LEASE_MARGIN_SECONDS = 5.0
# How often a caller waiting on another instance's refresh looks again.
LEASE_POLL_SECONDS = 0.1


def exchange(settings: Settings, code: str) -> dict[str, Any]:
    from auth.tiki import customer_key

    # Both secrets first, and this session secret used to the end: once Tiki
    # has the code it is spent, so nothing that can fail for lack of a secret
    # (a cache expiring mid-request) may come after the exchange.
    current = session_secret(settings)
    tokens, customer = _with_client_secret(
        settings, "exchange", lambda tiki: tiki.exchange(code)
    )
    key = customer_key(customer.id)
    log.bind(customer=key)  # web.serve resets the log context after the request
    store.save_login(
        settings,
        key,
        customer.id,
        customer.name,
        list(tokens.scopes),
        _sealed(current, key, tokens, None),
    )
    user = store.get_user(settings, key)
    if user is None:  # deleted between our write and this read
        raise ReauthRequired(log="The user record vanished right after login.")
    log.info("Customer logged in.", customer=key, login_count=user.login_count)
    return _session_response(settings, current, key, user, tokens.access_token)


def refresh(settings: Settings, token: str) -> dict[str, Any]:
    session, user = _renewable_session(settings, token)
    # Read once and used to the end: after Tiki rotates the refresh token,
    # nothing may fail for lack of a secret before the new one is stored.
    current = session_secret(settings)
    stored = store.get_tokens(settings, session.customer_key)
    if stored is None:
        raise ReauthRequired(log="No Tiki tokens are stored for this customer.")
    if not stored.has_refresh_token:
        raise ReauthRequired(
            "This login has no refresh token: ask for the 'offline' scope in "
            "my.getAuthCode and log in again."
        )
    if not _due(settings, stored):
        tokens = _open(settings, session.customer_key, stored)
        _reseal_if_old(settings, current, session.customer_key, stored, tokens)
        access = tokens["access_token"]
    else:
        access = _refresh_once(settings, current, session, stored)
        # Logout or erasure may have come while Tiki answered: check again.
        user = _current_user(settings, session)
    return _session_response(settings, current, session.customer_key, user, access)


def lookup(settings: Settings, token: str) -> dict[str, Any]:
    session = sessions.verify(settings, token)
    user = _current_user(settings, session)
    return {"user": _user_json(user)}


def revoke(settings: Settings, token: str) -> dict[str, Any]:
    session, _ = _renewable_session(settings, token)
    store.revoke_sessions(settings, session.customer_key)
    log.info("Sessions revoked.", customer=session.customer_key)
    return {"revoked": True}


def delete(settings: Settings, token: str) -> dict[str, Any]:
    session, _ = _renewable_session(settings, token)
    store.delete_user(settings, session.customer_key)
    log.info("User record and tokens deleted.", customer=session.customer_key)
    return {"deleted": True}


def _renewable_session(
    settings: Settings, token: str
) -> tuple[sessions.Session, UserRecord]:
    """The session and its user, accepting a session expired within the window.

    Whatever can still be refreshed may also log out or erase: a frontend
    holding only an expired session must not have to renew it first.
    """
    session = sessions.verify(
        settings, token, refresh_window=settings.session_refresh_window
    )
    return session, _current_user(settings, session)


def _current_user(settings: Settings, session: sessions.Session) -> UserRecord:
    log.bind(customer=session.customer_key)
    user = store.get_user(settings, session.customer_key)
    if user is None:
        raise ReauthRequired(log="No user record for this session (deleted).")
    if user.session_version != session.session_version:
        raise ReauthRequired(log="Session is from before a logout or an erasure.")
    return user


def _reseal_if_old(
    settings: Settings,
    current: Secret,
    key: str,
    stored: StoredTokens,
    tokens: dict[str, str],
) -> None:
    """Seal tokens again under the newest session-secret version after a rotation.

    Guarded like every token write: if anything changed meanwhile, the newer
    write wins and this one is dropped.
    """
    # Forward only: an instance whose cache still holds the older version
    # must not seal tokens back under it.
    newer = stored.key_id.isdigit() and int(current.version) > int(stored.key_id)
    if not newer or stored.lease_owner is not None:
        return
    resealed = _sealed_values(current, key, tokens, stored, stored.expires_at)
    # Opportunistic: one try, and a failure costs nothing but the next try.
    if store.write_if_unchanged(settings, key, stored, resealed):
        log.info(
            "Stored Tiki tokens sealed under the newest key.", key_id=current.version
        )


def _refresh_once(
    settings: Settings,
    current: Secret,
    session: sessions.Session,
    first: StoredTokens,
) -> str:
    """A fresh Tiki access token for ``key``, with one Tiki call across instances.

    The caller that takes the lease refreshes; the others wait for its result
    and take the tokens it stored, even when those are already inside the
    leeway again (short-lived tokens): only tokens that are actually expired
    justify a second call. If the refresh they waited for failed, they fail
    too instead of each calling Tiki in turn. Every write is guarded by the
    update time seen, so a slow instance whose lease lapsed cannot overwrite
    newer tokens.
    """
    key = session.customer_key
    owner = _random.token_hex(8)
    waited = False
    lease = _lease_seconds(settings)
    deadline = time.monotonic() + lease + LEASE_MARGIN_SECONDS
    while time.monotonic() < deadline:
        stored = store.get_tokens(settings, key)
        if stored is None or not stored.has_refresh_token:
            raise ReauthRequired(log="Tokens were dropped while refreshing.")
        renewed = stored.sealed != first.sealed and not _expired(stored)
        if renewed or not _due(settings, stored):
            return _open(settings, key, stored)["access_token"]
        if _leased_by_other(stored, owner):
            waited = True
            time.sleep(LEASE_POLL_SECONDS)
            continue
        if waited and stored.lease_owner is None:
            # Released without new tokens: that refresh failed (Tiki down or
            # slow). A lease that merely lapsed (a crash) is taken over below.
            raise Unavailable(log="Another instance's token refresh just failed.")
        # A logout or erasure may have happened while we waited. Everything
        # that can fail without Tiki is done before the lease is taken.
        _current_user(settings, session)
        old = _open(settings, key, stored)
        client_secret(settings)
        leased = store.take_lease(settings, key, stored, owner, lease)
        if leased is None:
            continue  # someone else wrote first; look again
        access = _refresh_leased(settings, current, key, leased, old)
        if access is not None:
            return access
    last = store.get_tokens(settings, key)
    if last is not None and last.sealed != first.sealed and not _expired(last):
        return _open(settings, key, last)["access_token"]
    raise Unavailable(log="Gave up waiting for another instance's token refresh.")


def _refresh_leased(
    settings: Settings,
    current: Secret,
    key: str,
    leased: StoredTokens,
    old: dict[str, str],
) -> str | None:
    from auth.tiki import RotatedButUnusable

    def late(tokens: TikiTokens) -> None:
        # Tiki answered after we gave up: store what it sent, unless anything
        # was written since our lease (the write is guarded like the others).
        sealed = _sealed(current, key, tokens, old["refresh_token"])
        if store.store_refreshed(settings, key, leased, sealed):
            log.info("Stored a late Tiki refresh answer.", customer=key)

    try:
        fresh = _with_client_secret(
            settings,
            "refresh",
            lambda tiki: tiki.refresh(old["refresh_token"], late=late),
        )
    except ReauthRequired:
        if not store.drop_tokens(settings, key, leased):
            # Our lease lapsed and another instance stored newer tokens while
            # Tiki refused the refresh token it had already rotated: use those.
            return None
        raise
    except RotatedButUnusable as exc:
        # Keep the new refresh token (the old one may be spent), due at once.
        kept = {"access_token": old["access_token"], "refresh_token": exc.refresh_token}
        store.store_refreshed(
            settings, key, leased, _sealed_values(current, key, kept, leased, _now())
        )
        raise
    except UpstreamTimeout as exc:
        # While Tiki may still answer (and rotate), nobody else may refresh
        # with the old token: keep the lease until that answer is stored or
        # the lease lapses.
        if not exc.may_complete:
            store.release_lease(settings, key, leased)
        raise
    except Exception:
        store.release_lease(settings, key, leased)
        raise
    # Tiki may or may not rotate the refresh token: keep whichever is newest.
    sealed = _sealed(current, key, fresh, old["refresh_token"])
    try:
        written = store.store_refreshed(settings, key, leased, sealed)
    except Exception:
        store.release_lease(settings, key, leased)
        raise
    if not written:
        log.info("Tokens changed during our refresh; using the newer ones.")
        return None
    log.info("Tiki token refreshed.", customer=key)
    return fresh.access_token


def _with_client_secret(
    settings: Settings, what: str, call: Callable[[TikiClient], T]
) -> T:
    """Run a Tiki call; on invalid_signature reload the client secret once and retry.

    The retry is safe for the single-use auth code too: Tiki authenticates the
    signature headers before it reads the body, so a request refused with
    invalid_signature never consumed the code (the simulator models the same).
    """
    from auth.tiki import TikiClient, TikiRefused

    secret = client_secret(settings)
    for attempt in (1, 2):
        try:
            return call(TikiClient(settings, secret.value))
        except TikiRefused as exc:
            log.bind(tiki_request_id=exc.request_id)
            if exc.tiki_reason == "invalid_signature":
                reloaded = (
                    client_secret(settings, refused=secret) if attempt == 1 else secret
                )
                if reloaded != secret:
                    log.warning(
                        f"Tiki refused the {what} signature; retrying "
                        "with the rotated client secret."
                    )
                    secret = reloaded
                    continue
                raise UpstreamError(log=_signature_advice(settings, what)) from exc
            raise _mapped(exc, what) from exc
    raise AssertionError("unreachable")


def _mapped(exc: Exception, what: str) -> Exception:
    reason = getattr(exc, "tiki_reason", "")
    if what == "exchange" and reason == "invalid_code":
        return InvalidCode(log="Tiki refused the code: invalid_code.")
    if what == "refresh" and reason in ("invalid_token", "invalid_refresh_token"):
        return ReauthRequired(log=f"Tiki refused the refresh token: {reason}.")
    return UpstreamError(log=f"Tiki refused the {what}: {reason}.")


def _signature_advice(settings: Settings, what: str) -> str:
    return (
        f"Tiki refused the {what}: invalid_signature (check TIKI_CLIENT_ID and that "
        f"the client secret is the one for {settings.tiki_base_url}: sandbox and "
        "production keys differ; also check this server's clock)."
    )


def _due(settings: Settings, stored: StoredTokens) -> bool:
    margin = dt.timedelta(seconds=settings.refresh_leeway)
    return stored.expires_at - margin <= dt.datetime.now(dt.UTC)


def _lease_seconds(settings: Settings) -> float:
    from auth.secrets import ACCESS_TIMEOUT_SECONDS
    from auth.tiki import total_seconds

    # Two whole Tiki calls (a signature refusal is retried once), the client
    # secret's reload between them, and a margin.
    tiki = 2 * total_seconds(settings) + ACCESS_TIMEOUT_SECONDS
    return tiki + LEASE_MARGIN_SECONDS


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _expired(stored: StoredTokens) -> bool:
    return stored.expires_at <= dt.datetime.now(dt.UTC)


def _leased_by_other(stored: StoredTokens, owner: str) -> bool:
    if stored.lease_owner in (None, owner) or stored.lease_until is None:
        return False
    return stored.lease_until > dt.datetime.now(dt.UTC)


def _sealed(
    secret: Secret, key: str, tokens: TikiTokens, previous_refresh: str | None
) -> dict[str, Any]:
    refresh_token = tokens.refresh_token or previous_refresh
    expires_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=tokens.expires_in)
    return {
        "sealed": vault.seal(
            secret,
            key,
            {"access_token": tokens.access_token, "refresh_token": refresh_token},
        ),
        "key_id": secret.version,
        "expires_at": expires_at,
        "has_refresh_token": refresh_token is not None,
        "scopes": list(tokens.scopes),
    }


def _sealed_values(
    secret: Secret,
    key: str,
    tokens: dict[str, str],
    stored: StoredTokens,
    expires_at: dt.datetime,
) -> dict[str, Any]:
    """Tokens sealed again under ``secret``, keeping what else was stored."""
    return {
        "sealed": vault.seal(secret, key, dict(tokens)),
        "key_id": secret.version,
        "expires_at": expires_at,
        "has_refresh_token": stored.has_refresh_token,
        "scopes": stored.scopes,
    }


def _open(settings: Settings, key: str, stored: StoredTokens) -> dict[str, str]:
    secret = session_secret_version(settings, stored.key_id)
    try:
        if secret is None:
            raise vault.Unsealable(f"key version {stored.key_id} is unusable")
        return vault.open_sealed(secret, key, stored.sealed)
    except vault.Unsealable as exc:
        raise ReauthRequired(
            log=f"Stored Tiki tokens cannot be opened: {exc}."
        ) from exc


def _session_response(
    settings: Settings,
    current: Secret,
    key: str,
    user: UserRecord,
    tiki_access_token: str,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "session_token": sessions.issue(settings, current, key, user.session_version),
        "token_type": "Bearer",
        "expires_in": settings.session_ttl,
        "user": _user_json(user),
    }
    if settings.expose_tiki_access_token:
        body["tiki_access_token"] = tiki_access_token
    return body


def _user_json(user: UserRecord) -> dict[str, Any]:
    return {
        "customer_id": user.customer_id,
        "name": user.name,
        "scopes": user.scopes,
        "created_at": _iso(user.created_at),
        "last_login_at": _iso(user.last_login_at),
        "login_count": user.login_count,
    }


def _iso(moment: dt.datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
