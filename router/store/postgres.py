"""The PostgreSQL backend: the shared SQL store (`SqlStore`) on a pool of connections.

For several router instances sharing the work: every instance opens the same
database; each unit of work is one SERIALIZABLE transaction (`router.store.pg_engine`),
so two instances can never assign one message twice or fill an agent past capacity.
Selected by `[store] url = "postgresql://…"` (or `store = "postgresql://…"`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg

from router.store import StoreCondition, StoreUnavailable
from router.store import queries as q
from router.store.pg_engine import PgEngine
from router.store.pg_migrations import migrate
from router.store.sql_store import SqlStore

T = TypeVar("T")


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
        application_name: str = "omnirouter",
        sslmode: str | None = None,
        sslrootcert: str | None = None,
    ) -> None:
        self.url = url
        self.raw_max_bytes = raw_max_bytes
        self._secret: bytes | None = None
        options = (
            "-c default_transaction_isolation=serializable "
            f"-c statement_timeout={int(statement_timeout * 1000)} "
            # A transaction left open by a stuck worker must not hold locks forever.
            f"-c idle_in_transaction_session_timeout={int(max(statement_timeout, 1) * 2000)}"
        )
        connect_kwargs: dict[str, Any] = {
            "options": options,
            "connect_timeout": max(1, int(connect_timeout)),
            "application_name": application_name,
        }
        if sslmode:
            connect_kwargs["sslmode"] = sslmode
        if sslrootcert:
            connect_kwargs["sslrootcert"] = sslrootcert
        self.engine = PgEngine(
            url,
            pool_size=pool_size,
            prepare=self._prepare,
            probe=probe,
            connect_kwargs=connect_kwargs,
        )

    def _prepare(self, conn: psycopg.Connection[Any]) -> None:
        migrate(conn)

    async def open(self) -> None:
        """Connect, migrate the schema (one instance at a time), start the workers."""
        await self.engine.open()

    async def close(self) -> None:
        """Commit what is queued, then close the connections."""
        await self.engine.close()

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

    async def _run(self, fn: Callable[[Any], T]) -> T:
        return await self.engine.run(fn)

    def _defer(self, fn: Callable[[Any], Any], size: int) -> None:
        self.engine.defer(fn, size)
