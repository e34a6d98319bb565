"""Upstream limits for the whole deployment: concurrency slots leased per attempt, and rate
buckets, shared by every process on the database.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "upstream_slots",
        sa.Column("key", sa.String(300), primary_key=True),
        sa.Column("slot", sa.Integer(), primary_key=True),
        sa.Column("holder", sa.String(64), nullable=True),
        sa.Column("expires_at", sa.Float(), nullable=True),
    )
    op.create_table(
        "upstream_rates",
        sa.Column("key", sa.String(300), primary_key=True),
        sa.Column("level", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("upstream_rates")
    op.drop_table("upstream_slots")
