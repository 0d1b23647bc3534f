"""The mailbox agent tool against real peers: aiosmtpd receives the agent's mail, Dovecot
holds the reply mailbox.

1. Deliveries are readable mails (subject, body, escaped HTML), with a Reply-To carrying
   a token that verifies, and the same Message-ID on every retry; SMTP failures map to
   the taxonomy; withdrawn, notice and alert kinds are rendered too.
2. Tokens: unforgeable (HMAC), bound to a secret, expiring.
3. Replies appended to the reply mailbox become actions: quoted text stripped, first-line
   commands, In-Reply-To as the fallback; forged, expired, foreign-sender and automatic
   mail are not applied; a mail is \\Seen only after its action was handed over.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
import email.utils
import imaplib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import structlog

from adapters.mailbox import MailboxConfig, MailboxTool, TokenError, make_token, read_token
from router.delivery import AlertPayload, NoticePayload, WithdrawnPayload
from router.drivers import (
    ADAPTERS,
    AgentAction,
    Delivery,
    DriverContext,
    DriverState,
    PermanentError,
    TransientError,
    load_driver,
)
from tests import payloads, peers_mail
from tests.daemon_harness import DaemonProcess, base_config, http, ports
from tests.peers import wait_until
from tests.peers_mail import PASSWORD, USER, Dovecot, SmtpServer
from tests.test_daemon_e2e import poll

dovecot = peers_mail.dovecot
smtp_sink = peers_mail.smtp_sink

SECRET = "mailbox-token-secret-0123456789"
AGENT = "alice"
AGENT_ADDRESS = "alice@agents.test"
REPLIES = "replies@desk.test"


def config(imap_port: int = 1, smtp_port: int = 1, **over: Any) -> MailboxConfig:
    """Return a mailbox config on loopback peers."""
    data: dict[str, Any] = {
        "type": "mailbox",
        "name": "mail",
        "smtp": {
            "host": "127.0.0.1",
            "port": smtp_port,
            "tls": "none",
            "from_address": "router@desk.test",
            "from_name": "Omnirouter",
            "timeout": 5,
        },
        "imap": {
            "host": "127.0.0.1",
            "port": imap_port,
            "tls": "none",
            "username": USER,
            "password": PASSWORD,
            "poll_interval": 0.2,
            "idle_renew": 30,
            "timeout": 5,
            "reconnect_min": 0.05,
            "reconnect_max": 0.3,
        },
        "reply_address": REPLIES,
        "token_secret": SECRET,
    }
    data.update(over)
    return MailboxConfig.model_validate(data)


def tool(tmp_path: Path, cfg: MailboxConfig) -> MailboxTool:
    """Build the tool with a private state dir."""
    ctx = DriverContext(state_dir=tmp_path, log=structlog.get_logger().bind(tool="mail"))
    return MailboxTool("mail", cfg, ctx)


def delivery(payload: Any = None, *, attempt: int = 1, id: str = "01JDELIVERY0001") -> Delivery:
    """Return a delivery to alice's mailbox."""
    return Delivery(
        id=id,
        target="mail",
        agent_id=AGENT,
        address=AGENT_ADDRESS,
        payload=payload or payloads.assignment(1, text="My parcel <b>never</b> came.\nHelp!"),
        attempt=attempt,
        created_at=datetime.now(UTC),
    )


