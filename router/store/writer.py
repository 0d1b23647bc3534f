"""The SQLite writer engine: one thread that commits whatever is queued as soon as it is free.

Why a thread of our own rather than a connection per call: SQLite allows one writer
at a time, and an fsync per message would cap ingest at the disk's sync rate. The
writer takes every unit of work queued since its last commit, runs them in one
transaction, commits once, and wakes all the waiting coroutines with one loop
callback. Under load the batches grow by themselves; at rest a single unit is
committed at once (no timer, no idle CPU).

One bad unit fails alone: when a unit raises, the batch is rolled back and run again
with each unit inside its own SAVEPOINT. Units are plain functions of the database
(no effects outside it), so running one again gives the same outcome. The savepoints
are kept off the fast path because they cost more than the rest of an ingest unit:
every page a unit touches is first copied to SQLite's statement sub-journal.

Deferred units (`defer`) have nobody waiting for them: they ride along with the next
commit instead of paying an fsync of their own, or are committed alone once the writer
has had nothing else to do for a moment. A batch that fails never drops them silently:
when the database could not take the write (the commit failed, or the unit met a full,
read-only, locked or failing database) they stay queued for the next batch; a unit that
raises anything else is a bug, logged with its traceback. `deferred_pending` counts what
they stand for until it is committed, so a stop can say what is not durable.

The database's own state is one `condition` (ok, full, readonly, failing): a unit or a
commit that meets SQLITE_FULL, SQLITE_READONLY, an I/O error or a lock held elsewhere
fails with `StoreUnavailable` and sets it; the next batch that commits a write sets it
back to ok. Each change is logged once, without a traceback. While it is not ok, a
small write (`probe`) rides along (or runs alone) about once a second, so the store
recovers within seconds even when callers hold their writes until it does.

The engine knows nothing of the schema: the queries live in `router.store.queries`.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import structlog

from router.store import StoreCondition, StoreUnavailable, log_condition_change

log = structlog.get_logger("router.store")

T = TypeVar("T")
Unit = Callable[[sqlite3.Connection], Any]
# A unit and the future its caller awaits (None: nobody waits, e.g. a deferred unit).
Job = tuple[Unit, "asyncio.Future[Any] | None"]
Result = tuple["asyncio.Future[Any] | None", bool, Any]

_MAX_BATCH = 512
_STOP = object()
_DEFERRED = object()  # wakes the writer: deferred units are waiting
# How long deferred units wait for a commit to ride along with before committing alone.
_DEFERRED_IDLE = 0.1
# How long an idle writer waits before probing a store that is not ok.
_PROBE_INTERVAL = 1.0
# SQLite's primary result codes that are the database's state, not the unit's fault.
_CONDITIONS = {
    sqlite3.SQLITE_FULL: StoreCondition.FULL,
    sqlite3.SQLITE_READONLY: StoreCondition.READONLY,
    sqlite3.SQLITE_IOERR: StoreCondition.FAILING,
    sqlite3.SQLITE_CANTOPEN: StoreCondition.FAILING,
    sqlite3.SQLITE_BUSY: StoreCondition.FAILING,
    sqlite3.SQLITE_LOCKED: StoreCondition.FAILING,
    sqlite3.SQLITE_CORRUPT: StoreCondition.FAILING,
    sqlite3.SQLITE_NOTADB: StoreCondition.FAILING,
    sqlite3.SQLITE_PROTOCOL: StoreCondition.FAILING,
}


class Writer:
    """Owns the connection and the thread that commits queued units in batches."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str,
        prepare: Callable[[sqlite3.Connection], None],
        probe: Unit,
    ) -> None:
        self.path = path
        self.synchronous = synchronous
        self.prepare = prepare  # runs once on the new connection before any unit (migrations)
        self.probe = probe  # a small write that tells whether the store can commit again
        self._condition = StoreCondition.OK
        self._down_since = 0.0
        self._next_probe = 0.0  # when the writer next tries a write while not ok
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # Deferred units with how many items each stands for (reported until committed).
        self._deferred: queue.SimpleQueue[tuple[Unit, int]] = queue.SimpleQueue()
        self._deferred_lock = threading.Lock()
        self._deferred_pending = 0
        # The connection class; tests inject faults (a failing COMMIT) through it.
        self.connection_factory: type[sqlite3.Connection] = sqlite3.Connection
        self.thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self.batches = 0  # commits made, for the benchmark's batch-size figure
        self.units = 0

    # -- lifecycle ---------------------------------------------------------------

    async def open(self) -> None:
        """Connect, run `prepare`, and start the writer thread."""
        if self.thread is not None:
            raise RuntimeError("store is already open")
        self._loop = asyncio.get_running_loop()
        self._closing = False
        ready: asyncio.Future[None] = self._loop.create_future()
        thread = threading.Thread(
            target=self._main, args=(ready,), name="sqlite-writer", daemon=True
        )
        self.thread = thread
        thread.start()
        try:
            await ready
        except BaseException:
            # Migration or connect failed: the writer has exited; leave the store closed so
            # later calls fail at once instead of queueing work nobody will run.
            await asyncio.to_thread(thread.join)
            self.thread = None
            raise

    async def close(self) -> None:
        """Commit what is queued, then stop the writer."""
        if self.thread is None:
            return
        self._closing = True  # new calls fail at once; queued ones still commit
        self._queue.put(_STOP)
        await asyncio.to_thread(self.thread.join)
        self.thread = None
        self._fail_leftovers(RuntimeError("store is closed"))

    @property
    def alive(self) -> bool:
        """Whether the writer thread runs (the watchdog checks it)."""
        return self.thread is not None and self.thread.is_alive()

    @property
    def condition(self) -> StoreCondition:
        """Return whether the database can commit (set by the last batch that tried)."""
        return self._condition

    @property
    def accepting(self) -> bool:
        """Whether new units are taken (open and not closing)."""
        return self.thread is not None and not self._closing

    # -- submitting --------------------------------------------------------------

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a unit in the next batch and return its result once committed."""
        if not self.accepting:
            raise RuntimeError("store is not open")
        assert self._loop is not None
        fut: asyncio.Future[T] = self._loop.create_future()
        self._queue.put((fn, fut))
        return await fut

    def defer(self, fn: Unit, size: int = 1) -> None:
        """Queue a unit nobody waits for, standing for `size` items; it commits with a batch."""
        if not self.accepting:
            raise RuntimeError("store is not open")
        with self._deferred_lock:
            self._deferred_pending += size
        self._deferred.put((fn, size))
        self._queue.put(_DEFERRED)

    @property
    def deferred_pending(self) -> int:
        """Count the items deferred units stand for that are not committed yet."""
        return self._deferred_pending

    # -- the thread --------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            isolation_level=None,
            check_same_thread=False,
            factory=self.connection_factory,
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    def _main(self, ready: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        conn: sqlite3.Connection | None = None
        try:
            conn = self._connect()
            self.prepare(conn)
        except BaseException as exc:  # report any failure to open() rather than dying silently
            if conn is not None:
                conn.close()
            loop.call_soon_threadsafe(_set_exception, ready, exc)
            return
        loop.call_soon_threadsafe(_set_result, ready, None)
        try:
            stopping = False
            while not stopping:
                try:
                    first = self._queue.get(timeout=self._probe_wait())
                except queue.Empty:
                    first = None  # time to probe a store that is not ok
                batch, stopping = self._collect(first)
                if first is _DEFERRED and not batch and not stopping:
                    # Only deferred units: give them a moment to ride with real work.
                    deadline = time.monotonic() + _DEFERRED_IDLE
                    while not batch and not stopping:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        try:
                            item = self._queue.get(timeout=remaining)
                        except queue.Empty:
                            break
                        batch, stopping = self._collect(item)
                deferred = self._take_deferred()
                if self._probe_wait() == 0.0:
                    # Reads alone never clear the condition, and they may keep the writer
                    # busy: a small write rides along about once a second until one commits.
                    self._next_probe = time.monotonic() + _PROBE_INTERVAL
                    batch.append((self.probe, None))
                if batch or deferred:
                    self._run_batch(conn, batch, deferred)
        finally:
            conn.close()

    def _probe_wait(self) -> float | None:
        """Return how long until the next probe (None: the store is ok, no probe due)."""
        if self._condition is StoreCondition.OK:
            return None
        return max(0.0, self._next_probe - time.monotonic())

    def _collect(self, first: Any) -> tuple[list[Job], bool]:
        """Return the units queued from `first` on (at most _MAX_BATCH), and whether to stop."""
        batch: list[Job] = []
        stopping = first is _STOP
        if first is not None and not stopping and first is not _DEFERRED:
            batch.append(first)
        while len(batch) < _MAX_BATCH:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stopping = True
            elif item is not _DEFERRED:
                batch.append(item)
        return batch, stopping

    def _take_deferred(self) -> list[tuple[Unit, int]]:
        """Return every deferred unit waiting (with its size), and forget them."""
        units: list[tuple[Unit, int]] = []
        while True:
            try:
                units.append(self._deferred.get_nowait())
            except queue.Empty:
                return units

    def _run_batch(
        self, conn: sqlite3.Connection, awaited: list[Job], deferred: list[tuple[Unit, int]]
    ) -> None:
        """Commit deferred and awaited units in one transaction; a unit that raises fails alone."""
        batch: list[Job] = [(fn, None) for fn, _ in deferred]
        batch += awaited
        changes = conn.total_changes
        try:
            results = _run_fast(conn, batch)
        except _UnitFailed as failed:
            results = (
                _run_isolated(conn, batch)
                if len(batch) > 1
                else [(batch[0][1], False, failed.error)]
            )
        except Exception as exc:  # the commit itself failed (disk full, I/O): nothing is durable
            results = [(fut, False, exc) for _, fut in batch]
        self._update_condition(results, conn.total_changes != changes)
        if deferred:
            self._settle_deferred(deferred, results)
        self.batches += 1
        self.units += sum(1 for _, fut in awaited if fut is not None)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_settle, results)

    def _settle_deferred(self, deferred: list[tuple[Unit, int]], results: list[Result]) -> None:
        """Count committed deferred units; queue failed ones again (results start with them)."""
        committed = 0
        for (fn, size), (_, ok, error) in zip(deferred, results, strict=False):
            if ok:
                committed += size
            elif isinstance(error, StoreUnavailable):
                # The database could not take the write now (full, read-only, locked, I/O):
                # keep the unit for the next batch rather than lose it.
                self._deferred.put((fn, size))
            else:
                # A bug in the unit: running it again fails the same way. Say so loudly;
                # its items stay counted as not committed.
                log.error("store.deferred_unit_failed", size=size, exc_info=error)
        if committed:
            with self._deferred_lock:
                self._deferred_pending -= committed

    def _update_condition(self, results: list[Result], wrote: bool) -> None:
        """Turn the database's own failures into StoreUnavailable and track the condition."""
        first: tuple[StoreCondition, Exception] | None = None
        committed = False
        for i, (fut, ok, value) in enumerate(results):
            if ok:
                committed = True
                continue
            condition = condition_of(value)
            if condition is None:
                continue
            if first is None:
                first = (condition, value)
            unavailable = StoreUnavailable(condition, str(value))
            unavailable.__cause__ = value
            results[i] = (fut, False, unavailable)
        if first is not None:
            self._set_condition(*first)
        elif committed and wrote:
            self._set_condition(StoreCondition.OK, None)

    def _set_condition(self, condition: StoreCondition, error: Exception | None) -> None:
        """Record the condition; log only a change (a full disk fails every unit)."""
        previous = self._condition
        if condition is previous:
            return
        self._condition = condition
        now = time.monotonic()
        if previous is StoreCondition.OK:
            self._down_since = now
            self._next_probe = now + _PROBE_INTERVAL
        log_condition_change(previous, condition, error, now - self._down_since)

    def _fail_leftovers(self, exc: BaseException) -> None:
        """Fail units still queued after the writer stopped (nobody will run them)."""
        leftovers: list[Result] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP and item is not _DEFERRED:
                leftovers.append((item[1], False, exc))
        if leftovers:
            _settle(leftovers)


