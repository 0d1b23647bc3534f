"""End-to-end tests: the real daemon as a subprocess, talking to real peers.

Each test starts `python -m router.cli run -c FILE` (tests/daemon_harness.py) with a
private notify socket, and drives it over HTTP (web channel, ops API), MQTT (a
private mosquitto per test) and signed webhooks (WebhookReceiver in the test's
loop). Nothing waits by sleeping: every expectation is polled with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
from collections.abc import Callable, Iterator
from http.client import HTTPException
from pathlib import Path
from typing import Any, TypeVar

import aiomqtt
import pytest

from tests import peers
from tests.daemon_harness import REPO, DaemonProcess, base_config, http, ports
from tests.peers import Mosquitto, WebhookReceiver, free_port
from tests.schema_check import validate_delivery

mosquitto = peers.mosquitto

T = TypeVar("T")

ADMIN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
PREFIX = "e2e/agents"
COMPLAINT = "This is terrible, I want a refund now! The order arrived broken."
INQUIRY = "Hello, could you tell me when my order will ship?"


# -- helpers --------------------------------------------------------------------------


def poll(fn: Callable[[], T], within: float = 10.0, interval: float = 0.05, what: str = "") -> T:
    """Call fn until it returns something truthy; return it, or fail after `within` s."""
    deadline = time.monotonic() + within
    last: Any = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {within}s: {what or fn} (last: {last!r})")
        time.sleep(interval)


async def apoll(
    fn: Callable[[], T], within: float = 10.0, interval: float = 0.05, what: str = ""
) -> T:
    """poll() for async tests: the (blocking) fn runs in a thread, the loop keeps serving."""
    deadline = time.monotonic() + within
    while True:
        last = await asyncio.to_thread(fn)
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {within}s: {what or fn} (last: {last!r})")
        await asyncio.sleep(interval)


class Urls:
    """Where one daemon listens."""

    def __init__(self, web_port: int, ops_port: int) -> None:
        self.web = f"http://127.0.0.1:{web_port}"
        self.ops = f"http://127.0.0.1:{ops_port}"

    def post(self, text: str, handle: str, **extra: Any) -> tuple[int, Any, dict[str, str]]:
        """POST one message to the web channel."""
        return http(
            "POST",
            self.web + "/v1/messages",
            {"text": text, "contact": {"handle": handle}, **extra},
        )

    def admin(self, method: str, path: str) -> tuple[int, Any, dict[str, str]]:
        """Call an admin endpoint with the right token."""
        return http(method, self.ops + path, headers=AUTH)

    def agents(self) -> dict[str, dict[str, Any]]:
        status, body, _ = self.admin("GET", "/v1/agents")
        assert status == 200, body
        return {a["id"]: a for a in body["agents"]}

    def queue_depth(self, name: str = "default") -> int:
        status, body, _ = self.admin("GET", "/v1/queues")
        assert status == 200, body
        return next((q["depth"] for q in body["queues"] if q["queue"] == name), 0)

    def metrics(self) -> str:
        status, body, _ = http("GET", self.ops + "/metrics")
        assert status == 200
        return str(body)

    def ready(self) -> tuple[int, Any]:
        status, body, _ = http("GET", self.ops + "/readyz")
        return status, body


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """Return the value of one Prometheus sample whose labels include `labels`."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return None


