"""The web intake channel served for real on loopback, driven by an aiohttp client."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import secrets
import socket
import unicodedata
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDictProxy
from pydantic import ValidationError

from channels.web import WebChannel, WebConfig
from router.config import load_config
from router.drivers import (
    CHANNELS,
    DriverContext,
    DriverState,
    Receipt,
    TicketStatus,
    TransientError,
    load_driver,
)
from router.model import InboundMessage, new_ulid
from router.tickets import Tickets

MESSAGE = {"text": "My parcel has not arrived", "contact": {"handle": "alice@example.com"}}
FORBIDDEN_CHARS = {chr(c) for c in range(32) if chr(c) not in "\t\n"} | {"\x7f"}


class FakePipeline:
    """A sink and ticket lookup that keep the store's contract in memory.

    (channel, external_id) is unique: a repeat with the same payload hash is a
    duplicate, with another hash a conflict; neither is stored twice.
    """

    def __init__(self) -> None:
        """Start empty."""
        self.calls: list[InboundMessage] = []  # every sink call, stored or not
        self.stored: list[InboundMessage] = []
        self.seen: dict[tuple[str, str], tuple[str, Receipt]] = {}
        self.tickets: dict[str, tuple[str, TicketStatus]] = {}
        self.fail_next = 0  # raise on this many next calls, before anything is stored
        self.gate: asyncio.Event | None = None  # when set, calls wait for it
        self.entered = asyncio.Event()

    async def sink(self, message: InboundMessage) -> Receipt:
        """Commit message unless its key was seen; return its receipt."""
        self.calls.append(message)
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("database is locked")
        key = (message.channel, message.external_id)
        if key in self.seen:
            digest, receipt = self.seen[key]
            conflict = digest != message.payload_sha256
            return dataclasses.replace(receipt, duplicate=True, payload_conflict=conflict)
        ticket = "T-" + new_ulid()
        receipt = Receipt(
            message_id=new_ulid(),
            conversation_id=new_ulid(),
            ticket=ticket,
            status_token=secrets.token_urlsafe(16),
            state="queued",
        )
        opened = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
        status = TicketStatus(
            ticket=ticket,
            state="queued",
            label="complaint",
            severity="P2",
            opened_at=opened,
            respond_by=opened + timedelta(hours=4),
            assigned=False,
            messages=1,
        )
        self.seen[key] = (message.payload_sha256, receipt)
        self.tickets[ticket] = (receipt.status_token, status)
        self.stored.append(message)
        return receipt

    async def lookup(self, ticket: str, token: str) -> TicketStatus | None:
        """Return the status if the token matches, else None (unknown and wrong alike)."""
        entry = self.tickets.get(ticket)
        if entry is None or not hmac.compare_digest(entry[0].encode(), token.encode()):
            return None
        return entry[1]


@asynccontextmanager
async def serve(
    pipeline: FakePipeline, tmp_path: Path, conversations: Any = None, **config: Any
) -> AsyncIterator[tuple[WebChannel, str]]:
    """Run a WebChannel on an ephemeral loopback port; yield it and its base URL."""
    settings_: dict[str, Any] = {"type": "web", "name": "site", "port": 0, **config}
    ctx = DriverContext(
        state_dir=tmp_path,
        log=structlog.get_logger().bind(channel="site"),
        tickets=pipeline.lookup,
        conversations=conversations,
    )
    channel = WebChannel("site", WebConfig(**settings_), ctx)
    task = asyncio.create_task(channel.run(pipeline.sink))
    started = asyncio.create_task(channel.started.wait())
    done, _ = await asyncio.wait({task, started}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    if started not in done:
        started.cancel()
        await task  # raises what run() raised
        raise AssertionError("web channel did not start")
    try:
        yield channel, f"http://127.0.0.1:{channel.bound_port}"
    finally:
        await channel.stop()
        await asyncio.wait_for(task, 5)


@pytest.fixture
async def pipeline() -> FakePipeline:
    """Return a fresh in-memory pipeline."""
    return FakePipeline()


@pytest.fixture
async def site(
    pipeline: FakePipeline, tmp_path: Path
) -> AsyncIterator[tuple[WebChannel, str, aiohttp.ClientSession]]:
    """Serve a channel with small limits and yield it, its URL and a client session."""
    async with (
        serve(pipeline, tmp_path, max_body_bytes=4096, max_text_chars=500) as (channel, url),
        aiohttp.ClientSession() as session,
    ):
        yield channel, url, session


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: Any = MESSAGE,
    *,
    key: str | None = None,
    raw: bytes | None = None,
    content_type: str = "application/json",
) -> tuple[int, dict[str, Any], CIMultiDictProxy[str]]:
    """POST a message (JSON-encoded body, or raw bytes); return status, JSON answer, headers."""
    headers = {"Content-Type": content_type}
    if key is not None:
        headers["Idempotency-Key"] = key
    data = raw if raw is not None else json.dumps(body).encode()
    async with session.post(url + "/v1/messages", data=data, headers=headers) as resp:
        assert resp.headers["Content-Type"] == "application/json"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        return resp.status, json.loads(await resp.read()), resp.headers


# -- config and registry --------------------------------------------------------------


def test_registry_loads_the_channel_and_its_config_model() -> None:
    """CHANNELS["web"] resolves to WebChannel, whose model validates with defaults and bounds."""
    cls = load_driver(CHANNELS, "web")
    assert cls is WebChannel
    config = cls.config_model.model_validate({"type": "web", "name": "site"})
    assert (config.host, config.port, config.max_body_bytes) == ("127.0.0.1", 8080, 65536)
    assert (config.max_text_chars, config.max_subject_chars) == (10_000, 300)
    with pytest.raises(ValidationError):
        WebConfig(type="web", name="site", port=70000)
    with pytest.raises(ValidationError):
        WebConfig.model_validate({"type": "web", "name": "site", "colour": "red"})


def test_default_port_is_the_embedded_and_documented_one() -> None:
    """A web channel without `port` listens where the embedded defaults and README say."""
    (embedded,) = [c for c in load_config(None).channels if c.type == "web"]
    bare = WebConfig.model_validate({"type": "web", "name": "site"})
    assert bare.port == embedded.port == 8080


async def test_port_in_use_is_a_transient_error(pipeline: FakePipeline, tmp_path: Path) -> None:
    """A port another socket holds makes run() raise TransientError, state transient."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        ctx = DriverContext(state_dir=tmp_path, log=structlog.get_logger())
        channel = WebChannel("site", WebConfig(type="web", name="site", port=port), ctx)
        with pytest.raises(TransientError, match="cannot listen"):
            await channel.run(pipeline.sink)
        assert channel.state == DriverState.TRANSIENT_DISCONNECT
        assert channel.bound_port is None


