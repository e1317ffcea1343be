"""OpenAPI of `POST /admin/v1/apply`: the organisation file in, its plan (or what was applied) out."""

from __future__ import annotations

from typing import Any

from gateway.web.openapi_base import (
    INTEGER,
    STRING,
    admin_op,
    array,
    nullable,
    obj,
    ok,
    param,
    ref,
    responses,
)

FLAG = {"type": "string", "enum": ["0", "1", "false", "true"]}
COUNT = {"type": "integer", "minimum": 0}

PATHS: dict[str, Any] = {
    "/admin/v1/apply": {
        "post": admin_op(
            "Make the organisation (teams, users, keys, budgets, limits) match a TOML file, in one "
            "transaction; with plan=1 only say what would change",
            responses({200: ok("The changes, made or planned", ref("ApplyResult"))}, 400, 401, 403, 413, 503),
            operationId="applyOrganisation",
            parameters=[
                param("plan", FLAG, "1: make no change, answer the plan"),
                param("prune", FLAG, "1: also delete budgets and revoke keys the file does not declare"),
            ],
            requestBody={
                "required": True,
                "content": {"application/toml": {"schema": {"type": "string"}}},
            },
        )
    }
}

SCHEMAS: dict[str, Any] = {
    "ApplyChange": obj(
        {
            "action": {"type": "string", "enum": ["create", "change", "delete", "revoke"]},
            "kind": {"type": "string", "enum": ["team", "user", "key", "budget", "limit"]},
            "target": STRING,
            "line": nullable(INTEGER),
            "before": {"type": "object", "nullable": True},
            "after": {"type": "object", "nullable": True},
        },
        ("action", "kind", "target", "line", "before", "after"),
    ),
    "ApplyResult": obj(
        {
            "file": STRING,
            "sha256": STRING,
            "applied": {"type": "boolean", "description": "false for a plan"},
            "prune": {"type": "boolean"},
            "summary": obj(
                {"create": COUNT, "change": COUNT, "delete": COUNT}, ("create", "change", "delete")
            ),
            "changes": array(ref("ApplyChange")),
            "created_keys": array(
                obj(
                    {"id": STRING, "user": STRING, "name": STRING, "key": STRING},
                    ("id", "user", "name", "key"),
                )
            ),
        },
        ("file", "sha256", "applied", "prune", "summary", "changes", "created_keys"),
    ),
}
