"""The outbox dispatcher on the real SQLite store: retries, backoff, dead letters, replay."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from router.config import OutboxConfig
from router.delivery import ToolTarget
from router.drivers import (
    ActionSink,
    Delivery,
    DriverState,
    PermanentError,
    RateLimited,
    TransientError,
)
from router.metrics import Metrics
from router.model import new_ulid
from router.outbox import Dispatcher
from router.store import OutboxItem
from router.store.sqlite import SqliteStore
from tests import payloads


class ScriptedTool:
    """Fails as scripted, then succeeds; records every attempt."""

    def __init__(self, failures: list[Exception] | None = None) -> None:
        self.name = "t"
        self.state = DriverState.CONNECTED
        self.failures = list(failures or [])
        self.attempts: list[Delivery] = []
        self.delivered: list[Delivery] = []

    async def run(self, actions: ActionSink) -> None:
        await asyncio.Event().wait()

    async def deliver(self, delivery: Delivery) -> None:
        self.attempts.append(delivery)
        if self.failures:
            raise self.failures.pop(0)
        self.delivered.append(delivery)

    async def stop(self) -> None:
        pass


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "o.db")
    await s.open()
    yield s
    await s.close()


def item(target: str = "t") -> OutboxItem:
    now = time.time()
    return OutboxItem(
        id=new_ulid(),
        target=ToolTarget(target),
        agent_id="alice",
        address="alice",
        payload=payloads.assignment(1),
        message_id=new_ulid(),
        next_attempt_at=now,
        created_at=now,
    )


async def put(store: SqliteStore, it: OutboxItem) -> None:
    # In the daemon items enter the outbox inside an ingest or assign transaction;
    # here the row is written alone, through the store's own writer thread.
    from router.store.sqlite import _insert_outbox

    await store._run(lambda c: _insert_outbox(c, it, owner=""))


async def run_dispatcher(d: Dispatcher) -> asyncio.Task[None]:
    return asyncio.create_task(d.run())


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


FAST = OutboxConfig(max_attempts=4, backoff_base=0.01, backoff_cap=0.05, poll_interval=0.05)


async def wait_for(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_transient_failures_are_retried_with_the_same_delivery_id(store: SqliteStore) -> None:
    tool = ScriptedTool([TransientError("broker gone"), TransientError("still gone")])
    metrics = Metrics()
    d = Dispatcher(store, lambda: {"t": tool}, FAST, metrics, rng=random.Random(1))
    it = item()
    await put(store, it)
    task = await run_dispatcher(d)
    d.submit(it)
    await wait_for(lambda: len(tool.delivered) == 1)
    await d.drain(2)
    await stop(task)
    assert [a.id for a in tool.attempts] == [it.id] * 3
    assert [a.attempt for a in tool.attempts] == [1, 2, 3]
    assert (await store.delivery_counts()) == {"pending": 0, "dead": 0}
    assert metrics.deliveries.labels(target="t", result="retry")._value.get() == 2


async def test_permanent_failure_is_dead_lettered_at_once_and_replayable(
    store: SqliteStore,
) -> None:
    tool = ScriptedTool([PermanentError("HTTP 400: bad address")])
    d = Dispatcher(store, lambda: {"t": tool}, FAST, Metrics())
    it = item()
    await put(store, it)
    task = await run_dispatcher(d)
    d.submit(it)
    await wait_for(lambda: len(tool.attempts) == 1)
    await wait_for(lambda: d.backlog == 0)
    [dead] = await store.dead_letters()
    assert dead.id == it.id and "HTTP 400" in dead.reason and dead.attempts == 1
    assert await store.replay_dead_letters([it.id], time.time()) == 1
    # The periodic scan finds the replayed item and sends it under its original id.
    await wait_for(lambda: len(tool.delivered) == 1)
    await stop(task)
    assert tool.delivered[0].id == it.id
    assert await store.dead_letters() == []


async def test_gives_up_after_max_attempts(store: SqliteStore) -> None:
    tool = ScriptedTool([TransientError(f"fail {i}") for i in range(10)])
    d = Dispatcher(store, lambda: {"t": tool}, FAST, Metrics())
    it = item()
    await put(store, it)
    task = await run_dispatcher(d)
    d.submit(it)
    await wait_for(lambda: d.backlog == 0)
    await stop(task)
    assert len(tool.attempts) == FAST.max_attempts
    [dead] = await store.dead_letters()
    assert dead.attempts == FAST.max_attempts and "after 4 attempts" in dead.reason


async def test_rate_limit_hint_is_obeyed(store: SqliteStore) -> None:
    tool = ScriptedTool([RateLimited("slow down", retry_after=0.3)])
    d = Dispatcher(store, lambda: {"t": tool}, FAST, Metrics())
    it = item()
    await put(store, it)
    task = await run_dispatcher(d)
    started = time.monotonic()
    d.submit(it)
    await wait_for(lambda: len(tool.delivered) == 1)
    await stop(task)
    assert time.monotonic() - started >= 0.3


async def test_a_disconnected_target_holds_items_without_spending_attempts(
    store: SqliteStore,
) -> None:
    tool = ScriptedTool()
    tool.state = DriverState.TRANSIENT_DISCONNECT
    d = Dispatcher(store, lambda: {"t": tool}, FAST, Metrics())
    it = item()
    await put(store, it)
    task = await run_dispatcher(d)
    d.submit(it)
    await asyncio.sleep(0.3)
    assert tool.attempts == []
    tool.state = DriverState.CONNECTED
    await wait_for(lambda: len(tool.delivered) == 1, timeout=5)
    await stop(task)
    assert tool.delivered[0].attempt == 1


class WatchedTool(ScriptedTool):
    """A ScriptedTool that counts how often the dispatcher looks at its state."""

    def __init__(self) -> None:
        super().__init__()
        self.looks = 0
        self._state = DriverState.TRANSIENT_DISCONNECT

    @property  # type: ignore[override]
    def state(self) -> DriverState:
        self.looks += 1
        return self._state

    @state.setter
    def state(self, value: DriverState) -> None:
        self._state = value


async def test_a_long_outage_costs_one_look_per_recheck_not_one_per_item(
    store: SqliteStore,
) -> None:
    # Items held for a down tool used to wake once a second each: O(backlog) work per
    # second for the whole outage (bench/reliability/flood.py --tool-down).
    tool = WatchedTool()
    d = Dispatcher(store, lambda: {"t": tool}, FAST, Metrics())
    items = [item() for _ in range(300)]
    for it in items:
        await put(store, it)
    task = await run_dispatcher(d)
    for it in items:
        d.submit(it)
    await wait_for(lambda: tool.looks >= len(items))  # each was looked at once, then parked
    looks = tool.looks
    await asyncio.sleep(2.5)  # two rechecks, and the scan every 0.05 s meanwhile
    assert tool.looks - looks <= 10, tool.looks - looks
    assert tool.attempts == [] and d.backlog == len(items)
    tool.state = DriverState.CONNECTED
    await wait_for(lambda: len(tool.delivered) == len(items), timeout=5)
    await stop(task)
    assert sorted(x.id for x in tool.delivered) == sorted(it.id for it in items)
    assert {x.attempt for x in tool.delivered} == {1}


async def test_stopping_forgets_parked_items_so_a_restart_sends_them(store: SqliteStore) -> None:
    tool = WatchedTool()
    d = Dispatcher(store, lambda: {"t": tool}, FAST, Metrics())
    it = item()
    await put(store, it)
    task = await run_dispatcher(d)
    d.submit(it)
    await wait_for(lambda: tool.looks >= 1)
    await stop(task)
    assert d.backlog == 0  # not "known" any more: the scan of a new run() finds it
    tool.state = DriverState.CONNECTED
    task = await run_dispatcher(d)
    await wait_for(lambda: len(tool.delivered) == 1)
    await stop(task)
    assert tool.delivered[0].id == it.id


async def test_unknown_target_is_a_dead_letter_with_a_reason(store: SqliteStore) -> None:
    d = Dispatcher(store, lambda: {}, FAST, Metrics())
    it = item(target="gone")
    await put(store, it)
    task = await run_dispatcher(d)
    d.submit(it)
    await wait_for(lambda: d.backlog == 0)
    await stop(task)
    [dead] = await store.dead_letters()
    assert "no agent tool named 'gone'" in dead.reason


async def test_items_left_in_the_store_are_found_by_the_scan(store: SqliteStore) -> None:
    tool = ScriptedTool()
    d = Dispatcher(store, lambda: {"t": tool}, FAST, Metrics())
    items = [item() for _ in range(20)]
    for it in items:
        await put(store, it)
    task = await run_dispatcher(d)
    await wait_for(lambda: len(tool.delivered) == 20)
    await d.drain(2)
    await stop(task)
    assert sorted(x.id for x in tool.delivered) == sorted(x.id for x in items)
    assert (await store.delivery_counts())["pending"] == 0


async def test_submitting_twice_sends_once(store: SqliteStore) -> None:
    tool = ScriptedTool()
    d = Dispatcher(store, lambda: {"t": tool}, FAST, Metrics())
    it = item()
    await put(store, it)
    task = await run_dispatcher(d)
    d.submit(it)
    d.submit(it)
    await wait_for(lambda: len(tool.delivered) >= 1)
    await d.drain(2)
    await asyncio.sleep(0.15)  # let a scan run: the item is gone from the store by now
    await stop(task)
    assert len(tool.delivered) == 1


async def test_a_long_outage_holds_a_bounded_backlog_and_loses_nothing(
    store: SqliteStore,
) -> None:
    # bench/reliability/flood.py --tool-down: memory grew with every item held for a
    # down tool. Now at most max_held_per_tool are held; the rest wait in the store, and
    # a tool that is up meanwhile is not held back.
    down, up = WatchedTool(), ScriptedTool()
    config = OutboxConfig(
        max_attempts=4,
        backoff_base=0.01,
        backoff_cap=0.05,
        poll_interval=0.05,
        max_held_per_tool=50,
    )
    d = Dispatcher(store, lambda: {"t": down, "u": up}, config, Metrics())
    items = [item() for _ in range(400)]
    others = [item("u") for _ in range(20)]
    for it in [*items, *others]:
        await put(store, it)
    task = await run_dispatcher(d)
    for it in [*items, *others]:
        d.submit(it)
    await wait_for(lambda: len(up.delivered) == len(others))
    await asyncio.sleep(0.3)  # scans come and go meanwhile: nothing more is held
    assert d.backlog <= 50, d.backlog
    assert down.attempts == []
    down.state = DriverState.CONNECTED
    await wait_for(lambda: len(down.delivered) >= len(items), timeout=15)
    await stop(task)
    assert sorted(x.id for x in down.delivered) == sorted(it.id for it in items)
    assert {x.attempt for x in down.delivered} == {1}


class FlakyChannel:
    """A customer channel whose sends fail while `down` (its gateway or server is away)."""

    answers_customers = True
    state = DriverState.CONNECTED

    def __init__(self) -> None:
        self.down = True
        self.failures = 0
        self.sent: list[tuple[str, int]] = []  # (outbox id, attempt)

    async def send(self, outbound: Any) -> None:
        if self.down:
            self.failures += 1
            raise TransientError("gateway: connection refused")
        self.sent.append((outbound.id, outbound.attempt))


def customer_item() -> OutboxItem:
    from router.delivery import ChannelTarget

    now = time.time()
    return OutboxItem(
        id=new_ulid(),
        target=ChannelTarget("sms"),
        agent_id="",
        address="+4915112345678",
        payload=payloads.ack(),
        message_id=new_ulid(),
        next_attempt_at=now,
        created_at=now,
    )


async def test_a_failing_customer_channel_holds_its_sends_instead_of_dead_lettering(
    store: SqliteStore,
) -> None:
    # An SMS gateway away for longer than max_attempts' backoff used to turn every
    # acknowledgement into a dead letter (tests/reliability/test_chat_sms_outages.py).
    channel = FlakyChannel()
    d = Dispatcher(store, dict, FAST, Metrics(), channels=lambda: {"sms": channel})
    items = [customer_item() for _ in range(6)]
    for it in items:
        await put(store, it)
    task = await run_dispatcher(d)
    for it in items:
        d.submit(it)
    await asyncio.sleep(3.0)  # FAST gives up after 4 attempts in well under a second
    assert await store.dead_letters(10) == []
    failures = channel.failures
    await asyncio.sleep(1.0)
    assert channel.failures - failures <= len(items) + 1  # held: about one try per cool-down
    channel.down = False
    await wait_for(lambda: len(channel.sent) == len(items), timeout=40)
    await stop(task)
    assert sorted(i for i, _ in channel.sent) == sorted(it.id for it in items)
    assert all(attempt <= FAST.max_attempts for _, attempt in channel.sent)
    assert await store.dead_letters(10) == []
