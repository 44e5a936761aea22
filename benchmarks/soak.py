"""Soak: ``orchestrator serve`` with the gateway on PostgreSQL under a mixed load for a long
time, watching every process's memory and checking the money at the end.

    .venv/bin/python benchmarks/soak.py [--minutes 30] [--warmup-minutes 3] [--concurrency 8]

Builds the tiny random-weight model, starts a throwaway PostgreSQL (as the integration tests
do) and ``orchestrator serve`` on 127.0.0.1 with an admin key, creates three keys through the
admin API (``main`` with ample credits, ``limited`` at a few requests per minute, ``poor``
with credits for a few requests), and runs :func:`mix` for ``--minutes``: chat completions
and completions, streaming and not, streams the client drops after their first chunk,
generation lookups, and the two limited keys' requests that end in 429 and 402.

Every ``--sample-s`` it reads the resident memory of every process under the server (Ray's
GCS, raylet, dashboard and agents, the Serve controller, proxy and replicas, the vLLM
engines, HAProxy). After the load it waits for the ledger to flush and checks (:func:`check`)
that each key has exactly one usage record per request it got admitted and that its balance
is its credits less its recorded costs, to the nanodollar, and never below zero.

Prints a table of each process's memory after warm-up and at the end and its growth, then one
JSON line: ``{"requests", "server_errors", "outcomes", "checks", "memory": {"max_growth_pct",
"processes": [...], "every_5_min_mib": {process: [MiB, ...]}}, "ok"}``. ``ok`` is true when
there were no server errors, the checks hold, and no process grew more than
``--max-growth-pct`` (5) after warm-up.
``tests/integration/test_soak.py`` runs :func:`mix` and :func:`check` for a minute against the
integration cluster's PostgreSQL app.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.vs_vllm import ADMIN_KEY, BIN, free_port, stop, wait_ready
from orchestrator.engine.weights import build_tiny_llama
from orchestrator.gateway.store import SQLStore

# What each key is for, and the limits it is created with.
KEY_LIMITS: dict[str, dict[str, Any]] = {
    "main": {"credits": "1000"},
    "limited": {"rpm": 6, "credits": "1000"},
    "poor": {"credits": "0.0005"},
}
# (operation, weight): the load's mix.
OPERATIONS = [
    ("chat", 25),
    ("chat_stream", 25),
    ("completion", 10),
    ("completion_stream", 10),
    ("dropped_stream", 10),
    ("lookup", 10),
    ("limited", 6),
    ("poor", 4),
]
USER_TURNS = ["Tell me a story about a cat.", "What is the capital of France?", "Count to five.", "Say hello."]


@dataclass
class Key:
    """A key the load uses: its secret, id and starting credits."""

    secret: str
    id: str
    credits: Decimal


@dataclass
class Tally:
    """What the clients saw."""

    requests: int = 0
    admitted: Counter[str] = field(default_factory=Counter)  # per key name: requests that got a record
    outcomes: Counter[str] = field(default_factory=Counter)  # "<operation> <status>"
    server_errors: list[str] = field(default_factory=list)
    finished: deque[str] = field(default_factory=lambda: deque(maxlen=200))  # ids of the main key's answers

    def saw(self, operation: str, status: int, key: str, detail: str = "") -> None:
        self.requests += 1
        self.outcomes[f"{operation} {status}"] += 1
        if status >= 500:
            self.server_errors.append(f"{operation}: {status} {detail[:300]}")
        elif status == 200 and operation != "lookup":
            self.admitted[key] += 1


def create_keys(base_url: str, admin_key: str, prefix: str = "soak") -> dict[str, Key]:
    """Creates the load's keys through the admin API."""
    keys = {}
    for name, limits in KEY_LIMITS.items():
        resp = httpx.post(
            base_url + "/admin/keys",
            json={"name": f"{prefix}-{name}", **limits},
            headers={"Authorization": f"Bearer {admin_key}"},
            timeout=60,
        )
        resp.raise_for_status()
        data = resp.json()
        keys[name] = Key(secret=data["key"], id=data["info"]["id"], credits=Decimal(limits["credits"]))
    return keys