def inbox_lines(state_dir: Path) -> list[dict[str, Any]]:
    """Return every delivery the inbox adapter wrote (complete lines only)."""
    out = []
    inbox = state_dir / "inbox"
    if not inbox.exists():
        return out
    for path in sorted(inbox.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                body = json.loads(line)
                validate_delivery(body)  # every delivery the daemon writes follows the schema
                out.append(body)
    return out


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run `python -m router.cli ARGS` (with extra environment) and return its result."""
    return subprocess.run(
        [sys.executable, "-m", "router.cli", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def mqtt_adapter(broker: Mosquitto, name: str = "desk") -> str:
    return f"""[[adapters]]
type = "mqtt"
name = "{name}"
host = "{broker.host}"
port = {broker.port}
topic_prefix = "{PREFIX}"
reconnect_min = 0.05
reconnect_max = 0.3
connect_timeout = 2
publish_timeout = 2
"""


def webhook_adapter(url: str, secret: str = "${E2E_WEBHOOK_SECRET}", name: str = "hook") -> str:
    return f"""[[adapters]]
type = "webhook"
name = "{name}"
url = "{url}/agents/{{agent_id}}"
secret = "{secret}"
timeout = 2
"""


def agents(tool: str, *ids: str, capacity: int = 1) -> str:
    return "\n".join(
        f'[[agents]]\nid = "{i}"\ncapacity = {capacity}\ntool = "{tool}"\nskills = ["en", "zh"]\n'
        for i in ids
    )


def with_outbox(config: str, **settings: Any) -> str:
    """Add settings to the [outbox] table of a base_config() text."""
    lines = "".join(f"{k} = {v}\n" for k, v in settings.items())
    return config.replace("[outbox]\n", "[outbox]\n" + lines, 1)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start daemons in tmp_path; kill whatever is left and print their logs at teardown."""
    started: list[DaemonProcess] = []

    def _spawn(
        config: str, *, env: dict[str, str] | None = None, wait_ready: bool = True
    ) -> DaemonProcess:
        d = DaemonProcess(tmp_path, config, env=env)
        started.append(d)
        d.start(wait_ready=wait_ready)
        return d

    yield _spawn
    for d in started:
        d.close()
        # Shown by pytest only when the test failed.
        print(f"--- daemon log {d.log_path.name} ---\n{d.log_text()[-6000:]}")


# -- 1. MQTT agent ----------------------------------------------------------------------


async def next_delivery(client: aiomqtt.Client, within: float = 10.0) -> tuple[str, dict[str, Any]]:
    """Return (topic, body) of the next message the subscriber receives."""
    async with asyncio.timeout(within):
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            body = json.loads(message.payload)
            validate_delivery(body)
            return message.topic.value, body
    raise AssertionError("message stream ended")


async def test_mqtt_agent_delivery_resolve_and_queue(
    tmp_path: Path, spawn: Callable[..., DaemonProcess], mosquitto: Mosquitto
) -> None:
    web_port, ops_port = ports()
    urls = Urls(web_port, ops_port)
    config = base_config(
        tmp_path / "state",
        web_port=web_port,
        ops_port=ops_port,
        adapters=mqtt_adapter(mosquitto),
        agents=agents("desk", "alice", capacity=1),
    )
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="e2e-agent") as sub:
        await sub.subscribe(f"{PREFIX}/+/inbox", qos=1)
        d = await asyncio.to_thread(spawn, config)
        await apoll(lambda: urls.ready()[0] == 200, what="/readyz with the MQTT adapter connected")

        # A clear complaint is delivered to alice's inbox topic, schema omnirouter.delivery/1.
        status, first, _ = await asyncio.to_thread(urls.post, COMPLAINT, "c1@example.com")
        assert status == 201, first
        assert first["state"] == "assigned"
        topic, body = await next_delivery(sub)
        assert topic == f"{PREFIX}/alice/inbox"
        assert body["schema"] == "omnirouter.delivery/1"
        assert body["delivery_id"]
        assert body["kind"] == "assignment"
        assert body["agent_id"] == "alice"
        assert body["ticket"] == first["ticket"]
        assert body["conversation_id"] == first["conversation_id"]
        assert body["message"]["id"] == first["message_id"]
        assert body["classification"]["label"] == "complaint"
        assert body["routing"]["agent_id"] == "alice"
        agents_now = await asyncio.to_thread(urls.agents)
        assert agents_now["alice"]["open_conversations"] == 1

        # The agent resolves it from their tool: the load goes down.
        await sub.publish(
            f"{PREFIX}/alice/actions",
            json.dumps({"action": "resolve", "conversation_id": body["conversation_id"]}),
            qos=1,
        )
        await apoll(
            lambda: urls.agents()["alice"]["open_conversations"] == 0, what="alice's load back to 0"
        )

        # Capacity 1: a second contact takes the slot, a third waits in the queue.
        status, second, _ = await asyncio.to_thread(urls.post, INQUIRY, "c2@example.com")
        assert status == 201 and second["state"] == "assigned", second
        _, body2 = await next_delivery(sub)
        assert body2["ticket"] == second["ticket"]
        status, third, _ = await asyncio.to_thread(urls.post, COMPLAINT, "c3@example.com")
        assert status == 201 and third["state"] == "queued", third
        assert await asyncio.to_thread(urls.queue_depth) == 1
        # systemctl status follows the queue depth.
        await apoll(
            lambda: any(n.get("STATUS", "").endswith(" 1 waiting") for n in d.poll_notifications()),
            what="STATUS= with 1 waiting",
        )

        # Resolving the second frees the slot: the queued message is delivered.
        await sub.publish(
            f"{PREFIX}/alice/actions",
            json.dumps({"action": "resolve", "message_id": body2["message"]["id"]}),
            qos=1,
        )
        _, body3 = await next_delivery(sub)
        assert body3["ticket"] == third["ticket"]
        assert body3["routing"]["agent_id"] == "alice"
        assert body3["delivery_id"] not in (body["delivery_id"], body2["delivery_id"])
        assert await asyncio.to_thread(urls.queue_depth) == 0
        assert (await asyncio.to_thread(urls.agents))["alice"]["open_conversations"] == 1


