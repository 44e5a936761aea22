"""``orchestrator adapters add|list|remove``: LoRA adapters added at run time, straight on the
gateway database (``ORCH_DATABASE_URL``). Running routers serve the change within
``ORCH_KEY_CACHE_SECONDS``; no replica restarts."""

from __future__ import annotations

import argparse
import sys
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any

from orchestrator.catalog import CatalogError, load_catalog
from orchestrator.cli_gateway import guard, opened, print_json, usd
from orchestrator.gateway.adapters import AdapterEntry, AdapterPricing, AdapterTable, checked
from orchestrator.settings import Settings


def _table() -> AbstractContextManager[AdapterTable]:
    return opened(AdapterTable(Settings().resolved_database_url(), migrate=True))


def _add(ns: argparse.Namespace) -> int:
    try:
        catalog = load_catalog(ns.catalog or Settings().catalog)
    except CatalogError as exc:
        print(f"error: the catalog (to check the base model against) is invalid:\n{exc}", file=sys.stderr)
        return 1
    pricing = None
    if ns.input_price is not None or ns.output_price is not None:
        prices = {"input_per_million": ns.input_price or 0, "output_per_million": ns.output_price or 0}
        pricing = AdapterPricing.model_validate(prices)
    entry = AdapterEntry(
        name=ns.name, base=ns.base, path=ns.path, aliases=ns.alias or [], description=ns.description, pricing=pricing
    )
    with _table() as table:
        catalog.set_runtime_adapters((a.base, a.spec()) for a in table.list())  # their names are taken too
        stored = table.add(checked(catalog, entry), datetime.now(UTC))
    print(f"added adapter {stored.name} on {stored.base}", file=sys.stderr)
    return 0


def _list(ns: argparse.Namespace) -> int:
    with _table() as table:
        entries = table.list()
    if ns.json:
        print_json([e.model_dump(mode="json") for e in entries])
        return 0
    for e in entries:
        print(f"{e.name:<32} {e.base:<32} {e.path}")
    return 0


def _remove(ns: argparse.Namespace) -> int:
    with _table() as table:
        removed = table.remove(ns.name)
    print(f"removed adapter {removed.name} from {removed.base}", file=sys.stderr)
    return 0


def add_commands(sub: Any) -> None:
    """Adds ``adapters`` to the ``orchestrator`` command."""
    adapters = sub.add_parser("adapters", help="Add, list and remove LoRA adapters at run time (ORCH_DATABASE_URL).")
    actions = adapters.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="Add an adapter to a catalog model whose entry sets `lora`.")
    add.add_argument("name", help="The adapter's display name.")
    add.add_argument("--base", required=True, help="The catalog model whose replicas serve it.")
    add.add_argument("--path", required=True, help="Its PEFT folder, readable on the base's replicas' nodes.")
    add.add_argument("--alias", action="append", help="Another name for it (repeatable).")
    add.add_argument("--description", default="", help="One line for humans.")
    add.add_argument("--input-price", type=usd, help="USD per million prompt tokens (default: the base's prices).")
    add.add_argument("--output-price", type=usd, help="USD per million output tokens.")
    add.add_argument("--catalog", action="append", help="Catalog files or folders to check against (ORCH_CATALOG).")
    add.set_defaults(func=guard(_add))
    listing = actions.add_parser("list", help="List the adapters added at run time.")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=guard(_list))
    remove = actions.add_parser("remove", help="Remove an adapter added at run time.")
    remove.add_argument("name")
    remove.set_defaults(func=guard(_remove))
