"""The pipeline: ingest → classify → schedule → commit → outbox → deliver.

A channel hands over one normalised message and gets a `Receipt` back only after the
message, its routing decision and its outbox item are committed in one transaction;
only then may the channel acknowledge its source. Classification and the scheduling
decision happen *before* the commit, in memory, so a message is never stored without
its route and a crash between the two cannot leave it orphaned.

The scheduler's in-memory state is rebuilt from the store at start (`restore`): open
conversations give each agent its load, queued messages go back to their queues, and
pending outbox items are sent again under their original delivery ids.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog

from router.classify import RuleClassifier, severity_for
from router.config import Config
from router.crisis import CrisisDetector, CrisisEvent
from router.drivers import AgentAction, Receipt, TicketStatus
from router.metrics import Metrics
from router.model import LABELS, Agent, Assignment, Classification, InboundMessage, Signal, new_ulid
from router.outbox import Dispatcher
from router.schedule import Decision, OverflowStep, Policy, Returned, Scheduler, Work
from router.store import NewMessage, OutboxItem, Store

log = structlog.get_logger("router.pipeline")

TICKET_PREFIX = "T-"
# Outbox targets that are customer channels rather than agent tools.
CHANNEL_TARGET_PREFIX = "channel:"


# Agent tools that cannot send actions back (so cannot accept an offer): a file inbox,
# and outgoing webhooks (see adapters/webhook.py). Their agents hold work at once.
NO_ACTIONS = frozenset({"inbox", "webhook"})
# Presence values agents and the ops API set: on line, away (no new work, keeps what it
# has), off line (no new work, gives back what it had not accepted).
PRESENCE = ("on", "away", "off")


def agents_from_config(config: Config) -> list[Agent]:
    """Return the roster as scheduler agents."""
    tool_types = {a.name: a.type for a in config.adapters}
    return [
        Agent(
            id=a.id,
            name=a.name or a.id,
            capacity=a.total_capacity,
            tool=a.tool,
            address=a.address,
            queues=frozenset(a.queues),
            present=a.present,
            capacities=dict(a.capacities),
            classes=frozenset(k for k in a.skills if k in LABELS),
            languages=frozenset(k for k in a.skills if k not in LABELS),
            supervisor=a.supervisor,
            shifts=tuple(sh.to_shift() for sh in a.shifts),
            accepts=a.accepts
            if a.accepts is not None
            else tool_types.get(a.tool, "") not in NO_ACTIONS,
        )
        for a in config.agents
    ]


def policy_from_config(config: Config) -> Policy:
    """Return the scheduler's knobs from `[scheduling]`."""
    sc = config.scheduling
    return Policy(
        accept_timeout=sc.accept_timeout,
        complaint_streak_limit=sc.complaint_streak_limit,
        reserve_slack=sc.reserve_slack,
        urgent_reserve=sc.urgent_reserve,
        overflow=tuple(OverflowStep(o.after, o.widen) for o in sc.overflow),
    )


class Classifier(Protocol):
    """What the pipeline needs of a classifier (rules or the trained model)."""

    def classify(
        self, text: str, *, subject: str = "", language: str | None = None, contact: str = ""
    ) -> Classification: ...


def make_classifier(config: Config) -> Classifier:
    """Return the classifier the config asks for (the trained model by default)."""
    c = config.classifier
    vip = frozenset(c.vip_contacts)
    if c.model == "rules":
        return RuleClassifier(amount_threshold=c.amount_threshold, vip_contacts=vip)
    from router.intent import ModelClassifier

    return ModelClassifier(
        amount_threshold=c.amount_threshold, vip_contacts=vip, model_path=c.model_path
    )


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


