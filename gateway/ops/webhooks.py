"""Webhook delivery of alert events from the outbox: signed, leased, retried, never in the chat path.

Every gateway process runs one `Deliverer` (gateway/web/app.py). Each second it:

1. counts new events in `gateway_alerts_emitted_total` (each once, by the process that claims
   it: FOR UPDATE SKIP LOCKED on PostgreSQL, the write lock on SQLite), and, if it has webhooks,
   dispatches them: each becomes one `webhook_deliveries` row per configured endpoint. A process
   without webhooks dispatches nothing, so all replicas should name the same webhooks;
2. claims due deliveries with a lease (`lease_owner`, `lease_until`: a conditional update that
   only an unleased or expired row passes, and on PostgreSQL SKIP LOCKED), so no two processes
   send the same attempt at once, and a process killed mid-attempt leaves it to another once the
   lease runs out;
3. posts each, at most CLAIM_BATCH at a time, and records the answer: delivered on a 2xx;
   otherwise retried after an exponential delay with jitter (GATEWAY_WEBHOOK_RETRY_BASE_SECONDS,
   doubling, at most RETRY_DELAY_MAX_SECONDS), the same event id each time, until RETRY_HORIZON
   after the event was created (24 h), then `gave_up`.

Events wait in the database, not in memory: a dead receiver costs a few rows, never the chat path.

Formats: `standard` follows Standard Webhooks (`webhook-id`, `webhook-timestamp`,
`webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`); a secret written
`whsec_<base64>` is used as the bytes it encodes, as the specification's libraries do; any other
secret as its UTF-8 bytes. `slack` posts {"text": one sentence}.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from sqlalchemy import Connection, bindparam, text

from gateway.core.metering import now_us
from gateway.core.settlement import new_event_id
from gateway.core.windows import iso_us
from gateway.errors import LedgerUnavailable
from gateway.jsonout import dumps
from gateway.ops import alert_events, events
from gateway.ops.metrics import Metrics
from gateway.ops.settings import Settings, Webhook
from gateway.store import Store

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
CLAIM_BATCH = 50
DISPATCH_BATCH = 200
RETRY_HORIZON_US = 24 * 3600 * 1_000_000
RETRY_DELAY_MAX_SECONDS = 3600.0
MAX_ERROR = 500
USER_AGENT = "credit-gateway-webhooks/1"


# ------------------------------------------------------------------ pure parts


def signing_key(secret: str) -> bytes:
    """The HMAC key of a secret: `whsec_<base64>` decoded (Standard Webhooks), else its UTF-8."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode()


def signature(key: bytes, msg_id: str, timestamp: int, payload: bytes) -> str:
    """The `webhook-signature` header: `v1,` and the base64 HMAC-SHA256 of `id.timestamp.body`."""
    signed = f"{msg_id}.{timestamp}.".encode() + payload
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def endpoint_id(url: str) -> str:
    """How the database names an endpoint: a digest of its URL (which may hold a secret)."""
    return hashlib.sha256(url.encode()).hexdigest()[:32]


def endpoint_names(hooks: Iterable[Webhook]) -> dict[str, str]:
    """Each configured endpoint's database name (`endpoint_id`) and how listings show it."""
    return {endpoint_id(h.url): shown(h.url) for h in hooks}


def shown(url: str) -> str:
    """An endpoint's URL as listings show it: scheme and host only (a path may be a secret)."""
    parts = urlsplit(url)
    return (
        f"{parts.scheme}://{parts.netloc}/…"
        if parts.path not in ("", "/")
        else f"{parts.scheme}://{parts.netloc}/"
    )


def request_of(hook: Webhook, event: dict[str, Any], at_seconds: int) -> tuple[bytes, dict[str, str]]:
    """The body and headers that post `event` to `hook` in its format."""
    if hook.format == "slack":
        return dumps({"text": events.sentence(event)}).encode(), {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
        }
    payload = dumps(event).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "webhook-id": event["id"],
        "webhook-timestamp": str(at_seconds),
    }
    if hook.secret is not None:
        headers["webhook-signature"] = signature(
            signing_key(str(hook.secret)), event["id"], at_seconds, payload
        )
    return payload, headers


