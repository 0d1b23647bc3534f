"""The SQLite backend: the shared SQL store (`SqlStore`) on the group-commit writer.

`router.store.writer` owns the thread, the connection and the group commit (batches,
savepoint retries, deferred units); `router.store.queries` holds the SQL, one function
per unit of work, and `SqlStore` names each operation. This class adds the lifecycle,
the migrations and the engine.

Deleting delivered outbox items (`outbox_done`) is deferred: the ids ride along with
the next commit instead of paying an fsync of their own, or are committed alone once
the writer has had nothing else to do for a moment. A delete lost in a crash only
makes the outbox send the item again under the same delivery id (receivers dedupe).

Health: `condition` (ok | full | readonly | failing, a `router.store.StoreCondition`)
says whether the store can commit; a call that meets a full, read-only or failing
database raises `router.store.StoreUnavailable` (answer 503 with its `retry_after`).
The condition returns to ok at the next committed write; while it is not ok the
writer tries a small one itself about once a second.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from router.store import StoreCondition
from router.store import queries as q
from router.store.migrations import migrate
from router.store.queries import insert_outbox as _insert_outbox  # noqa: F401  (tests use it)
from router.store.sql_store import SqlStore
from router.store.writer import Writer

T = TypeVar("T")


class SqliteStore(SqlStore):
    """The embedded store (WAL, synchronous=FULL by default)."""

    def __init__(
        self,
        path: Path | str,
        *,
        synchronous: str = "full",
        raw_max_bytes: int = 256 * 1024,
        instance: str = "",
    ) -> None:
        self.path = Path(path)
        self.instance = instance  # owns the outbox items it commits (router.leases)
        self.synchronous = synchronous.upper()
        self.raw_max_bytes = raw_max_bytes
        self.writer = Writer(
            self.path, synchronous=self.synchronous, prepare=self._prepare, probe=q.write_probe
        )
        self._secret: bytes | None = None

    # -- lifecycle ---------------------------------------------------------------

    async def open(self) -> None:
        """Open the database, migrate it, and start the writer thread."""
        if str(self.path) != ":memory:" and self.writer.thread is None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Create the file private before SQLite does: its -wal and -shm files copy its mode.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        await self.writer.open()

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """Bring the schema to the latest migration (on the writer's new connection)."""
        migrate(conn)
        if str(self.path) != ":memory:":
            os.chmod(self.path, 0o600)

    async def close(self) -> None:
        """Commit what is queued, then stop the writer."""
        await self.writer.close()

    @property
    def condition(self) -> StoreCondition:
        """Return whether the store can commit now (see `router.store.StoreCondition`)."""
        return self.writer.condition

    @property
    def alive(self) -> bool:
        """Whether the writer thread runs (the watchdog checks it)."""
        return self.writer.alive

    @property
    def batches(self) -> int:
        """Count commits made, for the benchmark's batch-size figure."""
        return self.writer.batches

    @property
    def units(self) -> int:
        """Count units committed (awaited ones), for the benchmark's batch-size figure."""
        return self.writer.units

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run one unit of work in the writer's next batch."""
        return await self.writer.run(fn)

    def _defer(self, fn: Callable[[sqlite3.Connection], Any], size: int) -> None:
        """Queue a unit to ride along with the writer's next commit."""
        if not self.writer.accepting:
            raise RuntimeError("store is not open")
        self.writer.defer(fn, size)

    @property
    def pending_deletes(self) -> int:
        """Count delivered outbox items whose delete is not committed yet (stop reports it)."""
        return self.writer.deferred_pending
