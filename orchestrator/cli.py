"""The ``orchestrator`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from orchestrator.catalog import CatalogError


def _validate_catalog(ns: argparse.Namespace) -> int:
    from orchestrator.serving.builder import load_validated_catalog

    try:
        catalog = load_validated_catalog(ns.paths)
    except CatalogError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{len(exc.problems)} problem(s) found", file=sys.stderr)
        return 1
    for spec in catalog:
        print(f"ok  {spec.name}  (aliases: {', '.join(spec.aliases) or '-'}; backend id: {spec.backend_id})")
    return 0


def _serve(ns: argparse.Namespace) -> int:
    from orchestrator.embedded import serve_forever

    return serve_forever(
        catalog=ns.catalog, host=ns.host, port=ns.port, metrics_port=ns.metrics_port, open_access=ns.open
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchestrator", description="Serve many LLMs behind one OpenAI API.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="Start a local Ray, deploy the catalog and serve it.")
    serve.add_argument("--catalog", action="append", help="Catalog file or folder (repeatable; default: catalog/).")
    serve.add_argument("--host", default=None, help="Bind address (default 127.0.0.1).")
    serve.add_argument("--port", type=int, default=None, help="HTTP port (default 8000).")
    serve.add_argument(
        "--metrics-port", type=int, default=None, help="Prometheus metrics port on 127.0.0.1 (default: a free port)."
    )
    serve.add_argument(
        "--open",
        action="store_true",
        help="Serve without API keys (open mode) even on a non-loopback --host. Without keys or an admin key, "
        "serve on loopback is open anyway; on another address it refuses to start unless given this.",
    )
    serve.set_defaults(func=_serve)

    validate = sub.add_parser("validate-catalog", help="Check catalog files; exit 1 listing every problem.")
    validate.add_argument("paths", nargs="+", help="Catalog files or folders.")
    validate.set_defaults(func=_validate_catalog)

    from orchestrator.cli_gateway import add_commands
    from orchestrator.status import add_command as add_status

    add_commands(sub)
    add_status(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return int(ns.func(ns))


if __name__ == "__main__":
    raise SystemExit(main())
