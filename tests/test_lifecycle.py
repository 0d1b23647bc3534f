"""The ticket lifecycle in-process: statuses, audit, reopen window, close, transfer,
refusals with notices, and the satisfaction survey (real Pipeline, SqliteStore, Dispatcher).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from router.actions import ActionError, parse_action
from router.drivers import AgentAction
from router.metrics import Metrics
from router.outbox import Dispatcher
from router.pipeline import Pipeline
from router.store.sqlite import SqliteStore
from tests.test_pipeline import Harness, RecordingTool, mail, msg
from tests.test_schedule import verdicts_of

DAY = 86400.0
# The agents' tool is declared as MQTT (it sends actions), so refusals come back as notices.
TWO_WAY = [{"type": "mqtt", "name": "rec", "host": "127.0.0.1"}]


class Clock:
    """A clock tests move by hand; starts at the real time so the outbox sends at once."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class LifeHarness(Harness):
    """A pipeline whose agents' tool sends actions, with an answering mail channel and a clock."""

    def __init__(self, tmp_path: Path, agents: list[dict[str, Any]], **extra: Any) -> None:
        extra.setdefault("adapters", TWO_WAY)
        super().__init__(tmp_path, agents, **extra)
        self.sent = RecordingTool()
        self.clock = self.time = Clock()

    async def start(self) -> Pipeline:
        self.store = SqliteStore(self.db)
        await self.store.open()
        metrics = Metrics()
        tools, channels = {"rec": self.tool}, {"mail": self.sent}
        dispatcher = Dispatcher(
            self.store,
            lambda: tools,
            self.config.outbox,
            metrics,
            channels=lambda: channels,
            clock=self.time,
        )
        self.pipeline = Pipeline(self.config, self.store, metrics, dispatcher, clock=self.time)
        self.pipeline.answering_channels.add("mail")
        self._task = asyncio.create_task(dispatcher.run())
        await self.pipeline.restore()
        return self.pipeline

    @property
    def p(self) -> Pipeline:
        assert self.pipeline is not None
        return self.pipeline

    async def events(self, conversation_id: str) -> list[str]:
        assert self.store is not None
        return [e.kind for e in await self.store.ticket_events(conversation_id)]

    async def status(self, conversation_id: str) -> str:
        assert self.store is not None
        view = await self.store.ticket(conversation_id)
        assert view is not None
        return view.status

    def kinds(self, agent_id: str) -> list[str]:
        return [d.kind for d in self.tool.for_agent(agent_id)]

    def notices(self, agent_id: str) -> list[dict[str, Any]]:
        return [d.payload for d in self.tool.for_agent(agent_id) if d.kind == "notice"]


ROSTER = [
    {"id": "alice", "capacity": 2, "skills": ["en"]},
    {"id": "bo", "capacity": 1, "skills": ["zh", "en"]},
    {"id": "carol", "capacity": 2, "queues": ["billing"]},
    {"id": "sam", "capacity": 1, "supervisor": True, "queues": ["escalations"]},
]


async def start(tmp_path: Path, agents: list[dict[str, Any]] = ROSTER, **extra: Any) -> LifeHarness:
    h = LifeHarness(tmp_path, agents, **extra)
    await h.start()
    return h


def act(agent: str, action: str, conversation_id: str = "", value: str = "", **kw: Any) -> Any:
    return AgentAction(agent, action, conversation_id=conversation_id, value=value, **kw)


# -- the walk ------------------------------------------------------------------------------


async def test_a_ticket_walks_its_lifecycle_and_every_step_is_audited(tmp_path: Path) -> None:
    h = await start(tmp_path)
    try:
        p = h.p
        r = await p.ingest(mail("Where is my parcel?", "dana@example.com", "<m1@example.com>"))
        cid = r.conversation_id
        holder = p.scheduler.holder[cid]
        assert await h.status(cid) == "assigned"
        assert await p.act(act(holder, "accept", cid)) == "ok"
        assert await h.status(cid) == "accepted"
        assert await p.act(act(holder, "reply", cid, "It ships today.")) == "ok"
        assert await h.status(cid) == "waiting_on_customer"
        await p.ingest(
            mail("Thanks, and the invoice?", "dana@example.com", "<m2@example.com>", ("<m1>",))
        )
        assert await h.status(cid) == "accepted"  # the customer answered: the agent's turn
        assert await p.act(act(holder, "resolve", cid)) == "ok"
        assert await h.status(cid) == "resolved"
        await h.settle()
        assert await h.events(cid) == [
            "created",
            "assigned",
            "accepted",
            "replied",
            "customer_replied",
            "resolved",
            "survey_sent",
        ]
        assert h.store is not None
        rows = await h.store.ticket_events(cid)
        assert rows[2].actor == holder and rows[0].actor == "customer"
        assert rows[1].detail["agent"] == holder
        [survey] = [d for d in h.sent.deliveries if d.kind == "survey"]
        assert survey.address == "dana@example.com" and survey.payload["ticket"] == r.ticket
        assert "1 (poor) to 5" in survey.payload["text"]
        assert survey.payload["in_reply_to"] == "<m2@example.com>"
    finally:
        await h.stop()


