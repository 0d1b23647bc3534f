"""The daemon: wires store, pipeline, outbox, drivers and the ops API, and runs them.

Life cycle (what ops see in `systemctl status`):
start → READY=1 → (SIGHUP → RELOADING=1 … READY=1)* → SIGTERM → STOPPING=1 → exit 0.

Every long-running piece is a supervised task: if it fails it is logged, counted and
started again after a jittered backoff, so one broken channel never takes the others
down. A bad configuration at start exits with code 11, which the unit lists in
RestartPreventExitStatus so systemd does not loop on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import secrets
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from router import __version__
from router.backoff import backoff_delay
from router.config import Config, ConfigError, load_config
from router.config_diff import reload_plan
from router.drivers import (
    ADAPTERS,
    CHANNELS,
    EXIT_CONFIG,
    UP_STATES,
    AgentTool,
    Channel,
    DriverContext,
    DriverError,
    DriverState,
    load_driver,
)
from router.http import AcceptErrorLog, GuardedRunner, HttpLimits, ListenError, start_site
from router.leases import Leases, default_instance
from router.logging import flush_log, register_secret, set_verbosity
from router.metrics import Metrics
from router.ops import OpsApi
from router.outbox import Dispatcher
from router.pipeline import Pipeline
from router.store import DeadLetter, OutboxItem, Store, StoreUnavailable
from router.store.sqlite import SqliteStore

log = structlog.get_logger("router.daemon")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_CONFIG = EXIT_CONFIG  # the unit's RestartPreventExitStatus: restarting cannot fix it

# A task that ran this long before failing is considered healthy again: its next
# restart starts from the shortest backoff.
_STABLE_AFTER = 60.0
_SWITCH_INTERVAL = 0.0005
# The cyclic collector's first-generation threshold (CPython's default is 700). Each
# message allocates a few hundred container objects, nearly all freed by reference
# counting, so by default the collector ran every few messages and a full collection,
# which stops the event loop for tens of milliseconds, every few thousand; this makes
# both about 14 times rarer (bench/README.md: the collector's CPU about 30 -> 1-4 µs a
# message, its longest pause 38-51 -> 2-13 ms).
GC_YOUNG_THRESHOLD = 10_000


# -- sd_notify --------------------------------------------------------------------


class Notifier:
    """sd_notify(3) over $NOTIFY_SOCKET: a datagram of KEY=VALUE lines; no-op without it."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._sock: socket.socket | None = None
        self._address = ""
        if address:
            # "@name" is an abstract socket: the kernel wants a leading NUL byte instead.
            self._address = "\0" + address[1:] if address.startswith("@") else address
            # Non-blocking: when the manager does not read (hung, or a harness that reads
            # only now and then) its queue fills, and a blocking send would freeze the
            # event loop with it. A notice that does not fit is dropped and logged once.
            self._sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )
        self._dropping = False

    @property
    def enabled(self) -> bool:
        """Return whether a service manager is listening."""
        return self._sock is not None

    def send(self, **fields: str | int) -> None:
        """Send state lines such as READY=1, STATUS=…; errors are logged, never raised."""
        if self._sock is None:
            return
        payload = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        # Lines logged in the loop are flushed at the end of its iteration; a manager
        # that reads READY=1 (or STOPPING=1) must already find what led up to it.
        flush_log()
        try:
            self._sock.sendto(payload, self._address)
        except BlockingIOError:
            if not self._dropping:
                self._dropping = True
                log.warning("sd_notify.dropped", reason="the service manager's queue is full")
            return
        except OSError as exc:
            log.warning("sd_notify.failed", error=str(exc))
            return
        self._dropping = False

    def close(self) -> None:
        """Close the socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """Return how often to ping the watchdog (half of WatchdogSec), or None when off."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.05, int(usec) / 1e6 / 2)
    except ValueError:
        return None


# -- supervision ------------------------------------------------------------------


