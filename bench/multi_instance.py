"""Several instances on one PostgreSQL store against one instance on SQLite, in one run.

Usage: python bench/multi_instance.py [--messages 3000] [--rate 150] [--clients 16]
       [--handle-time 0.05] [--agents 10] [--capacity 30] [--instances 1,2,3]
       [--no-sqlite] [--saturate] [--py-spy SECONDS] [--json]

For each configuration (SQLite with one daemon, then PostgreSQL with 1, 2, 3 daemons on
a fresh database each) it starts real `omnirouter run` processes through the cluster
harness (tests/cluster.py), whose webhook agent tool points at `AgentDesk`: the agents
resolve each ticket `--handle-time` seconds after its delivery, through a live
instance's ops API, which frees the slot. `--clients` threads post `--messages`
messages (each from a new contact, so each opens a conversation and takes a slot)
round-robin over the instances' web intake, as a load balancer would: open loop at
`--rate` msg/s (each POST starts on schedule however late the earlier ones are, as long
as a client is free), or with `--saturate` as fast as the clients can. The roster
(`--agents` x `--capacity` slots) is sized so that the agents are not the bottleneck.

Afterwards it reads the store (PostgreSQL with psycopg; SQLite with sqlite3 on the
state dir's omnirouter.db once the daemon has stopped) and prints per configuration:
intake msg/s (201s the clients got per second: the message is committed), assigned
msg/s (store: assignments over first ingest to last assignment), POST latency p50/p99,
ingest->assigned p50/p99 (messages.ingested_at to assignments.assigned_at), CPU ms per
message of the daemons, of the database's PostgreSQL backends and of this process (the
load generator and the agents), and how busy the whole machine was. A warm-up of
`--warmup` messages (not counted) runs first on each configuration.

`--py-spy SECONDS` samples the first daemon of the largest PostgreSQL group with
`py-spy record` for that long in the middle of the load and prints the functions that
took most samples (own time, and including callees). It slows that daemon down: use
it on a separate run, not for the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg

from tests.cluster import AgentDesk, Cluster
from tests.peers_pg import fresh_database, pg_server

CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- CPU accounting ----------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """Seconds of user + system CPU the process has used (0 once it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name (field 2) may hold spaces: count fields after its closing paren.
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies over all cores since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return float(total - idle), float(total)


def pg_backends(conn: psycopg.Connection) -> list[int]:
    """Pids of the server processes serving this database (our own connection aside)."""
    rows = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid()"
    ).fetchall()
    return [int(r[0]) for r in rows]


# -- the customers -------------------------------------------------------------------------


@dataclass
class PostStats:
    """What the clients saw."""

    latencies: list[float] = field(default_factory=list)
    states: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    failed: int = 0
    first_start: float = 0.0
    last_answer: float = 0.0


def post_load(
    ports: list[int], count: int, *, clients: int, rate: float | None, prefix: str
) -> PostStats:
    """Post `count` messages round-robin over `ports`, open loop at `rate` (None: flat out).

    Each client thread keeps one keep-alive connection per instance, so the figures are
    not a measure of TCP handshakes; a failed post goes to the next instance with the
    same Idempotency-Key.
    """
    stats = PostStats()
    lock = threading.Lock()
    next_n = iter(range(count))
    started = time.monotonic() + 0.05
    stats.first_start = started

    def client() -> None:
        conns: dict[int, http.client.HTTPConnection] = {}
        while True:
            with lock:
                n = next(next_n, None)
            if n is None:
                break
            if rate is not None:
                delay = started + n / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            body = json.dumps(
                {"text": f"Parcel {n} never arrived", "contact": {"handle": f"{prefix}{n}@e.com"}}
            )
            headers = {"Content-Type": "application/json", "Idempotency-Key": f"{prefix}{n}"}
            for attempt in range(20):
                port = ports[(n + attempt) % len(ports)]
                conn = conns.get(port) or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                t0 = time.perf_counter()
                try:
                    conn.request("POST", "/v1/messages", body, headers)
                    resp = conn.getresponse()
                    answer = resp.read()
                    if resp.status not in (200, 201):
                        raise http.client.HTTPException(f"{resp.status}: {answer[:200]!r}")
                    state = str(json.loads(answer).get("state", "?"))
                except (OSError, ValueError, http.client.HTTPException):
                    conn.close()
                    conns.pop(port, None)
                    with lock:
                        stats.errors += 1
                    time.sleep(0.02)
                    continue
                conns[port] = conn
                took = time.perf_counter() - t0
                with lock:
                    stats.latencies.append(took)
                    stats.states[state] += 1
                    stats.last_answer = max(stats.last_answer, time.monotonic())
                break
            else:
                with lock:
                    stats.failed += 1
        for conn in conns.values():
            conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return stats


# -- the store -----------------------------------------------------------------------------


