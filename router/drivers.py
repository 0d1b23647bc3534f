"""The small protocols every channel and adapter implements, their errors and states.

A new driver is one module under `channels/` or `adapters/`, one test file and one
line in the registry below. Drivers never retry on their own: they raise a typed
error and let the supervisor (channels) or the outbox (adapters) decide.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from router.model import InboundMessage


class DriverState(StrEnum):
    """Health of one channel or adapter, shown in /readyz and metrics."""

    STOPPED = "stopped"  # not started, or stopped on purpose
    CONNECTING = "connecting"  # starting or reconnecting
    CONNECTED = "connected"  # working
    TRANSIENT_DISCONNECT = "transient_disconnect"  # lost its peer, backing off before retrying
    BAD_CREDENTIALS = "bad_credentials"  # parked: retrying would only hammer the peer


class DriverError(Exception):
    """Base of the error taxonomy; the class decides what the caller does next."""


class TransientError(DriverError):
    """Back off and retry (connection refused, 5xx, broker gone)."""


class TimedOut(TransientError):
    """The peer did not answer in time; retry soon."""


class RateLimited(TransientError):
    """The peer asked us to slow down; obey its hint."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(DriverError):
    """Retrying cannot help (4xx, rejected recipient): dead-letter at once."""


class AuthFailed(PermanentError):
    """Credentials were refused: park the driver as bad_credentials and alert."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One outbox entry handed to an adapter. `id` is the idempotency key of the send."""

    id: str
    target: str  # adapter name from the config
    agent_id: str
    address: str  # agent's address in that tool (topic suffix, URL path, file name)
    kind: str  # "assignment" for now; replies and alerts later
    payload: dict[str, Any]
    attempt: int = 1
    created_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Outbound:
    """A message to a customer on their channel (acknowledgement, agent reply), from the outbox.

    `id` is the idempotency key: every retry of this send carries it (email uses it to
    derive one Message-ID, so a retried acknowledgement is recognisably the same mail).
    """

    id: str
    channel: str  # configured channel name
    kind: str  # "ack" | "reply"
    conversation_id: str
    ticket: str
    to: str  # the contact handle on that channel (address, number, chat id)
    text: str
    subject: str = ""
    # The customer message this answers: its external id and, for email, threading refs.
    in_reply_to: str = ""
    references: tuple[str, ...] = ()
    respond_by: datetime | None = None  # acknowledgements promise this time
    attempt: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AgentAction:
    """Something an agent did in their tool: accept, resolve, presence, reply."""

    agent_id: str
    action: str  # accept | resolve | presence | reply
    conversation_id: str = ""
    message_id: str = ""
    value: str = ""  # presence "on"/"off", reply text
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Receipt:
    """What the pipeline tells a channel once a message is committed (safe to ack now)."""

    message_id: str
    conversation_id: str
    ticket: str  # customer-facing ticket number, e.g. "T-01J..."
    status_token: str  # lets the customer read their ticket's status (HMAC, not guessable)
    state: str  # queued | assigned | resolved
    duplicate: bool = False  # the same (channel, external_id) was committed before
    payload_conflict: bool = False  # ... and with different content: the caller reused a key


@dataclass(frozen=True, slots=True)
class TicketStatus:
    """The customer-visible status of a ticket."""

    ticket: str
    state: str
    label: str
    severity: str
    opened_at: datetime
    respond_by: datetime
    assigned: bool
    messages: int
    resolved_at: datetime | None = None


# The pipeline commits a normalised message and returns only after the commit.
MessageSink = Callable[[InboundMessage], Awaitable[Receipt]]
ActionSink = Callable[[AgentAction], Awaitable[None]]
# (ticket, status_token) -> status, or None when unknown or the token is wrong
# (one answer for both, so a caller cannot probe which tickets exist).
TicketLookup = Callable[[str, str], Awaitable[TicketStatus | None]]


async def _no_tickets(ticket: str, token: str) -> TicketStatus | None:
    return None


@dataclass(frozen=True, slots=True)
class DriverContext:
    """Shared resources injected into every driver (no globals)."""

    state_dir: Path
    log: Any  # a structlog BoundLogger, already bound to the driver's name
    tickets: TicketLookup = _no_tickets


class Channel(Protocol):
    """A customer-facing source. `run` lives until cancelled or until it fails.

    A channel that can answer customers also has `async send(outbound: Outbound)`,
    raising TransientError/PermanentError like an adapter's deliver(); the outbox
    calls it for acknowledgements and relayed agent replies.

    Constructed as `cls(name, config, ctx)` where config is an instance of the
    module's `cls.config_model` (a frozen pydantic model with `type` and bounds).
    """

    name: str
    state: DriverState

    async def run(self, sink: MessageSink) -> None:
        """Take messages from the source and hand each to sink; ack only after sink returns."""

    async def stop(self) -> None:
        """Stop taking new messages (in-flight ones finish)."""


class AgentTool(Protocol):
    """An agent-facing tool fed by the outbox; constructed like a Channel."""

    name: str
    state: DriverState

    async def run(self, actions: ActionSink) -> None:
        """Keep the connection alive (and listen for agent actions) until cancelled."""

    async def deliver(self, delivery: Delivery) -> None:
        """Send one delivery; raise TransientError or PermanentError on failure."""

    async def stop(self) -> None:
        """Release connections; pending deliveries stay in the outbox."""


# Lazy import strings keep optional dependencies out of the start path of
# drivers that are not configured (uvicorn's pattern).
CHANNELS: dict[str, str] = {
    "email": "channels.email:EmailChannel",
    "web": "channels.web:WebChannel",
}
ADAPTERS: dict[str, str] = {
    "inbox": "adapters.inbox:InboxTool",
    "mqtt": "adapters.mqtt:MqttTool",
    "webhook": "adapters.webhook:WebhookTool",
}


def load_driver(registry: dict[str, str], type_name: str) -> Any:
    """Import and return the driver class registered for type_name."""
    try:
        target = registry[type_name]
    except KeyError:
        raise KeyError(f"unknown driver type {type_name!r}; known: {sorted(registry)}") from None
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)
