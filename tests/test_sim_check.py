"""Tests for the trace generator (router/sim/generate.py) and the checker (router/sim/check.py)."""

from __future__ import annotations

import heapq
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from router.sim.check import INVARIANT_COUNTERS, analyse, check, gini, load_jsonl, nearest_rank
from router.sim.generate import (
    SCENARIOS,
    arrival_rate,
    generate,
    mean_handle_time,
    write_trace,
)

Line = dict[str, Any]

MESSAGE_FIELDS = {
    "type",
    "t",
    "id",
    "class",
    "urgent",
    "channel_type",
    "lang",
    "conversation",
    "handle_time",
}


# --- generator ------------------------------------------------------------------------


def messages_of(lines: list[Line]) -> list[Line]:
    """Return the message lines of a trace."""
    return [line for line in lines if line["type"] == "message"]


def test_same_seed_gives_identical_lines() -> None:
    """Generate twice with one seed and get the same trace, another seed differs."""
    first = generate("peak_burst", 7, hours=0.5)
    assert first == generate("peak_burst", 7, hours=0.5)
    assert first != generate("peak_burst", 8, hours=0.5)


def test_generator_leaves_the_global_rng_alone() -> None:
    """Draw nothing from the module-level random generator."""
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    generate("no_answer", 1, hours=0.2)
    assert random.random() == expected


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_scenario_produces_a_valid_trace(scenario: str) -> None:
    """Check order, fields, unique ids and conversation consistency of each scenario."""
    lines = generate(scenario, 3, hours=1.0)
    assert lines[0]["type"] == "config"
    assert lines[0]["sla"] == {
        "complaint": 120,
        "complaint_urgent": 30,
        "inquiry": 300,
        "suggestion": 3600,
    }
    assert lines[0]["accept_timeout"] == 60
    assert lines[0]["complaint_streak_limit"] == 3
    assert lines[-1] == {"type": "end", "t": 3600.0}
    times = [float(line["t"]) for line in lines]
    assert times == sorted(times)

    agents = [line for line in lines if line["type"] == "agent"]
    assert lines[1 : 1 + len(agents)] == agents, "agent lines follow config directly"
    agent_ids = [a["id"] for a in agents]
    assert agent_ids == [f"a{i:02d}" for i in range(1, len(agents) + 1)]
    for agent in agents:
        assert agent["t"] == 0 and agent["online"] is True
        assert agent["skills"] and agent["languages"] and agent["capacity"]

    messages = messages_of(lines)
    assert len(messages) > 100
    ids = [m["id"] for m in messages]
    assert ids == [f"m{i:06d}" for i in range(1, len(ids) + 1)]
    conversations: dict[str, tuple[str, str]] = {}
    for message in messages:
        assert MESSAGE_FIELDS <= message.keys()
        assert 0 <= message["t"] < 3600.0
        assert message["t"] == round(message["t"], 3)
        assert message["class"] in ("inquiry", "complaint", "suggestion")
        assert message["lang"] in ("zh", "en")
        assert message["urgent"] is False or message["class"] == "complaint"
        assert message["handle_time"] >= 1.0
        assert message["handle_time"] == round(message["handle_time"], 3)
        assert message.get("ignored_by", ["x"]) != []
        assert message["channel_type"] in agents[0]["capacity"] or scenario == "skills_split"
        seen = conversations.setdefault(
            message["conversation"], (message["lang"], message["channel_type"])
        )
        assert seen == (message["lang"], message["channel_type"])
    follow_ups = len(messages) - len(conversations)
    assert 0.05 * len(messages) < follow_ups < 0.15 * len(messages)


def test_unknown_scenario_names_the_known_ones() -> None:
    """Reject an unknown scenario with a message listing the real ones."""
    with pytest.raises(ValueError, match="steady_80") as info:
        generate("nope", 1)
    assert all(name in str(info.value) for name in SCENARIOS)


def test_rate_helpers_follow_the_formula() -> None:
    """Compute rate = utilisation * capacity / class-weighted mean handle time."""
    assert arrival_rate(0.8, 40, 300.0) == pytest.approx(0.8 * 40 / 300)
    assert mean_handle_time({"a": 0.6, "b": 0.4}, {"a": 100.0, "b": 200.0}) == pytest.approx(140)
    mix = {"inquiry": 0.6, "complaint": 0.3, "suggestion": 0.1}
    means = {"inquiry": 300.0, "complaint": 480.0, "suggestion": 180.0}
    assert mean_handle_time(mix, means) == pytest.approx(342.0)
    assert arrival_rate(0.65, 30 * 5, 342.0 * 1.5) == pytest.approx(0.65 * 150 / 513)


