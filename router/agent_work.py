"""What agents do: accept, reply, resolve, transfer, relabel, presence, applied to the router.

Every two-way agent tool parses its transport into an `AgentAction` (router/actions.py)
and hands it here through the pipeline's action sink; the ops API and the CLI do the
same for agents on tools that cannot send actions.

An action is applied whole or not at all. One that is not applied (unknown, malformed,
not the agent's to take, impossible here) is refused with a reason: the refusal is
audited in `ticket_events`, and when the action came from a tool that sends actions the
agent's tool gets a `notice` delivery saying why (router/delivery.py). Every applied
action is audited by the store in the transaction that applies it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import structlog

from router.actions import ACTIONS, Action
from router.core import Core
from router.delivery import (
    ChannelTarget,
    NoticePayload,
    ReplyPayload,
    SurveyPayload,
    ToolTarget,
    WithdrawnPayload,
)
from router.drivers import AgentAction, Presence, tool_sends_actions
from router.explain import HANDED_ON, TRANSFERRED
from router.lifecycle import EventKind, survey_question
from router.model import LABELS, new_ulid, ticket_number
from router.queue_work import QueueWork, work_from_stored
from router.schedule import Work
from router.store import OutboxItem, TicketEvent

log = structlog.get_logger("router.pipeline")

NOT_YOURS = "you do not hold this conversation"
NOT_OPEN = "the ticket is not open (unknown, resolved or closed)"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What became of an action: ok, rejected or unsupported, and why when not ok."""

    outcome: str
    reason: str = ""


OK = Verdict("ok")


class Refusal(Exception):
    """An action that is not applied; the message is the reason the agent is told."""

    def __init__(self, reason: str, outcome: str = "rejected") -> None:
        super().__init__(reason)
        self.reason = reason
        self.outcome = outcome


