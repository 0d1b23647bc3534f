"""The daemon end to end for email: a real Dovecot in, a real aiosmtpd out, MQTT agents.

Each test starts `python -m router.cli run -c FILE` (tests/daemon_harness.py) with one
email channel (`support`, plain IMAP and SMTP on loopback: `tls = "none"`) on a
private Dovecot, and an aiosmtpd server standing for the outgoing mail relay. A
customer's mail is APPENDed to the mailbox as a delivery agent would; what the daemon
sends back is read from the SMTP handler. Agents are a private mosquitto (MQTT
adapter) where a test needs to act as the agent, the inbox adapter elsewhere.

1. A new mail is routed to the agent and acknowledged once (ticket, respond-by time,
   threading headers, Auto-Submitted); follow-ups join the same ticket, unacknowledged;
   another sender quoting the ticket token gets a ticket of their own.
2. An agent's `reply` action becomes a threaded mail to the customer; the customer's
   answer to it joins the same ticket.
3. SMTP down for a while then back: the acknowledgement is retried through the
   outbox and arrives once, every attempt under the same Message-ID, also when the
   daemon is restarted while the acknowledgement waits for its retry.
4. A permanent SMTP refusal (550) makes the acknowledgement a dead letter with the
   server's reason, listed by `omnirouter dead-letters list`.
5. Automatic mail (auto-replies, also to our own acknowledgement) is neither routed
   nor answered.
6. The ticket lifecycle round trip: the agent accepts, a refused action comes back
   as a notice, the reply and then the satisfaction survey reach the customer, whose
   low answer reopens the ticket (audited, on the ops API).

Nothing waits by sleeping: every expectation is polled with a deadline.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import email.utils
import imaplib
import json
import re
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

import aiomqtt
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from channels.email.smtp import format_respond_by
from tests import peers, peers_mail
from tests.daemon_harness import DaemonProcess, base_config, http, ports
from tests.peers import Mosquitto
from tests.peers_mail import PASSWORD, USER, Dovecot, SmtpServer, SmtpSink
from tests.test_daemon_e2e import ADMIN, apoll, cli, inbox_lines, metric_value, next_delivery, poll

pytestmark = [pytest.mark.slow, peers_mail.needs_dovecot]

T = TypeVar("T")

dovecot = peers_mail.dovecot
mosquitto = peers.mosquitto

PREFIX = "e2e-mail/agents"
CHANNEL = "support"
TARGET = f"channel:{CHANNEL}"
SUPPORT = "support@shop.test"
CUSTOMER = "carol@example.com"
TICKET_TOKEN = re.compile(r"\[#(T-[A-Za-z0-9_-]+)\]")
QUESTION = "Hello, my order 4711 has not arrived yet. Could you tell me when it will ship?"


# -- peers and daemon ---------------------------------------------------------------------


@dataclass
class RecordingSmtpSink(SmtpSink):
    """SmtpSink that also records the Message-ID of every DATA it is offered, and can
    refuse the first `fail_data` of them with a temporary error."""

    offered: list[str] = field(default_factory=list)
    fail_data: int = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Record the offered Message-ID; refuse it (451) while fail_data lasts."""
        content = envelope.content
        data = content if isinstance(content, bytes) else str(content).encode()
        self.offered.append(str(parse(data)["Message-ID"]))
        if self.fail_data > 0:
            self.fail_data -= 1
            return "451 4.3.0 try again later"
        return await super().handle_DATA(server, session, envelope)

    def mails(self) -> list[EmailMessage]:
        """Return every accepted mail, parsed."""
        return [parse(raw) for _, _, raw in self.messages]


def smtp_server() -> SmtpServer:
    """Return a (not started) aiosmtpd server on a free port with a recording handler."""
    server = SmtpServer()
    server.sink = RecordingSmtpSink()
    return server


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    """Yield a started aiosmtpd server with a RecordingSmtpSink."""
    server = smtp_server().start()
    try:
        yield server
    finally:
        server.stop()


def sink_of(server: SmtpServer) -> RecordingSmtpSink:
    """Return the server's handler, typed."""
    assert isinstance(server.sink, RecordingSmtpSink)
    return server.sink


