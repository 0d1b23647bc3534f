"""The daemon end to end for SMS: Kannel in and out with an MQTT agent; Twilio through a crash.

Each test starts `python -m router.cli run -c FILE` (tests/daemon_harness.py).

1. Kannel (bearerbox + smsbox + fake SMSC): two customers text in (one in Chinese);
   each text becomes a ticket routed to the agent over MQTT, each customer gets one
   acknowledgement at the fake SMSC (in their language, Chinese as UCS-2), and the
   agent's `reply` actions reach the right numbers.
2. Twilio (the emulator of tests/peers_sms.py): a signed text is acknowledged through
   the Messages API and its delivery statuses come back; the daemon is SIGKILLed right
   after committing another text (whether or not its answer got out), and Twilio's
   retry after the restart is a no-op: one message, one acknowledgement.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import aiohttp
import aiomqtt
import pytest

from tests import peers
from tests.daemon_harness import DaemonProcess, base_config, ports
from tests.peers import Mosquitto, free_port
from tests.peers_sms import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    OUR_NUMBER,
    Kannel,
    TwilioEmulator,
    inbound_params,
    needs_kannel,
)
from tests.test_daemon_e2e import apoll, next_delivery, spawn

pytestmark = [pytest.mark.slow]

mosquitto = peers.mosquitto
spawn = spawn  # the daemon fixture of test_daemon_e2e (kills leftovers, prints logs)

PREFIX = "e2e-sms/agents"
SECRET = "kannel-webhook-secret-42"


def messages(state_dir: Path, channel: str) -> list[tuple[str, str, str]]:
    """Return (external_id, contact handle, conversation id) of the channel's stored messages."""
    path = state_dir / "omnirouter.db"
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        rows = conn.execute(
            "SELECT m.external_id, ct.handle, m.conversation_id FROM messages m "
            "JOIN contacts ct ON ct.key = m.contact_key WHERE m.channel=? ORDER BY m.id",
            (channel,),
        ).fetchall()
    except sqlite3.OperationalError:  # before the schema exists
        return []
    finally:
        conn.close()
    return [(str(a), str(b), str(c)) for a, b, c in rows]


def config(state: Path, channel: str, broker: Mosquitto | None = None) -> tuple[str, str]:
    """Return a daemon config with one SMS channel, and the ops URL."""
    web_port, ops_port = ports()
    if broker is not None:
        adapters = (
            f'[[adapters]]\ntype = "mqtt"\nname = "desk"\nhost = "{broker.host}"\n'
            f'port = {broker.port}\ntopic_prefix = "{PREFIX}"\nreconnect_min = 0.05\n'
            "reconnect_max = 0.3\nconnect_timeout = 2\npublish_timeout = 2\n"
        )
        tool = "desk"
    else:
        adapters, tool = '[[adapters]]\ntype = "inbox"\nname = "inbox"\n', "inbox"
    agents = f'[[agents]]\nid = "alice"\ncapacity = 5\ntool = "{tool}"\nskills = ["en", "zh"]\n'
    text = base_config(
        state, web_port=web_port, ops_port=ops_port, adapters=adapters, agents=agents, extra=channel
    )
    return text, f"http://127.0.0.1:{ops_port}"


# -- 1. Kannel with an MQTT agent ------------------------------------------------------------


