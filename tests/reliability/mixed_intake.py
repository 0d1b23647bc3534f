"""E-mail, SMS and Telegram intake beside the web load of the crash scenario (tests/test_crash.py).

`SideChannels` runs a private Dovecot (customers' mails are APPENDed to the support
mailbox while the daemon lives and dies), an SMTP sink for the acknowledgements, and an
SMS gateway played by threads: texts are POSTed to the daemon's `sms_http` channel
(secret-authenticated, the gateway's id on each) and retried until answered 200, as a
gateway does; the daemon's texts back go to a small threaded HTTP server. Telegram
customers write to a bot whose Bot API is the emulator of tests/peers_telegram.py
(long polling; it holds each update until the daemon confirms it by its offset).

What it checks, from the daemon's database: every mail APPENDed is stored once (by its
Message-ID) once the daemon has caught up, never twice at any kill; every text answered
200 is stored once under the gateway's id; every Telegram message sent is stored once
(chat and message id) once the daemon has caught up.
"""

from __future__ import annotations

import imaplib
import random
import sqlite3
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from email.message import EmailMessage
from pathlib import Path

from tests.peers import free_port
from tests.peers_mail import PASSWORD, USER, Dovecot, SmtpServer
from tests.peers_telegram import TOKEN, BotApiEmulator
from tests.reliability.outage_kit import GatewaySink

SMS_SECRET = "crash-sms-gateway-secret-0123"
SUPPORT = "support@shop.test"


