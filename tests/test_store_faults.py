"""The SQLite store when the disk fails: nothing deferred is lost, and the store says so."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from router.config import build_config
from router.daemon import Daemon
from router.model import new_ulid
from router.store import OutboxItem
from router.store.queries import insert_outbox
from router.store.sqlite import SqliteStore


def disk_full() -> sqlite3.OperationalError:
    """Return a genuine SQLITE_FULL error, as a full disk raises it at COMMIT."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("CREATE TABLE t (x BLOB)")
        conn.execute(f"PRAGMA max_page_count={conn.execute('PRAGMA page_count').fetchone()[0]}")
        conn.execute("INSERT INTO t VALUES (zeroblob(100000))")
    except sqlite3.OperationalError as exc:
        return exc
    finally:
        conn.close()
    raise AssertionError("the page limit did not fill the database")


class FailingCommits(sqlite3.Connection):
    """A connection whose COMMIT fails as on a full disk while the class flag is set."""

    failing = False

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        """Run a statement, or fail the commit while `failing` is set."""
        if type(self).failing and sql == "COMMIT":
            raise disk_full()
        return super().execute(sql, *args)


def outbox_item(due_in: float = 0.0) -> OutboxItem:
    now = time.time()
    return OutboxItem(
        id=new_ulid(),
        target="t",
        agent_id="alice",
        address="alice",
        kind="assignment",
        payload={"ticket": "T-1"},
        message_id=new_ulid(),
        next_attempt_at=now + due_in,
        created_at=now,
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    commits = type("Commits", (FailingCommits,), {"failing": False})
    s = SqliteStore(tmp_path / "f.db")
    s.writer.connection_factory = commits
    await s.open()
    yield s
    commits.failing = False
    await s.close()


def fail_commits(store: SqliteStore, failing: bool) -> None:
    """Make the store's commits fail (a full disk) or succeed again."""
    factory = store.writer.connection_factory
    assert issubclass(factory, FailingCommits)
    factory.failing = failing


async def put(store: SqliteStore, n: int, due_in: float = 0.0) -> list[str]:
    items = [outbox_item(due_in) for _ in range(n)]
    await store._run(lambda c: [insert_outbox(c, it) for it in items])
    return [it.id for it in items]


async def test_deferred_deletes_survive_a_failed_commit(store: SqliteStore) -> None:
    # Fails without the fix: the deletes rode with the failed batch and were dropped, so
    # the items stayed in the outbox and went out again after a restart.
    ids = await put(store, 3)
    await store.outbox_done(ids)
    fail_commits(store, True)
    with pytest.raises(sqlite3.OperationalError):
        await store.delivery_counts()  # the batch the deletes ride with cannot commit
    assert store.pending_deletes == 3
    fail_commits(store, False)
    assert (await store.delivery_counts())["pending"] == 0
    assert store.pending_deletes == 0


async def test_deletes_not_committed_at_close_are_reported_and_kept(tmp_path: Path) -> None:
    commits = type("Commits", (FailingCommits,), {"failing": False})
    store = SqliteStore(tmp_path / "f.db")
    store.writer.connection_factory = commits
    await store.open()
    ids = await put(store, 2)
    await store.outbox_done(ids)
    commits.failing = True
    await store.close()  # the last batch fails too: nothing is durable, and the store says so
    assert store.pending_deletes == 2
    again = SqliteStore(tmp_path / "f.db")
    await again.open()
    try:
        assert (await again.delivery_counts())["pending"] == 2
    finally:
        await again.close()


async def test_stop_does_not_claim_a_drained_outbox_with_deletes_lost(tmp_path: Path) -> None:
    # Fails without the fix: the stop logged outbox_drained=true although the deletes of
    # delivered items never committed (they went out again after the restart).
    config = build_config(
        {
            "daemon": {"state_dir": str(tmp_path / "state")},
            "ops": {"enabled": False},
            "adapters": [{"type": "inbox", "name": "rec"}],
            "agents": [{"id": "alice", "tool": "rec"}],
        },
        source="test.toml",
    )
    daemon = Daemon(config)
    commits = type("Commits", (FailingCommits,), {"failing": False})
    daemon.store.writer.connection_factory = commits  # type: ignore[attr-defined]
    await daemon.start()
    store = daemon.store
    assert isinstance(store, SqliteStore)
    ids = await put(store, 4, due_in=3600)  # not due: the dispatcher's scan leaves them alone
    await store.outbox_done(ids)
    commits.failing = True
    with capture_logs() as logs:
        await asyncio.wait_for(daemon.stop(), 30)
    (stopped,) = [e for e in logs if e["event"] == "daemon.stopped"]
    assert stopped["outbox_drained"] is False
    assert stopped["outbox_undeleted"] == 4
