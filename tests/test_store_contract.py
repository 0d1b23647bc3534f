"""Backend-agnostic contract tests for router.store.Store.

Every test goes through the `Store` protocol only; what differs between backends
(how to make a store on the same database again, how to read its schema version,
whether it batches commits) lives in a `Backend` helper. A PostgreSQL backend joins
by adding a param to the `backend` fixture and a `Backend` subclass.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from router.delivery import ToolTarget, payload_to_dict
from router.model import Agent, Assignment, Classification, InboundMessage, Signal, new_ulid
from router.store import NewMessage, OutboxItem, Store, TicketEvent
from router.store.migrations import latest_version
from router.store.sqlite import SqliteStore
from tests import payloads

T0 = 1_700_000_000.0  # a fixed "now" so windows and orderings are exact
HOUR = 3600.0


# -- backends ---------------------------------------------------------------------


class Backend:
    """How to build stores of one backend kind, all on the same database."""

    name = ""
    # One writer commits units in the order they were queued (SQLite); with a pool of
    # connections two concurrent units may commit either way round (PostgreSQL).
    commits_in_order = True

    def new(self, instance: str = "") -> Store:
        """Return a new, unopened store on this backend's database, for `instance`."""
        raise NotImplementedError

    def schema_version(self) -> int:
        """Return the schema version recorded in the database."""
        raise NotImplementedError

    def latest_schema_version(self) -> int:
        """Return the version the code's migrations reach."""
        raise NotImplementedError

    def batches(self, store: Store) -> int | None:
        """Return how many commits the store made, when it counts them (group commit)."""
        return None


class SqliteBackend(Backend):
    name = "sqlite"

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "state" / "router.db"

    def new(self, instance: str = "") -> Store:
        return SqliteStore(self.path, instance=instance)

    def schema_version(self) -> int:
        conn = sqlite3.connect(self.path)
        try:
            version: int = conn.execute("PRAGMA user_version").fetchone()[0]
            return version
        finally:
            conn.close()

    def latest_schema_version(self) -> int:
        return latest_version()

    def batches(self, store: Store) -> int | None:
        assert isinstance(store, SqliteStore)
        return store.batches


class PostgresBackend(Backend):
    name = "postgresql"
    commits_in_order = False

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def new(self, instance: str = "") -> Store:
        from router.store.postgres import PostgresStore

        # (Without an instance, a PostgreSQL store names itself pid-…: still no lease.)
        return PostgresStore(self.dsn, pool_size=2, instance=instance)

    def schema_version(self) -> int:
        import psycopg

        with psycopg.connect(self.dsn) as conn:
            row = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        assert row is not None
        return int(row[0])

    def latest_schema_version(self) -> int:
        from router.store.pg_migrations import latest_version as pg_latest

        return pg_latest()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    from tests.peers_pg import pg_server as find_server

    with find_server() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield SqliteBackend(tmp_path)
        return
    from tests.peers_pg import fresh_database

    with fresh_database(request.getfixturevalue("pg_server")) as dsn:
        yield PostgresBackend(dsn)


@pytest_asyncio.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    s = backend.new()
    await s.open()
    try:
        yield s
    finally:
        await s.close()


# -- building values ----------------------------------------------------------------


def dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def classification(
    label: str = "inquiry", severity: str = "P2", language: str = "en"
) -> Classification:
    return Classification(
        label=label,
        confidence=0.875,
        scores={"inquiry": 0.875, "complaint": 0.1, "suggestion": 0.025},
        severity=severity,
        signals=(Signal(kind="amount_over_threshold", evidence="$900", start=4, end=8, value=900),),
        language=language,
        model_version="rules-test-1",
        features=(("refund", 1.5),),
    )


def outbox_item(
    message_id: str,
    *,
    agent_id: str = "alice",
    conversation_id: str = "",
    next_attempt_at: float = T0,
    created_at: float = T0,
    item_id: str | None = None,
) -> OutboxItem:
    return OutboxItem(
        id=item_id or new_ulid(),
        target=ToolTarget("ops"),
        agent_id=agent_id,
        address=f"{agent_id}@agents.example",
        payload=payloads.assignment(
            1, agent=agent_id, conversation_id=conversation_id, message_id=message_id, text="héllo"
        ),
        message_id=message_id,
        next_attempt_at=next_attempt_at,
        created_at=created_at,
    )


def new_message(
    *,
    channel: str = "web",
    channel_type: str = "web",
    external_id: str | None = None,
    handle: str = "alice@example.com",
    contact_name: str = "Alice",
    thread_key: str | None = None,
    text: str = "Where is my parcel?",
    payload_sha256: str = "",
    label: str = "inquiry",
    severity: str = "P2",
    queue: str = "default",
    ingested_at: float = T0,
    sla: float = HOUR,
    assign_to: str | None = None,
    with_outbox: bool | None = None,
    outbox_id: str | None = None,
) -> NewMessage:
    """Build one ingest; `assign_to` adds an assignment and (by default) its outbox item."""
    message_id = new_ulid()
    conversation_id = new_ulid()
    external_id = external_id or f"ext-{message_id}"
    inbound = InboundMessage(
        channel=channel,
        channel_type=channel_type,
        external_id=external_id,
        contact_handle=handle,
        text=text,
        contact_name=contact_name,
        subject="Parcel",
        conversation_hint=thread_key or "",
        received_at=dt(ingested_at - 1),
        language="en",
        payload_sha256=payload_sha256,
        raw=b'{"raw": true}',
    )
    assignment = None
    if assign_to is not None:
        assignment = Assignment(
            message_id=message_id,
            conversation_id=conversation_id,
            agent_id=assign_to,
            queue=queue,
            reason="test",
            sla_deadline=dt(ingested_at + sla),
            assigned_at=dt(ingested_at),
        )
    if with_outbox is None:
        with_outbox = assign_to is not None
    outbox = None
    if with_outbox:
        outbox = outbox_item(
            message_id,
            agent_id=assign_to or "alice",
            conversation_id=conversation_id,
            next_attempt_at=ingested_at,
            created_at=ingested_at,
            item_id=outbox_id,
        )
    return NewMessage(
        message_id=message_id,
        inbound=inbound,
        conversation_id=conversation_id,
        thread_key=thread_key or f"thread-{external_id}",
        classification=classification(label, severity),
        queue=queue,
        sla_deadline=ingested_at + sla,
        ingested_at=ingested_at,
        assignment=assignment,
        outbox=outbox,
    )


def assignment_for(
    new: NewMessage, agent_id: str, at: float = T0 + 60, conversation_id: str | None = None
) -> Assignment:
    return Assignment(
        message_id=new.message_id,
        conversation_id=conversation_id or new.conversation_id,
        agent_id=agent_id,
        queue=new.queue,
        reason="least loaded",
        sla_deadline=dt(new.sla_deadline),
        assigned_at=dt(at),
    )


async def pending(store: Store) -> int:
    return (await store.delivery_counts())["pending"]


async def all_outbox(store: Store) -> list[OutboxItem]:
    return await store.due_outbox(float("inf"), 100_000)


# -- lifecycle and migrations ------------------------------------------------------------


async def test_open_migrates_to_latest_and_reopen_is_idempotent(backend: Backend) -> None:
    s = backend.new()
    await s.open()
    try:
        assert await s.ping() is True
        await s.ingest(new_message(external_id="keep-me"))
    finally:
        await s.close()
    assert backend.schema_version() == backend.latest_schema_version() >= 1
    for _ in range(2):  # re-opening migrates nothing and keeps the data
        s = backend.new()
        await s.open()
        try:
            snap = await s.snapshot(T0, HOUR)
            assert len(snap.queued) == 1
        finally:
            await s.close()
    assert backend.schema_version() == backend.latest_schema_version()