def condition_of(exc: BaseException) -> StoreCondition | None:
    """Return the store condition an error reveals, or None when it is the unit's own."""
    if not isinstance(exc, sqlite3.Error):
        return None
    code = getattr(exc, "sqlite_errorcode", None)  # absent on errors raised by hand
    if code is None:
        return None
    return _CONDITIONS.get(code & 0xFF)


class _UnitFailed(Exception):
    """A unit raised in the fast path: the batch is run again with savepoints."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _run_fast(conn: sqlite3.Connection, batch: list[Job]) -> list[Result]:
    """Run every unit in one transaction without savepoints; raise _UnitFailed if one raises."""
    results: list[Result] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        for fn, fut in batch:
            try:
                value = fn(conn)
            except Exception as exc:
                raise _UnitFailed(exc) from exc
            results.append((fut, True, value))
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    return results


def _run_isolated(conn: sqlite3.Connection, batch: list[Job]) -> list[Result]:
    """Run the batch again, each unit inside a SAVEPOINT, so a failing one fails alone."""
    results: list[Result] = []
    try:
        conn.execute("BEGIN IMMEDIATE")
        for fn, fut in batch:
            conn.execute("SAVEPOINT unit")
            try:
                value = fn(conn)
            except Exception as exc:
                conn.execute("ROLLBACK TO unit")
                conn.execute("RELEASE unit")
                results.append((fut, False, exc))
            else:
                conn.execute("RELEASE unit")
                results.append((fut, True, value))
        conn.execute("COMMIT")
    except Exception as exc:  # the commit itself failed (disk full, I/O): nothing is durable
        _rollback(conn)
        results = [(fut, False, exc) for _, fut in batch]
    return results


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if any (a failed statement may have ended it)."""
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass


def _settle(results: list[Result]) -> None:
    """Hand each waiting caller its unit's result (runs on the event loop)."""
    for fut, ok, value in results:
        if fut is None:  # nobody waits for it (deferred units)
            continue
        if fut.done():  # the caller was cancelled; the unit still ran (or failed) as committed
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
