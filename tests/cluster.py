"""Several `omnirouter run` processes on one PostgreSQL database, driven like production.

Used by tests/test_multi_instance.py and bench/multi_instance.py:
- `Cluster`: N daemons with their own state dirs and ports, one store, one webhook
  agent tool whose endpoint is `AgentDesk`;
- `AgentDesk`: the agents' side, a threaded HTTP endpoint that records every delivery
  and resolves each assigned ticket after a short while through any live instance's
  ops API (as a person clicking "done" in their tool would), which frees the slot the
  next waiting message takes;
- `post_all`: customers posting through every live instance (a load balancer), each
  post retried on another instance with the same Idempotency-Key when one fails;
- `LoadSampler`: reads every agent's open conversations from the database many times a
  second, to catch a capacity violation at any moment, not only at the end.
"""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg

from tests.daemon_harness import DaemonProcess, base_config, ports

TOKEN = "test-admin-token-0123456789"
WEBHOOK_SECRET = "cluster-webhook-secret-5b2e81c4"


@dataclass
class Delivery:
    """One assignment delivery the desk received."""

    delivery_id: str
    agent_id: str
    ticket: str
    message_id: str
    received_at: float


class AgentDesk:
    """The agents' webhook endpoint, and the people behind it resolving their tickets."""

    def __init__(
        self, cluster: Cluster | None = None, *, handle_time: float = 0.02, resolvers: int = 8
    ) -> None:
        self.cluster = cluster
        self.handle_time = handle_time  # seconds an agent takes before resolving
        self.resolvers = resolvers  # resolves in flight at once (agents working in parallel)
        self.deliveries: list[Delivery] = []
        self.requests = 0
        self.resolved: set[str] = set()
        self.resolve_failures = 0
        self.refusals: dict[str, int] = {}  # why instances refused a resolve (diagnostics)
        self._lock = threading.Lock()
        self._todo: list[tuple[float, Delivery, int]] = []
        self._stop = threading.Event()
        desk = self

        class Handler(BaseHTTPRequestHandler):
            # Keep-alive, as a real receiver: the tool's connections are reused, so the
            # daemons' CPU does not count a TCP connect per delivery.
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                desk._received(json.loads(body))

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._threads = [
            threading.Thread(target=self.server.serve_forever, daemon=True),
            threading.Thread(target=self._resolver, daemon=True),
        ]

    def start(self) -> AgentDesk:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()

    def _received(self, body: dict[str, Any]) -> None:
        with self._lock:
            self.requests += 1
            if body.get("kind") != "assignment":
                return
            d = Delivery(
                body["delivery_id"],
                body["agent_id"],
                body["ticket"],
                body["message"]["id"],
                time.time(),
            )
            self.deliveries.append(d)
            self._todo.append((time.monotonic() + self.handle_time, d, 0))

    def _resolver(self) -> None:
        """Resolve delivered tickets through a live instance, retrying on another one.

        Several agents work at once: the resolves go out in parallel.
        """
        with ThreadPoolExecutor(self.resolvers) as pool:
            while not self._stop.is_set():
                now = time.monotonic()
                with self._lock:
                    due = [t for t in self._todo if t[0] <= now]
                    self._todo = [t for t in self._todo if t[0] > now]
                if not due:
                    time.sleep(0.005)
                    continue
                list(pool.map(self._resolve_one, due))

    def _resolve_one(self, todo: tuple[float, Delivery, int]) -> None:
        _, d, tries = todo
        if d.ticket in self.resolved:
            return
        status = self._resolve(d)
        if status == 200:
            with self._lock:
                self.resolved.add(d.ticket)
        elif tries < 400:
            # The instance asked has not learnt the assignment yet, or is dead.
            with self._lock:
                self.resolve_failures += 1
                self._todo.append((time.monotonic() + 0.05, d, tries + 1))

    def _resolve(self, d: Delivery) -> int:
        cluster = self.cluster
        if cluster is None:
            return 0
        live = cluster.live()
        if not live:
            return 0
        instance = random.choice(live)
        try:
            req = urllib.request.Request(
                f"http://127.0.0.1:{instance.ops_port}/v1/tickets/{d.ticket}/actions",
                data=json.dumps({"agent": d.agent_id, "action": "resolve"}).encode(),
                method="POST",
                headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=5) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            reason = exc.read().decode(errors="replace")[:200]
            with self._lock:
                self.refusals[reason] = self.refusals.get(reason, 0) + 1
            return int(exc.code)
        except OSError:
            return 0


