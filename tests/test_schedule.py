"""Unit tests for the load-aware scheduler engine (router/schedule.py).

Every test drives the engine directly: a hand-made roster, explicit `now` values
(the engine never reads a clock), and assertions on who got which message and why.
"""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime
from typing import Any

import pytest

from router import explain as explain_module
from router.codec import dumps
from router.explain import HANDED_ON, OFFER_LAPSED, TRANSFERRED, render, stored_form
from router.model import LABELS, Agent, Shift
from router.schedule import Decision, OverflowStep, Policy, Returned, Scheduler, Work

# --- factories ------------------------------------------------------------------------


def agent(
    agent_id: str,
    capacity: int = 2,
    *,
    caps: dict[str, int] | None = None,
    classes: tuple[str, ...] = (),
    languages: tuple[str, ...] = (),
    queues: tuple[str, ...] = ("default",),
    supervisor: bool = False,
    shifts: tuple[Shift, ...] = (),
    present: bool = True,
) -> Agent:
    """Return a roster agent; `caps` is the per-channel-type table (empty: one pool)."""
    return Agent(
        id=agent_id,
        name=agent_id,
        capacity=capacity,
        tool="test",
        queues=frozenset(queues),
        present=present,
        capacities=dict(caps or {}),
        classes=frozenset(classes),
        languages=frozenset(languages),
        supervisor=supervisor,
        shifts=shifts,
    )


def work(
    message_id: str,
    *,
    slot: str | None = None,
    conversation: str | None = None,
    label: str = "inquiry",
    severity: str = "P3",
    ct: str = "chat",
    language: str = "en",
    department: str = "default",
    arrival: float = 0.0,
    sla: float = 1000.0,
    deadline: float | None = None,
) -> Work:
    """Return a message; simulator-style (slot = message id) unless `slot` is given."""
    return Work(
        id=message_id,
        slot=slot or message_id,
        conversation=conversation or message_id,
        label=label,
        severity=severity,
        channel_type=ct,
        language=language,
        department=department,
        arrival=arrival,
        deadline=arrival + sla if deadline is None else deadline,
    )


def sched(*agents: Agent, explain: bool = False, **knobs: object) -> Scheduler:
    """Return a scheduler; accept tracking and the urgent reserve off unless asked for."""
    knobs.setdefault("accept_timeout", 0.0)
    knobs.setdefault("urgent_reserve", 0)
    return Scheduler(agents, Policy(**knobs), explain=explain)  # type: ignore[arg-type]


def run(s: Scheduler, now: float, *works: Work) -> dict[str, str]:
    """Submit the works, tick and dispatch at `now`; return message id -> agent id."""
    for w in works:
        s.submit(w)
    s.tick(now)
    return {d.work.id: d.agent_id for d in s.dispatch(now)}


def verdicts_of(record: Any) -> dict[str, str]:
    """Return each listed agent's verdict in an explain record (as decided or as stored)."""
    assert record is not None
    return {c["agent"]: c["verdict"] for c in record["candidates"]}


def decide(s: Scheduler, now: float, *works: Work) -> list[Decision]:
    """Submit the works and dispatch at `now`; return the decisions."""
    for w in works:
        s.submit(w)
    s.tick(now)
    return s.dispatch(now)


def waiting_ids(s: Scheduler) -> list[str]:
    """Return the ids of waiting messages in serving order."""
    return [w.id for w in s.waiting()]


def utc(day: int, hour: int, minute: int = 0, second: int = 0) -> float:
    """Return the Unix time of a January 2024 UTC time (2024-01-01 is a Monday)."""
    return datetime(2024, 1, day, hour, minute, second, tzinfo=UTC).timestamp()


# --- 1. capacity per channel type -----------------------------------------------------


def test_per_type_capacity_limits_each_channel_type_separately() -> None:
    s = sched(agent("a", caps={"chat": 1, "email": 2}))
    got = run(
        s,
        0,
        work("c1"),
        work("c2"),
        work("e1", ct="email"),
        work("e2", ct="email"),
        work("e3", ct="email"),
    )
    assert got == {"c1": "a", "e1": "a", "e2": "a"}
    state = s.states["a"]
    assert state.used == {"chat": 1, "email": 2}
    assert state.room("chat") == 0 and state.room("email") == 0
    assert sorted(waiting_ids(s)) == ["c2", "e3"]
    # A channel type missing from the table is one the agent does not take.
    assert run(s, 1, work("s1", ct="sms")) == {}
    assert s.release("c1") == "a"
    assert state.used["chat"] == 0
    assert run(s, 2) == {"c2": "a"}
    assert run(s, 3) == {}
    assert s.release("e1") == "a"
    assert run(s, 4) == {"e3": "a"}
    assert s.load == {"a": 3}


def test_agent_without_table_shares_one_pool_across_channel_types() -> None:
    s = sched(agent("p", capacity=2))
    got = run(s, 0, work("c1"), work("e1", ct="email"), work("c2"), work("s1", ct="sms"))
    assert got == {"c1": "p", "e1": "p"}
    assert s.states["p"].used == {"*": 2}
    assert s.states["p"].room("sms") == 0
    assert sorted(waiting_ids(s)) == ["c2", "s1"]
    assert s.release("e1") == "p"
    # One slot freed: the waiting chat (earlier in line) takes it, the sms still waits.
    assert run(s, 1) == {"c2": "p"}
    assert waiting_ids(s) == ["s1"]
    assert s.release("nonexistent") is None
    assert s.load == {"p": 2}


# --- 2. priority ----------------------------------------------------------------------


def test_urgent_first_then_earliest_deadline() -> None:
    s = sched(agent("a", capacity=1))
    s.submit(work("hold"))
    assert s.dispatch(0) and s.load["a"] == 1
    s.submit(work("p3-late", arrival=1, deadline=500))
    s.submit(work("p3-early", arrival=2, deadline=300))
    s.submit(work("p3-mid", arrival=3, deadline=400))
    s.submit(work("p1", severity="P1", arrival=4, deadline=900))
    assert waiting_ids(s) == ["p1", "p3-early", "p3-mid", "p3-late"]
    served = []
    slot = "hold"
    for t in range(10, 15):
        s.release(slot)
        got = run(s, t)
        assert len(got) <= 1
        if not got:
            break
        slot = next(iter(got))
        served.append(slot)
    assert served == ["p1", "p3-early", "p3-mid", "p3-late"]


def test_urgent_message_of_another_class_goes_ahead_of_earlier_deadlines() -> None:
    s = sched(agent("a", capacity=1))
    s.submit(work("hold"))
    s.dispatch(0)
    s.submit(work("inq", label="inquiry", arrival=1, deadline=50))
    s.submit(work("sugg", label="suggestion", arrival=2, deadline=40))
    s.submit(work("p0", label="complaint", severity="P0", arrival=3, deadline=5000))
    s.release("hold")
    assert run(s, 4) == {"p0": "a"}
    s.release("p0")
    assert run(s, 5) == {"sugg": "a"}


# --- 3. eligibility -------------------------------------------------------------------


def test_class_skills_decide_who_takes_a_label() -> None:
    s = sched(
        agent("cx", classes=("complaint",)),
        agent("iq", classes=("inquiry",)),
    )
    got = run(
        s,
        0,
        work("c1", label="complaint"),
        work("i1", label="inquiry"),
        work("s1", label="suggestion"),
    )
    assert got == {"c1": "cx", "i1": "iq"}
    assert waiting_ids(s) == ["s1"]


