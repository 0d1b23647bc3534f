"""The generic webhook, two ways: agents' actions come back to a signed callback endpoint.

The receiver side is played by a real HTTP client signing as a receiver would: with
our own `sign` for the omnirouter scheme and with the `standardwebhooks` package (the
reference library) for Standard Webhooks. The router side is the real pipeline, so a
forged agent id (an agent on another tool) is shown refused and audited.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from standardwebhooks import Webhook

from adapters.webhook import WebhookConfig, WebhookTool, sign
from router.drivers import AgentAction, DriverContext, DriverState, tool_sends_actions
from tests import peers
from tests.peers import WEBHOOK_SECRET, WebhookReceiver, free_port, wait_until
from tests.test_adapter_mqtt import ActionRecorder, running
from tests.test_adapter_webhook import make_delivery
from tests.test_pipeline import Harness, msg

# Fixture from tests/peers.py, bound here so pytest finds it for this module.
webhook_receiver = peers.webhook_receiver
STANDARD = "whsec_" + base64.b64encode(b"0123456789abcdef01234567").decode()


def make_tool(tmp_path: Path, url: str, **config: Any) -> WebhookTool:
    settings: dict[str, Any] = {
        "type": "webhook",
        "name": "hook",
        "url": url,
        "secret": WEBHOOK_SECRET,
        "callback_port": free_port(),
    }
    settings.update(config)
    ctx = DriverContext(state_dir=tmp_path, log=structlog.get_logger().bind(tool="hook"))
    return WebhookTool("hook", WebhookConfig(**settings), ctx)


async def post_signed(
    url: str, body: bytes, *, secret: str = WEBHOOK_SECRET, at: float | None = None
) -> tuple[int, Any]:
    stamp = int(time.time() if at is None else at)
    headers = {
        "Content-Type": "application/json",
        "X-Omnirouter-Timestamp": str(stamp),
        "X-Omnirouter-Signature": sign(secret.encode(), stamp, body),
    }
    return await post(url, body, headers)


async def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=body, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)


def action(**fields: str) -> bytes:
    return json.dumps(fields).encode()


def test_a_callback_makes_the_webhook_two_way() -> None:
    base = {"type": "webhook", "name": "h", "url": "https://x.test/", "secret": "s"}
    assert not tool_sends_actions("webhook", WebhookConfig(**base))
    assert tool_sends_actions("webhook", WebhookConfig(**base, callback_port=8791))
    with pytest.raises(ValueError, match="callback_url needs callback_port"):
        WebhookConfig(**base, callback_url="https://router.example.com/omnirouter/actions")


async def test_signed_actions_reach_the_router_and_forgeries_do_not(
    webhook_receiver: WebhookReceiver, tmp_path: Path
) -> None:
    tool = make_tool(tmp_path, webhook_receiver.url + "/inbox")
    recorder = ActionRecorder()
    async with running(tool, recorder):
        await tool_connected(tool)
        # Every delivery tells the receiver where to answer.
        await tool.deliver(make_delivery(1))
        [got] = webhook_receiver.deliveries
        url = got.headers["X-Omnirouter-Callback"]
        assert url == tool.callback_url and url.endswith("/omnirouter/actions")

        accept = action(agent_id="alice", action="accept", conversation_id="01JTICKET")
        assert (await post_signed(url, accept))[0] == 202
        [seen] = await recorder.wait_for(1)
        assert (seen.agent_id, seen.action, seen.conversation_id) == (
            "alice",
            "accept",
            "01JTICKET",
        )

        # Wrong secret, stale, replayed, unsigned: 401 and nothing reaches the router.
        resolve = action(agent_id="alice", action="resolve", conversation_id="01JTICKET")
        assert (await post_signed(url, resolve, secret="not-the-secret"))[0] == 401
        assert (await post_signed(url, resolve, at=time.time() - 3600))[0] == 401
        assert (await post(url, resolve, {"Content-Type": "application/json"}))[0] == 401
        stamp = int(time.time())
        signed = {
            "X-Omnirouter-Timestamp": str(stamp),
            "X-Omnirouter-Signature": sign(WEBHOOK_SECRET.encode(), stamp, resolve),
        }
        assert (await post(url, resolve, signed))[0] == 202
        assert (await post(url, resolve, signed))[0] == 401  # the same request again
        # Signed but malformed: a clear 400, or a refusal the agent is told about.
        status, answer = await post_signed(url, action(action="accept"))
        assert status == 400 and answer["error"]["code"] == "invalid_agent"
        assert (await post_signed(url, b"\xff not json"))[0] == 400
        assert (await post_signed(url, b"x" * (70 * 1024)))[0] == 413
        status, _ = await post_signed(url, action(agent_id="alice", action="explode"))
        assert status == 202
        actions = await recorder.wait_for(3)
        assert [a.action for a in actions] == ["accept", "resolve", "explode"]
        assert actions[2].refused.startswith("action must be one of")


async def test_standard_webhooks_callbacks_verify_with_the_reference_library(
    webhook_receiver: WebhookReceiver, tmp_path: Path
) -> None:
    tool = make_tool(
        tmp_path, webhook_receiver.url + "/inbox", secret=STANDARD, signature="standard"
    )
    recorder = ActionRecorder()
    async with running(tool, recorder):
        await tool_connected(tool)
        body = action(agent_id="bo", action="presence", value="away")
        now = datetime.now(UTC)
        signature = Webhook(STANDARD).sign("msg_1", now, body.decode())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": "msg_1",
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": f"v1,bm90LXRoaXMtb25l {signature}",  # rotated keys: any one
        }
        assert (await post(tool.callback_url, body, headers))[0] == 202
        assert (await post(tool.callback_url, body, headers))[0] == 401  # webhook-id reused
        forged = {**headers, "webhook-id": "msg_2"}
        assert (await post(tool.callback_url, body, forged))[0] == 401
        [seen] = await recorder.wait_for(1)
        assert (seen.agent_id, seen.action, seen.value) == ("bo", "presence", "away")


async def tool_connected(tool: WebhookTool) -> None:
    await wait_until(lambda: tool.state == DriverState.CONNECTED, 5)


async def test_a_tool_speaks_only_for_its_own_agents(tmp_path: Path) -> None:
    """An action naming an agent of another tool is refused and audited, never applied."""
    h = Harness(tmp_path, [{"id": "alice", "capacity": 2}])
    p = await h.start()
    try:
        receipt = await p.ingest(msg("Where is my order?", "dana"))
        forged = AgentAction("alice", "resolve", conversation_id=receipt.conversation_id)
        await p.actions_from("some-other-webhook", own_agents_only=True)(forged)
        assert h.store is not None
        ticket = await h.store.ticket(receipt.conversation_id)
        assert ticket is not None and ticket.status != "resolved"
        events = await h.store.ticket_events(receipt.conversation_id)
        refused = [e for e in events if e.detail.get("reason")]
        assert (
            refused and "does not work through some-other-webhook" in refused[-1].detail["reason"]
        )
        # Through its own tool the same action is applied.
        await p.actions_from("rec", own_agents_only=True)(forged)
        ticket = await h.store.ticket(receipt.conversation_id)
        assert ticket is not None and ticket.status == "resolved"
    finally:
        await h.stop()


async def test_round_trip_customer_sms_to_a_two_way_webhook_and_back(tmp_path: Path) -> None:
    """SMS in → webhook → accept, reply (texted back), resolve (survey), low score reopens."""
    import sqlite3

    from tests.daemon_harness import DaemonProcess, base_config, http
    from tests.peers_sms import ACCOUNT_SID, AUTH_TOKEN, TwilioEmulator, inbound_params

    receiver = WebhookReceiver()
    await receiver.start()
    emulator = await TwilioEmulator().start()
    web_port, ops_port, sms_port, cb_port = free_port(), free_port(), free_port(), free_port()
    sms = f"http://127.0.0.1:{sms_port}"
    config = base_config(
        tmp_path / "state",
        web_port=web_port,
        ops_port=ops_port,
        adapters=(
            f'[[adapters]]\ntype = "webhook"\nname = "desk"\nurl = "{receiver.url}/desk"\n'
            f'secret = "{WEBHOOK_SECRET}"\ncallback_port = {cb_port}\n'
        ),
        agents='[[agents]]\nid = "alice"\ncapacity = 3\ntool = "desk"\n',
        extra=(
            f'[[channels]]\ntype = "twilio"\nname = "sms"\nport = {sms_port}\n'
            f'account_sid = "{ACCOUNT_SID}"\nauth_token = "{AUTH_TOKEN}"\n'
            f'from_number = "+15005550006"\npublic_url = "{sms}"\n'
            f'base_url = "{emulator.base_url}"\n'
        ),
    )
    daemon = DaemonProcess(tmp_path, config)
    db_path = tmp_path / "state" / "omnirouter.db"

    def status(conversation: str) -> str:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5) as db:
            row = db.execute("SELECT status FROM conversations WHERE id=?", (conversation,))
            found = row.fetchone()
        return str(found[0]) if found else ""

    def texts_to(number: str) -> list[str]:
        return [s.form["Body"] for s in emulator.sent if s.form.get("To") == number]

    customer = "+14155550123"
    try:
        await asyncio.to_thread(daemon.start)
        ops = f"http://127.0.0.1:{ops_port}"
        await wait_until(lambda: http("GET", ops + "/readyz")[0] == 200, 20)
        params = inbound_params("My order 4711 has not arrived", sender=customer)
        assert (await emulator.post_signed(f"{sms}/sms", params))[0] == 200
        await wait_until(lambda: len(receiver.deliveries) >= 1, 20)
        work = receiver.deliveries[0]
        assert work.json["kind"] == "assignment" and "4711" in work.json["message"]["text"]
        callback = work.headers["X-Omnirouter-Callback"]
        conversation = work.json["conversation_id"]

        async def act(name: str, value: str = "") -> None:
            body = {"agent_id": "alice", "action": name, "conversation_id": conversation}
            if value:
                body["value"] = value
            status_code, _ = await post_signed(callback, json.dumps(body).encode())
            assert status_code == 202

        await act("accept")
        await wait_until(lambda: status(conversation) == "accepted", 10)
        await act("reply", "Your parcel left today.")
        await wait_until(lambda: "Your parcel left today." in texts_to(customer), 20)
        await act("resolve")
        await wait_until(lambda: len(texts_to(customer)) >= 3, 20)  # ack, reply, survey
        assert status(conversation) == "resolved"
        # The customer answers the survey unhappy: the ticket reopens as work again.
        low = inbound_params("1", sender=customer)
        assert (await emulator.post_signed(f"{sms}/sms", low))[0] == 200
        await wait_until(
            lambda: any(
                d.json.get("kind") == "assignment" and d.json["message"]["text"] == "1"
                for d in receiver.deliveries
            ),
            20,
        )
        assert status(conversation) in ("new", "assigned")
        assert await asyncio.to_thread(daemon.stop) == 0
    finally:
        daemon.close()
        await receiver.stop()
        await emulator.close()
