"""The web channel's browser side, served for real on loopback: widget WebSocket, the
widget log behind `send()`, the contact form, the status page, origins and limits.

The browser itself is driven in tests/test_widget_browser.py; here an aiohttp client
speaks the same protocol, so every rule is checked without Chromium.
"""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from channels.web import WebChannel, WebConfig
from channels.web_guard import PAGE_CSP, TokenBuckets, WebStats
from channels.web_outbox import LogClosed, WidgetLog, thread_id
from channels.web_widget import _Socket
from router.delivery import AckPayload, Outbound, ReplyPayload
from router.drivers import DriverContext, DriverState
from router.metrics import Metrics
from router.tickets import Tickets
from tests.test_channel_web import FakePipeline, serve

HOSTILE = '<script>alert("x")</script><img src=x onerror="alert(1)">'
SITE = "http://shop.example"


def tokens() -> Tickets:
    """Return a token service with a fixed secret (the store is not needed for tokens)."""
    service = Tickets(store=None)  # type: ignore[arg-type]
    service._secret = b"installation-secret"
    return service


@pytest.fixture
async def widget(tmp_path: Path) -> AsyncIterator[tuple[WebChannel, str, FakePipeline]]:
    """Serve a web channel with the widget, tokens and an allowed site origin."""
    pipeline = FakePipeline()
    async with serve(pipeline, tmp_path, conversations=tokens(), allowed_origins=[SITE]) as (
        channel,
        url,
    ):
        yield channel, url, pipeline


def ws_url(url: str, handle: str = "web-visitor-1", **query: Any) -> str:
    """Return the widget WebSocket URL for a handle (and a token, since)."""
    params = "&".join(f"{k}={v}" for k, v in {"handle": handle, **query}.items())
    return f"{url.replace('http', 'ws', 1)}/v1/widget/ws?{params}"


async def frame(ws: aiohttp.ClientWebSocketResponse, kind: str | None = None) -> dict[str, Any]:
    """Return the next frame (of the given type, skipping others)."""
    while True:
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        body: dict[str, Any] = json.loads(msg.data)
        if kind is None or body["type"] == kind:
            return body


def outbound(
    kind: str, handle: str, hint: str, conversation: str, text: str = "", oid: str = ""
) -> Outbound:
    """Return an acknowledgement or a reply for a widget's conversation."""
    if kind == "ack":
        respond_by = (datetime.now(UTC) + timedelta(minutes=30)).isoformat()
        payload: Any = AckPayload(conversation, "", respond_by, "en", conversation_hint=hint)
    else:
        payload = ReplyPayload(conversation, "", text, "en", conversation_hint=hint)
    return Outbound(oid or f"out-{kind}-{text}", "site", handle, payload)


async def start_conversation(
    session: aiohttp.ClientSession, url: str, pipeline: FakePipeline, text: str = "Hello"
) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any], str]:
    """Open a widget, send its first message; return the socket, the answer and the hint."""
    ws = await session.ws_connect(ws_url(url), headers={"Origin": SITE})
    ready = await frame(ws, "ready")
    assert ready["conversation"] is None and ready["seq"] == 0
    await ws.send_json({"type": "message", "id": "m-1", "text": text})
    accepted = await frame(ws, "accepted")
    return ws, accepted, pipeline.stored[-1].conversation_hint


# -- send(): the widget log and live pushes ------------------------------------------------


async def test_the_channel_answers_customers_and_keeps_each_send_once(tmp_path: Path) -> None:
    ctx = DriverContext(state_dir=tmp_path, log=structlog.get_logger())
    channel = WebChannel("site", WebConfig(type="web", name="site"), ctx)
    assert WebChannel.answers_customers
    ack = outbound("ack", "h1", "n1", "C1")
    await channel.send(ack)
    await channel.send(ack)  # the outbox retried: stored once
    await channel.send(outbound("reply", "h1", "n1", "C1", "It ships today."))
    rows = await channel.log_db.since(thread_id("h1", "n1"), 0)
    assert [r.kind for r in rows] == ["ack", "reply"]
    assert rows[0].fields["minutes"] in (29, 30) and rows[0].fields["ticket"] == ack.ticket
    assert rows[1].fields["text"] == "It ships today."
    await channel.stop()
    assert (tmp_path / "web" / "site" / "outbox.db").exists()
    # A stopped channel's send is a transient failure: the outbox retries on the next one.
    with pytest.raises(Exception, match="stopped"):
        await channel.send(outbound("reply", "h1", "n1", "C1", "again"))
    reopened = WidgetLog(tmp_path / "web" / "site" / "outbox.db")
    assert len(await reopened.since(thread_id("h1", "n1"), 0)) == 2  # durable
    await reopened.close()


