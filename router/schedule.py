"""The first load-aware scheduler: capacity, least loaded among eligible, sticky conversations.

Load is the number of *open conversations* an agent holds (closed ones free their
slot at once, the complaint users have about other helpdesks). No agent is ever given
a conversation beyond capacity: a message that finds nobody with room waits in its
queue, ordered by severity then SLA deadline, and is handed out the moment a slot
frees (resolve, presence on, capacity raised by a reload).

This object is pure, synchronous state: the pipeline reserves a slot here, commits,
and releases the slot again if the commit fails.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from router.model import Agent


@dataclass(order=True)
class Waiting:
    """A queued message; ordered by severity, then deadline, then arrival."""

    severity: str
    sla_deadline: float
    seq: int
    message_id: str = field(compare=False)
    conversation_id: str = field(compare=False)
    queue: str = field(compare=False)
    language: str = field(compare=False)
    label: str = field(compare=False)
    ingested_at: float = field(compare=False)


@dataclass(frozen=True, slots=True)
class Choice:
    """Who gets a message and why."""

    agent: Agent
    reason: str
    new_slot: bool  # False for a follow-up in a conversation the agent already holds
    # The agent who held the conversation before it moved here (holder away), so that
    # undo() can give it back; None for a conversation nobody held.
    previous: str | None = None
    # Whether the choice rests on a reservation not committed yet (its own new slot, or
    # the holder's slot another message reserved and has not committed): such a choice
    # must end in commit() or undo().
    tentative: bool = False


@dataclass(slots=True)
class _Reservation:
    """A slot taken by choose() whose assignment is not committed yet."""

    agent_id: str
    previous: str | None
    users: int  # choices resting on it that are neither committed nor undone


class Scheduler:
    """Assigns conversations to agents within their capacity."""

    def __init__(self, agents: Iterable[Agent] = ()) -> None:
        self.agents: dict[str, Agent] = {}
        self.load: dict[str, int] = {}
        self.holder: dict[str, str] = {}  # open conversation id -> agent id
        # agent id -> tick of its last new slot (the rotation tiebreak)
        self.last_assigned: dict[str, int] = {}
        self._tick = itertools.count(1)
        self._seq = itertools.count()
        # conversation id -> its uncommitted reservation. A sticky choice made on it (a
        # follow-up, a dequeued message) keeps the slot even if the reserving message
        # turns out a duplicate: whichever commits first makes the slot real.
        self._pending: dict[str, _Reservation] = {}
        self._waiting: dict[str, list[Waiting]] = {}  # queue -> heap
        self._waiting_ids: set[str] = set()
        self.set_roster(agents)

    # -- roster ------------------------------------------------------------------

    def set_roster(self, agents: Iterable[Agent]) -> None:
        """Replace the roster; agents who stay keep their load, removed ones get no more work."""
        self.agents = {a.id: a for a in agents}
        for agent_id in self.agents:
            self.load.setdefault(agent_id, 0)

    def set_presence(self, agent_id: str, present: bool) -> bool:
        """Mark an agent present or away; False for an unknown agent."""
        agent = self.agents.get(agent_id)
        if agent is None:
            return False
        self.agents[agent_id] = _replace_presence(agent, present)
        return True

    # -- decisions ---------------------------------------------------------------

    def choose(self, conversation_id: str, queue: str, language: str) -> Choice | None:
        """Pick an agent for a message and reserve the slot; None means it must wait."""
        holder_id = self.holder.get(conversation_id)
        if holder_id is not None:
            holder = self.agents.get(holder_id)
            if holder is not None and holder.present:
                # The conversation already occupies one of the holder's slots.
                pending = self._pending.get(conversation_id)
                if pending is not None:
                    pending.users += 1
                return Choice(
                    holder,
                    "sticky: agent already holds this conversation",
                    new_slot=False,
                    tentative=pending is not None,
                )
        agent, reason = self._least_loaded(queue, language)
        if agent is None:
            return None
        previous = self.holder.get(conversation_id)
        self._take(agent.id, conversation_id)
        self._pending[conversation_id] = _Reservation(agent.id, previous, users=1)
        return Choice(agent, reason, new_slot=True, previous=previous, tentative=True)

    def _least_loaded(self, queue: str, language: str) -> tuple[Agent | None, str]:
        serving = [a for a in self.agents.values() if a.present and queue in a.queues]
        with_room = [a for a in serving if self.load.get(a.id, 0) < a.capacity]
        if not with_room:
            return None, ""
        skilled = [a for a in with_room if language in a.skills]
        pool = skilled or with_room
        best = min(
            pool,
            key=lambda a: (
                self.load.get(a.id, 0) / a.capacity,
                self.last_assigned.get(a.id, 0),
                a.id,
            ),
        )
        load = self.load.get(best.id, 0)
        skill_note = f"speaks {language}" if skilled else "no agent with room speaks " + language
        return best, f"least loaded in {queue} ({load}/{best.capacity} before), {skill_note}"

    def _take(self, agent_id: str, conversation_id: str) -> None:
        previous = self.holder.get(conversation_id)
        if previous is not None and previous != agent_id:
            # The holder went away: the conversation moves, and so does its slot.
            self.load[previous] = max(0, self.load.get(previous, 0) - 1)
        self.load[agent_id] = self.load.get(agent_id, 0) + 1
        self.holder[conversation_id] = agent_id
        self.last_assigned[agent_id] = next(self._tick)

    def commit(self, conversation_id: str, choice: Choice) -> None:
        """Confirm a choice whose assignment is committed: its slot is the agent's now."""
        if choice.tentative:
            self._pending.pop(conversation_id, None)

    def undo(self, conversation_id: str, choice: Choice) -> None:
        """Drop a choice whose commit failed or was a duplicate.

        The slot is given back only when no other choice resting on the same
        reservation committed or is still in flight.
        """
        if not choice.tentative:
            return
        pending = self._pending.get(conversation_id)
        if pending is None:
            return  # another message committed on this reservation: the slot is real
        pending.users -= 1
        if pending.users > 0:
            return
        del self._pending[conversation_id]
        if self.holder.get(conversation_id) != pending.agent_id:
            return
        del self.holder[conversation_id]
        self.load[pending.agent_id] = max(0, self.load.get(pending.agent_id, 0) - 1)
        if pending.previous is not None and pending.previous != pending.agent_id:
            # The conversation had moved away from an absent holder: it is theirs again
            # (the store still says so), and so is the slot.
            self.holder[conversation_id] = pending.previous
            self.load[pending.previous] = self.load.get(pending.previous, 0) + 1

    def move(self, old_conversation_id: str, new_conversation_id: str) -> None:
        """Re-key a reservation when the store joined the message to another conversation."""
        self._pending.pop(old_conversation_id, None)
        if old_conversation_id in self.holder and old_conversation_id != new_conversation_id:
            agent_id = self.holder.pop(old_conversation_id)
            if new_conversation_id in self.holder:
                # The conversation already had a holder: the extra slot is not needed.
                self.load[agent_id] = max(0, self.load.get(agent_id, 0) - 1)
            else:
                self.holder[new_conversation_id] = agent_id

    def release(self, conversation_id: str) -> str | None:
        """Free the slot of a resolved conversation; return its agent."""
        self._pending.pop(conversation_id, None)
        agent_id = self.holder.pop(conversation_id, None)
        if agent_id is not None:
            self.load[agent_id] = max(0, self.load.get(agent_id, 0) - 1)
        return agent_id

    def drop_conversation(self, conversation_id: str) -> list[str]:
        """Remove a conversation's waiting messages (it was resolved); return their ids."""
        dropped: list[str] = []
        for queue, heap in self._waiting.items():
            keep = [w for w in heap if w.conversation_id != conversation_id]
            if len(keep) != len(heap):
                dropped += [w.message_id for w in heap if w.conversation_id == conversation_id]
                heapq.heapify(keep)
                self._waiting[queue] = keep
        self._waiting_ids.difference_update(dropped)
        return dropped

    def restore(self, conversation_id: str, agent_id: str) -> None:
        """Count an open conversation found in the store at startup."""
        if conversation_id not in self.holder:
            self.holder[conversation_id] = agent_id
            self.load[agent_id] = self.load.get(agent_id, 0) + 1

    # -- waiting queues ----------------------------------------------------------

    def enqueue(
        self,
        message_id: str,
        conversation_id: str,
        queue: str,
        severity: str,
        sla_deadline: float,
        language: str,
        label: str,
        ingested_at: float,
    ) -> None:
        """Put a message in its queue to wait for a free slot."""
        if message_id in self._waiting_ids:
            return
        self._waiting_ids.add(message_id)
        heapq.heappush(
            self._waiting.setdefault(queue, []),
            Waiting(
                severity,
                sla_deadline,
                next(self._seq),
                message_id,
                conversation_id,
                queue,
                language,
                label,
                ingested_at,
            ),
        )

    def next_assignable(self) -> list[tuple[Waiting, Choice]]:
        """Pop waiting messages that can be placed now and reserve their slots."""
        placed: list[tuple[Waiting, Choice]] = []
        for queue, heap in self._waiting.items():
            blocked: list[Waiting] = []
            while heap:
                w = heapq.heappop(heap)
                choice = self.choose(w.conversation_id, queue, w.language)
                if choice is None:
                    blocked.append(w)
                    # The head could not be placed; others in this queue compete for the
                    # same agents, except follow-ups of held conversations.
                    continue
                self._waiting_ids.discard(w.message_id)
                placed.append((w, choice))
            for w in blocked:
                heapq.heappush(heap, w)
        return placed

    def requeue(self, w: Waiting) -> None:
        """Put back a waiting message whose assignment did not commit."""
        self._waiting_ids.add(w.message_id)
        heapq.heappush(self._waiting.setdefault(w.queue, []), w)

    def queue_depths(self) -> dict[str, int]:
        """Return the number of waiting messages per queue."""
        return {q: len(h) for q, h in self._waiting.items()}

    def waiting(self, queue: str) -> list[Waiting]:
        """Return a queue's waiting messages in the order they will be served."""
        return sorted(self._waiting.get(queue, []))


def _replace_presence(agent: Agent, present: bool) -> Agent:
    return replace(agent, present=present)
