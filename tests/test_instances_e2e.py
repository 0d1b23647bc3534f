"""Two daemons on one store: one reads the Telegram bot, the other takes over when it dies.

Both run `python -m router.cli run` (tests/daemon_harness.py) with their own state
directory and ports, the same SQLite file as store, and a Telegram channel polling the
Bot API emulator (tests/peers_telegram.py): a source that allows one reader at a time.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_harness import DaemonProcess, base_config, http, ports
from tests.peers_telegram import TOKEN, BotApiEmulator
from tests.test_daemon_e2e import poll

pytestmark = [pytest.mark.slow]

CHANNEL = "tg"
LEASE_TTL = 3  # seconds: a takeover within a few seconds keeps the test short


@pytest.fixture
def api() -> Iterator[BotApiEmulator]:
    """Yield a running Bot API emulator."""
    with BotApiEmulator() as emulator:
        yield emulator


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[[Path, str], DaemonProcess]]:
    """Start daemons; kill whatever is left and print their logs at teardown."""
    started: list[DaemonProcess] = []

    def _spawn(workdir: Path, config: str) -> DaemonProcess:
        workdir.mkdir(parents=True, exist_ok=True)
        d = DaemonProcess(workdir, config)
        started.append(d)
        d.start()
        return d

    yield _spawn
    for d in started:
        d.close()
        print(f"--- daemon log {d.workdir.name} ---\n{d.log_text()[-6000:]}")


def instance_config(
    workdir: Path, instance: str, store: Path, api: BotApiEmulator
) -> tuple[str, str]:
    """Return (config, ops URL) of instance `instance` on the shared `store`."""
    web_port, ops_port = ports()
    extra = (
        f'[store]\npath = "{store}"\n\n'
        f'[[channels]]\ntype = "telegram"\nname = "{CHANNEL}"\ntoken = "{TOKEN}"\n'
        f'base_url = "{api.base_url}"\nbase_file_url = "{api.base_file_url}"\n'
        "poll_timeout = 1\ntimeout = 5\n"
    )
    text = base_config(workdir / "state", web_port=web_port, ops_port=ops_port, extra=extra)
    text = text.replace(
        "[daemon]\n", f'[daemon]\ninstance = "{instance}"\nlease_ttl = {LEASE_TTL}\n', 1
    )
    return text, f"http://127.0.0.1:{ops_port}"


def readiness(ops: str) -> tuple[int, dict[str, Any]]:
    """Return /readyz's status and report."""
    status, body, _ = http("GET", ops + "/readyz")
    return status, body


def query(store: Path, sql: str) -> list[tuple[Any, ...]]:
    """Run a read-only query on the shared store."""
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def stored(store: Path) -> list[str]:
    """Return the external ids of the Telegram messages in the shared store."""
    sql = f"SELECT external_id FROM messages WHERE channel='{CHANNEL}' ORDER BY id"
    return [r[0] for r in query(store, sql)]


def test_one_instance_polls_and_the_other_takes_over_when_it_dies(
    tmp_path: Path, spawn: Callable[[Path, str], DaemonProcess], api: BotApiEmulator
) -> None:
    store = tmp_path / "shared.db"
    config_a, ops_a = instance_config(tmp_path / "a", "a", store, api)
    config_b, ops_b = instance_config(tmp_path / "b", "b", store, api)
    a = spawn(tmp_path / "a", config_a)
    poll(lambda: readiness(ops_a)[0] == 200, what="a ready")
    b = spawn(tmp_path / "b", config_b)
    poll(lambda: readiness(ops_b)[0] == 200, what="b ready")

    # a took the bot first; b is ready too, with its channel on standby.
    status, report = readiness(ops_a)
    assert report["instance"] == "a"
    assert set(report["leases"]) == {"instance:a", f"channel:{CHANNEL}"}
    assert report["drivers"][CHANNEL]["state"] == "connected"
    status, report = readiness(ops_b)
    assert status == 200 and report["degraded"] == []
    assert report["instance"] == "b"
    assert set(report["leases"]) == {"instance:b"}
    assert report["drivers"][CHANNEL]["state"] == "standby"
    metrics = http("GET", ops_b + "/metrics")[1]
    assert 'omnirouter_instance_info{instance="b"} 1.0' in metrics
    assert "omnirouter_leases_held 1.0" in metrics

    # a reads the first message; its acknowledgement meets flood control and waits in
    # the outbox, a's to send.
    chat = 4242
    api.rate_limits = [LEASE_TTL + 1]
    api.send_text(chat, "Hello, where is my order 4711?")
    poll(lambda: len(stored(store)) == 1, what="the first message stored")
    poll(
        lambda: query(store, "SELECT owner, attempts FROM outbox") == [("a", 1)],
        what="a's first attempt at the acknowledgement, refused",
    )
    assert api.sent_to(chat) == []
    assert a.log_events("telegram.polling") and not b.log_events("telegram.polling")

    # a dies without a word before its retry: its lease lapses, b starts reading the bot
    # and sends a's acknowledgement, once.
    a.kill()
    poll(
        lambda: f"channel:{CHANNEL}" in readiness(ops_b)[1]["leases"],
        within=5 * LEASE_TTL,
        what="b takes the channel's lease over",
    )
    assert [e["lease"] for e in b.log_events("lease.acquired")] == [f"channel:{CHANNEL}"]
    poll(lambda: readiness(ops_b)[1]["drivers"][CHANNEL]["state"] == "connected", what="b polls")
    (ack,) = poll(lambda: api.sent_to(chat), what="the acknowledgement, sent by b")
    (ticket,) = query(store, "SELECT conversation_id FROM messages")
    assert f"T-{ticket[0]}" in ack.text
    poll(lambda: query(store, "SELECT id FROM outbox") == [], what="the outbox empty")
    api.send_text(chat, "It was due on Monday.")
    poll(lambda: len(stored(store)) == 2, what="the second message stored, by b")
    assert len(set(stored(store))) == 2  # each update once
    # The first ticket's acknowledgement went out once. (The follow-up starts a ticket
    # of its own here: the channel's chat threads are kept in each instance's state_dir.)
    assert [s.text for s in api.sent_to(chat)].count(ack.text) == 1

    # b stops gracefully and gives its leases up: nothing is left held.
    assert b.stop() == 0
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5)
    try:
        held = conn.execute("SELECT name, owner FROM leases ORDER BY name").fetchall()
    finally:
        conn.close()
    assert held == [("instance:a", "a")]  # only the dead one's lapsed row
