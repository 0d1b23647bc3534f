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

from router.drivers import AgentAction
from router.model import Assignment
from router.store import OutboxItem
from tests.test_pipeline import Harness, msg

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
                target="rec",
                agent_id="bo",
                address="",
                kind="assignment",
                payload={},
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
