"""OpenAPI of rate and concurrency limits (contract §13): `/admin/v1/limits`, the Limit objects shown
in keys and in `/api/v1/usage`, the 429 answers and the x-ratelimit-* headers of chat answers."""

from __future__ import annotations

from typing import Any

from gateway.core.ratelimits import KINDS, PERIODS
from gateway.ops.limiting import MAX_CONCURRENT, MAX_REQUESTS_PER_SECOND
from gateway.web.openapi_admin import ADMIN_ERRORS
from gateway.web.openapi_base import (
    INTEGER,
    NAME,
    NUMBER,
    SCOPE,
    STRING,
    SUBJECT,
    admin_op,
    array,
    body,
    nullable,
    obj,
    ok,
    param,
    ref,
    responses,
)

KIND = {"type": "string", "enum": list(KINDS)}
PER = {"type": "string", "enum": list(PERIODS)}
# The most requests a limit may name: a million a second, over a day.
_MOST = max(MAX_CONCURRENT, MAX_REQUESTS_PER_SECOND * PERIODS["day"])

PATHS: dict[str, Any] = {
    "/admin/v1/limits": {
        "put": admin_op(
            "Create a rate or concurrency limit, or change its number",
            responses({200: ok("The limit", ref("Limit"))}, *ADMIN_ERRORS, 404, 413),
            operationId="setLimit",
            requestBody=body("LimitPut"),
        ),
        "get": admin_op(
            "Rate and concurrency limits",
            responses({200: ok("Limits", array(ref("Limit")))}, *ADMIN_ERRORS, 404),
            operationId="listLimits",
            parameters=[
                param("scope", SCOPE, "only limits of this scope"),
                param("subject", SUBJECT, "only this team, user, key or end user (needs scope)"),
            ],
        ),
    },
    "/admin/v1/limits/{id}": {
        "delete": admin_op(
            "Delete a limit",
            responses({204: ok("Deleted")}, *ADMIN_ERRORS, 404),
            operationId="deleteLimit",
            parameters=[param("id", NAME, "the limit's id", "path")],
        )
    },
}

_LIMIT_FIELDS: dict[str, Any] = {
    "id": INTEGER,
    "scope": SCOPE,
    "subject": STRING,
    "kind": KIND,
    "limit": NUMBER,
    "per": {**PER, "nullable": True, "description": "null for concurrent"},
    "default": {"type": "boolean", "description": "an end-user default (USER/*)"},
}

SCHEMAS: dict[str, Any] = {
    "LimitPut": obj(
        {
            "scope": SCOPE,
            "subject": SUBJECT,
            "kind": KIND,
            "limit": {
                "oneOf": [
                    {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": max(MAX_CONCURRENT, MAX_REQUESTS_PER_SECOND),
                    },
                    {"type": "string"},
                ],
                "description": "requests or requests in flight (a whole number), or credits",
            },
            "per": {
                **PER,
                "nullable": True,
                "description": "the rate's period (default minute); none for concurrent",
            },
        },
        ("scope", "subject", "kind", "limit"),
    ),
    "Limit": obj(_LIMIT_FIELDS, tuple(_LIMIT_FIELDS)),
    "LimitUsage": obj(
        {
            **_LIMIT_FIELDS,
            "remaining": {**NUMBER, "description": "a rate's requests or credits left now"},
            "reset": {**STRING, "description": "until the rate is whole again, e.g. 6m0s"},
            "in_flight": nullable(INTEGER),
        },
        tuple(_LIMIT_FIELDS),
    ),
    "RateLimited": obj(
        {
            "error": obj(
                {
                    "type": {"type": "string", "enum": ["rate_limited", "upstream_rate_limited"]},
                    "message": STRING,
                    "scope": SCOPE,
                    "subject": STRING,
                    "kind": KIND,
                    "limit": NUMBER,
                    "per": nullable(PER),
                    "retry_after": nullable(INTEGER),
                },
                ("type", "message"),
                closed=False,
            )
        },
        ("error",),
    ),
}

# On chat answers where a rate applies (OpenAI's names; credits in place of tokens).
RATE_HEADERS = {
    f"x-ratelimit-{what}-{kind}": {"schema": STRING, "description": f"{what} of the tightest {kind} rate"}
    for kind in ("requests", "credits")
    for what in ("limit", "remaining", "reset")
}
