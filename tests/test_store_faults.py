"""The SQLite store when the disk fails: nothing deferred is lost, and the store says so."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from router.config import OutboxConfig, build_config
from router.daemon import Daemon
from router.delivery import ToolTarget
from router.drivers import ActionSink, Delivery, DriverState, TransientError
from router.metrics import Metrics
from router.model import new_ulid
from router.outbox import Dispatcher
from router.store import OutboxItem, StoreCondition, StoreUnavailable
from router.store.queries import insert_outbox
from router.store.sqlite import SqliteStore
from tests import payloads


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


def outbox_item(due_in: float = 0.0, payload_bytes: int = 0) -> OutboxItem:
    now = time.time()
    return OutboxItem(
        id=new_ulid(),
        target=ToolTarget("t"),
        agent_id="alice",
        address="alice",
        payload=payloads.assignment(1, text="x" * payload_bytes),
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
    await store._run(lambda c: [insert_outbox(c, it, owner="") for it in items])
    return [it.id for it in items]


async def test_deferred_deletes_survive_a_failed_commit(store: SqliteStore) -> None:
    # Fails without the fix: the deletes rode with the failed batch and were dropped, so
    # the items stayed in the outbox and went out again after a restart.
    ids = await put(store, 3)
    await store.outbox_done(ids)
    fail_commits(store, True)
    with pytest.raises(StoreUnavailable):
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


async def fill_up(store: SqliteStore) -> None:
    """Cap the database at its current size, as a full disk would (per connection)."""
    await store._run(lambda c: c.execute("PRAGMA max_page_count=1"))  # raised to page_count


async def make_room(store: SqliteStore) -> None:
    await store._run(lambda c: c.execute("PRAGMA max_page_count=1073741823"))


async def put_big(store: SqliteStore) -> None:
    it = outbox_item(payload_bytes=20_000)  # needs new pages
    await store._run(lambda c: insert_outbox(c, it, owner=""))


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


async def test_a_full_store_is_one_condition_logged_once_and_recovers(store: SqliteStore) -> None:
    assert store.condition is StoreCondition.OK
    await fill_up(store)
    with capture_logs() as logs:
        for _ in range(5):
            with pytest.raises(StoreUnavailable) as raised:
                await put_big(store)
            assert raised.value.condition is StoreCondition.FULL
            assert isinstance(raised.value.__cause__, sqlite3.OperationalError)
        assert store.condition is StoreCondition.FULL
        assert await store.ping()  # reads still answer, and do not clear the condition
        assert store.condition is StoreCondition.FULL
        await make_room(store)
        await put_big(store)  # the next write commits: the condition is ok again
        assert store.condition is StoreCondition.OK
    (down,) = events(logs, "store.unavailable")
    assert down["condition"] == "full" and "exc_info" not in down
    assert len(events(logs, "store.recovered")) == 1


async def test_the_store_probes_its_way_back_while_nobody_writes(store: SqliteStore) -> None:
    fail_commits(store, True)
    with pytest.raises(StoreUnavailable):
        await put(store, 1)
    assert store.condition is StoreCondition.FULL
    await asyncio.sleep(1.3)  # a probe or so fails meanwhile: still full, no new log line
    assert store.condition is StoreCondition.FULL
    fail_commits(store, False)
    deadline = time.monotonic() + 3
    while store.condition is not StoreCondition.OK:
        assert time.monotonic() < deadline, "the store did not recover by itself"
        await asyncio.sleep(0.05)


class FailingTool:
    """An agent tool that always fails (its own disk is full too)."""

    def __init__(self) -> None:
        self.name = "t"
        self.state = DriverState.CONNECTED
        self.attempts: list[Delivery] = []

    async def run(self, actions: ActionSink) -> None:
        await asyncio.Event().wait()

    async def deliver(self, delivery: Delivery) -> None:
        self.attempts.append(delivery)
        raise TransientError("no space left on device")

    async def stop(self) -> None:
        pass


async def test_the_outbox_spends_no_attempts_the_store_cannot_record(store: SqliteStore) -> None:
    # Fails without the fix: the item burnt its attempts while nothing could be recorded,
    # then failed to dead-letter with "Task exception was never retrieved".
    loop_errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, ctx: loop_errors.append(ctx))
    tool = FailingTool()
    config = OutboxConfig(max_attempts=3, backoff_base=0.01, backoff_cap=0.02, poll_interval=0.05)
    d = Dispatcher(store, lambda: {"t": tool}, config, Metrics(), rng=random.Random(1))
    it = outbox_item()
    await store._run(lambda c: insert_outbox(c, it, owner=""))
    task = asyncio.create_task(d.run())
    try:
        fail_commits(store, True)
        d.submit(it)
        await asyncio.sleep(1.5)  # many backoff periods
        # At most the attempt that found the store full (the scan may find out first).
        unrecorded = len(tool.attempts)
        assert unrecorded <= 1
        assert store.condition is StoreCondition.FULL
        fail_commits(store, False)
        deadline = time.monotonic() + 8
        while not await store.dead_letters():
            assert time.monotonic() < deadline, "the item was never dead-lettered"
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    (dead,) = await store.dead_letters()
    assert dead.id == it.id and dead.attempts == 3
    assert len(tool.attempts) - unrecorded == 3
    assert not loop_errors
