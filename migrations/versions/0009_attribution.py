"""Attribution and corrections: end users and tags on holds and ledger rows; ledger adjustments

`holds` and `ledger` get `end_user` (the OpenAI `user`, or the X-Gateway-End-User header) and `tags`
(the X-Gateway-Tags header, comma-separated, as sent); `ledger_tags` holds a row per tag of a ledger
row, written in the settlement's own statement, for reports by tag. `ledger_adjustments` is
append-only: a signed correction (negative refunds) of a ledger row, applied in its transaction to
the counters of the windows the request was counted in. The report index `ix_ledger_charged_report`
also covers `end_user` and `tags`, so reports by either read no table row.

PostgreSQL: `gateway_admit_batch` takes two more arrays (end user, tags) for the holds it writes (a
new signature: dropped and created); `gateway_settle_batch` is 0008's, signature and lock order
unchanged, copying them to the ledger row and writing the tag rows. The downgrade restores 0006's
admission and 0008's settlement.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 06:00:00.000000
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_ADMIT_SIGNATURE = (
    "gateway_admit_batch(varchar[], varchar[], varchar[], integer[], integer[], varchar[], integer[], "
    "bigint[], bigint[], boolean[], bigint[], bigint[], bigint[], bigint[], bigint[])"
)
NEW_ADMIT_SIGNATURE = (
    "gateway_admit_batch(varchar[], varchar[], varchar[], integer[], integer[], varchar[], integer[], "
    "bigint[], bigint[], boolean[], bigint[], varchar[], varchar[], bigint[], bigint[], bigint[], bigint[])"
)

ADMIT = """
CREATE FUNCTION gateway_admit_batch(
    p_request_id varchar[], p_instance_id varchar[], p_key_id varchar[], p_user_id integer[],
    p_team_id integer[], p_model varchar[], p_message_count integer[], p_unit_price bigint[],
    p_credits bigint[], p_stream boolean[], p_admitted_at bigint[], p_end_user varchar[], p_tags varchar[],
    p_daily bigint[], p_weekly bigint[], p_monthly bigint[], p_total bigint[])
RETURNS TABLE (o_req integer, o_budget integer, o_scope varchar, o_period varchar, o_limit bigint,
               o_window bigint, o_spent bigint, o_held bigint, o_enforce boolean, o_refusal varchar)
LANGUAGE plpgsql
-- Every statement here reads rows by key. The plans PL/pgSQL caches are made once per session,
-- when the tables may still be nearly empty (a new database, statistics not yet gathered): a
-- plan that scans allocations then stays, and costs more with every request ever admitted.
SET enable_seqscan = off
AS $$
#variable_conflict error
DECLARE
    n integer := coalesce(array_length(p_request_id, 1), 0);
    live boolean[];
    -- The budgets of each live request, in (request, budget id) order.
    m_req integer[];
    m_budget integer[];
    m_scope varchar[];
    m_period varchar[];
    m_limit bigint[];
    m_window bigint[];
    m_enforce boolean[];
    m_pos integer[];
    m_count integer;
    -- The counters, locked: their figures at the time of locking, and the holds added here.
    c_budget integer[];
    c_window bigint[];
    c_spent bigint[];
    c_held bigint[];
    c_added bigint[];
    refused_requests varchar[] := '{}';
    r integer;
    j integer := 1;
    k integer;
    first integer;
    refused_at integer;
    pos integer;
