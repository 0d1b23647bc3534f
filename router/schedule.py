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
  else agents under their complaint streak limit (rotation) and who have not let work
  time out lately; then agents not needed for a reserve (below); then the agent whose
  skills the *other* work needs least (scarcity: for each other class the agent could
  take, what waits plus its expected load, arrival rate x hold time, over the free
  slots left for it, weighted by how short its deadline is); agents at the streak
  limit for other work (their break); then the most spare capacity, then the longest
  since their last assignment, so quick agents are not punished with all the work.
* **Reserves.** Where a slot frees too seldom for a class's deadline (a P0/P1
  complaint given 30 s while, with all its agents busy, a slot frees every 40 s), less
  pressing work leaves r slots of that class's agents free. r follows the observed
  arrival and completion rates (Erlang B, see `reserve()`), so it grows in a burst and
  is zero in a big pool. Held-back work takes a reserved slot once it has spent
  `reserve_slack` of its SLA and can still make its deadline, unless those are the
  reserve's last slots and the class would likely need them first.
* **Waiting for the right agent.** When the only free agents are needed by other work
  and an agent who is not frees a slot well before the message is at risk (observed
  hold times), the message waits for that agent. Every hold-back is recorded with its
  reason (`why_waiting`); nothing else leaves an eligible agent idle.
* **Indexes.** Agents with the same classes, languages, departments and role form a
  group; each group keeps its members with room in a heap per channel type, and each
  class of work (label, urgency, language, department, channel type) knows its
  groups, rate and free slots. A placement reads a few groups' heads, not the roster.
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

from router.explain import Explanation, compact_record
from router.model import Agent

URGENT_SEVERITIES = ("P0", "P1")
_URGENCY_SCALE = 300.0
# A class whose agents would be this full (deadline-weighted, see _scarcity_cost) is
# pressed: work that others could take waits for them if one frees soon enough.
_PRESSED = 0.75
_PRESSURE_STEPS = 20
# At most this many other agents are re-checked by the store when a complaint goes to
# an agent at its streak limit.
_RESTED_CHECKS = 50
# Pseudo-completions of `default_hold` mixed into every hold-time estimate.
_PRIOR_SLOTS = 3.0
# Above this many agents, explain records count the plainly unavailable ones by reason.
EXPLAIN_LIST_LIMIT = 50
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
    # At-risk point, as a share of the message's SLA already spent waiting: work held
    # back for a reserve takes a reserved slot from then on (if it can still be saved).
    reserve_slack: float = 0.75
    # An agent who let an offer time out is offered work last for this long.
    unreliable_for: float = 1800.0
    # Reserves for short-deadline classes (P0/P1 complaints, typically) are sized so
    # that an arrival of the class that finds its pool full misses its deadline with at
    # most this probability (Erlang B over the observed arrival and completion rates).
    # 0 turns reserves off.
    reserve_risk: float = 0.1
    # A floor under every computed urgent reserve (slots), for sites that want one.
    urgent_reserve: int = 0
    # Arrival rates per class are averaged over about this many seconds.
    rate_window: float = 600.0
    # The mean time a slot is held, until completions have been seen.
    default_hold: float = 300.0
    # Whether agents are chosen with the demand of the other classes they could serve
    # in mind (scarce skills); the baselines turn it off.
    scarcity: bool = True
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
    # Agents it may not go to: who let it (or its conversation's offer) time out, or
    # handed it on. The scheduler skips them all alike; `excluded_for` keeps why for
    # those not timed out, only so that explain words it truly (router/explain.py).
    # Apart from the set, so the skip test stays a set lookup and a timeout costs what
    # it did.
    excluded: set[str] | None = None
    excluded_for: dict[str, str] | None = None
    level: int = 0  # overflow steps applied
    breached: bool = False
    state: str = "new"  # new | waiting | offered | held | done
    observed: bool = False  # counted in its class's arrival rate

    @property
    def sla(self) -> float:
        """Return the time the message was given (deadline - arrival)."""
        return self.deadline - self.arrival

    @property
    def urgent(self) -> bool:
        """Tell whether the message is P0/P1 (it goes ahead of all deadlines)."""
        return self.severity in URGENT_SEVERITIES

    def exclude(self, agent_id: str, why: str) -> None:
        """Keep the work from an agent for a reason other than its timeout.

        `why` is one of router.explain's reasons (HANDED_ON, ...); a timeout needs none.
        """
        if self.excluded is None:
            self.excluded = set()
        self.excluded.add(agent_id)
        if self.excluded_for is None:
            self.excluded_for = {}
        self.excluded_for[agent_id] = why

    def order(self) -> tuple[int, float, int]:
        """Return the waiting order key: urgency, deadline, arrival."""
        rank = 0 if self.severity == "P0" else 1 if self.severity == "P1" else 2
        return (rank, self.deadline, self.seq)


@dataclass(slots=True, eq=False)
class AgentState:
    """An agent as the scheduler sees it: roster facts plus live load."""

    agent: Agent
    online: bool
    used: dict[str, int] = field(default_factory=dict)  # channel type -> slots held
    last_assigned: float = -math.inf
    streak: int = 0  # complaints received in a row
    last_timeout: float = -math.inf
    away: bool = False  # off line by choice for a while: keeps its offers (not persisted)
    # Slots per pool that other workers hold (seen in the store, not decided here).
    external: dict[str, int] = field(default_factory=dict)
    group: _Group | None = None  # the agents who may take exactly the same work
    rank: int = 0  # position in id order: the last tie-break
    version: int = 0  # bumped on every change; older index entries are stale
    # channel type -> (room, capacity) as last counted into the group's totals
    counted: dict[str, tuple[int, int]] = field(default_factory=dict)
    counted_online: bool = False
    group_tired: bool = False  # at the complaint streak limit (sorts last in its heaps)

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
        return self.slots(channel_type)[2]

    def slots(self, channel_type: str) -> tuple[int, int, int]:
        """Return capacity, slots held here and free slots for this channel type.

        One walk for the three: the placement index and every explain row want them
        together, once per agent per decision.
        """
        agent = self.agent
        caps = agent.capacities
        if caps:
            capacity = caps.get(channel_type, caps.get("*", 0))
            pool = channel_type
        else:
            capacity = agent.capacity
            pool = "*"
        used = self.used.get(pool, 0)
        return capacity, used, capacity - used - self.external.get(pool, 0)

    @property
    def load(self) -> int:
        """Return the slots held over all channel types."""
        return sum(self.used.values())