def parse(raw: bytes) -> EmailMessage:
    """Parse one mail with the modern policy."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def mqtt_adapter(broker: Mosquitto) -> str:
    """Return an MQTT adapter section named "desk" on the private broker."""
    return (
        f'[[adapters]]\ntype = "mqtt"\nname = "desk"\nhost = "{broker.host}"\n'
        f'port = {broker.port}\ntopic_prefix = "{PREFIX}"\nreconnect_min = 0.05\n'
        "reconnect_max = 0.3\nconnect_timeout = 2\npublish_timeout = 2\n"
    )


def email_config(
    state_dir: Path,
    imap: Dovecot,
    smtp_port: int,
    *,
    broker: Mosquitto | None = None,
    backoff_base: float = 0.05,
    backoff_cap: float = 0.5,
) -> tuple[str, str]:
    """Return (config text, ops URL) for a daemon with the email channel `support`."""
    web_port, ops_port = ports()
    channel = (
        f'[[channels]]\ntype = "email"\nname = "{CHANNEL}"\n'
        "[channels.imap]\n"
        f'host = "127.0.0.1"\nport = {imap.port}\ntls = "none"\n'
        f'username = "{USER}"\npassword = "{PASSWORD}"\n'
        "idle_renew = 60\npoll_interval = 1\ntimeout = 5\n"
        "reconnect_min = 0.05\nreconnect_max = 0.5\n"
        "[channels.smtp]\n"
        f'host = "127.0.0.1"\nport = {smtp_port}\ntls = "none"\n'
        f'from_address = "{SUPPORT}"\nfrom_name = "Shop Support"\ntimeout = 5\n'
    )
    if broker is not None:
        adapters = mqtt_adapter(broker)
        tool = "desk"
    else:
        adapters = '[[adapters]]\ntype = "inbox"\nname = "inbox"\n'
        tool = "inbox"
    agents = f'[[agents]]\nid = "alice"\ncapacity = 5\ntool = "{tool}"\nskills = ["en", "zh"]\n'
    text = base_config(
        state_dir,
        web_port=web_port,
        ops_port=ops_port,
        adapters=adapters,
        agents=agents,
        extra=channel,
    )
    text = text.replace("backoff_base = 0.05", f"backoff_base = {backoff_base}", 1)
    text = text.replace("backoff_cap = 0.5", f"backoff_cap = {backoff_cap}", 1)
    return text, f"http://127.0.0.1:{ops_port}"


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[[str], DaemonProcess]]:
    """Start daemons in tmp_path; kill whatever is left and print their logs at teardown."""
    started: list[DaemonProcess] = []

    def _spawn(config: str) -> DaemonProcess:
        d = DaemonProcess(tmp_path, config)
        started.append(d)
        d.start()
        return d

    yield _spawn
    for d in started:
        d.close()
        # Shown by pytest only when the test failed.
        print(f"--- daemon log {d.log_path.name} ---\n{d.log_text()[-8000:]}")


def ready(ops: str) -> bool:
    """Return whether /readyz says every driver (IMAP intake included) is connected."""
    return http("GET", ops + "/readyz")[0] == 200


def metrics(ops: str) -> str:
    """Return the Prometheus text of the daemon."""
    status, body, _ = http("GET", ops + "/metrics")
    assert status == 200
    return str(body)


class Db:
    """Read-only queries on the daemon's database while it runs."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "omnirouter.db"

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        if not self.path.exists():
            return []
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:  # before the schema exists
            if "no such table" in str(exc):
                return []
            raise
        finally:
            conn.close()

    def outbox(self, kind: str | None = None) -> list[tuple[str, str, int, str]]:
        """Return (id, kind, attempts, last_error) of the pending sends to the channel."""
        rows = self.rows("SELECT id, kind, attempts, last_error FROM outbox WHERE target=?", TARGET)
        return [
            (str(r[0]), str(r[1]), int(r[2]), str(r[3]))
            for r in rows
            if kind is None or r[1] == kind
        ]

    def outbox_empty(self) -> bool:
        return not self.rows("SELECT 1 FROM outbox")

    def messages(self) -> list[tuple[str, str]]:
        """Return (contact handle, conversation id) of every stored email message."""
        return [
            (str(r[0]), str(r[1]))
            for r in self.rows(
                "SELECT ct.handle, m.conversation_id FROM messages m "
                "JOIN contacts ct ON ct.key = m.contact_key WHERE m.channel=? ORDER BY m.id",
                CHANNEL,
            )
        ]


