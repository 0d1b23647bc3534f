"""`omnirouter store copy` speed: a SQLite store of N messages into PostgreSQL, and back.

Usage: python bench/store_copy.py [--messages 20000] [--json]

Builds a SQLite store through the store API (each message with a ~1 KB raw payload,
two attachments on every fourth, an assignment on two thirds, an accept and a
resolution on some, a correction on every tenth, their audit events), then times
`router.store.copy.copy_store` into a fresh database on the PostgreSQL the tests use
(tests/peers_pg.py: 127.0.0.1:5432, $TEST_PG_DSN, or a private cluster), and the copy
from there back into a new SQLite file. Prints rows, seconds and messages/s for each.
The figures include migrating the target and counting every table twice.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from router.model import Agent, Attachment
from router.store import TicketEvent
from router.store.copy import CopyReport, copy_store
from router.store.sqlite import SqliteStore
from tests.peers_pg import fresh_database, pg_server
from tests.test_store_contract import T0, new_message


async def build(path: Path, messages: int) -> float:
    """Fill a SQLite store with `messages` messages; return the seconds it took."""
    started = time.perf_counter()
    store = SqliteStore(path, synchronous="normal")
    await store.open()
    try:
        await store.sync_agents(
            [
                Agent(id=f"agent{i}", name=f"Agent {i}", capacity=10**6, tool="mqtt")
                for i in range(20)
            ]
        )

        async def one(i: int) -> None:
            agent = f"agent{i % 20}" if i % 3 else None
            new = new_message(
                handle=f"customer{i % 5000}@example.com",
                thread_key=f"thread-{i}",
                text=f"Message {i}: my parcel has not arrived, order #{i:08d}. " * 4,
                ingested_at=T0 + i,
                assign_to=agent,
            )
            attachments = ()
            if i % 4 == 0:
                attachments = (
                    Attachment("invoice.pdf", "application/pdf", 80_000, f"{i:064x}", f"r{i}"),
                    Attachment("photo.jpg", "image/jpeg", 2_000_000, f"{i + 1:064x}", f"s{i}"),
                )
            raw = (b'{"payload": "%d", "pad": "' % i) + b"x" * 1000 + b'"}'
            inbound = dataclasses.replace(new.inbound, attachments=attachments, raw=raw)
            new = dataclasses.replace(new, inbound=inbound)
            await store.ingest(new)
            if agent and i % 2:
                await store.accept(new.conversation_id, agent, T0 + i + 5)
            if agent and i % 6 == 1:
                await store.resolve_conversation(new.conversation_id, T0 + i + 60, actor=agent)
            if i % 10 == 0:
                await store.record_correction(new.message_id, "complaint", "agent1", T0 + i + 9)
                await store.record_event(
                    TicketEvent(new.conversation_id, T0 + i + 9, "refused", "agent2")
                )

        step = 500  # concurrent ingests share the writer's group commits
        for start in range(0, messages, step):
            await asyncio.gather(*(one(i) for i in range(start, min(start + step, messages))))
    finally:
        await store.close()
    return time.perf_counter() - started


def figures(name: str, report: CopyReport) -> dict[str, object]:
    """Summarise one copy."""
    return {
        "copy": name,
        "messages": report.messages,
        "rows": report.rows,
        "seconds": round(report.seconds, 2),
        "messages_per_s": round(report.messages / report.seconds),
        "rows_per_s": round(report.rows / report.seconds),
    }


def main() -> int:
    """Build, copy there and back, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--json", action="store_true", help="one JSON object per copy")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, pg_server() as server, fresh_database(server) as dsn:
        source = Path(tmp) / "omnirouter.db"
        built = asyncio.run(build(source, args.messages))
        size = source.stat().st_size
        there = copy_store(f"sqlite:{source}", dsn)
        back = copy_store(dsn, f"sqlite:{Path(tmp) / 'back.db'}")
        results = [figures("sqlite → postgresql", there), figures("postgresql → sqlite", back)]
    if args.json:
        for r in results:
            print(json.dumps(r, ensure_ascii=False))
        return 0
    print(f"source: {args.messages:,} messages, {size / 1e6:.1f} MB, built in {built:.1f} s")
    for r in results:
        print(
            f"{r['copy']:20}  {r['rows']:>9,} rows  {r['seconds']:>6} s  "
            f"{r['messages_per_s']:>8,} messages/s  {r['rows_per_s']:>8,} rows/s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
