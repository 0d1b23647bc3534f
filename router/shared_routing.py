"""Routing with other instances on one store: each keeps a replica, the store decides.

Each instance routes from its own memory (scheduler, threads) exactly as one instance
alone does. What the others change reaches it through the store: PostgreSQL's triggers
send a notice (LISTEN/NOTIFY, on commit) naming each conversation whose state, holder
or messages changed and each agent whose presence changed; the instance then reads
those conversations (their open state, holder and queued messages), presence and
complaint streaks, folds them into its memory, and places what waits. A whole look
runs every `whole_interval` seconds and after the listener reconnects (notices sent
meanwhile are lost).

The store arbitrates every decision: an assignment of a message no longer queued, to
an agent with no room left, or one that would split a conversation from its holder is
refused in the same transaction. A stale replica costs a refused attempt, never a
double assignment or an overfilled agent.

The replica adds what the store shows at once. A waiting message the store no longer
lists is forgotten at once when it was queued here before the look began (its queued
state was committed before the read). A slot or a holder the store does not show is
forgotten at once when another instance's notice named its conversation and no message
of its thread is being routed here; otherwise only when two looks at least `_SETTLE`
seconds apart agree, because this instance decides an assignment before it commits
it, and the read may fall between.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from router.core import Core
from router.queue_work import QueueWork, work_from_queued
from router.schedule import Returned
from router.store import RoutingView

log = structlog.get_logger("router.shared")

# How long something must be missing from the store before this replica forgets it.
_SETTLE = 2.0
# Assignments older than this do not count towards an agent's complaint streak here.
_STREAK_WINDOW = 12 * 3600.0
# Missing keys are (what, conversation id) pairs.
_Key = tuple[str, str]


class SharedRouting:
    """Keeps this instance's routing memory in step with the other instances'."""

    def __init__(
        self,
        core: Core,
        queues: QueueWork,
        *,
        whole_interval: float = 30.0,
        min_gap: float = 0.02,
    ) -> None:
        self.core = core
        self.queues = queues
        self.whole_interval = whole_interval  # a whole look at least this often
        self.min_gap = min_gap  # notices closer than this fold into one look
        self._wake = asyncio.Event()
        self._next_whole = 0.0  # the first look is a whole one
        core.resync_soon = self.notice
        core.refresh_conversation = self.refresh
        self._missing: dict[_Key, float] = {}  # what the store lacks, since when

    def notice(self) -> None:
        """Another instance changed something (or a decision was refused): look soon."""
        self._wake.set()

    async def run(self) -> None:
        """Look at the store whenever told to, and at least every `whole_interval`."""
        self.core.store.on_change(self.notice)
        while True:
            # Something waiting to settle is looked at again once it can have.
            wait = _SETTLE if self._missing else self.whole_interval
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except TimeoutError:
                pass
            self._wake.clear()
            await self.resync()
            await asyncio.sleep(self.min_gap)

    async def resync(self) -> None:
        """Read what changed (or everything), fold it into memory, place what can be."""
        core = self.core
        changed = core.store.take_changes()
        whole = changed is None or time.monotonic() >= self._next_whole
        scope: frozenset[str] | None = None
        notified: frozenset[str] = frozenset()
        if not whole:
            assert changed is not None
            notified = changed
            scope = changed | {conversation for _, conversation in self._missing}
        else:
            self._next_whole = time.monotonic() + self.whole_interval
        await self._look(scope, notified)
        await self.queues.drain()
        core.update_gauges()

    async def refresh(self, conversation_id: str) -> None:
        """Look at one conversation now: an agent acts on it here before a notice came."""
        await self._look(frozenset({conversation_id}), frozenset({conversation_id}))

    async def _look(self, scope: frozenset[str] | None, notified: frozenset[str]) -> None:
        """Read the view of `scope` (None: everything) and fold it in."""
        core = self.core
        policy = core.scheduler.policy
        depth = max(policy.complaint_streak_limit, 1) + 1
        # Read under the drain lock: no placement of this instance's commits between the
        # read and the fold (intake's own decisions are told apart by their threads).
        async with core.drain_lock:
            # Work submitted here before this mark was committed as queued before the
            # view is read: if the view does not list it, another instance placed it.
            mark = core.scheduler.mark()
            wall = time.time()
            view = await core.store.routing_view(
                policy.streak_labels,
                depth,
                wall - _STREAK_WINDOW,
                scope,
                None if scope is not None else wall - policy.rate_window,
            )
            now = core.clock()
            returned = self.apply(view, now, mark, notified)
            for back in returned:
                await self.queues.take_back(back, now)

    def apply(
        self, view: RoutingView, now: float, mark: int, notified: frozenset[str] = frozenset()
    ) -> list[Returned]:
        """Fold the view into the scheduler and threads; return offers presence took back.

        `mark` (from `Scheduler.mark` before the view was read) tells the waiting work
        the view must show if it still waits; `notified`, the conversations other
        instances' notices named. A view scoped to some conversations (`view.scope`)
        says nothing about the others.
        """
        sched, threads = self.core.scheduler, self.core.threads
        scope = view.scope
        seen: set[_Key] = set()
        open_here = {c.conversation_id: c for c in view.open_conversations}
        for conv in view.open_conversations:
            threads.opened((conv.channel, conv.thread_key), conv.conversation_id)
            slot = conv.conversation_id
            holder = sched.holder.get(slot)
            if holder == conv.agent_id:
                continue
            if holder is None:
                if conv.agent_id in sched.states:
                    sched.hold(slot, slot, conv.agent_id, conv.channel_type)
            elif self._known_change(slot, notified) or self._settled(("moved", slot), now, seen):
                # Held here, but by nobody (its messages wait again) or by someone else
                # (transferred) in the store: the store is right.
                sched.release(slot)
                if conv.agent_id in sched.states:
                    sched.hold(slot, slot, conv.agent_id, conv.channel_type)
        for slot in list(sched.holder):
            if scope is not None and slot not in scope:
                continue
            if slot not in open_here and (
                self._known_change(slot, notified) or self._settled(("closed", slot), now, seen)
            ):
                sched.release(slot)  # resolved or closed by another instance
                thread = threads.key_of(slot)
                if thread is not None:
                    threads.closed(thread, slot)
        queued = {q.message_id for q in view.queued}
        for work in sched.waiting():
            if scope is not None and work.conversation not in scope:
                continue
            if work.id not in queued and work.seq < mark:
                sched.withdraw(work.id)  # assigned (or closed) by another instance
        for q in view.queued:
            if sched.knows(q.message_id):
                continue
            sched.submit(work_from_queued(q))
        if scope is None:
            # What the store counts beyond the slots held here is other instances' work
            # not yet folded in: it counts against the agents' room (never left stale).
            loads: dict[tuple[str, str], int] = {}
            for conv in view.open_conversations:
                if conv.agent_id:
                    key = (conv.agent_id, conv.channel_type)
                    loads[key] = loads.get(key, 0) + 1
            sched.sync_external(loads)
        returned: list[Returned] = []
        for agent_id, present in view.presence.items():
            state = sched.states.get(agent_id)
            if state is not None and state.online != present and not state.away:
                returned += sched.set_presence(agent_id, present, now)
        if view.arrivals:
            sched.note_arrivals(view.arrivals, self.core.scheduler.policy.rate_window, now)
        for agent_id, (streak, last) in view.streaks.items():
            state = sched.states.get(agent_id)
            if state is not None and last >= state.last_assigned:
                # The store saw this agent's latest assignment (made here or elsewhere).
                sched.note_streak(agent_id, streak, last)
        # What the view covered and found in place again starts its clock afresh.
        for key in [k for k in self._missing if k not in seen]:
            if scope is None or key[1] in scope:
                del self._missing[key]
        return returned

    def _known_change(self, slot: str, notified: frozenset[str]) -> bool:
        """Whether the store's word on this slot needs no second look.

        True when another instance's notice named the conversation (so the store
        changed it) and no message of its thread is being routed here right now (so no
        decision of this instance on it can be between its choice and its commit).
        """
        if slot not in notified:
            return False
        thread = self.core.threads.key_of(slot)
        return thread is None or not self.core.threads.busy(thread)

    def _settled(self, key: _Key, now: float, seen: set[_Key]) -> bool:
        """Whether `key` has been missing from the store for at least _SETTLE seconds."""
        seen.add(key)
        since = self._missing.setdefault(key, now)
        if now - since >= _SETTLE:
            del self._missing[key]
            return True
        return False
