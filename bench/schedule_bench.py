"""Scheduling decisions per second and memory of `router.schedule.Scheduler`, on one core.

Usage: python bench/schedule_bench.py [--agents 1000] [--waiting 100000] [--steps 20000]
       [--seed 1] [--max-seconds 20] [--json]

The issue's target: 20,000 decisions/s on one core with 1,000 agents and 100,000
waiting messages. Every loop runs twice in this process, once on our scheduler and
once on the `least_loaded` baseline (router.sim.baselines.LeastLoaded: the same
engine with a FIFO queue and fewest-open-conversations choice), each from a freshly
built state, and the figures are printed side by side with the ratio ours / baseline.

The state: `--agents` agents (chat 3 + email 5 slots each; skills: a third take
complaints (generalists, inquiry + complaint, complaint only), the rest inquiry +
suggestion or inquiry only; languages zh, en or both; queue "default"), every slot
held (`Scheduler.hold`, as the daemon does at startup with open conversations), then
`--waiting` messages submitted: Poisson arrivals over the hour or so before `now`,
60 % inquiry / 30 % complaint / 10 % suggestion, a quarter of complaints P1 (7.5 % of
all), zh/en half and half, chat 45 % / email 55 %, deadline = arrival + the class's
SLA (most are overdue: a backlog).

Loops (all timed with perf_counter_ns around the scheduler calls only):

* **steady**, accept timeout off: release one random held slot, `dispatch(now)`,
  advance `now` by 50 ms; `--steps` times or `--max-seconds`, whichever comes first.
* **steady + accept timeout** (120 s): the same, plus `tick(now)` every step and
  `accept()` of each decision, except 2 % of offers that the agent ignores: they time
  out, go back to the queue (never to the same agent, for ours) and are re-offered.
* **arrival**: agents start empty, nothing waits; each step `submit`s one message and
  `dispatch`es it; a random held slot is released (untimed) whenever half the slots
  are taken, so agents always have room. Target: 10,000 messages/s with 1,000 idle
  agents (a placement looks at the heads of a few groups of like-skilled agents, not
  at the roster). Run once more for ours with an explain record per decision, as the
  daemon runs it, with the record's mean size.

Memory: tracemalloc current and peak of building the waiting state (the Work objects
and the scheduler's indexes), per waiting message; and the growth of the process's
peak RSS (`resource.getrusage`) over the first build, which runs before anything else.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import resource
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from router.codec import dumps
from router.explain import stored_form
from router.model import Agent
from router.schedule import Policy, Scheduler, Work
from router.sim.baselines import LeastLoaded
from router.sim.run import DEFAULT_SLA

TARGET = 20_000  # decisions per second, from the issue
CAPACITIES = {"chat": 3, "email": 5}
CLASS_MIX = (("inquiry", 0.60), ("complaint", 0.30), ("suggestion", 0.10))
URGENT_SHARE = 0.25  # of complaints: 7.5 % of all messages are P1
CHANNEL_MIX = (("chat", 0.45), ("email", 0.55))
# (skills, share of agents): a third of the agents take complaints (30 % of the work),
# so the complaint-skilled are the scarce pool the scheduler keeps them for.
SKILL_MIX = (
    (frozenset({"inquiry", "complaint", "suggestion"}), 0.15),
    (frozenset({"inquiry", "complaint"}), 0.15),
    (frozenset({"complaint"}), 0.05),
    (frozenset({"inquiry", "suggestion"}), 0.55),
    (frozenset({"inquiry"}), 0.10),
)
LANG_MIX = ((frozenset({"zh"}), 0.35), (frozenset({"en"}), 0.35), (frozenset({"zh", "en"}), 0.30))
ARRIVAL_TARGET = 10_000  # messages/s placed as they arrive, 1,000 idle agents
ARRIVAL_RATE = 30.0  # messages/s: how fast the backlog built up
STEP = 0.05  # virtual seconds between steps
IGNORE_SHARE = 0.02  # offers the agent never accepts, in the accept-timeout loop
ACCEPT_TIMEOUT = 120.0

POLICIES: dict[str, Callable[[list[Agent], Policy], Scheduler]] = {
    "omnirouter": lambda agents, policy: Scheduler(agents, policy),
    "least_loaded": lambda agents, policy: LeastLoaded(agents, policy),
}


def _pick(rng: random.Random, mix: tuple[tuple[Any, float], ...]) -> Any:
    point = rng.random()
    for value, share in mix:
        point -= share
        if point < 0:
            return value
    return mix[-1][0]


def make_agents(count: int, seed: int) -> list[Agent]:
    """Return the mixed roster: skills and languages drawn per agent, seeded."""
    rng = random.Random(seed)
    return [
        Agent(
            id=f"a{i:05d}",
            name=f"a{i:05d}",
            capacity=0,
            tool="bench",
            capacities=dict(CAPACITIES),
            classes=_pick(rng, SKILL_MIX),
            languages=_pick(rng, LANG_MIX),
            queues=frozenset({"default"}),
        )
        for i in range(count)
    ]


class Messages:
    """A seeded stream of waiting messages with the issue's realistic mix."""

    def __init__(self, seed: int, start: float) -> None:
        self.rng = random.Random(seed)
        self.t = start
        self.n = 0

    def next(self, at: float | None = None) -> Work:
        """Return the next message, arriving at `at` or after a Poisson gap."""
        rng = self.rng
        self.t = at if at is not None else self.t + rng.expovariate(ARRIVAL_RATE)
        self.n += 1
        label = _pick(rng, CLASS_MIX)
        urgent = label == "complaint" and rng.random() < URGENT_SHARE
        sla = DEFAULT_SLA["complaint_urgent"] if urgent else DEFAULT_SLA[label]
        mid = f"m{self.n:07d}"
        return Work(
            id=mid,
            slot=mid,
            conversation=f"c{self.n:07d}",
            label=label,
            severity="P1" if urgent else "P3",
            channel_type=_pick(rng, CHANNEL_MIX),
            language="zh" if rng.random() < 0.5 else "en",
            department="default",
            arrival=self.t,
            deadline=self.t + sla,
        )


