"""The email channel against a real Dovecot (IMAP) and aiosmtpd (SMTP) on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
import json
import os
import secrets
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aioimaplib
import pytest
import structlog

from channels.email import EmailChannel, EmailConfig
from channels.email.imap import ImapSession
from channels.email.smtp import message_id_for
from router.delivery import AckPayload, ReplyPayload
from router.drivers import (
    CHANNELS,
    AuthFailed,
    DriverContext,
    DriverState,
    Outbound,
    PermanentError,
    Receipt,
    TransientError,
    load_driver,
)
from router.model import InboundMessage, new_ulid
from tests import peers_mail
from tests.peers import self_signed_cert, wait_until
from tests.peers_mail import PASSWORD, USER, Dovecot, SmtpServer, smtp_authenticator

dovecot = peers_mail.dovecot
dovecot_tls = peers_mail.dovecot_tls
smtp_sink = peers_mail.smtp_sink


class RecordingSink:
    """A sink that keeps the store's contract: (channel, external_id) is unique, and a
    conversation is (contact, conversation_hint), as the pipeline's thread key."""

    def __init__(self) -> None:
        """Start empty."""
        self.calls: list[InboundMessage] = []
        self.stored: list[InboundMessage] = []
        self.receipts: dict[tuple[str, str], Receipt] = {}
        self.conversations: dict[tuple[str, str], str] = {}
        self.fail_next = 0
        self.changed = asyncio.Event()

    async def __call__(self, message: InboundMessage) -> Receipt:
        """Commit unless seen; return the receipt."""
        self.calls.append(message)
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("database is locked")
        key = (message.channel, message.external_id)
        if key in self.receipts:
            return dataclasses.replace(self.receipts[key], duplicate=True)
        thread = (message.contact_handle, message.conversation_hint or new_ulid())
        conversation = self.conversations.setdefault(thread, new_ulid())
        receipt = Receipt(
            message_id=new_ulid(),
            conversation_id=conversation,
            ticket="T-" + conversation,
            status_token=secrets.token_urlsafe(8),
            state="queued",
        )
        self.receipts[key] = receipt
        self.stored.append(message)
        self.changed.set()
        return receipt

    async def wait_for(self, count: int, within: float = 10.0) -> list[InboundMessage]:
        """Wait until `count` messages are stored."""
        await wait_until(lambda: len(self.stored) >= count, within=within, interval=0.02)
        return self.stored

    def ticket_of(self, message: InboundMessage) -> str:
        """Return the ticket the message was committed under."""
        return self.receipts[(message.channel, message.external_id)].ticket


def mail(n: int, *, subject: str = "", sender: str = "carol@example.com", **headers: str) -> bytes:
    """Return a small distinct mail."""
    msg = EmailMessage()
    msg["From"] = f"Carol <{sender}>"
    msg["To"] = "support@shop.test"
    msg["Subject"] = subject or f"question {n}"
    msg["Message-ID"] = f"<m{n}.{secrets.token_hex(4)}@example.com>"
    msg["Date"] = "Tue, 14 May 2024 10:20:30 +0000"
    for key, value in headers.items():
        msg[key.replace("_", "-")] = value
    msg.set_content(f"My order {n} has not arrived.")
    return msg.as_bytes()


async def imap_client(server: Dovecot) -> aioimaplib.IMAP4:
    """Return a logged-in test client."""
    client = aioimaplib.IMAP4(server.host, server.port, timeout=10)
    await client.wait_hello_from_server()
    await client.login(USER, PASSWORD)
    return client


async def append(server: Dovecot, *raws: bytes, folder: str = "INBOX") -> None:
    """APPEND mails as another client would deliver them."""
    client = await imap_client(server)
    try:
        for raw in raws:
            response = await client.append(raw, mailbox=folder)
            assert response.result == "OK", response
    finally:
        await client.logout()


