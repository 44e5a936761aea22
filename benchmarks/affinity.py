"""Affinity (orchestrator/ingress.py) against Serve's default balancing, one model with two
replicas, one sitting.

    .venv/bin/python benchmarks/affinity.py [--model smollm2|tiny] [--groups 48]
        [--per-group 3] [--prefix-words 400] [--turns 3] [--cache-fraction 0.75]
        [--concurrency 4]

Starts ``orchestrator serve`` (open mode, on the router's ``/v1``) twice with the same
catalog, a model at two replicas whose engines each get a KV cache
(``kv_cache_memory_bytes``, from the tokenizer's count and the model's shape) of
``--cache-fraction`` of the tokens of all the system prompts below (plus ``--tails-share`` of
what the conversations add to them, none by default: vLLM's LRU evicts those first): first with affinity, then with
``ORCH_INGRESS_AFFINITY=0`` (Serve's ``leastconn``). Against each it runs:

* shared prefix: ``--groups`` long system prompts (``--prefix-words`` words, more than the
  affinity key's 1,024 bytes, so the key is the system prompt), each shared by
  ``--per-group`` conversations of ``--turns`` turns, every turn resending all before it,
  ``--concurrency`` requests at a time over all of them; 4 tokens out. A group's
  conversations are listed together, so their turns come in bursts, and every other group's
  burst comes between two of one group's. With affinity a replica keeps its own groups' system
  prompts (half of them, which its cache holds); under Serve's balancing a burst reaches both
  replicas, so each would have to keep nearly all of them, more than its cache holds, and a
  burst's first request on each replica finds its prompt evicted. Figures: TTFT p50 of the
  turns after the first of each conversation, and the cached fraction of their prompt tokens
  (``usage.prompt_tokens_details.cached_tokens``).
* no prefix: ``--no-prefix-requests`` requests whose prompts all differ from their first
  word, ``--no-prefix-concurrency`` at a time, 16 tokens out: output tokens per second.
* slowed: one replica's engine processes share a core with a busy loop (the other's get the
  other core), and ``--slowed-requests`` requests of one session (affinity's worst case: one
  key), ``--no-prefix-concurrency`` at a time, go out. Figures: each replica's share of the
  requests and the largest share of the requests in flight one replica held when one of its
  answers began (the client's count). Affinity's bound is HASH_BALANCE_FACTOR per cent of the
  mean.

Prints each side's figures, then, as the last line, a JSON object: ``shared_prefix``
(``ttft_p50_ratio``: default over affinity, ``cached_fraction_default``,
``cached_fraction_affinity``), ``no_prefix`` (``throughput_ratio``: affinity over default),
``slowed`` (each side's shares and the bound) and every side's figures under ``sides``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from benchmarks.load import percentile
from orchestrator.ingress import AFFINITY_ENV, HASH_BALANCE_FACTOR

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
WORDS = [
    "time",
    "year",
    "people",
    "way",
    "day",
    "man",
    "thing",
    "woman",
    "life",
    "child",
    "world",
    "school",
    "state",
    "family",
    "student",
    "group",
    "country",
    "problem",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "company",
    "system",
    "program",
    "question",
    "work",
    "government",
    "number",
    "night",
    "point",
    "home",
    "water",
    "room",
    "mother",
    "area",
    "money",
    "story",
    "fact",
    "month",
    "lot",
    "right",
    "study",
    "book",
    "eye",
    "job",
    "word",
    "business",
    "issue",
    "side",
    "kind",
    "head",
    "house",
    "service",
    "friend",
    "father",
    "power",
    "hour",
    "game",
    "line",
    "end",
    "member",
    "law",
    "car",
    "city",
    "community",
    "name",
]
MODEL_NAME = "bench"


@dataclass
class Turn:
    """One answered request: its time to first token, prompt tokens, cached prompt tokens,
    output tokens, the replica that answered, and when (monotonic) its answer began and ended."""

    ttft_s: float
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    replica: str
    began: float = 0.0
    ended: float = 0.0
    turn: int = 0


@dataclass
class Side:
    """One server's figures: each load's answered requests and wall time."""

    shared: list[Turn] = field(default_factory=list)
    no_prefix: list[Turn] = field(default_factory=list)
    no_prefix_wall_s: float = 0.0
    slowed: list[Turn] = field(default_factory=list)
    slowed_replica: str = ""
    errors: list[str] = field(default_factory=list)


def side_figures(side: Side) -> dict[str, Any]:
    """The figures of one side: shared-prefix TTFT p50 and cached fraction of the turns after
    the first, no-prefix output tokens per second, the slowed load's shares."""
    later = [t for t in side.shared if t.turn > 0]
    prompt = sum(t.prompt_tokens for t in later)
    shares = Counter(t.replica for t in side.slowed)
    return {
        "shared_ttft_p50_ms": round(1000 * percentile([t.ttft_s for t in later], 0.5), 1),
        "shared_first_turn_ttft_p50_ms": round(
            1000 * percentile([t.ttft_s for t in side.shared if t.turn == 0], 0.5), 1
        ),
        "shared_cached_fraction": round(sum(t.cached_tokens for t in later) / prompt, 3) if prompt else 0.0,
        "shared_requests": len(side.shared),
        "shared_by_replica": dict(Counter(t.replica for t in side.shared)),
        "no_prefix_tokens_per_s": round(sum(t.output_tokens for t in side.no_prefix) / side.no_prefix_wall_s, 1)
        if side.no_prefix_wall_s
        else 0.0,
        "no_prefix_by_replica": dict(Counter(t.replica for t in side.no_prefix)),
        "slowed_request_share": round(shares[side.slowed_replica] / len(side.slowed), 3) if side.slowed else 0.0,
        "slowed_max_inflight_share": round(max_inflight_share(side.slowed), 3),
        "errors": len(side.errors),
    }