@dataclass
class State:
    """A built scheduler with every slot held and the backlog waiting."""

    sched: Scheduler
    held: list[str]
    now: float
    messages: Messages


def fill(sched: Scheduler, agents: list[Agent]) -> list[str]:
    """Hold every slot of every agent; return the slot names."""
    held = []
    for agent in agents:
        for ct, cap in CAPACITIES.items():
            for i in range(cap):
                slot = f"h-{agent.id}-{ct}-{i}"
                sched.hold(slot, slot, agent.id, ct)
                held.append(slot)
    return held


def build(policy_name: str, agents: list[Agent], waiting: int, seed: int, policy: Policy) -> State:
    """Build the full state: roster, every slot held, `waiting` messages submitted."""
    sched = POLICIES[policy_name](agents, policy)
    held = fill(sched, agents)
    messages = Messages(seed, 0.0)
    for _ in range(waiting):
        sched.submit(messages.next())
    now = messages.t
    sched.tick(now)  # the backlog's deadlines that passed already: breach events
    return State(sched, held, now, messages)


def percentile(sorted_values: list[int], q: float) -> float:
    """Return the nearest-rank percentile of sorted values."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))
    return float(sorted_values[index])


def _summary(
    name: str, calls: list[int], decisions: int, steps: int, hist: dict[str, int]
) -> dict[str, Any]:
    total_ns = sum(calls)
    calls.sort()
    return {
        "loop": name,
        "steps": steps,
        "decisions": decisions,
        "seconds": total_ns / 1e9,
        "decisions_per_s": decisions / (total_ns / 1e9) if total_ns else 0.0,
        "us_per_decision": total_ns / 1e3 / decisions if decisions else float("nan"),
        "step_p50_us": percentile(calls, 50) / 1e3,
        "step_p99_us": percentile(calls, 99) / 1e3,
        "step_max_us": calls[-1] / 1e3 if calls else float("nan"),
        "decisions_per_step": hist,
    }


def _hist_add(hist: dict[str, int], n: int) -> None:
    key = str(n) if n < 2 else "2+"
    hist[key] = hist.get(key, 0) + 1


def steady(state: State, steps: int, max_seconds: float, seed: int) -> dict[str, Any]:
    """Release a random held slot, dispatch; accept timeout off."""
    sched, held = state.sched, state.held
    rng = random.Random(seed + 1)
    perf = time.perf_counter_ns
    calls: list[int] = []
    hist: dict[str, int] = {}
    decisions = 0
    now = state.now
    budget = time.perf_counter() + max_seconds
    step = 0
    gc.collect()
    for step in range(1, steps + 1):
        if not held:  # the backlog ran out (fewer --waiting than --steps need): stop here
            step -= 1
            break
        i = rng.randrange(len(held))
        slot = held[i]
        held[i] = held[-1]
        held.pop()
        now += STEP
        t0 = perf()
        sched.release(slot)
        out = sched.dispatch(now)
        calls.append(perf() - t0)
        decisions += len(out)
        _hist_add(hist, len(out))
        held.extend(d.work.slot for d in out if d.new_slot)
        if step % 256 == 0 and time.perf_counter() > budget:
            break
    state.now = now
    return _summary("steady", calls, decisions, step, hist)


def steady_timeout(state: State, steps: int, max_seconds: float, seed: int) -> dict[str, Any]:
    """The steady loop with accept tracking: tick() each step, 2 % of offers ignored."""
    sched, held = state.sched, state.held
    rng = random.Random(seed + 2)
    perf = time.perf_counter_ns
    calls: list[int] = []
    hist: dict[str, int] = {}
    decisions = timeouts = 0
    now = state.now
    budget = time.perf_counter() + max_seconds
    step = 0
    gc.collect()
    for step in range(1, steps + 1):
        if not held:  # the backlog ran out (fewer --waiting than --steps need): stop here
            step -= 1
            break
        i = rng.randrange(len(held))
        slot = held[i]
        held[i] = held[-1]
        held.pop()
        now += STEP
        # Drawn before the clock starts: whether the agent ignores each of this step's
        # first few offers (a step rarely makes more than two).
        ignore = [rng.random() < IGNORE_SHARE for _ in range(4)]
        t0 = perf()
        sched.release(slot)
        returned, _breached = sched.tick(now)
        out = sched.dispatch(now)
        accepted = []
        for k, d in enumerate(out):
            ignored = k < len(ignore) and ignore[k]
            if not ignored and sched.accept(d.work.id, d.agent_id):
                accepted.append(d.work.slot)
        calls.append(perf() - t0)
        timeouts += len(returned)
        decisions += len(out)
        _hist_add(hist, len(out))
        held.extend(accepted)
        if step % 256 == 0 and time.perf_counter() > budget:
            break
    state.now = now
    result = _summary("steady+timeout", calls, decisions, step, hist)
    result["timeouts"] = timeouts
    result["offers_outstanding"] = len(sched.offers())
    return result


def arrival(
    policy_name: str,
    agents: list[Agent],
    steps: int,
    max_seconds: float,
    seed: int,
    *,
    explain: bool = False,
) -> dict[str, Any]:
    """Submit + dispatch one message at a time while agents have room."""
    sched = POLICIES[policy_name](agents, Policy(accept_timeout=0))
    sched.explain = explain
    explain_bytes = explain_records = 0
    total = len(agents) * sum(CAPACITIES.values())
    held: list[str] = []
    rng = random.Random(seed + 3)
    messages = Messages(seed + 4, 0.0)
    perf = time.perf_counter_ns
    calls: list[int] = []
    hist: dict[str, int] = {}
    decisions = 0
    budget = time.perf_counter() + max_seconds
    step = 0
    gc.collect()
    for step in range(1, steps + 1):
        work = messages.next()
        now = messages.t
        t0 = perf()
        sched.submit(work)
        out = sched.dispatch(now)
        calls.append(perf() - t0)
        decisions += len(out)
        _hist_add(hist, len(out))
        if explain:
            for d in out:
                if d.explain is not None:
                    explain_records += 1
                    # What the store keeps of it (compact; worded when read).
                    explain_bytes += len(dumps(stored_form(d.explain)).encode())
        held.extend(d.work.slot for d in out if d.new_slot)
        if len(held) >= total // 2:
            i = rng.randrange(len(held))
            slot = held[i]
            held[i] = held[-1]
            held.pop()
            sched.release(slot)
        if step % 256 == 0 and time.perf_counter() > budget:
            break
    result = _summary("arrival", calls, decisions, step, hist)
    result["left_waiting"] = sched.waiting_count()
    if explain:
        result["explain_mean_bytes"] = explain_bytes / max(1, explain_records)
    return result


def memory(policy_name: str, agents: list[Agent], waiting: int, seed: int) -> dict[str, Any]:
    """Return tracemalloc figures of building the waiting state (Work objects apart)."""
    gc.collect()
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    sched = POLICIES[policy_name](agents, Policy(accept_timeout=0))
    fill(sched, agents)
    roster, _ = tracemalloc.get_traced_memory()
    messages = Messages(seed, 0.0)
    works = [messages.next() for _ in range(waiting)]
    made, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    for work in works:
        sched.submit(work)
    sched.tick(messages.t)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del works, sched
    return {
        "roster_and_held_slots_bytes": roster - base,
        "work_objects_bytes": made - roster,
        "current_bytes": current - base,
        "peak_bytes": peak - base,
        "per_waiting_bytes": (current - roster) / waiting,
        "per_waiting_scheduler_bytes": (current - made) / waiting,
        "per_waiting_work_bytes": (made - roster) / waiting,
    }


def maxrss_bytes() -> int:
    """Return the process's peak RSS in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def pin() -> str:
    """Pin the process to one CPU if the platform allows it; say what happened."""
    try:
        cpus = os.sched_getaffinity(0)
        cpu = min(cpus)
        os.sched_setaffinity(0, {cpu})
    except (AttributeError, OSError) as exc:
        return f"not pinned ({exc.__class__.__name__})"
    return f"pinned to CPU {cpu} (of {len(cpus)} allowed)"


