"""Budget alerts: thresholds per budget, an outbox of events, their webhook deliveries

`budgets.alert_at`: a budget's own thresholds ("50,80,100", percentages of its limit; NULL: the
defaults, kept in the one row of `alert_defaults`, which `gateway serve` writes from
GATEWAY_ALERT_THRESHOLDS at start-up). `alert_events` is the outbox: the settlement that takes a
budget's `spent` to or past a threshold writes a `budget.threshold_crossed` row in its own
transaction, and a partial unique index on (budget_id, window_start, threshold) WHERE rearmed_at IS
NULL keeps it to one per window, whatever the concurrency (a limit raised above what was spent
re-arms a threshold by setting `rearmed_at`). `webhook_deliveries`: one row per event and endpoint,
with its state, attempts, next attempt, last error and lease.

PostgreSQL: `gateway_settle_batch` is 0006's, signature and lock order unchanged, with the counters'
update now returning what it moved and inserting the thresholds crossed (ON CONFLICT DO NOTHING)
in the same statement. Hold expiry goes through it too (it never charges, so never crosses).
SQLite: the same in gateway/core/metering.py.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 05:00:00.000000
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SETTLE = """
CREATE OR REPLACE FUNCTION gateway_settle_batch(
    p_request_id varchar[], p_settled_at bigint[], p_outcome varchar[], p_upstream_status integer[],
    p_prompt_tokens integer[], p_completion_tokens integer[], p_total_tokens integer[])
RETURNS TABLE (o_req integer, o_settled boolean)
LANGUAGE plpgsql
SET enable_seqscan = off  -- as gateway_admit_batch: by key, whatever the statistics say
AS $$
#variable_conflict error
DECLARE
    gone varchar[];
    charged varchar[];
    budget_ids integer[];
BEGIN
    -- Each hold becomes its ledger row (charged or not); a hold already gone changes nothing.
    WITH q AS (
        SELECT * FROM unnest(p_request_id, p_settled_at, p_outcome, p_upstream_status,
                             p_prompt_tokens, p_completion_tokens, p_total_tokens)
               AS q(request_id, settled_at, outcome, upstream_status, prompt_tokens,
                    completion_tokens, total_tokens)
    ), d AS (
        DELETE FROM holds h USING q WHERE h.request_id = q.request_id
        RETURNING h.request_id, h.admitted_at, h.team_id, h.user_id, h.key_id, h.model,
                  h.message_count, h.unit_price_micros, h.credits_micros, h.stream, q.settled_at,
                  q.outcome, q.upstream_status, q.prompt_tokens, q.completion_tokens, q.total_tokens
    ), written AS (
        INSERT INTO ledger (request_id, admitted_at, settled_at, team_id, user_id, key_id, model,
                            message_count, unit_price_micros, credits_micros, outcome,
                            upstream_status, prompt_tokens, completion_tokens, total_tokens,
                            stream, duration_us)
        SELECT d.request_id, d.admitted_at, d.settled_at, d.team_id, d.user_id, d.key_id, d.model,
               d.message_count, d.unit_price_micros,
               CASE WHEN d.outcome = 'charged' THEN d.credits_micros ELSE 0 END, d.outcome,
               d.upstream_status, d.prompt_tokens, d.completion_tokens, d.total_tokens, d.stream,
               GREATEST(d.settled_at - d.admitted_at, 0)
        FROM d
        RETURNING 1
    )
    SELECT array_agg(d.request_id), array_agg(d.request_id) FILTER (WHERE d.outcome = 'charged')
    INTO gone, charged FROM d;

    IF gone IS NOT NULL THEN
        -- The counters last, locked in the one fixed order (see `gateway_lock_rank`).
        -- (Allocations and counters by their primary keys, `= ANY`: never a scan of the tables,
        -- which grow with the ledger and with every window.)
        SELECT array_agg(DISTINCT al.budget_id) INTO budget_ids
        FROM allocations al WHERE al.request_id = ANY(gone);
        PERFORM 1
        FROM budget_counters c
        JOIN (SELECT DISTINCT al.budget_id, al.window_start FROM allocations al
              WHERE al.request_id = ANY(gone)) m
          ON c.budget_id = m.budget_id AND c.window_start = m.window_start
        JOIN budgets b ON b.id = c.budget_id
        WHERE c.budget_id = ANY(budget_ids)
        ORDER BY gateway_lock_rank(b.scope), c.budget_id, c.window_start
        FOR UPDATE OF c;
        -- The counters move, and each threshold the move reaches for the first time in that
        -- window (spent > 0 and spent * 100 >= threshold * limit, now and not before; see
        -- gateway/core/alerts.py) becomes an event, in this transaction. The counter's lock makes
        -- `before` exact; the unique index keeps one event per (budget, window, threshold).
        WITH moved AS (
            UPDATE budget_counters c
            SET held_micros = c.held_micros - m.released, spent_micros = c.spent_micros + m.spent
            FROM (SELECT al.budget_id, al.window_start, sum(al.credits_micros) AS released,
                         coalesce(sum(al.credits_micros)
                                  FILTER (WHERE al.request_id = ANY(charged)), 0) AS spent
                  FROM allocations al
                  WHERE al.request_id = ANY(gone)
                  GROUP BY al.budget_id, al.window_start) m
            WHERE c.budget_id = ANY(budget_ids) AND c.budget_id = m.budget_id
              AND c.window_start = m.window_start
            RETURNING c.budget_id, c.window_start, c.spent_micros::numeric AS after,
                      (c.spent_micros - m.spent)::numeric AS before
        )
        INSERT INTO alert_events (id, type, created_at, budget_id, window_start, threshold,
                                  limit_micros, spent_micros, enforce, dispatched)
        SELECT 'evt_' || replace(gen_random_uuid()::text, '-', ''), 'budget.threshold_crossed',
               (extract(epoch FROM clock_timestamp()) * 1000000)::bigint, mv.budget_id,
               mv.window_start, t.threshold, b.limit_micros, mv.after::bigint, b.enforce, false
        FROM moved mv
        JOIN budgets b ON b.id = mv.budget_id
        CROSS JOIN LATERAL unnest(string_to_array(coalesce(
            b.alert_at, (SELECT ad.thresholds FROM alert_defaults ad WHERE ad.id = 1), '80,100'),
            ',')::integer[]) AS t(threshold)
        WHERE mv.after > mv.before AND b.deleted_at IS NULL
          AND mv.after * 100 >= t.threshold * b.limit_micros::numeric
          AND NOT (mv.before > 0 AND mv.before * 100 >= t.threshold * b.limit_micros::numeric)
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN QUERY
        SELECT q.i::integer, q.request_id = ANY(coalesce(gone, '{}'::varchar[]))
        FROM unnest(p_request_id) WITH ORDINALITY AS q(request_id, i)
        ORDER BY q.i;
