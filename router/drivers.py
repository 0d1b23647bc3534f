"""The small protocols every channel and adapter implements, their errors and states.

A new driver is one module under `channels/` or `adapters/`, one test file and one
line in the registry below. Drivers never retry on their own: they raise a typed
error and let the supervisor (channels) or the outbox (adapters) decide.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator

from router.delivery import Delivery as Delivery
from router.delivery import Outbound as Outbound

# Re-exported: a driver imports everything it deals in from this module.
from router.errors import AuthFailed as AuthFailed
from router.errors import DriverError as DriverError
from router.errors import PermanentError as PermanentError
from router.errors import RateLimited as RateLimited
from router.errors import TimedOut as TimedOut
from router.errors import TransientError as TransientError
from router.model import InboundMessage

if TYPE_CHECKING:
    from router.metrics import Metrics

# Names of channels and agent tools in the config (also metric labels and file names).
NAME_RE = r"^[a-z0-9][a-z0-9_-]{0,39}$"
# Agent ids: they double as file names (inbox) and topic levels (MQTT), so no separators.
AGENT_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


def check_time_zone(value: str) -> str:
    """Return value if it names an IANA time zone; raise ValueError otherwise."""
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {value!r} (an IANA name, e.g. Asia/Shanghai)"
        ) from None
    return value


# A config field naming an IANA time zone ("Asia/Shanghai"), checked at load.
TimeZoneName = Annotated[str, AfterValidator(check_time_zone)]
# The exit code of a config error: systemd's RestartPreventExitStatus=11 stops a restart loop.
EXIT_CONFIG = 11


class Presence(StrEnum):
    """What an agent says about taking work (agent tools, the ops API, the CLI)."""

    ON = "on"  # on line: takes new work
    AWAY = "away"  # no new work; keeps what it has, offers included
    OFF = "off"  # off line: no new work; offers not yet accepted go back to the queue


class DriverState(StrEnum):
    """Health of one channel or adapter, shown in /readyz and metrics."""

    STOPPED = "stopped"  # not started, or stopped on purpose
    CONNECTING = "connecting"  # starting or reconnecting
    CONNECTED = "connected"  # working
    TRANSIENT_DISCONNECT = "transient_disconnect"  # lost its peer, backing off before retrying
    BAD_CREDENTIALS = "bad_credentials"  # parked: retrying would only hammer the peer
    # Another instance holds this single-owner driver's lease and reads its source;
    # here it only sends (router.leases). Counts as up.
    STANDBY = "standby"


# The states in which a driver does its job on this instance (ready, not degraded).
UP_STATES = frozenset({DriverState.CONNECTED, DriverState.STANDBY})


@dataclass(frozen=True, slots=True)
class AgentAction:
    """Something an agent did in their tool: accept, resolve, presence, reply, transfer, ..."""

    agent_id: str
    action: str  # router.actions.Action (the raw name when refused)
    conversation_id: str = ""
    message_id: str = ""
    value: str = ""  # presence "on"/"off", reply text, transfer target, label
    extra: dict[str, Any] = field(default_factory=dict)
    # Set by a tool whose agent sent something it could not parse (router.actions
    # `ActionError.as_action`): the router refuses it with this reason, and tells them.
    refused: str = ""


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


class ConversationTokens(Protocol):
    """Issues and checks the tokens with which a contact continues a conversation.

    For channels that cannot verify who writes (the web): starting a conversation
    needs nothing, continuing one needs the token handed out when it started.
    """

    def conversation_token(self, handle: str, seed: str | None = None) -> tuple[str, str]:
        """Return (thread hint, token) for a new conversation of this contact."""
        ...

    def conversation_hint(self, handle: str, token: str) -> str | None:
        """Return the thread hint the token proves for this contact, or None."""
        ...


class DriverBase:
    """What every channel and agent tool shares: its name, context, health and capabilities.

    Capabilities are declared on the driver class, so the core asks the class what it
    can do instead of guessing from its type name.
    """

    # An agent tool that sends actions back (accept, resolve, reply, ...). Only then can
    # its agents accept an offer, so only then do accept timeouts apply to them.
    sends_actions: ClassVar[bool] = False
    # A customer channel whose `send(Outbound)` answers customers (acks, agent replies).
    answers_customers: ClassVar[bool] = False
    # Its `run()` reads a source that allows one reader at a time (an IMAP mailbox,
    # Telegram's getUpdates). With several instances on one store, only the one holding
    # the lease `channel:<name>` / `tool:<name>` runs it; sending works on every one.
    single_owner: ClassVar[bool] = False

    def __init__(self, name: str, ctx: DriverContext) -> None:
        """Start stopped, with no error and no success yet."""
        self.name = name
        self.ctx = ctx
        self.log = ctx.log
        self.state = DriverState.STOPPED
        self.last_error = ""
        self.last_success: float | None = None  # time.time() of the last piece of work done

    def _set_state(self, state: DriverState, error: str = "") -> None:
        """Change state and log the transition once (not every failed attempt)."""
        if error:
            self.last_error = error
        if state == self.state:
            return
        old, self.state = self.state, state
        level = {
            DriverState.BAD_CREDENTIALS: self.log.error,
            DriverState.TRANSIENT_DISCONNECT: self.log.warning,
        }.get(state, self.log.info)
        level("driver.state", old=str(old), new=str(state), error=error or None)

    @classmethod
    def single_owner_for(cls, config: Any) -> bool:
        """Whether a driver with this config reads a one-reader source (default: its class says).

        A driver whose intake mode is a setting (Telegram: polling or webhook) overrides it.
        """
        return cls.single_owner

    def standby(self) -> None:
        """Show that another instance runs this driver's intake; it still sends from here."""
        self._set_state(DriverState.STANDBY)

    def _succeeded(self) -> None:
        """Record that a piece of work went through (shown as last_success in /readyz)."""
        self.last_success = time.time()

    def details(self) -> dict[str, Any]:
        """Return driver-specific figures for /readyz (none by default)."""
        return {}


