"""The ops status page: `/v1/status` behind the token or a login cookie, and the page itself.

The unit tests serve the ops API over the real pipeline (an in-process store and
scheduler, tests/test_pipeline.py's Harness) with aiohttp's test client. The browser
test runs the real daemon (tests/daemon_harness.py) and Debian's headless Chromium via
the `playwright` package: the page follows a message arriving, an agent going off line
and a dead letter appearing without a reload, and shows a hostile subject as text.
With OMNIROUTER_SCREENSHOTS=1 it writes docs/status-desktop.png and docs/status-phone.png.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from router.cli_status import render_status
from router.daemon import OutboxDeadLetters
from router.delivery import Delivery
from router.errors import PermanentError
from router.ops import OpsApi
from router.status_page import CSP, LOGIN_FAILURES_PER_MINUTE, STATIC, StatusPage
from tests import peers
from tests.daemon_harness import REPO, DaemonProcess, base_config, http, ports
from tests.test_daemon_e2e import agents, cli, spawn, webhook_adapter, with_outbox
from tests.test_ops_api import FakeCorrections, FakeHealth, FakeMetrics
from tests.test_pipeline import Harness, RecordingTool, msg

TOKEN = "status-page-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HOSTILE = "<img src=x onerror=alert(1)>"
__all__ = ["spawn"]  # a fixture used by name


class RefusingTool(RecordingTool):
    """An agent tool whose endpoint refuses every delivery for good (dead letters)."""

    async def deliver(self, delivery: Delivery) -> None:
        """Refuse, as an endpoint answering 400 would."""
        raise PermanentError("HTTP 400: <b>no such agent</b>")


@pytest.fixture
async def ops(tmp_path: Path) -> AsyncIterator[tuple[TestClient[Any, Any], Harness]]:
    """Serve the ops API over a real pipeline: alice and bo, bo's tool refusing everything."""
    h = Harness(tmp_path, [{"id": "alice", "capacity": 2}, {"id": "bo", "capacity": 1}])
    h.tool = RefusingTool()
    pipeline = await h.start()
    api = OpsApi(
        health=FakeHealth(),
        metrics=FakeMetrics(),
        agents=pipeline,
        dead_letters=OutboxDeadLetters(pipeline.store, pipeline.dispatcher),
        corrections=FakeCorrections(),
        admin_token=TOKEN,
    )
    async with TestClient(TestServer(api.app())) as client:
        yield client, h
    await h.stop()


async def test_status_json_needs_the_token(
    ops: tuple[TestClient[Any, Any], Harness],
) -> None:
    client, _ = ops
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Cookie": "omnirouter_status=x"}):
        resp = await client.get("/v1/status", headers=headers)
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await resp.json())["error"]["code"] == "unauthorized"
    resp = await client.get("/v1/status", headers=AUTH)
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "no-store"


async def test_page_and_assets_carry_a_strict_csp_and_no_inline_code(
    ops: tuple[TestClient[Any, Any], Harness],
) -> None:
    client, _ = ops
    for path, kind in (
        ("/dashboard", "text/html"),
        ("/dashboard/status.js", "text/javascript"),
        ("/dashboard/status.css", "text/css"),
    ):
        resp = await client.get(path)
        assert resp.status == 200, path
        assert resp.content_type == kind
        assert resp.headers["Content-Security-Policy"] == CSP
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'self'" in CSP and "unsafe-inline" not in CSP
    html = (STATIC / "status.html").read_text()
    # Scripts only by src, no style blocks or attributes, no inline handlers.
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/dashboard/status.js" defer>']
    assert "<style" not in html and " style=" not in html
    assert not re.search(r"\son[a-z]+=", html)
    js = (STATIC / "status.js").read_text()
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "eval(" not in js


