"""rate limits: rate and concurrency limits on keys, users, teams and end users (issue 26)

`rate_limits` holds each limit (`kind` requests or credits per `per_seconds`, or `concurrent`, with
`per_seconds` 0); `rate_limit_state` a rate's GCRA state, one theoretical arrival time per limit and
subject (an end user under a default `USER_ID/*` has their own). `concurrent` has no counter of its
own: it counts the subject's open holds, so a dead process's requests stop counting when expiry
releases their holds.

`gateway_admit_batch` takes one more array, `p_limited` (whether the key cache found a limit that
may apply to the request's key, user, team or end users), and judges the limits of the requests so
marked in the same statement as their budgets, before them: a batch with no limited request does
no more than 0010's. It returns, for an admitted limited request, one row a limit (`o_refusal`
'limit') before its budgets' rows, and for a request refused by a limit one row 'rate'. The
signature changes, so the function is dropped and created; the downgrade restores 0010's.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 21:00:00.000000
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# 0010's signature, dropped before the new one is created (and after it on the way down).
_OLD_SIGNATURE = (
    "gateway_admit_batch(varchar[], varchar[], varchar[], integer[], integer[], varchar[], integer[], "
    "bigint[], bigint[], boolean[], bigint[], varchar[], varchar[], bigint[], bigint[], bigint[], bigint[])"
)
_NEW_SIGNATURE = _OLD_SIGNATURE[:-1] + ", boolean[])"

ADMIT = """
CREATE FUNCTION gateway_admit_batch(
    p_request_id varchar[], p_instance_id varchar[], p_key_id varchar[], p_user_id integer[],
    p_team_id integer[], p_model varchar[], p_message_count integer[], p_unit_price bigint[],
    p_credits bigint[], p_stream boolean[], p_admitted_at bigint[], p_end_user varchar[], p_tags varchar[],
    p_daily bigint[], p_weekly bigint[], p_monthly bigint[], p_total bigint[], p_limited boolean[])
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
    -- The rate limits of each live limited request, in (request, limit id) order, with the
    -- subject their state is kept for (an end user of a default `USER_ID/*` has their own).
    l_req integer[];
    l_id integer[];
    l_scope varchar[];
    l_kind varchar[];
    l_limit bigint[];
    l_per bigint[];
    l_subject varchar[];
    l_pos integer[];
    l_count integer := 0;
    -- Their state rows, locked: the theoretical arrival time then and as this batch moves it, and
    -- for `concurrent` the holds open elsewhere and those added here.
    s_id integer[];
    s_subject varchar[];
    s_tat bigint[];
    s_new bigint[];
    s_open bigint[];
    s_added bigint[];
    lj integer := 1;
    lfirst integer;
    limited_at integer;
    inc bigint;
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

    -- Rate and concurrency limits, only when a request of the batch has any (the key cache knows):
    -- their state rows are locked first (in limit id, subject order), before any counter, by every
    -- batch, so two batches never wait for each other in opposite orders.
    IF true = ANY(p_limited) THEN
        SELECT array_agg(x.i ORDER BY x.i, x.id), array_agg(x.id ORDER BY x.i, x.id),
               array_agg(x.scope ORDER BY x.i, x.id), array_agg(x.kind ORDER BY x.i, x.id),
               array_agg(x.limit_value ORDER BY x.i, x.id), array_agg(x.per ORDER BY x.i, x.id),
               array_agg(x.subj ORDER BY x.i, x.id)
        INTO l_req, l_id, l_scope, l_kind, l_limit, l_per, l_subject
        FROM (
            SELECT q.i::integer AS i, rl.id, rl.scope, rl.kind, rl.limit_value,
                   rl.per_seconds::bigint * 1000000 AS per, rl.subj
            FROM unnest(p_key_id, p_user_id, p_team_id, p_end_user, p_limited)
                 WITH ORDINALITY AS q(key_id, user_id, team_id, end_user, limited, i)
            CROSS JOIN LATERAL (
                SELECT l.*, l.subject AS subj FROM rate_limits l
                WHERE l.scope = 'key' AND l.subject = q.key_id
                UNION ALL
                SELECT l.*, l.subject FROM rate_limits l
                WHERE l.scope = 'user' AND l.subject = q.user_id::text
                UNION ALL
                SELECT l.*, l.subject FROM rate_limits l
                WHERE l.scope = 'team' AND l.subject = q.team_id::text
                UNION ALL
                SELECT l.*, l.subject FROM rate_limits l
                WHERE q.end_user IS NOT NULL AND l.scope = 'end_user'
                  AND l.subject = q.user_id::text || '/' || q.end_user
                UNION ALL
                -- A default (`USER_ID/*`): for each end user without a limit of their own of the
                -- same kind and period, with a state of their own.
                SELECT l.*, q.user_id::text || '/' || q.end_user FROM rate_limits l
                WHERE q.end_user IS NOT NULL AND l.scope = 'end_user' AND l.subject = q.user_id::text || '/*'
                  AND NOT EXISTS (SELECT 1 FROM rate_limits o WHERE o.scope = 'end_user'
                                  AND o.subject = q.user_id::text || '/' || q.end_user
                                  AND o.kind = l.kind AND o.per_seconds = l.per_seconds OFFSET 0)
            ) rl
            WHERE q.limited AND live[q.i]
        ) x;
        l_count := coalesce(array_length(l_req, 1), 0);
    END IF;
    IF l_count > 0 THEN
        WITH locked AS (
            INSERT INTO rate_limit_state AS s (limit_id, subject, tat_us)
            SELECT t.id, t.subj, 0
            FROM (SELECT DISTINCT u.id, u.subj FROM unnest(l_id, l_subject) AS u(id, subj)) t
            ORDER BY t.id, t.subj
            ON CONFLICT ON CONSTRAINT pk_rate_limit_state DO UPDATE SET tat_us = s.tat_us
            RETURNING s.limit_id, s.subject, s.tat_us
        )
        SELECT array_agg(lk.limit_id), array_agg(lk.subject), array_agg(lk.tat_us)
        INTO s_id, s_subject, s_tat
        FROM locked lk;
        s_new := s_tat;
        s_added := array_fill(0::bigint, ARRAY[array_length(s_id, 1)]);
        -- A statement after the locks, so it sees the holds of every batch that held them before:
        -- the requests in flight of each `concurrent` subject, this batch's own left out.
        SELECT array_agg(CASE WHEN rl.kind = 'concurrent' THEN (
                   SELECT count(*) FROM holds h
                   WHERE h.request_id <> ALL(p_request_id) AND CASE rl.scope
                       WHEN 'key' THEN h.key_id = st.subj
                       WHEN 'user' THEN h.user_id::text = st.subj
                       WHEN 'team' THEN h.team_id::text = st.subj
                       ELSE h.user_id::text || '/' || h.end_user = st.subj END)
               ELSE 0 END ORDER BY st.pos)
        INTO s_open
        FROM unnest(s_id, s_subject) WITH ORDINALITY AS st(id, subj, pos)
        LEFT JOIN rate_limits rl ON rl.id = st.id;
        SELECT array_agg(ss.pos::integer ORDER BY ll.k) INTO l_pos
        FROM unnest(l_id, l_subject) WITH ORDINALITY AS ll(id, subj, k)
        JOIN unnest(s_id, s_subject) WITH ORDINALITY AS ss(id, subj, pos)
             ON ss.id = ll.id AND ss.subj = ll.subj;
    END IF;

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
        lfirst := lj;
        WHILE lj <= l_count AND l_req[lj] = r LOOP
            lj := lj + 1;
        END LOOP;
        o_req := r;
        IF NOT live[r] THEN
            o_budget := NULL; o_scope := NULL; o_period := NULL; o_limit := NULL; o_window := NULL;
            o_spent := NULL; o_held := NULL; o_enforce := NULL; o_refusal := key_refusal[r];
            RETURN NEXT;
            CONTINUE;
        END IF;
        -- Its limits first (GCRA, as gateway/core/ratelimits.py): a request too early is told to wait.
        limited_at := NULL;
        FOR k IN lfirst .. lj - 1 LOOP
            pos := l_pos[k];
            IF l_kind[k] = 'concurrent' THEN
                IF s_open[pos] + s_added[pos] >= l_limit[k] THEN
                    limited_at := k;
                    EXIT;
                END IF;
            ELSE
                inc := div(CASE WHEN l_kind[k] = 'requests' THEN 1 ELSE p_credits[r] END::numeric * l_per[k],
                           l_limit[k]);
                IF inc > 0 AND greatest(s_new[pos], p_admitted_at[r]) + inc - p_admitted_at[r] > l_per[k] THEN
                    limited_at := k;
                    EXIT;
                END IF;
            END IF;
        END LOOP;
        IF limited_at IS NOT NULL THEN
            pos := l_pos[limited_at];
            o_budget := l_id[limited_at]; o_scope := l_scope[limited_at]; o_period := l_kind[limited_at];
            o_limit := l_limit[limited_at]; o_window := l_per[limited_at]; o_spent := s_new[pos];
            o_held := s_open[pos] + s_added[pos]; o_enforce := NULL; o_refusal := 'rate';
            RETURN NEXT;
            refused_requests := refused_requests || p_request_id[r];
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
        -- Admitted: it takes its share of each limit, and says what each has left.
        FOR k IN lfirst .. lj - 1 LOOP
            pos := l_pos[k];
            IF l_kind[k] = 'concurrent' THEN
                s_added[pos] := s_added[pos] + 1;
            ELSE
                inc := div(CASE WHEN l_kind[k] = 'requests' THEN 1 ELSE p_credits[r] END::numeric * l_per[k],
                           l_limit[k]);
                IF inc > 0 THEN
                    s_new[pos] := greatest(s_new[pos], p_admitted_at[r]) + inc;
                END IF;
            END IF;
            o_budget := l_id[k]; o_scope := l_scope[k]; o_period := l_kind[k]; o_limit := l_limit[k];
            o_window := l_per[k]; o_spent := s_new[pos]; o_held := s_open[pos] + s_added[pos];
            o_enforce := NULL; o_refusal := 'limit';
            RETURN NEXT;
        END LOOP;
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
    IF l_count > 0 THEN
        UPDATE rate_limit_state s SET tat_us = u.tat
        FROM unnest(s_id, s_subject, s_new, s_tat) AS u(id, subj, tat, was)
        WHERE u.tat <> u.was AND s.limit_id = ANY(s_id) AND s.limit_id = u.id AND s.subject = u.subj;
    END IF;
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
    op.create_table(
        "rate_limits",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("scope", sa.String(length=8), nullable=False),
        sa.Column("subject", sa.String(length=160), nullable=False),
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("limit_value", sa.BigInteger(), nullable=False),
        sa.Column("per_seconds", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("scope IN ('team', 'user', 'key', 'end_user')", name=op.f("ck_rate_limits_scope")),
        sa.CheckConstraint("kind IN ('requests', 'credits', 'concurrent')", name=op.f("ck_rate_limits_kind")),
        sa.CheckConstraint("limit_value > 0", name=op.f("ck_rate_limits_limit_value")),
        sa.CheckConstraint("per_seconds >= 0", name=op.f("ck_rate_limits_per_seconds")),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_rate_limits_user_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rate_limits")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("rate_limits", schema=None) as batch_op:
        batch_op.create_index(
            "uq_rate_limits_scope_subject_kind_per", ["scope", "subject", "kind", "per_seconds"], unique=True
        )
        batch_op.create_index(batch_op.f("ix_rate_limits_user_id"), ["user_id"], unique=False)
    op.create_table(
        "rate_limit_state",
        sa.Column("limit_id", sa.Integer(), nullable=False),
        sa.Column("subject", sa.String(length=160), nullable=False),
        sa.Column("tat_us", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["limit_id"],
            ["rate_limits.id"],
            name=op.f("fk_rate_limit_state_limit_id_rate_limits"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("limit_id", "subject", name=op.f("pk_rate_limit_state")),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION {_OLD_SIGNATURE}")
        op.execute(ADMIT)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION {_NEW_SIGNATURE}")
        op.execute(_migration("0010").ADMIT)
    op.drop_table("rate_limit_state")
    with op.batch_alter_table("rate_limits", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rate_limits_user_id"))
        batch_op.drop_index("uq_rate_limits_scope_subject_kind_per")
    op.drop_table("rate_limits")