# -- mail ---------------------------------------------------------------------------------


def customer_mail(
    text: str = QUESTION,
    *,
    subject: str = "Where is my order?",
    sender: str = CUSTOMER,
    name: str = "Carol",
    **headers: str,
) -> tuple[bytes, str]:
    """Return (raw mail, Message-ID) of a mail from a customer to support."""
    msg = EmailMessage()
    msg["From"] = f"{name} <{sender}>"
    msg["To"] = f"Shop Support <{SUPPORT}>"
    msg["Subject"] = subject
    msg_id = f"<{secrets.token_hex(8)}@example.com>"
    msg["Message-ID"] = msg_id
    msg["Date"] = email.utils.formatdate(usegmt=True)
    for key, value in headers.items():
        msg[key.replace("_", "-")] = value
    msg.set_content(text)
    return msg.as_bytes(), msg_id


def append(server: Dovecot, *raws: bytes) -> None:
    """APPEND mails to alice's INBOX as the delivery agent would (blocking)."""
    client = imaplib.IMAP4(server.host, server.port, timeout=10)
    try:
        client.login(USER, PASSWORD)
        for raw in raws:
            status, detail = client.append("INBOX", None, None, raw)
            assert status == "OK", detail
    finally:
        client.logout()


def body_text(msg: EmailMessage) -> str:
    """Return the decoded text/plain body (wire CRLFs as newlines)."""
    part = msg.get_body(("plain",))
    assert part is not None, msg
    return str(part.get_content()).replace("\r\n", "\n")


def at_least(n: int, fn: Callable[[], list[T]]) -> Callable[[], list[T]]:
    """Return a poll predicate: fn()'s list once it has n items, else an empty list."""

    def check() -> list[T]:
        items = fn()
        return items if len(items) >= n else []

    return check


def ticket_of(msg: EmailMessage) -> str:
    """Return the ticket named in a mail's subject token."""
    match = TICKET_TOKEN.search(str(msg["Subject"]))
    assert match, msg["Subject"]
    return match.group(1)


# -- 1. acknowledgement and follow-ups ----------------------------------------------------


