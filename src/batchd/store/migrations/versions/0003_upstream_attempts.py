"""Upstream engines: each request row records its model (so leasing can skip a model whose
engine is full or whose upstream is down) and the HTTP attempts an upstream engine made.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        # NULL for rows written before this revision: never skipped by leasing.
        batch.add_column(sa.Column("model", sa.Text(), nullable=True))
        batch.add_column(
            sa.Column("upstream_attempts", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("upstream_attempts")
        batch.drop_column("model")
