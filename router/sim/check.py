"""Check a simulation run from its three files: the trace, the assignments, the summary.

`analyse` recomputes the summary from the trace and the output events alone; it never
trusts the scheduler's own figures. Definitions:

- **wait** = t(first ``accepted``) - t(arrival). Per class (``inquiry``, ``complaint``
  for non-urgent complaints, ``complaint_urgent``, ``suggestion``; only classes present):
  count of messages, mean / p50 / p95 / max wait over the accepted ones (``None`` if
  none was accepted; percentiles by nearest rank), the SLA target and the SLA
  attainment = share of the class's messages accepted within the target (a message
  never accepted counts as missed).
- **Replay.** Events are walked in file order; the trace's ``agent`` / ``presence``
  lines are applied at their ``t`` before any event of the same or a later ``t``. An
  agent's use of a channel type = assigned-and-unaccepted + accepted-and-unfinished:
  ``assigned`` raises it, ``timeout`` / ``returned`` / ``completed`` lower it.
- **capacity_violations**: ``assigned`` events that put an agent above its capacity for
  a channel type it has (a channel type it lacks counts under channel_violations only).
- **skill / language / channel_violations**: ``assigned`` to an agent whose skills lack
  the class / languages lack the lang / capacity lacks the channel type or is 0.
- **offline_violations**: ``assigned`` or ``accepted`` to an agent that is off line, or
  not declared yet, at that ``t``.
- **never_accepted / accepted_more_than_once**: messages with 0 / more than 1 accepted.
- **unknown_references**: an event naming a message or agent absent from the trace, an
  ``assigned`` before the message arrived, an ``accepted`` / ``timeout`` / ``returned``
  without an outstanding ``assigned`` of that message to that agent, an unknown event.
- **completion_mismatches**: ``completed`` whose ``t`` differs from accepted + handle_time
  by more than 1e-6 * max(1, t), ``completed`` without a matching unfinished
  ``accepted``, and accepted work never completed.
- **reoffered_after_timeout**: ``assigned`` of a message to an agent that earlier timed
  out on it.
- **complaint streak**: per agent, the run of consecutive assigned complaints (any
  urgency; another class resets it). A violation is an assigned complaint that takes
  the run above ``complaint_streak_limit`` while another agent could have taken it
  without passing the limit itself: on line, with the skill and the language, free
  capacity for the channel type, a run below the limit, and not an agent who let this
  very message time out (it may not be offered to them again). When everyone with room
  is at the limit there is nobody to rotate to.
- **utilisation** of an agent = handle time of the messages it completed / (capacity
  summed over its channel types * seconds on line from its declaration to the last
  event's ``t``). **utilisation_gini**: Gini coefficient over the agents with positive
  on-line time (0 with fewer than 2 such agents or when all are 0).
- **out_of_order**: events whose ``t`` is below the previous event's ``t``.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MAX_VIOLATION_NOTES = 20
DEFAULT_STREAK_LIMIT = 3
CLASS_ORDER = ("inquiry", "complaint", "complaint_urgent", "suggestion")

# The summary counters that must be zero after a correct, drained run.
INVARIANT_COUNTERS = (
    "never_accepted",
    "accepted_more_than_once",
    "capacity_violations",
    "skill_violations",
    "language_violations",
    "channel_violations",
    "offline_violations",
    "completion_mismatches",
    "unknown_references",
    "out_of_order",
)

_COUNTERS = (
    *INVARIANT_COUNTERS,
    "longest_complaint_streak",
    "complaint_streak_violations",
    "reoffered_after_timeout",
    "timeouts",
    "returned",
    "assignments",
)


def load_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSON-lines file into a list of dicts, skipping blank lines."""
    lines: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{os.fspath(path)} line {number}: {exc.msg}") from exc
            if not isinstance(value, dict):
                raise ValueError(f"{os.fspath(path)} line {number}: expected a JSON object")
            lines.append(value)
    return lines


def class_key(message: Mapping[str, Any]) -> str:
    """Return the SLA class of a message: its class, or complaint_urgent."""
    cls = str(message["class"])
    if cls == "complaint" and message.get("urgent"):
        return "complaint_urgent"
    return cls


def nearest_rank(sorted_values: Sequence[float], percent: float) -> float:
    """Return the nearest-rank percentile of already sorted values."""
    if not sorted_values:
        raise ValueError("no values")
    rank = math.ceil(percent / 100.0 * len(sorted_values))
    return sorted_values[min(max(rank, 1), len(sorted_values)) - 1]


def gini(values: Sequence[float]) -> float:
    """Return the Gini coefficient of non-negative values (0 if fewer than 2 or all 0)."""
    ordered = sorted(values)
    count = len(ordered)
    total = sum(ordered)
    if count < 2 or total <= 0:
        return 0.0
    weighted = sum(rank * value for rank, value in enumerate(ordered, start=1))
    return 2.0 * weighted / (count * total) - (count + 1) / count