def summary(affinity: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
    """The last line: the two sides compared, and each side's figures."""

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 3) if b else None

    return {
        "shared_prefix": {
            "ttft_p50_ratio": ratio(default["shared_ttft_p50_ms"], affinity["shared_ttft_p50_ms"]),
            "cached_fraction_default": default["shared_cached_fraction"],
            "cached_fraction_affinity": affinity["shared_cached_fraction"],
        },
        "no_prefix": {"throughput_ratio": ratio(affinity["no_prefix_tokens_per_s"], default["no_prefix_tokens_per_s"])},
        "slowed": {
            "bound_share": HASH_BALANCE_FACTOR / 100 / 2,
            "affinity_max_inflight_share": affinity["slowed_max_inflight_share"],
            "affinity_request_share": affinity["slowed_request_share"],
            "default_max_inflight_share": default["slowed_max_inflight_share"],
            "default_request_share": default["slowed_request_share"],
        },
        "sides": {"affinity": affinity, "default": default},
    }


# --- prompts -------------------------------------------------------------------------------


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def system_prompts(groups: int, prefix_words: int, seed: int = 1) -> list[str]:
    """A long system prompt per group; each starts with words of its own."""
    rng = random.Random(seed)
    return [f"Group {g}. " + words(rng, prefix_words) for g in range(groups)]


def conversation_messages(system: str, turn: int, answers: list[str], number: int = 0) -> list[dict[str, str]]:
    """Conversation ``number``'s messages at ``turn``: its system prompt, every turn before it
    with its answer, and this turn's question (each conversation's questions its own)."""
    messages = [{"role": "system", "content": system}]
    for before in range(turn):
        messages += [
            {"role": "user", "content": f"Conversation {number}, question {before}: what comes next?"},
            {"role": "assistant", "content": answers[before]},
        ]
    return [*messages, {"role": "user", "content": f"Conversation {number}, question {turn}: what comes next?"}]


def conversations(args: argparse.Namespace) -> list[tuple[str, int]]:
    """The shared-prefix load's conversations as (system prompt, number), a group's together."""
    prompts = system_prompts(args.groups, args.prefix_words)
    return [(prompts[g], g * args.per_group + k) for g in range(args.groups) for k in range(args.per_group)]


# --- one request ---------------------------------------------------------------------------


