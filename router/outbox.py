"""The outbox dispatcher: sends committed outbox items through their adapters.

Items arrive straight from the pipeline after their commit (the fast path) and from
a periodic scan of the store (items left by a crash, replayed dead letters, another
process). Each send carries the item id as its idempotency key. A transient failure
is retried with capped exponential backoff and full jitter; a permanent one, or the
last allowed attempt, moves the item to the dead letters. While a target is known
to be down the items wait without spending attempts (a simple circuit breaker), so
a broker outage does not turn a backlog into dead letters. Likewise while the store
cannot record an attempt's outcome (full disk): attempts it could not record are not
spent, and items wait until the store is back.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import structlog

from router.backoff import backoff_delay
from router.config import OutboxConfig
from router.delivery import AGENT_PAYLOADS, CUSTOMER_PAYLOADS, ChannelTarget, Outbound, ToolTarget
from router.drivers import (
    AgentTool,
    Channel,
    Delivery,
    DriverState,
    PermanentError,
    RateLimited,
    TransientError,
)
from router.metrics import Metrics
from router.store import OutboxItem, Store, StoreCondition, StoreUnavailable

log = structlog.get_logger("router.outbox")

# How often a disconnected target is looked at again; its items wait parked meanwhile.
_TARGET_DOWN_RECHECK = 1.0
# Agent tool states in which nothing is sent (and no attempt spent).
_DOWN = (DriverState.CONNECTING, DriverState.TRANSIENT_DISCONNECT)
# How long an item waits while the store cannot record outcomes before being looked at again.
_STORE_DOWN_RECHECK = 1.0
# Failed sends in a row that mark a customer channel down, and its longest cool-down.
_CHANNEL_TRIP = 5
_CHANNEL_COOLDOWN_MAX = 30.0
# Items read per scan, and how soon to scan again while the store holds more.
_SCAN_PAGE = 1000
_SCAN_AGAIN = 0.2
# How many sent ids to remember (far more than can be in flight between a read and
# the commit of their delete).
_SENT_MEMORY = 50_000


class Dispatcher:
    """Sends outbox items, retries, dead-letters; one per daemon."""

    def __init__(
        self,
        store: Store,
        tools: Callable[[], Mapping[str, AgentTool]],
        config: OutboxConfig,
        metrics: Metrics,
        *,
        channels: Callable[[], Mapping[str, Channel]] = dict,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        on_delivered: Callable[[OutboxItem], None] | None = None,
    ) -> None:
        self.store = store
        self.tools = tools
        self.channels = channels
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.rng = rng or random.Random()
        self.on_delivered = on_delivered
        self._known: set[str] = set()  # ids queued or in flight in this process
        self._ready: asyncio.Queue[OutboxItem] = asyncio.Queue()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        # Items held while their agent tool is down, per tool, and the one timer per tool
        # that looks at it again: with a timer per item, a backlog of N items cost N
        # wake-ups a second for as long as the outage lasted (bench/reliability/flood.py
        # --tool-down: 29 % of a core for 9,900 held items, 7 % after).
        self._parked: dict[str, list[OutboxItem]] = {}
        self._held_full_logged: set[str] = set()  # tools whose backlog overflowed to the store
        # A customer channel whose sends keep failing (its SMS gateway, SMTP server or API
        # is down): its items wait parked without spending attempts, and are tried again
        # (half open) when the cool-down ends. channel key -> failures in a row, and
        # channel key -> when it may be tried again (present while open).
        self._channel_failures: dict[str, int] = {}
        self._open: dict[str, float] = {}
        self._cooldown: dict[str, float] = {}
        self._park_timers: dict[str, asyncio.TimerHandle] = {}
        self._inflight: set[asyncio.Task[None]] = set()
        self._done_batch: list[str] = []
        # Ids marked done while a scan is in flight: the scan may have read them before
        # their delete, so its result must not send them again.
        self._done_during_scan: set[str] | None = None
        # Ids sent lately: a snapshot or scan read before their delete committed must
        # not send them again (ids are never reused; a replayed dead letter was not sent).
        self._sent: dict[str, None] = {}
        self._done_flush: asyncio.Task[None] | None = None
        # Free send slots (config.concurrency at most in flight); _room is set when one frees.
        self._free = config.concurrency
        self._room = asyncio.Event()
        self._running = False  # run() is taking items
        self._holding = False  # run() holds an item and waits for a free slot
        self._idle = asyncio.Event()
        self._idle.set()

    # -- feeding -----------------------------------------------------------------

    def submit(self, item: OutboxItem) -> None:
        """Queue a committed item for sending (now or at its next_attempt_at)."""
        if item.id in self._known or item.id in self._sent:
            return
        if self._held_full(item):
            return  # its tool is down and holds its share: it waits in the store
        self._known.add(item.id)
        self._idle.clear()
        delay = item.next_attempt_at - self.clock()
        if delay > 0:
            self._schedule(item, delay)
        else:
            self._enqueue(item)

    def _enqueue(self, item: OutboxItem) -> None:
        if self._running and self._free > 0 and self._ready.empty() and not self._holding:
            self._start(item)  # the fast path: no hop through run(); order is kept
        else:
            self._ready.put_nowait(item)

    def _start(self, item: OutboxItem) -> None:
        self._free -= 1
        task = asyncio.create_task(self._send(item), name=f"outbox-send-{item.id}")
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    def _schedule(self, item: OutboxItem, delay: float) -> None:
        loop = asyncio.get_running_loop()
        self._timers[item.id] = loop.call_later(delay, self._wake, item)

    def _wake(self, item: OutboxItem) -> None:
        self._timers.pop(item.id, None)
        self._enqueue(item)

    def _held_full(self, item: OutboxItem) -> bool:
        """Whether item's target is down with `max_held_per_tool` items held already."""
        target = item.target
        key = target.name if isinstance(target, ToolTarget) else str(target)
        return len(self._parked.get(key, ())) >= self.config.max_held_per_tool

    def _park(self, name: str, item: OutboxItem) -> None:
        """Hold item until tool `name` is no longer down (looked at once a recheck).

        At `max_held_per_tool` the item is let go instead: it is committed, so the scan
        finds it again once the tool is back. Memory stays bounded through any outage.
        """
        held = self._parked.setdefault(name, [])
        if len(held) >= self.config.max_held_per_tool:
            if name not in self._held_full_logged:
                self._held_full_logged.add(name)
                log.warning("outbox.tool_backlog_in_store", tool=name, held=len(held))
            self._forget(item.id)
            return
        held.append(item)
        if name not in self._park_timers:
            loop = asyncio.get_running_loop()
            self._park_timers[name] = loop.call_later(_TARGET_DOWN_RECHECK, self._recheck, name)

    def _recheck(self, name: str) -> None:
        """Release a target's parked items once it is not down, else look again later."""
        del self._park_timers[name]
        reopens = self._open.get(name)
        if reopens is not None and reopens > time.monotonic():
            loop = asyncio.get_running_loop()
            self._park_timers[name] = loop.call_later(
                reopens - time.monotonic(), self._recheck, name
            )
            return
        tool = self.tools().get(name)
        if tool is not None and tool.state in _DOWN:
            loop = asyncio.get_running_loop()
            self._park_timers[name] = loop.call_later(_TARGET_DOWN_RECHECK, self._recheck, name)
            return
        self._held_full_logged.discard(name)
        for item in self._parked.pop(name, []):
            self._enqueue(item)  # _attempt looks at the state (and the store) again

    @property
    def backlog(self) -> int:
        """Items queued, waiting for a retry, or in flight in this process."""
        return len(self._known)

    # -- running -----------------------------------------------------------------

    async def run(self) -> None:
        """Send items as they become ready; scan the store periodically for strays."""
        scanner = asyncio.create_task(self._scan_loop(), name="outbox-scan")
        self._running = True
        try:
            while True:
                item = await self._ready.get()
                self._holding = True
                try:
                    while self._free <= 0:
                        self._room.clear()
                        await self._room.wait()
                finally:
                    self._holding = False
                self._start(item)
        finally:
            self._running = False
            scanner.cancel()
            for timer in self._timers.values():
                timer.cancel()
            # Items whose retry timer is dropped must not stay "known": a restarted run()
            # would never send them, and the scan would skip them as already queued.
            waiting, self._timers = list(self._timers), {}
            for timer in self._park_timers.values():
                timer.cancel()
            waiting += [i.id for items in self._parked.values() for i in items]
            self._parked, self._park_timers = {}, {}
            for item_id in waiting:
                self._forget(item_id)

    async def _scan_loop(self) -> None:
        while True:
            done: set[str] = set()
            self._done_during_scan = done
            backlog = False
            try:
                due = await self.store.due_outbox(self.clock(), _SCAN_PAGE)
                before = len(self._known)
                for item in due:
                    if item.id not in done:
                        self.submit(item)
                # A full page that brought new work in: more waits in the store (a
                # tool back after an outage longer than it could hold): look again soon.
                backlog = len(due) == _SCAN_PAGE and len(self._known) > before
            except asyncio.CancelledError:
                raise
            except StoreUnavailable:
                pass  # the store logs its condition once; the next scan tries again
            except Exception as exc:  # the store hiccuped; the next scan tries again
                log.warning("outbox.scan_failed", error=str(exc))
            finally:
                self._done_during_scan = None
            await asyncio.sleep(_SCAN_AGAIN if backlog else self.config.poll_interval)

    async def _send(self, item: OutboxItem) -> None:
        try:
            await self._attempt(item)
        finally:
            self._free += 1
            self._room.set()

    async def _attempt(self, item: OutboxItem) -> None:
        target = item.target
        tool = None if isinstance(target, ChannelTarget) else self.tools().get(target.name)
        attempt = item.attempts + 1
        if tool is not None and tool.state in _DOWN:
            # Circuit open: do not spend an attempt on a target we know is down. (A channel's
            # sends do not depend on its intake connection: their own failures decide.)
            self._park(target.name, item)
            return
        channel_key = str(target) if isinstance(target, ChannelTarget) else ""
        if channel_key in self._open and self._open[channel_key] > time.monotonic():
            self._park(channel_key, item)  # its channel's sends are failing: wait, unspent
            return
        if self.store.condition is not StoreCondition.OK:
            # The outcome could not be recorded: an attempt now would be spent for nothing.
            self._retry_later(item, _STORE_DOWN_RECHECK)
            return
        try:
            if isinstance(target, ChannelTarget):
                await self._send_to_customer(item, target.name, attempt)
            elif tool is None:
                raise PermanentError(f"no agent tool named {target.name!r} is configured")
            elif not isinstance(item.payload, AGENT_PAYLOADS):
                raise PermanentError(f"a {item.kind} cannot go to an agent tool")
            else:
                await tool.deliver(
                    Delivery(
                        id=item.id,
                        target=target.name,
                        agent_id=item.agent_id,
                        address=item.address,
                        payload=item.payload,
                        attempt=attempt,
                        created_at=_when(item.created_at),
                    )
                )
        except asyncio.CancelledError:
            raise
        except PermanentError as exc:
            await self._dead(item, attempt, f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            if channel_key and not isinstance(exc, RateLimited):
                if self._channel_failed(channel_key, exc):
                    # Failing while the channel is known down: not the item's fault, so
                    # not spent; it waits with the others for the next try.
                    self._park(channel_key, item)
                    return
            if attempt >= self.config.max_attempts:
                await self._dead(
                    item, attempt, f"{type(exc).__name__}: {exc} (after {attempt} attempts)"
                )
                return
            delay = backoff_delay(
                attempt - 1, self.config.backoff_base, self.config.backoff_cap, self.rng
            )
            if isinstance(exc, RateLimited):
                delay = max(delay, exc.retry_after)
            self.metrics.deliveries.labels(target=str(item.target), result="retry").inc()
            log.info(
                "outbox.retry",
                outbox_id=item.id,
                target=str(item.target),
                attempt=attempt,
                delay=round(delay, 3),
                error=f"{type(exc).__name__}: {exc}",
            )
            try:
                await self.store.outbox_retry(item.id, attempt, self.clock() + delay, str(exc))
            except StoreUnavailable:
                # Not recorded, so not spent: the item waits with the attempts the store knows
                # (the store logs its condition once; no line per item here).
                self._retry_later(item, _STORE_DOWN_RECHECK)
                return
            except Exception as store_exc:
                # Kept in memory; after a restart the scan finds it in the store.
                log.warning("outbox.retry_not_recorded", outbox_id=item.id, error=str(store_exc))
            self._retry_later(
                OutboxItem(
                    **{
                        **_fields(item),
                        "attempts": attempt,
                        "next_attempt_at": self.clock() + delay,
                    }
                ),
                delay,
            )
        else:
            if channel_key:
                self._channel_ok(channel_key)
            self.metrics.child(self.metrics.deliveries, str(item.target), "ok").inc()
            if self.on_delivered is not None:
                self.on_delivered(item)
            self._mark_done(item.id)

    def _channel_failed(self, key: str, exc: Exception) -> bool:
        """Count a failed send of a channel; return True when it is known down (open).

        At `_CHANNEL_TRIP` failures in a row the channel opens: its items wait parked for
        a cool-down (1 s, doubling up to 30 s), then are tried again; a failure then
        keeps it open without spending the item's attempt.
        """
        failures = self._channel_failures.get(key, 0) + 1
        self._channel_failures[key] = failures
        was_open = key in self._open
        if not was_open and failures < _CHANNEL_TRIP:
            return False
        if was_open and self._open[key] > time.monotonic():
            return True  # another item of this try already opened it again
        cooldown = min(_CHANNEL_COOLDOWN_MAX, self._cooldown.get(key, 0.5) * 2)
        self._cooldown[key] = cooldown
        self._open[key] = time.monotonic() + cooldown
        if not was_open:
            log.warning(
                "outbox.channel_failing",
                target=key,
                failures=failures,
                error=f"{type(exc).__name__}: {exc}",
            )
        return was_open

    def _channel_ok(self, key: str) -> None:
        """A send of the channel went through: it is not down."""
        self._channel_failures.pop(key, None)
        self._cooldown.pop(key, None)
        if self._open.pop(key, None) is not None:
            log.info("outbox.channel_recovered", target=key)

    async def _send_to_customer(self, item: OutboxItem, channel_name: str, attempt: int) -> None:
        """Hand an acknowledgement or reply to the channel the customer wrote from."""
        # Looked up at each attempt: a channel restarted by a reload keeps its pending sends.
        channel = self.channels().get(channel_name)
        if channel is None:
            raise TransientError(f"channel {channel_name!r} is not running")
        if not channel.answers_customers:
            raise PermanentError(f"channel {channel_name!r} cannot send to customers")
        if not isinstance(item.payload, CUSTOMER_PAYLOADS):
            raise PermanentError(f"a {item.kind} cannot go to a customer")
        await channel.send(
            Outbound(
                id=item.id,
                channel=channel_name,
                to=item.address,
                payload=item.payload,
                attempt=attempt,
            )
        )

    def _retry_later(self, item: OutboxItem, delay: float) -> None:
        self._schedule(item, delay)

    async def _dead(self, item: OutboxItem, attempt: int, reason: str) -> None:
        # Runs inside a send task nobody awaits: an exception escaping here would only
        # surface as "Task exception was never retrieved".
        try:
            await self.store.outbox_dead(item.id, attempt, reason, self.clock())
        except StoreUnavailable:
            # Not recorded, so not spent: try again once the store is back.
            self._retry_later(item, _STORE_DOWN_RECHECK)
            return
        except Exception as exc:  # still in the outbox: the scan finds it again
            log.warning("outbox.dead_not_recorded", outbox_id=item.id, error=str(exc))
            self._forget(item.id)
            return
        self.metrics.deliveries.labels(target=str(item.target), result="dead").inc()
        self.metrics.dead_letters.labels(target=str(item.target)).inc()
        log.warning(
            "outbox.dead_letter",
            outbox_id=item.id,
            target=str(item.target),
            attempts=attempt,
            reason=reason,
        )
        self._forget(item.id)

    def _mark_done(self, item_id: str) -> None:
        # Deletes are batched: many sends finishing together cost one store call.
        self._done_batch.append(item_id)
        if self._done_flush is None or self._done_flush.done():
            self._done_flush = asyncio.create_task(self._flush_done(), name="outbox-done")

    async def _flush_done(self) -> None:
        while self._done_batch:
            ids, self._done_batch = self._done_batch, []
            try:
                await self.store.outbox_done(ids)
            except Exception as exc:  # they will be sent again with the same id: receivers dedupe
                log.warning("outbox.done_not_recorded", count=len(ids), error=str(exc))
            if self._done_during_scan is not None:
                self._done_during_scan.update(ids)
            for i in ids:
                self._sent[i] = None
                self._forget(i)
            while len(self._sent) > _SENT_MEMORY:
                del self._sent[next(iter(self._sent))]

    def _forget(self, item_id: str) -> None:
        self._known.discard(item_id)
        if not self._known:
            self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Wait until everything due has been sent (retries in the future do not count)."""
        deadline = time.monotonic() + timeout
        while True:
            due = self._ready.qsize() + len(self._inflight) + len(self._done_batch)
            flushing = self._done_flush is not None and not self._done_flush.done()
            if due == 0 and not flushing:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            waiters: list[Any] = list(self._inflight)
            if self._done_flush is not None and not self._done_flush.done():
                waiters.append(self._done_flush)
            if waiters:
                await asyncio.wait(waiters, timeout=remaining)
            else:
                await asyncio.sleep(0.01)  # ready items are about to be picked up by run()


def _fields(item: OutboxItem) -> dict[str, Any]:
    return {f: getattr(item, f) for f in OutboxItem.__dataclass_fields__}


def _when(created_at: float) -> datetime | None:
    """Return when the item was created (the delivery's `created_at`), None when unknown."""
    return datetime.fromtimestamp(created_at, UTC) if created_at else None
