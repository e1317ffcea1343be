"""The database schema: teams, users, keys, budgets, window counters, holds and the ledger.

Times are integer microseconds since the Unix epoch (UTC) and money is integer micro-credits,
so both dialects store and compare them the same way.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    false,
    text,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base with a naming convention, so constraint names are stable across dialects."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Team(Base):
    __tablename__ = "teams"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    # The models its members may use: a JSON array of names; NULL, every priced model.
    models: Mapped[str | None] = mapped_column(Text)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    team_id: Mapped[int | None] = mapped_column(ForeignKey("teams.id"), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    models: Mapped[str | None] = mapped_column(Text)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    # SHA-256 of the secret: keys are 256-bit random, so a fast hash is as safe as a slow one.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[int] = mapped_column(BigInteger)
    # A time in the future: the key works until then (a rotated key's grace period).
    revoked_at: Mapped[int | None] = mapped_column(BigInteger)
    models: Mapped[str | None] = mapped_column(Text)
    expires_at: Mapped[int | None] = mapped_column(BigInteger)
    blocked_at: Mapped[int | None] = mapped_column(BigInteger)
    # The key that replaced this one (`keys rotate`).
    rotated_to: Mapped[str | None] = mapped_column(String(32))
    # Written from the key caches in the background, at most once a minute a key.
    last_used_at: Mapped[int | None] = mapped_column(BigInteger)


class Budget(Base):
    __tablename__ = "budgets"
    __table_args__ = (
        Index("uq_budgets_scope_subject_period", "scope", "subject", "period", unique=True),
        CheckConstraint("scope IN ('team', 'user', 'key', 'end_user')", name="scope"),
        CheckConstraint("period IN ('daily', 'weekly', 'monthly', 'total')", name="period"),
        CheckConstraint("limit_micros >= 0", name="limit_micros"),
        CheckConstraint("month_starts_on BETWEEN 1 AND 28", name="month_starts_on"),
        CheckConstraint(
            "week_starts IN ('monday', 'tuesday', 'wednesday', 'thursday', 'friday', 'saturday', 'sunday')",
            name="week_starts",
        ),
        # Budget rows are never deleted (see `deleted_at`); AUTOINCREMENT keeps ids of rows deleted
        # by older versions from being reused.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scope: Mapped[str] = mapped_column(String(8))
    # The id of the team, user or key, as text; for an end user's, "USER_ID/END_USER" ("USER_ID/*":
    # a default, see `default_id`).
    subject: Mapped[str] = mapped_column(String(160))
    period: Mapped[str] = mapped_column(String(8))
    limit_micros: Mapped[int] = mapped_column(BigInteger)
    # False: counted, reported and alerted on, never refusing (a soft budget).
    enforce: Mapped[bool] = mapped_column(Boolean, server_default=true())
    # Set when deleted: the row and its counters stay (counted, not enforced, not listed), so that
    # setting the budget again in the same window starts from what was spent in it.
    deleted_at: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)
    # The budget's alert thresholds, "50,80,100" ("" none); NULL: the defaults (see `AlertDefaults`).
    alert_at: Mapped[str | None] = mapped_column(String(200))
    # An end-user budget's user (its subject names the same id), for joins by key; NULL otherwise.
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    # Set on an end user's budget that admission created from a default (`USER_ID/*`, this id) on
    # the end user's first request: it follows the default's limit. NULL: set by an administrator.
    default_id: Mapped[int | None] = mapped_column(ForeignKey("budgets.id"), index=True)
    # Where its windows begin (gateway/core/windows.py `Rule`): local midnight in this IANA zone,
    # weeks from this day, months from this cycle day. Budgets made before these existed: UTC,
    # monday, 1.
    timezone: Mapped[str] = mapped_column(String(64), server_default="UTC")
    week_starts: Mapped[str] = mapped_column(String(9), server_default="monday")
    month_starts_on: Mapped[int] = mapped_column(Integer, server_default="1")


class BudgetCounter(Base):
    """Spent and held micro-credits of one budget in one window; changed only by conditional updates."""

    __tablename__ = "budget_counters"
    __table_args__ = (
        CheckConstraint("spent_micros >= 0", name="spent_micros"),
        CheckConstraint("held_micros >= 0", name="held_micros"),
    )

    budget_id: Mapped[int] = mapped_column(ForeignKey("budgets.id", ondelete="CASCADE"), primary_key=True)
    window_start: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # seconds since the epoch
    spent_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    held_micros: Mapped[int] = mapped_column(BigInteger, default=0)


class Allocation(Base):
    """Which budget windows an admitted request was held on; kept after settlement for verification."""

    __tablename__ = "allocations"
    __table_args__ = (Index("ix_allocations_budget_window", "budget_id", "window_start"),)

    request_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    budget_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    window_start: Mapped[int] = mapped_column(BigInteger)
    credits_micros: Mapped[int] = mapped_column(BigInteger)


class Instance(Base):
    """A live gateway process; holds of an instance that stopped beating are expired after the TTL."""

    __tablename__ = "instances"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    started_at: Mapped[int] = mapped_column(BigInteger)
    heartbeat_at: Mapped[int] = mapped_column(BigInteger)


class Hold(Base):
    """An admitted request not yet settled (only requests in flight: no index beyond the key)."""

    __tablename__ = "holds"

    request_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    instance_id: Mapped[str] = mapped_column(String(32))
    key_id: Mapped[str] = mapped_column(String(32))
    user_id: Mapped[int] = mapped_column(Integer)
    team_id: Mapped[int | None] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(200))
    message_count: Mapped[int] = mapped_column(Integer)
    unit_price_micros: Mapped[int] = mapped_column(BigInteger)
    credits_micros: Mapped[int] = mapped_column(BigInteger)
    stream: Mapped[bool] = mapped_column(Boolean)
    admitted_at: Mapped[int] = mapped_column(BigInteger)
    # Attribution (contract §11), carried to the ledger row: the end user and the tags, comma-separated.
    end_user: Mapped[str | None] = mapped_column(String(128))
    tags: Mapped[str | None] = mapped_column(String(700))


# A covering index of charged rows for billing reports; `outcome` last so SQLite treats it as covering.
REPORT_COLUMNS = (
    "admitted_at",
    "team_id",
    "user_id",
    "key_id",
    "model",
    "message_count",
    "credits_micros",
    "prompt_tokens",
    "completion_tokens",
    "end_user",
    "tags",
    "outcome",
)


class LedgerEntry(Base):
    """One append-only row per admitted request, written when it settles (or expires)."""

    __tablename__ = "ledger"
    __table_args__ = (
        Index("ix_ledger_admitted_at", "admitted_at", "request_id"),
        Index("ix_ledger_user_admitted_at", "user_id", "admitted_at"),
        Index("ix_ledger_team_admitted_at", "team_id", "admitted_at"),
        # Billing reports read only this index (see gateway/reports.py and bench/report.py).
        Index(
            "ix_ledger_charged_report",
            *REPORT_COLUMNS,
            sqlite_where=text("outcome = 'charged'"),
            postgresql_where=text("outcome = 'charged'"),
        ),
        CheckConstraint(
            "outcome IN ('charged', 'upstream_error', 'upstream_unavailable', 'upstream_timeout', 'expired')",
            name="outcome",
        ),
    )

    request_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    admitted_at: Mapped[int] = mapped_column(BigInteger)
    settled_at: Mapped[int] = mapped_column(BigInteger)
    team_id: Mapped[int | None] = mapped_column(Integer)
    user_id: Mapped[int] = mapped_column(Integer)
    key_id: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(200))
    message_count: Mapped[int] = mapped_column(Integer)
    unit_price_micros: Mapped[int] = mapped_column(BigInteger)
    credits_micros: Mapped[int] = mapped_column(BigInteger)
    outcome: Mapped[str] = mapped_column(String(24))
    upstream_status: Mapped[int | None] = mapped_column(Integer)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    total_tokens: Mapped[int | None] = mapped_column(Integer)
    stream: Mapped[bool] = mapped_column(Boolean)
    duration_us: Mapped[int] = mapped_column(BigInteger)
    end_user: Mapped[str | None] = mapped_column(String(128))
    tags: Mapped[str | None] = mapped_column(String(700))  # comma-separated, as sent; see LedgerTag


class LedgerTag(Base):
    """A tag of a ledger row, one row each, for reports by tag; written with the row, never changed."""

    __tablename__ = "ledger_tags"
    __table_args__ = (Index("ix_ledger_tags_tag", "tag", "request_id"),)

    request_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tag: Mapped[str] = mapped_column(String(64), primary_key=True)


class LedgerAdjustment(Base):
    """A correction of a ledger row's charge (signed micro-credits; negative refunds): appended,
    never edited, and applied to the counters of the windows the request was counted in."""

    __tablename__ = "ledger_adjustments"
    __table_args__ = (
        Index("ix_ledger_adjustments_request_id", "request_id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("ledger.request_id"))
    credits_micros: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[int] = mapped_column(BigInteger)
    actor: Mapped[str] = mapped_column(String(300))


class IdempotencyKey(Base):
    """An Idempotency-Key of a caller: reserved at admission, its first answer kept when charged."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (
        CheckConstraint("state IN ('in_flight', 'done')", name="state"),
        Index("ix_idempotency_keys_created_at", "created_at"),
        Index("ix_idempotency_keys_request_id", "request_id"),
    )

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(255), primary_key=True)
    body_digest: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))
    status: Mapped[int | None] = mapped_column(Integer)
    content_type: Mapped[str | None] = mapped_column(String(200))
    body: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_at: Mapped[int] = mapped_column(BigInteger)


