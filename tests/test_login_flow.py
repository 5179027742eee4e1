"""The login flow end to end: simulator over HTTP, real Firestore emulator."""

from __future__ import annotations

import time

from conftest import CLIENT_ID, Api, Sim, session_of
from google.cloud import firestore


def test_exchange_returns_a_session_and_the_user(api: Api):
    response = api.login(1)

    data = response.data
    assert response.status == 200
    assert response.error is None
    assert data["token_type"] == "Bearer"
    assert data["expires_in"] == 3600
    assert data["user"]["customer_id"] == 1
    assert data["user"]["name"] == "Ti Ni"
    assert data["user"]["login_count"] == 1
    assert sorted(data["user"]["scopes"]) == ["offline", "user_profile"]
    assert data["user"]["created_at"].endswith("Z")
    assert "tiki_access_token" not in data
    assert "refresh_token" not in response.body.decode()


def test_lookup_returns_the_record_with_login_count(api: Api):
    token = session_of(api.login(1))

    response = api.lookup(token)

    assert response.status == 200
    assert response.data["user"]["customer_id"] == 1
    assert response.data["user"]["login_count"] == 1


def test_second_login_counts_and_keeps_created_at(api: Api):
    first = api.login(1).data["user"]
    time.sleep(1.1)

    second = api.login(1).data["user"]

    assert second["login_count"] == 2
    assert second["created_at"] == first["created_at"]
    assert second["last_login_at"] >= first["last_login_at"]


def test_refresh_gives_a_new_session_that_works(api: Api):
    token = session_of(api.login(1))

    refreshed = api.refresh(token)
    lookup = api.lookup(session_of(refreshed))

    assert refreshed.status == 200
    assert session_of(refreshed) != token
    assert lookup.status == 200
    assert lookup.data["user"]["login_count"] == 1


def test_exchange_same_code_twice_is_invalid_code(api: Api, simulator: Sim):
    code = simulator.code(1)
    api.exchange(code)

    again = api.exchange(code)

    assert again.status == 400
    assert again.reason == "invalid_code"
    assert again.error["code"] == 400


def test_lookup_with_one_character_changed_is_401(api: Api):
    token = session_of(api.login(1))
    position = len(token) // 2
    swapped = "A" if token[position] != "A" else "B"
    tampered = token[:position] + swapped + token[position + 1 :]

    response = api.lookup(tampered)

    assert response.status == 401
    assert response.reason == "unauthenticated"


def test_exchange_stores_user_and_sealed_tokens(api: Api, backend):
    api.login(1)
    db = firestore.Client(project=backend["GOOGLE_CLOUD_PROJECT"])

    user = db.collection("tiki_users").document("1").get()
    tokens = db.collection("tiki_tokens").document("1").get()

    assert user.exists and tokens.exists
    assert user.to_dict()["login_count"] == 1
    assert user.to_dict()["customer_id"] == 1
    stored = tokens.to_dict()
    assert isinstance(stored["sealed"], bytes)
    assert stored["has_refresh_token"] is True
    assert "access_token" not in stored and "refresh_token" not in stored


def test_customer_id_int_and_string_share_a_document(api: Api, simulator: Sim, backend):
    api.login(7)
    simulator.fault(endpoint="token", data_override={"customer": {"id": "7"}})

    second = api.login(7)
    db = firestore.Client(project=backend["GOOGLE_CLOUD_PROJECT"])
    documents = list(db.collection("tiki_users").stream())

    assert [d.id for d in documents] == ["7"]
    assert second.data["user"]["login_count"] == 2
    assert second.data["user"]["customer_id"] == "7"


def test_customer_without_offline_gets_no_refresh_token(api: Api, backend):
    api.login(2, scopes=["user_profile"])
    db = firestore.Client(project=backend["GOOGLE_CLOUD_PROJECT"])

    stored = db.collection("tiki_tokens").document("2").get().to_dict()

    assert stored["has_refresh_token"] is False


def test_session_audience_is_the_client_id(api: Api):
    import jwt

    token = session_of(api.login(1))

    claims = jwt.decode(token, options={"verify_signature": False})
    header = jwt.get_unverified_header(token)

    assert claims["aud"] == CLIENT_ID
    assert claims["sub"] == "1"
    assert header["alg"] == "HS256"
    assert header["kid"] == "1"
    assert {"exp", "iat", "jti"} <= claims.keys()


def test_expose_tiki_access_token_when_opted_in(api: Api, monkeypatch):
    monkeypatch.setenv("EXPOSE_TIKI_ACCESS_TOKEN", "true")

    response = api.login(1)

    assert isinstance(response.data["tiki_access_token"], str)
