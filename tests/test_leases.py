"""Leases among instances (router/leases.py) on a real SqliteStore shared by two instances.

Each instance's `Leases` gets a clock of its own that the test moves: one instance can
stall (its clock stands still, so it renews nothing) while the other's time passes its
lease's expiry, which is how a takeover happens in life.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from router.config import load_config
from router.daemon import instance_id
from router.drivers import NAME_RE, DriverState
from router.leases import Leases, default_instance
from router.store.sqlite import SqliteStore

T0 = 1_700_000_000.0
TTL = 15.0
LEASE = "channel:mail"


class FakeTime:
    """A wall clock the test moves; sleep() returns once it has moved past the deadline."""

    def __init__(self, now: float = T0) -> None:
        self.now = now
        self.sleeping = 0  # sleep() calls waiting now
        self._moved = asyncio.Condition()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        until = self.now + delay
        self.sleeping += 1
        try:
            async with self._moved:
                await self._moved.wait_for(lambda: self.now >= until)
        finally:
            self.sleeping -= 1

    async def advance(self, seconds: float) -> None:
        self.now += seconds
        async with self._moved:
            self._moved.notify_all()


class FakeDriver:
    """A single-owner driver: run() reads until cancelled; counts its runs."""

    def __init__(self) -> None:
        self.state = DriverState.STOPPED
        self.runs = 0
        self.cancelled = 0
        self.running = False
        self.finish: asyncio.Future[None] | None = None  # set to end run() on purpose

    async def run(self) -> None:
        self.runs += 1
        self.running = True
        self.state = DriverState.CONNECTED
        self.finish = asyncio.get_running_loop().create_future()
        try:
            await self.finish
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running = False
            self.state = DriverState.STOPPED

    def standby(self) -> None:
        self.state = DriverState.STANDBY


async def until(condition: Callable[[], bool], what: str = "") -> None:
    """Let the loop run until condition holds (bounded, so a bug fails instead of hanging)."""
    deadline = time.monotonic() + 10
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.001)


def attempted(leases: list[Leases], times: int) -> bool:
    """Whether each of these has tried to take or renew `times` times."""
    return all(x.attempts == times for x in leases)


async def step(clock: FakeTime, seconds: float) -> None:
    """Move `clock` once whoever runs on it waits for time to pass (not before)."""
    await until(lambda: clock.sleeping > 0, "waiting on the clock")
    await clock.advance(seconds)


@pytest_asyncio.fixture
async def stores(tmp_path: Path) -> AsyncIterator[tuple[SqliteStore, SqliteStore]]:
    """Instances a and b on one database file."""
    a = SqliteStore(tmp_path / "shared.db", instance="a")
    b = SqliteStore(tmp_path / "shared.db", instance="b")
    await a.open()
    await b.open()
    try:
        yield a, b
    finally:
        await b.close()
        await a.close()


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_one_instance_runs_the_driver_and_the_other_takes_over_after_expiry(
    stores: tuple[SqliteStore, SqliteStore],
) -> None:
    store_a, store_b = stores
    ta, tb = FakeTime(), FakeTime()
    a = Leases(store_a, "a", TTL, clock=ta, sleep=ta.sleep)
    b = Leases(store_b, "b", TTL, clock=tb, sleep=tb.sleep)
    da, db = FakeDriver(), FakeDriver()

    run_a = asyncio.create_task(a.hold(LEASE, da.run, da.standby))
    await until(lambda: da.running, "a runs its driver")
    assert a.holding() == {LEASE: pytest.approx(T0 + TTL)}
    run_b = asyncio.create_task(b.hold(LEASE, db.run, db.standby))
    await until(lambda: b.attempts == 1, "b tries")
    assert (db.runs, db.state) == (0, DriverState.STANDBY)
    assert b.holding() == {}

    # Both keep time: a renews, b keeps trying and keeps waiting.
    for n in range(1, 4):
        await step(ta, a.interval)
        await step(tb, b.interval)
        await until(functools.partial(attempted, [a, b], 1 + n), "renew, retry")
        assert db.runs == 0 and da.running
    assert await store_b.leases(tb()) == [(LEASE, "a", pytest.approx(ta() + TTL))]

    # a stalls (its clock stands still, so it renews nothing): once the lease has lapsed,
    # b takes it and runs its driver.
    await step(tb, TTL)
    await until(lambda: db.running, "b takes over")
    assert da.running  # a has not looked yet
    # a wakes up: its renewal finds the lease taken, and its driver stops reading.
    await step(ta, a.interval)
    await until(lambda: not da.running, "a's run is cancelled")
    assert (da.runs, da.cancelled, da.state) == (1, 1, DriverState.STANDBY)
    assert a.holding() == {}
    assert [(n, o) for n, o, _ in await store_a.leases(ta())] == [(LEASE, "b")]
    # a goes on trying, in vain while b renews.
    tried = a.attempts
    await step(ta, a.interval)
    await step(tb, b.interval)
    await until(lambda: a.attempts > tried, "a tries again")
    assert da.runs == 1 and db.running

    # b stops (a graceful stop cancels the task): it gives the lease up, and a takes it
    # at its next try, without waiting for it to lapse.
    await stop(run_b)
    assert db.cancelled == 1
    assert await store_a.leases(ta()) == []
    await step(ta, a.interval)
    await until(lambda: da.running, "a takes the released lease")
    assert da.runs == 2
    await stop(run_a)
    assert await store_a.leases(ta()) == []


async def test_a_renewal_that_fails_stops_the_driver(
    stores: tuple[SqliteStore, SqliteStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store_a, _ = stores
    t = FakeTime()
    a = Leases(store_a, "a", TTL, clock=t, sleep=t.sleep)
    d = FakeDriver()
    run = asyncio.create_task(a.hold(LEASE, d.run, d.standby))
    await until(lambda: d.running, "runs")

    async def failing(*args: object) -> bool:
        raise OSError("the store is away")

    monkeypatch.setattr(store_a, "acquire_lease", failing)
    await step(t, a.interval)
    # We cannot tell whether we still hold it: stop reading rather than read twice.
    await until(lambda: not d.running, "cancelled")
    assert d.state == DriverState.STANDBY and a.holding() == {}
    monkeypatch.undo()
    await step(t, a.interval)
    await until(lambda: d.running, "runs again once the store answers")
    assert d.runs == 2
    await stop(run)


async def test_a_run_that_ends_gives_the_lease_up_and_one_that_fails_keeps_it(
    stores: tuple[SqliteStore, SqliteStore],
) -> None:
    store_a, store_b = stores
    t = FakeTime()
    a = Leases(store_a, "a", TTL, clock=t, sleep=t.sleep)
    d = FakeDriver()
    run = asyncio.create_task(a.hold(LEASE, d.run, d.standby))
    await until(lambda: d.running, "runs")
    assert d.finish is not None
    d.finish.set_result(None)  # stop() made it return
    await run
    assert await store_b.leases(t()) == []

    run = asyncio.create_task(a.hold(LEASE, d.run, d.standby))
    await until(lambda: d.running, "runs again")
    assert d.finish is not None
    d.finish.set_exception(ConnectionError("IMAP went away"))
    with pytest.raises(ConnectionError):
        await run  # the supervisor sees the failure and restarts after its backoff
    # Still ours until it lapses: a quick restart gets it back, a long backoff hands it on.
    assert [(n, o) for n, o, _ in await store_b.leases(t())] == [(LEASE, "a")]
    assert await store_b.acquire_lease(LEASE, "b", TTL, t() + 1) is False


async def test_heartbeat_keeps_the_instance_lease(
    stores: tuple[SqliteStore, SqliteStore],
) -> None:
    store_a, store_b = stores
    t = FakeTime()
    a = Leases(store_a, "a", TTL, clock=t, sleep=t.sleep)
    assert await a.acquire(a.instance_lease)
    beat = asyncio.create_task(a.heartbeat())
    for n in range(1, 7):  # two full ttls
        await step(t, a.interval)
        await until(functools.partial(attempted, [a], 1 + n), "renewed")
    assert await store_b.leases(t()) == [("instance:a", "a", pytest.approx(t() + TTL))]
    assert a.holding() == {"instance:a": pytest.approx(t() + TTL)}
    await stop(beat)


def test_the_default_instance_id_is_stable_per_state_dir_and_a_valid_name(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    assert default_instance(one, "web-1") == default_instance(one, "web-1")
    assert default_instance(one, "web-1") != default_instance(two, "web-1")
    assert default_instance(one, "web-1") != default_instance(one, "web-2")
    # The same directory however it is spelled.
    assert default_instance(tmp_path / "x" / ".." / "one", "h") == default_instance(one, "h")
    for host in ("Web-1.Example.COM", "-_", "a" * 80, "router_2"):
        name = default_instance(one, host)
        assert re.fullmatch(NAME_RE, name), name
    assert default_instance(one, "Web-1.Example.COM").startswith("web-1-example-com-")


def test_the_daemon_uses_the_configured_instance_or_the_default(tmp_path: Path) -> None:
    state = tmp_path / "state"
    path = tmp_path / "omnirouter.toml"
    path.write_text(f'[daemon]\nstate_dir = "{state}"\n')
    assert instance_id(load_config(path)) == default_instance(state)
    path.write_text(f'[daemon]\nstate_dir = "{state}"\ninstance = "router-1"\n')
    assert instance_id(load_config(path)) == "router-1"
