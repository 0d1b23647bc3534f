"""SMS intake benchmark: signed Twilio webhooks → commit, as a ratio of the web channel's rate.

Usage: python bench/sms_ingest.py [--messages N] [--concurrency C] [--rounds R] [--check]

Starts the real daemon as a subprocess (tests.daemon_harness) with two channels on
the same process: the web channel (`POST /v1/messages`) and a Twilio channel
(`POST /sms`, `X-Twilio-Signature` checked against the auth token), SQLite at
synchronous=FULL, the `inbox` adapter and a roster wide enough that nothing queues.
Acknowledgements are off on the Twilio channel, so both measure intake alone.

Bodies are built before timing: web JSON bodies (bench/ingest.py's mix of English and
Chinese texts), and Twilio's real form (20 fields, as tests/peers_sms.py posts them)
signed with the official `twilio` RequestValidator. Every message comes from its own
contact (a new conversation each), as in bench/ingest.py. One aiohttp client in this
process sends N messages, C at a time over keep-alive connections, to one channel then
the other, alternating for R rounds after a warm-up (each phase starts with the outbox
drained, and the order swaps every round); a message counts once its 2xx
answer (sent only after the commit) is read. Reported: msgs/s per channel over all
rounds, and the ratio twilio / web (the issue's goal: at least 0.8).

Prints a table, then one JSON line (`"bench": "sms_ingest"`). Exit code 0 after a
completed run (with --check: 2 when the ratio is under 0.8), 1 when the bench could
not run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))  # `tests` (harness, peers) and bench/ingest.py

TARGET_RATIO = 0.8
WARMUP = 200
AGENT_CAPACITY = 1000


def twilio_bodies(
    url: str, token: str, count: int, offset: int
) -> list[tuple[bytes, dict[str, str]]]:
    """Return signed Twilio inbound forms from distinct numbers (body, headers)."""
    from ingest import TEXTS

    from tests.peers_sms import inbound_params, sign

    out = []
    for i in range(count):
        n = offset + i
        sender = f"+1415{2000000 + n:07d}"
        params = inbound_params(TEXTS[n % len(TEXTS)][0], sid=f"SM{n:032x}", sender=sender)
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": sign(url, params, token),
        }
        out.append((urllib.parse.urlencode(params).encode(), headers))
    return out


def web_bodies(count: int, offset: int) -> list[tuple[bytes, dict[str, str]]]:
    """Return web intake bodies from distinct contacts (body, headers)."""
    from ingest import message_body

    headers = {"Content-Type": "application/json"}
    return [
        (message_body(f"bench-{offset + i}@example.com", offset + i), headers) for i in range(count)
    ]


async def drive(
    session: Any, url: str, requests: list[tuple[bytes, dict[str, str]]], concurrency: int
) -> tuple[int, int, float]:
    """Send every request, `concurrency` at a time; return (ok, errors, seconds)."""
    pending = iter(requests)
    ok = errors = 0

    async def worker() -> None:
        nonlocal ok, errors
        for body, headers in pending:
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if 200 <= resp.status < 300:
                        ok += 1
                    else:
                        errors += 1
            except Exception:
                errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok, errors, time.perf_counter() - started


async def drained(state: Path, within: float = 120.0) -> None:
    """Wait until the daemon's outbox is empty (every delivery and ack sent)."""
    path = state / "omnirouter.db"
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            (left,) = conn.execute("SELECT COUNT(*) FROM outbox").fetchone()
        finally:
            conn.close()
        if not left:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the outbox did not drain within {within}s")


def config(state: Path, web_port: int, ops_port: int, sms_port: int, agents: int) -> str:
    """Return the daemon's config: web + Twilio channels, SQLite FULL, inbox, a wide roster."""
    from tests.daemon_harness import base_config
    from tests.peers_sms import ACCOUNT_SID, OUR_NUMBER

    roster = "".join(
        f'[[agents]]\nid = "agent{n:02d}"\ncapacity = {AGENT_CAPACITY}\ntool = "inbox"\n'
        'skills = ["en", "zh"]\n\n'
        for n in range(agents)
    )
    extra = (
        '[store]\nsynchronous = "full"\n\n'
        f'[[channels]]\ntype = "twilio"\nname = "sms"\nport = {sms_port}\n'
        f'account_sid = "{ACCOUNT_SID}"\nauth_token = "${{BENCH_TWILIO_TOKEN}}"\n'
        f'from_number = "{OUR_NUMBER}"\npublic_url = "http://127.0.0.1:{sms_port}"\n'
        'base_url = "http://127.0.0.1:9"\nack = { enabled = false }\n'
    )
    return base_config(state, web_port=web_port, ops_port=ops_port, agents=roster, extra=extra)


