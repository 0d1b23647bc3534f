"""The PostgreSQL engine: a few worker threads, each with a connection, running units.

Why threads with psycopg's synchronous connections rather than an async driver: the
units of work (`router.store.queries`) are plain functions of a DB-API connection,
shared with the SQLite store, so every business rule is written once. A unit runs in
its own READ COMMITTED transaction and locks the rows it is about to change
(`SELECT … FOR UPDATE`, see `router.store.portable.for_update`), which gives it what
the SQLite store gets from its single writer: a message still queued, an agent's room,
a conversation's holder cannot change under it. (SERIALIZABLE was tried first: with
ULID keys every ingest inserts at the right edge of the same index pages, and the
page-level predicate locks made a fifth of all transactions fail and run again.) A
unit that loses a race on a unique key (two instances storing the same message or
opening the same thread), a deadlock or a serialization failure is run again (units
have no effects outside the database): the second run finds the first one's rows.
Read-only units run in a REPEATABLE READ, READ ONLY snapshot.

Deferred units (the outbox's deletes) are gathered and committed together by the
next free worker. The condition (ok, full, readonly, failing) follows the server's
SQLSTATE classes; a lost connection is reopened on the next unit; while the store is
not ok an idle worker probes it about once a second.

`PgConnection` gives the units the small slice of the sqlite3 API they use:
`execute`/`executemany` with `?` placeholders, cursors with `fetchone`, `fetchall`,
iteration, `rowcount` and `description`.
"""

from __future__ import annotations

import asyncio
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg
import structlog
from psycopg import errors as pg_errors
from psycopg.types.numeric import FloatLoader

from router.store import StoreCondition, StoreUnavailable, log_condition_change

log = structlog.get_logger("router.store")

T = TypeVar("T")
Unit = Callable[[Any], Any]

_STOP = object()
_DEFERRED = object()
_PROBE_INTERVAL = 1.0
# Runs of a statement on a connection before it is prepared there (psycopg's default):
# the units use a few hundred statements, a dozen of them on every message.
_PREPARE_AFTER = 5
# Reruns of a unit that lost a serialization race before giving up (each after a
# short random pause so the contenders do not collide again in step).
_MAX_RERUNS = 30
# A pooler between the store and the server mixed up the sessions' prepared statements.
_LOST_PREPARED = (pg_errors.InvalidSqlStatementName, pg_errors.DuplicatePreparedStatement)
_RERUN = (
    pg_errors.SerializationFailure,
    pg_errors.DeadlockDetected,
    pg_errors.UniqueViolation,
)


class PgConnection:
    """A psycopg connection speaking the sqlite3 dialect the units are written in."""

    __slots__ = ("raw",)

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        """Run one statement with `?` placeholders; return its cursor."""
        cur = self.raw.cursor()
        if params:
            cur.execute(translate(sql), params)
        else:
            cur.execute(sql)  # without parameters psycopg reads no placeholders
        return cur

    def executemany(self, sql: str, rows: Any) -> psycopg.Cursor[Any]:
        """Run one statement for each parameter row."""
        cur = self.raw.cursor()
        cur.executemany(translate(sql), rows)
        return cur


_TRANSLATED: dict[str, str] = {}


def translate(sql: str) -> str:
    """Turn `?` placeholders into psycopg's `%s` (and a literal `%` into `%%`).

    Question marks and percent signs inside quoted literals and identifiers are text,
    not placeholders. Cached: the units use a few hundred distinct statements.
    """
    done = _TRANSLATED.get(sql)
    if done is not None:
        return done
    out: list[str] = []
    quote = ""
    for ch in sql:
        if quote:
            out.append("%%" if ch == "%" else ch)
            if ch == quote:
                quote = ""
        elif ch in ("'", '"'):
            quote = ch
            out.append(ch)
        elif ch == "?":
            out.append("%s")
        elif ch == "%":
            out.append("%%")
        else:
            out.append(ch)
    done = "".join(out)
    if len(_TRANSLATED) < 4096:
        _TRANSLATED[sql] = done
    return done


