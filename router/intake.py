"""Intake: one customer message, classified, placed and committed, in one straight walk.

`Intake.ingest` is the channels' sink. It returns a `Receipt` only after the message,
its routing decision and every send it causes (the agent's delivery, the customer's
acknowledgement) are committed in one transaction; only then may a channel
acknowledge its source. Classification and placement happen *before* the commit, in
memory, so a message is never stored without its route.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import structlog

from router.alerts import Alerts
from router.classify import severity_for
from router.classify_workers import ClassifierSpec
from router.config import Config
from router.contacts import ContactBook, handle_key
from router.core import Classifier, Core
from router.delivery import ChannelTarget, ToolTarget, ack_payload, assignment_payload
from router.drivers import Receipt
from router.lifecycle import LOW_SCORE, parse_score
from router.model import (
    URGENT_SEVERITIES,
    Assignment,
    Classification,
    InboundMessage,
    Signal,
    new_ulid,
    ticket_number,
)
from router.schedule import Decision, Work
from router.store import IngestResult, NewMessage, OutboxItem
from router.threads import ThreadKey, thread_key

log = structlog.get_logger("router.pipeline")
# An E.164 phone number, as the contact form and the SMS channels write them.
_PHONE = re.compile(r"\+[1-9][0-9]{6,14}")


def classifier_spec(config: Config) -> ClassifierSpec:
    """Return the settings of the classifier the config asks for (picklable)."""
    c = config.classifier
    return ClassifierSpec(
        model=c.model,
        amount_threshold=c.amount_threshold,
        vip_contacts=frozenset(c.vip_contacts),
        model_path=c.model_path,
    )


def make_classifier(config: Config) -> Classifier:
    """Return the classifier the config asks for (the trained model by default)."""
    return classifier_spec(config).build()


def make_assignment(
    core: Core,
    choice: Decision,
    conversation_id: str,
    reason: str,
    now: float,
) -> Assignment:
    """Return the routing record of a decision, with the capacity the store re-checks."""
    work = choice.work
    ct = work.channel_type
    state = core.scheduler.states.get(choice.agent.id)
    # A new slot is checked against the agent's capacity in the commit itself, so two
    # workers cannot overfill an agent; a sticky follow-up takes no new slot.
    check = state is not None and choice.new_slot
    policy = core.scheduler.policy
    streak_seen: int | None = None
    if (
        check
        and state is not None
        and core.store.shared
        and policy.complaint_streak_limit
        and work.label in policy.streak_labels
    ):
        # The decision already counted this message in the agent's streak.
        streak_seen = max(0, state.streak - 1)
    return Assignment(
        message_id=work.id,
        conversation_id=conversation_id,
        agent_id=choice.agent.id,
        queue=work.department,
        reason=reason,
        sla_deadline=datetime.fromtimestamp(work.deadline, UTC),
        assigned_at=datetime.fromtimestamp(now, UTC),
        channel_type=ct,
        capacity=state.capacity(ct) if check and state is not None else 0,
        pool=state.pool(ct) if check and state is not None else "*",
        explain=choice.explain,
        streak_seen=streak_seen,
        streak_limit=policy.complaint_streak_limit,
        streak_labels=tuple(sorted(policy.streak_labels)),
        rested_full=choice.rested_full if streak_seen is not None else (),
        holder_seen=(
            (choice.previous[0] if choice.previous else "")
            if core.store.shared and choice.new_slot
            else None
        ),
    )


def log_routed(
    msg: InboundMessage,
    message_id: str,
    conversation_id: str,
    cls: Classification,
    queue: str,
    choice: Decision | None,
    state: str,
    *,
    waited: float = 0.0,
    commit_ms: float | None = None,
) -> None:
    """Emit the canonical line: one per routed message, everything an operator asks about.

    The same fields whether the message was placed on arrival or later from a queue.
    """
    log.info(
        "message.routed",
        message_id=message_id,
        ticket=ticket_number(conversation_id),
        channel=msg.channel,
        channel_type=msg.channel_type,
        label=cls.label,
        confidence=round(cls.confidence, 3),
        severity=cls.severity,
        signals=[s.kind for s in cls.signals] or None,
        language=cls.language,
        queue=queue,
        agent=choice.agent.id if choice else None,
        sticky=bool(choice and not choice.new_slot),
        rule=choice.rule if choice else None,
        waited_s=round(waited, 3),
        state=state,
        text=msg.text,
        commit_ms=commit_ms,
    )


@dataclass(frozen=True, slots=True)
class Routed:
    """What one ingest decided: the receipt for the channel and how it was routed."""

    receipt: Receipt
    cls: Classification
    queue: str
    choice: Decision | None  # None: queued (or a duplicate)


class Intake:
    """Takes customer messages in; the sink every channel hands its messages to."""

    def __init__(self, core: Core, alerts: Alerts) -> None:
        """Work on the shared core."""
        self.core = core
        self.alerts = alerts
        # Who is who across channels, and who wrote when (the repeat-contact signal).
        self.contacts = ContactBook()

    async def ingest(self, msg: InboundMessage) -> Receipt:
        """Classify, route and commit one message; return only after the commit."""
        started = time.perf_counter()
        key = (msg.channel, thread_key(msg))
        core = self.core
        m = core.metrics
        threads = core.threads
        lock = threads.enter(key)
        try:
            async with lock:
                routed = await self._route(msg, key)
        except Exception:
            m.child(m.ingest_errors, msg.channel).inc()
            raise
        finally:
            threads.leave(key)
        elapsed = time.perf_counter() - started
        receipt, cls, queue, choice = routed.receipt, routed.cls, routed.queue, routed.choice
        if receipt.duplicate:
            m.child(m.duplicates, msg.channel).inc()
            log.info(
                "message.duplicate",
                channel=msg.channel,
                ticket=receipt.ticket,
                message_id=receipt.message_id,
                payload_conflict=receipt.payload_conflict,
            )
            return receipt
        m.ingest_seconds.observe(elapsed)
        m.child(m.ingested, msg.channel, cls.label).inc()
        m.child(m.severity, cls.severity).inc()
        if choice is not None:
            m.child(m.assigned, queue, "direct" if choice.new_slot else "sticky").inc()
            m.child(m.wait_seconds, cls.label, "yes").observe(0.0)
        core.gauges.routed(m, choice.agent.id if choice is not None else None, queue)
        log_routed(
            msg,
            receipt.message_id,
            receipt.conversation_id,
            cls,
            queue,
            choice,
            receipt.state,
            commit_ms=round(elapsed * 1000, 2),
        )
        return receipt

    async def _route(self, msg: InboundMessage, key: ThreadKey) -> Routed:
        """Walk one message through classify → place → commit → outbox (thread lock held)."""
        core = self.core
        now = core.clock()
        contact_key = handle_key(msg.channel_type, msg.contact_handle)
        cls = await self.classify(msg, contact_key, now)
        queue = core.config.queue_for(
            cls.label,
            cls.severity,
            cls.confidence,
            signals=[s.kind for s in cls.signals],
            language=cls.language,
            channel_type=msg.channel_type,
        )
        deadline = now + self.sla_seconds(cls)
        known = core.threads.conversation(key)
        surveyed, score = self._survey_answer(msg, key, now) if known is None else (None, None)
        proposed = known or new_ulid()
        message_id = new_ulid()
        work = Work(
            id=message_id,
            slot=proposed,
            conversation=proposed,
            label=cls.label,
            severity=cls.severity,
            channel_type=msg.channel_type,
            language=cls.language,
            department=queue,
            arrival=now,
            deadline=deadline,
        )
        # A satisfied survey answer is not work for anyone: it is not placed.
        content = score is not None and score > LOW_SCORE
        choice = None if content else core.scheduler.place(work, now)
        new = self._new_message(
            msg,
            key[1],
            cls,
            queue,
            message_id,
            proposed,
            known or surveyed,
            work,
            choice,
            reopen_since=now - core.config.lifecycle.reopen_window,
            survey_of=surveyed or "",
            survey_score=score,
        )
        try:
            result = await core.store.ingest(new)
        except BaseException:
            if choice is not None:
                core.scheduler.undo(choice, requeue=False)
            raise
        if result.duplicate:
            if choice is not None:
                core.scheduler.undo(choice, requeue=False)
            return Routed(self._receipt(result, duplicate=True), cls, queue, None)
        if choice is not None and not result.assigned:
            # Another worker filled the agent meanwhile: the message waits instead, and
            # this scheduler learns what the others hold.
            core.scheduler.undo(choice, requeue=False)
            choice = None
            if core.store.shared:
                core.resync_soon()  # the replica of the others' work catches up
            else:
                core.scheduler.sync_external(await core.store.open_loads())
        # Whatever this message was, the thread's survey is over (answered, or the ticket
        # reopened or closed by the message).
        core.surveys.pop(key, None)
        if result.survey_score is not None:
            await self._survey_answered(msg, result, cls, now)
            if result.survey_score > LOW_SCORE:
                return Routed(self._receipt(result), cls, queue, None)
        conversation_id = result.conversation_id
        if conversation_id != proposed:
            # The store joined a resolved conversation of this thread and reopened it.
            if choice is not None:
                core.scheduler.move_slot(proposed, conversation_id)
            work.slot = work.conversation = conversation_id
        core.threads.opened(key, conversation_id)
        self._remember_contact(contact_key, result, now)
        # The sends exactly as committed (the store named their conversation).
        for item in result.outbox:
            core.dispatcher.submit(item)
        if choice is None:
            core.scheduler.submit(work)
        if cls.severity == "P0":
            await self.alerts.urgent(message_id, conversation_id, msg, cls, queue, now)
        if core.crisis is not None:
            events = core.crisis.observe(
                message_id, contact_key, cls.label, cls.severity, msg.text, msg.subject, now
            )
            await self.alerts.crisis(events, now)
        return Routed(self._receipt(result), cls, queue, choice)

    def _survey_answer(
        self, msg: InboundMessage, key: ThreadKey, now: float
    ) -> tuple[str | None, int | None]:
        """Return the surveyed ticket and the score when this message answers its survey."""
        pending = self.core.surveys.get(key)
        if pending is None:
            return None, None
        conversation_id, until = pending
        if now > until:
            del self.core.surveys[key]
            return None, None
        score = parse_score(msg.text)
        return (conversation_id, score) if score is not None else (None, None)

    async def _survey_answered(
        self, msg: InboundMessage, result: IngestResult, cls: Classification, now: float
    ) -> None:
        """Count a survey answer; a low one reopened the ticket: tell a supervisor."""
        core = self.core
        score = result.survey_score
        if score is None:
            return
        core.metrics.child(core.metrics.csat, str(score)).inc()
        log.info(
            "ticket.survey_answered",
            ticket=ticket_number(result.conversation_id),
            score=score,
            reopened=result.reopened,
        )
        if score <= LOW_SCORE:
            await self.alerts.unsatisfied(result, msg, cls, now)

    def _new_message(
        self,
        msg: InboundMessage,
        thread: str,
        cls: Classification,
        queue: str,
        message_id: str,
        conversation_id: str,
        known: str | None,
        work: Work,
        choice: Decision | None,
        *,
        reopen_since: float | None = None,
        survey_of: str = "",
        survey_score: int | None = None,
    ) -> NewMessage:
        """Return everything one ingest commits: message, routing and the sends it causes."""
        core = self.core
        now = work.arrival
        assignment: Assignment | None = None
        delivery: OutboxItem | None = None
        if choice is not None:
            agent = choice.agent
            assignment = make_assignment(core, choice, conversation_id, choice.reason, now)
            delivery = OutboxItem(
                id=new_ulid(),
                target=ToolTarget(agent.tool),
                agent_id=agent.id,
                address=agent.address or agent.id,
                payload=assignment_payload(msg, cls, assignment, now),
                message_id=message_id,
                next_attempt_at=now,
                created_at=now,
            )
        # A new conversation on a channel that can answer gets a written acknowledgement
        # with its ticket number, committed with the message (service standards).
        acks: tuple[OutboxItem, ...] = ()
        if known is None and msg.channel in core.answering_channels:
            acks = (
                OutboxItem(
                    id=new_ulid(),
                    target=ChannelTarget(msg.channel),
                    agent_id="",
                    address=msg.contact_handle,
                    payload=ack_payload(msg, conversation_id, cls.language, work.deadline),
                    message_id="",
                    next_attempt_at=now,
                    created_at=now,
                ),
            )
        if known is None and msg.confirm_elsewhere:
            elsewhere = self._confirming_channel(msg.contact_handle)
            if elsewhere is not None and elsewhere != msg.channel:
                acks += (
                    OutboxItem(
                        id=new_ulid(),
                        target=ChannelTarget(elsewhere),
                        agent_id="",
                        address=msg.contact_handle,
                        payload=ack_payload(msg, conversation_id, cls.language, work.deadline),
                        message_id="",
                        next_attempt_at=now,
                        created_at=now,
                    ),
                )
        return NewMessage(
            message_id=message_id,
            inbound=msg,
            conversation_id=conversation_id,
            thread_key=thread,
            classification=cls,
            queue=queue,
            sla_deadline=work.deadline,
            ingested_at=now,
            assignment=assignment,
            outbox=delivery,
            extra_outbox=acks,
            reopen_since=reopen_since,
            survey_of=survey_of,
            survey_score=survey_score,
        )

    def _remember_contact(self, contact_key: str, result: IngestResult, now: float) -> None:
        """Learn the committed message's contact (and links) and count it as a contact."""
        link = result.contact
        if link is not None:
            self.contacts.learn(contact_key, link.person_id, link.identifiers, link.links)
            for child, parent in link.links:
                # Contact ids only: the handle (an address, a phone number) stays out of logs.
                log.info(
                    "contact.linked", contact=child, joined=parent, via=contact_key.split(":", 1)[0]
                )
        self.contacts.seen(contact_key, now)

    def _confirming_channel(self, handle: str) -> str | None:
        """Return a configured channel that can write to this handle (e-mail or phone)."""
        if "@" in handle:
            types: tuple[str, ...] = ("email",)
        elif _PHONE.fullmatch(handle):
            types = ("twilio", "sms_http")
        else:
            return None
        for c in self.core.config.channels:
            if c.type in types and c.name in self.core.answering_channels:
                return str(c.name)
        return None

    def _receipt(self, result: IngestResult, *, duplicate: bool = False) -> Receipt:
        ticket = ticket_number(result.conversation_id)
        return Receipt(
            result.message_id,
            result.conversation_id,
            ticket,
            self.core.tickets.status_token(ticket),
            result.state,
            duplicate=duplicate,
            payload_conflict=result.payload_conflict if duplicate else False,
        )

    # -- classification ------------------------------------------------------------

    async def classify(self, msg: InboundMessage, contact_key: str, now: float) -> Classification:
        """Return the classifier's verdict with repeat contacts and severity rules applied."""
        core = self.core
        if core.classifier_workers is not None:
            cls = await core.classifier_workers.classify(
                msg.text, subject=msg.subject, language=msg.language, contact=msg.contact_handle
            )
        else:
            cls = core.classifier.classify(
                msg.text, subject=msg.subject, language=msg.language, contact=msg.contact_handle
            )
        cls = self._with_repeat_contact(cls, contact_key, msg.identifiers, now)
        return self._with_severity_rules(cls)

    def _with_repeat_contact(
        self, cls: Classification, contact_key: str, identifiers: tuple[str, ...], now: float
    ) -> Classification:
        c = self.core.config.classifier
        window = c.repeat_contact_window
        # Every channel of the contact counts (and of a contact this message's verified
        # identifiers link it to): three contacts by email, SMS and Telegram are three.
        count = self.contacts.count(contact_key, identifiers, now, window)
        if count < c.repeat_contact_count:
            return cls
        signals = (
            *cls.signals,
            Signal(
                "repeat_contact", f"{count} contacts within {window / 3600:g} h", value=float(count)
            ),
        )
        return replace(cls, signals=signals, severity=severity_for(cls.label, signals))

    def _with_severity_rules(self, cls: Classification) -> Classification:
        """Apply the operator's severity rules (first match wins) over the built-in table."""
        kinds = {s.kind for s in cls.signals}
        for rule in self.core.config.classifier.severity_rules:
            if rule.labels and cls.label not in rule.labels:
                continue
            if rule.signals and kinds.isdisjoint(rule.signals):
                continue
            return replace(cls, severity=rule.severity)
        return cls

    def sla_seconds(self, cls: Classification) -> float:
        """Return seconds to first response for this verdict (urgent overrides the class)."""
        sla = self.core.config.sla
        if cls.severity in URGENT_SEVERITIES:
            return sla.urgent
        return float(getattr(sla, cls.label, sla.inquiry))