# -- POST /v1/messages --------------------------------------------------------------------


async def test_new_message_is_committed_and_answered_201(site: Any, pipeline: FakePipeline) -> None:
    """A valid POST reaches the sink normalised and answers 201 with the receipt."""
    channel, url, session = site
    assert channel.state == DriverState.CONNECTED
    body = {
        "text": "  Where is my parcel?  ",
        "contact": {"handle": "+8613800000000", "name": "Li Lei"},
        "subject": "Order 1234",
        "conversation": "session-42",
        "language": "zh",
    }
    status, answer, headers = await post(session, url, body, key="k-1")
    assert status == 201
    receipt = pipeline.seen[("site", "k-1")][1]
    assert answer == {
        "ticket": receipt.ticket,
        "status_token": receipt.status_token,
        "message_id": receipt.message_id,
        "conversation_id": receipt.conversation_id,
        "state": "queued",
        "status_url": f"/v1/tickets/{receipt.ticket}",
    }
    assert headers["Location"] == answer["status_url"]
    assert headers["Cache-Control"] == "no-store"
    [message] = pipeline.stored
    assert message.channel == "site"
    assert message.channel_type == "web"
    assert message.external_id == "k-1"
    assert message.text == "Where is my parcel?"
    assert (message.contact_handle, message.contact_name) == ("+8613800000000", "Li Lei")
    assert (message.subject, message.conversation_hint, message.language) == (
        "Order 1234",
        "session-42",
        "zh",
    )
    assert message.raw == json.dumps(body).encode()
    assert len(message.payload_sha256) == 64
    assert message.received_at is not None and message.received_at.tzinfo is not None
    assert channel.last_success is not None


