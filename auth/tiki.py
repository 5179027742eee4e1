"""The Tiki OAuth client: signed POSTs to /oauth/auth/token, .../refresh and /oauth/me.

Every call serialises its body once, signs those bytes and sends those bytes
(SPEC Part 1, "Request signing"). Tiki's status codes are undocumented and its
own sample backend reads the body, so the envelope decides, not the status.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeGuard

import requests
import urllib3.exceptions as u3

from auth import log, signing
from auth.config import Settings
from auth.errors import Unavailable, UpstreamError, UpstreamTimeout

# Tiki answers in well under a second; past these the customer is better served
# by a clear 504 than by a spinner. Connect is short so a retry fits.
MAX_RESPONSE_BYTES = 256 * 1024
# A connection refused before anything was sent is retried once after this pause.
CONNECT_RETRY_PAUSE = 0.2

_CUSTOMER_ID = re.compile(r"[1-9][0-9]{0,18}")
_INT64_MAX = 2**63 - 1
_MAX_TOKEN_CHARS = 8192
# The reasons the backend acts on (SPEC Part 1); others are upstream faults.
KNOWN_REASONS = frozenset({"invalid_code", "invalid_token", "invalid_signature"})
# No token Tiki issues lives for years; a larger lifetime is a malformed answer.
_MAX_EXPIRES_IN = 10 * 366 * 86400

# Calls to Tiki in flight at once per instance (each on a worker thread).
MAX_CONCURRENT_CALLS = 32

_session: requests.Session | None = None
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_create_lock = threading.Lock()


class TikiRefused(UpstreamError):
    """Tiki answered with an error envelope; ``tiki_reason`` says which."""

    def __init__(self, tiki_reason: str, request_id: str | None, log: str) -> None:
        self.tiki_reason = tiki_reason
        self.request_id = request_id
        super().__init__(log=log)


@dataclass(frozen=True)
class TikiTokens:
    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    expires_in: int
    scopes: tuple[str, ...]


@dataclass(frozen=True)
class TikiCustomer:
    id: int | str
    name: str | None


def customer_key(value: object) -> str:
    """The document id for a Tiki customer id: its decimal string, or a 502.

    ``1`` and ``"1"`` are the same customer (Tiki's payment APIs send strings);
    anything but a plain positive integer must never become a document path.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 < value <= _INT64_MAX:
            return str(value)
    elif (
        isinstance(value, str)
        and _CUSTOMER_ID.fullmatch(value)
        and int(value) <= _INT64_MAX
    ):
        return value
    raise UpstreamError(log="Tiki sent a customer id that is not a positive integer.")


class RotatedButUnusable(UpstreamError):
    """Tiki's refresh answer is unusable, yet carries a new refresh token.

    Tiki may already have retired the old refresh token, so the new one must be
    kept even though this refresh failed.
    """

    def __init__(self, refresh_token: str, log: str | None) -> None:
        self.refresh_token = refresh_token
        super().__init__(log=log)


def total_seconds(settings: Settings) -> float:
    """The longest one Tiki call may take: two connects, the pause, the answer."""
    connects = 2 * settings.tiki_connect_timeout + CONNECT_RETRY_PAUSE
    return connects + settings.tiki_read_timeout


class TikiClient:
    def __init__(self, settings: Settings, client_secret: str) -> None:
        self._settings = settings
        self._secret = client_secret

    def exchange(self, code: str) -> tuple[TikiTokens, TikiCustomer]:
        payload, status = self._call("/oauth/auth/token", {"code": code}, "exchange")
        data = _unwrap(payload, status, "exchange")
        customer = data.get("customer")
        if not isinstance(customer, dict):
            raise UpstreamError(log="Tiki's exchange answer has no customer.")
        customer_key(customer.get("id"))
        name = customer.get("name")
        if name is not None and not isinstance(name, str):
            raise UpstreamError(log="Tiki's exchange answer has a non-text name.")
        return _tokens(data, "exchange"), TikiCustomer(customer["id"], name)

    def refresh(
        self,
        refresh_token: str,
        late: Callable[[TikiTokens], None] | None = None,
    ) -> TikiTokens:
        """New tokens for ``refresh_token``.

        ``late`` receives the tokens if the call is abandoned at its deadline
        and Tiki answers after all: Tiki may have rotated the refresh token,
        and that answer is then the only copy of the new one.
        """

        def arrived(payload: object, status: int) -> None:
            if late is not None:
                late(_tokens(_unwrap(payload, status, "refresh"), "refresh"))

        payload, status = self._call(
            "/oauth/auth/token/refresh",
            {"refresh_token": refresh_token},
            "refresh",
            arrived,
        )
        try:
            return _tokens(_unwrap(payload, status, "refresh"), "refresh")
        except TikiRefused:
            raise
        except (UpstreamError, Unavailable, UpstreamTimeout) as exc:
            rotated = _refresh_token_in(payload)
            if rotated is None or rotated == refresh_token:
                raise
            raise RotatedButUnusable(rotated, exc.log) from exc

    def me(self, access_token: str) -> TikiCustomer:
        payload, status = self._call("/oauth/me", {"access_token": access_token}, "me")
        data = _unwrap(payload, status, "me")
        customer_key(data.get("customer_id"))
        name = data.get("customer_name")
        return TikiCustomer(
            data["customer_id"], name if isinstance(name, str) else None
        )

    def _call(
        self,
        path: str,
        body: dict[str, str],
        what: str,
        late: Callable[[object, int], None] | None = None,
    ) -> tuple[object, int]:
        """The parsed answer and its HTTP status, within ``total_seconds``.

        requests' timeouts bound each socket read, not the whole answer: a Tiki
        that drips its headers or body would outlast them (and the refresh
        lease). The call runs on a worker thread and is abandoned at the
        deadline; the worker ends on its own read timeouts.
        """
        deadline = total_seconds(self._settings)
        run = contextvars.copy_context().run
        future = _workers().submit(run, self._round_trip, path, body, what)
        try:
            return future.result(timeout=deadline)
        except concurrent.futures.TimeoutError:
            pass
        timeout = UpstreamTimeout(log=f"Tiki {what}: no whole answer in time.")
        if not future.cancel():  # already under way: Tiki may still answer
            timeout.may_complete = True
            if late is not None:
                future.add_done_callback(lambda done: _deliver_late(done, late, what))
        raise timeout

    def _round_trip(
        self, path: str, body: dict[str, str], what: str
    ) -> tuple[object, int]:
        content = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
        url = self._settings.tiki_base_url + path
        response = self._post(url, content.encode(), content, what)
        # The body gets the read timeout as a whole, however it trickles in.
        body_deadline = time.monotonic() + self._settings.tiki_read_timeout
        try:
            payload = _read_json(response, body_deadline)
        finally:
            response.close()
        return payload, response.status_code

    def _post(self, url: str, raw: bytes, content: str, what: str) -> requests.Response:
        timeout = (
            self._settings.tiki_connect_timeout,
            self._settings.tiki_read_timeout,
        )
        for attempt in (1, 2):
            # A fresh timestamp per attempt: Tiki refuses stale ones.
            headers = signing.headers(self._settings.client_id, self._secret, content)
            headers["Content-Type"] = "application/json"
            try:
                # Never follow a redirect: it would carry the code and a valid
                # signature to whatever address the Location header names.
                return _http().post(
                    url,
                    data=raw,
                    headers=headers,
                    timeout=timeout,
                    stream=True,
                    allow_redirects=False,
                )
            except requests.exceptions.ConnectTimeout as exc:
                failure: Exception = exc
            except requests.exceptions.ReadTimeout as exc:
                raise UpstreamTimeout(log=f"Tiki {what}: no answer in time.") from exc
            except requests.exceptions.ConnectionError as exc:
                if not _never_sent(exc):
                    # The request may have reached Tiki: an auth code is
                    # single-use, so it is never sent twice.
                    raise UpstreamError(
                        log=f"Tiki {what}: connection broke mid-request."
                    ) from exc
                failure = exc
            log.warning(
                f"Tiki {what}: could not connect (attempt {attempt} of 2).",
                error=type(failure).__name__,
            )
            if attempt == 1:
                time.sleep(CONNECT_RETRY_PAUSE)
        if isinstance(failure, requests.exceptions.ConnectTimeout):
            raise UpstreamTimeout(log=f"Tiki {what}: connect timed out.") from failure
        raise Unavailable(
            log=f"Tiki {what}: cannot connect to {self._settings.tiki_base_url}."
        ) from failure


def _deliver_late(
    done: concurrent.futures.Future[tuple[object, int]],
    late: Callable[[object, int], None],
    what: str,
) -> None:
    try:
        late(*done.result())
    except Exception as exc:  # noqa: BLE001 - nobody is waiting to hear of it
        log.info(
            f"Tiki {what}: the late answer was not usable.", error=type(exc).__name__
        )


def _workers() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _create_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=MAX_CONCURRENT_CALLS, thread_name_prefix="tiki"
            )
        return _pool


