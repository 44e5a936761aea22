"""Where the CPU goes: server CPU per request by component, orchestrator against vLLM's own
server, under the load of ``vs_vllm.py``; optionally where inside each Python component.

    .venv/bin/python benchmarks/profile_path.py [--modes direct floor open gateway] [--requests 300]
        [--concurrency 32] [--py-spy DIR]

For each mode it starts the server as ``vs_vllm.py`` does, warms it up, then drives
``--requests`` streaming completions (64-token prompts, 64 output tokens) at
``--concurrency`` and reads every server process's CPU time before and after (psutil).
Processes are grouped into components by their titles (Ray's ``ray::ServeReplica:<app>:``,
vLLM's ``VLLM::EngineCore``, ...). Prints CPU milliseconds per request per component and,
as the last line, a JSON object of the same figures.

With ``--py-spy DIR`` the load runs a second time with py-spy (``pip install py-spy``)
sampling each Python component of the server; DIR gets one collapsed-stack file per
component, and the script prints each one's functions by share of samples (inclusive, and
as the innermost frame of our own or a library's code). Sampling takes CPU from the server
on a small machine, so the CPU figures come from the first, unsampled load.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.load import run_load
from benchmarks.vs_vllm import add_load_arguments, run_mode
from orchestrator.engine.weights import build_tiny_llama

# (substring of the process title or command line, component); the first match wins.
COMPONENTS = (
    ("VLLM::Worker", "vLLM worker"),
    ("VLLM::EngineCore", "vLLM engine core"),
    ("ServeReplica:orchestrator-model-", "model replica"),
    ("ServeReplica:orchestrator-gateway", "gateway replica"),
    ("ServeReplica:orchestrator:", "router replica"),
    ("ServeReplica:vllm-in-serve", "vLLM API server in a Serve replica (floor)"),
    ("LedgerActor", "ledger actor (gateway)"),
    ("haproxy", "HAProxy"),
    ("ProxyActor", "Serve proxy"),
    ("ServeController", "Serve controller"),
    ("vllm.entrypoints.openai.api_server", "vLLM API server"),
    ("orchestrator serve", "orchestrator serve (launcher)"),
    ("serve_floor.py", "serve_floor.py (launcher)"),
    ("gcs_server", "Ray GCS"),
    ("raylet/raylet", "Ray raylet"),
    ("DashboardAgent", "Ray dashboard agent (metrics export)"),
    ("dashboard/dashboard.py", "Ray dashboard"),
    ("log_monitor.py", "Ray log monitor"),
    ("autoscaler/_private/monitor.py", "Ray autoscaler monitor"),
)
# Components py-spy samples (the Python ones on the request path).
SAMPLED = (
    "vLLM API server",
    "vLLM API server in a Serve replica (floor)",
    "model replica",
    "router replica",
    "ledger actor (gateway)",
    "vLLM engine core",
)


def component(proc: psutil.Process) -> str:
    try:
        title = " ".join(proc.cmdline()) or proc.name()
    except psutil.Error:
        return "gone"
    for needle, name in COMPONENTS:
        if needle in title:
            return name
    return "Ray, other" if "ray" in title else "other"


def snapshot(pid: int) -> dict[int, tuple[str, float]]:
    """Every process of the server's tree: pid -> (component, CPU seconds so far)."""
    root = psutil.Process(pid)
    out: dict[int, tuple[str, float]] = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        out[proc.pid] = (component(proc), times.user + times.system)
    return out


def by_component(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per component between two snapshots (a process born between them counts
    from zero; one that died is lost, which a steady server does not do)."""
    totals: dict[str, float] = collections.defaultdict(float)
    for pid, (name, cpu) in after.items():
        totals[name] += cpu - before.get(pid, (name, 0.0))[1]
    return dict(totals)


def _load(base_url: str, headers: dict[str, str], args: argparse.Namespace) -> Any:
    prompt = [(7 * i) % 400 + 10 for i in range(args.prompt_tokens)]
    return asyncio.run(
        run_load(base_url, "tiny", prompt=prompt, output_tokens=args.output_tokens, requests=args.requests,
                 concurrency=args.concurrency, headers=headers)
    )  # fmt: skip


def start_py_spy(pid: int, out_dir: Path, label: str) -> list[tuple[str, subprocess.Popen[bytes], Path]]:
    """Starts one py-spy per sampled component (the first process of each)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    started: dict[str, tuple[str, subprocess.Popen[bytes], Path]] = {}
    for child_pid, (name, _) in snapshot(pid).items():
        if name not in SAMPLED or name in started:
            continue
        path = out_dir / f"{label}-{name.replace(' ', '_')}.txt"
        cmd = [spy, "record", "--pid", str(child_pid), "--rate", "200", "--format", "raw", "--nonblocking",
               "--output", str(path)]  # fmt: skip
        started[name] = (name, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), path)
    return list(started.values())


