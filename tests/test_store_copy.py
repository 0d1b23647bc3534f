"""`omnirouter store copy`: a SQLite store moved to PostgreSQL (and back) reads the same.

The source is built through the real store API (ingests with attachments and binary
raw payloads, assignments, offers taken back, resolutions, corrections, audit events,
dead letters, verified identifiers and a contact merge); the copy is then read through
the Store API of the other backend and compared call by call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from router.model import Agent, Attachment
from router.store import Snapshot, Store, TicketEvent
from router.store.copy import CopyError, Endpoint, copy_store, parse_endpoint
from router.store.migrations import MIGRATIONS, latest_version, migrate
from router.store.sqlite import SqliteStore
from tests.test_store_contract import HOUR, T0, assignment_for, new_message

psycopg = pytest.importorskip("psycopg")

NOW = T0 + 10 * HOUR
IDENTITIES = (
    ("attachments", "rowid"),
    ("corrections", "id"),
    ("assignment_history", "id"),
    ("ticket_events", "id"),
    ("contact_events", "id"),
)


@pytest.fixture(scope="module")
def pg_server() -> Iterator[Any]:
    from tests.peers_pg import pg_server as find_server

    with find_server() as server:
        yield server


@pytest.fixture
def dsn(pg_server: Any) -> Iterator[str]:
    from tests.peers_pg import fresh_database

    with fresh_database(pg_server) as url:
        yield url


@dataclasses.dataclass
class Built:
    """What the source store holds, to read back from the copy."""

    messages: list[str]
    conversations: list[str]
    contacts: list[str]


def _with(new: Any, **inbound: Any) -> Any:
    return dataclasses.replace(new, inbound=dataclasses.replace(new.inbound, **inbound))


async def build(store: Store, n: int = 12) -> Built:
    """Fill a store the way a running router does, through its API only."""
    await store.sync_agents(
        [
            Agent(id="alice", name="Alice", capacity=50, tool="mqtt"),
            Agent(id="bob", name="Bob", capacity=50, tool="mqtt"),
        ]
    )
    built = Built([], [], [])
    for i in range(n):
        agent = ("alice", "bob", None)[i % 3]
        new = new_message(
            channel="email" if i % 2 else "web",
            channel_type="email" if i % 2 else "web",
            handle=f"customer{i % 4}@example.com",
            thread_key=f"thread-{i}",
            text=f"Message {i}: where is my parcel? «ünïcode» 100%",
            ingested_at=T0 + i * 60,
            assign_to=agent,
        )
        new = _with(
            new,
            attachments=(
                Attachment("invoice.pdf", "application/pdf", 1000 + i, f"{i:064x}", f"ref-{i}"),
                Attachment("photo.jpg", "image/jpeg", 2000 + i, f"{i + 1:064x}"),
            ),
            # Every byte value, backslashes and NULs included, must survive bytea.
            raw=bytes(range(256)) + b"\\x00\\\\" + bytes([i]),
            identifiers=(f"email:customer{i % 4}@example.com",) if i % 2 else (),
            reply_ref=f"<m{i}@example.com>",
            thread_refs=(f"<t{i}@example.com>",),
        )
        await store.ingest(new)
        built.messages.append(new.message_id)
        built.conversations.append(new.conversation_id)
        if agent is None and i % 2 == 0:
            await store.assign(assignment_for(new, "alice", T0 + i * 60 + 5), _outbox(new))
            await store.withdraw_offer(new.message_id, "alice", T0 + i * 60 + 65, "timeout")
        if agent == "alice":
            await store.accept(new.conversation_id, "alice", T0 + i * 60 + 10)
        if i % 4 == 0 and agent is not None:
            await store.resolve_conversation(new.conversation_id, T0 + i * 60 + 30, actor=agent)
        if i % 5 == 0:
            await store.record_correction(new.message_id, "complaint", "bob", T0 + i * 60 + 40)
        await store.record_event(
            TicketEvent(new.conversation_id, T0 + i * 60 + 50, "refused", "bob", "", {"n": i})
        )
        if new.outbox is not None and i % 3 == 1:
            await store.outbox_dead(new.outbox.id, 5, "broker gone", T0 + i * 60 + 55)
    await store.record_event(TicketEvent("", T0 + 1, "presence", "bob", "", {"presence": "off"}))
    change = await store.merge_contacts(
        "email:customer1@example.com", "web:customer0@example.com", "alice", "same person", T0
    )
    assert change.ok, change
    built.contacts = [f"{t}:customer{k}@example.com" for t in ("web", "email") for k in range(4)]
    return built


def _outbox(new: Any) -> Any:
    from tests.test_store_contract import outbox_item

    return outbox_item(new.message_id, agent_id="alice", conversation_id=new.conversation_id)


async def readback(store: Store, built: Built) -> dict[str, Any]:
    """Everything the Store API tells about the built store."""
    out: dict[str, Any] = {
        "secret": await store.secret(),
        "snapshot": _unordered(await store.snapshot(NOW, 24 * HOUR)),
        "dead": await store.dead_letters(1000),
        "outbox": await store.due_outbox(float("inf"), 100_000),
        "counts": await store.delivery_counts(),
        "corrections": await store.corrections(),
        "agent_events": await store.ticket_events(""),
    }
    for m in built.messages:
        out[f"message {m}"] = await store.message(m)
        out[f"stored {m}"] = await store.stored_message(m)
    for c in built.conversations:
        out[f"ticket {c}"] = await store.ticket(c)
        out[f"events {c}"] = await store.ticket_events(c)
        out[f"reply {c}"] = await store.reply_context(c)
    for ref in built.contacts:
        out[f"contact {ref}"] = await store.contact(ref, T0 - HOUR)
    return out


def _unordered(snapshot: Snapshot) -> Snapshot:
    """Sort the contact book's rows: their queries promise no order (a set is rebuilt)."""
    for name in ("contact_handles", "contact_identifiers", "contact_links"):
        setattr(snapshot, name, sorted(getattr(snapshot, name)))
    return snapshot