def test_steady_80_offers_eighty_percent_load() -> None:
    """Measure offered work / (agents x duration) over a long steady_80 run."""
    hours = 12.0
    lines = generate("steady_80", 11, hours=hours)
    agents = sum(1 for line in lines if line["type"] == "agent")
    assert agents == 40
    messages = messages_of(lines)
    assert {m["channel_type"] for m in messages} == {"chat"}
    offered = sum(m["handle_time"] for m in messages) / (agents * hours * 3600)
    assert offered == pytest.approx(0.8, rel=0.08)


def test_utilisation_and_agents_overrides_scale_the_load() -> None:
    """Halve the utilisation and the offered load halves; wide agent ids above 99."""
    lines = generate("steady_80", 5, hours=12.0, utilisation=0.4)
    offered = sum(m["handle_time"] for m in messages_of(lines)) / (40 * 12 * 3600)
    assert offered == pytest.approx(0.4, rel=0.08)
    many = generate("steady_80", 5, hours=0.1, agents=120)
    ids = [line["id"] for line in many if line["type"] == "agent"]
    assert ids[0] == "a001" and ids[-1] == "a120"


def test_peak_burst_doubles_the_rate_in_its_window() -> None:
    """Count about twice as many arrivals per second inside 5400-7200 s."""
    messages = messages_of(generate("peak_burst", 2, hours=3.0))
    before = sum(1 for m in messages if 3600 <= m["t"] < 5400)
    burst = sum(1 for m in messages if 5400 <= m["t"] < 7200)
    assert 1.7 < burst / before < 2.3


def test_shift_change_sends_every_third_agent_off_line_at_half_time() -> None:
    """Emit one presence off line per third agent at hours/2 and nothing else."""
    lines = generate("shift_change", 4, hours=2.0)
    presence = [line for line in lines if line["type"] == "presence"]
    assert [p["agent"] for p in presence] == [f"a{i:02d}" for i in range(3, 37, 3)]
    assert all(p["t"] == 3600.0 and p["online"] is False for p in presence)


def test_no_answer_ignored_by_lists_only_the_unreliable_five() -> None:
    """Put only a01-a05 in ignored_by, each about 30 % of the time."""
    messages = messages_of(generate("no_answer", 6, hours=1.0))
    unreliable = {"a01", "a02", "a03", "a04", "a05"}
    per_agent: dict[str, int] = defaultdict(int)
    for message in messages:
        for agent in message.get("ignored_by", []):
            assert agent in unreliable
            per_agent[agent] += 1
    assert set(per_agent) == unreliable
    for count in per_agent.values():
        assert 0.25 < count / len(messages) < 0.35


def test_skills_split_loads_each_group_apart() -> None:
    """Offer ~0.80 of the specialists' and ~0.75 of each language's generalist capacity."""
    hours = 12.0
    lines = generate("skills_split", 9, hours=hours)
    agents = [line for line in lines if line["type"] == "agent"]
    assert [a["skills"] for a in agents[:8]] == [["complaint", "inquiry"]] * 8
    assert [a["languages"] for a in agents[8:]] == [["zh"]] * 12 + [["en"]] * 12
    seconds = hours * 3600
    # Load counts busy slot-seconds: each agent has 2 chat + 4 email slots.
    work: dict[str, float] = defaultdict(float)
    for m in messages_of(lines):
        group = "complaint" if m["class"] == "complaint" else m["lang"]
        work[group] += m["handle_time"]
    assert work["complaint"] / (8 * 6 * seconds) == pytest.approx(0.80, rel=0.08)
    assert work["zh"] / (12 * 6 * seconds) == pytest.approx(0.75, rel=0.08)
    assert work["en"] / (12 * 6 * seconds) == pytest.approx(0.75, rel=0.08)