class StoreReader:
    """Reads messages and assignments from PostgreSQL or from a daemon's SQLite file."""

    def __init__(self, dsn: str, sqlite_path: Path | None) -> None:
        self.dsn = dsn
        self.sqlite_path = sqlite_path

    @contextlib.contextmanager
    def _cursor(self) -> Iterator[psycopg.Connection | sqlite3.Connection]:
        if self.dsn:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                yield conn
        else:
            assert self.sqlite_path is not None
            # Read-only, and WAL readers never block the daemon's writer.
            conn = sqlite3.connect(f"file:{self.sqlite_path}?mode=ro", uri=True, timeout=5)
            try:
                yield conn
            finally:
                conn.close()

    def _mark(self) -> str:
        return "%s" if self.dsn else "?"

    def progress(self, since: float) -> tuple[int, int, int]:
        """(stored, assigned, resolved) among the messages ingested since `since`."""
        m = self._mark()
        with self._cursor() as conn:
            row = conn.execute(
                "SELECT count(*), count(a.message_id), "
                "coalesce(sum(CASE WHEN m.state = 'resolved' THEN 1 ELSE 0 END), 0) "
                f"FROM messages m LEFT JOIN assignments a ON a.message_id = m.id "
                f"WHERE m.ingested_at >= {m}",
                (since,),
            ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2])

    def timings(self, since: float) -> list[tuple[str, float, float | None, float | None]]:
        """(id, ingested_at, assigned_at, resolved_at) of the messages since `since`."""
        m = self._mark()
        with self._cursor() as conn:
            rows = conn.execute(
                "SELECT m.id, m.ingested_at, a.assigned_at, a.resolved_at FROM messages m "
                f"LEFT JOIN assignments a ON a.message_id = m.id WHERE m.ingested_at >= {m}",
                (since,),
            ).fetchall()
        return [
            (str(mid), float(i), None if a is None else float(a), None if r is None else float(r))
            for mid, i, a, r in rows
        ]