# An index entry: (-room share, last assigned, -rank, version, agent). The smallest is
# the agent the balance rule picks: most spare capacity, longest idle, then id; agents
# at their complaint streak limit sort after all others (their first field + _TIRED).
_Entry = tuple[float, float, int, int, AgentState]
_TIRED = 2.0


@dataclass(slots=True, eq=False)
class _Group:
    """Agents with the same classes, languages, departments and role.

    Whatever one of them may take, all may (shifts aside), so eligibility is decided
    per group, and each group keeps its members with room in a heap per channel type:
    a placement looks at a few groups' heads instead of walking the roster.
    """

    classes: frozenset[str]
    languages: frozenset[str]
    queues: frozenset[str]
    supervisor: bool
    members: list[AgentState] = field(default_factory=list)
    heaps: dict[str, list[_Entry]] = field(default_factory=dict)
    free: dict[str, int] = field(default_factory=dict)  # channel type -> free slots
    capacity: dict[str, int] = field(default_factory=dict)  # of on-line members
    with_room: dict[str, int] = field(default_factory=dict)  # members with a free slot
    online: int = 0
    # channel type -> the classes of work this group may take (see _Demand)
    demands: dict[str, list[_Demand]] = field(default_factory=dict)
    resting: set[AgentState] = field(default_factory=set)  # at the complaint streak limit
    # channel type -> [busy slot-seconds, slots freed, at], both decayed over the rate
    # window: their ratio is the mean hold time, counting the slots still held (an
    # average of finished ones alone runs short: short ones finish first).
    exposure: dict[str, list[float]] = field(default_factory=dict)

    def describe(self) -> str:
        """Return a short name for explain records: its classes and languages."""
        classes = "+".join(sorted(self.classes)) or "all classes"
        languages = "/".join(sorted(self.languages)) or "all languages"
        return f"{classes}, {languages}"