async def flags(server: Dovecot, folder: str = "INBOX") -> list[str]:
    """Return the FLAGS of every message in the folder, in order."""
    client = await imap_client(server)
    try:
        await client.select(folder)
        response = await client.fetch("1:*", "(FLAGS)")
        return [bytes(x).decode() for x in response.lines if b" FETCH (" in bytes(x)]
    finally:
        await client.logout()


def config(server: Dovecot, smtp_port: int = 2525, **imap: Any) -> EmailConfig:
    """Return a config for the test server (plain on loopback, short timers)."""
    settings: dict[str, Any] = {
        "host": server.host,
        "port": server.port,
        "tls": "none",
        "username": USER,
        "password": PASSWORD,
        "idle_renew": 30,
        "poll_interval": 0.2,
        "timeout": 5,
        "reconnect_min": 0.05,
        "reconnect_max": 0.3,
        "auth_retry_interval": 60,
        **imap,
    }
    return EmailConfig.model_validate(
        {
            "type": "email",
            "name": "support",
            "imap": settings,
            "smtp": {
                "host": "127.0.0.1",
                "port": smtp_port,
                "tls": "none",
                "from_address": "support@shop.test",
                "from_name": "Shop Support",
                "timeout": 5,
            },
        }
    )


@asynccontextmanager
async def running(
    cfg: EmailConfig, state_dir: Path, sink: RecordingSink
) -> AsyncIterator[EmailChannel]:
    """Run a channel in a task; stop it (and check it ended cleanly) afterwards."""
    channel = EmailChannel("support", cfg, DriverContext(state_dir, structlog.get_logger()))
    task = asyncio.create_task(channel.run(sink))
    try:
        yield channel
    finally:
        await asyncio.wait_for(channel.stop(), 10)
        await asyncio.wait_for(task, 10)
        assert channel.state == DriverState.STOPPED


def cursor(state_dir: Path) -> dict[str, Any]:
    """Return the persisted cursor."""
    data: dict[str, Any] = json.loads((state_dir / "email" / "support" / "cursor.json").read_text())
    return data


def test_registered() -> None:
    assert load_driver(CHANNELS, "email") is EmailChannel
    assert EmailChannel.config_model is EmailConfig


# -- intake ----------------------------------------------------------------------------


