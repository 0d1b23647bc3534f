"""The load-aware scheduler: who gets which message, and when.

One engine serves the daemon and `omnirouter simulate` (which drives it on a virtual
clock), so what the simulation proves is what production runs. It is pure,
synchronous state: every method takes `now` from its caller and nothing here sleeps,
reads a clock or touches the store.

How a decision is made:

* **Waiting order.** P0/P1 work comes before everything; then earliest deadline first
  (the deadline is arrival + the class's SLA), then arrival order.
* **Eligibility.** An agent takes a message only when on line, in shift, with a free
  slot for the message's channel type, skilled in its class and language, serving its
  department, and not the agent who already let this message time out. Overflow steps
  widen the last three for work waiting past its deadline.
* **Choice among the eligible.** The agent who has the conversation open (sticky),
  unless that agent is at its complaint streak limit and someone under it has room;
  else agents under their complaint streak limit (rotation), agents who have not let
  work time out lately, and agents without a scarce skill (a complaint specialist is
  kept for complaints while a generalist can take an inquiry); then the most spare
  capacity, then the longest since their last assignment, so quick agents are not
  punished with all the work.
* **Urgent reserve.** Where complaint specialists are a scarce pool (some agents for
  the channel type cannot take complaints), non-urgent work leaves the pool's last
  `urgent_reserve` slots free for P0/P1 work; a complaint may take one only once it
  has spent `reserve_slack` of its SLA waiting and can still make its deadline (the
  reserve is spent only on work it can save; later work waits for an ordinary slot).
* **Slots.** Assigned-but-not-accepted work holds a slot as accepted work does. An
  offer not accepted within the accept timeout goes back to the queue (and never to
  the same agent again); an agent going off line, or whose shift ends, gives back what
  it had not accepted (an agent set away keeps it).

The daemon keys a slot by conversation (a follow-up joins the open conversation's
slot); the simulator keys it by message. Either way `slot` names what holds capacity.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from router.model import Agent

URGENT_SEVERITIES = ("P0", "P1")
# Above this many agents, explain records count the plainly unavailable ones by reason.
EXPLAIN_LIST_LIMIT = 50
_PLAINLY_OUT = ("off line", "off shift", "full", "takes no")
# Overflow widenings, applied in the order configured.
WIDEN_DEPARTMENTS = "departments"  # any department's agents may take it
WIDEN_LANGUAGES = "languages"  # agents who do not list its language may take it
WIDEN_SUPERVISORS = "supervisors"  # supervisors may take it whatever their skills


@dataclass(frozen=True, slots=True)
class OverflowStep:
    """After `after` seconds past its deadline, a waiting message's eligibility widens."""

    after: float
    widen: str


@dataclass(frozen=True, slots=True)
class Policy:
    """The knobs of the scheduler (from `[scheduling]` or a simulation trace)."""

    accept_timeout: float = 120.0  # 0 turns accept tracking off
    complaint_streak_limit: int = 3  # 0 turns rotation off
    streak_labels: frozenset[str] = frozenset({"complaint"})
    # Classes whose skilled agents are scarce: such agents are kept for them while an
    # agent without the skill can take other work, until that work is at risk.
    protected_labels: frozenset[str] = frozenset({"complaint"})
    # At-risk point, as a share of the message's SLA already spent waiting.
    reserve_slack: float = 0.75
    # An agent who let an offer time out is offered work last for this long.
    unreliable_for: float = 1800.0
    # Slots per channel type that non-urgent work of a protected class leaves free
    # among its eligible agents for P0/P1 work, until it is at risk itself (trunk
    # reservation: urgent complaints then find a slot within seconds, not a handle time).
    urgent_reserve: int = 1
    overflow: tuple[OverflowStep, ...] = ()


@dataclass(slots=True, eq=False)
class Work:
    """One message that needs (or holds) an agent."""

    id: str
    slot: str  # what holds capacity: the conversation (daemon) or the message (simulator)
    conversation: str
    label: str
    severity: str
    channel_type: str
    language: str
    department: str
    arrival: float
    deadline: float
    seq: int = 0
    excluded: set[str] | None = None  # agents who let it time out
    level: int = 0  # overflow steps applied
    breached: bool = False
    state: str = "new"  # new | waiting | offered | held | done

    @property
    def urgent(self) -> bool:
        """Tell whether the message is P0/P1 (it goes ahead of all deadlines)."""
        return self.severity in URGENT_SEVERITIES

    def order(self) -> tuple[int, float, int]:
        """Return the waiting order key: urgency, deadline, arrival."""
        rank = 0 if self.severity == "P0" else 1 if self.severity == "P1" else 2
        return (rank, self.deadline, self.seq)