async def test_mqtt_offer_not_accepted_moves_to_the_other_agent(
    tmp_path: Path, spawn: Callable[..., DaemonProcess], mosquitto: Mosquitto
) -> None:
    web_port, ops_port = ports()
    urls = Urls(web_port, ops_port)
    config = base_config(
        tmp_path / "state",
        web_port=web_port,
        ops_port=ops_port,
        adapters=mqtt_adapter(mosquitto),
        agents=agents("desk", "alice", "bo", capacity=1),
        extra="[scheduling]\naccept_timeout = 3.0\n",
    )
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="e2e-agents") as sub:
        await sub.subscribe(f"{PREFIX}/+/inbox", qos=1)
        await asyncio.to_thread(spawn, config)
        await apoll(lambda: urls.ready()[0] == 200, what="/readyz with the MQTT adapter connected")
        status, posted, _ = await asyncio.to_thread(urls.post, INQUIRY, "slow@example.com")
        assert status == 201 and posted["state"] == "assigned", posted
        topic, first = await next_delivery(sub)
        silent = topic.split("/")[-2]
        other = "bo" if silent == "alice" else "alice"
        # Nobody accepts: within the timeout and the once-a-second tick it moves on, and
        # the silent agent's tool is told it was taken back.
        got = dict([await next_delivery(sub, within=10), await next_delivery(sub, within=10)])
        assert set(got) == {f"{PREFIX}/{other}/inbox", f"{PREFIX}/{silent}/inbox"}
        notice = got[f"{PREFIX}/{silent}/inbox"]
        assert notice["kind"] == "withdrawn"
        assert notice["message_ids"] == [first["message"]["id"]]
        second = got[f"{PREFIX}/{other}/inbox"]
        assert second["kind"] == "assignment"
        assert second["message"]["id"] == first["message"]["id"]
        assert second["delivery_id"] != first["delivery_id"]
        loads = await asyncio.to_thread(urls.agents)
        assert (loads[silent]["open_conversations"], loads[other]["open_conversations"]) == (0, 1)
        # The second agent accepts from its tool: the offer stays with it from then on.
        await sub.publish(
            f"{PREFIX}/{other}/actions",
            json.dumps({"action": "accept", "conversation_id": second["conversation_id"]}),
            qos=1,
        )
        with pytest.raises(TimeoutError):
            await next_delivery(sub, within=5)
        loads = await asyncio.to_thread(urls.agents)
        assert loads[other]["open_conversations"] == 1


# -- 2. webhook agent -------------------------------------------------------------------


