"""A model replica's Serve log handler survives vLLM's logging setup: Serve buffers a
replica's records in a MemoryHandler whose target is its log file, vLLM applies its logging
config with dictConfig (which closes every handler, leaving each attached), and a closed
MemoryHandler keeps every record it gets (one access-log record per request)."""

from __future__ import annotations

import io
import logging
import logging.config
import logging.handlers
from collections.abc import Iterator
from typing import Any

import pytest

from orchestrator.catalog import Catalog
from orchestrator.engine.base import Engine
from orchestrator.serving.log_buffers import LogBufferTargets
from orchestrator.serving.model_server import ModelServer
from orchestrator.settings import Settings
from tests.fakes import FakeEngine


def vllm_logging_setup() -> None:
    """What vLLM 0.32 does on import and when AsyncLLM is built (vllm/logger.py)."""
    from vllm.config.logging import LoggingConfig
    from vllm.logger import configure_logging

    configure_logging(LoggingConfig())


class LoggingEngine(FakeEngine):
    """Sets up vLLM's logging when built and when started, as the vLLM engine does."""

    def __init__(self) -> None:
        super().__init__()
        vllm_logging_setup()

    async def start(self) -> None:
        vllm_logging_setup()


@pytest.fixture
def serve_log() -> Iterator[tuple[logging.Logger, logging.handlers.MemoryHandler, io.StringIO]]:
    """A logger set up as Serve sets up a replica's (capacity 1: every record flushed)."""
    log = logging.getLogger("test.serve.replica")
    text = io.StringIO()
    handler = logging.handlers.MemoryHandler(capacity=1, target=logging.StreamHandler(text), flushLevel=logging.ERROR)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield log, handler, text
    finally:
        log.removeHandler(handler)
        handler.target = None


@pytest.mark.engine  # imports vLLM
def test_vllm_logging_setup_takes_the_target(serve_log: Any) -> None:
    # The upstream cause: should vLLM stop closing handlers, this fails and the mending
    # in ModelServer.start can go.
    _, handler, _ = serve_log
    vllm_logging_setup()
    assert handler.target is None


@pytest.mark.engine  # imports vLLM
async def test_served_requests_leave_nothing_in_the_log_buffer(catalog: Catalog, serve_log: Any) -> None:
    log, handler, text = serve_log
    log.info("before the engine")

    def factory(spec: Any, settings: Settings) -> Engine:
        return LoggingEngine()  # type: ignore[return-value]

    spec = catalog.resolve("tiny-a").model_dump(mode="json")
    server = ModelServer(spec, Settings().model_dump(mode="json"), engine_factory=factory)
    log.info("while the engine starts")
    await server.start()
    for n in range(200):
        log.info("access log of request %d", n)

    assert len(handler.buffer) == 0
    lines = text.getvalue().splitlines()
    assert lines[:2] == ["before the engine", "while the engine starts"]
    assert lines[-1] == "access log of request 199" and len(lines) == 202


def test_restore_mends_only_what_was_closed(serve_log: Any) -> None:
    _, handler, _ = serve_log
    targets = LogBufferTargets()
    assert targets.restore() == 0
    target = handler.target
    logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})
    assert handler.target is None
    assert targets.restore() == 1
    assert handler.target is target
