"""Forged and tampered session tokens (issue 3, "Session tokens"): each is refused
with 401 ``unauthenticated`` before any Firestore read of the customer it names,
before any Tiki call, and without a Secret Manager lookup of the key id it names.

Tokens are forged here with PyJWT and the key the backend would use: HKDF of the
session secret for ``keys.SESSION_SIGNING`` (auth/keys.py), kid "1" (the stand-in's
only version), audience = the client id, issuer ``tiniapp-auth``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    SESSION_SECRET,
    Api,
    Response,
    Sim,
    session_of,
)
from google.cloud import firestore

from auth import keys

TARGETS = {
    "refresh_auth_token": "POST",
    "lookup_user": "GET",
    "revoke_sessions": "POST",
    "delete_user": "POST",
}
ISSUER = "tiniapp-auth"
MISSING = object()

# HS384/HS512 forgeries reuse the 32-byte HS256 key on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")

Claims = dict[str, Any]
Forger = Callable[[Claims, str], str]


def signing_key(
    purpose: bytes = keys.SESSION_SIGNING, secret: str = SESSION_SECRET
) -> bytes:
    return keys.derive(secret, purpose)


def forge(
    claims: Claims,
    *,
    key: bytes | None = None,
    algorithm: str = "HS256",
    kid: object = "1",
) -> str:
    headers = None if kid is MISSING else {"kid": kid}
    return jwt.encode(
        claims, key or signing_key(), algorithm=algorithm, headers=headers
    )


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def compact(header: dict[str, Any], claims: Claims, key: bytes | None = None) -> str:
    """A JWS built by hand, for headers PyJWT refuses to write; HMAC-SHA256 if keyed."""
    segments = [b64(json.dumps(part).encode()) for part in (header, claims)]
    signing_input = ".".join(segments)
    if key is None:
        return f"{signing_input}."
    mac = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def claims_for(customer: str) -> Claims:
    now = int(time.time())
    return {
        "iss": ISSUER,
        "aud": CLIENT_ID,
        "sub": customer,
        "iat": now,
        "exp": now + 3600,
        "jti": "forged-jti-0001",
        "sv": "0.0",
    }


def assert_refused(response: Response) -> None:
    assert response.status == 401, response.body
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.json["data"] is None
    assert response.error["code"] == 401
    assert response.error["reason"] == "unauthenticated"
    assert response.error["message"]


def kid_lookups(stub: Any) -> list[str]:
    """Secret Manager names looked up other than a secret's ``latest`` version."""
    return [
        name
        for name in stub.stats()["by_name"]
        if not name.endswith("/versions/latest")
    ]


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every Firestore document the backend reads, as ``collection/id``."""
    from auth import store

    seen: list[str] = []
    real = store._read

    def spy(settings: Any, collection: str, key: str) -> Any:
        seen.append(f"{collection}/{key}")
        return real(settings, collection, key)

    monkeypatch.setattr(store, "_read", spy)
    return seen


def call(api: Api, target: str, token: str) -> Response:
    return api.with_session(target, token, method=TARGETS[target])


# --- the forgeries -------------------------------------------------------------


def _changed(**changes: Any) -> Forger:
    return lambda claims, token: forge({**claims, **changes})


def _now_plus(name: str, seconds: int, **more: Any) -> Forger:
    return lambda claims, token: forge(
        {**claims, name: int(time.time()) + seconds, **more}
    )


def _without(name: str) -> Forger:
    return lambda claims, token: forge({k: v for k, v in claims.items() if k != name})


def _kid(kid: object) -> Forger:
    if isinstance(kid, str) or kid is MISSING:
        return lambda claims, token: forge(claims, kid=kid)
    # PyJWT writes only string key ids; build the others by hand.
    header = {"alg": "HS256", "typ": "JWT", "kid": kid}
    return lambda claims, token: compact(header, claims, signing_key())


def _keyed(key: bytes) -> Forger:
    return lambda claims, token: forge(claims, key=key)


def _alg_header(alg: str | None, keyed: bool = True) -> Forger:
    def build(claims: Claims, token: str) -> str:
        header: dict[str, Any] = {"typ": "JWT", "kid": "1"}
        if alg is not None:
            header["alg"] = alg
        return compact(header, claims, signing_key() if keyed else None)

    return build


def _payload_swapped(**changes: Any) -> Forger:
    def build(claims: Claims, token: str) -> str:
        header, _, signature = token.split(".")
        payload = b64(json.dumps({**claims, **changes}).encode())
        return f"{header}.{payload}.{signature}"

    return build


def _signature_changed(claims: Claims, token: str) -> str:
    head, signature = token.rsplit(".", 1)
    middle = len(signature) // 2
    swapped = "A" if signature[middle] != "A" else "B"
    return f"{head}.{signature[:middle]}{swapped}{signature[middle + 1 :]}"


def _signature_removed(claims: Claims, token: str) -> str:
    return token.rsplit(".", 1)[0] + "."


def _extra_segments(claims: Claims, token: str) -> str:
    return f"{token}.{token.split('.')[1]}.x"


def _critical_extension(claims: Claims, token: str) -> str:
    header = {"alg": "HS256", "typ": "JWT", "kid": "1", "crit": ["x-bind"], "x-bind": 1}
    return compact(header, claims, signing_key())


REFUSED: dict[str, Forger] = {
    # algorithm
    "alg_none_unsigned": _alg_header("none", keyed=False),
    "alg_none_with_hmac": _alg_header("none"),
    "alg_None_with_hmac": _alg_header("None"),
    "alg_NONE_with_hmac": _alg_header("NONE"),
    "alg_nOnE_with_hmac": _alg_header("nOnE"),
    "alg_missing": _alg_header(None),
    "alg_lower_case_hs256": _alg_header("hs256"),
    "alg_hs384_right_key": lambda claims, token: forge(claims, algorithm="HS384"),
    "alg_hs512_right_key": lambda claims, token: forge(claims, algorithm="HS512"),
    "crit_unknown_extension": _critical_extension,
    # payload and signature
    "payload_other_customer": _payload_swapped(sub="2"),
    "payload_longer_expiry": _payload_swapped(exp=int(time.time()) + 10**7),
    "signature_changed": _signature_changed,
    "signature_removed": _signature_removed,
    "five_segments": _extra_segments,
    "oversized": _changed(pad="a" * 5000),
    # audience
    "aud_missing": _without("aud"),
    "aud_foreign": _changed(aud="another-tini-app"),
    "aud_empty_list": _changed(aud=[]),
    "aud_list": _changed(aud=[CLIENT_ID]),
    "aud_list_with_foreign": _changed(aud=[CLIENT_ID, "another-tini-app"]),
    "aud_padded": _changed(aud=f"{CLIENT_ID} "),
    "aud_prefix": _changed(aud=CLIENT_ID[:-1]),
    # times
    "exp_missing": _without("exp"),
    "exp_string": lambda claims, token: forge({**claims, "exp": str(claims["exp"])}),
    "expired_60s": _now_plus("exp", -60, iat=int(time.time()) - 3600),
    "expired_10s": _now_plus("exp", -10, iat=int(time.time()) - 3600),
    "iat_missing": _without("iat"),
    "iat_future_60s": _now_plus("iat", 60),
    "iat_future_10s": _now_plus("iat", 10),
    "nbf_future_60s": _now_plus("nbf", 60),
    "nbf_future_10s": _now_plus("nbf", 10),
    # other claims
    "iss_missing": _without("iss"),
    "iss_foreign": _changed(iss="tiki"),
    "jti_missing": _without("jti"),
    "sv_missing": _without("sv"),
    "sub_missing": _without("sub"),
    "sub_path": _changed(sub="../1"),
    "sub_document_path": _changed(sub="tiki_users/1"),
    "sub_leading_zero": _changed(sub="01"),
    "sub_integer": _changed(sub=1),
    # key id
    "kid_missing": _kid(MISSING),
    "kid_unknown": _kid("99"),
    "kid_next_version": _kid("2"),
    "kid_zero": _kid("0"),
    # Secret Manager never writes a version with a leading zero: no lookup.
    "kid_double_zero": _kid("00"),
    "kid_leading_zero": _kid("01"),
    "kid_nine_digits_zero_padded": _kid("000000001"),
    "kid_ten_digits": _kid("1000000000"),
    "kid_negative": _kid("-1"),
    "kid_integer": _kid(1),
    "kid_empty": _kid(""),
    "kid_trailing_space": _kid("1 "),
    "kid_leading_space": _kid(" 1"),
    "kid_trailing_newline": _kid("1\n"),
    "kid_float": _kid("1.0"),
    "kid_exponent": _kid("1e0"),
    "kid_fullwidth_digit": _kid("\uff11"),
    "kid_latest": _kid("latest"),
    "kid_relative_path": _kid("../1"),
    "kid_secret_name": _kid("projects/x/secrets/y"),
    "kid_version_name": _kid("projects/tini-test/secrets/session-secret/versions/1"),
    "kid_null": _kid(None),
    "kid_list": _kid(["1"]),
    "kid_object": _kid({"version": "1"}),
    # key
    "key_raw_session_secret": _keyed(SESSION_SECRET.encode()),
    # The stand-in stores the secret with an editor's newline; the backend drops it.
    "key_secret_with_newline": _keyed(signing_key(secret=SESSION_SECRET + "\n")),
    "key_token_sealing": _keyed(signing_key(keys.TOKEN_SEALING)),
    "key_other_secret": _keyed(signing_key(secret="another-session-secret-0123456789")),
    "key_client_secret": _keyed(signing_key(secret=CLIENT_SECRET)),
    "key_empty": _keyed(b"\0" * 32),
}

# A session that expired moments ago is what refresh_auth_token exists to renew
# (SESSION_REFRESH_WINDOW_SECONDS), and what revoke_sessions and delete_user
# must still be able to act on, so expiry alone is not refused by those.
EXPIRY_CASES = {"expired_60s", "expired_10s"}
RENEWABLE_TARGETS = {"refresh_auth_token", "revoke_sessions", "delete_user"}

MATRIX = [
    pytest.param(target, name, id=f"{target}-{name}")
    for target in TARGETS
    for name in REFUSED
    if not (target in RENEWABLE_TARGETS and name in EXPIRY_CASES)
]


@pytest.mark.parametrize(("target", "case"), MATRIX)
def test_session_forged_token_is_401_before_any_read(
    api: Api, simulator: Sim, stub, backend, reads, target, case
):
    token = session_of(api.login(1))
    claims = jwt.decode(token, options={"verify_signature": False})
    forged = REFUSED[case](claims, token)
    tiki_before = simulator.stats()["calls"]
    reads.clear()

    response = call(api, target, forged)

    assert_refused(response)
    assert reads == []
    assert simulator.stats()["calls"] == tiki_before
    assert kid_lookups(stub) == []
    db = firestore.Client(project=backend["GOOGLE_CLOUD_PROJECT"])
    assert db.collection("tiki_users").document("1").get().exists


@pytest.mark.parametrize("case", REFUSED.keys())
def test_session_forged_token_for_unknown_customer_is_401_not_reauth(
    api: Api, simulator: Sim, stub, reads, case
):
    claims = claims_for("424242")
    genuine = forge(claims)
    forged = REFUSED[case](claims, genuine)

    response = api.lookup(forged)

    assert_refused(response)
    assert reads == []
    assert sum(simulator.stats()["calls"].values()) == 0
    assert kid_lookups(stub) == []


# --- the controls: what a refusal above is measured against ----------------------


def test_session_resigned_genuine_claims_are_accepted(api: Api, reads):
    token = session_of(api.login(1))
    claims = jwt.decode(token, options={"verify_signature": False})
    reads.clear()

    response = api.lookup(forge(claims))

    assert response.status == 200, response.body
    assert response.data["user"]["customer_id"] == 1
    assert reads == ["tiki_users/1"]


def test_session_well_signed_token_for_unknown_customer_reads_and_is_reauth(
    api: Api, reads
):
    token = forge(claims_for("424242"))

    response = api.lookup(token)

    assert response.status == 401
    assert response.reason == "reauth_required"
    assert reads == ["tiki_users/424242"]


@pytest.mark.parametrize("claim", ["iat", "nbf"])
def test_session_small_clock_skew_is_accepted(api: Api, claim):
    token = session_of(api.login(1))
    claims = jwt.decode(token, options={"verify_signature": False})
    claims[claim] = int(time.time()) + 3

    response = api.lookup(forge(claims))

    assert response.status == 200, response.body


def test_session_issued_token_verifies_with_the_derived_key(api: Api, stub):
    token = session_of(api.login(1))

    header = jwt.get_unverified_header(token)
    claims = jwt.decode(
        token, signing_key(), algorithms=["HS256"], audience=CLIENT_ID, issuer=ISSUER
    )

    assert (header["alg"], header["kid"]) == ("HS256", "1")
    assert {"iss", "aud", "sub", "iat", "exp", "jti", "sv"} <= set(claims)
    assert kid_lookups(stub) == []