async def test_without_key_each_post_is_a_new_message(site: Any, pipeline: FakePipeline) -> None:
    """No Idempotency-Key: external_id is a fresh ULID, so the same body twice is two messages."""
    _, url, session = site
    first = await post(session, url)
    second = await post(session, url)
    assert (first[0], second[0]) == (201, 201)
    assert first[1]["ticket"] != second[1]["ticket"]
    ids = [m.external_id for m in pipeline.stored]
    assert len(set(ids)) == 2 and all(len(i) == 26 for i in ids)
    hints = [m.conversation_hint for m in pipeline.stored]
    assert all(hints) and hints[0] != hints[1]  # each post starts its own thread


async def test_replay_with_same_key_and_payload_is_200_duplicate(
    site: Any, pipeline: FakePipeline
) -> None:
    """The same key and body again answers 200 duplicate with the same ticket; stored once."""
    _, url, session = site
    status, first, _ = await post(session, url, key="order-1234-a")
    assert status == 201
    # Another JSON spelling of the same body (key order, spacing) is the same payload.
    raw = b'{ "contact": {"handle": "alice@example.com"},  "text": "My parcel has not arrived" }'
    status, again, _ = await post(session, url, raw=raw, key="order-1234-a")
    assert status == 200
    assert again == {**first, "duplicate": True}
    assert len(pipeline.stored) == 1
    assert len(pipeline.calls) == 2
    assert pipeline.calls[0].payload_sha256 == pipeline.calls[1].payload_sha256


async def test_same_key_with_different_payload_is_422(site: Any, pipeline: FakePipeline) -> None:
    """Reusing a key for another body is a 422 and nothing new is stored."""
    _, url, session = site
    assert (await post(session, url, key="k-2"))[0] == 201
    other = {**MESSAGE, "text": "A different message"}
    status, answer, _ = await post(session, url, other, key="k-2")
    assert status == 422
    assert answer["error"]["code"] == "idempotency_key_conflict"
    assert answer["error"]["field"] == "Idempotency-Key"
    assert [m.text for m in pipeline.stored] == [MESSAGE["text"]]


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({"contact": {"handle": "a@b.c"}}, "missing_field", "text"),
        ({**MESSAGE, "text": " \n\t "}, "invalid_field", "text"),
        ({**MESSAGE, "text": "\x00\x01 "}, "invalid_field", "text"),
        ({**MESSAGE, "text": 42}, "invalid_field", "text"),
        ({**MESSAGE, "text": None}, "invalid_field", "text"),
        ({**MESSAGE, "text": ["a"]}, "invalid_field", "text"),
        ({"text": "hi"}, "missing_field", "contact"),
        ({**MESSAGE, "contact": "alice@example.com"}, "invalid_field", "contact"),
        ({**MESSAGE, "contact": {}}, "missing_field", "contact.handle"),
        ({**MESSAGE, "contact": {"handle": 7}}, "invalid_field", "contact.handle"),
        ({**MESSAGE, "contact": {"handle": "  "}}, "invalid_field", "contact.handle"),
        ({**MESSAGE, "contact": {"handle": "a\nb"}}, "invalid_field", "contact.handle"),
        ({**MESSAGE, "contact": {"handle": "h" * 201}}, "invalid_field", "contact.handle"),
        ({**MESSAGE, "contact": {"handle": "a", "name": True}}, "invalid_field", "contact.name"),
        ({**MESSAGE, "contact": {"handle": "a", "email": "x"}}, "unknown_field", "contact.email"),
        ({**MESSAGE, "subject": 1}, "invalid_field", "subject"),
        ({**MESSAGE, "conversation": {}}, "invalid_field", "conversation"),
        ({**MESSAGE, "conversation": "c" * 201}, "invalid_field", "conversation"),
        ({**MESSAGE, "language": "fr"}, "invalid_field", "language"),
        ({**MESSAGE, "language": 1}, "invalid_field", "language"),
        ({**MESSAGE, "priority": "urgent"}, "unknown_field", "priority"),
        ([MESSAGE], "invalid_body", None),
        ("text", "invalid_body", None),
    ],
)
async def test_invalid_bodies_are_400_naming_the_field(
    site: Any, pipeline: FakePipeline, body: Any, code: str, field: str | None
) -> None:
    """Each invalid body is a 400 with its code and exact field; the sink is never called."""
    _, url, session = site
    status, answer, _ = await post(session, url, body, key="k-bad")
    assert status == 400
    assert answer["error"]["code"] == code
    assert answer["error"].get("field") == field
    assert pipeline.calls == []


