"""The Telegram channel against a local Bot API emulator, driven by python-telegram-bot.

tests/peers_telegram.py serves the Bot API's HTTP contract; the channel talks to it
through PTB's own `Bot` (`base_url`), so what is tested is the real client library's
requests and parsing. Messages go to a recording sink that behaves like the store's
(channel, external_id) uniqueness. The daemon end to end (ticket, acknowledgement,
agent over MQTT, reply, SIGKILL between commit and acknowledgement, a blocked bot's
dead letter) is in tests/test_telegram_e2e.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from channels.telegram import (
    BLOCKED,
    DEFAULT_GREETINGS,
    EDITED_SUBJECT,
    TelegramChannel,
    TelegramConfig,
    split_message,
    utf16_units,
)
from router.delivery import AckPayload, Outbound, ReplyPayload
from router.drivers import (
    AuthFailed,
    DriverContext,
    DriverState,
    PermanentError,
    RateLimited,
    Receipt,
    TransientError,
)
from router.model import InboundMessage
from tests.peers_telegram import TOKEN, BotApiEmulator

CHAT = 5001
OTHER = 5002


@pytest.fixture
def api() -> Iterator[BotApiEmulator]:
    """Yield a running Bot API emulator."""
    with BotApiEmulator() as emulator:
        yield emulator


class RecordingSink:
    """Commits like the store: the same (channel, external_id) twice is a duplicate."""

    def __init__(self) -> None:
        self.messages: list[InboundMessage] = []
        self.by_key: dict[str, InboundMessage] = {}
        self.fail = 0  # refuse this many calls (the store is down)
        self.calls = 0

    async def __call__(self, msg: InboundMessage) -> Receipt:
        self.calls += 1
        if self.fail > 0:
            self.fail -= 1
            raise RuntimeError("store unavailable")
        duplicate = msg.external_id in self.by_key
        if not duplicate:
            self.by_key[msg.external_id] = msg
            self.messages.append(msg)
        conversation = msg.conversation_hint or "C"
        return Receipt(
            message_id=f"m{len(self.messages)}",
            conversation_id=conversation,
            ticket="T-" + conversation,
            status_token="tok",
            state="queued",
            duplicate=duplicate,
        )


def make_config(api: BotApiEmulator, **overrides: Any) -> TelegramConfig:
    """Return a channel config pointed at the emulator."""
    raw: dict[str, Any] = {
        "type": "telegram",
        "name": "tg",
        "token": TOKEN,
        "base_url": api.base_url,
        "base_file_url": api.base_file_url,
        "poll_timeout": 5,
        "timeout": 5,
        **overrides,
    }
    return TelegramConfig.model_validate(raw)


def make_channel(api: BotApiEmulator, state_dir: Path, **overrides: Any) -> TelegramChannel:
    """Return a channel on the emulator with its state under state_dir."""
    ctx = DriverContext(state_dir, structlog.get_logger())
    return TelegramChannel("tg", make_config(api, **overrides), ctx)


async def until(fn: Callable[[], Any], within: float = 10.0, what: str = "") -> Any:
    """Await until fn() is truthy; return its value."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = await asyncio.to_thread(fn)
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {within}s: {what or fn}")
        await asyncio.sleep(0.02)


class Running:
    """`async with Running(channel, sink)`: run the channel, stop it on exit."""

    def __init__(
        self, channel: TelegramChannel, sink: Callable[[InboundMessage], Awaitable[Receipt]]
    ):
        self.channel = channel
        self.sink = sink
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> TelegramChannel:
        self.task = asyncio.create_task(self.channel.run(self.sink))
        await until(lambda: self.channel.state == DriverState.CONNECTED, what="connected")
        return self.channel

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.wait_for(self.channel.stop(), 10)
        assert self.task is not None
        await asyncio.wait_for(self.task, 10)


def ack(chat: int = CHAT, outbound_id: str = "ob-ack", language: str = "en") -> Outbound:
    """Return an acknowledgement for chat."""
    respond_by = (datetime.now(UTC) + timedelta(minutes=30)).isoformat()
    payload = AckPayload(
        conversation_id="01JTEST", subject="", respond_by=respond_by, language=language
    )
    return Outbound(id=outbound_id, channel="tg", to=str(chat), payload=payload)