async def test_secret_is_stable_across_reopen(backend: Backend) -> None:
    s = backend.new()
    await s.open()
    try:
        first = await s.secret()
        assert isinstance(first, bytes)
        assert len(first) >= 16
        assert await s.secret() == first
    finally:
        await s.close()
    s = backend.new()
    await s.open()
    try:
        assert await s.secret() == first
    finally:
        await s.close()


async def test_calls_after_close_fail_fast(backend: Backend) -> None:
    s = backend.new()
    await s.open()
    await s.close()
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(s.ping(), 5)
    await s.close()  # closing twice is harmless


async def test_calls_racing_close_never_hang(backend: Backend) -> None:
    s = backend.new()
    await s.open()
    early = asyncio.ensure_future(s.ping())
    await asyncio.sleep(0)  # queued before close: it is answered
    closing = asyncio.ensure_future(s.close())
    await asyncio.sleep(0)
    late = asyncio.ensure_future(s.ping())  # while closing: answered or refused, never stuck
    done, _ = await asyncio.wait([early, late, closing], timeout=10)
    assert len(done) == 3
    assert early.result() is True
    exc = late.exception()
    assert exc is None or isinstance(exc, RuntimeError)


# -- ingest ----------------------------------------------------------------------------


async def test_ingest_new_message_creates_contact_conversation_message(store: Store) -> None:
    new = new_message(external_id="m-1", handle="+15550001", channel_type="sms", channel="sms")
    result = await store.ingest(new)
    assert result.duplicate is False
    assert result.payload_conflict is False
    assert result.reopened is False
    assert result.message_id == new.message_id
    assert result.conversation_id == new.conversation_id
    assert result.state == "queued"

    snap = await store.snapshot(T0, HOUR)
    assert [
        (c.conversation_id, c.channel, c.thread_key, c.agent_id) for c in snap.open_conversations
    ] == [(new.conversation_id, "sms", new.thread_key, None)]
    assert [q.message_id for q in snap.queued] == [new.message_id]
    q = snap.queued[0]
    assert (q.conversation_id, q.queue, q.label, q.severity, q.language) == (
        new.conversation_id,
        "default",
        "inquiry",
        "P2",
        "en",
    )
    assert q.sla_deadline == pytest.approx(T0 + HOUR)
    assert q.ingested_at == pytest.approx(T0)
    assert len(snap.recent_contacts) == 1
    contact_key, seen_at = snap.recent_contacts[0]
    assert "+15550001" in contact_key
    assert seen_at == pytest.approx(T0)
    assert snap.pending_outbox == []
    assert await store.delivery_counts() == {"pending": 0, "dead": 0}


async def test_a_known_handle_keeps_its_contact_and_takes_a_new_name_never_a_blank(
    store: Store,
) -> None:
    first = await store.ingest(new_message(handle="ann@example.com", contact_name="Ann"))
    renamed = await store.ingest(
        new_message(handle="ann@example.com", contact_name="Ann Lee", ingested_at=T0 + 1)
    )
    unnamed = await store.ingest(
        new_message(handle="ann@example.com", contact_name="", ingested_at=T0 + 2)
    )
    other = await store.ingest(new_message(handle="bob@example.com", contact_name="Bob"))
    assert first.contact is not None and renamed.contact is not None
    assert unnamed.contact is not None and other.contact is not None
    assert first.contact.person_id == renamed.contact.person_id == unnamed.contact.person_id
    assert other.contact.person_id != first.contact.person_id
    view = await store.contact("web:ann@example.com", T0)
    assert view is not None
    assert [(h["key"], h["name"]) for h in view["handles"]] == [("web:ann@example.com", "Ann Lee")]


async def test_a_new_conversation_is_audited_created_then_assigned(store: Store) -> None:
    new = new_message(assign_to="alice")
    await store.ingest(new)
    events = await store.ticket_events(new.conversation_id)
    assert [(e.kind, e.actor) for e in events] == [("created", "customer"), ("assigned", "router")]
    assert events[0].detail["message_id"] == new.message_id
    assert events[1].detail["agent"] == "alice"


async def test_ingest_with_assignment_and_outbox(store: Store) -> None:
    new = new_message(assign_to="alice")
    result = await store.ingest(new)
    assert result.state == "assigned"
    assert result.duplicate is False

    snap = await store.snapshot(T0, HOUR)
    assert snap.queued == []
    assert [(c.conversation_id, c.agent_id) for c in snap.open_conversations] == [
        (new.conversation_id, "alice")
    ]
    assert new.outbox is not None
    assert [o.id for o in snap.pending_outbox] == [new.outbox.id]
    item = snap.pending_outbox[0]
    assert item == new.outbox  # every field round-trips, payload included
    assert await store.delivery_counts() == {"pending": 1, "dead": 0}

    stored = await store.message(new.message_id)
    assert stored is not None
    assert stored["state"] == "assigned"
    assert stored["assignment"]["agent_id"] == "alice"
    assert stored["assignment"]["conversation_id"] == new.conversation_id


async def test_duplicate_ingest_writes_nothing_and_returns_first_ids(store: Store) -> None:
    first = new_message(external_id="dup-1", assign_to="alice", payload_sha256="aa" * 32)
    r1 = await store.ingest(first)
    before = await store.delivery_counts()
    snap_before = await store.snapshot(T0 + 10, HOUR)

    again = new_message(
        external_id="dup-1",
        assign_to="bob",
        payload_sha256="aa" * 32,
        thread_key="another-thread",
        ingested_at=T0 + 5,
    )
    r2 = await store.ingest(again)
    assert r2.duplicate is True
    assert r2.payload_conflict is False
    assert r2.message_id == r1.message_id == first.message_id
    assert r2.conversation_id == r1.conversation_id == first.conversation_id
    assert r2.state == "assigned"
    assert await store.delivery_counts() == before
    snap_after = await store.snapshot(T0 + 10, HOUR)
    assert snap_after.open_conversations == snap_before.open_conversations
    assert snap_after.recent_contacts == snap_before.recent_contacts
    assert await store.message(again.message_id) is None


async def test_duplicate_is_per_channel(store: Store) -> None:
    a = await store.ingest(new_message(channel="web-a", external_id="same"))
    b = await store.ingest(new_message(channel="web-b", external_id="same"))
    assert a.duplicate is False
    assert b.duplicate is False
    assert a.message_id != b.message_id


async def test_same_key_different_payload_is_a_conflict(store: Store) -> None:
    first = new_message(external_id="idem-7", payload_sha256="11" * 32)
    await store.ingest(first)
    other = new_message(external_id="idem-7", payload_sha256="22" * 32, text="something else")
    result = await store.ingest(other)
    assert result.duplicate is True
    assert result.payload_conflict is True
    assert result.message_id == first.message_id
    assert await store.message(other.message_id) is None
    stored = await store.message(first.message_id)
    assert stored is not None
    assert stored["text"] == first.inbound.text