async def test_new_mail_is_routed_acknowledged_once_and_followups_join_it(
    tmp_path: Path,
    spawn: Callable[[str], DaemonProcess],
    dovecot: Dovecot,
    smtp: SmtpServer,
    mosquitto: Mosquitto,
) -> None:
    state = tmp_path / "state"
    db = Db(state)
    sink = sink_of(smtp)
    config, ops = email_config(state, dovecot, smtp.port, broker=mosquitto)
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="mail-agent") as sub:
        await sub.subscribe(f"{PREFIX}/+/inbox", qos=1)
        await asyncio.to_thread(spawn, config)
        await apoll(lambda: ready(ops), what="/readyz with IMAP and MQTT connected")

        # A customer writes: the mail becomes a message routed to alice over MQTT.
        raw, first_id = customer_mail()
        await asyncio.to_thread(append, dovecot, raw)
        topic, first = await next_delivery(sub, within=15)
        assert topic == f"{PREFIX}/alice/inbox"
        assert first["kind"] == "assignment"
        ticket = first["ticket"]
        assert ticket == "T-" + first["conversation_id"]
        message = first["message"]
        assert message["channel"] == CHANNEL
        assert message["channel_type"] == "email"
        assert message["contact"] == {"handle": CUSTOMER, "name": "Carol"}
        assert message["subject"] == "Where is my order?"
        assert "order 4711 has not arrived" in message["text"]

        # ... and the customer gets one acknowledgement naming the ticket and the time.
        (ack,) = await apoll(sink.mails, within=10, what="the acknowledgement at the SMTP server")
        _, rcpts, _ = sink.messages[0]
        assert rcpts == [CUSTOMER]
        assert ack["To"] == CUSTOMER
        assert SUPPORT in str(ack["From"])
        assert f"[#{ticket}]" in ack["Subject"]
        assert ack["Subject"].startswith("Re: Where is my order?")
        assert ack["In-Reply-To"] == first_id
        assert first_id in str(ack["References"]).split()
        assert ack["Auto-Submitted"] == "auto-replied"
        assert ack["Message-ID"] and ack["Message-ID"] != first_id
        text = body_text(ack)
        assert ticket in text
        deadline = datetime.fromisoformat(first["routing"]["sla_deadline"])
        respond_by = format_respond_by(deadline, "UTC", "en")
        assert f"you will hear from us by {respond_by}" in " ".join(text.split()), text
        assert re.search(r"\d{2}:\d{2} UTC", respond_by)

        # A follow-up answering the first mail (no ticket token) joins its conversation.
        raw, _ = customer_mail(
            "Any news? It is now a week late.",
            subject="Re: Where is my order?",
            In_Reply_To=first_id,
            References=first_id,
        )
        await asyncio.to_thread(append, dovecot, raw)
        topic, second = await next_delivery(sub, within=15)
        assert topic == f"{PREFIX}/alice/inbox"
        assert second["ticket"] == ticket
        assert second["conversation_id"] == first["conversation_id"]
        assert second["message"]["id"] != message["id"]

        # A new mail (no In-Reply-To/References) with the ticket token in the subject too.
        raw, _ = customer_mail(
            "I also want to change the delivery address.",
            subject=f"Delivery address [#{ticket}]",
        )
        await asyncio.to_thread(append, dovecot, raw)
        _, third = await next_delivery(sub, within=15)
        assert third["ticket"] == ticket
        assert third["message"]["subject"] == f"Delivery address [#{ticket}]"

        # Everything is sent (an acknowledgement would have been committed with its
        # message): still just the one acknowledgement.
        await apoll(db.outbox_empty, what="nothing left in the outbox")
        assert [c for _, c in await asyncio.to_thread(db.messages)] == [
            first["conversation_id"]
        ] * 3
        assert len(sink.messages) == 1, [m["Subject"] for m in sink.mails()]
        text = await asyncio.to_thread(metrics, ops)
        assert metric_value(text, "omnirouter_deliveries_total", target=TARGET, result="ok") == 1
        assert metric_value(text, "omnirouter_deliveries_total", target="desk", result="ok") == 3

        # Someone else quoting Carol's ticket token does not get into her conversation.
        raw, _ = customer_mail(
            "Please send me the details of this order.",
            subject=f"Re: Where is my order? [#{ticket}]",
            sender="mallory@example.net",
            name="Mallory",
        )
        await asyncio.to_thread(append, dovecot, raw)
        _, other = await next_delivery(sub, within=15)
        assert other["message"]["contact"]["handle"] == "mallory@example.net"
        assert other["ticket"] != ticket
        acks = await apoll(at_least(2, sink.mails), within=10, what="mallory's own ack")
        assert acks[1]["To"] == "mallory@example.net"
        assert f"[#{other['ticket']}]" in acks[1]["Subject"]


# -- 2. agent reply -----------------------------------------------------------------------


async def test_agent_reply_is_mailed_threaded_and_the_answer_joins_the_ticket(
    tmp_path: Path,
    spawn: Callable[[str], DaemonProcess],
    dovecot: Dovecot,
    smtp: SmtpServer,
    mosquitto: Mosquitto,
) -> None:
    state = tmp_path / "state"
    db = Db(state)
    sink = sink_of(smtp)
    config, ops = email_config(state, dovecot, smtp.port, broker=mosquitto)
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="mail-agent") as sub:
        await sub.subscribe(f"{PREFIX}/+/inbox", qos=1)
        await asyncio.to_thread(spawn, config)
        await apoll(lambda: ready(ops), what="/readyz with IMAP and MQTT connected")

        raw, first_id = customer_mail()
        await asyncio.to_thread(append, dovecot, raw)
        _, first = await next_delivery(sub, within=15)
        ticket, conversation = first["ticket"], first["conversation_id"]
        (ack,) = await apoll(sink.mails, within=10, what="the acknowledgement")

        # The agent answers from their tool.
        answer = "Hello Carol,\n\nYour parcel left our warehouse today; tracking: ZX-123.\n\nAlice"
        await sub.publish(
            f"{PREFIX}/alice/actions",
            json.dumps({"action": "reply", "conversation_id": conversation, "value": answer}),
            qos=1,
        )
        mails = await apoll(at_least(2, sink.mails), within=10, what="the reply at SMTP")
        reply = mails[1]
        _, rcpts, _ = sink.messages[1]
        assert rcpts == [CUSTOMER]
        assert reply["To"] == CUSTOMER
        assert SUPPORT in str(reply["From"])
        assert "ZX-123" in body_text(reply)
        assert body_text(reply).strip() == answer
        assert reply["In-Reply-To"] == first_id
        assert first_id in str(reply["References"]).split()
        assert reply["Auto-Submitted"] is None
        assert reply["Precedence"] is None
        assert f"[#{ticket}]" in reply["Subject"]
        assert reply["Message-ID"] not in (ack["Message-ID"], first_id)

        # The customer answers the agent's mail (quoting only its Message-ID): same ticket.
        raw, _ = customer_mail(
            "Thanks! It arrived.",
            subject="Re: your parcel",
            In_Reply_To=str(reply["Message-ID"]),
            References=str(reply["Message-ID"]),
        )
        await asyncio.to_thread(append, dovecot, raw)
        _, follow = await next_delivery(sub, within=15)
        assert follow["ticket"] == ticket
        assert follow["conversation_id"] == conversation

        await apoll(db.outbox_empty, what="nothing left in the outbox")
        assert len(sink.messages) == 2, [m["Subject"] for m in sink.mails()]
        text = await asyncio.to_thread(metrics, ops)
        assert metric_value(text, "omnirouter_agent_actions_total", action="reply", outcome="ok")