def parse(raw: bytes) -> EmailMessage:
    """Parse one mail with the modern policy."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def plain(msg: EmailMessage) -> str:
    """Return the text/plain body."""
    part = msg.get_body(("plain",))
    assert part is not None
    return str(part.get_content()).replace("\r\n", "\n")


# -- 1. delivery mails ----------------------------------------------------------------------


async def test_assignment_mail_is_readable_signed_and_stable_across_retries(
    tmp_path: Path, smtp_sink: SmtpServer
) -> None:
    t = tool(tmp_path, config(smtp_port=smtp_sink.port))
    first_try = delivery()
    await t.deliver(first_try)
    # The outbox retries after a lost acknowledgement: the same item, its commit time
    # kept (the token's expiry, and so the Message-ID, derives from it).
    await t.deliver(dataclasses.replace(first_try, attempt=2))
    assert len(smtp_sink.sink.messages) == 2
    (sender, rcpts, raw1), (_, _, raw2) = smtp_sink.sink.messages
    assert sender == "router@desk.test" and rcpts == [AGENT_ADDRESS]
    first, second = parse(raw1), parse(raw2)
    assert first["Message-ID"] == second["Message-ID"]
    assert first["Reply-To"] == second["Reply-To"]
    assert str(first["Subject"]) == "[T-01J0001] complaint/P2: My parcel <b>never</b> came. Help!"
    assert first["To"] == AGENT_ADDRESS
    body = plain(first)
    for expected in (
        "Ticket:",
        "T-01J0001",
        "complaint (91%)",
        "Severity:   P2",
        "Respond by: Thu 03 Dec 2026 08:05 UTC",
        "Dana <customer1@example.com>",
        "My parcel <b>never</b> came.\nHelp!",
        "#resolve",
    ):
        assert expected in body, expected
    html_part = first.get_body(("html",))
    assert html_part is not None
    html_text = str(html_part.get_content())
    assert "&lt;b&gt;never&lt;/b&gt;" in html_text and "<b>never" not in html_text
    # The Reply-To carries a token that verifies and names the work.
    reply_to = str(first["Reply-To"])
    local, _, domain = reply_to.partition("@")
    assert domain == "desk.test" and local.startswith("replies+")
    token = local[len("replies+") :]
    assert token == str(first["X-Omnirouter-Token"])
    assert f"X-Omnirouter-Token: {token}\r\n".encode() in raw1  # one line, no encoded words
    assert token in str(first["Message-ID"])
    claims = read_token(SECRET, token, datetime.now(UTC).timestamp())
    assert (claims.agent_id, claims.conversation_id, claims.message_id) == (
        AGENT,
        "01J0001",
        "m-1",
    )
    ttl = claims.expires - datetime.now(UTC).timestamp()
    assert 14 * 86400 - 60 < ttl <= 14 * 86400
    assert first["Auto-Submitted"] == "auto-generated"
    assert t.state == DriverState.STOPPED  # deliveries do not need the intake running


async def test_smtp_failures_map_to_the_taxonomy(tmp_path: Path, smtp_sink: SmtpServer) -> None:
    t = tool(tmp_path, config(smtp_port=smtp_sink.port))
    smtp_sink.sink.rcpt_reply = "550 5.1.1 no such user"
    with pytest.raises(PermanentError, match="550"):
        await t.deliver(delivery())
    smtp_sink.sink.rcpt_reply = None
    smtp_sink.sink.fail_with = "451 4.3.0 try later"
    with pytest.raises(TransientError):
        await t.deliver(delivery())
    smtp_sink.sink.fail_with = None
    bad = Delivery("d2", "mail", AGENT, "not an address", payloads.assignment(2))
    with pytest.raises(PermanentError, match="not a single valid address"):
        await t.deliver(bad)
    smtp_sink.stop()
    with pytest.raises(TransientError):
        await t.deliver(delivery())
    await t.stop()
    with pytest.raises(TransientError, match="stopped"):
        await t.deliver(delivery())


async def test_withdrawn_notice_and_alert_are_rendered(
    tmp_path: Path, smtp_sink: SmtpServer
) -> None:
    t = tool(tmp_path, config(smtp_port=smtp_sink.port))
    await t.deliver(
        delivery(WithdrawnPayload("01J0001", ("m-1",), "not accepted in time"), id="d-w")
    )
    await t.deliver(
        delivery(
            NoticePayload("resolve", "rejected", "you do not hold this conversation", "01J0001"),
            id="d-n",
        )
    )
    await t.deliver(delivery(AlertPayload({"kind": "urgent", "ticket": "T-01J0001"}), id="d-a"))
    withdrawn, notice, alert = (parse(raw) for _, _, raw in smtp_sink.sink.messages)
    assert str(withdrawn["Subject"]) == "[T-01J0001] withdrawn: not accepted in time"
    assert withdrawn["Reply-To"] is None
    assert str(notice["Subject"]) == "[T-01J0001] not applied: resolve"
    assert "you do not hold this conversation" in plain(notice)
    assert notice["Reply-To"] is not None  # the agent may answer it to try again
    assert str(alert["Subject"]) == "[alert] urgent"
    assert "T-01J0001" in plain(alert)


# -- 2. tokens --------------------------------------------------------------------------------


def test_tokens_are_unforgeable_bound_to_the_secret_and_expire() -> None:
    now = 1_800_000_000
    token = make_token(
        SECRET,
        agent_id=AGENT,
        conversation_id="01JCONV",
        message_id="01JMSG",
        address=AGENT_ADDRESS,
        expires=now + 100,
    )
    assert token == token.lower() and "=" not in token
    assert read_token(SECRET, token.upper(), now).conversation_id == "01JCONV"
    with pytest.raises(TokenError, match="forged"):
        read_token("another-secret-0123456789", token, now)
    # Change one character of the payload: the MAC no longer matches.
    flipped = ("b" if token[3] != "b" else "c").join((token[:3], token[4:]))
    with pytest.raises(TokenError, match=r"forged|malformed"):
        read_token(SECRET, flipped, now)
    with pytest.raises(TokenError, match="malformed"):
        read_token(SECRET, "not a token!", now)
    with pytest.raises(TokenError, match="expired") as info:
        read_token(SECRET, token, now + 100)
    assert info.value.claims is not None and info.value.claims.agent_id == AGENT


def test_config_refuses_a_weak_secret_and_masks_it() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        config(token_secret="short")
    assert SECRET not in repr(config())
    assert load_driver(ADAPTERS, "mailbox") is MailboxTool
    assert MailboxTool.sends_actions


# -- 3. replies -------------------------------------------------------------------------------


def append(server: Dovecot, raw: bytes) -> None:
    """APPEND a mail to the reply mailbox as the MTA would (blocking)."""
    client = imaplib.IMAP4(server.host, server.port, timeout=10)
    try:
        client.login(USER, PASSWORD)
        status, detail = client.append("INBOX", None, None, raw)
        assert status == "OK", detail
    finally:
        client.logout()


def seen_flags(server: Dovecot) -> list[bool]:
    """Return, per message in the reply mailbox, whether it is \\Seen."""
    client = imaplib.IMAP4(server.host, server.port, timeout=10)
    try:
        client.login(USER, PASSWORD)
        client.select("INBOX", readonly=True)
        _, data = client.fetch("1:*", "(FLAGS)")
        return [b"\\Seen" in line for line in data if isinstance(line, bytes)]
    finally:
        client.logout()


def agent_reply(
    work: EmailMessage,
    text: str,
    *,
    sender: str = AGENT_ADDRESS,
    to: str | None = None,
    in_reply_to: str | None = None,
    **headers: str,
) -> bytes:
    """Return the agent's answer to a work mail, quoting it as mail clients do."""
    msg = EmailMessage()
    msg["From"] = f"Alice <{sender}>"
    msg["To"] = to if to is not None else str(work["Reply-To"])
    msg["Subject"] = f"Re: {work['Subject']}"
    msg["Message-ID"] = email.utils.make_msgid(domain="agents.test")
    msg["In-Reply-To"] = in_reply_to if in_reply_to is not None else str(work["Message-ID"])
    msg["Date"] = email.utils.formatdate(usegmt=True)
    for key, value in headers.items():
        msg[key.replace("_", "-")] = value
    quoted = "\n".join("> " + line for line in plain(work).splitlines())
    msg.set_content(f"{text}\n\nOn Thu, 3 Dec 2026 at 10:00, Omnirouter wrote:\n{quoted}\n")
    # Mail clients write long Message-IDs on one line; the stdlib would fold them.
    return msg.as_bytes(policy=email.policy.default.clone(max_line_length=0))


