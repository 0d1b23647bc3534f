"""The Twilio SMS channel against an emulator of Twilio's HTTP contract, and the shared SMS parts.

Signatures are checked against the official `twilio` package's RequestValidator (the
oracle) on hypothesis-generated URLs, parameters and tokens, plus the worked vectors
from twilio-python's own tests. The channel runs for real on loopback; the emulator
(tests/peers_sms.py) signs and posts webhooks as Twilio does, speaks the Messages API
and calls the status callbacks.
"""

from __future__ import annotations

import asyncio
import re
import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import MultiDict
from pydantic import ValidationError
from twilio.request_validator import RequestValidator, add_port, remove_port

from channels.sms import TwilioChannel, TwilioConfig
from channels.sms.common import e164, fit_segments, segment_count, split_segments
from channels.sms.twilio import EMPTY_TWIML, signature, signature_valid, twilio_error
from router.config import build_config
from router.delivery import AckPayload, Outbound, ReplyPayload
from router.drivers import (
    CHANNELS,
    AuthFailed,
    DriverContext,
    DriverState,
    PermanentError,
    RateLimited,
    TransientError,
    load_driver,
)
from tests.peers import free_port
from tests.peers_sms import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    CUSTOMER,
    OUR_NUMBER,
    TwilioEmulator,
    inbound_params,
)
from tests.test_channel_web import FakePipeline

# -- segments and numbers ---------------------------------------------------------------


def test_gsm7_and_ucs2_segments() -> None:
    assert split_segments("")[1] == []
    assert split_segments("a" * 160) == ("gsm7", ["a" * 160])
    encoding, parts = split_segments("a" * 161)
    assert encoding == "gsm7" and [len(p) for p in parts] == [153, 8]
    assert segment_count("a" * 306) == 2 and segment_count("a" * 307) == 3
    # Extension characters cost two septets and never straddle two segments.
    assert segment_count("€" * 80) == 1 and segment_count("€" * 81) == 2
    _, parts = split_segments("a" * 152 + "€" + "b" * 10)
    assert parts[0] == "a" * 152 and parts[1] == "€" + "b" * 10
    # Chinese (and anything outside GSM-7) is UCS-2: 70 alone, 67 per part.
    assert split_segments("你" * 70) == ("ucs2", ["你" * 70])
    assert [len(p) for p in split_segments("你" * 71)[1]] == [67, 4]
    # One non-GSM character switches the whole text.
    assert split_segments("a" * 100 + "…")[0] == "ucs2" and segment_count("a" * 100 + "…") == 2
    # Emoji are surrogate pairs: two UTF-16 units, never split.
    _, parts = split_segments("x" * 66 + "😀" + "y" * 10)
    assert parts[0] == "x" * 66 and parts[1].startswith("😀")


def test_fit_segments_truncates_with_a_notice_that_keeps_the_encoding() -> None:
    text, cut = fit_segments("short", 1, "…")
    assert (text, cut) == ("short", False)
    long_en = "word " * 100  # 500 GSM characters, 4 segments
    text, cut = fit_segments(long_en, 2, "…")
    assert cut and text.endswith("...") and segment_count(text) == 2
    assert len(text) > 290  # GSM-7 kept: "…" would have made it UCS-2 (134 characters)
    long_zh = "您好，您的订单已经发货。" * 30
    text, cut = fit_segments(long_zh, 3, "…")
    assert cut and text.endswith("…") and segment_count(text) == 3 and len(text) == 201


def test_numbers_become_e164_with_the_default_region() -> None:
    assert e164("+49 151 1234 5678", "US") == "+4915112345678"
    assert e164("(415) 555-0123", "US") == "+14155550123"
    assert e164("13800138000", "CN") == "+8613800138000"
    assert e164("0049 1511 2345678", "DE") == "+4915112345678"
    for bad in ("", "hello", "+1", "12", "+" + "9" * 30, "whatsapp:+14155550123"):
        with pytest.raises(ValueError):
            e164(bad, "US")


