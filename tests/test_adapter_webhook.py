"""The webhook adapter against a real aiohttp receiver: signing, status mapping, secrecy."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydantic import SecretStr
from structlog.testing import capture_logs

from adapters.webhook import WebhookConfig, WebhookTool, safe_url, sign, verify_signature
from router import __version__
from router.delivery import encode_delivery
from router.drivers import (
    ADAPTERS,
    Delivery,
    DriverContext,
    DriverState,
    PermanentError,
    RateLimited,
    TimedOut,
    TransientError,
    load_driver,
)
from tests import payloads, peers
from tests.peers import WEBHOOK_SECRET, WebhookReceiver, free_port, wait_until

# Fixture from tests/peers.py, bound here so pytest finds it for this module.
webhook_receiver = peers.webhook_receiver


def make_delivery(n: int = 1, agent: str = "alice", **kw: Any) -> Delivery:
    """Return an assignment delivery."""
    fields: dict[str, Any] = {
        "id": f"d-{n}",
        "target": "hook",
        "agent_id": agent,
        "address": "",
        "payload": payloads.assignment(n, agent=agent, text="Grüße 你好"),
    }
    fields.update(kw)
    return Delivery(**fields)


def make_tool(url: str, tmp_path: Path, **config: Any) -> WebhookTool:
    """Return a WebhookTool posting to url with the receiver's secret."""
    settings: dict[str, Any] = {
        "type": "webhook",
        "name": "hook",
        "url": url,
        "secret": WEBHOOK_SECRET,
    }
    settings.update(config)
    ctx = DriverContext(state_dir=tmp_path, log=structlog.get_logger().bind(tool="t"))
    return WebhookTool("hook", WebhookConfig(**settings), ctx)


@asynccontextmanager
async def open_tool(url: str, tmp_path: Path, **config: Any) -> AsyncIterator[WebhookTool]:
    """Yield a tool and close its HTTP session afterwards."""
    tool = make_tool(url, tmp_path, **config)
    try:
        yield tool
    finally:
        await tool.stop()


async def test_delivery_is_signed_and_verified(
    webhook_receiver: WebhookReceiver, tmp_path: Path
) -> None:
    url = webhook_receiver.url + "/agents/{agent_id}/inbox"
    async with open_tool(url, tmp_path, headers={"X-Team": "blue"}) as tool:
        delivery = make_delivery(1)
        await tool.deliver(delivery)
        assert tool.last_success is not None
    [got] = webhook_receiver.deliveries
    assert got.signature_ok and got.path == "/agents/alice/inbox"
    assert got.body == encode_delivery(delivery)
    assert got.json["delivery_id"] == "d-1" and got.json["schema"] == "omnirouter.delivery/1"
    headers = got.headers
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == f"omnirouter/{__version__}"
    assert headers["X-Omnirouter-Delivery"] == "d-1"
    assert headers["X-Team"] == "blue"
    timestamp = int(headers["X-Omnirouter-Timestamp"])
    assert abs(timestamp - time.time()) < 5
    assert headers["X-Omnirouter-Signature"] == sign(WEBHOOK_SECRET.encode(), timestamp, got.body)


async def test_address_url_replaces_the_configured_url(
    webhook_receiver: WebhookReceiver, tmp_path: Path
) -> None:
    async with open_tool("https://unused.invalid/hook", tmp_path) as tool:
        await tool.deliver(make_delivery(1, address=webhook_receiver.url + "/direct"))
    assert [r.path for r in webhook_receiver.deliveries] == ["/direct"]


async def test_wrong_secret_is_rejected_by_the_receiver(
    webhook_receiver: WebhookReceiver, tmp_path: Path
) -> None:
    async with open_tool(webhook_receiver.url, tmp_path, secret="not-the-secret") as tool:
        with pytest.raises(PermanentError, match="401"):
            await tool.deliver(make_delivery(1))
    assert webhook_receiver.requests[0].signature_ok is False


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (500, TransientError),
        (502, TransientError),
        (503, TransientError),
        (408, TransientError),
        (425, TransientError),
        (400, PermanentError),
        (404, PermanentError),
        (410, PermanentError),
    ],
)
async def test_status_mapping(
    webhook_receiver: WebhookReceiver, tmp_path: Path, status: int, error: type[Exception]
) -> None:
    webhook_receiver.respond_next(status, body="x" * 1000 + "TAIL")
    async with open_tool(webhook_receiver.url, tmp_path) as tool:
        with pytest.raises(error) as info:
            await tool.deliver(make_delivery(1))
        assert type(info.value) is error
        message = str(info.value)
        assert str(status) in message
        assert "TAIL" not in message and len(message) < 400  # at most 200 chars of the body
        # The next request gets the default 200 again.
        await tool.deliver(make_delivery(2))