class ChannelBase(DriverBase):
    """Base of customer channels: a channel that answers customers overrides `send`."""

    # Serves the JSON intake API (`POST /v1/messages`) on its `host` and `port`: the
    # channel `omnirouter send` posts to.
    takes_message_posts: ClassVar[bool] = False

    async def send(self, outbound: Outbound) -> None:
        """Refuse: this channel cannot carry answers to customers."""
        raise PermanentError(f"channel {self.name!r} cannot send to customers")


class AgentToolBase(DriverBase):
    """Base of agent tools (the outbox calls `deliver`; `run` may listen for actions)."""

    @classmethod
    def actions_enabled(cls, config: Any) -> bool:
        """Whether a tool with this config sends agent actions back (default: its class says).

        A tool whose actions channel is optional (a webhook with a callback) overrides it.
        """
        return bool(getattr(cls, "sends_actions", False))


@dataclass(frozen=True, slots=True)
class DriverContext:
    """Shared resources injected into every driver (no globals)."""

    state_dir: Path
    log: Any  # a structlog BoundLogger, already bound to the driver's name
    tickets: TicketLookup = _no_tickets
    conversations: ConversationTokens | None = None  # None: the channel threads on its own
    metrics: Metrics | None = None  # the daemon's registry, for a driver's own counters


class Channel(Protocol):
    """A customer-facing source. `run` lives until cancelled or until it fails.

    A channel whose class declares `answers_customers = True` implements `send`,
    raising TransientError/PermanentError like an agent tool's deliver(); the outbox
    calls it for acknowledgements and relayed agent replies.

    Constructed as `cls(name, config, ctx)` where config is an instance of the
    module's `cls.config_model` (a frozen pydantic model with `type` and bounds).
    """

    name: str
    state: DriverState
    last_error: str
    last_success: float | None
    answers_customers: ClassVar[bool]

    def details(self) -> dict[str, Any]:
        """Return driver-specific figures for /readyz."""

    def standby(self) -> None:
        """Show that another instance runs this channel's intake."""

    async def send(self, outbound: Outbound) -> None:
        """Send an acknowledgement or reply to a customer (answering channels only)."""

    async def run(self, sink: MessageSink) -> None:
        """Take messages from the source and hand each to sink; ack only after sink returns."""

    async def stop(self) -> None:
        """Stop taking new messages (in-flight ones finish)."""


class AgentTool(Protocol):
    """An agent-facing tool fed by the outbox; constructed like a Channel."""

    name: str
    state: DriverState
    last_error: str
    last_success: float | None
    sends_actions: ClassVar[bool]

    def details(self) -> dict[str, Any]:
        """Return driver-specific figures for /readyz."""

    def standby(self) -> None:
        """Show that another instance runs this tool's intake."""

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
    "telegram": "channels.telegram:TelegramChannel",
    "web": "channels.web:WebChannel",
    "twilio": "channels.sms:TwilioChannel",
    "sms_http": "channels.sms:HttpSmsChannel",
}
ADAPTERS: dict[str, str] = {
    "inbox": "adapters.inbox:InboxTool",
    "mailbox": "adapters.mailbox:MailboxTool",
    "mqtt": "adapters.mqtt:MqttTool",
    "telegram": "adapters.telegram:TelegramTool",
    "webhook": "adapters.webhook:WebhookTool",
    "chat": "adapters.chat:ChatTool",
    "slack_app": "adapters.chat:SlackAppTool",
}


def tool_sends_actions(type_name: str, config: Any = None) -> bool:
    """Tell whether agent tools of this type (with this config) send actions back."""
    cls = load_driver(ADAPTERS, type_name)
    enabled = getattr(cls, "actions_enabled", None)
    if config is not None and enabled is not None:
        return bool(enabled(config))
    return bool(cls.sends_actions)


def load_driver(registry: dict[str, str], type_name: str) -> Any:
    """Import and return the driver class registered for type_name."""
    try:
        target = registry[type_name]
    except KeyError:
        raise KeyError(f"unknown driver type {type_name!r}; known: {sorted(registry)}") from None
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)
