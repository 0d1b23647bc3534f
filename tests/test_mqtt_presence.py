"""MQTT presence, last wills, the router's status topic and the committed ACL, on Mosquitto.

The broker runs with a password file and `config/mosquitto/omnirouter.acl` exactly as
committed; agents are real MQTT clients (aiomqtt in-process, and paho in a child
process that is SIGKILLed so the broker fires its last will).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from adapters.mqtt import MqttTool, presence_from_payload
from router.drivers import AgentAction, DriverState
from tests import peers
from tests.daemon_harness import REPO
from tests.peers import Mosquitto, wait_until
from tests.test_adapter_mqtt import ActionRecorder, make_delivery, make_tool, running, wait_state

PREFIX = "omnirouter/agents"
ACL = REPO / "config" / "mosquitto" / "omnirouter.acl"
USERS = {"omnirouter": "router-pw-1", "alice": "alice-pw-1", "bob": "bob-pw-1"}


@pytest.fixture
def broker() -> Any:
    if peers.MOSQUITTO is None:
        pytest.skip(peers.NEEDS_MOSQUITTO_REASON)
    with Mosquitto(users=USERS, extra_config=f"acl_file {ACL}") as b:
        yield b


def router_tool(broker: Mosquitto, tmp_path: Path, **extra: Any) -> MqttTool:
    return make_tool(
        broker,
        tmp_path,
        username="omnirouter",
        password=USERS["omnirouter"],
        presence=True,
        **extra,
    )


def agent_client(broker: Mosquitto, user: str, **kw: Any) -> aiomqtt.Client:
    return aiomqtt.Client(
        broker.host,
        broker.port,
        username=user,
        password=USERS[user],
        identifier=f"tool-{user}",
        **kw,
    )


def presences(recorder: ActionRecorder) -> list[tuple[str, str]]:
    return [(a.agent_id, a.value) for a in recorder.actions if a.action == "presence"]


async def receive_all(client: aiomqtt.Client, within: float) -> list[aiomqtt.Message]:
    out: list[aiomqtt.Message] = []
    try:
        async with asyncio.timeout(within):
            async for message in client.messages:
                out.append(message)
    except TimeoutError:
        pass
    return out


def test_presence_payloads() -> None:
    assert presence_from_payload(b"on") == "on"
    assert presence_from_payload(b" Offline\n") == "off"
    assert presence_from_payload(b'{"state": "away"}') == "away"
    assert presence_from_payload(b'{"presence": "available"}') == "on"
    for junk in (b"", b"maybe", b"\xff\xfe", b"{", b'{"state": 3}', b"[]", b"on" * 600):
        assert presence_from_payload(junk) is None


async def test_retained_presence_and_a_killed_tools_last_will_reach_the_router(
    broker: Mosquitto, tmp_path: Path
) -> None:
    recorder = ActionRecorder()
    # An agent tool in a child process: retained "on", last will "off" on the same topic.
    script = f"""