def stop_py_spy(spies: list[tuple[str, subprocess.Popen[bytes], Path]]) -> None:
    for _, proc, _ in spies:
        proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    for _, proc, _ in spies:
        proc.wait(timeout=60)


def _frame_name(frame: str) -> str:
    """``func (path/to/module.py:123)`` -> ``module.py:func`` (lines dropped so one
    function counts once)."""
    func, _, where = frame.partition(" (")
    return f"{Path(where.split(':')[0]).name}:{func}"


def top_functions(path: Path, n: int) -> tuple[int, list[tuple[str, float]], list[tuple[str, float]]]:
    """From a py-spy raw (collapsed) file: total samples, the ``n`` functions with the most
    samples anywhere on the stack, and the ``n`` with the most as the innermost frame."""
    inclusive: dict[str, int] = collections.Counter()
    leaf: dict[str, int] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        samples = int(count)
        total += samples
        frames = [_frame_name(f) for f in stack.split(";") if f]
        for name in set(frames[1:]):  # the first frame is the thread
            inclusive[name] += samples
        if frames:
            leaf[frames[-1]] += samples
    share = lambda counts: [(k, 100 * v / max(1, total)) for k, v in counts.most_common(n)]  # noqa: E731
    return total, share(inclusive), share(leaf)


def measure_components(args: argparse.Namespace, label: str) -> Any:
    def measure(base_url: str, headers: dict[str, str], _: argparse.Namespace, pid: int) -> dict[str, Any]:
        _load(base_url, headers, args)  # warm-up (also makes the engine compile everything it will)
        before = snapshot(pid)
        result = _load(base_url, headers, args)
        cpu = by_component(before, snapshot(pid))
        per_request = {k: round(1000 * v / max(1, result.requests), 2) for k, v in sorted(cpu.items())}
        out: dict[str, Any] = {"load": result.summary(), "cpu_ms_per_request": per_request}
        if args.py_spy:
            spies = start_py_spy(pid, args.py_spy, label)
            try:
                out["sampled_load"] = _load(base_url, headers, args).summary()
            finally:
                stop_py_spy(spies)
            out["profiles"] = {name: str(path) for name, _, path in spies}
        return out

    return measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_arguments(parser)
    parser.add_argument("--py-spy", type=Path, default=None, metavar="DIR", help="also sample with py-spy into DIR")
    parser.add_argument("--top", type=int, default=25, help="functions to print per profile")
    args = parser.parse_args()
    if args.py_spy:
        args.py_spy.mkdir(parents=True, exist_ok=True)

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="orch-profile-") as tmp:
        work = Path(tmp)
        model_dir = build_tiny_llama(work / "tiny", seed=0)
        for mode in args.modes:
            print(f"== {mode} ...", flush=True)
            measure = measure_components(args, mode)
            results[mode] = run_mode(mode, model_dir, args, work, measure)
            print(json.dumps(results[mode]), flush=True)

    names = sorted({name for r in results.values() for name in r["cpu_ms_per_request"]})
    print(f"\nCPU ms per request{'':22}" + "".join(f"{mode:>10}" for mode in results))
    for name in names:
        print(f"{name:40}" + "".join(f"{r['cpu_ms_per_request'].get(name, 0.0):10.2f}" for r in results.values()))
    print(f"{'total':40}" + "".join(f"{sum(r['cpu_ms_per_request'].values()):10.2f}" for r in results.values()))
    for mode, r in results.items():
        for name, path in r.get("profiles", {}).items():
            total, inclusive, leaf = top_functions(Path(path), args.top)
            print(f"\n{mode} / {name}: {total} samples ({path})")
            print("  inclusive:", *(f"{share:5.1f}% {fn}" for fn, share in inclusive), sep="\n    ")
            print("  innermost:", *(f"{share:5.1f}% {fn}" for fn, share in leaf), sep="\n    ")
    print(json.dumps({mode: r["cpu_ms_per_request"] for mode, r in results.items()}))


if __name__ == "__main__":
    main()
