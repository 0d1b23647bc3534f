"""Scheduling decisions are atomic against the store.

Two workers (two pipelines, each with its own scheduler in memory, two connections to
one SQLite database) believe the same agents have room. The store re-checks capacity in
the transaction that commits the assignment, so together they can never push an agent
over capacity nor assign one message twice.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from router.delivery import ToolTarget
from router.drivers import AgentAction
from router.model import Assignment
from router.store import OutboxItem
from tests import payloads
from tests.test_pipeline import Harness, msg
from tests.test_schedule import verdicts_of

# alice: 2 conversations of any type; bo: one web conversation at a time.
ROSTER = [
    {"id": "alice", "capacity": 2, "skills": ["en"]},
    {"id": "bo", "capacity": {"web": 1, "sms": 3}, "skills": ["en"]},
]
CAPACITY = {"alice": 2, "bo": 1}


def _open_loads(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as c:
        rows = c.execute(
            "SELECT agent_id, COUNT(*) FROM conversations WHERE state='open' AND agent_id "
            "IS NOT NULL GROUP BY agent_id"
        ).fetchall()
    return {agent: n for agent, n in rows}


def _states(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT state, COUNT(*) FROM messages GROUP BY state").fetchall()
    return {state: n for state, n in rows}


def _assigned_without_row(db: Path) -> int:
    with sqlite3.connect(db) as c:
        return int(
            c.execute(
                "SELECT COUNT(*) FROM messages m WHERE m.state='assigned' AND NOT EXISTS "
                "(SELECT 1 FROM assignments a WHERE a.message_id=m.id)"
            ).fetchone()[0]
        )


async def test_two_workers_never_overfill_an_agent(tmp_path: Path) -> None:
    one, two = Harness(tmp_path, ROSTER), Harness(tmp_path, ROSTER)
    p1, p2 = await one.start(), await two.start()
    try:
        # Both schedulers see 3 free web slots; together they would hand out 6.
        texts = [f"Where is my order {n}? Please tell me the delivery date." for n in range(40)]
        receipts = await asyncio.gather(
            *(
                (p1 if n % 2 else p2).ingest(msg(text, f"customer-{n}"))
                for n, text in enumerate(texts)
            )
        )
        assert len({r.message_id for r in receipts}) == 40
        loads = _open_loads(one.db)
        for agent, load in loads.items():
            assert load <= CAPACITY[agent], f"{agent} holds {load} > {CAPACITY[agent]}"
        assert sum(loads.values()) == sum(CAPACITY.values())  # filled, not overfilled
        # Each scheduler thinks it placed work; the store refused what did not fit.
        believed = sum(p1.scheduler.load.values()) + sum(p2.scheduler.load.values())
        assert believed == sum(CAPACITY.values())
        assert _states(one.db) == {"assigned": 3, "queued": 37}

        # Now both workers resolve what they hold and drain their queues at once, many
        # times over: every freed slot is contended by two schedulers.
        rng = random.Random(7)
        for _ in range(12):
            actions = []
            for pipeline in (p1, p2):
                held = list(pipeline.scheduler.holder.items())
                rng.shuffle(held)
                for conversation, agent in held[:2]:
                    actions.append(
                        pipeline.on_action(
                            AgentAction(
                                agent_id=agent, action="resolve", conversation_id=conversation
                            )
                        )
                    )
            await asyncio.gather(*actions, p1.drain_queues(), p2.drain_queues())
            for agent, load in _open_loads(one.db).items():
                assert load <= CAPACITY[agent], f"{agent} holds {load} > {CAPACITY[agent]}"
            assert _assigned_without_row(one.db) == 0
        states = _states(one.db)
        assert states.get("resolved", 0) > 10  # the hammering really moved work
        assert sum(states.values()) == 40
    finally:
        await one.stop()
        await two.stop()


async def test_store_refuses_an_assignment_beyond_capacity(tmp_path: Path) -> None:
    h = Harness(tmp_path, ROSTER)
    pipeline = await h.start()
    try:
        pipeline.scheduler.set_presence("alice", False)
        pipeline.scheduler.set_presence("bo", False)
        queued = [
            await pipeline.ingest(msg(f"Question {n} about my bill", f"c{n}")) for n in range(3)
        ]
        assert all(r.state == "queued" for r in queued)
        assert h.store is not None

        def assignment(message_id: str, conversation_id: str) -> Assignment:
            return Assignment(
                message_id=message_id,
                conversation_id=conversation_id,
                agent_id="bo",
                queue="default",
                reason="test",
                sla_deadline=datetime.now(UTC),
                channel_type="web",
                capacity=1,
                pool="web",
            )

        def outbox(message_id: str) -> OutboxItem:
            return OutboxItem(
                id=f"o-{message_id}",
                target=ToolTarget("rec"),
                agent_id="bo",
                address="",
                payload=payloads.assignment(1, agent="bo", message_id=message_id),
                message_id=message_id,
                next_attempt_at=0.0,
                created_at=0.0,
            )

        first, second = queued[0], queued[1]
        assert await h.store.assign(
            assignment(first.message_id, first.conversation_id), outbox(first.message_id)
        )
        # bo has one web slot: the second is refused, and nothing of it is written.
        assert not await h.store.assign(
            assignment(second.message_id, second.conversation_id), outbox(second.message_id)
        )
        stored = await h.store.message(second.message_id)
        assert stored is not None and stored["state"] == "queued" and not stored["assignment"]
        # One message is never assigned twice either.
        assert not await h.store.assign(
            assignment(first.message_id, first.conversation_id), outbox(first.message_id + "x")
        )
    finally:
        await h.stop()


# -- accept timeouts, presence and SLA breaches in the daemon's pipeline -----------------

TEAM = [
    {"id": "alice", "capacity": 2, "skills": ["en"]},
    {"id": "bo", "capacity": 2, "skills": ["en"]},
]


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0  # in the past: the outbox sends at once

    def __call__(self) -> float:
        return self.now


def _timed_harness(tmp_path: Path, clock: Clock, **scheduling: object) -> Harness:
    h = Harness(
        tmp_path,
        TEAM,
        scheduling={"accept_timeout": 60, **scheduling},
    )
    h.clock = clock
    return h


@pytest.fixture
def tools_accept(monkeypatch: pytest.MonkeyPatch) -> None:
    # The recording tool stands in for a tool that sends accept actions (MQTT).
    monkeypatch.setattr("adapters.inbox.InboxTool.sends_actions", True)


def _history(db: Path, message_id: str) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as c:
        return c.execute(
            "SELECT agent_id, outcome FROM assignment_history WHERE message_id=? ORDER BY id",
            (message_id,),
        ).fetchall()


async def test_unaccepted_offer_times_out_and_goes_to_someone_else(
    tmp_path: Path, tools_accept: None
) -> None:
    clock = Clock()
    h = _timed_harness(tmp_path, clock)
    pipeline = await h.start()
    try:
        first = await pipeline.ingest(msg("How do I change my delivery address?", "dana"))
        assert h.store is not None
        stored = await h.store.message(first.message_id)
        assert stored is not None and stored["state"] == "assigned"
        slow = stored["assignment"]["agent_id"]
        other = "bo" if slow == "alice" else "alice"

        clock.now += 59
        await pipeline.tick()
        assert (await h.store.message(first.message_id))["assignment"]["agent_id"] == slow

        clock.now += 2  # past the 60 s accept timeout
        await pipeline.tick()
        await h.settle()
        again = await h.store.message(first.message_id)
        assert again is not None and again["assignment"]["agent_id"] == other
        assert _history(h.db, first.message_id) == [(slow, "timeout")]
        delivered_to = [d.agent_id for d in h.tool.deliveries if d.kind == "assignment"]
        assert delivered_to == [slow, other]
        (notice,) = [d for d in h.tool.deliveries if d.kind == "withdrawn"]
        assert notice.agent_id == slow and notice.payload["message_ids"] == [first.message_id]
        assert notice.payload["reason"] == "not accepted in time"
        # The wait the customer saw: 0 s to the first offer, 61 s to the second.
        waits = pipeline.metrics.wait_seconds.labels(label="inquiry", within_sla="yes")
        assert waits._sum.get() == pytest.approx(61.0)

        # The second agent does not answer either: the message must not go back to the
        # first one (who let it time out); it waits.
        clock.now += 61
        await pipeline.tick()
        waiting = await h.store.message(first.message_id)
        assert waiting is not None and waiting["state"] == "queued"
        assert _history(h.db, first.message_id) == [(slow, "timeout"), (other, "timeout")]
        assert [w.id for w in pipeline.scheduler.waiting()] == [first.message_id]
        assert pipeline.scheduler.waiting()[0].excluded == {slow, other}
        verdicts = verdicts_of(again["assignment"]["explain"])
        assert verdicts[slow] == "let this message time out before"
    finally:
        await h.stop()


async def test_explain_of_a_follow_up_says_its_conversations_offer_lapsed(
    tmp_path: Path, tools_accept: None
) -> None:
    # A follow-up joins the offer of its conversation; when that lapses, it goes back
    # with it (router/queue_work.py take_back). The agent let the offer of the
    # conversation time out, which ran from the first message, not from this one.
    clock = Clock()
    h = _timed_harness(tmp_path, clock)
    pipeline = await h.start()
    try:
        first = await pipeline.ingest(msg("How do I change my delivery address?", "dana"))
        clock.now += 30
        follow = await pipeline.ingest(msg("Answer now or my lawyer will sue you.", "dana"))
        assert follow.conversation_id == first.conversation_id
        assert h.store is not None
        slow = (await h.store.message(first.message_id))["assignment"]["agent_id"]
        other = "bo" if slow == "alice" else "alice"
        assert (await h.store.message(follow.message_id))["assignment"]["agent_id"] == slow

        clock.now += 31  # past the first offer's 60 s
        await pipeline.tick()
        await h.settle()
        assert _history(h.db, follow.message_id) == [(slow, "timeout")]
        # The follow-up is the more urgent: routed on its merits, the first joins it.
        routed = await h.store.message(follow.message_id)
        assert routed is not None and routed["assignment"]["agent_id"] == other
        assert (
            verdicts_of(routed["assignment"]["explain"])[slow]
            == "let this conversation's offer time out before"
        )
    finally:
        await h.stop()


async def _offered(h: Harness, pipeline: Any) -> tuple[Any, str, str]:
    """Ingest one inquiry; return its receipt, the agent offered it and the other one."""
    first = await pipeline.ingest(msg("How do I change my delivery address?", "dana"))
    assert h.store is not None
    slow = (await h.store.message(first.message_id))["assignment"]["agent_id"]
    return first, slow, "bo" if slow == "alice" else "alice"


async def test_explain_still_words_a_timeout_from_before_a_restart(
    tmp_path: Path, tools_accept: None
) -> None:
    # Timeouts of queued messages outlast a restart (the offer history), and read as
    # they did before it.
    clock = Clock()
    h = _timed_harness(tmp_path, clock)
    pipeline = await h.start()
    first, slow, other = await _offered(h, pipeline)
    await pipeline.set_presence(other, False)
    clock.now += 61
    await pipeline.tick()
    await h.settle()
    assert [w.id for w in pipeline.scheduler.waiting()] == [first.message_id]
    await h.stop()

    h2 = _timed_harness(tmp_path, clock)
    pipeline = await h2.start()
    try:
        assert pipeline.scheduler.waiting()[0].excluded == {slow}
        await pipeline.set_presence(other, True)
        await h2.settle()
        assert h2.store is not None
        routed = await h2.store.message(first.message_id)
        assert routed is not None and routed["assignment"]["agent_id"] == other
        assert (
            verdicts_of(routed["assignment"]["explain"])[slow] == "let this message time out before"
        )
    finally:
        await h2.stop()


async def test_an_offer_pending_at_a_restart_never_goes_back_to_who_let_it_lapse(
    tmp_path: Path, tools_accept: None
) -> None:
    # slow lets the offer lapse, other gets it; the daemon stops with other's offer
    # pending. When that lapses after the start, slow must still be kept off it.
    clock = Clock()
    h = _timed_harness(tmp_path, clock)
    pipeline = await h.start()
    first, slow, other = await _offered(h, pipeline)
    clock.now += 61
    await pipeline.tick()
    await h.settle()
    assert (await h.store.message(first.message_id))["assignment"]["agent_id"] == other
    await h.stop()

    h2 = _timed_harness(tmp_path, clock)
    pipeline = await h2.start()
    try:
        clock.now += 61  # other's offer, made before the stop, lapses now
        await pipeline.tick()
        await h2.settle()
        assert _history(h2.db, first.message_id) == [(slow, "timeout"), (other, "timeout")]
        assert [w.id for w in pipeline.scheduler.waiting()] == [first.message_id]
        assert pipeline.scheduler.waiting()[0].excluded == {slow, other}
    finally:
        await h2.stop()


async def test_accept_or_reply_stops_the_timeout(tmp_path: Path, tools_accept: None) -> None:
    clock = Clock()
    h = _timed_harness(tmp_path, clock)
    pipeline = await h.start()
    try:
        r = await pipeline.ingest(msg("Can I pay by bank transfer?", "erin"))
        assert h.store is not None
        holder = (await h.store.message(r.message_id))["assignment"]["agent_id"]
        clock.now += 30
        assert (
            await pipeline.act(
                AgentAction(agent_id=holder, action="accept", conversation_id=r.conversation_id)
            )
            == "ok"
        )
        clock.now += 600
        await pipeline.tick()
        stored = await h.store.message(r.message_id)
        assert stored is not None and stored["assignment"]["agent_id"] == holder
        assert stored["assignment"]["accepted_at"] == pytest.approx(clock.now - 600)
        assert _history(h.db, r.message_id) == []
    finally:
        await h.stop()


async def test_offer_clock_survives_a_restart(tmp_path: Path, tools_accept: None) -> None:
    clock = Clock()
    h = _timed_harness(tmp_path, clock)
    pipeline = await h.start()
    r = await pipeline.ingest(msg("Where can I find my invoice?", "fay"))
    assert h.store is not None
    slow = (await h.store.message(r.message_id))["assignment"]["agent_id"]
    await h.stop()

    clock.now += 90  # the offer expired while the daemon was down
    h2 = _timed_harness(tmp_path, clock)
    pipeline = await h2.start()
    try:
        await pipeline.tick()
        assert h2.store is not None
        stored = await h2.store.message(r.message_id)
        assert stored is not None and stored["assignment"]["agent_id"] != slow
        assert _history(h2.db, r.message_id) == [(slow, "timeout")]
    finally:
        await h2.stop()


async def test_going_off_line_returns_unaccepted_work_only(
    tmp_path: Path, tools_accept: None
) -> None:
    clock = Clock()
    h = _timed_harness(tmp_path, clock)
    pipeline = await h.start()
    try:
        pipeline.scheduler.set_presence("bo", False)  # alice gets both
        a = await pipeline.ingest(msg("Question about my contract renewal", "gus"))
        b = await pipeline.ingest(msg("Question about my latest bill", "hana"))
        pipeline.scheduler.set_presence("bo", True)
        assert h.store is not None
        assert (
            await pipeline.act(
                AgentAction(agent_id="alice", action="accept", conversation_id=a.conversation_id)
            )
            == "ok"
        )
        assert await pipeline.set_presence("alice", False)
        kept = await h.store.message(a.message_id)
        moved = await h.store.message(b.message_id)
        assert kept is not None and kept["assignment"]["agent_id"] == "alice"
        assert moved is not None and moved["assignment"]["agent_id"] == "bo"
        assert _history(h.db, b.message_id) == [("alice", "returned")]
    finally:
        await h.stop()


async def test_sla_breach_is_reported_once_to_the_target(tmp_path: Path) -> None:
    clock = Clock()
    h = _timed_harness(tmp_path, clock, breach_target="rec", breach_address="sla-desk")
    pipeline = await h.start()
    try:
        for agent in ("alice", "bo"):
            assert await pipeline.set_presence(agent, False)
        r = await pipeline.ingest(msg("What are your opening hours?", "ivy"))
        assert r.state == "queued"
        clock.now += 299
        await pipeline.tick()
        clock.now += 2  # past the 300 s inquiry SLA
        await pipeline.tick()
        clock.now += 10
        await pipeline.tick()
        await h.settle()
        alerts = [d for d in h.tool.deliveries if d.kind == "alert"]
        assert len(alerts) == 1 and alerts[0].address == "sla-desk"
        alert = alerts[0].payload["alert"]
        assert alert["kind"] == "sla_breach" and alert["message_id"] == r.message_id
        assert alert["waited_s"] == pytest.approx(301, abs=0.01)
        value = pipeline.metrics.sla_breaches.labels(queue="default", label="inquiry")
        assert value._value.get() == 1
    finally:
        await h.stop()


async def test_explain_names_every_candidate(tmp_path: Path) -> None:
    from router.cli import render_explain

    h = Harness(
        tmp_path,
        [
            {"id": "alice", "capacity": 2, "skills": ["en"]},
            {"id": "chen", "capacity": 2, "skills": ["zh"]},
            {"id": "dora", "capacity": 2, "skills": ["en", "complaint"]},
        ],
    )
    pipeline = await h.start()
    try:
        await pipeline.ingest(msg("How late are you open today?", "jo"))
        r = await pipeline.ingest(msg("How do I reset my password?", "kim"))
        assert h.store is not None
        stored = await h.store.message(r.message_id)
        assert stored is not None
        verdicts = verdicts_of(stored["assignment"]["explain"])
        assert verdicts["chen"] == "does not speak en"
        assert verdicts["dora"] == "not skilled for inquiry"
        assert verdicts[stored["assignment"]["agent_id"]].startswith("chosen")
        text = render_explain(stored)
        assert "does not speak en" in text and "not skilled for inquiry" in text
    finally:
        await h.stop()


async def test_agents_view_and_table_show_capacity_skills_and_load(tmp_path: Path) -> None:
    from router.cli import _agents_table

    h = Harness(tmp_path, ROSTER)
    pipeline = await h.start()
    try:
        await pipeline.ingest(msg("Where is my parcel? It is late.", "lee"))
        view = {a["id"]: a for a in pipeline.agents_view()}
        assert view["bo"]["capacities"] == {"web": 1, "sms": 3}
        assert view["alice"]["languages"] == ["en"] and view["alice"]["classes"] == []
        assert sum(a["open_conversations"] for a in view.values()) == 1
        rows = _agents_table({"agents": list(view.values())})
        assert rows[0].split()[:3] == ["AGENT", "PRESENT", "LOAD"]
        bo = next(r for r in rows if r.startswith("bo "))
        assert "/4" in bo and "en" in bo  # total capacity over its channel types
    finally:
        await h.stop()


async def test_department_rule_routes_by_signal(tmp_path: Path) -> None:
    h = Harness(
        tmp_path,
        [
            {"id": "alice", "capacity": 2, "skills": ["en"]},
            {"id": "lex", "capacity": 2, "skills": ["en"], "queues": ["legal"]},
        ],
        routing={"rules": [{"queue": "legal", "signals": ["legal_threat"]}]},
    )
    pipeline = await h.start()
    try:
        threat = await pipeline.ingest(
            msg("Refund me or my lawyer will sue your company in court.", "max")
        )
        plain = await pipeline.ingest(msg("What time do you open on Saturday?", "ned"))
        assert h.store is not None
        stored = await h.store.message(threat.message_id)
        assert stored is not None
        assert "legal_threat" in {s["kind"] for s in stored["signals"]}
        assert stored["queue"] == "legal" and stored["assignment"]["agent_id"] == "lex"
        other = await h.store.message(plain.message_id)
        assert other is not None and other["queue"] == "default"
        assert other["assignment"]["agent_id"] == "alice"
    finally:
        await h.stop()


async def test_away_keeps_its_offers_off_line_gives_them_back(
    tmp_path: Path, tools_accept: None
) -> None:
    clock = Clock()
    h = _timed_harness(tmp_path, clock)
    pipeline = await h.start()
    try:
        pipeline.scheduler.set_presence("bo", False)
        r = await pipeline.ingest(msg("Do you ship to Norway?", "ola"))
        pipeline.scheduler.set_presence("bo", True)
        assert h.store is not None
        assert (await h.store.message(r.message_id))["assignment"]["agent_id"] == "alice"
        assert await pipeline.act(AgentAction(agent_id="alice", action="presence", value="away"))
        # Away: no new work for alice, but the offer stays hers.
        other = await pipeline.ingest(msg("Do you ship to Chile?", "pia"))
        assert (await h.store.message(other.message_id))["assignment"]["agent_id"] == "bo"
        assert (await h.store.message(r.message_id))["assignment"]["agent_id"] == "alice"
        # Off line: what she had not accepted goes to someone with room.
        assert (
            await pipeline.act(AgentAction(agent_id="alice", action="presence", value="off"))
            == "ok"
        )
        moved = await h.store.message(r.message_id)
        assert moved is not None and moved["assignment"]["agent_id"] == "bo"
        assert _history(h.db, r.message_id) == [("alice", "returned")]
        assert (
            await pipeline.act(AgentAction(agent_id="alice", action="presence", value="nap"))
            == "rejected"
        )
    finally:
        await h.stop()


async def test_explain_off_keeps_only_the_reason(tmp_path: Path) -> None:
    from router.cli import render_explain

    h = Harness(tmp_path, TEAM, scheduling={"explain": False})
    pipeline = await h.start()
    try:
        r = await pipeline.ingest(msg("Can I change my order?", "quinn"))
        assert h.store is not None
        stored = await h.store.message(r.message_id)
        assert stored is not None and stored["assignment"]["explain"] is None
        assert stored["assignment"]["reason"]
        text = render_explain(stored)
        assert "why:" in text and "agents considered" not in text
    finally:
        await h.stop()
