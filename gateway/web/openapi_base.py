"""OpenAPI building blocks: the field schemas shared by bodies and parameters, the error answers, builders."""

from __future__ import annotations

from typing import Any

from gateway.ops.budgeting import SCOPES
from gateway.ops.services import MAX_NAME
from gateway.web.attribution import MAX_END_USER

JSON = "application/json"
STRING = {"type": "string"}
INTEGER = {"type": "integer"}
NUMBER = {"type": "number"}
TIME = {"type": "string", "format": "date-time"}
NAME = {"type": "string", "minLength": 1, "maxLength": MAX_NAME, "description": "printable characters"}
# A budget's scope (`end_user`: contract section 11).
SCOPE = {"type": "string", "enum": list(SCOPES)}
# A budget's subject: a team or user name, a key id, or `USER/END_USER` or `USER/*` for an end user's.
SUBJECT = {**NAME, "maxLength": MAX_NAME + 1 + MAX_END_USER}
# ("*" is refused: it is the end user of a default budget, USER/*.)
END_USER = {"type": "string", "maxLength": MAX_END_USER, "not": {"enum": ["*"]}}


def ref(name: str) -> dict[str, Any]:
    """A reference to the component schema `name`."""
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema`, or null."""
    return {**schema, "nullable": True}


def obj(properties: dict[str, Any], required: tuple[str, ...] = (), *, closed: bool = True) -> dict[str, Any]:
    """An object schema; closed: no other properties (as the handlers refuse unknown fields)."""
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    if closed:
        schema["additionalProperties"] = False
    return schema


def array(items: dict[str, Any]) -> dict[str, Any]:
    """An array schema of `items`."""
    return {"type": "array", "items": items}


def content(schema: dict[str, Any], media: str = JSON) -> dict[str, Any]:
    """A content map with one media type."""
    return {media: {"schema": schema}}


ERRORS = {
    400: "Invalid request: the `error.field` names the parameter at fault",
    401: "Missing or wrong credentials",
    402: "A budget would go over",
    403: "The admin API is disabled (no GATEWAY_ADMIN_TOKEN); on chat: the model is not allowed for this key",
    404: "Unknown team, user or key",
    409: "The name is taken, or the key is revoked or already rotated",
    413: "The request body is too large",
    429: "Too early: a rate or concurrency limit (rate_limited) or the upstream account's cap "
    "(upstream_rate_limited); with Retry-After, nothing held or forwarded",
    502: "Upstream unavailable",
    503: "The ledger database cannot be reached (ledger_unavailable), or the process is at its "
    "concurrency limit (overloaded, with Retry-After)",
    504: "Upstream timed out",
}


def responses(successes: dict[int, Any], *errors: int) -> dict[str, Any]:
    """An operation's responses: the successful ones given, then the error answers by status."""
    out = {str(status): response for status, response in successes.items()}
    for status in errors:
        schema = ref({402: "BudgetExceeded", 429: "RateLimited"}.get(status, "Error"))
        out[str(status)] = {"description": ERRORS[status], "content": content(schema)}
    return out


def ok(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON response, or one with no body."""
    return {"description": description, **({"content": content(schema)} if schema else {})}


def param(name: str, schema: dict[str, Any], description: str, where: str = "query") -> dict[str, Any]:
    """A parameter, required only in the path."""
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "schema": schema,
        "description": description,
    }


def admin_op(summary: str, answers: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """An admin API operation, behind the admin token."""
    return {
        "summary": summary,
        "tags": ["admin"],
        "security": [{"adminToken": []}],
        "responses": answers,
        **extra,
    }


def body(name: str) -> dict[str, Any]:
    """A required JSON request body of the component schema `name`."""
    return {"required": True, "content": content(ref(name))}
