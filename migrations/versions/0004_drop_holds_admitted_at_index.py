"""holds: drop the admitted_at index

The holds table only ever has the requests in flight, a few hundred rows, so the expiry sweep
scans it whole at no cost; the index cost every admission and every settlement a B-tree write.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 23:00:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_holds_admitted_at", table_name="holds")


def downgrade() -> None:
    op.create_index("ix_holds_admitted_at", "holds", ["admitted_at"], unique=False)