# -- 3. SMTP down, then back --------------------------------------------------------------


def test_smtp_down_then_back_ack_retried_and_sent_once(
    tmp_path: Path, spawn: Callable[[str], DaemonProcess], dovecot: Dovecot
) -> None:
    state = tmp_path / "state"
    db = Db(state)
    smtp = smtp_server()  # its port is closed until started
    sink = sink_of(smtp)
    # Default max_attempts (8); a small backoff so a few attempts fail while it is down.
    config, ops = email_config(state, dovecot, smtp.port, backoff_base=0.2, backoff_cap=1.0)
    try:
        d = spawn(config)
        poll(lambda: ready(ops), what="/readyz with IMAP connected")
        raw, first_id = customer_mail()
        append(dovecot, raw)

        # Connection refused: the acknowledgement stays in the outbox, attempts counting up.
        pending = poll(
            lambda: [r for r in db.outbox("ack") if r[2] >= 2],
            within=15,
            what="the acknowledgement attempted twice while SMTP is down",
        )
        ((ack_id, _, _, last_error),) = pending
        assert "smtp" in last_error.lower(), last_error
        assert not db.rows("SELECT 1 FROM dead_letters")
        assert not sink.offered

        # The server comes back on the same port, answering one more 451 first.
        sink.fail_data = 1
        smtp.start()
        poll(lambda: sink.messages, within=15, what="the acknowledgement accepted")
        poll(db.outbox_empty, what="the outbox emptied")
        (ack,) = sink.mails()
        assert ack["In-Reply-To"] == first_id
        assert ack["Auto-Submitted"] == "auto-replied"
        assert len(sink.offered) == 2, sink.offered
        assert set(sink.offered) == {ack["Message-ID"]}
        assert ack_id in ack["Message-ID"]  # derived from the outbox id, not per attempt
        assert not db.rows("SELECT 1 FROM dead_letters")
        retries = [e for e in d.log_events("outbox.retry") if e["target"] == TARGET]
        assert len(retries) >= 3, retries  # two refused connections and the 451
        assert any("451" in e["error"] for e in retries), retries
        text = metrics(ops)
        retried = metric_value(text, "omnirouter_deliveries_total", target=TARGET, result="retry")
        assert retried is not None and retried >= 3
        assert metric_value(text, "omnirouter_deliveries_total", target=TARGET, result="ok") == 1
        assert not metric_value(text, "omnirouter_deliveries_total", target=TARGET, result="dead")
    finally:
        smtp.stop()


