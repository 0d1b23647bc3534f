"""The daemon end to end for Telegram: the Bot API emulator in, MQTT agents, replies back.

Each test starts `python -m router.cli run -c FILE` (tests/daemon_harness.py) with a
Telegram channel (`tg`, polling) pointed at tests/peers_telegram.py, so the daemon's
python-telegram-bot talks to the emulator over loopback exactly as to Telegram.

1. A customer's message gets a ticket and a short acknowledgement in the chat, reaches
   the agent over MQTT, and the agent's `reply` action comes back to the same chat; a
   follow-up joins the ticket without a second acknowledgement.
2. SIGKILL after the commit but before Telegram got the offset that confirms it: after
   the restart Telegram re-delivers, and nothing is lost or doubled (messages,
   conversations, acknowledgements).
3. A customer who blocked the bot: the acknowledgement becomes a dead letter with the
   reason "bot blocked by the user", not a retry loop.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from channels.telegram import BLOCKED
from tests import peers
from tests.daemon_harness import DaemonProcess, base_config, http, ports
from tests.peers import Mosquitto
from tests.peers_telegram import TOKEN, BotApiEmulator
from tests.test_daemon_e2e import apoll, next_delivery, poll

pytestmark = [pytest.mark.slow]

mosquitto = peers.mosquitto

PREFIX = "e2e-tg/agents"
CHANNEL = "tg"
TARGET = f"channel:{CHANNEL}"


@pytest.fixture
def api() -> Iterator[BotApiEmulator]:
    """Yield a running Bot API emulator."""
    with BotApiEmulator() as emulator:
        yield emulator


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
        print(f"--- daemon log {d.log_path.name} ---\n{d.log_text()[-8000:]}")


def telegram_config(
    state_dir: Path, api: BotApiEmulator, broker: Mosquitto | None = None
) -> tuple[str, str]:
    """Return (config text, ops URL) for a daemon with the Telegram channel `tg`."""
    web_port, ops_port = ports()
    channel = (
        f'[[channels]]\ntype = "telegram"\nname = "{CHANNEL}"\ntoken = "{TOKEN}"\n'
        f'base_url = "{api.base_url}"\nbase_file_url = "{api.base_file_url}"\n'
        "poll_timeout = 5\ntimeout = 5\n"
    )
    if broker is not None:
        adapters = (
            f'[[adapters]]\ntype = "mqtt"\nname = "desk"\nhost = "{broker.host}"\n'
            f'port = {broker.port}\ntopic_prefix = "{PREFIX}"\nreconnect_min = 0.05\n'
            "reconnect_max = 0.3\nconnect_timeout = 2\npublish_timeout = 2\n"
        )
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
    return text, f"http://127.0.0.1:{ops_port}"


def ready(ops: str) -> bool:
    """Return whether /readyz says every driver is connected."""
    return http("GET", ops + "/readyz")[0] == 200


def rows(state_dir: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Run a read-only query on the daemon's database ([] before its schema exists)."""
    path = state_dir / "omnirouter.db"
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(sql, args).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        conn.close()


def messages(state_dir: Path) -> list[tuple[str, str]]:
    """Return (external_id, conversation_id) of every stored Telegram message."""
    return [
        (str(r[0]), str(r[1]))
        for r in rows(
            state_dir,
            "SELECT external_id, conversation_id FROM messages WHERE channel=? ORDER BY id",
            CHANNEL,
        )
    ]


# -- 1. ticket, acknowledgement, agent, reply ------------------------------------------------


