"""Flood benchmark: the daemon's memory when offered ten times what it can take (issue 13).

Usage: python bench/reliability/flood.py [--measure 5] [--flood 20] [--factor 10] [--tool-down]
                                         [--clients 400] [--agents 20]

Starts the real daemon (tests.daemon_harness.DaemonProcess) with a web channel, SQLite
(WAL, synchronous=FULL) in a temp dir and the file inbox as the agents' tool, then:

1. **Sustainable rate R.** `--clients` clients POST back to back for `--measure` s;
   R is the rate of 201 answers.
2. **Flood.** The same clients are offered `--factor` x R for `--flood` s on an open
   schedule: a request starts at its slot if a client is free, and is counted as
   `not_sent` when every client is still waiting for an answer (the clients, not the
   daemon, shed it then).
3. **Drain.** Wait (up to 60 s) for the outbox to empty, so the figure "after" is the
   daemon's memory once its backlog is gone.

With `--tool-down` the agents' tool is a webhook nobody answers: the assignments stay
in the outbox, the drain phase lasts 10 s, and then the daemon's CPU is measured for
5 s while it only holds the backlog.

The daemon's RSS (psutil when installed, else VmRSS from /proc/PID/status) is sampled
every 0.5 s throughout. Printed: baseline RSS (after a warm-up, before the flood), peak
RSS, RSS right after the flood and after the drain, the answers by status, the request
latencies, and whether every 201-acknowledged message is stored exactly once (read from
the database after a clean stop). Then one JSON line with every figure.

Every message comes from a distinct contact, so each opens a conversation and takes an
agent slot; `--agents` x 1000 slots keep the scheduler's queue out of the picture unless
asked for. The client shares the machine's CPUs with the daemon: the figures are for
that setting. Exit code 0 after a completed run, 1 when the bench could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
for path in (REPO, REPO / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))  # `tests` (daemon harness) and bench/ingest helpers

from ingest import cpu_seconds, percentile  # noqa: E402

from tests.daemon_harness import DaemonProcess, base_config, ports  # noqa: E402
from tests.peers import free_port  # noqa: E402

SAMPLE_EVERY = 0.5
AGENT_CAPACITY = 1000  # the config's maximum per agent


def rss_bytes(pid: int) -> int:
    """Return the resident set size of pid in bytes (0 when the process is gone)."""
    try:
        import psutil  # optional: only used when installed

        return int(psutil.Process(pid).memory_info().rss)
    except ImportError:
        pass
    except Exception:
        return 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RssSampler:
    """Sample a process's RSS every SAMPLE_EVERY seconds in a thread, with phase labels."""

    def __init__(self, pid: int) -> None:
        """Prepare to sample pid; start() begins."""
        self.pid = pid
        self.phase = "start"
        self.samples: list[tuple[float, str, int]] = []  # (monotonic, phase, bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def start(self) -> RssSampler:
        """Start sampling in the background."""
        self._thread.start()
        return self

    def _run(self) -> None:
        """Sample until stop(), labelling each sample with the current phase."""
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.phase, rss_bytes(self.pid)))
            self._stop.wait(SAMPLE_EVERY)

    def now(self) -> int:
        """Take one sample now and return it."""
        value = rss_bytes(self.pid)
        self.samples.append((time.monotonic(), self.phase, value))
        return value

    def peak(self, *phases: str) -> int:
        """Return the largest sample taken in any of phases."""
        return max((b for _, p, b in self.samples if p in phases), default=0)

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join(5)


def daemon_config(
    state_dir: Path, web_port: int, ops_port: int, agents: int, tool_down: bool = False
) -> str:
    """Return the config: web channel, `agents` agents of capacity 1000 on one tool.

    The tool is the file inbox, or with tool_down a webhook whose receiver is not
    there (nothing listens on its port): every delivery then waits in the outbox.
    """
    tool = "inbox"
    adapters = '[[adapters]]\ntype = "inbox"\nname = "inbox"\n'
    if tool_down:
        tool = "hook"
        adapters = (
            f'[[adapters]]\ntype = "webhook"\nname = "hook"\n'
            f'url = "http://127.0.0.1:{free_port()}/down"\nsecret = "flood-bench-secret"\n'
            "timeout = 1\n"
        )
    roster = "\n".join(
        f'[[agents]]\nid = "a{i:02d}"\ncapacity = {AGENT_CAPACITY}\ntool = "{tool}"\n'
        f'skills = ["en", "zh"]\n'
        for i in range(agents)
    )
    # The defaults a deployment would run with, except a faster outbox scan.
    return base_config(
        state_dir, web_port=web_port, ops_port=ops_port, adapters=adapters, agents=roster
    )


