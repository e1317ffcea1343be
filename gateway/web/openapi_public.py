"""OpenAPI paths outside the admin API: chat, models, self-service usage, probes, metrics, this document."""

from __future__ import annotations

from typing import Any

from gateway.web.attribution import END_USER_HEADER, MAX_END_USER, MAX_TAGS, TAG, TAGS_HEADER
from gateway.web.openapi_base import (
    END_USER,
    INTEGER,
    JSON,
    STRING,
    body,
    content,
    obj,
    ok,
    param,
    ref,
    responses,
)
from gateway.web.openapi_limits import RATE_HEADERS

CHAT_HEADERS = {
    "X-Request-Id": {"schema": STRING, "description": "The ledger's request id"},
    "X-Credits-Charged": {"schema": STRING, "description": "Credits charged, e.g. 0.75 (0 when not 2xx)"},
    "X-Credits-Remaining": {"schema": STRING, "description": "Smallest remaining across the budgets"},
    **RATE_HEADERS,
}

# A `text/event-stream` schema describes each event, as OpenAPI 3.2's `itemSchema` does (and as tools
# read a 3.0 one); a `string` schema would claim every event is a string.
SSE_EVENT = {
    **obj({"data": STRING, "event": STRING, "id": STRING, "retry": INTEGER}, ("data",), closed=False),
    "description": "One server-sent event relayed from upstream: `data` is a JSON chunk, the last `[DONE]`",
}

_END_USER_HEADER = param(
    END_USER_HEADER,
    END_USER,
    f"The end user the request is for (at most {MAX_END_USER} characters, else 400 invalid_request "
    "naming the header); wins over the body's `user`",
    "header",
)
_CHAT = {
    "summary": "Chat completion, metered and forwarded upstream",
    "tags": ["chat"],
    "security": [{"gatewayKey": []}],
    "parameters": [
        _END_USER_HEADER,
        param(
            TAGS_HEADER,
            {"type": "string", "pattern": rf"^[ \t]*{TAG}[ \t]*(,[ \t]*{TAG}[ \t]*){{0,{MAX_TAGS - 1}}}$"},
            f"Tags of the request, comma-separated: at most {MAX_TAGS}, each 1-64 characters of "
            "A-Z a-z 0-9 _ . : / - (a bad one: 400 invalid_request naming the header)",
            "header",
        ),
    ],
    "requestBody": body("ChatRequest"),
    "responses": responses(
        {
            200: {
                "description": "Upstream's answer, relayed (SSE when `stream` is true)",
                "headers": CHAT_HEADERS,
                "content": {JSON: {"schema": {"type": "object"}}, "text/event-stream": {"schema": SSE_EVENT}},
            }
        },
        400,
        401,
        402,
        403,
        413,
        429,
        502,
        503,
        504,
    ),
}

_MODELS = {
    "summary": "The models this key may use, as OpenAI lists them, with prices; never refused for budget",
    "tags": ["chat"],
    "security": [{"gatewayKey": []}],
    "responses": responses({200: ok("The models", ref("ModelList"))}, 400, 401, 503),
}

PATHS: dict[str, Any] = {
    "/api/v1/chat": {"post": {**_CHAT, "operationId": "chat"}},
    "/v1/chat/completions": {"post": {**_CHAT, "operationId": "chatCompletions"}},
    "/api/v1/usage": {
        "get": {
            "summary": "The calling key's budgets and usage in the current windows",
            "operationId": "selfUsage",
            "tags": ["chat"],
            "security": [{"gatewayKey": []}],
            "parameters": [
                {
                    **_END_USER_HEADER,
                    "description": f"An end user of the key's user (at most {MAX_END_USER} characters): "
                    "their budgets are listed too; wins over the `end_user` parameter",
                },
                param("end_user", END_USER, "an end user of the key's user: their budgets are listed too"),
            ],
            "responses": responses(
                {200: ok("Budgets and usage of this key", ref("SelfUsage"))}, 400, 401, 503
            ),
        }
    },
    "/v1/models": {"get": {**_MODELS, "operationId": "listModels"}},
    "/api/v1/models": {"get": {**_MODELS, "operationId": "listModelsApi"}},
    "/healthz": {
        "get": {
            "summary": "The process is alive",
            "operationId": "healthz",
            "security": [],
            "responses": {"200": ok("Alive", obj({"status": STRING}, ("status",)))},
        }
    },
    "/readyz": {
        "get": {
            "summary": "The database accepts writes",
            "operationId": "readyz",
            "security": [],
            "responses": {
                "200": ok("Ready", obj({"status": STRING}, ("status",))),
                "503": ok(
                    "The database cannot be reached or refuses writes; the error says why",
                    obj({"status": STRING}, ("status",), closed=False),
                ),
            },
        }
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics of this process",
            "operationId": "metrics",
            "security": [],
            "responses": {
                "200": {"description": "Prometheus text format", "content": content(STRING, "text/plain")}
            },
        }
    },
    "/openapi.json": {
        "get": {
            "summary": "This document",
            "operationId": "openapi",
            "security": [],
            "responses": {"200": ok("OpenAPI 3.0 document", {"type": "object"})},
        }
    },
}
