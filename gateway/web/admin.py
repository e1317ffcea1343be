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
import hmac
import json
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

from aiohttp import web

from gateway.core.metering import now_us
from gateway.errors import AdminDisabled, InvalidRequest, Unauthorized
from gateway.jsonout import json_response
from gateway.ops import access, adjustments, audit, events, ledger, reports, services, webhooks
from gateway.web.auth import bearer_token
from gateway.web.body import read_body
from gateway.web.state import GAUGES, KEYS, SETTINGS, STORE

PREFIX = "/admin/v1"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
    router.add_get(f"{PREFIX}/usage", usage_report)
    router.add_get(f"{PREFIX}/ledger", list_ledger)
    router.add_post(f"{PREFIX}/ledger/{{request_id}}/adjust", adjust_ledger)
    router.add_get(f"{PREFIX}/events", list_events)
    router.add_post(f"{PREFIX}/webhooks/test", test_webhooks)


def authorize(request: web.Request) -> None:
    """Raise AdminDisabled or Unauthorized unless the request carries the admin token."""
    token = request.app[SETTINGS].admin_token
    if token is None:
        raise AdminDisabled(
            "The admin HTTP API is disabled: set GATEWAY_ADMIN_TOKEN to enable it, or administer "
            "with the `gateway` command on the database."
        )
    given = bearer_token(request.headers.get("Authorization"))
    if given is None or not hmac.compare_digest(given.encode(), str(token).encode()):
        raise Unauthorized("The admin API needs 'Authorization: Bearer <GATEWAY_ADMIN_TOKEN>'.")


