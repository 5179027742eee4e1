"""openapi.yaml stays true: valid OpenAPI 3.1, the router's paths and methods, the
reasons of auth/errors.py, and real responses validate against it.

``CONTRACT`` is also what tests/test_properties.py checks every answer with.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from conftest import ORIGIN, Api, Sim, session_of
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from auth import errors, web

DOCUMENT_PATH = Path(__file__).resolve().parent.parent / "openapi.yaml"
BASE = "urn:tiniapp-auth:openapi"
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
ERROR_CLASSES = [
    value
    for value in vars(errors).values()
    if isinstance(value, type) and issubclass(value, errors.AuthError)
]
STATUS_OF_REASON = {cls.reason: cls.status for cls in ERROR_CLASSES}


def _ecma_pattern(
    validator: Any, pattern: str, instance: Any, schema: Any
) -> Iterator[jsonschema.ValidationError]:
    # JSON Schema patterns are ECMA-262, where "$" matches only at the very end;
    # Python's also matches before a final newline, which would pass "abc\n".
    if not validator.is_type(instance, "string"):
        return
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    if not re.search(pattern, instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, validators={"pattern": _ecma_pattern}
)

# The structure of the OpenAPI 3.1 objects this document uses: our own subset,
# so the check needs jsonschema only (openapi-spec-validator 0.9 also accepts it).
_REF = {
    "type": "object",
    "required": ["$ref"],
    "properties": {"$ref": {"type": "string", "pattern": "^#/components/"}},
}
_SCHEMA = {"type": ["object", "boolean"]}
_EXTENSION = "^x-"
STRUCTURE: dict[str, Any] = {
    "$defs": {
        "ref": _REF,
        "header": {
            "type": "object",
            "required": ["schema"],
            "properties": {
                "description": {"type": "string"},
                "required": {"type": "boolean"},
                "schema": _SCHEMA,
            },
            "additionalProperties": False,
        },
        "media": {
            "type": "object",
            "required": ["schema"],
            "properties": {"schema": _SCHEMA},
        },
        "response": {
            "type": "object",
            "required": ["description"],
            "properties": {
                "description": {"type": "string", "minLength": 1},
                "headers": {
                    "type": "object",
                    "additionalProperties": {
                        "anyOf": [{"$ref": "#/$defs/ref"}, {"$ref": "#/$defs/header"}]
                    },
                },
                "content": {
                    "type": "object",
                    "propertyNames": {"pattern": "^[a-z]+/[a-z0-9.+-]+$"},
                    "additionalProperties": {"$ref": "#/$defs/media"},
                },
            },
            "additionalProperties": False,
        },
        "responses": {
            "type": "object",
            "minProperties": 1,
            "propertyNames": {"pattern": "^[1-5][0-9]{2}$"},
            "additionalProperties": {
                "anyOf": [{"$ref": "#/$defs/ref"}, {"$ref": "#/$defs/response"}]
            },
        },
        "operation": {
            "type": "object",
            "required": ["operationId", "responses"],
            "properties": {
                "operationId": {"type": "string", "pattern": "^[a-z_]+$"},
                "summary": {"type": "string"},
                "description": {"type": "string"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "security": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": {"type": "array"},
                    },
                },
                "requestBody": {"anyOf": [{"$ref": "#/$defs/ref"}, {"type": "object"}]},
                "responses": {"$ref": "#/$defs/responses"},
            },
            "additionalProperties": False,
        },
        "pathItem": {
            "type": "object",
            "properties": {
                "summary": {"type": "string"},
                "description": {"type": "string"},
                "x-other-methods": {"$ref": "#/$defs/responses"},
                **{method: {"$ref": "#/$defs/operation"} for method in METHODS},
            },
            "additionalProperties": False,
        },
    },
    "type": "object",
    "required": ["openapi", "info", "paths", "components"],
    "properties": {
        "openapi": {"type": "string", "pattern": r"^3\.1\.[0-9]+$"},
        "jsonSchemaDialect": {"type": "string"},
        "info": {
            "type": "object",
            "required": ["title", "version"],
            "properties": {
                "title": {"type": "string"},
                "version": {"type": "string"},
                "summary": {"type": "string"},
                "description": {"type": "string"},
            },
        },
        "servers": {
            "type": "array",
            "items": {"type": "object", "required": ["url"]},
        },
        "tags": {"type": "array", "items": {"type": "object", "required": ["name"]}},
        "paths": {
            "type": "object",
            "propertyNames": {"pattern": "^/"},
            "additionalProperties": {"$ref": "#/$defs/pathItem"},
        },
        "components": {
            "type": "object",
            "properties": {
                "schemas": {"type": "object", "additionalProperties": _SCHEMA},
                "responses": {
                    "type": "object",
                    "additionalProperties": {"$ref": "#/$defs/response"},
                },
                "headers": {
                    "type": "object",
                    "additionalProperties": {"$ref": "#/$defs/header"},
                },
                "requestBodies": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "required": ["content"],
                        "properties": {
                            "content": {
                                "type": "object",
                                "additionalProperties": {"$ref": "#/$defs/media"},
                            }
                        },
                    },
                },
                "securitySchemes": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "required": ["type"],
                        "properties": {
                            "type": {
                                "enum": [
                                    "apiKey",
                                    "http",
                                    "mutualTLS",
                                    "oauth2",
                                    "openIdConnect",
                                ]
                            }
                        },
                        "if": {"properties": {"type": {"const": "http"}}},
                        "then": {"required": ["scheme"]},
                    },
                },
            },
            "additionalProperties": False,
        },
    },
    "patternProperties": {_EXTENSION: {}},
    "additionalProperties": False,
}


class Contract:
    """The document, and a check of one real answer against it."""

    def __init__(self, path: Path) -> None:
        self.document: dict[str, Any] = yaml.safe_load(path.read_text("utf-8"))
        resource = Resource.from_contents(
            self.document, default_specification=DRAFT202012
        )
        self.registry: Registry[Any] = Registry().with_resource(BASE, resource)
        self._validators: dict[str, Any] = {}

    def at(self, pointer: str) -> Any:
        node: Any = self.document
        for part in pointer.lstrip("/").split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node

    def deref(self, pointer: str) -> tuple[Any, str]:
        """The OpenAPI object at ``pointer``, following its $ref chain."""
        node = self.at(pointer)
        while isinstance(node, dict) and "$ref" in node:
            pointer = node["$ref"].removeprefix("#")
            node = self.at(pointer)
        return node, pointer

    def validator(self, schema_pointer: str) -> Any:
        if schema_pointer not in self._validators:
            schema = {"$ref": f"{BASE}#{schema_pointer}"}
            self._validators[schema_pointer] = Validator(schema, registry=self.registry)
        return self._validators[schema_pointer]

    def responses_pointer(self, path: str, method: str) -> str:
        """Where the responses of ``method`` on ``path`` are; x-other-methods else."""
        assert path in self.document["paths"], f"{path} is not in the document"
        item = "/paths/" + _escape(path)
        if method.lower() in METHODS and method.lower() in self.at(item):
            return f"{item}/{method.lower()}/responses"
        return f"{item}/x-other-methods"

    def response_pointer(self, path: str, method: str, status: int) -> str:
        responses = self.responses_pointer(path, method)
        assert str(status) in self.at(responses), (
            f"{method} {path} answered {status}, which the document does not list"
        )
        return self.deref(f"{responses}/{status}")[1]

    def check(
        self,
        method: str,
        path: str,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
        *,
        response_pointer: str | None = None,
    ) -> None:
        """Raises AssertionError or ValidationError where the answer breaks the doc."""
        pointer = response_pointer or self.response_pointer(path, method, status)
        response, pointer = self.deref(pointer)
        for name in response.get("headers", {}):
            header, header_pointer = self.deref(f"{pointer}/headers/{name}")
            value = headers.get(name)
            if value is None:
                assert not header.get("required"), f"{status} lacks {name}"
                continue
            self.validator(f"{header_pointer}/schema").validate(value)
        content = response.get("content")
        if content is None or method.upper() == "HEAD":
            assert body == b"", f"{method} {path} {status} has a body: {body[:80]!r}"
            return
        assert headers.get("Content-Type", "").startswith("application/json")
        self.validator(f"{pointer}/content/application~1json/schema").validate(
            json.loads(body)
        )

    def error_schema_pointers(self) -> dict[str, str]:
        return {
            name: f"/components/schemas/{name}"
            for name in self.document["components"]["schemas"]
            if re.fullmatch(r"Error[0-9]{3}", name)
        }


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


CONTRACT = Contract(DOCUMENT_PATH)


def _walk(node: Any, pointer: str = "") -> Iterator[tuple[str, Any]]:
    yield pointer, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{pointer}/{_escape(key)}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, f"{pointer}/{index}")


def _schemas() -> Iterator[tuple[str, Any]]:
    """Every JSON Schema in the document: components' and those inline."""
    for pointer, node in _walk(CONTRACT.document):
        component = (
            pointer.startswith("/components/schemas/") and pointer.count("/") == 3
        )
        inline = pointer.endswith("/schema") and "/components/schemas/" not in pointer
        if component or inline:
            yield pointer, node


