"""Hostile HTTP input at the edge (issue 3, "HTTP input"): methods, bodies, media
types and Authorization headers, each answered in the envelope with no Tiki call
and no Firestore access that the request did not need.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
from typing import Any

import pytest
from conftest import Api, Sim, assert_error, session_of, stored_documents

POST_FUNCTIONS = [
    "exchange_auth_code",
    "refresh_auth_token",
    "revoke_sessions",
    "delete_user",
]
SESSION_FUNCTIONS = [
    "refresh_auth_token",
    "lookup_user",
    "revoke_sessions",
    "delete_user",
]
METHOD_OF = {name: "POST" for name in POST_FUNCTIONS} | {"lookup_user": "GET"}
ALLOWED = {"POST": {"POST", "OPTIONS"}, "GET": {"GET", "HEAD", "OPTIONS"}}
OTHER_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "TRACE", "PROPFIND"]
ONE_MB = 1024 * 1024
JSON = "application/json"


def tiki_calls(simulator: Sim) -> int:
    return sum(simulator.stats()["calls"].values())


class CountingStream(io.BytesIO):
    """A request body that remembers how many bytes were taken from it."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.taken = 0

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self.taken += len(chunk)
        return chunk

    def readinto(self, buffer: Any) -> int:
        count = super().readinto(buffer)
        self.taken += count
        return count

    def readline(self, size: int | None = -1) -> bytes:
        line = super().readline(size)
        self.taken += len(line)
        return line