async def test_webhook_agent_signatures_retries_and_dead_letters(
    tmp_path: Path, spawn: Callable[..., DaemonProcess]
) -> None:
    secret = "e2e-webhook-secret-7d1f0a93"
    async with WebhookReceiver(secret) as receiver:
        web_port, ops_port = ports()
        urls = Urls(web_port, ops_port)
        config = with_outbox(
            base_config(
                tmp_path / "state",
                web_port=web_port,
                ops_port=ops_port,
                adapters=webhook_adapter(receiver.url),
                agents=agents("hook", "alice", "bo", capacity=10),
            ),
            max_attempts=4,
        )
        # The CLI reads the same config, so it needs the same environment (as under systemd).
        env = {"E2E_WEBHOOK_SECRET": secret}
        d = await asyncio.to_thread(spawn, config, env=env)
        config_file = str(d.config_path)

        def requests_for(delivery_id: str) -> list[peers.ReceivedRequest]:
            return [
                r
                for r in receiver.requests
                if r.headers.get("X-Omnirouter-Delivery") == delivery_id
            ]

        # A delivery arrives signed, its header naming the delivery id of its body.
        status, first, _ = await asyncio.to_thread(urls.post, COMPLAINT, "w1@example.com")
        assert status == 201, first
        await receiver.wait_for(1, within=10)
        req = receiver.requests[0]
        assert req.signature_ok and req.status == 200
        assert req.path in ("/agents/alice", "/agents/bo")
        assert req.json["schema"] == "omnirouter.delivery/1"
        assert req.json["ticket"] == first["ticket"]
        assert req.headers["X-Omnirouter-Delivery"] == req.json["delivery_id"]

        # 500, 500, then 200: the same delivery id every time, accepted exactly once.
        receiver.respond_next(500, 2)
        status, second, _ = await asyncio.to_thread(urls.post, INQUIRY, "w2@example.com")
        assert status == 201, second
        await receiver.wait_for(4, within=10)
        retried = receiver.requests[1:4]
        ids = {r.headers["X-Omnirouter-Delivery"] for r in retried}
        assert len(ids) == 1, ids
        assert [r.status for r in retried] == [500, 500, 200]
        assert all(r.signature_ok for r in retried)
        assert [r.json["attempt"] for r in retried] == [1, 2, 3]
        assert retried[-1].json["ticket"] == second["ticket"]
        (second_id,) = ids
        accepted = [r for r in receiver.deliveries if r.json["delivery_id"] == second_id]
        assert len(accepted) == 1

        # A permanent 400 makes a dead letter at once; the CLI lists it while we run.
        receiver.respond_next(400, 1, body="unknown agent")
        status, third, _ = await asyncio.to_thread(urls.post, COMPLAINT, "w3@example.com")
        assert status == 201, third
        await receiver.wait_for(5, within=10)
        assert receiver.requests[4].status == 400
        dead_id = receiver.requests[4].headers["X-Omnirouter-Delivery"]

        def listed() -> list[dict[str, Any]]:
            result = cli("dead-letters", "list", "-c", config_file, "--json", env=env)
            assert result.returncode == 0, result.stderr
            return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]

        dead = await apoll(listed, what="the dead letter in `dead-letters list --json`")
        assert [x["id"] for x in dead] == [dead_id]
        assert dead[0]["message_id"] == third["message_id"]
        assert dead[0]["target"] == "hook"
        assert "400" in dead[0]["reason"]
        human = await asyncio.to_thread(cli, "dead-letters", "list", "-c", config_file, env=env)
        assert human.returncode == 0 and dead_id in human.stdout, human

        # The receiver is fixed (answers 200 again): replay sends it within the poll interval.
        replay = await asyncio.to_thread(
            cli, "dead-letters", "replay", "--all", "-c", config_file, env=env
        )
        assert replay.returncode == 0, replay.stderr
        assert replay.stdout.startswith("1 dead letter(s)"), replay.stdout
        await apoll(
            lambda: any(r.json["delivery_id"] == dead_id for r in receiver.deliveries),
            within=5,
            what="the replayed dead letter delivered",
        )
        assert await asyncio.to_thread(listed) == []

        # The same through the admin API: list, then replay by id (sent at once).
        receiver.respond_next(404, 1)
        status, fourth, _ = await asyncio.to_thread(urls.post, INQUIRY, "w4@example.com")
        assert status == 201, fourth
        await receiver.wait_for(7, within=10)
        dead_id = receiver.requests[-1].headers["X-Omnirouter-Delivery"]

        def api_listed() -> list[dict[str, Any]]:
            status, body, _ = urls.admin("GET", "/v1/dead-letters")
            assert status == 200, body
            return list(body["dead_letters"])

        dead = await apoll(api_listed, what="the dead letter in /v1/dead-letters")
        assert [(x["id"], x["message_id"]) for x in dead] == [(dead_id, fourth["message_id"])]
        assert "payload" not in dead[0]
        status, body, _ = await asyncio.to_thread(
            http, "POST", urls.ops + "/v1/dead-letters/replay", {"ids": [dead_id]}, AUTH
        )
        assert (status, body) == (200, {"replayed": 1})
        await apoll(
            lambda: any(r.json["delivery_id"] == dead_id for r in receiver.deliveries),
            within=2,
            what="the dead letter replayed through the API delivered",
        )
        assert await asyncio.to_thread(api_listed) == []
        status, body, _ = await asyncio.to_thread(
            http, "POST", urls.ops + "/v1/dead-letters/replay", {"ids": "all"}, AUTH
        )
        assert status == 400, body
        assert await asyncio.to_thread(d.stop) == 0
    log = d.log_text()
    assert secret not in log


# -- 3. ticket status -------------------------------------------------------------------


def test_ticket_status_needs_its_token(tmp_path: Path, spawn: Callable[..., DaemonProcess]) -> None:
    web_port, ops_port = ports()
    urls = Urls(web_port, ops_port)
    # On the standard library's loop, as an operator may choose.
    config = base_config(tmp_path / "state", web_port=web_port, ops_port=ops_port)
    d = spawn(config.replace("[daemon]\n", '[daemon]\nevent_loop = "asyncio"\n', 1))
    assert [e["event_loop"] for e in d.log_events("daemon.ready")] == ["asyncio"]
    status, receipt, headers = urls.post(INQUIRY, "t1@example.com")
    assert status == 201, receipt
    assert headers["Location"] == receipt["status_url"]
    url = urls.web + receipt["status_url"]

    status, body, _ = http(
        "GET", url, headers={"Authorization": f"Bearer {receipt['status_token']}"}
    )
    assert status == 200, body
    assert body["ticket"] == receipt["ticket"]
    assert body["state"] in ("assigned", "queued")
    status, body, _ = http("GET", f"{url}?token={receipt['status_token']}")
    assert status == 200 and body["ticket"] == receipt["ticket"], body

    wrong = receipt["status_token"][:-2] + (
        "AA" if not receipt["status_token"].endswith("AA") else "BB"
    )
    status, body, _ = http("GET", url, headers={"Authorization": f"Bearer {wrong}"})
    assert status == 404, body
    # An unknown ticket answers the same as a wrong token.
    status, _, _ = http(
        "GET",
        urls.web + "/v1/tickets/T-00000000000000000000000000",
        headers={"Authorization": f"Bearer {wrong}"},
    )
    assert status == 404