class Supervisor:
    """Runs named coroutines and restarts any that fail, with jittered backoff."""

    def __init__(self, metrics: Metrics, rng: random.Random | None = None) -> None:
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.failures: dict[str, int] = {}
        self.errors: dict[str, Exception] = {}  # each task's last failure
        self.backoff_base = 0.5
        self.backoff_cap = 30.0

    def spawn(self, name: str, factory: Callable[[], Awaitable[Any]]) -> asyncio.Task[None]:
        """Start `factory()` under supervision; `name` must be unique among live tasks."""
        task = asyncio.create_task(self._keep_running(name, factory), name=name)
        self.tasks[name] = task
        return task

    async def _keep_running(self, name: str, factory: Callable[[], Awaitable[Any]]) -> None:
        failures = 0
        while True:
            started = time.monotonic()
            try:
                await factory()
                log.info("task.finished", task=name)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if time.monotonic() - started > _STABLE_AFTER:
                    failures = 0
                delay = backoff_delay(failures, self.backoff_base, self.backoff_cap, self.rng)
                failures += 1
                self.failures[name] = failures
                self.errors[name] = exc
                self.metrics.task_restarts.labels(task=name).inc()
                log.error(
                    "task.failed",
                    task=name,
                    error=f"{type(exc).__name__}: {exc}",
                    restart_in=round(delay, 2),
                    failures=failures,
                    # A driver's own operational error (a port in use, a peer away)
                    # explains itself; a traceback is for the unexpected.
                    exc_info=not isinstance(exc, DriverError),
                )
                await asyncio.sleep(delay)

    async def cancel(self, name: str, timeout: float = 5.0) -> None:
        """Cancel one task and wait for it (bounded)."""
        task = self.tasks.pop(name, None)
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, timeout)

    async def cancel_all(self, timeout: float = 5.0) -> None:
        """Cancel every task and wait for them (bounded)."""
        tasks = list(self.tasks.values())
        self.tasks.clear()
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)


# -- what the ops API sees ----------------------------------------------------------


class MetricsScrape:
    """The /metrics page: gauges cheaper to read on scrape are refreshed, then rendered."""

    def __init__(self, metrics: Metrics, refresh: Callable[[], None]) -> None:
        self._metrics = metrics
        self._refresh = refresh

    @property
    def content_type(self) -> str:
        """Return the exposition's Content-Type."""
        return self._metrics.content_type

    def render(self) -> bytes:
        """Refresh the scrape-time gauges and return the exposition."""
        self._refresh()
        return self._metrics.render()


class OutboxDeadLetters:
    """Dead letters in the store, replayed straight into the running dispatcher."""

    def __init__(self, store: Store, dispatcher: Dispatcher) -> None:
        self._store = store
        self._dispatcher = dispatcher

    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        """Return at most limit dead letters, newest first."""
        return await self._store.dead_letters(limit)

    async def replay(self, ids: list[str] | None) -> int:
        """Move dead letters back to the outbox and hand them to the dispatcher now."""
        now = time.time()
        count = await self._store.replay_dead_letters(ids, now)
        if count:
            # At once rather than at the dispatcher's next store scan.
            for item in await self._store.due_outbox(now, 1000):
                self._dispatcher.submit(item)
        return count


# -- the daemon -------------------------------------------------------------------


def ensure_admin_token(config: Config) -> str:
    """Return the configured admin token, or the one kept in <state_dir>/admin-token."""
    if config.ops.admin_token:
        return config.ops.admin_token
    path = config.daemon.state_dir / "admin-token"
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = secrets.token_urlsafe(32)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
    # Not from the config, so config loading did not register it: mask it in logs too.
    register_secret(token)
    return token


def instance_id(config: Config) -> str:
    """Return this daemon's instance id: `[daemon] instance`, else one derived at runtime."""
    return config.daemon.instance or default_instance(config.daemon.state_dir)