async def test_429_is_rate_limited_with_retry_after(
    webhook_receiver: WebhookReceiver, tmp_path: Path
) -> None:
    webhook_receiver.respond_next(429, headers={"Retry-After": "7"})
    webhook_receiver.respond_next(429)
    webhook_receiver.respond_next(429, headers={"Retry-After": "soon"})
    async with open_tool(webhook_receiver.url, tmp_path) as tool:
        with pytest.raises(RateLimited) as info:
            await tool.deliver(make_delivery(1))
        assert info.value.retry_after == 7
        with pytest.raises(RateLimited) as info:
            await tool.deliver(make_delivery(1))
        assert info.value.retry_after == 30
        with pytest.raises(RateLimited) as info:
            await tool.deliver(make_delivery(1))
        assert info.value.retry_after == 30


async def test_retry_after_http_date(webhook_receiver: WebhookReceiver, tmp_path: Path) -> None:
    webhook_receiver.respond_next(429, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})
    webhook_receiver.tolerance = 10**10  # the tool's clock is set back to 2015 below
    async with open_tool(webhook_receiver.url, tmp_path) as tool:
        tool.clock = lambda: 1445412480.0 - 90  # 90 s before that date
        with pytest.raises(RateLimited) as info:
            await tool.deliver(make_delivery(1))
    assert info.value.retry_after == 90


async def test_redirect_is_not_followed(webhook_receiver: WebhookReceiver, tmp_path: Path) -> None:
    webhook_receiver.respond_next(302, headers={"Location": "http://127.0.0.1:1/elsewhere"})
    async with open_tool(webhook_receiver.url, tmp_path) as tool:
        with pytest.raises(PermanentError, match="redirect"):
            await tool.deliver(make_delivery(1))
    assert len(webhook_receiver.requests) == 1


async def test_nobody_listening_is_transient(tmp_path: Path) -> None:
    async with open_tool(f"http://127.0.0.1:{free_port()}/hook", tmp_path) as tool:
        with pytest.raises(TransientError) as info:
            await tool.deliver(make_delivery(1))
    assert not isinstance(info.value, TimedOut)
    assert "cannot connect" in str(info.value)


async def test_slow_receiver_is_timed_out(
    webhook_receiver: WebhookReceiver, tmp_path: Path
) -> None:
    webhook_receiver.respond_next(200, delay=1.0)
    async with open_tool(webhook_receiver.url, tmp_path, timeout=0.2) as tool:
        with pytest.raises(TimedOut):
            await tool.deliver(make_delivery(1))


async def test_run_state_and_stop(webhook_receiver: WebhookReceiver, tmp_path: Path) -> None:
    tool = make_tool(webhook_receiver.url, tmp_path)

    async def no_actions(action: Any) -> None:
        raise AssertionError("webhooks have no actions")

    task = asyncio.create_task(tool.run(no_actions))
    await wait_until(lambda: tool.state == DriverState.CONNECTED)
    await tool.deliver(make_delivery(1))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await tool.stop()
    assert tool.state == DriverState.STOPPED
    with pytest.raises(TransientError, match="stopped"):
        await tool.deliver(make_delivery(2))


async def test_concurrent_deliveries(webhook_receiver: WebhookReceiver, tmp_path: Path) -> None:
    async with open_tool(webhook_receiver.url + "/{agent_id}", tmp_path) as tool:
        await asyncio.gather(*(tool.deliver(make_delivery(i, agent=f"a{i}")) for i in range(100)))
    assert len(webhook_receiver.deliveries) == 100
    assert {r.path for r in webhook_receiver.deliveries} == {f"/a{i}" for i in range(100)}


