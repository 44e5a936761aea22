"""A Unix-socket channel to the ledger actor, for callers on the ledger's own node.

A Ray actor call crosses several threads on each side (gRPC, the core worker, the actor's
event loop), and each crossing waits for a core. On this 2-core machine an ``authenticate``
call took 2.2 ms (p50) at rest and 28 ms while two processes kept both cores busy, as a
vLLM engine core and its worker do; over a Unix socket, which wakes one event loop on each
side, 0.36 ms and 3.9 ms (``benchmarks/experiments/ledger_hop.py``). Every request makes two such calls (admission,
settlement), so on the ledger's node routers and model replicas use this channel, and the
actor call elsewhere (:class:`~orchestrator.serving.gateway_server.RemoteGateway`).

The protocol is one frame type each way: a 4-byte length, then a pickle of
``(call id, method, args, kwargs)``, answered by ``(call id, ok, result or exception)``.
Calls are multiplexed on one connection and answered as they finish. Only the same OS
user can connect: the socket lives in a 0700 folder, and the server checks each peer's
uid (``SO_PEERCRED``), so it unpickles only what a process that could already run code
in this Ray cluster sends.

The standard library has no asyncio RPC, and none of the project's dependencies offers a
local one (Ray's own is the actor call this replaces), hence this small module.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("!I")
MAX_FRAME_BYTES = 64 * 1024 * 1024

Dispatch = Callable[..., Awaitable[Any]]  # (method, *args, **kwargs) -> result


class ChannelClosed(ConnectionError):
    """The channel's connection is gone (the ledger's process died, or the connection broke
    while it lived): the call may or may not have run, so only calls that are safe to repeat
    are retried (:class:`~orchestrator.serving.gateway_server.RemoteGateway`)."""


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > MAX_FRAME_BYTES:
        raise ChannelClosed(f"frame of {size} bytes")
    return pickle.loads(await reader.readexactly(size))


def _frame(message: Any) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


def _same_user(writer: asyncio.StreamWriter) -> bool:
    sock = writer.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return True  # no peer credentials here: the folder's 0700 mode is the check
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return bool(uid == os.getuid())


class ChannelServer:
    """Serves ``dispatch`` on a Unix socket at ``path`` (its folder must exist, mode 0700)."""

    def __init__(self, path: str, dispatch: Dispatch) -> None:
        self.path = path
        self._dispatch = dispatch
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not _same_user(writer):
            logger.warning("refused a ledger channel connection from another user")
            writer.close()
            return
        try:
            while True:
                call_id, method, args, kwargs = await _read_frame(reader)
                task = asyncio.create_task(self._answer(writer, call_id, method, args, kwargs))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the caller went away
        except asyncio.CancelledError:
            # The loop is closing. Ended quietly: Python 3.11's streams log a cancelled
            # connection task as an unhandled error.
            pass
        finally:
            writer.close()

    async def _answer(
        self, writer: asyncio.StreamWriter, call_id: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        try:
            reply = (call_id, True, await self._dispatch(method, *args, **kwargs))
        except Exception as exc:
            reply = (call_id, False, exc)
        try:
            data = _frame(reply)
        except Exception as exc:  # an answer that does not pickle: the caller still gets one
            data = _frame((call_id, False, RuntimeError(f"unpicklable ledger answer: {exc!r}")))
        if not writer.is_closing():
            writer.write(data)

    def close(self) -> None:
        """Stops accepting connections (answers to calls already made still go out)."""
        if self._server is not None:
            self._server.close()


class Channel:
    """A caller's connection to a :class:`ChannelServer`, used from the event loop that
    opened it (:meth:`open`)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.loop = asyncio.get_running_loop()
        self._writer = writer
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._closed: BaseException | None = None
        self._closing = False
        self._reading = asyncio.create_task(self._read(reader))

    @classmethod
    async def open(cls, path: str) -> Channel:
        """Connects to the server at ``path``.

        Raises:
            OSError: nothing listens there (the ledger stopped, or is on another node).
        """
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                call_id, ok, value = await _read_frame(reader)
                future = self._pending.pop(call_id, None)
                if future is None or future.done():
                    continue  # its caller stopped waiting (a deadline)
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
        except Exception as exc:  # the connection ended, or sent what does not unpickle
            self._fail(ChannelClosed(f"the ledger channel closed: {exc!r}"))

    def _fail(self, error: ChannelClosed) -> None:
        self._closed = error
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        self._writer.close()

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Runs ``method`` on the server and returns its answer, or raises what it raised.

        Raises:
            ChannelClosed: the connection is gone, before or during the call.
        """
        if self._closed is not None or self._closing:
            raise ChannelClosed(str(self._closed or "the ledger channel is closing"))
        call_id = next(self._ids)
        future = self.loop.create_future()
        self._pending[call_id] = future
        try:
            self._writer.write(_frame((call_id, method, args, kwargs)))
            await self._writer.drain()
            return await future
        except ChannelClosed:
            raise
        except ConnectionError as exc:
            raise ChannelClosed(f"the ledger channel closed: {exc!r}") from exc
        finally:
            self._pending.pop(call_id, None)
            if self._closing and not self._pending:
                self.close()

    def close_when_idle(self) -> None:
        """Closes the connection once no call waits on it (new calls are refused now)."""
        self._closing = True
        if not self._pending:
            self.close()

    def close(self) -> None:
        """Closes the connection; calls still waiting get :class:`ChannelClosed`."""
        if self._closed is None:
            self._fail(ChannelClosed("the ledger channel was closed"))  # closes the writer too
        self._reading.cancel()
