"""The pipeline in-process, on the real SQLite store and the real outbox dispatcher.

The agent tool is a recorder (the adapters have their own tests against real peers);
everything between a channel's hand-over and the tool's deliver() call is real.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from router.config import build_config
from router.delivery import encode_delivery, payload_to_dict
from router.drivers import ActionSink, AgentAction, Delivery, DriverState, Outbound
from router.metrics import Metrics
from router.model import InboundMessage, new_ulid
from router.outbox import Dispatcher
from router.pipeline import Pipeline
from router.store.sqlite import SqliteStore
from tests.schema_check import validate_delivery


@dataclass(frozen=True)
class Seen:
    """A send as it went out: its wire body (a dict), checked against the committed schema."""

    id: str
    kind: str
    agent_id: str
    address: str
    payload: dict[str, Any]


class RecordingTool:
    """An agent tool (or, as `send`, an answering channel) that keeps what it was given."""

    sends_actions = False
    answers_customers = True

    def __init__(self) -> None:
        self.name = "rec"
        self.state = DriverState.CONNECTED
        self.last_error = ""
        self.last_success: float | None = None
        self.deliveries: list[Seen] = []
        self.arrived = asyncio.Event()

    async def run(self, actions: ActionSink) -> None:
        await asyncio.Event().wait()

    async def deliver(self, delivery: Delivery) -> None:
        body = json.loads(encode_delivery(delivery))
        validate_delivery(body)
        self.deliveries.append(
            Seen(delivery.id, delivery.kind, delivery.agent_id, delivery.address, body)
        )
        self.arrived.set()

    async def send(self, outbound: Outbound) -> None:
        body = payload_to_dict(outbound.payload)
        self.deliveries.append(Seen(outbound.id, outbound.kind, "", outbound.to, body))
        self.arrived.set()

    async def stop(self) -> None:
        self.state = DriverState.STOPPED

    def for_agent(self, agent_id: str) -> list[Seen]:
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
        self.clock: Callable[[], float] = time.time
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Pipeline:
        self.store = SqliteStore(self.db)
        await self.store.open()
        metrics = Metrics()
        dispatcher = Dispatcher(self.store, lambda: {"rec": self.tool}, self.config.outbox, metrics)
        self.pipeline = Pipeline(self.config, self.store, metrics, dispatcher, clock=self.clock)
        self._task = asyncio.create_task(dispatcher.run())
        await self.pipeline.restore()
        return self.pipeline

    async def stop(self) -> None:
        assert self.pipeline is not None and self.store is not None and self._task is not None
        await self.pipeline.dispatcher.drain(5)
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.pipeline.close()  # its classifier worker, if any
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


async def test_a_queued_message_reaches_its_agent_with_everything_it_had(tmp_path: Path) -> None:
    # The delivery of a message placed later is rebuilt from the store: it used to lose
    # the customer's name (the stored row had none).
    h = Harness(tmp_path, [{"id": "alice", "capacity": 1}])
    p = await h.start()
    try:
        first = await p.ingest(msg("Where is my order?", "dana"))
        waiting = InboundMessage(
            channel="web",
            channel_type="web",
            external_id=new_ulid(),
            contact_handle="wei@example.com",
            contact_name="张伟",
            subject="订单",
            text="请问我的订单什么时候发货？",
            payload_sha256="x",
        )
        queued = await p.ingest(waiting)
        assert queued.state == "queued"
        await p.on_action(AgentAction("alice", "resolve", conversation_id=first.conversation_id))
        await h.settle()
        [late] = [d for d in h.tool.deliveries if d.payload["message"]["id"] == queued.message_id]
        message = late.payload["message"]
        assert message["contact"] == {"handle": "wei@example.com", "name": "张伟"}
        assert (message["subject"], message["text"]) == ("订单", waiting.text)
        assert late.payload["ticket"] == queued.ticket
        assert late.payload["classification"]["label"] in ("inquiry", "complaint", "suggestion")
    finally:
        await h.stop()


async def test_a_reopened_conversation_is_named_in_the_agents_delivery(h: Harness) -> None:
    # The store joins a follow-up to its thread's resolved conversation and reopens it; the
    # delivery must name that conversation, not the id proposed before the commit.
    assert h.pipeline is not None
    first = await h.pipeline.ingest(msg("Where is my order?", "dana", thread="t9"))
    holder = h.pipeline.scheduler.holder[first.conversation_id]
    await h.pipeline.on_action(
        AgentAction(holder, "resolve", conversation_id=first.conversation_id)
    )
    again = await h.pipeline.ingest(msg("It still has not come.", "dana", thread="t9"))
    await h.settle()
    assert again.conversation_id == first.conversation_id
    last = h.tool.deliveries[-1]
    assert last.payload["message"]["id"] == again.message_id
    assert last.payload["conversation_id"] == first.conversation_id
    assert last.payload["ticket"] == first.ticket


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


# -- answers to customers, corrections, triage, crisis ---------------------------------


class AnsweringHarness(Harness):
    """A harness whose "email" channel can answer customers (a recorder behind the outbox)."""

    def __init__(self, tmp_path: Path, agents: list[dict[str, Any]], **extra: Any) -> None:
        super().__init__(tmp_path, agents, **extra)
        self.sent = RecordingTool()

    async def start(self) -> Pipeline:
        self.store = SqliteStore(self.db)
        await self.store.open()
        metrics = Metrics()
        tools, channels = {"rec": self.tool}, {"mail": self.sent, "web": self.sent}
        dispatcher = Dispatcher(
            self.store, lambda: tools, self.config.outbox, metrics, channels=lambda: channels
        )
        self.pipeline = Pipeline(self.config, self.store, metrics, dispatcher)
        self.pipeline.answering_channels.update(("mail", "web"))
        self._task = asyncio.create_task(dispatcher.run())
        await self.pipeline.restore()
        return self.pipeline


def mail(
    text: str, contact: str, ref: str, refs: tuple[str, ...] = (), hint: str = "t1"
) -> InboundMessage:
    return InboundMessage(
        channel="mail",
        channel_type="email",
        external_id=new_ulid(),
        contact_handle=contact,
        text=text,
        subject="Order 1234",
        reply_ref=ref,
        thread_refs=refs,
        conversation_hint=hint,
    )


async def test_a_new_conversation_is_acknowledged_with_its_ticket(tmp_path: Path) -> None:
    h = AnsweringHarness(tmp_path, ROSTER)
    p = await h.start()
    try:
        r = await p.ingest(mail("Where is my parcel?", "dana@example.com", "<m1@example.com>"))
        await p.ingest(
            mail("Any news?", "dana@example.com", "<m2@example.com>", ("<m1@example.com>",))
        )
        await h.settle()
        [ack] = h.sent.deliveries  # the follow-up joins the conversation: no second ack
        assert ack.kind == "ack" and ack.address == "dana@example.com"
        assert ack.payload["ticket"] == r.ticket
        assert ack.payload["in_reply_to"] == "<m1@example.com>"
        assert ack.payload["conversation_hint"] == "t1"  # the channel files the ack's id by it
        assert ack.payload["respond_by"]  # the promise the acknowledgement makes
        # The web channel answers customers too (its widget shows the acknowledgement).
        web = await p.ingest(msg("Where is my order?", "eve", thread="w1"))
        await h.settle()
        assert web.state == "assigned" and len(h.sent.deliveries) == 2
        web_ack = h.sent.deliveries[1]
        assert web_ack.kind == "ack" and web_ack.address == "eve"
        assert web_ack.payload["ticket"] == web.ticket
        assert web_ack.payload["conversation_hint"] == "w1"  # the widget's thread
    finally:
        await h.stop()


async def test_agent_reply_is_relayed_on_the_customers_channel(tmp_path: Path) -> None:
    h = AnsweringHarness(tmp_path, ROSTER)
    p = await h.start()
    try:
        r = await p.ingest(mail("Where is my parcel?", "dana@example.com", "<m1@example.com>"))
        holder = p.scheduler.holder[r.conversation_id]
        other = "bo" if holder == "alice" else "alice"
        reply = AgentAction(
            holder, "reply", conversation_id=r.conversation_id, value="It ships today."
        )
        await p.on_action(
            AgentAction(other, "reply", conversation_id=r.conversation_id, value="Hi")
        )
        await p.on_action(
            AgentAction(holder, "reply", conversation_id=r.conversation_id, value="  ")
        )
        await p.on_action(reply)
        await h.settle()
        replies = [d for d in h.sent.deliveries if d.kind == "reply"]
        assert len(replies) == 1  # not from a non-holder, not an empty one
        assert replies[0].payload["text"] == "It ships today."
        assert replies[0].payload["in_reply_to"] == "<m1@example.com>"
        assert replies[0].address == "dana@example.com"
        assert replies[0].payload["conversation_hint"] == "t1"
    finally:
        await h.stop()


async def test_relabels_are_stored_as_training_corrections(h: Harness) -> None:
    assert h.pipeline is not None and h.store is not None
    r = await h.pipeline.ingest(msg("Could you add a dark mode please?", "dana"))
    await h.pipeline.on_action(
        AgentAction("alice", "relabel", message_id=r.message_id, value="nonsense")
    )
    await h.pipeline.on_action(
        AgentAction("alice", "relabel", message_id=r.message_id, value="complaint")
    )
    await h.pipeline.on_action(
        AgentAction("bo", "relabel", message_id=r.message_id, value="suggestion")
    )
    [record] = await h.store.corrections()  # the latest word per message
    assert record["label"] == "suggestion" and record["agent_id"] == "bo"
    assert (
        record["text"] == "Could you add a dark mode please?" and record["source"] == "correction"
    )


async def test_unsure_messages_go_to_the_triage_queue(tmp_path: Path) -> None:
    agents = [
        {"id": "alice", "capacity": 2, "skills": ["en"]},
        {"id": "sup", "capacity": 2, "skills": ["en"], "queues": ["triage"]},
    ]
    h = Harness(tmp_path, agents, routing={"triage_queue": "triage", "triage_threshold": 0.99})
    p = await h.start()
    try:
        clear = await p.ingest(msg("Where is my order? I need the tracking number please.", "c1"))
        vague = await p.ingest(msg("hm", "c2"))
        await h.settle()
        by_message = {d.payload["message"]["id"]: d for d in h.tool.deliveries}
        assert by_message[vague.message_id].agent_id == "sup"
        assert by_message[vague.message_id].payload["routing"]["queue"] == "triage"
        confidence = by_message[clear.message_id].payload["classification"]["confidence"]
        expected = "triage" if confidence < 0.99 else "default"
        assert by_message[clear.message_id].payload["routing"]["queue"] == expected
    finally:
        await h.stop()


async def test_a_complaint_spike_alerts_the_on_duty_target_once(tmp_path: Path) -> None:
    crisis = {"target": "rec", "address": "duty", "min_complaints": 5, "baseline_floor": 1.0}
    roster = [{"id": "alice", "capacity": 1000, "skills": ["en"]}]
    h = Harness(tmp_path, roster, classifier={"crisis": crisis})
    p = await h.start()
    try:
        for i in range(12):
            await p.ingest(
                msg(f"Terrible service, my parcel {i} is broken and nobody answers!", f"c{i}")
            )
        await h.settle()
        alerts = [d.payload["alert"] for d in h.tool.deliveries if d.kind == "alert"]
        # Near-identical texts from twelve customers are also one same-subject cluster.
        assert sorted(a["reason"] for a in alerts) == ["complaint_rate", "same_subject"]
        assert {a["kind"] for a in alerts} == {"raised"}
        alert = next(a for a in alerts if a["reason"] == "complaint_rate")
        assert alert["evidence"] and alert["count"] >= 5
        assert {d.address for d in h.tool.deliveries if d.kind == "alert"} == {"duty"}
    finally:
        await h.stop()


async def test_a_safety_threat_notifies_the_on_duty_target_at_once(tmp_path: Path) -> None:
    h = Harness(
        tmp_path,
        [{"id": "alice", "capacity": 5, "skills": ["en", "zh"]}],
        classifier={"crisis": {"target": "rec", "address": "duty"}},
    )
    p = await h.start()
    try:
        await p.ingest(msg("Where is my parcel?", "c1"))
        r = await p.ingest(msg("我不想活了，你们再不退款我就跳楼", "c2"))
        await h.settle()
        alerts = [d for d in h.tool.deliveries if d.kind == "alert"]
        assert len(alerts) == 1 and alerts[0].address == "duty"
        alert = alerts[0].payload["alert"]
        assert alert["reason"] == "P0" and alert["ticket"] == r.ticket
        assert "safety" in {s["kind"] for s in alert["signals"]}
    finally:
        await h.stop()


async def test_severity_rules_from_config_override_the_table(tmp_path: Path) -> None:
    rules = [{"signals": ["vip"], "labels": ["inquiry"], "severity": "P1"}]
    h = Harness(
        tmp_path,
        [{"id": "alice", "capacity": 5, "skills": ["en"]}],
        classifier={"vip_contacts": ["boss@example.com"], "severity_rules": rules},
    )
    p = await h.start()
    try:
        await p.ingest(msg("Where can I find my invoice?", "boss@example.com"))
        await p.ingest(msg("Where can I find my invoice?", "someone@example.com"))
        await h.settle()
        vip, other = (d.payload for d in h.tool.deliveries)
        assert vip["classification"]["severity"] == "P1"
        assert other["classification"]["severity"] == "P3"
        due = datetime.fromisoformat(vip["routing"]["sla_deadline"]) - datetime.fromisoformat(
            vip["routing"]["assigned_at"]
        )
        assert due.total_seconds() == pytest.approx(h.config.sla.urgent)
    finally:
        await h.stop()


async def test_restart_primes_the_crisis_baseline_from_the_store(tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    roster = [{"id": "alice", "capacity": 1000, "skills": ["en"]}]
    h1 = Harness(tmp_path, roster)
    h1.clock = lambda: now[0] - 1800  # half an hour ago: inside the baseline window
    p1 = await h1.start()
    for i in range(60):
        await p1.ingest(msg(f"My parcel number {i} arrived broken, this is unacceptable", f"c{i}"))
    await h1.stop()

    h2 = Harness(tmp_path, roster)
    h2.clock = lambda: now[0]
    p2 = await h2.start()
    try:
        assert p2.core.crisis is not None
        baseline = p2.core.crisis.rate()[2]
        # 60 complaints in the hour before: 60/h, above the default floor of 20/h.
        assert baseline == pytest.approx(60.0, rel=0.05)
    finally:
        await h2.stop()


async def test_a_contact_form_ticket_is_confirmed_by_mail_too(tmp_path: Path) -> None:
    # Issue 12: the form's confirmation also goes to the customer's e-mail when an email
    # channel is configured; an ordinary web post gets none there.
    mail_channel = {
        "type": "email",
        "name": "mail",
        "imap": {"host": "127.0.0.1", "tls": "none", "username": "u", "password": "p"},
        "smtp": {"host": "127.0.0.1", "tls": "none", "from_address": "support@shop.test"},
    }
    h = AnsweringHarness(tmp_path, ROSTER, channels=[mail_channel])
    p = await h.start()
    try:
        form = dataclasses.replace(
            msg("Where is my parcel?", "dana@example.com"), confirm_elsewhere=True
        )
        r = await p.ingest(form)
        await p.ingest(msg("And my invoice?", "eve@example.com"))  # a plain API post
        await p.ingest(
            dataclasses.replace(msg("Call me back", "+4915112345678"), confirm_elsewhere=True)
        )
        await h.settle()
        # Every web conversation is acknowledged on the web; the form's also by mail,
        # and the phone number gets nothing more (no SMS channel is configured).
        sent = [(d.kind, d.address, d.payload["ticket"]) for d in h.sent.deliveries]
        assert sent.count(("ack", "dana@example.com", r.ticket)) == 2
        assert len(sent) == 4
    finally:
        await h.stop()
