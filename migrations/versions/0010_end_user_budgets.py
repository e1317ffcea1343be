"""End-user budgets (scope `end_user`, subject `USER_ID/END_USER`, defaults `USER_ID/*`); rotated keys

`budgets` gets `user_id` (the user whose end users an `end_user` budget is for: its subject names
it, this column lets listings join its name by key) and `default_id` (set on a budget created from a
default for one end user, NULL on one set by an administrator). The scope check admits `end_user`;
`subject` widens to hold a user id, a slash and a 128-character end user.

Admission refuses a key blocked or expired by then, as on SQLite (before, revocation only; the
key caches refused the others within their 2 s). A request through a rotated key in its grace is
also held on the key budgets that moved to the key that replaced it (`api_keys.rotated_to`):
before this, it counted on its user's and team's budgets only.

A default (`USER_ID/*`) has no counter of its own: admission creates, on an end user's first request
in a period with no budget of their own, that end user's budget at the default's limit
(`default_id` pointing at it), and counts it like any other budget from then on, so it is exact
under concurrency in the same way. `gateway_admit_batch` is replaced (same signature) to do that and
to hold requests that name an end user on their end-user budgets; end-user budgets rank with team
budgets in `gateway_lock_rank` (its ELSE), ordered by id, as before. The downgrade restores 0009's
function and deletes end-user budgets with their counters and allocations. (On SQLite the table is
rebuilt with AUTOINCREMENT again, which an earlier rebuild had dropped.)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 07:30:00.000000
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ADMIT = """
CREATE OR REPLACE FUNCTION gateway_admit_batch(
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
    key_refusal varchar[];
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
    -- A key revoked, blocked or expired by the time of admission is refused (as
    -- gateway/core/admission.py's key_state says, in that order).
    SELECT array_agg(k.refusal ORDER BY k.i), array_agg(k.refusal IS NULL ORDER BY k.i)
    INTO key_refusal, live
    FROM (SELECT q.i, CASE WHEN ak.id IS NULL OR ak.revoked_at <= q.at THEN 'revoked'
                           WHEN ak.blocked_at IS NOT NULL THEN 'blocked'
                           WHEN ak.expires_at <= q.at THEN 'expired' END AS refusal
          FROM unnest(p_key_id, p_admitted_at) WITH ORDINALITY AS q(key_id, at, i)
          LEFT JOIN api_keys ak ON ak.id = q.key_id AND ak.id = ANY(p_key_id)) k;

    -- End users of a user with a default end-user budget (`USER/*`) and none of their own in that
    -- period get their own, created here on first use at the default's limit (or one deleted
    -- becomes the default's again). Created in (subject, period) order, so two admissions that
    -- create some of the same wait for each other in one order; a budget another admission created
    -- first is left as it is (ON CONFLICT), and this statement's snapshot sees it below.
    IF EXISTS (SELECT 1 FROM unnest(p_end_user) AS e(end_user) WHERE e.end_user IS NOT NULL) THEN
        INSERT INTO budgets AS b (scope, subject, period, limit_micros, enforce, alert_at, created_at,
                                  updated_at, user_id, default_id)
        SELECT 'end_user', fresh.subject, d.period, d.limit_micros, d.enforce, d.alert_at, fresh.at, fresh.at,
               fresh.user_id, d.id
        FROM (SELECT q.user_id, q.user_id::text || '/' || q.end_user AS subject, max(q.at) AS at
              FROM unnest(p_user_id, p_end_user, p_admitted_at) WITH ORDINALITY AS q(user_id, end_user, at, i)
              WHERE q.end_user IS NOT NULL AND live[q.i]
              GROUP BY q.user_id, q.end_user) fresh
        -- Both lookups by key, whatever the statistics say (OFFSET 0 keeps each a subquery run
        -- per row): planned on a table not yet analyzed, a join here read every end user's
        -- budget on every admission (bench/end_users.py: 3x PostgreSQL's CPU a request).
        CROSS JOIN LATERAL (
            SELECT dd.* FROM budgets dd
            WHERE dd.scope = 'end_user' AND dd.subject = fresh.user_id::text || '/*'
              AND dd.deleted_at IS NULL
            OFFSET 0) d
        WHERE NOT EXISTS (SELECT 1 FROM budgets o WHERE o.scope = 'end_user' AND o.subject = fresh.subject
                          AND o.period = d.period AND o.deleted_at IS NULL OFFSET 0)
        ORDER BY fresh.subject, d.period
        ON CONFLICT (scope, subject, period) DO UPDATE
        SET limit_micros = excluded.limit_micros, enforce = excluded.enforce,
            alert_at = excluded.alert_at, default_id = excluded.default_id, deleted_at = NULL,
            updated_at = excluded.updated_at
        WHERE b.deleted_at IS NOT NULL;
    END IF;

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
        FROM unnest(p_key_id, p_user_id, p_team_id, p_end_user, p_daily, p_weekly, p_monthly, p_total)
             WITH ORDINALITY AS q(key_id, user_id, team_id, end_user, daily, weekly, monthly, total, i)
        CROSS JOIN LATERAL (
            SELECT b.* FROM budgets b WHERE b.scope = 'key' AND b.subject = q.key_id
            UNION ALL
            -- A rotated key in its grace: its key budgets moved to the key that replaced it.
            SELECT b.* FROM api_keys ak
            JOIN budgets b ON b.scope = 'key' AND b.subject = ak.rotated_to
            WHERE ak.id = q.key_id AND ak.rotated_to IS NOT NULL
            UNION ALL
            SELECT b.* FROM budgets b WHERE b.scope = 'user' AND b.subject = q.user_id::text
            UNION ALL
            SELECT b.* FROM budgets b WHERE b.scope = 'team' AND b.subject = q.team_id::text
            UNION ALL
            SELECT b.* FROM budgets b
            WHERE q.end_user IS NOT NULL AND b.scope = 'end_user'
              AND b.subject = q.user_id::text || '/' || q.end_user
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
            o_spent := NULL; o_held := NULL; o_enforce := NULL; o_refusal := key_refusal[r];
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


def _migration(number: str):  # type: ignore[no-untyped-def]
    """A revision whose function this one replaces, for the downgrade (revision files are no package)."""
    path = next(Path(__file__).parent.glob(f"{number}_*.py"))
    spec = importlib.util.spec_from_file_location(f"migration_{number}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upgrade() -> None:
    with op.batch_alter_table("budgets", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.add_column(sa.Column("user_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("default_id", sa.Integer(), nullable=True))
        batch.alter_column("subject", existing_type=sa.String(length=32), type_=sa.String(length=160))
        batch.drop_constraint(op.f("ck_budgets_scope"), type_="check")
        batch.create_check_constraint("scope", "scope IN ('team', 'user', 'key', 'end_user')")
        batch.create_foreign_key(op.f("fk_budgets_user_id_users"), "users", ["user_id"], ["id"])
        batch.create_foreign_key(op.f("fk_budgets_default_id_budgets"), "budgets", ["default_id"], ["id"])
        batch.create_index("ix_budgets_default_id", ["default_id"], unique=False)
    if op.get_bind().dialect.name == "postgresql":
        op.execute(ADMIT)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_migration("0009").ADMIT.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1))
    # What counted on end-user budgets goes with them (0009 has no such scope); the ledger stays.
    ids = "SELECT id FROM budgets WHERE scope = 'end_user'"
    events = f"SELECT id FROM alert_events WHERE budget_id IN ({ids})"
    op.execute(f"DELETE FROM webhook_deliveries WHERE event_id IN ({events})")
    for table in ("alert_events", "allocations", "budget_counters"):
        op.execute(f"DELETE FROM {table} WHERE budget_id IN ({ids})")
    op.execute("DELETE FROM budgets WHERE scope = 'end_user'")
    with op.batch_alter_table("budgets", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.drop_index("ix_budgets_default_id")
        batch.drop_constraint(op.f("fk_budgets_default_id_budgets"), type_="foreignkey")
        batch.drop_constraint(op.f("fk_budgets_user_id_users"), type_="foreignkey")
        batch.drop_constraint(op.f("ck_budgets_scope"), type_="check")
        batch.create_check_constraint("scope", "scope IN ('team', 'user', 'key')")
        batch.alter_column("subject", existing_type=sa.String(length=160), type_=sa.String(length=32))
        batch.drop_column("default_id")
        batch.drop_column("user_id")