def _wait_stats(waits: list[float]) -> dict[str, float | None]:
    """Return count-free mean / p50 / p95 / max of waits, None when there are none."""
    if not waits:
        return {"mean_wait": None, "p50_wait": None, "p95_wait": None, "max_wait": None}
    ordered = sorted(waits)
    return {
        "mean_wait": sum(ordered) / len(ordered),
        "p50_wait": nearest_rank(ordered, 50),
        "p95_wait": nearest_rank(ordered, 95),
        "max_wait": ordered[-1],
    }


@dataclass
class _Agent:
    """Replay state of one agent."""

    skills: frozenset[str]
    languages: frozenset[str]
    capacity: dict[str, int]
    online: bool
    since: float
    use: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    online_seconds: float = 0.0
    capacity_seconds: float = 0.0
    busy: float = 0.0
    streak: int = 0

    def settle(self, t: float) -> None:
        """Add on-line time up to `t` and restart the on-line clock there."""
        if self.online and t > self.since:
            self.online_seconds += t - self.since
            self.capacity_seconds += sum(max(0, c) for c in self.capacity.values()) * (
                t - self.since
            )
        self.since = max(self.since, t)

    def has_room(self, channel_type: str) -> bool:
        """Return whether the agent has a free slot of `channel_type`."""
        return self.use[channel_type] < self.capacity.get(channel_type, 0)