async def ask(
    client: httpx.AsyncClient, messages: list[dict[str, str]], max_tokens: int, headers: dict[str, str] | None = None
) -> tuple[Turn, str]:
    """Streams one chat completion on /v1; returns its figures and its text."""
    body = {
        "model": MODEL_NAME,
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "temperature": 0,
    }
    start = time.perf_counter()
    ttft, text, usage = None, "", dict[str, Any]()
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers or {}) as resp:
        began = time.monotonic()
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
        replica = resp.headers.get("x-orch-replica", "?")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("choices") and data["choices"][0].get("delta", {}).get("content"):
                ttft = ttft if ttft is not None else time.perf_counter() - start
                text += data["choices"][0]["delta"]["content"]
            usage = data.get("usage") or usage
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    tokens = usage.get("completion_tokens", 0)
    turn = Turn(ttft or float("nan"), usage.get("prompt_tokens", 0), cached, tokens, replica, began, time.monotonic())
    return turn, text


# --- the loads -----------------------------------------------------------------------------


async def shared_prefix_load(client: httpx.AsyncClient, args: argparse.Namespace, side: Side) -> None:
    """Every group's conversation, turn after turn, ``concurrency`` requests at a time."""
    gate = asyncio.Semaphore(args.concurrency)

    async def converse(system: str, number: int) -> None:
        answers: list[str] = []
        for turn in range(args.turns):
            async with gate:
                try:
                    done, text = await ask(client, conversation_messages(system, turn, answers, number), 4)
                except Exception as exc:  # counted, and the conversation goes on
                    side.errors.append(f"shared: {exc}"[:300])
                    text = "ok"
                else:
                    done.turn = turn
                    side.shared.append(done)
            answers.append(text or "ok")

    await asyncio.gather(*(converse(system, number) for system, number in conversations(args)))


async def no_prefix_load(client: httpx.AsyncClient, args: argparse.Namespace, side: Side) -> None:
    """Prompts that differ from their first word, ``no_prefix_concurrency`` at a time."""
    rng = random.Random(7)
    prompts = [f"{i} {words(rng, 60)}" for i in range(args.no_prefix_requests)]
    gate = asyncio.Semaphore(args.no_prefix_concurrency)

    async def one(prompt: str) -> None:
        async with gate:
            try:
                side.no_prefix.append((await ask(client, [{"role": "user", "content": prompt}], 16))[0])
            except Exception as exc:
                side.errors.append(f"no prefix: {exc}"[:300])

    start = time.monotonic()
    await asyncio.gather(*(one(p) for p in prompts))
    side.no_prefix_wall_s = time.monotonic() - start


def max_inflight_share(turns: list[Turn]) -> float:
    """The largest share of the requests in flight (from their answer's start to its end)
    that one replica held when one of its answers began, counting only moments with at least
    two in flight."""
    largest = 0.0
    for turn in turns:
        around = [u for u in turns if u.began <= turn.began < u.ended]
        if len(around) >= 2:
            largest = max(largest, sum(u.replica == turn.replica for u in around) / len(around))
    return largest


# --- the server ----------------------------------------------------------------------------


def catalog_entry(args: argparse.Namespace, work: Path, kv_bytes: int) -> dict[str, Any]:
    """The benchmark's model at two replicas, with a KV cache of ``kv_bytes`` per engine."""
    if args.model == "tiny":
        from orchestrator.engine.weights import build_tiny_llama

        source: dict[str, Any] = {"kind": "local", "path": str(build_tiny_llama(work / "tiny", seed=3))}
    else:
        source = yaml.safe_load((REPO / "catalog" / "smollm2-135m-instruct.yaml").read_text())["source"]
    return {
        "name": MODEL_NAME,
        "source": source,
        "context_window": args.context_window,
        "engine_args": {
            "dtype": "float32",
            "enforce_eager": True,
            "max_num_seqs": 16,
            "kv_cache_memory_bytes": kv_bytes,
            "enable_prefix_caching": True,
        },
        "resources": {"device": "cpu", "cpus": 0.5},
        "autoscaling": {"min_replicas": 2, "max_replicas": 2},
    }


def model_dir(args: argparse.Namespace, work: Path) -> Path:
    """The prepared weights' folder (tokenizer and config)."""
    from orchestrator.catalog import ModelSpec
    from orchestrator.engine.weights import prepare_weights
    from orchestrator.settings import Settings

    spec = ModelSpec.model_validate(catalog_entry(args, work, 1))
    return Path(prepare_weights(spec.source, Settings().cache_dir))