class Load:
    """The clients: POST numbered messages, count answers, keep the acknowledged keys."""

    def __init__(self, session: Any, url: str) -> None:
        """Send through session to url; nothing counted yet."""
        self.session = session
        self.url = url
        self.n = 0
        self.acked: dict[str, str] = {}  # Idempotency-Key -> message id (201 answers)
        self.statuses: collections.Counter[str] = collections.Counter()
        self.latencies: list[float] = []

    async def post_one(self) -> int:
        """POST one new message; return the status (0 for a connection error)."""
        key = f"flood-{self.n}"
        self.n += 1
        body = json.dumps(
            {
                "text": f"Where is my order {self.n}? It was due last week.",
                "contact": {"handle": f"{key}@flood.test"},
            }
        ).encode()
        started = time.perf_counter()
        try:
            async with self.session.post(
                self.url,
                data=body,
                headers={"Content-Type": "application/json", "Idempotency-Key": key},
            ) as response:
                answer = await response.read()
                status = response.status
        except Exception as exc:
            self.statuses[f"error:{type(exc).__name__}"] += 1
            return 0
        self.latencies.append(time.perf_counter() - started)
        self.statuses[str(status)] += 1
        if status == 201:
            self.acked[key] = json.loads(answer)["message_id"]
        return status

    async def closed(self, clients: int, seconds: float) -> float:
        """Send back to back from `clients` clients for `seconds`; return the 201 rate."""
        before = self.statuses["201"]
        deadline = time.monotonic() + seconds

        async def client() -> None:
            while time.monotonic() < deadline:
                await self.post_one()

        started = time.monotonic()
        await asyncio.gather(*(client() for _ in range(clients)))
        return (self.statuses["201"] - before) / (time.monotonic() - started)

    async def open(self, clients: int, rate: float, seconds: float) -> dict[str, Any]:
        """Offer `rate` requests/s for `seconds` with at most `clients` in flight."""
        free = clients
        not_sent = 0
        tasks: set[asyncio.Task[int]] = set()

        def done(task: asyncio.Task[int]) -> None:
            nonlocal free
            free += 1
            tasks.discard(task)

        total = int(rate * seconds)
        t0 = time.perf_counter()
        for i in range(total):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if free == 0:
                not_sent += 1
                continue
            free -= 1
            task = asyncio.create_task(self.post_one())
            task.add_done_callback(done)
            tasks.add(task)
        elapsed = time.perf_counter() - t0
        await asyncio.gather(*tasks)
        return {"offered": total, "not_sent": not_sent, "offer_seconds": elapsed}