async def test_secret_never_logged_or_in_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sup3r-s3cret-value-do-not-leak"
    token = "gateway-token-also-secret"
    errors: list[str] = []
    caplog.set_level(logging.DEBUG)
    with capture_logs() as logs:
        async with WebhookReceiver(secret) as receiver:
            tool = make_tool(
                f"http://127.0.0.1:{free_port()}/hook/path-secret?token=qs-secret",
                tmp_path,
                secret=secret,
                headers={"Authorization": f"Bearer {token}"},
            )
            task = asyncio.create_task(tool.run(_ignore))
            await asyncio.sleep(0)
            # Nobody listening at the configured URL, then every error status at the receiver.
            addresses = ["", *[receiver.url + "/x/path-secret?token=qs-secret"] * 4]
            for status in (500, 400, 429, 302):
                receiver.respond_next(status)
            for address in addresses:
                try:
                    await tool.deliver(make_delivery(1, address=address))
                except Exception as exc:
                    errors.append(f"{exc!s} {exc!r} {exc.__cause__!r} {exc.__context__!r}")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await tool.stop()
            assert all(r.signature_ok for r in receiver.requests)
            assert [r.status for r in receiver.requests] == [500, 400, 429, 302]
    assert len(errors) == 5
    # The URL is configuration, not a secret field: leave the config's own repr out.
    everything = " ".join(errors) + repr(logs) + caplog.text + tool.last_error
    for leak in (secret, token, "path-secret", "qs-secret"):
        assert leak not in everything


async def _ignore(action: Any) -> None:
    """An ActionSink that drops everything."""


def test_verify_signature_accepts_good_and_rejects_bad() -> None:
    secret = b"k3y"
    body = b'{"delivery_id":"d-1"}'
    now = 1_700_000_000
    good = sign(secret, now, body)
    assert good.startswith("sha256=") and len(good) == 7 + 64
    assert verify_signature(secret, str(now), body, good, now=now)
    assert verify_signature(secret, str(now), body, good, now=now + 299)
    # Tampered body, wrong secret.
    assert not verify_signature(secret, str(now), body + b" ", good, now=now)
    assert not verify_signature(b"other", str(now), body, good, now=now)
    # Stale and future timestamps beyond the tolerance.
    assert not verify_signature(secret, str(now), body, good, now=now + 301)
    assert not verify_signature(secret, str(now), body, good, now=now - 301)
    assert not verify_signature(secret, str(now), body, good, now=now + 10, tolerance=5)
    # The timestamp is part of what is signed.
    assert not verify_signature(secret, str(now + 1), body, good, now=now)
    # Malformed headers.
    for ts, sig in [
        ("", good),
        ("abc", good),
        ("-1", good),
        (f"{now}.0", good),
        (f" {now}", good),
        ("9" * 40, good),
        (str(now), ""),
        (str(now), good[7:]),  # no "sha256=" prefix
        (str(now), "sha1=" + good[7:]),
        (str(now), good.upper()),
        (str(now), good[:-1]),
        (str(now), good + "0"),
        (str(now), good + "\n"),
        (str(now), "sha256=" + "zz" * 32),
    ]:
        assert not verify_signature(secret, ts, body, sig, now=now), (ts, sig)


def test_config_validation() -> None:
    ok = WebhookConfig(
        type="webhook", name="hook", url="https://x.example/{agent_id}", secret=SecretStr("s")
    )
    assert ok.timeout == 10 and ok.secret.get_secret_value() == "s" and "'s'" not in repr(ok)
    for bad in (
        {"url": "ftp://x.example/"},
        {"url": "not a url"},
        {"url": "http:///nohost"},
        {"url": "http://x.example:99999/"},
        {"url": "https://user:pw@x.example/"},
        {"secret": ""},
        {"timeout": 0},
        {"headers": {"X-Omnirouter-Signature": "forged"}},
        {"headers": {"Content-Type": "text/plain"}},
        {"headers": {"Bad Header": "x"}},
        {"headers": {"X-Ok": "a\r\nInjected: 1"}},
        {"colour": "blue"},
    ):
        settings: dict[str, Any] = {"url": "https://x.example/", "secret": "s", **bad}
        with pytest.raises(ValueError):
            WebhookConfig(type="webhook", name="hook", **settings)
    with pytest.raises(ValueError):
        WebhookConfig(type="webhook", name="hook", url="https://x.example/")  # type: ignore[call-arg]
    assert load_driver(ADAPTERS, "webhook") is WebhookTool


def test_safe_url_strips_credentials_and_query() -> None:
    assert safe_url("https://u:p@h.example:8443/a/b?token=t#f") == "https://h.example:8443"
    assert safe_url("http://[::1]:80/x") == "http://[::1]:80"