class AuditEntry(Base):
    """One administrative change (HTTP or CLI), written in the change's own transaction; never edited."""

    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_log_at", "at", "id"),
        Index("ix_audit_log_action_at", "action", "at"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[int] = mapped_column(BigInteger)
    # `admin-api 127.0.0.1` or `cli alice`.
    actor: Mapped[str] = mapped_column(String(300))
    action: Mapped[str] = mapped_column(String(64))  # e.g. key.create, budget.set
    target: Mapped[str] = mapped_column(String(300))
    # JSON of the object before and after the change (no secrets); NULL for none.
    before: Mapped[str | None] = mapped_column(Text)
    after: Mapped[str | None] = mapped_column(Text)


class AlertDefaults(Base):
    """The default alert thresholds (GATEWAY_ALERT_THRESHOLDS), one row, written by `gateway serve`
    at start-up so the settlement, on either dialect, reads the same ones as the admin commands."""

    __tablename__ = "alert_defaults"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    thresholds: Mapped[str] = mapped_column(String(200))
    updated_at: Mapped[int] = mapped_column(BigInteger)


class AlertEvent(Base):
    """The outbox: an event written in the transaction that caused it, delivered from here.

    One `budget.threshold_crossed` per (budget, window, threshold) not re-armed: the partial unique
    index makes the database refuse a second, whatever the concurrency. Re-arming (a raised limit
    that takes spending below a threshold) sets `rearmed_at`, so that a later crossing is a new row.
    """

    __tablename__ = "alert_events"
    __table_args__ = (
        Index(
            "uq_alert_events_threshold",
            "budget_id",
            "window_start",
            "threshold",
            unique=True,
            sqlite_where=text("rearmed_at IS NULL"),
            postgresql_where=text("rearmed_at IS NULL"),
        ),
        Index("ix_alert_events_created_at", "created_at", "id"),
        Index(
            "ix_alert_events_undispatched",
            "created_at",
            sqlite_where=text("NOT dispatched"),
            postgresql_where=text("NOT dispatched"),
        ),
        Index(
            "ix_alert_events_uncounted",
            "created_at",
            sqlite_where=text("NOT counted"),
            postgresql_where=text("NOT counted"),
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    type: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[int] = mapped_column(BigInteger)
    budget_id: Mapped[int] = mapped_column(ForeignKey("budgets.id"))
    window_start: Mapped[int] = mapped_column(BigInteger)
    threshold: Mapped[int] = mapped_column(Integer)
    # The budget at the crossing: its limit and whether it refused, and what was spent.
    limit_micros: Mapped[int] = mapped_column(BigInteger)
    spent_micros: Mapped[int] = mapped_column(BigInteger)
    enforce: Mapped[bool] = mapped_column(Boolean)
    rearmed_at: Mapped[int | None] = mapped_column(BigInteger)
    # Whether its deliveries, one per configured webhook, have been made, and whether a process has
    # counted it in gateway_alerts_emitted_total (see gateway/ops/webhooks.py).
    dispatched: Mapped[bool] = mapped_column(Boolean, server_default=false())
    counted: Mapped[bool] = mapped_column(Boolean, server_default=false())


class WebhookDelivery(Base):
    """The delivery of one event to one webhook endpoint (named by a digest of its URL)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint("state IN ('pending', 'delivered', 'gave_up')", name="state"),
        Index(
            "ix_webhook_deliveries_due",
            "next_attempt_at",
            sqlite_where=text("state = 'pending'"),
            postgresql_where=text("state = 'pending'"),
        ),
    )

    event_id: Mapped[str] = mapped_column(ForeignKey("alert_events.id", ondelete="CASCADE"), primary_key=True)
    endpoint: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[int] = mapped_column(BigInteger)
    last_error: Mapped[str | None] = mapped_column(String(500))
    last_status: Mapped[int | None] = mapped_column(Integer)
    delivered_at: Mapped[int | None] = mapped_column(BigInteger)
    # A process sending it now holds it until `lease_until`, so no two send the same attempt.
    lease_owner: Mapped[str | None] = mapped_column(String(32))
    lease_until: Mapped[int | None] = mapped_column(BigInteger)


class ConsoleSession(Base):
    """A signed-in session of the web console (gateway/console/sessions.py), shared by every process.

    Only a digest of the session id is stored, so a copy of the table signs nobody in. `token_check`
    ties the session to the admin token it was opened with: a changed token ends every session.
    """

    __tablename__ = "console_sessions"
    __table_args__ = (Index("ix_console_sessions_expires_at", "expires_at"),)

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    csrf: Mapped[str] = mapped_column(String(64))
    token_check: Mapped[str] = mapped_column(String(64))
    address: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int] = mapped_column(BigInteger)


class RateLimit(Base):
    """A rate or concurrency limit on a key, user, team or end user (contract §13)."""

    __tablename__ = "rate_limits"
    __table_args__ = (
        Index(
            "uq_rate_limits_scope_subject_kind_per", "scope", "subject", "kind", "per_seconds", unique=True
        ),
        CheckConstraint("scope IN ('team', 'user', 'key', 'end_user')", name="scope"),
        CheckConstraint("kind IN ('requests', 'credits', 'concurrent')", name="kind"),
        CheckConstraint("limit_value > 0", name="limit_value"),
        CheckConstraint("per_seconds >= 0", name="per_seconds"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scope: Mapped[str] = mapped_column(String(8))
    # As budgets store it: the id of the team, user or key as text; "USER_ID/END_USER" ("USER_ID/*":
    # every end user of that user without a limit of their own of the same kind and period).
    subject: Mapped[str] = mapped_column(String(160))
    kind: Mapped[str] = mapped_column(String(10))
    # Requests, or micro-credits, per `per_seconds`; requests in flight for `concurrent`.
    limit_value: Mapped[int] = mapped_column(BigInteger)
    # The period of a rate; 0 for `concurrent` (0, not NULL, so the unique index holds).
    per_seconds: Mapped[int] = mapped_column(Integer)
    # An end-user limit's user (its subject names the same id), for the key cache; NULL otherwise.
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)


class RateLimitState(Base):
    """A rate limit's GCRA state for one subject (an end user of a default has one each): the
    theoretical arrival time. Changed only by admission, under the batch's lock of this row."""

    __tablename__ = "rate_limit_state"

    limit_id: Mapped[int] = mapped_column(ForeignKey("rate_limits.id", ondelete="CASCADE"), primary_key=True)
    subject: Mapped[str] = mapped_column(String(160), primary_key=True)
    tat_us: Mapped[int] = mapped_column(BigInteger)
