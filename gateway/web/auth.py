"""Gateway keys: generation, hashing, and a short-lived cache of who a key belongs to."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable

from sqlalchemy import Connection, text

from gateway.core.holding import key_refused, key_state
from gateway.core.metering import Caller
from gateway.errors import GatewayError, ModelNotAllowed, Unauthorized

log = logging.getLogger(__name__)

KEY_PREFIX = "gwk_"
CACHE_MAX_ENTRIES = 100_000


def new_key() -> tuple[str, str, str]:
    """A fresh key: (id, secret, hash of the secret). Only the hash is ever stored."""
    key_id = "key_" + secrets.token_hex(8)
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    return key_id, secret, hash_key(secret)


def hash_key(secret: str) -> str:
    """SHA-256 hex of a key's secret."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


_LOOKUP = text(
    "SELECT k.id, u.id, u.name, t.id, t.name, k.revoked_at, k.blocked_at, k.expires_at, "
    "k.models, u.models, t.models, "
    # Whether any rate or concurrency limit may apply (admission reads them only then).
    "EXISTS (SELECT 1 FROM rate_limits r WHERE (r.scope = 'key' AND r.subject = k.id) "
    "OR (r.scope = 'user' AND r.subject = CAST(u.id AS VARCHAR)) "
    "OR (r.scope = 'team' AND r.subject = CAST(t.id AS VARCHAR)) "
    "OR (r.scope = 'end_user' AND r.user_id = u.id)) "
    "FROM api_keys k JOIN users u ON u.id = k.user_id "
    "LEFT JOIN teams t ON t.id = u.team_id WHERE k.key_hash = :hash"
)


def allowed_models(*lists: str | None) -> frozenset[str] | None:
    """The models in every one of these allow-lists (JSON arrays; None: no list); None if there is none."""
    allowed: frozenset[str] | None = None
    for stored in lists:
        if stored is not None:
            models = frozenset(json.loads(stored))
            allowed = models if allowed is None else allowed & models
    return allowed


def lookup_caller(conn: Connection, key_hash: str) -> Caller | str:
    """The live key with this hash, or why there is none: `unknown`, `revoked`, `blocked`, `expired`."""
    row = conn.execute(_LOOKUP, {"hash": key_hash}).first()
    if row is None:
        return "unknown"
    revoked_at, blocked_at, expires_at = row[5], row[6], row[7]
    state = key_state(revoked_at, blocked_at, expires_at, time.time_ns() // 1_000)
    if state is not None:
        return state
    # The first of expiry and the end of a rotation's grace, checked at each use: the cache never
    # stretches either.
    ends = [(at, why) for at, why in ((expires_at, "expired"), (revoked_at, "revoked")) if at is not None]
    ends_at, ends_why = min(ends) if ends else (None, "")
    models = allowed_models(row[8], row[9], row[10])
    return Caller(row[0], row[1], row[2], row[3], row[4], models, ends_at, ends_why, bool(row[11]))


def model_not_allowed(model: str, allowed: frozenset[str], priced: list[str]) -> ModelNotAllowed:
    """The refusal of a model outside the caller's allow-lists; `allowed`: the priced models it may use."""
    usable = [name for name in priced if name in allowed]
    return ModelNotAllowed(
        f"This key may not use {model[:200]!r}: an allow-list of the key, its user or its team leaves "
        f"it out. Models this key may use: {', '.join(usable) or 'none'}. An administrator changes "
        "the lists with 'gateway keys set', 'gateway users set' or 'gateway teams set'.",
        allowed=usable,
    )


UNKNOWN = "This gateway key is unknown. Check it, or ask an administrator for a key."


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class KeyCache:
    """Caches live keys for `ttl` seconds, so revocation and blocking reach every process within the TTL.

    Unknown, revoked, blocked and expired keys are not cached: each attempt asks the database, so a
    key created or unblocked a moment ago works at once. A cached key's expiry (or the end of its
    rotation grace) is compared with the clock at each use. Each load is a use of the key: the
    times are written to `api_keys.last_used_at` in the background (`write_last_used`).
    """

    def __init__(self, load: Callable[[str], Awaitable[Caller | str]], ttl: float) -> None:
        self._load = load
        self._ttl = ttl
        self._entries: dict[str, tuple[float, Caller]] = {}
        # key id -> when it was last loaded for a request (microseconds since the epoch)
        self.used: dict[str, int] = {}

    async def caller(self, authorization: str | None) -> Caller:
        """The caller for an Authorization header, or raise Unauthorized."""
        token = bearer_token(authorization)
        if token is None:
            raise Unauthorized(
                "Missing gateway key: send it as 'Authorization: Bearer <key>'. An administrator "
                "creates keys with 'gateway keys create USER'.",
                reason="missing",
            )
        digest = hash_key(token)
        now = time.monotonic()
        entry = self._entries.get(digest)
        if entry is not None and entry[0] > now:
            caller = entry[1]
            if caller.ends_at is not None and caller.ends_at <= time.time_ns() // 1_000:
                self._entries.pop(digest, None)
                raise key_refused(caller.ends_why)
            return caller
        loaded = await self._load(digest)
        if isinstance(loaded, str):
            self._entries.pop(digest, None)
            # Refused as admission refuses it (admission.key_refused), in the same words.
            raise Unauthorized(UNKNOWN, reason=loaded) if loaded == "unknown" else key_refused(loaded)
        if len(self._entries) >= CACHE_MAX_ENTRIES:
            self._entries.clear()
        self._entries[digest] = (now + self._ttl, loaded)
        if len(self.used) < CACHE_MAX_ENTRIES:
            self.used[loaded.key_id] = time.time_ns() // 1_000
        return loaded

    def clear(self) -> None:
        """Forget every cached key (after a change made by this process)."""
        self._entries.clear()


LAST_USED_EVERY_US = 60_000_000
LAST_USED_FLUSH_SECONDS = 15.0

_TOUCH = text(
    "UPDATE api_keys SET last_used_at = :at WHERE id = :id "
    "AND (last_used_at IS NULL OR last_used_at <= :before)"
)


def touch_keys(conn: Connection, used: dict[str, int]) -> None:
    """Unit of work: record when keys were used, at most once a minute a key (across replicas too)."""
    rows = [
        {"id": key_id, "at": at, "before": at - LAST_USED_EVERY_US} for key_id, at in sorted(used.items())
    ]
    if rows:
        conn.execute(_TOUCH, rows)


async def write_last_used(keys: KeyCache, run: Callable[..., Awaitable[object]]) -> None:
    """Write the keys used since the last call to the database (`run` is the store's `run`)."""
    used, keys.used = keys.used, {}
    if used:
        await run(touch_keys, used)


async def last_used_forever(keys: KeyCache, run: Callable[..., Awaitable[object]]) -> None:
    """Every LAST_USED_FLUSH_SECONDS, `write_last_used`; a failure loses those times, nothing else."""
    while True:
        await asyncio.sleep(LAST_USED_FLUSH_SECONDS)
        try:
            await write_last_used(keys, run)
        except GatewayError:
            pass  # the database is out: requests are refused meanwhile, the times barely matter
        except Exception:
            log.exception("could not write the keys' last_used_at")
