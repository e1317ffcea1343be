"""OpenAPI paths of the admin API, `/admin/v1/*`, each behind the admin token."""

from __future__ import annotations

from typing import Any

from gateway.ops.events import TYPES as EVENT_TYPES
from gateway.ops.ledger import MAX_LIMIT, OUTCOMES
from gateway.ops.reports import GROUPS
from gateway.web.openapi_base import (
    JSON,
    NAME,
    SCOPE,
    STRING,
    SUBJECT,
    admin_op,
    array,
    body,
    content,
    ok,
    param,
    ref,
    responses,
)

TIME_RANGE = [
    param("from", STRING, "ISO 8601 date or datetime, UTC unless an offset is given; inclusive"),
    param("to", STRING, "ISO 8601 date or datetime, UTC unless an offset is given; exclusive"),
]
ADMIN_ERRORS = (400, 401, 403, 503)
_GROUP_BY = "(" + "|".join(GROUPS) + ")"

KEY_ID = [param("id", NAME, "the key's id", "path")]


def _key_change(summary: str, operation: str, status: int = 200, **extra: Any) -> dict[str, Any]:
    return admin_op(
        summary,
        responses(
            {status: ok("The key", ref("KeyCreated" if status == 201 else "Key"))}, *ADMIN_ERRORS, 404, 409
        ),
        operationId=operation,
        parameters=KEY_ID,
        **extra,
    )


def _models_patch(kind: str) -> dict[str, Any]:
    return admin_op(
        f"Set the {kind}'s model allow-list (null: every priced model)",
        responses({200: ok(f"The {kind}", ref(kind.title()))}, *ADMIN_ERRORS, 404, 413),
        operationId=f"set{kind.title()}",
        parameters=[param("name", NAME, f"the {kind}'s name", "path")],
        requestBody=body("ModelsPatch"),
    )