def reply(text: str, chat: int = CHAT, outbound_id: str = "ob-reply") -> Outbound:
    """Return an agent's reply for chat."""
    payload = ReplyPayload(conversation_id="01JTEST", subject="", text=text, language="zh")
    return Outbound(id=outbound_id, channel="tg", to=str(chat), payload=payload)


# -- intake ---------------------------------------------------------------------------------


async def test_messages_are_committed_then_confirmed_and_threaded_per_chat(
    api: BotApiEmulator, tmp_path: Path
) -> None:
    sink = RecordingSink()
    channel = make_channel(api, tmp_path)
    async with Running(channel, sink):
        first = api.send_text(CHAT, "Hello, where is my order 4711?", last_name="Li")
        api.send_text(CHAT, "It was due on Monday.")
        api.send_text(OTHER, "你好，我的订单还没到。", first_name="", username="wang_w")
        await until(lambda: len(sink.messages) == 3, what="three commits")
        # The next getUpdates carries the offset: Telegram drops what it confirms.
        await until(lambda: not api.pending(), what="offset confirmed")
    # Chats are committed in parallel; each chat's messages in order.
    one, two = (m for m in sink.messages if m.contact_handle == str(CHAT))
    (three,) = (m for m in sink.messages if m.contact_handle == str(OTHER))
    message = first["message"]
    assert one.channel == "tg" and one.channel_type == "telegram"
    assert one.external_id == f"{CHAT}:{message['message_id']}"
    assert one.contact_handle == str(CHAT)
    assert one.contact_name == "Carol Li"
    assert one.text == "Hello, where is my order 4711?"
    assert one.received_at == datetime.fromtimestamp(message["date"], UTC)
    assert one.reply_ref == str(message["message_id"])
    assert json.loads(one.raw)["update_id"] == first["update_id"]
    assert one.payload_sha256 == hashlib.sha256(one.raw).hexdigest()
    assert one.conversation_hint and two.conversation_hint == one.conversation_hint
    assert three.contact_name == "@wang_w"
    assert three.conversation_hint != one.conversation_hint
    # getMe, then deleteWebhook (a webhook would block getUpdates), then long polls.
    methods = api.methods()
    assert methods[:3] == ["getMe", "deleteWebhook", "getUpdates"]
    polls = [p for m, p in api.calls if m == "getUpdates"]
    assert polls[0].get("allowed_updates") == ["message", "edited_message"]
    assert channel.state == DriverState.STOPPED


async def test_start_is_greeted_not_ticketed_and_groups_are_ignored(
    api: BotApiEmulator, tmp_path: Path
) -> None:
    sink = RecordingSink()
    channel = make_channel(api, tmp_path, greeting={"zh": "欢迎！请留言。"})
    async with Running(channel, sink):
        api.send_text(CHAT, "/start")
        api.send_text(OTHER, "/start promo-42", language_code="zh-hans")
        api.send_text(7001, "hello group", chat_type="group")
        api.send_text(CHAT, "A real question")
        await until(lambda: len(sink.messages) == 1 and not api.pending(), what="one commit")
    assert [m.text for m in sink.messages] == ["A real question"]
    assert [s.text for s in api.sent_to(CHAT)] == [DEFAULT_GREETINGS["en"]]
    assert [s.text for s in api.sent_to(OTHER)] == ["欢迎！请留言。"]
    assert api.sent_to(7001) == []
    assert channel.ignored == 1


async def test_groups_can_be_enabled(api: BotApiEmulator, tmp_path: Path) -> None:
    sink = RecordingSink()
    async with Running(make_channel(api, tmp_path, groups=True), sink):
        api.send_text(-7001, "hello from the group", chat_type="supergroup")
        await until(lambda: sink.messages, what="the group message")
    assert sink.messages[0].contact_handle == "-7001"