# -- signatures --------------------------------------------------------------------------

VECTOR_PARAMS = [
    ("CallSid", "CA1234567890ABCDE"),
    ("Caller", "+14158675309"),
    ("Digits", "1234"),
    ("From", "+14158675309"),
    ("To", "+18005551212"),
]


def test_documented_signature_vectors() -> None:
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    assert signature("12345", url, VECTOR_PARAMS) == "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    assert signature_valid("12345", url, VECTOR_PARAMS, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    # The same URL written with a port: the signature over either form is accepted.
    with_port = "https://mycompany.com:443/myapp.php?foo=1&bar=2"
    assert signature("12345", with_port, VECTOR_PARAMS) == "kvajT1Ptam85bY51eRf/AJRuM3w="
    assert signature_valid("12345", url, VECTOR_PARAMS, "kvajT1Ptam85bY51eRf/AJRuM3w=")
    assert signature_valid("12345", with_port, VECTOR_PARAMS, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    http80 = "http://mycompany.com:80/myapp.php?foo=1&bar=2"
    assert signature("12345", http80, VECTOR_PARAMS) == "0ZXoZLH/DfblKGATFgpif+LLRf4="
    other = "http://mycompany.com:1234/myapp.php?foo=1&bar=2"
    assert signature("12345", other, VECTOR_PARAMS) == "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="
    # Repeated keys: values de-duplicated and sorted.
    repeated = [
        ("Sid", "CA123"),
        ("SidAccount", "AC123"),
        ("Digits", "5678"),
        ("Digits", "1234"),
        ("Digits", "1234"),
    ]
    assert signature("12345", url, repeated) == "IK+Dwps556ElfBT0I3Rgjkr1wJU="
    assert not signature_valid("12345", url, VECTOR_PARAMS, "IK+Dwps556ElfBT0I3Rgjkr1wJU=")
    assert not signature_valid("54321", url, VECTOR_PARAMS, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    assert not signature_valid("12345", url, VECTOR_PARAMS, "")


_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
_host = st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z]{2,5}){1,2}", fullmatch=True)
_path = st.from_regex(r"(/[A-Za-z0-9._~-]{0,8}){0,3}", fullmatch=True)
_query = st.from_regex(
    r"(\?[a-z]{1,4}=[A-Za-z0-9]{0,4}(&[a-z]{1,4}=[A-Za-z0-9]{0,4}){0,2})?", fullmatch=True
)


@st.composite
def _url(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(["http", "https"]))
    port = draw(st.sampled_from(["", ":80", ":443", ":8080", ":1"]))
    return f"{scheme}://{draw(_host)}{port}{draw(_path)}{draw(_query)}"


@given(
    token=_text.filter(bool),
    url=_url(),
    params=st.lists(st.tuples(_text, _text), max_size=6),
    variant=st.sampled_from(["same", "with_port", "without_port", "other_url", "garbage"]),
    other=_url(),
)
@settings(max_examples=400, deadline=None)
def test_signature_check_accepts_exactly_what_twilio_accepts(
    token: str, url: str, params: list[tuple[str, str]], variant: str, other: str
) -> None:
    oracle = RequestValidator(token)
    multi = MultiDict(params)
    signed = {
        "same": url,
        "with_port": add_port(urlparse(url)),
        "without_port": remove_port(urlparse(url)),
        "other_url": other,
        "garbage": "",
    }[variant]
    given_sig = oracle.compute_signature(signed, multi) if signed else "bm90IGEgc2lnbmF0dXJl"
    assert signature(token, url, params) == oracle.compute_signature(url, multi)
    assert signature_valid(token, url, params, given_sig) == oracle.validate(url, multi, given_sig)


# -- config ------------------------------------------------------------------------------


def _twilio_settings(**overrides: Any) -> dict[str, Any]:
    return {
        "type": "twilio",
        "name": "sms",
        "account_sid": ACCOUNT_SID,
        "auth_token": AUTH_TOKEN,
        "from_number": OUR_NUMBER,
        "public_url": "https://sms.example.com/twilio/",
        **overrides,
    }


