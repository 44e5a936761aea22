"""``orchestrator keys|workspaces|usage``: administration straight on the gateway database
(``ORCH_DATABASE_URL``), so it works with or without a running server. A running server
sees changes within ``ORCH_KEY_CACHE_SECONDS``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol, TypeVar

from pydantic import ValidationError

from orchestrator.errors import OrchestratorError
from orchestrator.gateway import admin
from orchestrator.gateway.records import KeyLimits
from orchestrator.gateway.store import SQLStore
from orchestrator.settings import Settings


class _Closable(Protocol):
    def open(self) -> None: ...

    def close(self) -> None: ...


_Resource = TypeVar("_Resource", bound=_Closable)


@contextmanager
def opened(resource: _Resource) -> Iterator[_Resource]:
    """Yields ``resource`` (a store or table of the gateway database) opened, and closes it
    when the block ends, however it ends."""
    resource.open()
    try:
        yield resource
    finally:
        resource.close()


def _store() -> AbstractContextManager[SQLStore]:
    return opened(SQLStore(Settings().resolved_database_url()))


def usd(text: str) -> Decimal:
    """Returns ``text`` as an amount in USD (argparse's ``type``: a bad one is a usage error)."""
    try:
        return Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not an amount in USD: {text!r}") from None


def _limits(ns: argparse.Namespace) -> KeyLimits:
    enabled = {"enable": True, "disable": False}.get(getattr(ns, "state", None) or "")
    models = [m.strip() for group in ns.models or [] for m in group.split(",") if m.strip()] or None
    return KeyLimits(
        name=ns.name,
        models=models,
        rpm=ns.rpm,
        tpm=ns.tpm,
        max_concurrent=ns.max_concurrent,
        credits=ns.credits,
        daily_limit=ns.daily_limit,
        monthly_limit=ns.monthly_limit,
        enabled=enabled,
    )


def print_json(data: Any) -> None:
    """Prints ``data`` as indented JSON (dates and amounts as strings)."""
    print(json.dumps(data, indent=2, default=str))


def _keys_create(ns: argparse.Namespace) -> int:
    pepper = Settings().key_pepper.encode()
    with _store() as store:
        created = admin.create_key(store, _limits(ns), workspace=ns.workspace, pepper=pepper, now=datetime.now(UTC))
    info = created.info
    print(f"created {info.id} ({info.name or 'unnamed'}) in workspace {info.workspace_id}", file=sys.stderr)
    print("This key is shown once; store it now:", file=sys.stderr)
    print(created.key)
    return 0


def _keys_list(ns: argparse.Namespace) -> int:
    with _store() as store:
        keys = store.list_keys()
    if ns.json:
        print_json([k.info().model_dump(mode="json") for k in keys])
        return 0
    print(f"{'id':<22} {'name':<16} {'workspace':<12} {'hint':<16} {'rpm':>6} {'tpm':>8} {'credits':>12} state")
    for k in keys:
        state = "revoked" if k.revoked_at else ("enabled" if k.enabled else "disabled")
        credits = "-" if k.credits is None else f"{k.credits:.6f}"
        rpm, tpm = k.rpm or "-", k.tpm or "-"
        print(f"{k.id:<22} {k.name[:16]:<16} {k.workspace_id:<12} {k.hint:<16} {rpm:>6} {tpm:>8} {credits:>12} {state}")
    return 0


def _keys_show(ns: argparse.Namespace) -> int:
    with _store() as store:
        print_json(admin.get_key(store, ns.id).model_dump(mode="json"))
    return 0


def _keys_update(ns: argparse.Namespace) -> int:
    with _store() as store:
        info = admin.update_key(store, ns.id, _limits(ns), clear=frozenset(ns.clear or ()), add_credits=ns.add_credits)
    print_json(info.model_dump(mode="json"))
    return 0


def _keys_revoke(ns: argparse.Namespace) -> int:
    with _store() as store:
        info = admin.revoke_key(store, ns.id, now=datetime.now(UTC))
    print(f"revoked {info.id}")
    return 0


def _workspaces(ns: argparse.Namespace) -> int:
    with _store() as store:
        if ns.action == "list":
            for w in store.list_workspaces():
                print(f"{w.id:<24} {'enabled' if w.enabled else 'disabled'}")
            return 0
        workspace = admin.set_workspace_enabled(store, ns.id, ns.action == "enable")
    print(f"{workspace.id} {'enabled' if workspace.enabled else 'disabled'}")
    return 0


def _usage(ns: argparse.Namespace) -> int:
    filters = admin.report_filters(key=ns.key, model=ns.model, start=ns.start, end=ns.end, group_by=ns.group_by)
    groups = filters["group_by"]
    with _store() as store:
        rows = store.usage_report(**filters)
    if ns.json:
        print_json(rows)
        return 0
    print(
        "  ".join(f"{g:<22}" for g in groups) + f"  {'requests':>9} {'prompt':>10} {'completion':>10} {'cost USD':>14}"
    )
    for r in rows:
        head = "  ".join(f"{r[g]!s:<22}" for g in groups)
        print(f"{head}  {r['requests']:>9} {r['prompt_tokens']:>10} {r['completion_tokens']:>10} {r['cost']:>14.9f}")
    return 0


def _limit_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", help="Human name of the key.")
    parser.add_argument("--models", action="append", help="Allowed model names or patterns, comma-separated.")
    parser.add_argument("--rpm", type=int, help="Requests per minute.")
    parser.add_argument("--tpm", type=int, help="Tokens per minute (prompt + max output).")
    parser.add_argument("--max-concurrent", type=int, help="Requests running at once.")
    parser.add_argument("--credits", type=usd, help="Credit balance, USD.")
    parser.add_argument("--daily-limit", type=usd, help="Spend limit per UTC day, USD.")
    parser.add_argument("--monthly-limit", type=usd, help="Spend limit per UTC month, USD.")


def guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Returns ``fn`` answering an ``OrchestratorError`` with its message on stderr and exit
    code 1, and a pydantic ``ValidationError`` with exit code 2."""

    def run(ns: argparse.Namespace) -> int:
        try:
            return fn(ns)
        except OrchestratorError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 1
        except ValidationError as exc:
            print(f"error: {OrchestratorError.from_validation(exc).message}", file=sys.stderr)
            return 2

    return run


def add_commands(sub: Any) -> None:
    """Adds ``keys``, ``workspaces`` and ``usage`` to the ``orchestrator`` command."""
    keys = sub.add_parser("keys", help="Create and manage API keys (on ORCH_DATABASE_URL).")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="Create a key; its last stdout line is the key.")
    _limit_flags(create)
    create.add_argument("--workspace", default=admin.DEFAULT_WORKSPACE, help="Workspace (created if new).")
    create.set_defaults(func=guard(_keys_create))
    listing = actions.add_parser("list", help="List keys (never the secrets).")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=guard(_keys_list))
    show = actions.add_parser("show", help="Show one key as JSON.")
    show.add_argument("id")
    show.set_defaults(func=guard(_keys_show))
    upd = actions.add_parser("update", help="Change a key's limits, models or state.")
    upd.add_argument("id")
    _limit_flags(upd)
    upd.add_argument("--enable", dest="state", action="store_const", const="enable")
    upd.add_argument("--disable", dest="state", action="store_const", const="disable")
    upd.add_argument("--clear", action="append", choices=admin.CLEARABLE, help="Make this limit unlimited.")
    upd.add_argument("--add-credits", type=usd, help="Top the balance up by this many USD (safe while serving).")
    upd.set_defaults(func=guard(_keys_update))
    revoke = actions.add_parser("revoke", help="Revoke a key for good.")
    revoke.add_argument("id")
    revoke.set_defaults(func=guard(_keys_revoke))

    ws = sub.add_parser("workspaces", help="List, lock or unlock workspaces.")
    ws.add_argument("action", choices=["list", "enable", "disable"])
    ws.add_argument("id", nargs="?", default=admin.DEFAULT_WORKSPACE)
    ws.set_defaults(func=guard(_workspaces))

    usage = sub.add_parser("usage", help="Requests, tokens and cost per key, model and day.")
    usage.add_argument("--key", help="Key id.")
    usage.add_argument("--model", help="Model display name.")
    usage.add_argument("--from", dest="start", help="First UTC day, YYYY-MM-DD.")
    usage.add_argument("--to", dest="end", help="Last UTC day, YYYY-MM-DD (included).")
    usage.add_argument("--group-by", default="key,model,day", help="Comma-separated: key, model, day.")
    usage.add_argument("--json", action="store_true")
    usage.set_defaults(func=guard(_usage))