async def test_an_edit_joins_the_same_conversation_marked_as_an_edit(
    api: BotApiEmulator, tmp_path: Path
) -> None:
    sink = RecordingSink()
    async with Running(make_channel(api, tmp_path, thread_window=60), sink):
        original = api.send_text(CHAT, "My order 4711 is late")["message"]
        await until(lambda: len(sink.messages) == 1)
        edit = api.edit(original, "My order 4712 is late")
        await until(lambda: len(sink.messages) == 2, what="the edit")
    first, edited = sink.messages
    assert edited.text == "My order 4712 is late"
    assert edited.subject == EDITED_SUBJECT
    assert edited.conversation_hint == first.conversation_hint
    assert edited.external_id == f"{CHAT}:{original['message_id']}:edit:{edit['update_id']}"
    assert edited.external_id != first.external_id


async def test_the_edit_of_an_old_message_still_finds_its_thread(
    api: BotApiEmulator, tmp_path: Path
) -> None:
    sink = RecordingSink()
    channel = make_channel(api, tmp_path, thread_window=0.2)
    async with Running(channel, sink):
        original = api.send_text(CHAT, "first question")["message"]
        await until(lambda: len(sink.messages) == 1)
        await asyncio.sleep(0.3)  # the chat's thread goes quiet
        api.send_text(CHAT, "a new matter")
        await until(lambda: len(sink.messages) == 2)
        api.edit(original, "first question, corrected")
        await until(lambda: len(sink.messages) == 3)
    first, new, edit = sink.messages
    assert new.conversation_hint != first.conversation_hint
    assert edit.conversation_hint == first.conversation_hint


async def test_a_failed_commit_is_not_confirmed_and_the_reread_is_a_no_op(
    api: BotApiEmulator, tmp_path: Path
) -> None:
    sink = RecordingSink()
    channel = make_channel(api, tmp_path)
    async with Running(channel, sink):
        api.send_text(CHAT, "one")
        await until(lambda: len(sink.messages) == 1 and not api.pending())
    # The store fails on the next update: run() raises, the update stays unconfirmed.
    sink.fail = 1
    update = api.send_text(CHAT, "two")
    failing = make_channel(api, tmp_path)
    with pytest.raises(TransientError, match="sink failed"):
        await asyncio.wait_for(failing.run(sink), 10)
    assert failing.state == DriverState.TRANSIENT_DISCONNECT
    await failing.stop()
    assert api.pending() == [update["update_id"]]
    # A restart (a new instance: the offset lives only on Telegram's side) re-reads it.
    channel = make_channel(api, tmp_path)
    async with Running(channel, sink):
        await until(lambda: len(sink.messages) == 2 and not api.pending(), what="re-read")
    assert [m.text for m in sink.messages] == ["one", "two"]
    # Re-delivering the same update again changes nothing.
    api.push("message", update["message"])
    async with Running(make_channel(api, tmp_path), sink) as again:
        await until(lambda: again.duplicates == 1, what="the duplicate")
    assert len(sink.messages) == 2