def test_config_is_checked() -> None:
    config = TwilioConfig(**_twilio_settings())
    assert config.public_url == "https://sms.example.com/twilio"
    assert config.base_url == "https://api.twilio.com"
    assert load_driver(CHANNELS, "twilio") is TwilioChannel
    bad = [
        ({"from_number": None}, "exactly one of"),
        ({"messaging_service_sid": "MG" + "0" * 32}, "exactly one of"),
        ({"from_number": "not a number"}, "from_number"),
        ({"public_url": "ftp://x.example.com"}, "http"),
        ({"public_url": "http://sms.example.com/t"}, "loopback"),
        ({"public_url": "https://u:p@sms.example.com/t"}, "credentials"),
        ({"base_url": "https://api.example.com/?x=1"}, "query"),
        ({"account_sid": "AC123"}, "account_sid"),
        ({"default_region": "XX"}, "unknown region"),
        ({"opt_out_keywords": [" "]}, "blank"),
        ({"max_segments": 0}, "max_segments"),
        ({"colour": "red"}, "colour"),
    ]
    for overrides, match in bad:
        with pytest.raises(ValidationError, match=match):
            TwilioConfig(**_twilio_settings(**overrides))


def test_config_file_takes_the_token_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TWILIO_TOKEN", AUTH_TOKEN)
    raw = {
        "channels": [
            {**_twilio_settings(auth_token="${TWILIO_TOKEN}"), "ack": {"timezone": "Asia/Shanghai"}}
        ]
    }
    config = build_config(raw, source="test.toml")
    (channel,) = [c for c in config.channels if c.type == "twilio"]
    assert channel.auth_token.get_secret_value() == AUTH_TOKEN
    assert AUTH_TOKEN not in repr(channel)


# -- the channel against the emulator ----------------------------------------------------


