"""Gateway keys: generation, hashing, and a short-lived cache of who a key belongs to."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Awaitable, Callable

from sqlalchemy import Connection, text

from gateway.core.metering import Caller, revoked
from gateway.errors import Unauthorized

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
    "SELECT k.id, u.id, u.name, t.id, t.name, k.revoked_at FROM api_keys k JOIN users u ON u.id = k.user_id "
    "LEFT JOIN teams t ON t.id = u.team_id WHERE k.key_hash = :hash"
)


def lookup_caller(conn: Connection, key_hash: str) -> Caller | str:
    """The live key with this hash, or why there is none: `unknown` or `revoked`."""
    row = conn.execute(_LOOKUP, {"hash": key_hash}).first()
    if row is None:
        return "unknown"
    if row[5] is not None and row[5] <= time.time_ns() // 1_000:
        return "revoked"
    return Caller(row[0], row[1], row[2], row[3], row[4])


UNKNOWN = "This gateway key is unknown. Check it, or ask an administrator for a key."


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class KeyCache:
    """Caches live keys for `ttl` seconds, so revocation reaches every process within the TTL.

    Unknown and revoked keys are not cached: each attempt asks the database, so a key created a
    moment ago works at once.
    """

    def __init__(self, load: Callable[[str], Awaitable[Caller | str]], ttl: float) -> None:
        self._load = load
        self._ttl = ttl
        self._entries: dict[str, tuple[float, Caller]] = {}

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
            return entry[1]
        caller = await self._load(digest)
        if isinstance(caller, str):
            self._entries.pop(digest, None)
            # A revoked key is refused as admission refuses it (metering.revoked), in the same words.
            raise revoked() if caller == "revoked" else Unauthorized(UNKNOWN, reason=caller)
        if len(self._entries) >= CACHE_MAX_ENTRIES:
            self._entries.clear()
        self._entries[digest] = (now + self._ttl, caller)
        return caller

    def clear(self) -> None:
        """Forget every cached key (after a change made by this process)."""
        self._entries.clear()