async def test_the_survey_speaks_chinese_to_a_chinese_customer(tmp_path: Path) -> None:
    h = await start(tmp_path)
    try:
        r = await h.p.ingest(
            mail("我的包裹到哪里了？一直没有收到", "li@example.cn", "<z1@example.cn>")
        )
        holder = h.p.scheduler.holder[r.conversation_id]
        await h.p.act(act(holder, "resolve", r.conversation_id))
        await h.settle()
        [survey] = [d for d in h.sent.deliveries if d.kind == "survey"]
        assert survey.payload["language"] == "zh" and "满意" in survey.payload["text"]
    finally:
        await h.stop()


# -- satisfaction --------------------------------------------------------------------------


async def test_a_satisfied_answer_is_the_tickets_score_and_not_a_new_ticket(
    tmp_path: Path,
) -> None:
    h = await start(tmp_path)
    try:
        p = h.p
        r = await p.ingest(mail("Where is my parcel?", "dana@example.com", "<m1@example.com>"))
        holder = p.scheduler.holder[r.conversation_id]
        await p.act(act(holder, "resolve", r.conversation_id))
        await h.settle()
        before = len(h.tool.deliveries)
        answer = mail("5", "dana@example.com", "<m3@example.com>")
        got = await p.ingest(answer)
        again = await p.ingest(answer)  # the mailbox hands it over twice
        await h.settle()
        assert got.conversation_id == r.conversation_id and got.state == "resolved"
        assert again.duplicate
        assert len(h.tool.deliveries) == before  # nobody was given work
        assert p.scheduler.waiting_count() == 0 and r.conversation_id not in p.scheduler.holder
        assert h.store is not None
        view = await h.store.ticket(r.conversation_id)
        assert view is not None and view.score == 5 and view.status == "resolved"
        assert (await h.events(r.conversation_id))[-1] == "survey_answered"
        # The survey is over: the next message is a follow-up (reopens within the window).
        follow = await p.ingest(mail("One more thing", "dana@example.com", "<m4@example.com>"))
        assert follow.conversation_id == r.conversation_id
        assert (await h.events(r.conversation_id))[-1] in ("reopened", "assigned")
    finally:
        await h.stop()


async def test_a_low_answer_reopens_the_ticket_and_flags_it_to_the_supervisor(
    tmp_path: Path,
) -> None:
    h = await start(tmp_path)
    try:
        p = h.p
        r = await p.ingest(mail("我的包裹到哪里了？", "li@example.cn", "<z1@example.cn>"))
        cid = r.conversation_id
        holder = p.scheduler.holder[cid]
        await p.act(act(holder, "resolve", cid))
        got = await p.ingest(mail("不满意", "li@example.cn", "<z2@example.cn>"))
        await h.settle()
        assert got.conversation_id == cid
        assert await h.status(cid) in ("new", "assigned")
        events = await h.events(cid)
        assert events[-3:-1] == ["survey_answered", "reopened"] or events[-2:] == [
            "survey_answered",
            "reopened",
        ]
        assert h.store is not None
        view = await h.store.ticket(cid)
        assert view is not None and view.score == 2 and view.state != "resolved"
        # The answer is work again (the agent sees what the customer said) ...
        assert any(
            d.kind == "assignment" and d.payload["message"]["id"] == got.message_id
            for d in h.tool.deliveries
        )
        # ... and the supervisor is told, on their own tool (no crisis target configured).
        [alert] = [d for d in h.tool.for_agent("sam") if d.kind == "alert"]
        assert alert.payload["alert"]["kind"] == "low_satisfaction"
        assert alert.payload["alert"]["ticket"] == r.ticket
        assert alert.payload["alert"]["score"] == 2
    finally:
        await h.stop()