class Running:
    """A mailbox tool running its intake, with the actions it handed over."""

    def __init__(self, tool: MailboxTool) -> None:
        self.tool = tool
        self.actions: list[AgentAction] = []
        self.task: asyncio.Task[None] | None = None

    async def sink(self, action: AgentAction) -> None:
        """Record one action (the router's sink returns after applying it)."""
        self.actions.append(action)

    async def wait_for(self, n: int) -> list[AgentAction]:
        """Wait until n actions arrived; return them."""
        await wait_until(lambda: len(self.actions) >= n, within=10)
        return self.actions

    async def wait_refused(self, n: int) -> None:
        """Wait until n mails were refused by the tool."""
        await wait_until(lambda: self.tool.refused >= n, within=10)


@pytest.fixture
async def running(
    tmp_path: Path, dovecot: Dovecot, smtp_sink: SmtpServer
) -> AsyncIterator[Running]:
    """Yield the tool running against the reply mailbox on Dovecot."""
    r = Running(tool(tmp_path, config(dovecot.port, smtp_sink.port)))
    r.task = asyncio.create_task(r.tool.run(r.sink))
    await wait_until(lambda: r.tool.state == DriverState.CONNECTED, within=10)
    try:
        yield r
    finally:
        await r.tool.stop()
        r.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await r.task