# -- 4. ops API -------------------------------------------------------------------------


def test_readiness_follows_the_broker(
    tmp_path: Path, spawn: Callable[..., DaemonProcess], mosquitto: Mosquitto
) -> None:
    web_port, ops_port = ports()
    urls = Urls(web_port, ops_port)
    spawn(
        base_config(
            tmp_path / "state",
            web_port=web_port,
            ops_port=ops_port,
            adapters=mqtt_adapter(mosquitto),
            agents=agents("desk", "alice"),
        )
    )
    status, body, _ = http("GET", urls.ops + "/healthz")
    assert status == 200 and body["status"] == "ok"
    status, body = poll(lambda: (r := urls.ready())[0] == 200 and r, what="ready")
    assert body["ready"] is True
    assert body["store"] == "ok"
    web_info = dict(body["drivers"]["web"])
    # The web channel adds its widget figures (connections, messages, rejects).
    assert web_info.pop("details")["websockets"] == 0
    assert web_info == {"kind": "channel", "type": "web", "state": "connected"}
    assert body["drivers"]["desk"]["state"] == "connected"
    assert body["drivers"]["desk"]["type"] == "mqtt"

    mosquitto.stop()
    status, body = poll(
        lambda: (r := urls.ready())[0] == 503 and r, what="not ready without broker"
    )
    assert body["ready"] is False
    assert body["store"] == "ok"
    assert body["drivers"]["desk"]["state"] in ("transient_disconnect", "connecting")
    assert body["drivers"]["desk"].get("last_error")
    assert body["drivers"]["web"]["state"] == "connected"
    # Liveness does not depend on peers.
    assert http("GET", urls.ops + "/healthz")[0] == 200

    mosquitto.start()
    status, body = poll(lambda: (r := urls.ready())[0] == 200 and r, what="ready again")
    assert body["drivers"]["desk"]["state"] == "connected"


def test_ops_admin_metrics_and_presence(
    tmp_path: Path, spawn: Callable[..., DaemonProcess]
) -> None:
    web_port, ops_port = ports()
    urls = Urls(web_port, ops_port)
    state = tmp_path / "state"
    spawn(base_config(state, web_port=web_port, ops_port=ops_port))

    # Admin endpoints: 401 without a token or with a wrong one, 200 with it.
    for method, path in (
        ("GET", "/v1/agents"),
        ("GET", "/v1/queues"),
        ("GET", "/v1/dead-letters"),
        ("POST", "/v1/agents/alice/presence/on"),
    ):
        assert http(method, urls.ops + path)[0] == 401, path
        status, _, headers = http(
            method, urls.ops + path, headers={"Authorization": "Bearer wrong-token-000000"}
        )
        assert status == 401, path
        assert headers.get("WWW-Authenticate", "").startswith("Bearer")
        assert http(method, urls.ops + path, headers={"Authorization": ADMIN})[0] == 401, path
        assert urls.admin(method, path)[0] == 200, path
    assert http("POST", urls.ops + "/v1/dead-letters/replay", {"all": True})[0] == 401
    status, body, _ = urls.admin("POST", "/v1/dead-letters/replay")
    assert status == 400, body

    # Presence off: new messages go to the other agent only.
    status, body, _ = urls.admin("POST", "/v1/agents/alice/presence/off")
    assert status == 200 and body == {"agent": "alice", "present": False, "presence": "off"}
    assert urls.agents()["alice"]["present"] is False
    receipts = []
    for i in range(2):
        status, receipt, _ = urls.post(COMPLAINT, f"p{i}@example.com")
        assert status == 201 and receipt["state"] == "assigned", receipt
        receipts.append(receipt)
    lines = poll(lambda: len(x := inbox_lines(state)) >= 2 and x, what="2 deliveries")
    assert {x["ticket"] for x in lines} == {r["ticket"] for r in receipts}
    assert {x["agent_id"] for x in lines} == {"bo"}
    assert urls.agents()["bo"]["open_conversations"] == 2

    status, body, _ = urls.admin("POST", "/v1/agents/nobody/presence/off")
    assert status == 404 and body["error"]["code"] == "unknown_agent"
    assert urls.admin("POST", "/v1/agents/alice/presence/maybe")[0] == 400

    # A delivery is counted once the tool has returned, a moment after its line is in
    # the inbox file: wait for the count rather than read it once.
    def counted() -> str | None:
        text = urls.metrics()
        ok = metric_value(text, "omnirouter_deliveries_total", target="inbox", result="ok")
        return text if (ok or 0) >= 2 else None

    metrics = poll(counted, what="2 deliveries counted")
    assert (
        metric_value(
            metrics, "omnirouter_messages_ingested_total", channel="web", label="complaint"
        )
        == 2
    )
    assert metric_value(metrics, "omnirouter_agent_present", agent="alice") == 0


