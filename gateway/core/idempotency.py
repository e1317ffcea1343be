"""Idempotent retries: an `Idempotency-Key` header makes a retried request cost nothing.

The semantics payments APIs use, scoped to the caller's gateway key, for 24 hours:

- the same key and the same body again, after the first was charged → the first answer is
  replayed (non-streaming answers up to MAX_REPLAY_BYTES) with `Idempotent-Replayed: true`,
  and nothing is charged or forwarded;
- the same key with a different body → 422 `idempotency_mismatch`;
- the same key while the first is still in flight → 409 `idempotency_in_flight`;
- a first attempt that was not charged (refused, upstream error, timeout, crash) leaves no
  record, so the retry is a fresh request: nothing was charged, so it cannot charge twice.

The record is reserved in the admission's transaction and completed in the settlement's, so a
key is never charged twice, whatever the concurrency.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sqlalchemy import Connection, text

from gateway.core.admission import admit
from gateway.core.metering import Admission, Charge, Settlement
from gateway.core.settlement import settle
from gateway.errors import IdempotencyConflict, IdempotencyMismatch, InvalidRequest

HEADER = "Idempotency-Key"
RETENTION_US = 24 * 3600 * 1_000_000
MAX_KEY_LENGTH = 255
MAX_REPLAY_BYTES = 1 << 20


def check_key(value: str) -> str:
    """A valid Idempotency-Key header value, or InvalidRequest."""
    if not value or len(value) > MAX_KEY_LENGTH or not value.isprintable() or not value.isascii():
        raise InvalidRequest(
            f"The {HEADER} header must be 1 to {MAX_KEY_LENGTH} printable ASCII characters "
            "(a UUID is a good choice)."
        )
    return value


def body_digest(body: bytes) -> str:
    """What identifies 'the same body'."""
    return hashlib.sha256(body).hexdigest()


@dataclass(frozen=True)
class Reservation:
    """An idempotency key to reserve with an admission."""

    key: str
    digest: str


@dataclass(frozen=True)
class Replay:
    """The stored first answer of a request retried with the same key."""

    request_id: str
    status: int
    content_type: str | None
    body: bytes


_RESERVE = text(
    "INSERT INTO idempotency_keys (key_id, idempotency_key, body_digest, request_id, state, created_at) "
    "VALUES (:key_id, :key, :digest, :request_id, 'in_flight', :at) "
    "ON CONFLICT (key_id, idempotency_key) DO NOTHING RETURNING request_id"
)
_EXISTING = text(
    "SELECT body_digest, request_id, state, status, content_type, body, created_at FROM idempotency_keys "
    "WHERE key_id = :key_id AND idempotency_key = :key"
)
_TAKE_OVER = text(
    "UPDATE idempotency_keys SET body_digest = :digest, request_id = :request_id, state = 'in_flight', "
    "status = NULL, content_type = NULL, body = NULL, created_at = :at "
    "WHERE key_id = :key_id AND idempotency_key = :key AND created_at = :old"
)


def admit_once(
    conn: Connection, charge: Charge, instance_id: str, at: int, reservation: Reservation
) -> Admission | Replay:
    """Reserve the key and admit the request in one transaction, or answer from the first attempt."""
    params = {
        "key_id": charge.caller.key_id,
        "key": reservation.key,
        "digest": reservation.digest,
        "request_id": charge.request_id,
        "at": at,
    }
    # A few tries: the key's holder may give it up (not charged) or another caller take over an
    # expired record between two of these statements, on PostgreSQL's READ COMMITTED.
    for _ in range(3):
        if conn.execute(_RESERVE, params).first() is not None:
            return admit(conn, charge, instance_id, at)
        row = conn.execute(_EXISTING, params).first()
        if row is None:
            continue
        digest, request_id, state, status, content_type, body, created_at = row
        if created_at < at - RETENTION_US:
            if conn.execute(_TAKE_OVER, params | {"old": created_at}).rowcount == 1:
                return admit(conn, charge, instance_id, at)
            continue
        if digest != reservation.digest:
            raise IdempotencyMismatch(
                f"{HEADER} {reservation.key!r} was first used with a different body; use a new key "
                "for a different request."
            )
        if state == "in_flight":
            raise IdempotencyConflict(
                f"A request with {HEADER} {reservation.key!r} is still in progress; retry when it "
                "has finished.",
                request_id=request_id,
            )
        if body is None:
            raise IdempotencyConflict(
                f"The request with {HEADER} {reservation.key!r} was already answered and charged "
                f"(request {request_id}), as a stream or too large to replay; it is not sent again.",
                request_id=request_id,
            )
        return Replay(request_id, int(status), content_type, bytes(body))
    raise IdempotencyConflict(
        f"Other requests with {HEADER} {reservation.key!r} are racing for it; retry shortly."
    )


_COMPLETE = text(
    "UPDATE idempotency_keys SET state = 'done', status = :status, content_type = :content_type, "
    "body = :body WHERE key_id = :key_id AND idempotency_key = :key AND request_id = :request_id"
)
_FORGET = text(
    "DELETE FROM idempotency_keys "
    "WHERE key_id = :key_id AND idempotency_key = :key AND request_id = :request_id"
)


@dataclass(frozen=True)
class Answer:
    """The first answer, kept for replays."""

    status: int
    content_type: str | None
    body: bytes | None


def settle_once(
    conn: Connection,
    admission: Admission,
    settlement: Settlement,
    at: int,
    reservation: Reservation,
    answer: Answer | None,
) -> bool:
    """Settle, and keep the answer of a charged request (or forget the key of one not charged)."""
    if not settle(conn, admission, settlement, at):
        return False
    params = {
        "key_id": admission.charge.caller.key_id,
        "key": reservation.key,
        "request_id": admission.charge.request_id,
    }
    if settlement.outcome != "charged":
        conn.execute(_FORGET, params)
        return True
    body = answer.body if answer is not None and answer.body is not None else None
    if body is not None and len(body) > MAX_REPLAY_BYTES:
        body = None
    conn.execute(
        _COMPLETE,
        params
        | {
            "status": answer.status if answer else settlement.upstream_status,
            "content_type": answer.content_type if answer else None,
            "body": body,
        },
    )
    return True


# At most PURGE_BATCH keys at a time: on SQLite the sweep runs on the event loop, so no unit of
# work may take long; a backlog goes over the next sweeps.
PURGE_BATCH = 1_000
_PURGE = text(
    "DELETE FROM idempotency_keys WHERE (key_id, idempotency_key) IN (SELECT key_id, idempotency_key "
    "FROM idempotency_keys WHERE created_at < :cutoff ORDER BY created_at LIMIT :limit)"
)


def purge(conn: Connection, at: int) -> int:
    """Forget up to PURGE_BATCH keys older than the retention (run with hold expiry)."""
    return int(conn.execute(_PURGE, {"cutoff": at - RETENTION_US, "limit": PURGE_BATCH}).rowcount or 0)


def replay_headers(replay: Replay) -> dict[str, str]:
    """Headers of a replayed answer: nothing is charged this time."""
    headers = {
        "X-Request-Id": replay.request_id,
        "X-Credits-Charged": "0",
        "Idempotent-Replayed": "true",
    }
    if replay.content_type:
        headers["Content-Type"] = replay.content_type
    return headers
