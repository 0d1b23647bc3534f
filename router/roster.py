"""The roster: agents and scheduling knobs from the config, and the ops views of them."""

from __future__ import annotations

from typing import Any

from router.config import Config
from router.drivers import tool_sends_actions
from router.model import LABELS, Agent
from router.schedule import OverflowStep, Policy, Scheduler


def agents_from_config(config: Config) -> list[Agent]:
    """Return the roster as scheduler agents."""
    tool_types = {a.name: a.type for a in config.adapters}
    return [
        Agent(
            id=a.id,
            name=a.name or a.id,
            capacity=a.total_capacity,
            tool=a.tool,
            address=a.address,
            queues=frozenset(a.queues),
            present=a.present,
            capacities=dict(a.capacities),
            classes=frozenset(k for k in a.skills if k in LABELS),
            languages=frozenset(k for k in a.skills if k not in LABELS),
            supervisor=a.supervisor,
            shifts=tuple(sh.to_shift() for sh in a.shifts),
            # Only a tool that sends actions back lets its agents accept an offer; on the
            # others (a file inbox, an outgoing webhook) work is held at once.
            accepts=a.accepts
            if a.accepts is not None
            else a.tool in tool_types and tool_sends_actions(tool_types[a.tool]),
        )
        for a in config.agents
    ]


def policy_from_config(config: Config) -> Policy:
    """Return the scheduler's knobs from `[scheduling]`."""
    sc = config.scheduling
    return Policy(
        accept_timeout=sc.accept_timeout,
        complaint_streak_limit=sc.complaint_streak_limit,
        reserve_slack=sc.reserve_slack,
        urgent_reserve=sc.urgent_reserve,
        overflow=tuple(OverflowStep(o.after, o.widen) for o in sc.overflow),
    )


def agents_view(scheduler: Scheduler) -> list[dict[str, Any]]:
    """Return each agent with load and presence (ops API)."""
    return [
        {
            "id": a.id,
            "name": a.name,
            "present": a.present,
            "capacity": a.capacity,
            "open_conversations": scheduler.load.get(a.id, 0),
            "tool": a.tool,
            "classes": sorted(a.classes),
            "languages": sorted(a.languages),
            "capacities": dict(a.capacities),
            "shifts": len(a.shifts),
            "queues": sorted(a.queues),
        }
        for a in scheduler.agents.values()
    ]


def queues_view(scheduler: Scheduler, now: float) -> list[dict[str, Any]]:
    """Return each queue's waiting messages, oldest deadline first (ops API)."""
    out = []
    names = {q for a in scheduler.agents.values() for q in a.queues} | set(scheduler.queue_depths())
    for name in sorted(names):
        waiting = scheduler.waiting(name)
        out.append(
            {
                "queue": name,
                "depth": len(waiting),
                "oldest_wait_s": round(now - min((w.arrival for w in waiting), default=now), 3),
                "overdue": sum(1 for w in waiting if w.deadline < now),
                "agents": sorted(a.id for a in scheduler.agents.values() if name in a.queues),
            }
        )
    return out