@pytest.fixture
def taken_by_function(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes of the body read when the function answered, before the framework
    drains the rest (functions-framework reads any unread body after the view)."""
    from auth import web

    seen: list[int] = []
    real = web.serve

    def serve(request: Any, endpoint: Any) -> Any:
        response = real(request, endpoint)
        seen.append(request.environ["wsgi.input"].taken)
        return response

    monkeypatch.setattr(web, "serve", serve)
    return seen


# --- methods -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "method"),
    [
        (target, method)
        for target, own in METHOD_OF.items()
        for method in OTHER_METHODS
        if method != own
    ],
)
def test_function_other_method_is_405_with_allow(
    api: Api, simulator: Sim, stub, backend, firestore_uses, target, method
):
    body = {"code": simulator.code(1)}

    response = api.call(target, method=method, json=body)

    assert_error(response, 405, "method_not_allowed")
    allow = {part.strip() for part in response.headers["Allow"].split(",")}
    assert allow == ALLOWED[METHOD_OF[target]]
    assert tiki_calls(simulator) == 0
    assert stub.stats()["access_calls"] == 0
    assert firestore_uses == []
    assert stored_documents(backend["GOOGLE_CLOUD_PROJECT"]) == []


@pytest.mark.parametrize("target", POST_FUNCTIONS)
def test_post_function_head_is_405_with_allow(api: Api, simulator: Sim, target):
    response = api.call(target, method="HEAD")

    assert response.status == 405
    assert response.body == b""
    assert {p.strip() for p in response.headers["Allow"].split(",")} == ALLOWED["POST"]
    assert response.headers["Cache-Control"] == "no-store"
    assert tiki_calls(simulator) == 0


def test_lookup_head_with_session_is_200_without_body(api: Api):
    token = session_of(api.login(1))

    response = api.call(
        "lookup_user", method="HEAD", headers={"Authorization": f"Bearer {token}"}
    )

    assert response.status == 200
    assert response.body == b""
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["Cache-Control"] == "no-store"


def test_lookup_head_without_session_is_401(api: Api, firestore_uses):
    response = api.call("lookup_user", method="HEAD")

    assert response.status == 401
    assert response.body == b""
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert firestore_uses == []


def test_router_unknown_path_is_404_envelope(api: Api, simulator: Sim):
    response = api.call("local_router", method="POST", path="/exchange", json={})

    assert_error(response, 404, "not_found")
    assert tiki_calls(simulator) == 0


def test_router_known_path_wrong_method_is_405(api: Api):
    response = api.call("local_router", method="GET", path="/exchange_auth_code")

    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


# --- exchange_auth_code bodies -------------------------------------------------

NESTED = b"[" * 8000 + b"]" * 8000
BAD_BODIES = {
    "empty": b"",
    "whitespace": b"  \r\n ",
    "null": b"null",
    "list": b"[]",
    "string": b'"abc"',
    "number": b"1",
    "true": b"true",
    "object_without_code": b"{}",
    "code_number": b'{"code": 123}',
    "code_empty": b'{"code": ""}',
    "code_null": b'{"code": null}',
    "code_list": b'{"code": ["abc.def"]}',
    "code_object": b'{"code": {"code": "abc.def"}}',
    "code_true": b'{"code": true}',
    "code_with_space": b'{"code": "abc def"}',
    "code_with_markup": b'{"code": "<script>x</script>"}',
    "code_not_ascii": '{"code": "\u00e1bc.def"}'.encode(),
    "code_with_newline": b'{"code": "abc\\ndef"}',
    "code_key_wrong_case": b'{"Code": "abc.def"}',
    "truncated": b'{"code": "abc.de',
    "trailing_garbage": b'{"code": "abc.def"} x',
    "single_quotes": b"{'code': 'abc.def'}",
    "invalid_utf8": b'{"code": "abc\xff\xfe.def"}',
    "utf16": '{"code": "abc.def"}'.encode("utf-16"),
    "deeply_nested": NESTED,
    "deeply_nested_beside_code": b'{"code": "abc.def", "x": '
    + b"[" * 5000
    + b"]" * 5000
    + b"}",
    "duplicate_code": b'{"code": "abc.def", "code": "ghi.jkl"}',
    "nan": b'{"code": "abc.def", "x": NaN}',
    "infinity": b'{"code": "abc.def", "x": -Infinity}',
    "code_10kb": b'{"code": "' + b"a" * 10 * 1024 + b'"}',
    "code_just_over_limit": b'{"code": "' + b"a" * 4097 + b'"}',
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_exchange_bad_body_is_400_without_work(
    api: Api, simulator: Sim, stub, backend, firestore_uses, body
):
    response = api.call("exchange_auth_code", data=body, content_type=JSON)

    assert_error(response, 400, "bad_request")
    assert tiki_calls(simulator) == 0
    assert stub.stats()["access_calls"] == 0
    assert firestore_uses == []
    assert stored_documents(backend["GOOGLE_CLOUD_PROJECT"]) == []


def test_exchange_code_at_length_limit_reaches_tiki(api: Api, simulator: Sim):
    body = {"code": "a" * 4096}

    response = api.call("exchange_auth_code", json=body)

    assert_error(response, 400, "invalid_code")
    assert simulator.stats()["calls"]["token"] == 1


def test_exchange_unknown_code_reaches_tiki_once(
    api: Api, simulator: Sim, backend, firestore_uses
):
    response = api.exchange("abc.def")

    assert_error(response, 400, "invalid_code")
    assert simulator.stats()["calls"] == {"token": 1, "refresh": 0, "me": 0}
    assert firestore_uses == []
    assert stored_documents(backend["GOOGLE_CLOUD_PROJECT"]) == []


def test_exchange_one_megabyte_body_is_413(
    api: Api, simulator: Sim, backend, firestore_uses
):
    body = b'{"code": "' + b"a" * ONE_MB + b'"}'

    response = api.call("exchange_auth_code", data=body, content_type=JSON)

    assert_error(response, 413, "payload_too_large")
    assert tiki_calls(simulator) == 0
    assert firestore_uses == []
    assert stored_documents(backend["GOOGLE_CLOUD_PROJECT"]) == []


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", None])
def test_exchange_large_content_length_is_413_before_reading(
    api: Api, taken_by_function, content_type
):
    stream = CountingStream(b'{"code": "' + b"a" * ONE_MB + b'"}')

    response = api.call(
        "exchange_auth_code", input_stream=stream, content_type=content_type
    )

    assert_error(response, 413, "payload_too_large")
    assert taken_by_function == [0]


def test_exchange_chunked_body_over_limit_is_413_after_reading_the_limit(
    api: Api, simulator: Sim, taken_by_function
):
    # Chunked: no Content-Length, so only reading can find the size; a server
    # that terminates the stream says so with wsgi.input_terminated.
    stream = CountingStream(b'{"code": "' + b"a" * ONE_MB + b'"}')

    response = api.call(
        "exchange_auth_code",
        input_stream=stream,
        content_type="application/json",
        headers={"Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )

    assert_error(response, 413, "payload_too_large")
    assert 0 < taken_by_function[0] <= 64 * 1024
    assert tiki_calls(simulator) == 0


def test_exchange_chunked_small_body_is_accepted(api: Api, simulator: Sim):
    stream = CountingStream(json.dumps({"code": simulator.code(1)}).encode())

    response = api.call(
        "exchange_auth_code",
        input_stream=stream,
        content_type="application/json",
        headers={"Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )

    assert response.status == 200, response.body
    assert response.data["user"]["customer_id"] == 1


@pytest.mark.parametrize("target", SESSION_FUNCTIONS)
def test_session_function_large_body_is_413_before_reading(
    api: Api, firestore_uses, taken_by_function, target
):
    stream = CountingStream(b"x" * ONE_MB)
    method = METHOD_OF[target]

    response = api.call(
        target, method=method, input_stream=stream, content_type="application/json"
    )

    assert_error(response, 413, "payload_too_large")
    assert taken_by_function == [0]
    assert firestore_uses == []


# --- exchange_auth_code media types --------------------------------------------

REFUSED_MEDIA = {
    "text_plain": "text/plain",
    "none": None,
    "form": "application/x-www-form-urlencoded",
    "multipart": "multipart/form-data; boundary=xyz",
    "json_latin1": "application/json; charset=latin-1",
    "json_suffix": "application/problem+json",
    "xml": "application/xml",
}


@pytest.mark.parametrize(
    "content_type", REFUSED_MEDIA.values(), ids=REFUSED_MEDIA.keys()
)
def test_exchange_refused_media_type_is_415(
    api: Api, simulator: Sim, backend, firestore_uses, content_type
):
    body = json.dumps({"code": simulator.code(1)}).encode()

    response = api.call("exchange_auth_code", data=body, content_type=content_type)

    assert_error(response, 415, "unsupported_media_type")
    assert tiki_calls(simulator) == 0
    assert firestore_uses == []
    assert stored_documents(backend["GOOGLE_CLOUD_PROJECT"]) == []


def test_exchange_form_field_code_is_415(api: Api, simulator: Sim):
    form = {"code": simulator.code(1)}

    response = api.call("exchange_auth_code", data=form)

    assert_error(response, 415, "unsupported_media_type")
    assert tiki_calls(simulator) == 0


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/json; charset=UTF-8",
        "Application/JSON",
    ],
)
def test_exchange_json_media_type_is_accepted(api: Api, simulator: Sim, content_type):
    body = json.dumps({"code": simulator.code(1)}, indent=2).encode()

    response = api.call("exchange_auth_code", data=body, content_type=content_type)

    assert response.status == 200, response.body
    assert response.data["user"]["customer_id"] == 1


# --- Authorization headers -----------------------------------------------------

REFUSED_AUTHORIZATION = {
    "missing": None,
    "empty": "",
    "bearer_alone": "Bearer",
    "bearer_space": "Bearer ",
    "no_scheme": "{token}",
    "no_space": "Bearer{token}",
    "basic": "Basic dXNlcjpwYXNzd29yZA==",
    "other_scheme": "Token {token}",
    "two_tokens": "Bearer {token} {token}",
    "comma_list": "Bearer {token}, Bearer {token}",
    "tab_inside_token": "Bearer {token}\tx",
    "quoted_token": 'Bearer "{token}"',
    "not_a_jwt": "Bearer abc",
    "token_in_basic": "Basic {token}",
    "not_ascii": "Bearer \u00e9{token}",
}


def _authorization(template: str | None, token: str) -> dict[str, str]:
    return {} if template is None else {"Authorization": template.format(token=token)}


@pytest.mark.parametrize(
    "template", REFUSED_AUTHORIZATION.values(), ids=REFUSED_AUTHORIZATION.keys()
)
@pytest.mark.parametrize("target", SESSION_FUNCTIONS)
def test_session_function_bad_authorization_is_401_without_work(
    api: Api, simulator: Sim, backend, firestore_uses, target, template
):
    token = session_of(api.login(1))
    calls_before = tiki_calls(simulator)
    documents_before = stored_documents(backend["GOOGLE_CLOUD_PROJECT"])
    firestore_uses.clear()

    response = api.call(
        target, method=METHOD_OF[target], headers=_authorization(template, token)
    )

    assert_error(response, 401, "unauthenticated")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert tiki_calls(simulator) == calls_before
    assert firestore_uses == []
    assert stored_documents(backend["GOOGLE_CLOUD_PROJECT"]) == documents_before


@pytest.mark.parametrize("target", SESSION_FUNCTIONS)
def test_session_function_two_authorization_headers_is_401(
    api: Api, backend, firestore_uses, target
):
    token = session_of(api.login(1))
    headers = [("Authorization", f"Bearer {token}")] * 2
    firestore_uses.clear()

    response = api.call(target, method=METHOD_OF[target], headers=headers)

    assert_error(response, 401, "unauthenticated")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert firestore_uses == []
    assert "tiki_users/1" in stored_documents(backend["GOOGLE_CLOUD_PROJECT"])


ACCEPTED_AUTHORIZATION = {
    "canonical": "Bearer {token}",
    # RFC 7235 section 2.1: the scheme is case-insensitive.
    "lower_case": "bearer {token}",
    "upper_case": "BEARER {token}",
    # RFC 6750 section 2.1: credentials = "Bearer" 1*SP b64token.
    "two_spaces": "Bearer  {token}",
}


@pytest.mark.parametrize(
    "template", ACCEPTED_AUTHORIZATION.values(), ids=ACCEPTED_AUTHORIZATION.keys()
)
@pytest.mark.parametrize("target", SESSION_FUNCTIONS)
def test_session_function_valid_authorization_is_accepted(
    api: Api, firestore_uses, target, template
):
    token = session_of(api.login(1))
    firestore_uses.clear()

    response = api.call(
        target, method=METHOD_OF[target], headers=_authorization(template, token)
    )

    assert response.status == 200, response.body
    assert response.error is None
    assert firestore_uses != []


def _raw_request(base: str, head: str, body: bytes) -> bytes:
    """Send a request by hand and return what arrives within two seconds."""
    host, port = base.removeprefix("http://").split(":")
    answer = b""
    with socket.create_connection((host, int(port)), timeout=2) as conn:
        conn.sendall(head.encode() + body)
        with contextlib.suppress(TimeoutError):
            while not _complete(answer):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                answer += chunk
    return answer


def _complete(answer: bytes) -> bool:
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return True


def test_exchange_declared_huge_body_is_answered_413_without_waiting_for_it(
    instance: str,
):
    head = (
        "POST /exchange_auth_code HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {ONE_MB}\r\n\r\n"
    )

    answer = _raw_request(instance, head, b"{")

    assert answer.startswith(b"HTTP/1.1 413"), answer[:80]
    assert b'"reason":"payload_too_large"' in answer


def test_session_function_declared_huge_body_is_answered_without_waiting(
    instance: str,
):
    head = (
        "POST /refresh_auth_token HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Length: {300 * ONE_MB}\r\n\r\n"
    )

    answer = _raw_request(instance, head, b"x" * 1024)

    assert answer.startswith(b"HTTP/1.1 413"), answer[:80]