def _admin(handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def checked(request: web.Request) -> web.StreamResponse:
        authorize(request)
        return await handler(request)

    return checked


def query_params(request: web.Request, allowed: tuple[str, ...]) -> dict[str, str]:
    """The query string's parameters; InvalidRequest naming one this endpoint does not take."""
    for name in request.query:
        if name not in allowed:
            takes = f"takes {', '.join(allowed)}" if allowed else "takes no query parameters"
            raise InvalidRequest(
                f"Unknown query parameter `{name[:100]}`; this endpoint {takes}.", field=name[:100]
            )
    return {name: request.query[name] for name in allowed if name in request.query}


async def _json_body(
    request: web.Request, allowed: tuple[str, ...], *, optional: bool = False
) -> dict[str, Any]:
    body = await read_body(request, request.app[SETTINGS].max_body_bytes)
    if optional and not body.strip():
        return {}
    try:
        # A Decimal, not a float, so that a limit of 123456789012.345678 stays exactly that.
        payload = json.loads(body, parse_float=Decimal)
    except (ValueError, RecursionError):
        payload = None
    if not isinstance(payload, dict):
        raise InvalidRequest(f"The request body must be a JSON object with {', '.join(allowed)}.")
    for name in payload:
        if name not in allowed:
            raise InvalidRequest(
                f"Unknown field `{name[:100]}`; this endpoint takes {', '.join(allowed)}.", field=name[:100]
            )
    return payload


async def _run(request: web.Request, fn: Callable[..., Any], *args: Any) -> Any:
    store = request.app[STORE]
    # GETs change nothing: on SQLite they read beside the writes instead of queueing with them.
    return await (store.read(fn, *args) if request.method == "GET" else store.run(fn, *args))


async def _change(request: web.Request, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a change, audited as made by `admin-api <client address>`; this process's key cache forgets."""
    actor = audit.api_actor(request.remote)
    result = await request.app[STORE].run(functools.partial(fn, actor=actor, **kwargs), *args)
    request.app[KEYS].clear()
    return result


def _priced(request: web.Request) -> list[str]:
    return request.app[SETTINGS].pricing.models()


def _budgets_changed(request: web.Request) -> None:
    """This process sees an admin change at once (other replicas within their cache TTL)."""
    request.app[KEYS].clear()
    request.app[GAUGES].mark_dirty()


@_admin
async def create_team(request: web.Request) -> web.Response:
    """POST /admin/v1/teams {"name"} -> 201."""
    body = await _json_body(request, ("name",))
    return json_response(await _change(request, services.create_team, body.get("name"), now_us()), status=201)


@_admin
async def list_teams(request: web.Request) -> web.Response:
    """GET /admin/v1/teams."""
    query_params(request, ())
    return json_response(await _run(request, services.list_teams))


@_admin
async def create_user(request: web.Request) -> web.Response:
    """POST /admin/v1/users {"name", "team"?} -> 201."""
    body = await _json_body(request, ("name", "team"))
    user = await _change(request, services.create_user, body.get("name"), body.get("team"), now_us())
    return json_response(user, status=201)


@_admin
async def list_users(request: web.Request) -> web.Response:
    """GET /admin/v1/users."""
    query_params(request, ())
    return json_response(await _run(request, services.list_users))


@_admin
async def create_key(request: web.Request) -> web.Response:
    """POST /admin/v1/keys {"user", "name"?, "expires_at"?, "models"?} -> 201 with the secret (only here)."""
    body = await _json_body(request, ("user", "name", "expires_at", "models"))
    at = now_us()
    expires = access.parse_expiry(body.get("expires_at"), None, at)
    models = access.parse_models(body.get("models"), _priced(request))
    key = await _change(
        request,
        services.create_key,
        body.get("user"),
        body.get("name"),
        at,
        expires_at=expires,
        models=models,
    )
    return json_response(key, status=201)


@_admin
async def list_keys(request: web.Request) -> web.Response:
    """GET /admin/v1/keys[?user=U] (no secrets)."""
    user = query_params(request, ("user",)).get("user")
    if user is not None:
        services.check_name("user", user)
    return json_response(await _run(request, services.list_keys, user))


@_admin
async def revoke_key(request: web.Request) -> web.Response:
    """DELETE /admin/v1/keys/{id} -> 204; later use of the key is refused."""
    key_id = services.check_name("id", request.match_info["id"])
    await _change(request, services.revoke_key, key_id, now_us())
    return web.Response(status=204)


@_admin
async def set_key(request: web.Request) -> web.Response:
    """PATCH /admin/v1/keys/{id} {"models"?, "expires_at"?, "name"?} -> 200 with the key."""
    key_id = services.check_name("id", request.match_info["id"])
    body = await _json_body(request, ("models", "expires_at", "name"))
    at = now_us()
    changes: dict[str, Any] = {}
    if "models" in body:
        changes["models"] = access.parse_models(body["models"], _priced(request))
    if "expires_at" in body:
        changes["expires_at"] = access.parse_expiry(body["expires_at"], None, at)
    if "name" in body:
        changes["name"] = None if body["name"] is None else services.check_name("name", body["name"])
    return json_response(await _change(request, access.set_key, key_id, at, **changes))


@_admin
async def block_key(request: web.Request) -> web.Response:
    """POST /admin/v1/keys/{id}/block -> 200: refused (401 `blocked`) on every replica within 5 s."""
    key_id = services.check_name("id", request.match_info["id"])
    await _json_body(request, (), optional=True)
    return json_response(await _change(request, access.block_key, key_id, now_us()))


@_admin
async def unblock_key(request: web.Request) -> web.Response:
    """POST /admin/v1/keys/{id}/unblock -> 200: works again at once."""
    key_id = services.check_name("id", request.match_info["id"])
    await _json_body(request, (), optional=True)
    return json_response(await _change(request, access.unblock_key, key_id, now_us()))


@_admin
async def rotate_key(request: web.Request) -> web.Response:
    """POST /admin/v1/keys/{id}/rotate {"grace_seconds"?} -> 201 with the new key and its secret."""
    key_id = services.check_name("id", request.match_info["id"])
    body = await _json_body(request, ("grace_seconds",), optional=True)
    grace = body.get("grace_seconds", 0)
    if isinstance(grace, bool) or not isinstance(grace, int) or not 0 <= grace <= access.MAX_SECONDS:
        raise InvalidRequest(
            "`grace_seconds` must be a whole number of seconds from 0 (the old key stops at once) "
            f"to {access.MAX_SECONDS}.",
            field="grace_seconds",
        )
    key = await _change(request, access.rotate_key, key_id, grace, now_us())
    return json_response(key, status=201)


async def _set_models(request: web.Request, kind: str) -> web.Response:
    name = services.check_name("name", request.match_info["name"])
    body = await _json_body(request, ("models",))
    if "models" not in body:
        raise InvalidRequest("The body must have `models`: a list of model names, or null for every model.")
    models = access.parse_models(body["models"], _priced(request))
    return json_response(await _change(request, access.set_models, kind, name, models, now_us()))


@_admin
async def set_team(request: web.Request) -> web.Response:
    """PATCH /admin/v1/teams/{name} {"models"} -> 200: the team's allow-list (null: every model)."""
    return await _set_models(request, "team")


@_admin
async def set_user(request: web.Request) -> web.Response:
    """PATCH /admin/v1/users/{name} {"models"} -> 200: the user's allow-list (null: every model)."""
    return await _set_models(request, "user")


@_admin
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
    return json_response(await _run(request, audit.list_entries, query))


BUDGET_FIELDS = ("scope", "subject", "period", "limit")


@_admin
async def set_budget(request: web.Request) -> web.Response:
    """PUT /admin/v1/budgets {"scope", "subject", "period", "limit", "enforce"?, "alert_at"?} -> 200."""
    body = await _json_body(request, (*BUDGET_FIELDS, "enforce", "alert_at"))
    args = [body.get(name) for name in BUDGET_FIELDS]
    options = {"enforce": body.get("enforce", True), "alert_at": body.get("alert_at")}
    budget = await _change(request, services.set_budget, *args, now_us(), **options)
    _budgets_changed(request)
    return json_response(budget)


@_admin
async def delete_budget(request: web.Request) -> web.Response:
    """DELETE /admin/v1/budgets {"scope", "subject", "period"} -> 204."""
    body = await _json_body(request, BUDGET_FIELDS[:3])
    await _change(request, services.delete_budget, *(body.get(name) for name in BUDGET_FIELDS[:3]))
    _budgets_changed(request)
    return web.Response(status=204)


@_admin
async def list_budgets(request: web.Request) -> web.Response:
    """GET /admin/v1/budgets[?scope=&subject=&expand=] with each budget's current window."""
    params = query_params(request, ("scope", "subject", "expand"))
    expand = params.get("expand", "false")
    if expand not in ("true", "false"):
        raise InvalidRequest(f"`expand` must be true or false; got {expand[:100]!r}.", field="expand")
    list_them = functools.partial(services.list_budgets, expand=expand == "true")
    budgets = await _run(request, list_them, params.get("scope"), params.get("subject"))
    return json_response(budgets)


@_admin
async def usage_report(request: web.Request) -> web.Response:
    """GET /admin/v1/usage?from=&to=&group_by=[&format=json|csv]: the billing report."""
    params = query_params(request, ("from", "to", "group_by", "format"))
    fmt = services.check_choice("format", params.get("format", "json"), ("json", "csv"))
    query = reports.parse_query(params.get("from"), params.get("to"), params.get("group_by"))
    report = await _run(request, reports.usage_report, query)
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


@_admin
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
    return json_response(await _run(request, ledger.list_entries, query))


@_admin
async def adjust_ledger(request: web.Request) -> web.Response:
    """POST /admin/v1/ledger/{request_id}/adjust {"credits", "reason"} -> 201: a correction."""
    body = await _json_body(request, ("credits", "reason"))
    result = await _change(
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


@_admin
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
    return json_response(await _run(request, events.list_events, query, names))


@_admin
async def test_webhooks(request: web.Request) -> web.Response:
    """POST /admin/v1/webhooks/test: a `webhook.test` event to every webhook, and each one's answer."""
    query_params(request, ())
    settings = request.app[SETTINGS]
    async with webhooks.new_session() as session:
        results = await webhooks.send_test(session, settings.webhooks, settings.webhook_timeout_seconds)
    return json_response(results)
