"""In-process micro-benchmark: CPU per message of the ingest hot path, loop and writer apart.

Usage: python bench/pipeline_cpu.py [full|normal|off] [--messages N] [--concurrency C]
                                    [--repeat R] [--profile FILE] [--tmpdir DIR]
                                    [--stages] [--statements] [--gc-threshold N]

Drives `Pipeline.ingest` with the real `SqliteStore` (WAL, the given `synchronous`,
default FULL) and the real `Dispatcher`, as the daemon wires them, but without HTTP
or MQTT: the agent tool encodes each delivery's JSON body the way the MQTT adapter
does and returns at once. Every message comes from a distinct contact (as in
bench/ingest.py), so each opens a conversation and takes an agent slot; logging is
configured for JSON lines written to /dev/null.

Reports, per run, msgs/s and the CPU time per message of the event-loop thread and
of the SQLite writer thread separately (per-thread CPU clocks), plus the process total
(which also holds the few thread-pool calls) and the group-commit size. The wall-clock
rate depends on the disk's fsync; the CPU figures barely do, which makes them the
figures to compare between changes on a shared machine. `--profile` writes a
cProfile of the event-loop thread, timed by its CPU clock (read it with pstats). The
GIL switch interval and the cyclic collector's threshold are set to the daemon's (0.5 ms;
10,000, `--gc-threshold 700` for CPython's default); the CPU the collector took per
message and its longest pause are reported too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import json
import os
import resource
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import router.daemon  # noqa: E402
from adapters.inbox import encode_delivery  # noqa: E402
from bench.ingest import TEXTS  # noqa: E402
from router.config import build_config  # noqa: E402
from router.drivers import Delivery, DriverState  # noqa: E402
from router.logging import configure_logging  # noqa: E402
from router.metrics import Metrics  # noqa: E402
from router.model import InboundMessage, new_ulid, utcnow  # noqa: E402
from router.outbox import Dispatcher  # noqa: E402
from router.pipeline import Pipeline  # noqa: E402
from router.store.sqlite import SqliteStore  # noqa: E402


class EncodingTool:
    """An agent tool that builds the delivery body (as the MQTT adapter does) and drops it."""

    state = DriverState.CONNECTED

    def __init__(self) -> None:
        self.delivered = 0

    async def deliver(self, delivery: Delivery) -> None:
        encode_delivery(delivery)
        self.delivered += 1


class Stages:
    """CPU time of the loop thread per pipeline stage, by wrapping the stage's function.

    A stage is a function that runs without giving the loop up (in this bench: the
    classifier in the loop, placement, building the commit, the canonical log line, an
    outbox send to a tool that returns at once), so its thread CPU time is its own.
    """

    NAMES = ("classify", "place", "build", "log", "send")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.NAMES, 0.0)
        self._undo: list[tuple[Any, str, Any]] = []

    def install(self) -> None:
        from router import intake
        from router.schedule import Scheduler

        self._wrap(intake.Intake, "classify", "classify")
        self._wrap(Scheduler, "place", "place")
        self._wrap(intake.Intake, "_new_message", "build")
        self._wrap(intake, "log_routed", "log")
        self._wrap(Dispatcher, "_attempt", "send")

    def uninstall(self) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        self._undo.clear()

    def _wrap(self, owner: Any, name: str, stage: str) -> None:
        original = getattr(owner, name)
        seconds = self.seconds
        clock = time.thread_time
        if asyncio.iscoroutinefunction(original):

            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                t0 = clock()
                try:
                    return await original(*args, **kwargs)
                finally:
                    seconds[stage] += clock() - t0

            wrapper: Any = timed_async
        else:

            def timed(*args: Any, **kwargs: Any) -> Any:
                t0 = clock()
                try:
                    return original(*args, **kwargs)
                finally:
                    seconds[stage] += clock() - t0

            wrapper = timed
        self._undo.append((owner, name, original))
        setattr(owner, name, wrapper)


def thread_cpu(ident: int | None) -> float:
    """Return the CPU seconds a thread has used so far."""
    assert ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(ident))


def message(i: int, run: int) -> InboundMessage:
    """Return the i-th message as the web channel would hand it over."""
    text, subject = TEXTS[i % len(TEXTS)]
    body = json.dumps(
        {"text": text, "subject": subject, "contact": {"handle": f"r{run}-c{i}", "name": "Bench"}}
    ).encode()
    return InboundMessage(
        channel="web",
        channel_type="web",
        external_id=new_ulid(),
        contact_handle=f"r{run}-c{i}",
        text=text,
        contact_name="Bench",
        subject=subject,
        received_at=utcnow(),
        payload_sha256="0" * 64,
        raw=body,
    )


# As router.daemon.run_daemon sets it (CPython's default, 700, for a daemon from before).
_DAEMON_GC_THRESHOLD = getattr(router.daemon, "GC_YOUNG_THRESHOLD", 700)


class CollectorClock:
    """A gc callback: the CPU time the cyclic collector takes, and its longest pause."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.longest = 0.0
        self._began = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.thread_time()
            return
        took = time.thread_time() - self._began
        self.seconds += took
        self.longest = max(self.longest, took)


