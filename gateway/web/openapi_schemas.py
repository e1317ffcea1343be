"""The OpenAPI document's component schemas: request bodies, answers and errors."""

from __future__ import annotations

from typing import Any

from gateway.core.alerts import MAX_THRESHOLD, MAX_THRESHOLDS, MIN_THRESHOLD
from gateway.core.windows import MAX_MONTH_DAY, PERIODS, WEEKDAYS
from gateway.ops.access import MAX_MODELS, MAX_SECONDS
from gateway.ops.adjustments import MAX_REASON
from gateway.ops.events import TYPES as EVENT_TYPES
from gateway.ops.ledger import OUTCOMES
from gateway.ops.reports import CREDIT_SUMS, GROUPS, SUMS
from gateway.web.openapi_base import (
    INTEGER,
    NAME,
    NUMBER,
    SCOPE,
    STRING,
    SUBJECT,
    TIME,
    array,
    nullable,
    obj,
    ref,
)

MODELS = {
    "type": "array",
    "items": STRING,
    "minItems": 1,
    "maxItems": MAX_MODELS,
    "nullable": True,
    "description": "an allow-list of priced models; null: every priced model",
}
EXPIRES = {**TIME, "nullable": True, "description": "when the key stops working (in the future); null: never"}
SUMS_SCHEMA = obj({name: NUMBER if name in CREDIT_SUMS else INTEGER for name in SUMS}, SUMS)
# Where a budget's windows begin (contract section 14).
TIMEZONE = {
    "type": "string",
    "minLength": 1,
    "maxLength": 64,
    "description": "an IANA time zone, e.g. America/Los_Angeles: windows begin at its local midnight",
}
WEEK_STARTS = {"type": "string", "enum": list(WEEKDAYS), "description": "the first day of a weekly window"}
MONTH_STARTS_ON = {
    "type": "integer",
    "minimum": 1,
    "maximum": MAX_MONTH_DAY,
    "description": "the day of the month a monthly window begins on (a billing cycle)",
}
# A budget's alert thresholds (contract section 9).
THRESHOLDS = {
    "type": "array",
    "items": {"type": "integer", "minimum": MIN_THRESHOLD, "maximum": MAX_THRESHOLD},
    "maxItems": MAX_THRESHOLDS,
    "description": "percentages of the limit at which an alert is emitted",
}

KEY_FIELDS: dict[str, Any] = {
    "id": STRING,
    "user": STRING,
    "name": nullable(STRING),
    "prefix": STRING,
    "created_at": TIME,
    "revoked_at": {**TIME, "nullable": True, "description": "in the future: a rotated key's grace ends then"},
    "expires_at": nullable(TIME),
    "blocked": {"type": "boolean"},
    "models": MODELS,
    "rotated_to": nullable(STRING),
    "last_used_at": {**TIME, "nullable": True, "description": "to within a minute"},
    "limits": {**array(ref("Limit")), "description": "the key's own rate and concurrency limits"},
}

LEDGER_FIELDS: dict[str, Any] = {
    "request_id": STRING,
    "admitted_at": TIME,
    "settled_at": TIME,
    "team": nullable(STRING),
    "user": STRING,
    "key_id": STRING,
    "model": STRING,
    "message_count": INTEGER,
    "unit_price": NUMBER,
    "credits": NUMBER,
    "outcome": {"type": "string", "enum": list(OUTCOMES)},
    "upstream_status": nullable(INTEGER),
    "prompt_tokens": nullable(INTEGER),
    "completion_tokens": nullable(INTEGER),
    "total_tokens": nullable(INTEGER),
    "stream": {"type": "boolean"},
    "duration_ms": NUMBER,
    "end_user": nullable(STRING),
    "tags": array(STRING),
    "adjustments": NUMBER,
}

