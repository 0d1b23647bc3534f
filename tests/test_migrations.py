"""Tests for the SQLite schema migrations, router/store/migrations.py."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from router.store import migrations as m
from router.store.migrations import (
    MIGRATIONS,
    Migration,
    SchemaTooNewError,
    latest_version,
    migrate,
    register,
    run_script,
)
from router.store.sqlite import SqliteStore


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """A connection configured like the store's (autocommit, WAL)."""
    c = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA foreign_keys=ON")
    try:
        yield c
    finally:
        c.close()


def user_version(c: sqlite3.Connection) -> int:
    version: int = c.execute("PRAGMA user_version").fetchone()[0]
    return version


def schema(c: sqlite3.Connection) -> list[tuple[str, str]]:
    return sorted(
        (r[0], r[1])
        for r in c.execute("SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")
    )


def tables(c: sqlite3.Connection) -> set[str]:
    return {n for t, n in schema(c) if t == "table"}


def test_registered_migrations_are_numbered_without_gaps() -> None:
    assert [n for n, _, _ in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert latest_version() == len(MIGRATIONS) >= 1
    assert all(description for _, description, _ in MIGRATIONS)


def test_migrate_empty_db_reaches_latest(conn: sqlite3.Connection) -> None:
    assert user_version(conn) == 0
    applied = migrate(conn)
    assert applied == list(range(1, latest_version() + 1))
    assert user_version(conn) == latest_version()
    assert {
        "meta",
        "contacts",
        "conversations",
        "messages",
        "attachments",
        "agents",
        "assignments",
        "outbox",
        "dead_letters",
    } <= tables(conn)
    secret = conn.execute("SELECT value FROM meta WHERE key='secret'").fetchone()[0]
    assert len(bytes.fromhex(secret)) >= 16
    assert conn.in_transaction is False


def test_migrate_again_is_a_noop(conn: sqlite3.Connection) -> None:
    migrate(conn)
    before = schema(conn)
    secret = conn.execute("SELECT value FROM meta").fetchall()
    assert migrate(conn) == []
    assert migrate(conn) == []
    assert schema(conn) == before
    assert conn.execute("SELECT value FROM meta").fetchall() == secret
    assert user_version(conn) == latest_version()


def test_migrate_from_another_connection_is_a_noop(tmp_path: Path) -> None:
    path = tmp_path / "two.db"
    a = sqlite3.connect(path, isolation_level=None)
    b = sqlite3.connect(path, isolation_level=None)
    try:
        assert migrate(a) == list(range(1, latest_version() + 1))
        assert migrate(b) == []
    finally:
        a.close()
        b.close()


def test_newer_database_is_refused(conn: sqlite3.Connection) -> None:
    migrate(conn)
    newer = latest_version() + 3
    conn.execute(f"PRAGMA user_version={newer}")
    before = schema(conn)
    with pytest.raises(SchemaTooNewError, match=rf"v{newer} is newer .*v{latest_version()}"):
        migrate(conn)
    assert user_version(conn) == newer  # untouched
    assert schema(conn) == before
    assert isinstance(SchemaTooNewError("x"), RuntimeError)


def test_migrate_restores_isolation_level(tmp_path: Path) -> None:
    c = sqlite3.connect(tmp_path / "legacy.db")  # default: implicit transactions
    try:
        level = c.isolation_level
        migrate(c)
        assert c.isolation_level == level
        assert user_version(c) == latest_version()
        assert c.in_transaction is False
    finally:
        c.close()


def test_migrate_inside_open_transaction_is_refused(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN")
    with pytest.raises(RuntimeError, match="open transaction"):
        migrate(conn)
    conn.execute("ROLLBACK")


# -- atomicity, with a registry of the test's own -----------------------------------------


def _registry_with(*extra: tuple[str, Migration]) -> list[tuple[int, str, Migration]]:
    registry = list(MIGRATIONS)
    for description, fn in extra:
        register(len(registry) + 1, description, registry=registry)(fn)
    return registry


def _good(c: sqlite3.Connection) -> None:
    run_script(
        c,
        """
        CREATE TABLE good_one (id INTEGER PRIMARY KEY, note TEXT DEFAULT 'a;b');  -- ; in a string
        INSERT INTO good_one(note) VALUES ('x');
        """,
    )


def _broken(c: sqlite3.Connection) -> None:
    run_script(
        c,
        """
        CREATE TABLE half_one (id INTEGER PRIMARY KEY);
        CREATE INDEX half_one_idx ON half_one(id);
        ALTER TABLE messages ADD COLUMN half_col TEXT;
        INSERT INTO meta(key, value) VALUES ('half', 'applied');
        CREATE TABLE half_one (oops);  -- fails: already exists
        """,
    )


def test_failed_migration_rolls_back_fully(conn: sqlite3.Connection) -> None:
    migrate(conn)
    good_schema = schema(conn)
    registry = _registry_with(("broken", _broken))
    assert registry[-1][0] == latest_version() + 1
    assert len(MIGRATIONS) == latest_version()  # the module's registry is untouched

    with pytest.raises(sqlite3.OperationalError, match="already exists"):
        migrate(conn, migrations=registry)
    assert conn.in_transaction is False
    assert user_version(conn) == latest_version()
    assert schema(conn) == good_schema  # no table, index or column of the broken one
    columns = [r[1] for r in conn.execute("PRAGMA table_info(messages)")]
    assert "half_col" not in columns
    assert conn.execute("SELECT COUNT(*) FROM meta WHERE key='half'").fetchone()[0] == 0


def test_earlier_migrations_stay_when_a_later_one_fails(tmp_path: Path) -> None:
    c = sqlite3.connect(tmp_path / "steps.db", isolation_level=None)
    try:
        registry = _registry_with(("good", _good), ("broken", _broken))
        with pytest.raises(sqlite3.OperationalError):
            migrate(c, migrations=registry)
        # Each migration is its own transaction: everything up to the good one committed.
        assert user_version(c) == latest_version() + 1
        assert "good_one" in tables(c)
        assert "half_one" not in tables(c)
        assert c.execute("SELECT note FROM good_one").fetchall() == [("x",)]
        default = [r[4] for r in c.execute("PRAGMA table_info(good_one)") if r[1] == "note"]
        assert default == ["'a;b'"]
        # The fixed code (without the broken step) then finds nothing to do.
        assert migrate(c, migrations=registry[:-1]) == []
    finally:
        c.close()


def test_first_migration_is_atomic_on_an_empty_db(tmp_path: Path) -> None:
    """The initial schema is all-or-nothing too: a failure leaves an empty, v0 database."""
    c = sqlite3.connect(tmp_path / "first.db", isolation_level=None)

    def fail_after(conn: sqlite3.Connection) -> None:
        MIGRATIONS[0][2](conn)
        raise RuntimeError("disk on fire")

    try:
        with pytest.raises(RuntimeError, match="disk on fire"):
            migrate(c, migrations=[(1, "initial, then a failure", fail_after)])
        assert user_version(c) == 0
        assert schema(c) == []
        assert migrate(c) == list(range(1, latest_version() + 1))  # and it can start over
    finally:
        c.close()


def test_migration_that_commits_is_reported(conn: sqlite3.Connection) -> None:
    def uses_executescript(c: sqlite3.Connection) -> None:
        c.executescript("CREATE TABLE sneaky (id INTEGER);")  # COMMITs the migration's BEGIN

    registry = _registry_with(("executescript", uses_executescript))
    with pytest.raises(RuntimeError, match="ended the transaction"):
        migrate(conn, migrations=registry)
    assert user_version(conn) == latest_version()  # not recorded as applied


def test_out_of_order_registry_is_refused(conn: sqlite3.Connection) -> None:
    registry: list[tuple[int, str, Migration]] = []
    register(1, "one", registry=registry)(_good)
    with pytest.raises(RuntimeError, match="out of order"):
        register(3, "three", registry=registry)(_good)
    with pytest.raises(RuntimeError, match="out of order"):
        migrate(conn, migrations=[(2, "two", _good)])
    assert user_version(conn) == 0


def test_run_script_splits_statements(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN")
    run_script(
        conn,
        """
        -- a comment; with a semicolon
        CREATE TABLE t (v TEXT);
        INSERT INTO t VALUES ('one;two');
        CREATE TRIGGER t_ins AFTER INSERT ON t BEGIN
            UPDATE t SET v = v || ';' WHERE rowid = new.rowid;
        END;
        INSERT INTO t VALUES ('three');
        """,
    )
    assert conn.in_transaction is True  # unlike executescript, it does not commit
    conn.execute("ROLLBACK")
    assert "t" not in tables(conn)
    with pytest.raises(ValueError, match="incomplete"):
        run_script(conn, "CREATE TABLE u (v TEXT); CREATE TABLE w (")


def test_module_registry_is_shared() -> None:
    assert m.MIGRATIONS is MIGRATIONS


async def test_store_refuses_newer_database_and_stays_closed(tmp_path: Path) -> None:
    path = tmp_path / "newer.db"
    c = sqlite3.connect(path, isolation_level=None)
    try:
        migrate(c)
        c.execute(f"PRAGMA user_version={latest_version() + 1}")
    finally:
        c.close()
    store = SqliteStore(path)
    with pytest.raises(SchemaTooNewError, match="newer"):
        await store.open()
    assert store.alive is False
    with pytest.raises(RuntimeError, match="not open"):
        await asyncio.wait_for(store.ping(), 5)  # fails at once instead of hanging
    await store.close()


async def test_store_open_on_half_migrated_legacy_db_is_atomic(tmp_path: Path) -> None:
    """A store whose first open fails mid-migration can open again later."""
    path = tmp_path / "retry.db"
    c = sqlite3.connect(path, isolation_level=None)

    def fail_after(conn: sqlite3.Connection) -> None:
        MIGRATIONS[0][2](conn)
        raise RuntimeError("power cut")

    try:
        with pytest.raises(RuntimeError, match="power cut"):
            migrate(c, migrations=[(1, "initial, then a failure", fail_after)])
    finally:
        c.close()
    store = SqliteStore(path)
    await store.open()
    try:
        assert await store.ping() is True
        assert len(await store.secret()) >= 16
    finally:
        await store.close()
    assert (path.stat().st_mode & 0o777) == 0o600
