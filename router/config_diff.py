"""What a reload would change: the plan the daemon follows on SIGHUP, and `config diff` shows.

A channel or adapter whose section changed in any way is restarted (stopped, then started
with the new section); one that appears is started, one that disappears is stopped.
Agents, routing, scheduling, classifier, SLA and lifecycle settings apply in place.
`daemon.state_dir`, `daemon.instance`, `daemon.lease_ttl`, `daemon.event_loop`, `store`,
`ops` and `outbox` are read once at start: a change there is reported and waits for a
restart of the daemon.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from router.config import Config

# Read once at start; a reload logs them and leaves them as they were.
RESTART_SECTIONS = (
    "daemon.state_dir",
    "daemon.instance",
    "daemon.lease_ttl",
    "daemon.event_loop",
    "store",
    "ops",
    "outbox",
)
# Applied in place by a reload.
LIVE_SECTIONS = ("classifier", "sla", "routing", "scheduling", "lifecycle")


@dataclass(slots=True)
class DriverChanges:
    """Channels (or adapters) by name: what a reload does to each."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)  # with the settings that changed
    changed_fields: dict[str, list[str]] = field(default_factory=dict)


@dataclass(slots=True)
class ReloadPlan:
    """Everything a reload from `old` to `new` changes, and what it cannot."""

    needs_restart: list[str] = field(default_factory=list)
    live: list[str] = field(default_factory=list)
    channels: DriverChanges = field(default_factory=DriverChanges)
    adapters: DriverChanges = field(default_factory=DriverChanges)
    agents_added: list[str] = field(default_factory=list)
    agents_removed: list[str] = field(default_factory=list)
    agents_changed: dict[str, list[str]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """Whether the reload would change nothing."""
        return not (
            self.needs_restart
            or self.live
            or self.channels.added
            or self.channels.removed
            or self.channels.restarted
            or self.adapters.added
            or self.adapters.removed
            or self.adapters.restarted
            or self.agents_added
            or self.agents_removed
            or self.agents_changed
        )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""

        def drivers(d: DriverChanges) -> dict[str, Any]:
            return {
                "added": d.added,
                "removed": d.removed,
                "restarted": {n: d.changed_fields.get(n, []) for n in d.restarted},
            }

        return {
            "needs_restart": self.needs_restart,
            "applied_in_place": self.live,
            "channels": drivers(self.channels),
            "adapters": drivers(self.adapters),
            "agents": {
                "added": self.agents_added,
                "removed": self.agents_removed,
                "changed": self.agents_changed,
            },
        }


def _changed_fields(a: BaseModel, b: BaseModel) -> list[str]:
    """Return the names of the fields whose values differ (secrets compare by value)."""
    names = set(type(a).model_fields) | set(type(b).model_fields)
    return sorted(n for n in names if getattr(a, n, None) != getattr(b, n, None))


def _drivers(old: list[Any], new: list[Any]) -> DriverChanges:
    before = {s.name: s for s in old}
    after = {s.name: s for s in new}
    out = DriverChanges(
        added=sorted(set(after) - set(before)), removed=sorted(set(before) - set(after))
    )
    for name in sorted(set(before) & set(after)):
        if before[name] != after[name]:
            out.restarted.append(name)
            if type(before[name]) is type(after[name]):
                out.changed_fields[name] = _changed_fields(before[name], after[name])
            else:
                out.changed_fields[name] = ["type"]
    return out


def reload_plan(old: Config, new: Config) -> ReloadPlan:
    """Return what reloading `old` into `new` would do."""
    plan = ReloadPlan()
    for part in RESTART_SECTIONS:
        if part.startswith("daemon."):
            setting = part.removeprefix("daemon.")
            if getattr(old.daemon, setting) != getattr(new.daemon, setting):
                plan.needs_restart.append(part)
        elif getattr(old, part) != getattr(new, part):
            plan.needs_restart.append(part)
    for part in LIVE_SECTIONS:
        if getattr(old, part) != getattr(new, part):
            plan.live.append(part)
    if (old.daemon.log_level, old.daemon.log_bodies) != (
        new.daemon.log_level,
        new.daemon.log_bodies,
    ):
        plan.live.append("daemon.log_level/log_bodies")
    plan.channels = _drivers(old.channels, new.channels)
    plan.adapters = _drivers(old.adapters, new.adapters)
    before = {a.id: a for a in old.agents}
    after = {a.id: a for a in new.agents}
    plan.agents_added = sorted(set(after) - set(before))
    plan.agents_removed = sorted(set(before) - set(after))
    for agent in sorted(set(before) & set(after)):
        if before[agent] != after[agent]:
            plan.agents_changed[agent] = _changed_fields(before[agent], after[agent])
    return plan


def render(plan: ReloadPlan) -> list[str]:
    """Return the plan as lines for a person."""
    if plan.empty:
        return ["no change: a reload would leave everything as it is"]
    lines: list[str] = []
    for kind, d in (("channel", plan.channels), ("adapter", plan.adapters)):
        lines += [f"+ {kind} {n} (started)" for n in d.added]
        lines += [f"- {kind} {n} (stopped)" for n in d.removed]
        lines += [
            f"~ {kind} {n} (restarted: {', '.join(d.changed_fields.get(n, [])) or 'changed'})"
            for n in d.restarted
        ]
    lines += [f"+ agent {a}" for a in plan.agents_added]
    lines += [f"- agent {a} (its open conversations wait for others)" for a in plan.agents_removed]
    lines += [f"~ agent {a} ({', '.join(f)})" for a, f in plan.agents_changed.items()]
    lines += [f"~ [{part}] applied in place" for part in plan.live]
    lines += [
        f"! [{part}] changed: needs a restart (a reload keeps the running value)"
        for part in plan.needs_restart
    ]
    return lines