def retry_delay(attempts: int, base: float, rng: random.Random | None = None) -> float:
    """Seconds before the next try after `attempts` failed ones: base doubling, capped, with "equal
    jitter" (between half and all of it), so receivers coming back are not hit all at once."""
    delay: float = min(base * 2.0 ** min(attempts - 1, 40), RETRY_DELAY_MAX_SECONDS)
    fraction: float = (rng or random).random()
    return delay / 2 + fraction * delay / 2


# ------------------------------------------------------------------ units of work

_UNCOUNTED = (
    "SELECT e.id, b.scope, e.threshold FROM alert_events e JOIN budgets b ON b.id = e.budget_id "
    "WHERE NOT e.counted ORDER BY e.created_at LIMIT :n"
)
_MARK_COUNTED = text("UPDATE alert_events SET counted = true WHERE id IN :ids").bindparams(
    bindparam("ids", expanding=True)
)
_UNDISPATCHED = (
    "SELECT e.id, e.created_at FROM alert_events e WHERE NOT e.dispatched ORDER BY e.created_at LIMIT :n"
)
_MARK_DISPATCHED = text("UPDATE alert_events SET dispatched = true WHERE id IN :ids").bindparams(
    bindparam("ids", expanding=True)
)
_NEW_DELIVERY = text(
    "INSERT INTO webhook_deliveries (event_id, endpoint, state, attempts, next_attempt_at) "
    "VALUES (:event, :endpoint, 'pending', 0, :at) ON CONFLICT DO NOTHING"
)
_DUE = (
    "SELECT event_id, endpoint FROM webhook_deliveries WHERE state = 'pending' AND next_attempt_at <= :now "
    "AND endpoint IN :endpoints AND (lease_until IS NULL OR lease_until < :now) "
    "ORDER BY next_attempt_at LIMIT :n"
)
_LEASE = (
    "UPDATE webhook_deliveries SET lease_owner = :owner, lease_until = :until WHERE event_id = :event "
    "AND endpoint = :endpoint AND state = 'pending' AND (lease_until IS NULL OR lease_until < :now)"
)
_FINISH = text(
    "UPDATE webhook_deliveries SET state = :state, attempts = attempts + 1, next_attempt_at = :next, "
    "last_error = COALESCE(:error, last_error), last_status = :status, delivered_at = :delivered, "
    "lease_owner = NULL, "
    "lease_until = NULL WHERE event_id = :event AND endpoint = :endpoint AND lease_owner = :owner "
    "AND state = 'pending'"
)
_PENDING = text("SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'pending'")
_WORK = text(
    "SELECT (SELECT COUNT(*) FROM (SELECT 1 FROM alert_events WHERE NOT counted LIMIT 1) w), "
    "(SELECT COUNT(*) FROM (SELECT 1 FROM alert_events WHERE NOT dispatched LIMIT 1) x), "
    "(SELECT COUNT(*) FROM (SELECT 1 FROM webhook_deliveries WHERE state = 'pending' "
    "AND next_attempt_at <= :now LIMIT 1) y), "
    "(SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'pending')"
)


def _skip_locked(conn: Connection, of: str = "") -> str:
    return f" FOR UPDATE{of} SKIP LOCKED" if conn.dialect.name == "postgresql" else ""


@dataclass(frozen=True)
class Work:
    """What a round has to do (read without the write lock)."""

    uncounted: bool
    undispatched: bool
    due: bool
    pending: int


def work(conn: Connection, at: int) -> Work:
    """Read-only: whether there are events to count or dispatch, deliveries due, and how many pending."""
    uncounted, undispatched, due, pending = conn.execute(_WORK, {"now": at}).one()
    return Work(bool(uncounted), bool(undispatched), bool(due), int(pending))


def count_new(conn: Connection) -> list[tuple[str, int]]:
    """Unit of work: (scope, threshold) of events no process has counted yet, now counted."""
    rows = conn.execute(text(_UNCOUNTED + _skip_locked(conn, " OF e")), {"n": DISPATCH_BATCH}).all()
    if rows:
        conn.execute(_MARK_COUNTED, {"ids": [r[0] for r in rows]})
    return [(str(r[1]), int(r[2])) for r in rows]