def test_pending_ack_survives_a_restart_under_the_same_message_id(
    tmp_path: Path, spawn: Callable[[str], DaemonProcess], dovecot: Dovecot, smtp: SmtpServer
) -> None:
    state = tmp_path / "state"
    db = Db(state)
    sink = sink_of(smtp)
    sink.fail_data = 1_000  # 451 to every DATA until the test says otherwise
    config, ops = email_config(state, dovecot, smtp.port, backoff_base=0.5, backoff_cap=2.0)
    d = spawn(config)
    poll(lambda: ready(ops), what="/readyz with IMAP connected")
    raw, first_id = customer_mail()
    append(dovecot, raw)
    poll(lambda: sink.offered, within=15, what="a first (refused) attempt of the ack")

    # Stopped while the acknowledgement waits for its retry: it stays in the outbox.
    assert d.stop() == 0
    (stopped,) = d.log_events("daemon.stopped")
    assert stopped["outbox_pending"] == 1
    assert stopped["dead_letters"] in (0, None)
    ((_, kind, attempts, _),) = db.outbox()
    assert kind == "ack" and attempts >= 1

    # Back with the relay healthy: sent once, under the Message-ID of the first attempt;
    # the mail itself is not taken in again.
    sink.fail_data = 0
    d.restart()
    (ack,) = poll(sink.mails, within=15, what="the acknowledgement after the restart")
    poll(db.outbox_empty, what="the outbox emptied")
    assert ack["In-Reply-To"] == first_id
    assert set(sink.offered) == {ack["Message-ID"]}, sink.offered
    assert len(sink.messages) == 1
    assert len(db.messages()) == 1
    assert len(inbox_lines(state)) == 1
    text = metrics(ops)
    assert metric_value(text, "omnirouter_deliveries_total", target=TARGET, result="ok") == 1


# -- 4. permanent refusal -----------------------------------------------------------------


def test_permanent_smtp_refusal_makes_a_dead_letter_with_the_reason(
    tmp_path: Path, spawn: Callable[[str], DaemonProcess], dovecot: Dovecot, smtp: SmtpServer
) -> None:
    state = tmp_path / "state"
    db = Db(state)
    sink = sink_of(smtp)
    sink.rcpt_reply = "550 5.1.1 <carol@example.com>: Recipient address rejected: no such user"
    config, ops = email_config(state, dovecot, smtp.port)
    d = spawn(config)
    poll(lambda: ready(ops), what="/readyz with IMAP connected")
    raw, _ = customer_mail()
    append(dovecot, raw)

    # The message itself is routed to the agent; only its acknowledgement fails.
    (delivery,) = poll(lambda: inbox_lines(state), what="the delivery to alice's inbox")
    ticket = delivery["ticket"]

    def listed() -> list[dict[str, Any]]:
        result = cli("dead-letters", "list", "-c", str(d.config_path), "--json")
        assert result.returncode == 0, result.stderr
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]

    (dead,) = poll(listed, within=15, what="the acknowledgement in `dead-letters list --json`")
    assert dead["target"] == TARGET
    assert dead["kind"] == "ack"
    assert dead["attempts"] == 1  # permanent: no retries
    assert "550" in dead["reason"] and "no such user" in dead["reason"], dead
    assert ticket not in json.dumps(dead)  # no payload in listings
    human = cli("dead-letters", "list", "-c", str(d.config_path))
    assert human.returncode == 0, human.stderr
    assert dead["id"] in human.stdout
    assert TARGET in human.stdout and "550 5.1.1" in human.stdout, human.stdout

    assert db.outbox_empty()
    assert not sink.messages and not sink.offered  # refused at RCPT, before DATA
    (event,) = d.wait_log_events("outbox.dead_letter", 1)
    assert event["target"] == TARGET and "550" in event["reason"]
    text = metrics(ops)
    assert metric_value(text, "omnirouter_dead_letters_total", target=TARGET) == 1
    assert not metric_value(text, "omnirouter_deliveries_total", target=TARGET, result="retry")


# -- 5. automatic mail --------------------------------------------------------------------