async def test_the_log_writes_concurrent_sends_in_group_commits(tmp_path: Path) -> None:
    """Rows added at once share transactions; each is stored once with its own sequence."""
    db = WidgetLog(tmp_path / "outbox.db")
    keys = [f"out-{i}" for i in range(200)]
    wave = [db.add(f"t{i % 7}", key, "ack", {"n": i}) for i, key in enumerate(keys + keys[:20])]
    early = asyncio.gather(*wave[:100])
    await asyncio.sleep(0.01)  # the first rows are being written while the rest arrive
    added = [*await early, *await asyncio.gather(*wave[100:])]
    assert 1 < db.commits < 10  # a few batches, not a transaction per row
    first, again = added[:200], added[200:]
    assert all(new for _, new in first) and not any(new for _, new in again)
    assert [e.seq for e, _ in again] == [e.seq for e, _ in first[:20]]
    assert len({e.seq for e, _ in first}) == 200
    rows = await db.since("t3", 0)
    assert [r.fields["n"] for r in rows] == [i for i in range(200) if i % 7 == 3]
    await db.close()


async def test_a_row_that_fails_in_a_batch_fails_alone(tmp_path: Path) -> None:
    db = WidgetLog(tmp_path / "outbox.db")
    await db.add("t", "warm", "ack", {})  # opens the file: the rows below go together
    bad = db.add("t", "bad", "ack", {}, at=object())  # type: ignore[arg-type]  # cannot bind
    results = await asyncio.gather(
        db.add("t", "a", "ack", {}), bad, db.add("t", "b", "ack", {}), return_exceptions=True
    )
    assert isinstance(results[1], sqlite3.ProgrammingError)
    assert [r.fields for r in await db.since("t", 0)] == [{}, {}, {}]
    # Rows added before close() are written; after it, refused.
    pending = asyncio.ensure_future(db.add("t", "c", "ack", {}))
    await asyncio.sleep(0)  # added, not yet written
    await db.close()
    entry, new = await pending
    assert new and entry.seq == 4  # after warm, a and b
    with pytest.raises(LogClosed):
        await db.add("t", "late", "ack", {})