def open_store(config: Config, instance: str = "") -> Store:
    """Return the configured store backend (not yet opened), committing as `instance`."""
    if config.store.backend == "postgresql":
        # Imported here: psycopg is only needed by installations that use PostgreSQL.
        from router.store.postgres import PostgresStore

        assert config.store.url is not None  # the config requires it
        return PostgresStore(
            config.store.url,
            pool_size=config.store.pool_size,
            statement_timeout=config.store.statement_timeout,
            connect_timeout=config.store.connect_timeout,
            raw_max_bytes=config.store.raw_max_bytes,
            sslmode=config.store.sslmode,
            sslrootcert=config.store.sslrootcert,
            instance=instance,
            prepared_statements=config.store.prepared_statements,
        )
    return SqliteStore(
        config.db_path(),
        synchronous=config.store.synchronous,
        raw_max_bytes=config.store.raw_max_bytes,
        instance=instance,
    )


class Daemon:
    """One running router."""

    version = __version__

    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.metrics = Metrics()
        self.notifier = Notifier()
        self.supervisor = Supervisor(self.metrics)
        # Several instances may share the store: this one's id owns its outbox items and
        # leases (router.leases); the same on every restart.
        self.instance = instance_id(config)
        self.store: Store = open_store(config, self.instance)
        self.leases = Leases(self.store, self.instance, config.daemon.lease_ttl)
        self.tools: dict[str, AgentTool] = {}
        self.channels: dict[str, Channel] = {}
        self._driver_configs: dict[tuple[str, str], Any] = {}
        self.dispatcher = Dispatcher(
            self.store,
            lambda: self.tools,
            config.outbox,
            self.metrics,
            channels=lambda: self.channels,
            on_delivered=self._delivered,
        )
        self.pipeline = Pipeline(config, self.store, self.metrics, self.dispatcher)
        self.admin_token = ""
        self._ops_runner: web.AppRunner | None = None
        self.ops_port: int | None = None
        self._stopping = asyncio.Event()
        self._reload_requested = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._last_status = ""  # the STATUS= last sent to the service manager

    # -- start ---------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store, restore state, start adapters, ops API and channels."""
        cfg = self.config
        cfg.daemon.state_dir.mkdir(parents=True, exist_ok=True)
        self.admin_token = ensure_admin_token(cfg)
        self.notifier.send(STATUS="opening store")
        await self.store.open()
        # Alive before anything is sent: until then another instance may take our sends.
        try:
            await self.leases.acquire(self.leases.instance_lease)
        except StoreUnavailable as exc:  # reads still work; the heartbeat tries again
            log.warning("lease.renew_failed", lease=self.leases.instance_lease, error=str(exc))
        self.supervisor.spawn("lease:instance", self.leases.heartbeat)
        self.metrics.instance_info.labels(instance=self.instance).set(1)
        for a in cfg.adapters:
            self._start_tool(a)
        # Channels are registered (not run yet) before the outbox starts: its first scan
        # sends the acknowledgements and replies left pending by the previous run, and
        # their channels should exist by then (else those sends wait and retry).
        for c in cfg.channels:
            self._add_channel(c)
        self.supervisor.spawn("outbox", self.dispatcher.run)
        await self.pipeline.restore()
        if cfg.ops.enabled:
            await self._start_ops()
        for c in cfg.channels:
            self._run_channel(c.name)
        await self._wait_channels_listening(fail_on_listen_error=True)
        interval = watchdog_interval()
        if interval is not None:
            self.supervisor.spawn("watchdog", lambda: self._watchdog(interval))
        self.supervisor.spawn("queue-tick", self._queue_tick)
        if self.store.shared:
            # Other instances route on the same store: follow what they change.
            self.supervisor.spawn("shared-routing", self.pipeline.shared.run)
        self._last_status = self._status_line()
        log.info(
            "daemon.ready",
            version=self.version,
            instance=self.instance,
            config=cfg.source,
            state_dir=str(cfg.daemon.state_dir),
            channels=sorted(self.channels),
            adapters=sorted(self.tools),
            agents=len(cfg.agents),
            ops_port=self.ops_port,
            store=cfg.store_label(),
            event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
        )
        # After the line: whoever waits for READY=1 finds it in the log.
        self.notifier.send(READY=1, STATUS=self._last_status)
        if cfg.ops.enabled:
            where = (
                "ops.admin_token in the config"
                if cfg.ops.admin_token
                else str((cfg.daemon.state_dir / "admin-token").resolve())
            )
            source = "" if cfg.source == "<embedded defaults>" else f" -c {cfg.source}"
            log.info(
                "daemon.next_steps",
                ops_admin_key_in=where,
                hint=f'omnirouter send "Where is my parcel?"{source}; omnirouter agents{source}',
            )

    def _ctx(self, kind: str, name: str) -> DriverContext:
        return DriverContext(
            state_dir=self.config.daemon.state_dir,
            log=structlog.get_logger(f"{kind}.{name}"),
            tickets=self.pipeline.ticket_status,
            conversations=self.pipeline.core.tickets,
            metrics=self.metrics,
        )

    def _start_tool(self, section: Any) -> None:
        cls = load_driver(ADAPTERS, section.type)
        tool: AgentTool = cls(section.name, section, self._ctx("adapters", section.name))
        self.tools[section.name] = tool
        self._driver_configs[("adapter", section.name)] = section
        actions = self.pipeline.actions_from(
            section.name, own_agents_only=bool(getattr(cls, "acts_only_for_its_agents", False))
        )
        self._spawn_run(
            f"adapter:{section.name}",
            f"tool:{section.name}",
            bool(cls.single_owner_for(section)),
            lambda: tool.run(actions),
            tool.standby,
        )

    def _start_channel(self, section: Any) -> None:
        self._add_channel(section)
        self._run_channel(section.name)

    def _add_channel(self, section: Any) -> None:
        """Construct a channel and register it (and its outbox target); do not run it."""
        cls = load_driver(CHANNELS, section.type)
        channel: Channel = cls(section.name, section, self._ctx("channels", section.name))
        self.channels[section.name] = channel
        self._driver_configs[("channel", section.name)] = section
        if channel.answers_customers:
            self.pipeline.answering_channels.add(section.name)

    def _run_channel(self, name: str) -> None:
        """Run a registered channel's intake under supervision."""
        channel = self.channels[name]
        section = self._driver_configs[("channel", name)]
        single_owner = load_driver(CHANNELS, section.type).single_owner_for(section)
        self._spawn_run(
            f"channel:{name}",
            f"channel:{name}",
            bool(single_owner),
            lambda: channel.run(self.pipeline.ingest),
            channel.standby,
        )

    def _spawn_run(
        self,
        task: str,
        lease: str,
        single_owner: bool,
        run: Callable[[], Awaitable[Any]],
        standby: Callable[[], None],
    ) -> None:
        """Run a driver's `run()` under supervision; a single-owner one only under its lease.

        Its source allows one reader at a time: with several instances on one store only
        the holder of `lease` reads it (router.leases); the others keep it on standby.
        """
        if single_owner:
            self.supervisor.spawn(task, lambda: self.leases.hold(lease, run, standby))
        else:
            self.supervisor.spawn(task, run)

    async def _wait_channels_listening(
        self, timeout: float = 10.0, *, fail_on_listen_error: bool = False
    ) -> None:
        # READY=1 should mean "accepting messages": wait for each channel to connect.
        # At start a port that cannot be bound fails the start (exit 1) instead of being
        # retried for ever behind READY=1: it is most likely a second instance.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(c.state in UP_STATES for c in self.channels.values()):
                return
            if fail_on_listen_error:
                for name in self.channels:
                    error = self.supervisor.errors.get(f"channel:{name}")
                    if isinstance(error, ListenError):
                        raise error
            await asyncio.sleep(0.01)
        log.warning(
            "daemon.channels_not_ready", states={n: str(c.state) for n, c in self.channels.items()}
        )

    async def _start_ops(self) -> None:
        ops = self.config.ops
        if ops.allow_public:
            log.warning("ops.public", host=ops.host, port=ops.port)
        limits = HttpLimits(read_timeout=ops.read_timeout, max_connections=ops.max_connections)
        app = OpsApi(
            health=self,
            metrics=MetricsScrape(self.metrics, self.refresh_metrics),
            agents=self.pipeline,
            dead_letters=OutboxDeadLetters(self.store, self.dispatcher),
            corrections=self.store,
            history=self.store,
            contacts=self.pipeline,
            admin_token=self.admin_token,
            limits=limits,
        ).app()
        self._ops_runner = GuardedRunner(app, name="ops", limits=limits, shutdown_timeout=60.0)
        await self._ops_runner.setup()
        self.ops_port = await start_site(self._ops_runner, ops.host, ops.port, "ops API")

    def _delivered(self, item: OutboxItem) -> None:
        if item.created_at:
            self.metrics.delivery_seconds.labels(target=str(item.target)).observe(
                max(0.0, time.time() - item.created_at)
            )

    async def _watchdog(self, interval: float) -> None:
        # Pinged from the loop itself: a stuck loop or a dead store stops the pings and
        # systemd restarts us.
        while True:
            if await self.store.ping():
                self.notifier.send(WATCHDOG=1)
            else:
                log.error("watchdog.store_unresponsive")
            await asyncio.sleep(interval)

    async def _queue_tick(self) -> None:
        # A safety net: anything that could be placed but was missed by an event gets placed.
        # It also keeps `systemctl status` (STATUS=) current with the queue depth.
        while True:
            await asyncio.sleep(1.0)
            await self.pipeline.drain_queues()
            await self.pipeline.tick()
            status = self._status_line()
            if status != self._last_status and not self._stopping.is_set():
                self._last_status = status
                self.notifier.send(STATUS=status)

    def _status_line(self) -> str:
        depth = sum(self.pipeline.scheduler.queue_depths().values())
        return (
            f"{len(self.channels)} channel(s), {len(self.tools)} adapter(s), "
            f"{len(self.pipeline.scheduler.agents)} agent(s), {depth} waiting"
        )

    # -- readiness and metrics -----------------------------------------------------

    async def readiness(self) -> dict[str, Any]:
        """Return the store's and every driver's state; ready when all are up."""
        try:
            store_ok = await asyncio.wait_for(self.store.ping(), 2.0)
        except Exception:
            store_ok = False
        drivers = {}
        for kind, group in (("channel", self.channels), ("adapter", self.tools)):
            for name, d in group.items():
                info: dict[str, Any] = {
                    "kind": kind,
                    "type": self._driver_configs[(kind, name)].type,
                    "state": str(d.state),
                }
                if d.last_error:
                    info["last_error"] = d.last_error
                if details := d.details():
                    info["details"] = details
                last_success = d.last_success
                if last_success is not None:
                    info["last_success"] = last_success
                    info["lag_s"] = round(max(0.0, time.time() - last_success), 3)
                drivers[name] = info
        ready = (
            store_ok
            and not self._stopping.is_set()
            and all(d["state"] in UP_STATES for d in drivers.values())
        )
        return {
            "ready": ready,
            "stopping": self._stopping.is_set(),
            "store": "ok" if store_ok else "down",
            "instance": self.instance,
            # Held by this instance, with when each lapses unless renewed (Unix time).
            "leases": self.leases.holding(),
            "drivers": drivers,
            # The names an operator must look at (e.g. a webhook whose breaker is open).
            "degraded": sorted(name for name, d in drivers.items() if d["state"] not in UP_STATES),
        }

    def refresh_metrics(self) -> None:
        """Update gauges that are cheaper to read on scrape than to maintain."""
        m = self.metrics
        m.outbox_backlog.set(self.dispatcher.backlog)
        m.leases_held.set(len(self.leases.holding()))
        workers = self.pipeline.core.classifier_workers
        m.classifier_workers.set(workers.alive if workers is not None else 0)
        # Depth alone hides a stuck queue that is short; the oldest wait shows it.
        for queue in self.pipeline.queues_view():
            m.queue_oldest_wait.labels(queue=queue["queue"]).set(queue["oldest_wait_s"])
        for kind, group in (("channel", self.channels), ("adapter", self.tools)):
            for name, d in group.items():
                for state in DriverState:
                    m.driver_up.labels(kind=kind, name=name, state=str(state)).set(
                        1 if d.state == state else 0
                    )
                if d.last_success is not None:
                    m.driver_last_success.labels(kind=kind, name=name).set(d.last_success)

    # -- reload --------------------------------------------------------------------

    async def reload(self) -> bool:
        """Load and apply the config file again; keep the running one if it is invalid."""
        async with self._reload_lock:
            self.notifier.send(
                RELOADING=1,
                MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000,
                STATUS="reloading configuration",
            )
            try:
                new = load_config(self.config_path)
            except ConfigError as exc:
                self.metrics.reloads.labels(result="rejected").inc()
                log.error("config.reload_rejected", source=exc.source, errors=exc.errors)
                self.notifier.send(
                    READY=1,
                    STATUS=f"reload rejected ({len(exc.errors)} error(s)); "
                    "running the previous configuration",
                )
                return False
            try:
                await self._apply(new)
            except BaseException:
                # systemd waits for READY=1 after RELOADING=1: never leave it hanging,
                # even when applying failed half way (the error is logged by serve()).
                self.metrics.reloads.labels(result="failed").inc()
                self.notifier.send(READY=1, STATUS="reload failed; see the journal")
                raise
            self.metrics.reloads.labels(result="ok").inc()
            self._last_status = self._status_line()
            self.notifier.send(READY=1, STATUS=self._last_status)
            return True

    async def _apply(self, new: Config) -> None:
        old = self.config
        # The same plan `omnirouter config diff` shows.
        needs_restart = reload_plan(old, new).needs_restart
        if needs_restart:
            log.warning("config.reload_needs_restart", sections=needs_restart)
        # Logging settings apply in place; the stream and format the CLI chose stay.
        verbosity = (new.daemon.log_level, new.daemon.log_bodies)
        if verbosity != (old.daemon.log_level, old.daemon.log_bodies):
            log.info("config.logging_changed", log_level=verbosity[0], log_bodies=verbosity[1])
            set_verbosity(new.daemon.log_level, log_bodies=new.daemon.log_bodies)
        # Adapters first, so channels never route to a tool that is gone.
        await self._swap(
            "adapter",
            {a.name: a for a in new.adapters},
            self.tools,
            self._start_tool,
            self._stop_tool,
        )
        self.config = new
        await self.pipeline.apply_config(new)
        await self._swap(
            "channel",
            {c.name: c for c in new.channels},
            self.channels,
            self._start_channel,
            self._stop_channel,
        )
        await self._wait_channels_listening()
        log.info(
            "config.reloaded",
            source=new.source,
            channels=sorted(self.channels),
            adapters=sorted(self.tools),
            agents=len(new.agents),
            needs_restart=needs_restart or None,
        )

    async def _swap(
        self,
        kind: str,
        wanted: dict[str, Any],
        running: dict[str, Any],
        start: Callable[[Any], None],
        stop: Callable[[str], Awaitable[None]],
    ) -> None:
        for name in list(running):
            if name not in wanted or wanted[name] != self._driver_configs.get((kind, name)):
                await stop(name)
        for name, section in wanted.items():
            if name not in running:
                start(section)

    async def _stop_tool(self, name: str) -> None:
        tool = self.tools.pop(name)
        self._driver_configs.pop(("adapter", name), None)
        with contextlib.suppress(Exception):
            await tool.stop()
        await self.supervisor.cancel(f"adapter:{name}")

    async def _stop_channel(self, name: str) -> None:
        channel = self.channels.pop(name)
        self._driver_configs.pop(("channel", name), None)
        self.pipeline.answering_channels.discard(name)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(channel.stop(), self.config.daemon.shutdown_timeout)
        await self.supervisor.cancel(f"channel:{name}")

    # -- stop ----------------------------------------------------------------------

    def request_stop(self) -> None:
        """Begin a graceful stop (SIGTERM, SIGINT)."""
        self._stopping.set()

    def request_reload(self) -> None:
        """Schedule a reload (SIGHUP)."""
        self._reload_requested.set()

    async def stop(self) -> None:
        """Stop intake, let in-flight messages commit, send what is due, close everything."""
        self._stopping.set()
        timeout = self.config.daemon.shutdown_timeout
        deadline = time.monotonic() + timeout
        self.notifier.send(STOPPING=1, STATUS="draining")
        log.info("daemon.stopping", timeout=timeout)
        # 1. Channels refuse new work and finish what they hold (each acks only after commit).
        await asyncio.gather(
            *(
                asyncio.wait_for(c.stop(), max(0.1, deadline - time.monotonic()))
                for c in self.channels.values()
            ),
            return_exceptions=True,
        )
        for name in list(self.channels):
            await self.supervisor.cancel(
                f"channel:{name}", timeout=max(0.1, deadline - time.monotonic())
            )
        # 2. Send whatever is due; anything left stays in the outbox for the next start.
        drained = await self.dispatcher.drain(max(0.0, deadline - time.monotonic() - 0.5))
        await self.pipeline.close()
        # 3. Tools, ops, store.
        await self.supervisor.cancel_all(timeout=max(0.1, deadline - time.monotonic()))
        for tool in self.tools.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(tool.stop(), max(0.1, deadline - time.monotonic()))
        if self._ops_runner is not None:
            await self._ops_runner.cleanup()
        # Gone on purpose: another instance takes over our pending sends at once.
        await self.leases.release(self.leases.instance_lease)
        try:
            counts = await self.store.delivery_counts()
        except Exception as exc:  # a full or failing store must not keep the stop from finishing
            counts = {}
            log.warning("daemon.counts_unavailable", error=str(exc))
        await self.store.close()
        # Sent items whose delete never committed go out again after a restart: not drained.
        undeleted = self.store.pending_deletes
        log.info(
            "daemon.stopped",
            outbox_drained=drained and undeleted == 0,
            outbox_pending=counts.get("pending"),
            outbox_undeleted=undeleted,
            dead_letters=counts.get("dead"),
        )
        self.notifier.close()

    async def serve(self) -> None:
        """Run until a stop is requested; handle reload requests meanwhile."""
        while not self._stopping.is_set():
            stop_wait = asyncio.ensure_future(self._stopping.wait())
            reload_wait = asyncio.ensure_future(self._reload_requested.wait())
            await asyncio.wait({stop_wait, reload_wait}, return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            reload_wait.cancel()
            if self._reload_requested.is_set() and not self._stopping.is_set():
                self._reload_requested.clear()
                try:
                    await self.reload()
                except Exception as exc:  # a reload must never take the daemon down
                    log.error(
                        "config.reload_failed", error=f"{type(exc).__name__}: {exc}", exc_info=True
                    )


async def run_daemon(config: Config, config_path: Path | None) -> int:
    """Run a daemon until SIGTERM/SIGINT; return the process exit code."""
    # The SQLite writer thread gives the GIL back on every statement and must win it
    # back from a busy event loop; with the default 5 ms switch interval each hand-off
    # can stall a commit (and every waiting request) for up to 5 ms.
    sys.setswitchinterval(_SWITCH_INTERVAL)
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    daemon = Daemon(config, config_path)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, daemon.request_stop)
    loop.add_signal_handler(signal.SIGINT, daemon.request_stop)
    loop.add_signal_handler(signal.SIGHUP, daemon.request_reload)
    loop.set_exception_handler(AcceptErrorLog())
    try:
        await daemon.start()
    except Exception as exc:
        # A port in use or an unreadable store is the operator's to fix, not a bug: one
        # line, no traceback. Anything else keeps its traceback for the bug report.
        expected = isinstance(exc, ListenError | StoreUnavailable | PermissionError)
        log.error(
            "daemon.start_failed", error=f"{type(exc).__name__}: {exc}", exc_info=not expected
        )
        if expected:
            hint = " (is another omnirouter running?)" if isinstance(exc, ListenError) else ""
            print(f"omnirouter: cannot start: {exc}{hint}", file=sys.stderr)
        with contextlib.suppress(Exception):
            await daemon.stop()
        return EXIT_FAILURE
    await daemon.serve()
    await daemon.stop()
    return EXIT_OK