async def bench(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Run the phases; return every figure."""
    import aiohttp

    from tests.daemon_harness import DaemonProcess
    from tests.peers import free_port
    from tests.peers_sms import AUTH_TOKEN

    web_port, ops_port, sms_port = free_port(), free_port(), free_port()
    total = 2 * (WARMUP + args.rounds * args.messages)
    agents = total // AGENT_CAPACITY + 2
    daemon = DaemonProcess(
        tmp,
        config(tmp / "state", web_port, ops_port, sms_port, agents),
        env={"BENCH_TWILIO_TOKEN": AUTH_TOKEN},
    )
    web_url = f"http://127.0.0.1:{web_port}/v1/messages"
    sms_url = f"http://127.0.0.1:{sms_port}/sms"
    n, warm = args.messages, WARMUP
    web = web_bodies(warm + args.rounds * n, 0)
    sms = twilio_bodies(sms_url, AUTH_TOKEN, warm + args.rounds * n, 0)
    figures: dict[str, Any] = {"web": [], "twilio": []}
    try:
        await asyncio.to_thread(daemon.start)
        connector = aiohttp.TCPConnector(limit=args.concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            await drive(session, web_url, web[:warm], args.concurrency)
            await drive(session, sms_url, sms[:warm], args.concurrency)
            await drained(tmp / "state")
            phases = [("web", web_url, web), ("twilio", sms_url, sms)]
            for r in range(args.rounds):
                part = slice(warm + r * n, warm + (r + 1) * n)
                # Alternating order, and each phase starts with the outbox empty, so the
                # deliveries of one phase are not paid for by the next.
                for name, url, bodies in phases if r % 2 == 0 else phases[::-1]:
                    ok, errors, seconds = await drive(session, url, bodies[part], args.concurrency)
                    figures[name].append({"ok": ok, "errors": errors, "seconds": seconds})
                    await drained(tmp / "state")
    finally:
        await asyncio.to_thread(daemon.stop)
        daemon.close()
    result: dict[str, Any] = {
        "bench": "sms_ingest",
        "messages": n,
        "rounds": args.rounds,
        "concurrency": args.concurrency,
        "cpus": os.cpu_count(),
    }
    for name in ("web", "twilio"):
        ok = sum(f["ok"] for f in figures[name])
        seconds = sum(f["seconds"] for f in figures[name])
        result[f"{name}_rate"] = ok / seconds if seconds else 0.0
        result[f"{name}_errors"] = sum(f["errors"] for f in figures[name])
        result[f"{name}_rounds"] = [round(f["ok"] / f["seconds"], 1) for f in figures[name]]
    result["ratio"] = result["twilio_rate"] / result["web_rate"] if result["web_rate"] else 0.0
    return result


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the bench, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000, help="per channel per round")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--check", action="store_true", help="exit 2 if the ratio is under 0.8")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sms-bench-") as tmp:
        try:
            r = asyncio.run(bench(args, Path(tmp)))
        except Exception as exc:
            print(f"bench failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    print(f"{'channel':<10}{'msgs/s':>10}{'errors':>8}   per round")
    for name in ("web", "twilio"):
        rate, errors = r[f"{name}_rate"], r[f"{name}_errors"]
        print(f"{name:<10}{rate:>10.1f}{errors:>8}   {r[f'{name}_rounds']}")
    print(f"ratio twilio/web: {r['ratio']:.2f} (goal >= {TARGET_RATIO})")
    print(json.dumps(r))
    if args.check and (r["ratio"] < TARGET_RATIO or r["web_errors"] or r["twilio_errors"]):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