END
$$
"""


def _migration_0006():  # type: ignore[no-untyped-def]
    """The settlement function 0008 replaces, for its downgrade (revision files are no package)."""
    path = next(Path(__file__).parent.glob("0006_*.py"))
    spec = importlib.util.spec_from_file_location("migration_0006", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upgrade() -> None:
    with op.batch_alter_table("budgets") as batch:
        batch.add_column(sa.Column("alert_at", sa.String(length=200), nullable=True))
    op.create_table(
        "alert_defaults",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("thresholds", sa.String(length=200), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alert_defaults")),
    )
    op.create_table(
        "alert_events",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("type", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("budget_id", sa.Integer(), nullable=False),
        sa.Column("window_start", sa.BigInteger(), nullable=False),
        sa.Column("threshold", sa.Integer(), nullable=False),
        sa.Column("limit_micros", sa.BigInteger(), nullable=False),
        sa.Column("spent_micros", sa.BigInteger(), nullable=False),
        sa.Column("enforce", sa.Boolean(), nullable=False),
        sa.Column("rearmed_at", sa.BigInteger(), nullable=True),
        sa.Column("dispatched", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("counted", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.ForeignKeyConstraint(
            ["budget_id"], ["budgets.id"], name=op.f("fk_alert_events_budget_id_budgets")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alert_events")),
    )
    with op.batch_alter_table("alert_events") as batch:
        batch.create_index(
            "uq_alert_events_threshold",
            ["budget_id", "window_start", "threshold"],
            unique=True,
            sqlite_where=sa.text("rearmed_at IS NULL"),
            postgresql_where=sa.text("rearmed_at IS NULL"),
        )
        batch.create_index("ix_alert_events_created_at", ["created_at", "id"], unique=False)
        batch.create_index(
            "ix_alert_events_undispatched",
            ["created_at"],
            unique=False,
            sqlite_where=sa.text("NOT dispatched"),
            postgresql_where=sa.text("NOT dispatched"),
        )
        batch.create_index(
            "ix_alert_events_uncounted",
            ["created_at"],
            unique=False,
            sqlite_where=sa.text("NOT counted"),
            postgresql_where=sa.text("NOT counted"),
        )
    op.create_table(
        "webhook_deliveries",
        sa.Column("event_id", sa.String(length=40), nullable=False),
        sa.Column("endpoint", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.BigInteger(), nullable=False),
        sa.Column("last_error", sa.String(length=500), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("delivered_at", sa.BigInteger(), nullable=True),
        sa.Column("lease_owner", sa.String(length=32), nullable=True),
        sa.Column("lease_until", sa.BigInteger(), nullable=True),
        sa.CheckConstraint(
            "state IN ('pending', 'delivered', 'gave_up')", name=op.f("ck_webhook_deliveries_state")
        ),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["alert_events.id"],
            name=op.f("fk_webhook_deliveries_event_id_alert_events"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("event_id", "endpoint", name=op.f("pk_webhook_deliveries")),
    )
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.create_index(
            "ix_webhook_deliveries_due",
            ["next_attempt_at"],
            unique=False,
            sqlite_where=sa.text("state = 'pending'"),
            postgresql_where=sa.text("state = 'pending'"),
        )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(SETTLE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        old = _migration_0006()
        op.execute(old.SETTLE.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1))
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.drop_index("ix_webhook_deliveries_due")
    op.drop_table("webhook_deliveries")
    with op.batch_alter_table("alert_events") as batch:
        batch.drop_index("ix_alert_events_uncounted")
        batch.drop_index("ix_alert_events_undispatched")
        batch.drop_index("ix_alert_events_created_at")
        batch.drop_index("uq_alert_events_threshold")
    op.drop_table("alert_events")
    op.drop_table("alert_defaults")
    with op.batch_alter_table("budgets") as batch:
        batch.drop_column("alert_at")