@dataclass(slots=True, eq=False)
class _Demand:
    """One class of work as the scheduler forecasts it: observed rate, waiting count.

    Keyed by (label, urgent, language, department, channel type): work of one key is
    served by the same groups with the same deadline.
    """

    label: str
    urgent: bool
    language: str
    department: str
    channel_type: str
    sla: float
    groups: list[_Group] = field(default_factory=list)
    waiting: int = 0
    weight: float = 0.0  # exponentially decayed arrival count
    weight_at: float = 0.0
    first_seen: float | None = None
    # Every instance's arrivals (from the shared store): a rate floor, and when seen.
    shared_rate: float = 0.0
    shared_at: float = -math.inf
    free_slots: int = 0  # free slots of its groups' on-line members, kept by the index
    slots: int = 0  # their capacity
    # (now, rate) and (now, slots, load, gap, rate) computed last: reused within a tick
    rate_cache: tuple[float, float] = (math.nan, 0.0)
    gap_cache: tuple[float, int, float] = (math.nan, 0, 0.0)  # (at, slots, gap)

    def describe(self) -> str:
        """Return the class in words: "P0/P1 complaint zh chat"."""
        urgent = "P0/P1 " if self.urgent else ""
        return f"{urgent}{self.label} {self.language} {self.channel_type}".replace("  ", " ")

    def free(self) -> int:
        """Return the free slots of the agents who may take it."""
        return self.free_slots

    def capacity(self) -> int:
        """Return the slots of the on-line agents who may take it."""
        return self.slots

    def recount(self) -> None:
        """Sum its groups' slots afresh (the index keeps them in step after that)."""
        ct = self.channel_type
        self.free_slots = sum(g.free.get(ct, 0) for g in self.groups)
        self.slots = sum(g.capacity.get(ct, 0) for g in self.groups)


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
    explain: Explanation | None = None
    # The absent holder the conversation moved from (and its slot's channel type), so
    # that undo() can give it back; None for a conversation nobody held.
    previous: tuple[str, str] | None = None
    # How many follow-ups had joined the slot when it was taken: undo() keeps a slot
    # that a later follow-up joined (that one may have committed already).
    mark: int = 0
    # Chosen at the complaint streak limit: the agents under it who were full then,
    # (agent, pool, capacity), for the store to check at commit (router.model.Assignment).
    rested_full: tuple[tuple[str, str, int], ...] = ()

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
        self._any_shifts = False
        # Agents sorted into groups that may take the same work (see _Group), and the
        # groups each kind of work may go to: (label, language, department, level).
        self._groups: dict[tuple[Any, ...], _Group] = {}
        self._groups_for_cache: dict[tuple[str, str, str, int], list[_Group]] = {}
        self._by_id: list[AgentState] | None = None  # every agent in id order (explain)
        # What each class of work needs: its arrival rate, how many wait (see _Demand).
        self._demands: dict[tuple[str, bool, str, str, str], _Demand] = {}
        self._clock = -math.inf  # the latest `now` a caller passed (release() has none)
        self._resting: set[str] = set()  # agents at their complaint streak limit
        # Why the head of a queue waits while an agent who may take it has room: queue
        # key -> the reservation record (see why_waiting()).
        self._held_back: dict[tuple[str, str, str, str, int], dict[str, Any]] = {}
        self._hold_note: dict[str, Any] | None = None
        self._rested_full: tuple[tuple[str, str, int], ...] = ()  # see Decision
        self._slots: dict[str, list[int]] = {}  # channel type -> [capacity, free] on line
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
        self._any_shifts = any(s.agent.shifts for s in self.states.values())
        self._known_languages = {lang for s in self.states.values() for lang in s.agent.languages}
        self._skill_sets.clear()
        limit = self.policy.complaint_streak_limit
        self._resting = {a for a, s in self.states.items() if limit and s.streak >= limit}
        self._regroup()

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
        self._index(state)
        return returned

    def note_streak(self, agent_id: str, streak: int, last_assigned: float) -> None:
        """Take an agent's complaint streak and last assignment as another worker left them."""
        state = self.states.get(agent_id)
        if state is None:
            return
        state.streak = streak
        state.last_assigned = last_assigned
        self._note_resting(state)
        self._index(state)

    def _note_resting(self, state: AgentState) -> None:
        limit = self.policy.complaint_streak_limit
        group = state.group
        state.group_tired = bool(limit) and state.streak >= limit
        if state.group_tired:
            self._resting.add(state.id)
            if group is not None:
                group.resting.add(state)
        else:
            self._resting.discard(state.id)
            if group is not None:
                group.resting.discard(state)

    def _regroup(self) -> None:
        """Sort the roster into groups and rebuild every index (on roster changes)."""
        self._groups = {}
        for rank, state in enumerate(sorted(self.states.values(), key=lambda s: s.id)):
            agent = state.agent
            key = (agent.classes, agent.languages, frozenset(agent.queues), agent.supervisor)
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = _Group(*key)
            group.members.append(state)
            state.group = group
            state.rank = rank
            limit = self.policy.complaint_streak_limit
            state.group_tired = bool(limit) and state.streak >= limit
            if state.group_tired:
                group.resting.add(state)
        self._groups_for_cache.clear()
        self._by_id = None
        for demand in self._demands.values():
            self._link(demand)
        self._reindex()

    def _reindex(self) -> None:
        types = set(self._free) | set(self._buckets_by_ct)
        for state in self.states.values():
            types.update(state.agent.capacities)
        self._free = {ct: set() for ct in types}
        self._slots = {ct: [0, 0] for ct in types}
        for group in self._groups.values():
            group.heaps = {ct: [] for ct in types}
            group.free = dict.fromkeys(types, 0)
            group.capacity = dict.fromkeys(types, 0)
            group.with_room = dict.fromkeys(types, 0)
            group.online = 0
        for demand in self._demands.values():
            demand.free_slots = demand.slots = 0
        for state in self.states.values():
            state.counted = {}
            state.counted_online = False
            self._index(state)
        for demand in self._demands.values():
            demand.recount()

    def _index(self, state: AgentState) -> None:
        """Recount an agent into its group's totals and heaps after any change to it."""
        state.version += 1
        group = state.group
        online = state.online and group is not None
        if group is not None and online != state.counted_online:
            group.online += 1 if online else -1
            state.counted_online = online
        for ct, free in self._free.items():
            if online:
                capacity, _, room = state.slots(ct)
                room = max(0, room)
            else:
                capacity = room = 0
            if group is not None:
                old_room, old_capacity = state.counted.get(ct, (0, 0))
                if room != old_room or capacity != old_capacity:
                    self._accrue(group, ct)
                    group.free[ct] = group.free.get(ct, 0) + room - old_room
                    group.capacity[ct] = group.capacity.get(ct, 0) + capacity - old_capacity
                    for demand in group.demands.get(ct, ()):
                        demand.free_slots += room - old_room
                        demand.slots += capacity - old_capacity
                    with_room = group.with_room.get(ct, 0) + (room > 0) - (old_room > 0)
                    group.with_room[ct] = with_room
                    state.counted[ct] = (room, capacity)
                    totals = self._slots.setdefault(ct, [0, 0])
                    totals[0] += capacity - old_capacity
                    totals[1] += room - old_room
            if room > 0 and group is not None:
                free.add(state.id)
                heap = group.heaps.setdefault(ct, [])
                share = -room / capacity + (_TIRED if state.group_tired else 0.0)
                entry = (share, state.last_assigned, -state.rank, state.version, state)
                heapq.heappush(heap, entry)
                if len(heap) > 2 * len(group.members) + 16:
                    # Every change pushes a fresh entry; drop the stale ones now and then.
                    heap[:] = [e for e in heap if e[3] == e[4].version]
                    heapq.heapify(heap)
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
        demand = self._demand_of(work)
        demand.waiting += 1
        if not work.observed:
            self._observe(work, demand)
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
        self._free[channel_type] = set()
        for state in self.states.values():
            self._index(state)

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
        self._clock = max(self._clock, now)
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
        self._clock = max(self._clock, now)
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
                    self._held_back.pop(key, None)
                    self._hold_note = None
                    out.append(decision)
                    break
                if self._hold_note is not None:
                    self._held_back[key] = self._hold_note
                    self._hold_note = None
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
        decision = Decision(work, state.agent, rule, reason, True, explain, previous, mark)
        decision.rested_full, self._rested_full = self._rested_full, ()
        return decision

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
        # Every message an agent is given counts in its complaint streak, as the store
        # counts it (its assignments, newest first): instances sharing a store agree.
        streak = state.streak + 1 if work.label in self.policy.streak_labels else 0
        if streak != state.streak:
            state.streak = streak
            self._note_resting(state)
            self._index(state)
        return Decision(
            work, state.agent, "sticky", "sticky: agent already holds this conversation", False
        )

    def place(self, work: Work, now: float) -> Decision | None:
        """Assign a new message at once if it can be (the daemon's intake); None: it waits.

        The caller commits the decision, or undoes it; a None means submit() it.
        """
        self._clock = max(self._clock, now)
        work.seq = next(self._seq)
        if not work.observed:
            self._observe(work, self._demand_of(work))
        decision = self._place(work, now)
        if decision is None and self._hold_note is not None:
            self._held_back[_queue_key(work)] = self._hold_note
        self._hold_note = None
        return decision

    def pick(
        self, work: Work, now: float
    ) -> tuple[AgentState, str, str, Explanation | None] | None:
        """Choose the agent for a message without taking the slot; None means wait.

        When it waits although an agent who may take it has room, the reservation that
        kept that agent is left in `_hold_note` (dispatch() files it for why_waiting()).
        """
        self._ensure_type(work.channel_type)
        if not self._free[work.channel_type]:
            return None
        last = self._last_agent.get(work.conversation) if self.sticky else None
        # Sticky only while the agent still has the conversation open (holds a slot of
        # it): a follow-up an hour later is new work, routed on its merits.
        if last is not None and last in self._free[work.channel_type]:
            if self._open.get(work.conversation):
                state = self.states[last]
                limit = self.policy.complaint_streak_limit
                # Rotation outranks stickiness: at its complaint limit the holder passes
                # the follow-up on when someone under the limit has room.
                tired = (
                    limit
                    and work.label in self.policy.streak_labels
                    and state.streak >= limit
                    and self._someone_fresh(work, now, state)
                )
                if not tired and self._eligible(state, work, now):
                    explain = (
                        self._explain(work, now, state, "sticky", {}) if self.explain else None
                    )
                    return state, "sticky", "sticky: agent already has this conversation", explain
        return self._choose(work, now)

    def _choose(
        self, work: Work, now: float
    ) -> tuple[AgentState, str, str, Explanation | None] | None:
        """Pick among the groups that may take the work (their best member each).

        Preference, in order: under the complaint streak limit (for complaints), no
        recent accept timeout, not needed for a reserve of a more pressing class, least
        needed by the other work the agent could take (scarce skills), at the streak
        limit (other work is their break), then most spare room and longest idle.
        """
        ct = work.channel_type
        policy = self.policy
        limit = policy.complaint_streak_limit
        streak_work = bool(limit) and work.label in policy.streak_labels
        own = self._demand_of(work)
        scarcity = policy.scarcity
        resting_ids: set[str] | tuple[()] = self._resting if limit and not streak_work else ()
        # First what speaks against each group as a whole (reserves, scarcity): cheap
        # per group, no agent walked. Then members, best groups first.
        evaluated: list[tuple[bool, float, _Group, dict[str, Any] | None, _Demand | None]] = []
        for group in self._groups_for(work):
            if not group.with_room.get(ct):
                continue
            heap = group.heaps[ct]
            while heap and heap[0][3] != heap[0][4].version:
                heapq.heappop(heap)
            if not heap:
                continue
            conflict: dict[str, Any] | None = None
            cost, short = 0.0, None
            if scarcity:
                conflict = self._reserve_conflict(group, work, own, now)
                cost, short = self._scarcity_cost(group, own, now)
            evaluated.append((conflict is not None, cost, group, conflict, short))
        if not evaluated:
            return None
        evaluated.sort(key=lambda e: (e[0], e[1]))
        chosen: _Option | None = None
        for reserved, cost, group, conflict, _ in evaluated:
            if (
                chosen is not None
                and not (chosen.tired or chosen.unreliable)
                and (reserved, cost) > (chosen.reserved, chosen.cost)
            ):
                break  # nobody further on can beat a flawless member of a better group
            found = self._best_in(group, work, now, streak_work)
            if found is None:
                continue
            best, tired, unreliable = found
            if group.resting and resting_ids and not unreliable:
                rested = [
                    m
                    for m in group.resting
                    if m.counted.get(ct, (0, 0))[0] > 0 and self._available(m, work, now)
                ]
                if rested:
                    best = min(rested, key=lambda m: _balance_key(m, ct))
            option = _Option(best, group, tired, unreliable, reserved, cost, conflict, ct)
            if chosen is None or option.score(resting_ids) < chosen.score(resting_ids):
                chosen = option
        if chosen is None:
            return None
        # The balance rule alone would have taken the agent at the top of its heap.
        plain = min(evaluated, key=lambda e: _balance_key(e[2].heaps[ct][0][4], ct))
        top = plain[2].heaps[ct][0][4]
        if streak_work and self._resting:
            # Heaps put agents at the streak limit last: look for one the balance rule
            # alone would have preferred (the choice then was rotation's).
            for entry in evaluated:
                for member in entry[2].resting:
                    if (
                        member.counted.get(ct, (0, 0))[0] > 0
                        and _balance_key(member, ct) < _balance_key(top, ct)
                        and self._available(member, work, now)
                    ):
                        top, plain = member, entry
        rule = self._rule(chosen, top, plain[0], plain[1], work, now)
        if scarcity and chosen.conflict is None and not chosen.tired:
            better = self._better_soon(chosen, work, now)
            if better is not None:
                group, expected, pressing = better
                at_risk = work.arrival + policy.reserve_slack * work.sla
                self._timer(at_risk, "release", work.id)
                self._hold_note = {
                    "rule": "scarcity",
                    "for": pressing.describe(),
                    "waits_for": group.describe(),
                    "expected_seconds": round(expected, 1),
                    "until": at_risk,
                    "verdict": (
                        f"waits for an agent of {group.describe()} (one frees in about "
                        f"{expected:.0f} s): the free ones are needed by other work"
                    ),
                }
                return None
        if chosen.conflict is not None:
            record = chosen.conflict
            at_risk = work.arrival + policy.reserve_slack * work.sla
            if now < at_risk:
                self._timer(at_risk, "release", work.id)
                self._hold_note = {**record, "until": at_risk}
                return None
            if now >= work.deadline:
                # Only work a reserved slot can still save gets it: past its deadline
                # this message waits for an ordinary slot (it is first in line for one).
                self._hold_note = {**record, "until": None, "past_deadline": True}
                return None
            if not record["spare"]:
                # The reserve's last slots: the class it is kept for would likely need
                # them before a completion puts one back.
                self._hold_note = {**record, "until": None, "last_slots": True}
                return None
            rule = "reserve-released"
        state = chosen.best
        if chosen.tired:
            self._rested_full = self._full_under_limit(work, now, state)
        reason = _reason(rule, state, work)
        explain = None
        if self.explain:
            explain = self._explain(work, now, state, rule, _notes(evaluated, chosen))
        return state, rule, reason, explain

    def _full_under_limit(
        self, work: Work, now: float, chosen: AgentState
    ) -> tuple[tuple[str, str, int], ...]:
        """Return the other agents who may take the work but were full or at the limit.

        For the store to check at commit (`Decision.rested_full`). Walks the eligible
        groups' members: only when a complaint goes to an agent at its limit, which
        rotation makes rare; at most _RESTED_CHECKS of them (a big roster's race with
        another instance over one agent matters little).
        """
        ct = work.channel_type
        full = []
        for group in self._groups_for(work):
            for member in group.members:
                if (
                    member is not chosen
                    and member.online
                    and member.capacity(ct) > 0
                    and self._available(member, work, now)
                ):
                    full.append((member.id, member.pool(ct), member.capacity(ct)))
                    if len(full) >= _RESTED_CHECKS:
                        return tuple(full)
        return tuple(full)

    def _rule(
        self,
        chosen: _Option,
        top: AgentState,
        top_reserved: bool,
        top_cost: float,
        work: Work,
        now: float,
    ) -> str:
        """Name the first preference that made `chosen` win over the balance pick `top`."""
        if chosen.best is top:
            return "balance"
        limit = self.policy.complaint_streak_limit
        if limit and work.label in self.policy.streak_labels and top.streak >= limit:
            return "rotation"
        if now - top.last_timeout < self.policy.unreliable_for and not chosen.unreliable:
            return "reliability"
        if top_reserved and not chosen.reserved:
            return "reserve"
        if top_cost > chosen.cost:
            return "scarcity"
        if chosen.best.id in self._resting and top.id not in self._resting:
            return "rotation-break"
        return "balance"

    def _best_in(
        self, group: _Group, work: Work, now: float, streak_work: bool
    ) -> tuple[AgentState, bool, bool] | None:
        """Return a group's best member for the work and its flaws (tired, unreliable).

        Members come off the group's heap in balance order, those at the streak limit
        last; the first one without a recent timeout ends the look.
        """
        heap = group.heaps.get(work.channel_type)
        while heap and heap[0][3] != heap[0][4].version:
            heapq.heappop(heap)
        if not heap:
            return None
        limit = self.policy.complaint_streak_limit
        unreliable_for = self.policy.unreliable_for
        best: AgentState | None = None
        flaws = (True, True)
        for entry in _in_order(heap):
            state = entry[4]
            if entry[3] != state.version or not self._available(state, work, now):
                continue
            found = (
                streak_work and state.streak >= limit,
                unreliable_for > 0 and now - state.last_timeout < unreliable_for,
            )
            if best is None or found < flaws:
                best, flaws = state, found
            if not flaws[1]:
                # Heaps sort agents at the streak limit last: nobody further on is
                # under it when this one is not, so a reliable best is final.
                break
        if best is None:
            return None
        return best, flaws[0], flaws[1]

    def _someone_fresh(self, work: Work, now: float, other_than: AgentState) -> bool:
        """Tell whether an agent under the streak limit (not `other_than`) may take it now."""
        limit = self.policy.complaint_streak_limit
        ct = work.channel_type
        for group in self._groups_for(work):
            if not group.with_room.get(ct):
                continue
            for entry in _in_order(group.heaps.get(ct, [])):
                state = entry[4]
                if (
                    entry[3] == state.version
                    and state is not other_than
                    and state.streak < limit
                    and self._available(state, work, now)
                ):
                    return True
        return False

    def _available(self, state: AgentState, work: Work, now: float) -> bool:
        """Tell whether a member of an eligible group may take the work now (room aside)."""
        if work.excluded and state.id in work.excluded:
            return False
        shifts = state.agent.shifts
        return not shifts or any(s.contains(now) for s in shifts)

    def _groups_for(self, work: Work) -> list[_Group]:
        """Return the groups whose members may take this work (shifts and room aside)."""
        lang = work.language if work.language in self._known_languages else ""
        key = (work.label, lang, work.department, work.level)
        found = self._groups_for_cache.get(key)
        if found is None:
            widened = self._widened(work)
            found = self._groups_for_cache[key] = [
                g for g in self._groups.values() if _group_takes(g, work, lang, widened)
            ]
        return found

    # -- demand: what each class of work needs --------------------------------------

    def _demand_of(self, work: Work) -> _Demand:
        key = (work.label, work.urgent, work.language, work.department, work.channel_type)
        demand = self._demands.get(key)
        if demand is None:
            demand = self._demands[key] = _Demand(*key, sla=work.sla)
            self._link(demand)
        return demand

    def _link(self, demand: _Demand) -> None:
        """Attach a class of work to the groups that may take it without overflow."""
        probe = Work(
            "", "", "", demand.label, "", demand.channel_type, demand.language,
            demand.department, 0.0, 0.0,
        )  # fmt: skip
        demand.groups = self._groups_for(probe)
        for group in demand.groups:
            group.demands.setdefault(demand.channel_type, []).append(demand)
        demand.recount()

    def _observe(self, work: Work, demand: _Demand) -> None:
        """Count a new message in its class's arrival rate (at its arrival time)."""
        work.observed = True
        demand.sla = work.sla
        at = work.arrival
        if demand.first_seen is None:
            demand.first_seen = demand.weight_at = at
        tau = self.policy.rate_window
        demand.weight = demand.weight * math.exp(-max(0.0, at - demand.weight_at) / tau) + 1
        demand.weight_at = max(demand.weight_at, at)
        demand.rate_cache = (math.nan, 0.0)

    def rate(self, demand: _Demand, now: float) -> float:
        """Return a class's observed arrival rate per second (decayed over rate_window)."""
        if demand.first_seen is None:
            return 0.0
        at, rate = demand.rate_cache
        if at != now:
            rate = _per_second(demand.weight, demand.weight_at, demand.first_seen, now, self.policy)
            if now - demand.shared_at < self.policy.rate_window / 5:
                # Other instances take in work of this class too: count theirs as well.
                rate = max(rate, demand.shared_rate)
            demand.rate_cache = (now, rate)
        return rate

    def note_arrivals(
        self, counts: Iterable[tuple[str, str, str, str, str, int]], window: float, now: float
    ) -> None:
        """Take every instance's arrivals over the last `window` seconds, per class.

        Rows are (label, severity, language, department, channel type, count), as the
        shared store counts them. A class this instance has not met yet is left alone:
        its deadline is learned from its first message here.
        """
        totals: dict[tuple[str, bool, str, str, str], int] = {}
        for label, severity, language, department, channel_type, count in counts:
            key = (label, severity in URGENT_SEVERITIES, language, department, channel_type)
            totals[key] = totals.get(key, 0) + count
        for key, count in totals.items():
            demand = self._demands.get(key)
            if demand is not None and window > 0:
                demand.shared_rate = count / window
                demand.shared_at = now
                demand.rate_cache = (math.nan, 0.0)

    def _group_hold(self, group: _Group, channel_type: str) -> float:
        """Return the mean time a member holds a slot (with default_hold as a prior)."""
        self._accrue(group, channel_type)
        exposure, freed, _ = group.exposure[channel_type]
        prior = _PRIOR_SLOTS
        return (exposure + prior * self.policy.default_hold) / (freed + prior)

    def _full_gap(self, demand: _Demand) -> float:
        """Return the mean time between completions among a class's agents when all are busy.

        The capacity-weighted mean hold time of its groups (observed, else
        `default_hold`) over the slots less one.
        """
        ct = demand.channel_type
        capacity = demand.capacity()
        if capacity <= 0:
            return self.policy.default_hold
        weighted = sum(g.capacity.get(ct, 0) * self._group_hold(g, ct) for g in demand.groups)
        return weighted / capacity / max(1, capacity - 1)

    def reserve(
        self, demand: _Demand, now: float, rate: float | None = None
    ) -> tuple[int, float, float]:
        """Return the slots to keep free for a class, its arrivals per gap, and the gap.

        When the class's agents are all busy, a slot frees every `gap` seconds (mean
        hold time / slots). If one gap is long against the class's deadline (a P1
        complaint given 30 s while a slot frees every 40 s), arrivals that find no free
        slot are likely to miss it; r slots kept free absorb them. A slot the reserve
        gives away comes back at the next completion, so the reserve behaves as r
        servers with service time `gap` (Erlang B): r is the least number for which
        P(all r taken) * P(no completion within the deadline) <= reserve_risk.
        """
        risk = self.policy.reserve_risk
        floor = self.policy.urgent_reserve if demand.urgent else 0
        capacity = demand.capacity()
        if rate is None:
            rate = self.rate(demand, now)
        if risk <= 0 or capacity <= 1 or rate <= 0:
            return min(floor, capacity // 2), 0.0, 0.0
        at, counted, gap = demand.gap_cache
        # Hold times are averages over rate_window: within a sixtieth of it (and while
        # the class keeps its agents) the last gap stands; placements come by the
        # thousand, and each would read every group's hold time.
        if not (now - at < self.policy.rate_window / 60 and counted == capacity):
            gap = self._full_gap(demand)
            demand.gap_cache = (now, capacity, gap)
        late = math.exp(-demand.sla / gap)
        load = rate * gap
        slots, blocked = 0, 1.0
        while blocked * late > risk and slots < capacity // 2:
            slots += 1
            blocked = load * blocked / (slots + load * blocked)
        return max(slots, min(floor, capacity // 2)), load, gap

    def _reserve_conflict(
        self, group: _Group, work: Work, own: _Demand, now: float
    ) -> dict[str, Any] | None:
        """Return the reserve a slot of this group would break for `work`, or None.

        Only a more pressing class (P0/P1 for other work, or a shorter deadline) holds
        a reserve against the work; P0/P1 work itself is never held back.
        """
        if work.urgent:
            return None
        sla = work.sla
        # Classes that differ only in language or department share this group's slots:
        # their arrivals add up against one reserve.
        pressing: dict[tuple[str, bool], list[_Demand]] = {}
        for demand in group.demands.get(work.channel_type, ()):
            if demand is own or not (demand.urgent or demand.sla < sla):
                continue
            if demand.first_seen is None and not self.policy.urgent_reserve:
                continue
            pressing.setdefault((demand.label, demand.urgent), []).append(demand)
        for kind in pressing.values():
            demand = min(kind, key=lambda d: d.free())
            rate = sum(self.rate(d, now) for d in kind)
            slots, load, gap = self.reserve(demand, now, rate)
            free = demand.free()
            if slots and free - 1 < slots:
                what = demand.describe() if len(kind) == 1 else _kind_name(demand)
                # Whether one of them may still go to work at risk of missing its own
                # deadline: only if, with one slot fewer, the class's arrivals before a
                # completion outnumber what is left with no more than reserve_risk.
                late = math.exp(-demand.sla / gap) if gap > 0 else 1.0
                spare = _poisson_above(load, free - 1) * late <= self.policy.reserve_risk
                return {
                    "rule": "reserve",
                    "spare": spare,
                    "for": what,
                    "free": free,
                    "reserve": slots,
                    "rate_per_hour": round(rate * 3600, 2),
                    "arrivals_per_gap": round(load, 3),
                    "gap_seconds": round(gap, 1),
                    "verdict": (
                        f"kept for {what}: {free} free, reserve {slots} "
                        f"({rate * 3600:.1f}/h arriving, "
                        f"a slot frees every {gap:.0f} s when all are busy)"
                    ),
                }
        return None

    def _scarcity_cost(
        self, group: _Group, own: _Demand, now: float, *, pressing_only: bool = False
    ) -> tuple[float, _Demand | None]:
        """Return how much the other work this group may take needs its free slots.

        For each other class the group serves: how full its agents would be with this
        slot taken, counting what waits for them, busy + waiting + 1 over their slots,
        weighted by how short its deadline is (a suggestion's hour can wait for a
        completion, a complaint's two minutes cannot). The cost is the largest; work
        goes where it leaves the least pressed class behind (a suggestion-only skill is
        not spent on an inquiry that a complaint specialist with spare time can take,
        and the other way round when complaints crowd in). At 1 or more some class would
        be left with no free slot for what already waits. Also returns that class.
        `pressing_only` counts only classes with a shorter deadline (or P0/P1 ones).
        """
        worst, which = 0.0, None
        for demand in group.demands.get(own.channel_type, ()):
            if demand is own:
                continue
            if pressing_only and not (demand.sla < own.sla or (demand.urgent and not own.urgent)):
                continue
            slots = demand.slots
            if slots <= 0:
                continue
            busy = slots - demand.free_slots
            pressure = (busy + demand.waiting + 1) / slots * min(1.0, _URGENCY_SCALE / demand.sla)
            # In steps: classes about as pressed as each other leave the choice to
            # balance (one slot more or less must not pull all the work one way).
            pressure = math.floor(pressure * _PRESSURE_STEPS) / _PRESSURE_STEPS
            if pressure > worst:
                worst, which = pressure, demand
        return worst, which

    def _better_soon(
        self, chosen: _Option, work: Work, now: float
    ) -> tuple[_Group, float, _Demand] | None:
        """Return a group worth waiting for instead of `chosen`, with when and for whom.

        Only when the chosen group's agents are pressed by a more pressing class (its
        agents would be at least _PRESSED full with the deadline weight, see
        _scarcity_cost), and a full group that is not pressed that way is expected to
        free a slot (its observed hold time over its slots) in under half of the time
        the work can still wait before it is at risk.
        """
        if work.urgent:
            return None
        own = self._demand_of(work)
        ct = work.channel_type
        pressed, which = 0.0, None
        if chosen.cost >= _PRESSED:
            pressed, which = self._scarcity_cost(chosen.group, own, now, pressing_only=True)
        if pressed < _PRESSED or which is None:
            # Or work that came in before this and waits for these agents, whose free
            # slots would not cover it: a suggestion must not wait behind later
            # inquiries that other agents could take in a moment.
            which = next(
                (
                    d
                    for d in chosen.group.demands.get(ct, ())
                    if d is not own
                    and d.waiting
                    and d.free_slots <= d.waiting
                    and self._oldest_waiting(d) < work.arrival
                ),
                None,
            )
            if which is None:
                return None
            pressed = math.inf
        slack = work.arrival + self.policy.reserve_slack * work.sla - now
        if slack <= 0:
            return None
        for group in self._groups_for(work):
            if group is chosen.group or group.with_room.get(ct) or not group.capacity.get(ct):
                continue
            # All its slots are busy: one frees every hold / slots on average.
            expected = self._group_hold(group, ct) / group.capacity[ct]
            if expected > slack / 2:
                continue
            if which in group.demands.get(ct, ()):
                continue  # its slot would go to the same waiting work
            cost, _ = self._scarcity_cost(group, own, now, pressing_only=True)
            if cost < pressed:
                return group, expected, which
        return None

    def _oldest_waiting(self, demand: _Demand) -> float:
        """Return the arrival of the class's first waiting message (inf: none waits)."""
        key = (demand.label, demand.language, demand.channel_type, demand.department, 0)
        if key not in self._buckets:
            return math.inf
        head = self._head(key)
        return math.inf if head is None else head[3].arrival

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
        language = work.language if work.language in self._known_languages else ""
        return _skills_take(
            agent.classes,
            agent.languages,
            agent.queues,
            agent.supervisor,
            work,
            language,
            self._widened(work),
        )

    def _widened(self, work: Work) -> tuple[str, ...]:
        if not work.level:
            return ()
        return tuple(step.widen for step in self.policy.overflow[: work.level])

    def _assign(self, work: Work, state: AgentState, now: float) -> None:
        if work.slot in self.holder:
            # The conversation moves from an absent holder, and its slot with it.
            self._free_slot(work.slot)
        ct = work.channel_type
        pool = state.pool(ct)
        state.used[pool] = state.used.get(pool, 0) + 1
        state.last_assigned = now
        if work.label in self.policy.streak_labels:
            state.streak += 1
        else:
            state.streak = 0
        self._note_resting(state)
        self._index(state)
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
            self._index(state)
        if state is not None and state.group is not None:
            self._accrue(state.group, ct)
            state.group.exposure[ct][1] += 1
        return agent_id

    def _accrue(self, group: _Group, channel_type: str) -> None:
        """Add the group's busy slot-seconds since the last change (before a change)."""
        at = self._clock
        record = group.exposure.get(channel_type)
        if record is None or record[2] == -math.inf:
            group.exposure[channel_type] = [0.0, 0.0, at]
            return
        elapsed = at - record[2]
        if elapsed > 0:
            busy = group.capacity.get(channel_type, 0) - group.free.get(channel_type, 0)
            decay = math.exp(-elapsed / self.policy.rate_window)
            record[0] = record[0] * decay + busy * elapsed
            record[1] *= decay
            record[2] = at

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
                self._index(state)

    def hold(self, slot: str, conversation: str, agent_id: str, channel_type: str) -> None:
        """Count a slot found in the store at startup (an open conversation)."""
        if slot in self.holder:
            return
        state = self.states.get(agent_id)
        if state is None:
            state = self.states[agent_id] = AgentState(
                Agent(agent_id, agent_id, 0, "", present=False), online=False
            )
            self._by_id = None
        self.holder[slot] = agent_id
        self._slot_ct[slot] = channel_type
        self._note_open(slot, conversation, agent_id)
        pool = state.pool(channel_type)
        state.used[pool] = state.used.get(pool, 0) + 1
        self._ensure_type(channel_type)
        self._index(state)

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
                self._index(state)
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
        self._demand_of(work).waiting -= 1
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

    def why_waiting(self, message_id: str) -> dict[str, Any] | None:
        """Return the reservation that keeps a waiting message from an agent with room.

        None when the message is not waiting, or waits only because nobody who may take
        it has room (or only agents it timed out with, or off shift).
        """
        work = self._waiting.get(message_id)
        if work is None:
            return None
        return self._held_back.get(_queue_key(work))

    def waiting_count(self) -> int:
        """Return how many messages wait."""
        return len(self._waiting)

    def queue_depths(self) -> dict[str, int]:
        """Return the number of waiting messages per department (queue)."""
        return dict(self._depth)

    def iter_states(self) -> Iterator[AgentState]:
        """Yield every agent's live state."""
        return iter(self.states.values())

    def _explain(
        self, work: Work, now: float, chosen: AgentState, rule: str, notes: dict[_Group, str]
    ) -> Explanation:
        """Record why this agent, for `omnirouter explain` (rendered when read).

        Up to EXPLAIN_LIST_LIMIT agents, every agent's verdict. On a bigger roster the
        record is built from the groups (see _Group) without walking the roster: the
        chosen agent, each other eligible group's best member, and the rest counted by
        reason, so its size and cost follow the number of groups. Each listed agent is a
        row of the values its verdict follows from (router/explain.py words it).
        """
        header: dict[str, Any] = {
            "rule": rule,
            "chosen": chosen.id,
            "channel_type": work.channel_type,
            "label": work.label,
            "language": work.language,
            "department": work.department,
            "overflow_level": work.level,
        }
        eligible = self._groups_for(work)
        facts = _ExplainFacts(self, work, now, chosen, eligible, notes)
        others: dict[str, int] = {}
        if len(self.states) <= EXPLAIN_LIST_LIMIT:
            if self._by_id is None:
                self._by_id = sorted(self.states.values(), key=lambda s: s.id)
            rows = [facts.row(state) for state in self._by_id]
        else:
            ct = work.channel_type
            rows = [facts.row(chosen)]

            def count(reason: str, n: int) -> None:
                if n > 0:
                    others[reason] = others.get(reason, 0) + n

            for group in self._groups.values():
                if group not in eligible:
                    count(_refusal(group.classes, group.languages, work), len(group.members))
                    continue
                count("off line", len(group.members) - group.online)
                count("full", group.online - group.with_room.get(ct, 0))
                rest = group.with_room.get(ct, 0)
                found = self._best_in(group, work, now, False) if rest else None
                if found is not None and found[0] is not chosen and len(rows) < EXPLAIN_LIST_LIMIT:
                    rows.append(facts.row(found[0]))
                    rest -= 1
                if chosen.group is group:
                    rest -= 1
                count("eligible, not chosen", rest)
        policy = self.policy
        limit = policy.complaint_streak_limit if work.label in policy.streak_labels else 0
        return Explanation(
            compact_record(
                header,
                rows,
                facts.groups,
                excluded=sorted(work.excluded) if work.excluded else [],
                rotation_limit=limit,
                others=others,
                # A copy: the record says why as it stood at the decision.
                excluded_for=dict(work.excluded_for) if work.excluded_for else None,
            )
        )


class _ExplainFacts:
    """Rows of an explain record: what each listed agent's verdict follows from."""

    def __init__(
        self,
        scheduler: Scheduler,
        work: Work,
        now: float,
        chosen: AgentState,
        eligible: list[_Group],
        notes: dict[_Group, str],
    ) -> None:
        self.scheduler = scheduler
        self.work = work
        self.now = now
        self.chosen_group = chosen.group
        self.eligible = eligible
        self.notes = notes
        self.unreliable_for = scheduler.policy.unreliable_for
        self.groups: list[list[Any]] = []  # [may take the work, why not, note]
        self._index: dict[_Group, int] = {}

    def row(self, state: AgentState) -> list[Any]:
        """Return the row of one agent (see router.explain.Row)."""
        agent = state.agent
        now = self.now
        capacity, used, room = state.slots(self.work.channel_type)
        return [
            agent.id,
            state.online,
            not agent.shifts or any(s.contains(now) for s in agent.shifts),
            capacity,
            used,
            room,
            state.streak,
            now - state.last_timeout < self.unreliable_for,
            self._group_of(state),
        ]

    def _group_of(self, state: AgentState) -> int:
        """Return the index of the agent's group facts (added on first use)."""
        group = state.group
        if group is not None:
            found = self._index.get(group)
            if found is not None:
                return found
            self._index[group] = len(self.groups)
            chosen = self.chosen_group
            note = self.notes.get(group, "") if chosen is None or chosen is not group else ""
            may_take = group in self.eligible
            refusal = "" if may_take else _refusal(group.classes, group.languages, self.work)
            self.groups.append([may_take, refusal, note])
            return self._index[group]
        # Known only from the store (not in the roster): its skills, judged alone.
        agent = state.agent
        # Excluded and off-shift agents are refused before skills are looked at, so
        # _eligible's own checks of those change nothing here.
        may_take = self.scheduler._eligible(state, self.work, self.now)
        refusal = "" if may_take else _refusal(agent.classes, agent.languages, self.work)
        self.groups.append([may_take, refusal, ""])
        return len(self.groups) - 1


def _refusal(classes: frozenset[str], languages: frozenset[str], work: Work) -> str:
    """Say why agents with these skills may not take the work (they may not)."""
    if classes and work.label not in classes:
        return f"not skilled for {work.label}"
    if languages and work.language not in languages:
        return f"does not speak {work.language}"
    return f"not in department {work.department}"


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
        "reserve": "agents kept free for a more pressing class's reserve",
        "reserve-released": "only reserved slots free and the message is at risk",
        "scarcity": "agents whose skills other waiting or expected work needs kept for it",
        "rotation-break": "agent at the complaint streak limit: other work is the break",
    }.get(rule, rule)
    level = f", overflow level {work.level}" if work.level else ""
    return f"{what} ({room}{level})"


@dataclass(slots=True)
class _Option:
    """One group's best member for a message, and what speaks against the group."""

    best: AgentState
    group: _Group
    tired: bool  # at the complaint streak limit (complaints only)
    unreliable: bool  # let an offer time out lately
    reserved: bool  # taking it would break a more pressing class's reserve
    cost: float  # shortfall it would leave other work of its group (scarcity)
    conflict: dict[str, Any] | None
    channel_type: str

    def score(self, resting: set[str] | tuple[()]) -> tuple[Any, ...]:
        """Return the option's rank: smaller is better."""
        best = self.best
        return (
            self.tired,
            self.unreliable,
            self.reserved,
            self.cost,
            best.id not in resting,
            *_balance_key(best, self.channel_type),
        )


def _balance_key(state: AgentState, channel_type: str) -> tuple[float, float, int]:
    """Return an agent's balance order for a channel type (as its heap entry has it).

    Smallest first: most spare room as a share of capacity, longest since the last
    assignment, then the id.
    """
    room, capacity = state.counted.get(channel_type, (0, 0))
    return (-room / capacity if capacity else 0.0, state.last_assigned, -state.rank)


def _in_order(heap: list[_Entry]) -> Iterator[_Entry]:
    """Yield a heap's entries smallest first, touching O(k log k) for the first k."""
    if not heap:
        return
    yield heap[0]
    frontier: list[tuple[tuple[float, float, int, int], int]] = []
    for child in (1, 2):
        if child < len(heap):
            heapq.heappush(frontier, (heap[child][:4], child))
    while frontier:
        _, i = heapq.heappop(frontier)
        yield heap[i]
        for child in (2 * i + 1, 2 * i + 2):
            if child < len(heap):
                heapq.heappush(frontier, (heap[child][:4], child))


def _group_takes(group: _Group, work: Work, language: str, widened: tuple[str, ...]) -> bool:
    """Tell whether a group's members may take the work (shifts and room aside)."""
    return _skills_take(
        group.classes, group.languages, group.queues, group.supervisor, work, language, widened
    )


def _notes(
    evaluated: list[tuple[bool, float, _Group, dict[str, Any] | None, _Demand | None]],
    chosen: _Option,
) -> dict[_Group, str]:
    """Return, per passed-over group, what kept it (for its members' explain verdicts).

    A reserve it would have broken, or the scarce work that ranked it below the chosen
    agent's group; a group that lost on balance alone gets no note.
    """
    notes: dict[_Group, str] = {}
    for _reserved, cost, group, conflict, short in evaluated:
        if conflict is not None:
            notes[group] = conflict["verdict"]
        elif short is not None and cost > chosen.cost:
            notes[group] = (
                f"kept for scarce work: {short.describe()} has "
                f"{short.free()} free slots ({short.waiting} waiting)"
            )
    return notes


def _skills_take(
    classes: frozenset[str],
    languages: frozenset[str],
    queues: frozenset[str],
    supervisor: bool,
    work: Work,
    language: str,
    widened: tuple[str, ...],
) -> bool:
    """Tell whether skills, languages and departments admit the work, after overflow.

    `language` is the work's language, or "" when no agent lists it (anyone answers).
    """
    supervisor_ok = supervisor and WIDEN_SUPERVISORS in widened
    if classes and work.label not in classes and not supervisor_ok:
        return False
    if (
        languages
        and language
        and language not in languages
        and WIDEN_LANGUAGES not in widened
        and not supervisor_ok
    ):
        return False
    return not (
        work.department not in queues and WIDEN_DEPARTMENTS not in widened and not supervisor_ok
    )


def _queue_key(work: Work) -> tuple[str, str, str, str, int]:
    return (work.label, work.language, work.channel_type, work.department, work.level)


def _per_second(weight: float, at: float, first: float, now: float, policy: Policy) -> float:
    """Return the rate of a decayed count: events per second over the recent window.

    Early on the window is the time since the first event (at least a minute), so a
    new class's rate is not underestimated for its first `rate_window` seconds.
    """
    window = policy.rate_window
    decayed = weight * math.exp(-max(0.0, now - at) / window)
    span = window * (1.0 - math.exp(-max(0.0, now - first) / window))
    return decayed / max(span, min(window, 60.0))


def _kind_name(demand: _Demand) -> str:
    """Name a class across languages and departments: "P0/P1 complaint chat"."""
    urgent = "P0/P1 " if demand.urgent else ""
    return f"{urgent}{demand.label} {demand.channel_type}"


def _poisson_above(mean: float, k: int) -> float:
    """Return P(N > k) for N ~ Poisson(mean)."""
    if k < 0:
        return 1.0
    term = math.exp(-mean)
    below = term
    for i in range(1, k + 1):
        term *= mean / i
        below += term
    return max(0.0, 1.0 - below)
