"""SQLite backend: one writer thread that commits whatever is queued as soon as it is free.

Why a thread of our own rather than a connection per call: SQLite allows one writer
at a time, and an fsync per message would cap ingest at the disk's sync rate. The
writer takes every unit of work queued since its last commit, runs each inside a
SAVEPOINT (one bad unit fails alone), commits once, and wakes all the waiting
coroutines with one loop callback. Under load the batches grow by themselves; at
rest a single message is committed at once (no timer, no idle CPU).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from router.model import Agent, Assignment, MessageState
from router.store import (
    DeadLetter,
    IngestResult,
    NewMessage,
    OpenConversation,
    OutboxItem,
    QueuedMessage,
    Snapshot,
    TicketView,
)
from router.store.migrations import migrate

T = TypeVar("T")
Unit = Callable[[sqlite3.Connection], Any]
_MAX_BATCH = 512
_STOP = object()


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class SqliteStore:
    """The embedded store (WAL, synchronous=FULL by default)."""

    def __init__(
        self, path: Path | str, *, synchronous: str = "full", raw_max_bytes: int = 256 * 1024
    ) -> None:
        self.path = Path(path)
        self.synchronous = synchronous.upper()
        self.raw_max_bytes = raw_max_bytes
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
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
        leftovers: list[tuple[asyncio.Future[Any], bool, Any]] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
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
                first = self._queue.get()
                batch = []
                if first is _STOP:
                    stopping = True
                else:
                    batch.append(first)
                while len(batch) < _MAX_BATCH:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stopping = True
                        continue
                    batch.append(item)
                if batch:
                    self._run_batch(conn, batch)
        finally:
            conn.close()

    def _run_batch(
        self, conn: sqlite3.Connection, batch: list[tuple[Unit, asyncio.Future[Any]]]
    ) -> None:
        results: list[tuple[asyncio.Future[Any], bool, Any]] = []
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
        except (
            Exception
        ) as exc:  # the commit itself failed (disk full, I/O): nobody's unit is durable
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            results = [(fut, False, exc) for _, fut in batch]
        self.batches += 1
        self.units += len(batch)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_settle, results)

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
        """Delete delivered items."""
        await self._run(
            lambda c: c.executemany("DELETE FROM outbox WHERE id=?", [(i,) for i in ids])
        )

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

    async def message(self, message_id: str) -> dict[str, Any] | None:
        """Return one message with classification and routing."""

        def unit(c: sqlite3.Connection) -> dict[str, Any] | None:
            c.row_factory = sqlite3.Row
            try:
                row = c.execute("SELECT * FROM messages WHERE id=?", (message_id,)).fetchone()
                if row is None:
                    return None
                out = {k: row[k] for k in row.keys() if k != "raw"}
                for k in ("scores", "signals", "features"):  # JSON columns, decoded
                    out[k] = json.loads(out[k])
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
                out["assignment"] = dict(a) if a else None
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


# -- units of work (run on the writer thread) ------------------------------------


def _insert_outbox(c: sqlite3.Connection, o: OutboxItem) -> None:
    c.execute(
        "INSERT INTO outbox(id, target, agent_id, address, kind, payload, message_id, attempts, "
        "next_attempt_at, "
        "created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
        (
            o.id,
            o.target,
            o.agent_id,
            o.address,
            o.kind,
            _dumps(o.payload),
            o.message_id,
            o.attempts,
            o.next_attempt_at,
            o.created_at,
        ),
    )


def _insert_assignment(c: sqlite3.Connection, a: Assignment) -> None:
    c.execute(
        "INSERT INTO assignments(message_id, conversation_id, agent_id, queue, reason, "
        "sla_deadline, assigned_at) "
        "VALUES (?,?,?,?,?,?,?)",
        (
            a.message_id,
            a.conversation_id,
            a.agent_id,
            a.queue,
            a.reason,
            a.sla_deadline.timestamp(),
            a.assigned_at.timestamp(),
        ),
    )


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
        "INSERT INTO contacts(key, channel_type, handle, name, created_at) VALUES (?,?,?,?,?) "
        "ON CONFLICT(key) DO UPDATE SET name=CASE WHEN excluded.name!='' THEN excluded.name ELSE "
        "contacts.name END",
        (contact_key, m.channel_type, m.contact_handle, m.contact_name, new.ingested_at),
    )
    cls = new.classification
    agent_id = new.assignment.agent_id if new.assignment else None
    conversation_id = new.conversation_id
    reopened = False
    row = c.execute(
        "SELECT id, state, agent_id FROM conversations WHERE channel=? AND thread_key=?",
        (m.channel, new.thread_key),
    ).fetchone()
    if row is None:
        c.execute(
            "INSERT INTO conversations(id, channel, thread_key, contact_key, state, agent_id, "
            "label, severity, "
            "opened_at, updated_at, respond_by) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
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
    state = MessageState.ASSIGNED if new.assignment else MessageState.QUEUED
    c.execute(
        "INSERT INTO messages(id, channel, channel_type, external_id, payload_sha256, "
        "conversation_id, contact_key, "
        "subject, text, language, received_at, ingested_at, label, confidence, scores, severity, "
        "signals, "
        "model_version, features, queue, sla_deadline, state, raw) VALUES "
        "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
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
        ),
    )
    for att in m.attachments:
        c.execute(
            "INSERT INTO attachments(message_id, name, mime_type, size, sha256, storage_ref) "
            "VALUES (?,?,?,?,?,?)",
            (new.message_id, att.name, att.mime_type, att.size, att.sha256, att.storage_ref),
        )
    if new.assignment is not None:
        assignment = new.assignment
        if conversation_id != assignment.conversation_id:
            assignment.conversation_id = conversation_id
        _insert_assignment(c, assignment)
    if new.outbox is not None:
        outbox = new.outbox
        if conversation_id != new.conversation_id:
            # The payload names the conversation the message really joined.
            payload = dict(
                outbox.payload, conversation_id=conversation_id, ticket=f"T-{conversation_id}"
            )
            outbox = OutboxItem(**{**_outbox_fields(outbox), "payload": payload})
        _insert_outbox(c, outbox)
    return IngestResult(
        new.message_id, conversation_id, duplicate=False, state=str(state), reopened=reopened
    )


def _outbox_fields(o: OutboxItem) -> dict[str, Any]:
    return {f: getattr(o, f) for f in OutboxItem.__dataclass_fields__}


def _assign(c: sqlite3.Connection, a: Assignment, outbox: OutboxItem) -> bool:
    row = c.execute(
        "SELECT conversation_id FROM messages WHERE id=? AND state='queued'", (a.message_id,)
    ).fetchone()
    if row is None:
        return False
    c.execute("UPDATE messages SET state='assigned' WHERE id=?", (a.message_id,))
    # The message's own conversation, whatever the caller believed it to be.
    conversation_id = row[0]
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
        target=r[1],
        agent_id=r[2],
        address=r[3],
        kind=r[4],
        payload=json.loads(r[5]),
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
            "SELECT id, channel, thread_key, agent_id FROM conversations WHERE state='open'"
        )
    ]
    snap.queued = [
        QueuedMessage(*r)
        for r in c.execute(
            "SELECT id, conversation_id, queue, label, severity, language, sla_deadline, "
            "ingested_at "
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


def _settle(results: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for fut, ok, value in results:
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