class _Replay:
    """Walk the events against the trace, counting every violation once."""

    def __init__(self, trace: Sequence[Mapping[str, Any]]) -> None:
        """Index the trace: config, messages, and the agent timeline."""
        config = next((line for line in trace if line.get("type") == "config"), {})
        self.sla: dict[str, float] = dict(config.get("sla", {}))
        self.streak_limit = int(config.get("complaint_streak_limit", DEFAULT_STREAK_LIMIT))
        self.messages: dict[str, Mapping[str, Any]] = {
            str(line["id"]): line for line in trace if line.get("type") == "message"
        }
        timeline = [line for line in trace if line.get("type") in ("agent", "presence")]
        # Sorted defensively; Python's sort is stable, so ties keep file order.
        self.timeline = sorted(timeline, key=lambda line: float(line["t"]))
        self.known_agents = {str(line["id"]) for line in timeline if line["type"] == "agent"}
        self.next_line = 0
        self.agents: dict[str, _Agent] = {}
        self.online: set[str] = set()
        self.counts: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self.notes: list[str] = []
        # (message, agent) -> outstanding unaccepted assignments
        self.pending: dict[tuple[str, str], int] = defaultdict(int)
        # (message, agent) -> accept time of unfinished accepted work
        self.working: dict[tuple[str, str], float] = {}
        self.timed_out: set[tuple[str, str]] = set()
        self.accepts: dict[str, int] = defaultdict(int)
        self.first_accept: dict[str, float] = {}

    def flag(self, counter: str, t: float, text: str) -> None:
        """Count one violation and keep the first notes for the report."""
        self.counts[counter] += 1
        if len(self.notes) < MAX_VIOLATION_NOTES:
            self.notes.append(f"t={t:g}: {counter}: {text}")

    def advance(self, t: float) -> None:
        """Apply the trace's agent and presence lines with t at or before `t`."""
        while self.next_line < len(self.timeline):
            line = self.timeline[self.next_line]
            line_t = float(line["t"])
            if line_t > t:
                break
            self.next_line += 1
            if line["type"] == "agent":
                self._declare(line, line_t)
            else:
                self._presence(str(line["agent"]), bool(line["online"]), line_t)

    def _declare(self, line: Mapping[str, Any], t: float) -> None:
        """Declare (or redeclare) an agent, keeping its current load."""
        agent_id = str(line["id"])
        online = bool(line.get("online", True))
        old = self.agents.get(agent_id)
        if old is not None:
            old.settle(t)
        agent = _Agent(
            skills=frozenset(line.get("skills", ())),
            languages=frozenset(line.get("languages", ())),
            capacity={str(k): int(v) for k, v in dict(line.get("capacity", {})).items()},
            online=online,
            since=t,
        )
        if old is not None:
            agent.use, agent.busy, agent.streak = old.use, old.busy, old.streak
            agent.online_seconds, agent.capacity_seconds = old.online_seconds, old.capacity_seconds
        self.agents[agent_id] = agent
        self._set_online(agent_id, online)

    def _presence(self, agent_id: str, online: bool, t: float) -> None:
        """Turn a declared agent on or off line; presence of unknown agents is ignored."""
        agent = self.agents.get(agent_id)
        if agent is None:
            return
        agent.settle(t)
        agent.online = online
        self._set_online(agent_id, online)

    def _set_online(self, agent_id: str, online: bool) -> None:
        """Keep the set of on-line agents in step with their flags."""
        if online:
            self.online.add(agent_id)
        else:
            self.online.discard(agent_id)

    def event(self, event: Mapping[str, Any]) -> None:
        """Apply one output event, counting what it breaks."""
        t = float(event["t"])
        kind = event.get("event")
        message_id, agent_id = str(event.get("message")), str(event.get("agent"))
        message = self.messages.get(message_id)
        if kind not in ("assigned", "accepted", "completed", "timeout", "returned"):
            self.flag("unknown_references", t, f"unknown event {kind!r}")
            return
        if message is None or agent_id not in self.known_agents:
            self.flag("unknown_references", t, f"{kind} {message_id} to {agent_id}: not in trace")
            return
        key = (message_id, agent_id)
        agent = self.agents.get(agent_id)
        if kind == "assigned":
            self._assigned(t, message, key, agent)
        elif kind == "accepted":
            self._accepted(t, message, key, agent)
        elif kind == "completed":
            self._completed(t, message, key, agent)
        else:
            self._taken_back(t, kind, message, key, agent)

    def _assigned(
        self, t: float, message: Mapping[str, Any], key: tuple[str, str], agent: _Agent | None
    ) -> None:
        """Check and apply an assignment."""
        message_id, agent_id = key
        self.counts["assignments"] += 1
        what = f"{message_id} to {agent_id}"
        if t < float(message["t"]):
            self.flag("unknown_references", t, f"assigned {what} before its arrival")
        if agent is None or not agent.online:
            self.flag("offline_violations", t, f"assigned {what} while off line")
        if agent is None:
            # Not declared yet: no skills or capacity to check against, but the slot
            # is still held until the assignment is taken back.
            self.pending[key] += 1
            return
        cls, lang, channel_type = str(message["class"]), message["lang"], message["channel_type"]
        if cls not in agent.skills:
            self.flag("skill_violations", t, f"assigned {what}: lacks skill {cls}")
        if lang not in agent.languages:
            self.flag("language_violations", t, f"assigned {what}: lacks language {lang}")
        capacity = agent.capacity.get(channel_type, 0)
        if capacity <= 0:
            self.flag("channel_violations", t, f"assigned {what}: no {channel_type} capacity")
        if key in self.timed_out:
            self.flag("reoffered_after_timeout", t, f"assigned {what} after its timeout")
        if cls == "complaint":
            agent.streak += 1
            if agent.streak > self.streak_limit and self._someone_else_free(agent_id, message):
                self.flag(
                    "complaint_streak_violations",
                    t,
                    f"assigned {what}: complaint {agent.streak} in a row",
                )
            longest = self.counts["longest_complaint_streak"]
            self.counts["longest_complaint_streak"] = max(longest, agent.streak)
        else:
            agent.streak = 0
        self.pending[key] += 1
        agent.use[channel_type] += 1
        if capacity > 0 and agent.use[channel_type] > capacity:
            self.flag(
                "capacity_violations",
                t,
                f"assigned {what}: {agent.use[channel_type]} {channel_type} > {capacity}",
            )

    def _someone_else_free(self, agent_id: str, message: Mapping[str, Any]) -> bool:
        """Return whether another on-line agent under the limit could have taken `message`."""
        cls, lang, channel_type = message["class"], message["lang"], message["channel_type"]
        for other_id in self.online:
            if other_id == agent_id:
                continue
            other = self.agents[other_id]
            if (
                cls in other.skills
                and lang in other.languages
                and other.has_room(channel_type)
                and other.streak < self.streak_limit
                and (message["id"], other_id) not in self.timed_out
            ):
                return True
        return False

    def _accepted(
        self, t: float, message: Mapping[str, Any], key: tuple[str, str], agent: _Agent | None
    ) -> None:
        """Check and apply an acceptance."""
        message_id, agent_id = key
        what = f"{message_id} by {agent_id}"
        if agent is None or not agent.online:
            self.flag("offline_violations", t, f"accepted {what} while off line")
        if self.pending[key] > 0:
            self.pending[key] -= 1
        else:
            self.flag("unknown_references", t, f"accepted {what} without an assignment")
            # The agent holds the conversation from here on, so account for the slot.
            if agent is not None:
                agent.use[message["channel_type"]] += 1
        self.accepts[message_id] += 1
        if message_id not in self.first_accept:
            self.first_accept[message_id] = t
        if key in self.working:
            self.flag("completion_mismatches", t, f"accepted {what} again before completing")
        self.working[key] = t

    def _completed(
        self, t: float, message: Mapping[str, Any], key: tuple[str, str], agent: _Agent | None
    ) -> None:
        """Check and apply a completion."""
        message_id, agent_id = key
        what = f"{message_id} by {agent_id}"
        accepted_at = self.working.pop(key, None)
        if accepted_at is None:
            self.flag("completion_mismatches", t, f"completed {what} without open acceptance")
            return
        handle_time = float(message["handle_time"])
        expected = accepted_at + handle_time
        if abs(t - expected) > 1e-6 * max(1.0, abs(t)):
            self.flag("completion_mismatches", t, f"completed {what}, expected t={expected:g}")
        if agent is not None:
            agent.use[message["channel_type"]] -= 1
            agent.busy += handle_time

    def _taken_back(
        self,
        t: float,
        kind: str,
        message: Mapping[str, Any],
        key: tuple[str, str],
        agent: _Agent | None,
    ) -> None:
        """Check and apply a timeout or a return to the queue."""
        message_id, agent_id = key
        self.counts["timeouts" if kind == "timeout" else "returned"] += 1
        if self.pending[key] <= 0:
            self.flag("unknown_references", t, f"{kind} {message_id} from {agent_id}: unassigned")
            return
        self.pending[key] -= 1
        if agent is not None:
            agent.use[message["channel_type"]] -= 1
        if kind == "timeout":
            self.timed_out.add(key)

    def finish(self, last_t: float) -> None:
        """Close the books at the last event's t: on-line time and unfinished work."""
        self.advance(last_t)
        for agent in self.agents.values():
            agent.settle(last_t)
        for (message_id, agent_id), accepted_at in self.working.items():
            self.flag(
                "completion_mismatches",
                accepted_at,
                f"accepted {message_id} by {agent_id} never completed",
            )
        for message_id in self.messages:
            accepts = self.accepts.get(message_id, 0)
            if accepts == 0:
                self.counts["never_accepted"] += 1
            elif accepts > 1:
                self.counts["accepted_more_than_once"] += 1