def test_languages_and_unknown_language_means_any() -> None:
    s = sched(
        agent("en", capacity=1, languages=("en",)),
        agent("zh", capacity=1, languages=("zh",)),
    )
    assert run(s, 0, work("m-zh", language="zh")) == {"m-zh": "zh"}
    # zh is full now; another zh message waits though "en" has room.
    assert run(s, 1, work("m-zh2", language="zh")) == {}
    assert waiting_ids(s) == ["m-zh2"]
    # Nobody speaks French: it counts as "any" language, so "en" takes it.
    assert run(s, 2, work("m-fr", language="fr")) == {"m-fr": "en"}


def test_departments_and_skill_less_agents() -> None:
    s = sched(
        agent("bill", capacity=1, queues=("billing",)),
        agent("any", capacity=3),
    )
    got = run(
        s,
        0,
        work("b1", department="billing"),
        work("b2", department="billing"),
        work("d1", label="complaint", language="zh"),
        work("d2", label="suggestion", ct="email", language="de"),
    )
    # The skill-less agent takes any class, language and channel type of its department.
    assert got == {"b1": "bill", "d1": "any", "d2": "any"}
    # Billing work waits for a billing agent although "any" has room.
    assert waiting_ids(s) == ["b2"]
    assert s.states["any"].room("chat") == 1
    assert s.queue_depths() == {"billing": 1}


# --- 4. sticky ------------------------------------------------------------------------


def test_follow_up_sticks_to_the_agent_holding_its_conversation() -> None:
    s = sched(agent("a", capacity=4, present=False), agent("b", capacity=3))
    assert run(s, 0, work("m1", conversation="c1"), work("y1", conversation="cy")) == {
        "m1": "b",
        "y1": "b",
    }
    s.set_presence("a", True, 1)
    (d,) = decide(s, 2, work("m2", conversation="c1"))
    # "a" has all its room, "b" a third: the conversation still wins.
    assert (d.agent_id, d.rule, d.new_slot) == ("b", "sticky", True)
    assert s.load == {"a": 0, "b": 3}
    s.release("m1")
    s.release("m2")
    # The conversation is closed at "b": a follow-up is routed on its merits.
    (d,) = decide(s, 3, work("m3", conversation="c1"))
    assert (d.agent_id, d.rule) == ("a", "balance")


def test_daemon_slot_follow_up_joins_without_growing_the_load() -> None:
    s = sched(agent("a", capacity=1), agent("b", capacity=5))
    s.set_presence("b", False, 0)
    (first,) = decide(s, 0, work("m1", slot="c1", conversation="c1"))
    assert first.agent_id == "a" and first.new_slot
    s.set_presence("b", True, 1)
    # "a" is full, but the follow-up joins its open conversation's slot.
    (d,) = decide(s, 2, work("m2", slot="c1", conversation="c1"))
    assert (d.agent_id, d.rule, d.new_slot) == ("a", "sticky", False)
    assert s.load == {"a": 1, "b": 0}
    assert s.holder == {"c1": "a"}
    assert d.work.state == "held"
    assert s.waiting_count() == 0


def test_undo_of_a_takeover_gives_the_slot_back_to_the_absent_holder() -> None:
    s = sched(agent("a", capacity=2), agent("b", capacity=2, present=False))
    (first,) = decide(s, 0, work("m1", slot="c1", conversation="c1"))
    assert first.agent_id == "a"
    s.set_presence("b", True, 1)
    s.set_presence("a", False, 2)
    (d,) = decide(s, 3, work("m2", slot="c1", conversation="c1"))
    assert (d.agent_id, d.new_slot, d.previous) == ("b", True, ("a", "chat"))
    assert s.holder == {"c1": "b"}
    assert s.load == {"a": 0, "b": 1}
    s.undo(d, requeue=False)
    assert s.holder == {"c1": "a"}
    assert s.load == {"a": 1, "b": 0}
    assert s.waiting_count() == 0
    assert d.work.state == "new"


def test_undo_with_requeue_puts_the_work_back_in_line() -> None:
    s = sched(agent("a", capacity=1))
    (d,) = decide(s, 0, work("m1"))
    s.undo(d)
    assert s.load == {"a": 0}
    assert waiting_ids(s) == ["m1"]
    assert run(s, 1) == {"m1": "a"}


# --- 5. balance -----------------------------------------------------------------------


def test_balance_alternates_by_spare_capacity_then_time_since_last_assignment() -> None:
    s = sched(agent("a", capacity=2), agent("b", capacity=2))
    order = []
    for t in range(1, 5):
        (d,) = decide(s, t, work(f"m{t}"))
        assert d.rule == "balance"
        order.append(d.agent_id)
    # Ties go to the agent assigned longest ago (never yet: the id breaks the tie).
    assert order == ["b", "a", "b", "a"]
    assert s.load == {"a": 2, "b": 2}


def test_balance_goes_to_the_agent_assigned_longest_ago() -> None:
    s = sched(agent("a", capacity=2), agent("b", capacity=2))
    order = []
    for t in range(1, 5):
        (d,) = decide(s, t, work(f"m{t}"))
        order.append(d.agent_id)
        s.release(f"m{t}")  # equal spare capacity every time
    assert order == ["b", "a", "b", "a"]


def test_balance_uses_the_spare_fraction_not_the_free_count() -> None:
    s = sched(agent("big", capacity=4), agent("small", capacity=1, present=False))
    assert run(s, 0, work("x1"), work("x2")) == {"x1": "big", "x2": "big"}
    s.set_presence("small", True, 1)
    # big: 2 of 4 free (0.5), small: 1 of 1 (1.0).
    assert run(s, 2, work("m")) == {"m": "small"}


# --- 6. rotation ----------------------------------------------------------------------


def test_rotation_after_the_complaint_streak_limit() -> None:
    s = sched(
        agent("a", capacity=4, present=False), agent("b", capacity=4), complaint_streak_limit=2
    )
    assert run(s, 0, work("i1"), work("i2"), work("i3")) == {"i1": "b", "i2": "b", "i3": "b"}
    s.set_presence("a", True, 1)
    rules = []
    for t, mid in ((2, "c1"), (3, "c2"), (4, "c3")):
        (d,) = decide(s, t, work(mid, label="complaint"))
        rules.append((d.agent_id, d.rule))
    # Balance alone would give c3 to "a" too (2 of 4 free against 1 of 4).
    assert rules == [("a", "balance"), ("a", "balance"), ("b", "rotation")]
    assert s.states["a"].streak == 2
    assert s.states["b"].streak == 1


def test_rotation_gives_way_when_nobody_else_has_room() -> None:
    s = sched(
        agent("a", capacity=4, present=False), agent("b", capacity=4), complaint_streak_limit=2
    )
    assert len(run(s, 0, *(work(f"i{n}") for n in range(4)))) == 4
    s.set_presence("a", True, 1)
    got = [decide(s, t, work(f"c{t}", label="complaint"))[0] for t in (2, 3, 4)]
    assert [(d.agent_id, d.rule) for d in got] == [("a", "balance")] * 3
    assert s.states["a"].streak == 3
    # Other work resets the streak.
    assert run(s, 5, work("i-after")) == {"i-after": "a"}
    assert s.states["a"].streak == 0


# --- 7. accept timeout ----------------------------------------------------------------