def _envelope(status: int, reason: str) -> dict[str, Any]:
    return {"data": None, "error": {"code": status, "reason": reason, "message": "m"}}


# --- the document itself -------------------------------------------------------------


@pytest.mark.no_backend
def test_openapi_structure_is_valid():
    checker = jsonschema.Draft202012Validator(STRUCTURE)

    problems = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in checker.iter_errors(CONTRACT.document)
    ]

    assert problems == []


@pytest.mark.no_backend
def test_openapi_every_ref_resolves():
    refs = [
        (pointer, node["$ref"])
        for pointer, node in _walk(CONTRACT.document)
        if isinstance(node, dict) and isinstance(node.get("$ref"), str)
    ]

    broken = []
    for pointer, ref in refs:
        try:
            CONTRACT.at(ref.removeprefix("#"))
        except (KeyError, IndexError, TypeError):
            broken.append((pointer, ref))

    assert refs and broken == []


@pytest.mark.no_backend
@pytest.mark.parametrize("pointer", [p for p, _ in _schemas()])
def test_openapi_schema_is_valid_json_schema(pointer: str):
    schema = CONTRACT.at(pointer)

    jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.no_backend
def test_openapi_operation_ids_are_unique_and_security_is_defined():
    operations = [
        operation
        for item in CONTRACT.document["paths"].values()
        for method, operation in item.items()
        if method in METHODS
    ]
    schemes = set(CONTRACT.document["components"]["securitySchemes"])

    ids = [operation["operationId"] for operation in operations]
    used = {name for o in operations for rule in o["security"] for name in rule}

    assert len(ids) == len(set(ids))
    assert used == schemes