async def test_a_long_answer_is_a_message_not_a_score(tmp_path: Path) -> None:
    h = await start(tmp_path)
    try:
        r = await h.p.ingest(mail("Where is my parcel?", "dana@example.com", "<m1@x>"))
        await h.p.act(act(h.p.scheduler.holder[r.conversation_id], "resolve", r.conversation_id))
        await h.p.ingest(
            mail("I have another question about my invoice", "dana@example.com", "<m2@x>")
        )
        assert h.store is not None
        view = await h.store.ticket(r.conversation_id)
        assert view is not None and view.score is None and view.state != "resolved"
        assert "survey_answered" not in await h.events(r.conversation_id)
    finally:
        await h.stop()


async def test_no_survey_when_the_lifecycle_says_so(tmp_path: Path) -> None:
    h = await start(tmp_path, lifecycle={"survey": False})
    try:
        r = await h.p.ingest(mail("Where is my parcel?", "dana@example.com", "<m1@x>"))
        await h.p.act(act(h.p.scheduler.holder[r.conversation_id], "resolve", r.conversation_id))
        await h.settle()
        assert not [d for d in h.sent.deliveries if d.kind == "survey"]
        got = await h.p.ingest(mail("1", "dana@example.com", "<m2@x>"))
        assert got.state != "resolved"  # not taken for an answer: routed, the ticket reopened
    finally:
        await h.stop()


async def test_a_pending_survey_survives_a_restart(tmp_path: Path) -> None:
    h = await start(tmp_path)
    r = await h.p.ingest(mail("Where is my parcel?", "dana@example.com", "<m1@x>"))
    await h.p.act(act(h.p.scheduler.holder[r.conversation_id], "resolve", r.conversation_id))
    await h.stop()
    h2 = LifeHarness(tmp_path, ROSTER, adapters=TWO_WAY)
    await h2.start()
    try:
        got = await h2.p.ingest(mail("满意", "dana@example.com", "<m2@x>"))
        assert got.state == "resolved" and got.conversation_id == r.conversation_id
        assert h2.store is not None
        view = await h2.store.ticket(r.conversation_id)
        assert view is not None and view.score == 4
    finally:
        await h2.stop()


# -- reopen window and closing ----------------------------------------------------------


async def test_a_follow_up_reopens_within_the_window_and_starts_anew_after(
    tmp_path: Path,
) -> None:
    h = await start(tmp_path, lifecycle={"reopen_window": DAY, "survey": False})
    try:
        p = h.p
        r = await p.ingest(msg("Where is my order?", "dana", thread="t1"))
        await p.act(act(p.scheduler.holder[r.conversation_id], "resolve", r.conversation_id))
        h.time.now += DAY - 60
        inside = await p.ingest(msg("It still has not come.", "dana", thread="t1"))
        assert inside.conversation_id == r.conversation_id
        assert "reopened" in await h.events(r.conversation_id)
        await p.act(act(p.scheduler.holder[r.conversation_id], "resolve", r.conversation_id))
        h.time.now += DAY + 60
        after = await p.ingest(msg("And now a new question", "dana", thread="t1"))
        assert after.conversation_id != r.conversation_id  # a new ticket
        assert await h.status(r.conversation_id) == "closed"
        assert (await h.events(r.conversation_id))[-1] == "closed"
        assert await h.events(after.conversation_id) == ["created", "assigned"]
    finally:
        await h.stop()


async def test_resolved_tickets_close_after_the_configured_time(tmp_path: Path) -> None:
    h = await start(tmp_path, lifecycle={"close_after": 2 * DAY, "reopen_window": 3 * DAY})
    try:
        p = h.p
        r = await p.ingest(mail("Where is my parcel?", "dana@example.com", "<m1@x>"))
        await p.act(act(p.scheduler.holder[r.conversation_id], "resolve", r.conversation_id))
        h.time.now += DAY
        await p.tick()
        assert await h.status(r.conversation_id) == "resolved"
        h.time.now += DAY + 1
        await p.tick()
        assert await h.status(r.conversation_id) == "closed"
        assert p.core.surveys == {}  # its survey ended with it
        # A closed ticket never reopens (even inside the reopen window): a new one starts.
        again = await p.ingest(mail("4", "dana@example.com", "<m2@x>"))
        assert again.conversation_id != r.conversation_id and again.state != "resolved"
        assert p.metrics.tickets_closed._value.get() == 1
    finally:
        await h.stop()