async def test_photos_documents_voice_and_captions_are_kept_as_attachments(
    api: BotApiEmulator, tmp_path: Path
) -> None:
    small = api.add_file(b"small-jpeg", "photos/file_1.jpg")
    big_bytes = b"\xff\xd8" + bytes(range(256)) * 40
    big = api.add_file(big_bytes, "photos/file_2.jpg")
    pdf = api.add_file(b"%PDF-1.4 invoice", "documents/file_3.pdf")
    voice = api.add_file(b"OggS voice", "voice/file_4.oga")
    huge = api.add_file(b"x" * 10, "documents/file_5.zip", size=30 * 1024 * 1024)
    sink = RecordingSink()
    async with Running(make_channel(api, tmp_path), sink):
        sizes = [{**small, "width": 90, "height": 90}, {**big, "width": 800, "height": 600}]
        api.push("message", api.message(CHAT, caption="Broken on arrival", photo=sizes))
        doc = {**pdf, "file_name": "../../invoice 4711.pdf", "mime_type": "application/pdf"}
        api.push("message", api.message(CHAT, document=doc))
        api.push("message", api.message(CHAT, voice={**voice, "duration": 3}))
        big_doc = {**huge, "file_name": "logs.zip", "mime_type": "application/zip"}
        api.push("message", api.message(CHAT, caption="logs", document=big_doc))
        await until(lambda: len(sink.messages) == 4, what="four messages")
    photo, document, spoken, too_big = sink.messages
    assert photo.text == "Broken on arrival"
    (att,) = photo.attachments
    assert att.size == len(big_bytes) and att.mime_type == "image/jpeg"
    assert att.sha256 == hashlib.sha256(big_bytes).hexdigest()
    kept = await asyncio.to_thread(Path(att.storage_ref.removeprefix("file:")).read_bytes)
    assert kept == big_bytes
    (att,) = document.attachments
    assert att.name == "invoice 4711.pdf" and att.mime_type == "application/pdf"
    assert document.text == ""
    (att,) = spoken.attachments
    assert att.mime_type == "audio/ogg" and att.size == len(b"OggS voice")
    # Over the Bot API's 20 MB: listed, not downloaded.
    (att,) = too_big.attachments
    assert att.size == 30 * 1024 * 1024 and att.storage_ref == "" and att.sha256 == ""
    assert too_big.text == "logs"
    downloads = [p["file_id"] for m, p in api.calls if m == "getFile"]
    assert downloads == [big["file_id"], pdf["file_id"], voice["file_id"]]


async def test_an_invalid_token_parks_the_channel(api: BotApiEmulator, tmp_path: Path) -> None:
    api.reject_token = True
    channel = make_channel(api, tmp_path)
    with pytest.raises(AuthFailed) as info:
        await asyncio.wait_for(channel.run(RecordingSink()), 10)
    assert channel.state == DriverState.BAD_CREDENTIALS
    assert TOKEN not in str(info.value) and TOKEN not in channel.last_error
    await channel.stop()


# -- sends ----------------------------------------------------------------------------------


async def test_ack_and_replies_split_at_4096_utf16_units(
    api: BotApiEmulator, tmp_path: Path
) -> None:
    channel = make_channel(api, tmp_path)
    await channel.send(ack())
    (sent,) = api.sent_to(CHAT)
    assert "T-01JTEST" in sent.text and "min" in sent.text
    await channel.send(ack(OTHER, "ob-ack-zh", language="zh"))
    assert "工单号 T-01JTEST" in api.sent_to(OTHER)[0].text

    chinese = ("您好，您的订单已经发货，预计三天内送达。" * 200)[:4000]
    await channel.send(reply(chinese, outbound_id="r1"))
    assert api.sent_to(CHAT)[-1].text == chinese  # 4,000 BMP characters: one message

    longer = ("请耐心等待。" * 700) + "谢谢"  # 4,202 characters
    await channel.send(reply(longer, outbound_id="r2"))
    one, two = (s.text for s in api.sent_to(CHAT)[-2:])
    assert utf16_units(one) <= 4096 and utf16_units(two) <= 4096
    assert one + two == longer  # split after a full stop: nothing lost or added
    assert one.endswith("。")
    await channel.stop()


async def test_a_retry_after_a_failed_second_part_does_not_resend_the_first(
    api: BotApiEmulator, tmp_path: Path
) -> None:
    channel = make_channel(api, tmp_path)
    text = "a" * 3000 + "\n" + "b" * 3000 + "\n" + "c" * 3000
    api.fail_send_call = {2: 502}  # the second part fails once
    with pytest.raises(TransientError):
        await channel.send(reply(text, outbound_id="split-1"))
    assert len(api.sent_to(CHAT)) == 1
    await channel.send(reply(text, outbound_id="split-1"))
    parts = [s.text for s in api.sent_to(CHAT)]
    assert len(parts) == 3 and "\n".join(parts) == text
    assert parts == ["a" * 3000, "b" * 3000, "c" * 3000]
    # A new process (same state dir) knows the outbound is complete too.
    await channel.stop()
    again = make_channel(api, tmp_path)
    await again.send(reply(text, outbound_id="split-1"))
    assert len(api.sent_to(CHAT)) == 3
    await again.stop()


