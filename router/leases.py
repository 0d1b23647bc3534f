"""Leases among instances sharing one store: who is alive, and who reads each pulling source.

Several instances with the same config share one database. Two kinds of lease, both rows
of the store's `leases` table taken with `Store.acquire_lease` and renewed every third of
`[daemon] lease_ttl`:

* `instance:<id>`, held while an instance lives. The outbox items an instance commits
  are its own (`Store.due_outbox`); another instance takes them over only once this
  lease has lapsed, so a live instance's sends are never sent twice, and a dead
  instance's are sent within `lease_ttl` (plus a scan interval).
* `channel:<name>` / `tool:<name>` for a driver whose class says `single_owner` (an
  IMAP mailbox, Telegram's getUpdates: a source that must have one reader at a time).
  Its `run()` runs only on the instance holding the lease (`Leases.hold`); elsewhere
  the driver is on standby: it still sends, it does not read.

Expiry compares each instance's wall clock with the times other instances wrote: keep
the machines' clocks in sync (NTP) to well within `lease_ttl`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from router.store import Store

log = structlog.get_logger("router.leases")

_HOST_CHARS = re.compile(r"[^a-z0-9_-]+")


def default_instance(state_dir: Path, hostname: str | None = None) -> str:
    """Return `<hostname>-<6 hex of sha1(resolved state_dir)>`, a valid config name.

    Stable across restarts; two daemons on one machine with different state
    directories differ.
    """
    host = _HOST_CHARS.sub("-", (hostname or socket.gethostname()).lower()).strip("-_")
    digest = hashlib.sha1(str(state_dir.resolve()).encode(), usedforsecurity=False).hexdigest()
    # 33 + 1 + 6 = 40 characters: the longest name NAME_RE allows.
    return f"{host[:33].rstrip('-_') or 'host'}-{digest[:6]}"


class Leases:
    """This instance's leases: its heartbeat, and the drivers only one instance may run."""

    def __init__(
        self,
        store: Store,
        instance: str,
        ttl: float,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.store = store
        self.instance = instance
        self.ttl = ttl
        # Renewed three times a lease: two renewals may fail before another takes over.
        self.interval = ttl / 3
        # An instance on standby asks this often, and a lease lasts this much less than
        # `ttl`: a dead holder's lease is taken over within `ttl` of its last renewal.
        self.poll = min(1.0, ttl / 10)
        self.duration = ttl - self.poll
        self.clock = clock
        self.sleep = sleep
        self.held: dict[str, float] = {}  # lease name -> expires_at of our last renewal
        self.attempts = 0  # takes and renewals tried (tests wait on it)

    @property
    def instance_lease(self) -> str:
        """Return the name of this instance's own lease."""
        return f"instance:{self.instance}"

    async def acquire(self, name: str) -> bool:
        """Take or renew lease `name` for this instance; record whether it is held.

        A store error propagates; the lease is then no longer counted as held.
        """
        now = self.clock()
        ok = False  # on an error we cannot tell: not counted as held
        try:
            ok = await self.store.acquire_lease(name, self.instance, self.duration, now)
        finally:
            self.attempts += 1
            if ok:
                self.held[name] = now + self.duration
            else:
                self.held.pop(name, None)
        return ok

    async def release(self, name: str) -> None:
        """Give lease `name` up, so another instance may take it at once (best effort)."""
        self.held.pop(name, None)
        try:
            await self.store.release_lease(name, self.instance)
        except Exception as exc:  # it lapses by itself within ttl
            log.warning("lease.release_failed", lease=name, error=str(exc))

    def holding(self) -> dict[str, float]:
        """Return the leases this instance holds now, with when each expires unrenewed."""
        now = self.clock()
        return {name: at for name, at in sorted(self.held.items()) if at > now}

    # -- the instance's own lease ---------------------------------------------------------

    async def heartbeat(self) -> None:
        """Renew `instance:<id>` every interval until cancelled; log failures once a run."""
        failing = False
        while True:
            await self.sleep(self.interval)
            try:
                ok = await self.acquire(self.instance_lease)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    log.warning("lease.renew_failed", lease=self.instance_lease, error=str(exc))
                failing = True
                continue
            if not ok:
                # Only an instance with our id can hold it: two daemons share one id.
                log.error("lease.instance_id_in_use", lease=self.instance_lease)
            elif failing:
                log.info("lease.renewed", lease=self.instance_lease)
            failing = False

    # -- drivers only one instance may run ----------------------------------------------------

    async def hold(
        self,
        name: str,
        run: Callable[[], Awaitable[Any]],
        standby: Callable[[], None] = lambda: None,
    ) -> None:
        """Run `run()` only while this instance holds lease `name`; end when it ends.

        Tries to take the lease every `poll` seconds. Once held, renews it every
        `interval` and
        cancels the run as soon as a renewal fails or finds it taken (then `standby()`
        and back to trying). A run that returns (stopped on purpose) gives the lease up;
        one that raises keeps it until it lapses: the supervisor's backoff then decides
        whether this instance gets it again or another one takes over. Cancelled, this
        cancels the run and gives the lease up.
        """
        task: asyncio.Task[Any] | None = None
        try:
            while True:
                if not await self._take(name):
                    standby()
                    await self.sleep(self.poll)
                    continue
                log.info("lease.acquired", lease=name, instance=self.instance)
                task = asyncio.ensure_future(run())
                if not await self._keep(name, task):
                    done, task = task, None
                    if not done.cancelled() and done.exception() is None:
                        await self.release(name)
                    done.result()  # the run's own outcome: returned, or raised
                    return
                await _cancel(task)
                task = None
                standby()
                await self.sleep(self.poll)
        finally:
            if task is not None:  # cancelled while running: stop the run, let others have it
                await _cancel(task)
                await self.release(name)

    async def _take(self, name: str) -> bool:
        """Try to take (or renew) `name`; a store error counts as not taken."""
        try:
            return await self.acquire(name)
        except asyncio.CancelledError:
            raise
        except Exception:
            return False  # the store logs its own condition; the next interval tries again

    async def _keep(self, name: str, task: asyncio.Task[Any]) -> bool:
        """Renew `name` every interval while `task` runs; True when the lease was lost."""
        while True:
            tick = asyncio.ensure_future(self.sleep(self.interval))
            try:
                await asyncio.wait({task, tick}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                tick.cancel()
            if task.done():
                return False
            try:
                ok = await self.acquire(name)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("lease.lost", lease=name, error=f"{type(exc).__name__}: {exc}")
                return True
            if not ok:
                log.warning("lease.lost", lease=name, error="taken by another instance")
                return True


async def _cancel(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait for it to end; what it raised on the way out is dropped."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
