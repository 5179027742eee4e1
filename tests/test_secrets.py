"""Secret reading details, each with one faked Secret Manager answer."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import google_crc32c
import pytest

from auth import config, secrets
from auth.errors import Unavailable

pytestmark = pytest.mark.no_backend

RESOURCE = "projects/p/secrets/session/versions/latest"


class _OneAnswer:
    """A Secret Manager client that gives one prepared answer."""

    def __init__(self, name: str, data: bytes, crc: int | None) -> None:
        payload: dict[str, Any] = {"data": data}
        if crc is not None:
            payload["data_crc32c"] = crc
        self.answer = SimpleNamespace(name=name, payload=_Payload(payload))
        self.asked: list[str] = []

    def access_secret_version(self, name: str, **_: Any) -> Any:
        self.asked.append(name)
        return self.answer


class _Payload(dict[str, Any]):
    def __getattr__(self, key: str) -> Any:
        return self[key]


@pytest.fixture
def answer(monkeypatch: pytest.MonkeyPatch):
    def install(name: str, data: bytes, crc: int | None = -1) -> _OneAnswer:
        if crc == -1:
            crc = google_crc32c.value(data)
        client = _OneAnswer(name, data, crc)
        monkeypatch.setattr(secrets, "_secret_client", lambda settings: client)
        return client

    secrets.clear_cache()
    yield install
    secrets.clear_cache()


def _settings() -> config.Settings:
    return config.load({"TIKI_CLIENT_ID": "app", "SESSION_SECRET_RESOURCE": RESOURCE})


def test_secrets_trailing_newline_is_stripped(answer):
    answer("projects/p/secrets/session/versions/4", b"s3cret-value\n")

    secret = secrets.session_secret(_settings())

    assert (secret.value, secret.version) == ("s3cret-value", "4")


def test_secrets_checksum_mismatch_is_unavailable(answer):
    answer("projects/p/secrets/session/versions/4", b"s3cret-value", crc=12345)

    with pytest.raises(Unavailable) as refused:
        secrets.session_secret(_settings())

    assert "checksum" in (refused.value.log or "")
    assert "s3cret" not in (refused.value.log or "")


def test_secrets_answer_without_version_number_is_read_as_version_one(answer):
    answer(RESOURCE, b"s3cret-value")

    secret = secrets.session_secret(_settings())

    assert (secret.value, secret.version) == ("s3cret-value", "1")


def test_secrets_are_cached_within_their_lifetime(answer):
    client = answer("projects/p/secrets/session/versions/2", b"s3cret-value")

    for _ in range(3):
        secrets.session_secret(_settings())

    assert client.asked == [RESOURCE]