async def test_follow_up_joins_open_conversation(store: Store) -> None:
    first = new_message(thread_key="chat-42", assign_to="alice")
    r1 = await store.ingest(first)
    follow = new_message(thread_key="chat-42", ingested_at=T0 + 30, severity="P1")
    r2 = await store.ingest(follow)
    assert r2.duplicate is False
    assert r2.reopened is False
    assert r2.conversation_id == r1.conversation_id == first.conversation_id
    assert r2.message_id == follow.message_id
    assert r2.state == "queued"

    snap = await store.snapshot(T0 + 30, HOUR)
    # One conversation, still held by alice; the follow-up waits in the queue.
    assert [(c.conversation_id, c.agent_id) for c in snap.open_conversations] == [
        (first.conversation_id, "alice")
    ]
    assert [(q.message_id, q.conversation_id) for q in snap.queued] == [
        (follow.message_id, first.conversation_id)
    ]
    ticket = await store.ticket(first.conversation_id)
    assert ticket is not None
    assert ticket.messages == 2
    assert ticket.severity == "P1"  # a more urgent follow-up raises the ticket's severity
    assert await store.ticket(follow.conversation_id) is None  # the proposed id was not used


async def test_follow_up_outbox_payload_names_the_joined_conversation(store: Store) -> None:
    first = new_message(thread_key="chat-7")
    await store.ingest(first)
    follow = new_message(thread_key="chat-7", assign_to="bob", ingested_at=T0 + 1)
    result = await store.ingest(follow)
    assert result.conversation_id == first.conversation_id
    items = await all_outbox(store)
    assert len(items) == 1
    assert items[0].payload.conversation_id == first.conversation_id
    assert payload_to_dict(items[0].payload)["ticket"] == "T-" + first.conversation_id
    assert result.outbox == (items[0],)  # what was committed is what the caller sends
    stored = await store.message(follow.message_id)
    assert stored is not None
    assert stored["assignment"]["conversation_id"] == first.conversation_id


async def test_resolved_conversation_is_reopened(store: Store) -> None:
    first = new_message(thread_key="mail-thread", assign_to="alice", severity="P0")
    await store.ingest(first)
    assert await store.resolve_conversation(first.conversation_id, T0 + 100) == "alice"
    resolved = await store.ticket(first.conversation_id)
    assert resolved is not None
    assert resolved.state == "resolved"
    assert resolved.resolved_at == pytest.approx(T0 + 100)

    again = new_message(thread_key="mail-thread", ingested_at=T0 + 200, severity="P3", sla=HOUR)
    result = await store.ingest(again)
    assert result.reopened is True
    assert result.duplicate is False
    assert result.conversation_id == first.conversation_id
    assert result.state == "queued"

    snap = await store.snapshot(T0 + 200, HOUR)
    # Reopened without a new assignment: nobody holds it until the scheduler picks someone.
    assert [(c.conversation_id, c.agent_id) for c in snap.open_conversations] == [
        (first.conversation_id, None)
    ]
    assert [q.message_id for q in snap.queued] == [again.message_id]
    ticket = await store.ticket(first.conversation_id)
    assert ticket is not None
    assert ticket.state == "queued"
    assert ticket.resolved_at is None
    assert ticket.messages == 2
    assert ticket.severity == "P3"  # the new episode's, not the resolved one's
    assert ticket.respond_by == pytest.approx(T0 + 200 + HOUR)
    # A later follow-up on the reopened conversation is a plain follow-up.
    third = await store.ingest(new_message(thread_key="mail-thread", ingested_at=T0 + 300))
    assert third.reopened is False
    assert third.conversation_id == first.conversation_id


async def test_reopened_with_new_assignment_takes_new_holder(store: Store) -> None:
    first = new_message(thread_key="t", assign_to="alice")
    await store.ingest(first)
    await store.resolve_conversation(first.conversation_id, T0 + 1)
    again = new_message(thread_key="t", assign_to="bob", ingested_at=T0 + 2)
    result = await store.ingest(again)
    assert result.reopened is True
    assert result.state == "assigned"
    snap = await store.snapshot(T0 + 2, HOUR)
    assert [c.agent_id for c in snap.open_conversations] == ["bob"]


# -- assignment lifecycle -------------------------------------------------------------


async def test_assign_only_once(store: Store) -> None:
    new = new_message()
    await store.ingest(new)
    ob1 = outbox_item(new.message_id, agent_id="alice", conversation_id=new.conversation_id)
    assert await store.assign(assignment_for(new, "alice"), ob1) is True
    ob2 = outbox_item(new.message_id, agent_id="bob", conversation_id=new.conversation_id)
    assert await store.assign(assignment_for(new, "bob"), ob2) is False  # no double assignment

    assert [o.id for o in await all_outbox(store)] == [ob1.id]  # the loser wrote nothing
    snap = await store.snapshot(T0, HOUR)
    assert snap.queued == []
    assert [c.agent_id for c in snap.open_conversations] == ["alice"]
    stored = await store.message(new.message_id)
    assert stored is not None
    assert stored["state"] == "assigned"
    assert stored["assignment"]["agent_id"] == "alice"
    assert stored["assignment"]["assigned_at"] == pytest.approx(T0 + 60)


async def test_assign_uses_the_messages_own_conversation(store: Store) -> None:
    first = new_message(thread_key="shared")
    await store.ingest(first)
    follow = new_message(thread_key="shared", ingested_at=T0 + 1)
    await store.ingest(follow)  # joined first's conversation, not its proposed id
    ob = outbox_item(follow.message_id, agent_id="bob")
    stale = assignment_for(follow, "bob", conversation_id=follow.conversation_id)
    assert await store.assign(stale, ob) is True
    stored = await store.message(follow.message_id)
    assert stored is not None
    assert stored["assignment"]["conversation_id"] == first.conversation_id
    snap = await store.snapshot(T0 + 1, HOUR)
    assert [(c.conversation_id, c.agent_id) for c in snap.open_conversations] == [
        (first.conversation_id, "bob")
    ]


async def test_assign_concurrently_exactly_one_wins(store: Store) -> None:
    new = new_message()
    await store.ingest(new)
    agents = [f"agent-{i}" for i in range(10)]
    results = await asyncio.gather(
        *(
            store.assign(
                assignment_for(new, a),
                outbox_item(new.message_id, agent_id=a, conversation_id=new.conversation_id),
            )
            for a in agents
        )
    )
    assert sorted(results) == [False] * 9 + [True]
    winner = agents[results.index(True)]
    items = await all_outbox(store)
    assert [o.agent_id for o in items] == [winner]


async def test_assign_unknown_or_resolved_message_is_false(store: Store) -> None:
    ghost = new_message()  # never ingested
    ob = outbox_item(ghost.message_id)
    assert await store.assign(assignment_for(ghost, "alice"), ob) is False

    new = new_message()
    await store.ingest(new)
    await store.resolve_conversation(new.conversation_id, T0 + 5)
    ob = outbox_item(new.message_id)
    assert await store.assign(assignment_for(new, "alice"), ob) is False
    assert await pending(store) == 0


async def test_resolve_returns_holder_then_none(store: Store) -> None:
    new = new_message(assign_to="carol")
    await store.ingest(new)
    assert await store.resolve_conversation(new.conversation_id, T0 + 10) == "carol"
    assert await store.resolve_conversation(new.conversation_id, T0 + 20) is None
    assert await store.resolve_conversation("no-such-conversation", T0 + 20) is None

    snap = await store.snapshot(T0 + 20, HOUR)
    assert snap.open_conversations == []
    assert snap.queued == []
    stored = await store.message(new.message_id)
    assert stored is not None
    assert stored["state"] == "resolved"
    assert stored["assignment"]["resolved_at"] == pytest.approx(T0 + 10)
    ticket = await store.ticket(new.conversation_id)
    assert ticket is not None
    assert ticket.resolved_at == pytest.approx(T0 + 10)  # the second call changed nothing