def test_offer_times_out_and_never_goes_back_to_the_same_agent() -> None:
    s = sched(agent("a", capacity=1), agent("b", capacity=1), accept_timeout=60)
    assert run(s, 0, work("m1")) == {"m1": "b"}
    assert s.next_wakeup() == 60
    assert run(s, 1, work("m2")) == {"m2": "a"}
    assert s.accept("m2", "b") is False  # not offered to b
    assert s.accept("m2", "a") is True
    assert s.accept("m2", "a") is False  # accepted already
    assert s.tick(59) == ([], [])
    returned, breached = s.tick(60)
    assert breached == []
    assert [(r.work.id, r.agent_id, r.why) for r in returned] == [("m1", "b", "timeout")]
    assert s.load == {"a": 1, "b": 0}
    assert returned[0].work.excluded == {"b"}
    assert returned[0].work.state == "waiting"
    # "b" is the only agent with room, and it let m1 time out: m1 waits.
    assert s.dispatch(60) == []
    assert waiting_ids(s) == ["m1"]
    s.release("m2")
    assert run(s, 61) == {"m1": "a"}
    assert s.offer_of("m1") is not None and s.offer_of("m1").agent_id == "a"


def test_accepting_before_the_timeout_keeps_the_work() -> None:
    s = sched(agent("a", capacity=1), accept_timeout=60)
    assert run(s, 0, work("m1")) == {"m1": "a"}
    assert s.next_wakeup() == 60
    assert s.accept("m1", "a")
    assert s.next_wakeup() is None
    assert s.tick(60) == ([], [])
    assert s.load == {"a": 1}
    assert s.offers() == []
    assert s.holder == {"m1": "a"}


def test_timed_out_agent_is_offered_other_work_last_for_a_while() -> None:
    s = sched(agent("a", capacity=2), agent("b", capacity=2), accept_timeout=60, unreliable_for=100)
    assert run(s, 0, work("m1")) == {"m1": "b"}
    assert run(s, 60) == {"m1": "a"}  # tick(60) took it back from b
    assert s.accept("m1", "a")
    # a: 1 of 2 free, b: 2 of 2; b let an offer time out at 60.
    (d,) = decide(s, 70, work("m2"))
    assert (d.agent_id, d.rule) == ("a", "reliability")
    assert s.accept("m2", "a")
    s.release("m2")
    (d,) = decide(s, 159, work("m3"))
    assert (d.agent_id, d.rule) == ("a", "reliability")
    assert s.accept("m3", "a")
    s.release("m3")
    (d,) = decide(s, 160, work("m4"))
    assert (d.agent_id, d.rule) == ("b", "balance")


def test_accept_timeout_zero_means_held_at_once() -> None:
    s = sched(agent("a", capacity=1), accept_timeout=0)
    (d,) = decide(s, 0, work("m1"))
    assert d.work.state == "held"
    assert s.offers() == []
    assert s.next_wakeup() is None


# --- 8. presence ----------------------------------------------------------------------


def test_going_off_line_returns_unaccepted_offers_only() -> None:
    s = sched(agent("a", capacity=2), agent("b", capacity=2, present=False), accept_timeout=60)
    assert run(s, 0, work("m1"), work("m2")) == {"m1": "a", "m2": "a"}
    assert s.accept("m1", "a")
    s.set_presence("b", True, 5)
    back = s.set_presence("a", False, 10)
    assert back == [Returned(back[0].work, "a", "returned")]
    assert back[0].work.id == "m2"
    assert back[0].work.excluded is None  # not a timeout: a may take it again later
    assert s.load == {"a": 1, "b": 0}  # accepted work stays counted
    assert [o.work.id for o in s.offers()] == []
    assert waiting_ids(s) == ["m2"]
    got = run(s, 11, work("m3"), work("m4"))
    assert got == {"m2": "b", "m3": "b"}
    assert waiting_ids(s) == ["m4"]  # "a" has room but is off line
    assert s.agents["a"].present is False
    s.set_presence("a", True, 20)
    assert run(s, 20) == {"m4": "a"}
    assert s.load == {"a": 2, "b": 2}


def test_set_presence_of_unknown_agent_raises() -> None:
    s = sched(agent("a"))
    with pytest.raises(KeyError):
        s.set_presence("ghost", False, 0)


# --- 9. shifts ------------------------------------------------------------------------


def gets_work(a: Agent, now: float) -> bool:
    """Tell whether a lone agent is given a message at `now`."""
    s = sched(a)
    return run(s, now, work("m", arrival=now)) == {"m": a.id}


DAY_SHIFT = Shift(days=frozenset(range(7)), start=9 * 60, end=17 * 60, tz="UTC")


def test_day_shift_gates_assignment() -> None:
    a = agent("a", shifts=(DAY_SHIFT,))
    assert gets_work(a, utc(1, 10))
    assert gets_work(a, utc(1, 9))
    assert gets_work(a, utc(1, 16, 59))
    assert not gets_work(a, utc(1, 17))
    assert not gets_work(a, utc(1, 20))
    assert not gets_work(a, utc(1, 8, 59))


def test_waiting_work_goes_out_when_the_shift_starts() -> None:
    s = sched(agent("a", shifts=(DAY_SHIFT,)))
    assert run(s, utc(1, 8), work("m", arrival=utc(1, 8))) == {}
    assert run(s, utc(1, 8, 59)) == {}
    assert run(s, utc(1, 9)) == {"m": "a"}


def test_shift_end_returns_unaccepted_work_to_someone_on_shift() -> None:
    s = sched(
        agent("a-day", shifts=(DAY_SHIFT,)),
        agent("b-late", shifts=(Shift(frozenset(range(7)), 16 * 60, 24 * 60, "UTC"),)),
        accept_timeout=600.0,
    )
    s.set_presence("b-late", False)
    assert run(s, utc(1, 16, 55), work("m", arrival=utc(1, 16, 55))) == {"m": "a-day"}
    s.set_presence("b-late", True, utc(1, 16, 56))
    assert run(s, utc(1, 16, 59)) == {}  # still a-day's, not accepted yet
    returned, _ = s.tick(utc(1, 17))
    assert [(r.work.id, r.agent_id, r.why) for r in returned] == [("m", "a-day", "returned")]
    assert run(s, utc(1, 17)) == {"m": "b-late"}
    # Accepted work is finished, shift or not: it is not taken back.
    s.accept("m", "b-late")
    assert s.tick(utc(2, 1))[0] == []


def test_overnight_shift_covers_both_sides_of_midnight() -> None:
    monday_night = Shift(days=frozenset({0}), start=22 * 60, end=6 * 60, tz="UTC")
    a = agent("a", shifts=(monday_night,))
    assert gets_work(a, utc(1, 23))  # Monday 23:00
    assert gets_work(a, utc(2, 5))  # Tuesday 05:00, still Monday's shift
    assert not gets_work(a, utc(2, 6))  # Tuesday 06:00
    assert not gets_work(a, utc(1, 5))  # Monday 05:00 would be Sunday's shift
    assert not gets_work(a, utc(2, 23))  # Tuesday night is not worked
    assert not gets_work(a, utc(1, 21, 59))


