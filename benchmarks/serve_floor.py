"""vLLM's own OpenAI server in one Ray Serve replica, with nothing of the orchestrator:
the floor of any path through Ray Serve, for ``vs_vllm.py --modes ... floor``.

    .venv/bin/python benchmarks/serve_floor.py --port N -- VLLM_SERVER_ARGS...

The replica builds vLLM's own FastAPI app (``vllm.entrypoints.launchers``: ``build_app``
and ``init_app_state``, as ``vllm serve`` does) over an ``AsyncLLM`` and hands it to Serve
as its ingress app. Ray and Serve are started as ``orchestrator serve`` starts them (a
local cluster on 127.0.0.1, HAProxy ingress, Serve's throughput-optimized mode), and the
replica gets the model replica's Serve options that matter on the data path (one logical
CPU, ``max_ongoing_requests``), so what differs from ``orchestrator serve`` on a model's own
route is the orchestrator's own code and its other deployments. Runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.settings import FAST_INGRESS_ENV

APP = "vllm-in-serve"


class VLLMInServe:
    """One Serve replica running vLLM's OpenAI server app over its own engine."""

    async def __init__(self, cli_args: list[str]) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.usage.usage_lib import UsageContext
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.v1.engine.async_llm import AsyncLLM

        args = make_arg_parser(FlexibleArgumentParser()).parse_args(cli_args)
        engine_args = AsyncEngineArgs.from_cli_args(args)
        usage = UsageContext.OPENAI_API_SERVER
        self._llm = AsyncLLM.from_vllm_config(
            vllm_config=engine_args.create_engine_config(usage_context=usage),
            usage_context=usage,
            enable_log_requests=engine_args.enable_log_requests,
            disable_log_stats=engine_args.disable_log_stats,
        )
        tasks = await self._llm.get_supported_tasks()
        self._app = build_app(args, tasks, self._llm.model_config)
        await init_app_state(self._llm, self._app.state, args, tasks)

    def __serve_build_asgi_app__(self) -> Any:
        return self._app

    def __del__(self) -> None:
        # Serve calls __del__ on a graceful replica stop: end the engine's processes.
        llm = getattr(self, "_llm", None)
        if llm is not None:
            llm.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--max-ongoing-requests", type=int, default=136, help="the model replica's default: 64 + 64 + 8"
    )
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER, help="after --: vLLM server arguments")
    args = parser.parse_args()
    vllm_args = [a for a in args.vllm_args if a != "--"]

    # As `orchestrator serve` sets them (orchestrator/embedded.py), before Ray is imported.
    for key, value in FAST_INGRESS_ENV.items():
        os.environ.setdefault(key, value)
    wrapper = shutil.which("orchestrator-haproxy", path=str(Path(sys.executable).parent))
    if wrapper:
        os.environ.setdefault("RAY_SERVE_HAPROXY_BINARY_PATH", wrapper)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    import ray
    from ray import serve

    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        num_cpus=os.cpu_count() or 1,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    stop: list[bool] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        deployment = serve.deployment(serve.ingress()(VLLMInServe)).options(
            name="VLLMInServe",
            max_ongoing_requests=args.max_ongoing_requests,
            ray_actor_options={
                "num_cpus": 1,
                "runtime_env": {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}},
            },
        )
        serve.run(deployment.bind(vllm_args), name=APP, route_prefix="/", blocking=False)
        print("ready", flush=True)
        while not stop:
            time.sleep(0.2)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
