"""The mail servers turn slow, hang or die behind a TCP proxy: nothing is lost or doubled.

The real daemon reads the support mailbox from a private Dovecot through one TcpProxy
(IMAP) and sends its acknowledgements to an aiosmtpd sink through another (SMTP).
Customers' mails are APPENDed to Dovecot directly, as the MTA would deliver them, so
they keep arriving whatever the daemon's connection is going through. For each server
in turn, slow (300 ms each way), then hung (sockets open, nothing answered), then dead
(connections dropped and refused):

* the web channel keeps answering 201 (intake of one channel never waits for another);
* a slow server is served without being reported; a hung or dead IMAP server is named
  in /readyz `degraded` (503) while it is down, and mail appended meanwhile is not
  taken until it is back;
* after `restore()` every mail is stored exactly once (by its Message-ID) and every
  stored mail's acknowledgement reaches the SMTP sink (repeats only under the same
  Message-ID), with no dead letters.
"""

from __future__ import annotations

import asyncio
import collections
import email
import imaplib
import secrets
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.daemon_harness import DaemonProcess, base_config, http, ports
from tests.peers_mail import DOVECOT, PASSWORD, USER, Dovecot, SmtpServer
from tests.reliability.outage_kit import DaemonProbes, start_outage
from tests.reliability.tcp_proxy import TcpProxy
from tests.test_crash import read_db
from tests.test_webhook_breaker import apoll

pytestmark = pytest.mark.skipif(
    DOVECOT is None, reason="needs dovecot (Debian package: dovecot-imapd)"
)

SUPPORT = "support@shop.test"
ADMIN = {"Authorization": "Bearer test-admin-token-0123456789"}


class MailWorld(DaemonProbes):
    """The daemon, Dovecot and the SMTP sink, each mail server behind its own proxy."""

    def __init__(self, tmp_path: Path) -> None:
        self.dovecot = Dovecot().start()
        self.smtp = SmtpServer().start()
        self.imap_proxy = TcpProxy("127.0.0.1", self.dovecot.port).start()
        self.smtp_proxy = TcpProxy("127.0.0.1", self.smtp.port).start()
        web_port, ops_port = ports()
        self.web = f"http://127.0.0.1:{web_port}"
        self.ops_url = f"http://127.0.0.1:{ops_port}"
        channel = (
            '[[channels]]\ntype = "email"\nname = "support"\n'
            "[channels.imap]\n"
            f'host = "127.0.0.1"\nport = {self.imap_proxy.port}\ntls = "none"\n'
            f'username = "{USER}"\npassword = "{PASSWORD}"\n'
            "idle_renew = 60\npoll_interval = 1\ntimeout = 3\n"
            "reconnect_min = 0.05\nreconnect_max = 0.5\n"
            "[channels.smtp]\n"
            f'host = "127.0.0.1"\nport = {self.smtp_proxy.port}\ntls = "none"\n'
            f'from_address = "{SUPPORT}"\ntimeout = 3\n'
        )
        self.state = tmp_path / "state"
        self.db_path = self.state / "omnirouter.db"
        config = base_config(
            self.state,
            web_port=web_port,
            ops_port=ops_port,
            extra=channel,
            agents='[[agents]]\nid = "alice"\ncapacity = 1000\ntool = "inbox"\n',
        )
        self.daemon = DaemonProcess(tmp_path, config)
        self.appended: list[str] = []  # Message-IDs, without angle brackets
        self.n = 0

    def close(self) -> None:
        self.daemon.close()
        self.imap_proxy.stop()
        self.smtp_proxy.stop()
        self.smtp.stop()
        self.dovecot.close()

    # -- traffic -------------------------------------------------------------------

    def append(self, count: int) -> None:
        """Deliver `count` customers' mails into the mailbox, as the MTA would."""
        client = imaplib.IMAP4(self.dovecot.host, self.dovecot.port, timeout=10)
        try:
            client.login(USER, PASSWORD)
            for _ in range(count):
                self.n += 1
                msg = EmailMessage()
                msg["From"] = f"Customer {self.n} <c{self.n}@customers.example>"
                msg["To"] = SUPPORT
                msg["Subject"] = f"Order {self.n}"
                mid = f"outage-{self.n}-{secrets.token_hex(4)}@customers.example"
                msg["Message-ID"] = f"<{mid}>"
                msg.set_content(f"Where is my order {self.n}?")
                status, _ = client.append("INBOX", None, None, msg.as_bytes())
                assert status == "OK"
                self.appended.append(mid)
        finally:
            client.logout()

    def post(self) -> int:
        body = {"text": "Where is my parcel?", "contact": {"handle": "web@x.org"}}
        return http("POST", self.web + "/v1/messages", body, {"Idempotency-Key": str(self.n)})[0]

    # -- what the daemon did -----------------------------------------------------------

    def stored(self) -> collections.Counter[str]:
        if not (self.state / "omnirouter.db").exists():
            return collections.Counter()
        with read_db(self.state / "omnirouter.db") as db:
            return collections.Counter(
                r[0].strip("<>")
                for r in db.execute("SELECT reply_ref FROM messages WHERE channel='support'")
            )

    def acks(self) -> dict[str, list[str]]:
        """Return the acknowledgements at the sink: In-Reply-To -> their Message-IDs."""
        out: dict[str, list[str]] = collections.defaultdict(list)
        for _, _, data in list(self.smtp.sink.messages):
            msg = email.message_from_bytes(data)
            out[str(msg["In-Reply-To"]).strip().strip("<>")].append(str(msg["Message-ID"]))
        return out