async def test_a_widget_message_is_committed_and_replies_are_pushed_live(widget: Any) -> None:
    channel, url, pipeline = widget
    async with aiohttp.ClientSession() as session:
        ws, accepted, hint = await start_conversation(session, url, pipeline, HOSTILE)
        assert accepted["id"] == "m-1" and accepted["ticket"].startswith("T-")
        token = accepted["conversation"]
        assert token and accepted["status_url"].startswith("/status?ticket=")
        # The customer's text reaches the sink as written: text, never markup or escapes.
        assert pipeline.stored[0].text == HOSTILE
        assert pipeline.stored[0].contact_handle == "web-visitor-1"
        # A new conversation's first frames: what the log holds so far (its first message).
        [mine] = (await frame(ws, "history"))["messages"]
        assert (mine["kind"], mine["text"], mine["id"]) == ("customer", HOSTILE, "m-1")
        conversation = pipeline.stored[0].external_id
        await channel.send(outbound("ack", "web-visitor-1", hint, conversation))
        ack = await frame(ws, "message")
        assert ack["kind"] == "ack" and ack["minutes"] in (29, 30)
        await channel.send(outbound("reply", "web-visitor-1", hint, conversation, HOSTILE))
        reply = await frame(ws, "message")
        assert (reply["kind"], reply["text"]) == ("reply", HOSTILE)
        assert mine["seq"] < ack["seq"] < reply["seq"]
        # A resend of the same id (the widget reconnected before the answer) is a no-op.
        await ws.send_json({"type": "message", "id": "m-1", "text": HOSTILE})
        again = await frame(ws, "accepted")
        assert again["duplicate"] is True and len(pipeline.stored) == 1
        await ws.close()
        # Missed while away: a reconnect with since=<last seq> gets exactly that.
        await channel.send(outbound("reply", "web-visitor-1", hint, conversation, "Missed?"))
        ws = await session.ws_connect(
            ws_url(url, conversation=token, since=reply["seq"]), headers={"Origin": SITE}
        )
        history = await frame(ws, "history")
        assert [m["text"] for m in history["messages"]] == ["Missed?"]
        assert (await frame(ws, "ready"))["seq"] == history["messages"][-1]["seq"]
        # From the start: the whole conversation, in order.
        full = await session.ws_connect(ws_url(url, conversation=token), headers={"Origin": SITE})
        kinds = [m["kind"] for m in (await frame(full, "history"))["messages"]]
        assert kinds == ["customer", "ack", "reply", "reply"]
        # A second message continues the same conversation (the token is the proof).
        await full.send_json({"type": "message", "id": "m-2", "text": "Thanks"})
        await frame(full, "accepted")
        assert pipeline.stored[1].conversation_hint == hint
        assert (await frame(ws, "message"))["text"] == "Thanks"  # the other tab sees it
        await ws.close()
        await full.close()
    assert channel.details()["websockets"] == 0


async def test_another_contacts_token_is_refused_and_reveals_nothing(widget: Any) -> None:
    channel, url, pipeline = widget
    async with aiohttp.ClientSession() as session:
        ws, accepted, _ = await start_conversation(session, url, pipeline)
        await ws.close()
        for handle, token in (("web-someone-else", accepted["conversation"]), ("web-x", "a.b")):
            # Told in a frame (a browser cannot read a refused upgrade's status), then closed.
            refused = await session.ws_connect(
                ws_url(url, handle=handle, conversation=token), headers={"Origin": SITE}
            )
            error = await frame(refused)
            assert (error["type"], error["code"]) == ("error", "invalid_conversation_token")
            assert (await refused.receive()).type == aiohttp.WSMsgType.CLOSE
            assert refused.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
            assert "history" not in error
    assert channel.details()["rejected"]["invalid_conversation_token"] == 2


async def test_invalid_frames_get_error_frames_and_nothing_is_stored(widget: Any) -> None:
    _, url, pipeline = widget
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(ws_url(url), headers={"Origin": SITE})
        await frame(ws, "ready")
        for bad, code in (
            ("not json", "invalid_json"),
            ('{"type": "hello"}', "invalid_frame"),
            ('{"type": "message", "text": "hi"}', "invalid_field"),
            ('{"type": "message", "id": "k", "text": "   "}', "invalid_field"),
            ('{"type": "message", "id": "k", "text": 5}', "invalid_field"),
        ):
            await ws.send_str(bad)
            assert (await frame(ws, "error"))["code"] == code
        await ws.close()
    assert pipeline.stored == []


# -- origins, sizes, rates -----------------------------------------------------------------


async def test_a_disallowed_origin_is_refused_everywhere(widget: Any) -> None:
    channel, url, _ = widget
    evil = {"Origin": "http://evil.example"}
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await session.ws_connect(ws_url(url), headers=evil)
        assert caught.value.status == 403
        body = {"text": "hi", "contact": {"handle": "a@example.com"}}
        async with session.post(url + "/v1/messages", json=body, headers=evil) as resp:
            assert resp.status == 403
            assert (await resp.json())["error"]["code"] == "origin_not_allowed"
        async with session.options(
            url + "/v1/messages", headers={**evil, "Access-Control-Request-Method": "POST"}
        ) as resp:
            assert resp.status == 403 and "Access-Control-Allow-Origin" not in resp.headers
        # The allowed site gets CORS answers; a backend without Origin is unaffected.
        async with session.options(
            url + "/v1/messages", headers={"Origin": SITE, "Access-Control-Request-Method": "POST"}
        ) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == SITE
        async with session.post(url + "/v1/messages", json=body, headers={"Origin": SITE}) as resp:
            assert resp.status == 201 and resp.headers["Access-Control-Allow-Origin"] == SITE
        async with session.post(url + "/v1/messages", json=body) as resp:
            assert resp.status == 201
    assert channel.details()["rejected"]["origin_not_allowed"] == 3