@dataclass
class Instance:
    """One daemon of the cluster."""

    name: str
    dir: Path
    web_port: int
    ops_port: int
    daemon: DaemonProcess
    alive: bool = False
    killed_at: float = 0.0  # time.monotonic() of the SIGKILL

    def leases(self) -> dict[str, float]:
        """Return the leases this instance says it holds (its /readyz), {} if it is down."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.ops_port}/readyz", timeout=2
            ) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        except (OSError, ValueError):
            return {}
        held: dict[str, float] = body.get("leases") or {}
        return held


@dataclass
class Cluster:
    """N daemons sharing one PostgreSQL database and one webhook agent tool.

    An empty `dsn` leaves out `[store] url`: each daemon then keeps the default SQLite
    store in its state dir (the single-instance baseline of bench/multi_instance.py).
    """

    root: Path
    dsn: str
    desk_url: str
    agents: list[tuple[str, int]]
    size: int = 3
    extra: str = ""
    instances: list[Instance] = field(default_factory=list)

    def __post_init__(self) -> None:
        roster = "\n".join(
            f'[[agents]]\nid = "{a}"\ncapacity = {cap}\ntool = "desk"\nskills = ["en", "zh"]\n'
            for a, cap in self.agents
        )
        adapter = (
            f'[[adapters]]\ntype = "webhook"\nname = "desk"\n'
            f'url = "{self.desk_url}/agents/{{agent_id}}"\nsecret = "${{CLUSTER_WEBHOOK_SECRET}}"\n'
            "timeout = 5\n"
        )
        for i in range(self.size):
            name = f"i{i}"
            d = self.root / name
            d.mkdir(parents=True)
            web_port, ops_port = ports()
            config = base_config(
                d / "state",
                web_port=web_port,
                ops_port=ops_port,
                admin_token=TOKEN,
                adapters=adapter,
                agents=roster,
            )
            if self.dsn:
                config += f'\n[store]\nurl = "{self.dsn}"\npool_size = 3\n'
            config += f"\n{self.extra}"
            daemon = DaemonProcess(d, config, env={"CLUSTER_WEBHOOK_SECRET": WEBHOOK_SECRET})
            self.instances.append(Instance(name, d, web_port, ops_port, daemon))

    def start(self) -> Cluster:
        for instance in self.instances:
            instance.daemon.start(timeout=60)
            instance.alive = True
        return self

    def live(self) -> list[Instance]:
        return [i for i in self.instances if i.alive]

    def kill(self, index: int) -> None:
        instance = self.instances[index]
        instance.alive = False
        instance.killed_at = time.monotonic()
        instance.daemon.kill()

    def holder_of(self, lease: str) -> Instance | None:
        """Return the live instance that holds `lease`, if any."""
        for instance in self.live():
            if lease in instance.leases():
                return instance
        return None

    def close(self) -> None:
        for instance in self.instances:
            instance.alive = False
            instance.daemon.close()


@dataclass
class PostReport:
    """What the customers saw."""

    answered: dict[str, str] = field(default_factory=dict)  # idempotency key -> ticket
    retries: int = 0
    latencies: list[float] = field(default_factory=list)


def post_all(
    cluster: Cluster,
    count: int,
    *,
    workers: int = 8,
    kill_at: int | None = None,
    kill_index: int = 0,
    rate: float | None = None,
) -> PostReport:
    """Post `count` messages over the live instances; kill one after `kill_at` posts."""
    report = PostReport()
    lock = threading.Lock()
    started = time.monotonic()
    sent = 0

    def one(n: int) -> None:
        nonlocal sent
        if rate is not None:
            delay = started + n / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        key = f"cluster-{n}"
        body = json.dumps(
            {"text": f"Parcel {n} never arrived", "contact": {"handle": f"c{n}@example.com"}}
        ).encode()
        attempt = 0
        while True:
            live = cluster.live()
            instance = live[(n + attempt) % len(live)] if live else None
            attempt += 1
            if instance is None:
                time.sleep(0.05)
                continue
            t0 = time.perf_counter()
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{instance.web_port}/v1/messages",
                    data=body,
                    method="POST",
                    headers={"Content-Type": "application/json", "Idempotency-Key": key},
                )
                with urllib.request.urlopen(req, timeout=10) as resp:
                    answer = json.loads(resp.read())
            except (OSError, ValueError):
                with lock:
                    report.retries += 1
                time.sleep(0.02)
                continue
            with lock:
                report.latencies.append(time.perf_counter() - t0)
                report.answered[key] = answer["ticket"]
                sent += 1
                if kill_at is not None and sent == kill_at:
                    cluster.kill(kill_index)
            return

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(count)))
    return report


class LoadSampler:
    """Samples each agent's open conversations (per channel type) from the database."""

    def __init__(self, dsn: str, capacities: dict[str, int], interval: float = 0.02) -> None:
        self.dsn = dsn
        self.capacities = capacities
        self.interval = interval
        self.samples = 0
        self.violations: list[tuple[str, int]] = []
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> LoadSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self._stop.is_set():
                # An agent's capacity counts per channel type (router.model.Agent).
                rows = conn.execute(
                    "SELECT agent_id, channel_type, count(*) FROM conversations "
                    "WHERE state='open' AND agent_id IS NOT NULL GROUP BY agent_id, channel_type"
                ).fetchall()
                self.samples += 1
                for agent, channel_type, n in rows:
                    key = f"{agent}/{channel_type}"
                    self.peak[key] = max(self.peak.get(key, 0), n)
                    if n > self.capacities.get(agent, 0):
                        self.violations.append((key, n))
                time.sleep(self.interval)


