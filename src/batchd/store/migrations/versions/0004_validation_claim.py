"""Many workers: a batch's validation is claimed by one worker at a time (owner + expiry), so
two workers never turn one file into rows twice.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("claim_owner", sa.String(64), nullable=True))
        batch.add_column(sa.Column("claim_expires_at", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("claim_expires_at")
        batch.drop_column("claim_owner")
