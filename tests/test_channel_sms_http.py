"""The generic HTTP SMS channel: for real against Kannel, and its options against small servers.

Kannel (bearerbox + smsbox + the fake SMSC, tests/peers_sms.py) calls the channel's
webhook through smsbox's get-url for each text the test injects at the fake SMSC, and
the channel's sends go through Kannel's sendsms interface back to the fake SMSC, where
the test reads them (Chinese arrives as UCS-2).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from pydantic import ValidationError

from channels.sms import HttpSmsChannel, HttpSmsConfig
from router.delivery import Outbound, ReplyPayload
from router.drivers import (
    AuthFailed,
    DriverContext,
    DriverState,
    PermanentError,
    RateLimited,
    TransientError,
)
from tests.peers import free_port
from tests.peers_sms import Kannel, needs_kannel
from tests.test_channel_web import FakePipeline

SECRET = "kannel-webhook-secret-42"
CUSTOMER = "+4915100000001"


def _settings(port: int, outbound_url: str, **overrides: Any) -> dict[str, Any]:
    inbound = {"auth": "secret", "secret": SECRET, **overrides.pop("inbound", {})}
    outbound = {"url": outbound_url, **overrides.pop("outbound", {})}
    return {
        "type": "sms_http",
        "name": "kannel",
        "port": port,
        "default_region": "DE",
        "inbound": inbound,
        "outbound": outbound,
        **overrides,
    }


@asynccontextmanager
async def serve(
    tmp_path: Path, pipeline: FakePipeline, settings: dict[str, Any]
) -> AsyncIterator[HttpSmsChannel]:
    """Run an sms_http channel on loopback; yield it."""
    ctx = DriverContext(state_dir=tmp_path, log=structlog.get_logger().bind(channel="kannel"))
    channel = HttpSmsChannel("kannel", HttpSmsConfig(**settings), ctx)
    task = asyncio.create_task(channel.run(pipeline.sink))
    await asyncio.wait_for(channel.started.wait(), 5)
    try:
        yield channel
    finally:
        await channel.stop()
        await task


def _reply(text: str, to: str = CUSTOMER, oid: str = "out-1") -> Outbound:
    payload = ReplyPayload(conversation_id="01JCONV", subject="", text=text, language="")
    return Outbound(id=oid, channel="kannel", to=to, payload=payload)


async def _until(check: Any, within: float = 10.0) -> None:
    for _ in range(int(within / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {within}s")


# -- Kannel, for real -----------------------------------------------------------------------


@pytest.fixture
def kannel_port() -> int:
    """Return the port the channel will listen on (Kannel's get-url points there)."""
    return free_port()


@pytest.fixture
def kannel(kannel_port: int) -> Iterator[Kannel]:
    """Yield a running private Kannel calling the channel at kannel_port."""
    k = Kannel(f"http://127.0.0.1:{kannel_port}/sms?secret={SECRET}").start()
    try:
        yield k
    finally:
        k.stop()


@needs_kannel
async def test_kannel_texts_reach_the_channel_and_replies_reach_the_smsc(
    tmp_path: Path, kannel: Kannel, kannel_port: int
) -> None:
    pipeline = FakePipeline()
    settings = _settings(
        kannel_port,
        kannel.sendsms_url,
        outbound={
            "username": Kannel.SENDSMS_USER,
            "password": Kannel.SENDSMS_PASSWORD,
            "from_number": "12345",
            "success_status": [202],
            "success_regex": "^(0: Accepted|3: Queued)",
        },
    )
    async with serve(tmp_path, pipeline, settings) as channel:
        await asyncio.to_thread(kannel.inject, CUSTOMER, "Hello, my parcel 4711 is late")
        await asyncio.to_thread(kannel.inject, "015100000002", "你好，我的订单还没到")
        await _until(lambda: len(pipeline.stored) == 2)
        first, second = sorted(pipeline.stored, key=lambda m: m.contact_handle)
        assert (first.contact_handle, first.text) == (CUSTOMER, "Hello, my parcel 4711 is late")
        assert first.channel_type == "sms" and len(first.external_id) == 36  # Kannel's %I
        assert (second.contact_handle, second.text) == ("+4915100000002", "你好，我的订单还没到")
        # The webhook carries the shared secret: Kannel vouches for the sender.
        assert first.identifiers == (f"phone:{CUSTOMER}",)
        assert SECRET.encode() not in first.raw

        # Replies leave through sendsms and arrive at the fake SMSC, Chinese as UCS-2.
        await channel.send(_reply("Your parcel left today.", oid="r-en"))
        assert await asyncio.to_thread(kannel.received) == (
            "12345",
            CUSTOMER,
            "Your parcel left today.",
        )
        await channel.send(_reply("您好，您的包裹今天已发出。", to="+4915100000002", oid="r-zh"))
        assert await asyncio.to_thread(kannel.received) == (
            "12345",
            "+4915100000002",
            "您好，您的包裹今天已发出。",
        )
        assert channel.store.status_of("r-en") == ("", "accepted", "")

        # The same callback again (same %I id): stored once.
        query = urllib.parse.urlencode(
            {"secret": SECRET, "from": CUSTOMER, "text": first.text, "id": first.external_id}
        )
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{kannel_port}/sms?{query}") as resp:
                assert resp.status == 200
        assert len(pipeline.stored) == 2 and channel.counts["duplicate"] == 1

    # Wrong sendsms credentials: Kannel answers 403, the channel parks as bad_credentials.
    settings["outbound"]["password"] = "wrong-password"
    async with serve(tmp_path / "b", pipeline, settings) as channel:
        with pytest.raises(AuthFailed, match="403"):
            await channel.send(_reply("hello", oid="r-auth"))
        assert channel.state == DriverState.BAD_CREDENTIALS


# -- inbound options ------------------------------------------------------------------------


async def _call(
    port: int,
    method: str,
    path: str = "/sms",
    *,
    query: dict[str, str] | str | None = None,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, str]:
    q = query if isinstance(query, str) else urllib.parse.urlencode(query or {})
    url = f"http://127.0.0.1:{port}{path}" + (f"?{q}" if q else "")
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, data=body, headers=headers) as resp:
            return resp.status, await resp.text()