def analyse(
    trace: Sequence[Mapping[str, Any]], events: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Recompute the run's summary and invariant counters from the trace and events."""
    replay = _Replay(trace)
    previous: float | None = None
    for event in events:
        t = float(event["t"])
        if previous is not None and t < previous:
            replay.flag("out_of_order", t, f"event at t={t:g} after t={previous:g}")
        previous = t
        replay.advance(t)
        replay.event(event)
    last_t = max((float(event["t"]) for event in events), default=0.0)
    replay.finish(last_t)
    for message_id in replay.messages:
        accepts = replay.accepts.get(message_id, 0)
        if accepts == 0 and len(replay.notes) < MAX_VIOLATION_NOTES:
            replay.notes.append(f"never_accepted: {message_id}")
        elif accepts > 1 and len(replay.notes) < MAX_VIOLATION_NOTES:
            replay.notes.append(f"accepted_more_than_once: {message_id} ({accepts} times)")

    waits_by_class: dict[str, list[float]] = defaultdict(list)
    hits: dict[str, int] = defaultdict(int)
    counts: dict[str, int] = defaultdict(int)
    all_waits: list[float] = []
    for message_id, message in replay.messages.items():
        key = class_key(message)
        counts[key] += 1
        accepted_at = replay.first_accept.get(message_id)
        if accepted_at is None:
            continue
        wait = accepted_at - float(message["t"])
        waits_by_class[key].append(wait)
        all_waits.append(wait)
        target = replay.sla.get(key)
        if target is not None and wait <= target:
            hits[key] += 1

    classes: dict[str, dict[str, Any]] = {}
    rank = {key: index for index, key in enumerate(CLASS_ORDER)}
    for key in sorted(counts, key=lambda k: (rank.get(k, len(rank)), k)):
        target = replay.sla.get(key)
        classes[key] = {
            "count": counts[key],
            **_wait_stats(waits_by_class[key]),
            "sla": target,
            "sla_attainment": hits[key] / counts[key] if target is not None else None,
        }

    utilisation = {
        agent_id: (agent.busy / agent.capacity_seconds if agent.capacity_seconds > 0 else 0.0)
        for agent_id, agent in sorted(replay.agents.items())
    }
    on_line = [utilisation[a] for a, agent in replay.agents.items() if agent.online_seconds > 0]
    summary: dict[str, Any] = {
        "messages": len(replay.messages),
        "classes": classes,
        "overall": {"count": len(replay.messages), **_wait_stats(all_waits)},
        "utilisation": utilisation,
        "utilisation_gini": gini(on_line),
    }
    summary.update(replay.counts)
    summary["violations"] = replay.notes
    return summary


def check(summary: Mapping[str, Any]) -> list[str]:
    """Return one line per invariant counter that is not zero (empty when all hold)."""
    return [
        f"{name}: {summary[name]} (must be 0)"
        for name in INVARIANT_COUNTERS
        if summary.get(name, 0) != 0
    ]