# --- the document against the code ---------------------------------------------------


@pytest.mark.no_backend
def test_openapi_paths_are_the_router_endpoints():
    paths = set(CONTRACT.document["paths"])

    assert paths == {f"/{name}" for name in web.ENDPOINTS}


@pytest.mark.no_backend
@pytest.mark.parametrize("name", sorted(web.ENDPOINTS))
def test_openapi_methods_are_the_endpoint_allowed_methods(name: str):
    item = CONTRACT.document["paths"][f"/{name}"]

    methods = {method.upper() for method in item if method in METHODS}

    assert methods == set(web.ENDPOINTS[name].allow)


@pytest.mark.no_backend
@pytest.mark.parametrize("name", sorted(web.ENDPOINTS))
def test_openapi_session_functions_require_the_bearer_scheme(name: str):
    item = CONTRACT.document["paths"][f"/{name}"]

    needs_session = item[web.ENDPOINTS[name].method.lower()]["security"] != []

    assert needs_session == (web.ENDPOINTS[name] is not web.EXCHANGE)


@pytest.mark.no_backend
def test_openapi_reasons_and_codes_are_those_of_auth_errors():
    error = CONTRACT.document["components"]["schemas"]["Error"]["properties"]

    reasons = set(error["reason"]["enum"])
    codes = set(error["code"]["enum"])

    assert reasons == set(STATUS_OF_REASON)
    assert codes == set(STATUS_OF_REASON.values())


@pytest.mark.no_backend
def test_openapi_each_status_schema_takes_exactly_its_reasons():
    pointers = CONTRACT.error_schema_pointers()
    pairs = [(c, r) for c in set(STATUS_OF_REASON.values()) for r in STATUS_OF_REASON]

    for name, pointer in pointers.items():
        status = int(name.removeprefix("Error"))
        validator = CONTRACT.validator(pointer)
        accepted = {p for p in pairs if validator.is_valid(_envelope(*p))}

        expected = {(s, r) for r, s in STATUS_OF_REASON.items() if s == status}
        assert accepted == expected, name
    assert {int(n.removeprefix("Error")) for n in pointers} == set(
        STATUS_OF_REASON.values()
    )


