"""The admin HTTP API, `/admin/v1/*`: the CLI's administration over HTTP, behind GATEWAY_ADMIN_TOKEN.

Every handler checks the token first (403 `admin_disabled` when none is configured, 401
`unauthorized` when it is missing or wrong; compared in constant time), then validates its
parameters (400 naming the field; unknown body fields and query parameters are refused, so a typo
never silently widens a report) and runs one `services`, `reports` or `ledger` unit of work. The
JSON answered is the one `gateway ... --json` prints. Every change is audited with the actor
`admin-api <client address>`.
"""

from __future__ import annotations

import functools
from typing import Any

from aiohttp import web

from gateway.core.metering import now_us
from gateway.errors import InvalidRequest
from gateway.jsonout import json_response
from gateway.ops import (
    access,
    adjustments,
    apply,
    audit,
    budgeting,
    events,
    ledger,
    limiting,
    orgfile,
    reports,
    services,
    webhooks,
)
from gateway.web.admin_request import (
    admin_only,
    budgets_changed,
    change,
    json_body,
    priced_models,
    query_params,
    run,
)
from gateway.web.body import read_body
from gateway.web.state import GAUGES, SETTINGS, STORE

PREFIX = "/admin/v1"


def add_routes(router: web.UrlDispatcher) -> None:
    """Register every admin endpoint."""
    router.add_post(f"{PREFIX}/teams", create_team)
    router.add_get(f"{PREFIX}/teams", list_teams)
    router.add_post(f"{PREFIX}/users", create_user)
    router.add_get(f"{PREFIX}/users", list_users)
    router.add_post(f"{PREFIX}/keys", create_key)
    router.add_get(f"{PREFIX}/keys", list_keys)
    router.add_delete(f"{PREFIX}/keys/{{id}}", revoke_key)
    router.add_patch(f"{PREFIX}/keys/{{id}}", set_key)
    router.add_post(f"{PREFIX}/keys/{{id}}/block", block_key)
    router.add_post(f"{PREFIX}/keys/{{id}}/unblock", unblock_key)
    router.add_post(f"{PREFIX}/keys/{{id}}/rotate", rotate_key)
    router.add_patch(f"{PREFIX}/teams/{{name}}", set_team)
    router.add_patch(f"{PREFIX}/users/{{name}}", set_user)
    router.add_get(f"{PREFIX}/audit", list_audit)
    router.add_put(f"{PREFIX}/budgets", set_budget)
    router.add_delete(f"{PREFIX}/budgets", delete_budget)
    router.add_get(f"{PREFIX}/budgets", list_budgets)
    router.add_put(f"{PREFIX}/limits", set_limit)
    router.add_get(f"{PREFIX}/limits", list_limits)
    router.add_delete(f"{PREFIX}/limits/{{id}}", delete_limit)
    router.add_get(f"{PREFIX}/usage", usage_report)
    router.add_get(f"{PREFIX}/ledger", list_ledger)
    router.add_post(f"{PREFIX}/ledger/{{request_id}}/adjust", adjust_ledger)
    router.add_get(f"{PREFIX}/events", list_events)
    router.add_post(f"{PREFIX}/webhooks/test", test_webhooks)
    router.add_post(f"{PREFIX}/apply", apply_org)


@admin_only
async def create_team(request: web.Request) -> web.Response:
    """POST /admin/v1/teams {"name"} -> 201."""
    body = await json_body(request, ("name",))
    return json_response(await change(request, services.create_team, body.get("name"), now_us()), status=201)


@admin_only
async def list_teams(request: web.Request) -> web.Response:
    """GET /admin/v1/teams."""
    query_params(request, ())
    return json_response(await run(request, services.list_teams))


@admin_only
async def create_user(request: web.Request) -> web.Response:
    """POST /admin/v1/users {"name", "team"?} -> 201."""
    body = await json_body(request, ("name", "team"))
    user = await change(request, services.create_user, body.get("name"), body.get("team"), now_us())
    return json_response(user, status=201)


@admin_only
async def list_users(request: web.Request) -> web.Response:
    """GET /admin/v1/users."""
    query_params(request, ())
    return json_response(await run(request, services.list_users))