def dispatch(conn: Connection, endpoints: Sequence[str], at: int) -> int:
    """Unit of work: give new events their deliveries, one per endpoint; how many events.

    Events older than RETRY_HORIZON when dispatched (no webhook was configured to send them then)
    get none: a webhook added later is not flooded with old alerts.
    """
    rows = conn.execute(text(_UNDISPATCHED + _skip_locked(conn)), {"n": DISPATCH_BATCH}).all()
    if not rows:
        return 0
    fresh = [r for r in rows if r[1] >= at - RETRY_HORIZON_US]
    if fresh and endpoints:
        conn.execute(
            _NEW_DELIVERY, [{"event": r[0], "endpoint": e, "at": at} for r in fresh for e in endpoints]
        )
    conn.execute(_MARK_DISPATCHED, {"ids": [r[0] for r in rows]})
    return len(rows)


@dataclass(frozen=True)
class Claimed:
    """A delivery this process holds the lease of, with its event's body."""

    event: dict[str, Any]
    created_at: int
    endpoint: str
    attempts: int


def claim(conn: Connection, endpoints: Sequence[str], owner: str, at: int, lease_us: int) -> list[Claimed]:
    """Unit of work: lease up to CLAIM_BATCH due deliveries to `owner` until `at + lease_us`."""
    due_sql = text(_DUE + _skip_locked(conn)).bindparams(bindparam("endpoints", expanding=True))
    due = conn.execute(due_sql, {"now": at, "endpoints": list(endpoints), "n": CLAIM_BATCH}).all()
    mine = []
    for event_id, endpoint in due:
        leased = conn.execute(
            text(_LEASE),
            {"owner": owner, "until": at + lease_us, "event": event_id, "endpoint": endpoint, "now": at},
        ).rowcount
        if leased:
            mine.append((event_id, endpoint))
    if not mine:
        return []
    ids = sorted({event_id for event_id, _ in mine})
    rows_sql = text(events.EVENT_COLUMNS + " WHERE e.id IN :ids").bindparams(bindparam("ids", expanding=True))
    by_id = {r[0]: r for r in conn.execute(rows_sql, {"ids": ids}).all()}
    attempts_sql = text(
        "SELECT event_id, endpoint, attempts FROM webhook_deliveries WHERE event_id IN :ids"
    ).bindparams(bindparam("ids", expanding=True))
    attempts = {(r[0], r[1]): int(r[2]) for r in conn.execute(attempts_sql, {"ids": ids}).all()}
    return [
        Claimed(events.body(by_id[e]), int(by_id[e][2]), endpoint, attempts[(e, endpoint)])
        for e, endpoint in mine
    ]


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to."""

    event_id: str
    endpoint: str
    state: str  # delivered, pending (to be retried), gave_up
    next_attempt_at: int
    error: str | None
    status: int | None
    delivered_at: int | None


def finish(conn: Connection, owner: str, outcomes: Sequence[Outcome]) -> int:
    """Unit of work: record attempts made under `owner`'s leases; how many were still its own."""
    done = 0
    for o in outcomes:
        done += conn.execute(
            _FINISH,
            {
                "state": o.state,
                "next": o.next_attempt_at,
                "error": o.error,
                "status": o.status,
                "delivered": o.delivered_at,
                "event": o.event_id,
                "endpoint": o.endpoint,
                "owner": owner,
            },
        ).rowcount
    return done


def pending(conn: Connection) -> int:
    """Deliveries not yet made nor given up."""
    return int(conn.execute(_PENDING).scalar_one())


# ------------------------------------------------------------------ sending


async def post(
    session: aiohttp.ClientSession, hook: Webhook, event: dict[str, Any], timeout: float
) -> tuple[int | None, str | None]:
    """Post `event` to `hook` once: (HTTP status or None, error or None when it answered 2xx)."""
    payload, headers = request_of(hook, event, int(time.time()))
    try:
        async with asyncio.timeout(timeout):
            async with session.post(hook.url, data=payload, headers=headers, allow_redirects=False) as resp:
                await resp.read()
                if 200 <= resp.status < 300:
                    return resp.status, None
                return resp.status, f"HTTP {resp.status}"
    except TimeoutError:
        return None, f"no answer within {timeout:g} s"
    except aiohttp.ClientError as exc:
        return None, f"{type(exc).__name__}: {exc}"[:MAX_ERROR]