def wait_done(reader: StoreReader, since: float, expected: int, within: float) -> bool:
    """Wait until `expected` messages are stored, assigned and resolved."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        stored, assigned, resolved = reader.progress(since)
        if stored >= expected and assigned >= expected and resolved >= expected:
            return True
        time.sleep(0.2)
    return False


# -- one configuration ---------------------------------------------------------------------


@dataclass
class Result:
    backend: str
    instances: int
    mode: str
    messages: int
    intake_per_s: float = 0.0
    assigned_per_s: float = 0.0
    post_p50_ms: float = 0.0
    post_p99_ms: float = 0.0
    assign_p50_ms: float = 0.0
    assign_p99_ms: float = 0.0
    assign_max_ms: float = 0.0
    daemon_cpu_ms: float = 0.0  # per message, all daemons together
    pg_cpu_ms: float | None = None  # per message, this database's backends
    bench_cpu_ms: float = 0.0  # per message, this process (clients, desk, poller)
    machine_busy: float = 0.0  # share of all cores busy during the measured phase
    others_busy: float = 0.0  # share of all cores other processes (not ours) used
    queued_at_post: int = 0
    unassigned: int = 0
    post_errors: int = 0
    resolve_retries: int = 0
    # A slot's round trip, p50 ms: assigned -> delivery at the desk -> resolved in store.
    deliver_p50_ms: float = 0.0
    held_p50_ms: float = 0.0
    drained: bool = True
    profile: list[str] = field(default_factory=list)
    refusals: dict[str, int] = field(default_factory=dict)  # why resolves were refused


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def run_one(
    args: argparse.Namespace, backend: str, size: int, dsn: str, profile_seconds: float
) -> Result:
    mode = "saturate" if args.saturate else f"{args.rate:g}/s"
    result = Result(backend, size, mode, args.messages)
    agents = [(f"agent{i}", args.capacity) for i in range(args.agents)]
    with tempfile.TemporaryDirectory(prefix="omnirouter-multibench-") as tmp:
        desk = AgentDesk(handle_time=args.handle_time, resolvers=args.resolvers).start()
        cluster = Cluster(Path(tmp), dsn, desk.url, agents, size=size)
        desk.cluster = cluster
        sqlite_path = None if dsn else cluster.instances[0].dir / "state" / "omnirouter.db"
        reader = StoreReader(dsn, sqlite_path)
        ports = [i.web_port for i in cluster.instances]
        rate = None if args.saturate else args.rate
        try:
            cluster.start()
            pids = [i.daemon.pid for i in cluster.instances]
            if args.warmup:
                warm_since = time.time() - 1
                post_load(ports, args.warmup, clients=args.clients, rate=None, prefix="warm")
                wait_done(reader, warm_since, args.warmup, within=60)
            time.sleep(0.5)  # let the warm-up's resolves and notices settle
            desk_retries = desk.resolve_failures
            pg_conn = psycopg.connect(dsn, autocommit=True) if dsn else None
            pg_before = {p: proc_cpu(p) for p in pg_backends(pg_conn)} if pg_conn else {}
            daemon_before = sum(proc_cpu(p) for p in pids)
            bench_before = sum(os.times()[:2])
            busy0, total0 = machine_cpu()
            since = time.time()
            spy = None
            if profile_seconds:
                spy = threading.Thread(
                    target=lambda: result.profile.extend(
                        py_spy(pids[0], profile_seconds, delay=args.messages / args.rate / 3)
                    ),
                    daemon=True,
                )
                spy.start()
            stats = post_load(ports, args.messages, clients=args.clients, rate=rate, prefix="m")
            result.drained = wait_done(reader, since, args.messages, within=180)
            busy1, total1 = machine_cpu()
            n = args.messages
            result.daemon_cpu_ms = (sum(proc_cpu(p) for p in pids) - daemon_before) / n * 1e3
            result.bench_cpu_ms = (sum(os.times()[:2]) - bench_before) / n * 1e3
            result.machine_busy = (busy1 - busy0) / max(1.0, total1 - total0)
            ours = (result.daemon_cpu_ms + result.bench_cpu_ms) * n / 1e3 * CLK_TCK
            if pg_conn is not None:
                # A backend that appeared during the run used all its CPU within it; one
                # that went away is lost (the pools keep theirs, so that is rare).
                pg_after = {p: proc_cpu(p) for p in pg_backends(pg_conn)}
                spent = sum(cpu - pg_before.get(p, 0.0) for p, cpu in pg_after.items())
                result.pg_cpu_ms = spent / n * 1e3
                ours += spent * CLK_TCK
                pg_conn.close()
            result.others_busy = max(0.0, busy1 - busy0 - ours) / max(1.0, total1 - total0)
            result.resolve_retries = desk.resolve_failures - desk_retries
            result.refusals = dict(desk.refusals)
            if spy is not None:
                spy.join(profile_seconds + 30)
            for instance in cluster.instances:
                instance.daemon.stop()
            timings = reader.timings(since)
            measured = {mid for mid, _, a, _ in timings if a is not None}
            deliveries_seen = [d for d in desk.deliveries if d.message_id in measured]
        finally:
            cluster.close()
            desk.stop()
    span = max(1e-9, stats.last_answer - stats.first_start)
    result.intake_per_s = len(stats.latencies) / span
    result.post_p50_ms = percentile(stats.latencies, 50) * 1e3
    result.post_p99_ms = percentile(stats.latencies, 99) * 1e3
    result.queued_at_post = stats.states.get("queued", 0)
    result.post_errors = stats.errors + stats.failed
    waits = [a - i for _, i, a, _ in timings if a is not None]
    result.unassigned = len(timings) - len(waits)
    assigned_at = {mid: a for mid, _, a, _ in timings if a is not None}
    delivered = [d.received_at - assigned_at[d.message_id] for d in deliveries_seen]
    held = [r - a for _, _, a, r in timings if a is not None and r is not None]
    result.deliver_p50_ms = percentile(delivered, 50) * 1e3
    result.held_p50_ms = percentile(held, 50) * 1e3
    if waits:
        first_in = min(i for _, i, _, _ in timings)
        last_assigned = max(a for _, _, a, _ in timings if a is not None)
        result.assigned_per_s = len(waits) / max(1e-9, last_assigned - first_in)
        result.assign_p50_ms = percentile(waits, 50) * 1e3
        result.assign_p99_ms = percentile(waits, 99) * 1e3
        result.assign_max_ms = max(waits) * 1e3
    return result


# -- py-spy --------------------------------------------------------------------------------


def py_spy(pid: int, seconds: float, *, delay: float) -> list[str]:
    """Sample `pid` with py-spy; return lines naming the functions seen most."""
    time.sleep(delay)
    with tempfile.NamedTemporaryFile(suffix=".txt", delete=False) as out:
        path = Path(out.name)
    try:
        done = subprocess.run(
            [
                *("py-spy", "record", "--pid", str(pid), "--duration", str(int(seconds))),
                # --gil: only the thread holding the GIL, i.e. where the CPU goes, not
                # threads waiting on PostgreSQL's socket.
                *("--rate", "200", "--gil", "--format", "raw", "--nonblocking"),
                *("--output", str(path)),
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 30,
        )
        if done.returncode != 0:
            return [f"py-spy failed: {done.stderr.strip()[-300:]}"]
        return summarise_stacks(path.read_text())
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [f"py-spy failed: {exc}"]
    finally:
        path.unlink(missing_ok=True)


def summarise_stacks(raw: str, top: int = 20) -> list[str]:
    """Top functions of py-spy's collapsed stacks: by own samples, then including callees."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f.rsplit(":", 1)[0] for f in stack.split(";")]  # drop line numbers
        own[frames[-1]] += n
        # Including callees: the router's own frames (the loop and thread machinery
        # around them include everything and say nothing).
        for frame in set(frames):
            if "(router/" in frame or "(channels/" in frame or "(adapters/" in frame:
                if "router/cli.py" not in frame:
                    inclusive[frame] += n
    lines = [f"{total} samples; own time:"]
    lines += [f"  {n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    lines.append("including callees (router frames):")
    lines += [f"  {n / total:6.1%}  {f}" for f, n in inclusive.most_common(top)]
    return lines


# -- main ------------------------------------------------------------------------------------


def table(results: list[Result], cores: int) -> str:
    head = (
        f"{'backend':<10} {'inst':>4} {'mode':>9} {'msgs':>5} {'intake/s':>8} {'assign/s':>8} "
        f"{'POST p50/p99 ms':>16} {'in->asg p50/p99 ms':>19} {'daemon ms':>9} {'pg ms':>6} "
        f"{'bench ms':>8} {'busy':>5} {'others':>6} {'queued':>6} {'retry':>5} "
        f"{'deliver':>7} {'held':>7}"
    )
    lines = [
        f"machine: {cores} cores; CPU figures are ms per message; deliver and held: p50 ms "
        "from assignment to the desk's receipt, and to the resolve (a slot's round trip)",
        head,
        "-" * len(head),
    ]
    for r in results:
        pg = "-" if r.pg_cpu_ms is None else f"{r.pg_cpu_ms:.2f}"
        lines.append(
            f"{r.backend:<10} {r.instances:>4} {r.mode:>9} {r.messages:>5} "
            f"{r.intake_per_s:>8.0f} {r.assigned_per_s:>8.0f} "
            f"{r.post_p50_ms:>7.1f} /{r.post_p99_ms:>7.1f} "
            f"{r.assign_p50_ms:>8.1f} /{r.assign_p99_ms:>8.1f} "
            f"{r.daemon_cpu_ms:>9.2f} {pg:>6} {r.bench_cpu_ms:>8.2f} "
            f"{r.machine_busy:>5.0%} {r.others_busy:>6.0%} "
            f"{r.queued_at_post:>6} {r.resolve_retries:>5} "
            f"{r.deliver_p50_ms:>7.0f} {r.held_p50_ms:>7.0f}"
        )
        if r.unassigned or r.post_errors or not r.drained:
            lines.append(
                f"  !! unassigned {r.unassigned}, post errors {r.post_errors}, drained {r.drained}"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=150.0, help="open-loop msg/s")
    parser.add_argument("--saturate", action="store_true", help="post as fast as possible")
    parser.add_argument("--clients", type=int, default=16, help="concurrent posters")
    parser.add_argument("--handle-time", type=float, default=0.05, help="s before a resolve")
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--resolvers", type=int, default=32, help="resolves in flight")
    parser.add_argument("--capacity", type=int, default=30)
    parser.add_argument("--instances", default="1,2,3", help="PostgreSQL group sizes")
    parser.add_argument("--no-sqlite", action="store_true", help="skip the SQLite baseline")
    parser.add_argument("--warmup", type=int, default=100, help="uncounted messages first")
    parser.add_argument("--py-spy", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--json", action="store_true", help="also print one JSON line")
    args = parser.parse_args()
    # A SIGTERM (a timeout) unwinds like ^C, so the daemons are killed, not orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sizes = [int(s) for s in args.instances.split(",") if s.strip()]
    cores = os.cpu_count() or 1
    results: list[Result] = []
    if not args.no_sqlite:
        results.append(run_one(args, "sqlite", 1, "", 0.0))
        print(table(results, cores).splitlines()[-1], flush=True)
    with pg_server() as server:
        for size in sizes:
            spy = args.py_spy if size == max(sizes) else 0.0
            with fresh_database(server) as dsn:
                results.append(run_one(args, "postgresql", size, dsn, spy))
            print(table(results, cores).splitlines()[-1], flush=True)
    print()
    print(table(results, cores))
    for r in results:
        if r.refusals:
            print(f"\nresolves refused, {r.backend} x{r.instances} (warm-up included):")
            for reason, count in sorted(r.refusals.items(), key=lambda kv: -kv[1])[:5]:
                print(f"  {count:6d}  {reason}")
    for r in results:
        if r.profile:
            print(f"\npy-spy, first daemon of {r.backend} x{r.instances}:")
            print("\n".join(r.profile))
    if args.json:
        print(
            json.dumps(
                {
                    "bench": "multi_instance",
                    "cores": cores,
                    "results": [
                        {k: v for k, v in asdict(r).items() if k not in ("profile", "refusals")}
                        for r in results
                    ],
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