# -- 5. sd_notify -----------------------------------------------------------------------


def test_sd_notify_ready_watchdog_reload(
    tmp_path: Path, spawn: Callable[..., DaemonProcess]
) -> None:
    web_port, ops_port = ports()
    d = spawn(
        base_config(tmp_path / "state", web_port=web_port, ops_port=ops_port),
        env={"WATCHDOG_USEC": "200000"},
    )
    ready = d.wait_notification("READY")
    assert ready["READY"] == "1"
    assert "waiting" in ready["STATUS"], ready
    # The default loop is uvloop (a dependency): notify, watchdog, reload and stop on it.
    assert [e["event_loop"] for e in d.log_events("daemon.ready")] == ["uvloop"]

    poll(
        lambda: sum(1 for n in d.poll_notifications() if n.get("WATCHDOG") == "1") >= 3,
        within=5,
        what="3 watchdog pings",
    )

    mark = len(d.poll_notifications())
    before_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    d.signal(signal.SIGHUP)
    reloading = d.wait_notification("RELOADING", after=mark)
    assert reloading["RELOADING"] == "1"
    usec = int(reloading["MONOTONIC_USEC"])
    assert before_ns // 1000 <= usec <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    index = d.notifications.index(reloading)
    again = d.wait_notification("READY", after=index + 1)
    assert again["READY"] == "1"

    assert d.stop() == 0
    assert any(n.get("STOPPING") == "1" for n in d.notifications)


# -- 6. reload --------------------------------------------------------------------------


def test_reload_applies_valid_and_rejects_invalid(
    tmp_path: Path, spawn: Callable[..., DaemonProcess]
) -> None:
    web_port, ops_port = ports()
    urls = Urls(web_port, ops_port)
    state = tmp_path / "state"
    original = base_config(state, web_port=web_port, ops_port=ops_port)
    d = spawn(original)
    assert set(urls.agents()) == {"alice", "bo"}

    # A valid change: a third agent appears.
    added = original + '\n[[agents]]\nid = "chen"\ncapacity = 2\ntool = "inbox"\nskills = ["zh"]\n'
    d.config_path.write_text(added)
    mark = len(d.poll_notifications())
    d.signal(signal.SIGHUP)
    d.wait_notification("READY", after=mark)
    assert set(poll(lambda: "chen" in (a := urls.agents()) and a, what="chen listed")) == {
        "alice",
        "bo",
        "chen",
    }

    # An invalid one (port out of range, unknown key) is rejected; the old config keeps running.
    broken = added.replace(f"port = {web_port}", "port = 99999").replace(
        "[daemon]\n", "[daemon]\nshutdown_timout = 5\n"
    )
    d.config_path.write_text(broken)
    mark = len(d.poll_notifications())
    d.signal(signal.SIGHUP)
    ready = d.wait_notification("READY", after=mark)
    assert "rejected" in ready.get("STATUS", ""), ready
    (event,) = poll(lambda: d.log_events("config.reload_rejected"), what="reload_rejected logged")
    errors = "\n".join(event["errors"])
    assert "channels[0].port" in errors, errors
    assert "daemon.shutdown_timout" in errors, errors
    assert event["level"] == "error"

    status, receipt, _ = urls.post(INQUIRY, "r1@example.com")
    assert status == 201, receipt
    assert set(urls.agents()) == {"alice", "bo", "chen"}
    # Only what changed restarts: the web channel kept listening throughout.
    assert len(d.log_events("web.listening")) == 1
    metrics = urls.metrics()
    assert metric_value(metrics, "omnirouter_config_reloads_total", result="rejected") == 1
    assert metric_value(metrics, "omnirouter_config_reloads_total", result="ok") == 1
    assert d.stop() == 0


# -- 7. bad config ----------------------------------------------------------------------


def test_bad_config_exits_11_naming_the_path(
    tmp_path: Path, spawn: Callable[..., DaemonProcess]
) -> None:
    web_port, ops_port = ports()
    good = base_config(tmp_path / "state", web_port=web_port, ops_port=ops_port)
    bad = good.replace(f"port = {web_port}", "port = 99999")
    d = spawn(bad, wait_ready=False)
    assert d.wait(timeout=30) == 11
    assert "channels[0].port" in d.log_text()
    assert not any("READY" in n for n in d.notifications)

    bad_file = tmp_path / "bad.toml"
    bad_file.write_text(bad)
    good_file = tmp_path / "good.toml"
    good_file.write_text(good)
    result = cli("config", "check", str(bad_file))
    assert result.returncode == 11, result
    assert "channels[0].port" in result.stderr
    result = cli("config", "check", str(good_file))
    assert result.returncode == 0, result
    assert "OK" in result.stdout


