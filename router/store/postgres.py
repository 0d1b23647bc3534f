"""The PostgreSQL backend: the shared SQL store (`SqlStore`) on a pool of connections.

For several router instances sharing the work: every instance opens the same
database; each unit of work is one READ COMMITTED transaction that locks the rows it
is about to change (`router.store.portable.for_update`: the agent whose load grows,
the conversation, the queued message), so two instances can never assign one message
twice or fill an agent past capacity; unique keys settle the rest (a message stored
twice, a thread opened twice) and the losing unit runs again (`router.store.pg_engine`).
Selected by `[store] url = "postgresql://…"` (or `store = "postgresql://…"`).
"""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg

from router.store import StoreCondition, StoreUnavailable
from router.store import queries as q
from router.store.pg_engine import PgEngine
from router.store.pg_migrations import migrate
from router.store.sql_store import SqlStore

T = TypeVar("T")
# The LISTEN/NOTIFY channel on which instances announce committed routing changes.
CHANGES_CHANNEL = "omnirouter_changes"
# Changed conversations remembered between looks; beyond this a whole look is cheaper.
_MAX_CHANGED = 2000


def probe(c: Any) -> None:
    """A small write that tells whether the database commits again (the condition probe)."""
    c.execute("UPDATE meta SET value=value WHERE key='secret'")


class PostgresStore(SqlStore):
    """The store on a PostgreSQL database shared by every instance."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 4,
        statement_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        raw_max_bytes: int = 256 * 1024,
        sslmode: str | None = None,
        sslrootcert: str | None = None,
        instance: str = "",
        prepared_statements: bool = True,
    ) -> None:
        self.url = url
        # Names this instance in its change notices, so it ignores its own.
        self.instance = instance or f"pid-{os.getpid()}-{secrets.token_hex(4)}"
        self._callbacks: list[Callable[[], None]] = []
        self._changes_lock = threading.Lock()
        self._changed: set[str] = set()  # conversations other instances changed
        self._look_at_all = True  # nothing seen yet: the first look is a whole one
        self._listener: threading.Thread | None = None
        self._listening = threading.Event()  # set while the listener should run
        self._loop: asyncio.AbstractEventLoop | None = None
        self.raw_max_bytes = raw_max_bytes
        self._secret: bytes | None = None
        options = (
            f"-c statement_timeout={int(statement_timeout * 1000)} "
            # A transaction left open by a stuck worker must not hold locks forever.
            f"-c idle_in_transaction_session_timeout={int(max(statement_timeout, 1) * 2000)}"
        )
        connect_kwargs: dict[str, Any] = {
            "options": options,
            "connect_timeout": max(1, int(connect_timeout)),
            # Names this instance in the triggers' change notices (see pg_migrations).
            "application_name": self.instance[:63],
        }
        if sslmode:
            connect_kwargs["sslmode"] = sslmode
        if sslrootcert:
            connect_kwargs["sslrootcert"] = sslrootcert
        self.connect_kwargs = connect_kwargs
        self.engine = PgEngine(
            url,
            pool_size=pool_size,
            prepare=self._prepare,
            probe=probe,
            connect_kwargs=connect_kwargs,
            prepared_statements=prepared_statements,
        )

    def _prepare(self, conn: psycopg.Connection[Any]) -> None:
        migrate(conn)

    async def open(self) -> None:
        """Connect, migrate the schema (one instance at a time), start the workers."""
        await self.engine.open()
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        """Commit what is queued, then close the connections."""
        self._listening.clear()
        if self._listener is not None:
            await asyncio.to_thread(self._listener.join)
            self._listener = None
        await self.engine.close()

    # -- change notices between instances (LISTEN/NOTIFY) ------------------------------

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call `callback` on the loop when another instance commits a routing change.

        The database's triggers announce every change of a conversation, of a message's
        state and of an agent's presence (see pg_migrations); `take_changes` tells
        which. It is also called after the listener (re)connects: notices sent while it
        was not listening are lost, so the next look must be a whole one.
        """
        self._callbacks.append(callback)
        if self._listener is None:
            self._listening.set()
            self._listener = threading.Thread(target=self._listen, name="pg-listener", daemon=True)
            self._listener.start()

    def take_changes(self) -> frozenset[str] | None:
        """Return the conversations changed elsewhere since the last call (None: look at
        everything), and forget them. Presence is read whole at every look."""
        with self._changes_lock:
            changed = None if self._look_at_all else frozenset(self._changed)
            self._changed.clear()
            self._look_at_all = False
        return changed

    def _wake(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        for callback in self._callbacks:
            loop.call_soon_threadsafe(callback)

    def _listen(self) -> None:
        """Hold a connection that LISTENs; reconnect after a failure (the store's probe
        and workers report the outage; this only waits and tries again)."""
        while self._listening.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, **self.connect_kwargs) as conn:
                    conn.execute(f"LISTEN {CHANGES_CHANNEL}")
                    with self._changes_lock:
                        self._look_at_all = True  # whatever happened while not listening
                    self._wake()
                    while self._listening.is_set():
                        for notice in conn.notifies(timeout=1.0):
                            self._noted(notice.payload)
            except psycopg.Error:
                time.sleep(1.0)

    def _noted(self, payload: str) -> None:
        """Record one notice: "<instance> c <conversation id>" or "<instance> a <agent>"."""
        instance, _, rest = payload.partition(" ")
        if instance == self.instance:
            return
        kind, _, key = rest.partition(" ")
        # A presence notice ("a") only wakes the look: every look reads all agents.
        if kind == "c":
            with self._changes_lock:
                if len(self._changed) < _MAX_CHANGED:
                    self._changed.add(key)
                else:
                    self._look_at_all = True  # a flood: one whole look is cheaper
        self._wake()

    @property
    def condition(self) -> StoreCondition:
        """Return whether the store can commit now (see `router.store.StoreCondition`)."""
        return self.engine.condition

    @property
    def alive(self) -> bool:
        """Whether every worker thread runs (the watchdog checks it)."""
        return self.engine.alive

    @property
    def pending_deletes(self) -> int:
        """Count delivered outbox items whose delete is not committed yet (stop reports it)."""
        return self.engine.deferred_pending

    @property
    def shared(self) -> bool:
        """Several instances may share a PostgreSQL store."""
        return True

    async def outbox_done(self, ids: list[str]) -> None:
        """Delete delivered items in a commit of their own (deferred only if the store is down).

        With several connections a deferred delete could commit after a later unit on
        another connection reads the outbox; PostgreSQL batches the commits of
        concurrent transactions itself, so the delete is simply awaited.
        """
        if not ids:
            return
        unit = functools.partial(q.delete_outbox, ids=list(ids))
        try:
            await self.engine.run(unit)
        except StoreUnavailable:
            self.engine.defer(unit, len(ids))  # never dropped: committed when it is back

    async def _read(self, fn: Callable[[Any], T]) -> T:
        """Run a read in a REPEATABLE READ, READ ONLY transaction: one consistent
        snapshot, and no predicate locks that would make writers' SERIALIZABLE
        transactions fail and run again."""
        return await self.engine.run(fn, read_only=True)

    async def _run(self, fn: Callable[[Any], T]) -> T:
        return await self.engine.run(fn)

    def _defer(self, fn: Callable[[Any], Any], size: int) -> None:
        self.engine.defer(fn, size)
