"""Usage records survive the ledger's process being killed (crash) or stopped (SIGTERM)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from orchestrator.gateway.journal import UsageJournal
from orchestrator.gateway.ledger import Ledger
from orchestrator.gateway.store import SQLStore

REPO = Path(__file__).resolve().parents[2]

# A ledger process: creates a key with credits, settles N requests, says READY, then
# waits to be killed. Its flusher would only run after an hour, so nothing reaches the
# database unless a shutdown flushes or a restart replays the journal.
_CHILD = """
import asyncio, signal, sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from orchestrator.gateway.journal import UsageJournal
from orchestrator.gateway.ledger import Ledger
from orchestrator.gateway.records import KeyLimits, UsageRecord
from orchestrator.gateway.store import SQLStore

async def main(url, journal, n):
    ledger = Ledger(SQLStore(url), UsageJournal(Path(journal)), flush_interval_s=3600)
    await ledger.start()
    created = await ledger.create_key(KeyLimits(name="crash", credits=Decimal(1)))
    for i in range(n):
        admission = await ledger.admit(created.key, ["tiny-a"], 10, f"req-{i}")
        await ledger.settle(admission, UsageRecord(
            request_id=f"req-{i}", key_id=admission.key_id, model="tiny-a", prompt_tokens=10,
            completion_tokens=5, cost=Decimal("0.01"), latency_ms=1.0, created_at=datetime.now(UTC)))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("READY", created.info.id, flush=True)
    await stop.wait()
    await ledger.stop()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


def run_and_signal(url: str, journal: Path, n: int, sig: signal.Signals) -> str:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, url, str(journal), str(n)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert line and line[0] == "READY", line
    proc.send_signal(sig)
    proc.wait(timeout=60)
    proc.stdout.close()
    return line[1]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
async def test_no_finished_record_is_lost(tmp_path: Path, sig: signal.Signals) -> None:
    url, journal, n = f"sqlite:///{tmp_path / 'g.db'}", tmp_path / "journal", 25
    key_id = run_and_signal(url, journal, n, sig)
    store = SQLStore(url)
    store.open()
    before = sum(store.usage(f"req-{i}") is not None for i in range(n))
    store.close()
    if sig is signal.SIGTERM:
        assert before == n  # a clean shutdown flushed everything
    else:
        assert before == 0  # killed before any flush: only the journal has them
    ledger = Ledger(SQLStore(url), UsageJournal(journal))
    await ledger.start()  # replays whatever the journal still holds
    try:
        for i in range(n):
            assert (await ledger.generation(f"gen-req-{i}", None, admin=True)).prompt_tokens == 10
        assert (await ledger.get_key(key_id)).credits == Decimal(1) - n * Decimal("0.01")
        assert (await ledger.usage_report(group_by=["key"]))[0]["requests"] == n
    finally:
        await ledger.stop()
    assert not list(journal.glob("*.jsonl")), "flushed segments are deleted"
