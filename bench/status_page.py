"""Status page cost: how long `GET /v1/status` takes with a big roster and a long backlog.

Usage: PYTHONPATH=. python bench/status_page.py [--agents N] [--waiting N ...] [--requests N]

Runs the real pipeline in process (tests/test_pipeline.py's Harness: SQLite store,
scheduler, dispatcher) with every agent off line, so each message ingested waits;
the messages mix complaints, inquiries and urgent ones, so the queues split by class
and severity. The ops API is served on loopback by aiohttp's test server and asked
for `/v1/status` with the bearer token as the page's poll does every 2 s; prints the
median and p95 time per request and the size of the answer.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from router.daemon import OutboxDeadLetters
from router.ops import OpsApi
from tests.test_ops_api import FakeCorrections, FakeHealth, FakeMetrics
from tests.test_pipeline import Harness, msg

TOKEN = "bench-status-token-0123456789"
TEXTS = (
    "Where is my invoice for order {i}?",
    "My parcel {i} never arrived, I want a refund now!",
    "I will take legal action if order {i} is not refunded today",
    "Can I change the delivery address of order {i}?",
)


async def measure(agents: int, waiting: int, requests: int) -> dict[str, float]:
    """Return the median and p95 ms of GET /v1/status and the answer's size in bytes."""
    with tempfile.TemporaryDirectory() as folder:
        h = Harness(Path(folder), [{"id": f"a{i}", "capacity": 3} for i in range(agents)])
        pipeline = await h.start()
        for i in range(agents):
            await pipeline.set_presence(f"a{i}", False)
        for i in range(waiting):
            await pipeline.ingest(msg(TEXTS[i % len(TEXTS)].format(i=i), f"c{i}"))
        api = OpsApi(
            health=FakeHealth(),
            metrics=FakeMetrics(),
            agents=pipeline,
            dead_letters=OutboxDeadLetters(pipeline.store, pipeline.dispatcher),
            corrections=FakeCorrections(),
            admin_token=TOKEN,
        )
        times: list[float] = []
        size = 0
        async with TestClient(TestServer(api.app())) as client:
            for _ in range(requests):
                start = time.perf_counter()
                resp = await client.get("/v1/status", headers={"Authorization": f"Bearer {TOKEN}"})
                size = len(await resp.read())
                times.append((time.perf_counter() - start) * 1000)
        await h.stop()
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p95_ms": times[int(len(times) * 0.95) - 1],
        "bytes": size,
    }


def main() -> None:
    """Measure each backlog size in turn and print one line per size."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=50)
    p.add_argument("--waiting", type=int, nargs="+", default=[10, 1000])
    p.add_argument("--requests", type=int, default=100)
    args = p.parse_args()
    for waiting in args.waiting:
        r = asyncio.run(measure(args.agents, waiting, args.requests))
        print(
            f"agents={args.agents} waiting={waiting}: median {r['median_ms']:.1f} ms, "
            f"p95 {r['p95_ms']:.1f} ms, {r['bytes']} bytes"
        )


if __name__ == "__main__":
    main()