def test_shift_time_zone_moves_the_window() -> None:
    shanghai = Shift(days=frozenset(range(7)), start=9 * 60, end=17 * 60, tz="Asia/Shanghai")
    a = agent("a", shifts=(shanghai,))
    # 09:00-17:00 in Shanghai (UTC+8) is 01:00-09:00 UTC.
    assert gets_work(a, utc(1, 2))
    assert gets_work(a, utc(1, 1))
    assert not gets_work(a, utc(1, 10))
    assert not gets_work(a, utc(1, 9))
    assert not gets_work(a, utc(1, 0, 59))


def test_shift_contains_boundaries() -> None:
    assert DAY_SHIFT.contains(utc(1, 9))
    assert not DAY_SHIFT.contains(utc(1, 8, 59, 59))
    assert DAY_SHIFT.contains(utc(1, 16, 59, 59))
    assert not DAY_SHIFT.contains(utc(1, 17))
    weekdays = Shift(days=frozenset(range(5)), start=9 * 60, end=17 * 60)
    assert weekdays.contains(utc(5, 12))  # Friday
    assert not weekdays.contains(utc(6, 12))  # Saturday
    night = Shift(days=frozenset({6}), start=22 * 60, end=6 * 60)  # Sunday night
    assert night.contains(utc(7, 22))  # Sunday 22:00
    assert night.contains(utc(8, 5, 59))  # Monday 05:59 (wraps the week)
    assert not night.contains(utc(8, 6))
    assert not night.contains(utc(7, 21, 59))
    assert not night.contains(utc(7, 3))  # Sunday 03:00 belongs to Saturday


def test_any_of_several_shifts_counts() -> None:
    morning = Shift(days=frozenset(range(7)), start=6 * 60, end=10 * 60)
    evening = Shift(days=frozenset(range(7)), start=18 * 60, end=20 * 60)
    a = agent("a", shifts=(morning, evening))
    assert gets_work(a, utc(1, 7))
    assert gets_work(a, utc(1, 19))
    assert not gets_work(a, utc(1, 12))


# --- 10. deadlines and overflow -------------------------------------------------------

OVERFLOW = (OverflowStep(0, "departments"), OverflowStep(60, "supervisors"))


def test_deadline_breach_widens_to_other_departments() -> None:
    s = sched(
        agent("bill", capacity=1, queues=("billing",)),
        agent("gen", capacity=2, classes=("inquiry",)),
        overflow=OVERFLOW,
    )
    assert run(s, 0, work("busy", department="billing")) == {"busy": "bill"}
    w = work("b1", department="billing", arrival=0, deadline=100)
    assert run(s, 1, w) == {}
    assert s.next_wakeup() == 100
    assert s.tick(99) == ([], [])
    assert s.dispatch(99) == []
    returned, breached = s.tick(100)
    assert returned == [] and breached == [w]
    assert w.breached and w.level == 1
    (d,) = s.dispatch(100)
    assert (d.work, d.agent_id) == (w, "gen")
    assert w.state == "held"
    assert s.holder["b1"] == "gen"


def test_deadline_breach_reported_once_and_then_dispatched_to_other_department() -> None:
    s = sched(
        agent("bill", capacity=1, queues=("billing",)),
        agent("gen", capacity=2, classes=("inquiry",)),
        overflow=OVERFLOW,
    )
    run(s, 0, work("busy", department="billing"))
    w = work("b1", department="billing", arrival=0, deadline=100)
    s.submit(w)
    breaches = []
    for t in (50, 99):
        breaches += s.tick(t)[1]
        assert s.dispatch(t) == []
    breaches += s.tick(100)[1]
    (d,) = s.dispatch(100)
    assert d.agent_id == "gen"
    for t in (160, 500, 5000):
        breaches += s.tick(t)[1]
    assert breaches == [w]


def test_supervisor_takes_breached_work_after_the_second_step() -> None:
    s = sched(
        agent("bill", capacity=1, queues=("billing",)),
        agent("sup", capacity=1, queues=("ops",), classes=("complaint",), supervisor=True),
        agent("ops", capacity=1, queues=("ops",), classes=("complaint",)),
        overflow=OVERFLOW,
    )
    run(s, 0, work("busy", department="billing"))
    w = work("b1", department="billing", arrival=0, deadline=100)
    s.submit(w)
    breaches = []
    for t in (100, 159):
        breaches += s.tick(t)[1]
        # Other departments may take it now, but nobody there is skilled for inquiries.
        assert s.dispatch(t) == []
    assert w.level == 1
    assert s.next_wakeup() == 160
    breaches += s.tick(160)[1]
    assert w.level == 2
    (d,) = s.dispatch(160)
    assert d.agent_id == "sup"
    assert breaches == [w]


def test_languages_overflow_step() -> None:
    s = sched(
        agent("zh", capacity=1, languages=("zh",)),
        agent("en", capacity=1, languages=("en",)),
        overflow=(OverflowStep(30, "languages"),),
    )
    run(s, 0, work("busy", language="zh"))
    w = work("z1", language="zh", arrival=0, deadline=100)
    s.submit(w)
    assert s.tick(100)[1] == [w]
    assert s.dispatch(100) == []
    assert run(s, 129) == {}
    assert run(s, 130) == {"z1": "en"}


def test_overflow_continues_after_a_breached_offer_comes_back() -> None:
    s = sched(
        agent("x", capacity=1, queues=("sales",)),
        agent("sup", capacity=1, queues=("ops",), classes=("complaint",), supervisor=True),
        accept_timeout=120,
        overflow=OVERFLOW,
    )
    w = work("b1", department="billing", arrival=0, deadline=100)
    s.submit(w)
    assert s.tick(100)[1] == [w]
    (d,) = s.dispatch(100)
    assert d.agent_id == "x"  # other departments (level 1)
    s.tick(160)  # the supervisors step is due while the message is offered
    back = s.set_presence("x", False, 170)
    assert [r.work.id for r in back] == ["b1"]
    s.tick(500)
    assert w.level == 2
    assert run(s, 500) == {"b1": "sup"}


# --- 11. scarce skills and reserves ----------------------------------------------------


def reserve_roster(capacity: int = 1) -> tuple[Agent, ...]:
    return (
        agent("s1", capacity=capacity, classes=("complaint", "inquiry")),
        agent("s2", capacity=capacity, classes=("complaint", "inquiry")),
        agent("g1", capacity=capacity, classes=("inquiry",)),
    )


def observe(
    s: Scheduler, label: str, count: int, until: float, *, severity: str = "P3", sla: float = 120
) -> None:
    """Let `count` messages of a class arrive before `until`, then go (withdrawn).

    Gives the scheduler an observed arrival rate for the class without load or
    completions (hold times stay at the policy's `default_hold`).
    """
    for i in range(count):
        at = until - (count - i) * (until / (count + 1))
        seen = f"seen-{label}-{severity}-{i}"
        s.submit(work(seen, label=label, severity=severity, arrival=at, sla=sla))
        s.withdraw(seen)


def test_without_other_demand_an_inquiry_goes_by_balance() -> None:
    # Nobody has seen a complaint: keeping specialists free would be a fixed rule.
    s = sched(*reserve_roster(capacity=2), explain=True)
    s.hold("busy", "busy", "g1", "chat")
    (d,) = decide(s, 0, work("i1", sla=300))
    assert d.agent_id in {"s1", "s2"} and d.rule == "balance"


