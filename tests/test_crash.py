"""The "nothing lost" proof: SIGKILL the real daemon under load, twice, and audit the state.

Eight client threads POST 500 messages (unique Idempotency-Key each, a mix of zh/en,
complaints/inquiries, follow-ups in the same conversation) to a daemon whose roster has
far fewer slots than there are conversations, so most messages queue. An "agent" thread
resolves delivered conversations over MQTT, so slots free up and queued messages are
handed out while the daemon is being killed. At two seeded points the daemon is SIGKILLed
and restarted on the same state dir; clients retry every unanswered POST with the same
key until it is acknowledged.

Checked at each kill (reading the database of the dead process) and at the end:
- every 2xx corresponds to exactly one stored message with that (channel, external_id),
  and every retried key got the same message id back;
- no message assigned twice, every assignment delivered exactly once per delivery id
  in the agents' inbox files (the webhook agent may see at-least-once repeats, but only
  under the same delivery id), each assigned message under exactly one delivery id;
- unassigned messages are still `queued` and are in the scheduler's queue after restart;
- no agent holds more open conversations than its capacity, in the database and in
  the daemon's own view (/v1/agents);
- the outbox ends empty with no dead letters.

A unit-level test below checks that a pipeline restored after a crash-like stop sends
pending outbox items under their original delivery ids.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import random
import signal
import socket
import sqlite3
import threading
import time
import urllib.error
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog

from adapters.inbox import InboxTool
from router.config import loads_config
from router.drivers import AgentAction, Delivery, DriverContext, DriverState, TransientError
from router.metrics import Metrics
from router.model import InboundMessage
from router.outbox import Dispatcher
from router.pipeline import Pipeline
from router.store.sqlite import SqliteStore
from tests.daemon_harness import DaemonProcess, http
from tests.peers import MOSQUITTO, Mosquitto, WebhookReceiver, free_port

pytestmark = pytest.mark.slow

N_MESSAGES = 500
N_CLIENTS = 8
N_CONTACTS = 60
ADMIN = "crash-test-admin-token-0123456789"
HOOK_SECRET_ENV = "OMNIROUTER_TEST_CRASH_HOOK_SECRET"
HOOK_SECRET = "crash-test-hook-secret-8d1f"
# id -> (capacity, adapter, skills); 12 slots for ~70 conversations.
AGENTS: dict[str, tuple[int, str, list[str]]] = {
    "alice": (3, "inbox", ["en"]),
    "bo": (4, "inbox", ["zh", "en"]),
    "chen": (3, "inbox", ["zh"]),
    "dora": (2, "hook", ["zh", "en"]),
}
TEXTS = {
    ("en", "complaint"): [
        "I was charged twice for order {n} and nobody answers, this is unacceptable",
        "Terrible service: my parcel {n} arrived broken and support ignored me",
    ],
    ("en", "inquiry"): [
        "Hello, what are your opening hours on Sunday? (question {n})",
        "Could you tell me how to change the delivery address of order {n}?",
    ],
    ("zh", "complaint"): [
        "订单{n}被重复扣款了，客服一直不回复，太差劲了，我要投诉",
        "快递{n}送到时已经坏了，服务太差，非常不满意",
    ],
    ("zh", "inquiry"): [
        "请问订单{n}什么时候发货？",
        "你好，请问周末营业时间是几点到几点？（问题{n}）",
    ],
}


# -- the daemon's surroundings -------------------------------------------------------


def crash_config(
    state_dir: Path, web_port: int, ops_port: int, hook_url: str, mqtt_port: int | None
) -> str:
    """Return the daemon config: web intake, inbox + webhook (+ MQTT for actions) adapters."""
    adapters = [
        '[[adapters]]\ntype = "inbox"\nname = "inbox"\n',
        f'[[adapters]]\ntype = "webhook"\nname = "hook"\nurl = "{hook_url}/agents/{{agent_id}}"\n'
        f'secret = "${{{HOOK_SECRET_ENV}}}"\ntimeout = 5\n',
    ]
    if mqtt_port is not None:
        adapters.append(
            f'[[adapters]]\ntype = "mqtt"\nname = "actions"\nhost = "127.0.0.1"\n'
            f"port = {mqtt_port}\nreconnect_min = 0.05\nreconnect_max = 0.5\n"
        )
    agents = "\n".join(
        f'[[agents]]\nid = "{a}"\ncapacity = {cap}\ntool = "{tool}"\nskills = {json.dumps(sk)}\n'
        for a, (cap, tool, sk) in AGENTS.items()
    )
    return f"""
