"""The store interface: every durable state change of the router goes through it.

Backends (SQLite now, PostgreSQL later) implement `Store`; `tests/test_store_contract.py`
runs one suite against each. Each method is one transaction: when it returns, the
change is committed, so a caller may acknowledge its source.

When the store cannot commit because of its own state (disk full, read-only, I/O
errors, a lock held elsewhere), a method raises `StoreUnavailable` and
`Store.condition` names the state (`StoreCondition`) until a write commits again; the
backend logs one line per change of condition, not one per failure, and finds its way
back by itself when the cause goes away. Callers answer cheaply meanwhile: HTTP intake
a 503 with `Retry-After: StoreUnavailable.retry_after` (it may check `condition`
before doing any work), mail intake leaves the message unacknowledged, the outbox
holds items without spending attempts it could not record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

import structlog

from router.contacts import ContactChange, ContactLink
from router.delivery import Payload, Target
from router.model import Agent, Assignment, Classification, InboundMessage, Signal

_log = structlog.get_logger("router.store")


class StoreCondition(StrEnum):
    """Whether the store can commit: one health condition for intake, outbox and health checks."""

    OK = "ok"  # the last write committed
    FULL = "full"  # the disk (or the database's page limit) is full
    READONLY = "readonly"  # the file or its directory became read-only
    FAILING = "failing"  # I/O errors, a lock held elsewhere too long, or a damaged file


def log_condition_change(
    previous: StoreCondition, condition: StoreCondition, error: Exception | None, down_for: float
) -> None:
    """Log a change of a store's condition: one line per change, never one per failure."""
    if condition is StoreCondition.OK:
        _log.info("store.recovered", previous=str(previous), after=round(down_for, 1))
    else:
        _log.warning(
            "store.unavailable", condition=str(condition), previous=str(previous), error=str(error)
        )