async def test_inbound_secret_fields_charsets_and_bad_input(tmp_path: Path) -> None:
    pipeline = FakePipeline()
    port = free_port()
    settings = _settings(port, "http://127.0.0.1:9/send", max_body_bytes=2048)
    async with serve(tmp_path, pipeline, settings) as channel:
        ok = {"secret": SECRET, "from": CUSTOMER, "to": "12345", "text": "hi", "id": "m1"}
        assert await _call(port, "GET", query=ok) == (200, "")
        form = urllib.parse.urlencode({**ok, "id": "m2", "text": "über"}).encode()
        ctype = {"Content-Type": "application/x-www-form-urlencoded"}
        assert (await _call(port, "POST", body=form, headers=ctype))[0] == 200
        # A charset field: UTF-16BE bytes decoded as such (Kannel's %C).
        utf16 = urllib.parse.quote("你好".encode("utf-16-be"))
        q = f"secret={SECRET}&from=%2B4915100000001&text={utf16}&charset=UTF-16BE&id=m3"
        assert (await _call(port, "GET", query=q))[0] == 200
        # JSON bodies, with numbers as numbers.
        doc = {"from": CUSTOMER, "text": "json ok", "id": 4, "secret": SECRET}
        jtype = {"Content-Type": "application/json"}
        assert (await _call(port, "POST", body=json.dumps(doc).encode(), headers=jtype))[0] == 200
        assert [m.text for m in pipeline.stored] == ["hi", "über", "你好", "json ok"]
        assert {m.contact_handle for m in pipeline.stored} == {CUSTOMER}

        bad: list[tuple[int, dict[str, Any]]] = [
            (403, {"query": {**ok, "secret": "wrong", "id": "x1"}}),
            (403, {"query": {k: v for k, v in ok.items() if k != "secret"}}),
            (400, {"query": {**ok, "from": "nobody", "id": "x2"}}),
            (400, {"query": {k: v for k, v in ok.items() if k != "from"}}),
            (400, {"query": {k: v for k, v in ok.items() if k != "id"}}),
            (400, {"query": {**ok, "text": "  ", "id": "x3"}}),
            (400, {"query": f"secret={SECRET}&from=%2B4915100000001&text=%FF%FE&id=x4"}),
            (400, {"query": f"secret={SECRET}&from=1&from=2&text=a&id=x5"}),
            (400, {"query": "a=1&&&"}),
            (413, {"body": b"x" * 4000, "headers": ctype}),
            (415, {"body": b"<xml/>", "headers": {"Content-Type": "text/xml"}}),
            (400, {"body": b"\xff\xfe", "headers": jtype}),
            (400, {"body": b"[1, 2]", "headers": jtype}),
        ]
        for expected, options in bad:
            method = "POST" if "body" in options else "GET"
            status, text = await _call(port, method, **options)
            assert status == expected, (options, text)
        assert (await _call(port, "DELETE", query=ok))[0] == 405
        assert (await _call(port, "GET", "/other", query=ok))[0] == 404
        assert len(pipeline.stored) == 4 and channel.counts["bad_secret"] == 2