def test_an_inquiry_avoids_agents_whose_other_work_is_expected() -> None:
    # Complaints arrive steadily (only s1 and s2 can take them): an inquiry goes to the
    # generalist even though a specialist has more spare room.
    s = sched(*reserve_roster(capacity=2), explain=True)
    observe(s, "complaint", 40, until=1200)
    s.hold("busy", "busy", "g1", "chat")
    (d,) = decide(s, 1200, work("i1", arrival=1200, sla=300))
    assert (d.agent_id, d.rule) == ("g1", "scarcity")
    verdicts = verdicts_of(d.explain)
    assert verdicts["s1"].startswith("kept for scarce work: complaint")


def test_a_waiting_suggestion_keeps_its_only_agents_for_it() -> None:
    # Only g1 takes suggestions; one waits (no room) when an inquiry comes: the inquiry
    # goes to the specialist, so the suggestion gets g1's next slot.
    s = sched(
        agent("s1", capacity=2, classes=("complaint", "inquiry")),
        agent("g1", capacity=1, classes=("inquiry", "suggestion")),
    )
    s.hold("busy", "busy", "g1", "chat")
    s.submit(work("sg", label="suggestion", sla=3600))
    assert s.dispatch(0) == []
    s.release("busy")
    got = run(s, 1, work("i1", arrival=1, sla=300))
    assert got == {"i1": "s1", "sg": "g1"}


def test_reserve_size_follows_erlang_b_over_observed_rates() -> None:
    roster = [agent(f"s{i}", capacity=1, classes=("complaint",)) for i in range(10)]
    s = sched(*roster, reserve_risk=0.05, default_hold=300)
    observe(s, "complaint", 30, until=3600, severity="P1", sla=30)
    demand = next(d for d in s._demands.values() if d.urgent)
    rate = s.rate(demand, 3600)
    assert rate == pytest.approx(30 / 3600, rel=0.1)
    slots, load, gap = s.reserve(demand, 3600)
    # Ten slots, all busy: one frees every hold / (10 - 1) seconds.
    assert gap == pytest.approx(300 / 9)
    assert load == pytest.approx(rate * gap)
    # The least r with ErlangB(r, load) * P(no completion within 30 s) <= 5 %.
    late = math.exp(-30 / gap)
    blocked, expected = 1.0, 0
    while blocked * late > 0.05:
        expected += 1
        blocked = load * blocked / (expected + load * blocked)
    assert slots == expected == 2


def test_no_reserve_where_completions_come_well_within_the_deadline() -> None:
    # Forty agents: a slot frees every few seconds, a P1's 30 s are plenty.
    roster = [agent(f"a{i:02d}", capacity=1) for i in range(40)]
    s = sched(*roster, reserve_risk=0.05, default_hold=300)
    observe(s, "complaint", 60, until=3600, severity="P1", sla=30)
    demand = next(d for d in s._demands.values() if d.urgent)
    assert s.reserve(demand, 3600)[0] == 0


def reserved_specialists() -> Scheduler:
    """Two specialists, P1 complaints seen often: one slot is kept for them."""
    s = sched(*reserve_roster(), reserve_slack=0.5, reserve_risk=0.05, default_hold=600)
    observe(s, "complaint", 40, until=3600, severity="P1", sla=30)
    return s


def test_urgent_reserve_keeps_the_last_specialist_slot_for_p1() -> None:
    s = reserved_specialists()
    assert run(s, 3600, work("c1", label="complaint", arrival=3600, sla=120)) == {"c1": "s2"}
    # One specialist slot left: a non-urgent complaint leaves it free ...
    c2 = work("c2", label="complaint", arrival=3601, sla=120)
    assert run(s, 3601, c2) == {}
    why = s.why_waiting("c2")
    assert why is not None and why["rule"] == "reserve" and why["reserve"] == 1
    assert why["for"] == "P0/P1 complaint en chat" and why["until"] == 3661
    # ... for a P1 complaint, which takes it at once.
    (d,) = decide(s, 3602, work("p1", label="complaint", severity="P1", arrival=3602, sla=30))
    assert (d.work.id, d.agent_id) == ("p1", "s1")
    assert waiting_ids(s) == ["c2"]


def test_urgent_reserve_released_when_the_complaint_is_at_risk() -> None:
    # P1s are rare against how soon a slot comes back (a P1 every ~6 min, a slot frees
    # every 25 s): a slot is still kept, but a complaint at risk may have it.
    s = sched(*reserve_roster(), reserve_slack=0.5, reserve_risk=0.05, default_hold=25)
    observe(s, "complaint", 10, until=3600, severity="P1", sla=30)
    run(s, 3600, work("c1", label="complaint", arrival=3600, sla=120))
    assert run(s, 3601, work("c2", label="complaint", arrival=3601, sla=120)) == {}
    assert s.why_waiting("c2")["reserve"] == 1
    assert s.next_wakeup() == 3661
    assert run(s, 3660) == {}
    (d,) = decide(s, 3661)
    assert (d.work.id, d.agent_id, d.rule) == ("c2", "s1", "reserve-released")


def test_the_last_reserved_slot_stays_when_p1s_would_likely_need_it() -> None:
    s = reserved_specialists()
    run(s, 3600, work("c1", label="complaint", arrival=3600, sla=120))
    assert run(s, 3601, work("c2", label="complaint", arrival=3601, sla=120)) == {}
    assert run(s, 3661) == {}
    why = s.why_waiting("c2")
    assert why is not None and why["rule"] == "reserve" and why.get("last_slots")


def test_urgent_reserve_is_not_spent_on_a_complaint_past_its_deadline() -> None:
    s = reserved_specialists()
    run(s, 3600, work("c1", label="complaint", arrival=3600, sla=120))
    # Arrives already late (a restart, a slow channel): the reserved slot cannot save it.
    late = work("late", label="complaint", arrival=3400, sla=120)
    assert run(s, 3700, late) == {}
    assert s.why_waiting("late")["past_deadline"]
    # It is first in line for the next ordinary slot.
    s.release("c1")
    assert run(s, 3702).keys() == {"late"}


# --- 12. explain ----------------------------------------------------------------------


def test_explain_lists_a_verdict_per_agent() -> None:
    s = sched(
        agent("a-chosen", capacity=2, languages=("zh",)),
        agent("b-full", caps={"chat": 1}),
        agent("c-off", capacity=2, present=False),
        agent("d-skill", capacity=2, classes=("inquiry",)),
        agent("e-lang", capacity=2, languages=("en",)),
        agent("f-dept", capacity=2, queues=("billing",)),
        explain=True,
    )
    s.hold("busy", "busy", "b-full", "chat")
    (d,) = decide(s, 0, work("m", label="complaint", language="zh"))
    assert d.agent_id == "a-chosen"
    assert d.explain is not None
    assert d.explain["chosen"] == "a-chosen"
    assert d.explain["label"] == "complaint"
    verdicts = verdicts_of(d.explain)
    assert list(verdicts) == ["a-chosen", "b-full", "c-off", "d-skill", "e-lang", "f-dept"]
    assert verdicts["a-chosen"].startswith("chosen")
    assert "2 of 2 chat" in verdicts["a-chosen"]
    assert verdicts["b-full"] == "full: 1/1 chat"
    assert verdicts["c-off"] == "off line"
    assert verdicts["d-skill"] == "not skilled for complaint"
    assert verdicts["e-lang"] == "does not speak zh"
    assert verdicts["f-dept"] == "not in department default"


