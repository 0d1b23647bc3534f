"""CPU per message of the ingest hot path on the PostgreSQL store: daemon side and server side.

Usage: python bench/pg_pipeline_cpu.py [--messages N] [--concurrency C] [--repeat R]
                                       [--modes client,server,prepared] [--pool-size P]
                                       [--statements]

`pipeline_cpu.py` on `PostgresStore` instead of `SqliteStore`: drives `Pipeline.ingest`
with the real store and `Dispatcher` (no HTTP, no MQTT; the agent tool encodes each
delivery's body and drops it), every message from a distinct contact. Each run gets a
fresh database on the server the tests use (tests/peers_pg.py: 127.0.0.1:5432,
$TEST_PG_DSN, or a private cluster from Debian's postgresql package).

The modes are how psycopg sends the units' statements, run in turn in one process so
they share the machine's state:

* `client`: client-side binding (`psycopg.ClientCursor`): psycopg quotes every value
  into the SQL text, and the server parses and plans each statement anew;
* `server`: server-side binding (the extended protocol, values apart from the text),
  each statement still parsed and planned anew (`prepare_threshold=None`);
* `prepared`: server-side binding with psycopg's automatic prepared statements (a
  statement is prepared on its connection after its fifth run), what the store does
  unless `[store] prepared_statements = false`.

Reports per run msgs/s and CPU per message: this process (event loop, the store's
worker threads, everything), and the server backends of the run's database (from
/proc/<pid>/stat, so the server must run on this machine; "n/a" otherwise). The
figures to compare are the CPU ones: the wall-clock rate depends on the WAL's fsync.
`--statements` also counts the statements the units send per message, each a round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402

from bench.pipeline_cpu import Wired, message, thread_cpu  # noqa: E402
from router.config import build_config  # noqa: E402
from router.logging import configure_logging  # noqa: E402
from router.store.pg_engine import PgConnection, PgEngine  # noqa: E402
from router.store.postgres import PostgresStore  # noqa: E402
from tests.peers_pg import fresh_database, pg_server  # noqa: E402

MODES = ("client", "server", "prepared")
_TICKS = os.sysconf("SC_CLK_TCK")


class StatementCount:
    """Counts the statements the store's units send (by first word) and the units'
    transactions (each a BEGIN and a COMMIT), by wrapping the engine's classes."""

    def __init__(self) -> None:
        self.by_verb: dict[str, int] = {}
        self.transactions = 0
        self._undo: list[tuple[Any, str, Any]] = []

    def install(self) -> None:
        def counted(original: Any) -> Any:
            def run(conn: PgConnection, sql: str, *args: Any) -> Any:
                verb = sql.lstrip().split(None, 1)[0].upper()
                self.by_verb[verb] = self.by_verb.get(verb, 0) + 1
                return original(conn, sql, *args)

            return run

        def transaction(original: Any) -> Any:
            def run(engine: PgEngine, *args: Any) -> Any:
                self.transactions += 1
                return original(engine, *args)

            return run

        for owner, name, wrap in (
            (PgConnection, "execute", counted),
            (PgConnection, "executemany", counted),
            (PgEngine, "_execute", transaction),
        ):
            original = getattr(owner, name)
            self._undo.append((owner, name, original))
            setattr(owner, name, wrap(original))

    def uninstall(self) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        self._undo.clear()


def new_store(dsn: str, mode: str, pool_size: int, instance: str) -> PostgresStore:
    """The store as a mode sends its statements (not yet opened)."""
    store = PostgresStore(
        dsn, pool_size=pool_size, instance=instance, prepared_statements=mode == "prepared"
    )
    if mode == "client":  # how the store sent statements before server-side binding
        store.engine.connect_kwargs["cursor_factory"] = psycopg.ClientCursor
    return store


