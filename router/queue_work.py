"""Waiting work: hand queued messages to agents with room, take back lapsed offers.

Everything here runs under the core's drain lock, so a placement never races a
presence change, a resolve or an offer taken back.
"""

from __future__ import annotations

import structlog

from router.alerts import Alerts
from router.core import Core
from router.delivery import ToolTarget, WithdrawnPayload, assignment_payload
from router.explain import OFFER_LAPSED
from router.intake import log_routed, make_assignment
from router.model import Agent, new_ulid, ticket_number
from router.schedule import Decision, Returned, Work
from router.store import OutboxItem, QueuedMessage, StoredMessage

log = structlog.get_logger("router.pipeline")


def work_from_stored(stored: StoredMessage) -> Work:
    """Return the scheduler's view of a stored message."""
    cls = stored.classification
    return Work(
        id=stored.message_id,
        slot=stored.conversation_id,
        conversation=stored.conversation_id,
        label=cls.label,
        severity=cls.severity,
        channel_type=stored.inbound.channel_type,
        language=cls.language,
        department=stored.queue,
        arrival=stored.ingested_at,
        deadline=stored.sla_deadline,
    )


def work_from_queued(q: QueuedMessage, excluded: set[str] | None = None) -> Work:
    """Return the scheduler's view of a message the store lists as queued."""
    return Work(
        excluded=excluded,
        id=q.message_id,
        slot=q.conversation_id,
        conversation=q.conversation_id,
        label=q.label,
        severity=q.severity,
        channel_type=q.channel_type,
        language=q.language,
        department=q.queue,
        arrival=q.ingested_at,
        deadline=q.sla_deadline,
    )