def history_violations(dsn: str, capacities: dict[str, int]) -> list[str]:
    """Replay every agent's assignments and resolves in commit order; name any excess.

    The audit (ticket_events) numbers one agent's assigned and resolved events in the
    order they committed: the store takes the agent's row lock before writing either.
    Counting +1 per assignment to an agent and -1 when its conversation is resolved,
    withdrawn or transferred, the open conversations of every agent must never exceed
    its capacity.
    """
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT e.id, e.conversation_id, e.kind, e.detail, c.channel_type "
            "FROM ticket_events e JOIN conversations c ON c.id = e.conversation_id "
            "WHERE e.kind IN ('assigned', 'resolved', 'withdrawn', 'transferred') ORDER BY e.id"
        ).fetchall()
    # An agent's capacity counts per channel type (router.model.Agent).
    holder: dict[str, str] = {}
    open_now: dict[str, int] = {}
    problems: list[str] = []
    for event_id, conversation, kind, detail, channel_type in rows:
        agent = json.loads(detail).get("agent", "")
        if kind == "assigned":
            previous = holder.get(conversation)
            if previous:
                open_now[previous] -= 1  # moved from another agent
            key = holder[conversation] = f"{agent}/{channel_type}"
            open_now[key] = open_now.get(key, 0) + 1
            if open_now[key] > capacities.get(agent, 0):
                problems.append(f"{key} held {open_now[key]} at event {event_id}")
        elif holder.get(conversation):
            open_now[holder.pop(conversation)] -= 1
    return problems


def wait_drained(dsn: str, expected: int, within: float) -> dict[str, int]:
    """Wait until `expected` messages are stored and none is queued or unresolved."""
    deadline = time.monotonic() + within
    counts: dict[str, int] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            counts = {
                str(state): int(n)
                for state, n in conn.execute(
                    "SELECT state, count(*) FROM messages GROUP BY state"
                ).fetchall()
            }
            if sum(counts.values()) >= expected and counts.get("resolved", 0) >= expected:
                return counts
            time.sleep(0.2)
    return counts


def duplicates(values: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    dup: list[str] = []
    for v in values:
        if v in seen:
            dup.append(v)
        seen.add(v)
    return dup
