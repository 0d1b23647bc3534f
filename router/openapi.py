"""Serve the committed OpenAPI 3.1 description at `GET /openapi.json`.

One file, `router/openapi.json`, describes both HTTP surfaces: the web channel's
customer API (operations tagged `customer`) and the ops API (tagged `ops`). Each
listener serves only the operations it answers, so a client or a fuzzer pointed at
either port's `/openapi.json` never meets a path that port does not have. The file is
hand-written and committed (a test keeps it in step with the registered routes):
generating it from handlers would document what the code does, not what it promises.
Open to everyone: it is documentation, and holds no secret.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any, Literal

from aiohttp import web

SPEC_PATH = Path(__file__).with_name("openapi.json")
OPENAPI_PATH = "/openapi.json"
Part = Literal["customer", "ops"]
_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


@functools.cache
def load_document() -> dict[str, Any]:
    """Return the committed document (read once; it ships with the release)."""
    document: dict[str, Any] = json.loads(SPEC_PATH.read_text(encoding="utf-8"))
    return document


def document_for(part: Part) -> dict[str, Any]:
    """Return the document with only the operations tagged `part` (and its own paths)."""
    full = load_document()
    out = copy.deepcopy(full)
    paths: dict[str, Any] = {}
    for path, item in full["paths"].items():
        kept = {
            key: value
            for key, value in item.items()
            if key not in _METHODS or part in value.get("tags", ())
        }
        if any(key in _METHODS for key in kept):
            paths[path] = copy.deepcopy(kept)
    out["paths"] = paths
    out["tags"] = [t for t in full.get("tags", []) if t["name"] == part]
    return out


@functools.cache
def _rendered(part: Part) -> bytes:
    """Return the served bytes of one part (built once per process)."""
    return json.dumps(document_for(part), ensure_ascii=False, indent=1).encode()


def add_openapi_route(app: web.Application, part: Part) -> None:
    """Register `GET /openapi.json` on app, serving the operations tagged `part`."""

    async def openapi(request: web.Request) -> web.Response:
        """Answer the OpenAPI description of this listener."""
        return web.Response(
            body=_rendered(part),
            content_type="application/json",
            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
        )

    app.router.add_get(OPENAPI_PATH, openapi)