class AgentWork:
    """Applies agents' actions, refusing with a reason what it cannot apply."""

    def __init__(self, core: Core, queues: QueueWork) -> None:
        """Work on the shared core."""
        self.core = core
        self.queues = queues

    async def apply(self, action: AgentAction, *, notify: bool = False) -> Verdict:
        """Apply one action; refuse it with a reason (and a notice when notify) if it cannot be."""
        conversation_id = action.conversation_id
        try:
            if action.refused:
                raise Refusal(action.refused)  # the tool could not parse it
            if not conversation_id and action.message_id:
                stored = await self.core.store.message(action.message_id)
                conversation_id = stored["conversation_id"] if stored else ""
            core = self.core
            if (
                conversation_id
                and core.store.shared
                and core.scheduler.holder.get(conversation_id) != action.agent_id
            ):
                # Another instance may have given the agent this ticket a moment ago and
                # its notice not arrived yet: read the ticket's state before refusing.
                await core.refresh_conversation(conversation_id)
            await self._apply(action, conversation_id)
        except Refusal as refusal:
            verdict = Verdict(refusal.outcome, refusal.reason)
            await self._refused(action, conversation_id, verdict, notify)
            return verdict
        return OK

    async def _apply(self, action: AgentAction, conversation_id: str) -> None:
        """Dispatch one action; raise Refusal when it is not applied."""
        core = self.core
        now = core.clock()
        match action.action:
            case Action.PRESENCE:
                await self._presence(action, now)
            case Action.ACCEPT:
                if not conversation_id:
                    raise Refusal(_unknown(action))
                if not await self.accept(conversation_id, action.agent_id, now):
                    raise Refusal(f"nothing in {ticket_number(conversation_id)} is offered to you")
            case Action.RESOLVE:
                await self._resolve(action, conversation_id)
            case Action.RELABEL:
                if action.value not in LABELS:
                    raise Refusal(f"relabel needs one of {'/'.join(LABELS)}")
                if not action.message_id:
                    raise Refusal("relabel needs the message_id of the message it corrects")
                if not await core.store.record_correction(
                    action.message_id, action.value, action.agent_id, now
                ):
                    raise Refusal(f"unknown message {action.message_id}")
            case Action.REPLY:
                await self._reply(action, conversation_id, now)
            case Action.TRANSFER:
                await self._transfer(action, conversation_id, now)
            case _:
                raise Refusal(f"unknown action {action.action!r}; one of {sorted(ACTIONS)}")

    async def accept(self, conversation_id: str, agent_id: str, now: float) -> bool:
        """Record that the agent took the conversation up; False if it holds none."""
        core = self.core
        if not conversation_id or not await core.store.accept(conversation_id, agent_id, now):
            return False
        core.scheduler.accept_slot(conversation_id, agent_id)
        return True

    async def _presence(self, action: AgentAction, now: float) -> None:
        """Put the agent on line, away or off line, and audit it."""
        if action.value not in tuple(Presence):
            raise Refusal('presence needs "on", "away" or "off"')
        if not await self.queues.set_presence(
            action.agent_id, action.value == Presence.ON, away=action.value == Presence.AWAY
        ):
            raise Refusal(f"unknown agent {action.agent_id}")
        await self.core.store.record_event(
            TicketEvent(
                "", now, EventKind.PRESENCE, action.agent_id, "", {"presence": action.value}
            )
        )

    async def _resolve(self, action: AgentAction, conversation_id: str) -> None:
        """Close the conversation the agent holds; ask the customer for satisfaction."""
        core = self.core
        key = core.threads.key_of(conversation_id) if conversation_id else None
        if key is None:
            raise Refusal(NOT_OPEN)
        # Under the thread's lock, so a follow-up cannot be routed to the holder (sticky)
        # while the close commits and then lose its slot to release(); and outside any
        # drain, so a message being handed out is not closed unseen.
        async with core.threads.lock(key), core.drain_lock:
            if core.scheduler.holder.get(conversation_id) != action.agent_id:
                # Only the holder may close a conversation; an unheld one is waiting for
                # an agent (a stale resolve after a reopen, say).
                raise Refusal(NOT_YOURS)
            waiting = core.scheduler.waiting_in(conversation_id)
            if waiting:
                # The customer wrote again while the holder could not take it (away, off
                # shift): closing now would close that message unseen.
                raise Refusal(
                    f"the customer wrote again: {len(waiting)} message(s) of this ticket "
                    "wait for an agent; answer them before resolving"
                )
            # Read under the lock too: a follow-up may not slip in between (see above).
            lifecycle = core.config.lifecycle
            survey = await self._survey_item(conversation_id) if lifecycle.survey else None
            now = core.clock()
            until = now + lifecycle.survey_window
            holder = await core.store.resolve_conversation(
                conversation_id, now, actor=action.agent_id, survey=survey, survey_until=until
            )
            if holder is None:
                raise Refusal(NOT_OPEN)
            core.scheduler.release(conversation_id)
            # The store closed its waiting messages too (the holder was away and nobody
            # else had room): they leave the queue with it.
            dropped = core.scheduler.drop_conversation(conversation_id)
            if dropped:
                log.warning(
                    "pipeline.resolved_with_waiting_messages",
                    conversation_id=conversation_id,
                    message_ids=dropped,
                )
            core.threads.closed(key, conversation_id)
            if survey is not None:
                core.surveys[key] = (conversation_id, until)
                core.dispatcher.submit(survey)
        await self.queues.drain()
        core.update_gauges()

    async def _survey_item(self, conversation_id: str) -> OutboxItem | None:
        """Return the satisfaction question for the customer, when their channel answers."""
        core = self.core
        context = await core.store.reply_context(conversation_id)
        if context is None or context["channel"] not in core.answering_channels:
            return None
        now = core.clock()
        language = "zh" if context["language"] == "zh" else "en"
        reply_ref = context["reply_ref"]
        return OutboxItem(
            id=new_ulid(),
            target=ChannelTarget(context["channel"]),
            agent_id="",
            address=context["handle"],
            payload=SurveyPayload(
                conversation_id=conversation_id,
                subject=context["subject"],
                text=survey_question(language, ticket_number(conversation_id)),
                language=language,
                contact_name=context["name"],
                in_reply_to=reply_ref,
                references=(*context["thread_refs"], reply_ref) if reply_ref else (),
                conversation_hint=context["thread_key"].partition("\x1f")[2],
            ),
            message_id=context["message_id"],
            next_attempt_at=now,
            created_at=now,
        )

    async def _reply(self, action: AgentAction, conversation_id: str, now: float) -> None:
        """Send an agent's answer to the customer, on the channel the customer wrote from."""
        core = self.core
        text = action.value.strip()
        if not text:
            raise Refusal("a reply needs text")
        if not conversation_id:
            raise Refusal(_unknown(action))
        context = await core.store.reply_context(conversation_id)
        if context is None or context["state"] != "open":
            raise Refusal(NOT_OPEN)
        if context["agent_id"] != action.agent_id:
            raise Refusal(NOT_YOURS)  # only the agent holding the conversation answers in it
        if context["channel"] not in core.answering_channels:
            raise Refusal(
                f"the customer's channel {context['channel']} cannot carry answers", "unsupported"
            )
        reply_ref = context["reply_ref"]
        item = OutboxItem(
            id=new_ulid(),
            target=ChannelTarget(context["channel"]),
            agent_id=action.agent_id,
            address=context["handle"],
            payload=ReplyPayload(
                conversation_id=conversation_id,
                subject=context["subject"],
                text=text,
                language=context["language"],
                contact_name=context["name"],
                in_reply_to=reply_ref,
                references=(*context["thread_refs"], reply_ref) if reply_ref else (),
                conversation_hint=context["thread_key"].partition("\x1f")[2],
            ),
            message_id=context["message_id"],
            next_attempt_at=now,
            created_at=now,
        )
        # The answer, the accept it implies and the waiting-on-customer status commit at once.
        if not await core.store.reply(conversation_id, action.agent_id, item, now):
            raise Refusal(NOT_YOURS)
        core.dispatcher.submit(item)
        core.scheduler.accept_slot(conversation_id, action.agent_id)

    async def _transfer(self, action: AgentAction, conversation_id: str, now: float) -> None:
        """Move a conversation to a named agent (`agent:bob`) or a queue (`queue:billing`).

        Only the holder or a supervisor may. The holder's slot is freed and their tool
        told (`withdrawn`); a named agent gets the offer at once, through the scheduler's
        checks (on line, skills, room) — without room the transfer is refused and the
        conversation stays where it was, so nobody's work waits on one busy colleague;
        a queue's agents get it as any waiting work, the old holder left out.
        """
        core = self.core
        kind, _, name = action.value.partition(":")
        if kind not in ("agent", "queue") or not name:
            raise Refusal("transfer needs value agent:<agent id> or queue:<queue name>")
        key = core.threads.key_of(conversation_id) if conversation_id else None
        if key is None:
            raise Refusal(NOT_OPEN)
        if kind == "queue" and name not in self._queues():
            raise Refusal(f"unknown queue {name}")
        if kind == "agent" and name not in {a.id for a in core.config.agents}:
            raise Refusal(f"unknown agent {name}")
        actor = core.scheduler.states.get(action.agent_id)
        supervisor = actor is not None and actor.agent.supervisor
        context = await core.store.reply_context(conversation_id)
        latest = await core.store.stored_message(context["message_id"]) if context else None
        if latest is None:
            raise Refusal(NOT_OPEN)
        async with core.threads.lock(key), core.drain_lock:
            holder = core.scheduler.holder.get(conversation_id)
            if holder != action.agent_id and not supervisor:
                raise Refusal(NOT_YOURS)
            if kind == "agent":
                if name == holder:
                    raise Refusal(f"{name} already holds this conversation")
                probe = work_from_stored(latest)
                why = core.scheduler.transfer_refusal(probe, name, now)
                if why is not None:
                    raise Refusal(why)
            notice = self._withdrawn(holder, conversation_id, action, now) if holder else None
            ids = await core.store.transfer(
                conversation_id,
                action.agent_id,
                action.value,
                name if kind == "queue" else None,
                now,
                notice,
            )
            if not ids:
                raise Refusal(NOT_OPEN)
            core.scheduler.release(conversation_id)
            core.scheduler.drop_conversation(conversation_id)
            works: list[Work] = []
            for message_id in ids:
                stored = await core.store.stored_message(message_id)
                if stored is not None:
                    work = work_from_stored(stored)
                    if holder and kind == "queue":
                        # Handed off: not straight back to them. Who moved it decides
                        # how explain words it (a supervisor may take it from them).
                        why = HANDED_ON if holder == action.agent_id else TRANSFERRED
                        work.exclude(holder, why)
                    works.append(work)
            if notice is not None:
                core.dispatcher.submit(_with_ids(notice, ids))
            placed = False
            if kind == "agent" and works:
                decision = core.scheduler.assign_to(works[0], name, now)
                if decision is not None:
                    placed = await self.queues.commit(decision) is True
                if not placed:
                    log.warning("transfer.not_placed", conversation_id=conversation_id, to=name)
            for work in works[1:] if placed else works:
                core.scheduler.submit(work)
        core.metrics.child(core.metrics.transfers, kind).inc()
        log.info(
            "ticket.transferred",
            ticket=ticket_number(conversation_id),
            by=action.agent_id,
            frm=holder,
            to=action.value,
        )
        await self.queues.drain()
        core.update_gauges()

    def _queues(self) -> set[str]:
        """Return every queue (department) the config names."""
        config = self.core.config
        r = config.routing
        named = {q for a in config.agents for q in a.queues} | set(r.queues.values())
        named |= {rule.queue for rule in r.rules} | {"default"}
        return named | {q for q in (r.escalation_queue, r.triage_queue) if q}

    def _withdrawn(
        self, holder: str, conversation_id: str, action: AgentAction, now: float
    ) -> OutboxItem | None:
        """Return the notice that tells the old holder's tool the conversation left them."""
        state = self.core.scheduler.states.get(holder)
        if state is None or not state.agent.tool:
            return None
        by = "" if action.agent_id == holder else f" by {action.agent_id}"
        return OutboxItem(
            id=new_ulid(),
            target=ToolTarget(state.agent.tool),
            agent_id=holder,
            address=state.agent.address or holder,
            payload=WithdrawnPayload(
                conversation_id=conversation_id,
                message_ids=(),
                reason=f"transferred to {action.value}{by}",
            ),
            message_id="",
            next_attempt_at=now,
            created_at=now,
        )

    async def _refused(
        self, action: AgentAction, conversation_id: str, verdict: Verdict, notify: bool
    ) -> None:
        """Audit a refused action and, for a tool that sends actions, tell the agent why."""
        core = self.core
        now = core.clock()
        name = action.action if action.action in ACTIONS else "unknown"
        cid = conversation_id if len(conversation_id) <= 64 else ""
        await core.store.record_event(
            TicketEvent(
                cid,
                now,
                EventKind.REFUSED,
                action.agent_id,
                "",
                {"action": name, "outcome": verdict.outcome, "reason": verdict.reason},
            )
        )
        state = core.scheduler.states.get(action.agent_id)
        if not notify or state is None or not state.agent.tool:
            return
        if not self._sends_actions(state.agent.tool):
            return  # a tool that cannot act cannot have sent this: nobody to tell there
        await core.send_now(
            [
                OutboxItem(
                    id=new_ulid(),
                    target=ToolTarget(state.agent.tool),
                    agent_id=action.agent_id,
                    address=state.agent.address or action.agent_id,
                    payload=NoticePayload(
                        action=action.action[:64],
                        outcome=verdict.outcome,
                        reason=verdict.reason,
                        conversation_id=cid,
                        message_id=action.message_id[:64],
                    ),
                    message_id="",
                    next_attempt_at=now,
                    created_at=now,
                )
            ]
        )

    def _sends_actions(self, tool: str) -> bool:
        """Tell whether the named agent tool sends actions back (declared on its class)."""
        for section in self.core.config.adapters:
            if section.name == tool:
                return tool_sends_actions(section.type, section)
        return False


def _unknown(action: AgentAction) -> str:
    """Return the reason for an action that names no known conversation or message."""
    if action.message_id:
        return f"unknown message {action.message_id[:64]}"
    return "the action names no conversation_id or message_id"


def _with_ids(item: OutboxItem, ids: list[str]) -> OutboxItem:
    """Return the withdrawn notice as the store committed it (naming the messages)."""
    payload = item.payload
    if isinstance(payload, WithdrawnPayload):
        return replace(item, payload=replace(payload, message_ids=tuple(ids)))
    return item
