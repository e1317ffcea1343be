"""Budget windows in a time zone and billing cycle: `budgets.timezone`, `week_starts`, `month_starts_on`

Each budget keeps where its windows begin (gateway/core/windows.py `Rule`): local midnight in an
IANA zone, weeks from a week day, months from a cycle day (1-28). Every budget there is gets UTC,
monday and 1, which is how windows were computed before: nothing changes for them.

`gateway_admit_batch` (0012's) takes one more array, `p_windows` (per request: the JSON of the window keys
of every rule but UTC/monday/1 that the gateway knows, by "ZONE WEEK_DAY MONTH_DAY PERIOD"). The
window a budget holds on is picked from it by `gateway_window_of`, which raises SQLSTATE GW001 for
a rule the gateway did not send (it then learns the budgets' rules and runs the statement again);
UTC/monday/1 budgets still take `p_daily` ... `p_total`. End users' budgets made from a default
copy its rule. The function is the previous revision's with exactly the replacements in `_CHANGES`.
The downgrade restores that function and drops the columns.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 21:00:00.000000
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The revision whose gateway_admit_batch this one changes.
_FUNCTION_FROM = "0012"

_OLD_SIGNATURE = (
    "gateway_admit_batch(varchar[], varchar[], varchar[], integer[], integer[], varchar[], integer[], "
    "bigint[], bigint[], boolean[], bigint[], varchar[], varchar[], bigint[], bigint[], bigint[], bigint[], "
    "boolean[])"
)
_NEW_SIGNATURE = _OLD_SIGNATURE[:-1] + ", varchar[])"

WINDOW_OF = """
CREATE FUNCTION gateway_window_of(p_windows varchar, p_rule varchar) RETURNS bigint
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    w bigint := (p_windows::jsonb ->> p_rule)::bigint;
BEGIN
    IF w IS NULL THEN
        RAISE EXCEPTION 'gateway: no window sent for budget rule %', p_rule USING ERRCODE = 'GW001';
    END IF;
    RETURN w;
END
$$
"""

# (old, new): each old text occurs exactly once in the previous function.
_CHANGES = (
    (
        "p_daily bigint[], p_weekly bigint[], p_monthly bigint[], p_total bigint[], p_limited boolean[])",
        "p_daily bigint[], p_weekly bigint[], p_monthly bigint[], p_total bigint[], p_limited boolean[],\n"
        "    p_windows varchar[])",
    ),
    (
        "updated_at, user_id, default_id)",
        "updated_at, user_id, default_id, timezone, week_starts, month_starts_on)",
    ),
    (
        "fresh.user_id, d.id\n",
        "fresh.user_id, d.id, d.timezone, d.week_starts, d.month_starts_on\n",
    ),
    (
        "alert_at = excluded.alert_at, default_id = excluded.default_id, deleted_at = NULL,",
        "alert_at = excluded.alert_at, default_id = excluded.default_id, deleted_at = NULL,\n"
        "            timezone = excluded.timezone, week_starts = excluded.week_starts,\n"
        "            month_starts_on = excluded.month_starts_on,",
    ),
    (
        "CASE bu.period WHEN 'daily' THEN q.daily WHEN 'weekly' THEN q.weekly\n"
        "                              WHEN 'monthly' THEN q.monthly ELSE q.total END AS w",
        "CASE WHEN bu.timezone = 'UTC' AND bu.week_starts = 'monday' AND bu.month_starts_on = 1 THEN\n"
        "                   CASE bu.period WHEN 'daily' THEN q.daily WHEN 'weekly' THEN q.weekly\n"
        "                                  WHEN 'monthly' THEN q.monthly ELSE q.total END\n"
        "               ELSE gateway_window_of(q.windows, bu.timezone || ' ' || bu.week_starts || ' '\n"
        "                                      || bu.month_starts_on || ' ' || bu.period) END AS w",
    ),
    (
        "FROM unnest(p_key_id, p_user_id, p_team_id, p_end_user, p_daily, p_weekly, p_monthly, p_total)\n"
        "             WITH ORDINALITY AS q(key_id, user_id, team_id, end_user, daily, weekly, monthly, "
        "total, i)",
        "FROM unnest(p_key_id, p_user_id, p_team_id, p_end_user, p_daily, p_weekly, p_monthly, p_total,\n"
        "                    p_windows)\n"
        "             WITH ORDINALITY AS q(key_id, user_id, team_id, end_user, daily, weekly, monthly, "
        "total,\n"
        "                                  windows, i)",
    ),
)


def _migration(number: str):  # type: ignore[no-untyped-def]
    """A revision whose function this one replaces (revision files are no package)."""
    path = next(Path(__file__).parent.glob(f"{number}_*.py"))
    spec = importlib.util.spec_from_file_location(f"migration_{number}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def admit_function() -> str:
    """The previous revision's gateway_admit_batch with `_CHANGES` made."""
    function: str = _migration(_FUNCTION_FROM).ADMIT
    for old, new in _CHANGES:
        if function.count(old) != 1:
            raise AssertionError(f"gateway_admit_batch: {old!r} is not in the previous function once")
        function = function.replace(old, new)
    return function


def upgrade() -> None:
    with op.batch_alter_table("budgets", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.add_column(sa.Column("timezone", sa.String(length=64), server_default="UTC", nullable=False))
        batch.add_column(
            sa.Column("week_starts", sa.String(length=9), server_default="monday", nullable=False)
        )
        batch.add_column(sa.Column("month_starts_on", sa.Integer(), server_default="1", nullable=False))
        batch.create_check_constraint("month_starts_on", "month_starts_on BETWEEN 1 AND 28")
        batch.create_check_constraint(
            "week_starts",
            "week_starts IN ('monday', 'tuesday', 'wednesday', 'thursday', 'friday', 'saturday', 'sunday')",
        )
    # Explicitly, though the defaults say the same: the budgets there are keep UTC windows.
    op.execute("UPDATE budgets SET timezone = 'UTC', week_starts = 'monday', month_starts_on = 1")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(WINDOW_OF)
        op.execute(f"DROP FUNCTION {_OLD_SIGNATURE}")
        op.execute(admit_function().replace("CREATE OR REPLACE FUNCTION", "CREATE FUNCTION", 1))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION {_NEW_SIGNATURE}")
        op.execute("DROP FUNCTION gateway_window_of(varchar, varchar)")
        op.execute(_migration(_FUNCTION_FROM).ADMIT)
    with op.batch_alter_table("budgets", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.drop_constraint(op.f("ck_budgets_week_starts"), type_="check")
        batch.drop_constraint(op.f("ck_budgets_month_starts_on"), type_="check")
        batch.drop_column("month_starts_on")
        batch.drop_column("week_starts")
        batch.drop_column("timezone")
