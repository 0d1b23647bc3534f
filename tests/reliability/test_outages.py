"""Agent tools that turn slow, hang or die behind a TCP proxy: the daemon rides it out (issue 13).

The real daemon (tests.daemon_harness) takes messages on its web channel and hands
them to two agents: `mq` on an MQTT tool (a private Mosquitto) and `hk` on a webhook
tool (a WebhookReceiver). Each tool reaches its peer through its own TcpProxy, so one
peer at a time can be made slow (300 ms each way), hung (paused: sockets open,
nothing answered) or dead (cut: connections dropped, connects refused) while
messages keep being POSTed. For each peer in turn the test checks that

* every POST is still answered 201 (intake never waits for an agent tool);
* the other tool keeps receiving its share during the outage;
* a slow peer is served without being reported; a hung or dead one is named in
  /readyz `degraded` (503) while it is down;
* after `restore()` the backlog drains: the outbox is empty, there are no dead
  letters, and every acknowledged message was delivered under exactly one delivery
  id (a hung peer may get a repeat of a delivery it never acknowledged, always under
  the same id: the tools are at least once and receivers dedupe on delivery_id).

The adapters run on short timeouts (publish_timeout, keepalive, timeout, breaker probes,
reconnect_max) so an outage is noticed within seconds and each test stays bounded.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from tests.daemon_harness import DaemonProcess, base_config, http, ports
from tests.peers import (
    MOSQUITTO,
    NEEDS_MOSQUITTO_REASON,
    WEBHOOK_SECRET,
    Mosquitto,
    WebhookReceiver,
)
from tests.reliability.outage_kit import DaemonProbes, Mode, start_outage
from tests.reliability.tcp_proxy import TcpProxy
from tests.test_crash import read_db
from tests.test_webhook_breaker import apoll

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason=NEEDS_MOSQUITTO_REASON)

ADMIN = {"Authorization": "Bearer test-admin-token-0123456789"}
PREFIX = "omnirouter/agents"
# adapter name -> the agent whose tool it is
AGENT_OF = {"mqtt": "mq", "hook": "hk"}
BATCH = 12  # messages POSTed per phase


class MqttInbox:
    """Subscribe straight to the broker (not through the proxy) and keep every delivery."""

    def __init__(self, port: int) -> None:
        """Connect to the broker on port and subscribe to every agent's inbox."""
        self.deliveries: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="outage-agents")
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("the test subscriber did not subscribe")

    def _on_connect(self, client: mqtt.Client, *args: Any) -> None:
        """Subscribe on every (re)connect."""
        client.subscribe(f"{PREFIX}/+/inbox", qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """Keep one delivery."""
        with self._lock:
            self.deliveries.append(json.loads(msg.payload))

    def snapshot(self) -> list[dict[str, Any]]:
        """Return the deliveries received so far."""
        with self._lock:
            return list(self.deliveries)

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class World(DaemonProbes):
    """The daemon, its two peers behind their proxies, and what the clients were told."""

    daemon: DaemonProcess
    web_url: str
    ops_url: str
    db_path: Path
    proxies: dict[str, TcpProxy]  # adapter name -> its proxy
    inbox: MqttInbox
    receiver: WebhookReceiver
    acked: dict[str, str] = field(default_factory=dict)  # Idempotency-Key -> message id
    counter: Iterator[int] = field(default_factory=itertools.count)

    def deliveries(self) -> dict[str, list[dict[str, Any]]]:
        """Return every delivery each adapter's peer received (repeats included)."""
        hook = [r.json for r in self.receiver.deliveries if isinstance(r.json, dict)]
        return {"mqtt": self.inbox.snapshot(), "hook": hook}

    def delivered(self) -> dict[str, set[str]]:
        """Return, per delivered message id, the delivery ids it arrived under."""
        out: dict[str, set[str]] = collections.defaultdict(set)
        for items in self.deliveries().values():
            for d in items:
                if d.get("kind") == "assignment":
                    out[d["message"]["id"]].add(d["delivery_id"])
        return out

    def all_assigned(self, message_ids: list[str]) -> dict[str, str]:
        """Return message id -> agent id once every one of message_ids is assigned, else {}."""
        with read_db(self.db_path) as db:
            rows = db.execute("SELECT message_id, agent_id FROM assignments").fetchall()
        wanted = set(message_ids)
        found = {m: a for m, a in rows if m in wanted}
        return found if len(found) == len(wanted) else {}

    def post(self, n: int) -> list[str]:
        """POST n new messages (each its own contact and key); all must be answered 201."""
        ids = []
        for _ in range(n):
            i = next(self.counter)
            key = f"outage-{i}"
            body = {"text": f"Where is my order number {i}?", "contact": {"handle": f"c{i}@x.org"}}
            status, answer, _ = http(
                "POST", self.web_url + "/v1/messages", body, {"Idempotency-Key": key}
            )
            assert status == 201, (status, answer)
            self.acked[key] = answer["message_id"]
            ids.append(answer["message_id"])
        return ids


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    """Start Mosquitto, a webhook receiver, a proxy in front of each, and the daemon."""
    broker = Mosquitto().start()
    receiver = await WebhookReceiver(WEBHOOK_SECRET).start()
    proxies = {
        "mqtt": TcpProxy("127.0.0.1", broker.port).start(),
        "hook": TcpProxy("127.0.0.1", receiver.port).start(),
    }
    inbox = await asyncio.to_thread(MqttInbox, broker.port)
    adapters = (
        f'[[adapters]]\ntype = "mqtt"\nname = "mqtt"\nhost = "127.0.0.1"\n'
        f'port = {proxies["mqtt"].port}\ntopic_prefix = "{PREFIX}"\nkeepalive = 5\n'
        "connect_timeout = 1\npublish_timeout = 1\nreconnect_min = 0.05\nreconnect_max = 0.5\n\n"
        f'[[adapters]]\ntype = "webhook"\nname = "hook"\n'
        f'url = "http://{proxies["hook"].url_host}/agents/{{agent_id}}"\n'
        f'secret = "{WEBHOOK_SECRET}"\ntimeout = 1\nbreaker_threshold = 2\n'
        "breaker_probe_min = 0.05\nbreaker_probe_max = 0.5\n"
    )
    # accepts = false: the MQTT agent's assignments are not offers that lapse and move.
    agents = "\n".join(
        f'[[agents]]\nid = "{agent}"\ncapacity = 1000\ntool = "{tool}"\n'
        'skills = ["en"]\naccepts = false\n'
        for tool, agent in AGENT_OF.items()
    )
    web_port, ops_port = ports()
    state = tmp_path / "state"
    daemon = DaemonProcess(
        tmp_path,
        base_config(state, web_port=web_port, ops_port=ops_port, adapters=adapters, agents=agents),
    )
    w = World(
        daemon,
        f"http://127.0.0.1:{web_port}",
        f"http://127.0.0.1:{ops_port}",
        state / "omnirouter.db",
        proxies,
        inbox,
        receiver,
    )
    try:
        await asyncio.to_thread(daemon.start)
        await apoll(lambda: w.ready()[0] == 200, 10, "ready with both peers up")
        yield w
    finally:
        await asyncio.to_thread(daemon.close)
        print(f"--- daemon log ---\n{daemon.log_text()[-6000:]}")  # shown when a test failed
        inbox.close()
        for proxy in proxies.values():
            proxy.stop()
        await receiver.stop()
        broker.close()


async def all_delivered(w: World, message_ids: list[str], within: float, what: str) -> None:
    """Wait until every one of message_ids reached its agent's tool."""
    await apoll(lambda: not set(message_ids) - set(w.delivered()), within, what)


async def ride_out(w: World, name: str, mode: Mode) -> None:
    """Make one peer slow, hung or dead; post through it; check the daemon; restore; drain."""
    proxy, other = w.proxies[name], next(n for n in w.proxies if n != name)
    start_outage(proxy, mode)
    started = time.monotonic()
    batch = await asyncio.to_thread(w.post, BATCH)
    assigned = await apoll(lambda: w.all_assigned(batch), 10, f"{mode} {name}: all assigned")
    mine = [m for m, agent in assigned.items() if agent == AGENT_OF[name]]
    theirs = [m for m, agent in assigned.items() if agent == AGENT_OF[other]]
    assert mine and theirs, f"{mode} {name}: the batch did not reach both agents: {assigned}"

    # The other tool is served while this one is slow, hung or dead.
    await all_delivered(w, theirs, 10, f"{mode} {name}: the {other} tool's share")
    if mode == "slow":
        # Slow is not down: everything arrives, and nothing is reported.
        await all_delivered(w, mine, 15, f"slow {name}: its share")
        status, report = await asyncio.to_thread(w.ready)
        assert status == 200 and report["degraded"] == [], report
    else:
        # Down: /readyz names this tool and only this tool; the web channel is fine.
        _, report = await apoll(
            lambda: (r := w.ready())[0] == 503 and r[1]["degraded"] == [name] and r,
            15,
            f"{mode} {name}: /readyz naming it",
        )
        assert report["drivers"]["web"]["state"] == "connected"
        assert report["drivers"][other]["state"] == "connected"
        assert report["drivers"][name]["last_error"], report
        # Work keeps coming in while it is down, and the other tool keeps being served.
        more = await asyncio.to_thread(w.post, BATCH // 2)
        batch += more
        extra = await apoll(lambda: w.all_assigned(more), 10, f"{mode} {name}: more assigned")
        await all_delivered(
            w,
            [m for m, agent in extra.items() if agent == AGENT_OF[other]],
            10,
            f"{mode} {name}: the {other} tool's share of later messages",
        )
        undelivered = set(mine) - set(w.delivered())
        assert undelivered, f"{mode} {name}: the outage delivered everything: not an outage"
    print(f"{mode} {name}: outage phase {time.monotonic() - started:.1f} s")

    proxy.restore()
    await all_delivered(w, batch, 20, f"{mode} {name}: the backlog after restore")
    await apoll(lambda: w.ready()[0] == 200, 10, f"{mode} {name}: ready again")
    await apoll(lambda: w.outbox_and_dead()[0] == 0, 10, f"{mode} {name}: the outbox empty")
    assert w.outbox_and_dead()[1] == 0, f"{mode} {name}: dead letters"
    print(f"{mode} {name}: drained {time.monotonic() - started:.1f} s after the outage began")


def check_exactly_once(w: World) -> None:
    """Every acknowledged message: stored once, delivered under exactly one delivery id."""
    with read_db(w.db_path) as db:
        stored = collections.Counter(
            external_id
            for (external_id,) in db.execute("SELECT external_id FROM messages WHERE channel='web'")
        )
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert set(stored) == set(w.acked) and set(stored.values()) == {1}, stored
    delivered = w.delivered()
    missing = set(w.acked.values()) - set(delivered)
    assert not missing, f"acknowledged but never delivered: {sorted(missing)[:5]}"
    several = {m: ids for m, ids in delivered.items() if len(ids) > 1}
    assert not several, f"delivered under several delivery ids: {several}"
    for name, items in w.deliveries().items():
        # A repeat is the same delivery again (same id, same agent, same message).
        seen: dict[str, tuple[str, str]] = {}
        for d in items:
            key = (d["agent_id"], d["message"]["id"])
            assert seen.setdefault(d["delivery_id"], key) == key, d["delivery_id"]
            assert d["agent_id"] == AGENT_OF[name], d
        print(f"{name}: {len(items)} deliveries, {len(items) - len(seen)} repeats")


@pytest.mark.parametrize("name", ["mqtt", "hook"])
async def test_a_peer_slow_then_hung_then_dead(world: World, name: str) -> None:
    for mode in ("slow", "hung", "dead"):
        await ride_out(world, name, mode)
    status, body, _ = await asyncio.to_thread(
        http, "GET", world.ops_url + "/v1/dead-letters", None, ADMIN
    )
    assert status == 200 and body["dead_letters"] == [], body
    await asyncio.to_thread(check_exactly_once, world)
