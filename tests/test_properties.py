"""Hypothesis against one running instance (functions-framework on gunicorn):
whatever the method, headers and body, the answer is no 500, an envelope that
matches openapi.yaml for its status, with ``Cache-Control: no-store``.

The examples are derandomized, so CI runs the same ~150 requests every time.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from conftest import (
    LEDGER,
    ORIGIN,
    Sim,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_openapi import CONTRACT

from auth import web

TIMEOUT = (2.0, 15.0)  # connect, read: a Tiki round trip is well under a second
PATHS = [f"/{name}" for name in web.ENDPOINTS]
EXCHANGE_PATH = f"/{web.EXCHANGE.name}"
SESSION_PATHS = [p for p in PATHS if p != EXCHANGE_PATH]
ENDING_PATHS = {f"/{web.REVOKE.name}", f"/{web.DELETE.name}"}
RETRYABLE_5XX = {502, 503, 504}
REAL = "<real session>"  # stands for the live session token in a drawn header

# Content types the document accepts for a login body, and ones it refuses (415).
JSON_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "application/json;charset=UTF-8",
    "Application/JSON",
]
NON_JSON_TYPES = [
    None,
    "",
    "text/plain",
    "text/json",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=xyz",
    "application/problem+json",
    "application/json; charset=latin-1",
    "application/json; charset=utf-16",
]

_VISIBLE = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
# A header value as requests sends it: printable ASCII, no leading space.
_PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
_FIELD_TEXT = st.tuples(_VISIBLE, st.text(_PRINTABLE, max_size=60)).map("".join)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


_JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=16)
)
_JSON = st.recursive(
    _JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_CLAIMS = st.fixed_dictionaries(
    {},
    optional={
        "aud": st.sampled_from(["client", "", ["client"], []]) | st.text(max_size=8),
        "sub": st.sampled_from(["1", "0", "../1", 1]) | st.text(max_size=8),
        "exp": st.integers(-(2**40), 2**40) | st.floats(allow_nan=False),
        "iat": st.integers(0, 2**40),
        "nbf": st.integers(0, 2**40),
        "iss": st.just("tiniapp-auth"),
        "sv": st.text(max_size=8),
        "jti": st.text(max_size=8),
    },
)
_JWT_HEADER = st.fixed_dictionaries(
    {
        "alg": st.sampled_from(["HS256", "none", "NONE", "HS512", "RS256", "", None]),
    },
    optional={
        "kid": st.sampled_from(
            ["1", "0", "2", "999999999", 1, "../1", "projects/p/secrets/s", ""]
        ),
        "typ": st.just("JWT"),
        "crit": st.just(["exp"]),
    },
)


@st.composite
def _forged_jwt(draw: st.DrawFn) -> str:
    header = draw(_JWT_HEADER | _JSON)
    claims = draw(_CLAIMS | _JSON)
    signature = draw(st.binary(max_size=40))
    parts = [json.dumps(header).encode(), json.dumps(claims).encode(), signature]
    return ".".join(_b64(part) for part in parts)


_SCHEMES = st.sampled_from(["Bearer ", "bearer ", "BEARER ", "Bearer  ", "Basic ", ""])
AUTHORIZATIONS = st.one_of(
    st.none(),
    st.sampled_from(["", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Bearer a.b.c, d"]),
    st.tuples(_SCHEMES, st.just(REAL)).map("".join),
    st.tuples(_SCHEMES, _forged_jwt()).map("".join),
    st.tuples(_SCHEMES, st.text(_VISIBLE, max_size=60)).map("".join),
    _FIELD_TEXT,
)
CONTENT_TYPES = st.one_of(
    st.sampled_from(JSON_TYPES),
    st.sampled_from(JSON_TYPES),
    st.sampled_from(NON_JSON_TYPES),
    _FIELD_TEXT,
)
_AUTH_CODE_LIKE = st.from_regex(r"[A-Za-z0-9._~+/=-]{1,80}", fullmatch=True)
# The edges of the document's code schema, each a likely slip on either side.
_EDGE_CODES = st.sampled_from(
    [
        "a~b.c-d_e",
        "+/=",
        ".",
        "a" * web.MAX_CODE_CHARS,
        "a" * (web.MAX_CODE_CHARS + 1),
        "abc\n",
        " abc",
        "abc ",
        "a b",
        "caf\u00e9",
        "a\u0000b",
        "a%2Eb",
        "",
    ]
)
_CODES = st.one_of(
    _AUTH_CODE_LIKE,
    _EDGE_CODES,
    st.text(max_size=40),
    _JSON_SCALARS,
)
CODE_BODIES = st.builds(
    lambda code, extra, ascii_only: json.dumps(
        {**extra, "code": code}, ensure_ascii=ascii_only
    ).encode(),
    _CODES,
    st.dictionaries(st.text(max_size=6), _JSON_SCALARS, max_size=2),
    st.booleans(),
)
BODIES = st.one_of(
    st.just(b""),
    st.binary(max_size=200),
    _JSON.map(lambda value: json.dumps(value).encode()),
    CODE_BODIES,
    st.sampled_from(
        [
            b'{"code": "a", "code": "b"}',
            b'{"code": NaN}',
            b"Infinity",
            b'\xef\xbb\xbf{"code": "a"}',
            b'{"code": "\xff"}',
            b'{"code": "a"',
            b"[" * 8000 + b"]" * 8000,
            b'{"code": "\\ud800"}',
        ]
    ),
    st.integers(web.MAX_BODY_BYTES + 1, web.MAX_BODY_BYTES + 4096).map(
        lambda size: b'{"code": "' + b"a" * size + b'"}'
    ),
)
LISTED_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
ODD_METHODS = st.from_regex(r"[A-Z]{3,10}", fullmatch=True).filter(
    lambda method: method != "CONNECT"  # its request line is host:port, not a path
)


@dataclass(frozen=True)
class Drawn:
    method: str
    path: str
    query: str
    content_type: str | None
    authorization: str | None
    origin: str | None
    body: bytes
    chunked: bool


@st.composite
def drawn_requests(draw: st.DrawFn) -> Drawn:
    """Mostly the function's own method and a login-shaped body, so most draws
    get past the method check and reach the body, the token and Tiki."""
    path = draw(st.sampled_from([EXCHANGE_PATH, *PATHS]))
    kind = draw(st.sampled_from(["own"] * 5 + ["listed"] * 2 + ["odd"]))
    if kind == "own":
        method = web.ENDPOINTS[path[1:]].method
    elif kind == "listed":
        method = draw(st.sampled_from(LISTED_METHODS))
    else:
        method = draw(ODD_METHODS)
    login = path == EXCHANGE_PATH
    body = draw(st.one_of(CODE_BODIES, BODIES) if login else BODIES)
    return Drawn(
        method=method,
        path=path,
        query=draw(st.sampled_from(["", "", "?code=abc", "?a=1&a=2"])),
        content_type=draw(CONTENT_TYPES if login else st.none() | CONTENT_TYPES),
        authorization=draw(AUTHORIZATIONS),
        origin=draw(st.sampled_from([None, ORIGIN, ORIGIN + "/", "https://x.example"])),
        body=body,
        chunked=draw(st.sampled_from([False, False, False, True])),
    )


@st.composite
def login_requests(draw: st.DrawFn) -> Drawn:
    """A JSON login, where the body alone decides between bad_request and Tiki."""
    return Drawn(
        method="POST",
        path=EXCHANGE_PATH,
        query="",
        content_type=draw(st.sampled_from(JSON_TYPES)),
        authorization=draw(st.none() | AUTHORIZATIONS),
        origin=draw(st.sampled_from([None, ORIGIN])),
        body=draw(st.one_of(CODE_BODIES, CODE_BODIES, BODIES)),
        chunked=draw(st.sampled_from([False, False, False, True])),
    )


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    session = requests.Session()
    session.trust_env = False  # loopback only; no proxy from the environment
    yield session
    session.close()


class Login:
    """A live session on the instance, renewed after a logout or an erasure."""

    def __init__(self, url: str, http: requests.Session, simulator: Sim) -> None:
        self.url, self.http, self.simulator = url, http, simulator
        self._token: str | None = None

    def token(self) -> str:
        if self._token is None:
            body = {"code": self.simulator.code(3)}
            response = self.http.post(
                f"{self.url}{EXCHANGE_PATH}", json=body, timeout=TIMEOUT
            )
            assert response.status_code == 200, response.text
            LEDGER.responses.append((False, response.text))
            self._token = str(response.json()["data"]["session_token"])
            LEDGER.secrets.add(self._token)
        return self._token

    def spent(self) -> None:
        self._token = None


@pytest.fixture
def login(
    backend: dict[str, str], instance: str, http: requests.Session, simulator: Sim
) -> Login:
    # ``backend`` first: it wipes Firestore and resets the simulator.
    return Login(instance, http, simulator)


def _send(
    url: str, http: requests.Session, drawn: Drawn, token: str
) -> requests.Response:
    headers: dict[str, str] = {}
    if drawn.content_type is not None:
        headers["Content-Type"] = drawn.content_type
    if drawn.authorization is not None:
        headers["Authorization"] = drawn.authorization.replace(REAL, token)
    if drawn.origin is not None:
        headers["Origin"] = drawn.origin
    body: Any = drawn.body
    if drawn.chunked and body:
        body = iter([drawn.body])  # no Content-Length: Transfer-Encoding: chunked
    return http.request(
        drawn.method,
        f"{url}{drawn.path}{drawn.query}",
        data=body,
        headers=headers,
        timeout=TIMEOUT,
        allow_redirects=False,
    )


def _strict_json(raw: bytes) -> tuple[bool, Any]:
    """RFC 8259 JSON with unique member names (as the document asks), or nothing."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({key for key, _ in pairs}) != len(pairs):
            raise ValueError("duplicate member")
        return dict(pairs)

    def no_constant(name: str) -> Any:
        raise ValueError(name)

    try:
        text = raw.decode("utf-8")
        value = json.loads(text, object_pairs_hook=unique, parse_constant=no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False, None
    return True, value


def _check_login_body_rule(drawn: Drawn, status: int, reason: str | None) -> None:
    """The document's request body decides what a login refuses as bad_request."""
    if drawn.method != "POST" or drawn.path != EXCHANGE_PATH:
        return
    # A declared length over the limit is refused first; a chunked body is
    # refused on its type, else once the limit is read.
    oversized = len(drawn.body) > web.MAX_BODY_BYTES
    if oversized and not drawn.chunked:
        assert status == 413
        return
    if drawn.content_type in NON_JSON_TYPES:
        assert status == 415, "a non-JSON content type must be refused"
        return
    if drawn.content_type not in JSON_TYPES:
        return
    if oversized:
        assert status == 413
        return
    parsed, value = _strict_json(drawn.body)
    if not parsed:
        assert reason == "bad_request"
        return
    fits = CONTRACT.validator("/components/schemas/AuthCodeRequest").is_valid(value)
    event(f"login body the document {'accepts' if fits else 'refuses'}")
    if fits:
        assert reason != "bad_request", "a body the document accepts was refused"
    else:
        assert reason == "bad_request", "a body the document refuses was accepted"


def _check(drawn: Drawn, response: requests.Response, real: bool) -> None:
    status, body = response.status_code, response.content
    method = drawn.method

    assert status < 500 or status in RETRYABLE_5XX, body[:300]
    assert response.headers.get("Cache-Control") == "no-store"
    CONTRACT.check(method, drawn.path, status, response.headers, body)
    allowed = drawn.origin is not None and drawn.origin.rstrip("/") == ORIGIN
    assert ("Access-Control-Allow-Origin" in response.headers) == allowed
    assert "Origin" in response.headers.get("Vary", "")
    if method == "OPTIONS":
        assert status == 204
        return
    if method not in web.ENDPOINTS[drawn.path[1:]].allow:
        assert status == 405
    if method == "HEAD":
        return
    envelope = response.json()
    reason = envelope["error"]["reason"] if envelope["error"] else None
    if envelope["error"] is not None:
        assert envelope["error"]["code"] == status
    if drawn.path in SESSION_PATHS and status == 200:
        assert real, "a request without the real session token was answered 200"
    _check_login_body_rule(drawn, status, reason)


PROPERTY_SETTINGS = settings(
    deadline=None,
    derandomize=True,  # the same examples on every run, so CI is repeatable
    database=None,
    # The function-scoped fixtures only reset shared state once per test; the
    # instance they talk to is the module's.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@settings(PROPERTY_SETTINGS, max_examples=150)
@given(drawn=drawn_requests())
def test_properties_any_request_gets_a_documented_envelope(
    drawn: Drawn, login: Login, instance: str, http: requests.Session
):
    _request_and_check(drawn, login, instance, http)


@settings(PROPERTY_SETTINGS, max_examples=100)
@given(drawn=login_requests())
def test_properties_login_body_is_judged_as_the_document_says(
    drawn: Drawn, login: Login, instance: str, http: requests.Session
):
    _request_and_check(drawn, login, instance, http)


def _request_and_check(
    drawn: Drawn, login: Login, instance: str, http: requests.Session
) -> None:
    real = drawn.authorization is not None and REAL in drawn.authorization
    token = login.token() if real else ""

    response = _send(instance, http, drawn, token)

    LEDGER.responses.append((False, response.text))
    _check(drawn, response, real)
    envelope = response.json() if response.content else {}
    if (envelope.get("data") or {}).get("session_token"):
        LEDGER.secrets.add(envelope["data"]["session_token"])
    # Shown by --hypothesis-show-statistics: which answers the draws reached.
    error = envelope.get("error") or {}
    event(f"{drawn.path} {response.status_code} {error.get('reason', '')}")
    ended = response.status_code == 200 and drawn.path in ENDING_PATHS
    if real and (response.status_code == 401 or ended):
        login.spent()  # logged out or erased: the next real draw logs in again
