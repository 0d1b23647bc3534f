"""What the web channel keeps of each conversation for its widget: a small SQLite log.

Every customer-bound send (acknowledgement, agent reply) and every message a
customer wrote through the widget is a row with a sequence number, filed under the
conversation's thread (a digest of the contact handle and the thread hint the
conversation token proves). A widget that reconnects asks for the rows after the
last sequence number it saw. A send is idempotent on the outbox's id, so a retried
send is stored and pushed once.

Writes go through one worker thread with `synchronous=FULL`: the outbox marks a send
done once `send()` returns, so the row must be on disk by then, and an fsync must not
stall the event loop. Rows that arrive while the thread is busy are written together,
in one transaction with one fsync (a group commit): under load one fsync and one
thread hop per row would cap the acknowledgements at the disk's sync rate and keep the
thread contending with the event loop for the GIL.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.codec import dumps

# Rows a reconnecting widget gets at most in one go (a longer history is cut at the start).
MAX_HISTORY = 500

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS messages("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    " thread TEXT NOT NULL,"
    " key TEXT NOT NULL UNIQUE,"  # outbox id of a send, or "in:" + a customer message key
    " kind TEXT NOT NULL,"  # customer | ack | reply
    " body TEXT NOT NULL,"  # JSON: text, ticket, minutes, id, ...
    " at REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS messages_thread ON messages(thread, seq)",
    "CREATE INDEX IF NOT EXISTS messages_at ON messages(at)",
)


# One row to add: thread, key, kind, JSON body, time, and the fields the body encodes.
_Row = tuple[str, str, str, str, float, dict[str, Any]]


class LogClosed(RuntimeError):
    """The log was closed (its channel stopped); a send is retried on the next instance."""


def thread_id(handle: str, hint: str) -> str:
    """Return the log's key for a conversation thread (handle and hint, digested)."""
    return hashlib.sha256(f"{handle}\x1f{hint}".encode("utf-8", "surrogatepass")).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Entry:
    """One row of a conversation as the widget shows it."""

    seq: int
    kind: str
    at: float
    fields: dict[str, Any]

    def frame(self) -> dict[str, Any]:
        """Return the WebSocket frame that carries this entry."""
        return {"type": "message", "seq": self.seq, "kind": self.kind, "at": self.at, **self.fields}


class WidgetLog:
    """The per-channel conversation log (`state_dir/web/<channel>/outbox.db`)."""

    def __init__(self, path: Path) -> None:
        """Remember the path; the file is opened by the first call, in the worker thread."""
        self.path = path
        self._db: sqlite3.Connection | None = None
        # One thread: SQLite calls are serialised and never block the loop.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="web-log")
        self._closed = False
        # Rows waiting for the next group commit, and the task that writes them.
        self._pending: list[tuple[_Row, asyncio.Future[tuple[Entry, bool]]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.commits = 0  # transactions written (a batch of rows is one)

    async def add(
        self, thread: str, key: str, kind: str, fields: dict[str, Any], at: float | None = None
    ) -> tuple[Entry, bool]:
        """Store a row unless its key is known; return the row and whether it is new."""
        if self._closed:
            raise LogClosed(f"{self.path} is closed")
        stamp = time.time() if at is None else at
        body = dumps(fields)
        future: asyncio.Future[tuple[Entry, bool]] = asyncio.get_running_loop().create_future()
        self._pending.append(((thread, key, kind, body, stamp, fields), future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name=f"web-log-{self.path.name}")
        return await future

    async def _flush(self) -> None:
        """Write the waiting rows, one transaction per batch, until none are left."""
        while self._pending:
            batch, self._pending = self._pending, []
            rows = [row for row, _ in batch]
            try:
                # Not _run(): rows added before close() are still written (close waits).
                results = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._add_many, rows
                )
            except asyncio.CancelledError:
                for _, future in batch:
                    future.cancel()
                raise
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():  # its caller gave up; the row is stored all the same
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    async def since(self, thread: str, seq: int, limit: int = MAX_HISTORY) -> list[Entry]:
        """Return the thread's rows after seq, oldest first (the last `limit` of them)."""
        return await self._run(self._since, thread, seq, limit)

    async def prune(self, before: float) -> int:
        """Delete rows older than `before` (Unix time); return how many went."""
        return await self._run(self._prune, before)

    @property
    def closed(self) -> bool:
        """Return whether close() was called."""
        return self._closed

    async def close(self) -> None:
        """Close the file and stop the worker thread (again: nothing happens)."""
        if self._closed:
            return
        self._closed = True  # new rows are refused; those already added are written first
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close)
        self._executor.shutdown(wait=False)

    async def _run(self, fn: Any, *args: Any) -> Any:
        if self._closed:
            raise LogClosed(f"{self.path} is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    # -- in the worker thread ----------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            for statement in _SCHEMA:
                db.execute(statement)
            self._db = db
        return self._db

    def _add_many(self, rows: list[_Row]) -> list[tuple[Entry, bool] | Exception]:
        """Store rows in one transaction; when one fails, each is written on its own."""
        db = self._conn()
        if len(rows) > 1:
            db.execute("BEGIN IMMEDIATE")
            try:
                results: list[tuple[Entry, bool] | Exception] = [self._add(db, *r) for r in rows]
                db.execute("COMMIT")
                self.commits += 1
                return results
            except Exception:  # one row is bad: roll back, then each row on its own
                if db.in_transaction:
                    db.execute("ROLLBACK")
        outcomes: list[tuple[Entry, bool] | Exception] = []
        for row in rows:
            try:
                outcomes.append(self._add(db, *row))
            except Exception as exc:
                outcomes.append(exc)
            else:
                self.commits += 1
        return outcomes

    @staticmethod
    def _add(
        db: sqlite3.Connection,
        thread: str,
        key: str,
        kind: str,
        body: str,
        at: float,
        fields: dict[str, Any],
    ) -> tuple[Entry, bool]:
        # One statement for a new row (the usual case); a repeated key reads the first one.
        added = db.execute(
            "INSERT INTO messages(thread, key, kind, body, at) VALUES (?,?,?,?,?) "
            "ON CONFLICT(key) DO NOTHING RETURNING seq",
            (thread, key, kind, body, at),
        ).fetchone()
        if added is not None:
            return Entry(int(added[0]), kind, float(at), fields), True
        row = db.execute("SELECT seq, kind, body, at FROM messages WHERE key=?", (key,)).fetchone()
        return Entry(int(row[0]), str(row[1]), float(row[3]), json.loads(row[2])), False

    def _since(self, thread: str, seq: int, limit: int) -> list[Entry]:
        rows = (
            self._conn()
            .execute(
                "SELECT seq, kind, body, at FROM messages WHERE thread=? AND seq>? "
                "ORDER BY seq DESC LIMIT ?",
                (thread, seq, limit),
            )
            .fetchall()
        )
        return [Entry(int(r[0]), str(r[1]), float(r[3]), json.loads(r[2])) for r in reversed(rows)]

    def _prune(self, before: float) -> int:
        return self._conn().execute("DELETE FROM messages WHERE at<?", (before,)).rowcount

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
