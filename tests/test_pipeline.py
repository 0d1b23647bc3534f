"""The pipeline in-process, on the real SQLite store and the real outbox dispatcher.

The agent tool is a recorder (the adapters have their own tests against real peers);
everything between a channel's hand-over and the tool's deliver() call is real.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from router.config import build_config
from router.drivers import ActionSink, AgentAction, Delivery, DriverState
from router.metrics import Metrics
from router.model import InboundMessage, new_ulid
from router.outbox import Dispatcher
from router.pipeline import Pipeline
from router.store.sqlite import SqliteStore


class RecordingTool:
    """An agent tool that keeps what it was given."""

    def __init__(self) -> None:
        self.name = "rec"
        self.state = DriverState.CONNECTED
        self.deliveries: list[Delivery] = []
        self.arrived = asyncio.Event()

    async def run(self, actions: ActionSink) -> None:
        await asyncio.Event().wait()

    async def deliver(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        self.arrived.set()

    async def stop(self) -> None:
        self.state = DriverState.STOPPED

    def for_agent(self, agent_id: str) -> list[Delivery]:
        return [d for d in self.deliveries if d.agent_id == agent_id]


def make_config(state_dir: Path, agents: list[dict[str, Any]], **extra: Any) -> Any:
    raw: dict[str, Any] = {
        "daemon": {"state_dir": str(state_dir)},
        "adapters": [{"type": "inbox", "name": "rec"}],
        "agents": [{"tool": "rec", **a} for a in agents],
        **extra,
    }
    return build_config(raw, source="test.toml")


class Harness:
    def __init__(self, tmp_path: Path, agents: list[dict[str, Any]], **extra: Any) -> None:
        self.config = make_config(tmp_path / "state", agents, **extra)
        self.db = tmp_path / "router.db"
        self.tool = RecordingTool()
        self.store: SqliteStore | None = None
        self.pipeline: Pipeline | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Pipeline:
        self.store = SqliteStore(self.db)
        await self.store.open()
        metrics = Metrics()
        dispatcher = Dispatcher(self.store, lambda: {"rec": self.tool}, self.config.outbox, metrics)
        self.pipeline = Pipeline(self.config, self.store, metrics, dispatcher)
        self._task = asyncio.create_task(dispatcher.run())
        await self.pipeline.restore()
        return self.pipeline

    async def stop(self) -> None:
        assert self.pipeline is not None and self.store is not None and self._task is not None
        await self.pipeline.dispatcher.drain(5)
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.store.close()

    async def settle(self) -> None:
        assert self.pipeline is not None
        await self.pipeline.dispatcher.drain(5)


def msg(
    text: str, contact: str = "c1", *, key: str | None = None, thread: str = ""
) -> InboundMessage:
    return InboundMessage(
        channel="web",
        channel_type="web",
        external_id=key or new_ulid(),
        contact_handle=contact,
        text=text,
        conversation_hint=thread,
        payload_sha256=str(hash(text)),
    )


ROSTER = [
    {"id": "alice", "capacity": 2, "skills": ["en"]},
    {"id": "bo", "capacity": 2, "skills": ["zh", "en"]},
]


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    harness = Harness(tmp_path, ROSTER)
    await harness.start()
    yield harness
    await harness.stop()


async def test_message_is_committed_classified_and_delivered(h: Harness) -> None:
    assert h.pipeline is not None and h.store is not None
    receipt = await h.pipeline.ingest(msg("My parcel never arrived, I want a refund!", "dana"))
    assert receipt.state == "assigned" and not receipt.duplicate
    assert receipt.ticket == "T-" + receipt.conversation_id
    await h.settle()
    [d] = h.tool.deliveries
    assert d.kind == "assignment" and d.payload["ticket"] == receipt.ticket
    assert d.payload["classification"]["label"] == "complaint"
    assert d.payload["message"]["id"] == receipt.message_id
    stored = await h.store.message(receipt.message_id)
    assert stored is not None and stored["label"] == "complaint"
    assert (await h.store.delivery_counts())["pending"] == 0


async def test_chinese_goes_to_the_agent_who_reads_it(h: Harness) -> None:
    assert h.pipeline is not None
    await h.pipeline.ingest(msg("你好，请问怎么修改收货地址？", "wei"))
    await h.settle()
    assert [d.agent_id for d in h.tool.deliveries] == ["bo"]


async def test_least_loaded_spreads_new_conversations(h: Harness) -> None:
    assert h.pipeline is not None
    for i in range(4):
        await h.pipeline.ingest(msg(f"Question number {i} about my invoice?", f"c{i}"))
    await h.settle()
    per_agent = {a: len(h.tool.for_agent(a)) for a in ("alice", "bo")}
    assert per_agent == {"alice": 2, "bo": 2}


async def test_follow_up_sticks_to_the_same_agent_without_a_new_slot(h: Harness) -> None:
    assert h.pipeline is not None
    first = await h.pipeline.ingest(msg("Where is my order?", "dana"))
    holder = h.pipeline.scheduler.holder[first.conversation_id]
    load = h.pipeline.scheduler.load[holder]
    second = await h.pipeline.ingest(msg("Also, can I change the address?", "dana"))
    assert second.conversation_id == first.conversation_id
    assert h.pipeline.scheduler.load[holder] == load
    await h.settle()
    assert {d.agent_id for d in h.tool.deliveries} == {holder}
    assert "sticky" in h.tool.deliveries[1].payload["routing"]["reason"]


async def test_nobody_goes_over_capacity_and_the_queue_drains_on_resolve(h: Harness) -> None:
    assert h.pipeline is not None
    receipts = [await h.pipeline.ingest(msg(f"Question {i}?", f"c{i}")) for i in range(6)]
    assert [r.state for r in receipts].count("assigned") == 4
    assert [r.state for r in receipts].count("queued") == 2
    for agent in h.pipeline.scheduler.agents.values():
        assert h.pipeline.scheduler.load[agent.id] <= agent.capacity
    queued = next(r for r in receipts if r.state == "queued")
    first = receipts[0]
    holder = h.pipeline.scheduler.holder[first.conversation_id]
    await h.pipeline.on_action(
        AgentAction(agent_id=holder, action="resolve", conversation_id=first.conversation_id)
    )
    await h.settle()
    assert queued.message_id in {d.payload["message"]["id"] for d in h.tool.deliveries}
    assert sum(h.pipeline.scheduler.queue_depths().values()) == 1


async def test_only_the_holder_may_resolve(h: Harness) -> None:
    assert h.pipeline is not None
    r = await h.pipeline.ingest(msg("Where is my order?", "dana"))
    holder = h.pipeline.scheduler.holder[r.conversation_id]
    other = "bo" if holder == "alice" else "alice"
    await h.pipeline.on_action(
        AgentAction(agent_id=other, action="resolve", conversation_id=r.conversation_id)
    )
    assert h.pipeline.scheduler.holder[r.conversation_id] == holder


async def test_duplicate_is_not_routed_twice(h: Harness) -> None:
    assert h.pipeline is not None and h.store is not None
    m = msg("Where is my order?", "dana", key="k-1")
    first = await h.pipeline.ingest(m)
    again = await h.pipeline.ingest(m)
    assert again.duplicate and again.message_id == first.message_id and again.ticket == first.ticket
    assert sum(h.pipeline.scheduler.load.values()) == 1
    await h.settle()
    assert len(h.tool.deliveries) == 1
    conflict = await h.pipeline.ingest(msg("Something else entirely", "dana", key="k-1"))
    assert conflict.duplicate and conflict.payload_conflict


async def test_third_contact_raises_repeat_contact_and_severity(h: Harness) -> None:
    assert h.pipeline is not None
    for i in range(3):
        await h.pipeline.ingest(msg(f"My order is late, attempt {i}", "dana", thread=f"t{i}"))
    await h.settle()
    last = h.tool.deliveries[-1].payload["classification"]
    assert "repeat_contact" in {s["kind"] for s in last["signals"]}
    first = h.tool.deliveries[0].payload["classification"]
    assert "repeat_contact" not in {s["kind"] for s in first["signals"]}
    order = ["P0", "P1", "P2", "P3"]
    assert order.index(last["severity"]) < order.index(first["severity"])


async def test_urgent_messages_get_the_urgent_sla(h: Harness) -> None:
    assert h.pipeline is not None
    r = await h.pipeline.ingest(msg("I will sue you and see you in court over this fraud!", "eve"))
    await h.settle()
    routing = h.tool.deliveries[0].payload["routing"]
    from datetime import datetime

    due = datetime.fromisoformat(routing["sla_deadline"]) - datetime.fromisoformat(
        routing["assigned_at"]
    )
    assert due.total_seconds() == pytest.approx(h.config.sla.urgent)
    assert h.tool.deliveries[0].payload["classification"]["severity"] in ("P0", "P1")
    assert r.state == "assigned"


async def test_status_token_opens_only_its_ticket(h: Harness) -> None:
    assert h.pipeline is not None
    a = await h.pipeline.ingest(msg("Where is my order?", "dana"))
    b = await h.pipeline.ingest(msg("Where is my order?", "eve"))
    status = await h.pipeline.ticket_status(a.ticket, a.status_token)
    assert status is not None and status.ticket == a.ticket and status.assigned
    assert await h.pipeline.ticket_status(a.ticket, b.status_token) is None
    assert await h.pipeline.ticket_status(a.ticket, "") is None
    assert await h.pipeline.ticket_status("T-nope", a.status_token) is None


async def test_presence_off_takes_an_agent_out_and_on_drains_the_queue(h: Harness) -> None:
    assert h.pipeline is not None
    assert await h.pipeline.set_presence("bo", False)
    assert not await h.pipeline.set_presence("nobody", False)
    rs = [await h.pipeline.ingest(msg(f"Question {i}?", f"c{i}")) for i in range(3)]
    assert [r.state for r in rs] == ["assigned", "assigned", "queued"]
    await h.settle()
    assert {d.agent_id for d in h.tool.deliveries} == {"alice"}
    await h.pipeline.set_presence("bo", True)
    await h.settle()
    assert (
        h.tool.for_agent("bo")
        and h.tool.for_agent("bo")[0].payload["message"]["id"] == rs[2].message_id
    )


async def test_restart_restores_load_queue_and_pending_sends(tmp_path: Path) -> None:
    h1 = Harness(tmp_path, [{"id": "alice", "capacity": 1, "skills": ["en"]}])
    p1 = await h1.start()
    h1.tool.state = DriverState.TRANSIENT_DISCONNECT  # sends wait: they stay in the outbox
    first = await p1.ingest(msg("Where is my order?", "dana"))
    second = await p1.ingest(msg("And my invoice?", "eve"))
    assert (first.state, second.state) == ("assigned", "queued")
    assert h1._task is not None and h1.store is not None
    h1._task.cancel()
    await asyncio.gather(h1._task, return_exceptions=True)
    await h1.store.close()

    h2 = Harness(tmp_path, [{"id": "alice", "capacity": 1, "skills": ["en"]}])
    p2 = await h2.start()
    try:
        assert p2.scheduler.load["alice"] == 1
        assert p2.scheduler.queue_depths().get("default") == 1
        await h2.settle()
        [d] = h2.tool.deliveries
        assert d.payload["message"]["id"] == first.message_id
        await p2.on_action(
            AgentAction(agent_id="alice", action="resolve", conversation_id=first.conversation_id)
        )
        await h2.settle()
        assert [x.payload["message"]["id"] for x in h2.tool.deliveries] == [
            first.message_id,
            second.message_id,
        ]
    finally:
        await h2.stop()


async def test_failed_commit_gives_the_slot_back(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert h.pipeline is not None and h.store is not None

    async def broken(new: Any) -> Any:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(h.store, "ingest", broken)
    with pytest.raises(RuntimeError):
        await h.pipeline.ingest(msg("Where is my order?", "dana"))
    assert sum(h.pipeline.scheduler.load.values()) == 0
    assert not h.pipeline.scheduler.holder
