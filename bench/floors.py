"""Per-message floors: what the libraries and the machine cost before any routing.

Usage: python bench/floors.py [--count N] [--repeat R] [--json]

The hot-path issue asks for about 0.3 ms of daemon CPU per message. This bench measures,
in one process and one session, the CPU that the pieces every message needs cost on
their own, so the daemon's figure can be read against them:

* **publish**: the event loop's CPU per QoS 1 publish to a private Mosquitto
  (tests.peers.Mosquitto), 64 in flight: a bare aiomqtt client, then the `mqtt` agent
  tool's `deliver()` (deadline, PUBACK wait, the delivery's encoding).
* **commit**: a thread's CPU per SQLite commit in WAL mode at `synchronous=FULL` (the
  store's setting), with one small row and with 20 rows (a group commit's shape).
* **classify**: the event loop's CPU per verdict of the classifier the daemon runs on its
  embedded defaults (the trained model), back to back and with 5 ms between messages (a
  moderate rate: caches go cold between them), and the same through one classifier worker
  process (`router.classify_workers`) one message at a time: the round trip the loop pays
  instead of classifying.

The bare aiohttp handler's CPU per request (the HTTP floor) is the baseline row of
`python bench/ingest.py`. Each figure is the best of `--repeat` runs (a shared VM adds
noise upwards, never downwards). Prints a table, then one JSON line with `--json`. Exit
code 0 after a completed run, 1 when the bench could not run (no mosquitto).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `tests` (peers, payloads) lives at the repo root

import aiomqtt  # noqa: E402
import structlog  # noqa: E402

from adapters.mqtt import MqttConfig, MqttTool  # noqa: E402
from bench.ingest import TEXTS  # noqa: E402
from router.classify_workers import ClassifierWorkers  # noqa: E402
from router.config import load_config  # noqa: E402
from router.delivery import encode_delivery  # noqa: E402
from router.drivers import AgentAction, Delivery, DriverContext, DriverState  # noqa: E402
from router.intake import classifier_spec  # noqa: E402
from router.logging import configure_logging  # noqa: E402
from router.model import new_ulid  # noqa: E402
from tests import payloads  # noqa: E402
from tests.peers import MOSQUITTO, NEEDS_MOSQUITTO_REASON, Mosquitto, wait_until  # noqa: E402

IN_FLIGHT = 64
PREFIX = "floors/agents"
SPACING = 0.005  # seconds between spaced messages (200 msg/s)


async def best_of(repeat: int, run: Callable[[], Awaitable[float]]) -> float:
    """Return the lowest per-operation figure of `repeat` runs."""
    return min([await run() for _ in range(repeat)])


# -- publish ------------------------------------------------------------------------


def delivery_bodies(count: int) -> list[Delivery]:
    out = []
    for n in range(count):
        agent = f"agent{n % 10}"
        payload = payloads.assignment(n, agent=agent, text=TEXTS[n % len(TEXTS)][0])
        out.append(Delivery(new_ulid(), "mq", agent, agent, payload))
    return out


async def gathered(count: int, one: Callable[[int], Awaitable[None]]) -> float:
    """Run `one(i)` for every i, IN_FLIGHT at once; return loop CPU µs per call."""
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def gated(i: int) -> None:
        async with gate:
            await one(i)

    began = time.thread_time()  # this thread's CPU: the event loop's
    await asyncio.gather(*(gated(i) for i in range(count)))
    return (time.thread_time() - began) / count * 1e6


async def publish_floors(count: int, repeat: int, tmpdir: Path) -> dict[str, float]:
    deliveries = delivery_bodies(count)
    encoded = [(d.agent_id, encode_delivery(d)) for d in deliveries]
    figures: dict[str, float] = {}
    with Mosquitto(extra_config="max_queued_messages 0\nmax_inflight_messages 0") as broker:
        async with aiomqtt.Client(
            broker.host, broker.port, identifier="floors-bare", max_inflight_messages=256
        ) as client:
            client.pending_calls_threshold = 65535  # its warning per call would be measured

            async def bare(i: int) -> None:
                agent, body = encoded[i]
                await client.publish(f"{PREFIX}/{agent}/inbox", body, qos=1)

            await gathered(min(count, 200), bare)  # warm the connection and caches
            figures["publish_bare_us"] = await best_of(repeat, lambda: gathered(count, bare))

        ctx = DriverContext(state_dir=tmpdir, log=structlog.get_logger("floors"))
        tool = MqttTool(
            "mq",
            MqttConfig(
                type="mqtt", name="mq", host=broker.host, port=broker.port, topic_prefix=PREFIX
            ),
            ctx,
        )

        async def ignore(action: AgentAction) -> None:
            return None

        running = asyncio.create_task(tool.run(ignore))
        try:
            await wait_until(lambda: tool.state == DriverState.CONNECTED, 10)

            async def through_tool(i: int) -> None:
                await tool.deliver(deliveries[i])

            await gathered(min(count, 200), through_tool)
            figures["publish_tool_us"] = await best_of(
                repeat, lambda: gathered(count, through_tool)
            )
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            await tool.stop()
    return figures


# -- commit -------------------------------------------------------------------------


def commit_cpu(path: Path, commits: int, rows: int) -> tuple[float, float]:
    """Return (CPU µs, wall µs) per commit of `rows` small rows, in a thread of its own
    (as the store's writer), WAL mode at synchronous=FULL."""
    result: list[tuple[float, float]] = []

    def work() -> None:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, body TEXT)")
        body = "x" * 300  # about a message row's text
        began_cpu, began = time.thread_time(), time.perf_counter()
        for _ in range(commits):
            conn.execute("BEGIN IMMEDIATE")
            for _ in range(rows):
                conn.execute("INSERT INTO t(body) VALUES (?)", (body,))
            conn.execute("COMMIT")
        result.append(
            (
                (time.thread_time() - began_cpu) / commits * 1e6,
                (time.perf_counter() - began) / commits * 1e6,
            )
        )
        conn.close()

    thread = threading.Thread(target=work, name="floors-commit")
    thread.start()
    thread.join()
    return result[0]