def test_explain_words_off_shift_no_slots_of_the_type_excluded_and_eligible() -> None:
    monday_nine_to_five = Shift(days=frozenset({0}), start=9 * 60, end=17 * 60)
    s = sched(
        agent("a", capacity=3),
        agent("e", capacity=2),
        agent("s", capacity=2, shifts=(monday_nine_to_five,)),  # t=0 is a Thursday
        agent("t", caps={"sms": 1}),
        agent("x", capacity=3),
        explain=True,
    )
    m = work("m")
    m.excluded = {"x"}
    (d,) = decide(s, 0, m)
    assert d.agent_id == "e" and d.explain is not None  # a tie: the later id wins
    verdicts = verdicts_of(d.explain)
    assert verdicts == {
        "a": "eligible, less spare room or assigned more recently (3/3 chat free)",
        "e": "chosen (2 of 2 chat slots free before)",
        "s": "off shift",
        "t": "takes no chat",
        "x": "let this message time out before",
    }


def test_explain_words_a_timed_out_offer_apart_from_a_hand_off() -> None:
    # Both keep the agent off the message alike; only the timeout is "let ... time out".
    s = sched(
        agent("a", capacity=2),
        agent("b", capacity=2),
        agent("h", capacity=2),
        accept_timeout=60,
        explain=True,
    )
    m = work("m")
    m.exclude("h", HANDED_ON)  # as a transfer to a queue leaves it (router/agent_work.py)
    (offer,) = decide(s, 0, m)
    assert offer.agent_id == "b"  # a tie: the later id wins; b lets it time out
    returned, _ = s.tick(60)
    assert [r.agent_id for r in returned] == ["b"]
    assert m.excluded == {"b", "h"}
    (again,) = s.dispatch(60)
    assert again.agent_id == "a" and again.explain is not None
    verdicts = verdicts_of(again.explain)
    assert verdicts == {
        "a": "chosen (2 of 2 chat slots free before)",
        "b": "let this message time out before",
        "h": "handed this ticket on",
    }
    # The store keeps the record compact, and it reads back the same.
    assert render(json.loads(dumps(stored_form(again.explain)))) == dict(again.explain)


def test_explain_words_every_reason_an_agent_was_kept_off() -> None:
    s = sched(
        agent("a", capacity=2),
        agent("f", capacity=2),
        agent("h", capacity=2),
        agent("s", capacity=2),
        agent("t", capacity=2),
        explain=True,
    )
    m = work("m")
    m.exclude("f", OFFER_LAPSED)
    m.exclude("h", HANDED_ON)
    m.exclude("s", TRANSFERRED)
    m.excluded = (m.excluded or set()) | {"t"}  # a timeout carries no reason
    (d,) = decide(s, 0, m)
    assert d.agent_id == "a" and d.explain is not None
    verdicts = verdicts_of(d.explain)
    assert verdicts == {
        "a": "chosen (2 of 2 chat slots free before)",
        "f": "let this conversation's offer time out before",
        "h": "handed this ticket on",
        "s": "had this ticket until a supervisor transferred it",
        "t": "let this message time out before",
    }


def test_a_compact_record_stored_before_exclusion_reasons_reads_as_it_did() -> None:
    # Version 1 records stored before "excluded_for" existed: every exclusion was worded
    # as a timeout, and still is.
    old = {
        "rule": "balance",
        "chosen": "e",
        "channel_type": "chat",
        "label": "inquiry",
        "language": "en",
        "department": "default",
        "overflow_level": 0,
        "compact": 1,
        "rows": [
            ["a", True, True, 3, 0, 3, 0, False, 0],
            ["e", True, True, 2, 0, 2, 0, False, 0],
            ["x", True, True, 3, 0, 3, 0, False, 0],
        ],
        "groups": [[True, "", ""]],
        "excluded": ["x"],
        "rotation_limit": 0,
        "others": {},
    }
    assert render(old) == {
        "rule": "balance",
        "chosen": "e",
        "channel_type": "chat",
        "label": "inquiry",
        "language": "en",
        "department": "default",
        "overflow_level": 0,
        "candidates": [
            {
                "agent": "a",
                "verdict": "eligible, less spare room or assigned more recently (3/3 chat free)",
            },
            {"agent": "e", "verdict": "chosen (2 of 2 chat slots free before)"},
            {"agent": "x", "verdict": "let this message time out before"},
        ],
        "others": {},
    }


def test_a_record_without_hand_offs_is_stored_as_before() -> None:
    # Only timeouts (or nobody) kept off: no new key, so older readers see the same form.
    s = sched(agent("a", capacity=2), agent("x", capacity=2), explain=True)
    m = work("m")
    m.excluded = {"x"}
    (d,) = decide(s, 0, m)
    assert d.explain is not None and "excluded_for" not in stored_form(d.explain)
    (d2,) = decide(s, 1, work("m2"))
    assert d2.explain is not None and "excluded_for" not in stored_form(d2.explain)


def test_explain_words_rotation_and_a_recent_timeout() -> None:
    s = sched(
        agent("a", capacity=3),
        agent("b", capacity=2),
        agent("c", capacity=2),
        complaint_streak_limit=1,
        accept_timeout=60,
        unreliable_for=100,
        explain=True,
    )
    (offer,) = decide(s, 0, work("m1"))
    assert offer.agent_id == "c"  # a tie: the later id wins; c lets it time out
    returned, _ = s.tick(60)
    assert [r.agent_id for r in returned] == ["c"]
    (again,) = s.dispatch(60)
    assert again.agent_id == "b" and s.accept("m1", "b")
    (complaint,) = decide(s, 61, work("m2", label="complaint"))
    assert complaint.agent_id == "a" and s.accept("m2", "a")  # a reaches the streak limit
    (d,) = decide(s, 62, work("m3", label="complaint"))
    assert d.agent_id == "b" and d.explain is not None
    verdicts = verdicts_of(d.explain)
    assert verdicts == {
        "a": "rotation: 1 complaints in a row",
        "b": "chosen (1 of 2 chat slots free before)",
        "c": "let an offer time out lately",
    }


def test_explain_verdicts_say_what_held_at_the_decision() -> None:
    # The record is worded when read: it must still say what held when the agent was
    # chosen, whatever happened to the roster since.
    s = sched(agent("a", capacity=2), agent("b", capacity=1), explain=True)
    s.hold("busy", "busy", "b", "chat")
    (d,) = decide(s, 0, work("m"))
    assert d.agent_id == "a" and d.explain is not None
    (later,) = decide(s, 1, work("m2"))  # a's last free slot
    assert later.agent_id == "a"
    s.set_presence("a", False)
    s.set_presence("b", False)
    verdicts = verdicts_of(d.explain)
    assert verdicts == {"a": "chosen (2 of 2 chat slots free before)", "b": "full: 1/1 chat"}


def test_a_stored_explain_record_reads_back_as_the_decision_showed_it() -> None:
    s = sched(
        agent("a-chosen", capacity=2, languages=("zh",)),
        agent("c-off", capacity=2, present=False),
        agent("d-skill", capacity=2, classes=("inquiry",)),
        explain=True,
    )
    (d,) = decide(s, 0, work("m", label="complaint", language="zh"))
    assert d.explain is not None
    stored = json.loads(dumps(stored_form(d.explain)))
    assert render(stored) == dict(d.explain)
    # A record stored in full, as before the compact form, reads back unchanged.
    full = json.loads(json.dumps(dict(d.explain)))
    assert render(full) == full