# -- transfer -----------------------------------------------------------------------------


async def test_the_holder_transfers_to_a_named_agent(tmp_path: Path) -> None:
    h = await start(tmp_path, [{"id": "alice", "capacity": 2}, {"id": "bo", "capacity": 1}])
    try:
        p = h.p
        r = await p.ingest(msg("Where is my order?", "dana"))
        cid = r.conversation_id
        holder = p.scheduler.holder[cid]
        other = "bo" if holder == "alice" else "alice"
        assert await p.act(act(holder, "transfer", cid, f"agent:{other}")) == "ok"
        await h.settle()
        assert p.scheduler.holder[cid] == other
        assert p.scheduler.load[holder] == 0 and p.scheduler.load[other] == 1
        [withdrawn] = [d for d in h.tool.for_agent(holder) if d.kind == "withdrawn"]
        assert withdrawn.payload["message_ids"] == [r.message_id]
        assert f"transferred to agent:{other}" in withdrawn.payload["reason"]
        offered = [d for d in h.tool.for_agent(other) if d.kind == "assignment"]
        assert offered and offered[-1].payload["conversation_id"] == cid
        assert await h.events(cid) == ["created", "assigned", "transferred", "assigned"]
        assert h.store is not None
        rows = await h.store.ticket_events(cid)
        assert rows[2].actor == holder and rows[2].detail["from"] == holder
        # The new holder may now answer and resolve; the old one may not.
        assert await p.act(act(holder, "resolve", cid)) == "rejected"
        assert await p.act(act(other, "resolve", cid)) == "ok"
    finally:
        await h.stop()


async def test_a_transfer_to_an_agent_without_room_is_refused_and_nothing_moves(
    tmp_path: Path,
) -> None:
    h = await start(tmp_path, [{"id": "alice", "capacity": 2}, {"id": "bo", "capacity": 1}])
    try:
        p = h.p
        first = await p.ingest(msg("Where is my order?", "dana"))
        second = await p.ingest(msg("Where is my refund?", "erin"))
        held = {
            p.scheduler.holder[first.conversation_id],
            p.scheduler.holder[second.conversation_id],
        }
        assert held == {"alice", "bo"}  # bo is full now
        cid = (
            first.conversation_id
            if p.scheduler.holder[first.conversation_id] == "alice"
            else second.conversation_id
        )
        await p.on_action(act("alice", "transfer", cid, "agent:bo"))  # from the tool
        await h.settle()
        assert p.scheduler.holder[cid] == "alice"
        [notice] = h.notices("alice")
        assert notice["action"] == "transfer" and notice["outcome"] == "rejected"
        assert "bo has no room" in notice["reason"] and notice["conversation_id"] == cid
        assert (await h.events(cid))[-1] == "refused"
    finally:
        await h.stop()


async def test_transfer_to_a_queue_reaches_its_agents_and_not_the_old_holder(
    tmp_path: Path,
) -> None:
    h = await start(tmp_path)
    try:
        p = h.p
        r = await p.ingest(msg("Where is my order?", "dana"))
        cid = r.conversation_id
        holder = p.scheduler.holder[cid]
        assert await p.act(act(holder, "transfer", cid, "queue:billing")) == "ok"
        await h.settle()
        assert p.scheduler.holder[cid] == "carol"
        assert h.store is not None
        stored = await h.store.message(r.message_id)
        assert stored is not None and stored["queue"] == "billing"
        assert p.metrics.transfers.labels(to="queue")._value.get() == 1
        await p.on_action(act("carol", "transfer", cid, "queue:nowhere"))
        await h.settle()
        assert p.scheduler.holder[cid] == "carol"
        assert "unknown queue nowhere" in h.notices("carol")[-1]["reason"]
    finally:
        await h.stop()


async def test_explain_of_a_ticket_transferred_to_the_queue_says_who_handed_it_on(
    tmp_path: Path,
) -> None:
    h = await start(tmp_path, [{"id": "alice", "capacity": 2}, {"id": "bo", "capacity": 2}])
    try:
        p = h.p
        r = await p.ingest(msg("Where is my order?", "dana"))
        cid = r.conversation_id
        holder = p.scheduler.holder[cid]
        other = "bo" if holder == "alice" else "alice"
        assert await p.act(act(holder, "transfer", cid, "queue:default")) == "ok"
        await h.settle()
        assert p.scheduler.holder[cid] == other
        assert h.store is not None
        stored = await h.store.message(r.message_id)
        assert stored is not None
        explain = stored["assignment"]["explain"]
        verdicts = verdicts_of(explain)
        # The holder passed it on; it never let an offer of it time out.
        assert verdicts == {
            holder: "handed this ticket on",
            other: "chosen (2 of 2 web slots free before)",
        }
    finally:
        await h.stop()


