"""The store interface implemented once over SQL: every method names a unit of work.

The units (`router.store.queries`, `router.store.contact_queries`) are plain functions
of a DB-API connection written in SQL both SQLite and PostgreSQL accept, so a business
rule lives in one place whatever the backend. A backend (`SqliteStore`, `PostgresStore`)
supplies the engine that runs a unit in a committed transaction (`_run`) and one that
commits deferred units later (`_defer`), plus its own lifecycle and health.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, TypeVar

from router.contacts import ContactChange
from router.model import Agent, Assignment
from router.store import (
    DeadLetter,
    IngestResult,
    NewMessage,
    OutboxItem,
    RoutingView,
    Snapshot,
    StoreCondition,
    StoredMessage,
    TicketEvent,
    TicketView,
)
from router.store import contact_queries as cq
from router.store import queries as q

T = TypeVar("T")


class SqlStore(ABC):
    """Every `router.store.Store` method as one unit of work on the backend's engine."""

    raw_max_bytes: int
    _secret: bytes | None
    # This instance's id: it owns the outbox items it commits (see `router.leases`).
    instance: str

    @abstractmethod
    async def open(self) -> None:
        """Open the database and bring its schema to the latest migration."""

    @abstractmethod
    async def close(self) -> None:
        """Finish pending writes and close."""

    @property
    @abstractmethod
    def condition(self) -> StoreCondition:
        """Return whether the store can commit now (see `router.store.StoreCondition`)."""

    @property
    @abstractmethod
    def alive(self) -> bool:
        """Whether the engine's threads run (the watchdog checks it)."""

    @property
    @abstractmethod
    def pending_deletes(self) -> int:
        """Count delivered outbox items whose delete is not committed yet (stop reports it)."""

    @abstractmethod
    async def _run(self, fn: Callable[[Any], T]) -> T:
        """Run one unit of work in a transaction and return its result once committed."""

    def on_change(self, callback: Callable[[], None]) -> None:  # noqa: B027 (a no-op here)
        """Call `callback` (on the event loop) when another instance changed routing state.

        A store no other instance can use never calls it.
        """

    async def _read(self, fn: Callable[[Any], T]) -> T:
        """Run a unit that only reads (a backend may run it without write isolation)."""
        return await self._run(fn)

    @abstractmethod
    def _defer(self, fn: Callable[[Any], Any], size: int) -> None:
        """Queue a unit nobody waits for (standing for `size` items) to commit soon."""

    # -- the interface -----------------------------------------------------------

    async def ping(self) -> bool:
        """Return True when the writer answers a trivial query."""
        return await self._read(q.ping)

    async def secret(self) -> bytes:
        """Return the installation secret created by the first migration."""
        if self._secret is None:
            self._secret = await self._run(q.secret)
        return self._secret

    async def ingest(self, new: NewMessage) -> IngestResult:
        """Commit a message with its contact, conversation, assignment and outbox item."""
        raw = new.inbound.raw[: self.raw_max_bytes] if self.raw_max_bytes else b""
        return await self._run(lambda c: q.ingest(c, new, raw, owner=self.instance))

    async def assign(self, assignment: Assignment, outbox: OutboxItem) -> bool:
        """Assign a queued message and queue its delivery in one transaction."""
        return await self._run(lambda c: q.assign(c, assignment, outbox, owner=self.instance))

    async def resolve_conversation(
        self,
        conversation_id: str,
        at: float,
        *,
        actor: str = "",
        survey: OutboxItem | None = None,
        survey_until: float | None = None,
    ) -> str | None:
        """Close an open conversation and its messages; return the agent who held it."""
        return await self._run(
            lambda c: q.resolve_conversation(
                c, conversation_id, at, actor, survey, survey_until, owner=self.instance
            )
        )

    async def close_resolved(self, resolved_before: float, at: float, limit: int) -> list[str]:
        """Close tickets resolved at or before resolved_before; return their ids."""
        return await self._run(lambda c: q.close_resolved(c, resolved_before, at, limit))

    async def reply(self, conversation_id: str, agent_id: str, item: OutboxItem, at: float) -> bool:
        """Commit an agent's answer and mark the ticket waiting on the customer."""
        return await self._run(
            lambda c: q.reply(c, conversation_id, agent_id, item, at, owner=self.instance)
        )

    async def transfer(
        self,
        conversation_id: str,
        actor: str,
        to: str,
        queue: str | None,
        at: float,
        notice: OutboxItem | None = None,
    ) -> list[str]:
        """Take an open conversation from its holder; its messages wait again."""
        return await self._run(
            lambda c: q.transfer(
                c, conversation_id, actor, to, queue, at, notice, owner=self.instance
            )
        )

    async def record_event(self, event: TicketEvent) -> None:
        """Append an audit row not tied to a state change."""
        await self._run(lambda c: q.record_event(c, event))

    async def ticket_events(self, conversation_id: str) -> list[TicketEvent]:
        """Return a ticket's audit rows, oldest first."""
        return await self._read(lambda c: q.ticket_events(c, conversation_id))

    async def withdraw_offer(
        self, message_id: str, agent_id: str, at: float, outcome: str
    ) -> list[str]:
        """Take back unaccepted assignments of the message's conversation from the agent."""
        return await self._run(lambda c: q.withdraw_offer(c, message_id, agent_id, at, outcome))

    async def pending_offers(self) -> list[tuple[str, str, str, float]]:
        """Return (message id, conversation id, agent id, assigned at) of open offers."""
        return await self._read(q.pending_offers)

    async def timed_out_agents(self) -> dict[str, set[str]]:
        """Return, per queued message, the agents who let it time out."""
        return await self._read(q.timed_out_agents)

    async def open_loads(self) -> dict[tuple[str, str], int]:
        """Count open conversations per (agent, channel type), whoever assigned them."""
        return await self._read(q.open_loads)

    async def accept(self, conversation_id: str, agent_id: str, at: float) -> bool:
        """Stamp accepted_at on the agent's open assignments in the conversation."""
        return await self._run(lambda c: q.accept(c, conversation_id, agent_id, at))

    async def sync_agents(self, agents: list[Agent]) -> dict[str, bool]:
        """Upsert the roster from config; an agent's stored presence outlives restarts."""
        return await self._run(lambda c: q.sync_agents(c, agents))

    async def set_presence(self, agent_id: str, present: bool) -> bool:
        """Store an agent's presence."""
        return await self._run(lambda c: q.set_presence(c, agent_id, present))

    async def snapshot(self, now: float, repeat_window: float) -> Snapshot:
        """Load what the router keeps in memory (this instance's pending sends, claimed)."""
        return await self._run(lambda c: q.snapshot(c, now, repeat_window, owner=self.instance))

    async def routing_view(
        self,
        streak_labels: frozenset[str],
        depth: int,
        since: float,
        conversations: frozenset[str] | None = None,
        arrivals_since: float | None = None,
    ) -> RoutingView:
        """Return the routing state every instance shares (see `router.store.Store`)."""
        return await self._read(
            lambda c: q.routing_view(c, streak_labels, depth, since, conversations, arrivals_since)
        )

    def take_changes(self) -> frozenset[str] | None:
        """Nothing changes behind this store's back (one instance): nothing to look at."""
        return frozenset()

    @property
    def shared(self) -> bool:
        """Whether other instances may use this database too (PostgreSQL: yes)."""
        return False

    async def due_outbox(self, now: float, limit: int) -> list[OutboxItem]:
        """Claim and return the pending items due now that this instance may send."""
        return await self._run(lambda c: q.due_outbox(c, now, limit, self.instance))

    async def acquire_lease(self, name: str, owner: str, ttl: float, now: float) -> bool:
        """Take a free or expired lease, or renew ours; False while another holds it."""
        return await self._run(lambda c: q.acquire_lease(c, name, owner, ttl, now))

    async def release_lease(self, name: str, owner: str) -> None:
        """Give the lease up if `owner` holds it."""
        await self._run(lambda c: q.release_lease(c, name, owner))

    async def leases(self, now: float) -> list[tuple[str, str, float]]:
        """Return (name, owner, expires_at) of the leases held at now."""
        return await self._run(lambda c: q.leases(c, now))

    async def outbox_done(self, ids: list[str]) -> None:
        """Delete delivered items: at once for every later call, durably soon after.

        The deletes ride along with the engine's next commit instead of paying a commit
        (an fsync) of their own. A crash before that commit only makes the outbox send
        them again under the same delivery ids.
        """
        if ids:
            self._defer(functools.partial(q.delete_outbox, ids=list(ids)), len(ids))

    async def outbox_retry(
        self, item_id: str, attempts: int, next_attempt_at: float, error: str
    ) -> None:
        """Record a failed attempt."""
        await self._run(lambda c: q.outbox_retry(c, item_id, attempts, next_attempt_at, error))

    async def outbox_dead(self, item_id: str, attempts: int, reason: str, at: float) -> None:
        """Move an outbox item to dead_letters."""
        await self._run(lambda c: q.outbox_dead(c, item_id, attempts, reason, at))

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """List dead letters, newest first."""
        return await self._read(lambda c: q.dead_letters(c, limit))

    async def replay_dead_letters(self, ids: list[str] | None, at: float) -> int:
        """Move dead letters back to the outbox with a fresh attempt count."""
        return await self._run(lambda c: q.replay_dead_letters(c, ids, at, owner=self.instance))

    async def ticket(self, conversation_id: str) -> TicketView | None:
        """Return the customer-visible status of a ticket."""
        return await self._read(lambda c: q.ticket(c, conversation_id))

    async def stored_message(self, message_id: str) -> StoredMessage | None:
        """Return one message as the router rebuilds it (a queued message's delivery)."""
        row = await self.message(message_id)
        return None if row is None else StoredMessage.from_row(row)

    async def message(self, message_id: str) -> dict[str, Any] | None:
        """Return one message with classification and routing."""
        return await self._read(lambda c: q.message(c, message_id))

    async def delivery_counts(self) -> dict[str, int]:
        """Return pending and dead outbox counts."""
        return await self._read(q.delivery_counts)

    async def count_messages(self, labels: list[str], since: float, until: float) -> int:
        """Count messages with one of these labels ingested in [since, until)."""
        if not labels:
            return 0
        return await self._read(lambda c: q.count_messages(c, labels, since, until))

    async def enqueue_outbox(self, items: list[OutboxItem]) -> None:
        """Commit sends not tied to an ingest (alerts, relayed agent replies)."""
        await self._run(lambda c: q.enqueue_outbox(c, items, owner=self.instance))

    async def record_correction(
        self, message_id: str, label: str, agent_id: str, at: float
    ) -> bool:
        """Store an agent's relabelling of a message; False for an unknown message."""
        return await self._run(lambda c: q.record_correction(c, message_id, label, agent_id, at))

    async def corrections(self) -> list[dict[str, Any]]:
        """Return the latest correction per message as training records (text, label, lang)."""
        return await self._read(q.corrections)

    async def reply_context(self, conversation_id: str) -> dict[str, Any] | None:
        """Return where an answer in this conversation goes: channel, contact, subject, refs."""
        return await self._read(lambda c: q.reply_context(c, conversation_id))

    # -- contacts across channels (router/contacts.py) ------------------------------

    async def contact(self, ref: str, since: float) -> dict[str, Any] | None:
        """Return the whole contact a reference names (id, handle key or identifier)."""
        return await self._read(lambda c: cq.contact_view(c, ref, since))

    async def find_contacts(self, query: str, limit: int = 20) -> list[dict[str, Any]]:
        """Return contacts whose handle, name or identifier contains `query`."""
        return await self._read(lambda c: cq.find_contacts(c, query, limit))

    async def merge_contacts(
        self, into: str, other: str, actor: str, reason: str, at: float
    ) -> ContactChange:
        """Make `other`'s contact part of `into`'s (audited); refusals say why."""
        return await self._run(lambda c: cq.merge(c, into, other, actor, reason, at))

    async def unmerge_contact(self, ref: str, actor: str, reason: str, at: float) -> ContactChange:
        """Undo the merge that made `ref`'s contact part of another (audited)."""
        return await self._run(lambda c: cq.unmerge(c, ref, actor, reason, at))