def test_storing_an_explain_record_does_not_word_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # The store asks whether a decision has a record and keeps its rows; wording the
    # verdicts is for whoever reads it (it cost as much as the store's own work).
    worded: list[object] = []
    real_render = explain_module.render
    monkeypatch.setattr(
        explain_module, "render", lambda record: worded.append(record) or real_render(record)
    )
    s = sched(agent("a", capacity=2), agent("b", capacity=2), explain=True)
    (d,) = decide(s, 0, work("m"))
    assert d.explain
    dumps(stored_form(d.explain))
    assert worded == []
    assert d.explain["chosen"] == d.agent_id
    assert len(worded) == 1


def test_explain_off_records_nothing() -> None:
    s = sched(agent("a"))
    (d,) = decide(s, 0, work("m"))
    assert d.explain is None


def test_explain_full_verdict_of_a_pooled_agent_counts_its_slots() -> None:
    s = sched(agent("a", capacity=2), agent("p", capacity=1), explain=True)
    s.hold("busy", "busy", "p", "chat")
    (d,) = decide(s, 0, work("m"))
    verdicts = verdicts_of(d.explain)
    assert verdicts["p"] == "full: 1/1 chat"


# --- capacity table with a "*" entry ----------------------------------------------------


def test_star_entry_of_a_capacity_table_covers_other_channel_types() -> None:
    s = sched(agent("a", caps={"chat": 1, "*": 1}), agent("c", caps={"sms": 1}))
    assert s.states["a"].room("sms") == 1
    got = run(s, 0, work("s1", ct="sms"), work("s2", ct="sms"))
    assert sorted(got.values()) == ["a", "c"]


def test_star_entry_still_counts_after_a_presence_change() -> None:
    s = sched(agent("a", caps={"chat": 1, "*": 1}), agent("c", caps={"sms": 1}))
    s.set_presence("c", False, 0)
    s.set_presence("c", True, 1)
    got = run(s, 2, work("s1", ct="sms"), work("s2", ct="sms"), work("s3", ct="sms"))
    assert sorted(got.values()) == ["a", "c"]
    assert s.waiting_count() == 1


def test_star_entry_of_a_capacity_table_alone() -> None:
    s = sched(agent("a", caps={"chat": 1, "*": 1}))
    assert run(s, 0, work("s1", ct="sms"), work("s2", ct="sms")) == {"s1": "a"}
    assert s.states["a"].used == {"sms": 1}


# --- 13. invariants under a random run --------------------------------------------------

RANDOM_ROSTER = (
    agent(
        "a1", caps={"chat": 2, "email": 3}, classes=("complaint", "inquiry"), languages=("en", "zh")
    ),
    agent("a2", caps={"chat": 1, "email": 1}, classes=("inquiry",), languages=("en",)),
    agent("a3", capacity=3),
    agent("a4", capacity=2, classes=("complaint",), languages=("zh",)),
    agent("a5", caps={"chat": 3}, classes=("inquiry", "suggestion"), languages=("en", "zh")),
    agent("a6", caps={"email": 2, "sms": 1}, classes=("complaint", "inquiry", "suggestion")),
)
KNOWN_LANGUAGES = {"en", "zh"}


def may_take(a: Agent, w: Work) -> bool:
    """Tell whether an agent is skilled for a message (the test's own reading of the rules)."""
    if a.classes and w.label not in a.classes:
        return False
    if a.languages and w.language not in a.languages and w.language in KNOWN_LANGUAGES:
        return False
    if w.department not in a.queues:
        return False
    caps = a.capacities
    capacity = caps.get(w.channel_type, caps.get("*", 0)) if caps else a.capacity
    return capacity > 0


def check_invariants(
    s: Scheduler, live: dict[str, Work], slot_ct: dict[str, str], held_by: dict[str, str]
) -> None:
    # Slots held per agent and pool match the holder map and never exceed capacity.
    counted: dict[tuple[str, str], int] = {}
    for slot, agent_id in s.holder.items():
        pool = s.states[agent_id].pool(slot_ct[slot])
        counted[agent_id, pool] = counted.get((agent_id, pool), 0) + 1
    for state in s.iter_states():
        for pool, used in state.used.items():
            assert used == counted.get((state.id, pool), 0), (state.id, pool)
            ct = pool if pool != "*" else "chat"
            assert used <= state.capacity(ct), (state.id, pool, used)
    # Every live message is in exactly one state, and the engine agrees with it.
    waiting = {w.id for w in s.waiting()}
    # Queue depths kept as work comes and goes agree with a recount.
    recount: dict[str, int] = {}
    for w in s.waiting():
        recount[w.department] = recount.get(w.department, 0) + 1
    assert s.queue_depths() == recount
    offers = {o.work.id: o for o in s.offers()}
    assert waiting <= set(live) and set(offers) <= set(live)
    for mid, w in live.items():
        states = [mid in waiting, mid in offers, w.state == "held"]
        assert sum(states) == 1, (mid, w.state, states)
        if mid in waiting:
            assert w.state == "waiting"
            assert w.slot not in s.holder
        elif mid in offers:
            assert w.state == "offered"
            assert s.holder[w.slot] == offers[mid].agent_id
            assert offers[mid].agent_id not in (w.excluded or ())
        else:
            assert s.holder[w.slot] == held_by[mid]


def check_no_idle_without_reason(s: Scheduler) -> None:
    """After a dispatch: nobody with room who may take a waiting message is left idle
    without a reason on record (a reserve, or a better agent due soon)."""
    for w in s.waiting():
        idle = [
            st.id
            for st in s.iter_states()
            if st.online
            and st.room(w.channel_type) > 0
            and may_take(st.agent, w)
            and st.id not in (w.excluded or ())
        ]
        if idle:
            why = s.why_waiting(w.id)
            assert why is not None and why["rule"] in ("reserve", "scarcity"), (w.id, idle)


