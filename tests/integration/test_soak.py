"""The soak benchmark's short version (benchmarks/soak.py runs it for 30 minutes): a minute of
mixed load on the main app (PostgreSQL ledger), then every admitted request has exactly one
record and every balance is its credits less its recorded costs."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.soak import check, create_keys, mix
from tests.integration.conftest import ADMIN_KEY, Deployment

pytestmark = pytest.mark.integration


def test_a_minute_of_mixed_load_keeps_records_and_balances_exact(deployment: Deployment) -> None:
    keys = create_keys(deployment.base_url, ADMIN_KEY, prefix="soak-ci")
    tally = asyncio.run(mix(deployment.base_url, keys, "tiny-a", duration_s=60, concurrency=4))
    assert tally.server_errors == []
    # The load reached every outcome it means to: answers, dropped streams, 429 and 402.
    statuses = {outcome.split()[1] for outcome in tally.outcomes}
    assert {"200", "429", "402"} <= statuses, tally.outcomes
    assert tally.outcomes["dropped_stream 200"] > 0 and tally.outcomes["lookup 200"] > 0
    checks = check(deployment.database_url, keys, tally)
    assert checks["ok"], checks
    assert checks["poor"]["admitted"] > 0 and checks["main"]["records"] == tally.admitted["main"] > 100
