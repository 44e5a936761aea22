"""How ``orchestrator status`` shows its rows: an aligned table, or one JSON object per frame."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from orchestrator.status.summary import ModelStatus

_CLEAR_SCREEN = "\x1b[H\x1b[2J"

COLUMNS = ("APP", "MODEL", "STATUS", "REPLICAS", "WAITING", "RUNNING", "KV%", "TOK/S", "ERR/MIN", "CACHE%")
_LEFT_ALIGNED = 3  # APP, MODEL, STATUS


def _count(value: float | None) -> str:
    if value is None:
        return "-"
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def _fixed(value: float | None, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:.1f}"


def _cells(row: ModelStatus) -> tuple[str, ...]:
    return (
        row.application or "-",
        row.model,
        row.status or "-",
        f"{_count(row.running_replicas)}/{_count(row.target_replicas)}",
        _count(row.waiting_requests),
        _count(row.running_requests),
        _fixed(row.kv_cache_usage, 100.0),
        _fixed(row.tokens_per_second),
        _fixed(row.errors_per_minute),
        _fixed(row.prefix_cache_hit_rate, 100.0),
    )


def render_table(rows: Sequence[ModelStatus]) -> str:
    """Returns the rows as an aligned text table with a header line (no trailing newline):
    text columns left-aligned, figures right-aligned, ``-`` for unknown figures, KV-cache
    use and prefix-cache hit rate in percent, replicas as running/target."""
    table = [COLUMNS, *(_cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = []
    for line in table:
        cells = [
            cell.ljust(width) if i < _LEFT_ALIGNED else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _number(value: float | None, digits: int = 3) -> float | int | None:
    if value is None:
        return None
    return int(value) if float(value).is_integer() else round(value, digits)


def to_json(rows: Sequence[ModelStatus], window_s: float) -> dict[str, Any]:
    """Returns one frame as a JSON-ready dict: ``{"window_s", "models": [...]}``, each model
    with ``application``, ``model``, ``deployment``, ``status``, ``replicas`` {running,
    target}, ``requests`` {waiting, running}, ``kv_cache_usage`` (0..1),
    ``tokens_per_second``, ``errors_per_minute`` and ``prefix_cache_hit_rate`` (0..1);
    unknown figures are ``null``."""
    return {
        "window_s": round(window_s, 3),
        "models": [
            {
                "application": row.application,
                "model": row.model,
                "deployment": row.deployment,
                "status": row.status,
                "replicas": {"running": row.running_replicas, "target": row.target_replicas},
                "requests": {"waiting": _number(row.waiting_requests), "running": _number(row.running_requests)},
                "kv_cache_usage": None if row.kv_cache_usage is None else round(row.kv_cache_usage, 4),
                "tokens_per_second": None if row.tokens_per_second is None else round(row.tokens_per_second, 3),
                "errors_per_minute": None if row.errors_per_minute is None else round(row.errors_per_minute, 3),
                "prefix_cache_hit_rate": (
                    None if row.prefix_cache_hit_rate is None else round(row.prefix_cache_hit_rate, 4)
                ),
            }
            for row in rows
        ],
    }


def write_frame(
    rows: Sequence[ModelStatus], window_s: float, out: TextIO, *, as_json: bool, watch: bool, clear: bool
) -> None:
    """Writes one frame: a JSON object on one line, or the table (after clearing the screen
    when ``clear``; with a caption line in watch mode)."""
    if as_json:
        out.write(json.dumps(to_json(rows, window_s)) + "\n")
    else:
        if clear:
            out.write(_CLEAR_SCREEN)
        if watch:
            stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
            out.write(f"orchestrator status  {stamp}  rates over {window_s:.1f} s  (Ctrl-C to stop)\n\n")
        out.write(render_table(rows) + "\n")
        if not rows:
            out.write("(no model deployments and no model metrics found)\n")
    out.flush()