async def test_flood_control_pauses_the_chat_and_the_bot(
    api: BotApiEmulator, tmp_path: Path
) -> None:
    channel = make_channel(api, tmp_path)
    api.rate_limits = [2]
    with pytest.raises(RateLimited) as info:
        await channel.send(reply("hello", outbound_id="a"))
    assert info.value.retry_after == 2
    calls = len(api.calls)
    # Other sends obey the pause without asking Telegram.
    with pytest.raises(RateLimited) as other:
        await channel.send(reply("hi", chat=OTHER, outbound_id="b"))
    assert 0 < other.value.retry_after <= 2
    assert len(api.calls) == calls
    channel._paused.clear()  # the pause has passed
    await channel.send(reply("hello", outbound_id="a"))
    assert [s.text for s in api.sent_to(CHAT)] == ["hello"]
    await channel.stop()


async def test_a_blocked_bot_is_a_permanent_error_until_the_customer_writes_again(
    api: BotApiEmulator, tmp_path: Path
) -> None:
    channel = make_channel(api, tmp_path)
    api.blocked.add(CHAT)
    with pytest.raises(PermanentError, match=BLOCKED):
        await channel.send(reply("hello", outbound_id="a"))
    calls = len(api.calls)
    with pytest.raises(PermanentError, match=BLOCKED):
        await channel.send(ack(outbound_id="b"))
    assert len(api.calls) == calls  # known unreachable: Telegram is not asked again
    # The customer unblocks the bot and writes: the chat is reachable again.
    api.blocked.clear()
    sink = RecordingSink()
    async with Running(channel, sink):
        api.send_text(CHAT, "sorry, unblocked you")
        await until(lambda: sink.messages)
    again = make_channel(api, tmp_path)
    await again.send(reply("welcome back", outbound_id="c"))
    assert [s.text for s in api.sent_to(CHAT)] == ["welcome back"]
    await again.stop()


async def test_a_bad_chat_id_and_unknown_kinds_are_permanent(
    api: BotApiEmulator, tmp_path: Path
) -> None:
    channel = make_channel(api, tmp_path)
    with pytest.raises(PermanentError, match="not a chat id"):
        await channel.send(reply("x", chat="carol@example.com"))  # type: ignore[arg-type]
    await channel.stop()


# -- webhook --------------------------------------------------------------------------------


async def test_webhook_mode_checks_the_secret_and_answers_after_commit(
    api: BotApiEmulator, tmp_path: Path
) -> None:
    from tests.peers import free_port

    port = free_port()
    secret = "s3cret_token-ABC"
    sink = RecordingSink()
    channel = make_channel(
        api,
        tmp_path,
        mode="webhook",
        webhook_port=port,
        webhook_path="/tg/hook",
        webhook_url=f"http://127.0.0.1:{port}/tg/hook",
        webhook_secret=secret,
        max_body_bytes=4096,
    )
    async with Running(channel, sink):
        assert api.webhook is not None
        assert api.webhook["url"] == f"http://127.0.0.1:{port}/tg/hook"
        assert api.webhook["secret_token"] == secret
        assert api.webhook["allowed_updates"] == ["message", "edited_message"]
        assert "getUpdates" not in api.methods()

        update = {"update_id": 900, "message": api.message(CHAT, "via webhook")}
        assert await api.deliver(update, secret="wrong") == 403
        assert await api.deliver(update, secret="") == 403
        assert await api.deliver(update, omit_secret=True) == 403
        assert sink.calls == 0
        assert await api.deliver(update) == 200
        assert [m.text for m in sink.messages] == ["via webhook"]
        assert await api.deliver(update) == 200  # Telegram's retry: a no-op
        assert len(sink.messages) == 1

        # Bad input: a clear 4xx, nothing stored.
        assert await api.deliver(b"{not json") == 400
        assert await api.deliver(b'{"hello": "world"}') == 400
        assert await api.deliver(b"\xff\xfe") == 400
        assert await api.deliver(b'{"update_id": 1, "message": {"text": "no chat"}}') == 400
        oversize = {"update_id": 901, "message": api.message(CHAT, "x" * 8000)}
        assert await api.deliver(oversize) == 413
        assert len(sink.messages) == 1

        # The store is down: 503, so Telegram retries; the retry commits.
        sink.fail = 1
        later = {"update_id": 902, "message": api.message(CHAT, "second")}
        assert await api.deliver(later) == 503
        assert await api.deliver(later) == 200
        assert [m.text for m in sink.messages] == ["via webhook", "second"]