# -- 8. SIGTERM drain and restart -------------------------------------------------------


@pytest.mark.slow
def test_sigterm_drains_in_flight_posts(
    tmp_path: Path, spawn: Callable[..., DaemonProcess]
) -> None:
    web_port, ops_port = ports()
    urls = Urls(web_port, ops_port)
    state = tmp_path / "state"
    config = base_config(
        state,
        web_port=web_port,
        ops_port=ops_port,
        agents=agents("inbox", "alice", "bo", capacity=1000),
    )
    d = spawn(config)

    accepted: list[dict[str, Any]] = []
    refused: list[str] = []
    unexpected: list[Any] = []
    lock = threading.Lock()
    stop_sending = threading.Event()

    def sender(worker: int) -> None:
        i = 0
        while not stop_sending.is_set():
            i += 1
            try:
                status, body, _ = urls.post(
                    f"{INQUIRY} #{worker}-{i}", f"s{worker}-{i}@example.com"
                )
            except (ConnectionError, urllib.error.URLError, HTTPException) as exc:
                with lock:
                    refused.append(type(exc).__name__)
                return  # the listener is gone: later requests are refused too
            with lock:
                if 200 <= status < 300:
                    accepted.append(body)
                elif status == 503:
                    refused.append("503")
                else:
                    unexpected.append((status, body))

    threads = [threading.Thread(target=sender, args=(w,), daemon=True) for w in range(8)]
    for t in threads:
        t.start()
    poll(lambda: len(accepted) >= 40, what="40 accepted POSTs before SIGTERM")
    signalled = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait(timeout=10 + 5) == 0
    assert time.monotonic() - signalled < 10  # within shutdown_timeout
    stop_sending.set()
    for t in threads:
        t.join(10)
    assert not unexpected, unexpected[:5]
    assert refused, "no request was refused after the stop"
    assert any(n.get("STOPPING") == "1" for n in d.notifications)
    with pytest.raises((ConnectionError, urllib.error.URLError)):
        urls.post(INQUIRY, "late@example.com")

    # Every acknowledged message reached an agent, once.
    delivered = [x["message"]["id"] for x in inbox_lines(state)]
    assert len(delivered) == len(set(delivered))
    assert {a["message_id"] for a in accepted} <= set(delivered)
    (stopped,) = d.log_events("daemon.stopped")
    assert stopped["outbox_pending"] == 0

    # A restart on the same state finds nothing pending and nothing to send again.
    d2 = spawn(config)
    assert poll(lambda: d2.log_events("pipeline.restored"))[0]["pending_outbox"] == 0
    assert [x["message"]["id"] for x in inbox_lines(state)] == delivered
    assert d2.stop() == 0


@pytest.mark.slow
async def test_pending_outbox_survives_restart(
    tmp_path: Path, spawn: Callable[..., DaemonProcess]
) -> None:
    web_port, ops_port = ports()
    urls = Urls(web_port, ops_port)
    state = tmp_path / "state"
    secret = "e2e-webhook-secret-restart-1"

    def config(url: str) -> str:
        return with_outbox(
            base_config(
                state,
                web_port=web_port,
                ops_port=ops_port,
                adapters=webhook_adapter(url, secret=secret),
                agents=agents("hook", "alice", capacity=10),
            ),
            max_attempts=100,
        )

    # First run: the agent's endpoint is down, so the deliveries wait in the outbox.
    d = await asyncio.to_thread(spawn, config(f"http://127.0.0.1:{free_port()}"))
    receipts = []
    for i in range(3):
        status, receipt, _ = await asyncio.to_thread(urls.post, COMPLAINT, f"q{i}@example.com")
        assert status == 201, receipt
        receipts.append(receipt)
    await apoll(lambda: len(d.log_events("outbox.retry")) >= 3, what="retries")
    assert await asyncio.to_thread(d.stop) == 0
    (stopped,) = d.log_events("daemon.stopped")
    assert stopped["outbox_pending"] == 3

    # Second run on the same state, endpoint up: each pending item is delivered once.
    async with WebhookReceiver(secret) as receiver:
        d2 = await asyncio.to_thread(spawn, config(receiver.url))
        await apoll(lambda: len(receiver.deliveries) >= 3, what="3 deliveries after restart")
        got = {r.json["message"]["id"]: r.json["delivery_id"] for r in receiver.deliveries}
        assert set(got) == {r["message_id"] for r in receipts}
        assert len(set(got.values())) == 3
        assert await asyncio.to_thread(d2.stop) == 0
    (stopped,) = d2.log_events("daemon.stopped")
    assert stopped["outbox_pending"] == 0


# -- 9. secrets and bodies stay out of logs ---------------------------------------------


