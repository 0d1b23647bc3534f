"""Properties of the scheduler over random rosters, histories and queues (hypothesis).

The property the scheduling issue asks for: after a placement pass, no agent with a
free slot may take a waiting message unless the scheduler recorded the reservation
that kept it (`why_waiting`). Holding capacity back is a decision with a reason,
never an accident of the indexes. Alongside: the per-group indexes agree with a
recount from the agents, and a placement never breaks capacity or skills.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.model import LABELS, Agent
from router.schedule import Policy, Scheduler, Work

LANGUAGES = ("en", "zh")
TYPES = ("chat", "email")


@st.composite
def rosters(draw: st.DrawFn) -> list[Agent]:
    count = draw(st.integers(min_value=1, max_value=12))
    agents = []
    for i in range(count):
        classes = draw(st.sets(st.sampled_from(LABELS), max_size=3))
        languages = draw(st.sets(st.sampled_from(LANGUAGES), max_size=2))
        caps = {ct: draw(st.integers(min_value=0, max_value=3)) for ct in TYPES}
        agents.append(
            Agent(
                id=f"a{i:02d}",
                name=f"a{i:02d}",
                capacity=0,
                tool="test",
                present=draw(st.booleans()) or i == 0,
                capacities=caps,
                classes=frozenset(classes),
                languages=frozenset(languages),
                queues=frozenset(draw(st.sampled_from([("default",), ("default", "vip")]))),
            )
        )
    return agents


@st.composite
def messages(draw: st.DrawFn, prefix: str, start: float, end: float) -> list[Work]:
    count = draw(st.integers(min_value=0, max_value=25))
    out = []
    for i in range(count):
        label = draw(st.sampled_from(LABELS))
        urgent = label == "complaint" and draw(st.booleans())
        arrival = draw(st.floats(min_value=start, max_value=end))
        sla = 30.0 if urgent else {"complaint": 120.0, "inquiry": 300.0}.get(label, 3600.0)
        out.append(
            Work(
                id=f"{prefix}{i}",
                slot=f"{prefix}{i}",
                conversation=f"{prefix}{i}",
                label=label,
                severity="P1" if urgent else "P3",
                channel_type=draw(st.sampled_from(TYPES)),
                language=draw(st.sampled_from(LANGUAGES)),
                department=draw(st.sampled_from(["default", "vip"])),
                arrival=arrival,
                deadline=arrival + sla,
            )
        )
    return out


def may_take(state_agent: Agent, work: Work, known_languages: set[str]) -> bool:
    """The test's own reading of eligibility (no overflow: every message is level 0).

    A language no agent lists is one nobody is skilled in: anyone may answer it.
    """
    if state_agent.classes and work.label not in state_agent.classes:
        return False
    if (
        state_agent.languages
        and work.language in known_languages
        and work.language not in state_agent.languages
    ):
        return False
    return work.department in state_agent.queues


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    roster=rosters(),
    history=messages("h", 0.0, 3000.0),
    held=st.lists(st.tuples(st.integers(0, 11), st.sampled_from(TYPES)), max_size=20),
    queue=messages("q", 3300.0, 3600.0),
    risk=st.sampled_from([0.02, 0.1, 0.3]),
    streak=st.integers(min_value=0, max_value=3),
)
def test_no_free_eligible_agent_is_left_idle_without_a_recorded_reason(
    roster: list[Agent],
    history: list[Work],
    held: list[tuple[int, str]],
    queue: list[Work],
    risk: float,
    streak: int,
) -> None:
    s = Scheduler(
        roster,
        Policy(accept_timeout=0, reserve_risk=risk, complaint_streak_limit=streak),
        explain=True,
    )
    # History: arrivals the scheduler has seen (rates), gone again.
    for w in sorted(history, key=lambda w: w.arrival):
        s.submit(w)
        s.withdraw(w.id)
    # Load: open conversations found at startup, within capacity.
    for n, (index, ct) in enumerate(held):
        state = s.states.get(f"a{index:02d}")
        if state is not None and state.room(ct) > 0:
            s.hold(f"held{n}", f"held{n}", state.id, ct)
    now = 3600.0
    for w in queue:
        s.submit(w)
    s.tick(now)
    decisions = s.dispatch(now)
    known = {lang for a in roster for lang in a.languages}

    for d in decisions:
        state = s.states[d.agent_id]
        assert state.online and may_take(state.agent, d.work, known)
        assert state.room(d.work.channel_type) >= 0

    # The group indexes agree with a recount from the agents.
    for state in s.iter_states():
        for ct in TYPES:
            room = max(0, state.room(ct)) if state.online else 0
            assert state.counted.get(ct, (0, 0))[0] == room, (state.id, ct)

    for w in s.waiting():
        idle = [
            st_.id
            for st_ in s.iter_states()
            if st_.online and st_.room(w.channel_type) > 0 and may_take(st_.agent, w, known)
        ]
        if idle:
            why = s.why_waiting(w.id)
            assert why is not None, (w.id, w.label, w.severity, idle)
            assert why["rule"] in ("reserve", "scarcity")
            assert why["verdict"]
