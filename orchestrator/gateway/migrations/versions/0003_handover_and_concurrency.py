"""Rate-limit windows handed from a stopping ledger to the next one, and a per-key limit of
requests running at once.

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
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("max_concurrent", sa.Integer, nullable=True))
    op.create_table(
        "rate_windows",
        sa.Column("key_id", sa.String(64), primary_key=True),
        sa.Column("started_at", sa.Float, nullable=False),  # epoch seconds
        sa.Column("requests", sa.Integer, nullable=False),
        sa.Column("tokens", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("rate_windows")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("max_concurrent")