async def test_resolve_unheld_conversation(store: Store) -> None:
    new = new_message()
    await store.ingest(new)
    holder = await store.resolve_conversation(new.conversation_id, T0 + 1)
    assert holder == ""  # was open, nobody held it
    snap = await store.snapshot(T0 + 1, HOUR)
    assert snap.queued == []  # its queued message is resolved with it


async def test_accept(store: Store) -> None:
    new = new_message(assign_to="alice")
    await store.ingest(new)
    assert await store.accept(new.conversation_id, "bob", T0 + 5) is False  # not bob's
    assert await store.accept("no-such-conversation", "alice", T0 + 5) is False
    assert await store.accept(new.conversation_id, "alice", T0 + 5) is True
    assert await store.accept(new.conversation_id, "alice", T0 + 6) is False  # nothing new
    stored = await store.message(new.message_id)
    assert stored is not None
    assert stored["assignment"]["accepted_at"] == pytest.approx(T0 + 5)

    await store.resolve_conversation(new.conversation_id, T0 + 7)
    assert await store.accept(new.conversation_id, "alice", T0 + 8) is False


# -- agents ------------------------------------------------------------------------------


async def test_sync_agents_and_presence(store: Store) -> None:
    roster = [
        Agent(id="alice", name="Alice", capacity=3, tool="mqtt"),
        Agent(id="bob", name="Bob", capacity=2, tool="webhook", present=False),
    ]
    assert await store.sync_agents(roster) == {"alice": True, "bob": False}
    assert await store.set_presence("alice", False) is True
    assert await store.set_presence("nobody", True) is False

    # The stored presence wins over the config's on the next sync (e.g. after a restart).
    roster2 = [
        Agent(id="alice", name="Alice L.", capacity=5, tool="mqtt", present=True),
        Agent(id="bob", name="Bob", capacity=2, tool="webhook", present=True),
        Agent(id="dave", name="Dave", capacity=1, tool="inbox"),
    ]
    assert await store.sync_agents(roster2) == {"alice": False, "bob": False, "dave": True}
    snap = await store.snapshot(T0, HOUR)
    assert snap.presence == {"alice": False, "bob": False, "dave": True}
    assert await store.set_presence("bob", True) is True
    assert (await store.snapshot(T0, HOUR)).presence["bob"] is True
    assert await store.sync_agents([]) == {}


# -- snapshot ------------------------------------------------------------------------------


async def test_snapshot(store: Store) -> None:
    await store.sync_agents([Agent(id="alice", name="A", capacity=2, tool="mqtt")])
    old = new_message(handle="old@example.com", ingested_at=T0 - 2 * HOUR)
    held = new_message(handle="held@example.com", assign_to="alice", ingested_at=T0 - 60)
    queued_a = new_message(handle="q@example.com", ingested_at=T0 - 30, severity="P1")
    queued_b = new_message(handle="q@example.com", ingested_at=T0 - 20)
    done = new_message(handle="done@example.com", assign_to="alice", ingested_at=T0 - 10)
    for n in (old, held, queued_a, queued_b, done):
        await store.ingest(n)
    await store.resolve_conversation(done.conversation_id, T0 - 5)

    snap = await store.snapshot(T0, HOUR)
    opened = {c.conversation_id: c.agent_id for c in snap.open_conversations}
    assert opened == {
        old.conversation_id: None,
        held.conversation_id: "alice",
        queued_a.conversation_id: None,
        queued_b.conversation_id: None,
    }
    assert [q.message_id for q in snap.queued] == [
        old.message_id,
        queued_a.message_id,
        queued_b.message_id,
    ]
    assert held.outbox is not None
    assert done.outbox is not None
    # Pending outbox survives the resolve: the delivery was committed and must still be sent.
    assert {o.id for o in snap.pending_outbox} == {held.outbox.id, done.outbox.id}
    # Recent contacts: within [now - window, now]; the two-hour-old one is out.
    recent = sorted(t for _, t in snap.recent_contacts)
    assert recent == [T0 - 60, T0 - 30, T0 - 20, T0 - 10]
    keys = [k for k, _ in snap.recent_contacts]
    assert sum("q@example.com" in k for k in keys) == 2
    assert not any("old@example.com" in k for k in keys)
    assert snap.presence == {"alice": True}


async def test_snapshot_of_empty_store(store: Store) -> None:
    snap = await store.snapshot(T0, HOUR)
    assert snap.open_conversations == []
    assert snap.queued == []
    assert snap.pending_outbox == []
    assert snap.recent_contacts == []
    assert snap.presence == {}


# -- outbox ----------------------------------------------------------------------------------


async def seed_outbox(store: Store, times: list[float]) -> list[OutboxItem]:
    """Ingest one assigned message per time, its outbox item due at that time."""
    items = []
    for t in times:
        new = new_message(assign_to="alice", ingested_at=t)
        await store.ingest(new)
        assert new.outbox is not None
        items.append(new.outbox)
    return items


async def test_due_outbox_order_and_due_time(store: Store) -> None:
    late, early, mid = await seed_outbox(store, [T0 + 30, T0 + 10, T0 + 20])
    assert await store.due_outbox(T0, 10) == []
    assert [o.id for o in await store.due_outbox(T0 + 10, 10)] == [early.id]  # due at == now
    assert [o.id for o in await store.due_outbox(T0 + 25, 10)] == [early.id, mid.id]
    assert [o.id for o in await store.due_outbox(T0 + 99, 10)] == [early.id, mid.id, late.id]
    assert [o.id for o in await store.due_outbox(T0 + 99, 2)] == [early.id, mid.id]
    # Reading does not take them out: the same items are due again.
    assert len(await store.due_outbox(T0 + 99, 10)) == 3


async def test_outbox_done(store: Store) -> None:
    a, b, c = await seed_outbox(store, [T0, T0 + 1, T0 + 2])
    await store.outbox_done([a.id, c.id])
    assert [o.id for o in await all_outbox(store)] == [b.id]
    await store.outbox_done([])
    await store.outbox_done(["unknown", a.id])  # unknown and already-done ids are ignored
    assert await store.delivery_counts() == {"pending": 1, "dead": 0}


async def test_outbox_retry(store: Store) -> None:
    a, b = await seed_outbox(store, [T0, T0 + 1])
    await store.outbox_retry(a.id, 1, T0 + 60, "connection refused " * 100)
    assert [o.id for o in await store.due_outbox(T0 + 30, 10)] == [b.id]
    due = await store.due_outbox(T0 + 60, 10)
    assert [o.id for o in due] == [b.id, a.id]  # ordered by when they are due
    retried = due[1]
    assert retried.attempts == 1
    assert retried.next_attempt_at == pytest.approx(T0 + 60)
    assert retried.payload == a.payload
    assert retried.created_at == pytest.approx(a.created_at)


async def test_outbox_dead_and_dead_letters_newest_first(store: Store) -> None:
    a, b, c = await seed_outbox(store, [T0, T0 + 1, T0 + 2])
    await store.outbox_dead(a.id, 5, "HTTP 410 gone", T0 + 100)
    await store.outbox_dead(c.id, 7, "circuit open", T0 + 200)
    assert [o.id for o in await all_outbox(store)] == [b.id]
    assert await store.delivery_counts() == {"pending": 1, "dead": 2}

    dead = await store.dead_letters()
    assert [d.id for d in dead] == [c.id, a.id]
    first = dead[1]
    assert first.reason == "HTTP 410 gone"
    assert first.attempts == 5
    assert first.dead_at == pytest.approx(T0 + 100)
    assert first.created_at == pytest.approx(a.created_at)
    assert (first.target, first.agent_id, first.kind, first.message_id) == (
        str(a.target),
        a.agent_id,
        a.kind,
        a.message_id,
    )
    assert first.payload == payload_to_dict(a.payload)  # listed as its wire body
    assert [d.id for d in await store.dead_letters(limit=1)] == [c.id]
    await store.outbox_dead("unknown", 1, "x", T0)  # nothing to move, no error
    assert await store.delivery_counts() == {"pending": 1, "dead": 2}


