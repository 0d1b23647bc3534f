"""The roster: agents and scheduling knobs from the config, and the ops views of them."""

from __future__ import annotations

from typing import Any

from router.config import Config
from router.drivers import tool_sends_actions
from router.model import LABELS, Agent, ticket_number
from router.schedule import OverflowStep, Policy, Scheduler, Work


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
        reserve_risk=sc.reserve_risk,
        urgent_reserve=sc.urgent_reserve,
        rate_window=sc.rate_window,
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
                "held_back": _held_back(scheduler, waiting),
            }
        )
    return out


# At most this many held-back messages are listed per queue.
_HELD_LIMIT = 20


def _held_back(scheduler: Scheduler, waiting: list[Work]) -> list[dict[str, Any]]:
    """Return the waiting messages kept from an agent with room, and the reason each."""
    out = []
    for work in waiting:
        why = scheduler.why_waiting(work.id)
        if why is None:
            continue
        out.append(
            {
                "message_id": work.id,
                "rule": why["rule"],
                "for": why.get("for", ""),
                "reason": why["verdict"],
                "until": why.get("until"),
            }
        )
        if len(out) >= _HELD_LIMIT:
            break
    return out


_SEVERITY_RANK = {"P0": 0, "P1": 1, "P2": 2, "P3": 3}


def board_view(scheduler: Scheduler, now: float, *, waiting_limit: int = 8) -> dict[str, Any]:
    """Return the status page's picture of queues and agents (ops API `/v1/status`).

    Queues are cut by department, class and severity, each with its oldest wait and
    the SLA that wait runs against (so a page can say "12 min of 15"); agents carry
    their load per channel-type pool and whether a shift covers them now.
    """
    groups: dict[tuple[str, str, str], list[Work]] = {}
    waiting = scheduler.waiting()
    for w in waiting:
        groups.setdefault((w.department, w.label, w.severity), []).append(w)
    queues: list[dict[str, Any]] = []
    for (department, label, severity), items in groups.items():
        oldest = min(items, key=lambda w: w.arrival)
        queues.append(
            {
                "queue": department,
                "label": label,
                "severity": severity,
                "depth": len(items),
                "overdue": sum(1 for w in items if w.deadline < now),
                "oldest_wait_s": round(now - oldest.arrival, 3),
                "oldest_sla_s": round(oldest.deadline - oldest.arrival, 3),
                "next_due_s": round(min(w.deadline for w in items) - now, 3),
            }
        )
    queues.sort(key=lambda q: (_SEVERITY_RANK.get(q["severity"], 9), q["queue"], q["label"]))
    agents: list[dict[str, Any]] = []
    for state in scheduler.iter_states():
        a = state.agent
        pools = dict(a.capacities) if a.capacities else {"*": a.capacity}
        for pool in (*state.used, *state.external):
            pools.setdefault(pool, 0)
        agents.append(
            {
                "id": a.id,
                "name": a.name,
                "presence": "on" if state.online else "away" if state.away else "off",
                "on_shift": not a.shifts or any(sh.contains(now) for sh in a.shifts),
                "tool": a.tool,
                "open_conversations": state.load,
                "load": [
                    {
                        "channel_type": pool,
                        "used": state.used.get(pool, 0) + state.external.get(pool, 0),
                        "capacity": cap,
                    }
                    for pool, cap in sorted(pools.items())
                ],
                "queues": sorted(a.queues),
            }
        )
    agents.sort(key=lambda a: a["id"])
    oldest_first = sorted(waiting, key=lambda w: w.arrival)[:waiting_limit]
    return {
        "queues": queues,
        "waiting_total": len(waiting),
        "waiting": [
            {
                "message_id": w.id,
                "ticket": ticket_number(w.conversation),
                "queue": w.department,
                "label": w.label,
                "severity": w.severity,
                "channel_type": w.channel_type,
                "wait_s": round(now - w.arrival, 3),
                "due_s": round(w.deadline - now, 3),
            }
            for w in oldest_first
        ],
        "agents": agents,
    }
