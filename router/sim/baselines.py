"""The policies of the open-source helpdesks, to measure ours against on the same trace.

Each is the real scheduler with its smarts turned off and its choice rule replaced, so
capacity accounting, accept timeouts and presence work identically for all of them:

* `least_loaded`: Rocket.Chat's load balancing: one central first-come-first-served
  queue, the eligible on-line agent with the fewest open conversations gets the next
  message. No deadlines, no priorities, no rotation, no memory of who did not answer.
* `round_robin`: Chatwoot's rotation: each arrival is bound to the next on-line eligible
  agent in turn and waits in that agent's own line if the agent is busy.
* `random`: a random eligible agent with room, central first-come-first-served queue.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable

from router.explain import Explanation
from router.model import Agent
from router.schedule import AgentState, Decision, Policy, Returned, Scheduler, Work


def _plain(policy: Policy) -> Policy:
    """Return the policy with every rule of ours switched off (timeouts kept)."""
    return Policy(
        accept_timeout=policy.accept_timeout,
        complaint_streak_limit=0,
        unreliable_for=0.0,
        reserve_risk=0.0,
        scarcity=False,
    )


class LeastLoaded(Scheduler):
    """Fewest open conversations first; one FIFO queue."""

    def __init__(self, agents: Iterable[Agent] = (), policy: Policy | None = None) -> None:
        super().__init__(agents, _plain(policy or Policy()))
        self.remember_timeouts = False
        self.sticky = False

    def order(self, work: Work) -> tuple[int, float, int]:
        """Serve in arrival order, whatever the class or deadline."""
        return (0, work.arrival, work.seq)

    def pick(
        self, work: Work, now: float
    ) -> tuple[AgentState, str, str, Explanation | None] | None:
        """Take the eligible agent with the fewest open conversations."""
        cands = self.eligible_with_room(work, now)
        if not cands:
            return None
        best = min(cands, key=lambda s: (s.load, s.last_assigned, s.id))
        return best, "least_loaded", "fewest open conversations", None


class RandomPolicy(LeastLoaded):
    """A random eligible agent with room."""

    def __init__(
        self, agents: Iterable[Agent] = (), policy: Policy | None = None, seed: int = 0
    ) -> None:
        super().__init__(agents, policy)
        self._rng = random.Random(seed)

    def pick(
        self, work: Work, now: float
    ) -> tuple[AgentState, str, str, Explanation | None] | None:
        """Take any eligible agent with room, at random."""
        cands = sorted(self.eligible_with_room(work, now), key=lambda s: s.id)
        if not cands:
            return None
        return self._rng.choice(cands), "random", "random eligible agent", None


class RoundRobin(Scheduler):
    """Bind each arrival to the next on-line eligible agent; it waits in their line."""

    def __init__(self, agents: Iterable[Agent] = (), policy: Policy | None = None) -> None:
        super().__init__(agents, _plain(policy or Policy()))
        self.remember_timeouts = False
        self.sticky = False
        self._turn = 0
        self._lines: dict[str, deque[Work]] = {}
        self._bound: dict[str, str] = {}  # message id -> agent id

    def submit(self, work: Work) -> None:
        """Bind the message to the next agent in rotation (or keep it unbound to retry)."""
        super().submit(work)
        self._bind(work, 0.0)

    def _bind(self, work: Work, now: float) -> None:
        ids = sorted(
            s.id
            for s in self.states.values()
            if s.online and s.capacity(work.channel_type) > 0 and self._eligible(s, work, now)
        )
        if not ids:
            self._bound.pop(work.id, None)
            return
        agent_id = ids[self._turn % len(ids)]
        self._turn += 1
        self._bound[work.id] = agent_id
        self._lines.setdefault(agent_id, deque()).append(work)

    def set_presence(
        self, agent_id: str, online: bool, now: float = 0.0, *, away: bool = False
    ) -> list[Returned]:
        """Rebind the line of an agent who goes off line."""
        returned = super().set_presence(agent_id, online, now, away=away)
        if not online:
            line = self._lines.pop(agent_id, deque())
            for work in line:
                if work.state == "waiting" and self._bound.get(work.id) == agent_id:
                    self._bind(work, now)
        return returned

    def dispatch(self, now: float) -> list[Decision]:
        """Give each agent with room the head of its own line."""
        out: list[Decision] = []
        for work in list(self._waiting.values()):
            if work.id not in self._bound:
                self._bind(work, now)  # nobody was on line when it arrived
        for agent_id, line in self._lines.items():
            state = self.states[agent_id]
            while line:
                work = line[0]
                if work.state != "waiting" or self._bound.get(work.id) != agent_id:
                    line.popleft()
                    continue
                if not state.online or state.room(work.channel_type) <= 0:
                    break
                line.popleft()
                del self._bound[work.id]
                self._assign(work, state, now)
                out.append(Decision(work, state.agent, "round_robin", "next in rotation"))
        return out