async def test_explain_of_a_ticket_a_supervisor_moved_does_not_blame_its_holder(
    tmp_path: Path,
) -> None:
    roster = [
        {"id": "alice", "capacity": 2},
        {"id": "bo", "capacity": 2},
        {"id": "sam", "capacity": 1, "supervisor": True, "queues": ["escalations"]},
    ]
    h = await start(tmp_path, roster)
    try:
        p = h.p
        r = await p.ingest(msg("Where is my order?", "dana"))
        cid = r.conversation_id
        holder = p.scheduler.holder[cid]
        other = "bo" if holder == "alice" else "alice"
        assert await p.act(act("sam", "transfer", cid, "queue:default")) == "ok"
        await h.settle()
        assert p.scheduler.holder[cid] == other
        assert h.store is not None
        stored = await h.store.message(r.message_id)
        assert stored is not None
        verdicts = verdicts_of(stored["assignment"]["explain"])
        assert verdicts[holder] == "had this ticket until a supervisor transferred it"
    finally:
        await h.stop()


async def test_only_the_holder_or_a_supervisor_may_transfer(tmp_path: Path) -> None:
    h = await start(tmp_path)
    try:
        p = h.p
        r = await p.ingest(msg("Where is my order?", "dana"))
        cid = r.conversation_id
        holder = p.scheduler.holder[cid]
        outsider = "bo" if holder == "alice" else "alice"
        assert await p.act(act(outsider, "transfer", cid, "queue:billing")) == "rejected"
        await p.on_action(act(outsider, "transfer", cid, "queue:billing"))
        await h.settle()
        assert p.scheduler.holder[cid] == holder
        assert h.notices(outsider)[-1]["reason"] == "you do not hold this conversation"
        assert await p.act(act("sam", "transfer", cid, "queue:billing")) == "ok"
        await h.settle()
        assert p.scheduler.holder[cid] == "carol"
        [withdrawn] = [d for d in h.tool.for_agent(holder) if d.kind == "withdrawn"]
        assert "by sam" in withdrawn.payload["reason"]
    finally:
        await h.stop()


async def test_a_transfer_survives_a_restart(tmp_path: Path) -> None:
    h = await start(tmp_path, [{"id": "alice", "capacity": 2}, {"id": "bo", "capacity": 1}])
    r = await h.p.ingest(msg("Where is my order?", "dana"))
    holder = h.p.scheduler.holder[r.conversation_id]
    other = "bo" if holder == "alice" else "alice"
    await h.p.act(act(holder, "transfer", r.conversation_id, f"agent:{other}"))
    await h.stop()
    h2 = LifeHarness(tmp_path, [{"id": "alice", "capacity": 2}, {"id": "bo", "capacity": 1}])
    await h2.start()
    try:
        assert h2.p.scheduler.holder[r.conversation_id] == other
        assert h2.p.scheduler.load[holder] == 0
    finally:
        await h2.stop()


# -- refusals -----------------------------------------------------------------------------


