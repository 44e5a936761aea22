"""Orchestrator vs vLLM's own OpenAI server, same tiny model, same load, one sitting.

    .venv/bin/python benchmarks/vs_vllm.py [--runs 3] [--requests 300] [--concurrency 32]
        [--c1-requests 40] [--overload N] [--modes direct floor open gateway] [--route model router]

Each run starts vLLM's OpenAI server on a tiny random-weight model, drives it with streaming
completions (64-token prompts, 64 output tokens) at ``--concurrency`` and then one at a
time, and stops it; then does the same through the orchestrator (``orchestrator serve``
with a one-model catalog; by default on the model's own route, ``/models/tiny/v1``, with
``--route router`` on the router's ``/v1``, with ``--route model router`` on both, one after the
other against the same server), in open mode and with the gateway on (an admin key, a SQLite
ledger, and a key whose RPM, TPM and credit limits are checked on every request and never
reached). Server CPU is the CPU time of the server's whole process tree. The ``floor`` mode
(not run unless named) is vLLM's own server app in one Ray Serve replica, started as
``orchestrator serve`` starts Ray (``serve_floor.py``): Ray Serve's cost with none of the
orchestrator's code.

Prints each measurement, then, as the last line, a JSON object: the median over the runs of
each figure of the gateway mode at the top level (``throughput_ratio``,
``ttft_p50_added_ms``, ``ttft_p99_ratio``, ``itl_p50_ms``, ``itl_p99_ms``,
``itl_p99_ratio``, ``cpu_per_request_ratio``, the same at concurrency 1 under ``c1``, and
with ``--overload N`` at N x max_num_seqs streams under ``overload``, with the fraction of
requests shed with 529),
open mode's under ``open``, the floor's under ``floor``, direct's own figures under ``direct``, and every run's under
``runs``. Ratios are orchestrator over direct within the same run. With two routes, the
top-level figures are the first route's, each route's are under ``routes`` (by mode), and
``router_over_model`` (by mode) holds the router's route against the model's from the same
server: ``throughput_ratio``, ``ttft_p50_added_ms`` (the router's TTFT p50 less the model's),
``ttft_p50_added_ratio`` (each route's TTFT p50 added to vLLM's, router over model),
``itl_p99_ratio`` and the router's ``itl_p50_ms``, the same at concurrency 1 under ``c1``. Inter-token latency is
the gap between chunks with content, as vLLM's benchmark measures it. For the orchestrator,
the summaries of the first two loads also split the time to first token with means read from
its metrics export: ``replica_ttft_ms_mean`` (from the request's arrival at the model's
replica), ``engine_ttft_ms_mean`` (vLLM's, from its arrival at the engine) and, with the
gateway, ``admit_ms_mean`` (the wait for the ledger's admission); the client's
``ttft_mean_ms`` less the replica's is the ingress (HAProxy, Serve) and the network.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.load import LoadResult, run_load, unrefused_key
from orchestrator.engine.weights import build_tiny_llama
from orchestrator.metrics import GATEWAY_CALL_SECONDS, TTFT
from orchestrator.status.exposition import exported_name, parse_samples

BIN = Path(sys.executable).parent
MAX_NUM_SEQS = 64
MODES = ("direct", "floor", "open", "gateway")
DEFAULT_MODES = ("direct", "open", "gateway")
ADMIN_KEY = "bench-admin-" + secrets.token_hex(16)


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


@dataclass
class Measured:
    """One server's figures: under ``--concurrency`` streams, one stream at a time, and (if
    asked) at ``--overload`` times the streams the engine runs at once."""

    load: LoadResult
    c1: LoadResult
    overload: LoadResult | None = None


# Server-side means per request, from the orchestrator's metrics export: name in the output ->
# (exported histogram, labels a sample must carry). Admission only with the gateway on.
REPLICA_TTFT = ("replica_ttft_ms_mean", (exported_name(TTFT), {}))
ENGINE_TTFT = ("engine_ttft_ms_mean", ("ray_vllm_time_to_first_token_seconds", {}))
ADMIT = ("admit_ms_mean", (exported_name(GATEWAY_CALL_SECONDS), {"method": "admit"}))


class ServerTimes:
    """Reads per-request histograms from the server's metrics export (Prometheus text), so a
    load's client TTFT can be split: the replica's own TTFT (from the request's arrival at the
    model's replica), vLLM's engine TTFT (from the request's arrival at the engine) and, with
    the gateway, the admission wait."""

    def __init__(self, metrics_url: str, series: dict[str, tuple[str, dict[str, str]]], timeout_s: float = 60.0):
        self.url = metrics_url
        self.series = series
        self.timeout_s = timeout_s
        self.expected = 0  # requests that reached the app so far (each observes every series once)

    def totals(self) -> dict[str, tuple[float, int]]:
        """Each series' (seconds, observations) once the export counts every request so far:
        Ray's export lags the replicas by seconds. Past ``timeout_s``, what it has."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            samples = parse_samples(httpx.get(self.url, timeout=10).text, prefix="ray_")
            found = {}
            for name, (metric, labels) in self.series.items():
                mine = [s for s in samples if labels.items() <= s.labels.items()]
                seconds = sum(s.value for s in mine if s.name == f"{metric}_sum")
                found[name] = (seconds, int(sum(s.value for s in mine if s.name == f"{metric}_count")))
            if all(count >= self.expected for _, count in found.values()) or time.monotonic() > deadline:
                return found
            time.sleep(1)


def _timed(base_url: str, headers: dict[str, str], pid: int, requests: int, concurrency: int, prompt: list[int],
           output_tokens: int, times: ServerTimes | None = None) -> LoadResult:  # fmt: skip
    before_times = times.totals() if times else {}
    before = tree_cpu_s(pid)
    result = asyncio.run(
        run_load(base_url, "tiny", prompt=prompt, output_tokens=output_tokens, requests=requests,
                 concurrency=concurrency, headers=headers)
    )  # fmt: skip
    # Server CPU per request varies far less than throughput on a shared machine.
    result.server_cpu_s = tree_cpu_s(pid) - before
    if times:
        times.expected += result.requests + result.errors
        for name, (seconds, count) in times.totals().items():
            seconds_before, count_before = before_times[name]
            result.server_ms[name] = 1000 * (seconds - seconds_before) / max(1, count - count_before)
    return result


def measure(
    base_url: str, headers: dict[str, str], args: argparse.Namespace, pid: int, times: ServerTimes | None = None
) -> Measured:
    """Warms the server up, then runs the loads. With ``times`` (the orchestrator), each of
    the first two loads also gets the server-side means it reads."""
    prompt = [(7 * i) % 400 + 10 for i in range(args.prompt_tokens)]
    shape = {"prompt": prompt, "output_tokens": args.output_tokens}
    warm = asyncio.run(run_load(base_url, "tiny", requests=max(8, args.concurrency), concurrency=args.concurrency,
                                headers=headers, **shape))  # fmt: skip
    if times:  # every load so far, on this route and any measured before it
        times.expected += warm.requests + warm.errors
    load = _timed(base_url, headers, pid, args.requests, args.concurrency, **shape, times=times)
    c1 = _timed(base_url, headers, pid, args.c1_requests, 1, **shape, times=times)
    overload = None
    if args.overload:
        streams = args.overload * MAX_NUM_SEQS
        overload = _timed(base_url, headers, pid, 2 * streams, streams, **shape)
    return Measured(load, c1, overload)


Prepare = Callable[[str], dict[str, str]]  # base URL -> the request headers to send
# base URL, request headers, arguments, server pid -> what was measured
Measure = Callable[[str, dict[str, str], argparse.Namespace, int], Any]


def serve_and_measure(
    cmd: list[str], env: dict[str, str], port: int, ready_path: str, args: argparse.Namespace, log: Path,
    prepare: Prepare = lambda _: {}, measure_fn: Measure = measure, routes: Sequence[str] = ("",),
) -> Any:  # fmt: skip
    """Starts a server, waits until ``ready_path`` answers 200 under each of ``routes`` (path
    prefixes), measures it under each in turn, stops it. Returns what was measured: one
    result for one route, else a list in the order of ``routes``."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            base_url = f"http://127.0.0.1:{port}"
            try:
                for route in routes:
                    wait_ready(base_url + route + ready_path, proc)
            except RuntimeError as exc:
                out.flush()
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{exc}; the end of its log:\n{tail}") from None
            headers = prepare(base_url)
            results = [measure_fn(base_url + route, headers, args, proc.pid) for route in routes]
            return results[0] if len(results) == 1 else results
        finally:
            stop(proc)


def vllm_server_args(model_dir: Path) -> list[str]:
    """vLLM's server arguments for the tiny model, shared by ``direct`` and ``floor``."""
    return [
        "--model", str(model_dir), "--served-model-name", "tiny", "--dtype", "float32", "--enforce-eager",
        "--max-model-len", "1024", "--max-num-seqs", str(MAX_NUM_SEQS), "--disable-uvicorn-access-log",
    ]  # fmt: skip


def run_direct(model_dir: Path, args: argparse.Namespace, log: Path, measure_fn: Measure = measure) -> Any:
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *vllm_server_args(model_dir),
           "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    return serve_and_measure(cmd, env, port, "/v1/models", args, log, measure_fn=measure_fn)


def run_floor(model_dir: Path, args: argparse.Namespace, log: Path, measure_fn: Measure = measure) -> Any:
    """vLLM's own server app in one Ray Serve replica (benchmarks/serve_floor.py)."""
    port = free_port()
    script = Path(__file__).with_name("serve_floor.py")
    cmd = [sys.executable, str(script), "--port", str(port), "--", *vllm_server_args(model_dir)]
    return serve_and_measure(cmd, dict(os.environ), port, "/v1/models", args, log, measure_fn=measure_fn)


def run_mode(mode: str, model_dir: Path, args: argparse.Namespace, work: Path, measure_fn: Measure = measure) -> Any:
    """Starts the server of ``mode`` (one of MODES), measures it with ``measure_fn``, stops it."""
    if mode == "direct":
        return run_direct(model_dir, args, work / "direct.log", measure_fn)
    if mode == "floor":
        return run_floor(model_dir, args, work / "floor.log", measure_fn)
    return run_orchestrator(model_dir, args, work, mode, measure_fn)


def run_orchestrator(
    model_dir: Path, args: argparse.Namespace, work: Path, mode: str, measure_fn: Measure = measure
) -> Any:
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
    prepare: Prepare = lambda _: {}  # noqa: E731
    if mode == "gateway":
        db = work / f"gateway-{secrets.token_hex(4)}.db"  # a fresh ledger for each run
        env |= {"ORCH_ADMIN_KEY": ADMIN_KEY, "ORCH_DATABASE_URL": f"sqlite:///{db}"}
        prepare = functools.partial(unrefused_key, admin_key=ADMIN_KEY)
    else:
        env["ORCH_OPEN_ACCESS"] = "true"
    if measure_fn is measure:
        metrics_port = free_port()
        cmd += ["--metrics-port", str(metrics_port)]
        series = dict([REPLICA_TTFT, ENGINE_TTFT] + ([ADMIT] if mode == "gateway" else []))
        measure_fn = functools.partial(measure, times=ServerTimes(f"http://127.0.0.1:{metrics_port}/metrics", series))
    for pair in args.orch_env:
        key, _, value = pair.partition("=")
        env[key] = value
    # The model's own route (/models/tiny) and/or the router's (/v1 for every model).
    routes = [ROUTE_PREFIXES[route] for route in args.route]
    log = work / f"orch-{mode}.log"
    return serve_and_measure(cmd, env, port, "/health", args, log, prepare, measure_fn, routes)


ROUTE_PREFIXES = {"model": "/models/tiny", "router": ""}


def figures(o: LoadResult, d: LoadResult) -> dict[str, float]:
    """The orchestrator's figures against direct's, from the same run."""
    return {
        "throughput_ratio": round(o.tokens_per_s / d.tokens_per_s, 3),
        "ttft_p50_added_ms": round(o.ttft_ms(0.5) - d.ttft_ms(0.5), 1),
        "ttft_p99_ratio": round(o.ttft_ms(0.99) / d.ttft_ms(0.99), 3),
        "itl_p50_ms": round(o.itl_ms(0.5), 2),
        "itl_p99_ms": round(o.itl_ms(0.99), 2),
        "itl_p99_ratio": round(o.itl_ms(0.99) / d.itl_ms(0.99), 3),
        "cpu_per_request_ratio": round(o.cpu_ms_per_request / d.cpu_ms_per_request, 3),
    }


def route_figures(router: LoadResult, model: LoadResult) -> dict[str, float]:
    """The router's route against the model's own, from the same server."""
    return {
        "throughput_ratio": round(router.tokens_per_s / model.tokens_per_s, 3),
        "ttft_p50_added_ms": round(router.ttft_ms(0.5) - model.ttft_ms(0.5), 1),
        "itl_p99_ratio": round(router.itl_ms(0.99) / model.itl_ms(0.99), 3),
        "itl_p50_ms": round(router.itl_ms(0.5), 2),
    }


def compare_routes(router: Measured, model: Measured, d: Measured | None) -> dict[str, Any]:
    """``router_over_model`` of one mode; with direct's run, also each route's TTFT p50
    added to vLLM's, router over model."""
    out: dict[str, Any] = {**route_figures(router.load, model.load), "c1": route_figures(router.c1, model.c1)}
    if d is not None:
        for key, r, m, base in (("", router.load, model.load, d.load), ("c1", router.c1, model.c1, d.c1)):
            added = (r.ttft_ms(0.5) - base.ttft_ms(0.5)) / max(1e-9, m.ttft_ms(0.5) - base.ttft_ms(0.5))
            (out[key] if key else out)["ttft_p50_added_ratio"] = round(added, 3)
    return out


def compare(o: Measured, d: Measured) -> dict[str, Any]:
    out = {**figures(o.load, d.load), "c1": figures(o.c1, d.c1)}
    if o.overload and d.overload:
        offered = o.overload.requests + o.overload.shed + o.overload.errors
        out["overload"] = {**figures(o.overload, d.overload), "shed_fraction": round(o.overload.shed / offered, 3)}
    return out


def summaries(m: Measured) -> dict[str, Any]:
    out = {**m.load.summary(), "c1": m.c1.summary()}
    if m.overload:
        out["overload"] = m.overload.summary()
    return out


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the runs (nested dicts figure by figure)."""
    out: dict[str, Any] = {}
    for key, value in runs[0].items():
        if isinstance(value, dict):
            out[key] = median_of([run[key] for run in runs])
        elif isinstance(value, int | float):
            out[key] = round(statistics.median(run[key] for run in runs), 3)
    return out


def print_table(run: int, results: dict[str, Measured]) -> None:
    print(f"\nrun {run}: {'':10}{'req/s':>8}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}"
          f"{'ITL p99':>9}{'CPU/req':>9}{'errors':>7}{'shed':>6}")  # fmt: skip
    for name, m in results.items():
        loads = [(name, m.load), (f"{name} c1", m.c1)] + ([(f"{name} over", m.overload)] if m.overload else [])
        for label, r in loads:
            print(
                f"{label:20}{r.rps:8.2f}{r.tokens_per_s:9.1f}{r.ttft_ms(0.5):8.1f}ms{r.ttft_ms(0.99):8.1f}ms"
                f"{r.itl_ms(0.5):7.2f}ms{r.itl_ms(0.99):7.2f}ms{r.cpu_ms_per_request:7.1f}ms{r.errors:7d}{r.shed:6d}"
            )


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The load's shape, the servers to run and the orchestrator's environment (shared with
    profile_path.py)."""
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=list(DEFAULT_MODES),
        help="floor: vLLM's own server app in one Ray Serve replica, nothing of the orchestrator",
    )
    parser.add_argument("--orch-env", action="append", default=[], help="KEY=VALUE for the orchestrator runs")
    parser.add_argument(
        "--route",
        nargs="+",
        choices=tuple(ROUTE_PREFIXES),
        default=["model"],
        help="send the orchestrator's load to the model's own route (/models/tiny/v1) and/or the router's (/v1), "
        "in this order, against the same server",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--c1-requests", type=int, default=40, help="requests sent one at a time")
    add_load_arguments(parser)
    parser.add_argument(
        "--overload",
        type=int,
        default=0,
        metavar="N",
        help="also run N x max_num_seqs concurrent streams (2 requests each); 529s are counted as shed",
    )
    args = parser.parse_args()

    per_run: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="orch-bench-") as tmp:
        work = Path(tmp)
        model_dir = build_tiny_llama(work / "tiny", seed=0)
        for run in range(1, args.runs + 1):
            results = measure_run(run, model_dir, args, work)
            print_table(run, results)
            per_run.append(run_row(results, args.route))

    final: dict[str, Any] = {}
    medians = median_of(per_run) if per_run and per_run[0] else {}
    first = label("gateway", args.route[0], args.route)
    final.update(medians.get(first, {}))
    for key in ("open", "floor", "direct"):
        found = medians.get(label(key, args.route[0], args.route), medians.get(key))
        if found is not None:
            final[key] = found
    if len(args.route) > 1:
        final["routes"] = {key: value for key, value in medians.items() if "/" in key}
        final["router_over_model"] = medians.get("router_over_model", {})
    final["route"] = args.route
    final["runs"] = per_run
    print(json.dumps(final))


def label(mode: str, route: str, routes: Sequence[str]) -> str:
    """A result's name: the mode, with its route when several are measured (``gateway/router``)."""
    return f"{mode}/{route}" if len(routes) > 1 and mode not in ("direct", "floor") else mode


def measure_run(run: int, model_dir: Path, args: argparse.Namespace, work: Path) -> dict[str, Measured]:
    """Every mode of one run, each orchestrator mode on every route."""
    results: dict[str, Measured] = {}
    for mode in args.modes:
        print(f"== run {run}: {mode} ...", flush=True)
        measured = run_mode(mode, model_dir, args, work)
        by_route = measured if isinstance(measured, list) else [measured] * len(args.route)
        for route, result in zip(args.route, by_route, strict=True):
            results[label(mode, route, args.route)] = result
            print(json.dumps(summaries(result)), flush=True)
            if mode in ("direct", "floor"):
                break
    return results


def run_row(results: dict[str, Measured], routes: Sequence[str]) -> dict[str, Any]:
    """One run's figures: direct's own, every other result against it, and with the model's
    and the router's routes both measured, the router's against the model's."""
    row: dict[str, Any] = {}
    d = results.get("direct")
    if d is not None:
        row["direct"] = summaries(d)
        for name, result in results.items():
            if name != "direct":
                row[name] = compare(result, d)
    if {"model", "router"} <= set(routes):
        row["router_over_model"] = {
            mode: compare_routes(results[f"{mode}/router"], results[f"{mode}/model"], d)
            for mode in ("open", "gateway")
            if f"{mode}/router" in results
        }
    return row


if __name__ == "__main__":
    main()