def backend_cpu(dsn: str) -> float | None:
    """CPU seconds the server's backends for the store's database have used so far."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        pids = [
            r[0]
            for r in conn.execute(
                "SELECT pid FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ]
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None  # not on this machine (or not ours to read)
        total += (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime
    return total


async def run_once(args: argparse.Namespace, dsn: str, mode: str, run: int) -> dict[str, Any]:
    cfg = build_config(
        {
            "adapters": [{"type": "inbox", "name": "t"}],
            "agents": [{"id": f"a{i}", "capacity": 1000, "tool": "t"} for i in range(10)],
            "classifier": {"workers": 0},
        },
        source="bench",
    )
    store = new_store(dsn, mode, args.pool_size, f"bench-{mode}-{run}")
    await store.open()
    wired = await Wired(cfg, store).start()
    messages = [message(i, run) for i in range(args.messages)]
    # Warm up every connection (and its prepared statements) outside the measurement.
    await wired.ingest_all([message(i, -1 - run) for i in range(200)], args.concurrency)
    await wired.dispatcher.drain(10)
    statements = StatementCount() if args.statements else None
    if statements is not None:
        statements.install()
    loop_ident = threading.get_ident()
    workers = [t.ident for t in store.engine.threads]
    b0 = await asyncio.to_thread(backend_cpu, dsn)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    l0 = thread_cpu(loop_ident)
    w0 = sum(thread_cpu(w) for w in workers)
    t0 = time.perf_counter()
    await wired.ingest_all(messages, args.concurrency)
    drained = await wired.dispatcher.drain(30)
    t1 = time.perf_counter()
    l1 = thread_cpu(loop_ident)
    w1 = sum(thread_cpu(w) for w in workers)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    b1 = await asyncio.to_thread(backend_cpu, dsn)
    if statements is not None:
        statements.uninstall()
    n = args.messages
    process = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    await wired.stop()
    await store.close()
    result: dict[str, Any] = {
        "mode": mode,
        "msgs_per_s": n / (t1 - t0),
        "process_us": process / n * 1e6,
        "loop_us": (l1 - l0) / n * 1e6,
        "workers_us": (w1 - w0) / n * 1e6,
        "server_us": None if b0 is None or b1 is None else (b1 - b0) / n * 1e6,
        "drained": drained,
        "delivered": wired.tool.delivered,
    }
    if statements is not None:
        result["statements_per_msg"] = {
            "data": sum(statements.by_verb.values()) / n,
            "transactions": statements.transactions / n,
            "by_verb": {k: round(v / n, 2) for k, v in sorted(statements.by_verb.items())},
        }
    return result


def _us(value: float | None) -> str:
    return "  n/a" if value is None else f"{value:5.0f}"


async def main_async(args: argparse.Namespace, modes: list[str]) -> list[dict[str, Any]]:
    results = []
    with pg_server() as server:
        for run in range(args.repeat):
            for mode in modes:
                with fresh_database(server) as dsn:
                    r = await run_once(args, dsn, mode, run)
                results.append(r)
                print(
                    f"run {run + 1} {mode:>8}: {r['msgs_per_s']:6.0f} msgs/s  "
                    f"process {_us(r['process_us'])} us/msg (loop {_us(r['loop_us'])}, "
                    f"store workers {_us(r['workers_us'])})  "
                    f"server {_us(r['server_us'])} us/msg",
                    flush=True,
                )
                if "statements_per_msg" in r:
                    st = r["statements_per_msg"]
                    print(
                        f"       statements per message: {st['data']:.2f} in "
                        f"{st['transactions']:.2f} transactions (each a BEGIN and a COMMIT); "
                        + ", ".join(f"{k} {v:.2f}" for k, v in st["by_verb"].items()),
                        flush=True,
                    )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pool-size", type=int, default=4, help="the store's connections")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, run in turn")
    parser.add_argument(
        "--statements",
        action="store_true",
        help="also count the statements the units send per message, and their transactions "
        "(the wrappers add a little to the process's CPU)",
    )
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}: choose from {', '.join(MODES)}")
    sys.setswitchinterval(0.0005)  # as router.daemon.run_daemon does
    devnull = open(os.devnull, "w")
    configure_logging("info", json=True, stream=devnull)
    results = asyncio.run(main_async(args, modes))
    print()
    for mode in modes:
        mine = [r for r in results if r["mode"] == mode]
        servers = [r["server_us"] for r in mine if r["server_us"] is not None]
        print(
            f"median {mode:>8}: process {statistics.median(r['process_us'] for r in mine):.0f} "
            f"us/msg, server "
            + (f"{statistics.median(servers):.0f}" if servers else "n/a")
            + " us/msg"
        )
    print(json.dumps({"bench": "pg_pipeline_cpu", "runs": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