class QueueWork:
    """Places waiting messages, and puts back offers nobody took up."""

    def __init__(self, core: Core, alerts: Alerts) -> None:
        """Work on the shared core."""
        self.core = core
        self.alerts = alerts
        self._next_close_check = 0.0  # the first tick looks for tickets to close

    async def commit(self, choice: Decision) -> bool | None:
        """Commit one decision made under the drain lock (held by the caller).

        True if placed, False if dropped, None if the message waits again.
        """
        return await self._assign_waiting(choice)

    async def drain(self) -> int:
        """Assign waiting messages to agents who have room now; return how many."""
        core = self.core
        async with core.drain_lock:
            placed = 0
            retry_later = False
            while not retry_later:
                batch = core.scheduler.dispatch(core.clock())
                if not batch:
                    break
                for choice in batch:
                    outcome = await self._assign_waiting(choice)
                    if outcome is True:
                        placed += 1
                    elif outcome is None:
                        # Requeued after a store error: asking again at once would spin
                        # on the same message; the queue tick tries again shortly.
                        retry_later = True
            if placed:
                core.update_gauges()
            return placed

    async def _assign_waiting(self, choice: Decision) -> bool | None:
        """Commit one dequeued assignment: True if placed, False if dropped, None if requeued."""
        core = self.core
        w = choice.work
        try:
            stored = await core.store.stored_message(w.id)
        except Exception as exc:
            # Give the slot back and keep the message waiting, as for a failed assign below.
            core.scheduler.undo(choice)
            log.warning("pipeline.assign_failed", message_id=w.id, error=str(exc))
            return None
        if stored is None:
            core.scheduler.undo(choice, requeue=False)
            return False
        now = core.clock()
        assignment = make_assignment(
            core, choice, w.conversation, f"dequeued: {choice.reason}", now
        )
        agent = choice.agent
        # Rebuilt from the typed store read: the same delivery the agent would have had
        # on arrival (the customer's name included).
        delivery = OutboxItem(
            id=new_ulid(),
            target=ToolTarget(agent.tool),
            agent_id=agent.id,
            address=agent.address or agent.id,
            payload=assignment_payload(stored.inbound, stored.classification, assignment, now),
            message_id=w.id,
            next_attempt_at=now,
            created_at=now,
        )
        try:
            ok = await core.store.assign(assignment, delivery)
        except Exception as exc:
            core.scheduler.undo(choice)
            log.warning("pipeline.assign_failed", message_id=w.id, error=str(exc))
            return None
        if not ok:
            # Assigned elsewhere meanwhile, or the agent's last slot was taken by another
            # worker: the store says which by the message's state.
            core.scheduler.undo(choice, requeue=False)
            again = await core.store.message(w.id)
            if again is not None and again.get("state") == "queued":
                if core.store.shared:
                    core.resync_soon()  # the replica of the others' work catches up
                else:
                    core.scheduler.sync_external(await core.store.open_loads())
                core.scheduler.submit(w)
                return None
            return False
        m = core.metrics
        m.assigned.labels(queue=w.department, how="dequeued").inc()
        within = "yes" if now <= w.deadline else "no"
        m.child(m.wait_seconds, w.label, within).observe(now - w.arrival)
        core.dispatcher.submit(delivery)
        log_routed(
            stored.inbound,
            w.id,
            w.conversation,
            stored.classification,
            w.department,
            choice,
            "assigned",
            waited=now - w.arrival,
        )
        return True

    async def tick(self) -> None:
        """Move time on: accept timeouts, SLA breaches and overflow, crisis detectors."""
        core = self.core
        now = core.clock()
        async with core.drain_lock:
            returned, breached = core.scheduler.tick(now)
            for back in returned:
                await self.take_back(back, now)
        for work in breached:
            await self.alerts.breach(work, now)
        if returned or breached:
            await self.drain()
            core.update_gauges()
        if core.crisis is not None:
            await self.alerts.crisis(core.crisis.tick(now), now)
        if now >= self._next_close_check:
            await self.close_resolved(now)

    async def close_resolved(self, now: float) -> list[str]:
        """Close tickets resolved longer than `[lifecycle] close_after`; return their ids."""
        core = self.core
        lifecycle = core.config.lifecycle
        self._next_close_check = now + lifecycle.close_check_interval
        closed: list[str] = []
        while True:
            batch = await core.store.close_resolved(now - lifecycle.close_after, now, 500)
            closed.extend(batch)
            if len(batch) < 500:
                break
        if closed:
            done = set(closed)
            # Their surveys end with them: a later message starts a new ticket.
            for key in [k for k, (cid, _) in core.surveys.items() if cid in done]:
                del core.surveys[key]
            core.metrics.tickets_closed.inc(len(closed))
            log.info("tickets.closed", count=len(closed))
        for key in [k for k, (_, until) in core.surveys.items() if until < now]:
            del core.surveys[key]  # unanswered in time
        return closed

    async def set_presence(self, agent_id: str, present: bool, *, away: bool = False) -> bool:
        """Put an agent on line, away (no new work, keeps its offers) or off line (its
        unaccepted offers go back); False if the agent is unknown."""
        core = self.core
        if agent_id not in core.scheduler.states or not await core.store.set_presence(
            agent_id, present
        ):
            return False
        now = core.clock()
        # Under the drain lock: a drain must not hand out a returned message before the
        # store has it queued again (its assign would fail and drop it from memory).
        async with core.drain_lock:
            for back in core.scheduler.set_presence(
                agent_id, present, now, away=away and not present
            ):
                await self.take_back(back, now)
        core.update_gauges()
        await self.drain()
        return True

    async def take_back(self, back: Returned, now: float) -> None:
        """Return an offer the agent let time out (or left by going off line) to the queue."""
        core = self.core
        work = back.work
        ids = await core.store.withdraw_offer(work.id, back.agent_id, now, back.why)
        if not ids:
            # Accepted or resolved in the store meanwhile: it stays with the agent.
            core.scheduler.withdraw(work.id)
            if core.threads.is_open(work.conversation):
                core.scheduler.hold(work.slot, work.conversation, back.agent_id, work.channel_type)
            return
        core.metrics.child(core.metrics.taken_back, back.why).inc()
        state = core.scheduler.states.get(back.agent_id)
        if state is not None:
            # Tell the agent's tool, so the offer leaves their list (they may be back).
            await core.send_now([_withdrawn_item(state.agent, work, ids, back.why, now)])
        log.warning(
            f"assignment.{back.why}",
            message_id=work.id,
            ticket=ticket_number(work.conversation),
            agent=back.agent_id,
            queue=work.department,
        )
        for message_id in ids:
            if message_id == work.id:
                continue  # the scheduler put this one back itself
            stored = await core.store.stored_message(message_id)
            if stored is not None:
                follow = work_from_stored(stored)
                if back.why == "timeout":
                    # A follow-up that had joined the lapsed offer of its conversation.
                    follow.exclude(back.agent_id, OFFER_LAPSED)
                core.scheduler.submit(follow)


def _withdrawn_item(
    agent: Agent, work: Work, message_ids: list[str], why: str, now: float
) -> OutboxItem:
    """Return a notice to the agent's tool that offers were taken back from them."""
    return OutboxItem(
        id=new_ulid(),
        target=ToolTarget(agent.tool),
        agent_id=agent.id,
        address=agent.address or agent.id,
        payload=WithdrawnPayload(
            conversation_id=work.conversation,
            message_ids=tuple(message_ids),
            reason="not accepted in time" if why == "timeout" else "you went off line",
        ),
        message_id=work.id,
        next_attempt_at=now,
        created_at=now,
    )