def kv_cache_bytes(args: argparse.Namespace, folder: Path) -> tuple[int, int]:
    """Returns (the KV cache bytes per engine, the tokens of all the system prompts):
    ``cache_fraction`` of those tokens plus ``tails_share`` of what every conversation adds to
    its system prompt by its last turn (the tails: each is used once a turn, so vLLM's LRU
    evicts them before the system prompts, which come back with every burst), at the model's
    bytes per token (float32 keys and values of every layer)."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = AutoConfig.from_pretrained(folder)

    def tokens(messages: list[dict[str, str]]) -> int:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    answers = ["word " * 4] * args.turns
    system = {s: tokens([{"role": "system", "content": s}]) for s in system_prompts(args.groups, args.prefix_words)}
    tails = sum(
        tokens(conversation_messages(s, args.turns - 1, answers, n)) - system[s] for s, n in conversations(args)
    )
    kv_tokens = args.cache_fraction * sum(system.values()) + args.tails_share * tails
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4
    return int(kv_tokens * per_token), sum(system.values())


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    gcs: str
    env: dict[str, str]


def start_server(catalog: Path, env: dict[str, str], log: Path) -> Server:
    """Starts ``orchestrator serve`` and returns it once it serves."""
    port = str(_free_port())
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "orchestrator"), "serve", "--catalog", str(catalog), "--port", port,
             "--metrics-port", str(_free_port())],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None:
        text = log.read_text(errors="replace")
        if "Press Ctrl-C" in text:
            gcs = re.search(r"Ray cluster at (\S+):", text)
            return Server(proc, int(port), gcs.group(1) if gcs else "", env)
        time.sleep(2)
    stop_server(proc)
    raise RuntimeError(f"orchestrator serve did not start; see {log}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    left = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for process in left:
        if process.is_running():
            process.kill()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_REPLICA_PIDS = """
import json, sys
from orchestrator.serving.cluster import RayCluster
RayCluster().connect(sys.argv[1])  # as `orchestrator status` connects (loopback, the token)
from ray.serve.context import _get_global_client
apps = _get_global_client().get_serve_details()["applications"]
print(json.dumps({r["replica_id"]: r["pid"] for a in apps.values() for d in a["deployments"].values()
                  if d["name"] == "model-bench" for r in d["replicas"] if r["state"] == "RUNNING"}))
"""


def replica_pids(server: Server) -> dict[str, int]:
    """Each running replica of the model: its worker's process id, by replica id."""
    done = subprocess.run(
        [sys.executable, "-c", _REPLICA_PIDS, server.gcs], env=server.env, capture_output=True, text=True, check=True
    )
    return {k: int(v) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


@contextmanager
def slowed(server: Server, replica: str) -> Iterator[None]:
    """Puts ``replica``'s processes and a busy loop on core 0, the other replica's on core 1."""
    pids = replica_pids(server)
    cores = {r: ({0} if r == replica else {1}) for r in pids}
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    os.sched_setaffinity(hog.pid, {0})
    trees = {r: [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)] for r, pid in pids.items()}
    try:
        for r, processes in trees.items():
            for process in processes:
                os.sched_setaffinity(process.pid, cores[r])
        yield
    finally:
        hog.kill()
        hog.wait()
        every = set(range(os.cpu_count() or 1))
        for processes in trees.values():
            for process in processes:
                if process.is_running():
                    os.sched_setaffinity(process.pid, every)


async def run_loads(server: Server, args: argparse.Namespace) -> Side:
    side = Side()
    start = time.monotonic()

    def done(phase: str) -> None:
        print(f"  {phase} done at {time.monotonic() - start:.0f} s", flush=True)

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=600) as client:
        await ask(client, [{"role": "user", "content": "warm up"}], 2)
        await shared_prefix_load(client, args, side)
        done("shared prefix")
        await no_prefix_load(client, args, side)
        done("no prefix")
        if args.slowed_requests:
            hot, _ = await ask(client, [{"role": "user", "content": "where?"}], 2, {"x-session-id": "hot"})
            side.slowed_replica = hot.replica
            try:
                with slowed(server, hot.replica):
                    await slowed_load(client, args, side)
            except (OSError, subprocess.SubprocessError, psutil.Error) as exc:
                side.errors.append(f"slowed: could not slow a replica: {exc}"[:300])
            done("slowed")
    return side


