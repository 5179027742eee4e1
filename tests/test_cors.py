"""CORS (issue 3, "CORS"): origins come from ALLOWED_ORIGINS (the harness allows
ORIGIN); a preflight does no work; every answer to an allowed origin, errors
included, carries the allow-origin header, and every answer varies on Origin.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import ORIGIN, Api, Response, Sim, session_of, stored_documents

METHOD_OF = {
    "exchange_auth_code": "POST",
    "refresh_auth_token": "POST",
    "lookup_user": "GET",
    "revoke_sessions": "POST",
    "delete_user": "POST",
}
FOREIGN_ORIGINS = {
    "other_site": "https://evil.example.test",
    "null": "null",
    "suffix": "https://app.example.test.evil.example.test",
    "prefix": "https://evil-app.example.test",
    "http_scheme": "http://app.example.test",
    "other_port": "https://app.example.test:8443",
    "wildcard": "*",
}


def preflight(
    api: Api,
    target: str,
    origin: str,
    extra: dict[str, str] | None = None,
    **kwargs: Any,
) -> Response:
    headers = {
        "Origin": origin,
        "Access-Control-Request-Method": METHOD_OF[target],
        "Access-Control-Request-Headers": "authorization, content-type",
        **(extra or {}),
    }
    return api.call(target, method="OPTIONS", headers=headers, **kwargs)


def listed(value: str | None) -> set[str]:
    return {part.strip().lower() for part in (value or "").split(",") if part.strip()}


def assert_allowed(response: Response, origin: str = ORIGIN) -> None:
    assert response.headers.get("Access-Control-Allow-Origin") == origin
    assert "origin" in listed(", ".join(response.headers.getlist("Vary")))


# --- preflight -----------------------------------------------------------------


@pytest.mark.parametrize("target", METHOD_OF)
def test_preflight_allowed_origin_is_204_with_grants(api: Api, target):
    response = preflight(api, target, ORIGIN)

    assert response.status == 204
    assert response.body == b""
    assert_allowed(response)
    assert METHOD_OF[target].lower() in listed(
        response.headers.get("Access-Control-Allow-Methods")
    )
    assert {"authorization", "content-type"} <= listed(
        response.headers.get("Access-Control-Allow-Headers")
    )
    assert int(response.headers["Access-Control-Max-Age"]) > 0


@pytest.mark.parametrize("target", METHOD_OF)
def test_preflight_grants_no_method_the_function_refuses(api: Api, target):
    response = preflight(api, target, ORIGIN)

    methods = listed(response.headers.get("Access-Control-Allow-Methods"))
    assert methods <= {METHOD_OF[target].lower(), "head", "options"}
    assert not {"put", "patch", "delete"} & methods


@pytest.mark.parametrize("target", METHOD_OF)
def test_preflight_does_no_work(
    api: Api, simulator: Sim, stub, backend, firestore_uses, target
):
    code = simulator.code(1)

    response = preflight(
        api,
        target,
        ORIGIN,
        {"Authorization": "Bearer abc.def.ghi"},
        json={"code": code},
    )

    assert response.status == 204
    assert sum(simulator.stats()["calls"].values()) == 0
    assert firestore_uses == []
    assert stub.stats()["access_calls"] == 0
    assert stored_documents(backend["GOOGLE_CLOUD_PROJECT"]) == []
    assert api.exchange(code).status == 200


@pytest.mark.parametrize("origin", FOREIGN_ORIGINS.values(), ids=FOREIGN_ORIGINS.keys())
@pytest.mark.parametrize("target", ["exchange_auth_code", "lookup_user"])
def test_preflight_foreign_origin_gets_no_allow_origin(
    api: Api, simulator: Sim, firestore_uses, target, origin
):
    response = preflight(api, target, origin)

    assert "Access-Control-Allow-Origin" not in response.headers
    assert "Access-Control-Allow-Credentials" not in response.headers
    assert "origin" in listed(response.headers.get("Vary"))
    assert sum(simulator.stats()["calls"].values()) == 0
    assert firestore_uses == []


def test_preflight_without_allowed_origins_configured_grants_nothing(
    api: Api, monkeypatch
):
    monkeypatch.delenv("ALLOWED_ORIGINS")

    response = preflight(api, "exchange_auth_code", ORIGIN)

    assert "Access-Control-Allow-Origin" not in response.headers


def test_preflight_echoes_only_the_requesting_origin_of_several(api: Api, monkeypatch):
    second = "https://admin.example.test"
    monkeypatch.setenv("ALLOWED_ORIGINS", f"{ORIGIN}, {second}")

    response = preflight(api, "lookup_user", second)

    assert_allowed(response, second)


# --- actual requests -----------------------------------------------------------


def test_cors_success_to_allowed_origin_has_allow_origin(api: Api, simulator: Sim):
    code = simulator.code(1)

    response = api.exchange(code, headers={"Origin": ORIGIN})

    assert response.status == 200
    assert_allowed(response)


def test_cors_success_to_foreign_origin_has_no_allow_origin(api: Api, simulator: Sim):
    code = simulator.code(1)

    response = api.exchange(code, headers={"Origin": "https://evil.example.test"})

    assert response.status == 200
    assert "Access-Control-Allow-Origin" not in response.headers
    assert "origin" in listed(response.headers.get("Vary"))


def test_cors_response_without_origin_still_varies_on_origin(api: Api, simulator: Sim):
    response = api.exchange(simulator.code(1))

    assert response.status == 200
    assert "Access-Control-Allow-Origin" not in response.headers
    assert "origin" in listed(response.headers.get("Vary"))


ERRORS = {
    "bad_request": (400, dict(target="exchange_auth_code", json={})),
    "invalid_code": (400, dict(target="exchange_auth_code", json={"code": "abc.def"})),
    "unauthenticated": (401, dict(target="lookup_user", method="GET")),
    "method_not_allowed": (405, dict(target="exchange_auth_code", method="PUT")),
    "payload_too_large": (
        413,
        dict(
            target="exchange_auth_code",
            data=b"x" * (1024 * 1024),
            content_type="application/json",
        ),
    ),
    "unsupported_media_type": (
        415,
        dict(target="exchange_auth_code", data=b"{}", content_type="text/plain"),
    ),
}


@pytest.mark.parametrize(("status", "request_"), ERRORS.values(), ids=ERRORS.keys())
def test_cors_error_to_allowed_origin_has_allow_origin(api: Api, status, request_):
    options = dict(request_)
    target = options.pop("target")

    response = api.call(target, headers={"Origin": ORIGIN}, **options)

    assert response.status == status
    assert_allowed(response)


def test_cors_upstream_error_to_allowed_origin_has_allow_origin(
    api: Api, simulator: Sim
):
    code = simulator.code(1)
    simulator.fault(endpoint="token", status=500, raw_body="<html>down</html>")

    response = api.exchange(code, headers={"Origin": ORIGIN})

    assert response.status == 502
    assert response.reason == "upstream_error"
    assert_allowed(response)


def test_cors_unavailable_to_allowed_origin_has_allow_origin(api: Api, stub):
    stub.set_faults(times=5, status=503)

    response = api.exchange("abc.def", headers={"Origin": ORIGIN})

    assert response.status == 503
    assert response.reason == "unavailable"
    assert_allowed(response)


def test_cors_reauth_to_allowed_origin_has_allow_origin(api: Api):
    token = session_of(api.login(1))
    api.delete(token)

    response = api.call(
        "lookup_user",
        method="GET",
        headers={"Origin": ORIGIN, "Authorization": f"Bearer {token}"},
    )

    assert response.status == 401
    assert response.reason == "reauth_required"
    assert_allowed(response)


def test_cors_internal_error_to_allowed_origin_has_allow_origin(api: Api, monkeypatch):
    monkeypatch.delenv("TIKI_CLIENT_ID")

    response = api.exchange("abc.def", headers={"Origin": ORIGIN})

    assert response.status == 500
    assert response.reason == "internal"
    assert_allowed(response)


def test_cors_router_not_found_to_allowed_origin_has_allow_origin(api: Api):
    response = api.call(
        "local_router", method="POST", path="/exchange", headers={"Origin": ORIGIN}
    )

    assert response.status == 404
    assert_allowed(response)