def _http() -> requests.Session:
    global _session
    with _create_lock:
        if _session is None:
            _session = requests.Session()
            _session.trust_env = False
        return _session


def _never_sent(exc: requests.exceptions.ConnectionError) -> bool:
    """True when the failure happened while connecting, before any byte was sent."""
    cause: BaseException | None = exc.args[0] if exc.args else None
    if isinstance(cause, u3.MaxRetryError):
        cause = cause.reason
    return isinstance(cause, (u3.NewConnectionError, u3.ConnectTimeoutError))


def _read_json(response: requests.Response, deadline: float) -> object:
    chunks: list[bytes] = []
    size = 0
    try:
        # read1 returns whatever one socket read brings, so a Tiki that drips
        # its answer byte by byte still meets the deadline check below.
        while chunk := response.raw.read1(16384, decode_content=True):
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                raise UpstreamError(log="Tiki's answer is larger than expected.")
            if time.monotonic() > deadline:
                raise UpstreamTimeout(log="Tiki's answer arrived too slowly.")
            chunks.append(chunk)
    except (requests.exceptions.Timeout, u3.ReadTimeoutError) as exc:
        raise UpstreamTimeout(log="Tiki stopped answering mid-response.") from exc
    except (requests.exceptions.RequestException, u3.HTTPError, OSError) as exc:
        raise UpstreamError(log="Tiki's answer was cut off.") from exc
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError):
        return None


