"""The OpenAPI 3.0 description of every HTTP endpoint, served at `GET /openapi.json`.

A test holds its paths and methods equal to the routes the app registers, so it cannot drift
silently. Request bodies and query parameters are described as strictly as the handlers check them
(unknown admin fields and parameters are refused), so a schema-driven fuzzer such as schemathesis
can run against it.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from aiohttp import web

from gateway.core.alerts import MAX_THRESHOLD, MAX_THRESHOLDS, MIN_THRESHOLD
from gateway.core.windows import PERIODS
from gateway.ops.access import MAX_MODELS, MAX_SECONDS
from gateway.ops.adjustments import MAX_REASON
from gateway.ops.events import TYPES as EVENT_TYPES
from gateway.ops.ledger import MAX_LIMIT, OUTCOMES
from gateway.ops.reports import CREDIT_SUMS, GROUPS, SUMS
from gateway.ops.services import MAX_NAME, SCOPES
from gateway.web.attribution import END_USER_HEADER, MAX_END_USER, MAX_TAGS, TAG, TAGS_HEADER

JSON = "application/json"
STRING = {"type": "string"}
INTEGER = {"type": "integer"}
NUMBER = {"type": "number"}
TIME = {"type": "string", "format": "date-time"}
NAME = {"type": "string", "minLength": 1, "maxLength": MAX_NAME, "description": "printable characters"}
MODELS = {
    "type": "array",
    "items": STRING,
    "minItems": 1,
    "maxItems": MAX_MODELS,
    "nullable": True,
    "description": "an allow-list of priced models; null: every priced model",
}
EXPIRES = {**TIME, "nullable": True, "description": "when the key stops working (in the future); null: never"}
# A budget's scope (`end_user`: contract section 11).
SCOPE = {"type": "string", "enum": list(SCOPES)}
# A budget's subject: a team or user name, a key id, or `USER/END_USER` or `USER/*` for an end user's.
SUBJECT = {**NAME, "maxLength": MAX_NAME + 1 + MAX_END_USER}
END_USER = {"type": "string", "maxLength": MAX_END_USER}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


def _object(
    properties: dict[str, Any], required: tuple[str, ...] = (), *, closed: bool = True
) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    if closed:
        schema["additionalProperties"] = False
    return schema


def _array(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items}


def _content(schema: dict[str, Any], media: str = JSON) -> dict[str, Any]:
    return {media: {"schema": schema}}


ERRORS = {
    400: "Invalid request: the `error.field` names the parameter at fault",
    401: "Missing or wrong credentials",
    402: "A budget would go over",
    403: "The admin API is disabled (no GATEWAY_ADMIN_TOKEN); on chat: the model is not allowed for this key",
    404: "Unknown team, user or key",
    409: "The name is taken, or the key is revoked or already rotated",
    413: "The request body is too large",
    502: "Upstream unavailable",
    503: "The ledger database cannot be reached (ledger_unavailable), or the process is at its "
    "concurrency limit (overloaded, with Retry-After)",
    504: "Upstream timed out",
}


def _responses(ok: dict[int, Any], *errors: int) -> dict[str, Any]:
    out = {str(status): response for status, response in ok.items()}
    for status in errors:
        schema = _ref("BudgetExceeded") if status == 402 else _ref("Error")
        out[str(status)] = {"description": ERRORS[status], "content": _content(schema)}
    return out


def _ok(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, **({"content": _content(schema)} if schema else {})}


def _param(name: str, schema: dict[str, Any], description: str, where: str = "query") -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "schema": schema,
        "description": description,
    }


def _admin(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "summary": summary,
        "tags": ["admin"],
        "security": [{"adminToken": []}],
        "responses": responses,
        **extra,
    }


def _body(name: str) -> dict[str, Any]:
    return {"required": True, "content": _content(_ref(name))}


SUMS_SCHEMA = _object({name: NUMBER if name in CREDIT_SUMS else INTEGER for name in SUMS}, SUMS)
TIME_RANGE = [
    _param("from", STRING, "ISO 8601 date or datetime, UTC unless an offset is given; inclusive"),
    _param("to", STRING, "ISO 8601 date or datetime, UTC unless an offset is given; exclusive"),
]
ADMIN_ERRORS = (400, 401, 403, 503)
CHAT_HEADERS = {
    "X-Request-Id": {"schema": STRING, "description": "The ledger's request id"},
    "X-Credits-Charged": {"schema": STRING, "description": "Credits charged, e.g. 0.75 (0 when not 2xx)"},
    "X-Credits-Remaining": {"schema": STRING, "description": "Smallest remaining across the budgets"},
}

# A `text/event-stream` schema describes each event, as OpenAPI 3.2's `itemSchema` does (and as tools
# read a 3.0 one); a `string` schema would claim every event is a string.
SSE_EVENT = {
    **_object({"data": STRING, "event": STRING, "id": STRING, "retry": INTEGER}, ("data",), closed=False),
    "description": "One server-sent event relayed from upstream: `data` is a JSON chunk, the last `[DONE]`",
}

_END_USER_HEADER = _param(
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
        _param(
            TAGS_HEADER,
            {"type": "string", "pattern": rf"^[ \t]*{TAG}[ \t]*(,[ \t]*{TAG}[ \t]*){{0,{MAX_TAGS - 1}}}$"},
            f"Tags of the request, comma-separated: at most {MAX_TAGS}, each 1-64 characters of "
            "A-Z a-z 0-9 _ . : / - (a bad one: 400 invalid_request naming the header)",
            "header",
        ),
    ],
    "requestBody": _body("ChatRequest"),
    "responses": _responses(
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
        502,
        503,
        504,
    ),
}

KEY_FIELDS: dict[str, Any] = {
    "id": STRING,
    "user": STRING,
    "name": _nullable(STRING),
    "prefix": STRING,
    "created_at": TIME,
    "revoked_at": {**TIME, "nullable": True, "description": "in the future: a rotated key's grace ends then"},
    "expires_at": _nullable(TIME),
    "blocked": {"type": "boolean"},
    "models": MODELS,
    "rotated_to": _nullable(STRING),
    "last_used_at": {**TIME, "nullable": True, "description": "to within a minute"},
}

SCHEMAS: dict[str, Any] = {
    "Error": _object(
        {
            "error": _object(
                {"type": STRING, "message": STRING, "field": STRING}, ("type", "message"), closed=False
            )
        },
        ("error",),
    ),
    "BudgetExceeded": _object(
        {
            "error": _object(
                {
                    "type": {"type": "string", "enum": ["budget_exceeded"]},
                    "message": STRING,
                    "scope": SCOPE,
                    "subject": STRING,
                    "period": {"type": "string", "enum": list(PERIODS)},
                    "limit": NUMBER,
                    "spent": NUMBER,
                    "held": NUMBER,
                    "remaining": NUMBER,
                    "cost": NUMBER,
                    "resets_at": _nullable(TIME),
                },
                ("type", "message", "scope", "subject", "period", "limit", "spent", "held", "remaining"),
                closed=False,
            )
        },
        ("error",),
    ),
    "ChatRequest": _object(
        {
            "model": {"type": "string", "description": "A priced model, e.g. openai/gpt-oss-20b"},
            "messages": {
                "type": "array",
                "minItems": 1,
                "items": _object({"role": STRING}, ("role",), closed=False),
            },
            "stream": {"type": "boolean", "nullable": True, "description": "null means false"},
        },
        ("model", "messages"),
        closed=False,
    ),
    "TeamCreate": _object({"name": NAME}, ("name",)),
    "UserCreate": _object({"name": NAME, "team": _nullable(NAME)}, ("name",)),
    "KeyCreate": _object(
        {"user": NAME, "name": _nullable(NAME), "expires_at": EXPIRES, "models": MODELS}, ("user",)
    ),
    "KeyPatch": _object({"name": _nullable(NAME), "models": MODELS, "expires_at": EXPIRES}),
    "KeyRotate": _object(
        {
            "grace_seconds": {
                "type": "integer",
                "minimum": 0,
                "maximum": MAX_SECONDS,
                "description": "how long the old key keeps working (default 0)",
            }
        }
    ),
    "ModelsPatch": _object({"models": MODELS}, ("models",)),
    "BudgetPut": _object(
        {
            "scope": SCOPE,
            "subject": {
                **SUBJECT,
                "description": "team name, user name, key id; for end_user USER/END_USER, or USER/* for a "
                "default: each end user of USER without a budget of their own gets a counter at its limit",
            },
            "period": {"type": "string", "enum": list(PERIODS)},
            "limit": {
                "oneOf": [
                    {"type": "number", "minimum": 0, "maximum": 1_000_000_000_000},
                    {"type": "string", "pattern": r"^\s*\d+(\.\d{1,6})?\s*$"},
                ],
                "description": "credits, at most 6 decimal places",
            },
        },
        ("scope", "subject", "period", "limit"),
    ),
    "BudgetDelete": _object(
        {
            "scope": SCOPE,
            "subject": SUBJECT,
            "period": {"type": "string", "enum": list(PERIODS)},
        },
        ("scope", "subject", "period"),
    ),
    "Team": _object(
        {"id": INTEGER, "name": STRING, "created_at": TIME, "models": MODELS},
        ("id", "name", "created_at", "models"),
    ),
    "User": _object(
        {"id": INTEGER, "name": STRING, "team": _nullable(STRING), "created_at": TIME, "models": MODELS},
        ("id", "name", "team", "created_at", "models"),
    ),
    "Key": _object(KEY_FIELDS, tuple(KEY_FIELDS)),
    "KeyCreated": _object(
        {
            **KEY_FIELDS,
            "key": {"type": "string", "description": "the secret: shown only in this answer"},
            "rotated_from": {"type": "string", "description": "the key this one replaces (rotation only)"},
        },
        ("key", *KEY_FIELDS),
    ),
    "ModelList": _object(
        {
            "object": {"type": "string", "enum": ["list"]},
            "data": _array(
                _object(
                    {
                        "id": STRING,
                        "object": {"type": "string", "enum": ["model"]},
                        "created": INTEGER,
                        "owned_by": STRING,
                        "credits_per_message": NUMBER,
                    },
                    ("id", "object", "created", "owned_by", "credits_per_message"),
                )
            ),
        },
        ("object", "data"),
    ),
    "AuditEntry": _object(
        {
            "id": INTEGER,
            "at": TIME,
            "actor": {"type": "string", "description": "`admin-api <client address>` or `cli <OS user>`"},
            "action": {"type": "string", "description": "e.g. key.create, key.block, budget.set"},
            "target": STRING,
            "before": {"type": "object", "nullable": True},
            "after": {"type": "object", "nullable": True},
        },
        ("id", "at", "actor", "action", "target", "before", "after"),
    ),
    "AuditPage": _object(
        {"entries": _array(_ref("AuditEntry")), "next_cursor": _nullable(STRING)}, ("entries", "next_cursor")
    ),
    "Budget": _object(
        {
            "scope": SCOPE,
            "subject": STRING,
            "period": {"type": "string", "enum": list(PERIODS)},
            "limit": NUMBER,
            "spent": NUMBER,
            "held": NUMBER,
            "remaining": NUMBER,
            "window_start": TIME,
            "resets_at": _nullable(TIME),
            "default": {"type": "boolean", "description": "true for a `USER/*` default (scope end_user)"},
            "from_default": _nullable(
                {
                    "type": "string",
                    "description": "the `USER/*` default this per-end-user budget was created from",
                }
            ),
        },
        ("scope", "subject", "period", "limit", "spent", "held", "remaining", "window_start", "resets_at"),
    ),
    "Report": _object(
        {
            "rows": _array(
                _object(
                    {
                        **{
                            g: _nullable(STRING) if g in ("team", "end_user", "tag") else STRING
                            for g in GROUPS
                        },
                        **SUMS_SCHEMA["properties"],
                    },
                    SUMS,
                )
            ),
            "totals": SUMS_SCHEMA,
        },
        ("rows", "totals"),
    ),
    "LedgerEntry": _object(
        {
            "request_id": STRING,
            "admitted_at": TIME,
            "settled_at": TIME,
            "team": _nullable(STRING),
            "user": STRING,
            "key_id": STRING,
            "model": STRING,
            "message_count": INTEGER,
            "unit_price": NUMBER,
            "credits": NUMBER,
            "outcome": {"type": "string", "enum": list(OUTCOMES)},
            "upstream_status": _nullable(INTEGER),
            "prompt_tokens": _nullable(INTEGER),
            "completion_tokens": _nullable(INTEGER),
            "total_tokens": _nullable(INTEGER),
            "stream": {"type": "boolean"},
            "duration_ms": NUMBER,
            "end_user": _nullable(STRING),
            "tags": _array(STRING),
            "adjustments": NUMBER,
        },
        (
            "request_id",
            "admitted_at",
            "settled_at",
            "team",
            "user",
            "key_id",
            "model",
            "message_count",
            "unit_price",
            "credits",
            "outcome",
            "upstream_status",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "stream",
            "duration_ms",
            "end_user",
            "tags",
            "adjustments",
        ),
    ),
    "LedgerPage": _object(
        {"entries": _array(_ref("LedgerEntry")), "next_cursor": _nullable(STRING)}, ("entries", "next_cursor")
    ),
    "SelfUsage": _object(
        {
            "key": _object({"id": STRING, "user": STRING, "team": _nullable(STRING)}, ("id", "user", "team")),
            "budgets": _array(_ref("Budget")),
            "usage": _array(
                _object(
                    {
                        "period": {"type": "string", "enum": ["daily", "weekly", "monthly"]},
                        "window_start": TIME,
                        "resets_at": TIME,
                        "key": _ref("UsageSums"),
                        "user": _ref("UsageSums"),
                    },
                    ("period", "window_start", "resets_at", "key", "user"),
                )
            ),
        },
        ("key", "budgets", "usage"),
    ),
    "UsageSums": _object(
        {"requests": INTEGER, "messages": INTEGER, "credits": NUMBER}, ("requests", "messages", "credits")
    ),
}

_GROUP_BY = "(" + "|".join(GROUPS) + ")"

_MODELS = {
    "summary": "The models this key may use, as OpenAI lists them, with prices; never refused for budget",
    "tags": ["chat"],
    "security": [{"gatewayKey": []}],
    "responses": _responses({200: _ok("The models", _ref("ModelList"))}, 400, 401, 503),
}
KEY_ID = [_param("id", NAME, "the key's id", "path")]


def _key_change(summary: str, operation: str, status: int = 200, **extra: Any) -> dict[str, Any]:
    return _admin(
        summary,
        _responses(
            {status: _ok("The key", _ref("KeyCreated" if status == 201 else "Key"))}, *ADMIN_ERRORS, 404, 409
        ),
        operationId=operation,
        parameters=KEY_ID,
        **extra,
    )


def _models_patch(kind: str) -> dict[str, Any]:
    return _admin(
        f"Set the {kind}'s model allow-list (null: every priced model)",
        _responses({200: _ok(f"The {kind}", _ref(kind.title()))}, *ADMIN_ERRORS, 404, 413),
        operationId=f"set{kind.title()}",
        parameters=[_param("name", NAME, f"the {kind}'s name", "path")],
        requestBody=_body("ModelsPatch"),
    )


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
                _param("end_user", END_USER, "an end user of the key's user: their budgets are listed too"),
            ],
            "responses": _responses(
                {200: _ok("Budgets and usage of this key", _ref("SelfUsage"))}, 400, 401, 503
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
            "responses": {"200": _ok("Alive", _object({"status": STRING}, ("status",)))},
        }
    },
    "/readyz": {
        "get": {
            "summary": "The database accepts writes",
            "operationId": "readyz",
            "security": [],
            "responses": {
                "200": _ok("Ready", _object({"status": STRING}, ("status",))),
                "503": _ok(
                    "The database cannot be reached or refuses writes; the error says why",
                    _object({"status": STRING}, ("status",), closed=False),
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
                "200": {"description": "Prometheus text format", "content": _content(STRING, "text/plain")}
            },
        }
    },
    "/openapi.json": {
        "get": {
            "summary": "This document",
            "operationId": "openapi",
            "security": [],
            "responses": {"200": _ok("OpenAPI 3.0 document", {"type": "object"})},
        }
    },
    "/admin/v1/teams": {
        "post": _admin(
            "Create a team",
            _responses({201: _ok("Created", _ref("Team"))}, *ADMIN_ERRORS, 409, 413),
            operationId="createTeam",
            requestBody=_body("TeamCreate"),
        ),
        "get": _admin(
            "List teams",
            _responses({200: _ok("Teams", _array(_ref("Team")))}, *ADMIN_ERRORS),
            operationId="listTeams",
        ),
    },
    "/admin/v1/users": {
        "post": _admin(
            "Create a user, optionally in a team",
            _responses({201: _ok("Created", _ref("User"))}, *ADMIN_ERRORS, 404, 409, 413),
            operationId="createUser",
            requestBody=_body("UserCreate"),
        ),
        "get": _admin(
            "List users",
            _responses({200: _ok("Users", _array(_ref("User")))}, *ADMIN_ERRORS),
            operationId="listUsers",
        ),
    },
    "/admin/v1/keys": {
        "post": _admin(
            "Create a key for a user; the secret is in this answer only",
            _responses({201: _ok("Created", _ref("KeyCreated"))}, *ADMIN_ERRORS, 404, 413),
            operationId="createKey",
            requestBody=_body("KeyCreate"),
        ),
        "get": _admin(
            "List keys (no secrets)",
            _responses({200: _ok("Keys", _array(_ref("Key")))}, *ADMIN_ERRORS, 404),
            operationId="listKeys",
            parameters=[_param("user", NAME, "only this user's keys")],
        ),
    },
    "/admin/v1/keys/{id}": {
        "delete": _admin(
            "Revoke a key (again: no change)",
            _responses({204: _ok("Revoked")}, *ADMIN_ERRORS, 404),
            operationId="revokeKey",
            parameters=KEY_ID,
        ),
        "patch": _key_change(
            "Change a key's models, expiry or name", "setKey", requestBody=_body("KeyPatch")
        ),
    },
    "/admin/v1/keys/{id}/block": {
        "post": _key_change("Block a key: 401 `blocked` until unblocked", "blockKey")
    },
    "/admin/v1/keys/{id}/unblock": {"post": _key_change("Unblock a key", "unblockKey")},
    "/admin/v1/keys/{id}/rotate": {
        "post": _key_change(
            "A new key for the same user, name, models and expiry; the old one is revoked after the grace",
            "rotateKey",
            201,
            requestBody={"required": False, "content": _content(_ref("KeyRotate"))},
        )
    },
    "/admin/v1/teams/{name}": {"patch": _models_patch("team")},
    "/admin/v1/users/{name}": {"patch": _models_patch("user")},
    "/admin/v1/audit": {
        "get": _admin(
            "Administrative changes in (at, id) order, one page",
            _responses({200: _ok("A page and the cursor of the next", _ref("AuditPage"))}, *ADMIN_ERRORS),
            operationId="listAudit",
            parameters=[
                _param("action", {"type": "string", "minLength": 1, "maxLength": 64}, "only this action"),
                *TIME_RANGE,
                _param("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}, "page size (100)"),
                _param("cursor", STRING, "`next_cursor` of the previous page"),
            ],
        )
    },
    "/admin/v1/budgets": {
        "put": _admin(
            "Create a budget or change its limit",
            _responses(
                {200: _ok("The budget in its current window", _ref("Budget"))}, *ADMIN_ERRORS, 404, 413
            ),
            operationId="setBudget",
            requestBody=_body("BudgetPut"),
        ),
        "delete": _admin(
            "Delete a budget",
            _responses({204: _ok("Deleted")}, *ADMIN_ERRORS, 404, 413),
            operationId="deleteBudget",
            requestBody=_body("BudgetDelete"),
        ),
        "get": _admin(
            "Budgets with their current window's spent, held and remaining",
            _responses({200: _ok("Budgets", _array(_ref("Budget")))}, *ADMIN_ERRORS, 404),
            operationId="listBudgets",
            parameters=[
                _param("scope", SCOPE, "only budgets of this scope"),
                _param("subject", SUBJECT, "only this team, user, key or end user (needs scope)"),
                _param(
                    "expand",
                    {"type": "boolean"},
                    "also list the per-end-user budgets created from `USER/*` defaults (default false)",
                ),
            ],
        ),
    },
    "/admin/v1/usage": {
        "get": _admin(
            "Billing report: charged requests, messages, credits and tokens, grouped",
            _responses(
                {
                    200: {
                        "description": "Rows and totals (CSV: a header row and the rows)",
                        "content": {JSON: {"schema": _ref("Report")}, "text/csv": {"schema": STRING}},
                    }
                },
                *ADMIN_ERRORS,
            ),
            operationId="usageReport",
            parameters=[
                *TIME_RANGE,
                _param(
                    "group_by",
                    {"type": "string", "pattern": rf"^(\s*{_GROUP_BY}\s*(,\s*{_GROUP_BY}\s*)*)?$"},
                    "comma-separated distinct group fields; empty: no grouping, one row of totals",
                ),
                _param("format", {"type": "string", "enum": ["json", "csv"]}, "json (default) or csv"),
            ],
        )
    },
    "/admin/v1/ledger": {
        "get": _admin(
            "Ledger rows in (admitted_at, request_id) order, one page",
            _responses(
                {200: _ok("A page and the cursor of the next", _ref("LedgerPage"))}, *ADMIN_ERRORS, 404
            ),
            operationId="listLedger",
            parameters=[
                _param("user", NAME, "only this user's rows"),
                _param("team", NAME, "only this team's rows"),
                _param("key", NAME, "only this key's rows (key id)"),
                _param("model", NAME, "only this model's rows"),
                _param("outcome", {"type": "string", "enum": list(OUTCOMES)}, "only rows with this outcome"),
                _param(
                    "end_user",
                    {"type": "string", "minLength": 1, "maxLength": 128},
                    "only this end user's rows",
                ),
                _param("tag", {"type": "string", "minLength": 1, "maxLength": 64}, "only rows with this tag"),
                *TIME_RANGE,
                _param("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}, "page size (100)"),
                _param("cursor", STRING, "`next_cursor` of the previous page"),
            ],
        )
    },
}


# Alerts (contract sections 5, 6 and 9): soft budgets and thresholds, events, webhook tests.
_THRESHOLDS = {
    "type": "array",
    "items": {"type": "integer", "minimum": MIN_THRESHOLD, "maximum": MAX_THRESHOLD},
    "maxItems": MAX_THRESHOLDS,
    "description": "percentages of the limit at which an alert is emitted",
}
SCHEMAS["BudgetPut"]["properties"].update(
    {
        "enforce": {"type": "boolean", "description": "false: a soft budget, counted, never refusing"},
        "alert_at": _nullable({**_THRESHOLDS, "description": "null or absent: GATEWAY_ALERT_THRESHOLDS"}),
    }
)
SCHEMAS["Budget"]["properties"].update({"enforce": {"type": "boolean"}, "alert_at": _THRESHOLDS})
SCHEMAS["Budget"]["required"] += ["enforce", "alert_at"]
SCHEMAS.update(
    {
        "Delivery": _object(
            {
                "endpoint": STRING,
                "state": {"type": "string", "enum": ["pending", "delivered", "gave_up"]},
                "attempts": INTEGER,
                "last_error": _nullable(STRING),
                "last_status": _nullable(INTEGER),
                "next_attempt_at": _nullable(TIME),
                "delivered_at": _nullable(TIME),
            },
            ("endpoint", "state", "attempts", "last_error", "last_status", "next_attempt_at", "delivered_at"),
        ),
        "Event": _object(
            {
                "id": STRING,
                "type": {"type": "string", "enum": list(EVENT_TYPES)},
                "created_at": TIME,
                "data": _object(
                    {
                        "scope": SCOPE,
                        "subject": STRING,
                        "period": {"type": "string", "enum": list(PERIODS)},
                        "window_start": TIME,
                        "resets_at": _nullable(TIME),
                        "threshold": INTEGER,
                        "limit": NUMBER,
                        "spent": NUMBER,
                        "remaining": NUMBER,
                        "enforce": {"type": "boolean"},
                    }
                ),
                "state": {"type": "string", "enum": ["pending", "delivered", "gave_up"]},
                "attempts": INTEGER,
                "last_error": _nullable(STRING),
                "rearmed_at": _nullable(TIME),
                "deliveries": _array(_ref("Delivery")),
            },
            ("id", "type", "created_at", "data", "state", "attempts", "last_error", "deliveries"),
        ),
        "EventPage": _object(
            {"events": _array(_ref("Event")), "next_cursor": _nullable(STRING)}, ("events", "next_cursor")
        ),
        "WebhookTest": _object(
            {
                "endpoint": STRING,
                "format": {"type": "string", "enum": ["standard", "slack"]},
                "id": STRING,
                "ok": {"type": "boolean"},
                "status": _nullable(INTEGER),
                "error": _nullable(STRING),
                "duration_ms": NUMBER,
            },
            ("endpoint", "format", "id", "ok", "status", "error", "duration_ms"),
        ),
    }
)
PATHS.update(
    {
        "/admin/v1/events": {
            "get": _admin(
                "Alert events in (created_at, id) order with their delivery state, one page",
                _responses({200: _ok("A page and the cursor of the next", _ref("EventPage"))}, *ADMIN_ERRORS),
                operationId="listEvents",
                parameters=[
                    _param("type", {"type": "string", "enum": list(EVENT_TYPES)}, "only events of this type"),
                    *TIME_RANGE,
                    _param(
                        "limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}, "page size (100)"
                    ),
                    _param("cursor", STRING, "`next_cursor` of the previous page"),
                ],
            )
        },
        "/admin/v1/webhooks/test": {
            "post": _admin(
                "Send a webhook.test event to every configured webhook; each one's answer",
                _responses({200: _ok("One result per webhook", _array(_ref("WebhookTest")))}, *ADMIN_ERRORS),
                operationId="testWebhooks",
            )
        },
    }
)


# Ledger adjustments (contract section 11).
SCHEMAS.update(
    {
        "AdjustmentPost": _object(
            {
                "credits": {
                    "oneOf": [{"type": "number"}, {"type": "string"}],
                    "description": "signed credits, not zero: negative refunds",
                },
                "reason": {"type": "string", "minLength": 1, "maxLength": MAX_REASON},
            },
            ("credits", "reason"),
        ),
        "Adjustment": _object(
            {
                "request_id": STRING,
                "credits": NUMBER,
                "reason": STRING,
                "total": {"type": "number", "description": "the request's charge plus all its adjustments"},
                "windows": {"type": "integer", "description": "budget windows whose counters moved"},
            },
            ("request_id", "credits", "reason", "total", "windows"),
        ),
    }
)
PATHS["/admin/v1/ledger/{request_id}/adjust"] = {
    "post": _admin(
        "Correct a request's charge: an adjustment appended to its ledger row, applied to its budget windows",
        _responses({201: _ok("The adjustment", _ref("Adjustment"))}, *ADMIN_ERRORS, 404, 413),
        operationId="adjustLedger",
        parameters=[_param("request_id", {"type": "string", "minLength": 1}, "the request's id", "path")],
        requestBody=_body("AdjustmentPost"),
    )
}


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
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
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
