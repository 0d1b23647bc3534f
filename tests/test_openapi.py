"""The committed OpenAPI description matches the routes the two listeners register.

Every route the web channel and the ops API register is documented, nothing is
documented that is not registered, each listener serves exactly its own operations at
`/openapi.json`, and the document is valid OpenAPI 3.1 (as schemathesis loads it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from channels.web import WebChannel, WebConfig
from router.drivers import DriverContext
from router.http import HttpLimits
from router.openapi import OPENAPI_PATH, document_for, load_document
from router.ops import OpsApi

_METHODS = ("get", "put", "post", "delete", "options", "patch")
# The web channel's catch-all answers a JSON 404 for any other path: not an operation.
_CATCH_ALL = "/{tail}"  # registered as "/{tail:.*}"


def _ops_app() -> web.Application:
    """Return the ops API's application (collaborators are never called to build it)."""
    unused: Any = object()
    return OpsApi(
        health=unused,
        metrics=unused,
        agents=unused,
        dead_letters=unused,
        corrections=unused,
        admin_token="openapi-test-token-0123456789",
    ).app()


def _web_app(tmp_path: Path) -> web.Application:
    """Return a web channel's application, widget included (the default)."""
    ctx = DriverContext(state_dir=tmp_path, log=structlog.get_logger())
    channel = WebChannel("site", WebConfig(type="web", name="site"), ctx)
    return channel.app(HttpLimits())


def _registered(app: web.Application) -> dict[str, set[str]]:
    """Return path -> methods registered ("*" for a route taking any method; HEAD left out)."""
    routes: dict[str, set[str]] = {}
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        assert path, f"route without a path: {route}"
        if path == _CATCH_ALL or route.method == "HEAD":
            continue
        routes.setdefault(path, set()).add(route.method.lower())
    return routes


def _documented(document: dict[str, Any]) -> dict[str, set[str]]:
    """Return path -> documented methods."""
    return {path: {m for m in item if m in _METHODS} for path, item in document["paths"].items()}


def _assert_same(registered: dict[str, set[str]], documented: dict[str, set[str]]) -> None:
    """Assert both list the same paths; a concrete method must be documented as such."""
    assert sorted(registered) == sorted(documented)
    for path, methods in registered.items():
        concrete = methods - {"*"}
        # A "*" route answers 405 itself for methods it does not take; the document
        # lists those it takes. A route for one method must list exactly it.
        assert concrete <= documented[path], path
        if "*" not in methods:
            assert documented[path] == concrete, path


def test_ops_routes_are_documented_and_nothing_else() -> None:
    """Every ops route (method and path) is in the document's ops part, and only those."""
    _assert_same(_registered(_ops_app()), _documented(document_for("ops")))


def test_web_routes_are_documented_and_nothing_else(tmp_path: Path) -> None:
    """Every web channel route is in the document's customer part, and only those."""
    _assert_same(_registered(_web_app(tmp_path)), _documented(document_for("customer")))


def test_every_operation_belongs_to_a_listener() -> None:
    """Each operation is tagged customer or ops, with a unique operationId."""
    ids: list[str] = []
    for path, item in load_document()["paths"].items():
        for method in set(item) & set(_METHODS):
            op = item[method]
            assert set(op["tags"]) & {"customer", "ops"}, (method, path)
            ids.append(op["operationId"])
            assert op["responses"], (method, path)
    assert len(ids) == len(set(ids))


def test_document_is_valid_openapi_3_1() -> None:
    """schemathesis (and its validator) load the committed document as OpenAPI 3.1."""
    document = load_document()
    assert document["openapi"].startswith("3.1")
    schema = schemathesis.openapi.from_dict(document)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == sum(len(m) for m in _documented(document).values())


def test_error_answers_use_the_error_shape() -> None:
    """Every 4xx/5xx JSON answer documented refers to the one error shape."""
    document = load_document()
    responses = document["components"]["responses"]
    for path, item in document["paths"].items():
        for method in set(item) & set(_METHODS):
            for status, answer in item[method]["responses"].items():
                if not status.startswith(("4", "5")):
                    continue
                if "$ref" in answer:
                    answer = responses[answer["$ref"].rsplit("/", 1)[1]]
                schema = answer.get("content", {}).get("application/json", {}).get("schema")
                if status == "503" and path == "/readyz":
                    continue  # not ready: the readiness report, not an error
                assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, status)


@pytest.mark.parametrize("part", ["ops", "customer"])
async def test_each_listener_serves_its_own_part(part: str, tmp_path: Path) -> None:
    """GET /openapi.json answers without a token with that listener's operations only."""
    app = _ops_app() if part == "ops" else _web_app(tmp_path)
    async with TestClient(TestServer(app)) as client:
        response = await client.get(OPENAPI_PATH)
        assert response.status == 200
        assert response.content_type == "application/json"
        served = json.loads(await response.read())
    assert served == document_for(part)  # type: ignore[arg-type]
    for item in served["paths"].values():
        for method in set(item) & set(_METHODS):
            assert part in item[method]["tags"]