async def test_a_1mb_message_is_rejected_with_a_clear_error(widget: Any) -> None:
    channel, url, pipeline = widget
    big = "x" * (1024 * 1024)
    async with aiohttp.ClientSession() as session:
        body = json.dumps({"text": big, "contact": {"handle": "a@example.com"}}).encode()
        async with session.post(
            url + "/v1/messages",
            data=io.BytesIO(body),
            headers={"Content-Type": "application/json"},
        ) as resp:
            assert resp.status == 413
            error = (await resp.json())["error"]
            assert error["code"] == "payload_too_large"
            assert error["message"] == "the body must be at most 65536 bytes"
        ws = await session.ws_connect(ws_url(url), headers={"Origin": SITE})
        await frame(ws, "ready")
        await ws.send_json({"type": "message", "id": "big", "text": big})
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        # Under the frame limit but over max_text_chars: an error frame naming the field.
        ws = await session.ws_connect(ws_url(url), headers={"Origin": SITE})
        await frame(ws, "ready")
        await ws.send_json({"type": "message", "id": "long", "text": "y" * 10_001})
        error = await frame(ws, "error")
        assert (error["code"], error["field"], error["id"]) == ("too_long", "text", "long")
        await ws.close()
    assert pipeline.stored == []
    assert channel.details()["rejected"]["payload_too_large"] >= 1


async def test_a_burst_from_one_ip_is_limited_while_another_ip_gets_through(
    tmp_path: Path,
) -> None:
    pipeline = FakePipeline()
    async with (
        serve(pipeline, tmp_path, rate_limit_exempt=[], ip_rate=1.0, ip_burst=20) as (channel, url),
        aiohttp.ClientSession() as session,
    ):
        body = {"text": "spam", "contact": {"handle": "a@example.com"}}

        async def one(i: int) -> tuple[int, str | None]:
            async with session.post(url + "/v1/messages", json=body) as resp:
                await resp.read()
                return resp.status, resp.headers.get("Retry-After")

        answers = await asyncio.gather(*(one(i) for i in range(500)))
        statuses = [s for s, _ in answers]
        assert statuses.count(201) <= 22  # the burst (and a token or two refilled)
        assert statuses.count(429) >= 478
        assert all(r is not None and int(r) >= 1 for s, r in answers if s == 429)
        # Another address is not held back by the first one's flood.
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with (
            aiohttp.ClientSession(connector=connector) as other,
            other.post(url + "/v1/messages", json=body) as resp,
        ):
            assert resp.status == 201
        assert channel.details()["rejected"]["rate_limited"] == statuses.count(429)


async def test_a_conversation_is_limited_on_its_own(tmp_path: Path) -> None:
    pipeline = FakePipeline()
    async with (
        serve(
            pipeline,
            tmp_path,
            conversations=tokens(),
            rate_limit_exempt=[],
            ip_rate=100,
            ip_burst=100,
            conversation_rate=0.01,
            conversation_burst=3,
            allowed_origins=[SITE],
        ) as (_, url),
        aiohttp.ClientSession() as session,
    ):
        ws, _, _ = await start_conversation(session, url, pipeline)
        codes = []
        for i in range(6):
            await ws.send_json({"type": "message", "id": f"n-{i}", "text": f"again {i}"})
            reply = await frame(ws)
            while reply["type"] == "message" or reply["type"] == "history":
                reply = await frame(ws)
            codes.append(reply.get("code", reply["type"]))
        assert codes[:3] == ["accepted"] * 3 and codes[3:] == ["rate_limited"] * 3
        # A fresh conversation from the same address still goes through.
        other, accepted, _ = await start_conversation(session, url, pipeline)
        assert accepted["type"] == "accepted"
        await ws.close()
        await other.close()