def commit_floors(count: int, repeat: int, tmpdir: Path) -> dict[str, float]:
    figures: dict[str, float] = {}
    for rows in (1, 20):
        runs = [
            commit_cpu(tmpdir / f"commit-{rows}.db", max(count // 5, 100), rows)
            for _ in range(repeat)
        ]
        cpu, wall = min(runs)
        figures[f"commit_{rows}_cpu_us"] = cpu
        figures[f"commit_{rows}_wall_us"] = wall
    return figures


# -- classify -----------------------------------------------------------------------


Message = tuple[str, str]  # text and subject, as bench/ingest.py posts them (its TEXTS)


async def per_verdict(
    classify: Callable[[Message], Awaitable[object]], messages: list[Message], spacing: float
) -> float:
    """Return the event loop's CPU µs per `classify(message)`; with `spacing`, sleep that
    long between messages and leave the sleeps' own CPU out."""
    idle = 0.0
    began = time.thread_time()
    for message in messages:
        await classify(message)
        if spacing:
            before = time.thread_time()
            await asyncio.sleep(spacing)
            idle += time.thread_time() - before
    return (time.thread_time() - began - idle) / len(messages) * 1e6


async def classify_floors(count: int, repeat: int) -> dict[str, float]:
    # The classifier the daemon runs on its embedded defaults.
    spec = classifier_spec(load_config(None))
    local = spec.build()
    messages = [TEXTS[n % len(TEXTS)] for n in range(count)]
    spaced = messages[:400]  # 5 ms apart: 2 s of messages per run

    async def here(message: Message) -> object:
        text, subject = message
        return local.classify(text, subject=subject, contact="floors")

    figures = {
        "classify_loop_us": await best_of(repeat, lambda: per_verdict(here, messages, 0.0)),
        "classify_loop_spaced_us": await best_of(
            repeat, lambda: per_verdict(here, spaced, SPACING)
        ),
    }
    workers = ClassifierWorkers(spec, 1, local)
    await workers.start()
    try:
        if not await workers.wait_ready():
            raise RuntimeError("the classifier worker did not become ready")

        async def in_worker(message: Message) -> object:
            text, subject = message
            return await workers.classify(text, subject=subject, contact="floors")

        await per_verdict(in_worker, messages[:50], 0.0)  # warm
        figures["classify_worker_us"] = await best_of(
            repeat, lambda: per_verdict(in_worker, messages, 0.0)
        )
        figures["classify_worker_spaced_us"] = await best_of(
            repeat, lambda: per_verdict(in_worker, spaced, SPACING)
        )
    finally:
        await workers.close()
    return figures


async def run(args: argparse.Namespace) -> dict[str, Any]:
    configure_logging("warning", json=True)
    tmpdir = Path(tempfile.mkdtemp(prefix="omnirouter-floors-"))
    figures: dict[str, Any] = {"bench": "floors", "count": args.count, "repeat": args.repeat}
    try:
        figures.update(await publish_floors(args.count, args.repeat, tmpdir))
        figures.update(commit_floors(args.count, args.repeat, tmpdir))
        figures.update(await classify_floors(args.count, args.repeat))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="operations per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (best counts)")
    parser.add_argument("--json", action="store_true", help="also print one JSON line")
    args = parser.parse_args()
    if MOSQUITTO is None:
        print(f"bench cannot run: {NEEDS_MOSQUITTO_REASON}", file=sys.stderr)
        return 1
    try:
        f = asyncio.run(run(args))
    except Exception as exc:  # the bench could not run: say why
        print(f"bench failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    rows = [
        ("QoS 1 publish, bare aiomqtt (loop CPU)", f["publish_bare_us"]),
        ("QoS 1 publish, the mqtt tool's deliver()", f["publish_tool_us"]),
        ("SQLite FULL commit, 1 row (thread CPU)", f["commit_1_cpu_us"]),
        ("SQLite FULL commit, 20 rows (thread CPU)", f["commit_20_cpu_us"]),
        ("classify in the loop, back to back", f["classify_loop_us"]),
        ("classify in the loop, 5 ms apart", f["classify_loop_spaced_us"]),
        ("worker round trip, back to back (loop CPU)", f["classify_worker_us"]),
        ("worker round trip, 5 ms apart (loop CPU)", f["classify_worker_spaced_us"]),
    ]
    print(f"{'per operation, best of ' + str(args.repeat):46} {'µs':>8}")
    for name, value in rows:
        print(f"{name:46} {value:>8.0f}")
    print(
        f"SQLite commit wall time: {f['commit_1_wall_us']:.0f} µs (1 row), "
        f"{f['commit_20_wall_us']:.0f} µs (20 rows)"
    )
    if args.json:
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in f.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
