"""The generic webhook, two ways: agents' actions come back to a signed callback endpoint.

The receiver side is played by a real HTTP client signing as a receiver would: with
our own `sign` for the omnirouter scheme and with the `standardwebhooks` package (the
reference library) for Standard Webhooks. The router side is the real pipeline, so a
forged agent id (an agent on another tool) is shown refused and audited.
"""

from __future__ import annotations

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
        await p.actions_from("some-other-webhook")(forged)
        assert h.store is not None
        ticket = await h.store.ticket(receipt.conversation_id)
        assert ticket is not None and ticket.status != "resolved"
        events = await h.store.ticket_events(receipt.conversation_id)
        refused = [e for e in events if e.detail.get("reason")]
        assert (
            refused and "does not work through some-other-webhook" in refused[-1].detail["reason"]
        )
        # Through its own tool the same action is applied.
        await p.actions_from("rec")(forged)
        ticket = await h.store.ticket(receipt.conversation_id)
        assert ticket is not None and ticket.status == "resolved"
    finally:
        await h.stop()