def test_auto_replies_are_neither_routed_nor_answered(
    tmp_path: Path, spawn: Callable[[str], DaemonProcess], dovecot: Dovecot, smtp: SmtpServer
) -> None:
    state = tmp_path / "state"
    db = Db(state)
    sink = sink_of(smtp)
    config, ops = email_config(state, dovecot, smtp.port)
    d = spawn(config)
    poll(lambda: ready(ops), what="/readyz with IMAP connected")

    # A customer writes and is acknowledged.
    raw, _ = customer_mail()
    append(dovecot, raw)
    (ack,) = poll(sink.mails, within=15, what="the acknowledgement")
    ticket = ticket_of(ack)

    # Her out-of-office answers our acknowledgement (the classic mail loop), and a
    # stranger's vacation notice arrives: a new contact, which a human's mail would
    # have made a new, acknowledged ticket.
    ooo, _ = customer_mail(
        "I am out of the office until Monday.",
        subject=f"Automatic reply: {ack['Subject']}",
        In_Reply_To=str(ack["Message-ID"]),
        References=str(ack["Message-ID"]),
        Auto_Submitted="auto-replied",
    )
    vacation, _ = customer_mail(
        "I am on vacation and will read your mail later.",
        subject="On vacation",
        sender="dave@example.org",
        name="Dave",
        Auto_Submitted="auto-replied; owner-email=dave@example.org",
    )
    # Then a human's mail: intake is in UID order, so once it is routed, the two
    # automatic ones before it have been handled.
    human, human_id = customer_mail(
        "Hi, do you ship to Norway?", subject="Shipping", sender="erin@example.net", name="Erin"
    )
    append(dovecot, ooo, vacation, human)
    lines = poll(at_least(2, lambda: inbox_lines(state)), within=15, what="erin's mail routed")
    acks = poll(at_least(2, sink.mails), within=15, what="erin's ack")
    poll(db.outbox_empty, what="nothing left in the outbox")

    assert [x["message"]["contact"]["handle"] for x in lines] == [CUSTOMER, "erin@example.net"]
    assert [h for h, _ in db.messages()] == [CUSTOMER, "erin@example.net"]
    assert [m["To"] for m in acks] == [CUSTOMER, "erin@example.net"]
    assert acks[1]["In-Reply-To"] == human_id
    assert ticket_of(acks[1]) != ticket
    noise = d.log_events("email.noise")
    assert [e["reason"] for e in noise] == ["auto_submitted:auto-replied"] * 2, noise
    # Dave never became a contact.
    assert not db.rows("SELECT 1 FROM contacts WHERE handle=?", "dave@example.org")
    text = metrics(ops)
    assert metric_value(text, "omnirouter_deliveries_total", target=TARGET, result="ok") == 2


# -- 6. raw 8-bit bytes in an encoded word (issue 13) --------------------------------------


def test_raw_8bit_subject_is_stored_and_acknowledged_as_written(
    tmp_path: Path, spawn: Callable[[str], DaemonProcess], dovecot: Dovecot, smtp: SmtpServer
) -> None:
    # An old mailer's ISO-8859-1 Q word carrying raw 8-bit bytes instead of =FC/=DF.
    # Before the fix the store and the acknowledgement said "Gr\udcfc\udcdfe".
    state = tmp_path / "state"
    db = Db(state)
    sink = sink_of(smtp)
    config, ops = email_config(state, dovecot, smtp.port)
    d = spawn(config)
    poll(lambda: ready(ops), what="/readyz with IMAP connected")
    msg_id = f"<{secrets.token_hex(8)}@example.com>"
    raw = (
        f"From: =?iso-8859-1?q?J=FCrgen?= <{CUSTOMER}>\r\nTo: {SUPPORT}\r\n"
        f"Message-ID: {msg_id}\r\nDate: {email.utils.formatdate(usegmt=True)}\r\n"
        "Subject: =?ISO-8859-1?Q?Gr\xfc\xdfe_aus_Wien?=\r\n"
        "Content-Type: text/plain; charset=iso-8859-1\r\n\r\n"
        "Meine Bestellung ist nicht angekommen.\r\n"
    ).encode("latin-1")
    append(dovecot, raw)

    (delivery,) = poll(lambda: inbox_lines(state), what="the delivery to alice's inbox")
    assert delivery["message"]["subject"] == "Grüße aus Wien"
    stored = db.rows("SELECT subject FROM messages WHERE channel=?", CHANNEL)
    assert stored == [("Grüße aus Wien",)]
    (ack,) = poll(sink.mails, within=15, what="the acknowledgement")
    assert ack["In-Reply-To"] == msg_id
    assert str(ack["Subject"]).startswith("Re: Grüße aus Wien [#T-"), ack["Subject"]
    _, _, wire = sink.messages[0]
    assert b"\\udc" not in wire.lower()
    for text in (str(ack["Subject"]), body_text(ack), d.log_text()):
        assert "\\udc" not in text.lower() and not re.search("[\ud800-\udfff]", text)


