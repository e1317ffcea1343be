"""Keys and access: model allow-lists, key expiry, blocking and rotation with a grace period.

Units of work for the store (`fn(conn, ...)`), like `services`, each appending its audit row in the
same transaction. Inputs are checked before anything changes, and each refusal says what to do:
an allow-list may only name priced models, an expiry must be in the future, a revoked key cannot
be changed or rotated.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from typing import Any

from sqlalchemy import Connection, text

from gateway.core.windows import iso_us
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.ops import audit
from gateway.ops.reports import parse_time
from gateway.ops.services import INTERNAL, check_name, create_key, key_object, list_teams, list_users

MAX_MODELS = 1000
MAX_SECONDS = 100 * 365 * 86_400
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
_DURATION = re.compile(r"\s*(\d{1,10})\s*([smhdw]?)\s*")


def parse_models(value: object, priced: Collection[str], field: str = "models") -> list[str] | None:
    """An allow-list: a non-empty list of priced model names (None clears it: every priced model)."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise InvalidRequest(
            f"`{field}` must be a list of model names, or null for every model.", field=field
        )
    if not value:
        raise InvalidRequest(
            f"`{field}` is empty: name at least one model, or clear the list (null, --all-models) to "
            "allow every model. To stop a key altogether, block it.",
            field=field,
        )
    if len(value) > MAX_MODELS:
        raise InvalidRequest(f"`{field}` may name at most {MAX_MODELS} models.", field=field)
    unknown = sorted({m for m in value if m not in priced})
    if unknown:
        shown = ", ".join(repr(m[:200]) for m in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise InvalidRequest(
            f"`{field}` names models this gateway does not price: {shown}. Priced models: "
            f"{', '.join(sorted(priced))}.",
            field=field,
            unknown=[m[:200] for m in unknown[:10]],
        )
    return sorted(set(value))


def parse_duration(field: str, value: object, *, allow_zero: bool = False) -> int:
    """Seconds from `30d`, `12h`, `90m`, `45s`, `2w` or a bare number of seconds."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidRequest(f"`{field}` must be a duration such as 30d, 12h, 90m or 45s.", field=field)
    match = _DURATION.fullmatch(str(value))
    if match is None:
        raise InvalidRequest(
            f"`{field}` must be a duration such as 30d, 12h, 90m or 45s; got {str(value)[:50]!r}.",
            field=field,
        )
    seconds = int(match.group(1)) * UNITS[match.group(2) or "s"]
    if seconds == 0 and not allow_zero:
        raise InvalidRequest(
            f"`{field}` must be longer than 0: a key that expires at once is no key.", field=field
        )
    if seconds > MAX_SECONDS:
        raise InvalidRequest(f"`{field}` must be at most 100 years.", field=field)
    return seconds


def parse_expiry(expires: object, ttl: object, at: int, field: str = "expires_at") -> int | None:
    """When a key expires (microseconds), from an ISO 8601 time or a TTL; it must be after `at`."""
    if expires is not None and ttl is not None:
        raise InvalidRequest("Give an expiry time or a TTL, not both.", field=field)
    if ttl is not None:
        return at + parse_duration("ttl", ttl) * 1_000_000
    if expires is None:
        return None
    if not isinstance(expires, str) or len(expires) > 64:
        raise InvalidRequest(f"`{field}` must be an ISO 8601 time, e.g. 2027-01-31T18:00:00Z.", field=field)
    moment = parse_time(field, expires)
    if moment is None:
        raise InvalidRequest(f"`{field}` must be an ISO 8601 time, e.g. 2027-01-31T18:00:00Z.", field=field)
    if moment <= at:
        raise InvalidRequest(
            f"`{field}` {expires!r} is not in the future (now is {iso_us(at)}); a key cannot be "
            "created or changed to expire in the past. To stop a key now, block or revoke it.",
            field=field,
        )
    return moment


def _live_key(conn: Connection, key_id: str, at: int) -> dict[str, Any]:
    """The key (NotFound if unknown); Conflict if it is revoked (a grace period still running is fine)."""
    check_name("id", key_id)
    key = key_object(conn, key_id)
    revoked = conn.execute(text("SELECT revoked_at FROM api_keys WHERE id = :id"), {"id": key_id}).scalar()
    if revoked is not None and revoked <= at:
        raise Conflict(
            f"Key {key_id} was revoked at {key['revoked_at']} and cannot be changed; create a new key "
            "with 'gateway keys create'.",
            field="id",
        )
    return key


_UNSET: Any = object()


def set_key(
    conn: Connection,
    key_id: str,
    at: int,
    *,
    name: Any = _UNSET,
    models: Any = _UNSET,
    expires_at: Any = _UNSET,
    actor: str = INTERNAL,
) -> dict[str, Any]:
    """Change a key's name, allow-list (None: every model) or expiry (None: never); values come validated."""
    before = _live_key(conn, key_id, at)
    changes: dict[str, Any] = {}
    if name is not _UNSET:
        changes["name"] = None if name is None else check_name("name", name)
    if models is not _UNSET:
        changes["models"] = None if models is None else json.dumps(models)
    if expires_at is not _UNSET:
        changes["expires_at"] = expires_at
    if changes:
        assignments = ", ".join(f"{column} = :{column}" for column in changes)
        conn.execute(text(f"UPDATE api_keys SET {assignments} WHERE id = :id"), {**changes, "id": key_id})
    after = key_object(conn, key_id)
    audit.record(conn, at, actor, "key.set", key_id, before, after)
    return after


def block_key(conn: Connection, key_id: str, at: int, *, actor: str = INTERNAL) -> dict[str, Any]:
    """Block a key: refused (401 `blocked`) until unblocked. Blocking it again changes nothing."""
    before = _live_key(conn, key_id, at)
    conn.execute(
        text("UPDATE api_keys SET blocked_at = :at WHERE id = :id AND blocked_at IS NULL"),
        {"id": key_id, "at": at},
    )
    after = key_object(conn, key_id)
    audit.record(conn, at, actor, "key.block", key_id, before, after)
    return after


def unblock_key(conn: Connection, key_id: str, at: int, *, actor: str = INTERNAL) -> dict[str, Any]:
    """Unblock a key: it works again at once."""
    before = _live_key(conn, key_id, at)
    conn.execute(text("UPDATE api_keys SET blocked_at = NULL WHERE id = :id"), {"id": key_id})
    after = key_object(conn, key_id)
    audit.record(conn, at, actor, "key.unblock", key_id, before, after)
    return after


def rotate_key(
    conn: Connection, key_id: str, grace_seconds: int, at: int, *, actor: str = INTERNAL
) -> dict[str, Any]:
    """A new key for the same user, name, models, expiry and key budgets; the old one is revoked
    when `grace_seconds` have passed. The answer is the new key with its secret, shown only here."""
    before = _live_key(conn, key_id, at)
    if before["rotated_to"] is not None:
        raise Conflict(
            f"Key {key_id} has already been rotated to {before['rotated_to']}; rotate that key instead.",
            field="id",
        )
    expires = conn.execute(text("SELECT expires_at FROM api_keys WHERE id = :id"), {"id": key_id}).scalar()
    if expires is not None and expires <= at:
        raise Conflict(
            f"Key {key_id} expired at {before['expires_at']}; create a new key, or extend this one with "
            "'gateway keys set ID --expires ...' first.",
            field="id",
        )
    new = create_key(
        conn, before["user"], before["name"], at, expires_at=expires, models=before["models"], action=""
    )
    # The key's own budgets move to the new key with their counters (deleted ones too, which still
    # count): what was spent in the window stays spent, so a rotation is never a fresh allowance.
    # During the grace, admission holds requests through the old key on them too (by `rotated_to`),
    # so keys it replaced that are still in their grace now point at the new key.
    conn.execute(
        text("UPDATE budgets SET subject = :new, updated_at = :at WHERE scope = 'key' AND subject = :old"),
        {"new": new["id"], "old": key_id, "at": at},
    )
    # Its rate and concurrency limits are copied to the new key (the old one keeps its own for the
    # grace: each key is limited on its own meanwhile).
    conn.execute(
        text(
            "INSERT INTO rate_limits (scope, subject, kind, limit_value, per_seconds, created_at, "
            "updated_at) "
            "SELECT 'key', :new, kind, limit_value, per_seconds, :at, :at FROM rate_limits "
            "WHERE scope = 'key' AND subject = :old"
        ),
        {"new": new["id"], "old": key_id, "at": at},
    )
    conn.execute(
        text("UPDATE api_keys SET rotated_to = :new WHERE rotated_to = :old AND revoked_at > :at"),
        {"new": new["id"], "old": key_id, "at": at},
    )
    conn.execute(
        text(
            "UPDATE api_keys SET rotated_to = :new, revoked_at = :end WHERE id = :id "
            "AND (revoked_at IS NULL OR revoked_at > :end)"
        ),
        {"new": new["id"], "end": at + grace_seconds * 1_000_000, "id": key_id},
    )
    audit.record(
        conn,
        at,
        actor,
        "key.rotate",
        key_id,
        before,
        {**key_object(conn, key_id), "new_key": {k: v for k, v in new.items() if k != "key"}},
    )
    return {**new, "rotated_from": key_id}


def set_models(
    conn: Connection, kind: str, name: str, models: list[str] | None, at: int, *, actor: str = INTERNAL
) -> dict[str, Any]:
    """Set (or clear, with None) the allow-list of a team or user (`kind`); the changed object."""
    check_name("name", name)
    table, lister = ("teams", list_teams) if kind == "team" else ("users", list_users)
    found = lister(conn, name)
    if not found:
        raise NotFound(f"No {kind} named {name!r}. List them with 'gateway {table} list'.", field="name")
    conn.execute(
        text(f"UPDATE {table} SET models = :models WHERE name = :name"),
        {"models": None if models is None else json.dumps(models), "name": name},
    )
    after = lister(conn, name)[0]
    audit.record(conn, at, actor, f"{kind}.set", name, found[0], after)
    return after
