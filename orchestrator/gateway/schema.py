"""The gateway's SQL schema (SQLAlchemy Core). Changes go through a new Alembic
migration in ``migrations/versions``; tests/unit/test_database.py fails on drift."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

# USD amounts are whole nanodollars (1e-9 USD) in a BIGINT: exact on SQLite, whose NUMERIC
# is a float, and on PostgreSQL; up to 9.2 billion USD. Columns say so with `_nusd`.
Money = BigInteger

workspaces = Table(
    "workspaces",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("enabled", Boolean, nullable=False, default=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("hint", String(32), nullable=False),
    Column("name", String(200), nullable=False),
    Column("workspace_id", String(64), ForeignKey("workspaces.id"), nullable=False),
    Column("models", Text, nullable=False, default="[]"),  # JSON list of names or patterns
    Column("rpm", Integer, nullable=True),
    Column("tpm", Integer, nullable=True),
    Column("max_concurrent", Integer, nullable=True),
    Column("credits_nusd", Money, nullable=True),  # None: no balance kept (unlimited)
    Column("daily_limit_nusd", Money, nullable=True),
    Column("monthly_limit_nusd", Money, nullable=True),
    Column("enabled", Boolean, nullable=False, default=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

usage_records = Table(
    "usage_records",
    metadata,
    Column("request_id", String(128), primary_key=True),
    Column("key_id", String(64), nullable=True),
    Column("workspace_id", String(64), nullable=True),
    Column("model", String(200), nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("cached_tokens", Integer, nullable=False),
    Column("reasoning_tokens", Integer, nullable=False),
    Column("cost_nusd", Money, nullable=False),
    Column("ttft_ms", Float, nullable=True),
    Column("latency_ms", Float, nullable=False),
    Column("tokens_per_s", Float, nullable=True),
    Column("finish_reason", String(32), nullable=True),
    Column("streamed", Boolean, nullable=False),
    Column("cancelled", Boolean, nullable=False),
    Column("status_code", Integer, nullable=False),
    Column("error_code", String(64), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_usage_key_created", "key_id", "created_at"),
    Index("ix_usage_model_created", "model", "created_at"),
)

# The rate-limit windows a stopping ledger hands to the next (see gateway/fence.py).
rate_windows = Table(
    "rate_windows",
    metadata,
    Column("key_id", String(64), primary_key=True),
    Column("started_at", Float, nullable=False),  # epoch seconds
    Column("requests", Integer, nullable=False),
    Column("tokens", BigInteger, nullable=False),
)

# Responses kept for `previous_response_id` and `GET /v1/responses/{id}` (gateway/responses.py).
stored_responses = Table(
    "stored_responses",
    metadata,
    Column("id", String(128), primary_key=True),  # the response's `gen-` id
    Column("workspace_id", String(64), nullable=False),
    Column("key_id", String(64), nullable=True),
    Column("body", Text, nullable=False),  # the Response as answered (JSON)
    Column("history", Text, nullable=False),  # the input items it answered, earlier turns included (JSON)
    Column("size_bytes", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_stored_responses_workspace", "workspace_id", "created_at"),
)

# LoRA adapters added at run time (gateway/adapters.py); the catalog's own are in the catalog.
adapters = Table(
    "adapters",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("base", String(128), nullable=False),  # the catalog model whose replicas serve it
    Column("path", Text, nullable=False),  # the adapter's folder on the model replicas' nodes
    Column("aliases", Text, nullable=False, default="[]"),  # JSON list
    Column("input_per_million_nusd", Money, nullable=True),  # None: the base model's prices
    Column("output_per_million_nusd", Money, nullable=True),
    Column("description", String(200), nullable=False, default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
