"""Tiki's request signature against its published vectors and the padding rule."""

import base64
import hashlib
import hmac

import pytest

from auth import signing

pytestmark = pytest.mark.no_backend

CLIENT_ID = "RLCKb7Ae9kx4DXtXsCWjnDXtggFnM43W"
SECRET = "EhjGcsUUuRSJTHiYPbW5fxzyaKEx0JuAZIKRQ4HnIfNFidB2kMg6locQbTIEz3Vf"
TIMESTAMP = "1620621619569"


def test_sign_published_post_vector():
    signature = signing.sign(SECRET, CLIENT_ID, TIMESTAMP, '{"id":123}')

    assert (
        signature == "8ebd092b9df2cf90e8ccbcab2ba87ee14f2abb25eb8f18b4d7286d42adcd45c2"
    )


def test_sign_published_get_vector():
    content = "/order?location=H%C3%A0%20N%E1%BB%99i&order_id=88062110977884170"

    signature = signing.sign(SECRET, CLIENT_ID, TIMESTAMP, content)

    assert (
        signature == "e1e0d63f7f8296dd31b2c082e611351a6c41a3bc0309a9299832f70b693722c8"
    )


def test_query_string_matches_the_published_get_content():
    query = signing.query_string(
        [("location", "Hà Nội"), ("order_id", "88062110977884170")]
    )

    assert f"/order?{query}" == (
        "/order?location=H%C3%A0%20N%E1%BB%99i&order_id=88062110977884170"
    )


def test_query_string_escapes_like_encode_uri_component():
    query = signing.query_string([("q", "a b+c/d?&=~!*'()é")])

    assert query == "q=a%20b%2Bc%2Fd%3F%26%3D~!*'()%C3%A9"


@pytest.mark.parametrize("body", ['{"id":1}', '{"id":12}', '{"id":123}', '{"a":"é"}'])
def test_sign_every_padding_remainder(body):
    payload = f"{TIMESTAMP}.{CLIENT_ID}.{body}".encode()
    unpadded = base64.urlsafe_b64encode(payload).replace(b"=", b"")
    expected = hmac.new(SECRET.encode(), unpadded, hashlib.sha256).hexdigest()

    signature = signing.sign(SECRET, CLIENT_ID, TIMESTAMP, body)

    assert signature == expected


def test_sign_payload_lengths_cover_all_remainders():
    lengths = {
        len(f"{TIMESTAMP}.{CLIENT_ID}.{b}".encode()) % 3
        for b in ['{"id":1}', '{"id":12}', '{"id":123}']
    }

    assert lengths == {0, 1, 2}


def test_headers_carry_a_millisecond_timestamp_and_matching_signature():
    headers = signing.headers(CLIENT_ID, SECRET, '{"code":"x.y"}')

    timestamp = headers["X-Tiniapp-Timestamp"]
    assert timestamp.isdigit() and len(timestamp) == 13
    assert headers["X-Tiniapp-Client-Id"] == CLIENT_ID
    assert headers["X-Tiniapp-Signature"] == signing.sign(
        SECRET, CLIENT_ID, timestamp, '{"code":"x.y"}'
    )