def _body(operation: str, model: str, rng: random.Random) -> tuple[str, dict[str, Any]]:
    """The route and body of one generation request."""
    tokens = rng.randint(4, 24)
    stream = operation.endswith("stream")
    if operation.startswith("completion"):
        return "/v1/completions", {
            "model": model,
            "prompt": rng.choice(USER_TURNS),
            "max_tokens": tokens,
            "stream": stream,
        }
    messages = [{"role": "user", "content": rng.choice(USER_TURNS)}]
    return "/v1/chat/completions", {"model": model, "messages": messages, "max_tokens": tokens, "stream": stream}


async def _generate(client: httpx.AsyncClient, tally: Tally, operation: str, key: str, secret: str, body: Any) -> None:
    route, payload = body
    headers = {"Authorization": f"Bearer {secret}"}
    if not payload["stream"]:
        resp = await client.post(route, json=payload, headers=headers)
        tally.saw(operation, resp.status_code, key, resp.text)
        if resp.status_code == 200 and key == "main":
            tally.finished.append(resp.json()["id"])
        return
    async with client.stream("POST", route, json=payload, headers=headers) as resp:
        if resp.status_code != 200:
            tally.saw(operation, resp.status_code, key, (await resp.aread()).decode(errors="replace"))
            return
        gen_id, failed = await _read_stream(resp, drop_after_first=operation == "dropped_stream")
    tally.saw(operation, 500 if failed else 200, key, "error event in the stream")
    if gen_id and key == "main" and operation != "dropped_stream":
        tally.finished.append(gen_id)


async def _sse_lines(resp: httpx.Response) -> AsyncIterator[str]:
    """The stream's lines, split where SSE splits them (CR, LF, CRLF). Not ``aiter_lines``:
    it also splits at the Unicode line breaks (U+2028, U+0085, ...) that a JSON string may
    hold unescaped, as random-weight models' text does."""
    pending = ""
    async for text in resp.aiter_text():
        pending += text
        *lines, pending = pending.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        for line in lines:
            yield line
    if pending:
        yield pending


async def _read_stream(resp: httpx.Response, *, drop_after_first: bool) -> tuple[str | None, bool]:
    """Reads an SSE stream; returns its generation id and whether it carried an error event.
    With ``drop_after_first`` it returns after the first chunk (the caller's exit closes the
    connection, as a client that goes away)."""
    gen_id = None
    async for line in _sse_lines(resp):
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        data = json.loads(line[6:])
        if "error" in data:
            return gen_id, True
        gen_id = gen_id or data.get("id")
        if drop_after_first:
            break
    return gen_id, False


async def _lookup(client: httpx.AsyncClient, tally: Tally, secret: str) -> None:
    if not tally.finished:
        return
    gen_id = random.choice(tally.finished)
    resp = await client.get("/v1/generation", params={"id": gen_id}, headers={"Authorization": f"Bearer {secret}"})
    tally.saw("lookup", resp.status_code, "main", resp.text)
    if 200 < resp.status_code < 500:  # a finished generation is always found
        tally.server_errors.append(f"lookup of {gen_id}: {resp.status_code} {resp.text[:300]}")


