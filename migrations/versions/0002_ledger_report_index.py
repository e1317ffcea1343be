"""ledger: covering partial index of charged rows for billing reports

Measured with bench/report.py (1,000,000 rows over 60 days, 30-day reports by team,model and by
user,day): without it SQLite reads every row of the range from the table, 0.55 s to 0.6 s without
planner statistics and 1.2 s to 1.7 s after ANALYZE (it then prefers a skip-scan); with it, from
this index alone, 0.37 s to 0.5 s. Building it holds the table's write lock about a second per
million rows.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 20:40:12.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("ledger", schema=None) as batch_op:
        batch_op.create_index(
            "ix_ledger_charged_report",
            [
                "admitted_at",
                "team_id",
                "user_id",
                "key_id",
                "model",
                "message_count",
                "credits_micros",
                "prompt_tokens",
                "completion_tokens",
                "outcome",
            ],
            unique=False,
            sqlite_where=sa.text("outcome = 'charged'"),
            postgresql_where=sa.text("outcome = 'charged'"),
        )


def downgrade() -> None:
    with op.batch_alter_table("ledger", schema=None) as batch_op:
        batch_op.drop_index("ix_ledger_charged_report")