async def work_mail(r: Running, smtp: SmtpServer, payload: Any = None) -> EmailMessage:
    """Deliver one assignment and return the mail the agent got."""
    await r.tool.deliver(delivery(payload))
    return parse(smtp.sink.messages[-1][2])


async def test_reply_is_stripped_of_the_quote_and_handed_over_then_seen(
    running: Running, dovecot: Dovecot, smtp_sink: SmtpServer
) -> None:
    work = await work_mail(running, smtp_sink)
    append(dovecot, agent_reply(work, "Hello Dana,\nyour parcel left today.\n\nAlice"))
    (action,) = await running.wait_for(1)
    assert action == AgentAction(
        AGENT,
        "reply",
        "01J0001",
        "m-1",
        "Hello Dana,\nyour parcel left today.\n\nAlice",
    )
    await wait_until(lambda: seen_flags(dovecot) == [True], within=5)


async def test_first_line_commands_become_actions(
    running: Running, dovecot: Dovecot, smtp_sink: SmtpServer
) -> None:
    work = await work_mail(running, smtp_sink)
    for text in (
        "#resolve",
        "#accept\nOn it, Dana.",
        "#transfer billing",
        "#transfer agent:bob",
        "#relabel Inquiry",
        "#away",
        "#frobnicate",
    ):
        append(dovecot, agent_reply(work, text))
    got = await running.wait_for(8)
    assert [(a.action, a.value, a.refused != "") for a in got] == [
        ("resolve", "", False),
        ("accept", "", False),
        ("reply", "On it, Dana.", False),
        ("transfer", "queue:billing", False),
        ("transfer", "agent:bob", False),
        ("relabel", "inquiry", False),
        ("presence", "away", False),
        ("unknown", "", True),
    ]
    assert all(a.agent_id == AGENT for a in got)
    assert got[0].conversation_id == "01J0001" and got[5].message_id == "m-1"
    assert "unknown command #frobnicate" in got[-1].refused


async def test_in_reply_to_is_the_fallback_when_the_plus_address_is_lost(
    running: Running, dovecot: Dovecot, smtp_sink: SmtpServer
) -> None:
    work = await work_mail(running, smtp_sink)
    append(dovecot, agent_reply(work, "Sorted, thanks.", to=REPLIES))
    (action,) = await running.wait_for(1)
    assert (action.action, action.value, action.conversation_id) == (
        "reply",
        "Sorted, thanks.",
        "01J0001",
    )