async def test_secrets_and_bodies_never_logged(
    tmp_path: Path, spawn: Callable[..., DaemonProcess]
) -> None:
    hook_secret = "e2e-env-webhook-secret-c0ffee42"
    admin_token = "e2e-env-admin-token-0badf00d99"
    text = "Zebra-purple-unique-text: this is terrible, refund me 9000 now"
    async with WebhookReceiver(hook_secret) as receiver:
        web_port, ops_port = ports()
        urls = Urls(web_port, ops_port)
        config = base_config(
            tmp_path / "state",
            web_port=web_port,
            ops_port=ops_port,
            admin_token="${E2E_ADMIN_TOKEN}",
            adapters=webhook_adapter(receiver.url, secret="${E2E_HOOK_SECRET}"),
            agents=agents("hook", "alice", capacity=5),
        )
        env = {"E2E_HOOK_SECRET": hook_secret, "E2E_ADMIN_TOKEN": admin_token}
        d = await asyncio.to_thread(spawn, config, env=env)

        status, receipt, _ = await asyncio.to_thread(
            urls.post, text, "leak@example.com", subject="Zebra-subject-line"
        )
        assert status == 201, receipt
        await receiver.wait_for(1, within=10)
        assert receiver.requests[0].signature_ok
        assert receiver.requests[0].json["message"]["text"] == text
        ok = await asyncio.to_thread(
            http, "GET", urls.ops + "/v1/agents", None, {"Authorization": f"Bearer {admin_token}"}
        )
        assert ok[0] == 200
        bad = await asyncio.to_thread(
            http, "GET", urls.ops + "/v1/agents", None, {"Authorization": f"Bearer {admin_token}x"}
        )
        assert bad[0] == 401
        # A failed delivery and a rejected reload log errors; neither may echo a secret.
        receiver.respond_next(400, 1, body="rejected")
        status, _, _ = await asyncio.to_thread(urls.post, text + " again", "leak2@example.com")
        assert status == 201
        await apoll(lambda: d.log_events("outbox.dead_letter"), what="dead letter logged")
        d.config_path.write_text(config.replace("timeout = 2", "timeout = -1"))
        d.signal(signal.SIGHUP)
        await apoll(lambda: d.log_events("config.reload_rejected"), what="reload rejected")
        assert await asyncio.to_thread(d.stop) == 0

    log = d.log_text()
    assert d.log_events("message.routed"), log[-2000:]
    assert hook_secret not in log
    assert admin_token not in log
    assert "Zebra-purple" not in log
    assert "Zebra-subject" not in log


# -- agents on tools without actions work through the CLI and the ops API ----------------


def test_inbox_agents_accept_resolve_and_transfer_from_the_cli(
    tmp_path: Path, spawn: Callable[..., DaemonProcess]
) -> None:
    # Issue 14: with only file-inbox agents nothing could resolve a conversation, so the
    # demo stalled once every slot was taken. The CLI acts for a named agent, audited.
    web_port, ops_port = ports()
    urls = Urls(web_port, ops_port)
    agents = (
        '[[agents]]\nid = "alice"\ncapacity = 1\ntool = "inbox"\n\n'
        '[[agents]]\nid = "bo"\ncapacity = 1\ntool = "inbox"\n'
    )
    d = spawn(base_config(tmp_path / "state", web_port=web_port, ops_port=ops_port, agents=agents))
    config_file = str(d.config_path)
    answers = [urls.post(f"Where is my parcel {n}?", f"c{n}@example.com")[1] for n in range(3)]
    assert [a["state"] for a in answers] == ["assigned", "assigned", "queued"]
    holders = {a["agent_id"]: a["ticket"] for a in inbox_lines(tmp_path / "state")}
    first = holders["alice"]

    # Not alice's to resolve for bo: refused with the reason, nothing changes.
    wrong = cli("resolve", first, "--agent", "bo", "-c", config_file)
    assert wrong.returncode != 0 and "hold" in wrong.stdout + wrong.stderr
    done = cli("resolve", first, "--agent", "alice", "-c", config_file)
    assert done.returncode == 0, done.stdout + done.stderr
    # Alice's slot freed: the queued message is hers now, and the queue is empty.
    poll(
        lambda: any(
            x["ticket"] == answers[2]["ticket"] and x["agent_id"] == "alice"
            for x in inbox_lines(tmp_path / "state")
        ),
        what="the queued message delivered to alice",
    )
    # Only the holder answers in a conversation: bo's reply on alice's ticket is refused.
    refused = cli("reply", answers[2]["ticket"], "Hi!", "--agent", "bo", "-c", config_file)
    assert refused.returncode != 0
    answered = cli(
        "reply", answers[2]["ticket"], "On its way!", "--agent", "alice", "-c", config_file
    )
    assert answered.returncode == 0, answered.stdout + answered.stderr
    history = cli("ticket", "history", first, "-c", config_file, "--json")
    assert history.returncode == 0, history.stderr
    assert "resolve" in history.stdout and "alice" in history.stdout