import sys, time
import paho.mqtt.client as mqtt
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="tool-alice-proc")
c.username_pw_set("alice", {USERS["alice"]!r})
c.will_set("{PREFIX}/alice/presence", "off", qos=1, retain=True)
c.connect("{broker.host}", {broker.port}, keepalive=30)
c.loop_start()
c.publish("{PREFIX}/alice/presence", "on", qos=1, retain=True).wait_for_publish(5)
print("ready", flush=True)
time.sleep(60)
"""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE, env=os.environ.copy()
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
        assert line.strip() == b"ready"
        # The router starts after the agent: it learns the retained state on subscribe.
        async with running(router_tool(broker, tmp_path), recorder) as tool:
            await wait_state(tool, DriverState.CONNECTED)
            await wait_until(lambda: presences(recorder) == [("alice", "on")], 5)
            os.kill(proc.pid, signal.SIGKILL)  # no DISCONNECT: the broker sends the will
            await wait_until(lambda: presences(recorder)[-1:] == [("alice", "off")], 5)
        # Reconnecting later, the retained will still says off.
        again = ActionRecorder()
        async with running(router_tool(broker, tmp_path), again) as tool:
            await wait_until(lambda: presences(again) == [("alice", "off")], 5)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_the_acl_keeps_each_agent_to_its_own_topics(
    broker: Mosquitto, tmp_path: Path
) -> None:
    recorder = ActionRecorder()
    async with running(router_tool(broker, tmp_path), recorder) as tool:
        await wait_state(tool, DriverState.CONNECTED)
        async with agent_client(broker, "alice") as alice:
            # Reading bob's inbox is refused by the broker (SUBACK failure code).
            await alice.subscribe(f"{PREFIX}/bob/inbox", qos=1)
            await alice.subscribe(f"{PREFIX}/alice/inbox", qos=1)
            await tool.deliver(make_delivery(1, agent="bob"))
            await tool.deliver(make_delivery(2, agent="alice"))
            got = await receive_all(alice, 1.0)
            assert [m.topic.value for m in got] == [f"{PREFIX}/alice/inbox"]
            assert json.loads(got[0].payload)["delivery_id"] == "d-2"  # type: ignore[arg-type]
            # Acting or reporting presence as bob is dropped by the broker; as herself it lands.
            forged = {"action": "resolve", "conversation_id": "01JBOBSTICKET"}
            await alice.publish(f"{PREFIX}/bob/actions", json.dumps(forged), qos=1)
            await alice.publish(f"{PREFIX}/bob/presence", "off", qos=1, retain=True)
            own = {"action": "accept", "conversation_id": "01JALICETICKET"}
            await alice.publish(f"{PREFIX}/alice/actions", json.dumps(own), qos=1)
            await alice.publish(f"{PREFIX}/alice/presence", "away", qos=1, retain=True)
            await recorder.wait_for(2)
            await asyncio.sleep(0.3)
        seen = [(a.agent_id, a.action, a.value or a.conversation_id) for a in recorder.actions]
        assert seen == [("alice", "accept", "01JALICETICKET"), ("alice", "presence", "away")]
        # An anonymous or wrong-password client is not let in at all.
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(broker.host, broker.port, username="alice", password="x"):
                pass


async def test_router_status_is_online_while_connected_and_offline_after_stop(
    broker: Mosquitto, tmp_path: Path
) -> None:
    tool = router_tool(broker, tmp_path)
    async with running(tool) as tool:
        await wait_state(tool, DriverState.CONNECTED)
        async with agent_client(broker, "alice") as alice:
            await alice.subscribe(f"{PREFIX}/_router/status", qos=1)
            [status] = await receive_all(alice, 0.5)
            assert status.retain and json.loads(status.payload)["status"] == "online"  # type: ignore[arg-type]
    # Stopped cleanly: the retained status now says offline (a crash leaves the will).
    async with agent_client(broker, "alice") as alice:
        await alice.subscribe(f"{PREFIX}/_router/status", qos=1)
        [status] = await receive_all(alice, 0.5)
        assert json.loads(status.payload)["status"] == "offline"  # type: ignore[arg-type]


async def test_presence_off_takes_an_agent_off_line_and_requeues_its_offers(
    tmp_path: Path,
) -> None:
    """The will's "off" is an ordinary presence action: the pipeline re-routes offers."""
    from tests.test_pipeline import Harness, msg

    # Agents on a two-way tool accept their offers; an unaccepted one goes back.
    roster = [{"id": a, "capacity": 2, "accepts": True} for a in ("alice", "bo")]
    h = Harness(tmp_path, roster)
    p = await h.start()
    try:
        receipt = await p.ingest(msg("Where is my order?", "dana"))
        holder = p.scheduler.holder[receipt.conversation_id]
        other = "bo" if holder == "alice" else "alice"
        verdict = await p.decide(AgentAction(agent_id=holder, action="presence", value="off"))
        assert verdict.outcome == "ok"
        await wait_until(lambda: p.scheduler.holder.get(receipt.conversation_id) == other, 5)
    finally:
        await h.stop()