async def test_forged_foreign_and_automatic_replies_are_not_applied(
    running: Running, dovecot: Dovecot, smtp_sink: SmtpServer
) -> None:
    work = await work_mail(running, smtp_sink)
    forged = make_token(
        "a-guessed-secret-0123456789",
        agent_id=AGENT,
        conversation_id="01J0001",
        message_id="m-1",
        address=AGENT_ADDRESS,
        expires=2_000_000_000,
    )
    append(dovecot, agent_reply(work, "#resolve", to=f"replies+{forged}@desk.test", in_reply_to=""))
    append(dovecot, agent_reply(work, "#resolve", sender="mallory@evil.test"))
    append(dovecot, agent_reply(work, "I am out of office.", Auto_Submitted="auto-replied"))
    append(dovecot, agent_reply(work, "no token here", to=REPLIES, in_reply_to=""))
    await running.wait_refused(4)
    assert running.actions == []
    # Looked at, and not looked at again.
    await wait_until(lambda: seen_flags(dovecot) == [True] * 4, within=5)


async def test_expired_token_is_refused_with_the_reason_for_the_agent(
    running: Running, dovecot: Dovecot, smtp_sink: SmtpServer
) -> None:
    work = await work_mail(running, smtp_sink)
    running.tool.clock = lambda: datetime.now(UTC).timestamp() + 15 * 86400
    append(dovecot, agent_reply(work, "#resolve"))
    (action,) = await running.wait_for(1)
    assert action.refused.startswith("the reply address of that mail has expired")
    assert (action.agent_id, action.action, action.conversation_id) == (
        AGENT,
        "resolve",
        "01J0001",
    )


async def test_a_restart_does_not_apply_a_reply_twice(
    tmp_path: Path, dovecot: Dovecot, smtp_sink: SmtpServer
) -> None:
    cfg = config(dovecot.port, smtp_sink.port)
    first = Running(tool(tmp_path, cfg))
    await first.tool.deliver(delivery())
    work = parse(smtp_sink.sink.messages[-1][2])
    append(dovecot, agent_reply(work, "Thanks!"))
    first.task = asyncio.create_task(first.tool.run(first.sink))
    await first.wait_for(1)
    await first.tool.stop()
    first.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first.task
    second = Running(tool(tmp_path, cfg))
    second.task = asyncio.create_task(second.tool.run(second.sink))
    await wait_until(lambda: second.tool.synced.is_set(), within=10)
    await second.tool.stop()
    second.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second.task
    assert second.actions == []


# -- 4. end to end through the daemon ---------------------------------------------------------

DESK_USER, DESK_PASSWORD = "desk", "desk-imap-pw-0815"
CUSTOMER = "carol@example.com"
SUPPORT = "support@shop.test"
ADMIN_TOKEN = "test-admin-token-0123456789"  # base_config's


def daemon_config(state: Path, imap: Dovecot, smtp_port: int) -> tuple[str, str]:
    """Return (config, ops URL): the email channel reads alice's mailbox, the tool desk's."""
    web_port, ops_port = ports()
    channel = (
        '[[channels]]\ntype = "email"\nname = "support"\n'
        "[channels.imap]\n"
        f'host = "127.0.0.1"\nport = {imap.port}\ntls = "none"\n'
        f'username = "{USER}"\npassword = "{PASSWORD}"\n'
        "idle_renew = 60\npoll_interval = 1\ntimeout = 5\n"
        "reconnect_min = 0.05\nreconnect_max = 0.5\n"
        "[channels.smtp]\n"
        f'host = "127.0.0.1"\nport = {smtp_port}\ntls = "none"\n'
        f'from_address = "{SUPPORT}"\ntimeout = 5\n'
    )
    adapter = (
        '[[adapters]]\ntype = "mailbox"\nname = "mail"\n'
        f'reply_address = "{REPLIES}"\ntoken_secret = "${{MAILBOX_TOKEN_SECRET}}"\n'
        "[adapters.smtp]\n"
        f'host = "127.0.0.1"\nport = {smtp_port}\ntls = "none"\n'
        'from_address = "router@desk.test"\ntimeout = 5\n'
        "[adapters.imap]\n"
        f'host = "127.0.0.1"\nport = {imap.port}\ntls = "none"\n'
        f'username = "{DESK_USER}"\npassword = "{DESK_PASSWORD}"\n'
        "idle_renew = 60\npoll_interval = 1\ntimeout = 5\n"
        "reconnect_min = 0.05\nreconnect_max = 0.5\n"
    )
    agents = (
        '[[agents]]\nid = "alice"\ncapacity = 5\ntool = "mail"\n'
        f'address = "{AGENT_ADDRESS}"\nskills = ["en"]\n'
    )
    text = base_config(
        state, web_port=web_port, ops_port=ops_port, adapters=adapter, agents=agents, extra=channel
    )
    return text, f"http://127.0.0.1:{ops_port}"