@pytest.mark.parametrize(
    ("body", "field", "limit"),
    [
        ({**MESSAGE, "text": "x" * 501}, "text", 500),
        ({**MESSAGE, "text": "x" * 500 + "\u00e9"}, "text", 500),
        ({**MESSAGE, "subject": "s" * 301}, "subject", 300),
    ],
    ids=["text", "text-non-ascii", "subject"],
)
async def test_over_long_text_and_subject_are_422(
    site: Any, pipeline: FakePipeline, body: Any, field: str, limit: int
) -> None:
    """Text or subject over its configured limit is a 422 naming it, as the example config says.

    Fails on the code before this test: both were 400 invalid_field.
    """
    _, url, session = site
    status, answer, _ = await post(session, url, body, key="k-long")
    assert status == 422
    assert answer["error"] == {
        "code": "too_long",
        "message": f"{field} must be at most {limit} characters",
        "field": field,
    }
    assert pipeline.calls == []


def test_example_config_promises_what_the_channel_answers() -> None:
    """The example config and the channel README name the status over-long text gets."""
    repo = Path(__file__).resolve().parents[1]
    example = (repo / "config" / "omnirouter.example.toml").read_text()
    assert "Longer text and subjects are refused with 422." in example
    assert "| 422 | text or subject over" in (repo / "channels" / "README.md").read_text()


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"text": "a", "text": "b", "contact": {"handle": "h"}}', "text"),
        (b'{"text": "a", "contact": {"handle": "h", "handle": "i"}}', "handle"),
    ],
    ids=["top", "nested"],
)
async def test_duplicate_keys_are_400_naming_the_key(
    site: Any, pipeline: FakePipeline, raw: bytes, field: str
) -> None:
    """A key given twice is refused (json.loads kept the last one silently before this)."""
    _, url, session = site
    status, answer, _ = await post(session, url, raw=raw)
    assert status == 400
    assert answer["error"] == {
        "code": "duplicate_field",
        "message": "a key appears more than once",
        "field": field,
    }
    assert pipeline.calls == []


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{", "invalid_json"),
        (b"", "invalid_json"),
        (b'{"text": "a",}', "invalid_json"),
        (b"\xef\xbb\xbf" + json.dumps(MESSAGE).encode(), "invalid_json"),  # UTF-8 BOM
        (b"[" * 2000 + b"]" * 2000, "invalid_json"),  # deeper than json's recursion limit
        (b'{"text": "caf\xe9", "contact": {"handle": "a"}}', "invalid_encoding"),  # Latin-1
        (b'{"text": "\xed\xa0\x80", "contact": {"handle": "a"}}', "invalid_encoding"),  # surrogate
        (json.dumps(MESSAGE).encode("utf-16"), "invalid_encoding"),
    ],
    ids=["truncated", "empty", "trailing-comma", "bom", "deep", "latin1", "surrogate", "utf16"],
)
async def test_unparseable_bodies_are_400(
    site: Any, pipeline: FakePipeline, raw: bytes, code: str
) -> None:
    """Broken JSON and bytes that are not UTF-8 are 400 without reaching the sink."""
    _, url, session = site
    status, answer, _ = await post(session, url, raw=raw)
    assert (status, answer["error"]["code"]) == (400, code)
    assert pipeline.calls == []


async def test_lone_surrogate_escape_is_rejected(site: Any, pipeline: FakePipeline) -> None:
    """A JSON "\\ud800" escape decodes to a string UTF-8 cannot store: 400 on its field."""
    _, url, session = site
    raw = b'{"text": "hi \\ud800", "contact": {"handle": "a"}}'
    status, answer, _ = await post(session, url, raw=raw)
    assert (status, answer["error"]["field"]) == (400, "text")
    assert pipeline.calls == []


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "tab\there"], ids=repr)
async def test_bad_idempotency_key_is_400(site: Any, pipeline: FakePipeline, key: str) -> None:
    """An empty, overlong, non-ASCII or control-character key is a 400 naming the header."""
    _, url, session = site
    status, answer, _ = await post(session, url, key=key)
    assert status == 400
    assert answer["error"] == {
        "code": "invalid_idempotency_key",
        "message": "Idempotency-Key must be 1-255 printable ASCII characters",
        "field": "Idempotency-Key",
    }
    assert pipeline.calls == []


