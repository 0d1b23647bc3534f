"""Drive a scheduler on a virtual clock from a trace (formats: the simulation contract).

The trace says what happens in the world; the scheduler decides who gets what; this
module plays the agents: they accept at once unless the trace says they ignore the
message, and finish `handle_time` seconds after accepting. The scheduler never sees
handle times. Time jumps from one event to the next (arrival, completion, presence
change, or a timer the scheduler asks for), so four simulated hours take a second.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field, replace
from typing import Any

from router.model import Agent
from router.schedule import OverflowStep, Policy, Scheduler, Work

POLICIES = ("omnirouter", "least_loaded", "round_robin", "random")
DEFAULT_SLA = {"complaint": 120.0, "complaint_urgent": 30.0, "inquiry": 300.0, "suggestion": 3600.0}


class TraceError(ValueError):
    """The trace breaks the format (names the line)."""


@dataclass
class SimResult:
    """What a run produced: the assignment events and the scheduler's own cost."""

    policy: str
    events: list[dict[str, Any]]
    decisions: int
    scheduler_seconds: float
    messages: int
    virtual_seconds: float
    summary: dict[str, Any] = field(default_factory=dict)


def make_scheduler(
    policy: str, policy_config: Policy, *, seed: int = 0, explain: bool = False
) -> Scheduler:
    """Return the scheduler of the named policy."""
    from router.sim.baselines import LeastLoaded, RandomPolicy, RoundRobin

    if policy == "omnirouter":
        return Scheduler((), policy_config, explain=explain)
    if policy == "least_loaded":
        return LeastLoaded((), policy_config)
    if policy == "round_robin":
        return RoundRobin((), policy_config)
    if policy == "random":
        return RandomPolicy((), policy_config, seed=seed)
    raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")


def policy_from_trace(config: dict[str, Any], overflow: tuple[OverflowStep, ...] = ()) -> Policy:
    """Return our scheduler's knobs from a trace's config line.

    An optional `reserve_risk` replays the trace with another reserve setting (the
    `[scheduling]` knob of the same name); without it, the daemon's default.
    """
    return Policy(
        accept_timeout=float(config.get("accept_timeout", 60.0)),
        complaint_streak_limit=int(config.get("complaint_streak_limit", 3)),
        reserve_risk=float(config.get("reserve_risk", Policy().reserve_risk)),
        overflow=overflow,
    )


def _agent(line: dict[str, Any]) -> Agent:
    caps = {str(k): int(v) for k, v in dict(line.get("capacity", {})).items()}
    return Agent(
        id=str(line["id"]),
        name=str(line["id"]),
        capacity=0,
        tool="sim",
        present=bool(line.get("online", True)),
        capacities=caps,
        classes=frozenset(line.get("skills", ())),
        languages=frozenset(line.get("languages", ())),
    )


# After the last arrival the run drains for at most this long: a message whose every
# eligible agent ignores it would otherwise cycle through timeouts for ever under a
# policy that forgets who let it time out. What is left then counts as never accepted.
DRAIN_LIMIT = 86400.0