class SideChannels:
    """Mail and SMS traffic for the crash scenario; see the module doc."""

    def __init__(self, seed: int, mails: int, texts: int, chats: int = 0) -> None:
        self.rng = random.Random(seed ^ 0x5EED)
        self.mails, self.texts, self.chats = mails, texts, chats
        self.bot = BotApiEmulator() if chats else None
        self.chatted: list[str] = []  # "chat:message_id" of every Telegram message sent
        self.dovecot = Dovecot()
        self.smtp = SmtpServer()
        self.sms_port = free_port()
        self.gateway = GatewaySink()
        self.appended: list[str] = []  # Message-IDs in the mailbox
        self.acked_texts: set[str] = set()  # gateway ids answered 200
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.halt = threading.Event()
        self.paused = threading.Event()  # set: no new mails or texts (quiet rounds)
        self.threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> SideChannels:
        self.dovecot.start()
        self.smtp.start()
        if self.bot is not None:
            self.bot.start()
        return self

    def config(self) -> str:
        """Return the daemon's channel sections for mail and SMS."""
        gateway = f"http://127.0.0.1:{self.gateway.port}"
        return (
            '[[channels]]\ntype = "email"\nname = "support"\n'
            "[channels.imap]\n"
            f'host = "127.0.0.1"\nport = {self.dovecot.port}\ntls = "none"\n'
            f'username = "{USER}"\npassword = "{PASSWORD}"\n'
            "idle_renew = 60\npoll_interval = 1\ntimeout = 5\n"
            "reconnect_min = 0.05\nreconnect_max = 0.5\n"
            "[channels.smtp]\n"
            f'host = "127.0.0.1"\nport = {self.smtp.port}\ntls = "none"\n'
            f'from_address = "{SUPPORT}"\ntimeout = 5\n\n'
            '[[channels]]\ntype = "sms_http"\nname = "gateway"\nhost = "127.0.0.1"\n'
            f'port = {self.sms_port}\ndefault_region = "DE"\n'
            "[channels.inbound]\n"
            f'auth = "secret"\nsecret = "{SMS_SECRET}"\nmethod = "POST"\n'
            "[channels.outbound]\n"
            f'url = "{gateway}/send?to={{to}}&text={{text}}"\n'
        ) + (
            f'\n[[channels]]\ntype = "telegram"\nname = "tg"\ntoken = "{TOKEN}"\n'
            f'base_url = "{self.bot.base_url}"\nbase_file_url = "{self.bot.base_file_url}"\n'
            "poll_timeout = 2\ntimeout = 5\n"
            if self.bot is not None
            else ""
        )

    def run(self, deadline: float) -> None:
        """Start the mail and SMS traffic threads; they finish by `deadline`."""
        self.threads = [
            threading.Thread(target=self._mail_loop, args=(deadline,), name="mails"),
            threading.Thread(target=self._sms_loop, args=(deadline,), name="texts"),
        ]
        if self.bot is not None:
            self.threads.append(threading.Thread(target=self._chat_loop, name="chats"))
        for t in self.threads:
            t.start()

    def join(self, timeout: float) -> None:
        for t in self.threads:
            t.join(timeout)

    def close(self) -> None:
        self.halt.set()
        self.join(5)
        self.gateway.close()
        self.smtp.stop()
        self.dovecot.close()
        if self.bot is not None:
            self.bot.stop()

    # -- traffic ---------------------------------------------------------------------

    def _mail(self, n: int) -> tuple[bytes, str]:
        msg = EmailMessage()
        msg["From"] = f"Customer {n} <mail{n % 40}@customers.example>"
        msg["To"] = SUPPORT
        msg["Subject"] = f"Order {n} question"
        message_id = f"<crash-{n}-{self.rng.getrandbits(32):08x}@customers.example>"
        msg["Message-ID"] = message_id
        msg.set_content(f"Hello, where is my order {n}? It has not arrived yet.")
        return msg.as_bytes(), message_id

    def _mail_loop(self, deadline: float) -> None:
        try:
            sent = 0
            while sent < self.mails and not self.halt.is_set():
                if self.paused.is_set():
                    time.sleep(0.02)
                    continue
                batch = min(self.mails - sent, self.rng.randint(1, 6))
                client = imaplib.IMAP4(self.dovecot.host, self.dovecot.port, timeout=10)
                try:
                    client.login(USER, PASSWORD)
                    for _ in range(batch):
                        raw, message_id = self._mail(sent)
                        status, detail = client.append("INBOX", None, None, raw)
                        if status != "OK":
                            raise RuntimeError(f"APPEND failed: {detail!r}")
                        with self.lock:
                            self.appended.append(message_id)
                        sent += 1
                finally:
                    client.logout()
                if time.monotonic() > deadline:
                    raise TimeoutError("mails not all appended")
                time.sleep(self.rng.uniform(0.02, 0.15))
        except Exception as exc:
            with self.lock:
                self.errors.append(f"mail loop: {type(exc).__name__}: {exc}")

    def _chat_loop(self) -> None:
        assert self.bot is not None
        try:
            for n in range(self.chats):
                while self.paused.is_set() and not self.halt.is_set():
                    time.sleep(0.02)
                if self.halt.is_set():
                    return
                update = self.bot.send_text(700_000 + n % 40, f"Where is my order {n}? #{n}")
                message = update["message"]
                with self.lock:
                    self.chatted.append(f"{message['chat']['id']}:{message['message_id']}")
                time.sleep(self.rng.uniform(0.01, 0.08))
        except Exception as exc:
            with self.lock:
                self.errors.append(f"chat loop: {type(exc).__name__}: {exc}")

    def _sms_loop(self, deadline: float) -> None:
        url = f"http://127.0.0.1:{self.sms_port}/sms"
        try:
            for n in range(self.texts):
                while self.paused.is_set() and not self.halt.is_set():
                    time.sleep(0.02)
                gateway_id = f"gw-{n:05d}"
                form = {
                    "from": f"+4915100{n % 50:05d}",
                    "to": "12345",
                    "text": f"Hallo, wo ist meine Bestellung {n}?",
                    "id": gateway_id,
                    "secret": SMS_SECRET,
                }
                data = urllib.parse.urlencode(form).encode()
                while True:
                    if self.halt.is_set():
                        return
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{gateway_id} never acknowledged")
                    try:
                        req = urllib.request.Request(url, data=data, method="POST")
                        with urllib.request.urlopen(req, timeout=5) as resp:
                            status = resp.status
                    except urllib.error.HTTPError as exc:
                        status = exc.code
                    except OSError:
                        status = 0  # the daemon is down or restarting: the gateway retries
                    if status == 200:
                        with self.lock:
                            self.acked_texts.add(gateway_id)
                        break
                    if status not in (0, 500, 502, 503):
                        raise RuntimeError(f"{gateway_id}: answered {status}")
                    time.sleep(0.05)
                time.sleep(self.rng.uniform(0.0, 0.05))
        except Exception as exc:
            with self.lock:
                self.errors.append(f"sms loop: {type(exc).__name__}: {exc}")

    # -- invariants ------------------------------------------------------------------

    def check(self, db_path: Path, *, final: bool) -> dict[str, int]:
        """Check mail and SMS against the store; return figures for the report."""
        with self.lock:
            appended, acked = list(self.appended), set(self.acked_texts)
            chatted = list(self.chatted)
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
        try:
            mail_ids = [
                r[0] for r in conn.execute("SELECT reply_ref FROM messages WHERE channel='support'")
            ]
            texts = {
                r[0]: r[1]
                for r in conn.execute(
                    "SELECT external_id, COUNT(*) FROM messages WHERE channel='gateway' "
                    "GROUP BY external_id"
                )
            }
            chats = [
                r[0] for r in conn.execute("SELECT external_id FROM messages WHERE channel='tg'")
            ]
        finally:
            conn.close()
        # Compared without the angle brackets, however the parser keeps them.
        mail_ids = [m.strip("<>") for m in mail_ids]
        appended = [m.strip("<>") for m in appended]
        doubled = len(mail_ids) - len(set(mail_ids))
        assert doubled == 0, f"{doubled} mails stored twice"
        assert set(mail_ids) <= set(appended), "a mail is stored that was never appended"
        missing_texts = [g for g in acked if g not in texts]
        assert not missing_texts, f"texts answered 200 but not stored: {missing_texts[:5]}"
        assert all(n == 1 for n in texts.values()), "a text is stored twice"
        assert len(chats) == len(set(chats)), "a Telegram message is stored twice"
        assert set(chats) <= set(chatted), "a Telegram message is stored that was never sent"
        if final:
            assert not self.errors, self.errors[:3]
            assert len(appended) == self.mails and set(mail_ids) == set(appended), (
                f"{len(set(appended) - set(mail_ids))} appended mails not stored"
            )
            assert len(acked) == self.texts == len(texts)
            assert len(chatted) == self.chats and set(chats) == set(chatted), (
                f"{len(set(chatted) - set(chats))} Telegram messages not stored"
            )
        return {
            "mails_stored": len(mail_ids),
            "texts_stored": len(texts),
            "chats_stored": len(chats),
        }
