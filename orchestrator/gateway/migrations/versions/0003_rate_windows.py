"""Rate-limit windows handed from a stopping ledger to the next one.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rate_windows",
        sa.Column("key_id", sa.String(64), primary_key=True),
        sa.Column("started_at", sa.Float, nullable=False),  # epoch seconds
        sa.Column("requests", sa.Integer, nullable=False),
        sa.Column("tokens", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("rate_windows")