@pytest.fixture
def world(tmp_path: Path) -> Iterator[MailWorld]:
    w = MailWorld(tmp_path)
    try:
        w.daemon.start()
        yield w
    finally:
        print(w.daemon.log_text()[-4000:])
        w.close()


async def _all_in(w: MailWorld, within: float, what: str) -> None:
    def done() -> bool:
        stored = w.stored()
        return set(stored) == set(w.appended)

    await apoll(done, within, what)


async def _acked(w: MailWorld, within: float, what: str) -> None:
    await apoll(lambda: set(w.appended) <= set(w.acks()), within, what)


def _check_once(w: MailWorld) -> None:
    stored = w.stored()
    assert set(stored) == set(w.appended) and set(stored.values()) == {1}, stored
    for mid, ack_ids in w.acks().items():
        assert len(set(ack_ids)) == 1, f"{mid} acknowledged under several Message-IDs"
    with read_db(w.state / "omnirouter.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


async def test_imap_slow_then_hung_then_dead(world: MailWorld) -> None:
    w = world
    await apoll(lambda: w.ready()[0] == 200, 20, "ready with IMAP connected")
    for mode in ("slow", "hung", "dead"):
        start_outage(w.imap_proxy, mode)
        before = len(w.appended)
        await asyncio.to_thread(w.append, 4)
        assert await asyncio.to_thread(w.post) == 201  # the web channel does not wait
        if mode == "slow":
            await _all_in(w, 20, "slow IMAP: the mails")
            assert w.ready()[0] == 200
        else:
            await apoll(
                lambda: (r := w.ready())[0] == 503 and "support" in r[1]["degraded"],
                20,
                f"{mode} IMAP: /readyz naming the channel",
            )
            assert set(w.appended[before:]) - set(w.stored()), f"{mode}: not an outage"
        w.imap_proxy.restore()
        await _all_in(w, 30, f"{mode} IMAP: every mail after restore")
        await apoll(lambda: w.ready()[0] == 200, 20, f"{mode} IMAP: ready again")
    await _acked(w, 30, "every mail acknowledged")
    _check_once(w)


async def test_a_server_gone_silent_during_a_quiet_idle_is_noticed(world: MailWorld) -> None:
    # Nothing happens on the mailbox: the channel sits in IDLE when the server hangs (the
    # socket stays open, nothing is answered). It must not wait for idle_renew (60 s
    # here, 25 min by default) to notice: poll_interval bounds every IDLE.
    w = world
    await apoll(lambda: w.ready()[0] == 200, 20, "ready with IMAP connected")
    await asyncio.sleep(2.0)  # settled in IDLE
    start_outage(w.imap_proxy, "hung")
    await apoll(
        lambda: (r := w.ready())[0] == 503 and "support" in r[1]["degraded"],
        15,
        "a silent IMAP server noticed well before idle_renew",
    )
    w.imap_proxy.restore()
    await asyncio.to_thread(w.append, 2)
    await _all_in(w, 30, "mails after the server answers again")
    await apoll(lambda: w.ready()[0] == 200, 20, "ready again")


async def test_smtp_slow_then_hung_then_dead(world: MailWorld) -> None:
    w = world
    await apoll(lambda: w.ready()[0] == 200, 20, "ready with IMAP connected")
    started = time.monotonic()
    for mode in ("slow", "hung", "dead"):
        start_outage(w.smtp_proxy, mode)
        before = len(w.appended)
        await asyncio.to_thread(w.append, 4)
        # Intake goes on: the mails are taken while their acknowledgements cannot leave.
        await _all_in(w, 20, f"{mode} SMTP: the mails stored")
        if mode != "slow":
            pending = set(w.appended[before:]) - set(w.acks())
            assert pending, f"{mode} SMTP: every acknowledgement left: not an outage"
        w.smtp_proxy.restore()
        await _acked(w, 40, f"{mode} SMTP: every acknowledgement after restore")
    await apoll(lambda: w.outbox_and_dead()[0] == 0, 20, "the outbox empty")
    assert w.outbox_and_dead()[1] == 0, "dead letters"
    _check_once(w)
    print(f"SMTP outages ridden out in {time.monotonic() - started:.1f} s")
