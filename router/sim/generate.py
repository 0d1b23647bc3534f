"""Generate synthetic scheduling traces, deterministic per seed.

A trace is the list of JSON-line dicts described in
``shared/notes/sim-trace-format.md``: ``config`` first, the ``agent`` lines at t=0,
then presence changes and message arrivals sorted by ``t`` (ties keep order), and
``end`` last.

Arrivals are Poisson. Every scenario is a set of *streams* (one channel type, one
class mix, one handle-time mean per class); a stream's rate comes from the offered
load it must put on the capacity that serves it::

    rate = utilisation * capacity / mean_handle_time

so a channel type whose agents hold ``capacity`` concurrent conversations in total is
kept busy ``utilisation`` of the time on average. Because capacity is per channel
type, each channel type is loaded independently and the resulting channel mix follows
from capacities and handle times (it is not an input).

Follow-ups (10 % of arrivals) reuse the conversation and language of a random earlier
message *of the same channel type* from the last 30 minutes, so the per-channel
rates above stay exact.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

SLA: dict[str, int] = {"complaint": 120, "complaint_urgent": 30, "inquiry": 300, "suggestion": 3600}
ACCEPT_TIMEOUT = 60
COMPLAINT_STREAK_LIMIT = 3
DEFAULT_HOURS = 4.0

CLASS_MIX: dict[str, float] = {"inquiry": 0.60, "complaint": 0.30, "suggestion": 0.10}
URGENT_SHARE = 0.25
LANG_MIX: dict[str, float] = {"zh": 0.5, "en": 0.5}
FOLLOW_UP_SHARE = 0.10
FOLLOW_UP_WINDOW = 1800.0
MIN_HANDLE_TIME = 1.0
ALL_SKILLS: tuple[str, ...] = ("inquiry", "complaint", "suggestion")
BOTH_LANGS: tuple[str, ...] = ("zh", "en")
HANDLE_MEANS: dict[str, float] = {"inquiry": 300.0, "complaint": 480.0, "suggestion": 180.0}
# Email is answered with more care than chat or SMS, so it takes longer per message.
EMAIL_HANDLE_FACTOR = 1.5
UNRELIABLE_AGENTS = 5
IGNORE_PROBABILITY = 0.3

SCENARIOS: dict[str, str] = {
    "steady_80": "40 single-chat generalists at 0.80 load, 300 s exponential handling (M/M/c)",
    "peak_burst": "30 agents on chat/email/sms at 0.65 load, arrival rate doubled 5400-7200 s",
    "skills_split": "8 complaint specialists at 0.80 and 24 zh/en generalists at 0.75 load",
    "shift_change": "36 agents at 0.60 load; a third go off line at half time (0.90 after)",
    "overload_110": "30 agents at 0.70 load, 1.10 from 1/4 to 5/8 of the run, then 0.70",
    "no_answer": "30 agents at 0.70 load; a01-a05 ignore each message with probability 0.3",
    "scarce_skills": (
        "36 agents at 0.72 load: 12 zh/en complaint specialists, 14 one-language "
        "inquiry/complaint agents, 10 zh/en generalists, the only ones with suggestion"
    ),
    "burst": "30 agents on chat/email/sms at 0.55 load, arrival rate tripled 3600-4500 s",
}

# (start, end, rate multiplier) over the run; times absolute seconds.
Segment = tuple[float, float, float]


def mean_handle_time(class_mix: Mapping[str, float], means: Mapping[str, float]) -> float:
    """Return the class-mix-weighted mean handle time (the mix need not sum to 1)."""
    total = sum(class_mix.values())
    if total <= 0:
        raise ValueError("class mix must have positive weight")
    return sum(share * means[cls] for cls, share in class_mix.items()) / total


def arrival_rate(utilisation: float, capacity: float, mean_handle: float) -> float:
    """Return the Poisson rate (per second) that offers `utilisation` of `capacity`."""
    if mean_handle <= 0:
        raise ValueError(f"mean handle time must be positive, got {mean_handle}")
    return utilisation * capacity / mean_handle


@dataclass(frozen=True)
class _Stream:
    """One independent Poisson arrival stream."""

    channel_type: str
    class_mix: Mapping[str, float]
    handle_means: Mapping[str, float]
    rate: float
    segments: Sequence[Segment]
    lang_mix: Mapping[str, float] = field(default_factory=lambda: LANG_MIX)


@dataclass
class _Plan:
    """What a scenario builder decides before any random draw."""

    agents: list[dict[str, Any]]
    streams: list[_Stream]
    presence: list[dict[str, Any]] = field(default_factory=list)
    unreliable: list[str] = field(default_factory=list)


def _agent_ids(count: int) -> list[str]:
    """Return a01, a02, ... zero-padded to width 2, or 3 above 99 agents."""
    width = 3 if count > 99 else 2
    return [f"a{i:0{width}d}" for i in range(1, count + 1)]


def _agent_line(
    agent_id: str, skills: Sequence[str], languages: Sequence[str], capacity: Mapping[str, int]
) -> dict[str, Any]:
    """Build an on-line `agent` trace line at t=0."""
    return {
        "type": "agent",
        "t": 0,
        "id": agent_id,
        "skills": list(skills),
        "languages": list(languages),
        "capacity": dict(capacity),
        "online": True,
    }


def _channel_means(channel_type: str, classes: Iterable[str]) -> dict[str, float]:
    """Return the per-class handle-time means on a channel type (email is slower)."""
    factor = EMAIL_HANDLE_FACTOR if channel_type == "email" else 1.0
    return {cls: HANDLE_MEANS[cls] * factor for cls in classes}


def _uniform_plan(
    count: int,
    capacity: Mapping[str, int],
    utilisation: float,
    segments: Sequence[Segment],
    flat_mean: float | None = None,
) -> _Plan:
    """Plan identical all-skill agents, one stream per channel type at `utilisation`.

    Handle-time means are the per-class ones (email slower) unless `flat_mean` gives
    one mean for every class and channel type.
    """
    ids = _agent_ids(count)
    agents = [_agent_line(a, ALL_SKILLS, BOTH_LANGS, capacity) for a in ids]
    streams = []
    for channel_type, per_agent in capacity.items():
        if flat_mean is None:
            channel_means = _channel_means(channel_type, ALL_SKILLS)
        else:
            channel_means = dict.fromkeys(ALL_SKILLS, flat_mean)
        mean = mean_handle_time(CLASS_MIX, channel_means)
        rate = arrival_rate(utilisation, per_agent * count, mean)
        streams.append(_Stream(channel_type, CLASS_MIX, channel_means, rate, segments))
    return _Plan(agents, streams)


def _flat(horizon: float) -> list[Segment]:
    """Return one constant-rate segment over the run."""
    return [(0.0, horizon, 1.0)]


_MULTI_CHANNEL = {"chat": 3, "email": 5, "sms": 3}
_CHAT_EMAIL = {"chat": 3, "email": 5}


def _steady_80(count: int, utilisation: float, horizon: float) -> _Plan:
    """Plan an M/M/c queue: single-chat agents, 300 s mean for every class."""
    return _uniform_plan(count, {"chat": 1}, utilisation, _flat(horizon), flat_mean=300.0)


def _peak_burst(count: int, utilisation: float, horizon: float) -> _Plan:
    """Plan a base load with the arrival rate doubled between t=5400 and t=7200."""
    burst_start, burst_end = min(5400.0, horizon), min(7200.0, horizon)
    segments = [(0.0, burst_start, 1.0), (burst_start, burst_end, 2.0), (burst_end, horizon, 1.0)]
    return _uniform_plan(count, _MULTI_CHANNEL, utilisation, segments)


def _shift_change(count: int, utilisation: float, horizon: float) -> _Plan:
    """Plan a constant load with every third agent going off line at half time."""
    plan = _uniform_plan(count, _CHAT_EMAIL, utilisation, _flat(horizon))
    half = round(horizon / 2, 3)
    plan.presence = [
        {"type": "presence", "t": half, "agent": line["id"], "online": False}
        for line in plan.agents[2::3]
    ]
    return plan


def _overload_110(count: int, utilisation: float, horizon: float) -> _Plan:
    """Plan base load, then 1.10/0.70 times it from 1/4 to 5/8 of the run, then base."""
    start, stop = horizon / 4, horizon * 5 / 8
    segments = [(0.0, start, 1.0), (start, stop, 1.10 / 0.70), (stop, horizon, 1.0)]
    return _uniform_plan(count, _MULTI_CHANNEL, utilisation, segments)


def _no_answer(count: int, utilisation: float, horizon: float) -> _Plan:
    """Plan a constant load where the first five agents ignore some messages."""
    plan = _uniform_plan(count, _MULTI_CHANNEL, utilisation, _flat(horizon))
    plan.unreliable = [line["id"] for line in plan.agents[:UNRELIABLE_AGENTS]]
    return plan


# skills_split: the generalists' load as a fraction of the specialists' load.
_GENERALIST_LOAD_RATIO = 0.75 / 0.80


def _skills_split(count: int, utilisation: float, horizon: float) -> _Plan:
    """Plan complaint specialists and per-language generalists, each group loaded apart."""
    if count < 3:
        raise ValueError(f"skills_split needs at least 3 agents, got {count}")
    specialists = max(1, round(count / 4))
    generalists = count - specialists
    zh = (generalists + 1) // 2
    capacity = {"chat": 2, "email": 4}
    ids = _agent_ids(count)
    specialist_skills = ("complaint", "inquiry")
    agents = [_agent_line(a, specialist_skills, BOTH_LANGS, capacity) for a in ids[:specialists]]
    for i, agent_id in enumerate(ids[specialists:]):
        lang = "zh" if i < zh else "en"
        agents.append(_agent_line(agent_id, ("inquiry", "suggestion"), (lang,), capacity))
    # Inquiries and suggestions keep their 0.60 : 0.10 ratio; the language split follows
    # the generalists' split so each language group sits at the same load.
    general_mix = {"inquiry": 0.60 / 0.70, "suggestion": 0.10 / 0.70}
    general_langs = {"zh": zh / generalists, "en": (generalists - zh) / generalists}
    streams = []
    for channel_type, per_agent in capacity.items():
        complaint_means = _channel_means(channel_type, ("complaint",))
        rate = arrival_rate(utilisation, per_agent * specialists, complaint_means["complaint"])
        streams.append(
            _Stream(channel_type, {"complaint": 1.0}, complaint_means, rate, _flat(horizon))
        )
        means = _channel_means(channel_type, general_mix)
        rate = arrival_rate(
            utilisation * _GENERALIST_LOAD_RATIO,
            per_agent * generalists,
            mean_handle_time(general_mix, means),
        )
        streams.append(
            _Stream(channel_type, general_mix, means, rate, _flat(horizon), general_langs)
        )
    return _Plan(agents, streams)


# scarce_skills: shares of the roster; the generalists get the rest (about a quarter).
_SCARCE_SPECIALIST_SHARE = 1 / 3
_SCARCE_FLEXIBLE_SHARE = 0.40
# Below this head count the rounding leaves a group (or a language) empty.
_SCARCE_MIN_AGENTS = 6


def _scarce_skills(count: int, utilisation: float, horizon: float) -> _Plan:
    """Plan a roster where only a minority (the generalists) can serve suggestions.

    One stream per channel type over the whole roster, at `utilisation` of the total
    capacity: which group serves which class is left entirely to the scheduler.
    """
    if count < _SCARCE_MIN_AGENTS:
        raise ValueError(f"scarce_skills needs at least {_SCARCE_MIN_AGENTS} agents, got {count}")
    specialists = max(1, round(count * _SCARCE_SPECIALIST_SHARE))
    flexible = max(2, round(count * _SCARCE_FLEXIBLE_SHARE))
    if count - specialists - flexible < 1:
        raise ValueError(f"scarce_skills leaves no generalist with {count} agents")
    zh = (flexible + 1) // 2
    ids = _agent_ids(count)
    agents = [
        _agent_line(a, ("complaint", "inquiry"), BOTH_LANGS, _CHAT_EMAIL) for a in ids[:specialists]
    ]
    for i, agent_id in enumerate(ids[specialists : specialists + flexible]):
        lang = "zh" if i < zh else "en"
        agents.append(_agent_line(agent_id, ("inquiry", "complaint"), (lang,), _CHAT_EMAIL))
    agents += [
        _agent_line(a, ("inquiry", "suggestion"), BOTH_LANGS, _CHAT_EMAIL)
        for a in ids[specialists + flexible :]
    ]
    return _Plan(agents, _uniform_plan(count, _CHAT_EMAIL, utilisation, _flat(horizon)).streams)


# burst: a short surge of three times the base arrival rate, absolute times.
_BURST_START = 3600.0
_BURST_LENGTH = 900.0
_BURST_FACTOR = 3.0


def _burst(count: int, utilisation: float, horizon: float) -> _Plan:
    """Plan a base load with the arrival rate tripled for 15 minutes from t=3600."""
    start = min(_BURST_START, horizon)
    stop = min(_BURST_START + _BURST_LENGTH, horizon)
    segments = [(0.0, start, 1.0), (start, stop, _BURST_FACTOR), (stop, horizon, 1.0)]
    return _uniform_plan(count, _MULTI_CHANNEL, utilisation, segments)


_Builder = Callable[[int, float, float], _Plan]

# name -> (builder, default agents, default base utilisation)
_BUILDERS: dict[str, tuple[_Builder, int, float]] = {
    "steady_80": (_steady_80, 40, 0.80),
    "peak_burst": (_peak_burst, 30, 0.65),
    "skills_split": (_skills_split, 32, 0.80),
    "shift_change": (_shift_change, 36, 0.60),
    "overload_110": (_overload_110, 30, 0.70),
    "no_answer": (_no_answer, 30, 0.70),
    "scarce_skills": (_scarce_skills, 36, 0.72),
    "burst": (_burst, 30, 0.55),
}


def _pick(rng: random.Random, weights: Mapping[str, float]) -> str:
    """Draw one key of `weights` with probability proportional to its weight."""
    point = rng.random() * sum(weights.values())
    last = ""
    for last, weight in weights.items():
        point -= weight
        if point < 0:
            return last
    # Floating-point leftovers land here; the last key is the right answer then.
    return last


def _poisson_times(rng: random.Random, rate: float, segments: Sequence[Segment]) -> list[float]:
    """Return arrival times of a Poisson process with piecewise-constant rate."""
    times: list[float] = []
    for start, end, multiplier in segments:
        segment_rate = rate * multiplier
        if segment_rate <= 0 or end <= start:
            continue
        # Memorylessness makes restarting the clock at each boundary exact.
        t = start + rng.expovariate(segment_rate)
        while t < end:
            times.append(t)
            t += rng.expovariate(segment_rate)
    return times


def _messages(
    rng: random.Random, plan: _Plan, arrivals: list[tuple[float, int]]
) -> list[dict[str, Any]]:
    """Turn merged (t, stream) arrivals into message lines, drawing every attribute."""
    lines: list[dict[str, Any]] = []
    # Per channel type: recent (t, conversation, lang), and the index of the oldest
    # entry still inside the follow-up window.
    recent: dict[str, list[tuple[float, str, str]]] = {}
    heads: dict[str, int] = {}
    conversations = 0
    for number, (t, index) in enumerate(arrivals, start=1):
        stream = plan.streams[index]
        channel_type = stream.channel_type
        cls = _pick(rng, stream.class_mix)
        urgent = cls == "complaint" and rng.random() < URGENT_SHARE
        window = recent.setdefault(channel_type, [])
        head = heads.get(channel_type, 0)
        while head < len(window) and window[head][0] < t - FOLLOW_UP_WINDOW:
            head += 1
        heads[channel_type] = head
        if rng.random() < FOLLOW_UP_SHARE and head < len(window):
            _, conversation, lang = window[rng.randrange(head, len(window))]
        else:
            conversations += 1
            conversation = f"c{conversations:06d}"
            lang = _pick(rng, stream.lang_mix)
        drawn = rng.expovariate(1.0 / stream.handle_means[cls])
        line: dict[str, Any] = {
            "type": "message",
            "t": t,
            "id": f"m{number:06d}",
            "class": cls,
            "urgent": urgent,
            "channel_type": channel_type,
            "lang": lang,
            "conversation": conversation,
            "handle_time": max(MIN_HANDLE_TIME, round(drawn, 3)),
        }
        ignored = [a for a in plan.unreliable if rng.random() < IGNORE_PROBABILITY]
        if ignored:
            line["ignored_by"] = ignored
        lines.append(line)
        window.append((t, conversation, lang))
    return lines


def generate(
    scenario: str,
    seed: int,
    *,
    hours: float | None = None,
    agents: int | None = None,
    utilisation: float | None = None,
) -> list[dict[str, Any]]:
    """Return the trace lines of `scenario`, identical for identical arguments.

    Overrides: `hours` sets the arrival period (``end`` at hours * 3600 s); `agents`
    sets the head count (skills_split keeps a quarter as specialists, the rest split
    zh/en; shift_change still sends every third off line; no_answer keeps a01-a05
    unreliable; scarce_skills keeps a third complaint specialists, 40 % one-language
    flexible agents split zh/en and the rest generalists, and needs at least 6 agents);
    `utilisation` sets the *base* level and every other level keeps its ratio to it:
    peak_burst still doubles the rate in 5400-7200 s and burst still triples it in
    3600-4500 s (absolute times, clipped to the run), overload_110 runs at
    utilisation * 1.10 / 0.70 in the middle, skills_split puts the specialists at
    `utilisation` and the generalists at utilisation * 0.75 / 0.80, scarce_skills loads
    the whole roster's capacity at `utilisation`. Arrival rates always follow the
    actual head count.
    """
    if scenario not in _BUILDERS:
        known = ", ".join(sorted(SCENARIOS))
        raise ValueError(f"unknown scenario {scenario!r}; known scenarios: {known}")
    builder, default_agents, default_utilisation = _BUILDERS[scenario]
    hours = DEFAULT_HOURS if hours is None else hours
    count = default_agents if agents is None else agents
    level = default_utilisation if utilisation is None else utilisation
    if hours <= 0:
        raise ValueError(f"hours must be positive, got {hours}")
    if count < 1:
        raise ValueError(f"agents must be at least 1, got {count}")
    if level < 0:
        raise ValueError(f"utilisation must not be negative, got {level}")
    horizon = round(hours * 3600.0, 3)
    plan = builder(count, level, horizon)

    rng = random.Random(seed)
    arrivals: list[tuple[float, int]] = []
    for index, stream in enumerate(plan.streams):
        for raw in _poisson_times(rng, stream.rate, stream.segments):
            t = round(raw, 3)
            # Rounding may push the last arrival onto `end`; arrivals stop before it.
            if t < horizon:
                arrivals.append((t, index))
    arrivals.sort(key=lambda arrival: arrival[0])

    events = plan.presence + _messages(rng, plan, arrivals)
    events.sort(key=lambda line: float(line["t"]))
    config: dict[str, Any] = {
        "type": "config",
        "t": 0,
        "sla": dict(SLA),
        "accept_timeout": ACCEPT_TIMEOUT,
        "complaint_streak_limit": COMPLAINT_STREAK_LIMIT,
    }
    return [config, *plan.agents, *events, {"type": "end", "t": horizon}]


def write_trace(
    lines: Iterable[Mapping[str, Any]], path_or_file: str | os.PathLike[str] | IO[str]
) -> None:
    """Write `lines` as compact JSON lines to a path or an open text file."""
    if isinstance(path_or_file, str | os.PathLike):
        with open(path_or_file, "w", encoding="utf-8") as handle:
            _write_lines(lines, handle)
    else:
        _write_lines(lines, path_or_file)


def _write_lines(lines: Iterable[Mapping[str, Any]], handle: IO[str]) -> None:
    """Write one compact JSON object per line to `handle`."""
    for line in lines:
        handle.write(json.dumps(line, separators=(",", ":"), ensure_ascii=False))
        handle.write("\n")
