"""Key revocation time, the error code of failed requests, and money as whole nanodollars.

SQLite keeps NUMERIC as a float, which cannot hold balances exactly; BIGINT nanodollars
(1e-9 USD) are exact on every database. Existing amounts are converted.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_MONEY = {"api_keys": ("credits", "daily_limit", "monthly_limit"), "usage_records": ("cost",)}


def _convert(table: str, columns: tuple[str, ...], to_nusd: bool) -> None:
    new_type = sa.BigInteger if to_nusd else sa.Numeric(20, 11)
    nullable = table == "api_keys"
    src, dst = ("", "_nusd") if to_nusd else ("_nusd", "")
    with op.batch_alter_table(table) as batch:
        for col in columns:
            batch.add_column(sa.Column(col + dst, new_type, nullable=True))
    for col in columns:
        expr = f"CAST(ROUND({col}{src} * 1000000000) AS BIGINT)" if to_nusd else f"{col}{src} / 1000000000.0"
        op.execute(f"UPDATE {table} SET {col}{dst} = {expr}")
    with op.batch_alter_table(table) as batch:
        for col in columns:
            batch.drop_column(col + src)
            if not nullable:
                batch.alter_column(col + dst, existing_type=new_type, nullable=False)


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("usage_records") as batch:
        batch.add_column(sa.Column("error_code", sa.String(64), nullable=True))
    for table, columns in _MONEY.items():
        _convert(table, columns, to_nusd=True)


def downgrade() -> None:
    for table, columns in _MONEY.items():
        _convert(table, columns, to_nusd=False)
    with op.batch_alter_table("usage_records") as batch:
        batch.drop_column("error_code")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("revoked_at")
