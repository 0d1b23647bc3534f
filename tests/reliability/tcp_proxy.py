"""A small TCP proxy for outage tests: put it between the daemon and a real peer.

The daemon is pointed at the proxy's loopback port, the proxy forwards every
connection to the real peer (Mosquitto, a webhook receiver), and the test turns the
peer slow, hung or dead without touching the peer itself:

* `delay(seconds)`: every chunk is held that long before it is written on, each way
  (latency, not a bandwidth cap: chunks in flight are delayed concurrently).
* `pause()`: nothing is read or written any more, but every socket stays open, and
  new connections are accepted and then left hanging: a peer that hangs (a stuck
  process, a black-holed route). TCP flow control pushes back on the sender once the
  proxy's small per-direction queue and the kernel buffers are full.
* `cut()`: every connection is dropped at once (unsent data discarded) and the
  listening socket is closed, so new connects are refused: a peer that died.
* `restore()`: back to a plain pipe (no delay, flowing, listening again on the same
  port). Chunks held back by `pause()` are then written on, as a real network would.

The proxy runs its own event loop in a daemon thread, so the same object serves sync
tests and async tests (whose loop it never blocks): every control method is
thread-safe, returns once the change is in effect, and may be called from any thread
except the proxy's own. Use it as a context manager, or `start()` / `stop()`.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

_CHUNK = 64 * 1024
# Chunks queued per direction before the reader stops reading (then TCP pushes back).
_QUEUE_CHUNKS = 16


class _Pipe:
    """One proxied connection: two directions, each a reader and a delaying writer."""

    def __init__(
        self,
        proxy: TcpProxy,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.proxy = proxy
        self.writers = (client[1], upstream[1])
        self.tasks: list[asyncio.Task[None]] = []
        for src, dst in ((client[0], upstream[1]), (upstream[0], client[1])):
            queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(_QUEUE_CHUNKS)
            self.tasks.append(asyncio.create_task(self._read(src, queue)))
            self.tasks.append(asyncio.create_task(self._write(queue, dst)))

    async def _read(
        self, src: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes]]
    ) -> None:
        """Read chunks while flowing and queue each with the time it may be written."""
        try:
            while True:
                await self.proxy._flowing.wait()  # paused: stop reading, keep the socket
                data = await src.read(_CHUNK)
                await self.proxy._flowing.wait()
                await queue.put((time.monotonic() + self.proxy._delay, data))
                if not data:
                    return  # EOF is queued too, so the writer half-closes in order
        except (ConnectionError, OSError):
            await queue.put((0.0, b""))

    async def _write(
        self, queue: asyncio.Queue[tuple[float, bytes]], dst: asyncio.StreamWriter
    ) -> None:
        """Write queued chunks once due (and while flowing); pass EOF on; close on errors."""
        try:
            while True:
                due, data = await queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self.proxy._flowing.wait()
                if not data:
                    if dst.can_write_eof():
                        dst.write_eof()
                    return
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            self.abort()

    def abort(self) -> None:
        """Drop both sockets at once, unsent data discarded (like a peer that vanished)."""
        for writer in self.writers:
            transport = writer.transport
            if not transport.is_closing():
                transport.abort()
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()


class TcpProxy:
    """Forward a loopback port to target_host:target_port, with outage controls."""

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        """Prepare the proxy; start() picks a free port and begins forwarding."""
        self.target = (target_host, target_port)
        self.host = host
        self.port = 0
        self.connections = 0  # connections accepted so far (for test diagnostics)
        self._delay = 0.0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy")
        self._thread.daemon = True
        self._flowing = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._pipes: set[_Pipe] = set()
        self._pending: set[asyncio.Task[None]] = set()

    @property
    def url_host(self) -> str:
        """Return host:port of the proxy's listening end."""
        return f"{self.host}:{self.port}"

    # -- lifecycle (thread-safe) ------------------------------------------------------

    def start(self) -> TcpProxy:
        """Start the proxy's loop thread and listen on a free port (kept across cut())."""
        self._thread.start()
        self._call(self._set_flowing(True))
        self._call(self._listen())
        return self

    def stop(self) -> None:
        """Close every connection and the listener, then end the loop thread."""
        if not self._thread.is_alive():
            return
        self._call(self._cut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        """Start the proxy."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the proxy."""
        self.stop()

    # -- controls (thread-safe) -------------------------------------------------------

    def delay(self, seconds: float) -> None:
        """Hold every chunk `seconds` before writing it on, both ways (0: no delay)."""
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        self._call(self._set_delay(seconds))

    def pause(self) -> None:
        """Stop forwarding but keep every socket open: the peer hangs."""
        self._call(self._set_flowing(False))

    def cut(self) -> None:
        """Abort every connection and refuse new ones: the peer is dead."""
        self._call(self._cut())

    def restore(self) -> None:
        """Forward normally again: no delay, flowing, listening on the same port."""
        self._call(self._restore())

    # -- on the proxy's loop ----------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run coro on the proxy's loop and wait for its result."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("TcpProxy controls must not be called from the proxy's thread")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _set_delay(self, seconds: float) -> None:
        """Delay chunks read from now on."""
        self._delay = seconds

    async def _set_flowing(self, flowing: bool) -> None:
        """Let chunks through, or hold every reader and writer."""
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _listen(self) -> None:
        """Listen on self.port (a free one the first time); SO_REUSEADDR for re-listening."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._server = await asyncio.start_server(self._accept, sock=sock)

    async def _cut(self) -> None:
        """Close the listener and drop every connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        pending = list(self._pending)
        for task in pending:
            task.cancel()
        for pipe in list(self._pipes):
            pipe.abort()
        self._pipes.clear()
        # Let the cancelled connection tasks finish, so stop() leaves nothing pending.
        await asyncio.gather(*pending, return_exceptions=True)

    async def _restore(self) -> None:
        """No delay, flowing, listening."""
        self._delay = 0.0
        self._flowing.set()
        if self._server is None:
            await self._listen()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Connect upstream for one accepted client and start piping."""
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._pending.add(task)
        try:
            try:
                upstream = await asyncio.open_connection(*self.target)
            except OSError:
                writer.transport.abort()  # the peer behind us is down: so are we
                return
            pipe = _Pipe(self, (reader, writer), upstream)
            self._pipes.add(pipe)
            await asyncio.wait(pipe.tasks)
            self._pipes.discard(pipe)
            for w in pipe.writers:
                w.close()  # both directions reached EOF (or were aborted): nothing is lost
        except asyncio.CancelledError:
            # Only _cut() cancels this task, which the proxy owns: end it quietly (asyncio's
            # stream server would otherwise report the cancellation as an error).
            writer.transport.abort()
        finally:
            self._pending.discard(task)