async def test_an_unauthenticated_gateway_vouches_for_no_sender(tmp_path: Path) -> None:
    """auth = "none" (loopback only): the number is a claim, it links no contacts."""
    pipeline = FakePipeline()
    port = free_port()
    settings = _settings(
        port,
        "http://127.0.0.1:9/send",
        inbound={"auth": "none", "method": "POST", "id_field": "", "text_field": "content"},
    )
    async with serve(tmp_path, pipeline, settings):
        body = json.dumps({"from": CUSTOMER, "content": "unsigned"}).encode()
        status, _ = await _call(
            port, "POST", body=body, headers={"Content-Type": "application/json"}
        )
        assert status == 200
        [message] = pipeline.stored
        assert message.contact_handle == CUSTOMER and message.identifiers == ()


async def test_inbound_hmac_and_no_id_field(tmp_path: Path) -> None:
    pipeline = FakePipeline()
    port = free_port()
    settings = _settings(
        port,
        "http://127.0.0.1:9/send",
        inbound={"auth": "hmac", "method": "POST", "id_field": "", "text_field": "content"},
    )
    async with serve(tmp_path, pipeline, settings):
        body = json.dumps({"from": CUSTOMER, "content": "signed"}).encode()
        mac = hmac.new(SECRET.encode(), body, hashlib.sha256)
        jtype = {"Content-Type": "application/json"}
        for header in (
            mac.hexdigest(),
            "sha256=" + mac.hexdigest(),
            base64.b64encode(mac.digest()).decode(),
        ):
            status, _ = await _call(
                port, "POST", body=body, headers={**jtype, "X-Signature": header}
            )
            assert status == 200
        # No id field: each request is a message of its own.
        assert [m.text for m in pipeline.stored] == ["signed"] * 3
        assert len({m.external_id for m in pipeline.stored}) == 3
        for header in ("", "00" * 32, mac.hexdigest()[:-1] + "0"):
            status, _ = await _call(
                port, "POST", body=body, headers={**jtype, "X-Signature": header}
            )
            assert status == 403
        assert (await _call(port, "GET", query={"from": CUSTOMER, "content": "x"}))[0] == 405
        assert len(pipeline.stored) == 3