class StoreUnavailable(Exception):
    """The store cannot commit now (see `condition`); nothing was written, try again later.

    The backend's own error is the `__cause__`. `retry_after` is a hint in seconds (the
    store retries by itself about once a second while it is not ok).
    """

    def __init__(self, condition: StoreCondition, detail: str, retry_after: float = 2.0) -> None:
        super().__init__(f"store {condition}: {detail}")
        self.condition = condition
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One pending send; `id` is the idempotency key every retry carries."""

    id: str
    target: Target  # an agent tool or the customer's channel
    agent_id: str  # the agent it is for ("" for a customer send; the alert address)
    address: str  # the recipient's address in that tool or channel
    payload: Payload
    message_id: str  # the message that caused it ("" when none)
    attempts: int = 0
    next_attempt_at: float = 0.0
    created_at: float = 0.0

    @property
    def kind(self) -> str:
        """Return the payload's kind (assignment, withdrawn, alert, ack, reply)."""
        return self.payload.kind


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A send that gave up: kept with its reason until replayed."""

    id: str
    target: str
    agent_id: str
    kind: str
    message_id: str
    attempts: int
    reason: str
    created_at: float
    dead_at: float
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class NewMessage:
    """Everything one ingest commits at once: message, contact, conversation, routing, outbox."""

    message_id: str
    inbound: InboundMessage
    conversation_id: str  # the new conversation's id, or the open one it joins
    thread_key: str
    classification: Classification
    queue: str
    sla_deadline: float
    ingested_at: float
    assignment: Assignment | None = None
    outbox: OutboxItem | None = None
    # Further sends caused by the same commit: the acknowledgement to the customer.
    extra_outbox: tuple[OutboxItem, ...] = ()
    # A resolved conversation of the thread reopens only if it was resolved at or after
    # this time; an older one is closed and the message starts a new conversation
    # (`[lifecycle] reopen_window`). None: it always reopens.
    reopen_since: float | None = None
    # The customer's answer (1-5) to the satisfaction survey of the conversation
    # `survey_of`: when that survey is still pending, it is recorded as the ticket's
    # score; a satisfied answer is stored with the resolved ticket and not routed, a low
    # one reopens it. When the survey is not pending any more the message is an
    # ordinary one (`conversation_id` is then used as for any message).
    survey_of: str = ""
    survey_score: int | None = None


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What ingest did. On a duplicate nothing was written and the ids are the first delivery's."""

    message_id: str
    conversation_id: str
    duplicate: bool
    state: str
    payload_conflict: bool = False  # same (channel, external_id), different content
    reopened: bool = False  # joined a resolved conversation, which is open again
    # False when the assignment that came with the message was refused (the agent had
    # no room any more: another worker filled it); the message was stored queued.
    assigned: bool = True
    # The sends committed with the message, as written: their payloads name the
    # conversation the message really joined. The caller hands these to the outbox.
    outbox: tuple[OutboxItem, ...] = ()
    # The score recorded when the message answered a pending survey (None otherwise).
    survey_score: int | None = None
    # The message's contact across channels and the links its identifiers made.
    contact: ContactLink | None = None


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """A stored message still waiting for an agent (loaded at startup)."""

    message_id: str
    conversation_id: str
    queue: str
    label: str
    severity: str
    language: str
    sla_deadline: float
    ingested_at: float
    channel_type: str = ""


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A committed message with everything its first delivery had (contact name included)."""

    message_id: str
    conversation_id: str
    inbound: InboundMessage
    classification: Classification
    queue: str
    state: str
    ingested_at: float
    sla_deadline: float

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> StoredMessage:
        """Build from the dict `Store.message` returns."""
        received = row.get("received_at")
        contact_key = str(row.get("contact_key") or "")
        signals = tuple(
            Signal(
                s["kind"],
                s.get("evidence", ""),
                start=(s.get("span") or (-1, -1))[0],
                end=(s.get("span") or (-1, -1))[1],
                value=s.get("value"),
            )
            for s in row.get("signals") or []
        )
        return cls(
            message_id=row["id"],
            conversation_id=row["conversation_id"],
            inbound=InboundMessage(
                channel=row.get("channel", ""),
                channel_type=row.get("channel_type", ""),
                external_id=row.get("external_id", ""),
                contact_handle=row.get("contact_handle") or contact_key.partition(":")[2],
                contact_name=row.get("contact_name") or "",
                text=row.get("text", ""),
                subject=row.get("subject") or "",
                received_at=datetime.fromtimestamp(received, UTC)
                if isinstance(received, int | float)
                else None,
                reply_ref=row.get("reply_ref") or "",
                thread_refs=tuple(row.get("thread_refs") or ()),
            ),
            classification=Classification(
                label=row.get("label", "inquiry"),
                confidence=float(row.get("confidence") or 0.0),
                scores=row.get("scores") or {},
                severity=row.get("severity", "P3"),
                signals=signals,
                language=row.get("language", ""),
                model_version=row.get("model_version", ""),
            ),
            queue=row.get("queue", ""),
            state=row.get("state", ""),
            ingested_at=float(row.get("ingested_at") or 0.0),
            sla_deadline=float(row.get("sla_deadline") or 0.0),
        )


@dataclass(frozen=True, slots=True)
class OpenConversation:
    """An open conversation and who holds it (loaded at startup for stickiness and load)."""

    conversation_id: str
    channel: str
    thread_key: str
    agent_id: str | None
    channel_type: str = ""


@dataclass(frozen=True, slots=True)
class TicketView:
    """What a customer may see of their ticket."""

    ticket: str
    state: str
    label: str
    severity: str
    opened_at: float
    respond_by: float
    assigned: bool
    messages: int
    resolved_at: float | None = None
    status: str = ""  # the lifecycle status (router.lifecycle.TicketState)
    score: int | None = None  # the customer's latest satisfaction answer (1-5)


@dataclass(frozen=True, slots=True)
class TicketEvent:
    """One audit row: what happened to a ticket (or, with no ticket, to an agent), by whom."""

    conversation_id: str  # "" for an agent's own event (presence)
    at: float
    kind: str  # router.lifecycle.EventKind
    actor: str  # an agent id, "customer", "router" or "ops"
    status: str = ""  # the ticket's status after the event ("" to keep the current one)
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the event as the ops API and the CLI show it."""
        return {
            "ticket": f"T-{self.conversation_id}" if self.conversation_id else "",
            "at": datetime.fromtimestamp(self.at, UTC).isoformat(),
            "kind": self.kind,
            "actor": self.actor,
            "status": self.status,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class PendingSurvey:
    """A resolved ticket whose satisfaction question waits for the customer's answer."""

    conversation_id: str
    channel: str
    thread_key: str
    until: float


@dataclass(slots=True)
class Snapshot:
    """The state the router rebuilds its memory from after a start."""

    open_conversations: list[OpenConversation] = field(default_factory=list)
    queued: list[QueuedMessage] = field(default_factory=list)
    pending_outbox: list[OutboxItem] = field(default_factory=list)
    recent_contacts: list[tuple[str, float]] = field(default_factory=list)
    presence: dict[str, bool] = field(default_factory=dict)
    pending_surveys: list[PendingSurvey] = field(default_factory=list)
    # The contact book (router.contacts): (handle key, contact), (identifier, contact),
    # (contact, the contact it joined).
    contact_handles: list[tuple[str, str]] = field(default_factory=list)
    contact_identifiers: list[tuple[str, str]] = field(default_factory=list)
    contact_links: list[tuple[str, str]] = field(default_factory=list)


@dataclass(slots=True)
class RoutingView:
    """What every instance sharing a store must agree on to route (`Store.routing_view`)."""

    # The conversations the view covers: None for all of them, else only these (their
    # open state and queued messages; presence and streaks are always whole).
    scope: frozenset[str] | None = None
    open_conversations: list[OpenConversation] = field(default_factory=list)
    queued: list[QueuedMessage] = field(default_factory=list)
    presence: dict[str, bool] = field(default_factory=dict)
    # Per agent: how many of its latest assignments in a row carry one of the streak
    # labels (complaint rotation), and when its latest assignment was made.
    streaks: dict[str, tuple[int, float]] = field(default_factory=dict)
    # Messages every instance took in since `arrivals_since`, per class: (label,
    # severity, language, queue, channel type, count). Whole views only; the
    # schedulers' arrival rates (and so their reserves) then count all instances' work.
    arrivals: list[tuple[str, str, str, str, str, int]] = field(default_factory=list)


class Store(Protocol):
    """Durable state. Every method is one committed transaction (or `StoreUnavailable`).

    Several instances may share one database (`router.leases`): `instance` is this one's
    id ("" for a lone one, or a tool such as the CLI); every outbox item it commits is
    owned by it, and `due_outbox` hands out only items no other live instance owns.
    """

    instance: str

    @property
    def condition(self) -> StoreCondition:
        """Return whether the store can commit now."""

    @property
    def pending_deletes(self) -> int:
        """Count delivered outbox items whose delete is not committed yet (stop reports it)."""

    async def open(self) -> None:
        """Open the database and bring its schema to the latest migration."""

    async def close(self) -> None:
        """Finish pending writes and close."""

    async def ping(self) -> bool:
        """Return True when the database answers."""

    async def secret(self) -> bytes:
        """Return the installation secret (ticket tokens), created at first migration."""

    async def ingest(self, new: NewMessage) -> IngestResult:
        """Commit a message and its consequences, or detect a duplicate and write nothing."""

    async def assign(self, assignment: Assignment, outbox: OutboxItem) -> bool:
        """Assign a queued message; False when it is no longer queued."""

    async def resolve_conversation(
        self,
        conversation_id: str,
        at: float,
        *,
        actor: str = "",
        survey: OutboxItem | None = None,
        survey_until: float | None = None,
    ) -> str | None:
        """Close an open conversation; return the agent who held it.

        None when the conversation is not open (unknown or already resolved); "" when it
        was open but nobody held it. The resolve is audited (by `actor`, default the
        holder); a `survey` for the customer is committed with it and stays pending
        until `survey_until`.
        """

    async def close_resolved(self, resolved_before: float, at: float, limit: int) -> list[str]:
        """Close tickets resolved at or before resolved_before (at most limit); return ids.

        A closed ticket gives its thread up: the thread's next message starts a new one.
        """

    async def reply(self, conversation_id: str, agent_id: str, item: OutboxItem, at: float) -> bool:
        """Commit an agent's answer to the customer and mark the ticket waiting on them.

        False (nothing written) unless the agent holds the open conversation.
        """

    async def transfer(
        self,
        conversation_id: str,
        actor: str,
        to: str,
        queue: str | None,
        at: float,
        notice: OutboxItem | None = None,
    ) -> list[str]:
        """Take an open conversation from its holder; its unresolved messages wait again.

        `to` is what the audit names (agent:bob, queue:billing); `queue` moves the
        messages to that queue. `notice` (a withdrawn payload for the old holder) is
        committed with the change, naming the messages. Returns their ids, oldest first;
        empty when the conversation is not open.
        """

    async def record_event(self, event: TicketEvent) -> None:
        """Append an audit row not tied to a state change (a refused action, presence)."""

    async def ticket_events(self, conversation_id: str) -> list[TicketEvent]:
        """Return a ticket's audit rows, oldest first (empty for an unknown ticket)."""

    async def withdraw_offer(
        self, message_id: str, agent_id: str, at: float, outcome: str
    ) -> list[str]:
        """Take back an assignment the agent has not accepted, with the conversation's other
        unaccepted ones to that agent; return their message ids (queued again).

        Empty when there was nothing to take back (accepted or resolved meanwhile).
        """

    async def pending_offers(self) -> list[tuple[str, str, str, float]]:
        """Return (message id, conversation id, agent id, assigned at) of open offers."""

    async def timed_out_agents(self) -> dict[str, set[str]]:
        """Return, per queued or assigned message, the agents who let it time out."""

    async def open_loads(self) -> dict[tuple[str, str], int]:
        """Count open conversations per (agent, channel type), whoever assigned them."""

    async def accept(self, conversation_id: str, agent_id: str, at: float) -> bool:
        """Record that the agent took up the conversation's open assignments."""

    async def sync_agents(self, agents: list[Agent]) -> dict[str, bool]:
        """Upsert the roster; return the presence each agent has (stored presence wins)."""

    async def set_presence(self, agent_id: str, present: bool) -> bool:
        """Store an agent's presence; False for an unknown agent."""

    async def snapshot(self, now: float, repeat_window: float) -> Snapshot:
        """Return open conversations, queued messages, pending outbox and recent contacts.

        The pending outbox is what `due_outbox` would hand out, whenever due (claimed).
        """

    async def routing_view(
        self,
        streak_labels: frozenset[str],
        depth: int,
        since: float,
        conversations: frozenset[str] | None = None,
        arrivals_since: float | None = None,
    ) -> RoutingView:
        """Return the routing state every instance shares: open conversations and their
        holders, queued messages, presence, each agent's streak over its latest
        `depth` assignments made since `since`, and (whole views with `arrivals_since`)
        the messages taken in since then per class."""

    @property
    def shared(self) -> bool:
        """Whether other router instances may use this store at the same time."""

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call `callback` on the event loop when another instance changed routing state
        (new or queued work, assignments, resolves, presence); never for this one's."""

    def take_changes(self) -> frozenset[str] | None:
        """Return the conversations other instances changed since the last call (None:
        anything may have changed, look at everything); presence is always read whole."""

    async def due_outbox(self, now: float, limit: int) -> list[OutboxItem]:
        """Claim and return pending items due at or before now, oldest first.

        Only this instance's own, unowned ones, and those of an instance whose lease
        `instance:<id>` has expired (taken over: their owner no longer sees them).
        """

    async def acquire_lease(self, name: str, owner: str, ttl: float, now: float) -> bool:
        """Take a free or expired lease until now + ttl, or renew one `owner` holds.

        False while another owner holds it unexpired.
        """

    async def release_lease(self, name: str, owner: str) -> None:
        """Give the lease up if `owner` holds it (another may take it at once)."""

    async def leases(self, now: float) -> list[tuple[str, str, float]]:
        """Return (name, owner, expires_at) of every lease held at now, by name."""

    async def outbox_done(self, ids: list[str]) -> None:
        """Delete sent items; the delete may commit later, but is never silently dropped."""

    async def outbox_retry(
        self, item_id: str, attempts: int, next_attempt_at: float, error: str
    ) -> None:
        """Record a failed attempt and when to try again."""

    async def outbox_dead(self, item_id: str, attempts: int, reason: str, at: float) -> None:
        """Move an item to the dead letters."""

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """List dead letters, newest first."""

    async def replay_dead_letters(self, ids: list[str] | None, at: float) -> int:
        """Move dead letters (all when ids is None) back to the outbox; return how many."""

    async def ticket(self, conversation_id: str) -> TicketView | None:
        """Return a ticket's customer-visible status."""

    async def message(self, message_id: str) -> dict[str, Any] | None:
        """Return one stored message with its classification and routing (for explain).

        Keys: the message's fields (id, channel, channel_type, external_id, conversation_id,
        text, subject, language, received_at, ingested_at, label, confidence, severity,
        model_version, queue, sla_deadline, state; scores, signals and features decoded
        from JSON), "classification" (the Classification.to_dict() shape), "assignment"
        (the routing row as a dict, or None) and "attachments" (list of dicts). Never the
        raw payload.
        """

    async def stored_message(self, message_id: str) -> StoredMessage | None:
        """Return one message rebuilt as the router first routed it (None when unknown)."""

    async def delivery_counts(self) -> dict[str, int]:
        """Return how many outbox items are pending and dead (for metrics and tests)."""

    async def count_messages(self, labels: list[str], since: float, until: float) -> int:
        """Count messages with one of these labels ingested in [since, until)."""

    async def enqueue_outbox(self, items: list[OutboxItem]) -> None:
        """Commit sends not tied to an ingest (alerts, relayed agent replies)."""

    async def record_correction(
        self, message_id: str, label: str, agent_id: str, at: float
    ) -> bool:
        """Store an agent's relabelling of a message; False for an unknown message."""

    async def corrections(self) -> list[dict[str, Any]]:
        """Return the latest correction per message as training records (text, label, lang)."""

    async def contact(self, ref: str, since: float) -> dict[str, Any] | None:
        """Return the whole contact a reference names (id, handle key or identifier)."""
        ...

    async def find_contacts(self, query: str, limit: int = 20) -> list[dict[str, Any]]:
        """Return contacts whose handle, name or identifier contains `query`."""
        ...

    async def merge_contacts(
        self, into: str, other: str, actor: str, reason: str, at: float
    ) -> ContactChange:
        """Make `other`'s contact part of `into`'s (audited); refusals say why."""
        ...

    async def unmerge_contact(self, ref: str, actor: str, reason: str, at: float) -> ContactChange:
        """Undo the merge that made `ref`'s contact part of another (audited)."""
        ...

    async def reply_context(self, conversation_id: str) -> dict[str, Any] | None:
        """Return where an answer in this conversation goes: channel, contact, subject, refs."""