PATHS: dict[str, Any] = {
    "/admin/v1/teams": {
        "post": admin_op(
            "Create a team",
            responses({201: ok("Created", ref("Team"))}, *ADMIN_ERRORS, 409, 413),
            operationId="createTeam",
            requestBody=body("TeamCreate"),
        ),
        "get": admin_op(
            "List teams",
            responses({200: ok("Teams", array(ref("Team")))}, *ADMIN_ERRORS),
            operationId="listTeams",
        ),
    },
    "/admin/v1/users": {
        "post": admin_op(
            "Create a user, optionally in a team",
            responses({201: ok("Created", ref("User"))}, *ADMIN_ERRORS, 404, 409, 413),
            operationId="createUser",
            requestBody=body("UserCreate"),
        ),
        "get": admin_op(
            "List users",
            responses({200: ok("Users", array(ref("User")))}, *ADMIN_ERRORS),
            operationId="listUsers",
        ),
    },
    "/admin/v1/keys": {
        "post": admin_op(
            "Create a key for a user; the secret is in this answer only",
            responses({201: ok("Created", ref("KeyCreated"))}, *ADMIN_ERRORS, 404, 413),
            operationId="createKey",
            requestBody=body("KeyCreate"),
        ),
        "get": admin_op(
            "List keys (no secrets)",
            responses({200: ok("Keys", array(ref("Key")))}, *ADMIN_ERRORS, 404),
            operationId="listKeys",
            parameters=[param("user", NAME, "only this user's keys")],
        ),
    },
    "/admin/v1/keys/{id}": {
        "delete": admin_op(
            "Revoke a key (again: no change)",
            responses({204: ok("Revoked")}, *ADMIN_ERRORS, 404),
            operationId="revokeKey",
            parameters=KEY_ID,
        ),
        "patch": _key_change("Change a key's models, expiry or name", "setKey", requestBody=body("KeyPatch")),
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
            requestBody={"required": False, "content": content(ref("KeyRotate"))},
        )
    },
    "/admin/v1/teams/{name}": {"patch": _models_patch("team")},
    "/admin/v1/users/{name}": {"patch": _models_patch("user")},
    "/admin/v1/audit": {
        "get": admin_op(
            "Administrative changes in (at, id) order, one page",
            responses({200: ok("A page and the cursor of the next", ref("AuditPage"))}, *ADMIN_ERRORS),
            operationId="listAudit",
            parameters=[
                param("action", {"type": "string", "minLength": 1, "maxLength": 64}, "only this action"),
                *TIME_RANGE,
                param("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}, "page size (100)"),
                param("cursor", STRING, "`next_cursor` of the previous page"),
            ],
        )
    },
    "/admin/v1/budgets": {
        "put": admin_op(
            "Create a budget or change its limit",
            responses({200: ok("The budget in its current window", ref("Budget"))}, *ADMIN_ERRORS, 404, 413),
            operationId="setBudget",
            requestBody=body("BudgetPut"),
        ),
        "delete": admin_op(
            "Delete a budget",
            responses({204: ok("Deleted")}, *ADMIN_ERRORS, 404, 413),
            operationId="deleteBudget",
            requestBody=body("BudgetDelete"),
        ),
        "get": admin_op(
            "Budgets with their current window's spent, held and remaining",
            responses({200: ok("Budgets", array(ref("Budget")))}, *ADMIN_ERRORS, 404),
            operationId="listBudgets",
            parameters=[
                param("scope", SCOPE, "only budgets of this scope"),
                param("subject", SUBJECT, "only this team, user, key or end user (needs scope)"),
                param(
                    "expand",
                    {"type": "boolean"},
                    "also list the per-end-user budgets created from `USER/*` defaults (default false)",
                ),
            ],
        ),
    },
    "/admin/v1/usage": {
        "get": admin_op(
            "Billing report: charged requests, messages, credits and tokens, grouped",
            responses(
                {
                    200: {
                        "description": "Rows and totals (CSV: a header row and the rows)",
                        "content": {JSON: {"schema": ref("Report")}, "text/csv": {"schema": STRING}},
                    }
                },
                *ADMIN_ERRORS,
            ),
            operationId="usageReport",
            parameters=[
                *TIME_RANGE,
                param(
                    "group_by",
                    {"type": "string", "pattern": rf"^(\s*{_GROUP_BY}\s*(,\s*{_GROUP_BY}\s*)*)?$"},
                    "comma-separated distinct group fields; empty: no grouping, one row of totals",
                ),
                param("format", {"type": "string", "enum": ["json", "csv"]}, "json (default) or csv"),
                param(
                    "timezone",
                    {"type": "string", "minLength": 1, "maxLength": 64},
                    "the IANA zone of `day` and `month`, and of `from`/`to` without an offset "
                    "(default: GATEWAY_TIMEZONE)",
                ),
            ],
        )
    },
    "/admin/v1/ledger": {
        "get": admin_op(
            "Ledger rows in (admitted_at, request_id) order, one page",
            responses({200: ok("A page and the cursor of the next", ref("LedgerPage"))}, *ADMIN_ERRORS, 404),
            operationId="listLedger",
            parameters=[
                param("user", NAME, "only this user's rows"),
                param("team", NAME, "only this team's rows"),
                param("key", NAME, "only this key's rows (key id)"),
                param("model", NAME, "only this model's rows"),
                param("outcome", {"type": "string", "enum": list(OUTCOMES)}, "only rows with this outcome"),
                param(
                    "end_user",
                    {"type": "string", "minLength": 1, "maxLength": 128},
                    "only this end user's rows",
                ),
                param("tag", {"type": "string", "minLength": 1, "maxLength": 64}, "only rows with this tag"),
                *TIME_RANGE,
                param("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}, "page size (100)"),
                param("cursor", STRING, "`next_cursor` of the previous page"),
            ],
        )
    },
    # Alerts (contract sections 5, 6 and 9).
    "/admin/v1/events": {
        "get": admin_op(
            "Alert events in (created_at, id) order with their delivery state, one page",
            responses({200: ok("A page and the cursor of the next", ref("EventPage"))}, *ADMIN_ERRORS),
            operationId="listEvents",
            parameters=[
                param("type", {"type": "string", "enum": list(EVENT_TYPES)}, "only events of this type"),
                *TIME_RANGE,
                param("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}, "page size (100)"),
                param("cursor", STRING, "`next_cursor` of the previous page"),
            ],
        )
    },
    "/admin/v1/webhooks/test": {
        "post": admin_op(
            "Send a webhook.test event to every configured webhook; each one's answer",
            responses({200: ok("One result per webhook", array(ref("WebhookTest")))}, *ADMIN_ERRORS),
            operationId="testWebhooks",
        )
    },
    # Ledger adjustments (contract section 11).
    "/admin/v1/ledger/{request_id}/adjust": {
        "post": admin_op(
            "Correct a request's charge: an adjustment appended to its ledger row, applied to its "
            "budget windows",
            responses({201: ok("The adjustment", ref("Adjustment"))}, *ADMIN_ERRORS, 404, 413),
            operationId="adjustLedger",
            parameters=[param("request_id", {"type": "string", "minLength": 1}, "the request's id", "path")],
            requestBody=body("AdjustmentPost"),
        )
    },
}