class StatementCount:
    """Counts the SQL statements the store's writer runs, by their first word."""

    def __init__(self) -> None:
        self.by_verb: dict[str, int] = {}

    def factory(self) -> type[sqlite3.Connection]:
        """Return a connection class that reports each statement it runs here."""
        count = self

        class Counted(sqlite3.Connection):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.set_trace_callback(count.seen)

        return Counted

    def seen(self, statement: str) -> None:
        verb = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else ""
        self.by_verb[verb] = self.by_verb.get(verb, 0) + 1


# Statements that open or close a transaction (a group commit's, shared by its units).
_TRANSACTION_VERBS = frozenset({"BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE"})


class Wired:
    """An open store wired as the daemon wires it: the pipeline, the outbox's dispatcher
    (running) and the no-op tool `t` it delivers to."""

    def __init__(self, cfg: Any, store: Any) -> None:
        self.metrics = Metrics()
        self.tool = EncodingTool()
        tools: dict[str, Any] = {"t": self.tool}  # duck-typed: only state and deliver()
        self.dispatcher = Dispatcher(store, lambda: tools, cfg.outbox, self.metrics)
        self.pipeline = Pipeline(cfg, store, self.metrics, self.dispatcher)
        self.sender: asyncio.Task[None] | None = None

    async def start(self) -> Wired:
        await self.pipeline.restore()
        self.sender = asyncio.create_task(self.dispatcher.run())
        return self

    async def ingest_all(self, messages: list[InboundMessage], concurrency: int) -> None:
        """Ingest the messages, `concurrency` at a time (as many HTTP requests would)."""
        sem = asyncio.Semaphore(concurrency)

        async def one(msg: InboundMessage) -> None:
            async with sem:
                await self.pipeline.ingest(msg)

        await asyncio.gather(*(one(m) for m in messages))

    async def stop(self) -> None:
        if self.sender is not None:
            self.sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.sender