async def test_a_message_gets_a_ticket_an_ack_an_agent_and_the_reply_comes_back(
    tmp_path: Path,
    spawn: Callable[[str], DaemonProcess],
    api: BotApiEmulator,
    mosquitto: Mosquitto,
) -> None:
    state = tmp_path / "state"
    config, ops = telegram_config(state, api, mosquitto)
    chat = 4242
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="tg-agent") as sub:
        await sub.subscribe(f"{PREFIX}/+/inbox", qos=1)
        await asyncio.to_thread(spawn, config)
        await apoll(lambda: ready(ops), what="/readyz with the bot polling")

        api.send_text(chat, "Hello, my order 4711 has not arrived. When will it ship?")
        topic, delivery = await next_delivery(sub, within=15)
        assert topic == f"{PREFIX}/alice/inbox"
        ticket = delivery["ticket"]
        message = delivery["message"]
        assert message["channel"] == CHANNEL and message["channel_type"] == "telegram"
        assert message["contact"] == {"handle": str(chat), "name": "Carol"}
        assert "order 4711" in message["text"]

        # The short acknowledgement lands in the same chat, naming the ticket.
        (ack,) = await apoll(lambda: api.sent_to(chat), what="the acknowledgement")
        assert ticket in ack.text and "min" in ack.text

        # A follow-up joins the ticket; no second acknowledgement.
        api.send_text(chat, "It was due on Monday.")
        _, second = await next_delivery(sub, within=15)
        assert second["ticket"] == ticket

        # The agent answers from their tool: the reply reaches the chat, split if long.
        answer = "您好，您的包裹今天已经发出，运单号 ZX-123。" + "谢谢您的耐心。" * 600
        await sub.publish(
            f"{PREFIX}/alice/actions",
            json.dumps(
                {
                    "action": "reply",
                    "conversation_id": delivery["conversation_id"],
                    "value": answer,
                }
            ),
            qos=1,
        )
        sent = await apoll(lambda: api.sent_to(chat)[1:], within=15, what="the reply")
        await apoll(lambda: len(api.sent_to(chat)) == 3, what="both parts of the reply")
        parts = [s.text for s in api.sent_to(chat)[1:]]
        assert sent and "".join(parts) == answer
        assert all(len(p.encode("utf-16-le")) // 2 <= 4096 for p in parts)
        await apoll(
            lambda: not rows(state, "SELECT 1 FROM outbox"), what="nothing left in the outbox"
        )
        assert len(api.sent_to(chat)) == 3


# -- 2. SIGKILL between commit and acknowledgement -------------------------------------------


def test_sigkill_between_commit_and_offset_ack_loses_and_doubles_nothing(
    tmp_path: Path, spawn: Callable[[str], DaemonProcess], api: BotApiEmulator
) -> None:
    state = tmp_path / "state"
    config, ops = telegram_config(state, api)
    d = spawn(config)
    poll(lambda: ready(ops), what="/readyz with the bot polling")
    api.freeze_confirm = True  # the getUpdates that would confirm them never lands
    chats = (601, 602, 603)
    # One batch: the getUpdates after it is the one that would confirm all six.
    api.push_many(
        "message",
        [api.message(chats[i % 3], f"message {i} about order {4700 + i}") for i in range(6)],
    )
    poll(lambda: len(messages(state)) == 6, within=15, what="six commits")
    poll(lambda: api.confirm_attempts >= 1, what="the confirming getUpdates")
    poll(lambda: not rows(state, "SELECT 1 FROM outbox"), within=15, what="acks sent")
    assert len(api.pending()) == 6  # committed, not confirmed
    before = messages(state)
    d.kill()

    api.unfreeze()
    d.restart()
    poll(lambda: not api.pending(), within=15, what="re-delivered and confirmed")
    poll(lambda: d.log_events("message.duplicate"), within=10, what="re-reads seen")
    assert messages(state) == before  # nothing lost, nothing doubled
    assert len({c for _, c in before}) == 3
    # One acknowledgement per chat, before and after the crash alike.
    for chat in chats:
        assert len(api.sent_to(chat)) == 1, [s.text for s in api.sent_to(chat)]
    assert len(d.log_events("message.duplicate")) == 6


# -- 3. blocked bot ----------------------------------------------------------------------------


def test_a_blocked_bot_dead_letters_the_ack_with_that_reason(
    tmp_path: Path, spawn: Callable[[str], DaemonProcess], api: BotApiEmulator
) -> None:
    state = tmp_path / "state"
    config, ops = telegram_config(state, api)
    spawn(config)
    poll(lambda: ready(ops), what="/readyz with the bot polling")
    api.blocked.add(777)
    api.send_text(777, "I have a question about my bill")
    dead = poll(
        lambda: rows(
            state, "SELECT kind, reason, attempts FROM dead_letters WHERE target=?", TARGET
        ),
        within=15,
        what="the dead letter",
    )
    ((kind, reason, attempts),) = dead
    assert kind == "ack" and reason == f"PermanentError: {BLOCKED}" and attempts == 1
    assert len(messages(state)) == 1  # the message itself is routed as usual