def simulate(
    trace: list[dict[str, Any]], policy: str = "omnirouter", *, seed: int = 0
) -> SimResult:
    """Replay a trace against a policy; return the assignment events in time order."""
    if not trace or trace[0].get("type") != "config":
        raise TraceError("line 1: the first line must be the config line")
    config = trace[0]
    sla = dict(DEFAULT_SLA)
    sla.update({k: float(v) for k, v in dict(config.get("sla", {})).items()})
    sched = make_scheduler(policy, policy_from_trace(config), seed=seed)
    roster: dict[str, Agent] = {}
    messages: dict[str, dict[str, Any]] = {}
    events: list[dict[str, Any]] = []
    completions: list[tuple[float, int, str, str]] = []  # (t, seq, message id, agent id)
    seq = 0
    spent = 0.0
    i = 1
    now = 0.0
    last_t = max((float(line.get("t", 0.0)) for line in trace), default=0.0)
    while True:
        candidates = []
        if i < len(trace):
            candidates.append(float(trace[i].get("t", 0.0)))
        if completions:
            candidates.append(completions[0][0])
        wake = sched.next_wakeup()
        if wake is not None:
            candidates.append(wake)
        if not candidates:
            break
        now = max(now, min(candidates))
        if i >= len(trace) and now > last_t + DRAIN_LIMIT:
            break
        while completions and completions[0][0] <= now:
            t, _, message_id, agent_id = heapq.heappop(completions)
            events.append({"t": t, "event": "completed", "message": message_id, "agent": agent_id})
            sched.release(message_id)
        changed_roster = False
        while i < len(trace) and float(trace[i].get("t", 0.0)) <= now:
            line = trace[i]
            kind = line.get("type")
            if kind == "agent":
                roster[str(line["id"])] = _agent(line)
                changed_roster = True
            elif kind == "presence":
                if changed_roster:
                    sched.set_roster(roster.values())
                    changed_roster = False
                agent_id = str(line["agent"])
                if agent_id not in sched.states:
                    raise TraceError(f"line {i + 1}: presence of unknown agent {agent_id!r}")
                online = bool(line["online"])
                roster[agent_id] = replace(roster[agent_id], present=online)
                for back in sched.set_presence(agent_id, online, now):
                    events.append(_event(now, "returned", back.work.id, back.agent_id))
            elif kind == "message":
                mid = str(line["id"])
                if mid in messages:
                    raise TraceError(f"line {i + 1}: message id {mid!r} repeats")
                messages[mid] = line
                label = str(line["class"])
                urgent = bool(line.get("urgent", False)) and label == "complaint"
                target = sla["complaint_urgent"] if urgent else sla.get(label, sla["inquiry"])
                t = float(line["t"])
                sched.submit(
                    Work(
                        id=mid,
                        slot=mid,
                        conversation=str(line.get("conversation", mid)),
                        label=label,
                        severity="P1" if urgent else "P3",
                        channel_type=str(line.get("channel_type", "chat")),
                        language=str(line.get("lang", "")),
                        department="default",
                        arrival=t,
                        deadline=t + target,
                    )
                )
            elif kind not in ("end", "config"):
                raise TraceError(f"line {i + 1}: unknown line type {kind!r}")
            i += 1
        if changed_roster:
            sched.set_roster(roster.values())
        started = time.perf_counter()
        returned, _breached = sched.tick(now)
        decisions = sched.dispatch(now)
        spent += time.perf_counter() - started
        for back in returned:
            events.append(_event(now, back.why, back.work.id, back.agent_id))
        for d in decisions:
            mid = d.work.id
            events.append(_event(now, "assigned", mid, d.agent_id))
            line = messages[mid]
            if d.agent_id in line.get("ignored_by", ()):
                continue  # this agent never answers it: the accept timeout will tell
            sched.accept(mid, d.agent_id)
            events.append(_event(now, "accepted", mid, d.agent_id))
            done = now + float(line["handle_time"])
            seq += 1
            heapq.heappush(completions, (done, seq, mid, d.agent_id))
    return SimResult(
        policy=policy,
        events=events,
        decisions=sched.decisions,
        scheduler_seconds=spent,
        messages=len(messages),
        virtual_seconds=now,
    )


def _event(t: float, event: str, message_id: str, agent_id: str) -> dict[str, Any]:
    return {"t": t, "event": event, "message": message_id, "agent": agent_id}


def run_and_summarise(
    trace: list[dict[str, Any]], policy: str = "omnirouter", *, seed: int = 0
) -> SimResult:
    """Simulate and compute the summary from the events (as a reader of the files would)."""
    from router.sim.check import analyse

    result = simulate(trace, policy, seed=seed)
    summary = analyse(trace, result.events)
    summary["policy"] = policy
    summary["decisions"] = result.decisions
    summary["decisions_per_second"] = (
        round(result.decisions / result.scheduler_seconds) if result.scheduler_seconds else None
    )
    result.summary = summary
    return result