@pytest.mark.parametrize(
    "header_line",
    [
        b"Idempotency-Key: abc\rdef",  # bare CR inside the value
        b"Idempotency-Key: abc\r\n def",  # obsolete line folding (CRLF + space)
        b"Idempotency-Key: abc\x01def",
        b"Idempotency-Key: abc\x7fdef",
    ],
    ids=["bare-cr", "crlf-fold", "control", "del"],
)
async def test_idempotency_key_with_cr_or_controls_is_refused(
    site: Any, pipeline: FakePipeline, header_line: bytes
) -> None:
    """Keys carrying CR, a folded line or a control byte (sent raw: clients refuse) get 400."""
    _, url, _ = site
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps(MESSAGE).encode()
    request = (
        b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        + header_line
        + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        + body
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    # Either aiohttp's HTTP parser refuses the header or the channel does: both say 400.
    assert answer.split(b" ", 2)[1] == b"400", answer[:80]
    assert pipeline.calls == []


async def test_body_over_the_limit_is_413(site: Any, pipeline: FakePipeline) -> None:
    """Over max_body_bytes is 413, by Content-Length up front or while reading a chunked body."""
    _, url, session = site
    big = json.dumps({**MESSAGE, "text": "x" * 5000}).encode()
    status, answer, _ = await post(session, url, raw=big)
    assert (status, answer["error"]["code"]) == (413, "payload_too_large")

    async def chunks() -> AsyncIterator[bytes]:
        """Yield the big body in pieces, so no Content-Length is sent."""
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    headers = {"Content-Type": "application/json"}
    async with session.post(url + "/v1/messages", data=chunks(), headers=headers) as resp:
        assert "Content-Length" not in resp.request_info.headers
        assert resp.status == 413
        assert (await resp.json())["error"]["code"] == "payload_too_large"
    assert pipeline.calls == []


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1"],
)
async def test_wrong_content_type_is_415(
    site: Any, pipeline: FakePipeline, content_type: str
) -> None:
    """Only application/json (UTF-8) is taken."""
    _, url, session = site
    status, answer, _ = await post(session, url, content_type=content_type)
    assert (status, answer["error"]["code"]) == (415, "unsupported_media_type")
    assert pipeline.calls == []


async def test_json_with_utf8_charset_is_accepted(site: Any) -> None:
    """A charset=utf-8 parameter is fine."""
    _, url, session = site
    status, _, _ = await post(session, url, content_type="application/json; charset=UTF-8")
    assert status == 201


async def test_control_characters_are_stripped_and_text_is_nfc(
    site: Any, pipeline: FakePipeline
) -> None:
    """NUL, ESC, BEL and friends go; TAB and LF stay; CRLF becomes LF; text becomes NFC."""
    _, url, session = site
    body = {
        "text": "Hel\x00lo\x07 wor\x1bld\r\nline\ttwo\rthree\x7f cafe\u0301",
        "contact": {"handle": "cafe\u0301@example.com", "name": "Ann\x00\nLee"},
        "subject": "Re:\tparcel\x08",
    }
    status, _, _ = await post(session, url, body)
    assert status == 201
    [message] = pipeline.stored
    assert message.text == "Hello world\nline\ttwo\nthree caf\u00e9"
    assert message.contact_handle == "caf\u00e9@example.com"
    assert message.contact_name == "Ann Lee"
    assert message.subject == "Re: parcel"


async def test_hostile_html_is_stored_as_plain_text_and_not_echoed(
    site: Any, pipeline: FakePipeline
) -> None:
    """Markup is data: stored untouched; answers never carry a raw < > or & of the client's."""
    _, url, session = site
    hostile = '<script>alert("x")</script><img src=x onerror=alert(1)> & \u202e'
    body = {"text": hostile, "contact": {"handle": "a@b.c", "name": "<b>Bob</b>"}}
    async with session.post(url + "/v1/messages", json=body) as resp:
        assert resp.status == 201
        raw = await resp.read()
        assert resp.headers["Content-Type"] == "application/json"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert not any(c in raw for c in b"<>&")
    [message] = pipeline.stored
    assert message.text == hostile
    assert message.contact_name == "<b>Bob</b>"
    # A client-chosen field name echoed in an error comes back escaped.
    async with session.post(url + "/v1/messages", json={**body, "<svg onload=x>": 1}) as resp:
        assert resp.status == 400
        raw = await resp.read()
    assert not any(c in raw for c in b"<>&")
    assert json.loads(raw)["error"]["field"] == "<svg onload=x>"