async def test_replay_specific_dead_letters(store: Store) -> None:
    a, b, c = await seed_outbox(store, [T0, T0 + 1, T0 + 2])
    for item in (a, b, c):
        await store.outbox_dead(item.id, 5, "gave up", T0 + 50)
    assert await store.replay_dead_letters([a.id, "unknown"], T0 + 500) == 1
    assert await store.replay_dead_letters([], T0 + 500) == 0
    assert {d.id for d in await store.dead_letters()} == {b.id, c.id}
    items = await all_outbox(store)
    assert [o.id for o in items] == [a.id]  # same id: the idempotency key survives the replay
    assert items[0].attempts == 0
    assert items[0].next_attempt_at == pytest.approx(T0 + 500)
    assert items[0].payload == a.payload
    assert await store.due_outbox(T0 + 499, 10) == []


async def test_replay_all_dead_letters(store: Store) -> None:
    items = await seed_outbox(store, [T0, T0 + 1, T0 + 2])
    for item in items:
        await store.outbox_dead(item.id, 3, "gave up", T0 + 50)
    assert await store.replay_dead_letters(None, T0 + 60) == 3
    assert await store.dead_letters() == []
    assert await store.delivery_counts() == {"pending": 3, "dead": 0}
    assert {o.id for o in await store.due_outbox(T0 + 60, 10)} == {i.id for i in items}
    assert all(o.attempts == 0 for o in await all_outbox(store))
    assert await store.replay_dead_letters(None, T0 + 70) == 0
    # A replayed item can die again.
    await store.outbox_dead(items[0].id, 1, "again", T0 + 80)
    assert [(d.id, d.reason) for d in await store.dead_letters()] == [(items[0].id, "again")]


# -- read views ------------------------------------------------------------------------------


async def test_ticket_view(store: Store) -> None:
    assert await store.ticket("nope") is None
    new = new_message(label="complaint", severity="P1", ingested_at=T0, sla=2 * HOUR)
    await store.ingest(new)
    t = await store.ticket(new.conversation_id)
    assert t is not None
    assert t.ticket == f"T-{new.conversation_id}"
    assert t.state == "queued"
    assert t.label == "complaint"
    assert t.severity == "P1"
    assert t.opened_at == pytest.approx(T0)
    assert t.respond_by == pytest.approx(T0 + 2 * HOUR)
    assert t.assigned is False
    assert t.messages == 1
    assert t.resolved_at is None

    ob = outbox_item(new.message_id, conversation_id=new.conversation_id)
    assert await store.assign(assignment_for(new, "alice"), ob) is True
    t = await store.ticket(new.conversation_id)
    assert t is not None
    assert (t.state, t.assigned) == ("assigned", True)

    await store.resolve_conversation(new.conversation_id, T0 + 99)
    t = await store.ticket(new.conversation_id)
    assert t is not None
    assert t.state == "resolved"
    assert t.resolved_at == pytest.approx(T0 + 99)


async def test_message_for_explain(store: Store) -> None:
    assert await store.message("nope") is None
    new = new_message(external_id="explain-1", assign_to="alice", payload_sha256="ab" * 32)
    await store.ingest(new)
    m = await store.message(new.message_id)
    assert m is not None
    expected: dict[str, Any] = {
        "id": new.message_id,
        "channel": "web",
        "channel_type": "web",
        "external_id": "explain-1",
        "conversation_id": new.conversation_id,
        "text": new.inbound.text,
        "subject": "Parcel",
        "language": "en",
        "label": "inquiry",
        "severity": "P2",
        "model_version": "rules-test-1",
        "queue": "default",
        "state": "assigned",
    }
    assert {k: m[k] for k in expected} == expected
    assert m["confidence"] == pytest.approx(0.875)
    assert m["ingested_at"] == pytest.approx(T0)
    assert m["received_at"] == pytest.approx(T0 - 1)
    assert m["sla_deadline"] == pytest.approx(T0 + HOUR)
    cls = m["classification"]
    assert cls["label"] == "inquiry"
    assert cls["scores"] == {"inquiry": 0.875, "complaint": 0.1, "suggestion": 0.025}
    assert cls["signals"] == [
        {"kind": "amount_over_threshold", "evidence": "$900", "span": [4, 8], "value": 900}
    ]
    assert cls["features"] == [["refund", 1.5]]
    routing = m["assignment"]
    assert routing["agent_id"] == "alice"
    assert routing["queue"] == "default"
    assert routing["reason"] == "test"
    assert routing["sla_deadline"] == pytest.approx(T0 + HOUR)
    assert routing["assigned_at"] == pytest.approx(T0)
    assert routing["accepted_at"] is None
    assert "raw" not in m  # the raw payload is for audit, not for explain

    queued = new_message()
    await store.ingest(queued)
    m2 = await store.message(queued.message_id)
    assert m2 is not None
    assert m2["assignment"] is None
    assert m2["state"] == "queued"


async def test_delivery_counts(store: Store) -> None:
    assert await store.delivery_counts() == {"pending": 0, "dead": 0}
    a, _b = await seed_outbox(store, [T0, T0 + 1])
    assert await store.delivery_counts() == {"pending": 2, "dead": 0}
    await store.outbox_dead(a.id, 1, "x", T0 + 2)
    assert await store.delivery_counts() == {"pending": 1, "dead": 1}


# -- concurrency and durability ---------------------------------------------------------------


async def test_concurrent_ingests_all_commit(backend: Backend, store: Store) -> None:
    before = backend.batches(store)
    news = [
        new_message(
            handle=f"user{i % 20}@example.com",
            thread_key=f"thread-{i % 50}",  # 4 messages per thread: joins within the batch
            assign_to="alice" if i % 2 else None,
            ingested_at=T0 + i * 0.001,
        )
        for i in range(200)
    ]
    results = await asyncio.gather(*(store.ingest(n) for n in news))
    assert all(not r.duplicate for r in results)
    assert [r.message_id for r in results] == [n.message_id for n in news]
    # Each thread got exactly one conversation: the first message's.
    by_thread: dict[str, set[str]] = {}
    for n, r in zip(news, results, strict=True):
        by_thread.setdefault(n.thread_key, set()).add(r.conversation_id)
    assert all(len(ids) == 1 for ids in by_thread.values())
    for i in range(50):
        if backend.commits_in_order:
            assert by_thread[f"thread-{i}"] == {news[i].conversation_id}
        else:  # several connections: whichever message of the thread committed first
            assert by_thread[f"thread-{i}"] <= {n.conversation_id for n in news[i::50]}
    assert sum(r.reopened for r in results) == 0

    snap = await store.snapshot(T0 + 1, HOUR)
    assert len(snap.open_conversations) == 50
    assert len(snap.queued) == 100
    assert len(snap.pending_outbox) == 100
    assert len(snap.recent_contacts) == 200
    assert await store.delivery_counts() == {"pending": 100, "dead": 0}
    after = backend.batches(store)
    if before is not None and after is not None:
        assert after - before < 100  # group commit: far fewer commits than units


async def test_concurrent_duplicates_commit_once(store: Store) -> None:
    news = [new_message(external_id="same-key", assign_to="alice") for _ in range(20)]
    results = await asyncio.gather(*(store.ingest(n) for n in news))
    assert sum(not r.duplicate for r in results) == 1
    first = next(r for r in results if not r.duplicate)
    assert {r.message_id for r in results} == {first.message_id}
    assert await store.delivery_counts() == {"pending": 1, "dead": 0}