def _fmt_hist(hist: dict[str, int], steps: int) -> str:
    return " ".join(f"{k}:{100 * v / steps:.1f}%" for k, v in sorted(hist.items()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--waiting", type=int, default=100_000)
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=20.0, help="cap per loop")
    ap.add_argument("--json", action="store_true", help="print one JSON line at the end")
    args = ap.parse_args()
    started = time.perf_counter()
    pinned = pin()
    agents = make_agents(args.agents, args.seed)
    print(
        f"schedule_bench: {args.agents} agents x {CAPACITIES}, {args.waiting:,} waiting, "
        f"{args.steps:,} steps, seed {args.seed}; Python {platform.python_version()}; {pinned}"
    )

    results: dict[str, Any] = {"pinned": pinned, "args": vars(args), "policies": {}}
    rss_before = maxrss_bytes()
    for name in POLICIES:
        r: dict[str, Any] = {}
        t0 = time.perf_counter()
        state = build(name, agents, args.waiting, args.seed, Policy(accept_timeout=0))
        r["build_seconds"] = time.perf_counter() - t0
        if name == "omnirouter":
            # The first build of the process: the growth of peak RSS is its footprint.
            grown = maxrss_bytes() - rss_before
            r["rss_growth_bytes"] = grown
            r["rss_per_waiting_bytes"] = grown / args.waiting
        r["waiting_at_start"] = state.sched.waiting_count()
        r["steady"] = steady(state, args.steps, args.max_seconds, args.seed)
        r["waiting_at_end"] = state.sched.waiting_count()
        del state
        state = build(name, agents, args.waiting, args.seed, Policy(accept_timeout=ACCEPT_TIMEOUT))
        r["steady_timeout"] = steady_timeout(state, args.steps, args.max_seconds, args.seed)
        del state
        r["arrival"] = arrival(name, agents, args.steps, args.max_seconds, args.seed)
        if name == "omnirouter":
            r["arrival_explain"] = arrival(
                name, agents, args.steps, args.max_seconds, args.seed, explain=True
            )
        r["memory"] = memory(name, agents, args.waiting, args.seed)
        results["policies"][name] = r
        gc.collect()

    ours, base = results["policies"]["omnirouter"], results["policies"]["least_loaded"]
    print()
    print(f"{'loop':<16}{'figure':<22}{'omnirouter':>14}{'least_loaded':>14}{'ratio':>8}")
    ratios: dict[str, float] = {}
    for loop in ("steady", "steady_timeout", "arrival"):
        o, b = ours[loop], base[loop]
        for key, label, fmt in (
            ("decisions_per_s", "decisions/s", "{:,.0f}"),
            ("us_per_decision", "µs/decision", "{:.1f}"),
            ("step_p50_us", "step p50 µs", "{:.1f}"),
            ("step_p99_us", "step p99 µs", "{:.1f}"),
        ):
            ratio = o[key] / b[key] if b[key] else float("nan")
            if key == "decisions_per_s":
                ratios[loop] = ratio
            print(
                f"{o['loop'] if key == 'decisions_per_s' else '':<16}{label:<22}"
                f"{fmt.format(o[key]):>14}{fmt.format(b[key]):>14}{ratio:>8.2f}"
            )
        ours_hist = _fmt_hist(o["decisions_per_step"], o["steps"])
        base_hist = _fmt_hist(b["decisions_per_step"], b["steps"])
        print(f"{'':<16}{'decisions per step':<22}  ours {ours_hist} | base {base_hist}")
        extra = f"{o['steps']:,} / {b['steps']:,} steps"
        if loop == "steady_timeout":
            extra += f"; timeouts {o['timeouts']} / {b['timeouts']}"
        if loop == "arrival":
            extra += f"; left waiting {o['left_waiting']} / {b['left_waiting']}"
        print(f"{'':<16}{extra}")
    om, bm = ours["memory"], base["memory"]
    print()
    print(f"{'memory (tracemalloc)':<38}{'omnirouter':>14}{'least_loaded':>14}{'ratio':>8}")
    for key, label in (
        ("current_bytes", "state after build, MiB"),
        ("peak_bytes", "peak while building, MiB"),
        ("per_waiting_bytes", "per waiting message, B"),
        ("per_waiting_work_bytes", "  of which the Work object, B"),
        ("per_waiting_scheduler_bytes", "  of which scheduler indexes, B"),
    ):
        scale = 1 / 2**20 if key.endswith("_bytes") and not key.startswith("per") else 1.0
        ratio = om[key] / bm[key] if bm[key] else float("nan")
        print(f"{label:<38}{om[key] * scale:>14,.1f}{bm[key] * scale:>14,.1f}{ratio:>8.2f}")
    print(
        f"peak RSS growth over the first build (ours): {ours['rss_growth_bytes'] / 2**20:,.1f} MiB"
        f" = {ours['rss_per_waiting_bytes']:,.0f} B per waiting message"
    )
    steady_rate = ours["steady"]["decisions_per_s"]
    arrival_rate = ours["arrival"]["decisions_per_s"]
    explained = ours["arrival_explain"]
    print()
    print(
        f"arrival path with an explain record per decision (ours, as the daemon runs it): "
        f"{explained['decisions_per_s']:,.0f} decisions/s, step p99 "
        f"{explained['step_p99_us']:.1f} µs, record {explained['explain_mean_bytes']:,.0f} B "
        "of JSON on average"
    )
    print(
        f"target {TARGET:,} decisions/s (steady loop, ours): {steady_rate:,.0f} "
        f"({'met' if steady_rate >= TARGET else 'not met'}); ours / least_loaded "
        f"{ratios['steady']:.2f} steady, {ratios['steady_timeout']:.2f} with accept timeout, "
        f"{ratios['arrival']:.2f} arrival path"
    )
    print(
        f"target {ARRIVAL_TARGET:,} msg/s on the arrival path with {args.agents} idle agents: "
        f"{arrival_rate:,.0f} ({'met' if arrival_rate >= ARRIVAL_TARGET else 'not met'})"
    )
    print(f"total run time {time.perf_counter() - started:.0f} s")
    results["ratios"] = ratios
    results["target"] = TARGET
    if args.json:
        print(json.dumps({"bench": "schedule", **results}, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