async def test_sink_failure_is_503_and_a_retry_with_the_key_succeeds(
    site: Any, pipeline: FakePipeline
) -> None:
    """A sink that raises gives 503 + Retry-After, never 2xx; the same key later commits once."""
    channel, url, session = site
    pipeline.fail_next = 1
    status, answer, headers = await post(session, url, key="retry-me")
    assert (status, answer["error"]["code"]) == (503, "unavailable")
    assert headers["Retry-After"] == "1"
    assert "database" not in json.dumps(answer)  # no internals leak
    assert "RuntimeError" in channel.last_error
    assert pipeline.stored == []
    status, answer, _ = await post(session, url, key="retry-me")
    assert status == 201
    assert [m.external_id for m in pipeline.stored] == ["retry-me"]


async def test_unexpected_error_is_a_generic_500(
    site: Any, pipeline: FakePipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the handler answers a generic 500 JSON and logs the exception."""
    channel, url, session = site

    def broken(document: object) -> dict[str, Any]:
        raise KeyError("internal detail")

    monkeypatch.setattr(channel, "validate", broken)
    with structlog.testing.capture_logs() as logs:
        status, answer, _ = await post(session, url)
    assert (status, answer) == (
        500,
        {"error": {"code": "internal_error", "message": "internal error"}},
    )
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["web.internal_error"]
    assert pipeline.calls == []


async def test_other_methods_and_paths_answer_json(site: Any) -> None:
    """GET on the intake is 405 with Allow; an unknown path is a JSON 404."""
    _, url, session = site
    async with session.get(url + "/v1/messages") as resp:
        assert (resp.status, resp.headers["Allow"]) == (405, "POST")
        assert (await resp.json())["error"]["code"] == "method_not_allowed"
    async with session.get(url + "/admin") as resp:
        assert resp.status == 404
        assert resp.headers["Content-Type"] == "application/json"
    async with session.get(url + "/v1/health") as resp:
        assert (resp.status, await resp.json()) == (200, {"status": "ok"})


# -- GET /v1/tickets/{ticket} -------------------------------------------------------------


async def test_ticket_status_needs_the_right_token(site: Any) -> None:
    """Bearer or ?token= with the right token: 200; wrong token and unknown ticket: one 404."""
    _, url, session = site
    _, receipt, _ = await post(session, url)
    ticket_url = url + receipt["status_url"]
    expected = {
        "ticket": receipt["ticket"],
        "state": "queued",
        "label": "complaint",
        "severity": "P2",
        "opened_at": "2025-01-02T03:04:05Z",
        "respond_by": "2025-01-02T07:04:05Z",
        "assigned": False,
        "messages": 1,
        "resolved_at": None,
    }
    bearer = {"Authorization": f"Bearer {receipt['status_token']}"}
    async with session.get(ticket_url, headers=bearer) as resp:
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "no-store"
        assert await resp.json() == expected
    async with session.get(ticket_url, params={"token": receipt["status_token"]}) as resp:
        assert (resp.status, await resp.json()) == (200, expected)

    answers = []
    for target, token in [
        (ticket_url, "wrong-token"),
        (url + "/v1/tickets/T-UNKNOWN", receipt["status_token"]),
        (url + "/v1/tickets/..%2Fetc", receipt["status_token"]),
    ]:
        async with session.get(target, headers={"Authorization": f"Bearer {token}"}) as resp:
            answers.append((resp.status, await resp.read()))
    assert answers == [(404, b'{"error":{"code":"not_found","message":"not found"}}')] * 3


async def test_ticket_status_without_token_is_401(site: Any) -> None:
    """No token (or a non-Bearer scheme) is 401 with WWW-Authenticate, whatever the ticket."""
    _, url, session = site
    _, receipt, _ = await post(session, url)
    for headers in ({}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer "}):
        async with session.get(url + receipt["status_url"], headers=headers) as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"] == "Bearer"
            assert (await resp.json())["error"]["code"] == "unauthorized"


async def test_ticket_lookup_failure_is_503(
    site: Any, pipeline: FakePipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store error while reading a ticket is a 503, not a 500 with details."""
    channel, url, session = site

    async def broken(ticket: str, token: str) -> TicketStatus | None:
        raise OSError("disk I/O error")

    monkeypatch.setattr(channel, "_tickets", broken)
    async with session.get(url + "/v1/tickets/T-1", params={"token": "t"}) as resp:
        assert resp.status == 503
        assert "disk" not in await resp.text()


# -- shutdown ---------------------------------------------------------------------------


async def test_stop_refuses_new_posts_and_lets_in_flight_ones_finish(
    pipeline: FakePipeline, tmp_path: Path
) -> None:
    """During stop() new POSTs get 503 + Retry-After; a slow in-flight commit still gets 201."""
    async with serve(pipeline, tmp_path) as (channel, url), aiohttp.ClientSession() as session:
        pipeline.gate = asyncio.Event()
        in_flight = asyncio.create_task(post(session, url, key="slow"))
        await asyncio.wait_for(pipeline.entered.wait(), 5)
        stopping = asyncio.create_task(channel.stop())
        await asyncio.sleep(0)  # stop() flips to refusing before its first await

        async with aiohttp.ClientSession() as other:
            status, answer, headers = await post(other, url, key="late")
            assert (status, answer["error"]["code"]) == (503, "unavailable")
            assert headers["Retry-After"] == "5"
            async with other.get(url + "/v1/health") as resp:
                assert resp.status == 503
        assert not stopping.done()

        pipeline.gate.set()
        status, answer, _ = await asyncio.wait_for(in_flight, 5)
        assert status == 201
        await asyncio.wait_for(stopping, 5)
        assert channel.state == DriverState.STOPPED
        assert channel.bound_port is None
        assert [m.external_id for m in pipeline.stored] == ["slow"]
        with pytest.raises(aiohttp.ClientConnectionError):
            await post(session, url, key="after")


async def test_cancelling_run_closes_the_listener(pipeline: FakePipeline, tmp_path: Path) -> None:
    """Cancelling run() without stop() still closes the port and ends STOPPED."""
    ctx = DriverContext(state_dir=tmp_path, log=structlog.get_logger())
    channel = WebChannel("site", WebConfig(type="web", name="site", port=0), ctx)
    task = asyncio.create_task(channel.run(pipeline.sink))
    await asyncio.wait_for(channel.started.wait(), 5)
    port = channel.bound_port
    assert port
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert channel.state == DriverState.STOPPED
    assert not channel.started.is_set()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_stop_before_run_makes_run_return_at_once(
    pipeline: FakePipeline, tmp_path: Path
) -> None:
    """stop() is final: a run() that starts afterwards returns without listening."""
    ctx = DriverContext(state_dir=tmp_path, log=structlog.get_logger())
    channel = WebChannel("site", WebConfig(type="web", name="site", port=0), ctx)
    await asyncio.wait_for(channel.stop(), 5)
    await asyncio.wait_for(channel.run(pipeline.sink), 5)
    assert channel.state == DriverState.STOPPED
    assert channel.bound_port is None


# -- property: random bodies --------------------------------------------------------------

_json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_nasty_text = st.text(
    alphabet=st.characters(codec=None, exclude_categories=())
    | st.sampled_from("\x00\r\n\t\x1b\x7f "),
    max_size=40,
) | st.sampled_from(["", " ", "\u0000", "e\u0301", "x" * 600, "\ufeff", "\u202e<b>"])
_contact = st.fixed_dictionaries(
    {},
    optional={
        "handle": _nasty_text | _json_values,
        "name": _nasty_text | _json_values,
        "nickname": _json_values,
    },
)
_message = st.fixed_dictionaries(
    {},
    optional={
        "text": _nasty_text | _json_values,
        "contact": _contact | _json_values,
        "subject": _nasty_text | _json_values,
        "conversation": _nasty_text | _json_values,
        "language": st.sampled_from(["zh", "en", "fr", "", None]) | _json_values,
        "extra": _json_values,
    },
)


# Mostly well-formed messages with hostile strings, so the accepting path is exercised too.
_almost_valid = st.fixed_dictionaries(
    {
        "text": st.text(min_size=1) | _nasty_text,
        "contact": st.fixed_dictionaries(
            {"handle": st.emails() | st.from_regex(r"\+[0-9]{6,15}", fullmatch=True) | _nasty_text},
            optional={"name": _nasty_text | st.none()},
        ),
    },
    optional={
        "subject": _nasty_text | st.none(),
        "conversation": _nasty_text | st.none(),
        "language": st.sampled_from(["zh", "en", None]),
    },
)


def _encode(document: Any) -> bytes:
    """Encode a document as JSON, surrogates escaped (ensure_ascii) so it stays valid UTF-8."""
    return json.dumps(document).encode()


_bodies = (
    _almost_valid.map(_encode)
    | _message.map(_encode)
    | _json_values.map(_encode)
    | st.binary(max_size=200)
    | _message.map(_encode).flatmap(lambda b: st.integers(0, len(b)).map(lambda n: b[:n]))
)


def _assert_valid(message: InboundMessage) -> None:
    """Assert a message the sink received obeys every rule of the intake."""
    for value in (message.text, message.contact_handle, message.contact_name, message.subject):
        assert value == value.strip()
        assert unicodedata.is_normalized("NFC", value)
        value.encode("utf-8")  # no lone surrogates
        assert not FORBIDDEN_CHARS.intersection(value)
    assert message.text and len(message.text) <= 500
    assert message.contact_handle and len(message.contact_handle) <= 200
    assert "\n" not in message.contact_name + message.subject + message.contact_handle
    assert len(message.subject) <= 300
    assert message.language in (None, "zh", "en")
    assert message.channel_type == "web"


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=_bodies)
async def test_random_bodies_never_5xx_and_only_valid_messages_reach_the_sink(
    site: Any, pipeline: FakePipeline, body: bytes
) -> None:
    """Whatever the body, the answer is 2xx or 4xx, and the sink only sees valid messages."""
    _, url, session = site
    before = len(pipeline.calls)
    async with session.post(
        url + "/v1/messages", data=body, headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status < 500, (resp.status, await resp.read())
        answer = json.loads(await resp.read())
        event(f"status {resp.status}")
        if resp.status in (200, 201):
            assert len(pipeline.calls) == before + 1
            assert answer["ticket"].startswith("T-")
        else:
            assert resp.status in (400, 413, 422), answer
            assert len(pipeline.calls) == before
    for message in pipeline.calls[before:]:
        _assert_valid(message)
        assert message.raw == body


# -- continuing a conversation needs its token ---------------------------------------------


async def test_a_bare_handle_never_joins_someone_elses_conversation(tmp_path: Path) -> None:
    # Issue 13 #2: two posts with the same contact.handle used to share a conversation,
    # so whoever knew a customer's handle joined it. Only the token continues it now.
    tickets = Tickets(store=None)  # type: ignore[arg-type]  # the secret is all it needs here
    tickets._secret = b"installation-secret"
    pipeline = FakePipeline()
    async with (
        serve(pipeline, tmp_path, conversations=tickets) as (_, url),
        aiohttp.ClientSession() as session,
    ):
        body = {"text": "Where is my parcel?", "contact": {"handle": "dana@example.com"}}
        status, first, _ = await post(session, url, body, key="k-1")
        assert status == 201 and first["conversation_token"]
        status, stranger, _ = await post(session, url, {**body, "text": "me too"}, key="k-2")
        assert status == 201
        assert stranger["conversation_token"] != first["conversation_token"]
        follow = {**body, "text": "Any news?", "conversation": first["conversation_token"]}
        status, again, _ = await post(session, url, follow, key="k-3")
        assert status == 201 and again["conversation_token"] == first["conversation_token"]
        hints = [m.conversation_hint for m in pipeline.stored]
        assert hints[0] == hints[2] and hints[0] != hints[1]
        # The same token from another handle, a forged one, a bare guess: refused, not stored.
        other = {**follow, "contact": {"handle": "eve@example.com"}}
        forged = {**follow, "conversation": first["conversation_token"][:-2] + "AA"}
        for bad, key in (
            (other, "k-4"),
            (forged, "k-5"),
            ({**follow, "conversation": "s-1"}, "k-6"),
        ):
            status, answer, _ = await post(session, url, bad, key=key)
            assert status == 403, answer
            assert answer["error"]["code"] == "invalid_conversation_token"
        assert len(pipeline.stored) == 3
        # A retry of the first post (same key, same body) gets the same token back.
        status, retry, _ = await post(session, url, body, key="k-1")
        assert status == 200 and retry["conversation_token"] == first["conversation_token"]
