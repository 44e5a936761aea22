"""Serve's buffered log handlers, kept working across vLLM's logging setup.

Serve 2.60 writes a replica's log records, among them one access-log record per request,
through a ``logging.handlers.MemoryHandler`` whose target is the replica's log file
(``configure_component_logger`` in ``ray/serve/_private/logging_utils.py``). vLLM 0.32 applies
its logging configuration with ``logging.config.dictConfig`` when it is first imported and
again when an engine is built (``vllm/logger.py``, ``AsyncLLM.__init__``), and ``dictConfig``
closes every handler of the process (``logging.shutdown``) while leaving each attached to its
logger. A closed ``MemoryHandler`` has no target: it never flushes and keeps every record it
is given, so a model replica kept about 2 KB per request for as long as it ran, and its Serve
log file got nothing more. :class:`LogBufferTargets` notes the targets before the engine is
built and puts back those that were taken (a closed ``FileHandler`` opens its file again on
its next record).
"""

from __future__ import annotations

import logging
import logging.handlers
from collections.abc import Iterator


def _memory_handlers() -> Iterator[logging.handlers.MemoryHandler]:
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for log in loggers:
        for handler in getattr(log, "handlers", ()):  # placeholders have none
            if isinstance(handler, logging.handlers.MemoryHandler):
                yield handler


class LogBufferTargets:
    """The targets of the process's buffered log handlers when it was made."""

    def __init__(self) -> None:
        self._targets = {handler: handler.target for handler in _memory_handlers() if handler.target is not None}

    def restore(self) -> int:
        """Puts back each target a handler lost since, and sends it the records held
        meanwhile; returns how many handlers it mended."""
        mended = 0
        for handler, target in self._targets.items():
            if handler.target is None:
                handler.setTarget(target)
                handler.flush()
                mended += 1
        return mended