@admin_only
async def create_key(request: web.Request) -> web.Response:
    """POST /admin/v1/keys {"user", "name"?, "expires_at"?, "models"?} -> 201 with the secret (only here)."""
    body = await json_body(request, ("user", "name", "expires_at", "models"))
    at = now_us()
    expires = access.parse_expiry(body.get("expires_at"), None, at)
    models = access.parse_models(body.get("models"), priced_models(request))
    key = await change(
        request,
        services.create_key,
        body.get("user"),
        body.get("name"),
        at,
        expires_at=expires,
        models=models,
    )
    return json_response(key, status=201)


@admin_only
async def list_keys(request: web.Request) -> web.Response:
    """GET /admin/v1/keys[?user=U] (no secrets)."""
    user = query_params(request, ("user",)).get("user")
    if user is not None:
        services.check_name("user", user)
    return json_response(await run(request, services.list_keys, user))


@admin_only
async def revoke_key(request: web.Request) -> web.Response:
    """DELETE /admin/v1/keys/{id} -> 204; later use of the key is refused."""
    key_id = services.check_name("id", request.match_info["id"])
    await change(request, services.revoke_key, key_id, now_us())
    return web.Response(status=204)


@admin_only
async def set_key(request: web.Request) -> web.Response:
    """PATCH /admin/v1/keys/{id} {"models"?, "expires_at"?, "name"?} -> 200 with the key."""
    key_id = services.check_name("id", request.match_info["id"])
    body = await json_body(request, ("models", "expires_at", "name"))
    at = now_us()
    changes: dict[str, Any] = {}
    if "models" in body:
        changes["models"] = access.parse_models(body["models"], priced_models(request))
    if "expires_at" in body:
        changes["expires_at"] = access.parse_expiry(body["expires_at"], None, at)
    if "name" in body:
        changes["name"] = None if body["name"] is None else services.check_name("name", body["name"])
    return json_response(await change(request, access.set_key, key_id, at, **changes))


@admin_only
async def block_key(request: web.Request) -> web.Response:
    """POST /admin/v1/keys/{id}/block -> 200: refused (401 `blocked`) on every replica within 5 s."""
    key_id = services.check_name("id", request.match_info["id"])
    await json_body(request, (), optional=True)
    return json_response(await change(request, access.block_key, key_id, now_us()))


@admin_only
async def unblock_key(request: web.Request) -> web.Response:
    """POST /admin/v1/keys/{id}/unblock -> 200: works again at once."""
    key_id = services.check_name("id", request.match_info["id"])
    await json_body(request, (), optional=True)
    return json_response(await change(request, access.unblock_key, key_id, now_us()))


@admin_only
async def rotate_key(request: web.Request) -> web.Response:
    """POST /admin/v1/keys/{id}/rotate {"grace_seconds"?} -> 201 with the new key and its secret."""
    key_id = services.check_name("id", request.match_info["id"])
    body = await json_body(request, ("grace_seconds",), optional=True)
    grace = body.get("grace_seconds", 0)
    if isinstance(grace, bool) or not isinstance(grace, int) or not 0 <= grace <= access.MAX_SECONDS:
        raise InvalidRequest(
            "`grace_seconds` must be a whole number of seconds from 0 (the old key stops at once) "
            f"to {access.MAX_SECONDS}.",
            field="grace_seconds",
        )
    key = await change(request, access.rotate_key, key_id, grace, now_us())
    return json_response(key, status=201)


async def _set_models(request: web.Request, kind: str) -> web.Response:
    name = services.check_name("name", request.match_info["name"])
    body = await json_body(request, ("models",))
    if "models" not in body:
        raise InvalidRequest("The body must have `models`: a list of model names, or null for every model.")
    models = access.parse_models(body["models"], priced_models(request))
    return json_response(await change(request, access.set_models, kind, name, models, now_us()))


@admin_only
async def set_team(request: web.Request) -> web.Response:
    """PATCH /admin/v1/teams/{name} {"models"} -> 200: the team's allow-list (null: every model)."""
    return await _set_models(request, "team")


