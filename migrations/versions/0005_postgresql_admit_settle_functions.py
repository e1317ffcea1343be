"""PostgreSQL: admission and settlement as one statement each (functions)

On PostgreSQL every statement is a round trip, and a round trip costs the gateway more CPU (a
socket send that wakes the server's backend) than the statement costs the server. Admitting a
request took seven (BEGIN, the budgets, the hold, its allocations, a conditional update per budget,
COMMIT) and settling it five. These functions do the same work, in the same order (the counters
last, in budget id order) and with the same conditional updates as `gateway/metering.py` does on
SQLite, in one statement each; a statement is atomic on its own, so neither needs BEGIN or COMMIT.

`gateway_admit` places the hold, returning per budget (in id order, the lock order) its window and
what it has left; or, if a budget cannot take the hold, nothing at all is written and it returns one
row with `refused` set and that budget's figures for the refusal message.

`gateway_settle` turns the hold into a ledger row (charged or not) and moves the counters, or
returns false without a change if the hold is gone (expired by another process).

SQLite has no functions; there the same statements run from Python, in one transaction.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 02:00:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ADMIT = """
CREATE FUNCTION gateway_admit(
    p_request_id varchar, p_instance_id varchar, p_key_id varchar, p_user_id integer,
    p_team_id integer, p_model varchar, p_message_count integer, p_unit_price bigint,
    p_credits bigint, p_stream boolean, p_admitted_at bigint,
    p_daily bigint, p_weekly bigint, p_monthly bigint, p_total bigint)
RETURNS TABLE (budget_id integer, scope varchar, period varchar, limit_micros bigint,
               window_start bigint, spent_micros bigint, held_micros bigint, refused boolean)
LANGUAGE plpgsql AS $$
#variable_conflict error
DECLARE
    b record;
    budget_ids integer[] := '{}';
    scopes varchar[] := '{}';
    periods varchar[] := '{}';
    budget_limits bigint[] := '{}';
    budget_windows bigint[] := '{}';
    i integer;
    spent bigint;
    held bigint;
    spents bigint[] := '{}';
    helds bigint[] := '{}';
    refused_at integer;
BEGIN
    BEGIN
        INSERT INTO holds (request_id, instance_id, key_id, user_id, team_id, model, message_count,
                           unit_price_micros, credits_micros, stream, admitted_at)
        VALUES (p_request_id, p_instance_id, p_key_id, p_user_id, p_team_id, p_model,
                p_message_count, p_unit_price, p_credits, p_stream, p_admitted_at);
        FOR b IN
            SELECT bu.id, bu.scope, bu.period, bu.limit_micros,
                   CASE bu.period WHEN 'daily' THEN p_daily WHEN 'weekly' THEN p_weekly
                                  WHEN 'monthly' THEN p_monthly ELSE p_total END AS w
            FROM budgets bu
            WHERE (bu.scope = 'key' AND bu.subject = p_key_id)
               OR (bu.scope = 'user' AND bu.subject = p_user_id::text)
               OR (bu.scope = 'team' AND bu.subject = p_team_id::text)
            ORDER BY bu.id
        LOOP
            INSERT INTO allocations (request_id, budget_id, window_start, credits_micros)
            VALUES (p_request_id, b.id, b.w, p_credits);
            budget_ids := budget_ids || b.id;
            scopes := scopes || b.scope;
            periods := periods || b.period;
            budget_limits := budget_limits || b.limit_micros;
            budget_windows := budget_windows || b.w;
        END LOOP;
        -- The counters last, in budget id order: their row locks are what every request of a
        -- team waits for.
        FOR i IN 1 .. coalesce(array_length(budget_ids, 1), 0) LOOP
            -- Creates the window's counter with this hold, or adds the hold to it, only if it
            -- still fits; the limit is read inside the statement.
            INSERT INTO budget_counters AS c (budget_id, window_start, spent_micros, held_micros)
            SELECT bl.id, budget_windows[i], 0, p_credits FROM budgets bl
            WHERE bl.id = budget_ids[i] AND p_credits <= bl.limit_micros
            ON CONFLICT ON CONSTRAINT pk_budget_counters DO UPDATE
            SET held_micros = c.held_micros + excluded.held_micros
            WHERE c.spent_micros + c.held_micros + excluded.held_micros <=
                  (SELECT bl.limit_micros FROM budgets bl WHERE bl.id = excluded.budget_id)
            RETURNING c.spent_micros, c.held_micros INTO spent, held;
            IF NOT FOUND THEN
                refused_at := i;
                -- Undoes everything this call wrote: back to the start of the block.
                RAISE EXCEPTION USING ERRCODE = 'GW402';
            END IF;
            spents := spents || spent;
            helds := helds || held;
        END LOOP;
    EXCEPTION WHEN SQLSTATE 'GW402' THEN
        RETURN QUERY
            SELECT budget_ids[refused_at], scopes[refused_at], periods[refused_at],
                   budget_limits[refused_at], budget_windows[refused_at],
                   COALESCE(c.spent_micros, 0::bigint), COALESCE(c.held_micros, 0::bigint), true
            FROM (SELECT 1) one
            LEFT JOIN budget_counters c
                   ON c.budget_id = budget_ids[refused_at] AND c.window_start = budget_windows[refused_at];
        RETURN;
    END;
    RETURN QUERY
        SELECT u.id, NULL::varchar, NULL::varchar, u.lim, u.w, u.s, u.h, false
        FROM unnest(budget_ids, budget_limits, budget_windows, spents, helds) AS u(id, lim, w, s, h);
END
$$
"""

SETTLE = """
CREATE FUNCTION gateway_settle(
    p_request_id varchar, p_settled_at bigint, p_outcome varchar, p_upstream_status integer,
    p_prompt_tokens integer, p_completion_tokens integer, p_total_tokens integer)
RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict error
DECLARE
    h holds%ROWTYPE;
    a record;
    spent bigint;
BEGIN
    DELETE FROM holds WHERE request_id = p_request_id RETURNING * INTO h;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    spent := CASE WHEN p_outcome = 'charged' THEN h.credits_micros ELSE 0 END;
    INSERT INTO ledger (request_id, admitted_at, settled_at, team_id, user_id, key_id, model,
                        message_count, unit_price_micros, credits_micros, outcome, upstream_status,
                        prompt_tokens, completion_tokens, total_tokens, stream, duration_us)
    VALUES (h.request_id, h.admitted_at, p_settled_at, h.team_id, h.user_id, h.key_id, h.model,
            h.message_count, h.unit_price_micros, spent, p_outcome, p_upstream_status,
            p_prompt_tokens, p_completion_tokens, p_total_tokens, h.stream,
            GREATEST(p_settled_at - h.admitted_at, 0));
    -- Counters last and in budget id order, as at admission: no deadlock between the two.
    FOR a IN SELECT al.budget_id, al.window_start FROM allocations al
             WHERE al.request_id = p_request_id ORDER BY al.budget_id
    LOOP
        UPDATE budget_counters
        SET held_micros = held_micros - h.credits_micros, spent_micros = spent_micros + spent
        WHERE budget_id = a.budget_id AND window_start = a.window_start;
    END LOOP;
    RETURN true;
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(ADMIT)
    op.execute(SETTLE)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP FUNCTION gateway_settle")
    op.execute("DROP FUNCTION gateway_admit")