async def send_test(
    session: aiohttp.ClientSession, hooks: Sequence[Webhook], timeout: float
) -> list[dict[str, Any]]:
    """Post a `webhook.test` event to every endpoint; each one's answer."""
    at = now_us()
    results = []
    for hook in hooks:
        event: dict[str, Any] = {
            "id": new_event_id(),
            "type": events.TEST,
            "created_at": iso_us(at),
            "data": {},
        }
        started = time.monotonic()
        status, error = await post(session, hook, event, timeout)
        results.append(
            {
                "endpoint": shown(hook.url),
                "format": hook.format,
                "id": event["id"],
                "ok": error is None,
                "status": status,
                "error": error,
                "duration_ms": round((time.monotonic() - started) * 1000, 1),
            }
        )
    return results


def new_session() -> aiohttp.ClientSession:
    """The webhooks' own client session: apart from upstream's pool, no cookies."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())


class Deliverer:
    """One process's share of dispatching and delivering events (see the module's docstring)."""

    def __init__(self, settings: Settings, store: Store, metrics: Metrics, owner: str) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.owner = owner
        self.hooks = {endpoint_id(h.url): h for h in settings.webhooks}
        self.timeout = settings.webhook_timeout_seconds
        self.lease_us = int((2 * self.timeout + 5) * 1_000_000)
        self._defaults_stored = False

    async def store_defaults(self) -> None:
        """Make GATEWAY_ALERT_THRESHOLDS the database's defaults (before serving, and until it works)."""
        await self.store.run(alert_events.store_defaults, self.settings.alert_thresholds, now_us())
        self._defaults_stored = True

    async def tick(self, session: aiohttp.ClientSession) -> int:
        """One round: dispatch, claim, send, record; returns how many attempts were made."""
        if not self._defaults_stored:
            await self.store_defaults()
        at = now_us()
        todo = await self.store.read(work, at)
        if todo.uncounted:
            for scope, threshold in await self.store.run(count_new):
                self.metrics.alerts_emitted.labels(scope, str(threshold)).inc()
        if todo.undispatched and self.hooks:
            await self.store.run(dispatch, list(self.hooks), at)
            todo = await self.store.read(work, at)
        self.metrics.webhook_pending.set(todo.pending)
        if not todo.due or not self.hooks:
            return 0
        claimed = await self.store.run(claim, list(self.hooks), self.owner, at, self.lease_us)
        outcomes = await asyncio.gather(*(self._attempt(session, c) for c in claimed))
        if outcomes:
            await self.store.run(finish, self.owner, outcomes)
            self.metrics.webhook_pending.set(await self.store.read(pending))
        return len(outcomes)

    async def _attempt(self, session: aiohttp.ClientSession, c: Claimed) -> Outcome:
        status, error = await post(session, self.hooks[c.endpoint], c.event, self.timeout)
        at = now_us()
        if error is None:
            self.metrics.webhook_deliveries.labels("delivered").inc()
            return Outcome(c.event["id"], c.endpoint, "delivered", at, None, status, at)
        if at >= c.created_at + RETRY_HORIZON_US:
            self.metrics.webhook_deliveries.labels("gave_up").inc()
            log.warning(
                "webhook %s: gave up on event %s: %s", shown(self.hooks[c.endpoint].url), c.event["id"], error
            )
            return Outcome(c.event["id"], c.endpoint, "gave_up", at, error, status, None)
        self.metrics.webhook_deliveries.labels("failed").inc()
        delay = retry_delay(c.attempts + 1, self.settings.webhook_retry_base_seconds)
        return Outcome(c.event["id"], c.endpoint, "pending", at + int(delay * 1_000_000), error, status, None)

    async def run_forever(self) -> None:
        """Rounds every POLL_SECONDS (at once again after a full batch), until cancelled."""
        async with new_session() as session:
            while True:
                made = 0
                try:
                    made = await self.tick(session)
                except LedgerUnavailable:
                    log.warning("webhook delivery paused: database unavailable")
                except Exception:
                    log.exception("webhook delivery round failed")
                if made < CLAIM_BATCH:
                    await asyncio.sleep(POLL_SECONDS)