@admin_only
async def set_user(request: web.Request) -> web.Response:
    """PATCH /admin/v1/users/{name} {"models"} -> 200: the user's allow-list (null: every model)."""
    return await _set_models(request, "user")


@admin_only
async def list_audit(request: web.Request) -> web.Response:
    """GET /admin/v1/audit?action=&from=&to=&limit=&cursor=: one page of the audit log, oldest first."""
    params = query_params(request, ("action", "from", "to", "limit", "cursor"))
    query = audit.parse_query(
        action=params.get("action"),
        start=params.get("from"),
        end=params.get("to"),
        limit=params.get("limit"),
        cursor=params.get("cursor"),
    )
    return json_response(await run(request, audit.list_entries, query))


BUDGET_FIELDS = ("scope", "subject", "period", "limit")
RULE_FIELDS = ("timezone", "week_starts", "month_starts_on")


@admin_only
async def set_budget(request: web.Request) -> web.Response:
    """PUT /admin/v1/budgets {"scope", "subject", "period", "limit", "enforce"?, "alert_at"?,
    "timezone"?, "week_starts"?, "month_starts_on"?} -> 200."""
    body = await json_body(request, (*BUDGET_FIELDS, "enforce", "alert_at", *RULE_FIELDS))
    args = [body.get(name) for name in BUDGET_FIELDS]
    options = {
        "enforce": body.get("enforce", True),
        "alert_at": body.get("alert_at"),
        **{name: body.get(name) for name in RULE_FIELDS},
        "rule_defaults": request.app[SETTINGS].window_rule,
    }
    budget = await change(request, budgeting.set_budget, *args, now_us(), **options)
    budgets_changed(request)
    return json_response(budget)


@admin_only
async def delete_budget(request: web.Request) -> web.Response:
    """DELETE /admin/v1/budgets {"scope", "subject", "period"} -> 204."""
    body = await json_body(request, BUDGET_FIELDS[:3])
    await change(request, budgeting.delete_budget, *(body.get(name) for name in BUDGET_FIELDS[:3]))
    budgets_changed(request)
    return web.Response(status=204)


@admin_only
async def list_budgets(request: web.Request) -> web.Response:
    """GET /admin/v1/budgets[?scope=&subject=&expand=] with each budget's current window."""
    params = query_params(request, ("scope", "subject", "expand"))
    expand = params.get("expand", "false")
    if expand not in ("true", "false"):
        raise InvalidRequest(f"`expand` must be true or false; got {expand[:100]!r}.", field="expand")
    list_them = functools.partial(budgeting.list_budgets, expand=expand == "true")
    budgets = await run(request, list_them, params.get("scope"), params.get("subject"))
    return json_response(budgets)


LIMIT_FIELDS = ("scope", "subject", "kind", "limit", "per")


@admin_only
async def set_limit(request: web.Request) -> web.Response:
    """PUT /admin/v1/limits {"scope", "subject", "kind", "limit", "per"?} -> 200."""
    body = await json_body(request, LIMIT_FIELDS)
    limit = await change(request, limiting.set_limit, *(body.get(name) for name in LIMIT_FIELDS), now_us())
    return json_response(limit)


@admin_only
async def delete_limit(request: web.Request) -> web.Response:
    """DELETE /admin/v1/limits/{id} -> 204."""
    await change(request, limiting.delete_limit, request.match_info["id"], now_us())
    return web.Response(status=204)


@admin_only
async def list_limits(request: web.Request) -> web.Response:
    """GET /admin/v1/limits[?scope=&subject=]."""
    params = query_params(request, ("scope", "subject"))
    return json_response(await run(request, limiting.list_limits, params.get("scope"), params.get("subject")))


