"""Widget WebSocket load benchmark: N open chats, each sending a message every few seconds.

Usage: python bench/widget_ws.py [--connections N] [--interval S] [--seconds S]

Starts the real daemon as a subprocess (tests.daemon_harness) with a web channel sized
for N WebSockets and an `inbox` agent tool (agents hold their work at once, so nothing
waits on a broker). N widget connections are opened from this process, each with its
own visitor handle, exactly as widget.js does (`/v1/widget/ws?handle=...`). Each sends
a message every `--interval` seconds (first one at a random offset, so the load is
spread), with a fresh id; the time from the send to the server's `accepted` frame is the
send-to-commit latency (`accepted` goes out after the sink's durable commit and the
widget log's write). The acknowledgements the outbox pushes back are counted too.

Prints p50/p95/p99/max, counts, and the daemon's RSS (peak, sampled each second), then
one JSON line with every figure. The client and the daemon share this machine's CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _raise_nofile() -> None:
    """Let a process hold one descriptor per connection (soft limit up to the hard one)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _rss_kib(pid: int) -> int:
    """Return a process's resident set size in KiB (0 if gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _percentile(values: list[float], p: float) -> float:
    """Return the p-th percentile (nearest rank) of values, 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


class Stats:
    """What the clients saw."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.sent = 0
        self.accepted = 0
        self.acks = 0
        self.errors: dict[str, int] = {}
        self.connected = 0
        self.dropped = 0


async def client(
    session: aiohttp.ClientSession,
    url: str,
    index: int,
    stats: Stats,
    interval: float,
    until: float,
) -> None:
    """One widget: connect, then send a message every `interval` seconds until `until`."""
    handle = f"bench-{index:06d}-{random.getrandbits(32):08x}"
    pending: dict[str, float] = {}
    try:
        ws = await session.ws_connect(f"{url}?handle={handle}", heartbeat=None)
    except (aiohttp.ClientError, OSError) as exc:
        stats.errors[type(exc).__name__] = stats.errors.get(type(exc).__name__, 0) + 1
        return
    stats.connected += 1

    async def reader() -> None:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            frame = json.loads(msg.data)
            kind = frame.get("type")
            if kind == "accepted":
                started = pending.pop(frame["id"], None)
                if started is not None:
                    stats.latencies.append(time.perf_counter() - started)
                    stats.accepted += 1
            elif kind == "error":
                code = frame.get("code", "error")
                stats.errors[code] = stats.errors.get(code, 0) + 1
                pending.pop(frame.get("id", ""), None)
            elif kind == "message" and frame.get("kind") == "ack":
                stats.acks += 1
            elif kind == "history":
                stats.acks += sum(1 for m in frame["messages"] if m.get("kind") == "ack")

    reading = asyncio.create_task(reader())
    try:
        await asyncio.sleep(random.uniform(0, interval))
        n = 0
        while time.monotonic() < until and not ws.closed:
            n += 1
            key = f"{handle}-{n}"
            pending[key] = time.perf_counter()
            await ws.send_json(
                {"type": "message", "id": key, "text": f"Where is my order {index}-{n}?"}
            )
            stats.sent += 1
            await asyncio.sleep(interval)
        # Answers still in flight get a short grace.
        for _ in range(100):
            if not pending or ws.closed:
                break
            await asyncio.sleep(0.1)
    finally:
        if ws.closed:
            stats.dropped += 1
        await ws.close()
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the daemon, drive N widgets, and return the figures."""
    from tests.daemon_harness import DaemonProcess, base_config, http
    from tests.peers import free_port

    _raise_nofile()
    with TemporaryDirectory() as tmp:
        web_port, ops_port = free_port(), free_port()
        agents = "\n".join(
            f'[[agents]]\nid = "a{i}"\ncapacity = 500\ntool = "inbox"\nskills = ["en", "zh"]\n'
            for i in range(max(1, args.connections // 250 + 1))
        )
        config = base_config(
            Path(tmp) / "state", web_port=web_port, ops_port=ops_port, agents=agents
        )
        config = config.replace(
            f"port = {web_port}\n",
            f"port = {web_port}\nmax_connections = {args.connections + 200}\n"
            f"max_ws_connections = {args.connections + 100}\n",
            1,
        )
        daemon = DaemonProcess(Path(tmp), config, preexec_fn=_raise_nofile)
        daemon.start(timeout=60)
        peak = [0]

        async def sample() -> None:
            while True:
                peak[0] = max(peak[0], _rss_kib(daemon.pid))
                await asyncio.sleep(1)

        sampler = asyncio.create_task(sample())
        stats = Stats()
        try:
            rss_idle = _rss_kib(daemon.pid)
            url = f"ws://127.0.0.1:{web_port}/v1/widget/ws"
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as session:
                started = time.monotonic()
                until = started + args.seconds
                tasks = []
                for i in range(args.connections):
                    tasks.append(
                        asyncio.create_task(client(session, url, i, stats, args.interval, until))
                    )
                    if i % 100 == 99:
                        await asyncio.sleep(0.05)  # open in waves, as page views arrive
                connect_s = time.monotonic() - started
                await asyncio.gather(*tasks)
            _, ready, _ = http("GET", f"http://127.0.0.1:{ops_port}/readyz")
            rss_end = _rss_kib(daemon.pid)
        finally:
            sampler.cancel()
            daemon.stop()
            daemon.close()
    lat = stats.latencies
    return {
        "connections": args.connections,
        "connected": stats.connected,
        "interval_s": args.interval,
        "seconds": args.seconds,
        "open_waves_s": round(connect_s, 2),
        "sent": stats.sent,
        "accepted": stats.accepted,
        "acks_pushed": stats.acks,
        "errors": stats.errors,
        "dropped_connections": stats.dropped,
        "p50_ms": round(_percentile(lat, 50) * 1000, 1),
        "p95_ms": round(_percentile(lat, 95) * 1000, 1),
        "p99_ms": round(_percentile(lat, 99) * 1000, 1),
        "max_ms": round(max(lat, default=0) * 1000, 1),
        "daemon_rss_idle_mib": round(rss_idle / 1024, 1),
        "daemon_rss_peak_mib": round(peak[0] / 1024, 1),
        "daemon_rss_end_mib": round(rss_end / 1024, 1),
        "readyz_details": ready.get("drivers", {}).get("web", {}).get("details")
        if isinstance(ready, dict)
        else None,
    }


def main() -> int:
    """Parse arguments, run, print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    figures = asyncio.run(run(args))
    print(
        f"{figures['connected']}/{figures['connections']} widgets, one message each "
        f"{figures['interval_s']:g} s for {figures['seconds']:g} s: "
        f"{figures['accepted']}/{figures['sent']} committed, {figures['acks_pushed']} acks pushed"
    )
    print(
        f"send -> commit: p50 {figures['p50_ms']} ms, p95 {figures['p95_ms']} ms, "
        f"p99 {figures['p99_ms']} ms, max {figures['max_ms']} ms"
    )
    print(
        f"daemon RSS: idle {figures['daemon_rss_idle_mib']} MiB, "
        f"peak {figures['daemon_rss_peak_mib']} MiB; errors {figures['errors'] or 'none'}"
    )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
