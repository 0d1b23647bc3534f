"""The chat widget, contact form and status page in headless Chromium against the real daemon.

A test page on another origin embeds the widget with its one script tag; the agent
works from an MQTT tool (a private mosquitto) and answers with a `reply` action. The
browser is Debian's `chromium`, driven by the `playwright` package (no browser
download). With OMNIROUTER_SCREENSHOTS=DIR the widget is photographed into DIR
(docs/ holds the committed ones).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from aiohttp import web

from tests import peers
from tests.daemon_harness import DaemonProcess, base_config, http, ports
from tests.peers import Mosquitto, free_port
from tests.test_daemon_e2e import agents, apoll, mqtt_adapter, next_delivery, spawn

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HOSTILE = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
PREFIX = "e2e/agents"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs headless Chromium: apt-get install chromium (Debian package)",
    ),
]
mosquitto = peers.mosquitto
__all__ = ["mosquitto", "spawn"]  # fixtures used by name


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """Yield a headless Chromium (Debian's), closed at the end."""
    playwright_api = pytest.importorskip(
        "playwright.async_api", reason="needs the playwright package (pip install playwright)"
    )
    async with playwright_api.async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def shop() -> AsyncIterator[tuple[str, list[int]]]:
    """Serve a shop's page on its own origin; the page embeds the widget (port set later)."""
    web_port: list[int] = []

    async def page(request: web.Request) -> web.Response:
        lang = request.query.get("lang", "en")
        body = (
            f'<!doctype html><html lang="{lang}"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            "<title>Shop</title></head><body><h1>Example shop</h1><p>Our products.</p>"
            f'<script src="http://127.0.0.1:{web_port[0]}/widget.js" data-channel="web">'
            "</script></body></html>"
        )
        return web.Response(text=body, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", page)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", web_port
    finally:
        await runner.cleanup()


def widget_config(state: Path, web_port: int, ops_port: int, broker: Mosquitto, site: str) -> str:
    """Return a daemon config: web channel allowing the shop's origin, an MQTT agent."""
    config = base_config(
        state,
        web_port=web_port,
        ops_port=ops_port,
        adapters=mqtt_adapter(broker),
        agents=agents("desk", "alice", capacity=5),
    )
    return config.replace(
        f"port = {web_port}\n", f'port = {web_port}\nallowed_origins = ["{site}"]\n', 1
    )


async def shoot(page: Any, name: str) -> None:
    """Save a screenshot of the page when OMNIROUTER_SCREENSHOTS names a folder."""
    folder = os.environ.get("OMNIROUTER_SCREENSHOTS")
    if folder:
        await page.screenshot(path=str(Path(folder) / name))


async def test_widget_chat_live_reply_restart_and_history(
    tmp_path: Path,
    spawn: Callable[..., DaemonProcess],
    mosquitto: Mosquitto,
    browser: Any,
    shop: tuple[str, list[int]],
) -> None:
    site, web_port_slot = shop
    web_port, ops_port = ports()
    web_port_slot.append(web_port)
    config = widget_config(tmp_path / "state", web_port, ops_port, mosquitto, site)
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="agent-ui") as agent:
        await agent.subscribe(f"{PREFIX}/+/inbox", qos=1)
        daemon = await asyncio.to_thread(spawn, config)
        ready = f"http://127.0.0.1:{ops_port}/readyz"
        await apoll(lambda: http("GET", ready)[0] == 200, what="daemon ready")

        context = await browser.new_context(viewport={"width": 1280, "height": 800})
        page = await context.new_page()
        await page.goto(site + "/")
        await page.locator(".launcher").click()
        await page.locator(".input").fill(HOSTILE)
        await page.locator(".input").press("Enter")

        # The agent's tool gets the customer's text as written: a JSON string, no markup.
        _, delivery = await next_delivery(agent, within=15)
        assert delivery["message"]["text"] == HOSTILE
        assert delivery["message"]["channel"] == "web"
        conversation = delivery["conversation_id"]

        # The acknowledgement and the customer's message, both as plain text.
        notice = page.locator(".msg.notice")
        await notice.filter(has_text="An agent will answer within").wait_for(timeout=15000)
        assert delivery["ticket"] in await notice.first.inner_text()
        await page.locator(".msg.customer:not(.pending) .text").wait_for(timeout=10000)
        assert await page.locator(".msg.customer .text").inner_text() == HOSTILE

        # The agent answers from the tool: the reply appears live, as text.
        answer = "Sorry about that! <b>Refund</b> issued <img src=y onerror=window.__pwned=3>"
        await agent.publish(
            f"{PREFIX}/alice/actions",
            json.dumps({"action": "reply", "conversation_id": conversation, "value": answer}),
            qos=1,
        )
        reply = page.locator(".msg.agent .text")
        await reply.wait_for(timeout=15000)
        assert await reply.inner_text() == answer
        host = page.locator("[data-omnirouter-widget]")
        assert await host.locator("img, b, script").count() == 0
        assert await page.evaluate("window.__pwned") is None
        await shoot(page, "widget-desktop.png")

        # Restart the daemon: the widget reconnects by itself and sends again.
        await asyncio.to_thread(daemon.stop)
        await page.locator(".status").filter(has_text="reconnecting").wait_for(timeout=10000)
        await asyncio.to_thread(daemon.restart)
        await page.locator(".status").wait_for(state="hidden", timeout=30000)
        await page.locator(".input").fill("Thanks, and the invoice?")
        await page.locator(".input").press("Enter")
        _, follow = await next_delivery(agent, within=15)
        assert follow["conversation_id"] == conversation  # the token kept the conversation
        assert follow["message"]["text"] == "Thanks, and the invoice?"

        # A reload (same browser storage) shows the whole history from the server.
        await page.reload()
        texts = page.locator(".msg .text")
        await page.locator(".msg.customer:not(.pending)").nth(1).wait_for(timeout=15000)
        shown = await texts.all_inner_texts()
        assert shown[0] == HOSTILE and answer in shown and shown[-1] == "Thanks, and the invoice?"
        assert any("An agent will answer within" in s for s in shown)

        # Phone width: the open chat takes the screen.
        await page.set_viewport_size({"width": 390, "height": 844})
        box = await page.locator(".panel").bounding_box()
        assert box is not None and box["width"] == 390
        await shoot(page, "widget-phone.png")

        # Chinese page: the widget speaks Chinese.
        zh = await context.new_page()
        await zh.goto(site + "/?lang=zh-CN")
        assert await zh.locator(".launcher").inner_text() == "在线咨询"
        await context.close()


async def test_contact_form_shows_ticket_and_status_page(
    tmp_path: Path,
    spawn: Callable[..., DaemonProcess],
    mosquitto: Mosquitto,
    browser: Any,
) -> None:
    web_port, ops_port = ports()
    config = widget_config(tmp_path / "state", web_port, ops_port, mosquitto, "http://x.example")
    await asyncio.to_thread(spawn, config)
    base = f"http://127.0.0.1:{web_port}"
    context = await browser.new_context()
    page = await context.new_page()
    violations: list[str] = []
    page.on(
        "console", lambda m: violations.append(m.text) if "Content Security" in m.text else None
    )
    await page.goto(base + "/contact")
    await page.locator("input[name=name]").fill("Dana <b>Lee</b>")
    await page.locator("input[name=contact]").fill("dana@example.com")
    await page.locator("textarea[name=message]").fill("My parcel " + HOSTILE)
    attachment = tmp_path / "receipt.txt"
    attachment.write_text("order 1234, paid 20 EUR\n")
    await page.locator("input[name=attachment]").set_input_files(str(attachment))
    await page.locator("button[type=submit]").click()
    ticket = page.locator("#ticket")
    await ticket.wait_for(timeout=15000)
    number = await ticket.inner_text()
    assert number.startswith("T-")
    await page.locator("#status-link").click()
    await page.locator("#details").wait_for(timeout=15000)
    details = await page.locator("#details").inner_text()
    assert number in details
    assert "token" not in page.url.split("#")[0]  # the token stays in the fragment
    # Without the token: no data.
    await page.goto(f"{base}/status?ticket={number}")
    assert "incomplete" in await page.locator("#status").inner_text()
    assert violations == []  # no inline script or style was needed
    await context.close()
