"""A webhook target that goes down is held, not dead-lettered (issue 13, defect 7).

Consecutive transient failures open the adapter's circuit breaker (state
transient_disconnect): the outbox then holds its items without spending attempts,
/readyz names the target, and a probe after a jittered, capped cool-down closes the
breaker once the receiver answers again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web

from adapters.webhook import WebhookConfig, WebhookTool, verify_signature
from router.drivers import Delivery, DriverContext, DriverState, TransientError
from tests import payloads
from tests.daemon_harness import DaemonProcess, base_config, http, ports
from tests.peers import free_port, wait_until

SECRET = "breaker-webhook-secret-4b7e19c2"
ADMIN = {"Authorization": "Bearer test-admin-token-0123456789"}


class FlakyReceiver:
    """A real aiohttp receiver on a fixed loopback port that can go down and come back."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.accepted: list[str] = []  # delivery ids of signed POSTs answered 200
        self.probes = 0  # requests that were not signed deliveries (the breaker's probes)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """Return the base URL."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen (again) on the port."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        """Stop listening: connections are refused until start()."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        signed = request.method == "POST" and verify_signature(
            SECRET.encode(),
            request.headers.get("X-Omnirouter-Timestamp", ""),
            body,
            request.headers.get("X-Omnirouter-Signature", ""),
        )
        if not signed:
            self.probes += 1
            return web.Response(status=405)
        self.accepted.append(request.headers["X-Omnirouter-Delivery"])
        return web.Response(status=200)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start daemons in tmp_path; kill them and print their logs at teardown."""
    started: list[DaemonProcess] = []

    def _spawn(config: str) -> DaemonProcess:
        d = DaemonProcess(tmp_path, config)
        started.append(d)
        d.start()
        return d

    yield _spawn
    for d in started:
        d.close()
        print(f"--- daemon log ---\n{d.log_text()[-6000:]}")  # shown when the test failed


async def apoll(fn: Callable[[], Any], within: float, what: str) -> Any:
    """Call the blocking fn in a thread until it returns something truthy."""
    deadline = time.monotonic() + within
    while True:
        last = await asyncio.to_thread(fn)
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {within}s: {what} (last: {last!r})")
        await asyncio.sleep(0.05)


async def test_outage_is_held_not_dead_lettered(
    tmp_path: Path, spawn: Callable[..., DaemonProcess]
) -> None:
    receiver = FlakyReceiver(free_port())
    await receiver.start()
    web_port, ops_port = ports()
    web_url, ops = f"http://127.0.0.1:{web_port}", f"http://127.0.0.1:{ops_port}"
    agents = "\n".join(
        f'[[agents]]\nid = "{a}"\ncapacity = 50\ntool = "hook"\nskills = ["en"]\n'
        for a in ("alice", "bo")
    )
    adapter = (
        f'[[adapters]]\ntype = "webhook"\nname = "hook"\nurl = "{receiver.url}/{{agent_id}}"\n'
        f'secret = "{SECRET}"\ntimeout = 2\n'
    )
    config = base_config(
        tmp_path / "state", web_port=web_port, ops_port=ops_port, adapters=adapter, agents=agents
    ).replace("[outbox]\n", "[outbox]\nmax_attempts = 3\n", 1)
    await asyncio.to_thread(spawn, config)

    def post(i: int) -> None:
        body = {"text": f"Where is my order number {i}?", "contact": {"handle": f"c{i}@x.org"}}
        status, answer, _ = http("POST", web_url + "/v1/messages", body)
        assert status == 201, answer

    def ready() -> tuple[int, Any]:
        status, body, _ = http("GET", ops + "/readyz")
        return status, body

    def dead_letters() -> list[Any]:
        status, body, _ = http("GET", ops + "/v1/dead-letters", headers=ADMIN)
        assert status == 200, body
        return list(body["dead_letters"])

    await asyncio.to_thread(post, 0)
    await apoll(lambda: len(receiver.accepted) == 1, 10, "the first delivery")
    await apoll(lambda: ready()[0] == 200, 10, "ready with the receiver up")

    # The receiver goes down; work keeps arriving.
    await receiver.stop()
    for i in range(1, 21):
        await asyncio.to_thread(post, i)
    _, body = await apoll(
        lambda: (r := ready())[0] == 503 and r, 10, "/readyz naming the webhook target"
    )
    assert body["drivers"]["hook"]["state"] == "transient_disconnect"
    assert "cannot connect" in body["drivers"]["hook"]["last_error"]
    assert body["degraded"] == ["hook"]
    assert body["drivers"]["web"]["state"] == "connected"
    # Long enough for every item to have run out of its three attempts several times over.
    await asyncio.sleep(3.0)
    assert await asyncio.to_thread(dead_letters) == []
    assert (await asyncio.to_thread(ready))[0] == 503

    # Back up: a probe closes the breaker and the backlog drains.
    await receiver.start()
    try:
        await apoll(
            lambda: len(set(receiver.accepted)) == 21, 30, "every delivery after the outage"
        )
        await apoll(lambda: ready()[0] == 200, 10, "ready again")
        assert await asyncio.to_thread(dead_letters) == []
        assert len(receiver.accepted) == len(set(receiver.accepted)) == 21  # each exactly once
        assert receiver.probes >= 1
    finally:
        await receiver.stop()


# -- the breaker on its own -----------------------------------------------------------------


def make_tool(url: str, tmp_path: Path, **settings: Any) -> WebhookTool:
    """Return a webhook tool posting to url."""
    config = WebhookConfig(
        type="webhook", name="hook", url=url, secret=SECRET, timeout=2, **settings
    )
    ctx = DriverContext(state_dir=tmp_path, log=structlog.get_logger().bind(tool="hook"))
    return WebhookTool("hook", config, ctx)


def delivery(n: int) -> Delivery:
    """Return an assignment delivery."""
    return Delivery(f"d-{n}", "hook", "alice", "", payloads.assignment(n))


async def _no_actions(action: Any) -> None:
    raise AssertionError("webhooks send no actions")


async def test_breaker_opens_after_consecutive_failures_and_a_probe_closes_it(
    tmp_path: Path,
) -> None:
    receiver = FlakyReceiver(free_port())
    tool = make_tool(
        receiver.url + "/hook",
        tmp_path,
        breaker_threshold=3,
        breaker_probe_min=0.05,
        breaker_probe_max=0.2,
    )
    task = asyncio.create_task(tool.run(_no_actions))
    try:
        await wait_until(lambda: tool.state == DriverState.CONNECTED)
        for n in range(2):
            with pytest.raises(TransientError):
                await tool.deliver(delivery(n))
        assert tool.state == DriverState.CONNECTED  # two failures: still closed
        with pytest.raises(TransientError):
            await tool.deliver(delivery(2))
        assert tool.state == DriverState.TRANSIENT_DISCONNECT
        assert "cannot connect" in tool.last_error
        # Probes keep failing while nobody listens; the breaker stays open.
        await asyncio.sleep(0.5)
        assert tool.state == DriverState.TRANSIENT_DISCONNECT

        await receiver.start()
        await wait_until(lambda: tool.state == DriverState.CONNECTED, within=5)
        assert receiver.probes >= 1 and receiver.accepted == []  # a probe is not a delivery
        await tool.deliver(delivery(3))
        assert receiver.accepted == ["d-3"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await tool.stop()
        await receiver.stop()


async def test_a_success_or_an_answer_resets_the_count(tmp_path: Path) -> None:
    receiver = FlakyReceiver(free_port())
    await receiver.start()
    tool = make_tool(receiver.url + "/hook", tmp_path, breaker_threshold=2)
    task = asyncio.create_task(tool.run(_no_actions))
    try:
        await wait_until(lambda: tool.state == DriverState.CONNECTED)
        for n in range(3):
            await receiver.stop()
            with pytest.raises(TransientError):
                await tool.deliver(delivery(n))
            await receiver.start()
            await tool.deliver(delivery(10 + n))  # one failure, then a success: never two
        assert tool.state == DriverState.CONNECTED
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await tool.stop()
        await receiver.stop()


def test_probe_bounds_are_validated() -> None:
    with pytest.raises(ValueError, match="breaker_probe_min"):
        WebhookConfig(
            type="webhook",
            name="hook",
            url="http://127.0.0.1:1/",
            secret=SECRET,
            breaker_probe_min=5,
            breaker_probe_max=1,
        )
