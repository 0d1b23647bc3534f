"""Telegram benchmark: polling intake and agent-reply latency, against the web channel.

Usage: python bench/telegram_ingest.py [--messages N] [--rate R] [--seconds S] [--replies K]

Starts the Bot API emulator (tests/peers_telegram.py, its own thread), a private
mosquitto, and the real daemon as a subprocess (tests/daemon_harness.py) with a web
channel and a Telegram channel (polling, acknowledgements off so both channels do the
same work per message), the MQTT adapter and a roster wide enough that nothing queues.
Commits are observed by polling the daemon's SQLite database read-only every 5 ms
(`messages` rows by rowid; a row exists only once committed with its route).

Phase 1, burst: N updates from N/4 chats are put on the emulator at once while the
channel long-polls; messages/s from the first update to the last commit. The same N
messages are POSTed to the web channel (`POST /v1/messages`, 64 in flight) on the same
daemon; the **ratio** Telegram / web is the figure to read.

Phase 2, latency: an open loop at R messages/s for S seconds on each channel in turn
(each from a new chat / contact); update pushed (or POST started) → row seen, p50/p99.

Phase 3, replies: for K of phase 2's Telegram conversations the agent publishes a
`reply` action on MQTT at 20/s; latency from the publish to the emulator receiving the
`sendMessage`, p50/p99. (The web channel does not push answers, so no ratio here.)

Prints a table, then one JSON line with every figure (`"bench": "telegram_ingest"`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `tests` (peers, daemon harness) lives at the repo root

import aiohttp  # noqa: E402
import aiomqtt  # noqa: E402

from tests.daemon_harness import DaemonProcess, base_config, ports  # noqa: E402
from tests.peers import MOSQUITTO, Mosquitto  # noqa: E402
from tests.peers_telegram import TOKEN, BotApiEmulator  # noqa: E402

PREFIX = "bench-tg/agents"
AGENTS = 10
POLL_INTERVAL = 0.005


def pct(values: list[float], p: float) -> float:
    """Return the p-th percentile (nearest rank) of values, in ms."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k] * 1000