def _postgres(dsn: str) -> Store:
    from router.store.postgres import PostgresStore

    return PostgresStore(dsn, pool_size=2)


async def _read(store: Store, built: Built) -> dict[str, Any]:
    await store.open()
    try:
        return await readback(store, built)
    finally:
        await store.close()


async def _source(tmp_path: Path, n: int = 12) -> tuple[Path, Built, dict[str, Any]]:
    path = tmp_path / "state" / "omnirouter.db"
    store = SqliteStore(path)
    await store.open()
    try:
        built = await build(store, n)
        return path, built, await readback(store, built)
    finally:
        await store.close()


def _row_counts(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
            )
        ]
        counts: dict[str, int] = {}
        for t in tables:
            row = conn.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()
            assert row is not None
            counts[t] = row[0]
        return counts


# -- the copy ---------------------------------------------------------------------------


async def test_sqlite_to_postgresql_reads_back_the_same_and_keeps_working(
    tmp_path: Path, dsn: str
) -> None:
    path, built, before = await _source(tmp_path)
    assert before["dead"] and before["corrections"] and before["outbox"]

    report = copy_store(f"sqlite:{path}", dsn)

    assert report.messages == len(built.messages)
    copied = dict(report.tables)
    assert copied["attachments"] == 2 * len(built.messages)
    assert copied["meta"] == 1 and "schema_migrations" not in copied
    assert report.source_migrated is None
    order = [name for name, _ in report.tables]
    for first, then in (
        ("people", "contacts"),
        ("contacts", "conversations"),
        ("conversations", "messages"),
        ("messages", "attachments"),
        ("messages", "assignments"),
        ("messages", "corrections"),
    ):
        assert order.index(first) < order.index(then)

    # Every identity sequence hands out the id after the last one copied.
    with psycopg.connect(dsn) as conn:
        for table, column in IDENTITIES:
            row = conn.execute(
                f"SELECT nextval(pg_get_serial_sequence('{table}', '{column}')), "
                f"(SELECT MAX({column}) FROM {table})"
            ).fetchone()
            assert row is not None and row[1] is not None and row[0] == row[1] + 1, table

    store = _postgres(dsn)
    await store.open()
    try:
        after = await readback(store, built)
        assert after.keys() == before.keys()
        for key in before:
            assert after[key] == before[key], key
        # New rows on the copy: every identity sequence continues after the copied ids
        # (attachments' rowid, ticket_events, corrections, assignment_history, contact_events).
        fresh = new_message(thread_key="after-copy", ingested_at=NOW, assign_to="bob")
        fresh = _with(fresh, attachments=(Attachment("a.txt", "text/plain", 1, "0" * 64),))
        assert (await store.ingest(fresh)).duplicate is False
        await store.record_correction(fresh.message_id, "suggestion", "bob", NOW + 1)
        await store.record_event(TicketEvent(fresh.conversation_id, NOW + 2, "refused", "eve"))
        await store.withdraw_offer(fresh.message_id, "bob", NOW + 3, "returned")
        change = await store.merge_contacts(
            "email:customer3@example.com", "web:customer2@example.com", "ops", "", NOW + 4
        )
        assert change.ok, change
        events = await store.ticket_events(fresh.conversation_id)
        assert [(e.kind, e.actor) for e in events][-2:] == [
            ("refused", "eve"),
            ("withdrawn", "router"),
        ]
        message = await store.message(fresh.message_id)
        assert message is not None
        assert [a["name"] for a in message["attachments"]] == ["a.txt"]
        assert message["offer_history"][-1]["outcome"] == "returned"
        # An old ticket's status token still checks out: the secret came along.
        assert await store.secret() == before["secret"]
    finally:
        await store.close()