def append_to(server: Dovecot, user: str, password: str, raw: bytes) -> None:
    """APPEND one mail to a user's INBOX (blocking)."""
    client = imaplib.IMAP4(server.host, server.port, timeout=10)
    try:
        client.login(user, password)
        status, detail = client.append("INBOX", None, None, raw)
        assert status == "OK", detail
    finally:
        client.logout()


def mails_to(server: SmtpServer, rcpt: str) -> list[EmailMessage]:
    """Return the mails the SMTP peer accepted for one recipient, parsed."""
    return [parse(raw) for _, rcpts, raw in server.sink.messages if rcpt in rcpts]


@pytest.mark.slow
@peers_mail.needs_dovecot
def test_daemon_round_trip_customer_mail_agent_mailbox_reply_and_resolve(
    tmp_path: Path, smtp_sink: SmtpServer
) -> None:
    with Dovecot(users={USER: PASSWORD, DESK_USER: DESK_PASSWORD}) as imap:
        state = tmp_path / "state"
        text, ops = daemon_config(state, imap, smtp_sink.port)
        daemon = DaemonProcess(tmp_path, text, env={"MAILBOX_TOKEN_SECRET": SECRET})
        try:
            daemon.start()
            poll(lambda: http("GET", ops + "/readyz")[0] == 200, what="/readyz")
            # A customer writes to support.
            customer = EmailMessage()
            customer["From"] = f"Carol <{CUSTOMER}>"
            customer["To"] = SUPPORT
            customer["Subject"] = "Where is my order?"
            customer["Message-ID"] = email.utils.make_msgid(domain="example.com")
            customer["Date"] = email.utils.formatdate(usegmt=True)
            customer.set_content("Hello, order 4711 has not arrived. When will it ship?")
            append_to(imap, USER, PASSWORD, customer.as_bytes())

            # The work reaches alice's mailbox as a readable mail.
            (work,) = poll(lambda: mails_to(smtp_sink, AGENT_ADDRESS), within=20, what="work")
            assert "Where is my order?" in str(work["Subject"])
            assert "order 4711 has not arrived" in plain(work)
            ticket = str(work["Subject"]).split("]")[0].lstrip("[")

            # She answers from her mail client; the customer gets the text, not the quote.
            append_to(imap, DESK_USER, DESK_PASSWORD, agent_reply(work, "It ships today, Carol."))
            answer = poll(
                lambda: [m for m in mails_to(smtp_sink, CUSTOMER) if m["Auto-Submitted"] is None],
                within=20,
                what="the reply at the customer",
            )[0]
            assert plain(answer).strip() == "It ships today, Carol."
            assert f"[#{ticket}]" in str(answer["Subject"])
            assert answer["In-Reply-To"] == customer["Message-ID"]

            # "#resolve" closes the ticket: the customer gets the satisfaction survey.
            append_to(imap, DESK_USER, DESK_PASSWORD, agent_reply(work, "#resolve"))
            survey = poll(
                lambda: [
                    m
                    for m in mails_to(smtp_sink, CUSTOMER)
                    if m["Auto-Submitted"] == "auto-generated"
                ],
                within=20,
                what="the survey",
            )[0]
            assert "1 (poor) to 5 (excellent)" in plain(survey)
            code, body, _ = http(
                "GET",
                f"{ops}/v1/tickets/{ticket}/events",
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            )
            assert code == 200
            kinds = [e["kind"] for e in body["events"]]
            assert "replied" in kinds and "resolved" in kinds, kinds
        except BaseException:
            print(daemon.log_text()[-8000:])
            raise
        finally:
            daemon.close()
