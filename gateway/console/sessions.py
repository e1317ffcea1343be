"""Console sessions in the database, so every worker and replica knows them; units of work for the store.

A session id is 32 random bytes, sent only in the cookie; the table keeps its SHA-256 (`id_hash`),
so a copy of the table opens no session. `token_check` binds a session to the admin token it was
opened with (a digest of the id and the token): once GATEWAY_ADMIN_TOKEN changes, every session
opened with the old one is refused. Each session has its own CSRF token and a fixed expiry.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import Connection, text

LIFETIME_US = 8 * 3600 * 1_000_000  # a working day; then sign in again
MAX_ADDRESS = 100


@dataclass(frozen=True)
class Session:
    """A live session: its CSRF token and when it ends (microseconds)."""

    csrf: str
    expires_at: int


def digest(session_id: str) -> str:
    """What the table keeps of a session id."""
    return hashlib.sha256(session_id.encode()).hexdigest()


def token_check(session_id: str, admin_token: str) -> str:
    """A digest tying a session to the admin token it was opened with (reveals neither)."""
    return hashlib.sha256(f"{session_id}\0{admin_token}".encode()).hexdigest()


def new_id() -> str:
    """A fresh session id for the cookie."""
    return secrets.token_urlsafe(32)


def open_session(
    conn: Connection, session_id: str, admin_token: str, address: str, at: int, lifetime_us: int = LIFETIME_US
) -> Session:
    """Store a new session (and drop expired ones, so the table stays small)."""
    conn.execute(text("DELETE FROM console_sessions WHERE expires_at <= :at"), {"at": at})
    session = Session(secrets.token_urlsafe(32), at + lifetime_us)
    conn.execute(
        text(
            "INSERT INTO console_sessions (id_hash, csrf, token_check, address, created_at, expires_at) "
            "VALUES (:id, :csrf, :check, :address, :at, :expires)"
        ),
        {
            "id": digest(session_id),
            "csrf": session.csrf,
            "check": token_check(session_id, admin_token),
            "address": address[:MAX_ADDRESS],
            "at": at,
            "expires": session.expires_at,
        },
    )
    return session


def find_session(conn: Connection, session_id: str, admin_token: str, at: int) -> Session | None:
    """The live session of a cookie's id, or None (unknown, expired, or opened with another token)."""
    row = conn.execute(
        text("SELECT csrf, token_check, expires_at FROM console_sessions WHERE id_hash = :id"),
        {"id": digest(session_id)},
    ).first()
    if row is None or int(row[2]) <= at:
        return None
    if not secrets.compare_digest(str(row[1]), token_check(session_id, admin_token)):
        return None
    return Session(str(row[0]), int(row[2]))


def close_session(conn: Connection, session_id: str) -> None:
    """Sign out: the session is gone on every process at once."""
    conn.execute(text("DELETE FROM console_sessions WHERE id_hash = :id"), {"id": digest(session_id)})