def outbox_size(db_path: Path) -> int:
    """Return the number of outbox items in the database (read-only)."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
    finally:
        conn.close()


def check_stored(db_path: Path, acked: dict[str, str]) -> dict[str, Any]:
    """Return how the acknowledged messages look in the database."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        stored: dict[str, list[str]] = collections.defaultdict(list)
        for key, message_id in conn.execute(
            "SELECT external_id, id FROM messages WHERE channel = 'web'"
        ):
            stored[key].append(message_id)
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()
    missing = [k for k in acked if k not in stored]
    wrong = [k for k, m in acked.items() if k in stored and stored[k] != [m]]
    return {
        "acked": len(acked),
        "stored": len(stored),
        "missing": len(missing),
        "wrong_or_twice": len(wrong),
        "all_stored_once": not missing and not wrong,
        "integrity": integrity,
    }


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Start the daemon in tmp, measure R, flood, drain, check the store; return figures."""
    import aiohttp

    web_port, ops_port = ports()
    state = tmp / "state"
    db_path = state / "omnirouter.db"
    config = daemon_config(state, web_port, ops_port, args.agents, args.tool_down)
    daemon = DaemonProcess(tmp, config)
    result: dict[str, Any] = {
        "bench": "flood",
        "clients": args.clients,
        "factor": args.factor,
        "tool_down": args.tool_down,
    }
    try:
        daemon.start()
        sampler = RssSampler(daemon.pid).start()
        connector = aiohttp.TCPConnector(limit=args.clients)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            load = Load(session, f"http://127.0.0.1:{web_port}/v1/messages")
            sampler.phase = "warmup"
            await load.closed(min(args.clients, 32), 1.0)
            await asyncio.to_thread(lambda: time.sleep(1.0))  # let the warm-up deliver
            result["rss_baseline"] = sampler.now()

            sampler.phase = "measure"
            cpu0 = cpu_seconds(daemon.pid)
            rate = await load.closed(args.clients, args.measure)
            result["sustainable_rate"] = rate
            result["measure_cpu_s"] = cpu_seconds(daemon.pid) - cpu0
            measured = dict(load.statuses)

            sampler.phase = "flood"
            flood_from = dict(load.statuses)
            lat_from = len(load.latencies)
            cpu0 = cpu_seconds(daemon.pid)
            offer = await load.open(args.clients, args.factor * rate, args.flood)
            result.update(offer)
            result["flood_cpu_s"] = cpu_seconds(daemon.pid) - cpu0
            result["flood_answers"] = {
                k: v - flood_from.get(k, 0)
                for k, v in load.statuses.items()
                if v != flood_from.get(k, 0)
            }
            flood_lat = load.latencies[lat_from:]
            result["flood_p50_ms"] = percentile(flood_lat, 50) * 1000
            result["flood_p99_ms"] = percentile(flood_lat, 99) * 1000
            result["flood_max_ms"] = max(flood_lat, default=0.0) * 1000
            result["rss_after_flood"] = sampler.now()
            result["outbox_after_flood"] = await asyncio.to_thread(outbox_size, db_path)

        sampler.phase = "drain"
        drain_started = time.monotonic()
        cpu0 = cpu_seconds(daemon.pid)
        # With the tool down nothing drains: watch the idle daemon hold its backlog.
        while time.monotonic() - drain_started < (10 if args.tool_down else 60):
            if await asyncio.to_thread(outbox_size, db_path) == 0:
                break
            await asyncio.sleep(0.5)
        result["drain_s"] = time.monotonic() - drain_started
        result["drain_cpu_share"] = (cpu_seconds(daemon.pid) - cpu0) / result["drain_s"]
        if args.tool_down:
            # What holding the backlog costs once only the agents' deliveries wait.
            cpu0 = cpu_seconds(daemon.pid)
            await asyncio.sleep(5.0)
            result["hold_cpu_share"] = (cpu_seconds(daemon.pid) - cpu0) / 5.0
            result["outbox_held"] = await asyncio.to_thread(outbox_size, db_path)
        result["outbox_after_drain"] = await asyncio.to_thread(outbox_size, db_path)
        await asyncio.sleep(1.0)
        result["rss_after_drain"] = sampler.now()
        result["rss_peak"] = sampler.peak("measure", "flood", "drain")
        result["rss_peak_measure"] = sampler.peak("measure")
        result["rss_peak_flood"] = sampler.peak("flood")
        result["rss_series_mib"] = [
            round(b / 2**20, 1) for _, p, b in sampler.samples if p in ("flood", "drain")
        ]
        result["answers_total"] = dict(load.statuses)
        result["answers_measure"] = measured
        sampler.stop()
        result["exit_code"] = await asyncio.to_thread(daemon.stop, 60)
        result["stored"] = await asyncio.to_thread(check_stored, db_path, load.acked)
    finally:
        daemon.close()
    return result


def report(r: dict[str, Any]) -> None:
    """Print the figures as a table."""

    def mib(key: str) -> str:
        """Return a byte figure in MiB."""
        return f"{r[key] / 2**20:.1f} MiB"

    rows = [
        ("sustainable intake R (201/s)", f"{r['sustainable_rate']:.0f}"),
        ("flood offered", f"{r['factor']} x R for {r['offer_seconds']:.1f} s = {r['offered']}"),
        ("  not sent (all clients busy)", str(r["not_sent"])),
        ("  answers during the flood", json.dumps(r["flood_answers"], sort_keys=True)),
        (
            "  latency p50 / p99 / max",
            f"{r['flood_p50_ms']:.0f} / {r['flood_p99_ms']:.0f} / {r['flood_max_ms']:.0f} ms",
        ),
        ("RSS baseline", mib("rss_baseline")),
        ("RSS peak while measuring R", mib("rss_peak_measure")),
        ("RSS peak during the flood", mib("rss_peak_flood")),
        ("RSS right after the flood", mib("rss_after_flood")),
        ("outbox after the flood", str(r["outbox_after_flood"])),
        (
            "drain",
            f"{r['drain_s']:.1f} s, outbox {r['outbox_after_drain']} left, "
            f"daemon CPU {r['drain_cpu_share']:.0%} of a core meanwhile",
        ),
        ("RSS after the drain", mib("rss_after_drain")),
    ]
    if "hold_cpu_share" in r:
        rows.append(
            (
                "holding the backlog (5 s)",
                f"{r['outbox_held']} items, daemon CPU {r['hold_cpu_share']:.0%} of a core",
            )
        )
    rows += [
        ("answers in total", json.dumps(r["answers_total"], sort_keys=True)),
        (
            "every 201 stored once",
            f"{r['stored']['all_stored_once']} ({r['stored']['acked']} acked, "
            f"{r['stored']['stored']} stored, integrity {r['stored']['integrity']})",
        ),
        ("daemon exit code", str(r["exit_code"])),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("RSS during flood+drain (MiB, every 0.5 s):", r["rss_series_mib"])


def main(argv: list[str] | None = None) -> int:
    """Run the bench and print the table and the JSON line; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure", type=float, default=5.0, help="seconds to measure R")
    parser.add_argument("--flood", type=float, default=20.0, help="seconds of flood")
    parser.add_argument("--factor", type=float, default=10.0, help="offered load / R")
    parser.add_argument("--clients", type=int, default=400, help="concurrent clients")
    parser.add_argument("--agents", type=int, default=20, help="agents of capacity 1000")
    parser.add_argument("--tmpdir", type=Path, default=None, help="where the store goes")
    parser.add_argument(
        "--tool-down",
        action="store_true",
        help="agents on a webhook nobody answers: every delivery waits in the outbox",
    )
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="omnirouter-flood-", dir=args.tmpdir) as tmp:
            result = asyncio.run(run(args, Path(tmp)))
    except Exception as exc:
        print(f"flood bench could not run: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    report(result)
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