def _unwrap(payload: object, status: int, what: str) -> dict[str, Any]:
    """The ``data`` of a success envelope; every other shape is an error."""
    if not isinstance(payload, dict):
        return _bad_status_or(
            status, f"Tiki {what}: HTTP {status}, not a JSON envelope."
        )
    error, data = payload.get("error"), payload.get("data")
    reason = error.get("reason") if isinstance(error, dict) else None
    if status >= 500 and reason not in KNOWN_REASONS:
        # Tiki's own "try later" (503, 504) stays retryable; but a reason we
        # act on is honoured whatever the status (Tiki's sample reads the body).
        _bad_status_or(status, f"Tiki {what}: HTTP {status}.")
    if error is not None:
        if not isinstance(reason, str):
            return _bad_status_or(status, f"Tiki {what}: malformed error envelope.")
        metadata = payload.get("metadata") or error.get("metadata") or {}
        request_id = metadata.get("request_id") if isinstance(metadata, dict) else None
        reason = reason[:64]
        raise TikiRefused(
            reason,
            str(request_id)[:128] if request_id is not None else None,
            f"Tiki refused the {what}: {reason} (HTTP {status}).",
        )
    # NOTE: a success without an "error" member is still read as a success when
    # its "data" is whole: Tiki's own sample backend reads only "error" and
    # "data", and refusing would lock every customer out if Tiki omits it.
    if not isinstance(data, dict):
        return _bad_status_or(status, f"Tiki {what}: envelope without data.")
    if not 200 <= status < 300:
        return _bad_status_or(status, f"Tiki {what}: data with HTTP {status}.")
    return data


def _bad_status_or(status: int, message: str) -> NoReturn:
    if status == 503:
        raise Unavailable(log=message)
    if status == 504:
        raise UpstreamTimeout(log=message)
    raise UpstreamError(log=message)


def _tokens(data: dict[str, Any], what: str) -> TikiTokens:
    access, refresh = data.get("access_token"), data.get("refresh_token") or None
    expires_in, scopes = _seconds(data.get("expires_in")), data.get("scopes") or []
    if isinstance(scopes, str):  # OAuth 2.0's own form: space-separated
        scopes = scopes.split()
    if not _is_token(access):
        raise UpstreamError(log=f"Tiki's {what} answer has no usable access_token.")
    if refresh is not None and not _is_token(refresh):
        raise UpstreamError(log=f"Tiki's {what} answer has a malformed refresh_token.")
    if (
        isinstance(expires_in, bool)
        or not isinstance(expires_in, int)
        or not 0 <= expires_in <= _MAX_EXPIRES_IN
    ):
        raise UpstreamError(log=f"Tiki's {what} answer has no usable expires_in.")
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise UpstreamError(log=f"Tiki's {what} answer has malformed scopes.")
    return TikiTokens(access, refresh, expires_in, tuple(scopes))


def _seconds(value: object) -> object:
    """A lifetime as Tiki may spell it: 3600, "3600" or 3600.0 (else unchanged)."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _refresh_token_in(payload: object) -> str | None:
    data = payload.get("data") if isinstance(payload, dict) else None
    token = data.get("refresh_token") if isinstance(data, dict) else None
    return token if _is_token(token) else None


def _is_token(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and 0 < len(value) <= _MAX_TOKEN_CHARS
