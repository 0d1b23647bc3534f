"""What the explain record costs per decision: taking it, storing it, reading it.

Usage: python bench/explain_record.py [--agents 10,50] [--decisions 3000] [--repeat 5]

For each roster size, a scheduler (every agent on line, capacity 1000, one queue) places
`--decisions` messages twice, with `[scheduling] explain` off and on, and the difference
is what taking the record adds to a placement. Then, on one record, what the store's
writer thread does with it at commit (ask whether there is one, take its stored form and
encode it) and what `omnirouter explain` does when it reads one back (word the
verdicts). Best of `--repeat` runs, in microseconds; one core, no I/O.

Run it from the tree to measure (it imports `router` from there, whatever is installed).
"""

from __future__ import annotations

import argparse
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from router.codec import dumps  # noqa: E402
from router.explain import Explanation, render, stored_form  # noqa: E402
from router.model import Agent  # noqa: E402
from router.schedule import Policy, Scheduler, Work  # noqa: E402


def roster(n: int) -> list[Agent]:
    """Return n interchangeable agents with room for the whole run."""
    return [
        Agent(
            id=f"agent-{i:03d}",
            name=f"agent-{i:03d}",
            capacity=1000,
            tool="bench",
            queues=frozenset({"default"}),
        )
        for i in range(n)
    ]


def new_work(i: int, now: float) -> Work:
    """Return one inquiry arriving now (its own conversation)."""
    return Work(
        id=f"m{i}",
        slot=f"c{i}",
        conversation=f"c{i}",
        label="inquiry",
        severity="P3",
        channel_type="chat",
        language="en",
        department="default",
        arrival=now,
        deadline=now + 300.0,
    )


def place_us(agents: int, decisions: int, repeat: int, *, explain: bool) -> float:
    """Return the best mean microseconds of one placement over `repeat` fresh runs."""
    best = float("inf")
    for _ in range(repeat):
        scheduler = Scheduler(roster(agents), Policy(), explain=explain)
        started = time.perf_counter()
        for i in range(decisions):
            scheduler.place(new_work(i, float(i)), float(i))
        best = min(best, (time.perf_counter() - started) / decisions * 1e6)
    return best


def per_call_us(fn: Callable[[], object], repeat: int, number: int = 2000) -> float:
    """Return the best mean microseconds of one call of fn."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", default="10,50", help="roster sizes, comma-separated")
    ap.add_argument("--decisions", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    sizes = [int(n) for n in args.agents.split(",")]
    print(f"explain record costs, best of {args.repeat}, us (router from {REPO})")
    print(
        f"{'agents':>6} {'place off':>10} {'place on':>9} {'record':>7} "
        f"{'has one':>8} {'store':>7} {'read':>7} {'stored B':>9}"
    )
    for n in sizes:
        off = place_us(n, args.decisions, args.repeat, explain=False)
        on = place_us(n, args.decisions, args.repeat, explain=True)
        decision = Scheduler(roster(n), Policy(), explain=True).place(new_work(0, 0.0), 0.0)
        assert decision is not None and isinstance(decision.explain, Explanation)
        compact = decision.explain.compact
        stored = dumps(stored_form(Explanation(compact)))
        # What the writer does: is there a record (a fresh one each time, as per commit)?
        has_one = per_call_us(lambda r=compact: bool(Explanation(r)), args.repeat)
        store = per_call_us(lambda r=compact: dumps(stored_form(Explanation(r))), args.repeat)
        read = per_call_us(lambda r=compact: render(r), args.repeat)
        print(
            f"{n:>6} {off:>10.1f} {on:>9.1f} {on - off:>7.1f} "
            f"{has_one:>8.2f} {store:>7.1f} {read:>7.1f} {len(stored):>9,}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