def condition_of(exc: BaseException) -> StoreCondition | None:
    """Return the store condition a server error reveals, or None when it is the unit's."""
    if not isinstance(exc, psycopg.Error):
        return None
    state = exc.sqlstate or ""
    if state == "53100":  # disk_full
        return StoreCondition.FULL
    if state == "25006":  # read_only_sql_transaction (a standby, or default_read_only)
        return StoreCondition.READONLY
    if state[:2] in ("08", "53", "57", "58", "XX") or isinstance(exc, psycopg.OperationalError):
        # connection, resources, operator intervention (shutdown, statement timeout),
        # system and internal errors: the server's state, not the unit's fault
        return StoreCondition.FAILING
    return None


class PgEngine:
    """Runs units of work on `pool_size` connections, each unit in its own transaction."""

    def __init__(
        self,
        conninfo: str,
        *,
        pool_size: int,
        prepare: Callable[[psycopg.Connection[Any]], None],
        probe: Unit,
        connect_kwargs: dict[str, Any] | None = None,
        prepared_statements: bool = True,
    ) -> None:
        self.conninfo = conninfo
        self.pool_size = pool_size
        self.prepared_statements = prepared_statements
        self.prepare = prepare  # runs once before the workers start (migrations)
        self.probe = probe
        self.connect_kwargs = dict(connect_kwargs or {})
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._deferred: queue.SimpleQueue[tuple[Unit, int]] = queue.SimpleQueue()
        self._deferred_lock = threading.Lock()
        self._deferred_pending = 0
        self._condition = StoreCondition.OK
        self._condition_lock = threading.Lock()
        self._down_since = 0.0
        self._next_probe = 0.0
        self.threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        # Bumped whenever a worker finds its connection broken (see _main).
        self._generation = 0

    # -- lifecycle ---------------------------------------------------------------

    def connect(self) -> psycopg.Connection[Any]:
        """Open one connection configured for the units (autocommit outside transactions).

        Values travel apart from the statement (server-side binding), and a statement a
        connection has run `_PREPARE_AFTER` times is prepared on it: the server then
        skips parsing and planning it, and psycopg sends only its name and values
        (bench/pg_pipeline_cpu.py measures both). `prepared_statements=False` is for
        poolers that share server connections between sessions (PgBouncer in transaction
        mode); `_execute` switches to it when it meets one.
        """
        conn: psycopg.Connection[Any] = psycopg.connect(
            self.conninfo,
            autocommit=True,
            prepare_threshold=_PREPARE_AFTER if self.prepared_statements else None,
            **self.connect_kwargs,
        )
        # SUM and AVG of integers are NUMERIC in PostgreSQL: the units expect numbers
        # they can do float arithmetic with, as SQLite gives them.
        conn.adapters.register_loader("numeric", FloatLoader)
        return conn

    async def open(self) -> None:
        """Run `prepare` on a first connection, then start the workers."""
        if self.threads:
            raise RuntimeError("store is already open")
        self._loop = asyncio.get_running_loop()
        self._closing = False

        def first() -> None:
            conn = self.connect()
            try:
                self.prepare(conn)
            finally:
                conn.close()

        await asyncio.to_thread(first)
        for i in range(self.pool_size):
            thread = threading.Thread(target=self._main, name=f"pg-worker-{i}", daemon=True)
            self.threads.append(thread)
            thread.start()

    async def close(self) -> None:
        """Commit what is queued, then stop the workers."""
        if not self.threads:
            return
        self._closing = True
        if self._deferred_pending:
            self._queue.put(_DEFERRED)
        for _ in self.threads:
            self._queue.put(_STOP)
        for thread in self.threads:
            await asyncio.to_thread(thread.join)
        self.threads = []
        self._fail_leftovers(RuntimeError("store is closed"))

    @property
    def alive(self) -> bool:
        """Whether every worker runs."""
        return bool(self.threads) and all(t.is_alive() for t in self.threads)

    @property
    def accepting(self) -> bool:
        """Whether new units are taken."""
        return bool(self.threads) and not self._closing

    @property
    def condition(self) -> StoreCondition:
        """Return whether the database can commit (set by the last unit that tried)."""
        return self._condition

    @property
    def deferred_pending(self) -> int:
        """Count the items deferred units stand for that are not committed yet."""
        return self._deferred_pending

    # -- submitting --------------------------------------------------------------

    async def run(self, fn: Callable[[Any], T], *, read_only: bool = False) -> T:
        """Run a unit in its own transaction; return its result once committed.

        `read_only`: the unit only reads; it runs in a REPEATABLE READ READ ONLY
        transaction (a snapshot, no serializable bookkeeping).
        """
        if not self.accepting:
            raise RuntimeError("store is not open")
        assert self._loop is not None
        fut: asyncio.Future[T] = self._loop.create_future()
        self._queue.put((_read_only(fn) if read_only else fn, fut))
        return await fut

    def defer(self, fn: Unit, size: int = 1) -> None:
        """Queue a unit nobody waits for; a free worker commits the deferred ones together."""
        if not self.accepting:
            raise RuntimeError("store is not open")
        with self._deferred_lock:
            self._deferred_pending += size
        self._deferred.put((fn, size))
        self._queue.put(_DEFERRED)

    # -- the workers ---------------------------------------------------------------

    def _main(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        generation = self._generation
        try:
            while True:
                try:
                    item = self._queue.get(timeout=self._probe_wait())
                except queue.Empty:
                    item = None  # a probe is due
                if item is _STOP:
                    return
                if conn is not None and generation != self._generation:
                    # Another worker lost its connection since this one last worked: this
                    # one may be as dead (a restarted server, a cut network). A ping now
                    # costs one round trip; finding out with a caller's unit fails it.
                    conn = self._checked(conn)
                if conn is None or conn.closed:
                    conn = self._reconnect(item)
                    if conn is None:
                        continue
                generation = self._generation
                if item is None:
                    self._next_probe = time.monotonic() + _PROBE_INTERVAL
                    self._execute(conn, self.probe)
                elif item is _DEFERRED:
                    self._run_deferred(conn)
                else:
                    fn, fut = item
                    ok, value = self._execute(conn, fn)
                    assert self._loop is not None
                    self._loop.call_soon_threadsafe(_settle, fut, ok, value)
                if conn.closed or conn.broken:
                    self._generation += 1
                    conn.close()
                    conn = None
        finally:
            if conn is not None:
                conn.close()

    @staticmethod
    def _checked(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any] | None:
        """Return the connection if it still answers, else close it and return None."""
        try:
            conn.execute("SELECT 1")
        except psycopg.Error:
            conn.close()
            return None
        return conn

    def _reconnect(self, item: Any) -> psycopg.Connection[Any] | None:
        """Open the worker's connection; on failure fail the item it holds and pause."""
        try:
            return self.connect()
        except psycopg.Error as exc:
            condition = condition_of(exc) or StoreCondition.FAILING
            self._set_condition(condition, exc)
            unavailable = StoreUnavailable(condition, str(exc))
            unavailable.__cause__ = exc
            if item is _DEFERRED:
                self._queue.put(_DEFERRED)
            elif item is not None:
                _, fut = item
                assert self._loop is not None
                self._loop.call_soon_threadsafe(_settle, fut, False, unavailable)
            time.sleep(0.2)  # the server is away: do not spin
            return None

    def _execute(self, conn: psycopg.Connection[Any], fn: Unit) -> tuple[bool, Any]:
        """Run `fn` in a transaction, again after a lost serialization race."""
        if not self.prepared_statements and conn.prepare_threshold is not None:
            conn.prepare_threshold = None  # switched off since this connection opened
        wrapped = PgConnection(conn)
        for attempt in range(_MAX_RERUNS + 1):
            try:
                with conn.transaction():
                    value = fn(wrapped)
            except _RERUN as exc:
                if attempt == _MAX_RERUNS:
                    return False, exc
                time.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))
                continue
            except _LOST_PREPARED as exc:
                # Statements prepared on one session were found missing, or another
                # session's, on the server connection: a pooler hands the sessions' turns
                # to shared connections (PgBouncer in transaction mode, before 1.21 or
                # without max_prepared_statements). Statements are sent unprepared from
                # now on, on every connection, and the unit runs again.
                if conn.prepare_threshold is None:
                    return False, exc
                self._stop_preparing(exc)
                conn.prepare_threshold = None
                continue
            except pg_errors.FeatureNotSupported as exc:
                # A statement prepared on this connection reads `*` of a table another
                # instance has just altered (a rolling upgrade's migration). The rollback
                # made psycopg forget its prepared statements; the rerun prepares anew.
                if "cached plan must not change result type" not in str(exc) or attempt:
                    return False, exc
                continue
            except Exception as exc:
                condition = condition_of(exc)
                if condition is None:
                    return False, exc
                self._set_condition(condition, exc)
                unavailable = StoreUnavailable(condition, str(exc))
                unavailable.__cause__ = exc
                return False, unavailable
            self._set_condition(StoreCondition.OK, None)
            return True, value
        raise AssertionError("unreachable")

    def _stop_preparing(self, exc: Exception) -> None:
        """Send every statement unprepared from now on; say so once."""
        with self._condition_lock:
            if not self.prepared_statements:
                return
            self.prepared_statements = False
        log.warning(
            "store.prepared_statements_off",
            error=str(exc),
            hint="a connection pooler in transaction mode shares server connections "
            "between sessions; set [store] prepared_statements = false to start without them",
        )

    def _run_deferred(self, conn: psycopg.Connection[Any]) -> None:
        """Commit every deferred unit waiting, together; keep them if the store refused."""
        units: list[tuple[Unit, int]] = []
        while True:
            try:
                units.append(self._deferred.get_nowait())
            except queue.Empty:
                break
        if not units:
            return

        def together(c: Any) -> None:
            for fn, _ in units:
                fn(c)

        ok, error = self._execute(conn, together)
        if ok:
            with self._deferred_lock:
                self._deferred_pending -= sum(size for _, size in units)
        elif isinstance(error, StoreUnavailable):
            for unit in units:
                self._deferred.put(unit)
        else:
            log.error("store.deferred_unit_failed", size=len(units), exc_info=error)

    def _probe_wait(self) -> float | None:
        if self._condition is StoreCondition.OK:
            return None
        return max(0.0, self._next_probe - time.monotonic())

    def _set_condition(self, condition: StoreCondition, error: Exception | None) -> None:
        """Record the condition; log only a change."""
        with self._condition_lock:
            previous = self._condition
            if condition is previous:
                return
            self._condition = condition
        now = time.monotonic()
        if condition is not StoreCondition.OK:
            self._generation += 1  # every worker checks its connection before the next unit
        if previous is StoreCondition.OK:
            self._down_since = now
            self._next_probe = now + _PROBE_INTERVAL
        log_condition_change(previous, condition, error, now - self._down_since)

    def _fail_leftovers(self, exc: BaseException) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP and item is not _DEFERRED and item is not None:
                _settle(item[1], False, exc)


def _read_only(fn: Unit) -> Unit:
    """Wrap a unit so its transaction is a REPEATABLE READ, READ ONLY snapshot."""

    def unit(c: Any) -> Any:
        c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        return fn(c)

    return unit


def _settle(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    """Hand the waiting caller its unit's result (runs on the event loop)."""
    if fut.done():  # the caller was cancelled; the unit still ran (or failed)
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)