async def test_intake_commits_each_mail_once_in_order_and_leaves_the_mailbox_alone(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    await append(dovecot, mail(1), mail(2), mail(3))
    sink = RecordingSink()
    async with running(config(dovecot), tmp_path, sink) as channel:
        stored = await sink.wait_for(3)
        await asyncio.wait_for(channel.synced.wait(), 10)
        assert channel.state == DriverState.CONNECTED
        assert channel.lag is not None and channel.lag < 5
    assert [m.text for m in stored] == [f"My order {n} has not arrived." for n in (1, 2, 3)]
    validity = cursor(tmp_path)["uidvalidity"]
    assert [m.external_id for m in stored] == [f"{validity}:{uid}" for uid in (1, 2, 3)]
    assert cursor(tmp_path)["last_uid"] == 3
    assert len(sink.calls) == 3
    m = stored[0]
    assert (m.channel, m.channel_type, m.contact_handle, m.contact_name) == (
        "support",
        "email",
        "carol@example.com",
        "Carol",
    )
    assert m.received_at == datetime(2024, 5, 14, 10, 20, 30, tzinfo=UTC)
    assert m.raw.startswith(b"From: Carol") and len(m.payload_sha256) == 64
    # Non-destructive by default: nothing was marked \Seen, moved or deleted.
    assert all("\\Seen" not in f for f in await flags(dovecot))
    assert len(await flags(dovecot)) == 3


async def test_only_our_servers_dmarc_pass_vouches_for_the_sender(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """The sender's address links contacts only with our MX's DMARC pass above the rest."""
    ours = "mx.shop.test; spf=pass smtp.mailfrom=example.com; dmarc=pass header.from=example.com"
    forged = "mx.shop.test; dmarc=pass header.from=example.com"
    await append(
        dovecot,
        mail(1, Authentication_Results=ours),
        mail(2, Authentication_Results="mx.other.test; dmarc=pass header.from=example.com"),
        mail(3),
    )
    # The sender's own forged "pass" sits below the header our server added on top.
    ours_fail = b"Authentication-Results: mx.shop.test; dmarc=fail header.from=example.com\n"
    await append(dovecot, ours_fail + mail(4, Authentication_Results=forged))
    cfg = config(dovecot).model_copy(update={"authserv_id": "mx.shop.test"})
    sink = RecordingSink()
    async with running(cfg, tmp_path, sink):
        stored = await sink.wait_for(4)
    assert [m.identifiers for m in stored] == [("email:carol@example.com",), (), (), ()]


async def test_idle_delivers_a_new_mail_quickly(dovecot: Dovecot, tmp_path: Path) -> None:
    sink = RecordingSink()
    async with running(config(dovecot, poll_interval=60), tmp_path, sink) as channel:
        await asyncio.wait_for(channel.synced.wait(), 10)
        await asyncio.sleep(0.2)  # let IDLE start
        started = time.monotonic()
        await append(dovecot, mail(7))
        await sink.wait_for(1, within=5)
        latency = time.monotonic() - started
    assert latency < 3.0  # dovecot's own notify delay is ~0.5-1 s
    assert sink.stored[0].text == "My order 7 has not arrived."


async def test_polling_without_idle(
    dovecot: Dovecot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Dovecot offers IDLE, so a mail arriving proves nothing by itself: check that
    # no IDLE command goes out and that the folder is searched every poll_interval.
    idles: list[float] = []
    searches: list[float] = []
    idle_start = aioimaplib.IMAP4.idle_start
    new_uids = ImapSession.new_uids

    async def spy_idle_start(client: aioimaplib.IMAP4, timeout: float = 1740.0) -> Any:
        idles.append(timeout)
        return await idle_start(client, timeout=timeout)

    async def spy_new_uids(session: ImapSession, after: int, *args: Any) -> Any:
        searches.append(time.monotonic())
        return await new_uids(session, after, *args)

    monkeypatch.setattr(aioimaplib.IMAP4, "idle_start", spy_idle_start)
    monkeypatch.setattr(ImapSession, "new_uids", spy_new_uids)
    sink = RecordingSink()
    cfg = config(dovecot, idle=False, poll_interval=0.1, idle_renew=30)
    async with running(cfg, tmp_path, sink) as ch:
        await asyncio.wait_for(ch.synced.wait(), 10)
        await append(dovecot, mail(1))
        await sink.wait_for(1)
        # Polling searches the folder every poll_interval (0.1 s), new mail or not.
        seen = len(searches)
        await wait_until(lambda: len(searches) >= seen + 3, within=5)
    assert idles == []


async def test_noise_and_senderless_mail_are_not_routed_but_passed(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    no_sender = b"To: support@shop.test\r\nSubject: who\r\nMessage-ID: <ns@x>\r\n\r\nhi\r\n"
    await append(
        dovecot,
        mail(1, Auto_Submitted="auto-replied"),
        mail(2, List_Id="<news.example.com>"),
        no_sender,
        mail(4),
    )
    sink = RecordingSink()
    with structlog.testing.capture_logs() as logs:
        async with running(config(dovecot), tmp_path, sink) as channel:
            await sink.wait_for(1)
            await wait_until(lambda: cursor(tmp_path)["last_uid"] == 4)
    assert [m.text for m in sink.calls] == ["My order 4 has not arrived."]
    assert (channel.noise, channel.rejected) == (2, 1)
    events = {(e["event"], e.get("reason")) for e in logs}
    assert ("email.noise", "auto_submitted:auto-replied") in events
    assert ("email.noise", "mailing_list") in events
    assert ("email.rejected", "no_sender_address") in events


async def test_cursor_survives_a_restart_without_repeats(dovecot: Dovecot, tmp_path: Path) -> None:
    await append(dovecot, mail(1), mail(2))
    first = RecordingSink()
    async with running(config(dovecot), tmp_path, first):
        await first.wait_for(2)
    await append(dovecot, mail(3))
    second = RecordingSink()
    async with running(config(dovecot), tmp_path, second) as channel:
        await second.wait_for(1)
        await asyncio.wait_for(channel.synced.wait(), 10)
    assert [m.text for m in second.calls] == ["My order 3 has not arrived."]
    assert cursor(tmp_path)["last_uid"] == 3


async def test_uidvalidity_change_rescans_without_doubles(dovecot: Dovecot, tmp_path: Path) -> None:
    await append(dovecot, mail(1), mail(2))
    sink = RecordingSink()
    async with running(config(dovecot), tmp_path, sink):
        await sink.wait_for(2)
    old = cursor(tmp_path)["uidvalidity"]
    dovecot.uidvalidity_reset()
    await append(dovecot, mail(3))
    with structlog.testing.capture_logs() as logs:
        async with running(config(dovecot), tmp_path, sink) as channel:
            await sink.wait_for(3)
            await wait_until(lambda: channel.duplicates == 2)
    assert cursor(tmp_path)["uidvalidity"] != old
    assert cursor(tmp_path)["last_uid"] == 3
    assert [m.text for m in sink.stored] == [f"My order {n} has not arrived." for n in (1, 2, 3)]
    assert len(sink.calls) == 3  # the two old mails never reached the sink again
    assert any(e["event"] == "email.uidvalidity_changed" for e in logs)


async def test_server_killed_during_idle_then_back_loses_and_doubles_nothing(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    await append(dovecot, mail(1))
    sink = RecordingSink()
    async with running(config(dovecot, poll_interval=60), tmp_path, sink) as channel:
        await sink.wait_for(1)
        await asyncio.wait_for(channel.synced.wait(), 10)
        await asyncio.sleep(0.2)  # in IDLE now
        dovecot.kill()
        await wait_until(lambda: channel.state == DriverState.TRANSIENT_DISCONNECT)
        assert "connection lost" in channel.last_error or "imap" in channel.last_error
        # Mail arrives while the server is down (delivered straight into the maildir).
        deliver_to_maildir(dovecot, mail(2))
        dovecot.start()
        await sink.wait_for(2, within=15)
        await wait_until(lambda: channel.state == DriverState.CONNECTED)
        await append(dovecot, mail(3))
        await sink.wait_for(3)
    assert [m.text for m in sink.stored] == [f"My order {n} has not arrived." for n in (1, 2, 3)]
    assert len(sink.calls) == 3


def deliver_to_maildir(server: Dovecot, raw: bytes) -> None:
    """Drop a mail into the user's Maildir/new as an MDA would."""
    maildir = server.dir / "mail" / USER / "Maildir"
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(maildir / sub, server.uid, server.gid)
    name = f"{time.time_ns()}.test.{secrets.token_hex(4)}"
    tmp = maildir / "tmp" / name
    tmp.write_bytes(raw)
    if os.geteuid() == 0:
        os.chown(tmp, server.uid, server.gid)
    tmp.rename(maildir / "new" / name)


async def test_sink_failure_is_retried_and_commits_once(dovecot: Dovecot, tmp_path: Path) -> None:
    await append(dovecot, mail(1), mail(2))
    sink = RecordingSink()
    sink.fail_next = 2
    async with running(config(dovecot, mark_seen=True), tmp_path, sink):
        await sink.wait_for(2)
        await wait_until(lambda: cursor(tmp_path)["last_uid"] == 2)
    assert [m.text for m in sink.stored] == [
        "My order 1 has not arrived.",
        "My order 2 has not arrived.",
    ]
    assert len(sink.calls) == 4  # two failed attempts on the first mail, then one each
    assert all("\\Seen" in f for f in await flags(dovecot))


async def test_move_after_commit(dovecot: Dovecot, tmp_path: Path) -> None:
    await append(dovecot, mail(1), mail(2))
    sink = RecordingSink()
    async with running(config(dovecot, move_to="Processed"), tmp_path, sink):
        await sink.wait_for(2)
        await wait_until(lambda: cursor(tmp_path)["last_uid"] == 2)
    assert await flags(dovecot) == []
    assert len(await flags(dovecot, "Processed")) == 2


async def test_bad_password_parks_the_channel(dovecot: Dovecot, tmp_path: Path) -> None:
    sink = RecordingSink()
    with structlog.testing.capture_logs() as logs:
        async with running(config(dovecot, password="wrong-password"), tmp_path, sink) as ch:
            await wait_until(lambda: ch.state == DriverState.BAD_CREDENTIALS)
            await asyncio.sleep(0.3)
            assert "AUTHENTICATIONFAILED" in ch.last_error
    transitions = [e for e in logs if e.get("new") == "bad_credentials"]
    assert len(transitions) == 1  # logged once, not retried at speed
    assert (
        dovecot.log_text().count("auth failed") + dovecot.log_text().count("Authentication failed")
        <= 2
    )


async def test_threading_follow_ups_join_the_conversation(dovecot: Dovecot, tmp_path: Path) -> None:
    first = mail(1, subject="Parcel missing")
    first_id = email.message_from_bytes(first, policy=email.policy.default)["Message-ID"]
    await append(dovecot, first)
    sink = RecordingSink()
    async with running(config(dovecot), tmp_path, sink):
        (original,) = await sink.wait_for(1)
        ticket = sink.ticket_of(original)
        # A reply to the original by headers, and one that keeps only the ticket token.
        await append(
            dovecot,
            mail(2, subject="Re: Parcel missing", In_Reply_To=first_id, References=first_id),
            mail(3, subject=f"still waiting [#{ticket}]"),
            mail(4, subject="a new question"),
        )
        stored = await sink.wait_for(4)
    tickets = [sink.ticket_of(m) for m in stored]
    assert tickets[0] == tickets[1] == tickets[2] == ticket
    assert tickets[3] != ticket
    assert stored[0].conversation_hint == first_id


async def test_oversize_mail_is_fetched_as_a_prefix_and_flagged(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    big = EmailMessage()
    big["From"] = "dan@example.com"
    big["Subject"] = "logs"
    big["Message-ID"] = "<big@example.com>"
    big.set_content("See the attached log.")
    big.add_attachment(os.urandom(300_000), maintype="application", subtype="octet-stream")
    await append(dovecot, big.as_bytes())
    cfg = config(dovecot).model_copy(update={"max_message_bytes": 64 * 1024})
    sink = RecordingSink()
    async with running(cfg, tmp_path, sink):
        (message,) = await sink.wait_for(1)
    assert len(message.raw) == 64 * 1024
    assert message.text.startswith("See the attached log.")
    assert "[message truncated" in message.text
    (att,) = message.attachments
    assert att.storage_ref == ""  # incomplete: not stored


async def test_attachments_are_stored_content_addressed(dovecot: Dovecot, tmp_path: Path) -> None:
    msg = EmailMessage()
    msg["From"] = "eve@example.com"
    msg["Message-ID"] = "<att@example.com>"
    msg.set_content("invoice attached")
    msg.add_attachment(b"%PDF-1.4", maintype="application", subtype="pdf", filename="../inv.pdf")
    await append(dovecot, msg.as_bytes())
    sink = RecordingSink()
    async with running(config(dovecot), tmp_path, sink):
        (message,) = await sink.wait_for(1)
    (att,) = message.attachments
    assert att.name == "inv.pdf" and att.size == 8
    path = Path(att.storage_ref.removeprefix("file:"))
    assert await asyncio.to_thread(path.read_bytes) == b"%PDF-1.4"
    assert path.name == att.sha256


# -- TLS -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
async def test_tls_modes_verify_the_certificate(
    dovecot_tls: Dovecot, tmp_path: Path, mode: str
) -> None:
    assert dovecot_tls.cert is not None
    port = dovecot_tls.port if mode == "starttls" else dovecot_tls.imaps_port
    await append(dovecot_tls, mail(1))
    sink = RecordingSink()
    cfg = config(dovecot_tls, tls=mode, port=port, ca_file=str(dovecot_tls.cert))
    async with running(cfg, tmp_path / "ok", sink):
        await sink.wait_for(1)
    # Without trusting the self-signed certificate the channel refuses to talk.
    untrusted = RecordingSink()
    async with running(config(dovecot_tls, tls=mode, port=port), tmp_path / "no", untrusted) as ch:
        await wait_until(lambda: ch.state == DriverState.TRANSIENT_DISCONNECT)
        assert "certificate" in ch.last_error.lower()
    assert untrusted.calls == []
    # The explicit opt-out connects (and says so in the log).
    with structlog.testing.capture_logs() as logs:
        cfg = config(dovecot_tls, tls=mode, port=port, tls_verify=False)
        async with running(cfg, tmp_path / "optout", untrusted):
            await untrusted.wait_for(1)
    assert any(e["event"] == "email.tls_verify_disabled" for e in logs)


async def test_starttls_required_but_not_offered_parks(dovecot: Dovecot, tmp_path: Path) -> None:
    sink = RecordingSink()
    async with running(config(dovecot, tls="starttls"), tmp_path, sink) as ch:
        await wait_until(lambda: ch.state == DriverState.BAD_CREDENTIALS)
        assert "STARTTLS" in ch.last_error


# -- SMTP ------------------------------------------------------------------------------


def outbound(**overrides: Any) -> Outbound:
    """Return an acknowledgement (or, with kind="reply", a reply) for a customer mail."""
    values: dict[str, Any] = {
        "id": "ob-01HZX",
        "channel": "support",
        "kind": "ack",
        "ticket": "T-01HZX",
        "to": "carol@example.com",
        "text": "",
        "subject": "Parcel missing",
        "in_reply_to": "<m1@example.com>",
        "references": ("<m0@example.com>",),
        "respond_by": datetime(2025, 1, 2, 15, 30, tzinfo=UTC),
        "language": "",
        "attempt": 1,
    }
    values.update(overrides)
    common = {
        "conversation_id": values["ticket"].removeprefix("T-"),
        "subject": values["subject"],
        "language": values["language"],
        "in_reply_to": values["in_reply_to"],
        "references": tuple(values["references"]),
    }
    payload: AckPayload | ReplyPayload
    if values["kind"] == "ack":
        payload = AckPayload(respond_by=values["respond_by"].isoformat(), **common)
    else:
        payload = ReplyPayload(text=values["text"], **common)
    return Outbound(
        id=values["id"],
        channel=values["channel"],
        to=values["to"],
        payload=payload,
        attempt=values["attempt"],
    )


def smtp_channel(tmp_path: Path, port: int, **smtp: Any) -> EmailChannel:
    """Return a channel whose SMTP side points at port."""
    cfg = EmailConfig.model_validate(
        {
            "type": "email",
            "name": "support",
            "imap": {"host": "127.0.0.1", "tls": "none", "username": "u", "password": "p"},
            "smtp": {
                "host": "127.0.0.1",
                "port": port,
                "tls": "none",
                "from_address": "support@shop.test",
                "from_name": "Shop Support",
                "timeout": 5,
                **smtp,
            },
        }
    )
    return EmailChannel("support", cfg, DriverContext(tmp_path, structlog.get_logger()))


def received(server: SmtpServer, index: int = -1) -> EmailMessage:
    """Parse one mail the SMTP sink received."""
    parsed = email.message_from_bytes(server.sink.messages[index][2], policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


async def test_ack_is_a_proper_threaded_auto_reply(smtp_sink: SmtpServer, tmp_path: Path) -> None:
    channel = smtp_channel(tmp_path, smtp_sink.port)
    await channel.send(outbound())
    sender, rcpts, _ = smtp_sink.sink.messages[0]
    assert (sender, rcpts) == ("support@shop.test", ["carol@example.com"])
    msg = received(smtp_sink)
    assert msg["From"] == "Shop Support <support@shop.test>"
    assert msg["To"] == "carol@example.com"
    assert msg["Subject"] == "Re: Parcel missing [#T-01HZX]"
    assert msg["Message-ID"] == "<ob-01HZX@shop.test>"
    assert msg["In-Reply-To"] == "<m1@example.com>"
    assert msg["References"] == "<m0@example.com> <m1@example.com>"
    assert msg["Auto-Submitted"] == "auto-replied"
    body = msg.get_content()
    assert "T-01HZX" in body and "2025 15:30 UTC" in body


async def test_ack_in_chinese_and_reply_without_auto_submitted(
    smtp_sink: SmtpServer, tmp_path: Path
) -> None:
    channel = smtp_channel(tmp_path, smtp_sink.port)
    await channel.send(outbound(subject="回复: 订单问题", language="zh"))
    msg = received(smtp_sink)
    assert msg["Subject"] == "Re: 订单问题 [#T-01HZX]"
    assert "工单号为 T-01HZX" in msg.get_content() and "2025年01月02日 15:30" in msg.get_content()
    await channel.send(outbound(id="ob-2", kind="reply", text="Your parcel left today.\n你好"))
    reply = received(smtp_sink)
    assert reply["Auto-Submitted"] is None
    assert reply.get_content().replace("\r\n", "\n").strip() == "Your parcel left today.\n你好"
    assert reply["Message-ID"] == "<ob-2@shop.test>"


async def test_header_injection_is_folded_or_refused(smtp_sink: SmtpServer, tmp_path: Path) -> None:
    channel = smtp_channel(tmp_path, smtp_sink.port)
    await channel.send(outbound(subject="hi\r\nBcc: victim@example.com", ticket="T-1\nX: y"))
    msg = received(smtp_sink)
    assert msg["Bcc"] is None and msg["X"] is None
    assert "\n" not in msg["Subject"] and "Bcc: victim@example.com" in msg["Subject"]
    for bad in ("a@example.com\r\nBcc: v@example.com", "a@example.com, b@example.com", "nobody"):
        with pytest.raises(PermanentError):
            await channel.send(outbound(to=bad))
    assert len(smtp_sink.sink.messages) == 1


async def test_smtp_errors_map_to_the_taxonomy(smtp_sink: SmtpServer, tmp_path: Path) -> None:
    channel = smtp_channel(tmp_path, smtp_sink.port)
    smtp_sink.sink.rcpt_reply = "550 5.1.1 mailbox unavailable"
    with pytest.raises(PermanentError, match=r"550 5\.1\.1 mailbox unavailable"):
        await channel.send(outbound())
    smtp_sink.sink.rcpt_reply = None
    smtp_sink.sink.fail_with = "451 4.3.0 try again later"
    with pytest.raises(TransientError, match="451"):
        await channel.send(outbound())
    smtp_sink.sink.fail_with = "554 5.6.0 content rejected"
    with pytest.raises(PermanentError, match="554"):
        await channel.send(outbound())


async def test_smtp_down_then_up_retries_with_the_same_message_id(tmp_path: Path) -> None:
    server = SmtpServer()  # port chosen, not listening yet
    channel = smtp_channel(tmp_path, server.port)
    with pytest.raises(TransientError):
        await channel.send(outbound(attempt=1))
    server.start()
    try:
        await channel.send(outbound(attempt=2))
    finally:
        server.stop()
    msg = received(server)
    assert msg["Message-ID"] == message_id_for("ob-01HZX", "shop.test") == "<ob-01HZX@shop.test>"


@pytest.mark.filterwarnings("ignore:Session.login_data is deprecated")
async def test_smtp_starttls_auth(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    srv_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    srv_ctx.load_cert_chain(cert, key)
    server = SmtpServer(
        tls_context=srv_ctx,
        require_starttls=True,
        authenticator=smtp_authenticator,
        auth_required=True,
    ).start()
    try:
        common = {"tls": "starttls", "ca_file": str(cert), "username": "bot"}
        good = smtp_channel(tmp_path, server.port, password="bot-pw", **common)
        await good.send(outbound())
        assert len(server.sink.messages) == 1
        bad = smtp_channel(tmp_path, server.port, password="wrong", **common)
        with pytest.raises(AuthFailed):
            await bad.send(outbound())
        untrusted = smtp_channel(
            tmp_path, server.port, username="bot", password="bot-pw", tls="starttls"
        )
        with pytest.raises(TransientError):
            await untrusted.send(outbound())
    finally:
        server.stop()


async def test_a_reply_to_our_ack_joins_the_conversation(
    dovecot: Dovecot, smtp_sink: SmtpServer, tmp_path: Path
) -> None:
    first = mail(1, subject="Broken")
    first_id = email.message_from_bytes(first, policy=email.policy.default)["Message-ID"]
    await append(dovecot, first)
    sink = RecordingSink()
    async with running(config(dovecot, smtp_port=smtp_sink.port), tmp_path, sink) as channel:
        (original,) = await sink.wait_for(1)
        ticket = sink.ticket_of(original)
        await channel.send(outbound(ticket=ticket, in_reply_to=first_id, references=()))
        ack_id = received(smtp_sink)["Message-ID"]
        # The customer's client quotes only our ack (no References, no token).
        await append(dovecot, mail(2, subject="Re: thanks", In_Reply_To=ack_id))
        stored = await sink.wait_for(2)
    assert sink.ticket_of(stored[1]) == ticket


# -- a Message-ID reused by a different mail (issue 13) -----------------------------------


async def test_reused_message_id_is_a_new_mail_but_a_redelivery_is_not(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    # Before the fix the journal keyed mail by Message-ID alone: the second mail,
    # a different text under the first one's Message-ID, was dropped as a duplicate.
    msg = email.message_from_bytes(mail(1), policy=email.policy.default)
    del msg["Message-ID"]
    msg["Message-ID"] = "<template@example.com>"
    first = msg.as_bytes()
    second = first.replace(b"My order 1 has not arrived.", b"Please cancel order 2.")
    # The same mail delivered again by a server that added a header of its own.
    again = b"Received: from mx2.example.com by imap.shop.test; Tue, 14 May 2024\r\n" + first
    follow_up = mail(4, In_Reply_To="<template@example.com>")
    await append(dovecot, first, second, again)
    sink = RecordingSink()
    with structlog.testing.capture_logs() as logs:
        async with running(config(dovecot), tmp_path, sink) as channel:
            await sink.wait_for(2)
            await wait_until(lambda: channel.duplicates == 1)
            await append(dovecot, follow_up)
            await sink.wait_for(3)
    assert [m.text for m in sink.stored] == [
        "My order 1 has not arrived.",
        "Please cancel order 2.",
        "My order 4 has not arrived.",
    ]
    assert len(sink.calls) == 3  # the redelivery never reached the sink
    # The follow-up quoting the Message-ID joins the first mail's conversation.
    assert sink.ticket_of(sink.stored[2]) == sink.ticket_of(sink.stored[0])
    (reuse,) = [e for e in logs if e["event"] == "email.message_id_reused"]
    assert reuse["log_level"] == "warning"
    assert reuse["message_id"] == "<template@example.com>" and reuse["uid"] == 2
    assert "cancel" not in json.dumps(reuse)  # no message text in the log

    # A renumbered folder: all four are recognised, nothing is routed twice.
    dovecot.uidvalidity_reset()
    async with running(config(dovecot), tmp_path, sink) as channel:
        await wait_until(lambda: channel.duplicates == 4)
    assert len(sink.calls) == 3
