"""Prometheus gauges of agents and queues, published only when a value changes."""

from __future__ import annotations

from typing import Any

from router.metrics import Metrics
from router.outbox import Dispatcher
from router.schedule import Scheduler

# Every this many routed messages the whole set is published again (a safety net,
# cheap at that rate) instead of only what one message changed.
_SWEEP_EVERY = 64


class Gauges:
    """Keeps agent load, capacity, presence and queue depth gauges current."""

    def __init__(self, scheduler: Scheduler, dispatcher: Dispatcher) -> None:
        """Publish nothing until the first update."""
        self.scheduler = scheduler
        self.dispatcher = dispatcher
        self._published_to: Metrics | None = None
        # What was last published, per agent id and per ("queue", name).
        self._last: dict[Any, Any] = {}
        self._since_sweep = 0

    def routed(self, metrics: Metrics, agent_id: str | None, queue: str) -> None:
        """Publish what one routed message changed: its agent's load or its queue's depth."""
        self._since_sweep += 1
        if self._published_to is not metrics or self._since_sweep >= _SWEEP_EVERY:
            self.update(metrics)
            return
        if agent_id is not None:
            # One agent's state, not the scheduler's roster-wide views (which build a
            # dict of every agent on each call).
            state = self.scheduler.states.get(agent_id)
            if state is not None:
                a = state.agent
                self._set_agent(metrics, a.id, (state.load, a.capacity, 1 if a.present else 0))
        else:
            self._set_queue(metrics, queue, self.scheduler.queue_depths().get(queue, 0))
        metrics.outbox_backlog.set(self.dispatcher.backlog)

    def update(self, metrics: Metrics) -> None:
        """Publish every agent and queue gauge whose value changed since the last call."""
        # A labels() lookup per agent per message cost more than the classifier on a
        # ten-agent roster, hence only what changed.
        self._since_sweep = 0
        if self._published_to is not metrics:
            self._published_to = metrics
            self._last = {}
        load = self.scheduler.load
        for a in self.scheduler.agents.values():
            self._set_agent(metrics, a.id, (load.get(a.id, 0), a.capacity, 1 if a.present else 0))
        for queue, depth in self.scheduler.queue_depths().items():
            self._set_queue(metrics, queue, depth)
        metrics.outbox_backlog.set(self.dispatcher.backlog)

    def _set_agent(self, m: Metrics, agent_id: str, values: tuple[int, int, int]) -> None:
        if self._last.get(agent_id) != values:
            m.child(m.agent_load, agent_id).set(values[0])
            m.child(m.agent_capacity, agent_id).set(values[1])
            m.child(m.agent_present, agent_id).set(values[2])
            self._last[agent_id] = values

    def _set_queue(self, m: Metrics, queue: str, depth: int) -> None:
        if self._last.get(("queue", queue)) != depth:
            m.child(m.queue_depth, queue).set(depth)
            self._last[("queue", queue)] = depth