BEGIN
    -- A key revoked by the time of admission is refused.
    SELECT array_agg(ak.id IS NOT NULL AND (ak.revoked_at IS NULL OR ak.revoked_at > q.at) ORDER BY q.i)
    INTO live
    FROM unnest(p_key_id, p_admitted_at) WITH ORDINALITY AS q(key_id, at, i)
    LEFT JOIN api_keys ak ON ak.id = q.key_id AND ak.id = ANY(p_key_id);

    SELECT array_agg(x.i ORDER BY x.i, x.id), array_agg(x.id ORDER BY x.i, x.id),
           array_agg(x.scope ORDER BY x.i, x.id), array_agg(x.period ORDER BY x.i, x.id),
           array_agg(x.limit_micros ORDER BY x.i, x.id), array_agg(x.w ORDER BY x.i, x.id),
           array_agg(x.enf ORDER BY x.i, x.id)
    INTO m_req, m_budget, m_scope, m_period, m_limit, m_window, m_enforce
    FROM (
        SELECT q.i::integer AS i, bu.id, bu.scope, bu.period, bu.limit_micros,
               bu.enforce AND bu.deleted_at IS NULL AS enf,
               CASE bu.period WHEN 'daily' THEN q.daily WHEN 'weekly' THEN q.weekly
                              WHEN 'monthly' THEN q.monthly ELSE q.total END AS w
        FROM unnest(p_key_id, p_user_id, p_team_id, p_daily, p_weekly, p_monthly, p_total)
             WITH ORDINALITY AS q(key_id, user_id, team_id, daily, weekly, monthly, total, i)
        CROSS JOIN LATERAL (
            SELECT b.* FROM budgets b WHERE b.scope = 'key' AND b.subject = q.key_id
            UNION ALL
            SELECT b.* FROM budgets b WHERE b.scope = 'user' AND b.subject = q.user_id::text
            UNION ALL
            SELECT b.* FROM budgets b WHERE b.scope = 'team' AND b.subject = q.team_id::text
        ) bu
        WHERE live[q.i]
    ) x;
    m_count := coalesce(array_length(m_req, 1), 0);

    -- Holds and allocations of every live request first, before any counter is locked; those of
    -- the requests refused are deleted again below.
    INSERT INTO holds (request_id, instance_id, key_id, user_id, team_id, model, message_count,
                       unit_price_micros, credits_micros, stream, admitted_at, end_user, tags)
    SELECT q.request_id, q.instance_id, q.key_id, q.user_id, q.team_id, q.model, q.message_count,
           q.unit_price, q.credits, q.stream, q.at, q.end_user, q.tags
    FROM unnest(p_request_id, p_instance_id, p_key_id, p_user_id, p_team_id, p_model,
                p_message_count, p_unit_price, p_credits, p_stream, p_admitted_at, p_end_user, p_tags)
         WITH ORDINALITY AS q(request_id, instance_id, key_id, user_id, team_id, model,
                              message_count, unit_price, credits, stream, at, end_user, tags, i)
    WHERE live[q.i];
    INSERT INTO allocations (request_id, budget_id, window_start, credits_micros)
    SELECT p_request_id[m_req[s]], m_budget[s], m_window[s], p_credits[m_req[s]]
    FROM generate_series(1, m_count) AS s;

    -- Lock every counter involved, creating those missing, in the one fixed order.
    WITH locked AS (
        INSERT INTO budget_counters AS c (budget_id, window_start, spent_micros, held_micros)
        SELECT t.b, t.w, 0, 0
        FROM (SELECT DISTINCT u.b, u.w, gateway_lock_rank(u.s) AS rank
              FROM unnest(m_budget, m_window, m_scope) AS u(b, w, s)) t
        ORDER BY t.rank, t.b, t.w
        ON CONFLICT ON CONSTRAINT pk_budget_counters DO UPDATE SET held_micros = c.held_micros
        RETURNING c.budget_id, c.window_start, c.spent_micros, c.held_micros
    )
    SELECT array_agg(l.budget_id), array_agg(l.window_start), array_agg(l.spent_micros),
           array_agg(l.held_micros)
    INTO c_budget, c_window, c_spent, c_held
    FROM locked l;
    c_added := array_fill(0::bigint, ARRAY[coalesce(array_length(c_budget, 1), 0)]);
    SELECT array_agg(cc.pos::integer ORDER BY mm.s) INTO m_pos
    FROM unnest(m_budget, m_window) WITH ORDINALITY AS mm(b, w, s)
    JOIN unnest(c_budget, c_window) WITH ORDINALITY AS cc(b, w, pos) ON cc.b = mm.b AND cc.w = mm.w;

    -- Each request in order, against the counters plus the holds admitted before it.
    FOR r IN 1 .. n LOOP
        first := j;
        WHILE j <= m_count AND m_req[j] = r LOOP
            j := j + 1;
        END LOOP;
        o_req := r;
        IF NOT live[r] THEN
            o_budget := NULL; o_scope := NULL; o_period := NULL; o_limit := NULL; o_window := NULL;
            o_spent := NULL; o_held := NULL; o_enforce := NULL; o_refusal := 'revoked';
            RETURN NEXT;
            CONTINUE;
        END IF;
        refused_at := NULL;
        IF p_credits[r] > 0 THEN
            FOR k IN first .. j - 1 LOOP
                pos := m_pos[k];
                IF m_enforce[k] AND c_spent[pos] + c_held[pos] + c_added[pos] + p_credits[r] > m_limit[k] THEN
                    refused_at := k;
                    EXIT;
                END IF;
            END LOOP;
        END IF;
        IF refused_at IS NOT NULL THEN
            pos := m_pos[refused_at];
            o_budget := m_budget[refused_at]; o_scope := m_scope[refused_at];
            o_period := m_period[refused_at]; o_limit := m_limit[refused_at];
            o_window := m_window[refused_at]; o_spent := c_spent[pos];
            o_held := c_held[pos] + c_added[pos]; o_enforce := true; o_refusal := 'budget';
            RETURN NEXT;
            refused_requests := refused_requests || p_request_id[r];
            CONTINUE;
        END IF;
        o_refusal := NULL;
        IF first = j THEN
            o_budget := NULL; o_scope := NULL; o_period := NULL; o_limit := NULL; o_window := NULL;
            o_spent := NULL; o_held := NULL; o_enforce := NULL;
            RETURN NEXT;
            CONTINUE;
        END IF;
        FOR k IN first .. j - 1 LOOP
            pos := m_pos[k];
            c_added[pos] := c_added[pos] + p_credits[r];
            o_budget := m_budget[k]; o_scope := m_scope[k]; o_period := m_period[k];
            o_limit := m_limit[k]; o_window := m_window[k]; o_spent := c_spent[pos];
            o_held := c_held[pos] + c_added[pos]; o_enforce := m_enforce[k];
            RETURN NEXT;
        END LOOP;
    END LOOP;

    -- (`= ANY`: by the primary key, never a scan of every window's counter.)
    UPDATE budget_counters c SET held_micros = c.held_micros + u.added
    FROM unnest(c_budget, c_window, c_added) AS u(b, w, added)
    WHERE u.added > 0 AND c.budget_id = ANY(c_budget) AND c.budget_id = u.b AND c.window_start = u.w;
    IF array_length(refused_requests, 1) > 0 THEN
        DELETE FROM allocations al WHERE al.request_id = ANY(refused_requests);
        DELETE FROM holds h WHERE h.request_id = ANY(refused_requests);
    END IF;
    RETURN;
END
$$
"""

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
                  q.outcome, q.upstream_status, q.prompt_tokens, q.completion_tokens, q.total_tokens,
                  h.end_user, h.tags
    ), written AS (
        INSERT INTO ledger (request_id, admitted_at, settled_at, team_id, user_id, key_id, model,
                            message_count, unit_price_micros, credits_micros, outcome,
                            upstream_status, prompt_tokens, completion_tokens, total_tokens,
                            stream, duration_us, end_user, tags)
        SELECT d.request_id, d.admitted_at, d.settled_at, d.team_id, d.user_id, d.key_id, d.model,
               d.message_count, d.unit_price_micros,
               CASE WHEN d.outcome = 'charged' THEN d.credits_micros ELSE 0 END, d.outcome,
               d.upstream_status, d.prompt_tokens, d.completion_tokens, d.total_tokens, d.stream,
               GREATEST(d.settled_at - d.admitted_at, 0), d.end_user, d.tags
        FROM d
        RETURNING 1
    ), tagged AS (
        INSERT INTO ledger_tags (request_id, tag)
        SELECT d.request_id, t.tag
        FROM d CROSS JOIN LATERAL unnest(string_to_array(d.tags, ',')) AS t(tag)
        WHERE d.tags IS NOT NULL
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

REPORT_COLUMNS = [
    "admitted_at",
    "team_id",
    "user_id",
    "key_id",
    "model",
    "message_count",
    "credits_micros",
    "prompt_tokens",
    "completion_tokens",
]


def _migration(number: str):  # type: ignore[no-untyped-def]
    """A revision whose functions this one replaces, for the downgrade (revision files are no package)."""
    path = next(Path(__file__).parent.glob(f"{number}_*.py"))
    spec = importlib.util.spec_from_file_location(f"migration_{number}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report_index(batch, columns: list[str]) -> None:  # type: ignore[no-untyped-def]
    batch.create_index(
        "ix_ledger_charged_report",
        columns,
        unique=False,
        sqlite_where=sa.text("outcome = 'charged'"),
        postgresql_where=sa.text("outcome = 'charged'"),
    )


def upgrade() -> None:
    with op.batch_alter_table("holds") as batch:
        batch.add_column(sa.Column("end_user", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("tags", sa.String(length=700), nullable=True))
    with op.batch_alter_table("ledger") as batch:
        batch.add_column(sa.Column("end_user", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("tags", sa.String(length=700), nullable=True))
    with op.batch_alter_table("ledger") as batch:
        batch.drop_index("ix_ledger_charged_report")
        _report_index(batch, [*REPORT_COLUMNS, "end_user", "tags", "outcome"])
    op.create_table(
        "ledger_tags",
        sa.Column("request_id", sa.String(length=32), nullable=False),
        sa.Column("tag", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("request_id", "tag", name=op.f("pk_ledger_tags")),
    )
    with op.batch_alter_table("ledger_tags") as batch:
        batch.create_index("ix_ledger_tags_tag", ["tag", "request_id"], unique=False)
    op.create_table(
        "ledger_adjustments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.String(length=32), nullable=False),
        sa.Column("credits_micros", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("actor", sa.String(length=300), nullable=False),
        sa.ForeignKeyConstraint(
            ["request_id"], ["ledger.request_id"], name=op.f("fk_ledger_adjustments_request_id_ledger")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_adjustments")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("ledger_adjustments") as batch:
        batch.create_index("ix_ledger_adjustments_request_id", ["request_id"], unique=False)
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION {OLD_ADMIT_SIGNATURE}")
        op.execute(ADMIT)
        op.execute(SETTLE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION {NEW_ADMIT_SIGNATURE}")
        op.execute(_migration("0006").ADMIT)
        op.execute(_migration("0008").SETTLE)
    with op.batch_alter_table("ledger_adjustments") as batch:
        batch.drop_index("ix_ledger_adjustments_request_id")
    op.drop_table("ledger_adjustments")
    with op.batch_alter_table("ledger_tags") as batch:
        batch.drop_index("ix_ledger_tags_tag")
    op.drop_table("ledger_tags")
    with op.batch_alter_table("ledger") as batch:
        batch.drop_index("ix_ledger_charged_report")
        _report_index(batch, [*REPORT_COLUMNS, "outcome"])
    with op.batch_alter_table("ledger") as batch:
        batch.drop_column("tags")
        batch.drop_column("end_user")
    with op.batch_alter_table("holds") as batch:
        batch.drop_column("tags")
        batch.drop_column("end_user")