async def test_login_sets_an_httponly_strict_cookie_that_reads_the_json(
    ops: tuple[TestClient[Any, Any], Harness],
) -> None:
    client, _ = ops
    wrong = await client.post("/dashboard/login", data={"token": "guess"}, allow_redirects=False)
    assert wrong.status == 303
    assert wrong.headers["Location"] == "/dashboard?login=failed"
    assert "Set-Cookie" not in wrong.headers

    right = await client.post("/dashboard/login", data={"token": TOKEN}, allow_redirects=False)
    assert right.status == 303 and right.headers["Location"] == "/dashboard"
    cookie = right.headers["Set-Cookie"]
    assert cookie.startswith("omnirouter_status=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    # A random session id: the token itself never travels in the cookie.
    assert TOKEN not in cookie
    assert "Secure" not in cookie  # plain HTTP on loopback; set behind an HTTPS proxy

    # The client's jar sends the cookie back: the JSON answers without a bearer header.
    resp = await client.get("/v1/status")
    assert resp.status == 200
    assert "queues" in await resp.json()

    behind_proxy = await client.post(
        "/dashboard/login",
        data={"token": TOKEN},
        headers={"X-Forwarded-Proto": "https"},
        allow_redirects=False,
    )
    assert "Secure" in behind_proxy.headers["Set-Cookie"]

    sid = cookie.split(";")[0].split("=", 1)[1]
    client.session.cookie_jar.clear()
    out = await client.post(
        "/dashboard/logout", headers={"Cookie": f"omnirouter_status={sid}"}, allow_redirects=False
    )
    assert out.status == 303
    assert 'omnirouter_status=""' in out.headers["Set-Cookie"]
    # The server forgot the session: its id no longer opens anything, even replayed.
    resp = await client.get("/v1/status", headers={"Cookie": f"omnirouter_status={sid}"})
    assert resp.status == 401


async def test_wrong_tokens_are_throttled() -> None:
    now = [1000.0]
    page = StatusPage(object(), TOKEN.encode(), clock=lambda: now[0])  # type: ignore[arg-type]
    app = web.Application()
    page.add_routes(app)
    async with TestClient(TestServer(app)) as client:

        async def login(token: str) -> int:
            resp = await client.post(
                "/dashboard/login", data={"token": token}, allow_redirects=False
            )
            return resp.status

        assert [await login("guess") for _ in range(LOGIN_FAILURES_PER_MINUTE)] == [
            303
        ] * LOGIN_FAILURES_PER_MINUTE
        # Past the limit even the right token waits: guessing gains nothing.
        assert await login(TOKEN) == 429
        now[0] += 61
        assert await login(TOKEN) == 303


async def test_status_json_shape_queues_agents_and_dead_letters(
    ops: tuple[TestClient[Any, Any], Harness],
) -> None:
    client, h = ops
    pipeline = h.pipeline
    assert pipeline is not None
    # bo takes one conversation; his tool refuses it for good: a dead letter.
    assert await pipeline.set_presence("alice", False, away=True)
    await pipeline.ingest(msg("Where is my invoice for order 1234?", "c0"))
    await h.settle()
    assert await pipeline.set_presence("bo", False)
    # Nobody on line: a complaint with a hostile subject waits.
    waiting = replace(
        msg("My parcel never arrived, I want a refund!", "c1"), subject=f"Refund {HOSTILE}"
    )
    receipt = await pipeline.ingest(waiting)
    assert receipt.state == "queued"

    resp = await client.get("/v1/status", headers=AUTH)
    s = await resp.json()
    assert {"version", "ready", "store", "drivers", "degraded", "now"} <= s.keys()

    [q] = s["queues"]
    assert q["queue"] == "default" and q["label"] == "complaint" and q["depth"] == 1
    assert q["severity"].startswith("P") and q["overdue"] == 0
    assert q["oldest_sla_s"] > 0 and 0 <= q["oldest_wait_s"] < q["oldest_sla_s"]
    assert s["waiting_total"] == 1
    [w] = s["waiting"]
    assert w["ticket"] == receipt.ticket and w["label"] == "complaint"
    assert w["excerpt"] == f"Refund {HOSTILE}"  # as written: the page shows it as text

    agents_by_id = {a["id"]: a for a in s["agents"]}
    assert set(agents_by_id) == {"alice", "bo"}
    bo = agents_by_id["bo"]
    assert bo["presence"] == "off" and bo["on_shift"] is True
    assert agents_by_id["alice"]["presence"] == "away"  # off line by choice, keeps offers
    assert bo["load"] == [{"channel_type": "*", "used": 1, "capacity": 1}]
    assert bo["open_conversations"] == 1

    dead = s["dead_letters"]
    assert dead["count"] == 1 and len(dead["newest"]) == 1
    [d] = dead["newest"]
    assert d["agent_id"] == "bo" and "400" in d["reason"]
    assert "payload" not in d  # no bodies in listings
    assert s["outbox"]["dead"] == 1
    assert s["crisis"]["enabled"] is True and s["crisis"]["open"] == []

    # The terminal view renders the same document.
    text = "\n".join(render_status(s))
    assert "1 waiting" in text and "DEAD LETTERS: 1" in text
    assert re.search(r"^bo\s+off\s+in shift\s+any 1/1", text, re.M)
    assert re.search(r"^default\s+complaint\s+P\d\s+1\s+0", text, re.M)


# -- the page in a browser, against the real daemon ----------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"]
SECRET = "status-page-webhook-secret-42"
DAEMON_TOKEN = "test-admin-token-0123456789"  # base_config's


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """Yield a headless Chromium (Debian's; the playwright package drives it)."""
    if not await asyncio.to_thread(CHROMIUM.exists):
        pytest.skip("needs headless Chromium: apt-get install chromium (Debian package)")
    playwright_api = pytest.importorskip(
        "playwright.async_api", reason="needs the playwright package (pip install playwright)"
    )
    async with playwright_api.async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


async def shoot(page: Any, name: str) -> None:
    """Write docs/NAME when OMNIROUTER_SCREENSHOTS=1 (CI leaves the tree clean)."""
    if os.environ.get("OMNIROUTER_SCREENSHOTS") == "1":
        await page.screenshot(path=str(REPO / "docs" / name), full_page=True)


@pytest.mark.slow
async def test_page_follows_the_daemon_live(
    tmp_path: Path, spawn: Callable[..., DaemonProcess], browser: Any
) -> None:
    async with peers.WebhookReceiver(SECRET) as receiver:
        web_port, ops_port = ports()
        config = with_outbox(
            base_config(
                tmp_path / "state",
                web_port=web_port,
                ops_port=ops_port,
                adapters=webhook_adapter(receiver.url),
                agents=agents("hook", "alice", "bo", capacity=1),
            ),
            max_attempts=2,
        )
        env = {"E2E_WEBHOOK_SECRET": SECRET}
        d = await asyncio.to_thread(spawn, config, env=env)
        ops_url = f"http://127.0.0.1:{ops_port}"
        web_url = f"http://127.0.0.1:{web_port}"

        context = await browser.new_context(viewport={"width": 1280, "height": 800})
        page = await context.new_page()
        violations: list[str] = []
        page.on("console", lambda m: violations.append(m.text) if "Security" in m.text else None)
        page.on("dialog", lambda dialog: violations.append("dialog: " + dialog.message))

        # Without a session the page asks for the token; a wrong one is refused.
        await page.goto(ops_url + "/dashboard")
        await page.locator("#login").wait_for()
        await page.locator("#token").fill("not-the-token")
        await page.locator("#login button").click()
        await page.locator("#login-failed").wait_for()
        await page.locator("#token").fill(DAEMON_TOKEN)
        await page.locator("#login button").click()
        await page.locator("#board").wait_for()
        bo = page.locator('#agents tr[data-agent="bo"] .presence')
        assert await bo.inner_text() == "on"
        await (
            page.locator('#drivers tr[data-driver="hook"] .state')
            .filter(has_text="connected")
            .wait_for()
        )

        # Nobody on line: a message arrives and waits; the page shows it, subject as text.
        for agent in ("alice", "bo"):
            status, _, _ = await asyncio.to_thread(
                http,
                "POST",
                f"{ops_url}/v1/agents/{agent}/presence/off",
                headers={"Authorization": f"Bearer {DAEMON_TOKEN}"},
            )
            assert status == 200
        await bo.filter(has_text="off").wait_for()  # an agent went off line, no reload

        status, posted, _ = await asyncio.to_thread(
            http,
            "POST",
            web_url + "/v1/messages",
            {
                "contact": {"handle": "dana@example.com"},
                "subject": f"Refund {HOSTILE}",
                "text": "How do I change the delivery address of my order?",
            },
        )
        assert status == 201, posted
        row = page.locator(f'#waiting tr[data-ticket="{posted["ticket"]}"]')
        await row.wait_for()
        assert await row.locator(".excerpt").inner_text() == f"Refund {HOSTILE}"
        assert await page.locator("#waiting img, #board img").count() == 0
        assert await page.locator("#t-waiting").inner_text() == "1"
        status, second, _ = await asyncio.to_thread(
            http,
            "POST",
            web_url + "/v1/messages",
            {
                "contact": {"handle": "+4915112345678"},
                "text": "My parcel never arrived and I want my money back!",
            },
        )
        assert status == 201, second
        await page.locator("#t-waiting").filter(has_text="2").wait_for()

        # bo comes back and takes one; his endpoint refuses it for good: a dead letter.
        receiver.respond_next(400, 5, body="unknown agent")
        await asyncio.to_thread(
            http,
            "POST",
            f"{ops_url}/v1/agents/bo/presence/on",
            headers={"Authorization": f"Bearer {DAEMON_TOKEN}"},
        )
        dead = page.locator("#dead tr[data-dead]")
        await dead.first.wait_for(timeout=15000)
        assert "400" in await dead.first.locator(".excerpt").inner_text()
        assert await page.locator("#t-dead").inner_text() == "1"
        # bo's one slot is taken: the other message still waits.
        await page.locator("#t-waiting").filter(has_text="1").wait_for()
        assert await page.locator('#agents tr[data-agent="bo"] .chip').inner_text() == "any 1/1"
        await shoot(page, "status-desktop.png")

        # A phone: the same board, no horizontal scrolling of the page.
        await page.set_viewport_size({"width": 390, "height": 844})
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390
        await shoot(page, "status-phone.png")
        assert violations == []
        assert page.url == ops_url + "/dashboard"  # never reloaded since the login
        await context.close()

        # The terminal view of the same daemon.
        result = await asyncio.to_thread(cli, "status", "-c", str(d.config_path), env=env)
        assert result.returncode == 0, result.stderr
        assert "DEAD LETTERS: 1" in result.stdout
        assert re.search(r"^bo\s+on\s+in shift", result.stdout, re.M)
        as_json = await asyncio.to_thread(
            cli, "status", "--json", "-c", str(d.config_path), env=env
        )
        assert as_json.returncode == 0 and '"dead_letters"' in as_json.stdout
        await watch_until_interrupted(d.config_path, env)


@pytest.mark.slow
async def test_watch_ends_quietly_when_its_reader_goes(
    tmp_path: Path, spawn: Callable[..., DaemonProcess]
) -> None:
    # `omnirouter status --watch | head -3`: head exits, the next refresh finds the pipe
    # closed; the command ends there, without a traceback, as Unix tools do.
    web_port, ops_port = ports()
    d = await asyncio.to_thread(
        spawn, base_config(tmp_path / "state", web_port=web_port, ops_port=ops_port)
    )
    for flags in ((), ("--json",)):
        line, code, errors = await asyncio.to_thread(watch_until_reader_goes, d.config_path, flags)
        assert line  # the first refresh had begun
        assert code == 141, errors
        assert "Traceback" not in errors, errors


def watch_argv(config_path: Path, *flags: str) -> list[str]:
    """Return the command line of `omnirouter status --watch` on a daemon's config."""
    return [sys.executable, "-m", "router.cli", "status", "--watch", *flags, "-c", str(config_path)]


def watch_until_reader_goes(config_path: Path, flags: tuple[str, ...]) -> tuple[bytes, int, str]:
    """Read the first line of `status --watch`, close the pipe; return line, exit code, stderr."""
    proc = subprocess.Popen(
        watch_argv(config_path, *flags), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    with proc:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        proc.stdout.close()  # as `head` does once it has what it wanted
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        return line, code, proc.stderr.read().decode()


def _interruptible() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def watch_until_interrupted(config_path: Path, env: dict[str, str]) -> None:
    """Run `omnirouter status --watch --json`: one JSON line per refresh, Ctrl-C ends it."""
    proc = await asyncio.create_subprocess_exec(
        *watch_argv(config_path, "--json"),
        cwd=REPO,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # Ctrl-C as at a terminal: a shell that starts the suite as a background job
        # leaves SIGINT ignored, and a child would inherit that and never see it.
        preexec_fn=_interruptible,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            for _ in range(2):  # two refreshes, each a whole document on one line
                assert "dead_letters" in json.loads(await proc.stdout.readline())
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(10):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