@needs_kannel
@peers.needs_mosquitto
async def test_kannel_texts_are_routed_acknowledged_and_answered(
    tmp_path: Path, spawn: Callable[..., DaemonProcess], mosquitto: Mosquitto
) -> None:
    state = tmp_path / "state"
    port = free_port()
    kannel = Kannel(f"http://127.0.0.1:{port}/sms?secret={SECRET}")
    channel = (
        f'[[channels]]\ntype = "sms_http"\nname = "kannel"\nport = {port}\n'
        'default_region = "DE"\n'
        f'inbound = {{ auth = "secret", secret = "{SECRET}" }}\n'
        f'outbound = {{ url = "{kannel.sendsms_url}", username = "{Kannel.SENDSMS_USER}", '
        f'password = "{Kannel.SENDSMS_PASSWORD}", from_number = "12345", '
        'success_status = [202], success_regex = "^(0: Accepted|3: Queued)" }\n'
    )
    text, _ = config(state, channel, mosquitto)
    await asyncio.to_thread(kannel.start)
    try:
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="sms-agent") as sub:
            await sub.subscribe(f"{PREFIX}/+/inbox", qos=1)
            await asyncio.to_thread(spawn, text)

            await asyncio.to_thread(kannel.inject, "+4915100000001", "Hello, where is my parcel?")
            topic, first = await next_delivery(sub, within=15)
            assert topic == f"{PREFIX}/alice/inbox" and first["kind"] == "assignment"
            assert first["message"]["channel"] == "kannel"
            assert first["message"]["channel_type"] == "sms"
            assert first["message"]["contact"]["handle"] == "+4915100000001"
            sender, to, ack = await asyncio.to_thread(kannel.received, 15)
            assert (sender, to) == ("12345", "+4915100000001")
            assert first["ticket"] in ack and "min" in ack

            await asyncio.to_thread(kannel.inject, "015100000002", "你好，我的订单什么时候发货？")
            _, second = await next_delivery(sub, within=15)
            assert second["message"]["contact"]["handle"] == "+4915100000002"
            assert second["ticket"] != first["ticket"]
            _, to, ack_zh = await asyncio.to_thread(kannel.received, 15)
            assert to == "+4915100000002" and second["ticket"] in ack_zh and "分钟" in ack_zh

            # The agent answers each customer from their tool.
            for delivery, answer in (
                (first, "Your parcel left today; tracking ZX-123."),
                (second, "您好，您的订单今天已经发货。"),
            ):
                await sub.publish(
                    f"{PREFIX}/alice/actions",
                    json.dumps(
                        {
                            "action": "reply",
                            "conversation_id": delivery["conversation_id"],
                            "value": answer,
                        }
                    ),
                    qos=1,
                )
            got = {await asyncio.to_thread(kannel.received, 15) for _ in range(2)}
            assert got == {
                ("12345", "+4915100000001", "Your parcel left today; tracking ZX-123."),
                ("12345", "+4915100000002", "您好，您的订单今天已经发货。"),
            }
            # A follow-up from the first number joins its ticket, with no second ack.
            await asyncio.to_thread(kannel.inject, "+4915100000001", "Thanks!")
            _, third = await next_delivery(sub, within=15)
            assert third["conversation_id"] == first["conversation_id"]
            with pytest.raises(AssertionError, match="nothing at the fake SMSC"):
                await asyncio.to_thread(kannel.received, 1.0)
    finally:
        await asyncio.to_thread(kannel.stop)


# -- 2. Twilio through a crash -----------------------------------------------------------------


async def test_twilio_ack_statuses_and_a_retry_after_sigkill_is_a_noop(
    tmp_path: Path, spawn: Callable[..., DaemonProcess]
) -> None:
    state = tmp_path / "state"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    emulator = await TwilioEmulator().start()
    channel = (
        f'[[channels]]\ntype = "twilio"\nname = "sms"\nport = {port}\n'
        f'account_sid = "{ACCOUNT_SID}"\nauth_token = "${{E2E_TWILIO_TOKEN}}"\n'
        f'from_number = "{OUR_NUMBER}"\npublic_url = "{base}"\nbase_url = "{emulator.base_url}"\n'
    )
    text, _ = config(state, channel)
    env = {"E2E_TWILIO_TOKEN": AUTH_TOKEN}
    try:
        daemon = await asyncio.to_thread(spawn, text, env=env)
        first = inbound_params("Hello, my order 4711 is late", sender="+14155550123")
        assert (await emulator.post_signed(base + "/sms", first))[0] == 200
        (ack,) = await apoll(lambda: emulator.sent, within=15, what="the acknowledgement")
        assert ack.form["To"] == "+14155550123" and ack.form["From"] == OUR_NUMBER
        assert "T-" in ack.form["Body"]
        assert ack.form["StatusCallback"].startswith(f"{base}/status?outbound=")
        await apoll(lambda: len(emulator.status_codes) == 2, what="both status callbacks")
        assert emulator.status_codes == [200, 200]

        # Another customer's text; SIGKILL as soon as it is committed.
        second = inbound_params("Please call me back", sender="+14155550124")
        post = asyncio.create_task(emulator.post_signed(base + "/sms", second))
        await apoll(lambda: len(messages(state, "sms")) == 2, interval=0.005, what="the commit")
        await asyncio.to_thread(daemon.kill)
        with contextlib.suppress(aiohttp.ClientError):
            await post  # answered in time or cut off by the kill: both are fine

        await asyncio.to_thread(daemon.restart)
        # Twilio retries the same MessageSid: a no-op.
        assert (await emulator.post_signed(base + "/sms", second))[0] == 200
        acks = await apoll(
            lambda: [s for s in emulator.sent if s.form["To"] == "+14155550124"],
            within=15,
            what="the second customer's acknowledgement",
        )
        stored = messages(state, "sms")
        assert [(m[0], m[1]) for m in stored] == [
            (dict(first)["MessageSid"], "+14155550123"),
            (dict(second)["MessageSid"], "+14155550124"),
        ]
        await asyncio.sleep(1.0)  # an extra acknowledgement would show up by now
        acks = [s for s in emulator.sent if s.form["To"] == "+14155550124"]
        # One acknowledgement; a second only if the kill fell between Twilio accepting it
        # and the daemon recording that, and then under the same outbox id.
        assert 1 <= len(acks) <= 2 and len({a.form["StatusCallback"] for a in acks}) == 1
    finally:
        await emulator.close()
