"""Alerts for the on-duty manager: P0 messages, SLA breaches, complaint crises, unhappy customers.

Each alert goes out through the agent tool the config names (`classifier.crisis.target`
or `scheduling.breach_target`) as an `alert` delivery, committed before it is sent. An
unsatisfied survey answer goes to the crisis target, or without one to every
supervisor's own tool.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import structlog

from router.core import Core
from router.crisis import CrisisEvent
from router.delivery import AlertPayload, ToolTarget
from router.model import Classification, InboundMessage, new_ulid, ticket_number
from router.schedule import Work
from router.store import IngestResult, OutboxItem

log = structlog.get_logger("router.pipeline")


class Alerts:
    """Raises alerts from what the pipeline sees."""

    def __init__(self, core: Core) -> None:
        """Work on the shared core."""
        self.core = core

    async def urgent(
        self,
        message_id: str,
        conversation_id: str,
        msg: InboundMessage,
        cls: Classification,
        queue: str,
        now: float,
    ) -> None:
        """P0 (someone's safety at risk): tell the on-duty manager at once, not only the agent."""
        target = self.core.config.classifier.crisis.target
        if target is None:
            return
        alert = {
            "kind": "urgent",
            "reason": "P0",
            "message_id": message_id,
            "ticket": ticket_number(conversation_id),
            "channel": msg.channel,
            "queue": queue,
            "signals": [s.to_dict() for s in cls.signals],
        }
        await self.core.send_now([self._item(target, alert, message_id, now)])

    async def unsatisfied(
        self, result: IngestResult, msg: InboundMessage, cls: Classification, now: float
    ) -> None:
        """A low survey answer reopened a ticket: flag it to the supervisors."""
        core = self.core
        alert = {
            "kind": "low_satisfaction",
            "ticket": ticket_number(result.conversation_id),
            "score": result.survey_score,
            "message_id": result.message_id,
            "channel": msg.channel,
            "reopened": result.reopened,
            "language": cls.language,
        }
        log.warning("ticket.unsatisfied", **{k: v for k, v in alert.items() if k != "kind"})
        target = core.config.classifier.crisis.target
        if target is not None:
            await core.send_now([self._item(target, alert, result.message_id, now)])
            return
        items = [
            OutboxItem(
                id=new_ulid(),
                target=ToolTarget(state.agent.tool),
                agent_id=state.id,
                address=state.agent.address or state.id,
                payload=AlertPayload(alert),
                message_id=result.message_id,
                next_attempt_at=now,
                created_at=now,
            )
            for state in core.scheduler.iter_states()
            if state.agent.supervisor and state.agent.tool
        ]
        await core.send_now(items)

    async def crisis(self, events: list[CrisisEvent], now: float) -> None:
        """Log crisis events and send each to the crisis target."""
        core = self.core
        target = core.config.classifier.crisis.target
        items = []
        for event in events:
            log.warning(
                f"crisis.{event.kind}",
                reason=event.reason,
                key=event.key,
                count=event.count,
                rate=round(event.rate, 2),
                baseline=None if event.baseline is None else round(event.baseline, 2),
            )
            core.metrics.child(core.metrics.crisis_events, event.reason, event.kind).inc()
            if target is None:
                continue
            message_id = event.evidence[-1].message_id if event.evidence else ""
            items.append(self._item(target, event.to_dict(), message_id, now))
        await core.send_now(items)

    async def breach(self, work: Work, now: float) -> None:
        """Report a message still waiting for an agent at its SLA deadline."""
        core = self.core
        core.metrics.child(core.metrics.sla_breaches, work.department, work.label).inc()
        event = {
            "kind": "sla_breach",
            "message_id": work.id,
            "ticket": ticket_number(work.conversation),
            "queue": work.department,
            "label": work.label,
            "severity": work.severity,
            "language": work.language,
            "channel_type": work.channel_type,
            "waited_s": round(now - work.arrival, 3),
            "deadline": datetime.fromtimestamp(work.deadline, UTC).isoformat(),
            "overflow_level": work.level,
        }
        log.warning("sla.breach", **{k: v for k, v in event.items() if k != "kind"})
        sc = core.config.scheduling
        if sc.breach_target is not None:
            await core.send_now(
                [self._item(sc.breach_target, event, work.id, now, sc.breach_address)]
            )

    def _item(
        self,
        target: str,
        alert: dict[str, Any],
        message_id: str,
        now: float,
        address: str | None = None,
    ) -> OutboxItem:
        """Return an alert for the on-duty manager, sent through the target agent tool."""
        address = address or self.core.config.classifier.crisis.address or "crisis"
        return OutboxItem(
            id=new_ulid(),
            target=ToolTarget(target),
            agent_id=address,
            address=address,
            payload=AlertPayload(alert),
            message_id=message_id,
            next_attempt_at=now,
            created_at=now,
        )