def test_config_is_checked() -> None:
    good = _settings(8093, "https://sms.example.com/send?to={to}&text={text}")
    assert HttpSmsConfig(**good).inbound.auth == "secret"
    bad = [
        ({"inbound": {"secret": "short"}}, "at least 16"),
        ({"inbound": {"auth": "none"}, "host": "0.0.0.0"}, "loopback"),
        ({"outbound": {"url": "https://x.example.com/?t={txt}"}}, "not allowed"),
        ({"outbound": {"url": "https://x.example.com/?t={text.upper}"}}, "not allowed"),
        ({"outbound": {"url": "ftp://x.example.com/{text}"}}, "http"),
        ({"outbound": {"body": "{text!r}"}}, "not allowed"),
        ({"outbound": {"success_regex": "("}}, "regular expression"),
        ({"outbound": {"headers": {"X-Key": "a\nb"}}}, "line breaks"),
        ({"inbound": {"path": "no-slash"}}, "path"),
    ]
    for overrides, match in bad:
        settings = _settings(8093, "https://sms.example.com/send?to={to}&text={text}")
        for key, value in overrides.items():
            if isinstance(value, dict):
                settings[key] = {**settings[key], **value}
            else:
                settings[key] = value
        with pytest.raises(ValidationError, match=match):
            HttpSmsConfig(**settings)


# -- outbound options ------------------------------------------------------------------------


@pytest.fixture
async def gateway() -> AsyncIterator[
    tuple[str, list[dict[str, Any]], list[tuple[int, str, dict[str, str]]]]
]:
    """Yield (base URL, requests seen, answers to give) of a small gateway API."""
    seen: list[dict[str, Any]] = []
    answers: list[tuple[int, str, dict[str, str]]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(
            {
                "method": request.method,
                "query": dict(request.query),
                "body": await request.text(),
                "headers": dict(request.headers),
            }
        )
        status, text, headers = (
            answers.pop(0) if answers else (200, '{"result": "ok", "msgid": "g-1"}', {})
        )
        return web.Response(status=status, text=text, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", seen, answers
    finally:
        await runner.cleanup()


async def test_outbound_templates_success_and_errors(
    tmp_path: Path, gateway: tuple[str, list[dict[str, Any]], list[tuple[int, str, dict[str, str]]]]
) -> None:
    base, seen, answers = gateway
    settings = _settings(
        free_port(),
        base + "/v1/sms?to={to_digits}&ref={id}",
        outbound={
            "method": "POST",
            "body": '{{"to": "{to}", "text": "{text}", "coding": {coding}}}',
            "body_format": "json",
            "headers": {"X-Api-Key": "api-key-123"},
            "username": "acct",
            "password": "pw-456",
            "basic_auth": True,
            "success_regex": '"result": "ok"',
        },
        max_segments=1,
    )
    async with serve(tmp_path, FakePipeline(), settings) as channel:
        await channel.send(_reply('He said "hi" \\ 你好', oid="o-1"))
        (request,) = seen
        assert request["query"] == {"to": "4915100000001", "ref": "o-1"}
        assert json.loads(request["body"]) == {
            "to": CUSTOMER,
            "text": 'He said "hi" \\ 你好',
            "coding": 2,
        }
        assert request["headers"]["X-Api-Key"] == "api-key-123"
        assert request["headers"]["Authorization"] == aiohttp.encode_basic_auth("acct", "pw-456")
        # Longer than the cap (1 segment): cut with a notice.
        await channel.send(_reply("x " * 200, oid="o-2"))
        assert len(json.loads(seen[-1]["body"])["text"]) <= 160
        cases: list[tuple[tuple[int, str, dict[str, str]], type[Exception], str]] = [
            ((200, '{"result": "fail"}', {}), PermanentError, "success_regex"),
            ((429, "slow down", {"Retry-After": "3"}), RateLimited, "429"),
            ((503, "busy", {}), TransientError, "503"),
            ((400, "bad number", {}), PermanentError, "bad number"),
            ((401, "who?", {}), AuthFailed, "401"),
        ]
        for i, (answer, error, text) in enumerate(cases):
            answers.append(answer)
            with pytest.raises(error, match=text) as info:
                await channel.send(_reply("hello", oid=f"e-{i}"))
            if error is RateLimited:
                assert isinstance(info.value, RateLimited) and info.value.retry_after == 3.0
            if error is PermanentError:
                assert not isinstance(info.value, TransientError)
        # A success after AuthFailed brings the channel back.
        await channel.send(_reply("hello", oid="e-ok"))
        assert channel.state == DriverState.CONNECTED