async def mix(
    base_url: str, keys: dict[str, Key], model: str, *, duration_s: float, concurrency: int, seed: int = 0
) -> Tally:
    """Runs the mixed load for ``duration_s`` with ``concurrency`` clients; returns the tally."""
    tally = Tally()
    rng = random.Random(seed)
    names, weights = zip(*OPERATIONS, strict=True)
    deadline = time.monotonic() + duration_s
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as client:

        async def worker() -> None:
            while time.monotonic() < deadline:
                operation = rng.choices(names, weights)[0]
                try:
                    if operation == "lookup":
                        await _lookup(client, tally, keys["main"].secret)
                        continue
                    key = operation if operation in ("limited", "poor") else "main"
                    kind = rng.choice(["chat", "chat_stream"]) if key != "main" else operation
                    await _generate(client, tally, operation, key, keys[key].secret, _body(kind, model, rng))
                except (httpx.HTTPError, ValueError) as exc:  # a dropped connection, a malformed answer
                    tally.server_errors.append(f"{operation}: {type(exc).__name__} {exc}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tally


def check(database_url: str, keys: dict[str, Key], tally: Tally, *, settle_s: float = 60) -> dict[str, Any]:
    """Reads the gateway's database: per key, records against admitted requests and the
    balance against credits less recorded cost. Waits up to ``settle_s`` for the ledger to
    write the last records. Returns ``{key: {...}, "ok": bool}``."""
    store = SQLStore(database_url)
    store.open()
    try:
        deadline = time.monotonic() + settle_s
        while True:
            result = _check_once(store, keys, tally)
            if result["ok"] or time.monotonic() > deadline:
                return result
            time.sleep(1)
    finally:
        store.close()


def _check_once(store: SQLStore, keys: dict[str, Key], tally: Tally) -> dict[str, Any]:
    result: dict[str, Any] = {"ok": True}
    for name, key in keys.items():
        rows = store.usage_report(key_id=key.id, group_by=())
        records = rows[0]["requests"] if rows else 0
        cost = rows[0]["cost"] if rows else Decimal(0)
        record = store.key_by_id(key.id)
        balance = record.credits if record is not None else None
        exact = balance is not None and balance == key.credits - cost and balance >= 0
        result[name] = {
            "admitted": tally.admitted[name],
            "records": records,
            "cost": str(cost),
            "balance": str(balance),
            "balance_exact": exact,
        }
        result["ok"] = result["ok"] and exact and records == tally.admitted[name]
    return result


# -- memory --------------------------------------------------------------------------------


def _label(name: str, cmdline: list[str]) -> str:
    """Ray's process title, or for a Python process the script it runs (Ray's dashboard,
    log monitor, ...), or the program's name; the same for a process in every sample."""
    if cmdline and cmdline[0].startswith("ray::"):
        title = cmdline[0].split(" ")[0]
        # An actor's title names the method it runs (`ray::ServeController.listen_for_change`);
        # a Serve replica's names its application and deployment, which may hold dots.
        return title if title.startswith("ray::ServeReplica:") else title.split(".")[0]
    if name.startswith("python"):
        script = next((arg for arg in cmdline[1:] if arg.endswith(".py")), None)
        return f"python {Path(script).name}" if script else name
    return name


def process_memory(root_pid: int) -> dict[str, int]:
    """Resident memory (bytes) of the process and every descendant, by label: Ray's process
    title (``ray::ServeReplica:app:deployment``) or the program's name, with the pid."""
    root = psutil.Process(root_pid)
    memory = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            cmdline = proc.cmdline()
            memory[f"{_label(proc.name(), cmdline)} [{proc.pid}]"] = proc.memory_info().rss
        except psutil.Error:
            continue
    return memory


def growth(warm: dict[str, int], end: dict[str, int]) -> list[dict[str, Any]]:
    """Each process alive at both points: its memory then and now (MiB) and its growth."""
    rows = []
    for label in sorted(warm.keys() & end.keys()):
        pct = 100 * (end[label] - warm[label]) / max(1, warm[label])
        rows.append(
            {"process": label, "warm_mib": warm[label] >> 20, "end_mib": end[label] >> 20, "growth_pct": round(pct, 2)}
        )
    return sorted(rows, key=lambda row: -row["growth_pct"])


def timeline(samples: list[tuple[float, dict[str, int]]], every_s: float) -> dict[str, list[int]]:
    """Each process's memory (MiB) at the samples nearest to every ``every_s`` from the
    first, to tell growth that levels off from growth that goes on."""
    start, picked, due = samples[0][0], [], 0.0
    for at, memory in samples:
        if at - start >= due:
            picked.append(memory)
            due += every_s
    if picked[-1] is not samples[-1][1]:
        picked.append(samples[-1][1])
    return {label: [memory.get(label, 0) >> 20 for memory in picked] for label in sorted(samples[-1][1])}


async def watch_memory(pid: int, samples: list[tuple[float, dict[str, int]]], every_s: float) -> None:
    """Samples the process tree's memory every ``every_s`` until cancelled."""
    while True:
        samples.append((time.monotonic(), process_memory(pid)))
        await asyncio.sleep(every_s)


# -- the run --------------------------------------------------------------------------------


def _serve(work: Path, database_url: str) -> tuple[subprocess.Popen[bytes], str]:
    catalog = work / "soak-catalog.yaml"
    entry = {
        "name": "tiny",
        "source": {"kind": "local", "path": str(build_tiny_llama(work / "tiny"))},
        "context_window": 512,
        "engine_args": {"dtype": "float32", "enforce_eager": True, "max_num_seqs": 16},
        "pricing": {"input_per_million": "1", "output_per_million": "2"},
        "resources": {"device": "cpu", "cpus": 1},
    }
    catalog.write_text(yaml.safe_dump(entry))
    port = free_port()
    env = {**os.environ, "ORCH_ADMIN_KEY": ADMIN_KEY, "ORCH_DATABASE_URL": database_url, "ORCH_KV_CACHE_GB": "1"}
    cmd = [str(BIN / "orchestrator"), "serve", "--catalog", str(catalog), "--host", "127.0.0.1", "--port", str(port)]
    log = (work / "serve.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    wait_ready(base_url + "/health", proc)
    return proc, base_url


async def _load_and_watch(
    proc: subprocess.Popen[bytes], base_url: str, keys: dict[str, Key], args: argparse.Namespace
) -> tuple[Tally, list[tuple[float, dict[str, int]]]]:
    samples: list[tuple[float, dict[str, int]]] = []
    watcher = asyncio.create_task(watch_memory(proc.pid, samples, args.sample_s))
    try:
        tally = await mix(
            base_url, keys, "tiny", duration_s=60 * args.minutes, concurrency=args.concurrency, seed=args.seed
        )
    finally:
        watcher.cancel()
    samples.append((time.monotonic(), process_memory(proc.pid)))
    return tally, samples


def report(
    tally: Tally, checks: dict[str, Any], samples: list[tuple[float, dict[str, int]]], args: argparse.Namespace
) -> dict[str, Any]:
    start = samples[0][0]
    warm = next((mem for at, mem in samples if at - start >= 60 * args.warmup_minutes), samples[-1][1])
    rows = growth(warm, samples[-1][1])
    print(f"{'process':<60} {'warm MiB':>9} {'end MiB':>8} {'growth':>8}")
    for row in rows:
        print(f"{row['process']:<60} {row['warm_mib']:>9} {row['end_mib']:>8} {row['growth_pct']:>7.2f}%")
    max_growth = max((row["growth_pct"] for row in rows), default=0.0)
    ok = not tally.server_errors and checks["ok"] and max_growth <= args.max_growth_pct
    return {
        "minutes": args.minutes,
        "requests": tally.requests,
        "server_errors": len(tally.server_errors),
        "first_errors": tally.server_errors[:5],
        "outcomes": dict(sorted(tally.outcomes.items())),
        "checks": checks,
        "memory": {
            "max_growth_pct": max_growth,
            "processes": rows,
            "every_5_min_mib": timeline(samples, 300),
        },
        "ok": ok,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--warmup-minutes", type=float, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--sample-s", type=float, default=20)
    parser.add_argument("--max-growth-pct", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from tests.postgres import running_postgres

    with tempfile.TemporaryDirectory(prefix="orch-soak-") as tmp, running_postgres(Path(tmp)) as postgres:
        work = Path(tmp)
        proc, base_url = _serve(work, postgres.url)
        try:
            keys = create_keys(base_url, ADMIN_KEY)
            print(f"serving at {base_url}; load for {args.minutes} min with {args.concurrency} clients", flush=True)
            tally, samples = asyncio.run(_load_and_watch(proc, base_url, keys, args))
            checks = check(postgres.url, keys, tally)
        finally:
            stop(proc)
        result = report(tally, checks, samples, args)
    print(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