SCHEMAS: dict[str, Any] = {
    "Error": obj(
        {
            "error": obj(
                {"type": STRING, "message": STRING, "field": STRING}, ("type", "message"), closed=False
            )
        },
        ("error",),
    ),
    "BudgetExceeded": obj(
        {
            "error": obj(
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
                    "resets_at": nullable(TIME),
                },
                ("type", "message", "scope", "subject", "period", "limit", "spent", "held", "remaining"),
                closed=False,
            )
        },
        ("error",),
    ),
    "ChatRequest": obj(
        {
            "model": {"type": "string", "description": "A priced model, e.g. openai/gpt-oss-20b"},
            "messages": {
                "type": "array",
                "minItems": 1,
                "items": obj({"role": STRING}, ("role",), closed=False),
            },
            "stream": {"type": "boolean", "nullable": True, "description": "null means false"},
        },
        ("model", "messages"),
        closed=False,
    ),
    "TeamCreate": obj({"name": NAME}, ("name",)),
    "UserCreate": obj({"name": NAME, "team": nullable(NAME)}, ("name",)),
    "KeyCreate": obj(
        {"user": NAME, "name": nullable(NAME), "expires_at": EXPIRES, "models": MODELS}, ("user",)
    ),
    "KeyPatch": obj({"name": nullable(NAME), "models": MODELS, "expires_at": EXPIRES}),
    "KeyRotate": obj(
        {
            "grace_seconds": {
                "type": "integer",
                "minimum": 0,
                "maximum": MAX_SECONDS,
                "description": "how long the old key keeps working (default 0)",
            }
        }
    ),
    "ModelsPatch": obj({"models": MODELS}, ("models",)),
    "BudgetPut": obj(
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
            "enforce": {"type": "boolean", "description": "false: a soft budget, counted, never refusing"},
            "alert_at": nullable({**THRESHOLDS, "description": "null or absent: GATEWAY_ALERT_THRESHOLDS"}),
            "timezone": nullable(
                {
                    **TIMEZONE,
                    "description": f"{TIMEZONE['description']}; null or absent: the budget's, "
                    "or GATEWAY_TIMEZONE for a new one",
                }
            ),
            "week_starts": nullable(
                {
                    **WEEK_STARTS,
                    "description": "null or absent: the budget's, or GATEWAY_WEEK_STARTS for a new one",
                }
            ),
            "month_starts_on": nullable(
                {**MONTH_STARTS_ON, "description": "null or absent: the budget's, or 1 for a new one"}
            ),
        },
        ("scope", "subject", "period", "limit"),
    ),
    "BudgetDelete": obj(
        {
            "scope": SCOPE,
            "subject": SUBJECT,
            "period": {"type": "string", "enum": list(PERIODS)},
        },
        ("scope", "subject", "period"),
    ),
    "Team": obj(
        {"id": INTEGER, "name": STRING, "created_at": TIME, "models": MODELS},
        ("id", "name", "created_at", "models"),
    ),
    "User": obj(
        {"id": INTEGER, "name": STRING, "team": nullable(STRING), "created_at": TIME, "models": MODELS},
        ("id", "name", "team", "created_at", "models"),
    ),
    "Key": obj(KEY_FIELDS, tuple(KEY_FIELDS)),
    "KeyCreated": obj(
        {
            **KEY_FIELDS,
            "key": {"type": "string", "description": "the secret: shown only in this answer"},
            "rotated_from": {"type": "string", "description": "the key this one replaces (rotation only)"},
        },
        ("key", *KEY_FIELDS),
    ),
    "ModelList": obj(
        {
            "object": {"type": "string", "enum": ["list"]},
            "data": array(
                obj(
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
    "AuditEntry": obj(
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
    "AuditPage": obj(
        {"entries": array(ref("AuditEntry")), "next_cursor": nullable(STRING)}, ("entries", "next_cursor")
    ),
    "Budget": obj(
        {
            "scope": SCOPE,
            "subject": STRING,
            "period": {"type": "string", "enum": list(PERIODS)},
            "limit": NUMBER,
            "spent": NUMBER,
            "held": NUMBER,
            "remaining": NUMBER,
            "window_start": TIME,
            "resets_at": nullable(TIME),
            "default": {"type": "boolean", "description": "true for a `USER/*` default (scope end_user)"},
            "from_default": nullable(
                {
                    "type": "string",
                    "description": "the `USER/*` default this per-end-user budget was created from",
                }
            ),
            "enforce": {"type": "boolean"},
            "alert_at": THRESHOLDS,
            "timezone": TIMEZONE,
            "week_starts": WEEK_STARTS,
            "month_starts_on": MONTH_STARTS_ON,
        },
        (
            "scope",
            "subject",
            "period",
            "limit",
            "spent",
            "held",
            "remaining",
            "window_start",
            "resets_at",
            "enforce",
            "alert_at",
            "timezone",
            "week_starts",
            "month_starts_on",
        ),
    ),
    "Report": obj(
        {
            "rows": array(
                obj(
                    {
                        **{
                            g: nullable(STRING) if g in ("team", "end_user", "tag") else STRING
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
    "LedgerEntry": obj(LEDGER_FIELDS, tuple(LEDGER_FIELDS)),
    "LedgerPage": obj(
        {"entries": array(ref("LedgerEntry")), "next_cursor": nullable(STRING)}, ("entries", "next_cursor")
    ),
    "SelfUsage": obj(
        {
            "key": obj({"id": STRING, "user": STRING, "team": nullable(STRING)}, ("id", "user", "team")),
            "budgets": array(ref("Budget")),
            "limits": array(ref("LimitUsage")),
            "usage": array(
                obj(
                    {
                        "period": {"type": "string", "enum": ["daily", "weekly", "monthly"]},
                        "window_start": TIME,
                        "resets_at": TIME,
                        "key": ref("UsageSums"),
                        "user": ref("UsageSums"),
                    },
                    ("period", "window_start", "resets_at", "key", "user"),
                )
            ),
        },
        ("key", "budgets", "limits", "usage"),
    ),
    "UsageSums": obj(
        {"requests": INTEGER, "messages": INTEGER, "credits": NUMBER}, ("requests", "messages", "credits")
    ),
    # Alerts (contract sections 5, 6 and 9): events with their deliveries, webhook tests.
    "Delivery": obj(
        {
            "endpoint": STRING,
            "state": {"type": "string", "enum": ["pending", "delivered", "gave_up"]},
            "attempts": INTEGER,
            "last_error": nullable(STRING),
            "last_status": nullable(INTEGER),
            "next_attempt_at": nullable(TIME),
            "delivered_at": nullable(TIME),
        },
        ("endpoint", "state", "attempts", "last_error", "last_status", "next_attempt_at", "delivered_at"),
    ),
    "Event": obj(
        {
            "id": STRING,
            "type": {"type": "string", "enum": list(EVENT_TYPES)},
            "created_at": TIME,
            "data": obj(
                {
                    "scope": SCOPE,
                    "subject": STRING,
                    "period": {"type": "string", "enum": list(PERIODS)},
                    "window_start": TIME,
                    "resets_at": nullable(TIME),
                    "threshold": INTEGER,
                    "limit": NUMBER,
                    "spent": NUMBER,
                    "remaining": NUMBER,
                    "enforce": {"type": "boolean"},
                }
            ),
            "state": {"type": "string", "enum": ["pending", "delivered", "gave_up"]},
            "attempts": INTEGER,
            "last_error": nullable(STRING),
            "rearmed_at": nullable(TIME),
            "deliveries": array(ref("Delivery")),
        },
        ("id", "type", "created_at", "data", "state", "attempts", "last_error", "deliveries"),
    ),
    "EventPage": obj(
        {"events": array(ref("Event")), "next_cursor": nullable(STRING)}, ("events", "next_cursor")
    ),
    "WebhookTest": obj(
        {
            "endpoint": STRING,
            "format": {"type": "string", "enum": ["standard", "slack"]},
            "id": STRING,
            "ok": {"type": "boolean"},
            "status": nullable(INTEGER),
            "error": nullable(STRING),
            "duration_ms": NUMBER,
        },
        ("endpoint", "format", "id", "ok", "status", "error", "duration_ms"),
    ),
    # Ledger adjustments (contract section 11).
    "AdjustmentPost": obj(
        {
            "credits": {
                "oneOf": [{"type": "number"}, {"type": "string"}],
                "description": "signed credits, not zero: negative refunds",
            },
            "reason": {"type": "string", "minLength": 1, "maxLength": MAX_REASON},
        },
        ("credits", "reason"),
    ),
    "Adjustment": obj(
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
