"""The OpenAPI document: exactly the app's routes, a valid document, and real answers that fit it."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.errors import InvalidRequest
from gateway.ops.settings import Settings
from gateway.web import attribution
from gateway.web.app import create_app
from gateway.web.openapi import SPEC

from .admin_helpers import call, ok, traffic
from .conftest import World

METHODS = {"get", "put", "post", "delete", "patch"}


def _routes() -> set[tuple[str, str]]:
    app = create_app(Settings())
    routes = set()
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        routes.add((str(path), route.method.lower()))
    return routes


def test_paths_and_methods_are_exactly_the_routes() -> None:
    documented = {
        (path, method) for path, item in SPEC["paths"].items() for method in item if method in METHODS
    }
    assert documented == _routes()


def test_document_is_valid_openapi() -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(SPEC)
    operation_ids = [op["operationId"] for item in SPEC["paths"].values() for op in item.values()]
    assert len(operation_ids) == len(set(operation_ids))


def _inline(node: Any) -> Any:
    """The schema with every $ref replaced by what it names."""
    if isinstance(node, dict):
        if "$ref" in node:
            return _inline(SPEC["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]])
        return {k: _inline(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v) for v in node]
    return node


def _schema(path: str, method: str, status: int, media: str = "application/json") -> Any:
    return _inline(SPEC["paths"][path][method]["responses"][str(status)]["content"][media]["schema"])


def _check(instance: Any, schema: Any) -> None:
    validators = pytest.importorskip("openapi_schema_validator")
    validators.OAS30Validator(schema).validate(instance)


@pytest.mark.parametrize(
    ("body", "valid"),
    [
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, True),
        ({"model": "m", "messages": [{"role": "user"}], "stream": True, "temperature": 0.2}, True),
        ({"model": "m", "messages": []}, False),
        ({"model": "m", "messages": [{"content": "no role"}]}, False),
        ({"model": "m", "messages": [{"role": 1}]}, False),
        ({"model": 1, "messages": [{"role": "user"}]}, False),
        ({"messages": [{"role": "user"}]}, False),
        ({"model": "m", "messages": [{"role": "user"}], "stream": "yes"}, False),
    ],
)
def test_chat_body_schema(body: dict[str, Any], valid: bool) -> None:
    schema = _inline(
        SPEC["paths"]["/api/v1/chat"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    )
    validators = pytest.importorskip("openapi_schema_validator")
    assert validators.OAS30Validator(schema).is_valid(body) is valid


def _chat_header(name: str) -> Any:
    return next(p["schema"] for p in SPEC["paths"]["/api/v1/chat"]["post"]["parameters"] if p["name"] == name)


@pytest.mark.parametrize(
    "value",
    [
        "a",
        "team:search, env/prod",
        "a," * 9 + "a",
        "a," * 10 + "a",
        "a,,b",
        "",
        "a b",
        "x" * 64,
        "x" * 65,
        "a!",
    ],
)
def test_tags_header_schema_is_what_the_gateway_accepts(value: str) -> None:
    """The documented X-Gateway-Tags pattern accepts exactly the values attribution.tags accepts."""
    try:
        attribution.tags(value)
        accepted = True
    except InvalidRequest:
        accepted = False
    validators = pytest.importorskip("openapi_schema_validator")
    assert validators.OAS30Validator(_chat_header(attribution.TAGS_HEADER)).is_valid(value) is accepted


@pytest.mark.parametrize(
    ("value", "valid"), [("", True), ("u" * 128, True), ("u" * 129, False), ("*", False), ("**", True)]
)
def test_end_user_header_schema(value: str, valid: bool) -> None:
    """The documented X-Gateway-End-User limit is the one attribution.end_user applies."""
    validators = pytest.importorskip("openapi_schema_validator")
    assert validators.OAS30Validator(_chat_header(attribution.END_USER_HEADER)).is_valid(value) is valid
    try:
        attribution.end_user(value, None)
        accepted = True
    except InvalidRequest:
        accepted = False
    assert accepted is valid


async def test_served(world: World) -> None:
    resp = await world.client.get("/openapi.json")
    assert resp.status == 200 and resp.content_type == "application/json"
    assert await resp.json() == SPEC


async def test_real_answers_fit_the_document(admin_world: World) -> None:
    w = admin_world
    key = await ok(w, "POST", "/admin/v1/keys", 201, json={"user": "alice", "name": "k"})
    _check(key, _schema("/admin/v1/keys", "post", 201))
    budget = {"scope": "team", "subject": "eng", "period": "daily", "limit": "0.5"}
    _check(await ok(w, "PUT", "/admin/v1/budgets", json=budget), _schema("/admin/v1/budgets", "put", 200))
    await traffic(w, key["key"], (2, "openai/gpt-oss-20b"))
    resp = await w.chat(key["key"], messages=9)
    _check(await resp.json(), _schema("/api/v1/chat", "post", 402))
    checks = [
        ("POST", "/admin/v1/teams", {"name": "ops"}, 201),
        ("POST", "/admin/v1/users", {"name": "dave", "team": "ops"}, 201),
        ("GET", "/admin/v1/teams", None, 200),
        ("GET", "/admin/v1/users", None, 200),
        ("GET", "/admin/v1/keys", None, 200),
        ("GET", "/admin/v1/budgets", None, 200),
        ("GET", "/admin/v1/usage?group_by=team,user,key,model,day,month", None, 200),
        ("GET", "/admin/v1/ledger", None, 200),
        ("POST", "/admin/v1/teams", {"name": "ops"}, 409),
        ("POST", "/admin/v1/keys", {"user": "nobody"}, 404),
        ("PUT", "/admin/v1/budgets", {"scope": "x"}, 400),
    ]
    for method, path, body, status in checks:
        resp = await call(w, method, path, json=body)
        assert resp.status == status, await resp.text()
        _check(await resp.json(), _schema(path.split("?")[0], method.lower(), status))
    resp = await call(w, "GET", "/api/v1/usage", token=key["key"])
    _check(await resp.json(), _schema("/api/v1/usage", "get", 200))
    k = f"/admin/v1/keys/{key['id']}"
    access = [
        ("PATCH", k, {"models": ["openai/gpt-oss-20b"], "expires_at": "2099-01-01T00:00:00Z"}, 200),
        ("PATCH", k, {"models": ["no/such-model"]}, 400),
        ("POST", k + "/block", None, 200),
        ("POST", k + "/unblock", None, 200),
        ("PATCH", "/admin/v1/teams/eng", {"models": ["openai/gpt-oss-20b", "google/gemini-2.5-pro"]}, 200),
        ("PATCH", "/admin/v1/users/alice", {"models": None}, 200),
        ("PATCH", "/admin/v1/users/nobody", {"models": None}, 404),
        ("GET", "/admin/v1/audit?limit=2", None, 200),
        ("POST", k + "/rotate", {"grace_seconds": 60}, 201),
        ("POST", k + "/rotate", {"grace_seconds": 60}, 409),
    ]
    for method, path, body, status in access:
        resp = await call(w, method, path, json=body)
        assert resp.status == status, await resp.text()
        template = path.split("?")[0].replace(key["id"], "{id}").replace("/eng", "/{name}")
        template = template.replace("/alice", "/{name}").replace("/nobody", "/{name}")
        _check(await resp.json(), _schema(template, method.lower(), status))
    for path in ("/v1/models", "/api/v1/models"):
        resp = await call(w, "GET", path, token=key["key"])
        _check(await resp.json(), _schema(path, "get", 200))
    resp = await w.chat(key["key"], model="google/gemini-2.5-pro")
    _check(await resp.json(), _schema("/api/v1/chat", "post", 403))
    resp = await call(w, "GET", "/admin/v1/teams", token="wrong")
    _check(await resp.json(), _schema("/admin/v1/teams", "get", 401))
