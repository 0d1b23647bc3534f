"""Telegram's Bot API and an SMS gateway turn slow, hang or die behind a TCP proxy.

The real daemon polls a Telegram bot (the Bot API emulator of tests/peers_telegram.py)
and texts through an HTTP SMS gateway (a threaded sink), each reached through its own
TcpProxy. Customers keep writing throughout: Telegram messages are queued at the
emulator (which holds them until the daemon confirms their offset), texts are POSTed to
the daemon's gateway webhook. For each peer, slow, then hung, then dead, and restored:
every message is stored exactly once, every acknowledgement reaches the customer (by
Telegram or by text), the outbox ends empty with no dead letters, and /readyz named
the Telegram channel while its API was hung or dead.
"""

from __future__ import annotations

import asyncio
import collections
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_harness import DaemonProcess, base_config, ports
from tests.peers import free_port
from tests.peers_telegram import TOKEN, BotApiEmulator
from tests.reliability.outage_kit import DaemonProbes, GatewaySink, start_outage
from tests.reliability.tcp_proxy import TcpProxy
from tests.test_crash import read_db
from tests.test_webhook_breaker import apoll

SECRET = "outage-sms-gateway-secret-01"


class ChatWorld(DaemonProbes):
    """The daemon with a Telegram channel and an SMS gateway channel, each peer proxied."""

    def __init__(self, tmp_path: Path) -> None:
        self.bot = BotApiEmulator().start()
        self.gateway = GatewaySink()
        self.tg_proxy = TcpProxy("127.0.0.1", self.bot.port).start()
        self.sms_proxy = TcpProxy("127.0.0.1", self.gateway.port).start()
        web_port, ops_port = ports()
        self.sms_port = free_port()
        self.ops_url = f"http://127.0.0.1:{ops_port}"
        tg = f"http://{self.tg_proxy.url_host}"
        channels = (
            f'[[channels]]\ntype = "telegram"\nname = "tg"\ntoken = "{TOKEN}"\n'
            f'base_url = "{tg}/bot"\nbase_file_url = "{tg}/file/bot"\n'
            "poll_timeout = 1\ntimeout = 3\n\n"
            '[[channels]]\ntype = "sms_http"\nname = "gateway"\nhost = "127.0.0.1"\n'
            f'port = {self.sms_port}\ndefault_region = "DE"\n'
            f'[channels.inbound]\nauth = "secret"\nsecret = "{SECRET}"\nmethod = "POST"\n'
            "[channels.outbound]\n"
            f'url = "http://{self.sms_proxy.url_host}/send?to={{to}}&text={{text}}"\n'
        )
        self.state = tmp_path / "state"
        self.db_path = self.state / "omnirouter.db"
        config = base_config(
            self.state,
            web_port=web_port,
            ops_port=ops_port,
            extra=channels,
            agents='[[agents]]\nid = "alice"\ncapacity = 1000\ntool = "inbox"\n',
        )
        self.daemon = DaemonProcess(tmp_path, config)
        self.chats: list[str] = []  # "chat:message_id" sent to the bot
        self.texts: list[str] = []  # gateway ids answered 200
        self.n = 0

    def close(self) -> None:
        self.daemon.close()
        self.tg_proxy.stop()
        self.sms_proxy.stop()
        self.gateway.close()
        self.bot.stop()

    def chat(self, count: int) -> None:
        for _ in range(count):
            self.n += 1
            update = self.bot.send_text(900_000 + self.n, f"Where is my order {self.n}?")
            m = update["message"]
            self.chats.append(f"{m['chat']['id']}:{m['message_id']}")

    def text(self, count: int) -> None:
        for _ in range(count):
            self.n += 1
            gateway_id = f"gw-{self.n}"
            form = {
                "from": f"+4915100{self.n:05d}",
                "to": "12345",
                "text": f"Wo ist meine Bestellung {self.n}?",
                "id": gateway_id,
                "secret": SECRET,
            }
            req = urllib.request.Request(
                f"http://127.0.0.1:{self.sms_port}/sms",
                data=urllib.parse.urlencode(form).encode(),
                method="POST",
            )
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert resp.status == 200
            self.texts.append(gateway_id)

    def stored(self, channel: str) -> collections.Counter[str]:
        if not (self.state / "omnirouter.db").exists():
            return collections.Counter()
        with read_db(self.state / "omnirouter.db") as db:
            return collections.Counter(
                r[0]
                for r in db.execute("SELECT external_id FROM messages WHERE channel=?", (channel,))
            )

    def acked_chats(self) -> set[int]:
        return {s.chat_id for s in list(self.bot.sent)}

    def acked_numbers(self) -> set[str]:
        return set(self.gateway.sent)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[ChatWorld]:
    w = ChatWorld(tmp_path)
    try:
        w.daemon.start()
        yield w
    finally:
        print(w.daemon.log_text()[-4000:])
        w.close()


async def test_telegram_api_slow_then_hung_then_dead(world: ChatWorld) -> None:
    w = world
    await apoll(lambda: w.ready()[0] == 200, 20, "ready")
    for mode in ("slow", "hung", "dead"):
        start_outage(w.tg_proxy, mode)
        await asyncio.to_thread(w.chat, 4)
        if mode != "slow":
            await apoll(
                lambda: (r := w.ready())[0] == 503 and "tg" in r[1]["degraded"],
                20,
                f"{mode} Bot API: /readyz naming the channel",
            )
        w.tg_proxy.restore()
        await apoll(
            lambda: set(w.stored("tg")) == set(w.chats), 30, f"{mode}: every message stored"
        )
        await apoll(lambda: w.ready()[0] == 200, 20, f"{mode}: ready again")
    chats = {int(c.split(":")[0]) for c in w.chats}
    await apoll(lambda: chats <= w.acked_chats(), 30, "every customer acknowledged")
    await apoll(lambda: w.outbox_and_dead()[0] == 0, 20, "the outbox empty")
    assert w.outbox_and_dead()[1] == 0
    assert set(w.stored("tg").values()) == {1}


async def test_sms_gateway_slow_then_hung_then_dead(world: ChatWorld) -> None:
    w = world
    await apoll(lambda: w.ready()[0] == 200, 20, "ready")
    for mode in ("slow", "hung", "dead"):
        start_outage(w.sms_proxy, mode)
        await asyncio.to_thread(w.text, 4)  # answered 200 at once: intake does not wait
        numbers = {f"+4915100{int(t.split('-')[1]):05d}" for t in w.texts[-4:]}
        if mode != "slow":
            await asyncio.sleep(1.0)
            assert not numbers <= w.acked_numbers(), f"{mode}: not an outage"
        w.sms_proxy.restore()
        await apoll(lambda n=numbers: n <= w.acked_numbers(), 40, f"{mode}: acks sent")
    assert set(w.stored("gateway")) == set(w.texts)
    assert set(w.stored("gateway").values()) == {1}
    await apoll(lambda: w.outbox_and_dead()[0] == 0, 20, "the outbox empty")
    assert w.outbox_and_dead()[1] == 0