@admin_only
async def usage_report(request: web.Request) -> web.Response:
    """GET /admin/v1/usage?from=&to=&group_by=[&format=json|csv][&timezone=]: the billing report."""
    params = query_params(request, ("from", "to", "group_by", "format", "timezone"))
    fmt = services.check_choice("format", params.get("format", "json"), ("json", "csv"))
    zone = params.get("timezone", request.app[SETTINGS].timezone)
    query = reports.parse_query(params.get("from"), params.get("to"), params.get("group_by"), zone)
    report = await run(request, reports.usage_report, query)
    if fmt == "csv":
        return web.Response(
            text=report.csv(),
            content_type="text/csv",
            charset="utf-8",
            headers={"Content-Disposition": 'attachment; filename="usage.csv"'},
        )
    return json_response(report.json())


LEDGER_PARAMS = (
    "user",
    "team",
    "key",
    "model",
    "outcome",
    "end_user",
    "tag",
    "from",
    "to",
    "limit",
    "cursor",
)


@admin_only
async def list_ledger(request: web.Request) -> web.Response:
    """GET /admin/v1/ledger?user=&team=&key=&model=&outcome=&end_user=&tag=&from=&to=&limit=&cursor=."""
    params = query_params(request, LEDGER_PARAMS)
    query = ledger.parse_query(
        user=params.get("user"),
        team=params.get("team"),
        key=params.get("key"),
        model=params.get("model"),
        outcome=params.get("outcome"),
        end_user=params.get("end_user"),
        tag=params.get("tag"),
        start=params.get("from"),
        end=params.get("to"),
        limit=params.get("limit"),
        cursor=params.get("cursor"),
    )
    return json_response(await run(request, ledger.list_entries, query))


@admin_only
async def adjust_ledger(request: web.Request) -> web.Response:
    """POST /admin/v1/ledger/{request_id}/adjust {"credits", "reason"} -> 201: a correction."""
    body = await json_body(request, ("credits", "reason"))
    result = await change(
        request,
        adjustments.adjust,
        request.match_info["request_id"],
        body.get("credits"),
        body.get("reason"),
        now_us(),
    )
    request.app[GAUGES].mark_dirty()
    return json_response(result, status=201)


EVENT_PARAMS = ("type", "from", "to", "limit", "cursor")


@admin_only
async def list_events(request: web.Request) -> web.Response:
    """GET /admin/v1/events?type=&from=&to=&limit=&cursor=: alert events and their delivery state."""
    params = query_params(request, EVENT_PARAMS)
    query = events.parse_query(
        type=params.get("type"),
        start=params.get("from"),
        end=params.get("to"),
        limit=params.get("limit"),
        cursor=params.get("cursor"),
    )
    names = webhooks.endpoint_names(request.app[SETTINGS].webhooks)
    return json_response(await run(request, events.list_events, query, names))


@admin_only
async def test_webhooks(request: web.Request) -> web.Response:
    """POST /admin/v1/webhooks/test: a `webhook.test` event to every webhook, and each one's answer."""
    query_params(request, ())
    settings = request.app[SETTINGS]
    async with webhooks.new_session() as session:
        results = await webhooks.send_test(session, settings.webhooks, settings.webhook_timeout_seconds)
    return json_response(results)


def _flag(params: dict[str, str], name: str) -> bool:
    value = params.get(name, "0")
    if value not in ("0", "1", "true", "false"):
        raise InvalidRequest(f"`{name}` must be 1 or 0 (or true or false); got {value[:100]!r}.", field=name)
    return value in ("1", "true")


@admin_only
async def apply_org(request: web.Request) -> web.Response:
    """POST /admin/v1/apply[?plan=1][&prune=1] with an organisation file (TOML) as the body: `gateway
    apply` over HTTP. With `plan`, the changes it would make, and none made."""
    params = query_params(request, ("plan", "prune"))
    plan, prune = _flag(params, "plan"), _flag(params, "prune")
    try:
        source = (await read_body(request, request.app[SETTINGS].max_body_bytes)).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("The body must be an organisation file: TOML text in UTF-8.") from None
    org = orgfile.parse(source, priced_models(request), "body")
    at = now_us()
    if plan:
        return json_response(await request.app[STORE].read(apply.planned, org, at, prune))
    rule = request.app[SETTINGS].window_rule
    outcome = await change(request, apply.apply, org, at, prune=prune, rule_defaults=rule)
    budgets_changed(request)
    return json_response(outcome)
