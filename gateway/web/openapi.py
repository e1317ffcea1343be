"""The OpenAPI 3.0 description of every HTTP endpoint, served at `GET /openapi.json`.

A test holds its paths and methods equal to the routes the app registers, so it cannot drift
silently. Request bodies and query parameters are described as strictly as the handlers check them
(unknown admin fields and parameters are refused), so a schema-driven fuzzer such as schemathesis
can run against it.

The document is built in parts: `openapi_base` (shared field schemas, error answers, builders),
`openapi_schemas` (the components), `openapi_public` (chat, models, self-service usage, probes) and
`openapi_admin` (`/admin/v1/*`), `openapi_limits` (rate limits), `openapi_apply` (`POST /admin/v1/apply`).
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from aiohttp import web

from gateway.web import openapi_admin, openapi_apply, openapi_limits, openapi_public
from gateway.web.openapi_schemas import SCHEMAS


def _version() -> str:
    try:
        return version("credit-gateway")
    except PackageNotFoundError:
        return "0"


SPEC: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "Credit gateway",
        "version": _version(),
        "description": "A credit-metering, budget-enforcing reverse proxy for the Axerity chat API.",
    },
    "paths": {**openapi_public.PATHS, **openapi_admin.PATHS, **openapi_limits.PATHS, **openapi_apply.PATHS},
    "components": {
        "schemas": {**SCHEMAS, **openapi_limits.SCHEMAS, **openapi_apply.SCHEMAS},
        "securitySchemes": {
            "gatewayKey": {"type": "http", "scheme": "bearer", "description": "a gateway key (gwk_...)"},
            "adminToken": {"type": "http", "scheme": "bearer", "description": "GATEWAY_ADMIN_TOKEN"},
        },
    },
}

_TEXT = json.dumps(SPEC)


async def openapi_view(request: web.Request) -> web.Response:
    """GET /openapi.json."""
    return web.Response(text=_TEXT, content_type="application/json")


def add_routes(router: web.UrlDispatcher) -> None:
    """Register GET /openapi.json."""
    router.add_get("/openapi.json", openapi_view)