async def test_a_second_copy_into_the_same_target_is_refused_and_changes_nothing(
    tmp_path: Path, dsn: str
) -> None:
    path, _built, _ = await _source(tmp_path, n=3)
    copy_store(str(path), dsn)
    counts = _row_counts(dsn)
    with psycopg.connect(dsn) as conn:
        secret = conn.execute("SELECT value FROM meta").fetchall()

    with pytest.raises(CopyError, match=r"is not empty: table \w+ holds \d+ row"):
        copy_store(str(path), dsn)

    assert _row_counts(dsn) == counts
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT value FROM meta").fetchall() == secret


async def test_postgresql_back_to_sqlite_reads_back_the_same(tmp_path: Path, dsn: str) -> None:
    path, built, before = await _source(tmp_path)
    copy_store(str(path), dsn)
    back = tmp_path / "back" / "omnirouter.db"

    report = copy_store(dsn, f"sqlite:{back}")

    assert report.messages == len(built.messages)
    after = await _read(SqliteStore(back), built)
    for key in before:
        assert after[key] == before[key], key
    # The implicit rowid of attachments came back as it was.
    with sqlite3.connect(path) as a, sqlite3.connect(back) as b:
        query = "SELECT rowid, message_id, name FROM attachments ORDER BY rowid"
        assert a.execute(query).fetchall() == b.execute(query).fetchall()


async def test_an_older_sqlite_source_is_migrated_first(tmp_path: Path, dsn: str) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        migrate(conn, MIGRATIONS[:4])
    report = copy_store(f"sqlite:{path}", dsn)
    assert report.source_migrated == (4, latest_version())
    assert dict(report.tables)["people"] == 0


async def test_a_failure_mid_copy_rolls_the_target_back(tmp_path: Path, dsn: str) -> None:
    path, _built, _ = await _source(tmp_path, n=3)
    with psycopg.connect(dsn, autocommit=True) as conn:
        from router.store.pg_migrations import migrate as pg_migrate

        pg_migrate(conn)
        target_secret = conn.execute("SELECT value FROM meta").fetchall()
    # A correction naming no message: SQLite took it (no foreign keys on this connection),
    # PostgreSQL will not, late in the copy, after most tables went in.
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO corrections(message_id, label, previous_label, agent_id, at) "
            "VALUES ('nope', 'x', 'y', 'bob', 0)"
        )

    with pytest.raises(CopyError, match=r"copying table corrections: .*foreign key"):
        copy_store(str(path), dsn)

    counts = _row_counts(dsn)
    assert {t: n for t, n in counts.items() if n and t not in ("meta", "schema_migrations")} == {}
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT value FROM meta").fetchall() == target_secret
    # The same failure into SQLite leaves no file behind.
    target = tmp_path / "new.db"
    with pytest.raises(CopyError, match="copying table corrections"):
        copy_store(str(path), str(target))
    assert not target.exists()


def _grow_sqlite(path: Path, *, column: bool = True) -> None:
    """What a later migration does: a new table and a new column (as migration 6 will)."""
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE later_leases (name TEXT PRIMARY KEY, holder TEXT, until REAL)")
        conn.execute("INSERT INTO later_leases VALUES ('imap:support', 'node-1', 1.5)")
        if column:
            conn.execute("ALTER TABLE outbox ADD COLUMN later_owner TEXT NOT NULL DEFAULT ''")
            conn.execute("UPDATE outbox SET later_owner = 'node-1'")


def _grow_postgres(dsn: str) -> None:
    from router.store.pg_migrations import migrate as pg_migrate

    with psycopg.connect(dsn, autocommit=True) as conn:
        pg_migrate(conn)
        conn.execute(
            "CREATE TABLE later_leases (name TEXT PRIMARY KEY, holder TEXT, until DOUBLE PRECISION)"
        )
        conn.execute("ALTER TABLE outbox ADD COLUMN later_owner TEXT NOT NULL DEFAULT ''")


async def test_tables_and_columns_a_later_migration_adds_are_copied(
    tmp_path: Path, dsn: str
) -> None:
    path, _built, before = await _source(tmp_path, n=6)
    _grow_sqlite(path)
    _grow_postgres(dsn)

    report = copy_store(str(path), dsn)

    assert dict(report.tables)["later_leases"] == 1
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT * FROM later_leases").fetchall() == [
            ("imap:support", "node-1", 1.5)
        ]
        owners = conn.execute("SELECT DISTINCT later_owner FROM outbox").fetchall()
    assert owners == [("node-1",)] and before["outbox"]


