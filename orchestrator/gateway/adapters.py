"""LoRA adapters added at run time, kept in the gateway's database (table ``adapters``) so
that every router replica learns them and they outlive a restart of the cluster.

The admin API and ``orchestrator adapters`` write here; each router reads the table every
few seconds (:class:`orchestrator.api.adapters.AdapterRefresher`), and each model replica
answering on its own route reads it as often through the gateway's ledger
(:meth:`orchestrator.gateway.ledger.Ledger.runtime_adapters`): it holds no database URL.
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Engine, delete, insert, select
from sqlalchemy.exc import IntegrityError

from orchestrator.catalog import NAME_PATTERN as _NAME_PATTERN
from orchestrator.catalog import AdapterSpec, Catalog, LocalSource, Pricing
from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.gateway.database import upgrade
from orchestrator.gateway.records import Usd
from orchestrator.gateway.schema import adapters
from orchestrator.gateway.store import from_nusd, make_engine, to_nusd


class AdapterPricing(BaseModel):
    """An adapter's prices in USD per million tokens (as a catalog entry's `pricing`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_million: Usd = Field(default=Decimal(0), description="USD per 1M prompt tokens.")
    output_per_million: Usd = Field(default=Decimal(0), description="USD per 1M output tokens.")


class AdapterEntry(BaseModel):
    """One adapter added at run time: ``POST /admin/adapters`` takes it, listings show it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME_PATTERN, max_length=128, description="Display name clients use.")
    base: str = Field(min_length=1, max_length=128, description="The catalog model whose replicas serve it.")
    path: str = Field(min_length=1, description="Its PEFT folder, readable on the base model's replicas' nodes.")
    aliases: list[Annotated[str, Field(pattern=_NAME_PATTERN, max_length=128)]] = Field(
        default_factory=list, max_length=32, description="Other names that resolve to it."
    )
    description: str = Field(default="", max_length=200, description="One line for humans.")
    pricing: AdapterPricing | None = Field(default=None, description="Per-million-token prices; default: its base's.")
    created_at: datetime | None = Field(default=None, description="When it was added (set by the server).")

    def spec(self) -> AdapterSpec:
        """The adapter as a catalog entry would list it."""
        return AdapterSpec(
            name=self.name,
            aliases=tuple(self.aliases),
            description=self.description,
            source=LocalSource(kind="local", path=self.path),  # type: ignore[arg-type]
            pricing=None if self.pricing is None else Pricing.model_validate(self.pricing.model_dump()),
        )


def _row(entry: AdapterEntry, now: datetime) -> dict[str, Any]:
    pricing = entry.pricing
    return {
        "name": entry.name,
        "base": entry.base,
        "path": entry.path,
        "aliases": json.dumps(entry.aliases),
        "input_per_million_nusd": None if pricing is None else to_nusd(pricing.input_per_million),
        "output_per_million_nusd": None if pricing is None else to_nusd(pricing.output_per_million),
        "description": entry.description,
        "created_at": now,
    }


def _usd(nusd: int) -> Decimal:
    """A stored price in USD, without the database unit's trailing zeros (2, not 2.000000000)."""
    value = from_nusd(nusd) or Decimal(0)
    return value.quantize(Decimal(1)) if value == value.to_integral_value() else value.normalize()


def _entry(row: Any) -> AdapterEntry:
    priced = row.input_per_million_nusd is not None
    pricing = (
        AdapterPricing(
            input_per_million=_usd(row.input_per_million_nusd),
            output_per_million=_usd(row.output_per_million_nusd),
        )
        if priced
        else None
    )
    return AdapterEntry(
        name=row.name,
        base=row.base,
        path=row.path,
        aliases=json.loads(row.aliases),
        description=row.description,
        pricing=pricing,
        created_at=row.created_at,
    )


def checked(catalog: Catalog, entry: AdapterEntry) -> AdapterEntry:
    """Returns the entry with its base by display name.

    Raises:
        OrchestratorError: ``model_not_found`` (404) when ``base`` is no base model here,
            ``capability_not_supported`` (400) when it serves no adapters, ``invalid_request``
            (400) when a name of the adapter is taken (:meth:`Catalog.check_runtime_adapter`).
    """
    base = catalog.check_runtime_adapter(entry.base, entry.spec())
    return entry.model_copy(update={"base": base.name})


def stored_adapters(engine: Engine) -> list[AdapterEntry]:
    """Every adapter stored in the database of ``engine``, by name."""
    with engine.connect() as conn:
        return [_entry(r) for r in conn.execute(select(adapters).order_by(adapters.c.name))]


class AdapterTable:
    """The ``adapters`` table of a gateway database. No I/O until :meth:`open`.

    Args:
        url: the database URL.
        migrate: apply pending migrations on open (the CLI does; routers only read a
            database the gateway has migrated).
    """

    def __init__(self, url: str, *, migrate: bool = False) -> None:
        self.url = url
        self._migrate = migrate
        self._engine: Engine | None = None

    def open(self) -> None:
        self._engine = make_engine(self.url)
        if self._migrate:
            upgrade(self._engine)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self.open()
        assert self._engine is not None
        return self._engine

    def add(self, entry: AdapterEntry, now: datetime) -> AdapterEntry:
        """Stores ``entry`` and returns it as stored.

        Raises:
            OrchestratorError: ``invalid_request`` when an adapter of that name exists.
        """
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(adapters).values(**_row(entry, now)))
        except IntegrityError:
            raise OrchestratorError(
                ErrorCode.INVALID_REQUEST, f"An adapter named {entry.name!r} already exists.", param="name"
            ) from None
        return entry.model_copy(update={"created_at": now})

    def list(self) -> list[AdapterEntry]:
        """Every stored adapter, by name."""
        return stored_adapters(self.engine)

    def remove(self, name: str) -> AdapterEntry:
        """Deletes the adapter and returns what it was.

        Raises:
            OrchestratorError: ``not_found`` when there is none of that name.
        """
        with self.engine.begin() as conn:
            row = conn.execute(select(adapters).where(adapters.c.name == name)).first()
            if row is None:
                raise OrchestratorError(ErrorCode.NOT_FOUND, f"No adapter named {name!r} was added.", param="name")
            conn.execute(delete(adapters).where(adapters.c.name == name))
        return _entry(row)