def test_write_trace_round_trips_through_load_jsonl(tmp_path: Path) -> None:
    """Write compact JSON lines to a path and to a file object; read them back."""
    lines = generate("overload_110", 1, hours=0.2)
    path = tmp_path / "trace.jsonl"
    write_trace(lines, path)
    assert load_jsonl(path) == lines
    assert ", " not in path.read_text(encoding="utf-8").splitlines()[0]
    other = tmp_path / "other.jsonl"
    with other.open("w", encoding="utf-8") as handle:
        write_trace(lines, handle)
    assert other.read_text(encoding="utf-8") == path.read_text(encoding="utf-8")


def test_load_jsonl_names_the_bad_line(tmp_path: Path) -> None:
    """Report the line number of malformed JSON."""
    path = tmp_path / "bad.jsonl"
    path.write_text('{"t": 0}\n\n{nope\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 3"):
        load_jsonl(path)


# --- checker: hand-written run --------------------------------------------------------

CONFIG: Line = {
    "type": "config",
    "t": 0,
    # inquiry SLA lowered to 30 s so one inquiry misses it.
    "sla": {"complaint": 120, "complaint_urgent": 30, "inquiry": 30, "suggestion": 3600},
    "accept_timeout": 60,
    "complaint_streak_limit": 3,
}


def agent(agent_id: str, skills: list[str], languages: list[str], capacity: dict[str, int]) -> Line:
    """Build an on-line agent line at t=0."""
    return {
        "type": "agent",
        "t": 0,
        "id": agent_id,
        "skills": skills,
        "languages": languages,
        "capacity": capacity,
        "online": True,
    }


def message(
    message_id: str,
    t: float,
    cls: str,
    lang: str,
    channel: str,
    handle: float,
    urgent: bool = False,
) -> Line:
    """Build a message line in its own conversation."""
    return {
        "type": "message",
        "t": t,
        "id": message_id,
        "class": cls,
        "urgent": urgent,
        "channel_type": channel,
        "lang": lang,
        "conversation": "c" + message_id,
        "handle_time": handle,
    }


def ev(t: float, kind: str, message_id: str, agent_id: str) -> Line:
    """Build an assignment-file event."""
    return {"t": t, "event": kind, "message": message_id, "agent": agent_id}


def base_trace() -> list[Line]:
    """Return a 2-agent, 4-message trace."""
    return [
        CONFIG,
        agent("a01", ["inquiry", "complaint"], ["zh", "en"], {"chat": 2}),
        agent("a02", ["inquiry", "complaint", "suggestion"], ["en"], {"chat": 1, "email": 1}),
        message("m1", 0, "inquiry", "zh", "chat", 400),
        message("m2", 10, "complaint", "en", "chat", 50),
        message("m3", 20, "suggestion", "en", "email", 30),
        message("m4", 30, "inquiry", "zh", "chat", 100),
        {"type": "end", "t": 40},
    ]


def base_events() -> list[Line]:
    """Return a clean run of base_trace: a01 lets m2 time out, a02 takes it."""
    return [
        ev(0, "assigned", "m1", "a01"),
        ev(0, "accepted", "m1", "a01"),
        ev(10, "assigned", "m2", "a01"),
        ev(20, "assigned", "m3", "a02"),
        ev(20, "accepted", "m3", "a02"),
        ev(50, "completed", "m3", "a02"),
        ev(70, "timeout", "m2", "a01"),
        ev(70, "assigned", "m2", "a02"),
        ev(70, "accepted", "m2", "a02"),
        ev(70, "assigned", "m4", "a01"),
        ev(70, "accepted", "m4", "a01"),
        ev(120, "completed", "m2", "a02"),
        ev(170, "completed", "m4", "a01"),
        ev(400, "completed", "m1", "a01"),
    ]


def by_time(events: list[Line]) -> list[Line]:
    """Sort events by t, keeping file order for ties."""
    return sorted(events, key=lambda e: e["t"])


COUNTERS = (*INVARIANT_COUNTERS, "reoffered_after_timeout", "complaint_streak_violations")


def nonzero(summary: dict[str, Any]) -> set[str]:
    """Return the violation counters that are not zero."""
    return {name for name in COUNTERS if summary[name] != 0}


def test_clean_run_has_exact_figures(tmp_path: Path) -> None:
    """Check every figure of the hand-computed clean run, read back from files."""
    trace_path, events_path = tmp_path / "trace.jsonl", tmp_path / "out.jsonl"
    write_trace(base_trace(), trace_path)
    write_trace(base_events(), events_path)
    summary = analyse(load_jsonl(trace_path), load_jsonl(events_path))

    assert nonzero(summary) == set()
    assert check(summary) == []
    assert summary["violations"] == []
    assert summary["messages"] == 4
    assert summary["assignments"] == 5
    assert summary["timeouts"] == 1
    assert summary["returned"] == 0
    assert summary["longest_complaint_streak"] == 1
    # Waits: m1 0, m2 60 (timed out on a01), m3 0, m4 40.
    assert summary["classes"] == {
        "inquiry": {
            "count": 2,
            "mean_wait": 20.0,
            "p50_wait": 0.0,
            "p95_wait": 40.0,
            "max_wait": 40.0,
            "sla": 30,
            "sla_attainment": 0.5,
        },
        "complaint": {
            "count": 1,
            "mean_wait": 60.0,
            "p50_wait": 60.0,
            "p95_wait": 60.0,
            "max_wait": 60.0,
            "sla": 120,
            "sla_attainment": 1.0,
        },
        "suggestion": {
            "count": 1,
            "mean_wait": 0.0,
            "p50_wait": 0.0,
            "p95_wait": 0.0,
            "max_wait": 0.0,
            "sla": 3600,
            "sla_attainment": 1.0,
        },
    }
    assert summary["overall"] == {
        "count": 4,
        "mean_wait": 25.0,
        "p50_wait": 0.0,
        "p95_wait": 60.0,
        "max_wait": 60.0,
    }
    # On line 0-400 s with 2 slots each: a01 worked 400 + 100 s, a02 30 + 50 s.
    assert summary["utilisation"] == pytest.approx({"a01": 500 / 800, "a02": 80 / 800})
    # Gini of (0.1, 0.625) = sum|xi - xj| / (2 n^2 mean) = 2 * 0.525 / (2 * 4 * 0.3625).
    assert summary["utilisation_gini"] == pytest.approx(0.525 / 1.45)


def test_urgent_complaint_uses_its_own_target() -> None:
    """Put an urgent complaint under complaint_urgent with the 30 s target."""
    trace = base_trace()
    trace[4] = {**trace[4], "urgent": True}
    summary = analyse(trace, base_events())
    assert "complaint" not in summary["classes"]
    urgent = summary["classes"]["complaint_urgent"]
    assert urgent["count"] == 1 and urgent["sla"] == 30 and urgent["sla_attainment"] == 0.0


def test_helpers_nearest_rank_and_gini() -> None:
    """Check the percentile and Gini helpers on known values."""
    values = [float(v) for v in range(1, 21)]
    assert nearest_rank(values, 50) == 10.0
    assert nearest_rank(values, 95) == 19.0
    assert nearest_rank([5.0], 95) == 5.0
    assert gini([1.0, 1.0, 1.0]) == 0.0
    assert gini([0.0, 0.0]) == 0.0
    assert gini([3.0]) == 0.0
    assert gini([0.0, 0.0, 0.0, 1.0]) == pytest.approx(0.75)


def test_over_capacity_is_counted() -> None:
    """Give a01 one chat slot: its second concurrent chat is over capacity."""
    trace = base_trace()
    trace[1] = agent("a01", ["inquiry", "complaint"], ["zh", "en"], {"chat": 1})
    summary = analyse(trace, base_events())
    assert nonzero(summary) == {"capacity_violations"}
    # m2 at t=10 and m4 at t=70 both land on a01 while it works on m1.
    assert summary["capacity_violations"] == 2
    assert check(summary) == ["capacity_violations: 2 (must be 0)"]


def test_wrong_skill_is_counted() -> None:
    """Make m4 a suggestion, which a01 cannot take."""
    trace = base_trace()
    trace[6] = {**trace[6], "class": "suggestion"}
    summary = analyse(trace, base_events())
    assert nonzero(summary) == {"skill_violations"}
    assert summary["skill_violations"] == 1
    assert any("skill_violations" in line for line in check(summary))


def test_wrong_language_is_counted() -> None:
    """Make m2 Chinese: a02 speaks only English."""
    trace = base_trace()
    trace[4] = {**trace[4], "lang": "zh"}
    summary = analyse(trace, base_events())
    assert nonzero(summary) == {"language_violations"}
    assert summary["language_violations"] == 1


def test_wrong_channel_is_counted() -> None:
    """Send m4 by email: a01 has no email capacity."""
    trace = base_trace()
    trace[6] = {**trace[6], "channel_type": "email"}
    summary = analyse(trace, base_events())
    assert nonzero(summary) == {"channel_violations"}


def test_offline_agent_is_counted() -> None:
    """Take a02 off line at t=60: the assignment and acceptance of m2 at 70 are both bad."""
    trace = base_trace()
    trace.insert(7, {"type": "presence", "t": 60, "agent": "a02", "online": False})
    summary = analyse(trace, base_events())
    assert nonzero(summary) == {"offline_violations"}
    assert summary["offline_violations"] == 2
    # a02 was on line 60 s of the 400 s.
    assert summary["utilisation"]["a02"] == pytest.approx(80 / 120)


def test_presence_applies_before_events_of_the_same_time() -> None:
    """Take a02 off line exactly at t=70: the events at t=70 already see it off line."""
    trace = base_trace()
    trace.insert(7, {"type": "presence", "t": 70, "agent": "a02", "online": False})
    assert analyse(trace, base_events())["offline_violations"] == 2


def test_agent_declared_later_is_off_line_until_then() -> None:
    """Declare a02 only at t=80: work given to it at 20 and 70 was off line."""
    trace = base_trace()
    trace[2] = {**trace[2], "t": 80}
    trace.insert(7, trace.pop(2))
    summary = analyse(by_time_trace(trace), base_events())
    assert nonzero(summary) == {"offline_violations"}
    assert summary["offline_violations"] == 4


def by_time_trace(trace: list[Line]) -> list[Line]:
    """Sort a trace by t, keeping file order for ties."""
    return sorted(trace, key=lambda line: line["t"])


def test_accepted_twice_is_counted() -> None:
    """Let a01 accept and finish m2, then a02 get and accept it again."""
    events = [e for e in base_events() if e["event"] != "timeout"]
    events += [ev(10, "accepted", "m2", "a01"), ev(60, "completed", "m2", "a01")]
    summary = analyse(base_trace(), by_time(events))
    assert nonzero(summary) == {"accepted_more_than_once"}
    assert summary["accepted_more_than_once"] == 1
    assert summary["classes"]["complaint"]["mean_wait"] == 0.0, "first acceptance counts"


def test_never_accepted_is_counted() -> None:
    """Let m4 time out on a01 and never be offered again."""
    events = [e for e in base_events() if e["message"] != "m4" or e["event"] == "assigned"]
    events.append(ev(130, "timeout", "m4", "a01"))
    summary = analyse(base_trace(), by_time(events))
    assert nonzero(summary) == {"never_accepted"}
    assert summary["never_accepted"] == 1
    assert summary["classes"]["inquiry"]["sla_attainment"] == 0.5
    assert summary["classes"]["inquiry"]["count"] == 2
    assert "never_accepted: m4" in summary["violations"]


def test_reassigned_after_timeout_is_counted_but_not_an_invariant() -> None:
    """Give m2 back to a01, which just timed out on it; m4 waits for a free slot."""
    events = [e for e in base_events() if e["message"] not in ("m2", "m4") or e["t"] < 70]
    events += [
        ev(70, "timeout", "m2", "a01"),
        ev(70, "assigned", "m2", "a01"),
        ev(70, "accepted", "m2", "a01"),
        ev(120, "completed", "m2", "a01"),
        ev(120, "assigned", "m4", "a01"),
        ev(120, "accepted", "m4", "a01"),
        ev(220, "completed", "m4", "a01"),
    ]
    summary = analyse(base_trace(), by_time(events))
    assert nonzero(summary) == {"reoffered_after_timeout"}
    assert check(summary) == []


def test_completion_mismatch_is_counted() -> None:
    """Complete m3 one second late."""
    events = base_events()
    events[5] = ev(51, "completed", "m3", "a02")
    summary = analyse(base_trace(), events)
    assert nonzero(summary) == {"completion_mismatches"}
    assert summary["completion_mismatches"] == 1


def test_unfinished_work_is_a_completion_mismatch() -> None:
    """Drop the completion of m1."""
    summary = analyse(base_trace(), base_events()[:-1])
    assert nonzero(summary) == {"completion_mismatches"}


def test_unknown_references_and_out_of_order_are_counted() -> None:
    """Accept without an assignment, name a ghost agent, and step back in time."""
    events = base_events()
    events.insert(1, ev(0, "accepted", "m1", "a09"))
    events.insert(2, ev(0, "timeout", "m3", "a02"))
    summary = analyse(base_trace(), events)
    assert nonzero(summary) == {"unknown_references"}
    assert summary["unknown_references"] == 2
    swapped = base_events()
    swapped[5], swapped[6] = swapped[6], swapped[5]
    assert "out_of_order" in nonzero(analyse(base_trace(), swapped))


def streak_run(other_busy: bool) -> dict[str, Any]:
    """Give a01 four complaints in a row while a02 is free or full."""
    trace: list[Line] = [
        CONFIG,
        agent("a01", ["complaint", "inquiry"], ["zh"], {"chat": 5}),
        agent("a02", ["complaint", "inquiry"], ["zh"], {"chat": 1}),
        message("m0", 0, "inquiry", "zh", "chat", 1000),
        *(message(f"m{i}", i, "complaint", "zh", "chat", 100) for i in range(1, 5)),
        {"type": "end", "t": 10},
    ]
    events: list[Line] = []
    if other_busy:
        events += [ev(0, "assigned", "m0", "a02"), ev(0, "accepted", "m0", "a02")]
    else:
        events += [ev(0, "assigned", "m0", "a01"), ev(0, "accepted", "m0", "a01")]
        # The inquiry resets a01's run, so the four complaints below still make 4.
    for i in range(1, 5):
        events += [ev(i, "assigned", f"m{i}", "a01"), ev(i, "accepted", f"m{i}", "a01")]
        events.append(ev(i + 100, "completed", f"m{i}", "a01"))
    events.append(ev(1000, "completed", "m0", "a02" if other_busy else "a01"))
    return analyse(trace, by_time(events))


def test_streak_violation_when_someone_else_had_room() -> None:
    """Count the fourth complaint in a row as a violation while a02 sat idle."""
    summary = streak_run(other_busy=False)
    assert summary["longest_complaint_streak"] == 4
    assert nonzero(summary) == {"complaint_streak_violations"}
    assert summary["complaint_streak_violations"] == 1
    assert check(summary) == []


def test_no_streak_violation_when_nobody_else_had_room() -> None:
    """Allow the fourth complaint in a row when a02's only slot is taken."""
    summary = streak_run(other_busy=True)
    assert summary["longest_complaint_streak"] == 4
    assert nonzero(summary) == set()


# --- checker: scale -------------------------------------------------------------------


def fcfs_events(trace: list[Line]) -> list[Line]:
    """Serve a single-chat-slot trace first come first served (an M/M/c queue)."""
    agents = [line["id"] for line in trace if line["type"] == "agent"]
    free: list[tuple[float, int, str]] = [(0.0, i, a) for i, a in enumerate(agents)]
    heapq.heapify(free)
    # (t, order at equal t: completions first, then assignment, then acceptance, seq)
    keyed: list[tuple[float, int, int, Line]] = []
    for seq, m in enumerate(line for line in trace if line["type"] == "message"):
        free_at, index, agent_id = heapq.heappop(free)
        start = max(free_at, m["t"])
        done = start + m["handle_time"]
        keyed.append((start, 1, seq, ev(start, "assigned", m["id"], agent_id)))
        keyed.append((start, 2, seq, ev(start, "accepted", m["id"], agent_id)))
        keyed.append((done, 0, seq, ev(done, "completed", m["id"], agent_id)))
        heapq.heappush(free, (done, index, agent_id))
    keyed.sort(key=lambda item: item[:3])
    return [item[3] for item in keyed]


def test_checker_handles_twenty_thousand_messages_quickly() -> None:
    """Analyse ~20,000 messages over 50 agents in a few seconds, with no violations."""
    trace = generate("steady_80", 12, hours=42.0, agents=50)
    assert len(messages_of(trace)) > 18_000
    events = fcfs_events(trace)
    started = time.perf_counter()
    summary = analyse(trace, events)
    elapsed = time.perf_counter() - started
    assert check(summary) == []
    assert summary["messages"] == len(messages_of(trace))
    assert 0.7 < sum(summary["utilisation"].values()) / 50 < 0.9
    assert elapsed < 5.0