def test_token_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate=2.0, burst=3, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)
    assert buckets.take("b") == 0.0  # keys are independent
    now[0] = 1.0
    assert buckets.take("a") == 0.0
    assert TokenBuckets(rate=0, burst=1).take("x") == 0.0  # rate 0: no limit
    few = TokenBuckets(rate=1, burst=1, max_keys=2)
    for key in "abc":
        few.take(key)
    assert len(few._buckets) == 2  # memory bounded under an address flood


async def test_a_slow_reader_is_disconnected_not_buffered() -> None:
    closed: list[int] = []

    class StubWs:
        async def close(self, code: int, message: bytes) -> None:
            closed.append(code)

    sock = _Socket(StubWs(), "h", "", limit=2)  # type: ignore[arg-type]
    assert sock.offer({"type": "message", "seq": 1})
    assert sock.offer({"type": "message", "seq": 2})
    assert not sock.offer({"type": "message", "seq": 3})
    assert sock.cut is not None
    await sock.cut
    assert closed == [aiohttp.WSCloseCode.TRY_AGAIN_LATER] and sock.queue.qsize() == 2


# -- static files and pages ------------------------------------------------------------------


async def test_widget_assets_are_served_with_type_and_cache_headers(widget: Any) -> None:
    _, url, _ = widget
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/widget.js") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/javascript; charset=utf-8"
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            assert resp.headers["Cache-Control"] == "public, max-age=300"
            etag = resp.headers["ETag"]
            source = await resp.text()
        assert "innerHTML" not in source and "attachShadow" in source
        async with session.get(url + "/widget.js", headers={"If-None-Match": etag}) as resp:
            assert resp.status == 304
        async with session.get(url + "/widget.css") as resp:
            assert resp.headers["Content-Type"] == "text/css; charset=utf-8"
        for path in ("/static/contact.html", "/static/nope.js", "/static/../web.py"):
            async with session.get(url + path) as resp:
                assert resp.status == 404


async def test_pages_have_a_csp_and_the_status_page_holds_no_data(widget: Any) -> None:
    _, url, _ = widget
    async with aiohttp.ClientSession() as session:
        for path in ("/contact", "/status?ticket=T-1"):
            async with session.get(url + path) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Security-Policy"] == PAGE_CSP
                assert "'unsafe-inline'" not in PAGE_CSP
                assert resp.headers["X-Frame-Options"] == "DENY"
                assert resp.headers["Referrer-Policy"] == "no-referrer"
                page = await resp.text()
                assert "<script>" not in page  # no inline script: only src= files
        assert "T-1" not in page


async def test_widget_can_be_turned_off(tmp_path: Path) -> None:
    async with (
        serve(FakePipeline(), tmp_path, widget=False) as (_, url),
        aiohttp.ClientSession() as session,
    ):
        for path in ("/widget.js", "/contact", "/v1/widget/ws"):
            async with session.get(url + path) as resp:
                assert resp.status == 404


# -- the contact form ------------------------------------------------------------------------


async def contact_form(session: aiohttp.ClientSession, url: str) -> tuple[str, dict[str, str]]:
    """GET /contact; return the CSRF token on the page and the headers a post needs."""
    async with session.get(url + "/contact") as resp:
        page = await resp.text()
        assert "SameSite=Strict" in resp.headers["Set-Cookie"]
        assert "HttpOnly" in resp.headers["Set-Cookie"]
    token = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    return token, {"Origin": url}


def form_data(csrf: str, **fields: Any) -> aiohttp.FormData:
    """Return a multipart contact form."""
    data = aiohttp.FormData(default_to_multipart=True)
    values = {"name": "Dana", "contact": "dana@example.com", "message": "Refund please", **fields}
    if csrf:
        data.add_field("csrf", csrf)
    for key, value in values.items():
        if key == "attachment":
            name, mime, body = value
            data.add_field("attachment", io.BytesIO(body), filename=name, content_type=mime)
        else:
            data.add_field(key, value)
    return data