@pytest.mark.no_backend
def test_openapi_documented_error_statuses_agree_with_their_schemas():
    pairs = [(status, reason) for reason, status in STATUS_OF_REASON.items()]
    checked = 0

    for path, item in CONTRACT.document["paths"].items():
        for method in [m for m in item if m in METHODS] + ["x-other-methods"]:
            responses = CONTRACT.responses_pointer(path, method)
            for key in CONTRACT.at(responses):
                response, pointer = CONTRACT.deref(f"{responses}/{key}")
                if int(key) < 400 or "content" not in response:
                    continue
                schema = f"{pointer}/content/application~1json/schema"
                validator = CONTRACT.validator(schema)
                valid = {p for p in pairs if validator.is_valid(_envelope(*p))}

                assert valid, f"{method} {path} {key} accepts no reason"
                assert {code for code, _ in valid} == {int(key)}, (method, path, key)
                checked += 1

    assert checked > 30


@pytest.mark.no_backend
def test_openapi_request_body_matches_the_code_check():
    schema = CONTRACT.document["components"]["schemas"]["AuthCodeRequest"]
    code = schema["properties"]["code"]

    assert code["maxLength"] == web.MAX_CODE_CHARS
    assert code["pattern"] == f"^{web._CODE.pattern}$"
    assert (
        "16 KiB"
        in CONTRACT.document["components"]["requestBodies"]["AuthCode"]["description"]
    )
    assert web.MAX_BODY_BYTES == 16 * 1024


@pytest.mark.no_backend
@pytest.mark.parametrize(
    ("body", "valid"),
    [
        ({"code": "abc.DEF-_~+/="}, True),
        ({"code": "a" * web.MAX_CODE_CHARS, "other": 1}, True),
        ({"code": "abc\n"}, False),
        ({"code": "a b"}, False),
        ({"code": ""}, False),
        ({"code": 123}, False),
        ({"code": "a" * (web.MAX_CODE_CHARS + 1)}, False),
        ({}, False),
        ([], False),
    ],
)
def test_openapi_request_schema_decides_as_the_code_does(body: Any, valid: bool):
    validator = CONTRACT.validator("/components/schemas/AuthCodeRequest")

    assert validator.is_valid(body) is valid


# --- real answers against the document -----------------------------------------------


def _call(api: Api, method: str, name: str, **kwargs: Any) -> Any:
    response = api.call("local_router", method=method, path=f"/{name}", **kwargs)
    CONTRACT.check(method, f"/{name}", response.status, response.headers, response.body)
    return response


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_openapi_login_flow_answers_match(api: Api, simulator: Sim):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    options = _call(api, "OPTIONS", "exchange_auth_code", headers=preflight)
    login = _call(api, "POST", "exchange_auth_code", json={"code": simulator.code(1)})
    token = session_of(login)
    lookup = _call(api, "GET", "lookup_user", headers=_bearer(token))
    head = _call(api, "HEAD", "lookup_user", headers=_bearer(token))
    refreshed = _call(api, "POST", "refresh_auth_token", headers=_bearer(token))
    token = session_of(refreshed)
    revoked = _call(api, "POST", "revoke_sessions", headers=_bearer(token))
    ended = _call(api, "GET", "lookup_user", headers=_bearer(token))
    again = _call(api, "POST", "exchange_auth_code", json={"code": simulator.code(1)})
    deleted = _call(api, "POST", "delete_user", headers=_bearer(session_of(again)))
    gone = _call(api, "POST", "refresh_auth_token", headers=_bearer(session_of(again)))

    statuses = [
        r.status
        for r in (
            options,
            login,
            lookup,
            head,
            refreshed,
            revoked,
            ended,
            again,
            deleted,
            gone,
        )
    ]
    assert statuses == [204, 200, 200, 200, 200, 200, 401, 200, 200, 401]
    assert options.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert revoked.data == {"revoked": True}
    assert deleted.data == {"deleted": True}
    assert ended.reason == gone.reason == "reauth_required"


