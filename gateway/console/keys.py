"""Keys: the list with each key's state, creation (the secret shown once), block, unblock, rotate,
revoke, and changes of name, models and expiry."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy import Connection

from gateway.console.render import change, done, filters, form_errors, page, priced_models, read, slice_page
from gateway.core.metering import now_us
from gateway.core.windows import iso_us
from gateway.errors import GatewayError, NotFound
from gateway.ops import access, services

STATES = ("active", "blocked", "expired", "rotation grace", "revoked")


def state(key: dict[str, Any], now_iso: str) -> str:
    """What a key is now: revoked, in its rotation's grace, expired, blocked or active."""
    revoked = key["revoked_at"]
    if revoked is not None and revoked <= now_iso:
        return "revoked"
    if key["rotated_to"] is not None:
        return "rotation grace"
    if key["expires_at"] is not None and key["expires_at"] <= now_iso:
        return "expired"
    if key["blocked"]:
        return "blocked"
    return "active"


def _keys(conn: Connection, user: str | None) -> tuple[list[dict[str, Any]], list[str]]:
    users = [u["name"] for u in services.list_users(conn)]
    return services.list_keys(conn, user), users


def _now_iso() -> str:
    return str(iso_us(now_us()))


async def keys_page(
    request: web.Request, status: int = 200, errors: dict[str, str] | None = None, values: Any = None
) -> web.Response:
    """GET /ui/keys[?user=&state=]: keys, newest first, paginated."""
    wanted = filters(request, ("user", "state"))
    try:
        keys, users = await read(request, _keys, wanted.get("user"))
    except GatewayError as exc:
        keys, users = [], []
        errors = {**form_errors(exc, "user"), **(errors or {})}
    now = _now_iso()
    rows = [{**key, "state": state(key, now)} for key in reversed(keys)]
    if wanted.get("state") in STATES:
        rows = [row for row in rows if row["state"] == wanted["state"]]
    shown, pager = slice_page(rows, request)
    return page(
        request,
        "keys.html",
        "keys",
        status=status,
        keys=shown,
        paging=pager,
        users=users,
        states=STATES,
        wanted=wanted,
        priced=priced_models(request),
        errors=errors or {},
        values=values or {"user": wanted.get("user", "")},
    )


def _models(form: Any, priced: list[str]) -> list[str] | None:
    """The form's allow-list: None when `all` is ticked or nothing is."""
    chosen = [str(m) for m in form.getall("models", [])]
    return None if form.get("all") or not chosen else access.parse_models(chosen, priced)


def _expiry(form: Any, at: int) -> int | None:
    expires = str(form.get("expires_at", "")).strip() or None
    ttl = str(form.get("ttl", "")).strip() or None
    return access.parse_expiry(expires, ttl, at)


async def create_key(request: web.Request) -> web.StreamResponse:
    """POST /ui/keys: a new key; the answer shows its secret, once."""
    form = await request.post()
    values = {name: str(form.get(name, "")).strip() for name in ("user", "name", "expires_at", "ttl")}
    at = now_us()
    try:
        models = _models(form, priced_models(request))
        expires = _expiry(form, at)
        key = await change(
            request,
            services.create_key,
            values["user"],
            values["name"] or None,
            at,
            expires_at=expires,
            models=models,
        )
    except GatewayError as exc:
        return await keys_page(request, exc.status, form_errors(exc, "user"), values)
    return page(request, "key_secret.html", "keys", status=201, key=key, title="Key created")


async def key_page(
    request: web.Request, status: int = 200, errors: dict[str, str] | None = None
) -> web.Response:
    """GET /ui/keys/{id}: one key and what can be done with it."""
    key_id = request.match_info["id"]
    try:
        key = await read(request, services.key_object, key_id)
    except NotFound as exc:
        raise web.HTTPNotFound(text=exc.message) from None
    key["state"] = state(key, _now_iso())
    return page(
        request,
        "key.html",
        "keys",
        status=status,
        key=key,
        priced=priced_models(request),
        errors=errors or {},
    )


async def key_action(request: web.Request) -> web.StreamResponse:
    """POST /ui/keys/{id}/{block,unblock,revoke,rotate,set}."""
    key_id, action = request.match_info["id"], request.match_info["action"]
    form = await request.post()
    at = now_us()
    try:
        if action == "block":
            await change(request, access.block_key, key_id, at)
        elif action == "unblock":
            await change(request, access.unblock_key, key_id, at)
        elif action == "revoke":
            await change(request, services.revoke_key, key_id, at)
        elif action == "rotate":
            grace = access.parse_duration(
                "grace", str(form.get("grace", "0")).strip() or "0", allow_zero=True
            )
            new = await change(request, access.rotate_key, key_id, grace, at)
            return page(request, "key_secret.html", "keys", status=201, key=new, title="Key rotated")
        elif action == "set":
            changes: dict[str, Any] = {"name": str(form.get("name", "")).strip() or None}
            changes["models"] = _models(form, priced_models(request))
            if form.get("no_expiry"):
                changes["expires_at"] = None
            elif str(form.get("expires_at", "")).strip() or str(form.get("ttl", "")).strip():
                changes["expires_at"] = _expiry(form, at)
            await change(request, access.set_key, key_id, at, **changes)
            action = "key"
        else:
            raise web.HTTPNotFound()
    except GatewayError as exc:
        field = {"rotate": "grace", "set": "expires_at"}.get(action, "action")
        return await key_page(request, exc.status, form_errors(exc, field))
    raise done(f"/ui/keys/{key_id}", action)