async def test_the_contact_form_answers_a_ticket_and_a_status_link(widget: Any) -> None:
    channel, url, pipeline = widget
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 100
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        csrf, headers = await contact_form(session, url)
        data = form_data(csrf, attachment=("../../etc/receipt.png", "image/png", png))
        async with session.post(url + "/v1/contact", data=data, headers=headers) as resp:
            assert resp.status == 201, await resp.text()
            answer = await resp.json()
        assert answer["ticket"].startswith("T-")
        assert answer["status_url"] == (
            f"/status?ticket={answer['ticket']}#token={answer['status_token']}"
        )
        [stored] = pipeline.stored
        assert (stored.contact_handle, stored.contact_name) == ("dana@example.com", "Dana")
        [attachment] = stored.attachments
        assert attachment.name == "receipt.png" and attachment.size == len(png)
        assert attachment.storage_ref.startswith("file:" + str(channel.ctx.state_dir))
        # The status link's token reads the ticket (through the API the page calls).
        async with session.get(
            url + "/v1/tickets/" + answer["ticket"],
            headers={"Authorization": "Bearer " + answer["status_token"]},
        ) as resp:
            assert resp.status == 200


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"csrf": ""}, 403, "csrf_failed"),
        ({"csrf": "forged-token-forged-token-forged-token"}, 403, "csrf_failed"),
        ({"origin": "http://evil.example"}, 403, "origin_not_allowed"),
        ({"contact": "not an address"}, 400, "invalid_field"),
        ({"message": "   "}, 400, "invalid_field"),
        ({"attachment": ("a.exe", "application/x-msdownload", b"MZ")}, 415, "attachment_type"),
        ({"attachment": ("a.png", "image/png", b"GIF89a")}, 415, "attachment_type"),
        ({"attachment": ("a.txt", "text/plain", b"x" * 1_050_000)}, 413, "attachment_too_large"),
    ],
)
async def test_the_contact_form_refuses_bad_posts(
    tmp_path: Path, change: dict[str, Any], status: int, code: str
) -> None:
    pipeline = FakePipeline()
    async with (
        serve(pipeline, tmp_path, max_attachment_bytes=1_000_000) as (_, url),
        aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session,
    ):
        csrf, headers = await contact_form(session, url)
        if "origin" in change:
            headers = {"Origin": change.pop("origin")}
        data = form_data(change.pop("csrf", csrf), **change)
        async with session.post(url + "/v1/contact", data=data, headers=headers) as resp:
            assert resp.status == status, await resp.text()
            assert (await resp.json())["error"]["code"] == code
    assert pipeline.stored == []


# -- metrics ---------------------------------------------------------------------------------


def test_web_stats_feed_prometheus_and_readyz() -> None:
    metrics = Metrics()
    stats = WebStats("site", metrics)
    stats.connected(1)
    stats.message_in()
    stats.message_out()
    stats.reject("rate_limited")
    text = metrics.render().decode()
    assert 'omnirouter_web_websockets{channel="site"} 1.0' in text
    assert 'omnirouter_web_messages_total{channel="site",direction="in"} 1.0' in text
    assert 'omnirouter_web_rejected_total{channel="site",reason="rate_limited"} 1.0' in text
    details = stats.details()
    assert details["websockets"] == 1 and details["messages_this_minute"] == 2
    assert details["rejected"] == {"rate_limited": 1}


async def test_stop_closes_widgets_as_going_away(tmp_path: Path) -> None:
    pipeline = FakePipeline()
    async with serve(pipeline, tmp_path) as (channel, url), aiohttp.ClientSession() as session:
        ws = await session.ws_connect(ws_url(url))
        await frame(ws, "ready")
        receiving = asyncio.create_task(ws.receive())
        await channel.stop()
        msg = await asyncio.wait_for(receiving, 5)
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == aiohttp.WSCloseCode.GOING_AWAY
        assert channel.state == DriverState.STOPPED