@dataclass(slots=True)
class AgentState:
    """An agent as the scheduler sees it: roster facts plus live load."""

    agent: Agent
    online: bool
    used: dict[str, int] = field(default_factory=dict)  # channel type -> slots held
    last_assigned: float = -math.inf
    streak: int = 0  # complaints received in a row
    last_timeout: float = -math.inf
    protected: bool = False  # skilled in a protected class
    away: bool = False  # off line by choice for a while: keeps its offers (not persisted)
    # Slots per pool that other workers hold (seen in the store, not decided here).
    external: dict[str, int] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """Return the agent's id."""
        return self.agent.id

    def capacity(self, channel_type: str) -> int:
        """Return how many conversations of this channel type the agent may hold."""
        caps = self.agent.capacities
        if caps:
            return caps.get(channel_type, caps.get("*", 0))
        return self.agent.capacity

    def pool(self, channel_type: str) -> str:
        """Return the key its slots of this channel type are counted under.

        Without a per-type table the capacity is one pool shared by every type.
        """
        return channel_type if self.agent.capacities else "*"

    def room(self, channel_type: str) -> int:
        """Return the agent's free slots for this channel type."""
        pool = self.pool(channel_type)
        return self.capacity(channel_type) - self.used.get(pool, 0) - self.external.get(pool, 0)

    @property
    def load(self) -> int:
        """Return the slots held over all channel types."""
        return sum(self.used.values())


@dataclass(slots=True)
class Decision:
    """An assignment the scheduler made, and why."""

    work: Work
    agent: Agent
    # sticky | balance | rotation | rotation-break | reliability | reserve |
    # reserve-released (the baselines name themselves: least_loaded, round_robin, random)
    rule: str
    reason: str  # one line for logs and the routing record
    new_slot: bool = True
    explain: dict[str, Any] | None = None
    # The absent holder the conversation moved from (and its slot's channel type), so
    # that undo() can give it back; None for a conversation nobody held.
    previous: tuple[str, str] | None = None
    # How many follow-ups had joined the slot when it was taken: undo() keeps a slot
    # that a later follow-up joined (that one may have committed already).
    mark: int = 0

    @property
    def agent_id(self) -> str:
        """Return the chosen agent's id."""
        return self.agent.id


@dataclass(slots=True)
class Offer:
    """Work assigned to an agent and not accepted yet."""

    work: Work
    agent_id: str
    expires: float


@dataclass(frozen=True, slots=True)
class Returned:
    """Work taken back from an agent: `timeout` or `returned` (off line / off shift)."""

    work: Work
    agent_id: str
    why: str


