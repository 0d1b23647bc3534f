"""What the pipeline's parts share: one `Core` per daemon, handed to each part.

`config` and `classifier` are replaced on reload (SIGHUP); the parts read them from
here at each use, never keep their own copy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from router.config import Config
from router.crisis import CrisisDetector
from router.gauges import Gauges
from router.metrics import Metrics
from router.model import Classification
from router.outbox import Dispatcher
from router.schedule import Scheduler
from router.store import OutboxItem, Store
from router.threads import ThreadKey, Threads
from router.tickets import Tickets

if TYPE_CHECKING:  # router.classify_workers imports this module
    from router.classify_workers import ClassifierWorkers


class Classifier(Protocol):
    """What the pipeline needs of a classifier (rules or the trained model)."""

    def classify(
        self, text: str, *, subject: str = "", language: str | None = None, contact: str = ""
    ) -> Classification: ...


async def _nothing_to_refresh(conversation_id: str) -> None:
    """One instance alone: its memory is the store's state."""


@dataclass(slots=True)
class Core:
    """The state and services every part of the pipeline works on."""

    config: Config
    store: Store
    metrics: Metrics
    dispatcher: Dispatcher
    clock: Callable[[], float]
    scheduler: Scheduler
    classifier: Classifier
    crisis: CrisisDetector | None
    threads: Threads
    tickets: Tickets
    gauges: Gauges
    # Worker processes running the classifier (`[classifier] workers`); None: in the loop.
    classifier_workers: ClassifierWorkers | None = None
    # Held while waiting messages are handed out, so nothing else changes loads or
    # queues under a placement (presence changes, resolves, offers taken back).
    drain_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Channels that answer customers (acknowledgements, replies); the daemon fills it.
    answering_channels: set[str] = field(default_factory=set)
    # Resolved tickets whose satisfaction question waits for an answer, by thread:
    # (conversation id, answer accepted until). Loaded from the store at restore, so
    # intake tells an answer from a new message without a read per message.
    surveys: dict[ThreadKey, tuple[str, float]] = field(default_factory=dict)
    # Called when the store refused a decision made on stale state (another instance
    # changed it): look at the shared routing state again soon. A no-op alone.
    resync_soon: Callable[[], None] = field(default=lambda: None)
    # Reads one conversation's routing state from the store now (an agent acts on a
    # ticket another instance assigned a moment ago). A no-op alone.
    refresh_conversation: Callable[[str], Awaitable[None]] = field(default=_nothing_to_refresh)

    async def send_now(self, items: list[OutboxItem]) -> None:
        """Commit sends not caused by an ingest, then hand them to the outbox."""
        if not items:
            return
        await self.store.enqueue_outbox(items)
        for item in items:
            self.dispatcher.submit(item)

    def update_gauges(self) -> None:
        """Publish agent and queue gauges that changed."""
        self.gauges.update(self.metrics)
