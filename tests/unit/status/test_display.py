"""The table and the JSON frame."""

from __future__ import annotations

import json

from orchestrator.status.display import COLUMNS, render_table, to_json
from orchestrator.status.summary import summarize_recent
from tests.unit.status.texts import DEPLOYMENTS, QWEN, SMOL, TINY, recent_texts, summary


def test_render_table() -> None:
    assert render_table(summary()) == "\n".join(
        [
            "APP    MODEL                  STATUS     REPLICAS  WAITING  RUNNING   KV%  TOK/S  ERR/MIN  CACHE%",
            "batch  fresh-model            UPDATING        0/-        -        -     -    0.0      0.0       -",
            "batch  qwen2.5-7b             UNHEALTHY       0/1        -        -     -    0.0      6.0       -",
            "llm    smollm2-135m-instruct  HEALTHY         1/2        3        5  25.0   70.0     18.0       -",
            "llm    tiny-random            UPSCALING       2/1        0        1  12.5    5.0     12.0       -",
        ]
    )


def test_render_table_with_prefix_cache_hit_rate() -> None:
    lines = render_table(summarize_recent(recent_texts(), DEPLOYMENTS)).splitlines()
    assert lines[0].endswith("ERR/MIN  CACHE%")
    assert lines[3].split()[-3:] == ["80.0", "6.0", "50.0"]  # smollm2: half its looked-up tokens hit
    assert lines[4].split()[-1] == "-"  # tiny-random looked nothing up lately


def test_render_table_without_rows_is_the_header() -> None:
    assert render_table([]) == "  ".join(COLUMNS)


def test_to_json_shape() -> None:
    frame = to_json(summary(), 10.0004)
    assert frame["window_s"] == 10.0
    assert [m["model"] for m in frame["models"]] == ["fresh-model", QWEN, SMOL, TINY]
    assert frame["models"][2] == {
        "application": "llm",
        "model": SMOL,
        "deployment": "model-smollm2-135m-instruct",
        "status": "HEALTHY",
        "replicas": {"running": 1, "target": 2},
        "requests": {"waiting": 3, "running": 5},
        "kv_cache_usage": 0.25,
        "tokens_per_second": 70.0,
        "errors_per_minute": 18.0,
        "prefix_cache_hit_rate": None,
    }
    recent = to_json(summarize_recent(recent_texts(), DEPLOYMENTS), 10.0)
    assert [m["prefix_cache_hit_rate"] for m in recent["models"]] == [None, None, 0.5, None]
    assert frame["models"][0]["requests"] == {"waiting": None, "running": None}
    assert frame["models"][0]["kv_cache_usage"] is None
    assert json.loads(json.dumps(frame)) == frame