class Scheduler:
    """Assigns waiting work to agents within their capacity."""

    def __init__(
        self, agents: Iterable[Agent] = (), policy: Policy | None = None, *, explain: bool = False
    ) -> None:
        self.policy = policy or Policy()
        # Whether each decision records every agent's verdict (the daemon's `explain`);
        # the simulator and benchmarks leave it off, it costs a pass over the roster.
        self.explain = explain
        self.states: dict[str, AgentState] = {}
        self.holder: dict[str, str] = {}  # slot -> agent id
        self._slot_ct: dict[str, str] = {}  # slot -> channel type it holds
        self._last_agent: dict[str, str] = {}  # conversation -> agent who had it last
        self._open: dict[str, int] = {}  # conversation -> slots its last agent holds of it
        self._conv_of: dict[str, str] = {}  # slot -> its conversation
        self._free: dict[str, set[str]] = {}  # channel type -> on-line agents with room
        self._buckets: dict[tuple[str, str, str, str, int], list[tuple[Any, ...]]] = {}
        self._buckets_by_ct: dict[str, set[tuple[str, str, str, str, int]]] = {}
        self._waiting: dict[str, Work] = {}  # message id -> waiting work
        self._followups: set[str] = set()  # waiting work whose slot is held already
        # department -> waiting count, kept as work comes and goes: the pipeline reads
        # it per message, and counting a long backlog each time would cost O(backlog).
        self._depth: dict[str, int] = {}
        self._by_slot: dict[str, set[str]] = {}  # slot -> its waiting message ids
        self._joined: dict[str, int] = {}  # slot -> follow-ups that joined it
        self._offers: dict[str, Offer] = {}  # message id -> outstanding offer
        self._timers: list[tuple[float, int, str, str]] = []  # (at, seq, kind, message id)
        self._seq = itertools.count()
        self._plain_cache: dict[tuple[str, str, str, str], bool] = {}
        self._pool_cache: dict[tuple[str, str, str, str], int] = {}
        self._any_shifts = False
        self._skill_sets: dict[tuple[str, str, str], set[str]] = {}
        self._known_languages: set[str] = set()
        self.decisions = 0
        # Whether a timed-out message avoids the agent who let it time out (the
        # baselines in router.sim.baselines forget, as the helpdesks they model do).
        self.remember_timeouts = True
        self.sticky = True
        self.set_roster(agents)

    # -- roster and presence -------------------------------------------------------

    @property
    def agents(self) -> dict[str, Agent]:
        """Return the roster by id (with current presence)."""
        return {a: s.agent for a, s in self.states.items()}

    @property
    def load(self) -> dict[str, int]:
        """Return the slots each agent holds, all channel types together."""
        return {a: s.load for a, s in self.states.items()}

    def set_roster(self, agents: Iterable[Agent]) -> None:
        """Replace the roster; agents who stay keep their load, removed ones get no more work."""
        new = {a.id: a for a in agents}
        for agent_id, state in list(self.states.items()):
            if agent_id not in new:
                if state.load:
                    # Keeps its held work (it finishes it) but takes nothing new.
                    state.online = False
                    state.agent = replace(state.agent, present=False)
                else:
                    del self.states[agent_id]
        for agent in new.values():
            known = self.states.get(agent.id)
            if known is None:
                self.states[agent.id] = AgentState(agent, online=agent.present)
            else:
                known.agent = agent
                known.online = agent.present
        protected = self.policy.protected_labels
        for state in self.states.values():
            classes = state.agent.classes
            state.protected = bool(classes and classes & protected)
        self._any_shifts = any(s.agent.shifts for s in self.states.values())
        self._known_languages = {lang for s in self.states.values() for lang in s.agent.languages}
        self._skill_sets.clear()
        self._reindex()

    def set_presence(
        self, agent_id: str, online: bool, now: float = 0.0, *, away: bool = False
    ) -> list[Returned]:
        """Turn an agent on or off line; off line returns the offers it had not accepted.

        Away takes no new work either but keeps its offers (their accept clocks run on).
        Raises KeyError for an unknown agent.
        """
        state = self.states[agent_id]
        state.online = online
        state.away = away and not online
        state.agent = replace(state.agent, present=online)
        returned: list[Returned] = []
        if not online and not away:
            for offer in [o for o in self._offers.values() if o.agent_id == agent_id]:
                returned.append(self._take_back(offer, "returned", now, exclude=False))
        self._reindex()
        return returned

    def _reindex(self) -> None:
        self._plain_cache.clear()
        self._pool_cache.clear()
        types = set(self._free) | set(self._buckets_by_ct)
        for state in self.states.values():
            types.update(state.agent.capacities)
        self._free = {ct: set() for ct in types}
        for ct in types:
            free = self._free[ct]
            for state in self.states.values():
                if state.online and state.room(ct) > 0:
                    free.add(state.id)

    def _refresh_free(self, state: AgentState, channel_type: str) -> None:
        types = [channel_type] if state.agent.capacities else list({channel_type, *self._free})
        for ct in types:
            self._ensure_type(ct)
            free = self._free[ct]
            if state.online and state.room(ct) > 0:
                free.add(state.id)
            else:
                free.discard(state.id)

    # -- intake ----------------------------------------------------------------------

    def submit(self, work: Work) -> None:
        """Put a message in the waiting set (dispatch() hands it out)."""
        if work.id in self._waiting or work.id in self._offers:
            return
        work.seq = next(self._seq)
        work.state = "waiting"
        self._waiting[work.id] = work
        self._depth[work.department] = self._depth.get(work.department, 0) + 1
        self._by_slot.setdefault(work.slot, set()).add(work.id)
        if work.slot in self.holder:
            # A follow-up of a held conversation: it joins the holder's slot as soon as
            # the holder is on line, room or not (dispatch() looks at these first).
            self._followups.add(work.id)
        if not work.breached:
            self._timer(work.deadline, "deadline", work.id)
        elif work.level < len(self.policy.overflow):
            # Back from an offer after its deadline: widening goes on where it stopped.
            step = self.policy.overflow[work.level]
            self._timer(work.deadline + step.after, "overflow", work.id)
        self._push(work)

    def _push(self, work: Work) -> None:
        key = (work.label, work.language, work.channel_type, work.department, work.level)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = []
            self._ensure_type(work.channel_type)
            self._buckets_by_ct.setdefault(work.channel_type, set()).add(key)
        heapq.heappush(bucket, (*self.order(work), work))

    def order(self, work: Work) -> tuple[int, float, int]:
        """Return a waiting message's place in line (the baselines override it)."""
        return work.order()

    def _ensure_type(self, channel_type: str) -> None:
        """Index a channel type met for the first time."""
        if channel_type in self._free:
            return
        # Agents with a per-type table were indexed for the types they list; those with
        # one capacity for every type have room for this one too.
        free = self._free[channel_type] = set()
        for state in self.states.values():
            if state.online and state.room(channel_type) > 0:
                free.add(state.id)

    def _timer(self, at: float, kind: str, message_id: str) -> None:
        heapq.heappush(self._timers, (at, next(self._seq), kind, message_id))

    def next_wakeup(self) -> float | None:
        """Return when tick() next has something to do (accept timeouts, deadlines)."""
        while self._timers:
            at, _, kind, message_id = self._timers[0]
            if self._timer_live(kind, message_id, at):
                return at
            heapq.heappop(self._timers)
        return None

    def _timer_live(self, kind: str, message_id: str, at: float) -> bool:
        if kind == "accept":
            offer = self._offers.get(message_id)
            return offer is not None and offer.expires == at
        return message_id in self._waiting

    def tick(self, now: float) -> tuple[list[Returned], list[Work]]:
        """Expire offers past the accept timeout and apply deadlines.

        Returns the work taken back (to log as timeouts) and the messages that just
        passed their deadline (SLA-breach events). Overflow widenings happen here.
        """
        returned: list[Returned] = []
        breached: list[Work] = []
        steps = self.policy.overflow
        if self._any_shifts and self._offers:
            # A shift that ended is like going off line: unaccepted work goes back.
            for offer in list(self._offers.values()):
                shifts = self.states[offer.agent_id].agent.shifts
                if shifts and not any(sh.contains(now) for sh in shifts):
                    returned.append(self._take_back(offer, "returned", now, exclude=False))
        while self._timers and self._timers[0][0] <= now:
            at, _, kind, message_id = heapq.heappop(self._timers)
            if not self._timer_live(kind, message_id, at):
                continue
            if kind == "accept":
                returned.append(self._take_back(self._offers[message_id], "timeout", now))
                continue
            work = self._waiting[message_id]
            if kind == "release":
                continue  # a held-back message is at risk now: dispatch() takes it
            if kind == "deadline" and not work.breached:
                work.breached = True
                breached.append(work)
            if work.level < len(steps):
                step = steps[work.level]
                due = work.deadline + step.after
                if due <= now:
                    work.level += 1  # the old heap entry goes stale (level differs)
                    self._push(work)
                    if work.level < len(steps):
                        self._timer(work.deadline + steps[work.level].after, "overflow", work.id)
                else:
                    self._timer(due, "overflow", work.id)
        return returned, breached

    # -- decisions -------------------------------------------------------------------

    def dispatch(self, now: float) -> list[Decision]:
        """Hand waiting work to agents with room, most urgent first; reserve the slots."""
        out: list[Decision] = []
        if not self._waiting:
            return out
        for message_id in list(self._followups):
            follow = self._waiting.get(message_id)
            if follow is None or follow.slot not in self.holder:
                self._followups.discard(message_id)
                continue
            attached = self._attach(follow)
            if attached is not None:
                self._followups.discard(message_id)
                out.append(attached)
        blocked: set[tuple[str, str, str, str, int]] = set()
        while True:
            # One pass over the queues' heads, most urgent first: each head either gets
            # an agent (then the free slots changed: look again) or blocks its queue
            # for the rest of this call (nobody free may take the rest of it either).
            heads: list[tuple[Any, ...]] = []
            for ct, free in self._free.items():
                if not free:
                    continue
                for key in self._buckets_by_ct.get(ct, ()):
                    if key not in blocked:
                        head = self._head(key)
                        if head is not None:
                            heads.append((*head[:3], key))
            if not heads:
                return out
            heads.sort()
            for *_, key in heads:
                if not self._free.get(key[2]):
                    continue  # an earlier failed head's pick cannot empty it; skip anyway
                work: Work = self._buckets[key][0][3]
                decision = self._place(work, now)
                if decision is None and work.excluded:
                    decision = self._place_behind(key, now)
                if decision is not None:
                    out.append(decision)
                    break
                blocked.add(key)
            else:
                return out

    def _head(self, key: tuple[str, str, str, str, int]) -> tuple[Any, ...] | None:
        bucket = self._buckets[key]
        while bucket:
            head = bucket[0]
            work: Work = head[3]
            if work.state == "waiting" and work.level == key[4] and head[2] == work.seq:
                return head
            heapq.heappop(bucket)  # stale: placed, dropped, requeued or widened
        return None

    def _place_behind(self, key: tuple[str, str, str, str, int], now: float) -> Decision | None:
        """Look past a head that only its timed-out agents could take."""
        for entry in _smallest(self._buckets[key], 64):
            work: Work = entry[3]
            if work.state != "waiting" or work.level != key[4] or entry[2] != work.seq:
                continue
            decision = self._place(work, now)
            if decision is not None:
                return decision
        return None

    def _place(self, work: Work, now: float) -> Decision | None:
        attached = self._attach(work)
        if attached is not None:
            return attached
        found = self.pick(work, now)
        if found is None:
            return None
        state, rule, reason, explain = found
        held = self.holder.get(work.slot)
        previous = (held, self._slot_ct[work.slot]) if held is not None else None
        self._assign(work, state, now)
        mark = self._joined.get(work.slot, 0)
        return Decision(work, state.agent, rule, reason, True, explain, previous, mark)

    def _attach(self, work: Work) -> Decision | None:
        """Join work to the slot its conversation already holds, if its holder is on line."""
        held = self.holder.get(work.slot)
        if held is None:
            return None
        state = self.states.get(held)
        if state is None or not state.online:
            return None  # the holder is away: whoever takes it takes the slot over
        self._unwait(work)
        work.state = "held"
        self.decisions += 1
        self._joined[work.slot] = self._joined.get(work.slot, 0) + 1
        return Decision(
            work, state.agent, "sticky", "sticky: agent already holds this conversation", False
        )

    def place(self, work: Work, now: float) -> Decision | None:
        """Assign a new message at once if it can be (the daemon's intake); None: it waits.

        The caller commits the decision, or undoes it; a None means submit() it.
        """
        work.seq = next(self._seq)
        return self._place(work, now)

    def pick(
        self, work: Work, now: float
    ) -> tuple[AgentState, str, str, dict[str, Any] | None] | None:
        """Choose the agent for a message without taking the slot; None means wait."""
        self._ensure_type(work.channel_type)
        free = self._free[work.channel_type]
        if not free:
            return None
        last = self._last_agent.get(work.conversation) if self.sticky else None
        # Sticky only while the agent still has the conversation open (holds a slot of
        # it): a follow-up an hour later is new work, routed on its merits.
        if last is not None and last in free and self._open.get(work.conversation):
            state = self.states[last]
            limit = self.policy.complaint_streak_limit
            rested = not (
                limit
                and work.label in self.policy.streak_labels
                and state.streak >= limit
                and any(
                    s.streak < limit and self._eligible(s, work, now)
                    for s in (self.states[i] for i in free)
                    if s is not state
                )
            )
            # Rotation outranks stickiness: at its complaint limit the holder passes the
            # follow-up on when someone under the limit has room.
            if rested and self._eligible(state, work, now):
                return (
                    state,
                    "sticky",
                    "sticky: agent already has this conversation",
                    (self._explain(work, now, state, "sticky") if self.explain else None),
                )
        cands = self.eligible_with_room(work, now)
        if not cands:
            return None
        rule = "balance"
        policy = self.policy
        ct = work.channel_type
        # The urgent reserve below counts free slots among everyone eligible, before
        # rotation or reliability narrow the choice: it is about the pool.
        eligible = cands
        limit = policy.complaint_streak_limit
        on_break = False
        if limit and work.label in policy.streak_labels:
            fresh = [s for s in cands if s.streak < limit]
            if fresh and len(fresh) < len(cands):
                cands, rule = fresh, "rotation"
        elif limit and not self._plain_exists(work):
            # Other work is the break rotation promises: in one pool of generalists,
            # agents at their complaint limit get it first. (Where specialists exist
            # the reserve below keeps them for complaints instead.)
            resting = [s for s in cands if s.streak >= limit]
            if resting:
                cands, rule, on_break = resting, "rotation-break", True
        if policy.unreliable_for > 0:
            reliable = [s for s in cands if now - s.last_timeout >= policy.unreliable_for]
            if reliable and len(reliable) < len(cands):
                cands, rule = reliable, "reliability"
        if work.label not in policy.protected_labels and not on_break:
            plain = [s for s in cands if not s.protected]
            if plain:
                if len(plain) < len(cands):
                    cands, rule = plain, "reserve"
            elif self._plain_exists(work):
                # Only agents with a scarce skill have room: keep them for that work
                # unless this message is at risk of missing its own deadline.
                at_risk = work.arrival + policy.reserve_slack * (work.deadline - work.arrival)
                if now < at_risk:
                    self._timer(at_risk, "release", work.id)
                    return None
                rule = "reserve-released"
        takes_scarce = work.label in policy.protected_labels or all(s.protected for s in cands)
        if (
            policy.urgent_reserve
            and not work.urgent
            and takes_scarce
            and sum(s.room(ct) for s in eligible if s.protected) <= policy.urgent_reserve
            and self._reserve_pool(work, now) > policy.urgent_reserve
        ):
            at_risk = work.arrival + policy.reserve_slack * (work.deadline - work.arrival)
            if now < at_risk:
                self._timer(at_risk, "release", work.id)
                return None
            if now >= work.deadline:
                # Only work the reserved slot can still save gets it: past its deadline
                # this message waits for an ordinary slot (it is first in line for one).
                return None
            rule = "reserve-released"
        best = max(
            cands,
            key=lambda s: (s.room(ct) / max(1, s.capacity(ct)), -s.last_assigned, s.id),
        )
        reason = _reason(rule, best, work)
        return best, rule, reason, self._explain(work, now, best, rule) if self.explain else None

    def eligible_with_room(self, work: Work, now: float) -> list[AgentState]:
        """Return the agents who may take this message now and have a free slot for it."""
        self._ensure_type(work.channel_type)
        free = self._free[work.channel_type]
        if not work.level and len(free) > 8:
            # Many agents with room (a quiet hour, a big roster): narrow them by set
            # intersection with the agents skilled for the message before the full check.
            free = free & self._skilled_for(work)
        return [s for s in (self.states[i] for i in free) if self._eligible(s, work, now)]

    def _skilled_for(self, work: Work) -> set[str]:
        """Return the ids of agents whose class, language and department fit (cached)."""
        lang = work.language if work.language in self._known_languages else ""
        key = (work.label, lang, work.department)
        found = self._skill_sets.get(key)
        if found is None:
            found = self._skill_sets[key] = {
                s.id
                for s in self.states.values()
                if (not s.agent.classes or work.label in s.agent.classes)
                and (not lang or not s.agent.languages or lang in s.agent.languages)
                and work.department in s.agent.queues
            }
        return found

    def _eligible(self, state: AgentState, work: Work, now: float) -> bool:
        agent = state.agent
        if work.excluded and state.id in work.excluded:
            return False
        if agent.shifts and not any(s.contains(now) for s in agent.shifts):
            return False
        widened = self._widened(work)
        supervisor_ok = agent.supervisor and WIDEN_SUPERVISORS in widened
        if agent.classes and work.label not in agent.classes and not supervisor_ok:
            return False
        if (
            agent.languages
            and work.language not in agent.languages
            and work.language in self._known_languages
            and WIDEN_LANGUAGES not in widened
            and not supervisor_ok
        ):
            return False
        return not (
            work.department not in agent.queues
            and WIDEN_DEPARTMENTS not in widened
            and not supervisor_ok
        )

    def _widened(self, work: Work) -> tuple[str, ...]:
        if not work.level:
            return ()
        return tuple(step.widen for step in self.policy.overflow[: work.level])

    def _plain_exists(self, work: Work) -> bool:
        """Tell whether an on-line agent without a scarce skill could ever take this work."""
        key = (work.label, work.language, work.channel_type, work.department)
        known = self._plain_cache.get(key)
        if known is None:
            known = any(
                s.online and not s.protected and s.capacity(work.channel_type) > 0
                for s in self.states.values()
                if self._eligible_ignoring_room(s, work)
            )
            self._plain_cache[key] = known
        return known

    def _reserve_pool(self, work: Work, now: float) -> int:
        """Return the capacity that keeps urgent slots for this work, or 0 for none.

        That is the capacity of the on-line agents with a protected skill who may take
        it, when they are a scarce pool: some on-line agent for the channel type lacks
        the skill. In one pool of generalists a reserved slot would only idle (and
        lengthen every wait); a pool no larger than the reserve is not reserved at all,
        or the work it holds back would wait forever.
        """
        ct = work.channel_type
        key = (work.label, work.language, ct, work.department)
        cacheable = not work.excluded and not self._any_shifts
        known = self._pool_cache.get(key) if cacheable else None
        if known is None:
            online = [s for s in self.states.values() if s.online and s.capacity(ct) > 0]
            known = 0
            if any(not s.protected for s in online):
                known = sum(
                    s.capacity(ct) for s in online if s.protected and self._eligible(s, work, now)
                )
            if cacheable:
                self._pool_cache[key] = known
        return known

    def _eligible_ignoring_room(self, state: AgentState, work: Work) -> bool:
        agent = state.agent
        if agent.classes and work.label not in agent.classes:
            return False
        if agent.languages and work.language not in agent.languages:
            return False
        return work.department in agent.queues

    def _assign(self, work: Work, state: AgentState, now: float) -> None:
        if work.slot in self.holder:
            # The conversation moves from an absent holder, and its slot with it.
            self._free_slot(work.slot)
        ct = work.channel_type
        pool = state.pool(ct)
        state.used[pool] = state.used.get(pool, 0) + 1
        self._refresh_free(state, ct)
        state.last_assigned = now
        if work.label in self.policy.streak_labels:
            state.streak += 1
        else:
            state.streak = 0
        self._unwait(work)
        self.holder[work.slot] = state.id
        # Messages of this conversation already waiting join it (sticky) from now on.
        self._followups.update(self._by_slot.get(work.slot, ()))
        self._slot_ct[work.slot] = ct
        self._note_open(work.slot, work.conversation, state.id)
        self.decisions += 1
        if self.policy.accept_timeout > 0 and state.agent.accepts:
            work.state = "offered"
            expires = now + self.policy.accept_timeout
            self._offers[work.id] = Offer(work, state.id, expires)
            self._timer(expires, "accept", work.id)
        else:
            work.state = "held"

    # -- transfers to a named agent ---------------------------------------------------

    def transfer_refusal(self, work: Work, agent_id: str, now: float) -> str | None:
        """Return why the named agent cannot take this work now (None: they can).

        A transfer names the agent on purpose, so their department does not bind; their
        presence, shift, classes, languages and room do.
        """
        state = self.states.get(agent_id)
        if state is None or state.agent.tool == "":
            return f"unknown agent {agent_id}"
        agent = state.agent
        if not state.online:
            return f"{agent_id} is not on line"
        if agent.shifts and not any(s.contains(now) for s in agent.shifts):
            return f"{agent_id} is off shift"
        if agent.classes and work.label not in agent.classes:
            return f"{agent_id} does not take {work.label}"
        if (
            agent.languages
            and work.language in self._known_languages
            and work.language not in agent.languages
        ):
            return f"{agent_id} does not answer in {work.language}"
        ct = work.channel_type
        self._ensure_type(ct)
        if state.room(ct) <= 0:
            return f"{agent_id} has no room ({state.capacity(ct)} {ct} conversations held)"
        return None

    def assign_to(self, work: Work, agent_id: str, now: float) -> Decision | None:
        """Give work to one named agent (a transfer); None when `transfer_refusal` says no."""
        if self.transfer_refusal(work, agent_id, now) is not None:
            return None
        state = self.states[agent_id]
        work.seq = next(self._seq)
        self._assign(work, state, now)
        reason = f"transfer: named agent {agent_id}"
        return Decision(work, state.agent, "transfer", reason, True, None, None, 0)

    # -- after the decision ----------------------------------------------------------

    def accept(self, message_id: str, agent_id: str) -> bool:
        """Record that the agent took the offered message; False if not offered to them."""
        offer = self._offers.get(message_id)
        if offer is None or offer.agent_id != agent_id:
            return False
        del self._offers[message_id]
        offer.work.state = "held"
        return True

    def accept_slot(self, slot: str, agent_id: str) -> list[str]:
        """Accept every offer to the agent that rests on this slot; return their ids."""
        ids = [m for m, o in self._offers.items() if o.work.slot == slot and o.agent_id == agent_id]
        for message_id in ids:
            self.accept(message_id, agent_id)
        return ids

    def restore_offer(self, work: Work, agent_id: str, expires: float) -> None:
        """Track an offer found in the store at startup (its slot was hold()-ed)."""
        state = self.states.get(agent_id)
        if self.policy.accept_timeout <= 0 or work.id in self._offers:
            return
        if state is None or not state.agent.accepts:
            return
        work.state = "offered"
        self._offers[work.id] = Offer(work, agent_id, expires)
        self._timer(expires, "accept", work.id)

    def offer_of(self, message_id: str) -> Offer | None:
        """Return the outstanding offer of a message, if any."""
        return self._offers.get(message_id)

    def offers(self) -> list[Offer]:
        """Return every outstanding offer."""
        return list(self._offers.values())

    def _take_back(self, offer: Offer, why: str, now: float, *, exclude: bool = True) -> Returned:
        work = offer.work
        self._offers.pop(work.id, None)
        state = self.states.get(offer.agent_id)
        if state is not None:
            if exclude:
                state.last_timeout = now
            self._free_slot(work.slot)
        if exclude and self.remember_timeouts:
            if work.excluded is None:
                work.excluded = set()
            work.excluded.add(offer.agent_id)
        work.state = "new"
        self.submit(work)
        return Returned(work, offer.agent_id, why)

    def release(self, slot: str) -> str | None:
        """Free a slot whose work is finished (resolved conversation, completed message)."""
        for message_id in [m for m, o in self._offers.items() if o.work.slot == slot]:
            self._offers.pop(message_id).work.state = "done"
        return self._free_slot(slot)

    def _note_open(self, slot: str, conversation: str, agent_id: str) -> None:
        if self._last_agent.get(conversation) != agent_id:
            self._last_agent[conversation] = agent_id
            self._open[conversation] = 0
        self._open[conversation] = self._open.get(conversation, 0) + 1
        self._conv_of[slot] = conversation

    def _free_slot(self, slot: str) -> str | None:
        self._joined.pop(slot, None)
        agent_id = self.holder.pop(slot, None)
        ct = self._slot_ct.pop(slot, None)
        conversation = self._conv_of.pop(slot, None)
        if conversation is not None and self._last_agent.get(conversation) == agent_id:
            left = self._open.get(conversation, 0) - 1
            if left > 0:
                self._open[conversation] = left
            else:
                # Closed: nothing more to stick to (and nothing to remember per conversation).
                self._open.pop(conversation, None)
                self._last_agent.pop(conversation, None)
        if agent_id is None or ct is None:
            return agent_id
        state = self.states.get(agent_id)
        if state is not None:
            pool = state.pool(ct)
            state.used[pool] = max(0, state.used.get(pool, 0) - 1)
            self._refresh_free(state, ct)
        return agent_id

    def sync_external(self, held: dict[tuple[str, str], int]) -> None:
        """Take the store's count of open conversations per (agent, channel type).

        What the store counts beyond the slots this scheduler holds belongs to another
        worker: it counts against the agent's room here too.
        """
        pools: dict[tuple[str, str], int] = {}
        for (agent_id, channel_type), n in held.items():
            state = self.states.get(agent_id)
            if state is not None:
                key = (agent_id, state.pool(channel_type))
                pools[key] = pools.get(key, 0) + n
        for state in self.states.values():
            external: dict[str, int] = {}
            for (agent_id, pool), n in pools.items():
                if agent_id == state.id and n > state.used.get(pool, 0):
                    external[pool] = n - state.used.get(pool, 0)
            if external != state.external:
                state.external = external
                for ct in list(self._free):
                    self._refresh_free(state, ct)

    def hold(self, slot: str, conversation: str, agent_id: str, channel_type: str) -> None:
        """Count a slot found in the store at startup (an open conversation)."""
        if slot in self.holder:
            return
        state = self.states.get(agent_id)
        if state is None:
            state = self.states[agent_id] = AgentState(
                Agent(agent_id, agent_id, 0, "", present=False), online=False
            )
        self.holder[slot] = agent_id
        self._slot_ct[slot] = channel_type
        self._note_open(slot, conversation, agent_id)
        pool = state.pool(channel_type)
        state.used[pool] = state.used.get(pool, 0) + 1
        self._refresh_free(state, channel_type)

    def move_slot(self, old: str, new: str) -> None:
        """Re-key a slot when the store joined the message to another conversation."""
        if old == new or old not in self.holder:
            return
        agent_id = self.holder.pop(old)
        ct = self._slot_ct.pop(old)
        if new in self.holder:
            state = self.states.get(agent_id)
            if state is not None:
                pool = state.pool(ct)
                state.used[pool] = max(0, state.used.get(pool, 0) - 1)
                self._refresh_free(state, ct)
        else:
            self.holder[new] = agent_id
            self._slot_ct[new] = ct
        self._conv_of.pop(old, None)
        self._open.pop(old, None)
        self._last_agent.pop(old, None)
        self._note_open(new, new, agent_id)

    def withdraw(self, message_id: str) -> Work | None:
        """Take a message out of the waiting set (its conversation was closed)."""
        work = self._waiting.get(message_id)
        if work is not None:
            self._unwait(work)
            work.state = "done"
        return work

    def _unwait(self, work: Work) -> None:
        if self._waiting.pop(work.id, None) is None:
            return
        left = self._depth[work.department] - 1
        if left:
            self._depth[work.department] = left
        else:
            del self._depth[work.department]
        ids = self._by_slot.get(work.slot)
        if ids is not None:
            ids.discard(work.id)
            if not ids:
                del self._by_slot[work.slot]

    def undo(self, decision: Decision, *, requeue: bool = True) -> None:
        """Reverse a decision whose commit failed: free its slot; the work waits again.

        `requeue=False` for a message that is not to wait (a duplicate, or one whose
        store write failed at intake: its sender retries).
        """
        work = decision.work
        offer = self._offers.pop(work.id, None)
        ridden = self._joined.get(work.slot, 0) != decision.mark
        if decision.new_slot and (offer is not None or work.state == "held") and not ridden:
            self._free_slot(work.slot)
            if decision.previous is not None:
                # The store still has the conversation with its old holder: so must we.
                agent_id, channel_type = decision.previous
                self.hold(work.slot, work.conversation, agent_id, channel_type)
        work.state = "new"
        if requeue:
            self.submit(work)

    def waiting_in(self, conversation: str) -> list[str]:
        """Return the ids of a conversation's messages that wait for an agent."""
        return [m for m, w in self._waiting.items() if w.conversation == conversation]

    def drop_conversation(self, conversation: str) -> list[str]:
        """Take a closed conversation's messages out of the waiting set; return their ids."""
        ids = [m for m, w in self._waiting.items() if w.conversation == conversation]
        for message_id in ids:
            self.withdraw(message_id)
        return ids

    # -- views -----------------------------------------------------------------------

    def waiting(self, department: str | None = None) -> list[Work]:
        """Return waiting work in the order it will be served."""
        items = [w for w in self._waiting.values() if department in (None, w.department)]
        return sorted(items, key=Work.order)

    def mark(self) -> int:
        """Return a number below the `seq` of every work submitted from now on."""
        return next(self._seq)

    def knows(self, message_id: str) -> bool:
        """Tell whether a message waits here or is offered from here."""
        return message_id in self._waiting or message_id in self._offers

    def waiting_count(self) -> int:
        """Return how many messages wait."""
        return len(self._waiting)

    def queue_depths(self) -> dict[str, int]:
        """Return the number of waiting messages per department (queue)."""
        return dict(self._depth)

    def iter_states(self) -> Iterator[AgentState]:
        """Yield every agent's live state."""
        return iter(self.states.values())

    def _explain(self, work: Work, now: float, chosen: AgentState, rule: str) -> dict[str, Any]:
        """Record every agent's verdict for this message (for `omnirouter explain`).

        On a big roster the agents who were plainly out (off line, off shift, full, not
        taking the channel type) are counted by reason instead of listed, so the record
        stored with every assignment stays small.
        """
        verdicts = []
        others: dict[str, int] = {}
        ct = work.channel_type
        big = len(self.states) > EXPLAIN_LIST_LIMIT
        for state in sorted(self.states.values(), key=lambda s: s.id):
            verdict = self._verdict(state, work, now, chosen)
            if big and verdict.startswith(_PLAINLY_OUT):
                reason = verdict.split(":")[0]
                others[reason] = others.get(reason, 0) + 1
            else:
                verdicts.append({"agent": state.id, "verdict": verdict})
        return {
            "rule": rule,
            "chosen": chosen.id,
            "channel_type": ct,
            "label": work.label,
            "language": work.language,
            "department": work.department,
            "overflow_level": work.level,
            "candidates": verdicts,
            "others": others,
        }

    def _verdict(self, state: AgentState, work: Work, now: float, chosen: AgentState) -> str:
        ct = work.channel_type
        agent = state.agent
        if state is chosen:
            return f"chosen ({state.room(ct)} of {state.capacity(ct)} {ct} slots free before)"
        if not state.online:
            return "off line"
        if agent.shifts and not any(s.contains(now) for s in agent.shifts):
            return "off shift"
        if state.capacity(ct) <= 0:
            return f"takes no {ct}"
        if state.room(ct) <= 0:
            return f"full: {state.used.get(state.pool(ct), 0)}/{state.capacity(ct)} {ct}"
        if work.excluded and state.id in work.excluded:
            return "let this message time out before"
        if not self._eligible(state, work, now):
            if agent.classes and work.label not in agent.classes:
                return f"not skilled for {work.label}"
            if agent.languages and work.language not in agent.languages:
                return f"does not speak {work.language}"
            return f"not in department {work.department}"
        limit = self.policy.complaint_streak_limit
        if limit and work.label in self.policy.streak_labels and state.streak >= limit:
            return f"rotation: {state.streak} complaints in a row"
        if now - state.last_timeout < self.policy.unreliable_for:
            return "let an offer time out lately"
        if state.protected and work.label not in self.policy.protected_labels:
            return "kept for scarce work"
        return (
            f"eligible, less spare room or assigned more recently "
            f"({state.room(ct)}/{state.capacity(ct)} {ct} free)"
        )