@asynccontextmanager
async def serve(
    tmp_path: Path, pipeline: FakePipeline, emulator: TwilioEmulator, **overrides: Any
) -> AsyncIterator[tuple[TwilioChannel, str]]:
    """Run a Twilio channel on loopback pointed at the emulator; yield it and its URL."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    settings_ = _twilio_settings(
        **{"port": port, "public_url": base, "base_url": emulator.base_url, **overrides}
    )
    ctx = DriverContext(state_dir=tmp_path, log=structlog.get_logger().bind(channel="sms"))
    channel = TwilioChannel("sms", TwilioConfig(**settings_), ctx)
    task = asyncio.create_task(channel.run(pipeline.sink))
    await asyncio.wait_for(channel.started.wait(), 5)
    try:
        yield channel, base
    finally:
        await channel.stop()
        await task


@pytest.fixture
async def emulator() -> AsyncIterator[TwilioEmulator]:
    """Yield a started Twilio emulator."""
    emu = await TwilioEmulator().start()
    try:
        yield emu
    finally:
        await emu.close()


def _reply(text: str, to: str = CUSTOMER, oid: str = "out-1") -> Outbound:
    payload = ReplyPayload(conversation_id="01JCONV", subject="", text=text, language="en")
    return Outbound(id=oid, channel="sms", to=to, payload=payload)


def _ack(language: str, to: str = CUSTOMER, oid: str = "ack-1") -> Outbound:
    respond_by = datetime.now(UTC) + timedelta(minutes=5)
    payload = AckPayload(
        conversation_id="01JCONV",
        subject="",
        respond_by=respond_by.isoformat(),
        language=language,
    )
    return Outbound(id=oid, channel="sms", to=to, payload=payload)


async def test_inbound_text_is_committed_then_answered_with_empty_twiml(
    tmp_path: Path, emulator: TwilioEmulator
) -> None:
    pipeline = FakePipeline()
    async with serve(tmp_path, pipeline, emulator) as (channel, base):
        params = inbound_params("Hello, where is my order 4711?", sender="(415) 555-0123")
        status, body = await emulator.post_signed(base + "/sms", params)
        assert (status, body) == (200, EMPTY_TWIML)
        (message,) = pipeline.stored
        assert message.channel == "sms" and message.channel_type == "sms"
        assert message.external_id == dict(params)["MessageSid"]
        assert message.contact_handle == CUSTOMER  # E.164, from the US national form
        # The webhook is signed: the sender's number links their contacts across channels.
        assert message.identifiers == (f"phone:{CUSTOMER}",)
        assert message.text == "Hello, where is my order 4711?"
        assert message.conversation_hint and message.payload_sha256
        assert b"Body=Hello" in message.raw
        # Twilio retries the same MessageSid: stored once, answered the same way.
        assert await emulator.post_signed(base + "/sms", params) == (200, EMPTY_TWIML)
        assert len(pipeline.stored) == 1 and channel.counts["duplicate"] == 1
        # A later text from the same number joins its thread; another number does not.
        await emulator.post_signed(base + "/sms", inbound_params("Any news?"))
        await emulator.post_signed(base + "/sms", inbound_params("Hi", sender="+14155550999"))
        first, second, third = pipeline.stored
        assert second.conversation_hint == first.conversation_hint
        assert third.conversation_hint != first.conversation_hint
        assert channel.state == DriverState.CONNECTED and channel.last_success


async def test_thread_ends_after_the_quiet_window(tmp_path: Path, emulator: TwilioEmulator) -> None:
    pipeline = FakePipeline()
    async with serve(tmp_path, pipeline, emulator, thread_window=0.3) as (_, base):
        await emulator.post_signed(base + "/sms", inbound_params("one"))
        await asyncio.sleep(0.5)
        await emulator.post_signed(base + "/sms", inbound_params("two"))
        first, second = pipeline.stored
        assert first.conversation_hint != second.conversation_hint


async def test_bad_requests_are_refused_and_nothing_is_stored(
    tmp_path: Path, emulator: TwilioEmulator
) -> None:
    pipeline = FakePipeline()
    async with serve(tmp_path, pipeline, emulator, max_body_bytes=2048) as (channel, base):
        url = base + "/sms"
        params = inbound_params("hello")
        cases: list[tuple[int, dict[str, Any], list[tuple[str, str]]]] = [
            (403, {"signature": ""}, params),  # no signature header
            (403, {"signature": "bm9wZQ=="}, params),  # a wrong one
            (403, {"signed_url": "https://elsewhere.example.com/sms"}, params),  # other URL
            (403, {"signed_url": base + "/status"}, params),  # another of our endpoints
            (413, {"body": b"Body=" + b"x" * 4000}, params),
            (400, {"body": b"Body=%FF%FE&From=%2B14155550123"}, params),  # not UTF-8
            (400, {"body": b"Body=caf\xe9&MessageSid=SM1"}, params),  # raw Latin-1 byte
            (400, {"body": b"Body=a&&=b&&"}, params),  # not a form
            (415, {"content_type": "application/json", "body": b"{}"}, params),
            (400, {}, [p for p in params if p[0] not in ("MessageSid", "SmsSid")]),
            (400, {}, [*[p for p in params if p[0] != "From"], ("From", "not-a-number")]),
            (400, {}, [p for p in params if p[0] != "From"]),
            (400, {}, [*[p for p in params if p[0] != "Body"], ("Body", " \x00 ")]),
            (400, {}, [*params, ("MessageSid", "SMother")]),  # ambiguous
            (400, {}, [*[p for p in params if p[0] != "NumMedia"], ("NumMedia", "11")]),
        ]
        for expected, options, form in cases:
            status, body = await emulator.post_signed(url, form, **options)
            assert status == expected, (options, form, body)
        assert not pipeline.calls
        async with emulator._session.get(url) as resp:  # type: ignore[union-attr]
            assert resp.status == 405
        async with emulator._session.get(base + "/nope") as resp:  # type: ignore[union-attr]
            assert resp.status == 404
        # Unknown fields are fine (Twilio adds fields without notice), and ignored.
        extra = [*inbound_params("still fine"), ("BrandNewField", "x"), ("AddOns", "{}")]
        assert (await emulator.post_signed(url, extra))[0] == 200
        assert len(pipeline.stored) == 1
        assert channel.counts["bad_signature"] == 4


async def test_a_failed_commit_is_a_503_and_the_retry_is_stored_once(
    tmp_path: Path, emulator: TwilioEmulator
) -> None:
    pipeline = FakePipeline()
    pipeline.fail_next = 1
    async with serve(tmp_path, pipeline, emulator) as (channel, base):
        params = inbound_params("please call me back")
        status, _ = await emulator.post_signed(base + "/sms", params)
        assert status == 503 and not pipeline.stored
        assert await emulator.post_signed(base + "/sms", params) == (200, EMPTY_TWIML)
        assert await emulator.post_signed(base + "/sms", params) == (200, EMPTY_TWIML)
        assert len(pipeline.stored) == 1 and channel.counts["sink_failed"] == 1


async def test_stop_keywords_are_recorded_not_routed_and_block_sends_until_start(
    tmp_path: Path, emulator: TwilioEmulator
) -> None:
    pipeline = FakePipeline()
    async with serve(tmp_path, pipeline, emulator) as (channel, base):
        stop = inbound_params(" Stop. ")
        assert await emulator.post_signed(base + "/sms", stop) == (200, EMPTY_TWIML)
        assert not pipeline.calls
        with pytest.raises(PermanentError, match=r"recipient opted out \(Stop\. at .*Z, keyword"):
            await channel.send(_reply("Your parcel is on its way."))
        with pytest.raises(PermanentError, match="opted out"):
            await channel.send(_ack("en"))
        assert not emulator.sent
        # The same STOP delivered again after START must not opt the number out again.
        await emulator.post_signed(base + "/sms", inbound_params("START"))
        assert await emulator.post_signed(base + "/sms", stop) == (200, EMPTY_TWIML)
        await channel.send(_reply("Your parcel is on its way."))
        assert len(emulator.sent) == 1
        # Chinese keywords, and another number unaffected.
        await emulator.post_signed(base + "/sms", inbound_params("退订", sender="+8613800138000"))
        await emulator.post_signed(base + "/sms", inbound_params("td", sender="+8613800138001"))
        for number in ("+8613800138000", "+8613800138001"):
            with pytest.raises(PermanentError, match="opted out"):
                await channel.send(_reply("hi", to=number, oid=number))
        # A keyword inside a sentence is a message like any other.
        await emulator.post_signed(base + "/sms", inbound_params("Please stop the order"))
        assert [m.text for m in pipeline.stored] == ["Please stop the order"]
        assert channel.counts["opted_out"] == 3 and channel.counts["keyword_replay"] == 1


async def test_sends_go_through_the_messages_api_and_statuses_are_recorded(
    tmp_path: Path, emulator: TwilioEmulator
) -> None:
    pipeline = FakePipeline()
    async with serve(tmp_path, pipeline, emulator) as (channel, base):
        await channel.send(_ack("zh", oid="ack-zh"))
        await channel.send(_reply("Your parcel left today; tracking ZX-123.", oid="r1"))
        zh, reply = emulator.sent
        assert zh.form["To"] == CUSTOMER and zh.form["From"] == OUR_NUMBER
        assert "T-01JCONV" in zh.form["Body"] and "分钟" in zh.form["Body"]
        assert zh.form["StatusCallback"] == f"{base}/status?outbound=ack-zh"
        assert reply.form["Body"] == "Your parcel left today; tracking ZX-123."
        # The emulator calls back "sent" then "delivered", signed; both accepted.
        for _ in range(100):
            if channel.store.status_of("r1") == (reply.sid, "delivered", ""):
                break
            await asyncio.sleep(0.02)
        assert channel.store.status_of("r1") == (reply.sid, "delivered", "")
        assert set(emulator.status_codes) == {200}
        # A late "sent" does not move it back; a retry of a sent send is not sent twice.
        await emulator.status(f"{base}/status?outbound=r1", reply.sid, CUSTOMER, "sent")
        assert channel.store.status_of("r1") == (reply.sid, "delivered", "")
        await channel.send(_reply("Your parcel left today; tracking ZX-123.", oid="r1"))
        assert len(emulator.sent) == 2
        # A failed delivery with 21610 (carrier-level STOP) records an opt-out.
        emulator.auto_status = False
        await channel.send(_reply("Anything else?", oid="r3"))
        sid = emulator.sent[-1].sid
        code = await emulator.status(
            f"{base}/status?outbound=r3", sid, CUSTOMER, "undelivered", "21610"
        )
        assert code == 200 and channel.store.status_of("r3") == (sid, "undelivered", "21610")
        with pytest.raises(PermanentError, match="Twilio 21610"):
            await channel.send(_reply("again", oid="r2"))
        # An unsigned status is refused like any webhook.
        status, _ = await emulator.post_signed(
            f"{base}/status", [("MessageSid", zh.sid), ("MessageStatus", "read")], signature="x"
        )
        assert status == 403


async def test_long_replies_are_cut_to_the_segment_cap(
    tmp_path: Path, emulator: TwilioEmulator
) -> None:
    async with serve(tmp_path, FakePipeline(), emulator, max_segments=2) as (channel, _):
        await channel.send(_reply("您好，" + "您的订单已经发货。" * 40, oid="long"))
        body = emulator.sent[0].form["Body"]
        assert body.endswith("…") and segment_count(body) == 2
        assert channel.counts["truncated"] == 1


@pytest.mark.parametrize(
    ("status", "code", "headers", "error", "text"),
    [
        (429, 20429, {"Retry-After": "7"}, RateLimited, "20429"),
        (400, 14107, {}, RateLimited, "14107"),
        (503, 20503, {}, TransientError, "HTTP 503"),
        (500, 0, {"Retry-After": "2"}, RateLimited, "HTTP 500"),
        (400, 21211, {}, PermanentError, "error 21211"),
        (400, 21614, {}, PermanentError, "error 21614"),
        (400, 21610, {}, PermanentError, "error 21610"),
        (401, 20003, {}, AuthFailed, "error 20003"),
    ],
)
async def test_twilio_errors_map_onto_the_taxonomy(
    tmp_path: Path,
    emulator: TwilioEmulator,
    status: int,
    code: int,
    headers: dict[str, str],
    error: type[Exception],
    text: str,
) -> None:
    emulator.failures.append((status, code, headers))
    async with serve(tmp_path, FakePipeline(), emulator) as (channel, _):
        with pytest.raises(error, match=text) as info:
            await channel.send(_reply("hello"))
        if error is RateLimited:
            assert isinstance(info.value, RateLimited)
            assert info.value.retry_after == float(headers.get("Retry-After", "1"))
        if error is AuthFailed:
            assert channel.state == DriverState.BAD_CREDENTIALS
        if code == 21610:
            with pytest.raises(PermanentError, match="opted out"):
                await channel.send(_reply("hello", oid="next"))
            return
        if error is not PermanentError:
            await channel.send(_reply("hello"))  # the retry goes through
            assert len(emulator.sent) == 1 and channel.state == DriverState.CONNECTED


def test_twilio_error_on_odd_answers() -> None:
    assert isinstance(twilio_error(502, b"<html>bad gateway</html>", None), TransientError)
    assert isinstance(twilio_error(404, b"", None), PermanentError)
    assert not isinstance(twilio_error(404, b"", None), TransientError)
    limited = twilio_error(429, b"{}", "nonsense")
    assert isinstance(limited, RateLimited) and limited.retry_after == 1.0


async def test_unreachable_api_and_wrong_token(tmp_path: Path, emulator: TwilioEmulator) -> None:
    pipeline = FakePipeline()
    async with serve(tmp_path, pipeline, emulator, base_url=f"http://127.0.0.1:{free_port()}") as (
        channel,
        _,
    ):
        with pytest.raises(TransientError, match="twilio: Client"):
            await channel.send(_reply("hello"))
    emulator.token = "rotated-token"
    async with serve(tmp_path / "b", pipeline, emulator) as (channel, base):
        with pytest.raises(AuthFailed):
            await channel.send(_reply("hello"))
        # Webhooks signed with another token are refused too.
        status, _ = await emulator.post_signed(base + "/sms", inbound_params("hi"))
        assert status == 403 and not pipeline.calls


async def test_mms_media_are_fetched_within_limits_or_kept_as_links(
    tmp_path: Path, emulator: TwilioEmulator
) -> None:
    emulator.media["photo"] = (b"\x89PNG fake image", "image/png")
    emulator.media["big"] = (b"x" * 5000, "image/jpeg")
    pipeline = FakePipeline()
    async with serve(tmp_path, pipeline, emulator, max_media_bytes=4096) as (_, base):
        params = inbound_params("", media=3)
        params += [
            ("MediaUrl0", f"{emulator.base_url}/media/photo"),
            ("MediaContentType0", "image/png"),
            ("MediaUrl1", f"{emulator.base_url}/media/big"),
            ("MediaContentType1", "image/jpeg"),
            ("MediaUrl2", f"{emulator.base_url}/media/missing"),
            ("MediaContentType2", "image/gif"),
        ]
        assert await emulator.post_signed(base + "/sms", params) == (200, EMPTY_TWIML)
        (message,) = pipeline.stored
        photo, big, missing = message.attachments
        assert photo.mime_type == "image/png" and photo.size == 15 and photo.name == "media0.png"
        kept = Path(photo.storage_ref.removeprefix("file:"))
        assert await asyncio.to_thread(kept.read_bytes) == b"\x89PNG fake image"
        assert big.size == 0 and big.storage_ref == f"{emulator.base_url}/media/big"
        assert missing.size == 0 and missing.storage_ref.endswith("/media/missing")
    # A slow media server does not hold the commit beyond media_timeout.
    emulator.media_delay = 2.0
    async with serve(tmp_path / "b", pipeline, emulator, media_timeout=0.3) as (_, base):
        params = inbound_params("see photo", media=1)
        params += [("MediaUrl0", f"{emulator.base_url}/media/photo")]
        started = asyncio.get_running_loop().time()
        assert (await emulator.post_signed(base + "/sms", params))[0] == 200
        assert asyncio.get_running_loop().time() - started < 1.5
        assert pipeline.stored[-1].attachments[0].size == 0


def test_the_commented_example_blocks_are_valid_when_uncommented(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text = (Path(__file__).resolve().parents[1] / "config" / "omnirouter.example.toml").read_text()
    monkeypatch.setenv("OMNIROUTER_TWILIO_TOKEN", AUTH_TOKEN)
    monkeypatch.setenv("OMNIROUTER_SMS_SECRET", "kannel-webhook-secret-42")
    monkeypatch.setenv("OMNIROUTER_KANNEL_PASSWORD", "kannel-sendsms-pw")
    channels = []
    for kind in ("twilio", "sms_http"):
        start = text.index(f'# type = "{kind}"')
        block = text[start : text.index("\n\n", start)]
        settings: dict[str, Any] = {}
        for line in block.splitlines():
            body = line.removeprefix("# ")
            # Settings only (not notes), and one sender: messaging_service_sid is the
            # alternative to from_number.
            if re.match(r"^[a-z_]+ = ", body) and not body.startswith("messaging_service_sid"):
                settings.update(tomllib.loads(body))
        channels.append(settings)
    config = build_config({"channels": channels}, source="example")
    twilio, kannel = (c for c in config.channels if c.type in ("twilio", "sms_http"))
    assert twilio.public_url == "https://sms.example.com/twilio" and twilio.max_segments == 10
    assert kannel.inbound.auth == "secret" and kannel.outbound.success_status == (202,)
