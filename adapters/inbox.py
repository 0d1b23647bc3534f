"""The embedded agent tool: one JSONL file per agent that a newcomer can `tail -f`.

Each delivery becomes one line of `<dir>/<agent>.jsonl` (schema `omnirouter.delivery/1`,
see adapters/README.md), flushed and fsynced before `deliver` returns. A delivery id
is written at most once per file, so the outbox replaying a send after a crash does
not duplicate the line.

Writes for one agent are group-committed: while one batch is being written and
fsynced in a worker thread, new lines queue up and go out together in the next
batch with a single fsync. That keeps the event loop free of disk latency and the
fsync count per second bounded by the disk, not by the message rate.

"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from router.delivery import encode_delivery
from router.drivers import (
    AGENT_ID_RE,
    NAME_RE,
    ActionSink,
    AgentToolBase,
    Delivery,
    DriverContext,
    DriverState,
    PermanentError,
    TransientError,
)

_SAFE_NAME = re.compile(AGENT_ID_RE)
_READ_CHUNK = 1 << 20


class InboxConfig(BaseModel):
    """Settings of one inbox adapter."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["inbox"]
    name: str = Field(pattern=NAME_RE)
    # Directory of the <agent>.jsonl files; default: <state_dir>/inbox.
    dir: Path | None = None


class _AgentFile:
    """One agent's JSONL file: the delivery ids it holds and the batch writer feeding it."""

    def __init__(self, path: Path, log: Any) -> None:
        """Remember the path; the file's ids are read on the first write."""
        self.path = path
        self.log = log
        # Touched only by the writer thread of the single running batch.
        self.ids: set[str] = set()
        self.identity: tuple[int, int] | None = None  # (st_dev, st_ino) the ids were read from
        self.queue: list[tuple[str, bytes]] = []
        self.waiters: dict[str, asyncio.Future[None]] = {}
        self.writer: asyncio.Task[None] | None = None

    async def append(self, delivery_id: str, line: bytes) -> None:
        """Queue one line and wait until it is on disk (or known to be there already)."""
        fut = self.waiters.get(delivery_id)
        if fut is None:
            # The same id already queued or being written shares that write's outcome.
            fut = asyncio.get_running_loop().create_future()
            fut.add_done_callback(_consume_exception)
            self.waiters[delivery_id] = fut
            self.queue.append((delivery_id, line))
            if self.writer is None:
                self.writer = asyncio.create_task(self._drain(), name=f"inbox-{self.path.name}")
        # shield: a cancelled caller must not cancel the write other callers wait on.
        await asyncio.shield(fut)

    async def _drain(self) -> None:
        """Write queued lines batch by batch until the queue is empty."""
        batch: list[tuple[str, bytes]] = []
        try:
            while self.queue:
                batch, self.queue = self.queue, []
                try:
                    await asyncio.to_thread(self._write_batch, batch)
                except OSError as exc:
                    # Disk full, permissions, I/O error: the outbox retries with backoff.
                    message = f"inbox: cannot write {self.path.name}: {exc.strerror or exc}"
                    self._settle(batch, message)
                else:
                    self._settle(batch, None)
        finally:
            self.writer = None
            # Lines are left only if this task was cancelled (loop shutting down). The
            # thread may still finish the write; the resend is then deduped by id.
            leftover, self.queue = batch + self.queue, []
            self._settle(leftover, "inbox: writer stopped before the write finished")

    def _settle(self, batch: list[tuple[str, bytes]], error: str | None) -> None:
        """Resolve the waiters of a batch; with error, each gets its own TransientError."""
        for delivery_id, _ in batch:
            fut = self.waiters.pop(delivery_id, None)
            if fut is None or fut.done():
                continue
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(TransientError(error))

    def _write_batch(self, batch: list[tuple[str, bytes]]) -> None:
        """Append the lines whose ids the file does not hold yet, then fsync (worker thread)."""
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(self.path, flags, 0o600)
        try:
            st = os.fstat(fd)
            identity = (st.st_dev, st.st_ino)
            created = False
            if identity != self.identity:
                # First write, or the file was rotated/replaced: learn what it holds.
                created = st.st_size == 0
                self.ids = self._load_ids(fd, st.st_size)
                self.identity = identity
            fresh: list[str] = []
            chunks: list[bytes] = []
            for delivery_id, line in batch:
                if delivery_id in self.ids or delivery_id in fresh:
                    continue
                fresh.append(delivery_id)
                chunks.append(line)
            if chunks:
                try:
                    _write_all(fd, b"".join(chunks))
                    os.fsync(fd)
                except OSError:
                    # A partial write may have left a torn line: re-read the file next time.
                    self.identity = None
                    raise
                self.ids.update(fresh)
            if created:
                # Make the new directory entry durable too, not just the file's data.
                _fsync_dir(self.path.parent)
        finally:
            os.close(fd)

    def _load_ids(self, fd: int, size: int) -> set[str]:
        """Return the delivery ids in the file, cutting off a torn last line (worker thread)."""
        ids: set[str] = set()
        bad = 0
        end = 0  # offset just past the last complete line
        for offset, line in _lines(fd, size):
            end = offset + len(line) + 1
            if not line.strip():
                continue
            try:
                delivery_id = json.loads(line).get("delivery_id")
            except (ValueError, AttributeError):
                bad += 1
                continue
            if isinstance(delivery_id, str):
                ids.add(delivery_id)
        if end < size:
            # A crash mid-append left a line without its newline. It was never
            # acknowledged (fsync had not returned), so drop it; the outbox resends it.
            os.ftruncate(fd, end)
            self.log.warning("inbox.torn_line_removed", file=self.path.name, bytes=size - end)
        if bad:
            self.log.warning("inbox.unparseable_lines", file=self.path.name, count=bad)
        return ids


