"""Routing with other instances on one store: each keeps a replica, the store decides.

Each instance routes from its own memory (scheduler, threads) exactly as one instance
alone does. What the others change reaches it through the store: a change notice
(PostgreSQL LISTEN/NOTIFY, sent in the transaction of every routing change) or, as a
fallback, a look every `interval` seconds, makes it read the routing view (open
conversations and who holds them, queued messages, presence, complaint streaks), fold
it into its memory, and place what waits. The store arbitrates every decision: an
assignment of a message no longer queued, to an agent with no room left, or one that
would split a conversation from its holder is refused in the same transaction. A stale
replica costs a refused attempt, never a double assignment or an overfilled agent.

The replica adds what the store shows at once; it forgets what it has and the store
does not (a slot, a waiting message, a holder) only when two looks at least `_SETTLE`
seconds apart agree, because a change of this instance's own may sit between its
decision and its commit when the store is read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable

import structlog

from router.core import Core
from router.queue_work import QueueWork
from router.schedule import Returned, Work
from router.store import RoutingView

log = structlog.get_logger("router.shared")

# How long something must be missing from the store before this replica forgets it.
_SETTLE = 2.0
# Assignments older than this do not count towards an agent's complaint streak here.
_STREAK_WINDOW = 12 * 3600.0


class SharedRouting:
    """Keeps this instance's routing memory in step with the other instances'."""

    def __init__(
        self, core: Core, queues: QueueWork, *, interval: float = 5.0, min_gap: float = 0.05
    ) -> None:
        self.core = core
        self.queues = queues
        self.interval = interval  # the fallback look when no notice comes
        self.min_gap = min_gap  # notices closer than this fold into one look
        self._wake = asyncio.Event()
        core.resync_soon = self.notice
        self._missing: dict[Hashable, float] = {}  # what the store lacks, since when
        self.resyncs = 0
        self.adopted = 0  # messages and conversations learnt from other instances
        self.forgotten = 0

    def notice(self) -> None:
        """Another instance changed something: look at the store soon."""
        self._wake.set()

    async def run(self) -> None:
        """Look at the store whenever told to, and every `interval` seconds anyway."""
        self.core.store.on_change(self.notice)
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass
            self._wake.clear()
            await self.resync()
            await asyncio.sleep(self.min_gap)

    async def resync(self) -> None:
        """Read the routing view, fold it into memory, and place what can be placed."""
        core = self.core
        policy = core.scheduler.policy
        depth = max(policy.complaint_streak_limit, 1) + 1
        view = await core.store.routing_view(
            policy.streak_labels, depth, time.time() - _STREAK_WINDOW
        )
        async with core.drain_lock:
            now = core.clock()
            returned = self.apply(view, now)
            for back in returned:
                await self.queues.take_back(back, now)
        self.resyncs += 1
        await self.queues.drain()
        core.update_gauges()

    def apply(self, view: RoutingView, now: float) -> list[Returned]:
        """Fold the view into the scheduler and threads; return offers presence took back."""
        sched, threads = self.core.scheduler, self.core.threads
        seen: set[Hashable] = set()
        open_here = {c.conversation_id: c for c in view.open_conversations}
        for conv in view.open_conversations:
            threads.opened((conv.channel, conv.thread_key), conv.conversation_id)
            slot = conv.conversation_id
            holder = sched.holder.get(slot)
            if not conv.agent_id or conv.agent_id not in sched.states:
                continue
            if holder is None:
                sched.hold(slot, slot, conv.agent_id, conv.channel_type)
                self.adopted += 1
            elif holder != conv.agent_id and self._settled(("moved", slot), now, seen):
                sched.release(slot)  # transferred by another instance
                sched.hold(slot, slot, conv.agent_id, conv.channel_type)
        for slot in list(sched.holder):
            if slot not in open_here and self._settled(("closed", slot), now, seen):
                sched.release(slot)  # resolved or closed by another instance
                thread = threads.key_of(slot)
                if thread is not None:
                    threads.closed(thread, slot)
                self.forgotten += 1
        queued = {q.message_id for q in view.queued}
        for work in sched.waiting():
            if work.id not in queued and self._settled(("placed", work.id), now, seen):
                sched.withdraw(work.id)  # assigned (or closed) by another instance
                self.forgotten += 1
        for q in view.queued:
            if sched.knows(q.message_id):
                continue
            sched.submit(
                Work(
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
            )
            self.adopted += 1
        returned: list[Returned] = []
        for agent_id, present in view.presence.items():
            state = sched.states.get(agent_id)
            if state is not None and state.online != present and not state.away:
                returned += sched.set_presence(agent_id, present, now)
        for agent_id, (streak, last) in view.streaks.items():
            state = sched.states.get(agent_id)
            if state is not None and last >= state.last_assigned:
                # The store saw this agent's latest assignment (made here or elsewhere).
                state.streak = streak
                state.last_assigned = last
        # Anything not missing any more starts its clock afresh next time.
        for key in [k for k in self._missing if k not in seen]:
            del self._missing[key]
        return returned

    def _settled(self, key: Hashable, now: float, seen: set[Hashable]) -> bool:
        """Whether `key` has been missing from the store for at least _SETTLE seconds."""
        seen.add(key)
        since = self._missing.setdefault(key, now)
        if now - since >= _SETTLE:
            del self._missing[key]
            return True
        return False
