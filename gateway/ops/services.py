"""Administration: teams, users and keys, shared by the CLI and the admin HTTP API.

Each function is a unit of work for the store (`fn(conn, ...)`) and returns the JSON the HTTP API
answers with, so `gateway ... --json` prints exactly the HTTP body. Each change appends its audit
row (`audit.record`) in the same transaction; `actor` says who made it (`internal` when neither the
CLI nor the HTTP API did: tests, `gateway demo`). Allow-lists, expiry, blocking and rotation are in
`access`; budgets in `budgeting`.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, bindparam, text
from sqlalchemy.exc import IntegrityError

from gateway.core.ratelimits import limit_json
from gateway.core.windows import iso_us
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.ops import audit
from gateway.web.auth import new_key

MAX_NAME = 200
INTERNAL = "internal"


def check_name(field: str, name: object) -> str:
    """A team, user or key name: 1-200 printable characters."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequest(f"`{field}` must be a non-empty string.", field=field)
    if len(name) > MAX_NAME or not name.isprintable():
        raise InvalidRequest(f"`{field}` must be at most {MAX_NAME} printable characters.", field=field)
    return name


def check_choice(field: str, value: object, choices: tuple[str, ...]) -> str:
    """One of a fixed set of words."""
    if value not in choices:
        raise InvalidRequest(f"`{field}` must be one of {', '.join(choices)}; got {value!r}.", field=field)
    return str(value)


def team_id_of(conn: Connection, name: str) -> int:
    row = conn.execute(text("SELECT id FROM teams WHERE name = :name"), {"name": name}).first()
    if row is None:
        raise NotFound(f"No team named {name!r}. Create it with 'gateway teams create'.", field="team")
    return int(row[0])


def user_id_of(conn: Connection, name: str) -> int:
    row = conn.execute(text("SELECT id FROM users WHERE name = :name"), {"name": name}).first()
    if row is None:
        raise NotFound(f"No user named {name!r}. Create it with 'gateway users create'.", field="user")
    return int(row[0])


def create_team(conn: Connection, name: str, at: int, *, actor: str = INTERNAL) -> dict[str, Any]:
    """A new team; Conflict if the name is taken."""
    name = check_name("name", name)
    if conn.execute(text("SELECT 1 FROM teams WHERE name = :name"), {"name": name}).first():
        raise Conflict(f"A team named {name!r} already exists.", field="name")
    try:
        team_id = conn.execute(
            text("INSERT INTO teams (name, created_at) VALUES (:name, :at) RETURNING id"),
            {"name": name, "at": at},
        ).scalar_one()
    except IntegrityError:
        raise Conflict(f"A team named {name!r} already exists.", field="name") from None
    team = {"id": team_id, "name": name, "created_at": iso_us(at), "models": None}
    audit.record(conn, at, actor, "team.create", name, None, team)
    return team


def models_json(stored: str | None) -> list[str] | None:
    """A stored allow-list as JSON shows it (None: every priced model)."""
    return None if stored is None else list(json.loads(stored))


def list_teams(conn: Connection, name: str | None = None) -> list[dict[str, Any]]:
    """Every team (or the one named)."""
    where, params = ("WHERE name = :name ", {"name": name}) if name is not None else ("", {})
    rows = conn.execute(text(f"SELECT id, name, created_at, models FROM teams {where}ORDER BY name"), params)
    return [{"id": r[0], "name": r[1], "created_at": iso_us(r[2]), "models": models_json(r[3])} for r in rows]


def create_user(
    conn: Connection, name: str, team: str | None, at: int, *, actor: str = INTERNAL
) -> dict[str, Any]:
    """A new user, optionally in a team; NotFound for an unknown team, Conflict if the name is taken."""
    name = check_name("name", name)
    team_id = team_id_of(conn, check_name("team", team)) if team is not None else None
    if conn.execute(text("SELECT 1 FROM users WHERE name = :name"), {"name": name}).first():
        raise Conflict(f"A user named {name!r} already exists.", field="name")
    try:
        user_id = conn.execute(
            text("INSERT INTO users (name, team_id, created_at) VALUES (:name, :team, :at) RETURNING id"),
            {"name": name, "team": team_id, "at": at},
        ).scalar_one()
    except IntegrityError:
        raise Conflict(f"A user named {name!r} already exists.", field="name") from None
    user = {"id": user_id, "name": name, "team": team, "created_at": iso_us(at), "models": None}
    audit.record(conn, at, actor, "user.create", name, None, user)
    return user