async def test_data_the_target_schema_cannot_hold_is_refused(tmp_path: Path, dsn: str) -> None:
    path, _built, _ = await _source(tmp_path, n=3)
    _grow_sqlite(path)  # the SQLite side migrated further than the PostgreSQL side

    with pytest.raises(CopyError, match=r"table later_leases .* no counterpart"):
        copy_store(str(path), dsn)
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM later_leases")
    with pytest.raises(CopyError, match=r"table outbox: column.* later_owner have no counterpart"):
        copy_store(str(path), dsn)
    from router.store.pg_migrations import latest_version as pg_latest

    assert {t: n for t, n in _row_counts(dsn).items() if n and t != "meta"} == {
        "schema_migrations": pg_latest()  # migrated, and nothing copied
    }


async def test_the_source_is_only_read_and_a_newer_one_is_refused(tmp_path: Path, dsn: str) -> None:
    path, built, before = await _source(tmp_path, n=3)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    back = tmp_path / "copy.db"
    copy_store(str(path), str(back))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert await _read(SqliteStore(back), built) == before
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version={latest_version() + 1}")
    with pytest.raises(CopyError, match="newer than this omnirouter"):
        copy_store(str(path), dsn)
    assert _row_counts(dsn) == {}  # refused before the target was touched


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_writes_after_the_snapshot_are_not_copied(
    tmp_path: Path, pg_server: Any, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A daemon still writing during the copy: the copy holds one consistent snapshot."""
    from router.store import copy as store_copy
    from tests.peers_pg import fresh_database

    path, _built, _ = await _source(tmp_path, n=3)
    with fresh_database(pg_server) as first, fresh_database(pg_server) as second:
        source, target = (str(path), first) if kind == "sqlite" else (first, second)
        if kind == "postgresql":
            copy_store(str(path), first)
        side = store_copy.SqliteSide if kind == "sqlite" else store_copy.PostgresSide
        begin_read = side.begin_read
        insert = "INSERT INTO agents(id, name, capacity, tool) VALUES ('late', '', 1, 'mqtt')"

        def write_after_the_snapshot(self: Any) -> None:
            begin_read(self)
            if kind == "sqlite":
                with sqlite3.connect(path) as conn:
                    conn.execute(insert)
            else:
                with psycopg.connect(first, autocommit=True) as conn:
                    conn.execute(insert)

        monkeypatch.setattr(side, "begin_read", write_after_the_snapshot)
        report = copy_store(source, target)

        assert dict(report.tables)["agents"] == 2
        with psycopg.connect(target) as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM agents ORDER BY id")]
        assert ids == ["alice", "bob"]


def test_endpoints_and_plain_refusals(tmp_path: Path) -> None:
    assert parse_endpoint("sqlite:/var/x.db") == Endpoint("sqlite", "/var/x.db")
    assert parse_endpoint("sqlite:///var/x.db") == Endpoint("sqlite", "/var/x.db")
    assert parse_endpoint("/var/x.db") == Endpoint("sqlite", "/var/x.db")
    pg = parse_endpoint("postgresql://u:hunter2@db:5433/omni?sslmode=require")
    assert pg.kind == "postgresql" and pg.label == "postgresql://db:5433/omni"
    with pytest.raises(CopyError, match="mysql:// is not a store"):
        parse_endpoint("mysql://x")
    with pytest.raises(CopyError, match="no SQLite store at"):
        copy_store(str(tmp_path / "missing.db"), str(tmp_path / "t.db"))
    assert not (tmp_path / "t.db").exists()
    with pytest.raises(CopyError, match="the same store"):
        copy_store(str(tmp_path / "a.db"), f"sqlite:{tmp_path}/../{tmp_path.name}/a.db")
    plain = tmp_path / "plain.db"
    sqlite3.connect(plain).close()
    with pytest.raises(CopyError, match="not an Omnirouter store"):
        copy_store(str(plain), str(tmp_path / "t.db"))


# -- the command ------------------------------------------------------------------------


def omnirouter(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "router.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_the_command_end_to_end(tmp_path: Path, dsn: str) -> None:
    path, built, before = await _source(tmp_path, n=6)

    done = omnirouter("store", "copy", "--from", f"sqlite:{path}", "--to", dsn)

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"copied sqlite:{path} → postgresql://")
    assert any(line.split() == ["messages", "6"] for line in lines)
    assert "row counts match on both sides" in lines[-1]
    after = await _read(_postgres(dsn), built)
    assert after == before

    again = omnirouter("store", "copy", "--from", str(path), "--to", dsn)
    assert again.returncode == 1
    assert again.stdout == ""
    [line] = again.stderr.splitlines()
    assert line.startswith("store copy failed: target postgresql://")
    assert "is not empty: table" in line

    helped = omnirouter("store", "copy", "--help")
    assert "Stop the daemon" in " ".join(helped.stdout.split())