# -- config ----------------------------------------------------------------------------------


def test_config_refuses_what_cannot_work(api: BotApiEmulator) -> None:
    with pytest.raises(ValidationError, match="webhook_url and webhook_secret"):
        make_config(api, mode="webhook")
    with pytest.raises(ValidationError, match="https"):
        make_config(api, base_url="http://api.example.com/bot")
    with pytest.raises(ValidationError, match="bot token"):
        make_config(api, token="12/../x")
    with pytest.raises(ValidationError, match="A-Z"):
        make_config(api, mode="webhook", webhook_url="https://x.example/h", webhook_secret="a b")
    with pytest.raises(ValidationError, match="en, zh"):
        make_config(api, greeting={"fr": "Bonjour"})
    with pytest.raises(ValidationError):
        make_config(api, max_attachment_bytes=21 * 1024 * 1024)
    assert make_config(api).greeting["zh"]


# -- splitting -------------------------------------------------------------------------------


def test_split_never_breaks_a_character_or_an_emoji_sequence() -> None:
    family = "👨\u200d👩\u200d👧"  # 8 UTF-16 units, one grapheme
    text = "a" * 4093 + family + "tail"
    parts = split_message(text)
    assert all(utf16_units(p) <= 4096 for p in parts)
    assert "".join(parts) == text
    assert parts[1].startswith(family)
    flags = "🇩🇪🇨🇳" * 1100  # regional indicator pairs, 4 units per flag
    parts = split_message(flags)
    assert "".join(parts) == flags
    assert all(len(p) % 2 == 0 and utf16_units(p) <= 4096 for p in parts)
    combining = "e\u0301" * 3000
    parts = split_message(combining)
    assert all(not p.startswith("\u0301") for p in parts)


@settings(max_examples=200, deadline=None)
@given(
    st.text(
        alphabet=st.sampled_from([*"ab 。\n\u200d\u0301中😀🇩", "\U0001f1ea"]),
        max_size=400,
    )
)
def test_split_parts_fit_and_keep_the_text(text: str) -> None:
    limit = 40
    parts = split_message(text, limit)
    assert all(utf16_units(p) <= limit for p in parts)
    position = 0
    for part in parts:
        found = text.find(part, position)
        assert found >= 0
        # Only the separator a part was cut at (a space or line break) is dropped.
        assert not text[position:found].strip() and found - position <= 2
        position = found + len(part)
    assert not text[position:].strip()


def test_the_commented_example_block_is_valid_when_uncommented(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from router.config import load_config

    example = Path(__file__).resolve().parents[1] / "config" / "omnirouter.example.toml"
    text = example.read_text(encoding="utf-8")
    block = text[text.index('# type = "telegram"') : text.index("# A mailbox")]
    lines = [
        line[2:]
        for line in block.splitlines()
        if line.startswith("# ") and re.match(r"^[a-z_]+ = |^\[channels\.", line[2:])
    ]
    toml = "[[channels]]\n" + "\n".join(lines).replace('mode = "polling"', 'mode = "webhook"')
    monkeypatch.setenv("OMNIROUTER_TELEGRAM_TOKEN", "123456:example")
    monkeypatch.setenv("OMNIROUTER_TELEGRAM_WEBHOOK_SECRET", "example_secret-1")
    path = tmp_path / "omnirouter.toml"
    path.write_text(toml, encoding="utf-8")
    (channel,) = load_config(path).channels
    assert channel.type == "telegram" and channel.mode == "webhook"
    assert channel.ack.timezone == "Asia/Shanghai" and channel.greeting["zh"]
