"""SQLite backend: one writer thread that commits whatever is queued as soon as it is free.

Why a thread of our own rather than a connection per call: SQLite allows one writer
at a time, and an fsync per message would cap ingest at the disk's sync rate. The
writer takes every unit of work queued since its last commit, runs them in one
transaction, commits once, and wakes all the waiting coroutines with one loop
callback. Under load the batches grow by themselves; at rest a single message is
committed at once (no timer, no idle CPU).

One bad unit fails alone: when a unit raises, the batch is rolled back and run again
with each unit inside its own SAVEPOINT. Units are plain functions of the database
(no effects outside it), so running one again gives the same outcome. The savepoints
are kept off the fast path because they cost more than the rest of an ingest unit:
every page a unit touches is first copied to SQLite's statement sub-journal.

Deleting delivered outbox items (`outbox_done`) is deferred: the ids ride along with
the next commit instead of paying an fsync of their own, or are committed alone once
the writer has had nothing else to do for a moment. A delete lost in a crash only
makes the outbox send the item again under the same delivery id (receivers dedupe).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from router.delivery import payload_from_dict, payload_to_dict, target_from_str
from router.model import Agent, Assignment, MessageState
from router.store import (
    DeadLetter,
    IngestResult,
    NewMessage,
    OpenConversation,
    OutboxItem,
    QueuedMessage,
    Snapshot,
    StoredMessage,
    TicketView,
)
from router.store.migrations import migrate

T = TypeVar("T")
Unit = Callable[[sqlite3.Connection], Any]
_MAX_BATCH = 512
_STOP = object()
_DEFERRED = object()  # wakes the writer: deferred outbox deletes are waiting
# How long deferred deletes wait for a commit to ride along with before committing alone.
_DEFERRED_IDLE = 0.1
_DELETE_CHUNK = 500  # ids per DELETE statement (SQLite's bound-parameter limit is higher)

# Built once: json.dumps with non-default arguments builds a new encoder on every call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_dumps = _ENCODER.encode


class SqliteStore:
    """The embedded store (WAL, synchronous=FULL by default)."""

    def __init__(
        self, path: Path | str, *, synchronous: str = "full", raw_max_bytes: int = 256 * 1024
    ) -> None:
        self.path = Path(path)
        self.synchronous = synchronous.upper()
        self.raw_max_bytes = raw_max_bytes
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # Ids of delivered outbox items whose delete has not been committed yet.
        self._deferred: queue.SimpleQueue[list[str]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._secret: bytes | None = None
        self._closing = False
        self.batches = 0  # commits made, for the benchmark's batch-size figure
        self.units = 0

    # -- lifecycle ---------------------------------------------------------------

    async def open(self) -> None:
        """Open the database, migrate it, and start the writer thread."""
        if self._thread is not None:
            raise RuntimeError("store is already open")
        self._loop = asyncio.get_running_loop()
        self._closing = False
        if str(self.path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Create the file private before SQLite does: its -wal and -shm files copy its mode.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        ready: asyncio.Future[None] = self._loop.create_future()
        thread = threading.Thread(
            target=self._writer, args=(ready,), name="sqlite-writer", daemon=True
        )
        self._thread = thread
        thread.start()
        try:
            await ready
        except BaseException:
            # Migration or connect failed: the writer has exited; leave the store closed so
            # later calls fail at once instead of queueing work nobody will run.
            await asyncio.to_thread(thread.join)
            self._thread = None
            raise

    async def close(self) -> None:
        """Commit what is queued, then stop the writer."""
        if self._thread is None:
            return
        self._closing = True  # new calls fail at once; queued ones still commit
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        self._fail_leftovers(RuntimeError("store is closed"))

    def _fail_leftovers(self, exc: BaseException) -> None:
        """Fail units still queued after the writer stopped (nobody will run them)."""
        leftovers: list[tuple[asyncio.Future[Any] | None, bool, Any]] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP and item is not _DEFERRED:
                leftovers.append((item[1], False, exc))
        if leftovers:
            _settle(leftovers)

    @property
    def alive(self) -> bool:
        """Whether the writer thread runs (the watchdog checks it)."""
        return self._thread is not None and self._thread.is_alive()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    def _writer(self, ready: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        conn: sqlite3.Connection | None = None
        try:
            conn = self._connect()
            migrate(conn)
            if str(self.path) != ":memory:":
                os.chmod(self.path, 0o600)
        except BaseException as exc:  # report any failure to open() rather than dying silently
            if conn is not None:
                conn.close()
            loop.call_soon_threadsafe(_set_exception, ready, exc)
            return
        loop.call_soon_threadsafe(_set_result, ready, None)
        try:
            stopping = False
            while not stopping:
                batch, stopping = self._collect(self._queue.get())
                if not batch and not stopping:
                    # Only deferred deletes: give them a moment to ride with real work.
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
                done = self._take_deferred()
                if done:
                    batch.insert(0, (functools.partial(_delete_outbox, ids=done), None))
                if batch:
                    self._run_batch(conn, batch)
        finally:
            conn.close()

    def _collect(self, first: Any) -> tuple[list[tuple[Unit, asyncio.Future[Any] | None]], bool]:
        """Return the units queued from `first` on (at most _MAX_BATCH), and whether to stop."""
        batch: list[tuple[Unit, asyncio.Future[Any] | None]] = []
        stopping = first is _STOP
        if not stopping and first is not _DEFERRED:
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

    def _take_deferred(self) -> list[str]:
        """Return every outbox id whose delete is waiting, and forget them."""
        ids: list[str] = []
        while True:
            try:
                ids.extend(self._deferred.get_nowait())
            except queue.Empty:
                return ids

    def _run_batch(
        self, conn: sqlite3.Connection, batch: list[tuple[Unit, asyncio.Future[Any] | None]]
    ) -> None:
        """Commit a batch in one transaction; a unit that raises fails alone.

        A unit without a future (deferred deletes) has nobody waiting for it.
        """
        try:
            results = self._run_fast(conn, batch)
        except _UnitFailed as failed:
            results = (
                self._run_isolated(conn, batch)
                if len(batch) > 1
                else [(batch[0][1], False, failed.error)]
            )
        except Exception as exc:  # the commit itself failed (disk full, I/O): nothing is durable
            results = [(fut, False, exc) for _, fut in batch]
        self.batches += 1
        self.units += sum(1 for _, fut in batch if fut is not None)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_settle, results)

    @staticmethod
    def _run_fast(
        conn: sqlite3.Connection, batch: list[tuple[Unit, asyncio.Future[Any] | None]]
    ) -> list[tuple[asyncio.Future[Any] | None, bool, Any]]:
        """Run every unit in one transaction without savepoints; raise _UnitFailed if one raises."""
        results: list[tuple[asyncio.Future[Any] | None, bool, Any]] = []
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

    @staticmethod
    def _run_isolated(
        conn: sqlite3.Connection, batch: list[tuple[Unit, asyncio.Future[Any] | None]]
    ) -> list[tuple[asyncio.Future[Any] | None, bool, Any]]:
        """Run the batch again, each unit inside a SAVEPOINT, so a failing one fails alone."""
        results: list[tuple[asyncio.Future[Any] | None, bool, Any]] = []
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

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._thread is None or self._closing:
            raise RuntimeError("store is not open")
        assert self._loop is not None
        fut: asyncio.Future[T] = self._loop.create_future()
        self._queue.put((fn, fut))
        return await fut

    # -- the interface -----------------------------------------------------------

    async def ping(self) -> bool:
        """Return True when the writer answers a trivial query."""
        return bool(await self._run(lambda c: c.execute("SELECT 1").fetchone()[0] == 1))

    async def secret(self) -> bytes:
        """Return the installation secret created by the first migration."""
        if self._secret is None:
            row = await self._run(
                lambda c: c.execute("SELECT value FROM meta WHERE key='secret'").fetchone()
            )
            self._secret = bytes.fromhex(row[0])
        return self._secret

    async def ingest(self, new: NewMessage) -> IngestResult:
        """Commit a message with its contact, conversation, assignment and outbox item."""
        raw = new.inbound.raw[: self.raw_max_bytes] if self.raw_max_bytes else b""
        return await self._run(lambda c: _ingest(c, new, raw))

    async def assign(self, assignment: Assignment, outbox: OutboxItem) -> bool:
        """Assign a queued message and queue its delivery in one transaction."""
        return await self._run(lambda c: _assign(c, assignment, outbox))

    async def resolve_conversation(self, conversation_id: str, at: float) -> str | None:
        """Close an open conversation and its messages; return the agent who held it."""

        def unit(c: sqlite3.Connection) -> str | None:
            row = c.execute(
                "SELECT agent_id FROM conversations WHERE id=? AND state='open'", (conversation_id,)
            ).fetchone()
            if row is None:
                return None
            c.execute(
                "UPDATE conversations SET state='resolved', resolved_at=?, updated_at=? WHERE id=?",
                (at, at, conversation_id),
            )
            c.execute(
                "UPDATE messages SET state='resolved' WHERE conversation_id=? AND "
                "state!='resolved'",
                (conversation_id,),
            )
            c.execute(
                "UPDATE assignments SET resolved_at=? WHERE conversation_id=? AND resolved_at IS "
                "NULL",
                (at, conversation_id),
            )
            return str(row[0]) if row[0] is not None else ""

        return await self._run(unit)

    async def withdraw_offer(
        self, message_id: str, agent_id: str, at: float, outcome: str
    ) -> list[str]:
        """Take back unaccepted assignments of the message's conversation from the agent."""

        def unit(c: sqlite3.Connection) -> list[str]:
            row = c.execute(
                "SELECT conversation_id FROM assignments WHERE message_id=? AND agent_id=? "
                "AND accepted_at IS NULL AND resolved_at IS NULL",
                (message_id, agent_id),
            ).fetchone()
            if row is None:
                return []
            conversation_id = row[0]
            rows = c.execute(
                "SELECT message_id, assigned_at FROM assignments WHERE conversation_id=? "
                "AND agent_id=? AND accepted_at IS NULL AND resolved_at IS NULL",
                (conversation_id, agent_id),
            ).fetchall()
            ids = [r[0] for r in rows]
            c.executemany(
                "INSERT INTO assignment_history(message_id, agent_id, assigned_at, ended_at, "
                "outcome) VALUES (?,?,?,?,?)",
                [(r[0], agent_id, r[1], at, outcome) for r in rows],
            )
            c.executemany("DELETE FROM assignments WHERE message_id=?", [(i,) for i in ids])
            c.executemany(
                "UPDATE messages SET state='queued' WHERE id=? AND state='assigned'",
                [(i,) for i in ids],
            )
            c.execute(
                "UPDATE conversations SET agent_id=NULL, updated_at=? WHERE id=? AND agent_id=?",
                (at, conversation_id, agent_id),
            )
            return ids

        return await self._run(unit)

    async def pending_offers(self) -> list[tuple[str, str, str, float]]:
        """Return (message id, conversation id, agent id, assigned at) of open offers."""

        def unit(c: sqlite3.Connection) -> list[tuple[str, str, str, float]]:
            rows = c.execute(
                "SELECT a.message_id, a.conversation_id, a.agent_id, a.assigned_at "
                "FROM assignments a JOIN conversations c ON c.id=a.conversation_id "
                "WHERE a.accepted_at IS NULL AND a.resolved_at IS NULL AND c.state='open' "
                "AND c.agent_id=a.agent_id ORDER BY a.assigned_at"
            ).fetchall()
            return [(r[0], r[1], r[2], float(r[3])) for r in rows]

        return await self._run(unit)

    async def timed_out_agents(self) -> dict[str, set[str]]:
        """Return, per queued message, the agents who let it time out."""

        def unit(c: sqlite3.Connection) -> dict[str, set[str]]:
            out: dict[str, set[str]] = {}
            for mid, agent in c.execute(
                "SELECT h.message_id, h.agent_id FROM assignment_history h "
                "JOIN messages m ON m.id=h.message_id "
                "WHERE m.state='queued' AND h.outcome='timeout'"
            ):
                out.setdefault(mid, set()).add(agent)
            return out

        return await self._run(unit)

    async def open_loads(self) -> dict[tuple[str, str], int]:
        """Count open conversations per (agent, channel type), whoever assigned them."""

        def unit(c: sqlite3.Connection) -> dict[tuple[str, str], int]:
            rows = c.execute(
                "SELECT agent_id, channel_type, COUNT(*) FROM conversations "
                "WHERE state='open' AND agent_id IS NOT NULL GROUP BY agent_id, channel_type"
            ).fetchall()
            return {(r[0], r[1]): int(r[2]) for r in rows}

        return await self._run(unit)

    async def accept(self, conversation_id: str, agent_id: str, at: float) -> bool:
        """Stamp accepted_at on the agent's open assignments in the conversation."""

        def unit(c: sqlite3.Connection) -> bool:
            cur = c.execute(
                "UPDATE assignments SET accepted_at=? WHERE conversation_id=? AND agent_id=? "
                "AND accepted_at IS NULL AND resolved_at IS NULL",
                (at, conversation_id, agent_id),
            )
            return cur.rowcount > 0

        return await self._run(unit)

    async def sync_agents(self, agents: list[Agent]) -> dict[str, bool]:
        """Upsert the roster from config; an agent's stored presence outlives restarts."""

        def unit(c: sqlite3.Connection) -> dict[str, bool]:
            for a in agents:
                c.execute(
                    "INSERT INTO agents(id, name, capacity, tool, present) VALUES (?,?,?,?,?) "
                    "ON CONFLICT(id) DO UPDATE SET name=excluded.name, capacity=excluded.capacity, "
                    "tool=excluded.tool",
                    (a.id, a.name, a.capacity, a.tool, int(a.present)),
                )
            ids = [a.id for a in agents]
            rows = c.execute(
                f"SELECT id, present FROM agents WHERE id IN ({','.join('?' * len(ids))})", ids
            ).fetchall()
            return {r[0]: bool(r[1]) for r in rows}

        return await self._run(unit)

    async def set_presence(self, agent_id: str, present: bool) -> bool:
        """Store an agent's presence."""
        return await self._run(
            lambda c: (
                c.execute(
                    "UPDATE agents SET present=? WHERE id=?", (int(present), agent_id)
                ).rowcount
                > 0
            )
        )

    async def snapshot(self, now: float, repeat_window: float) -> Snapshot:
        """Load what the router keeps in memory."""
        return await self._run(lambda c: _snapshot(c, now, repeat_window))

    async def due_outbox(self, now: float, limit: int) -> list[OutboxItem]:
        """Return pending outbox items due now, oldest first."""
        return await self._run(
            lambda c: [
                _outbox_item(r)
                for r in c.execute(
                    "SELECT id, target, agent_id, address, kind, payload, message_id, attempts, "
                    "next_attempt_at, created_at FROM outbox WHERE next_attempt_at<=? "
                    "ORDER BY next_attempt_at, id LIMIT ?",
                    (now, limit),
                )
            ]
        )

    async def outbox_done(self, ids: list[str]) -> None:
        """Delete delivered items: at once for every later call, durably with the next commit.

        The deletes ride along with the next batch instead of paying a commit (an fsync)
        of their own; with nothing else to commit they are committed alone shortly after.
        Every unit queued after this call sees the items gone. A crash before that
        commit only makes the outbox send them again under the same delivery ids.
        """
        if self._thread is None or self._closing:
            raise RuntimeError("store is not open")
        if ids:
            self._deferred.put(list(ids))
            self._queue.put(_DEFERRED)

    async def outbox_retry(
        self, item_id: str, attempts: int, next_attempt_at: float, error: str
    ) -> None:
        """Record a failed attempt."""
        await self._run(
            lambda c: c.execute(
                "UPDATE outbox SET attempts=?, next_attempt_at=?, last_error=? WHERE id=?",
                (attempts, next_attempt_at, error[:500], item_id),
            )
        )

    async def outbox_dead(self, item_id: str, attempts: int, reason: str, at: float) -> None:
        """Move an outbox item to dead_letters."""

        def unit(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT OR REPLACE INTO dead_letters(id, target, agent_id, address, kind, "
                "payload, message_id, "
                "attempts, reason, created_at, dead_at) SELECT id, target, agent_id, address, "
                "kind, payload, "
                "message_id, ?, ?, created_at, ? FROM outbox WHERE id=?",
                (attempts, reason[:1000], at, item_id),
            )
            c.execute("DELETE FROM outbox WHERE id=?", (item_id,))

        await self._run(unit)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """List dead letters, newest first."""
        rows = await self._run(
            lambda c: c.execute(
                "SELECT id, target, agent_id, kind, message_id, attempts, reason, created_at, "
                "dead_at, payload "
                "FROM dead_letters ORDER BY dead_at DESC, id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        )
        return [
            DeadLetter(
                id=r[0],
                target=r[1],
                agent_id=r[2],
                kind=r[3],
                message_id=r[4],
                attempts=r[5],
                reason=r[6],
                created_at=r[7],
                dead_at=r[8],
                payload=json.loads(r[9]),
            )
            for r in rows
        ]

    async def replay_dead_letters(self, ids: list[str] | None, at: float) -> int:
        """Move dead letters back to the outbox with a fresh attempt count."""

        def unit(c: sqlite3.Connection) -> int:
            where, args = (
                ("", ())
                if ids is None
                else (f"WHERE id IN ({','.join('?' * len(ids))})", tuple(ids))
            )
            c.execute(
                "INSERT OR IGNORE INTO outbox(id, target, agent_id, address, kind, payload, "
                "message_id, attempts, "
                "next_attempt_at, created_at) SELECT id, target, agent_id, address, kind, "
                "payload, message_id, 0, ?, "
                f"created_at FROM dead_letters {where}",
                (at, *args),
            )
            return c.execute(f"DELETE FROM dead_letters {where}", args).rowcount

        return await self._run(unit)

    async def ticket(self, conversation_id: str) -> TicketView | None:
        """Return the customer-visible status of a ticket."""

        def unit(c: sqlite3.Connection) -> TicketView | None:
            row = c.execute(
                "SELECT id, state, label, severity, opened_at, respond_by, agent_id, resolved_at, "
                "(SELECT COUNT(*) FROM messages m WHERE m.conversation_id=conversations.id) "
                "FROM conversations WHERE id=?",
                (conversation_id,),
            ).fetchone()
            if row is None:
                return None
            cid, state, label, severity, opened, respond_by, agent, resolved, count = row
            return TicketView(
                ticket=f"T-{cid}",
                state=state if state == "resolved" else ("assigned" if agent else "queued"),
                label=label,
                severity=severity,
                opened_at=opened,
                respond_by=respond_by,
                assigned=agent is not None,
                messages=count,
                resolved_at=resolved,
            )

        return await self._run(unit)

    async def stored_message(self, message_id: str) -> StoredMessage | None:
        """Return one message as the router rebuilds it (a queued message's delivery)."""
        row = await self.message(message_id)
        return None if row is None else StoredMessage.from_row(row)

    async def message(self, message_id: str) -> dict[str, Any] | None:
        """Return one message with classification and routing."""

        def unit(c: sqlite3.Connection) -> dict[str, Any] | None:
            c.row_factory = sqlite3.Row
            try:
                row = c.execute("SELECT * FROM messages WHERE id=?", (message_id,)).fetchone()
                if row is None:
                    return None
                out = {k: row[k] for k in row.keys() if k != "raw"}
                for k in ("scores", "signals", "features", "thread_refs"):  # JSON, decoded
                    out[k] = json.loads(out[k])
                contact = c.execute(
                    "SELECT handle, name FROM contacts WHERE key=?", (out["contact_key"],)
                ).fetchone()
                out["contact_handle"] = contact["handle"] if contact else ""
                out["contact_name"] = contact["name"] if contact else ""
                out["classification"] = {
                    "label": out["label"],
                    "confidence": out["confidence"],
                    "scores": out["scores"],
                    "severity": out["severity"],
                    "signals": out["signals"],
                    "language": out["language"],
                    "model_version": out["model_version"],
                    "features": out["features"],
                }
                a = c.execute(
                    "SELECT * FROM assignments WHERE message_id=?", (message_id,)
                ).fetchone()
                assignment = dict(a) if a else None
                if assignment is not None:
                    raw_explain = assignment.get("explain") or ""
                    assignment["explain"] = json.loads(raw_explain) if raw_explain else None
                out["assignment"] = assignment
                out["offer_history"] = [
                    dict(r)
                    for r in c.execute(
                        "SELECT agent_id, assigned_at, ended_at, outcome FROM assignment_history "
                        "WHERE message_id=? ORDER BY id",
                        (message_id,),
                    )
                ]
                out["attachments"] = [
                    dict(r)
                    for r in c.execute(
                        "SELECT name, mime_type, size, sha256, storage_ref FROM attachments "
                        "WHERE message_id=? ORDER BY rowid",
                        (message_id,),
                    )
                ]
                return out
            finally:
                c.row_factory = None

        return await self._run(unit)

    async def delivery_counts(self) -> dict[str, int]:
        """Return pending and dead outbox counts."""

        def unit(c: sqlite3.Connection) -> dict[str, int]:
            pending = c.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
            dead = c.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
            return {"pending": pending, "dead": dead}

        return await self._run(unit)

    async def count_messages(self, labels: list[str], since: float, until: float) -> int:
        """Count messages with one of these labels ingested in [since, until)."""
        if not labels:
            return 0
        marks = ",".join("?" * len(labels))

        def unit(c: sqlite3.Connection) -> int:
            row = c.execute(
                f"SELECT COUNT(*) FROM messages WHERE label IN ({marks}) "
                "AND ingested_at >= ? AND ingested_at < ?",
                (*labels, since, until),
            ).fetchone()
            return int(row[0])

        return await self._run(unit)

    async def enqueue_outbox(self, items: list[OutboxItem]) -> None:
        """Commit sends not tied to an ingest (alerts, relayed agent replies)."""

        def unit(c: sqlite3.Connection) -> None:
            for item in items:
                _insert_outbox(c, item)

        await self._run(unit)

    async def record_correction(
        self, message_id: str, label: str, agent_id: str, at: float
    ) -> bool:
        """Store an agent's relabelling of a message; False for an unknown message."""

        def unit(c: sqlite3.Connection) -> bool:
            row = c.execute("SELECT label FROM messages WHERE id=?", (message_id,)).fetchone()
            if row is None:
                return False
            c.execute(
                "INSERT INTO corrections(message_id, label, previous_label, agent_id, at) "
                "VALUES (?,?,?,?,?)",
                (message_id, label, row[0], agent_id, at),
            )
            return True

        return await self._run(unit)

    async def corrections(self) -> list[dict[str, Any]]:
        """Return the latest correction per message as training records (text, label, lang)."""

        def unit(c: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = c.execute(
                "SELECT m.id, m.subject, m.text, m.language, k.label, k.previous_label, "
                "k.agent_id, k.at FROM corrections k JOIN messages m ON m.id = k.message_id "
                "WHERE k.id = (SELECT MAX(id) FROM corrections WHERE message_id = k.message_id) "
                "ORDER BY k.id"
            ).fetchall()
            return [
                {
                    "id": r[0],
                    "text": f"{r[1]}\n{r[2]}" if r[1] else r[2],
                    "lang": r[3],
                    "label": r[4],
                    "previous_label": r[5],
                    "agent_id": r[6],
                    "at": r[7],
                    "source": "correction",
                }
                for r in rows
            ]

        return await self._run(unit)

    async def reply_context(self, conversation_id: str) -> dict[str, Any] | None:
        """Return where an answer in this conversation goes: channel, contact, subject, refs."""

        def unit(c: sqlite3.Connection) -> dict[str, Any] | None:
            row = c.execute(
                "SELECT m.id, m.channel, m.channel_type, ct.handle, ct.name, m.subject, "
                "m.reply_ref, m.thread_refs, m.language, cv.agent_id, cv.state, cv.thread_key "
                "FROM messages m "
                "JOIN contacts ct ON ct.key = m.contact_key "
                "JOIN conversations cv ON cv.id = m.conversation_id "
                "WHERE m.conversation_id=? ORDER BY m.id DESC LIMIT 1",
                (conversation_id,),
            ).fetchone()
            if row is None:
                return None
            return {
                "message_id": row[0],
                "channel": row[1],
                "channel_type": row[2],
                "handle": row[3],
                "name": row[4],
                "subject": row[5],
                "reply_ref": row[6],
                "thread_refs": json.loads(row[7] or "[]"),
                "language": row[8],
                "agent_id": row[9],
                "state": row[10],
                "thread_key": row[11],
            }

        return await self._run(unit)


# -- units of work (run on the writer thread) ------------------------------------


class _UnitFailed(Exception):
    """A unit raised in the fast path: the batch is run again with savepoints."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if any (a failed statement may have ended it)."""
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass


def _delete_outbox(c: sqlite3.Connection, ids: list[str]) -> None:
    for start in range(0, len(ids), _DELETE_CHUNK):
        chunk = ids[start : start + _DELETE_CHUNK]
        c.execute(f"DELETE FROM outbox WHERE id IN ({','.join('?' * len(chunk))})", chunk)


def _insert_outbox(c: sqlite3.Connection, o: OutboxItem) -> None:
    c.execute(
        "INSERT INTO outbox(id, target, agent_id, address, kind, payload, message_id, attempts, "
        "next_attempt_at, "
        "created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
        (
            o.id,
            str(o.target),
            o.agent_id,
            o.address,
            o.kind,
            _dumps(payload_to_dict(o.payload)),
            o.message_id,
            o.attempts,
            o.next_attempt_at,
            o.created_at,
        ),
    )


def _insert_assignment(c: sqlite3.Connection, a: Assignment) -> None:
    c.execute(
        "INSERT INTO assignments(message_id, conversation_id, agent_id, queue, reason, "
        "sla_deadline, assigned_at, explain) "
        "VALUES (?,?,?,?,?,?,?,?)",
        (
            a.message_id,
            a.conversation_id,
            a.agent_id,
            a.queue,
            a.reason,
            a.sla_deadline.timestamp(),
            a.assigned_at.timestamp(),
            _dumps(a.explain) if a.explain else "",
        ),
    )


def _has_room(c: sqlite3.Connection, a: Assignment, conversation_id: str) -> bool:
    """Tell whether the agent may take one more conversation (checked in the transaction).

    The scheduler in memory already checked; this is the check that holds when two
    workers (or two daemons on one database) decide at the same time. One indexed
    query: the agent's open conversations (of the pool), and whether this conversation
    is already one of them (a follow-up joins the slot it holds).
    """
    if a.capacity <= 0:
        return True
    if a.pool == "*":
        held, joins = c.execute(
            "SELECT COUNT(*), COALESCE(SUM(id=?), 0) FROM conversations "
            "WHERE agent_id=? AND state='open'",
            (conversation_id, a.agent_id),
        ).fetchone()
    else:
        held, joins = c.execute(
            "SELECT COUNT(*), COALESCE(SUM(id=?), 0) FROM conversations "
            "WHERE agent_id=? AND state='open' AND channel_type=?",
            (conversation_id, a.agent_id, a.pool),
        ).fetchone()
    return bool(joins) or int(held) < a.capacity


def _ingest(c: sqlite3.Connection, new: NewMessage, raw: bytes) -> IngestResult:
    m = new.inbound
    dup = c.execute(
        "SELECT id, conversation_id, state, payload_sha256 FROM messages WHERE channel=? AND "
        "external_id=?",
        (m.channel, m.external_id),
    ).fetchone()
    if dup is not None:
        conflict = bool(m.payload_sha256 and dup[3] and m.payload_sha256 != dup[3])
        return IngestResult(dup[0], dup[1], duplicate=True, state=dup[2], payload_conflict=conflict)

    contact_key = f"{m.channel_type}:{m.contact_handle}"
    c.execute(
        # A known contact is rewritten only when a new, different name comes with it.
        "INSERT INTO contacts(key, channel_type, handle, name, created_at) VALUES (?,?,?,?,?) "
        "ON CONFLICT(key) DO UPDATE SET name=excluded.name "
        "WHERE excluded.name!='' AND excluded.name!=contacts.name",
        (contact_key, m.channel_type, m.contact_handle, m.contact_name, new.ingested_at),
    )
    cls = new.classification
    conversation_id = new.conversation_id
    reopened = False
    row = c.execute(
        "SELECT id, state, agent_id FROM conversations WHERE channel=? AND thread_key=?",
        (m.channel, new.thread_key),
    ).fetchone()
    refused = new.assignment is not None and not _has_room(
        c, new.assignment, row[0] if row is not None else conversation_id
    )
    assignment = None if refused else new.assignment
    agent_id = assignment.agent_id if assignment else None
    if row is None:
        c.execute(
            "INSERT INTO conversations(id, channel, thread_key, contact_key, state, agent_id, "
            "label, severity, "
            "opened_at, updated_at, respond_by, channel_type) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                conversation_id,
                m.channel,
                new.thread_key,
                contact_key,
                "open",
                agent_id,
                cls.label,
                cls.severity,
                new.ingested_at,
                new.ingested_at,
                new.sla_deadline,
                m.channel_type,
            ),
        )
    else:
        conversation_id = row[0]
        reopened = row[1] != "open"
        if reopened:
            # A reopened ticket starts afresh: the new message's holder (or none), label,
            # severity and response deadline; the old ones belong to the resolved episode.
            c.execute(
                "UPDATE conversations SET state='open', resolved_at=NULL, updated_at=?, "
                "agent_id=?, label=?, severity=?, respond_by=? WHERE id=?",
                (
                    new.ingested_at,
                    agent_id,
                    cls.label,
                    cls.severity,
                    new.sla_deadline,
                    conversation_id,
                ),
            )
        else:
            # A follow-up keeps the conversation's holder unless the caller assigned anew,
            # and can only raise its severity (P0 < P3).
            c.execute(
                "UPDATE conversations SET updated_at=?, agent_id=COALESCE(?, agent_id), "
                "severity=MIN(severity, ?) WHERE id=?",
                (new.ingested_at, agent_id, cls.severity, conversation_id),
            )
    state = MessageState.ASSIGNED if assignment else MessageState.QUEUED
    c.execute(
        "INSERT INTO messages(id, channel, channel_type, external_id, payload_sha256, "
        "conversation_id, contact_key, "
        "subject, text, language, received_at, ingested_at, label, confidence, scores, severity, "
        "signals, "
        "model_version, features, queue, sla_deadline, state, raw, reply_ref, thread_refs) VALUES "
        "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (
            new.message_id,
            m.channel,
            m.channel_type,
            m.external_id,
            m.payload_sha256,
            conversation_id,
            contact_key,
            m.subject,
            m.text,
            cls.language,
            m.received_at.timestamp() if m.received_at else new.ingested_at,
            new.ingested_at,
            cls.label,
            cls.confidence,
            _dumps(cls.scores),
            cls.severity,
            _dumps([s.to_dict() for s in cls.signals]),
            cls.model_version,
            _dumps(cls.features),
            new.queue,
            new.sla_deadline,
            str(state),
            raw or None,
            m.reply_ref,
            _dumps(list(m.thread_refs)),
        ),
    )
    for att in m.attachments:
        c.execute(
            "INSERT INTO attachments(message_id, name, mime_type, size, sha256, storage_ref) "
            "VALUES (?,?,?,?,?,?)",
            (new.message_id, att.name, att.mime_type, att.size, att.sha256, att.storage_ref),
        )
    if assignment is not None:
        if conversation_id != assignment.conversation_id:
            assignment.conversation_id = conversation_id
        _insert_assignment(c, assignment)
    committed: list[OutboxItem] = []
    for outbox in (new.outbox, *new.extra_outbox):
        if outbox is None or (refused and outbox is new.outbox):
            continue  # no delivery for an assignment the store refused
        if conversation_id != new.conversation_id:
            # The payload names the conversation the message really joined; decided here,
            # in the commit, before anything is encoded.
            outbox = dataclasses.replace(
                outbox, payload=outbox.payload.with_conversation(conversation_id)
            )
        _insert_outbox(c, outbox)
        committed.append(outbox)
    return IngestResult(
        new.message_id,
        conversation_id,
        duplicate=False,
        state=str(state),
        reopened=reopened,
        assigned=not refused,
        outbox=tuple(committed),
    )


def _assign(c: sqlite3.Connection, a: Assignment, outbox: OutboxItem) -> bool:
    row = c.execute(
        "SELECT conversation_id FROM messages WHERE id=? AND state='queued'", (a.message_id,)
    ).fetchone()
    if row is None:
        return False
    # The message's own conversation, whatever the caller believed it to be.
    conversation_id = row[0]
    if not _has_room(c, a, conversation_id):
        return False
    c.execute("UPDATE messages SET state='assigned' WHERE id=?", (a.message_id,))
    c.execute(
        "UPDATE conversations SET agent_id=?, updated_at=? WHERE id=?",
        (a.agent_id, a.assigned_at.timestamp(), conversation_id),
    )
    if a.conversation_id != conversation_id:
        a = dataclasses.replace(a, conversation_id=conversation_id)
    _insert_assignment(c, a)
    _insert_outbox(c, outbox)
    return True


def _outbox_item(r: tuple[Any, ...]) -> OutboxItem:
    return OutboxItem(
        id=r[0],
        target=target_from_str(r[1]),
        agent_id=r[2],
        address=r[3],
        payload=payload_from_dict(r[4], json.loads(r[5])),
        message_id=r[6],
        attempts=r[7],
        next_attempt_at=r[8],
        created_at=r[9],
    )


def _snapshot(c: sqlite3.Connection, now: float, repeat_window: float) -> Snapshot:
    snap = Snapshot()
    snap.open_conversations = [
        OpenConversation(*r)
        for r in c.execute(
            "SELECT id, channel, thread_key, agent_id, channel_type FROM conversations "
            "WHERE state='open'"
        )
    ]
    snap.queued = [
        QueuedMessage(*r)
        for r in c.execute(
            "SELECT id, conversation_id, queue, label, severity, language, sla_deadline, "
            "ingested_at, channel_type "
            "FROM messages WHERE state='queued' ORDER BY id"
        )
    ]
    snap.pending_outbox = [
        _outbox_item(r)
        for r in c.execute(
            "SELECT id, target, agent_id, address, kind, payload, message_id, attempts, "
            "next_attempt_at, created_at "
            "FROM outbox ORDER BY next_attempt_at, id"
        )
    ]
    snap.recent_contacts = [
        (r[0], r[1])
        for r in c.execute(
            "SELECT contact_key, ingested_at FROM messages WHERE ingested_at>=? ORDER BY "
            "ingested_at",
            (now - repeat_window,),
        )
    ]
    snap.presence = {r[0]: bool(r[1]) for r in c.execute("SELECT id, present FROM agents")}
    return snap


def _settle(results: list[tuple[asyncio.Future[Any] | None, bool, Any]]) -> None:
    for fut, ok, value in results:
        if fut is None:  # nobody waits for it (deferred deletes)
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