def test_openapi_session_with_tiki_access_token_matches(
    api: Api, simulator: Sim, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("EXPOSE_TIKI_ACCESS_TOKEN", "true")

    login = _call(api, "POST", "exchange_auth_code", json={"code": simulator.code(2)})

    assert login.status == 200
    assert "tiki_access_token" in login.data


_BIG = b"{" + b" " * (web.MAX_BODY_BYTES + 1) + b"}"
_JSON = {"Content-Type": "application/json"}


def _nothing(simulator: Sim, monkeypatch: pytest.MonkeyPatch) -> None:
    return None


def _tiki_answers(status: int) -> Callable[[Sim, pytest.MonkeyPatch], None]:
    def arrange(simulator: Sim, monkeypatch: pytest.MonkeyPatch) -> None:
        simulator.fault(endpoint="token", status=status, raw_body="<html>down</html>")

    return arrange


def _no_client_id(simulator: Sim, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIKI_CLIENT_ID")


# fmt: off
ERROR_CASES = [
    # (id, arrange, method, function, request kwargs, status, reason)
    ("empty-object", _nothing, "POST", "exchange_auth_code", {"json": {}}, 400,
     "bad_request"),
    ("not-json", _nothing, "POST", "exchange_auth_code",
     {"data": b"{trunc", "headers": _JSON}, 400, "bad_request"),
    ("code-not-text", _nothing, "POST", "exchange_auth_code", {"json": {"code": 1}},
     400, "bad_request"),
    ("unknown-code", _nothing, "POST", "exchange_auth_code",
     {"json": {"code": "abc.def"}}, 400, "invalid_code"),
    ("text-plain", _nothing, "POST", "exchange_auth_code",
     {"data": b'{"code":"a"}', "headers": {"Content-Type": "text/plain"}}, 415,
     "unsupported_media_type"),
    ("oversized-login", _nothing, "POST", "exchange_auth_code",
     {"data": _BIG, "headers": _JSON}, 413, "payload_too_large"),
    ("oversized-refresh", _nothing, "POST", "refresh_auth_token",
     {"data": _BIG, "headers": {**_JSON, **_bearer("a.b.c")}}, 413,
     "payload_too_large"),
    ("no-token", _nothing, "GET", "lookup_user", {}, 401, "unauthenticated"),
    ("garbage-token", _nothing, "POST", "refresh_auth_token",
     {"headers": _bearer("garbage")}, 401, "unauthenticated"),
    ("jwt-shaped-token", _nothing, "POST", "revoke_sessions",
     {"headers": _bearer("eyJhbGciOiJIUzI1NiJ9.e30.c2ln")}, 401, "unauthenticated"),
    ("basic-auth", _nothing, "POST", "delete_user",
     {"headers": {"Authorization": "Basic dXNlcjpwYXNz"}}, 401, "unauthenticated"),
    ("get-login", _nothing, "GET", "exchange_auth_code", {}, 405,
     "method_not_allowed"),
    ("put-lookup", _nothing, "PUT", "lookup_user", {}, 405, "method_not_allowed"),
    ("delete-delete", _nothing, "DELETE", "delete_user", {}, 405,
     "method_not_allowed"),
    ("head-revoke", _nothing, "HEAD", "revoke_sessions", {}, 405, None),
    ("tiki-500", _tiki_answers(500), "POST", "exchange_auth_code",
     {"json": {"code": "abc.def"}}, 502, "upstream_error"),
    ("tiki-503", _tiki_answers(503), "POST", "exchange_auth_code",
     {"json": {"code": "abc.def"}}, 503, "unavailable"),
    ("tiki-504", _tiki_answers(504), "POST", "exchange_auth_code",
     {"json": {"code": "abc.def"}}, 504, "upstream_timeout"),
    ("misconfigured", _no_client_id, "GET", "lookup_user", {}, 500, "internal"),
    ("misconfigured-wrong-method", _no_client_id, "PUT", "lookup_user", {}, 405,
     "method_not_allowed"),
]
# fmt: on


@pytest.mark.parametrize(
    ("arrange", "method", "name", "kwargs", "status", "reason"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
def test_openapi_error_answers_match(
    api: Api,
    simulator: Sim,
    monkeypatch: pytest.MonkeyPatch,
    arrange: Callable[[Sim, pytest.MonkeyPatch], None],
    method: str,
    name: str,
    kwargs: dict[str, Any],
    status: int,
    reason: str | None,
):
    arrange(simulator, monkeypatch)

    response = _call(api, method, name, **kwargs)

    assert response.status == status
    if reason is not None:  # a HEAD answer has no body to read the reason from
        assert response.reason == reason
        assert response.error["code"] == status


def test_openapi_preflight_when_misconfigured_matches(
    api: Api, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("TIKI_CLIENT_ID")
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "GET"}

    response = _call(api, "OPTIONS", "lookup_user", headers=preflight)

    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN


def test_openapi_unknown_path_matches_not_found(api: Api):
    response = api.call("local_router", method="GET", path="/no_such_function")

    CONTRACT.check(
        "GET",
        "/no_such_function",
        response.status,
        response.headers,
        response.body,
        response_pointer="/components/responses/NotFound",
    )
    assert response.status == 404