[daemon]
state_dir = "{state_dir}"
shutdown_timeout = 10

[ops]
host = "127.0.0.1"
port = {ops_port}
admin_token = "{ADMIN}"

[outbox]
backoff_base = 0.05
backoff_cap = 0.5
poll_interval = 0.5

[[channels]]
type = "web"
name = "web"
host = "127.0.0.1"
port = {web_port}

{"".join(adapters)}

{agents}
"""


class ThreadedWebhook:
    """A WebhookReceiver (tests.peers) served from its own event loop in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="webhook", daemon=True)
        self.receiver = WebhookReceiver(HOOK_SECRET)

    def start(self) -> ThreadedWebhook:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.receiver.start(), self.loop).result(10)
        return self

    def deliveries(self) -> list[dict[str, Any]]:
        """Return the accepted delivery bodies, each with the X-Omnirouter-Delivery header."""

        def collect() -> list[dict[str, Any]]:
            return [
                {**r.json, "_header_id": r.headers.get("X-Omnirouter-Delivery")}
                for r in self.receiver.deliveries
                if isinstance(r.json, dict)
            ]

        return asyncio.run_coroutine_threadsafe(_call(collect), self.loop).result(10)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.receiver.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def _call(fn: Any) -> Any:
    return fn()


def read_inboxes(inbox_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Return every complete line of every agent's inbox file (a torn last line is skipped)."""
    out: dict[str, list[dict[str, Any]]] = {}
    if not inbox_dir.is_dir():
        return out
    for path in sorted(inbox_dir.glob("*.jsonl")):
        data = path.read_bytes()
        lines = data.split(b"\n")[:-1]  # the part after the last newline is not complete
        out[path.stem] = [json.loads(line) for line in lines if line.strip()]
    return out


def fixed_port(rng: random.Random) -> int:
    """Return a free port below the ephemeral range.

    The daemon binds the same ports again after each kill; a port from the ephemeral
    range (tests.peers.free_port) could meanwhile be the local end of some client
    connection, and the restart would fail with EADDRINUSE.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100):
        port = rng.randint(max(1024, low - 12000), low - 1)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


@contextlib.contextmanager
def read_db(path: Path) -> Iterator[sqlite3.Connection]:
    """Open the daemon's database read-only (works while it runs: WAL readers do not block)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        yield conn
    finally:
        conn.close()


# -- the clients ------------------------------------------------------------------------


@dataclass
class Ack:
    key: str
    status: int
    message_id: str
    conversation_id: str
    attempts: int


@dataclass
class Traffic:
    """Shared between client threads and the test."""

    web_url: str
    plan: list[tuple[str, dict[str, Any]]]  # (idempotency key, body) in send order
    gate: threading.Event = field(default_factory=threading.Event)  # clear: clients hold
    halt: threading.Event = field(default_factory=threading.Event)  # set: clients give up
    lock: threading.Lock = field(default_factory=threading.Lock)
    next_index: int = 0
    acks: dict[str, Ack] = field(default_factory=dict)
    # Every 2xx answer seen, including repeats for the same key after a lost answer.
    answers: list[tuple[str, int, str]] = field(default_factory=list)
    # (handle, web session) -> the conversation token its first message got back.
    sessions: dict[tuple[str, str], str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    retries: int = 0

    def take(self) -> tuple[str, dict[str, Any]] | None:
        with self.lock:
            if self.next_index >= len(self.plan):
                return None
            item = self.plan[self.next_index]
            self.next_index += 1
            return item

    def acked(self) -> int:
        with self.lock:
            return len(self.acks)

    def client(self, deadline: float) -> None:
        """Send planned messages one by one; retry each with its key until it is acknowledged."""
        try:
            while (item := self.take()) is not None:
                key, planned = item
                # A web session continues its conversation with the token its first
                # message got back; decided once, as every retry must send the same body.
                body = dict(planned)
                session = body.pop("conversation", None)
                session_key = (body["contact"]["handle"], session)
                if session is not None:
                    with self.lock:
                        token = self.sessions.get(session_key)
                    if token:
                        body["conversation"] = token
                attempts = 0
                while True:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{key} never acknowledged")
                    if self.halt.is_set():
                        return
                    self.gate.wait(30)
                    attempts += 1
                    try:
                        status, answer, _ = http(
                            "POST",
                            f"{self.web_url}/v1/messages",
                            body,
                            {"Idempotency-Key": key},
                            timeout=5.0,
                        )
                    except (OSError, urllib.error.URLError, ValueError):
                        # Refused, reset, timed out, or an answer cut off by the kill.
                        status, answer = 0, None
                    if status in (200, 201) and isinstance(answer, dict):
                        with self.lock:
                            if session is not None and answer.get("conversation_token"):
                                self.sessions.setdefault(session_key, answer["conversation_token"])
                            self.answers.append((key, status, answer["message_id"]))
                            self.acks.setdefault(
                                key,
                                Ack(
                                    key,
                                    status,
                                    answer["message_id"],
                                    answer["conversation_id"],
                                    attempts,
                                ),
                            )
                        break
                    if status not in (0, 500, 502, 503):
                        with self.lock:
                            self.errors.append(f"{key}: {status} {answer!r}"[:300])
                        break
                    with self.lock:
                        self.retries += 1
                    time.sleep(0.02)
        except Exception as exc:  # reported by the test, never an unhandled thread exception
            with self.lock:
                self.errors.append(f"client crashed: {type(exc).__name__}: {exc}")


def make_plan(
    rng: random.Random, seed: int, messages: int = N_MESSAGES
) -> list[tuple[str, dict[str, Any]]]:
    """Return `messages` (key, body): contacts recur (follow-ups), some with web sessions."""
    contacts = []
    for i in range(N_CONTACTS):
        lang = "zh" if i % 3 == 0 else "en"
        session = f"s{i % 2}" if i % 5 == 0 else None
        contacts.append((f"c{i:02d}@{lang}.example", lang, session))
    # A few chatty customers send most of the follow-ups.
    weights = [8 if i < 6 else 1 for i in range(N_CONTACTS)]
    plan = []
    for n in range(messages):
        handle, lang, session = rng.choices(contacts, weights)[0]
        label = rng.choice(["complaint", "inquiry"])
        body: dict[str, Any] = {
            "text": rng.choice(TEXTS[(lang, label)]).format(n=n),
            "contact": {"handle": handle, "name": handle.split("@")[0]},
            "language": lang,
        }
        if session is not None:
            body["conversation"] = session
        plan.append((f"crash-{seed}-{n:04d}", body))
    return plan


# -- the agent who resolves ---------------------------------------------------------------


class Resolver:
    """Resolves conversations it saw delivered, over MQTT actions, to free slots."""

    def __init__(self, mqtt_port: int, inbox_dir: Path, hook: ThreadedWebhook, seed: int) -> None:
        import paho.mqtt.client as mqtt

        self.inbox_dir = inbox_dir
        self.hook = hook
        self.rng = random.Random(seed)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"resolver-{seed}")
        self.client.connect("127.0.0.1", mqtt_port)
        self.client.loop_start()
        self.stop_event = threading.Event()
        self.paused = threading.Event()
        self.sent = 0
        self.errors: list[str] = []
        self._seen: set[str] = set()
        self._candidates: dict[str, str] = {}  # conversation id -> agent id
        self.thread = threading.Thread(target=self._run, name="resolver", daemon=True)

    def start(self) -> Resolver:
        self.thread.start()
        return self

    def _refresh(self) -> None:
        deliveries = [d for lines in read_inboxes(self.inbox_dir).values() for d in lines]
        deliveries += self.hook.deliveries()
        for d in deliveries:
            if d["delivery_id"] not in self._seen:
                self._seen.add(d["delivery_id"])
                self._candidates[d["conversation_id"]] = d["agent_id"]

    def _run(self) -> None:
        try:
            while not self.stop_event.wait(0.03):
                if self.paused.is_set():
                    continue
                self._refresh()
                if not self._candidates or self.rng.random() < 0.3:
                    continue
                conversation = self.rng.choice(sorted(self._candidates))
                agent = self._candidates.pop(conversation)
                payload = json.dumps({"action": "resolve", "conversation_id": conversation})
                self.client.publish(f"omnirouter/agents/{agent}/actions", payload, qos=1)
                self.sent += 1
        except Exception as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        self.stop_event.set()
        self.thread.join(10)
        self.client.loop_stop()
        self.client.disconnect()


# -- invariants -----------------------------------------------------------------------------


def check_store(
    db_path: Path, acks: dict[str, Ack], *, final: bool, expected: int = N_MESSAGES
) -> dict[str, Any]:
    """Check the database invariants; return figures for later checks and the report."""
    with read_db(db_path) as db:
        messages = {
            key: (mid, state, conv)
            for key, mid, state, conv in db.execute(
                "SELECT external_id, id, state, conversation_id FROM messages WHERE channel='web'"
            )
        }
        per_key = db.execute(
            "SELECT COUNT(*) FROM (SELECT channel, external_id FROM messages "
            "GROUP BY channel, external_id HAVING COUNT(*) > 1)"
        ).fetchone()[0]
        assignments = db.execute(
            "SELECT message_id, COUNT(*), MIN(agent_id) FROM assignments GROUP BY message_id"
        ).fetchall()
        open_load = dict(
            db.execute(
                "SELECT agent_id, COUNT(*) FROM conversations "
                "WHERE state='open' AND agent_id IS NOT NULL GROUP BY agent_id"
            ).fetchall()
        )
        unassigned = db.execute(
            "SELECT id, state FROM messages WHERE id NOT IN (SELECT message_id FROM assignments)"
        ).fetchall()
        assigned_states = db.execute(
            "SELECT m.state, COUNT(*) FROM messages m JOIN assignments a ON a.message_id=m.id "
            "GROUP BY m.state"
        ).fetchall()
        outbox = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        dead = db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
        outbox_messages = {r[0] for r in db.execute("SELECT message_id FROM outbox")}

    assert per_key == 0, "a (channel, external_id) is stored more than once"
    # Every acknowledged message is stored, under the id the client was given.
    missing = [k for k in acks if k not in messages]
    assert not missing, f"{len(missing)} acknowledged messages are not in the store: {missing[:5]}"
    wrong = [k for k, a in acks.items() if messages[k][0] != a.message_id]
    assert not wrong, f"acknowledged message ids differ from the stored ones: {wrong[:5]}"
    if final:
        assert len(messages) == expected, f"{len(messages)} messages stored, want {expected}"
    assert all(count == 1 for _, count, _ in assignments), "a message was assigned twice"
    for agent, load in open_load.items():
        assert load <= AGENTS[agent][0], f"{agent} holds {load} open conversations > capacity"
    # A message without an assignment was never handed to anyone: it must still wait.
    not_queued = [(mid, state) for mid, state in unassigned if state != "queued"]
    assert not not_queued, f"unassigned messages that are not queued: {not_queued[:5]}"
    assert all(state in ("assigned", "resolved") for state, _ in assigned_states), assigned_states
    assert dead == 0, f"{dead} dead letters"
    return {
        "assigned": {mid: agent for mid, _, agent in assignments},
        "queued": {mid for mid, _ in unassigned},
        "open_load": open_load,
        "outbox": outbox,
        "outbox_messages": outbox_messages,
        "messages": len(messages),
    }


def check_deliveries(
    inbox_dir: Path, hook: ThreadedWebhook, assigned: dict[str, str], outbox_messages: set[str]
) -> dict[str, int]:
    """Every assignment delivered, once per delivery id (inbox) / same id on repeats (webhook)."""
    by_message: dict[str, set[str]] = collections.defaultdict(set)
    inbox_lines = 0
    for agent, lines in read_inboxes(inbox_dir).items():
        ids = [d["delivery_id"] for d in lines]
        dupes = [i for i, n in collections.Counter(ids).items() if n > 1]
        assert not dupes, f"{agent}'s inbox repeats delivery ids {dupes[:5]}"
        for d in lines:
            assert d["agent_id"] == agent and d["kind"] == "assignment"
            assert assigned.get(d["message"]["id"]) == agent, f"{d['message']['id']} not {agent}'s"
            by_message[d["message"]["id"]].add(d["delivery_id"])
        inbox_lines += len(lines)
    hook_deliveries = hook.deliveries()
    payloads: dict[str, str] = {}
    for d in hook_deliveries:
        assert d["_header_id"] == d["delivery_id"]
        assert assigned.get(d["message"]["id"]) == d["agent_id"] == "dora"
        # A repeat (at-least-once) carries the same id and the same content.
        body = json.dumps({k: v for k, v in d.items() if k not in ("attempt", "_header_id")})
        assert payloads.setdefault(d["delivery_id"], body) == body
        by_message[d["message"]["id"]].add(d["delivery_id"])
    several = {m: ids for m, ids in by_message.items() if len(ids) > 1}
    assert not several, f"messages delivered under several delivery ids: {list(several)[:5]}"
    undelivered = set(assigned) - set(by_message) - outbox_messages
    assert not undelivered, f"assigned but neither delivered nor pending: {sorted(undelivered)[:5]}"
    return {
        "delivered": len(by_message),
        "inbox_lines": inbox_lines,
        "webhook_requests": len(hook_deliveries),
        "webhook_repeats": len(hook_deliveries) - len(payloads),
    }


def admin_get(ops_url: str, path: str) -> Any:
    status, body, _ = http("GET", ops_url + path, headers={"Authorization": f"Bearer {ADMIN}"})
    assert status == 200, (path, status, body)
    return body


def check_daemon_view(ops_url: str, db_path: Path, *, exact: bool) -> None:
    """The restarted daemon's loads never exceed capacity; with exact, they match the store."""
    agents = {a["id"]: a for a in admin_get(ops_url, "/v1/agents")["agents"]}
    for agent_id, (capacity, _, _) in AGENTS.items():
        assert agents[agent_id]["capacity"] == capacity
        assert agents[agent_id]["open_conversations"] <= capacity, agents[agent_id]
    if not exact:
        return
    with read_db(db_path) as db:
        open_load = dict(
            db.execute(
                "SELECT agent_id, COUNT(*) FROM conversations "
                "WHERE state='open' AND agent_id IS NOT NULL GROUP BY agent_id"
            ).fetchall()
        )
        queued = db.execute("SELECT COUNT(*) FROM messages WHERE state='queued'").fetchone()[0]
    for agent_id in AGENTS:
        assert agents[agent_id]["open_conversations"] == open_load.get(agent_id, 0), agent_id
    depth = sum(q["depth"] for q in admin_get(ops_url, "/v1/queues")["queues"])
    assert depth == queued, f"scheduler queues hold {depth}, the store has {queued} queued"


def wait_settled(ops_url: str, db_path: Path, timeout: float = 20.0) -> None:
    """Wait until the outbox is empty and the daemon's view equals the store's."""
    deadline = time.monotonic() + timeout
    last: AssertionError | None = None
    while time.monotonic() < deadline:
        try:
            with read_db(db_path) as db:
                pending = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
            assert pending == 0, f"{pending} outbox items pending"
            _, text, _ = http("GET", ops_url + "/metrics")
            backlog = [
                float(line.split()[-1])
                for line in str(text).splitlines()
                if line.startswith("omnirouter_outbox_backlog")
            ]
            assert backlog == [0.0], f"outbox backlog {backlog}"
            check_daemon_view(ops_url, db_path, exact=True)
            return
        except AssertionError as exc:
            last = exc
            time.sleep(0.2)
    raise AssertionError(f"the daemon did not settle: {last}")


# -- the scenario ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [7, 20240611])
def test_sigkill_under_load_loses_nothing(tmp_path: Path, seed: int) -> None:
    report = run_scenario(tmp_path, seed, kills=2, messages=N_MESSAGES)
    print("crash report:", json.dumps(report))


def kill_points_for(rng: random.Random, kills: int, messages: int) -> list[int]:
    """Return `kills` increasing acknowledgement counts, spread over the run, to kill at."""
    low, high = messages // 5, messages * 17 // 20
    span = (high - low) / kills
    return [int(low + span * i + rng.uniform(0, span * 0.8)) for i in range(kills)]


def run_scenario(
    tmp_path: Path,
    seed: int,
    *,
    kills: int,
    messages: int,
    seconds: float = 90.0,
    side: Any = None,
) -> dict[str, Any]:
    """Run the load, SIGKILL the daemon `kills` times, check every invariant; return figures.

    Even rounds hold the clients while the daemon is down, so its queues can be compared
    with the store right after the restart; odd rounds let the clients hammer the dead
    port and the restarting daemon. `side` (tests/reliability/mixed_intake.py's
    SideChannels) adds e-mail and SMS intake, checked the same way.
    """
    rng = random.Random(seed)
    kill_points = kill_points_for(rng, kills, messages)
    state_dir = tmp_path / "state"
    inbox_dir = state_dir / "inbox"
    db_path = state_dir / "omnirouter.db"
    hook = ThreadedWebhook().start()
    broker = Mosquitto().start() if MOSQUITTO else None
    web_port, ops_port = fixed_port(rng), fixed_port(rng)
    web_url, ops_url = f"http://127.0.0.1:{web_port}", f"http://127.0.0.1:{ops_port}"
    config = crash_config(
        state_dir, web_port, ops_port, hook.receiver.url, broker.port if broker else None
    )
    if side is not None:
        config += "\n" + side.start().config()
    daemon = DaemonProcess(tmp_path, config, env={HOOK_SECRET_ENV: HOOK_SECRET})
    traffic = Traffic(web_url, make_plan(rng, seed, messages))
    resolver: Resolver | None = None
    threads: list[threading.Thread] = []
    report: dict[str, Any] = {"seed": seed, "messages": messages, "kills": []}
    started = time.monotonic()
    try:
        daemon.start()
        if broker is not None:
            resolver = Resolver(broker.port, inbox_dir, hook, seed).start()
        traffic.gate.set()
        deadline = time.monotonic() + seconds
        threads = [
            threading.Thread(target=traffic.client, args=(deadline,), name=f"client-{i}")
            for i in range(N_CLIENTS)
        ]
        for t in threads:
            t.start()
        if side is not None:
            side.run(deadline)

        for round_no, point in enumerate(kill_points):
            while traffic.acked() < point:
                assert time.monotonic() < deadline, "clients stalled before the kill point"
                assert not traffic.errors, traffic.errors[:5]
                time.sleep(0.002)
            quiet = round_no % 2 == 0
            if quiet:
                traffic.gate.clear()
                if resolver is not None:
                    resolver.paused.set()
                if side is not None:
                    side.paused.set()
            daemon.kill()
            with traffic.lock:
                acks_at_kill = dict(traffic.acks)
            # Everything acknowledged before the kill is in the dead process's database.
            figures = check_store(db_path, acks_at_kill, final=False)
            if side is not None:
                figures.update(side.check(db_path, final=False))
            report["kills"].append(
                {
                    "acked": len(acks_at_kill),
                    "stored": figures["messages"],
                    "outbox_pending": figures["outbox"],
                    "queued": len(figures["queued"]),
                }
            )
            daemon.restart()
            if side is None:
                check_daemon_view(ops_url, db_path, exact=quiet)
            else:
                # Mails appended before the pause may still be coming in: the views
                # agree once the daemon has caught up.
                wait_view(ops_url, db_path, exact=quiet)
            if quiet:
                traffic.gate.set()
                if resolver is not None:
                    resolver.paused.clear()
                if side is not None:
                    side.paused.clear()

        for t in threads:
            t.join(max(1.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in threads), "clients did not finish"
        assert not traffic.errors, traffic.errors[:5]
        assert len(traffic.acks) == messages
        if side is not None:
            side.join(max(1.0, deadline - time.monotonic()))
            report.update(wait_side(side, db_path))
        if resolver is not None:
            resolver.close()
            assert not resolver.errors, resolver.errors
            report["resolves_sent"] = resolver.sent
            resolver = None

        # Repeated answers for one key (a lost answer retried) name the same message.
        for key, _status, message_id in traffic.answers:
            assert traffic.acks[key].message_id == message_id, key
        report["retried_keys"] = sum(1 for a in traffic.acks.values() if a.attempts > 1)
        report["duplicate_answers"] = sum(1 for _, s, _ in traffic.answers if s == 200)

        wait_settled(ops_url, db_path)
        figures = check_store(db_path, traffic.acks, final=True, expected=messages)
        assert figures["outbox"] == 0
        report.update(check_deliveries(inbox_dir, hook, figures["assigned"], set()))
        report["assigned"] = len(figures["assigned"])
        report["queued_at_end"] = len(figures["queued"])
        if broker is not None:
            # The agent's resolves freed slots that went to waiting work: deliveries were
            # exercised throughout, not only the first handful.
            slots = sum(capacity for capacity, _, _ in AGENTS.values())
            assert report["assigned"] > slots, f"only {report['assigned']} messages assigned"

        assert daemon.stop() == 0
        figures = check_store(db_path, traffic.acks, final=True, expected=messages)
        check_deliveries(inbox_dir, hook, figures["assigned"], set())
        report["seconds"] = round(time.monotonic() - started, 1)
        return report
    finally:
        traffic.halt.set()
        traffic.gate.set()
        if resolver is not None:
            resolver.close()
        for t in threads:
            t.join(5)
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.signal(signal.SIGKILL)
        daemon.close()
        if broker is not None:
            broker.stop()
        hook.close()
        if side is not None:
            side.close()


def wait_view(ops_url: str, db_path: Path, *, exact: bool, timeout: float = 20.0) -> None:
    """Check the daemon's view until it agrees with the store (it may be catching up)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            check_daemon_view(ops_url, db_path, exact=exact)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def wait_side(side: Any, db_path: Path, timeout: float = 30.0) -> dict[str, int]:
    """Wait until every mail appended is stored; then check mail and SMS in full."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            figures: dict[str, int] = side.check(db_path, final=True)
            return figures
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# -- unit level: a crash-like stop with pending outbox items --------------------------------


class _Unplugged:
    """An agent tool that is down: every delivery fails, nothing is written."""

    def __init__(self) -> None:
        self.state = DriverState.CONNECTED
        self.calls = 0

    async def deliver(self, delivery: Delivery) -> None:
        self.calls += 1
        raise TransientError("down")


def _inbound(n: int, contact: str) -> InboundMessage:
    return InboundMessage(
        channel="web",
        channel_type="web",
        external_id=f"k{n}",
        contact_handle=contact,
        text=f"Where is my order {n}?",
        language="en",
    )


async def _until(predicate: Any, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_restore_resends_pending_outbox_under_original_ids(tmp_path: Path) -> None:
    """Items committed but not sent before a crash are sent after restore, with their ids."""
    state_dir = tmp_path / "state"
    config = loads_config(
        f"""
[daemon]
state_dir = "{state_dir}"
[outbox]
backoff_base = 0.01
backoff_cap = 0.05
poll_interval = 0.1
[[adapters]]
type = "inbox"
name = "inbox"
[[agents]]
id = "alice"
capacity = 1
tool = "inbox"
skills = ["en"]
"""
    )

    def life(tools: dict[str, Any]) -> tuple[SqliteStore, Dispatcher, Pipeline]:
        store = SqliteStore(config.db_path())
        metrics = Metrics()
        dispatcher = Dispatcher(store, lambda: tools, config.outbox, metrics)
        return store, dispatcher, Pipeline(config, store, metrics, dispatcher)

    def inbox_tool() -> InboxTool:
        ctx = DriverContext(state_dir=state_dir, log=structlog.get_logger("test.inbox"))
        return InboxTool("inbox", InboxTool.config_model(type="inbox", name="inbox"), ctx)

    # First life: the tool is down, so the committed items stay in the outbox. Ann's
    # first message takes the only slot, her follow-up rides along, Ben's waits.
    down = _Unplugged()
    store, dispatcher, pipeline = life({"inbox": down})
    await store.open()
    runner = asyncio.create_task(dispatcher.run())
    await pipeline.restore()
    receipts = [await pipeline.ingest(_inbound(n, c)) for n, c in enumerate(["ann", "ann", "ben"])]
    assert [r.state for r in receipts] == ["assigned", "assigned", "queued"]

    async def tried_both() -> bool:
        return down.calls >= 2

    await _until(tried_both)
    due = await store.due_outbox(time.time() + 3600, 100)
    pending = {o.id: o.message_id for o in due}
    assert sorted(pending.values()) == sorted(r.message_id for r in receipts[:2])
    # "Crash": the tasks stop without draining anything.
    runner.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runner
    await store.close()

    # Second life: a working inbox; restore sends both under their original ids and
    # rebuilds the load and the queue.
    inbox = inbox_tool()
    store, dispatcher, pipeline = life({"inbox": inbox})
    await store.open()
    runner = asyncio.create_task(dispatcher.run())
    await pipeline.restore()
    assert pipeline.scheduler.queue_depths() == {"default": 1}
    assert pipeline.scheduler.load == {"alice": 1}

    async def sent() -> bool:
        return (await store.delivery_counts())["pending"] == 0 and dispatcher.backlog == 0

    await _until(sent)
    path = state_dir / "inbox" / "alice.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert {d["delivery_id"]: d["message"]["id"] for d in lines} == pending
    runner.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runner
    await store.close()

    # Third life: the "done" was lost, so the same ids come again; a fresh inbox tool
    # (ids learnt from the file) writes nothing twice.
    again = inbox_tool()
    for item in due:
        await again.deliver(
            Delivery(
                id=item.id,
                target=item.target.name,
                agent_id=item.agent_id,
                address=item.address,
                payload=item.payload,  # type: ignore[arg-type]
                attempt=2,
            )
        )
    assert len(path.read_text().splitlines()) == 2


# -- bookkeeping races the crash test found ---------------------------------------------------


async def _open_counts(store: SqliteStore) -> dict[str, int]:
    with read_db(store.path) as db:
        return dict(
            db.execute(
                "SELECT agent_id, COUNT(*) FROM conversations "
                "WHERE state='open' AND agent_id IS NOT NULL GROUP BY agent_id"
            ).fetchall()
        )


async def _pipeline(tmp_path: Path, capacity: int = 1) -> tuple[SqliteStore, Pipeline]:
    config = loads_config(
        f"""
[daemon]
state_dir = "{tmp_path / "state"}"
[[adapters]]
type = "inbox"
name = "inbox"
[[agents]]
id = "alice"
capacity = {capacity}
tool = "inbox"
skills = ["en"]
"""
    )
    store = SqliteStore(config.db_path())
    metrics = Metrics()
    dispatcher = Dispatcher(store, dict, config.outbox, metrics)
    pipeline = Pipeline(config, store, metrics, dispatcher)
    await store.open()
    await pipeline.restore()
    return store, pipeline


async def test_follow_up_during_resolve_keeps_the_slot_counted(tmp_path: Path) -> None:
    """A follow-up routed while its conversation's resolve commits must not lose its slot.

    It used to be routed sticky to the holder, committed after the resolve (reopening
    the conversation with that holder), and then release() freed the slot anyway: the
    agent got one more conversation than its capacity.
    """
    store, pipeline = await _pipeline(tmp_path)
    first = await pipeline.ingest(_inbound(0, "ann"))
    assert first.state == "assigned"
    resolve = asyncio.create_task(
        pipeline.on_action(AgentAction("alice", "resolve", first.conversation_id))
    )
    await asyncio.sleep(0)  # the resolve is now waiting for its commit
    follow_up = await pipeline.ingest(_inbound(1, "ann"))
    await resolve
    await pipeline.drain_queues()
    assert pipeline.scheduler.load["alice"] == (await _open_counts(store)).get("alice", 0) == 1
    assert follow_up.state == "assigned"
    # Alice is full: a new customer waits.
    assert (await pipeline.ingest(_inbound(2, "ben"))).state == "queued"
    assert await _open_counts(store) == {"alice": 1}
    await store.close()


async def test_stale_resolve_does_not_close_a_waiting_conversation(tmp_path: Path) -> None:
    """Only the holder may resolve: a conversation waiting for an agent has none."""
    store, pipeline = await _pipeline(tmp_path)
    await pipeline.ingest(_inbound(0, "ann"))  # alice is now full
    waiting = await pipeline.ingest(_inbound(1, "ben"))
    assert waiting.state == "queued"
    await pipeline.on_action(AgentAction("alice", "resolve", waiting.conversation_id))
    stored = await store.message(waiting.message_id)
    assert stored is not None and stored["state"] == "queued"
    assert sum(pipeline.scheduler.queue_depths().values()) == 1
    await store.close()


def test_undo_gives_a_moved_conversation_back_to_its_holder() -> None:
    """A slot taken over from an absent holder and then undone restores that holder."""
    from router.model import Agent
    from router.schedule import Scheduler, Work

    agents = [
        Agent(id=a, name=a, capacity=2, tool="inbox", queues=frozenset({"default"}))
        for a in ("alice", "bo")
    ]
    scheduler = Scheduler(agents)
    scheduler.hold("c1", "c1", "alice", "web")
    scheduler.set_presence("alice", False)
    work = Work("m1", "c1", "c1", "inquiry", "P3", "web", "en", "default", 0.0, 300.0)
    choice = scheduler.place(work, 0.0)
    assert choice is not None and choice.agent.id == "bo"
    assert scheduler.load == {"alice": 0, "bo": 1}
    scheduler.undo(choice, requeue=False)  # e.g. the message was a duplicate
    assert scheduler.holder == {"c1": "alice"}
    assert scheduler.load == {"alice": 1, "bo": 0}


async def test_duplicate_does_not_take_back_a_slot_a_dequeued_message_committed_on(
    tmp_path: Path,
) -> None:
    """A retried message (duplicate) reserves a slot, a drain routes a waiting message of
    the same conversation onto that reservation and commits, then the duplicate undoes.

    The undo used to free the slot although the store now has the conversation held:
    after the restarts of the crash test an agent ended with capacity + 1 conversations.
    """
    store, pipeline = await _pipeline(tmp_path)
    pipeline.scheduler.set_presence("alice", False)  # in memory only: nobody can take it
    waiting = await pipeline.ingest(_inbound(1, "ben"))
    assert waiting.state == "queued"
    pipeline.scheduler.set_presence("alice", True)  # room again, no drain has run yet
    retry = asyncio.create_task(pipeline.ingest(_inbound(1, "ben")))  # same key: duplicate
    await asyncio.sleep(0)  # the retry holds a reservation and waits for the store
    assert await pipeline.drain_queues() == 1
    assert (await retry).duplicate
    assert pipeline.scheduler.load["alice"] == (await _open_counts(store)).get("alice", 0) == 1
    assert pipeline.scheduler.holder == {waiting.conversation_id: "alice"}
    await store.close()