async def run_once(
    args: argparse.Namespace, workdir: Path, run: int, profiler: cProfile.Profile | None
) -> dict[str, Any]:
    state_dir = workdir / f"run{run}"
    cfg = build_config(
        {
            "daemon": {"state_dir": str(state_dir)},
            "adapters": [{"type": "inbox", "name": "t"}],
            "agents": [{"id": f"a{i}", "capacity": 1000, "tool": "t"} for i in range(10)],
            # Every stage in this process, classification included, so each is measured
            # (bench/ingest.py measures the daemon with its classifier worker).
            "classifier": {"workers": 0},
        },
        source="bench",
    )
    store = SqliteStore(state_dir / "omnirouter.db", synchronous=args.synchronous)
    statements = StatementCount() if args.statements else None
    if statements is not None:
        store.writer.connection_factory = statements.factory()
    await store.open()
    wired = await Wired(cfg, store).start()
    pipeline, dispatcher, tool = wired.pipeline, wired.dispatcher, wired.tool
    messages = [message(i, run) for i in range(args.messages)]

    # Warm up (first-use caches, prepared statements), outside the measurement.
    for i in range(50):
        await pipeline.ingest(message(i, -1 - run))
    await dispatcher.drain(10)
    batches0, units0 = store.batches, store.units
    if statements is not None:
        statements.by_verb.clear()
    stages = Stages() if args.stages else None
    if stages is not None:
        stages.install()

    writer = store.writer.thread
    assert writer is not None
    loop_ident = threading.get_ident()
    collector = CollectorClock()
    gc.callbacks.append(collector)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    l0, w0 = thread_cpu(loop_ident), thread_cpu(writer.ident)
    t0 = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    await wired.ingest_all(messages, args.concurrency)
    drained = await dispatcher.drain(30)
    if profiler is not None:
        profiler.disable()
    t1 = time.perf_counter()
    l1, w1 = thread_cpu(loop_ident), thread_cpu(writer.ident)
    if stages is not None:
        stages.uninstall()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    gc.callbacks.remove(collector)
    n = args.messages
    total = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    result = {
        "msgs_per_s": n / (t1 - t0),
        "loop_us": (l1 - l0) / n * 1e6,
        "writer_us": (w1 - w0) / n * 1e6,
        "process_us": total / n * 1e6,
        "units_per_commit": (store.units - units0) / max(1, store.batches - batches0),
        "gc_us": collector.seconds / n * 1e6,
        "gc_longest_ms": collector.longest * 1e3,
        "drained": drained,
        "delivered": tool.delivered,
    }
    if statements is not None:
        counts = statements.by_verb
        control = sum(v for k, v in counts.items() if k in _TRANSACTION_VERBS)
        result["statements_per_msg"] = {
            "data": (sum(counts.values()) - control) / n,
            "transaction": control / n,
            "by_verb": {k: round(v / n, 2) for k, v in sorted(counts.items())},
        }
    if stages is not None:
        per = {k: v / n * 1e6 for k, v in stages.seconds.items()}
        result["stages_us"] = {**per, "rest": result["loop_us"] - sum(per.values())}
    await wired.stop()
    await store.close()
    return result


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    workdir = Path(tempfile.mkdtemp(prefix="omnirouter-cpu-", dir=args.tmpdir))
    # Timed by the loop thread's CPU clock, so waits for the GIL and the disk do not count.
    profiler = cProfile.Profile(time.thread_time) if args.profile else None
    results = []
    for run in range(args.repeat):
        r = await run_once(args, workdir, run, profiler)
        results.append(r)
        print(
            f"run {run + 1}: {r['msgs_per_s']:7.0f} msgs/s  "
            f"loop {r['loop_us']:5.0f} us/msg  writer {r['writer_us']:5.0f} us/msg  "
            f"process {r['process_us']:5.0f} us/msg  "
            f"{r['units_per_commit']:.1f} units/commit  "
            f"collector {r['gc_us']:.0f} us/msg (longest {r['gc_longest_ms']:.0f} ms)",
            flush=True,
        )
        if "statements_per_msg" in r:
            st = r["statements_per_msg"]
            print(
                f"       writer statements per message: {st['data']:.2f} "
                f"(+ {st['transaction']:.2f} opening or closing a group commit); "
                + ", ".join(f"{k} {v:.2f}" for k, v in st["by_verb"].items()),
                flush=True,
            )
        if "stages_us" in r:
            print(
                "       loop by stage (us/msg): "
                + "  ".join(f"{k} {v:.0f}" for k, v in r["stages_us"].items()),
                flush=True,
            )
    if profiler is not None:
        profiler.dump_stats(args.profile)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("synchronous", nargs="?", default="full", choices=["full", "normal", "off"])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", metavar="FILE", help="cProfile of the event-loop thread")
    parser.add_argument("--tmpdir", help="where the store goes (default: the system temp dir)")
    parser.add_argument(
        "--stages",
        action="store_true",
        help="also split the loop's CPU by stage (classify, place, build, log, send, rest); "
        "the wrappers add a little to every figure",
    )
    parser.add_argument(
        "--statements",
        action="store_true",
        help="also count the SQL statements the writer runs per message (a trace callback "
        "on its connection, which adds to the writer's CPU)",
    )
    parser.add_argument(
        "--gc-threshold",
        type=int,
        default=_DAEMON_GC_THRESHOLD,
        help="the cyclic collector's first-generation threshold (default: the daemon's; "
        "CPython's own is 700)",
    )
    args = parser.parse_args(argv)
    sys.setswitchinterval(0.0005)  # as router.daemon.run_daemon does
    gc.set_threshold(args.gc_threshold, *gc.get_threshold()[1:])
    devnull = open(os.devnull, "w")
    configure_logging("info", json=True, stream=devnull)
    results = asyncio.run(main_async(args))
    best = {k: min(r[k] for r in results) for k in ("loop_us", "writer_us", "process_us")}
    print(
        f"best of {len(results)}: loop {best['loop_us']:.0f} us/msg, "
        f"writer {best['writer_us']:.0f} us/msg, process {best['process_us']:.0f} us/msg"
    )
    if args.stages:
        names = results[0]["stages_us"]
        stage_best = {k: min(r["stages_us"][k] for r in results) for k in names}
        print(
            "best of each stage (us/msg): "
            + "  ".join(f"{k} {v:.0f}" for k, v in stage_best.items())
        )
    print(json.dumps({"bench": "pipeline_cpu", "synchronous": args.synchronous, "runs": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