def _lines(fd: int, size: int) -> Iterator[tuple[int, bytes]]:
    """Yield (offset, line) for every newline-terminated line of the file, reading in chunks."""
    pos = 0
    start = 0  # file offset of `pending`
    pending = b""
    while pos < size:
        chunk = os.pread(fd, min(_READ_CHUNK, size - pos), pos)
        if not chunk:
            break
        pos += len(chunk)
        pending += chunk
        cut = 0
        while (nl := pending.find(b"\n", cut)) >= 0:
            yield start + cut, pending[cut:nl]
            cut = nl + 1
        start += cut
        pending = pending[cut:]


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte of data (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(path: Path) -> None:
    """Flush a directory's entries to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _consume_exception(fut: asyncio.Future[None]) -> None:
    """Mark a write error as retrieved so a caller that was cancelled leaves no asyncio warning."""
    if not fut.cancelled():
        fut.exception()


class InboxTool(AgentToolBase):
    """Append each delivery as one JSON line to the agent's file, exactly once per delivery id."""

    config_model: ClassVar[type[InboxConfig]] = InboxConfig
    sends_actions = False  # a file cannot say "I took it": its agents hold work at once

    def __init__(self, name: str, config: InboxConfig, ctx: DriverContext) -> None:
        """Prepare the tool; nothing touches the disk before the first delivery or run()."""
        super().__init__(name, ctx)
        self.config = config
        self.dir = config.dir if config.dir is not None else ctx.state_dir / "inbox"
        self._files: dict[str, _AgentFile] = {}
        self._dir_ready = False
        self._stopped = False

    async def run(self, actions: ActionSink) -> None:
        """Create the inbox directory and stay CONNECTED until cancelled (no agent actions)."""
        self._stopped = False
        try:
            await asyncio.to_thread(self._ensure_dir)
        except OSError as exc:
            self.last_error = f"cannot create {self.dir}: {exc.strerror}"
            self.log.error("inbox.dir_failed", dir=str(self.dir), error=exc.strerror)
            raise TransientError(f"inbox: {self.last_error}") from exc  # supervisor retries run()
        self._set_state(DriverState.CONNECTED)
        self.log.info("inbox.ready", dir=str(self.dir))
        try:
            await asyncio.Event().wait()  # nothing to listen to; live until cancelled
        finally:
            self._set_state(DriverState.STOPPED)

    async def deliver(self, delivery: Delivery) -> None:
        """Append the delivery to <dir>/<address or agent_id>.jsonl and fsync it."""
        if self._stopped:
            raise TransientError(f"inbox {self.name} is stopped")
        agent = delivery.address or delivery.agent_id
        if not _SAFE_NAME.fullmatch(agent):
            raise PermanentError(
                f"inbox: agent id {agent[:80]!r} is not a safe file name ({AGENT_ID_RE})"
            )
        line = encode_delivery(delivery) + b"\n"
        if not self._dir_ready:
            try:
                await asyncio.to_thread(self._ensure_dir)
            except OSError as exc:
                raise TransientError(f"inbox: cannot create its directory: {exc.strerror}") from exc
        agent_file = self._files.get(agent)
        if agent_file is None:
            agent_file = self._files[agent] = _AgentFile(self.dir / f"{agent}.jsonl", self.log)
        try:
            await agent_file.append(delivery.id, line)
        except TransientError as exc:
            self.last_error = str(exc)
            raise
        self._succeeded()

    async def stop(self) -> None:
        """Refuse new deliveries and wait for the writes in progress to reach the disk."""
        self._stopped = True
        writers = [f.writer for f in self._files.values() if f.writer is not None]
        if writers:
            await asyncio.wait(writers)
        self._set_state(DriverState.STOPPED)

    def _ensure_dir(self) -> None:
        """Create the inbox directory (mode 0700) if it is missing."""
        if not self.dir.is_dir():
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._dir_ready = True