class CommitWatcher:
    """Polls the daemon's database for new message rows; records when each was seen."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.seen: dict[tuple[str, str], float] = {}  # (channel, external_id) -> time seen
        self._last = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
                rows = conn.execute(
                    "SELECT rowid, channel, external_id FROM messages WHERE rowid > ?",
                    (self._last,),
                ).fetchall()
            except sqlite3.OperationalError:
                rows = []
            now = time.time()
            for rowid, channel, external_id in rows:
                self.seen.setdefault((channel, external_id), now)
                self._last = max(self._last, rowid)
            time.sleep(POLL_INTERVAL)

    async def wait_for(self, keys: list[tuple[str, str]], within: float = 120.0) -> None:
        deadline = time.monotonic() + within
        while not all(k in self.seen for k in keys):
            if time.monotonic() > deadline:
                missing = sum(1 for k in keys if k not in self.seen)
                raise RuntimeError(f"{missing} messages not committed within {within}s")
            await asyncio.sleep(0.01)


def config(state: Path, api: BotApiEmulator, broker: Mosquitto) -> tuple[str, int]:
    """Return the daemon config and the web port."""
    web_port, ops_port = ports()
    agents = "".join(
        f'[[agents]]\nid = "a{i}"\ncapacity = 1000\ntool = "desk"\nskills = ["en", "zh"]\n'
        for i in range(AGENTS)
    )
    adapters = (
        f'[[adapters]]\ntype = "mqtt"\nname = "desk"\nhost = "{broker.host}"\n'
        f'port = {broker.port}\ntopic_prefix = "{PREFIX}"\n'
    )
    channel = (
        f'[[channels]]\ntype = "telegram"\nname = "tg"\ntoken = "{TOKEN}"\n'
        f'base_url = "{api.base_url}"\nbase_file_url = "{api.base_file_url}"\n'
        "poll_timeout = 10\n[channels.ack]\nenabled = false\n"
    )
    text = base_config(
        state,
        web_port=web_port,
        ops_port=ops_port,
        adapters=adapters,
        agents=agents,
        extra=channel,
    )
    return text, web_port


TEXTS = [
    "Hello, my order {n} has not arrived yet. Could you check?",
    "您好，我的订单 {n} 还没有到，请帮我查一下。",
    "The invoice for order {n} is wrong, I was charged twice.",
    "建议你们的 App 增加订单 {n} 的物流推送。",
]


async def post(session: aiohttp.ClientSession, url: str, n: int, key: str) -> None:
    body = {"text": TEXTS[n % 4].format(n=n), "contact": {"handle": f"web-{key}"}}
    async with session.post(url, json=body, headers={"Idempotency-Key": key}) as resp:
        await resp.read()
        if resp.status not in (200, 201):
            raise RuntimeError(f"web POST answered {resp.status}")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--replies", type=int, default=200)
    args = parser.parse_args()
    if MOSQUITTO is None:
        print("needs mosquitto (Debian package mosquitto)", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="tg-bench-"))
    state = work / "state"
    figures: dict[str, Any] = {"bench": "telegram_ingest"}
    with BotApiEmulator() as api, Mosquitto() as broker:
        text, web_port = config(state, api, broker)
        daemon = DaemonProcess(work, text)
        daemon.start(timeout=30)
        watcher = CommitWatcher(state / "omnirouter.db")
        watcher.start()
        web_url = f"http://127.0.0.1:{web_port}/v1/messages"
        try:
            async with (
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session,
                aiomqtt.Client(broker.host, broker.port, identifier="bench") as sub,
            ):
                await sub.subscribe(f"{PREFIX}/+/inbox", qos=1)
                assignments: dict[str, tuple[str, str]] = {}  # handle -> (agent, conversation)

                async def collect() -> None:
                    async for m in sub.messages:
                        assert isinstance(m.payload, bytes)
                        d = json.loads(m.payload)
                        if d.get("kind") == "assignment":
                            handle = d["message"]["contact"]["handle"]
                            assignments[handle] = (d["routing"]["agent_id"], d["conversation_id"])

                collector = asyncio.create_task(collect())
                # Warm up both paths (classifier loaded, connections open).
                api.send_text(1, "warm up")
                await post(session, web_url, 0, "warm")
                await watcher.wait_for([("tg", "1:1"), ("web", "warm")])

                # Phase 1: burst.
                n = args.messages
                chats = max(1, n // 4)
                t0 = time.time()
                keys = []
                for i in range(n):
                    update = api.send_text(100_000 + i % chats, TEXTS[i % 4].format(n=i))
                    m = update["message"]
                    keys.append(("tg", f"{m['chat']['id']}:{m['message_id']}"))
                await watcher.wait_for(keys)
                tg_burst = n / (max(watcher.seen[k] for k in keys) - t0)
                t0 = time.time()
                sem = asyncio.Semaphore(64)

                async def one(i: int) -> None:
                    async with sem:
                        await post(session, web_url, i, f"b{i}")

                await asyncio.gather(*(one(i) for i in range(n)))
                wkeys = [("web", f"b{i}") for i in range(n)]
                await watcher.wait_for(wkeys)
                web_burst = n / (max(watcher.seen[k] for k in wkeys) - t0)
                figures.update(
                    burst_messages=n,
                    telegram_msgs_per_s=round(tg_burst, 1),
                    web_msgs_per_s=round(web_burst, 1),
                    ratio_telegram_web=round(tg_burst / web_burst, 3),
                )

                # Phase 2: open loop latency.
                count = int(args.rate * args.seconds)

                async def open_loop(kind: str) -> list[float]:
                    started: dict[tuple[str, str], float] = {}
                    tasks = []
                    begin = time.monotonic()
                    for i in range(count):
                        delay = begin + i / args.rate - time.monotonic()
                        if delay > 0:
                            await asyncio.sleep(delay)
                        if kind == "tg":
                            chat = 500_000 + i
                            now = time.time()
                            update = api.send_text(chat, TEXTS[i % 4].format(n=i))
                            started[("tg", f"{chat}:{update['message']['message_id']}")] = now
                        else:
                            key = f"l{i}"
                            started[("web", key)] = time.time()
                            tasks.append(asyncio.create_task(post(session, web_url, i, key)))
                    await asyncio.gather(*tasks)
                    await watcher.wait_for(list(started))
                    return [watcher.seen[k] - t for k, t in started.items()]

                tg_lat = await open_loop("tg")
                web_lat = await open_loop("web")
                figures.update(
                    rate=args.rate,
                    seconds=args.seconds,
                    telegram_p50_ms=round(pct(tg_lat, 50), 1),
                    telegram_p99_ms=round(pct(tg_lat, 99), 1),
                    web_p50_ms=round(pct(web_lat, 50), 1),
                    web_p99_ms=round(pct(web_lat, 99), 1),
                    ratio_p99_telegram_web=round(pct(tg_lat, 99) / pct(web_lat, 99), 2),
                )

                # Phase 3: agent reply → emulator.
                handles = [str(500_000 + i) for i in range(min(args.replies, count))]
                deadline = time.monotonic() + 30
                while not all(h in assignments for h in handles):
                    if time.monotonic() > deadline:
                        raise RuntimeError("assignments missing for the reply phase")
                    await asyncio.sleep(0.05)
                published: dict[int, float] = {}
                for i, handle in enumerate(handles):
                    agent, conversation = assignments[handle]
                    body = {
                        "action": "reply",
                        "conversation_id": conversation,
                        "value": f"Reply {i}: your parcel ships today.",
                    }
                    published[int(handle)] = time.time()
                    await sub.publish(f"{PREFIX}/{agent}/actions", json.dumps(body), qos=1)
                    await asyncio.sleep(0.05)
                deadline = time.monotonic() + 30
                while not all(api.sent_to(c) for c in published):
                    if time.monotonic() > deadline:
                        raise RuntimeError("replies missing at the emulator")
                    await asyncio.sleep(0.02)
                reply_lat = [api.sent_to(c)[0].at - t for c, t in published.items()]
                figures.update(
                    replies=len(reply_lat),
                    reply_p50_ms=round(pct(reply_lat, 50), 1),
                    reply_p99_ms=round(pct(reply_lat, 99), 1),
                )
                collector.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await collector
        finally:
            watcher.stop()
            daemon.stop()
            daemon.close()
    shutil.rmtree(work, ignore_errors=True)
    print(f"{'figure':<34} value")
    for key, value in figures.items():
        if key != "bench":
            print(f"{key:<34} {value}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(REPO))
    raise SystemExit(asyncio.run(main()))