# -- 6. the ticket lifecycle round trip ---------------------------------------------------


async def test_accept_reply_resolve_survey_low_answer_reopens_the_ticket(
    tmp_path: Path,
    spawn: Callable[[str], DaemonProcess],
    dovecot: Dovecot,
    smtp: SmtpServer,
    mosquitto: Mosquitto,
) -> None:
    state = tmp_path / "state"
    db = Db(state)
    sink = sink_of(smtp)
    config, ops = email_config(state, dovecot, smtp.port, broker=mosquitto)
    actions = f"{PREFIX}/alice/actions"
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="life-agent") as sub:
        await sub.subscribe(f"{PREFIX}/+/inbox", qos=1)
        await asyncio.to_thread(spawn, config)
        await apoll(lambda: ready(ops), what="/readyz with IMAP and MQTT connected")

        raw, first_id = customer_mail()
        await asyncio.to_thread(append, dovecot, raw)
        _, first = await next_delivery(sub, within=15)
        ticket, conversation = first["ticket"], first["conversation_id"]
        await apoll(sink.mails, within=10, what="the acknowledgement")

        def status() -> str:
            rows = db.rows("SELECT status FROM conversations WHERE id=?", conversation)
            return str(rows[0][0]) if rows else ""

        def publish(body: dict[str, str]) -> Any:
            return sub.publish(actions, json.dumps(body), qos=1)

        await publish({"action": "accept", "conversation_id": conversation})
        await apoll(lambda: status() == "accepted", what="the ticket accepted")
        # Not the agent's to do: refused, and the tool is told why.
        await publish({"action": "transfer", "conversation_id": conversation, "value": "agent:zed"})
        _, notice = await next_delivery(sub, within=10)
        assert notice["kind"] == "notice" and notice["reason"] == "unknown agent zed"
        assert notice["ticket"] == ticket and notice["outcome"] == "rejected"

        await publish(
            {"action": "reply", "conversation_id": conversation, "value": "It ships today."}
        )
        await apoll(at_least(2, sink.mails), within=10, what="the reply at SMTP")
        assert status() == "waiting_on_customer"
        await publish({"action": "resolve", "conversation_id": conversation})
        mails = await apoll(at_least(3, sink.mails), within=10, what="the survey at SMTP")
        survey = mails[2]
        assert survey["To"] == CUSTOMER and f"[#{ticket}]" in survey["Subject"]
        assert "1 (poor) to 5 (excellent)" in body_text(survey)
        assert survey["In-Reply-To"] == first_id
        assert status() == "resolved"

        # The customer answers the survey mail, unhappy: the ticket reopens, with their
        # answer as work for an agent again.
        raw, _ = customer_mail(
            "1",
            subject=f"Re: {survey['Subject']}",
            In_Reply_To=str(survey["Message-ID"]),
            References=str(survey["Message-ID"]),
        )
        await asyncio.to_thread(append, dovecot, raw)
        _, again = await next_delivery(sub, within=15)
        assert again["kind"] == "assignment" and again["ticket"] == ticket
        assert again["message"]["text"] == "1"
        assert status() in ("new", "assigned")
        [(score,)] = db.rows("SELECT csat_score FROM conversations WHERE id=?", conversation)
        assert score == 1
        kinds = [r[0] for r in db.rows(
            "SELECT kind FROM ticket_events WHERE conversation_id=? ORDER BY id", conversation
        )]  # fmt: skip
        assert kinds[:4] == ["created", "assigned", "accepted", "refused"]
        assert kinds[4:9] == ["replied", "resolved", "survey_sent", "survey_answered", "reopened"]

        # The audit is on the ops API and the CLI.
        code, body, _ = http(
            "GET", f"{ops}/v1/tickets/{ticket}/events", headers={"Authorization": f"Bearer {ADMIN}"}
        )
        assert code == 200 and [e["kind"] for e in body["events"]][: len(kinds)] == kinds
        text = await asyncio.to_thread(metrics, ops)
        assert metric_value(text, "omnirouter_csat_answers_total", score="1") == 1
        assert (
            metric_value(
                text, "omnirouter_agent_actions_total", action="transfer", outcome="rejected"
            )
            == 1
        )
