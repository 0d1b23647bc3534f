"""The MQTT adapter against a private mosquitto: QoS 1 deliveries, agent actions, reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import structlog
from pydantic import SecretStr
from structlog.testing import capture_logs

from adapters.mqtt import ActionError, MqttConfig, MqttTool, parse_action
from router.delivery import encode_delivery
from router.drivers import (
    ADAPTERS,
    AgentAction,
    Delivery,
    DriverContext,
    DriverState,
    PermanentError,
    TimedOut,
    TransientError,
    load_driver,
)
from tests import payloads, peers
from tests.peers import Mosquitto, free_port, needs_mosquitto, self_signed_cert, wait_until

# Fixtures from tests/peers.py, bound here so pytest finds them for this module.
mosquitto = peers.mosquitto

PREFIX = "omnirouter/agents"


def make_delivery(n: int = 1, agent: str = "alice", **kw: Any) -> Delivery:
    """Return an assignment delivery."""
    fields: dict[str, Any] = {
        "id": f"d-{n}",
        "target": "mq",
        "agent_id": agent,
        "address": "",
        "payload": payloads.assignment(n, agent=agent, text=f"hello {n} — 你好"),
    }
    fields.update(kw)
    return Delivery(**fields)


def make_tool(broker: Mosquitto, tmp_path: Path, **config: Any) -> MqttTool:
    """Return an MqttTool for the broker with fast reconnects."""
    settings: dict[str, Any] = {
        "type": "mqtt",
        "name": "mq",
        "host": broker.host,
        "port": broker.port,
        "reconnect_min": 0.05,
        "reconnect_max": 0.5,
        "publish_timeout": 5.0,
    }
    settings.update(config)
    ctx = DriverContext(state_dir=tmp_path, log=structlog.get_logger().bind(tool="t"))
    return MqttTool("mq", MqttConfig(**settings), ctx)


async def wait_state(tool: MqttTool, state: DriverState, within: float = 5.0) -> None:
    """Wait (bounded) until the tool reaches state."""
    await wait_until(lambda: tool.state == state, within)


class ActionRecorder:
    """An ActionSink that records what it gets and lets tests await the n-th action."""

    def __init__(self) -> None:
        """Start with no actions."""
        self.actions: list[AgentAction] = []
        self._changed = asyncio.Event()

    async def __call__(self, action: AgentAction) -> None:
        """Record one action."""
        self.actions.append(action)
        self._changed.set()

    async def wait_for(self, count: int, within: float = 5.0) -> list[AgentAction]:
        """Wait until count actions arrived; return them all."""
        async with asyncio.timeout(within):
            while len(self.actions) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.actions


@asynccontextmanager
async def running(
    tool: MqttTool, sink: Callable[[AgentAction], Awaitable[None]] | None = None
) -> AsyncIterator[MqttTool]:
    """Run the tool in a task for the block; cancel and stop it afterwards."""
    recorder = sink or ActionRecorder()
    task = asyncio.create_task(tool.run(recorder))
    try:
        yield tool
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await tool.stop()


@asynccontextmanager
async def subscriber(broker: Mosquitto, topic: str) -> AsyncIterator[aiomqtt.Client]:
    """Yield a connected aiomqtt client subscribed to topic with QoS 1."""
    async with aiomqtt.Client(broker.host, broker.port, identifier="test-sub") as client:
        await client.subscribe(topic, qos=1)
        yield client


async def receive(client: aiomqtt.Client, count: int, within: float = 5.0) -> list[aiomqtt.Message]:
    """Return the next count messages the client receives."""
    out: list[aiomqtt.Message] = []
    async with asyncio.timeout(within):
        async for message in client.messages:
            out.append(message)
            if len(out) == count:
                break
    return out


async def test_deliver_publishes_exact_body_with_qos1(mosquitto: Mosquitto, tmp_path: Path) -> None:
    tool = make_tool(mosquitto, tmp_path)
    async with subscriber(mosquitto, f"{PREFIX}/+/inbox") as sub, running(tool):
        await wait_state(tool, DriverState.CONNECTED)
        delivery = make_delivery(1)
        await tool.deliver(delivery)
        assert tool.last_success is not None
        [message] = await receive(sub, 1)
    assert message.topic.value == f"{PREFIX}/alice/inbox"
    assert message.qos == 1
    assert message.payload == encode_delivery(delivery)
    body = json.loads(message.payload)
    assert body["schema"] == "omnirouter.delivery/1" and body["delivery_id"] == "d-1"


async def test_address_overrides_agent_id_in_topic(mosquitto: Mosquitto, tmp_path: Path) -> None:
    tool = make_tool(mosquitto, tmp_path, topic_prefix="acme/desk")
    async with subscriber(mosquitto, "acme/desk/+/+/inbox") as sub, running(tool):
        await wait_state(tool, DriverState.CONNECTED)
        await tool.deliver(make_delivery(1, address="team-a/alice"))
        [message] = await receive(sub, 1)
        assert message.topic.value == "acme/desk/team-a/alice/inbox"
        for bad in ("a/+/b", "#", "a//b", "/a"):
            with pytest.raises(PermanentError):
                await tool.deliver(make_delivery(2, address=bad))


async def test_200_concurrent_deliveries_all_arrive(mosquitto: Mosquitto, tmp_path: Path) -> None:
    tool = make_tool(mosquitto, tmp_path)
    async with subscriber(mosquitto, f"{PREFIX}/+/inbox") as sub, running(tool):
        await wait_state(tool, DriverState.CONNECTED)
        deliveries = [make_delivery(i, agent=f"agent{i % 7}") for i in range(200)]
        await asyncio.gather(*(tool.deliver(d) for d in deliveries))
        messages = await receive(sub, 200)
    got = {json.loads(m.payload)["delivery_id"] for m in messages}
    assert got == {d.id for d in deliveries}


async def test_actions_reach_the_sink(mosquitto: Mosquitto, tmp_path: Path) -> None:
    tool = make_tool(mosquitto, tmp_path)
    recorder = ActionRecorder()
    async with running(tool, recorder):
        await wait_state(tool, DriverState.CONNECTED)
        async with aiomqtt.Client(
            mosquitto.host, mosquitto.port, identifier="agent-alice"
        ) as agent:
            body = {"action": "accept", "conversation_id": "c-1", "message_id": "m-1", "note": "ok"}
            await agent.publish(f"{PREFIX}/alice/actions", json.dumps(body), qos=1)
            await agent.publish(
                f"{PREFIX}/alice/actions", json.dumps({"action": "presence", "value": "off"}), qos=1
            )
            actions = await recorder.wait_for(2)
    assert actions[0] == AgentAction(
        agent_id="alice",
        action="accept",
        conversation_id="c-1",
        message_id="m-1",
        value="",
        extra={"note": "ok"},
    )
    assert actions[1].action == "presence" and actions[1].value == "off"


async def publish_actions_and_settle(
    broker: Mosquitto, recorders: list[ActionRecorder], count: int
) -> list[list[str]]:
    """Publish `count` actions once each, wait until every recorder is past them all.

    Return the conversation ids of the actions each recorder got, markers left out.
    Mosquitto keeps one publisher's QoS 1 messages in order per subscriber, so once a
    recorder got a marker published after the actions, no copy of an action is still
    on its way to it: "received once" is then final, without waiting for a silence.
    """
    async with aiomqtt.Client(broker.host, broker.port, identifier="agent-many") as agent:
        for i in range(count):
            body = {"action": "accept", "conversation_id": f"c-{i}"}
            await agent.publish(f"{PREFIX}/agent{i % 3}/actions", json.dumps(body), qos=1)
        markers = 0

        def past_the_actions() -> bool:
            return all(
                any(a.conversation_id.startswith("marker-") for a in r.actions) for r in recorders
            )

        async with asyncio.timeout(10):
            while not past_the_actions():
                # Shared: each marker goes to one of the group, so publish until all had one.
                body = {"action": "accept", "conversation_id": f"marker-{markers}"}
                await agent.publish(f"{PREFIX}/alice/actions", json.dumps(body), qos=1)
                markers += 1
                with contextlib.suppress(TimeoutError):
                    await recorders[0].wait_for(len(recorders[0].actions) + 1, within=0.05)
    return [
        [a.conversation_id for a in r.actions if not a.conversation_id.startswith("marker-")]
        for r in recorders
    ]


async def test_instances_sharing_a_group_get_each_action_once(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    # Two router instances on one config (their client ids differ, as host and pid do).
    count = 40
    tools = [make_tool(mosquitto, tmp_path, client_id=f"instance-{n}") for n in (1, 2)]
    recorders = [ActionRecorder(), ActionRecorder()]
    async with running(tools[0], recorders[0]), running(tools[1], recorders[1]):
        for tool in tools:
            await wait_state(tool, DriverState.CONNECTED)
        got = await publish_actions_and_settle(mosquitto, recorders, count)
    everything = got[0] + got[1]
    assert sorted(everything) == sorted(f"c-{i}" for i in range(count))  # each exactly once
    # Mosquitto hands a group's messages round robin: both instances do part of the work.
    assert got[0] and got[1]


async def test_every_instance_follows_presence_and_reads_it_retained(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    # Presence is not shared: each instance reads the retained states on connect and
    # every live change (a last will taking an agent off line must not be missed).
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="agent-alice") as agent:
        await agent.publish(f"{PREFIX}/alice/presence", b"on", qos=1, retain=True)
        tools = [
            make_tool(mosquitto, tmp_path, client_id=f"instance-{n}", presence=True) for n in (1, 2)
        ]
        recorders = [ActionRecorder(), ActionRecorder()]
        async with running(tools[0], recorders[0]), running(tools[1], recorders[1]):
            for recorder in recorders:
                await recorder.wait_for(1)
            await agent.publish(f"{PREFIX}/alice/presence", b"away", qos=1, retain=True)
            for recorder in recorders:
                await recorder.wait_for(2)
    for recorder in recorders:
        assert [(a.agent_id, a.action, a.value) for a in recorder.actions] == [
            ("alice", "presence", "on"),
            ("alice", "presence", "away"),
        ]


async def test_without_a_share_group_every_instance_gets_every_action(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    count = 20
    tools = [
        make_tool(mosquitto, tmp_path, client_id=f"instance-{n}", share_group="") for n in (1, 2)
    ]
    recorders = [ActionRecorder(), ActionRecorder()]
    async with running(tools[0], recorders[0]), running(tools[1], recorders[1]):
        for tool in tools:
            await wait_state(tool, DriverState.CONNECTED)
        got = await publish_actions_and_settle(mosquitto, recorders, count)
    for ids in got:
        assert ids == [f"c-{i}" for i in range(count)]


async def test_malformed_action_is_refused_and_loop_continues(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    tool = make_tool(mosquitto, tmp_path)
    recorder = ActionRecorder()
    secret_text = "customer card 4111 1111 1111 1111"
    with capture_logs() as logs:
        async with running(tool, recorder):
            await wait_state(tool, DriverState.CONNECTED)
            async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="agent") as agent:
                topic = f"{PREFIX}/alice/actions"
                await agent.publish(topic, b"\xff not json " + secret_text.encode(), qos=1)
                await agent.publish(
                    topic, json.dumps({"action": "explode", "x": secret_text}), qos=1
                )
                await agent.publish(topic, json.dumps([1, 2]), qos=1)
                forged = {"action": "resolve", "agent_id": "mallory", "conversation_id": "c"}
                await agent.publish(topic, json.dumps(forged), qos=1)
                await agent.publish(f"{PREFIX}/bad agent!/actions", b"{}", qos=1)
                await agent.publish(
                    topic, json.dumps({"action": "resolve", "conversation_id": "c-9"})
                )
                actions = await recorder.wait_for(5)
    # Malformed actions from a valid agent topic reach the router refused (it tells the
    # agent why, with a notice); none is applied, none carries the body's content.
    assert [(a.agent_id, a.action, a.conversation_id) for a in actions if not a.refused] == [
        ("alice", "resolve", "c-9")
    ]
    refused = [a for a in actions if a.refused]
    assert [a.action for a in refused] == ["unknown", "explode", "unknown", "resolve"]
    assert "does not match the sender" in refused[3].refused
    rejected = [e for e in logs if e["event"] == "mqtt.action_rejected"]
    assert len(rejected) == 5
    assert secret_text not in repr(logs) and secret_text not in repr(actions)


async def test_failing_sink_does_not_stop_the_listener(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    recorder = ActionRecorder()
    calls = 0

    async def flaky(action: AgentAction) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("store is down")
        await recorder(action)

    tool = make_tool(mosquitto, tmp_path)
    async with running(tool, flaky):
        await wait_state(tool, DriverState.CONNECTED)
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="agent") as agent:
            for cid in ("c-1", "c-2"):
                body = json.dumps({"action": "accept", "conversation_id": cid})
                await agent.publish(f"{PREFIX}/bo/actions", body, qos=1)
            actions = await recorder.wait_for(1)
    assert actions[0].conversation_id == "c-2"


async def test_broker_restart_transient_then_reconnects(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    tool = make_tool(mosquitto, tmp_path)
    async with running(tool):
        await wait_state(tool, DriverState.CONNECTED)
        await tool.deliver(make_delivery(1))

        mosquitto.stop()
        await wait_state(tool, DriverState.TRANSIENT_DISCONNECT)
        with pytest.raises(TransientError):
            await tool.deliver(make_delivery(2))
        assert "lost" in tool.last_error or "failed" in tool.last_error

        mosquitto.start()  # same port
        await wait_state(tool, DriverState.CONNECTED, within=10)
        async with subscriber(mosquitto, f"{PREFIX}/+/inbox") as sub:
            await tool.deliver(make_delivery(3))
            [message] = await receive(sub, 1)
        assert json.loads(message.payload)["delivery_id"] == "d-3"


async def test_deliveries_in_flight_fail_fast_when_the_connection_drops(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    # A long publish timeout: only the "connection lost" signal can end these quickly.
    tool = make_tool(mosquitto, tmp_path, publish_timeout=60)
    sink_called = asyncio.Event()

    async def stuck_sink(action: AgentAction) -> None:
        sink_called.set()
        await asyncio.Event().wait()  # the router is slow: must not delay loss detection

    async with running(tool, stuck_sink):
        await wait_state(tool, DriverState.CONNECTED)
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="agent") as agent:
            body = json.dumps({"action": "accept", "conversation_id": "c-1"})
            await agent.publish(f"{PREFIX}/alice/actions", body, qos=1)
        await asyncio.wait_for(sink_called.wait(), 5)
        mosquitto.pause()  # PUBLISHes reach the socket, no PUBACK comes back
        sends = [asyncio.create_task(tool.deliver(make_delivery(i))) for i in range(50)]
        await asyncio.sleep(0.2)
        assert not any(t.done() for t in sends)  # all waiting for their PUBACK
        mosquitto.kill()
        done, pending = await asyncio.wait(sends, timeout=5)
        assert not pending
        errors = [t.exception() for t in done]
        assert all(isinstance(e, TransientError) for e in errors)
        assert "connection lost before the PUBACK" in str(errors[0])


async def test_publish_timeout_is_timed_out(mosquitto: Mosquitto, tmp_path: Path) -> None:
    tool = make_tool(mosquitto, tmp_path, publish_timeout=0.2)
    async with running(tool):
        await wait_state(tool, DriverState.CONNECTED)
        mosquitto.pause()
        try:
            with pytest.raises(TimedOut):
                await tool.deliver(make_delivery(1))
        finally:
            mosquitto.resume()


async def test_a_hung_broker_drops_the_connection_after_one_timeout(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    # No PUBACK at all for publish_timeout: the broker hangs. The tool must not wait for
    # the keepalive (up to two periods) to notice, or every outbox retry meanwhile would
    # spend an attempt; it reports transient_disconnect (the outbox then holds items).
    tool = make_tool(mosquitto, tmp_path, publish_timeout=0.3, keepalive=60, connect_timeout=0.5)
    async with running(tool):
        await wait_state(tool, DriverState.CONNECTED)
        await tool.deliver(make_delivery(0))  # acknowledged: the clock starts here
        mosquitto.pause()
        try:
            with pytest.raises(TimedOut):
                await tool.deliver(make_delivery(1))
            await wait_state(tool, DriverState.TRANSIENT_DISCONNECT)
            assert "broker unresponsive" in tool.last_error
            with pytest.raises(TransientError, match="not connected"):
                await tool.deliver(make_delivery(2))
        finally:
            mosquitto.resume()
        await wait_state(tool, DriverState.CONNECTED, within=10)
        async with subscriber(mosquitto, f"{PREFIX}/alice/inbox") as sub:
            await tool.deliver(make_delivery(3))
            [message] = await receive(sub, 1)
        assert json.loads(message.payload)["delivery_id"] == make_delivery(3).id


async def test_not_connected_deliver_is_transient_at_once(tmp_path: Path) -> None:
    config = MqttConfig(type="mqtt", name="mq", host="127.0.0.1", port=1)
    ctx = DriverContext(state_dir=tmp_path, log=structlog.get_logger())
    tool = MqttTool("mq", config, ctx)
    with pytest.raises(TransientError, match="not connected"):
        await tool.deliver(make_delivery(1))


async def test_nobody_listening_is_transient_disconnect(tmp_path: Path) -> None:
    port = free_port()
    config = MqttConfig(
        type="mqtt", name="mq", host="127.0.0.1", port=port, reconnect_min=0.05, reconnect_max=0.1
    )
    tool = MqttTool("mq", config, DriverContext(state_dir=tmp_path, log=structlog.get_logger()))
    async with running(tool):
        await wait_state(tool, DriverState.TRANSIENT_DISCONNECT)


@needs_mosquitto
async def test_wrong_credentials_park_as_bad_credentials(tmp_path: Path) -> None:
    with Mosquitto(users={"router": "right-password"}) as broker:
        tool = make_tool(
            broker, tmp_path, username="router", password="wrong-password", reconnect_max=0.2
        )
        attempts = 0
        sleeps: list[float] = []

        async def fake_sleep(delay: float) -> None:
            nonlocal attempts
            attempts += 1
            sleeps.append(delay)
            await asyncio.sleep(0.01)

        tool.sleep = fake_sleep
        with capture_logs() as logs:
            async with running(tool):
                await wait_state(tool, DriverState.BAD_CREDENTIALS)
                await wait_until(lambda: attempts >= 3)
                with pytest.raises(TransientError):
                    await tool.deliver(make_delivery(1))
        # Parked at the maximum delay every time, and the state change logged once.
        assert sleeps[:3] == [0.2, 0.2, 0.2]
        transitions = [e for e in logs if e.get("new") == "bad_credentials"]
        assert len(transitions) == 1
        assert "wrong-password" not in repr(logs) + tool.last_error

        # With the right password the same settings connect.
        good = make_tool(broker, tmp_path, username="router", password="right-password")
        async with running(good):
            await wait_state(good, DriverState.CONNECTED)
            await good.deliver(make_delivery(2))


@pytest.fixture
def tls_cert(tmp_path: Path) -> tuple[Path, Path]:
    """Return a self-signed (cert, key) pair for 127.0.0.1."""
    return self_signed_cert(tmp_path)


@needs_mosquitto
async def test_tls_with_private_ca(tmp_path: Path, tls_cert: tuple[Path, Path]) -> None:
    cert, key = tls_cert
    with Mosquitto(extra_config=f"certfile {cert}\nkeyfile {key}") as broker:
        tool = make_tool(broker, tmp_path, tls=True, ca_file=cert)
        async with running(tool):
            await wait_state(tool, DriverState.CONNECTED)
            await tool.deliver(make_delivery(1))
        # Without trusting the private CA the handshake fails: a transient disconnect.
        untrusting = make_tool(broker, tmp_path, tls=True)
        async with running(untrusting):
            await wait_state(untrusting, DriverState.TRANSIENT_DISCONNECT)
            assert "CERTIFICATE_VERIFY_FAILED" in untrusting.last_error


async def test_stop_disconnects_and_parks(mosquitto: Mosquitto, tmp_path: Path) -> None:
    tool = make_tool(mosquitto, tmp_path)
    task = asyncio.create_task(tool.run(ActionRecorder()))
    await wait_state(tool, DriverState.CONNECTED)
    await tool.stop()
    assert tool.state == DriverState.STOPPED
    with pytest.raises(TransientError):
        await tool.deliver(make_delivery(1))
    assert not task.done()  # run() waits for the supervisor's cancel
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_parse_action_schema() -> None:
    ok = parse_action("alice", b'{"action":"reply","conversation_id":"c","value":"Hi!"}')
    assert (ok.action, ok.conversation_id, ok.value) == ("reply", "c", "Hi!")
    bad_payloads: list[Any] = [
        "not bytes",
        b"",
        b"null",
        b'{"action":"presence","value":"maybe"}',
        b'{"action":"accept"}',
        b'{"action":"reply","conversation_id":"c"}',
        b'{"action":"accept","conversation_id":5}',
        b'{"action":"accept","conversation_id":"c","agent_id":"bob"}',
        b'{"action":"accept","conversation_id":"' + b"x" * 70000 + b'"}',
        b'{"action":"relabel","message_id":"m1","value":"nonsense"}',
        b'{"action":"relabel","value":"complaint"}',
    ]
    for payload in bad_payloads:
        with pytest.raises(ActionError):
            parse_action("alice", payload)


def test_relabel_is_an_action_agents_can_send() -> None:
    # README documents relabel as an agent action; the MQTT tool refused it before.
    got = parse_action("alice", b'{"action":"relabel","message_id":"m1","value":"complaint"}')
    assert (got.action, got.message_id, got.value) == ("relabel", "m1", "complaint")


def test_config_defaults_and_bounds() -> None:
    config = MqttConfig(type="mqtt", name="mq", password=SecretStr("s3cret"), username="router")
    # Unique per running instance: two daemons must not knock each other off the broker.
    assert config.client_id.startswith("omnirouter-mq-") and config.client_id.endswith(
        f"-{os.getpid()}"
    )
    assert config.qos == 1 and config.port == 1883
    assert config.share_group == "omnirouter"  # shared by default: one instance is the same
    assert MqttConfig(type="mqtt", name="mq", share_group="").share_group == ""  # plain
    assert "s3cret" not in repr(config) and "s3cret" not in str(config.model_dump())
    for bad in (
        {"port": 0},
        {"port": 70000},
        {"qos": 0},
        {"reconnect_min": 5, "reconnect_max": 1},
        {"topic_prefix": "a/#"},
        {"topic_prefix": "a/"},
        {"ca_file": "/etc/ssl/ca.pem"},
        {"unknown": 1},
        {"share_group": "a/b"},
        {"share_group": "a+"},
        {"share_group": "#"},
        {"share_group": "$g"},
    ):
        with pytest.raises(ValueError):
            MqttConfig(type="mqtt", name="mq", **bad)
    assert load_driver(ADAPTERS, "mqtt") is MqttTool


@pytest.mark.slow
async def test_throughput_concurrent_qos1(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """Measure concurrent QoS 1 deliveries/s (run: pytest -m slow -s tests/test_adapter_mqtt.py)."""
    count, concurrency = 5000, 256
    tool = make_tool(mosquitto, tmp_path)
    payload = payloads.assignment(1, text="x" * 600)
    deliveries = [make_delivery(i, agent=f"a{i % 50}", payload=payload) for i in range(count)]
    gate = asyncio.Semaphore(concurrency)

    async def one(delivery: Delivery) -> None:
        async with gate:
            await tool.deliver(delivery)

    async with running(tool):
        await wait_state(tool, DriverState.CONNECTED)
        started = time.perf_counter()
        await asyncio.gather(*(one(d) for d in deliveries))
        rate = count / (time.perf_counter() - started)
    print(f"\nmqtt: {rate:,.0f} QoS 1 deliveries/s with {concurrency} in flight")
    assert rate > 1000  # loose floor: catches a regression to one-at-a-time, not CPU noise