async def test_refused_actions_are_never_applied_and_the_agent_is_told_why(
    tmp_path: Path,
) -> None:
    h = await start(tmp_path)
    try:
        p = h.p
        r = await p.ingest(msg("Where is my order?", "dana"))
        cid = r.conversation_id
        holder = p.scheduler.holder[cid]
        outsider = "bo" if holder == "alice" else "alice"
        # What the MQTT adapter hands over for a body it could not parse.
        try:
            parse_action(
                outsider, b'{"action": "escalate", "conversation_id": "%s"}' % cid.encode()
            )
        except ActionError as exc:
            await p.on_action(exc.as_action(outsider))
        await p.on_action(act(outsider, "resolve", cid))
        await p.on_action(act(outsider, "reply", cid, "Hi"))
        await p.on_action(act(outsider, "relabel", message_id=r.message_id, value="praise"))
        await p.on_action(act(outsider, "transfer", cid, "agent:zed"))
        await p.on_action(act(outsider, "accept", cid))
        await h.settle()
        reasons = [(n["action"], n["reason"]) for n in h.notices(outsider)]
        assert reasons[0][0] == "escalate" and "action must be one of" in reasons[0][1]
        assert reasons[1:] == [
            ("resolve", "you do not hold this conversation"),
            ("reply", "you do not hold this conversation"),
            ("relabel", "relabel needs one of inquiry/complaint/suggestion"),
            ("transfer", "unknown agent zed"),
            ("accept", f"nothing in {r.ticket} is offered to you"),
        ]
        assert all(n["conversation_id"] == cid for n in h.notices(outsider)[:2])
        assert p.scheduler.holder[cid] == holder
        assert not [d for d in h.sent.deliveries if d.kind == "reply"]
        events = await h.events(cid)
        assert events.count("refused") == 6 and "resolved" not in events
        assert p.metrics.actions.labels(action="unknown", outcome="rejected")._value.get() == 1
        assert p.metrics.actions.labels(action="resolve", outcome="rejected")._value.get() == 1
    finally:
        await h.stop()


async def test_a_tool_that_sends_no_actions_never_gets_a_notice(tmp_path: Path) -> None:
    h = await start(tmp_path, adapters=[{"type": "inbox", "name": "rec"}])
    try:
        r = await h.p.ingest(msg("Where is my order?", "dana"))
        holder = h.p.scheduler.holder[r.conversation_id]
        outsider = "bo" if holder == "alice" else "alice"
        await h.p.on_action(act(outsider, "resolve", r.conversation_id))
        await h.settle()
        assert not h.notices(outsider)
        assert (await h.events(r.conversation_id))[-1] == "refused"  # audited all the same
    finally:
        await h.stop()


async def test_presence_and_relabel_are_audited(tmp_path: Path) -> None:
    h = await start(tmp_path)
    try:
        r = await h.p.ingest(msg("Where is my order?", "dana"))
        assert await h.p.act(act("bo", "presence", value="away")) == "ok"
        assert (
            await h.p.act(act("bo", "relabel", message_id=r.message_id, value="complaint")) == "ok"
        )
        assert await h.p.act(act("zed", "presence", value="on")) == "rejected"
        assert h.store is not None
        assert (await h.events(r.conversation_id))[-1] == "relabelled"
        agent_rows = await h.store.ticket_events("")
        assert [(e.kind, e.actor, e.detail.get("presence")) for e in agent_rows][:1] == [
            ("presence", "bo", "away")
        ]
        assert agent_rows[-1].kind == "refused" and agent_rows[-1].actor == "zed"
    finally:
        await h.stop()


@pytest.mark.parametrize(
    ("text", "score"),
    [
        ("5", 5),
        ("1", 1),
        (" 4/5 ", 4),
        ("３", 3),
        ("满意", 4),
        ("不满意", 2),
        ("非常满意！", 5),
        ("非常不满意", 1),
        ("Yes, thanks", 4),
        ("no", 2),
        ("not satisfied", 2),
        ("6", None),
        ("I know the answer is in the invoice", None),
        ("Where is my parcel? It has been a week and nobody answers me at all", None),
    ],
)
def test_survey_answers_are_read_as_scores(text: str, score: int | None) -> None:
    from router.lifecycle import parse_score

    assert parse_score(text) == score


def test_a_negated_answer_is_not_read_as_its_word() -> None:
    # "not good" used to score 4 (the word matched, the negation was ignored).
    from router.lifecycle import parse_score

    assert parse_score("not good") == 2
    assert parse_score("Not really satisfied.") == 2
    assert parse_score("never great") == 2
    assert parse_score("not bad") == 3
    assert parse_score("不好") == 2
    assert parse_score("很好") == 5
    assert parse_score("good, thanks") == 4


def test_a_new_question_is_never_taken_for_a_survey_answer() -> None:
    # "你好" (hello) held 好 (good): a customer's next question after a resolve was
    # recorded as a satisfied answer and never routed (the crash test caught it).
    from router.lifecycle import parse_score

    assert parse_score("你好，请问周末营业时间是几点到几点？") is None
    assert parse_score("请问订单12什么时候发货？") is None
    assert parse_score("is it ok?") is None
    assert parse_score("差价怎么算") is None
    assert parse_score("好") == 4 and parse_score("很好") == 5 and parse_score("不好") == 2