async def slowed_load(client: httpx.AsyncClient, args: argparse.Namespace, side: Side) -> None:
    """One session's requests (one key), ``no_prefix_concurrency`` at a time."""
    gate = asyncio.Semaphore(args.no_prefix_concurrency)

    async def one(i: int) -> None:
        async with gate:
            body = [{"role": "user", "content": f"Tell me {i}."}]
            try:
                side.slowed.append((await ask(client, body, 16, {"x-session-id": "hot"}))[0])
            except Exception as exc:
                side.errors.append(f"slowed: {exc}"[:300])

    await asyncio.gather(*(one(i) for i in range(args.slowed_requests)))


def haproxy_has_affinity(server: Server) -> bool:
    """Whether the config the server's HAProxy runs balances by affinity."""
    for process in psutil.Process(server.proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if process.name() == "haproxy":
                command = process.cmdline()
                return "balance hash var(txn.orch_key)" in Path(command[command.index("-f") + 1]).read_text()
    raise RuntimeError("no HAProxy under orchestrator serve")


def run_side(args: argparse.Namespace, catalog: Path, work: Path, affinity: bool) -> dict[str, Any]:
    from orchestrator.settings import Settings

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "ORCH_", "VLLM_CPU_KVCACHE"))}
    env |= {"HOME": str(work / "home"), "RAY_USAGE_STATS_ENABLED": "0", "ORCH_OPEN_ACCESS": "true"}
    env["ORCH_CACHE_DIR"] = str(Settings().cache_dir)  # the prepared weights, whatever HOME is
    env["ORCH_DATABASE_URL"] = f"sqlite:///{work / f'gateway-{int(affinity)}.db'}"  # not the cache's
    if not affinity:
        env[AFFINITY_ENV] = "0"
    name = "affinity" if affinity else "default"
    print(f"{name}: starting orchestrator serve", flush=True)
    server = start_server(catalog, env, work / f"serve-{name}.log")
    try:
        if haproxy_has_affinity(server) != affinity:
            raise RuntimeError(f"HAProxy's config does not match the {name} side")
        side = asyncio.run(run_loads(server, args))
    finally:
        stop_server(server.proc)
    figures = side_figures(side)
    print(f"{name}: {json.dumps(figures)}", flush=True)
    for error in side.errors[:5]:
        print(f"  {name} error: {error}", flush=True)
    return figures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--groups", type=int, default=48, help="system prompts, each shared by --per-group")
    parser.add_argument("--per-group", type=int, default=3, help="conversations that share a system prompt")
    parser.add_argument("--prefix-words", type=int, default=400, help="words of each system prompt")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument(
        "--tails-share", type=float, default=0.0, help="KV cache per engine over the conversations' own tokens, added"
    )
    parser.add_argument(
        "--cache-fraction", type=float, default=0.75, help="KV cache per engine over all the system prompts' tokens"
    )
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--no-prefix-requests", type=int, default=32)
    parser.add_argument("--no-prefix-concurrency", type=int, default=8)
    parser.add_argument("--slowed-requests", type=int, default=24)
    parser.add_argument("--context-window", type=int, default=2048)
    parser.add_argument("--work", type=Path, default=None, help="where logs go (default: a temporary folder)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="affinity-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    kv_bytes, tokens = kv_cache_bytes(args, model_dir(args, work))
    print(f"system prompts: {tokens} tokens in all; KV cache per engine: {kv_bytes} bytes", flush=True)
    catalog = work / "catalog.yaml"
    catalog.write_text(yaml.safe_dump(catalog_entry(args, work, kv_bytes)))
    affinity = run_side(args, catalog, work, affinity=True)
    default = run_side(args, catalog, work, affinity=False)
    print(json.dumps(summary(affinity, default)), flush=True)


if __name__ == "__main__":
    main()