@pytest.mark.parametrize("seed", [1, 2, 3, 7])
def test_random_run_keeps_the_invariants(seed: int) -> None:
    rng = random.Random(seed)
    roster = {a.id: a for a in RANDOM_ROSTER}
    s = Scheduler(
        roster.values(),
        Policy(accept_timeout=60, complaint_streak_limit=2, unreliable_for=300),
    )
    live: dict[str, Work] = {}
    slot_ct: dict[str, str] = {}
    held_by: dict[str, str] = {}
    finish: dict[str, float] = {}
    conversations: list[str] = []
    assignments = timeouts = 0
    now = 0.0

    def settle(now: float, accept_share: float) -> None:
        nonlocal assignments, timeouts
        returned, _breached = s.tick(now)
        for r in returned:
            assert r.why == "timeout"
            assert r.agent_id in (r.work.excluded or ())
            timeouts += 1
        for d in s.dispatch(now):
            w = d.work
            assert d.new_slot
            assert s.states[d.agent_id].online, d
            assert may_take(roster[d.agent_id], w), (d.agent_id, w)
            assert d.agent_id not in (w.excluded or ())
            assignments += 1
            if rng.random() < accept_share:
                assert s.accept(w.id, d.agent_id)
                held_by[w.id] = d.agent_id
                finish[w.id] = now + rng.uniform(20, 400)
        check_invariants(s, live, slot_ct, held_by)
        check_no_idle_without_reason(s)

    def finish_due(now: float) -> None:
        for mid in [m for m, t in finish.items() if t <= now]:
            del finish[mid]
            assert s.release(live[mid].slot) == held_by.pop(mid)
            del live[mid]

    for n in range(300):
        now += rng.expovariate(1 / 6)
        finish_due(now)
        if rng.random() < 0.06:
            agent_id = rng.choice(sorted(roster))
            online = not s.states[agent_id].online
            for r in s.set_presence(agent_id, online, now):
                assert not online and r.agent_id == agent_id and r.why == "returned"
            check_invariants(s, live, slot_ct, held_by)
        if conversations and rng.random() < 0.3:
            conversation = rng.choice(conversations)
        else:
            conversation = f"c{n}"
            conversations.append(conversation)
        label = rng.choice(LABELS)
        w = work(
            f"m{n}",
            conversation=conversation,
            label=label,
            severity="P1" if rng.random() < 0.1 else "P3",
            ct=rng.choice(("chat", "chat", "email", "sms")),
            language=rng.choice(("en", "en", "zh", "fr")),
            arrival=now,
            sla={"complaint": 120.0, "inquiry": 300.0, "suggestion": 3600.0}[label],
        )
        live[w.id] = w
        slot_ct[w.slot] = w.channel_type
        s.submit(w)
        settle(now, accept_share=0.85)

    # Drain: everyone on line, everything offered is accepted, work finishes.
    for agent_id in roster:
        s.set_presence(agent_id, True, now)
    for _ in range(400):
        if not finish and not s.offers() and s.waiting_count() == 0:
            break
        nxt = [t for t in (s.next_wakeup(), min(finish.values(), default=None)) if t]
        now = max(now + 1, min(nxt, default=now + 1))
        finish_due(now)
        settle(now, accept_share=1.0)
    assert not finish and not s.offers()
    # Release everything, dispatch far in the future: nothing eligible is left waiting.
    now += 10_000
    for mid in list(finish):
        finish[mid] = now
    finish_due(now)
    assert all(state.load == 0 for state in s.iter_states())
    settle(now, accept_share=1.0)
    for w in s.waiting():
        takers = [a for a in roster.values() if may_take(a, w)]
        assert takers, w  # a message nobody could ever take is a roster problem
        assert all(a.id in (w.excluded or ()) for a in takers), (w.id, w.excluded)
    assert assignments >= 300
    assert timeouts > 0


def test_explain_on_a_big_roster_counts_the_plainly_unavailable() -> None:
    roster = [agent(f"busy{i:03d}", capacity=1) for i in range(60)]
    roster += [agent("free", capacity=1), agent("fr-only", capacity=1, languages=("fr",))]
    s = sched(*roster, explain=True)
    for i in range(60):
        s.hold(f"slot{i}", f"c{i}", f"busy{i:03d}", "chat")
    (d,) = decide(s, 0, work("m", language="fr"))
    assert d.explain is not None
    listed = verdicts_of(d.explain)
    assert set(listed) == {"free", "fr-only"}
    assert d.explain["others"] == {"full": 60}


def test_explain_on_a_thousand_agents_stays_small_and_accounts_for_everyone() -> None:
    skills = [("complaint", "inquiry"), ("inquiry",), ("inquiry", "suggestion"), ("complaint",)]
    roster = [
        agent(
            f"a{i:04d}", capacity=2, classes=skills[i % 4], languages=(("en",), ("zh",))[i // 4 % 2]
        )
        for i in range(1000)
    ]
    s = sched(*roster, explain=True)
    for i in range(0, 1000, 3):
        s.hold(f"slot{i}a", f"c{i}a", f"a{i:04d}", "chat")
        s.hold(f"slot{i}b", f"c{i}b", f"a{i:04d}", "chat")
    for i in range(1, 1000, 7):
        s.set_presence(f"a{i:04d}", False)
    (d,) = decide(s, 0, work("m", label="inquiry", language="zh"))
    record = d.explain
    assert record is not None
    # One line per eligible group's best member (and the chosen), the rest counted.
    assert len(record["candidates"]) <= len(skills) * 2
    assert record["candidates"][0]["agent"] == d.agent_id
    accounted = len(record["candidates"]) + sum(record["others"].values())
    assert accounted == 1000
    assert record["others"]["not skilled for inquiry"] == 250
    assert record["others"]["does not speak zh"] == 375
    assert record["others"]["off line"] > 0 and record["others"]["full"] > 0


def test_other_instances_arrivals_raise_the_rate_and_so_the_reserve() -> None:
    # This instance saw few P1s; the shared store counts many more from the others.
    roster = [agent(f"s{i}", capacity=1, classes=("complaint",)) for i in range(10)]
    s = sched(*roster, reserve_risk=0.05, default_hold=300)
    observe(s, "complaint", 3, until=3600, severity="P1", sla=30)
    demand = next(d for d in s._demands.values() if d.urgent)
    alone = s.reserve(demand, 3600)[0]
    s.note_arrivals([("complaint", "P1", "en", "default", "chat", 120)], 600, 3600)
    assert s.rate(demand, 3600) == pytest.approx(120 / 600)
    assert s.reserve(demand, 3600)[0] > alone
    # A count that is not refreshed stops counting after a fifth of the window.
    assert s.rate(demand, 3600 + 600 / 5 + 1) < 120 / 600


def test_a_later_inquiry_leaves_the_only_suggestion_agent_to_an_earlier_suggestion() -> None:
    # g1 alone takes suggestions; f1 takes inquiries and frees a slot every ~10 s
    # (observed). A suggestion waits (g1 full); g1 frees a slot just as a later inquiry
    # comes in while f1 is full: the inquiry waits for f1, g1's slot goes to the
    # suggestion that was first.
    s = sched(
        agent("g1", capacity=1, classes=("inquiry", "suggestion")),
        agent("f1", capacity=1, classes=("inquiry",)),
    )
    for i in range(30):  # f1's history: inquiries held ~10 s each
        t = i * 20.0
        (d,) = decide(s, t, work(f"old{i}", arrival=t, sla=300))
        s.tick(t + 10)
        s.release(d.work.slot)
    s.hold("g-busy", "g-busy", "g1", "chat")
    s.hold("f-busy", "f-busy", "f1", "chat")
    s.submit(work("sg", label="suggestion", arrival=600, sla=3600))
    assert s.dispatch(600) == []
    s.release("g-busy")
    got = run(s, 601, work("late", arrival=601, sla=300))
    assert got == {"sg": "g1"}
    why = s.why_waiting("late")
    assert why is not None and why["rule"] == "scarcity"
    # Held only because f1 is expected to free a slot well before the inquiry is at risk.
    assert why["for"].startswith("suggestion") and why["expected_seconds"] < 0.75 * 300 / 2
    # When f1 frees its slot, the inquiry takes it.
    s.release("f-busy")
    assert run(s, 605) == {"late": "f1"}


def test_the_ops_queue_view_lists_held_back_messages_with_their_reason() -> None:
    from router.roster import queues_view

    s = reserved_specialists()
    run(s, 3600, work("c1", label="complaint", arrival=3600, sla=120))
    assert run(s, 3601, work("c2", label="complaint", arrival=3601, sla=120)) == {}
    (queue,) = queues_view(s, 3602)
    assert queue["depth"] == 1
    (held,) = queue["held_back"]
    assert held["message_id"] == "c2" and held["rule"] == "reserve"
    assert held["for"] == "P0/P1 complaint en chat" and held["until"] == 3661
    assert "reserve 1" in held["reason"]