class Pipeline:
    """Routes messages; one per daemon, shared by every channel and adapter."""

    def __init__(
        self,
        config: Config,
        store: Store,
        metrics: Metrics,
        dispatcher: Dispatcher,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.dispatcher = dispatcher
        self.clock = clock
        self.classifier = self._make_classifier(config)
        self.crisis = self._make_crisis(config)
        # Names of channels that can send to customers (acknowledgements, replies);
        # the daemon fills it as it starts channels.
        self.answering_channels: set[str] = set()
        self.scheduler = Scheduler(
            agents_from_config(config),
            policy_from_config(config),
            explain=config.scheduling.explain,
        )
        self._secret = b""
        self._token_mac: hmac.HMAC | None = None  # keyed with _token_key
        self._token_key = b""
        # (channel, thread key) -> id of its open conversation, and the reverse.
        self._threads: dict[tuple[str, str], str] = {}
        self._thread_of: dict[str, tuple[str, str]] = {}
        # Messages of one thread are routed one at a time, so a burst of first
        # messages cannot open two conversations or reserve two slots for one.
        self._thread_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._thread_waiters: dict[tuple[str, str], int] = defaultdict(int)
        self._recent: dict[str, deque[float]] = {}
        self._drain_lock = asyncio.Lock()
        # Set once restore() has rebuilt memory: adapters start first (pending outbox
        # items need them) and may hand over actions that only make sense afterwards.
        self._restored = asyncio.Event()
        # What _update_gauges last published, per agent id and per ("queue", name).
        self._gauges_of: Metrics | None = None
        self._gauge_values: dict[Any, Any] = {}
        self._ingests_since_sweep = 0

    @staticmethod
    def _make_classifier(config: Config) -> Classifier:
        return make_classifier(config)

    def _make_crisis(self, config: Config) -> CrisisDetector | None:
        crisis = config.classifier.crisis
        return CrisisDetector(crisis, clock=self.clock) if crisis.enabled else None

    # -- start and reload --------------------------------------------------------

    async def restore(self) -> None:
        """Rebuild memory from the store: loads, queues, pending sends, recent contacts."""
        self._secret = await self.store.secret()
        now = self.clock()
        presence = await self.store.sync_agents(agents_from_config(self.config))
        for agent_id, present in presence.items():
            if agent_id in self.scheduler.states:
                self.scheduler.set_presence(agent_id, present, now)
        snap = await self.store.snapshot(now, self.config.classifier.repeat_contact_window)
        crisis = self.config.classifier.crisis
        if self.crisis is not None and crisis.rate_enabled:
            # The baseline is the complaint rate before the short window: count it in the
            # store, so a restart does not fall back on the floor (and alert on a normal day).
            until = now - crisis.rate_window
            recent = await self.store.count_messages(
                list(crisis.labels), until - crisis.baseline_window, until
            )
            self.crisis.prime(recent, crisis.baseline_window, now)
        for conv in snap.open_conversations:
            key = (conv.channel, conv.thread_key)
            self._threads[key] = conv.conversation_id
            self._thread_of[conv.conversation_id] = key
            if conv.agent_id:
                self.scheduler.hold(
                    conv.conversation_id, conv.conversation_id, conv.agent_id, conv.channel_type
                )
        timeout = self.scheduler.policy.accept_timeout
        if timeout > 0:
            # Offers not accepted before the stop: their clocks run from when they were made.
            for message_id, _conv, agent_id, assigned_at in await self.store.pending_offers():
                stored = await self.store.message(message_id)
                if stored is not None and agent_id in self.scheduler.states:
                    work = self._work_from_stored(stored)
                    self.scheduler.restore_offer(work, agent_id, assigned_at + timeout)
        excluded = await self.store.timed_out_agents()
        for q in snap.queued:
            self.scheduler.submit(
                Work(
                    excluded=excluded.get(q.message_id),
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
        for contact_key, at in snap.recent_contacts:
            self._recent.setdefault(contact_key, deque()).append(at)
        for item in snap.pending_outbox:
            self.dispatcher.submit(item)
        self._restored.set()
        log.info(
            "pipeline.restored",
            open_conversations=len(snap.open_conversations),
            queued=len(snap.queued),
            pending_outbox=len(snap.pending_outbox),
        )
        self._update_gauges()
        await self.drain_queues()

    async def apply_config(self, config: Config) -> None:
        """Take a new, already validated configuration (SIGHUP): roster, thresholds, SLAs."""
        old_crisis = self.config.classifier.crisis
        self.config = config
        self.classifier = self._make_classifier(config)
        if config.classifier.crisis != old_crisis:
            self.crisis = self._make_crisis(config)
        agents = agents_from_config(config)
        presence = await self.store.sync_agents(agents)
        self.scheduler.policy = policy_from_config(config)
        self.scheduler.explain = config.scheduling.explain
        self.scheduler.set_roster(
            [replace(a, present=presence.get(a.id, a.present)) for a in agents]
        )
        self._update_gauges()
        await self.drain_queues()

    # -- tickets -----------------------------------------------------------------

    def status_token(self, ticket: str) -> str:
        """Return the token that lets a customer read this ticket (HMAC, installation secret)."""
        mac = self._token_mac
        if mac is None or self._token_key is not self._secret:
            # Keyed once: copying a keyed HMAC is cheaper than keying one per ticket, and
            # unlike hmac.digest() it does not give up the GIL for a few bytes of input.
            mac = self._token_mac = hmac.new(self._secret, digestmod="sha256")
            self._token_key = self._secret
        mac = mac.copy()
        mac.update(ticket.encode())
        digest = mac.digest()[:18]
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    async def ticket_status(self, ticket: str, token: str) -> TicketStatus | None:
        """Return a ticket's status when the token matches; None otherwise (same for unknown)."""
        if not ticket.startswith(TICKET_PREFIX) or not hmac.compare_digest(
            self.status_token(ticket).encode(), token.encode("utf-8", "replace")
        ):
            return None
        view = await self.store.ticket(ticket[len(TICKET_PREFIX) :])
        if view is None:
            return None
        return TicketStatus(
            ticket=view.ticket,
            state=view.state,
            label=view.label,
            severity=view.severity,
            opened_at=datetime.fromtimestamp(view.opened_at, UTC),
            respond_by=datetime.fromtimestamp(view.respond_by, UTC),
            assigned=view.assigned,
            messages=view.messages,
            resolved_at=datetime.fromtimestamp(view.resolved_at, UTC) if view.resolved_at else None,
        )

    # -- intake ------------------------------------------------------------------

    async def ingest(self, msg: InboundMessage) -> Receipt:
        """Classify, route and commit one message; return only after the commit."""
        started = time.perf_counter()
        thread_key = self._thread_key(msg)
        key = (msg.channel, thread_key)
        # As _thread_lock(key), inlined: a generator context manager per message costs.
        lock = self._thread_locks.get(key)
        if lock is None:
            lock = self._thread_locks[key] = asyncio.Lock()
        self._thread_waiters[key] += 1
        try:
            async with lock:
                receipt, choice, queue, cls = await self._ingest_locked(msg, thread_key, key)
        except Exception:
            self.metrics.child(self.metrics.ingest_errors, msg.channel).inc()
            raise
        finally:
            self._release_thread_lock(key)
        elapsed = time.perf_counter() - started
        m = self.metrics
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
        self._update_ingest_gauges(choice.agent.id if choice is not None else None, queue)
        # The canonical line: one per routed message, everything an operator asks about.
        log.info(
            "message.routed",
            message_id=receipt.message_id,
            ticket=receipt.ticket,
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
            state=receipt.state,
            text=msg.text,
            commit_ms=round(elapsed * 1000, 2),
        )
        return receipt

    async def _ingest_locked(
        self, msg: InboundMessage, thread_key: str, key: tuple[str, str]
    ) -> tuple[Receipt, Decision | None, str, Classification]:
        now = self.clock()
        cls = self.classifier.classify(
            msg.text, subject=msg.subject, language=msg.language, contact=msg.contact_handle
        )
        cls = self._with_repeat_contact(cls, f"{msg.channel_type}:{msg.contact_handle}", now)
        cls = self._with_severity_rules(cls)
        queue = self.config.queue_for(
            cls.label,
            cls.severity,
            cls.confidence,
            signals=[s.kind for s in cls.signals],
            language=cls.language,
            channel_type=msg.channel_type,
        )
        deadline = now + self._sla_seconds(cls)
        known = self._threads.get(key)
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
        choice = self.scheduler.place(work, now)
        assignment: Assignment | None = None
        outbox: OutboxItem | None = None
        if choice is not None:
            assignment = Assignment(
                message_id=message_id,
                conversation_id=proposed,
                agent_id=choice.agent.id,
                queue=queue,
                reason=choice.reason,
                sla_deadline=datetime.fromtimestamp(deadline, UTC),
                assigned_at=datetime.fromtimestamp(now, UTC),
                **self._guard(choice),
            )
            outbox = self._outbox_item(choice.agent, assignment, msg, cls, proposed, now)
        # A new conversation on a channel that can answer gets a written acknowledgement
        # with its ticket number, committed with the message (service standards).
        acks: tuple[OutboxItem, ...] = ()
        if known is None and msg.channel in self.answering_channels:
            acks = (self._ack_item(msg, cls, proposed, deadline, now),)
        new = NewMessage(
            message_id=message_id,
            inbound=msg,
            conversation_id=proposed,
            thread_key=thread_key,
            classification=cls,
            queue=queue,
            sla_deadline=deadline,
            ingested_at=now,
            assignment=assignment,
            outbox=outbox,
            extra_outbox=acks,
        )
        try:
            result = await self.store.ingest(new)
        except BaseException:
            if choice is not None:
                self.scheduler.undo(choice, requeue=False)
            raise
        if choice is not None and not result.assigned and not result.duplicate:
            # Another worker filled the agent meanwhile: the message waits instead, and
            # this scheduler learns what the others hold.
            self.scheduler.undo(choice, requeue=False)
            choice = None
            outbox = None
            await self.sync_loads()
        if result.duplicate:
            if choice is not None:
                self.scheduler.undo(choice, requeue=False)
            ticket = TICKET_PREFIX + result.conversation_id
            return (
                Receipt(
                    result.message_id,
                    result.conversation_id,
                    ticket,
                    self.status_token(ticket),
                    result.state,
                    duplicate=True,
                    payload_conflict=result.payload_conflict,
                ),
                None,
                queue,
                cls,
            )
        conversation_id = result.conversation_id
        if conversation_id != proposed:
            # The store joined a resolved conversation of this thread and reopened it.
            if choice is not None:
                self.scheduler.move_slot(proposed, conversation_id)
            work.slot = work.conversation = conversation_id
            if outbox is not None:
                outbox = replace(
                    outbox,
                    payload=dict(
                        outbox.payload,
                        conversation_id=conversation_id,
                        ticket=TICKET_PREFIX + conversation_id,
                    ),
                )
        self._threads[key] = conversation_id
        self._thread_of[conversation_id] = key
        self._recent.setdefault(f"{msg.channel_type}:{msg.contact_handle}", deque()).append(now)
        for ack in acks:
            if conversation_id != proposed:
                ack = replace(
                    ack,
                    payload=dict(
                        ack.payload,
                        conversation_id=conversation_id,
                        ticket=TICKET_PREFIX + conversation_id,
                    ),
                )
            self.dispatcher.submit(ack)
        if cls.severity == "P0":
            await self._notify_on_duty(message_id, conversation_id, msg, cls, queue, now)
        if self.crisis is not None:
            await self._emit_crisis(
                self.crisis.observe(
                    message_id,
                    f"{msg.channel_type}:{msg.contact_handle}",
                    cls.label,
                    cls.severity,
                    msg.text,
                    msg.subject,
                    now,
                ),
                now,
            )
        if outbox is not None:
            self.dispatcher.submit(outbox)
        else:
            self.scheduler.submit(work)
        ticket = TICKET_PREFIX + conversation_id
        return (
            Receipt(
                message_id,
                conversation_id,
                ticket,
                self.status_token(ticket),
                result.state,
                duplicate=False,
            ),
            choice,
            queue,
            cls,
        )

    @contextmanager
    def _thread_lock(self, key: tuple[str, str]) -> Iterator[asyncio.Lock]:
        lock = self._thread_locks.get(key)
        if lock is None:
            lock = self._thread_locks[key] = asyncio.Lock()
        self._thread_waiters[key] += 1
        try:
            yield lock
        finally:
            self._release_thread_lock(key)

    def _release_thread_lock(self, key: tuple[str, str]) -> None:
        """Count one user of the thread's lock out; the last one drops the lock."""
        left = self._thread_waiters[key] - 1
        if left:
            self._thread_waiters[key] = left
        else:
            del self._thread_waiters[key]
            del self._thread_locks[key]

    @staticmethod
    def _thread_key(msg: InboundMessage) -> str:
        # Scoped by contact: a customer cannot join someone else's thread by guessing its key.
        if msg.conversation_hint:
            return f"{msg.contact_handle}\x1f{msg.conversation_hint}"
        return msg.contact_handle

    def _with_repeat_contact(
        self, cls: Classification, contact_key: str, now: float
    ) -> Classification:
        window = self.config.classifier.repeat_contact_window
        times = self._recent.get(contact_key)
        if times is None:
            return cls
        while times and times[0] < now - window:
            times.popleft()
        if not times:
            del self._recent[contact_key]
            return cls
        count = len(times) + 1  # this message included
        if count < self.config.classifier.repeat_contact_count:
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
        for rule in self.config.classifier.severity_rules:
            if rule.labels and cls.label not in rule.labels:
                continue
            if rule.signals and kinds.isdisjoint(rule.signals):
                continue
            return replace(cls, severity=rule.severity)
        return cls

    def _sla_seconds(self, cls: Classification) -> float:
        sla = self.config.sla
        if cls.severity in ("P0", "P1"):
            return sla.urgent
        return float(getattr(sla, cls.label, sla.inquiry))

    def _outbox_item(
        self,
        agent: Agent,
        a: Assignment,
        msg: InboundMessage,
        cls: Classification,
        conversation_id: str,
        now: float,
    ) -> OutboxItem:
        received = msg.received_at.isoformat() if msg.received_at else _iso(now)
        payload: dict[str, Any] = {
            "ticket": TICKET_PREFIX + conversation_id,
            "conversation_id": conversation_id,
            "message": {
                "id": a.message_id,
                "channel": msg.channel,
                "channel_type": msg.channel_type,
                "contact": {"handle": msg.contact_handle, "name": msg.contact_name},
                "subject": msg.subject,
                "text": msg.text,
                "language": cls.language,
                "received_at": received,
            },
            "classification": {
                "label": cls.label,
                "confidence": round(cls.confidence, 4),
                "scores": {k: round(v, 4) for k, v in cls.scores.items()},
                "severity": cls.severity,
                "signals": [s.to_dict() for s in cls.signals],
            },
            "routing": {
                "agent_id": agent.id,
                "queue": a.queue,
                "reason": a.reason,
                "sla_deadline": a.sla_deadline.isoformat(),
                "assigned_at": a.assigned_at.isoformat(),
            },
        }
        return OutboxItem(
            id=new_ulid(),
            target=agent.tool,
            agent_id=agent.id,
            address=agent.address or agent.id,
            kind="assignment",
            payload=payload,
            message_id=a.message_id,
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )

    def _ack_item(
        self,
        msg: InboundMessage,
        cls: Classification,
        conversation_id: str,
        deadline: float,
        now: float,
    ) -> OutboxItem:
        return OutboxItem(
            id=new_ulid(),
            target=CHANNEL_TARGET_PREFIX + msg.channel,
            agent_id="",
            address=msg.contact_handle,
            kind="ack",
            payload={
                "ticket": TICKET_PREFIX + conversation_id,
                "conversation_id": conversation_id,
                "subject": msg.subject,
                "in_reply_to": msg.reply_ref,
                "references": [*msg.thread_refs, msg.reply_ref] if msg.reply_ref else [],
                "respond_by": _iso(deadline),
                "language": cls.language,
                "contact_name": msg.contact_name,
                # The channel's own thread key: lets it file this answer's id under the
                # conversation even before it has recorded the customer's message.
                "conversation_hint": msg.conversation_hint,
            },
            message_id="",
            next_attempt_at=now,
            created_at=now,
        )

    async def sync_loads(self) -> None:
        """Count against each agent what other workers on this store hold."""
        self.scheduler.sync_external(await self.store.open_loads())

    async def tick(self) -> None:
        """Move time on (called about once a second by the daemon): accept timeouts, SLA
        breaches and overflow, crisis detectors."""
        now = self.clock()
        async with self._drain_lock:
            returned, breached = self.scheduler.tick(now)
            for back in returned:
                await self._take_back(back, now)
        for work in breached:
            await self._breach(work, now)
        if returned or breached:
            await self.drain_queues()
            self._update_gauges()
        if self.crisis is not None:
            await self._emit_crisis(self.crisis.tick(now), now)

    async def _notify_on_duty(
        self,
        message_id: str,
        conversation_id: str,
        msg: InboundMessage,
        cls: Classification,
        queue: str,
        now: float,
    ) -> None:
        """P0 (someone's safety at risk): tell the on-duty manager at once, not only the agent."""
        crisis = self.config.classifier.crisis
        if crisis.target is None:
            return
        alert = {
            "kind": "urgent",
            "reason": "P0",
            "message_id": message_id,
            "ticket": TICKET_PREFIX + conversation_id,
            "channel": msg.channel,
            "queue": queue,
            "signals": [s.to_dict() for s in cls.signals],
        }
        await self._send_now([self._alert_item(crisis.target, alert, message_id, now)])

    async def _emit_crisis(self, events: list[CrisisEvent], now: float) -> None:
        crisis = self.config.classifier.crisis
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
            self.metrics.child(self.metrics.crisis_events, event.reason, event.kind).inc()
            if crisis.target is None:
                continue
            message_id = event.evidence[-1].message_id if event.evidence else ""
            items.append(self._alert_item(crisis.target, event.to_dict(), message_id, now))
        await self._send_now(items)

    def _alert_item(
        self,
        target: str,
        alert: dict[str, Any],
        message_id: str,
        now: float,
        address: str | None = None,
    ) -> OutboxItem:
        """An alert for the on-duty manager, sent through the target adapter."""
        address = address or self.config.classifier.crisis.address or "crisis"
        return OutboxItem(
            id=new_ulid(),
            target=target,
            agent_id=address,
            address=address,
            kind="alert",
            payload={"alert": alert},
            message_id=message_id,
            next_attempt_at=now,
            created_at=now,
        )

    async def _send_now(self, items: list[OutboxItem]) -> None:
        """Commit sends not caused by an ingest, then hand them to the outbox."""
        if not items:
            return
        await self.store.enqueue_outbox(items)
        for item in items:
            self.dispatcher.submit(item)

    # -- queues ------------------------------------------------------------------

    async def drain_queues(self) -> int:
        """Assign waiting messages to agents who have room now; return how many."""
        async with self._drain_lock:
            placed = 0
            retry_later = False
            while not retry_later:
                batch = self.scheduler.dispatch(self.clock())
                if not batch:
                    break
                for choice in batch:
                    outcome = await self._assign_waiting(choice)
                    if outcome is True:
                        placed += 1
                    elif outcome is None:
                        # Requeued after a store error: asking again at once would spin
                        # on the same message; the queue tick tries again shortly.
                        retry_later = True
            if placed:
                self._update_gauges()
            return placed

    def _guard(self, choice: Decision) -> dict[str, Any]:
        """Return the capacity the store re-checks for this decision, and its explain record."""
        ct = choice.work.channel_type
        state = self.scheduler.states.get(choice.agent.id)
        if state is None or not choice.new_slot:
            return {"channel_type": ct, "explain": choice.explain}
        return {
            "channel_type": ct,
            "capacity": state.capacity(ct),
            "pool": state.pool(ct),
            "explain": choice.explain,
        }

    async def _assign_waiting(self, choice: Decision) -> bool | None:
        """Commit one dequeued assignment: True if placed, False if dropped, None if requeued."""
        w = choice.work
        try:
            stored = await self.store.message(w.id)
        except Exception as exc:
            # Give the slot back and keep the message waiting, as for a failed assign below.
            self.scheduler.undo(choice)
            log.warning("pipeline.assign_failed", message_id=w.id, error=str(exc))
            return None
        now = self.clock()
        assignment = Assignment(
            message_id=w.id,
            conversation_id=w.conversation,
            agent_id=choice.agent.id,
            queue=w.department,
            reason=f"dequeued: {choice.reason}",
            sla_deadline=datetime.fromtimestamp(w.deadline, UTC),
            assigned_at=datetime.fromtimestamp(now, UTC),
            **self._guard(choice),
        )
        if stored is None:
            self.scheduler.undo(choice, requeue=False)
            return False
        msg = _inbound_from_stored(stored)
        cls = _classification_from_stored(stored)
        outbox = self._outbox_item(choice.agent, assignment, msg, cls, w.conversation, now)
        try:
            ok = await self.store.assign(assignment, outbox)
        except Exception as exc:
            self.scheduler.undo(choice)
            log.warning("pipeline.assign_failed", message_id=w.id, error=str(exc))
            return None
        if not ok:
            # Assigned elsewhere meanwhile, or the agent's last slot was taken by another
            # worker: the store says which by the message's state.
            self.scheduler.undo(choice, requeue=False)
            again = await self.store.message(w.id)
            if again is not None and again.get("state") == "queued":
                await self.sync_loads()
                self.scheduler.submit(w)
                return None
            return False
        self.metrics.assigned.labels(queue=w.department, how="dequeued").inc()
        within = "yes" if now <= w.deadline else "no"
        self.metrics.child(self.metrics.wait_seconds, w.label, within).observe(now - w.arrival)
        self.dispatcher.submit(outbox)
        log.info(
            "message.routed",
            message_id=w.id,
            ticket=TICKET_PREFIX + w.conversation,
            label=w.label,
            severity=w.severity,
            queue=w.department,
            agent=choice.agent.id,
            rule=choice.rule,
            waited_s=round(now - w.arrival, 3),
            state="assigned",
        )
        return True

    # -- agent actions -----------------------------------------------------------

    async def on_action(self, action: AgentAction) -> None:
        """Apply what an agent did in their tool (the adapters' action sink)."""
        await self.act(action)

    async def act(self, action: AgentAction) -> str:
        """Apply an agent's action; return the outcome (ok, rejected, unsupported)."""
        await self._restored.wait()
        outcome = "ok"
        try:
            outcome = await self._apply(action)
        except Exception:
            outcome = "error"
            raise
        finally:
            self.metrics.actions.labels(action=action.action, outcome=outcome).inc()
            log.info(
                "agent.action",
                agent=action.agent_id,
                action=action.action,
                conversation_id=action.conversation_id or None,
                outcome=outcome,
            )
        return outcome

    async def _apply(self, action: AgentAction) -> str:
        now = self.clock()
        conversation_id = action.conversation_id
        if not conversation_id and action.message_id:
            stored = await self.store.message(action.message_id)
            conversation_id = stored["conversation_id"] if stored else ""
        if action.action == "presence":
            if action.value not in PRESENCE or not await self.set_presence(
                action.agent_id, action.value == "on", away=action.value == "away"
            ):
                return "rejected"
            return "ok"
        if action.action == "accept":
            return "ok" if await self._accept(conversation_id, action.agent_id, now) else "rejected"

        if action.action == "resolve":
            key = self._thread_of.get(conversation_id) if conversation_id else None
            if key is None:
                return "rejected"  # not an open conversation
            # Under the thread's lock, so a follow-up cannot be routed to the holder
            # (sticky) while the close commits and then lose its slot to release(); and
            # outside any drain, so a message being handed out is not closed unseen.
            with self._thread_lock(key) as lock:
                async with lock, self._drain_lock:
                    if self.scheduler.holder.get(conversation_id) != action.agent_id:
                        # Only the holder may close a conversation; an unheld one is
                        # waiting for an agent (a stale resolve after a reopen, say).
                        return "rejected"
                    holder = await self.store.resolve_conversation(conversation_id, self.clock())
                    if holder is None:
                        return "rejected"
                    self.scheduler.release(conversation_id)
                    # The store closed its waiting messages too (the holder was away and
                    # nobody else had room): they leave the queue with it.
                    dropped = self.scheduler.drop_conversation(conversation_id)
                    if dropped:
                        log.warning(
                            "pipeline.resolved_with_waiting_messages",
                            conversation_id=conversation_id,
                            message_ids=dropped,
                        )
                    if self._thread_of.get(conversation_id) == key:
                        del self._thread_of[conversation_id]
                    if self._threads.get(key) == conversation_id:
                        del self._threads[key]
            await self.drain_queues()
            self._update_gauges()
            return "ok"
        if action.action == "relabel":
            if action.value not in LABELS or not action.message_id:
                return "rejected"
            ok = await self.store.record_correction(
                action.message_id, action.value, action.agent_id, now
            )
            return "ok" if ok else "rejected"
        if action.action == "reply":
            return await self._relay_reply(action, conversation_id, now)
        return "unsupported"

    async def _relay_reply(self, action: AgentAction, conversation_id: str, now: float) -> str:
        """Send an agent's answer to the customer, on the channel the customer wrote from."""
        text = action.value.strip()
        if not conversation_id or not text:
            return "rejected"
        context = await self.store.reply_context(conversation_id)
        if context is None or context["agent_id"] != action.agent_id:
            return "rejected"  # only the agent holding the conversation answers in it
        if context["channel"] not in self.answering_channels:
            return "unsupported"  # this channel cannot carry answers (yet)
        item = OutboxItem(
            id=new_ulid(),
            target=CHANNEL_TARGET_PREFIX + context["channel"],
            agent_id=action.agent_id,
            address=context["handle"],
            kind="reply",
            payload={
                "ticket": TICKET_PREFIX + conversation_id,
                "conversation_id": conversation_id,
                "subject": context["subject"],
                "text": text,
                "in_reply_to": context["reply_ref"],
                "references": [*context["thread_refs"], context["reply_ref"]]
                if context["reply_ref"]
                else [],
                "language": context["language"],
                "contact_name": context["name"],
                "conversation_hint": context["thread_key"].partition("\x1f")[2],
            },
            message_id=context["message_id"],
            next_attempt_at=now,
            created_at=now,
        )
        await self._send_now([item])
        # Answering is taking the conversation up: no accept timeout after that.
        await self._accept(conversation_id, action.agent_id, now)
        return "ok"

    async def _accept(self, conversation_id: str, agent_id: str, now: float) -> bool:
        """Record that the agent took the conversation up; False if it holds none."""
        if not conversation_id or not await self.store.accept(conversation_id, agent_id, now):
            return False
        self.scheduler.accept_slot(conversation_id, agent_id)
        return True

    async def _take_back(self, back: Returned, now: float) -> None:
        """Return an offer the agent let time out (or left by going off line) to the queue."""
        work = back.work
        ids = await self.store.withdraw_offer(work.id, back.agent_id, now, back.why)
        if not ids:
            # Accepted or resolved in the store meanwhile: it stays with the agent.
            self.scheduler.withdraw(work.id)
            if work.conversation in self._thread_of:
                self.scheduler.hold(work.slot, work.conversation, back.agent_id, work.channel_type)
            return
        self.metrics.child(self.metrics.taken_back, back.why).inc()
        state = self.scheduler.states.get(back.agent_id)
        agent = state.agent if state is not None else None
        if agent is not None:
            # Tell the agent's tool, so the offer leaves their list (they may be back).
            await self._send_now([self._withdrawn_item(agent, work, ids, back.why, now)])
        log.warning(
            f"assignment.{back.why}",
            message_id=work.id,
            ticket=TICKET_PREFIX + work.conversation,
            agent=back.agent_id,
            queue=work.department,
        )
        for message_id in ids:
            if message_id == work.id:
                continue  # the scheduler put this one back itself
            stored = await self.store.message(message_id)
            if stored is not None:
                follow = self._work_from_stored(stored)
                if back.why == "timeout":
                    follow.excluded = {back.agent_id}
                self.scheduler.submit(follow)

    def _withdrawn_item(
        self, agent: Agent, work: Work, message_ids: list[str], why: str, now: float
    ) -> OutboxItem:
        """A notice to the agent's tool that offers were taken back from them."""
        return OutboxItem(
            id=new_ulid(),
            target=agent.tool,
            agent_id=agent.id,
            address=agent.address or agent.id,
            kind="withdrawn",
            payload={
                "ticket": TICKET_PREFIX + work.conversation,
                "conversation_id": work.conversation,
                "message_ids": message_ids,
                "reason": "not accepted in time" if why == "timeout" else "you went off line",
            },
            message_id=work.id,
            next_attempt_at=now,
            created_at=now,
        )

    def _work_from_stored(self, stored: dict[str, Any]) -> Work:
        """Return the scheduler's view of a stored message."""
        return Work(
            id=stored["id"],
            slot=stored["conversation_id"],
            conversation=stored["conversation_id"],
            label=stored["label"],
            severity=stored["severity"],
            channel_type=stored["channel_type"],
            language=stored["language"],
            department=stored["queue"],
            arrival=float(stored["ingested_at"]),
            deadline=float(stored["sla_deadline"]),
        )

    async def _breach(self, work: Work, now: float) -> None:
        """Report a message still waiting for an agent at its SLA deadline."""
        self.metrics.child(self.metrics.sla_breaches, work.department, work.label).inc()
        event = {
            "kind": "sla_breach",
            "message_id": work.id,
            "ticket": TICKET_PREFIX + work.conversation,
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
        sc = self.config.scheduling
        if sc.breach_target is not None:
            await self._send_now(
                [self._alert_item(sc.breach_target, event, work.id, now, sc.breach_address)]
            )

    async def set_presence(self, agent_id: str, present: bool, *, away: bool = False) -> bool:
        """Put an agent on line, away (no new work, keeps its offers) or off line (its
        unaccepted offers go back); from the ops API and agent actions. False if unknown."""
        if agent_id not in self.scheduler.states or not await self.store.set_presence(
            agent_id, present
        ):
            return False
        now = self.clock()
        # Under the drain lock: a drain must not hand out a returned message before the
        # store has it queued again (its assign would fail and drop it from memory).
        async with self._drain_lock:
            for back in self.scheduler.set_presence(
                agent_id, present, now, away=away and not present
            ):
                await self._take_back(back, now)
        self._update_gauges()
        await self.drain_queues()
        return True

    # -- views -------------------------------------------------------------------

    def agents_view(self) -> list[dict[str, Any]]:
        """Return each agent with load and presence (ops API)."""
        return [
            {
                "id": a.id,
                "name": a.name,
                "present": a.present,
                "capacity": a.capacity,
                "open_conversations": self.scheduler.load.get(a.id, 0),
                "tool": a.tool,
                "classes": sorted(a.classes),
                "languages": sorted(a.languages),
                "capacities": dict(a.capacities),
                "shifts": len(a.shifts),
                "queues": sorted(a.queues),
            }
            for a in self.scheduler.agents.values()
        ]

    def queues_view(self) -> list[dict[str, Any]]:
        """Return each queue's waiting messages, oldest deadline first (ops API)."""
        now = self.clock()
        out = []
        names = {q for a in self.scheduler.agents.values() for q in a.queues} | set(
            self.scheduler.queue_depths()
        )
        for name in sorted(names):
            waiting = self.scheduler.waiting(name)
            out.append(
                {
                    "queue": name,
                    "depth": len(waiting),
                    "oldest_wait_s": round(now - min((w.arrival for w in waiting), default=now), 3),
                    "overdue": sum(1 for w in waiting if w.deadline < now),
                    "agents": sorted(
                        a.id for a in self.scheduler.agents.values() if name in a.queues
                    ),
                }
            )
        return out

    def _update_ingest_gauges(self, agent_id: str | None, queue: str) -> None:
        """Publish what one routed message changed: its agent's load or its queue's depth.

        Every other change of the roster, loads or queues publishes the whole set through
        _update_gauges, as does every 64th message here (a safety net, cheap at that rate).
        """
        m = self.metrics
        self._ingests_since_sweep += 1
        if self._gauges_of is not m or self._ingests_since_sweep >= 64:
            self._update_gauges()
            return
        last = self._gauge_values
        if agent_id is not None:
            # One agent's state, not the scheduler's roster-wide views (which build a
            # dict of every agent on each call).
            state = self.scheduler.states.get(agent_id)
            if state is not None:
                a = state.agent
                values = (state.load, a.capacity, 1 if a.present else 0)
                if last.get(a.id) != values:
                    m.child(m.agent_load, a.id).set(values[0])
                    m.child(m.agent_capacity, a.id).set(values[1])
                    m.child(m.agent_present, a.id).set(values[2])
                    last[a.id] = values
        else:
            depth = self.scheduler.queue_depths().get(queue, 0)
            if last.get(("queue", queue)) != depth:
                m.child(m.queue_depth, queue).set(depth)
                last[("queue", queue)] = depth
        m.outbox_backlog.set(self.dispatcher.backlog)

    def _update_gauges(self) -> None:
        # Only gauges whose value changed since the last call are set (a labels() lookup
        # per agent per message cost more than the classifier on a ten-agent roster).
        # Only this method and _update_ingest_gauges set these gauges.
        m = self.metrics
        self._ingests_since_sweep = 0
        if self._gauges_of is not m:
            self._gauges_of = m
            self._gauge_values = {}
        last = self._gauge_values
        load = self.scheduler.load
        for a in self.scheduler.agents.values():
            values = (load.get(a.id, 0), a.capacity, 1 if a.present else 0)
            if last.get(a.id) != values:
                m.child(m.agent_load, a.id).set(values[0])
                m.child(m.agent_capacity, a.id).set(values[1])
                m.child(m.agent_present, a.id).set(values[2])
                last[a.id] = values
        for queue, depth in self.scheduler.queue_depths().items():
            if last.get(("queue", queue)) != depth:
                m.child(m.queue_depth, queue).set(depth)
                last[("queue", queue)] = depth
        m.outbox_backlog.set(self.dispatcher.backlog)


def _inbound_from_stored(stored: dict[str, Any]) -> InboundMessage:
    received = stored.get("received_at")
    contact_key = str(stored.get("contact_key") or "")
    return InboundMessage(
        channel=stored.get("channel", ""),
        channel_type=stored.get("channel_type", ""),
        external_id=stored.get("external_id", ""),
        contact_handle=stored.get("contact_handle") or contact_key.partition(":")[2],
        text=stored.get("text", ""),
        contact_name=stored.get("contact_name", ""),
        subject=stored.get("subject", "") or "",
        received_at=datetime.fromtimestamp(received, UTC)
        if isinstance(received, int | float)
        else None,
    )


def _classification_from_stored(stored: dict[str, Any]) -> Classification:
    signals = tuple(
        Signal(
            s["kind"],
            s.get("evidence", ""),
            start=(s.get("span") or (-1, -1))[0],
            end=(s.get("span") or (-1, -1))[1],
            value=s.get("value"),
        )
        for s in stored.get("signals") or []
    )
    return Classification(
        label=stored.get("label", "inquiry"),
        confidence=float(stored.get("confidence") or 0.0),
        scores=stored.get("scores") or {},
        severity=stored.get("severity", "P3"),
        signals=signals,
        language=stored.get("language", ""),
        model_version=stored.get("model_version", ""),
    )
