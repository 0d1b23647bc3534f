"""What agents do: accept, resolve, reply, relabel, presence, applied to the router's state.

Every two-way agent tool parses its transport into an `AgentAction` (router/actions.py)
and hands it here through the pipeline's action sink; the ops API and the CLI do the
same for agents on tools that cannot send actions.
"""

from __future__ import annotations

import structlog

from router.actions import Action
from router.core import Core
from router.delivery import ChannelTarget, ReplyPayload
from router.drivers import AgentAction, Presence
from router.model import LABELS, new_ulid
from router.queue_work import QueueWork
from router.store import OutboxItem

log = structlog.get_logger("router.pipeline")


class AgentWork:
    """Applies agents' actions; each answer is ok, rejected, unsupported (or error)."""

    def __init__(self, core: Core, queues: QueueWork) -> None:
        """Work on the shared core."""
        self.core = core
        self.queues = queues

    async def apply(self, action: AgentAction) -> str:
        """Apply one action and return its outcome."""
        core = self.core
        now = core.clock()
        conversation_id = action.conversation_id
        if not conversation_id and action.message_id:
            stored = await core.store.message(action.message_id)
            conversation_id = stored["conversation_id"] if stored else ""
        match action.action:
            case Action.PRESENCE:
                if action.value not in tuple(Presence):
                    return "rejected"
                ok = await self.queues.set_presence(
                    action.agent_id,
                    action.value == Presence.ON,
                    away=action.value == Presence.AWAY,
                )
                return "ok" if ok else "rejected"
            case Action.ACCEPT:
                ok = await self.accept(conversation_id, action.agent_id, now)
                return "ok" if ok else "rejected"
            case Action.RESOLVE:
                return await self._resolve(action, conversation_id)
            case Action.RELABEL:
                if action.value not in LABELS or not action.message_id:
                    return "rejected"
                ok = await core.store.record_correction(
                    action.message_id, action.value, action.agent_id, now
                )
                return "ok" if ok else "rejected"
            case Action.REPLY:
                return await self._reply(action, conversation_id, now)
        return "unsupported"

    async def accept(self, conversation_id: str, agent_id: str, now: float) -> bool:
        """Record that the agent took the conversation up; False if it holds none."""
        core = self.core
        if not conversation_id or not await core.store.accept(conversation_id, agent_id, now):
            return False
        core.scheduler.accept_slot(conversation_id, agent_id)
        return True

    async def _resolve(self, action: AgentAction, conversation_id: str) -> str:
        """Close the conversation the agent holds."""
        core = self.core
        key = core.threads.key_of(conversation_id) if conversation_id else None
        if key is None:
            return "rejected"  # not an open conversation
        # Under the thread's lock, so a follow-up cannot be routed to the holder (sticky)
        # while the close commits and then lose its slot to release(); and outside any
        # drain, so a message being handed out is not closed unseen.
        async with core.threads.lock(key), core.drain_lock:
            if core.scheduler.holder.get(conversation_id) != action.agent_id:
                # Only the holder may close a conversation; an unheld one is waiting for
                # an agent (a stale resolve after a reopen, say).
                return "rejected"
            holder = await core.store.resolve_conversation(conversation_id, core.clock())
            if holder is None:
                return "rejected"
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
        await self.queues.drain()
        core.update_gauges()
        return "ok"

    async def _reply(self, action: AgentAction, conversation_id: str, now: float) -> str:
        """Send an agent's answer to the customer, on the channel the customer wrote from."""
        core = self.core
        text = action.value.strip()
        if not conversation_id or not text:
            return "rejected"
        context = await core.store.reply_context(conversation_id)
        if context is None or context["agent_id"] != action.agent_id:
            return "rejected"  # only the agent holding the conversation answers in it
        if context["channel"] not in core.answering_channels:
            return "unsupported"  # this channel cannot carry answers
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
        await core.send_now([item])
        # Answering is taking the conversation up: no accept timeout after that.
        await self.accept(conversation_id, action.agent_id, now)
        return "ok"