def list_users(conn: Connection, name: str | None = None) -> list[dict[str, Any]]:
    """Every user with their team (or the one named)."""
    where, params = ("WHERE u.name = :name ", {"name": name}) if name is not None else ("", {})
    rows = conn.execute(
        text(
            "SELECT u.id, u.name, t.name, u.created_at, u.models FROM users u "
            f"LEFT JOIN teams t ON t.id = u.team_id {where}ORDER BY u.name"
        ),
        params,
    ).all()
    return [
        {"id": r[0], "name": r[1], "team": r[2], "created_at": iso_us(r[3]), "models": models_json(r[4])}
        for r in rows
    ]


def create_key(
    conn: Connection,
    user: str,
    name: str | None,
    at: int,
    *,
    expires_at: int | None = None,
    models: list[str] | None = None,
    actor: str = INTERNAL,
    action: str = "key.create",
) -> dict[str, Any]:
    """A new key for a user. The secret is in this answer only; the database keeps its hash.

    `expires_at` and `models` come validated (see `access.parse_expiry`, `access.parse_models`).
    """
    user_id = user_id_of(conn, check_name("user", user))
    if name is not None:
        name = check_name("name", name)
    key_id, secret, digest = new_key()
    conn.execute(
        text(
            "INSERT INTO api_keys (id, user_id, name, key_hash, prefix, created_at, expires_at, models) "
            "VALUES (:id, :user, :name, :hash, :prefix, :at, :expires, :models)"
        ),
        {
            "id": key_id,
            "user": user_id,
            "name": name,
            "hash": digest,
            "prefix": secret[:8],
            "at": at,
            "expires": expires_at,
            "models": None if models is None else json.dumps(models),
        },
    )
    key = key_object(conn, key_id)
    if action:
        audit.record(conn, at, actor, action, key_id, None, key)
    return {**key, "key": secret}


_KEYS = (
    "SELECT k.id, u.name, k.name, k.prefix, k.created_at, k.revoked_at, k.expires_at, k.blocked_at, "
    "k.models, k.rotated_to, k.last_used_at FROM api_keys k JOIN users u ON u.id = k.user_id"
)


def _key_json(r: Any) -> dict[str, Any]:
    return {
        "id": r[0],
        "user": r[1],
        "name": r[2],
        "prefix": r[3],
        "created_at": iso_us(r[4]),
        "revoked_at": iso_us(r[5]),
        "expires_at": iso_us(r[6]),
        "blocked": r[7] is not None,
        "models": models_json(r[8]),
        "rotated_to": r[9],
        "last_used_at": iso_us(r[10]),
    }


_KEY_LIMITS = text(
    "SELECT id, scope, subject, kind, limit_value, per_seconds FROM rate_limits WHERE scope = 'key' "
    "AND subject IN :ids ORDER BY id"
).bindparams(bindparam("ids", expanding=True))


def _with_limits(conn: Connection, keys: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The keys, each with its own rate and concurrency limits (`limits`, in the admin API's shape)."""
    of: dict[str, list[dict[str, Any]]] = {key["id"]: [] for key in keys}
    if keys:
        for row in conn.execute(_KEY_LIMITS, {"ids": sorted(of)}).all():
            of[row[2]].append(limit_json(row[0], row[1], row[2], row[3], row[4], row[5], row[2]))
    for key in keys:
        key["limits"] = of[key["id"]]
    return keys


def key_object(conn: Connection, key_id: str) -> dict[str, Any]:
    """One key as the admin API shows it (no secret); NotFound for an unknown id."""
    row = conn.execute(text(_KEYS + " WHERE k.id = :id"), {"id": key_id}).first()
    if row is None:
        raise NotFound(f"No key with id {key_id!r}. List keys with 'gateway keys list'.", field="id")
    return _with_limits(conn, [_key_json(row)])[0]


def list_keys(conn: Connection, user: str | None = None) -> list[dict[str, Any]]:
    """Keys (no secrets), optionally of one user."""
    query = _KEYS
    params: dict[str, Any] = {}
    if user is not None:
        params["user"] = user_id_of(conn, user)
        query += " WHERE k.user_id = :user"
    rows = conn.execute(text(query + " ORDER BY k.created_at, k.id"), params).all()
    return _with_limits(conn, [_key_json(r) for r in rows])


def revoke_key(conn: Connection, key_id: str, at: int, *, actor: str = INTERNAL) -> None:
    """Revoke a key; revoking it again changes nothing. NotFound for an unknown id.

    A key in a rotation's grace period is revoked now.
    """
    before = key_object(conn, key_id)
    conn.execute(
        text(
            "UPDATE api_keys SET revoked_at = :at WHERE id = :id AND (revoked_at IS NULL OR revoked_at > :at)"
        ),
        {"id": key_id, "at": at},
    )
    audit.record(conn, at, actor, "key.revoke", key_id, before, key_object(conn, key_id))
