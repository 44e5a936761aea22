"""A valid key's admissions while random keys flood the ledger, on SQLite and on PostgreSQL.

    .venv/bin/python benchmarks/auth_flood.py [--seconds 8] [--flooders 64] [--pace-ms 20]
        [--flood-pace-ms 10] [--rtt-ms 2]

In one process, per database (a SQLite file; a throwaway PostgreSQL server on 127.0.0.1,
started with ``initdb``/``pg_ctl`` as the unit tests do), a started :class:`Ledger` serves one
valid key that makes a request every ``--pace-ms`` (``admit``, then ``settle``: the two
calls a router makes per request; its row is read again every ``key_cache_s``, 2 s, as in
production) for ``--seconds``, in three phases:

- ``quiet``: nothing else runs;
- ``flood``: ``--flooders`` concurrent clients authenticate random keys, each as soon as
  its last one is answered and at most one per ``--flood-pace-ms`` (the ledger as built:
  the unknown-key cache, the bounded lookup lane);
- ``flood_one_thread``: the same flood with the lookup lane closed, so that lookups of random
  keys run on the ledger's database thread, as before the lane existed.

PostgreSQL runs twice: as it is on 127.0.0.1, and with ``--rtt-ms`` added to each call on
the request and flush paths (a database a few milliseconds away, where lookups wait on the
network rather than on the CPU).

Reported per phase: the valid key's admission wait (``admit``) and its latency (``admit`` +
``settle``), p50/p99/max in ms, the flood's answers per second by code, and the ratios of
each flood phase's figures to the quiet ones, from the same run. The last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.errors import OrchestratorError
from orchestrator.gateway.journal import UsageJournal
from orchestrator.gateway.ledger import Ledger
from orchestrator.gateway.records import Admission, KeyLimits, UsageRecord
from orchestrator.gateway.store import SQLStore
from tests.postgres import running_postgres

NAMES = ["tiny-a"]
PHASES = ("quiet", "flood", "flood_one_thread")


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    if not ordered:
        return {"n": 0}

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return {"n": len(ordered), "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": round(ordered[-1] * 1000, 2)}


def usage(admission: Admission) -> UsageRecord:
    assert admission.key_id is not None
    return UsageRecord(
        request_id=admission.request_id,
        key_id=admission.key_id,
        workspace_id=admission.workspace_id,
        model=NAMES[0],
        prompt_tokens=5,
        completion_tokens=5,
        cost=Decimal("0.000001"),
        status_code=200,
        created_at=datetime.now(UTC),
    )


async def valid_traffic(ledger: Ledger, key: str, seconds: float, pace_s: float) -> dict[str, Any]:
    waits: list[float] = []
    latencies: list[float] = []
    failures = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        started = time.perf_counter()
        try:
            admission = await ledger.admit(key, NAMES, 10, uuid.uuid4().hex, cost=Decimal("0.000001"))
            admitted = time.perf_counter()
            await ledger.settle(admission, usage(admission))
        except OrchestratorError:
            failures += 1
            continue
        waits.append(admitted - started)
        latencies.append(time.perf_counter() - started)
        await asyncio.sleep(max(0.0, pace_s - (time.perf_counter() - started)))
    return {"admission": percentiles(waits), "latency": percentiles(latencies), "failures": failures}


async def flooder(ledger: Ledger, stop: asyncio.Event, answers: Counter[str], pace_s: float) -> None:
    # A client that sends its next random key when the last one is answered, at most one per
    # `pace_s` (an HTTP round trip), so that refusals answered at once do not spin.
    while not stop.is_set():
        started = time.perf_counter()
        try:
            await ledger.authenticate("sk-orch-" + uuid.uuid4().hex)
            answers["accepted"] += 1  # never: the keys are random
        except OrchestratorError as exc:
            answers[exc.code.value] += 1
        await asyncio.sleep(max(0.0, pace_s - (time.perf_counter() - started)))


class DistantStore(SQLStore):
    """The store with ``rtt_s`` added to each call on the request and flush paths: a database
    a network round trip away (the wait releases the GIL, as waiting on a socket does)."""

    def __init__(self, url: str, rtt_s: float) -> None:
        super().__init__(url)
        self._rtt_s = rtt_s

    def key_by_hash(self, key_hash: str) -> Any:
        time.sleep(self._rtt_s)
        return super().key_by_hash(key_hash)

    def get_workspace(self, workspace_id: str) -> Any:
        time.sleep(self._rtt_s)
        return super().get_workspace(workspace_id)

    def write_usage(self, records: Any) -> Any:
        time.sleep(self._rtt_s)
        return super().write_usage(records)


async def phase(ledger: Ledger, key: str, name: str, args: argparse.Namespace) -> dict[str, Any]:
    stop = asyncio.Event()
    answers: Counter[str] = Counter()
    flooders = 0 if name == "quiet" else args.flooders
    flood = [asyncio.create_task(flooder(ledger, stop, answers, args.flood_pace_ms / 1000)) for _ in range(flooders)]
    started = time.perf_counter()
    result = await valid_traffic(ledger, key, args.seconds, args.pace_ms / 1000)
    stop.set()
    await asyncio.gather(*flood)
    elapsed = time.perf_counter() - started
    result["flood_answers_per_s"] = {code: round(n / elapsed, 1) for code, n in sorted(answers.items())}
    return result


async def measure(url: str, rtt_s: float, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for name in PHASES:
        # A fresh ledger per phase (same database), so that no phase inherits another's caches.
        ledger = Ledger(DistantStore(url, rtt_s), UsageJournal(folder / f"journal-{name}"), fence=None)
        await ledger.start()
        try:
            key = (await ledger.create_key(KeyLimits(credits=Decimal(1000)))).key
            await ledger.admit(key, NAMES, 10, "warm-" + name)  # cached, as a streaming key is
            if name == "flood_one_thread":
                ledger.keyring.lookups.close()  # lookups of unknown keys go to the database thread
            figures[name] = await phase(ledger, key, name, args)
        finally:
            await ledger.stop()
    for name in PHASES[1:]:
        figures[f"{name}_vs_quiet"] = {
            what: {
                q: round(figures[name][what][q] / figures["quiet"][what][q], 2)
                for q in ("p50_ms", "p99_ms", "max_ms")
                if figures["quiet"][what].get(q)
            }
            for what in ("admission", "latency")
        }
    return figures


@contextmanager
def databases(folder: Path, which: list[str]) -> Iterator[dict[str, str]]:
    urls = {}
    if "sqlite" in which:
        urls["sqlite"] = f"sqlite:///{folder / 'flood.db'}"
    if "postgresql" not in which:
        yield urls
        return
    (folder / "pg").mkdir()
    with running_postgres(folder / "pg") as server:
        urls["postgresql"] = server.url
        yield urls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each phase")
    parser.add_argument("--flooders", type=int, default=64, help="concurrent clients sending random keys")
    parser.add_argument("--pace-ms", type=float, default=20.0, help="the valid key's interval between requests")
    parser.add_argument("--flood-pace-ms", type=float, default=10.0, help="each flooder's least interval")
    parser.add_argument("--rtt-ms", type=float, default=2.0, help="round trip added to PostgreSQL calls (a second run)")
    parser.add_argument("--databases", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"])
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="auth-flood-") as tmp, databases(Path(tmp), args.databases) as urls:
        runs = [(db, url, 0.0) for db, url in urls.items()]
        if "postgresql" in urls and args.rtt_ms > 0:
            runs.append((f"postgresql+{args.rtt_ms:g}ms", urls["postgresql"], args.rtt_ms / 1000))
        for db, url, rtt_s in runs:
            (Path(tmp) / db).mkdir()
            results[db] = asyncio.run(measure(url, rtt_s, Path(tmp) / db, args))
            for name in PHASES:
                row = results[db][name]
                print(
                    f"{db:16} {name:17} admission p50/p99/max {row['admission'].get('p50_ms')}/"
                    f"{row['admission'].get('p99_ms')}/{row['admission'].get('max_ms')} ms  latency p50/p99/max "
                    f"{row['latency'].get('p50_ms')}/{row['latency'].get('p99_ms')}/{row['latency'].get('max_ms')} ms"
                    f"  failures {row['failures']}  flood/s {row['flood_answers_per_s']}"
                )
            for name in PHASES[1:]:
                print(f"{db:16} {name + '_vs_quiet':26} {results[db][name + '_vs_quiet']}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