async def test_failing_unit_fails_alone(store: Store) -> None:
    taken = new_message(assign_to="alice")
    await store.ingest(taken)
    assert taken.outbox is not None
    good = [new_message(assign_to="alice", ingested_at=T0 + i) for i in range(1, 30)]
    # Reuses an outbox id (the primary key): a constraint violation after the message,
    # contact and conversation rows were written in the same unit.
    bad = new_message(
        handle="ghost@example.com", thread_key="ghost", assign_to="bob", outbox_id=taken.outbox.id
    )
    units = [*good[:15], bad, *good[15:]]
    results = await asyncio.gather(*(store.ingest(n) for n in units), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1
    assert results[15] is errors[0]
    assert not isinstance(errors[0], AssertionError)

    assert await store.message(bad.message_id) is None
    assert await store.ticket(bad.conversation_id) is None
    snap = await store.snapshot(T0 + 100, HOUR)
    assert not any("ghost" in k for k, _ in snap.recent_contacts)  # its contact rolled back
    assert not any(c.thread_key == "ghost" for c in snap.open_conversations)
    assert len(snap.open_conversations) == 30
    for n in good:
        assert await store.message(n.message_id) is not None
    assert await store.delivery_counts() == {"pending": 30, "dead": 0}
    # The store keeps working after the failure.
    assert await store.ping() is True


async def test_everything_survives_reopen(backend: Backend) -> None:
    s = backend.new()
    await s.open()
    try:
        await s.sync_agents([Agent(id="alice", name="A", capacity=2, tool="mqtt")])
        await s.set_presence("alice", False)
        held = new_message(assign_to="alice", thread_key="held")
        queued = new_message(thread_key="queued", ingested_at=T0 + 1)
        dead = new_message(assign_to="alice", thread_key="dead", ingested_at=T0 + 2)
        closed = new_message(assign_to="alice", thread_key="closed", ingested_at=T0 + 3)
        for n in (held, queued, dead, closed):
            await s.ingest(n)
        assert dead.outbox is not None
        assert closed.outbox is not None
        await s.outbox_dead(dead.outbox.id, 4, "gone", T0 + 10)
        await s.outbox_done([closed.outbox.id])
        await s.resolve_conversation(closed.conversation_id, T0 + 11)
        await s.accept(held.conversation_id, "alice", T0 + 12)
        secret = await s.secret()
        before = await s.snapshot(T0 + 20, HOUR)
        # Fire-and-close: units queued right before close still commit.
        last = new_message(thread_key="last", ingested_at=T0 + 13)
        pending_ingest = asyncio.ensure_future(s.ingest(last))
        await asyncio.sleep(0)
    finally:
        await s.close()
    assert (await pending_ingest).duplicate is False

    s = backend.new()
    await s.open()
    try:
        assert await s.secret() == secret
        after = await s.snapshot(T0 + 20, HOUR)
        reopened_open = {c.thread_key: c for c in after.open_conversations}
        assert set(reopened_open) == {"held", "queued", "dead", "last"}
        for c in before.open_conversations:
            assert reopened_open[c.thread_key] == c
        assert {q.message_id for q in after.queued} == {queued.message_id, last.message_id}
        assert after.pending_outbox == before.pending_outbox
        assert after.presence == {"alice": False}
        assert [d.id for d in await s.dead_letters()] == [dead.outbox.id]
        assert (await s.ingest(held)).duplicate is True
        ticket = await s.ticket(closed.conversation_id)
        assert ticket is not None
        assert ticket.state == "resolved"
        m = await s.message(held.message_id)
        assert m is not None
        assert m["assignment"]["accepted_at"] == pytest.approx(T0 + 12)
    finally:
        await s.close()


async def test_count_messages_by_label_and_time(store: Store) -> None:
    for i, (label, at) in enumerate(
        [("complaint", T0), ("complaint", T0 + 10), ("inquiry", T0 + 20), ("complaint", T0 + 30)]
    ):
        await store.ingest(new_message(label=label, ingested_at=at, handle=f"c{i}@example.com"))
    assert await store.count_messages(["complaint"], T0, T0 + 30) == 2  # until is exclusive
    assert await store.count_messages(["complaint", "inquiry"], T0, T0 + 31) == 4
    assert await store.count_messages([], T0, T0 + 31) == 0


async def test_corrections_keep_the_latest_word_per_message(store: Store) -> None:
    new = new_message(text="Could you add dark mode?")
    await store.ingest(new)
    assert not await store.record_correction("no-such-message", "complaint", "bo", T0)
    assert await store.record_correction(new.message_id, "complaint", "alice", T0)
    assert await store.record_correction(new.message_id, "suggestion", "bo", T0 + 1)
    [record] = await store.corrections()
    assert (record["label"], record["previous_label"], record["agent_id"]) == (
        "suggestion",
        "inquiry",
        "bo",
    )
    assert record["text"].endswith("Could you add dark mode?")  # subject + text


async def test_reply_context_names_the_channel_contact_and_refs(store: Store) -> None:
    new = new_message(handle="dana@example.com", assign_to="alice")
    await store.ingest(new)
    context = await store.reply_context(new.conversation_id)
    assert context is not None
    assert (context["channel"], context["handle"], context["agent_id"]) == (
        "web",
        "dana@example.com",
        "alice",
    )
    assert await store.reply_context("no-such-conversation") is None


# -- ticket lifecycle and audit ---------------------------------------------------------


async def kinds(store: Store, conversation_id: str) -> list[str]:
    return [e.kind for e in await store.ticket_events(conversation_id)]


async def test_every_transition_is_audited_with_who_and_status(store: Store) -> None:
    new = new_message(thread_key="t")
    await store.ingest(new)
    assert await store.assign(
        assignment_for(new, "bob"), outbox_item(new.message_id, agent_id="bob")
    )
    assert await store.accept(new.conversation_id, "bob", T0 + 70)
    reply = outbox_item("", agent_id="bob", conversation_id=new.conversation_id)
    assert not await store.reply(new.conversation_id, "alice", reply, T0 + 80)  # not hers
    assert await store.reply(new.conversation_id, "bob", reply, T0 + 80)
    assert await store.resolve_conversation(new.conversation_id, T0 + 90, actor="bob") == "bob"
    events = await store.ticket_events(new.conversation_id)
    assert [(e.kind, e.actor, e.status) for e in events] == [
        ("created", "customer", "new"),
        ("assigned", "router", "assigned"),
        ("accepted", "bob", "accepted"),
        ("replied", "bob", "waiting_on_customer"),
        ("resolved", "bob", "resolved"),
    ]
    assert events[1].detail["agent"] == "bob" and events[0].at == T0
    assert [e.at for e in events] == sorted(e.at for e in events)
    view = await store.ticket(new.conversation_id)
    assert view is not None and view.status == "resolved"
    assert await store.ticket_events("unknown") == []


async def test_a_reply_commits_its_send_and_waits_on_the_customer(store: Store) -> None:
    new = new_message(assign_to="bob")
    await store.ingest(new)
    reply = outbox_item("", agent_id="bob", conversation_id=new.conversation_id)
    assert await store.reply(new.conversation_id, "bob", reply, T0 + 5)
    assert reply.id in {i.id for i in await all_outbox(store)}
    assert await store.pending_offers() == []  # answering took the offer up
    follow = new_message(thread_key=new.thread_key, ingested_at=T0 + 10)
    await store.ingest(follow)
    assert (await kinds(store, new.conversation_id))[-1] == "customer_replied"


async def test_a_late_follow_up_closes_the_old_ticket_and_opens_a_new_one(store: Store) -> None:
    first = new_message(thread_key="t", assign_to="bob")
    await store.ingest(first)
    await store.resolve_conversation(first.conversation_id, T0 + 10)
    late = dataclasses.replace(
        new_message(thread_key="t", ingested_at=T0 + 3 * HOUR), reopen_since=T0 + HOUR
    )
    result = await store.ingest(late)
    assert not result.reopened and result.conversation_id == late.conversation_id
    assert (await kinds(store, first.conversation_id))[-1] == "closed"
    view = await store.ticket(first.conversation_id)
    assert view is not None and view.state == "closed" and view.status == "closed"
    # In the window it reopens, as before.
    await store.resolve_conversation(late.conversation_id, T0 + 3 * HOUR + 1)
    soon = dataclasses.replace(
        new_message(thread_key="t", ingested_at=T0 + 3 * HOUR + 60), reopen_since=T0 + 2 * HOUR
    )
    assert (await store.ingest(soon)).conversation_id == late.conversation_id


async def test_close_resolved_closes_old_ones_and_frees_the_thread(store: Store) -> None:
    old, recent = new_message(thread_key="a"), new_message(thread_key="b")
    for n in (old, recent):
        await store.ingest(n)
    await store.resolve_conversation(old.conversation_id, T0 + 10)
    await store.resolve_conversation(recent.conversation_id, T0 + 5 * HOUR)
    assert await store.close_resolved(T0 + HOUR, T0 + 6 * HOUR, 100) == [old.conversation_id]
    assert await store.close_resolved(T0 + HOUR, T0 + 6 * HOUR, 100) == []
    again = await store.ingest(new_message(thread_key="a", ingested_at=T0 + 7 * HOUR))
    assert again.conversation_id != old.conversation_id and not again.reopened


async def test_a_survey_answer_is_recorded_once_and_a_low_one_reopens(store: Store) -> None:
    for score, reopens in ((5, False), (1, True)):
        first = new_message(thread_key=f"s{score}", assign_to="bob")
        await store.ingest(first)
        survey = outbox_item("", agent_id="", conversation_id=first.conversation_id)
        await store.resolve_conversation(
            first.conversation_id, T0 + 10, survey=survey, survey_until=T0 + HOUR
        )
        assert survey.id in {i.id for i in await all_outbox(store)}
        snap = await store.snapshot(T0 + 20, HOUR)
        assert first.conversation_id in {s.conversation_id for s in snap.pending_surveys}
        answer = dataclasses.replace(
            new_message(thread_key=f"s{score}", ingested_at=T0 + 30),
            survey_of=first.conversation_id,
            survey_score=score,
        )
        result = await store.ingest(answer)
        assert result.survey_score == score and result.reopened is reopens
        view = await store.ticket(first.conversation_id)
        assert view is not None and view.score == score
        assert (view.state == "resolved") is not reopens
        events = await kinds(store, first.conversation_id)
        assert events[-2:] == (
            ["survey_answered", "reopened"] if reopens else ["survey_sent", "survey_answered"]
        )
        snap = await store.snapshot(T0 + 40, HOUR)
        assert first.conversation_id not in {s.conversation_id for s in snap.pending_surveys}


async def test_transfer_puts_the_messages_back_and_records_the_handover(store: Store) -> None:
    new = new_message(assign_to="bob")
    await store.ingest(new)
    ids = await store.transfer(new.conversation_id, "bob", "queue:billing", "billing", T0 + 5)
    assert ids == [new.message_id]
    snap = await store.snapshot(T0 + 5, HOUR)
    assert [(q.message_id, q.queue) for q in snap.queued] == [(new.message_id, "billing")]
    assert [c.agent_id for c in snap.open_conversations] == [None]
    events = await store.ticket_events(new.conversation_id)
    assert (events[-1].kind, events[-1].actor, events[-1].detail["from"]) == (
        "transferred",
        "bob",
        "bob",
    )
    stored = await store.message(new.message_id)
    assert stored is not None and stored["offer_history"][-1]["outcome"] == "transferred"
    assert await store.transfer("nope", "bob", "queue:x", "x", T0 + 6) == []


async def test_refusals_and_presence_are_kept_as_events(store: Store) -> None:
    new = new_message()
    await store.ingest(new)
    await store.record_event(
        TicketEvent(new.conversation_id, T0 + 1, "refused", "eve", "", {"reason": "not yours"})
    )
    await store.record_event(TicketEvent("", T0 + 2, "presence", "bob", "", {"presence": "on"}))
    last = (await store.ticket_events(new.conversation_id))[-1]
    assert (last.kind, last.actor, last.status, last.detail) == (
        "refused",
        "eve",
        "new",
        {"reason": "not yours"},
    )
    assert [e.kind for e in await store.ticket_events("")] == ["presence"]


async def test_an_answer_to_a_survey_no_longer_pending_is_an_ordinary_message(
    store: Store,
) -> None:
    first = new_message(thread_key="gone", assign_to="bob")
    await store.ingest(first)
    await store.resolve_conversation(first.conversation_id, T0 + 10)  # no survey sent
    late = dataclasses.replace(
        new_message(thread_key="gone", ingested_at=T0 + 3 * HOUR),
        reopen_since=T0 + HOUR,
        survey_of=first.conversation_id,
        survey_score=5,
    )
    result = await store.ingest(late)
    assert result.survey_score is None and result.state == "queued"
    assert result.conversation_id == late.conversation_id != first.conversation_id


# -- several instances on one database: leases and outbox ownership ------------------------

TTL = 15.0


@pytest_asyncio.fixture
async def two(backend: Backend) -> AsyncIterator[tuple[Store, Store]]:
    """Two instances, a and b, sharing the backend's database."""
    a, b = backend.new(instance="a"), backend.new(instance="b")
    await a.open()
    await b.open()
    try:
        yield a, b
    finally:
        await b.close()
        await a.close()


async def test_a_lease_has_one_holder_until_it_expires(two: tuple[Store, Store]) -> None:
    a, b = two
    assert await a.acquire_lease("channel:mail", "a", TTL, T0) is True
    assert await b.acquire_lease("channel:mail", "b", TTL, T0 + 1) is False
    assert await a.acquire_lease("channel:mail", "a", TTL, T0 + 5) is True  # renewed
    assert await b.leases(T0 + 5) == [("channel:mail", "a", pytest.approx(T0 + 5 + TTL))]
    assert await b.acquire_lease("channel:mail", "b", TTL, T0 + 19.9) is False
    # The renewal counted: at T0 + 15 it would have been free without it.
    assert await b.acquire_lease("channel:mail", "b", TTL, T0 + 20) is True  # expired: taken
    assert await a.acquire_lease("channel:mail", "a", TTL, T0 + 21) is False  # a lost it
    assert await a.leases(T0 + 21) == [("channel:mail", "b", pytest.approx(T0 + 20 + TTL))]
    await a.release_lease("channel:mail", "a")  # not a's: nothing happens
    assert [name for name, _, _ in await a.leases(T0 + 21)] == ["channel:mail"]
    await b.release_lease("channel:mail", "b")
    assert await a.leases(T0 + 21) == []
    assert await a.acquire_lease("channel:mail", "a", TTL, T0 + 22) is True  # free at once
    await a.release_lease("never-held", "a")  # no error


async def test_leases_lists_only_live_leases_by_name(two: tuple[Store, Store]) -> None:
    a, b = two
    assert await b.acquire_lease("tool:tg", "b", 30.0, T0)
    assert await a.acquire_lease("instance:a", "a", TTL, T0)
    assert await b.acquire_lease("instance:b", "b", TTL, T0)
    assert await a.leases(T0) == [
        ("instance:a", "a", pytest.approx(T0 + TTL)),
        ("instance:b", "b", pytest.approx(T0 + TTL)),
        ("tool:tg", "b", pytest.approx(T0 + 30)),
    ]
    assert [name for name, _, _ in await a.leases(T0 + TTL)] == ["tool:tg"]
    assert await a.leases(T0 + 30) == []


async def test_outbox_items_stay_with_their_live_instance(two: tuple[Store, Store]) -> None:
    a, b = two
    assert await a.acquire_lease("instance:a", "a", TTL, T0)
    assert await b.acquire_lease("instance:b", "b", 10 * TTL, T0)
    first, second = await seed_outbox(a, [T0, T0 + 1])
    # a's sends are a's while a lives: b neither scans nor restores them.
    assert await b.due_outbox(T0 + 2, 10) == []
    assert (await b.snapshot(T0 + 2, HOUR)).pending_outbox == []
    assert await a.due_outbox(T0 + 2, 10) == [first, second]
    assert (await a.snapshot(T0 + 2, HOUR)).pending_outbox == [first, second]
    # a stops renewing: once its lease has expired, b takes its sends over ...
    assert [o.id for o in await b.due_outbox(T0 + TTL, 10)] == [first.id, second.id]
    # ... and they are b's now: a, even back, no longer sends them.
    assert await a.due_outbox(T0 + TTL + 1, 10) == []
    assert await a.acquire_lease("instance:a", "a", TTL, T0 + TTL + 1)
    assert await a.due_outbox(T0 + TTL + 2, 10) == []
    assert [o.id for o in await b.due_outbox(T0 + TTL + 2, 10)] == [first.id, second.id]


async def test_unowned_and_ownerless_outbox_items_go_to_the_first_to_scan(
    backend: Backend, two: tuple[Store, Store]
) -> None:
    a, b = two
    assert await a.acquire_lease("instance:a", "a", TTL, T0)
    assert await b.acquire_lease("instance:b", "b", TTL, T0)
    # Committed by a process that is no instance ("" owns nothing: the CLI, an old store).
    anyone = backend.new()
    await anyone.open()
    try:
        (unowned,) = await seed_outbox(anyone, [T0])
        # Replayed dead letters are owned by whoever replays them.
        (replayed,) = await seed_outbox(a, [T0])
        await a.outbox_dead(replayed.id, 3, "gave up", T0)
        assert await anyone.replay_dead_letters(None, T0 + 1) == 1
    finally:
        await anyone.close()
    # An instance that never held a lease (it died before its first heartbeat).
    ghost = backend.new(instance="ghost")
    await ghost.open()
    try:
        (orphan,) = await seed_outbox(ghost, [T0 + 2])
    finally:
        await ghost.close()
    taken = await b.due_outbox(T0 + 3, 10)
    assert [o.id for o in taken] == [unowned.id, replayed.id, orphan.id]
    assert await a.due_outbox(T0 + 3, 10) == []  # b's now, and b lives
    assert await b.due_outbox(T0 + 3, 10) == taken  # still b's on the next scan


async def test_a_follow_up_placed_without_knowing_the_open_conversation_waits(
    store: Store,
) -> None:
    """Another instance placed a follow-up as a new thread: the holder keeps it (sticky)."""
    first = new_message(thread_key="t-sticky", assign_to="alice")
    await store.ingest(first)
    # Proposed a fresh conversation id (did not know the thread) and chose bob.
    blind = new_message(thread_key="t-sticky", assign_to="bob", ingested_at=T0 + 5)
    result = await store.ingest(blind)
    assert result.conversation_id == first.conversation_id
    assert not result.assigned and result.state == "queued"
    assert result.outbox == ()  # bob's delivery was not committed
    snap = await store.snapshot(T0 + 5, HOUR)
    assert [(c.conversation_id, c.agent_id) for c in snap.open_conversations] == [
        (first.conversation_id, "alice")
    ]
    assert [q.message_id for q in snap.queued] == [blind.message_id]
    # Knowing the conversation and its holder, a caller may still move it on purpose
    # (the holder went off line): that assignment stands.
    moved = new_message(thread_key="t-sticky", assign_to="bob", ingested_at=T0 + 9)
    moved = dataclasses.replace(moved, conversation_id=first.conversation_id)
    assert moved.assignment is not None
    moved.assignment.conversation_id = first.conversation_id
    again = await store.ingest(moved)
    assert again.assigned and again.state == "assigned"


async def test_a_streak_grown_meanwhile_refuses_the_assignment(store: Store) -> None:
    """Complaint rotation across instances: a decision made on a stale streak is refused."""
    streak = {"streak_limit": 3, "streak_labels": ("complaint",)}
    for i in range(3):  # alice already took three complaints in a row
        done = new_message(label="complaint", ingested_at=T0 + i, thread_key=f"s{i}")
        done = dataclasses.replace(
            done,
            assignment=dataclasses.replace(assignment_for(done, "alice", at=T0 + i)),
        )
        assert (await store.ingest(done)).assigned
    # Another instance decided on a streak of 1: the store knows it is 3 now.
    stale = new_message(label="complaint", ingested_at=T0 + 10, thread_key="s-stale")
    stale = dataclasses.replace(
        stale,
        assignment=dataclasses.replace(
            assignment_for(stale, "alice", at=T0 + 10), streak_seen=1, **streak
        ),
    )
    result = await store.ingest(stale)
    assert not result.assigned and result.state == "queued"
    # Seen right (3: the deciding instance knew, and had nobody else), it stands.
    aware = dataclasses.replace(assignment_for(stale, "alice", at=T0 + 11), streak_seen=3, **streak)
    item = outbox_item(stale.message_id, agent_id="alice", conversation_id=stale.conversation_id)
    assert await store.assign(aware, item)
    # An inquiry does not count towards the streak check at all.
    inquiry = new_message(label="inquiry", ingested_at=T0 + 12, thread_key="s-inq")
    inquiry = dataclasses.replace(
        inquiry,
        assignment=dataclasses.replace(
            assignment_for(inquiry, "alice", at=T0 + 12), streak_seen=0, **streak
        ),
    )
    assert (await store.ingest(inquiry)).assigned


async def test_routing_view_counts_every_instances_arrivals_per_class(store: Store) -> None:
    # Old news, then three complaints (one P1) and an inquiry within the window.
    await store.ingest(new_message(label="complaint", ingested_at=T0 - 2 * HOUR))
    for severity, at in (("P1", T0), ("P2", T0 + 1), ("P2", T0 + 2)):
        await store.ingest(new_message(label="complaint", severity=severity, ingested_at=at))
    await store.ingest(new_message(label="inquiry", channel_type="chat", ingested_at=T0 + 3))
    view = await store.routing_view(frozenset({"complaint"}), 4, T0 - HOUR, None, T0 - 600)
    assert sorted(view.arrivals) == [
        ("complaint", "P1", "en", "default", "web", 1),
        ("complaint", "P2", "en", "default", "web", 2),
        ("inquiry", "P2", "en", "default", "chat", 1),
    ]
    # A look at some conversations counts nothing (it is not the whole picture).
    scoped = await store.routing_view(
        frozenset({"complaint"}), 4, T0 - HOUR, frozenset({"none"}), T0 - 600
    )
    assert scoped.arrivals == []
