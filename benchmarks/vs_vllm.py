"""Orchestrator vs vLLM's own OpenAI server, same tiny model, same load, one run.

    .venv/bin/python benchmarks/vs_vllm.py [--requests 300] [--concurrency 32]

Starts vLLM's OpenAI server on a tiny random-weight model, drives it with streaming
completions (64-token prompts, 64 output tokens), stops it; then does the same through
the orchestrator (`orchestrator serve` with a one-model catalog). Prints both and, as the
last line, a JSON object with `throughput_ratio` and `ttft_p50_added_ms`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.load import LoadResult, run_load
from orchestrator.engine.weights import build_tiny_llama

BIN = Path(sys.executable).parent
MAX_NUM_SEQS = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(url)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def tree_cpu_s(pid: int) -> float:
    """CPU seconds used so far by a process and all its descendants (Ray and vLLM workers
    are descendants of the server process we start)."""
    total = 0.0
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            continue
    return total


def measure(base_url: str, model: str, args: argparse.Namespace, pid: int) -> LoadResult:
    prompt = [(7 * i) % 400 + 10 for i in range(args.prompt_tokens)]
    common = {"prompt": prompt, "output_tokens": args.output_tokens, "concurrency": args.concurrency}
    asyncio.run(run_load(base_url, model, requests=max(8, args.concurrency), **common))  # warm-up
    before = tree_cpu_s(pid)
    result = asyncio.run(run_load(base_url, model, requests=args.requests, **common))
    # Server CPU per request varies far less than throughput on a shared machine.
    result.server_cpu_s = tree_cpu_s(pid) - before
    return result


def serve_and_measure(
    cmd: list[str], env: dict[str, str], port: int, ready_path: str, args: argparse.Namespace, log: Path
) -> LoadResult:
    """Starts a server, waits until ``ready_path`` answers 200, measures it, stops it."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            wait_ready(f"http://127.0.0.1:{port}{ready_path}", proc)
            return measure(f"http://127.0.0.1:{port}", "tiny", args, proc.pid)
        finally:
            stop(proc)


def run_direct(model_dir: Path, args: argparse.Namespace, log: Path) -> LoadResult:
    port = free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", "tiny", "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
        "--max-num-seqs", str(MAX_NUM_SEQS), "--host", "127.0.0.1", "--port", str(port),
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    return serve_and_measure(cmd, env, port, "/v1/models", args, log)


def run_orchestrator(model_dir: Path, args: argparse.Namespace, work: Path, log: Path) -> LoadResult:
    port = free_port()
    catalog = work / "bench-catalog.yaml"
    entry = {
        "name": "tiny",
        "source": {"kind": "local", "path": str(model_dir)},
        "context_window": 1024,
        "engine_args": {"dtype": "float32", "enforce_eager": True, "max_num_seqs": MAX_NUM_SEQS},
        "resources": {"device": "cpu", "cpus": 1},
    }
    catalog.write_text(yaml.safe_dump(entry))
    cmd = [str(BIN / "orchestrator"), "serve", "--catalog", str(catalog), "--port", str(port)]
    env = {**os.environ, "ORCH_KV_CACHE_GB": "1"}
    for pair in args.orch_env:
        key, _, value = pair.partition("=")
        env[key] = value
    return serve_and_measure(cmd, env, port, "/health", args, log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--only", choices=["direct", "orchestrator"], default=None)
    parser.add_argument("--orch-env", action="append", default=[], help="KEY=VALUE for the orchestrator run")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="orch-bench-") as tmp:
        work = Path(tmp)
        model_dir = build_tiny_llama(work / "tiny", seed=0)
        results: dict[str, LoadResult] = {}
        if args.only in (None, "direct"):
            print("== vLLM OpenAI server (direct) ...", flush=True)
            results["direct"] = run_direct(model_dir, args, work / "direct.log")
            print(json.dumps(results["direct"].summary()), flush=True)
        if args.only in (None, "orchestrator"):
            print("== orchestrator (Ray Serve router -> ModelServer -> vLLM) ...", flush=True)
            results["orchestrator"] = run_orchestrator(model_dir, args, work, work / "orch.log")
            print(json.dumps(results["orchestrator"].summary()), flush=True)

    print()
    print(f"{'':14}{'req/s':>8}{'out tok/s':>11}{'TTFT p50':>10}{'TTFT p99':>10}{'CPU/req':>10}{'errors':>8}")
    for name, r in results.items():
        print(
            f"{name:14}{r.rps:8.2f}{r.tokens_per_s:11.1f}{r.ttft_ms(0.5):9.1f}ms{r.ttft_ms(0.99):8.1f}ms"
            f"{r.cpu_ms_per_request:8.1f}ms{r.errors:8d}"
        )
    final: dict[str, object] = {name: r.summary() for name, r in results.items()}
    if len(results) == 2:
        d, o = results["direct"], results["orchestrator"]
        final["throughput_ratio"] = round(o.tokens_per_s / d.tokens_per_s, 3)
        final["ttft_p50_added_ms"] = round(o.ttft_ms(0.5) - d.ttft_ms(0.5), 1)
        final["server_cpu_ratio"] = round(o.cpu_ms_per_request / d.cpu_ms_per_request, 3)
    print(json.dumps(final))


if __name__ == "__main__":
    main()