def _smallest(heap: list[tuple[Any, ...]], k: int) -> Iterator[tuple[Any, ...]]:
    """Yield a heap's k smallest entries in order, touching O(k log k) of it.

    heapq.nsmallest reads the whole list: with a long queue behind a head only its
    timed-out agents could take, that was most of a dispatch's cost.
    """
    if not heap:
        return
    frontier: list[tuple[tuple[Any, ...], int]] = [(heap[0][:3], 0)]
    for _ in range(k):
        if not frontier:
            return
        _, i = heapq.heappop(frontier)
        yield heap[i]
        for child in (2 * i + 1, 2 * i + 2):
            if child < len(heap):
                heapq.heappush(frontier, (heap[child][:3], child))


def _reason(rule: str, state: AgentState, work: Work) -> str:
    ct = work.channel_type
    room = f"{state.room(ct)}/{state.capacity(ct)} {ct} slots free"
    what = {
        "balance": "most spare capacity, longest since last assignment",
        "rotation": "rotation: others reached the complaint streak limit",
        "reliability": "others let offers time out lately",
        "reserve": "agents with scarce skills kept for their work",
        "reserve-released": "only specialists free and the message is at risk",
    }.get(rule, rule)
    level = f", overflow level {work.level}" if work.level else ""
    return f"{what} ({room}{level})"
