"""Load, resolve and validate the TOML configuration into typed, frozen models.

Every error names its file, line, path and value:
`omnirouter.toml line 14: channels[0].port: Input should be less than or equal to
65535 (got 99999)`. Secrets are written as `${ENV_VAR}` or `file:/path` (systemd
credentials) and resolved before validation. A resolved value, or the value of a
field marked secret (`SecretStr`, or `json_schema_extra={"secret": True}`), is never
echoed in an error, and every resolved value is registered with `router.logging` so
it is masked in logs too.

Driver sections (channels, adapters) are validated against the model their module
exports, chosen by `type`, so a new driver brings its own schema. Files matched by
`daemon.include` (conf.d) may add channels, adapters and agents; their errors name
the included file and the entry's position in it.
"""

from __future__ import annotations

import difflib
import glob
import ipaddress
import os
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretBytes,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from router.crisis import CrisisConfig
from router.drivers import ADAPTERS, AGENT_ID_RE, CHANNELS, NAME_RE, TimeZoneName, load_driver
from router.logging import MIN_SECRET_LENGTH, mask_secrets, register_secret
from router.model import LABELS, Shift

# Values copied from the example file and never edited: refuse to start on them
# rather than run with a password everyone knows (mautrix's ForbiddenDefault).
FORBIDDEN_PLACEHOLDERS = ("CHANGE_ME", "changeme", "<secret>")
# The exit status of `omnirouter` for an unusable config; the systemd unit lists it
# in RestartPreventExitStatus so a broken file does not cause a restart loop.
MASK = "***"
# Keys an included (conf.d) file may set: the lists admins edit one entry at a time.
INCLUDABLE = ("channels", "adapters", "agents")

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_TOML_POS = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")
_LIST_PATH = re.compile(r"^(channels|adapters|agents)\[(\d+)\](.*)$")


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem: where (file, line, dotted path) and what."""

    source: str
    line: int | None
    path: str
    message: str
    column: int | None = None

    def __str__(self) -> str:
        """Render as `file line N: path: message` (parts that are unknown are left out)."""
        where = self.source
        if self.line is not None:
            where += f" line {self.line}"
            if self.column is not None:
                where += f", column {self.column}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """A configuration that cannot be used; `issues` lists each problem with its place."""

    def __init__(self, source: str, errors: Sequence[ConfigIssue | str]) -> None:
        """Keep the issues; plain strings are taken as messages about the whole file."""
        self.source = source
        self.issues: list[ConfigIssue] = [
            e if isinstance(e, ConfigIssue) else ConfigIssue(source, None, "", e) for e in errors
        ]
        # One rendered line per issue, each starting with its file.
        self.errors: list[str] = [str(i) for i in self.issues]
        super().__init__(self.render())

    def render(self) -> str:
        """Return one error per line, ready for a terminal or the journal."""
        return "\n".join(self.errors)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _default_state_dir() -> Path:
    """Return $OMNIROUTER_STATE_DIR, else ./omnirouter-state."""
    return Path(os.environ.get("OMNIROUTER_STATE_DIR", "omnirouter-state"))


class DaemonConfig(_Frozen):
    """Process-wide settings."""

    state_dir: Path = Field(default_factory=_default_state_dir)
    shutdown_timeout: float = Field(default=20.0, gt=0, le=600)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Message bodies are customer data: they stay out of logs unless asked for.
    log_bodies: bool = False
    include: list[str] = Field(default_factory=list)  # globs of conf.d files, relative to this file
    # This instance's id among several sharing one store (leases, outbox ownership, the
    # instance label). Unset: <hostname>-<6 hex of the state_dir>, stable across restarts.
    instance: str | None = Field(default=None, pattern=NAME_RE)
    # Seconds a lease lasts unrenewed (renewed every third of it): how soon another
    # instance takes over the pulling channels and pending sends of one that died.
    lease_ttl: float = Field(default=15.0, ge=3, le=600)
    # The asyncio event loop: uvloop (libuv) spends about a sixth less CPU per message
    # on sockets and callbacks; "auto" takes it when installed (it is a dependency),
    # "asyncio" is the standard library's loop.
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"


class StoreConfig(_Frozen):
    """Where messages are kept: an embedded SQLite file, or a PostgreSQL database shared
    by several instances (`url`; the backend follows from it)."""

    backend: Literal["sqlite", "postgresql"] = "sqlite"
    path: str = "omnirouter.db"  # SQLite: relative to daemon.state_dir unless absolute
    synchronous: Literal["full", "normal"] = "full"
    raw_max_bytes: int = Field(default=256 * 1024, ge=0, le=64 * 1024 * 1024)
    # PostgreSQL: postgresql://user@host:5432/dbname?sslmode=verify-full. Keep the
    # password out of the file: libpq's PGPASSWORD / ~/.pgpass, or ${ENV} in the URL.
    url: str | None = Field(default=None, json_schema_extra={"secret": True})
    pool_size: int = Field(default=4, ge=1, le=64)  # connections (and threads) per instance
    statement_timeout: float = Field(default=30.0, gt=0, le=3600)  # seconds, per statement
    connect_timeout: float = Field(default=10.0, gt=0, le=300)
    # TLS to the server (libpq's sslmode and CA file); unset: what the URL says.
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = (
        None
    )
    sslrootcert: str | None = None
    # PostgreSQL: statements run often are prepared on each connection (less CPU on
    # both sides). Behind a pooler that shares server connections between sessions
    # (PgBouncer in transaction mode) the store turns it off at the first collision.
    prepared_statements: bool = True

    @model_validator(mode="before")
    @classmethod
    def _backend_from_url(cls, data: Any) -> Any:
        """A `url` selects PostgreSQL unless `backend` is given."""
        if isinstance(data, dict) and data.get("url") and "backend" not in data:
            data = {**data, "backend": "postgresql"}
        return data

    @field_validator("url")
    @classmethod
    def _postgresql_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL")
        return url

    @model_validator(mode="after")
    def _url_for_postgresql(self) -> StoreConfig:
        if self.backend == "postgresql" and not self.url:
            raise ValueError("url: required when backend is postgresql")
        return self


class OpsConfig(_Frozen):
    """The operations HTTP API: health, readiness, metrics, admin."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8081, ge=0, le=65535)
    # A host other than loopback exposes /metrics (no authentication) and the admin
    # endpoints to the network: refused unless this says it is meant.
    allow_public: bool = False
    # Seconds a client has to send the request head, and again the body (slow-loris).
    read_timeout: float = Field(default=10.0, gt=0, le=300)
    # Open connections at once, separate from every channel's, so health stays visible
    # through a flood on another port; when full, idle ones are evicted.
    max_connections: int = Field(default=32, ge=1, le=10_000)
    # Unset: a random token is written to <state_dir>/admin-token on first start.
    admin_token: str | None = Field(default=None, min_length=16, json_schema_extra={"secret": True})


class SeverityRule(_Frozen):
    """Sets the severity of messages that match: any of `signals` and any of `labels`."""

    signals: list[str] = Field(default_factory=list)  # empty: any (or no) signal
    labels: list[str] = Field(default_factory=list)  # empty: any label
    severity: Literal["P0", "P1", "P2", "P3"]


MAX_CLASSIFIER_WORKERS = 16
# Below this many messages a second the loop classifies more cheaply than a round trip
# to a worker process: measured with bench/ingest.py on 2 vCPUs (bench/README.md), a
# worker at 200 msg/s cost about 17 % more CPU and lengthened the p95, at 600 msg/s it
# halved the p99. The worker pays once the loop runs short of time.
DEFAULT_WORKERS_START_RATE = 500
# The same point on any machine: the share of a second the loop spends classifying. The
# fast VM of those figures classified 7,700-8,300 msg/s (bench/classify_bench.py), so 500
# msg/s took 6-7 % of each second; a VM three times slower saturated near 400 msg/s and
# never reached the rate, so the worker never started (bench/README.md, fifth session).
DEFAULT_WORKERS_START_SHARE = 0.08
# An on-demand worker stops once the load has stayed below three quarters of what starts
# it for this long (router/classify_workers.py): a burst should not leave the worker's
# round trips (about 15 % more CPU at 200 msg/s) for good, and a long stretch against
# the one busy second that starts it keeps a fluctuating load from flapping it. A start
# costs its model load (0.6-0.8 s of a core here).
DEFAULT_WORKERS_STOP_AFTER = 30.0


def usable_cpus() -> int:
    """Return how many CPUs this process may run on (its affinity, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


class ClassifierConfig(_Frozen):
    """Thresholds the classifier and escalation rules use."""

    # "intent": the trained model shipped in router/models (or model_path); "rules":
    # the hand-written cue lexicons alone (faster, less accurate across domains).
    model: Literal["intent", "rules"] = "intent"
    model_path: str | None = None  # a model from `omnirouter classifier train`
    # Processes that classify beside the event loop (0: in the loop). One uses a second
    # core for the model's work; see router/classify_workers.py. "auto": one when this
    # process may run on two cores or more, else none (see worker_count), started when
    # the load first asks for it: `workers_start_rate` messages classified within a second,
    # or `workers_start_share` of a second spent classifying, whichever comes first, and
    # stopped once the load has stayed below 3/4 of both for `workers_stop_after` seconds.
    workers: Annotated[int, Field(ge=0, le=MAX_CLASSIFIER_WORKERS)] | Literal["auto"] = "auto"
    workers_start_rate: int = Field(default=DEFAULT_WORKERS_START_RATE, ge=1, le=1_000_000)
    workers_start_share: float = Field(default=DEFAULT_WORKERS_START_SHARE, gt=0.0, le=1.0)
    workers_stop_after: float = Field(default=DEFAULT_WORKERS_STOP_AFTER, ge=1.0, le=86_400.0)
    amount_threshold: float = Field(default=5000.0, gt=0)
    vip_contacts: list[str] = Field(default_factory=list)
    repeat_contact_count: int = Field(default=3, ge=2, le=100)
    repeat_contact_window: float = Field(default=72 * 3600.0, gt=0)  # seconds
    # Checked in order before the built-in table (router.classify.severity_for); the
    # first rule that matches sets the severity, e.g. VIP inquiries to P1.
    severity_rules: list[SeverityRule] = Field(default_factory=list)
    # Complaint spikes and same-subject clusters raise an alert to an adapter.
    crisis: CrisisConfig = Field(default_factory=lambda: CrisisConfig())

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: object) -> object:
        # One message for both forms, instead of one per member of the union.
        if value == "auto" or (type(value) is int and 0 <= value <= MAX_CLASSIFIER_WORKERS):
            return value
        raise ValueError(f'must be "auto" or a whole number from 0 to {MAX_CLASSIFIER_WORKERS}')

    @property
    def workers_on_demand(self) -> bool:
        """Whether the workers start when the load asks for them ("auto"), not at start."""
        return self.workers == "auto"

    def start_rate(self) -> int | None:
        """Return the rate that starts the workers on demand; None: they start at once."""
        return self.workers_start_rate if self.workers_on_demand else None

    def start_share(self) -> float | None:
        """Return the share of a second classifying that starts the workers on demand."""
        return self.workers_start_share if self.workers_on_demand else None

    def stop_after(self) -> float | None:
        """Return how long a low load stops on-demand workers; None: they run for good."""
        return self.workers_stop_after if self.workers_on_demand else None

    def worker_count(self) -> int:
        """Return how many classifier worker processes to run (`workers` resolved)."""
        if not self.workers_on_demand:
            return int(self.workers)
        # One worker pays only with a core of its own beside the event loop's.
        return 1 if usable_cpus() >= 2 else 0


class SlaConfig(_Frozen):
    """Seconds to first response, by class; urgent (P0/P1) overrides the class."""

    inquiry: float = Field(default=300.0, gt=0)
    complaint: float = Field(default=120.0, gt=0)
    suggestion: float = Field(default=3600.0, gt=0)
    urgent: float = Field(default=30.0, gt=0)


class RoutingRule(_Frozen):
    """Sends matching messages to a queue (a department). Every listed condition must
    hold; within one list any value matches; an empty list matches anything."""

    queue: str
    labels: list[str] = Field(default_factory=list)
    signals: list[str] = Field(default_factory=list)  # e.g. legal_threat, amount_over_threshold
    severities: list[Literal["P0", "P1", "P2", "P3"]] = Field(default_factory=list)
    languages: list[str] = Field(default_factory=list)
    channel_types: list[str] = Field(default_factory=list)

    def matches(
        self, label: str, severity: str, signals: Sequence[str], language: str, channel_type: str
    ) -> bool:
        """Tell whether a classified message meets every condition of the rule."""
        return (
            (not self.labels or label in self.labels)
            and (not self.severities or severity in self.severities)
            and (not self.signals or not set(self.signals).isdisjoint(signals))
            and (not self.languages or language in self.languages)
            and (not self.channel_types or channel_type in self.channel_types)
        )


class RoutingConfig(_Frozen):
    """Which queue a message joins."""

    # label -> queue; labels not listed go to "default".
    queues: dict[str, str] = Field(default_factory=dict)
    # P0/P1 messages go here when set (a supervisor queue), else to their label's queue.
    escalation_queue: str | None = None
    # Messages the classifier is unsure of (confidence below the threshold) go to the
    # triage queue, when set, instead of being forced into a class's queue.
    triage_queue: str | None = None
    triage_threshold: float = Field(default=0.5, ge=0, le=1)
    # Checked in order after the escalation queue and before triage and `queues`; the
    # first rule that matches names the queue (department).
    rules: list[RoutingRule] = Field(default_factory=list)


class OutboxConfig(_Frozen):
    """How deliveries are retried before they become dead letters."""

    max_attempts: int = Field(default=8, ge=1, le=100)
    backoff_base: float = Field(default=0.5, gt=0, le=60)
    backoff_cap: float = Field(default=300.0, gt=0, le=86400)
    concurrency: int = Field(default=256, ge=1, le=10000)
    poll_interval: float = Field(default=5.0, gt=0, le=3600)
    # Items held in memory per agent tool while it is down; beyond it they wait in the
    # store only, and the scan brings them back when the tool is up (memory stays
    # bounded however long the outage and the intake).
    max_held_per_tool: int = Field(default=10_000, ge=10, le=10_000_000)


_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class ShiftConfig(_Frozen):
    """A weekly working window: `days = "mon-fri"`, `start = "09:00"`, `end = "17:30"`."""

    days: str = Field(default="mon-sun", pattern=r"^[a-z]{3}(-[a-z]{3})?(,[a-z]{3}(-[a-z]{3})?)*$")
    start: str = Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    end: str = Field(pattern=r"^([01]\d|2[0-3]|24):[0-5]\d$")
    tz: TimeZoneName = "UTC"

    @field_validator("days")
    @classmethod
    def _known_days(cls, value: str) -> str:
        for part in value.split(","):
            for day in part.split("-"):
                if day not in _DAYS:
                    raise ValueError(f"unknown day {day!r}; use {', '.join(_DAYS)}")
        return value

    def to_shift(self) -> Shift:
        """Return the scheduler's form of this shift."""
        days: set[int] = set()
        for part in self.days.split(","):
            first, _, last = part.partition("-")
            a, b = _DAYS.index(first), _DAYS.index(last or first)
            days.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
        h1, m1 = map(int, self.start.split(":"))
        h2, m2 = map(int, self.end.split(":"))
        return Shift(frozenset(days), h1 * 60 + m1, min(24 * 60, h2 * 60 + m2), self.tz)


class AgentConfig(_Frozen):
    """One human on the roster."""

    id: str = Field(pattern=AGENT_ID_RE)
    name: str = ""
    # One number: conversations at once over all channel types; a table
    # (`{ chat = 3, email = 5 }`): per channel type, types not listed are not taken
    # ("*" covers the rest).
    capacity: int | dict[str, Annotated[int, Field(ge=0, le=1000)]] = 3
    tool: str  # name of an adapter
    address: str = ""
    # Labels (inquiry, complaint, …) the agent takes and languages (en, zh, …) it
    # speaks; no label means every label, no language every language.
    skills: list[str] = Field(default_factory=list)
    queues: list[str] = Field(default_factory=lambda: ["default"])  # departments
    present: bool = True
    supervisor: bool = False  # takes overflow work (see scheduling.overflow)
    # Whether offers to this agent must be accepted (scheduling.accept_timeout). Unset:
    # yes for tools that send actions (MQTT), no for the file inbox and webhooks; set
    # it true for an agent whose tool accepts through the ops API instead.
    accepts: bool | None = None
    shifts: list[ShiftConfig] = Field(default_factory=list)  # none: always in shift

    @field_validator("capacity")
    @classmethod
    def _positive(cls, value: int | dict[str, int]) -> int | dict[str, int]:
        if isinstance(value, int) and not 1 <= value <= 1000:
            raise ValueError("must be 1–1000")
        if isinstance(value, dict) and not any(value.values()):
            raise ValueError("the table must allow at least one channel type")
        return value

    @property
    def capacities(self) -> dict[str, int]:
        """Return the per-channel-type table ({} when capacity is one number)."""
        return dict(self.capacity) if isinstance(self.capacity, dict) else {}

    @property
    def total_capacity(self) -> int:
        """Return the conversations the agent may hold at once, all types together."""
        return self.capacity if isinstance(self.capacity, int) else sum(self.capacity.values())


class OverflowStepConfig(_Frozen):
    """Past its deadline by `after` seconds, a waiting message's eligibility widens."""

    after: float = Field(default=0.0, ge=0)
    widen: Literal["departments", "languages", "supervisors"]


class SchedulingConfig(_Frozen):
    """How the load-aware scheduler decides (see router/schedule.py)."""

    # An assignment the agent has not accepted (accept action, or a reply) within this
    # many seconds goes back to the queue and to someone else; 0 turns it off.
    accept_timeout: float = Field(default=120.0, ge=0, le=86400)
    # Adapter that receives SLA-breach events (a message still waiting at its deadline).
    breach_target: str | None = Field(default=None, pattern=NAME_RE)
    breach_address: str = "sla"
    complaint_streak_limit: int = Field(default=3, ge=0, le=1000)  # 0: no rotation
    # Store every agent's verdict with each assignment (omnirouter explain). Costs CPU
    # per message in proportion to the roster; off keeps only the one-line reason.
    explain: bool = True
    # Slots are kept free for classes with short deadlines (P0/P1 complaints) where a
    # slot frees too seldom to meet them: sized from the observed arrival and completion
    # rates (Erlang B) so that an arrival finding its agents all busy misses its
    # deadline with at most this probability. 0 keeps no reserve.
    reserve_risk: float = Field(default=0.1, ge=0, le=1)
    # A floor under the computed P0/P1 reserve (slots), for sites that want one.
    urgent_reserve: int = Field(default=0, ge=0, le=100)
    # Work held back for a reserve takes a reserved slot once it has spent this share
    # of its SLA waiting (if it can still make its deadline).
    reserve_slack: float = Field(default=0.75, ge=0, le=1)
    # Arrival rates per class are averaged over about this many seconds.
    rate_window: float = Field(default=600.0, ge=10, le=86400)
    overflow: list[OverflowStepConfig] = Field(
        default_factory=lambda: [
            OverflowStepConfig(after=0, widen="departments"),
            OverflowStepConfig(after=120, widen="supervisors"),
        ]
    )


class LifecycleConfig(_Frozen):
    """How tickets end: reopening, closing and the satisfaction survey (README)."""

    # A resolved ticket is closed (archived) this long after it was resolved; a closed
    # ticket never reopens: the thread's next message starts a new ticket.
    close_after: float = Field(default=7 * 86400.0, gt=0, le=366 * 86400.0)
    # A customer's follow-up this soon after the resolve reopens the ticket; a later one
    # starts a new ticket (and closes the old one).
    reopen_window: float = Field(default=3 * 86400.0, ge=0, le=366 * 86400.0)
    # Ask the customer for satisfaction (1-5, 满意/不满意) when a ticket is resolved, on
    # channels that answer customers; their answer within the window is the ticket's score.
    survey: bool = True
    survey_window: float = Field(default=3 * 86400.0, gt=0, le=366 * 86400.0)
    # How often resolved tickets past close_after are looked for (seconds).
    close_check_interval: float = Field(default=60.0, gt=0, le=86400.0)


class DriverSection(_Frozen):
    """What every channel/adapter section has before its own model takes over."""

    model_config = ConfigDict(frozen=True, extra="allow")
    type: str
    name: str = Field(pattern=NAME_RE)


class Config(_Frozen):
    """The whole validated configuration."""

    daemon: DaemonConfig = Field(default_factory=lambda: DaemonConfig())
    store: StoreConfig = Field(default_factory=lambda: StoreConfig())
    ops: OpsConfig = Field(default_factory=lambda: OpsConfig())
    classifier: ClassifierConfig = Field(default_factory=lambda: ClassifierConfig())
    sla: SlaConfig = Field(default_factory=lambda: SlaConfig())
    routing: RoutingConfig = Field(default_factory=lambda: RoutingConfig())
    scheduling: SchedulingConfig = Field(default_factory=lambda: SchedulingConfig())
    outbox: OutboxConfig = Field(default_factory=lambda: OutboxConfig())
    lifecycle: LifecycleConfig = Field(default_factory=lambda: LifecycleConfig())
    channels: list[Any] = Field(default_factory=list)  # driver models, validated below
    adapters: list[Any] = Field(default_factory=list)
    agents: list[AgentConfig] = Field(default_factory=list)
    source: str = "<embedded defaults>"
    # Every string resolved from ${ENV} or file:, masked by redacted_dump wherever it appears.
    _secret_values: frozenset[str] = PrivateAttr(default=frozenset())
    # (path, reference) of the secrets a `secrets=False` load left unresolved.
    _unresolved: tuple[tuple[str, str], ...] = PrivateAttr(default=())

    @model_validator(mode="before")
    @classmethod
    def _store_shorthand(cls, data: Any) -> Any:
        """`store = "postgresql://…"` is short for `[store] url = "postgresql://…"`."""
        if isinstance(data, dict) and isinstance(data.get("store"), str):
            data = {**data, "store": {"url": data["store"]}}
        return data

    @property
    def unresolved_secrets(self) -> tuple[tuple[str, str], ...]:
        """Return (path, reference) of every secret this load did not resolve."""
        return self._unresolved

    def store_label(self) -> str:
        """Name the store for people: the SQLite file, or the PostgreSQL server and database.

        Never the URL's password or parameters (they may carry secrets).
        """
        if self.store.backend == "postgresql" and self.store.url:
            from urllib.parse import urlsplit

            parts = urlsplit(self.store.url)
            host = parts.hostname or "localhost"
            port = f":{parts.port}" if parts.port else ""
            return f"postgresql://{host}{port}{parts.path}"
        return str(self.db_path())

    def db_path(self) -> Path:
        """Return the SQLite path, resolved against the state directory."""
        p = Path(self.store.path)
        return p if p.is_absolute() else self.daemon.state_dir / p

    def queue_for(
        self,
        label: str,
        severity: str,
        confidence: float = 1.0,
        *,
        signals: Sequence[str] = (),
        language: str = "",
        channel_type: str = "",
    ) -> str:
        """Return the queue a message of this label, severity and confidence joins."""
        if severity in ("P0", "P1") and self.routing.escalation_queue:
            # Level 1 and 2 escalations go to the supervisors at once.
            return self.routing.escalation_queue
        for rule in self.routing.rules:
            if rule.matches(label, severity, signals, language, channel_type):
                return rule.queue
        if self.routing.triage_queue and confidence < self.routing.triage_threshold:
            return self.routing.triage_queue
        return self.routing.queues.get(label, "default")


# -- model introspection --------------------------------------------------------------


def _has_secret_type(annotation: Any) -> bool:
    """Tell whether a type is, or contains (Optional, dict values, lists), a pydantic secret."""
    if isinstance(annotation, type) and issubclass(annotation, SecretStr | SecretBytes):
        return True
    return any(_has_secret_type(a) for a in get_args(annotation))


def is_secret_field(info: FieldInfo) -> bool:
    """Tell whether a model field holds a secret (SecretStr or json_schema_extra secret)."""
    extra = info.json_schema_extra
    if isinstance(extra, dict) and extra.get("secret") is True:
        return True
    return _has_secret_type(info.annotation)


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """Return the pydantic model a field's type holds (directly, or in a list/dict/Optional)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def _walk(
    model: type[BaseModel] | None, loc: Sequence[int | str]
) -> tuple[bool, type[BaseModel] | None]:
    """Follow an error location; return (a field on it is secret, the model holding its end)."""
    secret = False
    parent = model
    current = model
    for part in loc:
        if isinstance(part, int):
            continue
        parent = current
        if current is None:
            break
        info = current.model_fields.get(part)
        if info is None:
            current = None
            continue
        secret = secret or is_secret_field(info)
        current = _submodel(info.annotation)
    return secret, parent


# -- locating paths in TOML text ------------------------------------------------------


def _locate(text: str, loc: str) -> int | None:
    """Best-effort line number of a dotted config path like `channels[2].port` in TOML text."""
    if not text or not loc:
        return None
    lines = text.splitlines()
    parts = re.findall(r"([A-Za-z0-9_-]+)(?:\[(\d+)\])?", loc)
    header_any = re.compile(r"^\s*\[")
    start = 0
    found: int | None = None
    table = ""
    for name, index in parts:
        if index:
            table = f"{table}.{name}" if table else name
            header = re.compile(rf"^\s*\[\[\s*{re.escape(table)}\s*\]\]")
            seen = -1
            for i in range(start, len(lines)):
                if header.match(lines[i]):
                    seen += 1
                    if seen == int(index):
                        start, found = i + 1, i + 1
                        break
            else:
                return found
            continue
        key = re.compile(rf"^\s*[\"']?{re.escape(name)}[\"']?\s*=")
        sub = re.compile(rf"^\s*\[\s*{re.escape(f'{table}.{name}' if table else name)}\s*\]")
        for i in range(start, len(lines)):
            if key.match(lines[i]) or sub.match(lines[i]):
                start, found = i + 1, i + 1
                break
            # Inside a table, the next table header ends it: the key is not written there.
            if table and header_any.match(lines[i]):
                break
        table = f"{table}.{name}" if table else name
    return found


# -- loading --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Doc:
    """One TOML file: its name for messages, its text (for line numbers), its directory."""

    source: str
    text: str
    base: Path


_NOTHING: Any = object()


class _Loader:
    """Collect issues with their place, and the secret values met while resolving."""

    def __init__(self, main: _Doc, *, secrets: bool = True) -> None:
        """Start with the main file; included entries are mapped back by `origins`.

        With `secrets=False`, a `${ENV}` or `file:` reference that cannot be resolved
        here is not an issue: it is recorded in `unresolved` and stands in with a dummy
        value whose own checks are skipped (`config check --no-secrets`, admin commands).
        """
        self.main = main
        self.resolve_all = secrets
        self.unresolved: dict[str, str] = {}  # path -> the reference left unresolved
        self.origins: dict[str, list[tuple[_Doc, int]]] = {k: [] for k in INCLUDABLE}
        self.issues: list[ConfigIssue] = []
        self.secrets: set[str] = set()
        self.from_ref: set[str] = set()  # paths whose value came from ${ENV} or file:
        self.flagged: set[str] = set()  # paths with an issue already (skip follow-on errors)

    def where(self, path: str) -> tuple[_Doc, str]:
        """Map a path of the merged config to its file and its path inside that file."""
        m = _LIST_PATH.match(path)
        if m:
            origins = self.origins[m[1]]
            index = int(m[2])
            if index < len(origins):
                doc, local = origins[index]
                return doc, f"{m[1]}[{local}]{m[3]}"
        return self.main, path

    def first_use(self, path: str, here: str) -> str:
        """Describe where an earlier entry is, naming its file only if it is another one."""
        doc, local = self.where(path)
        return local if doc is self.where(here)[0] else f"{local} in {doc.source}"

    def mask(self, text: str) -> str:
        """Replace every secret seen in this load (and registered before) by ***."""
        for secret in sorted(self.secrets, key=len, reverse=True):
            if len(secret) >= MIN_SECRET_LENGTH:
                text = text.replace(secret, MASK)
        return mask_secrets(text)

    def show(self, path: str, value: Any, *, secret: bool = False) -> str:
        """Return repr(value) for a message, or *** when it is (or came from) a secret."""
        if secret or path in self.from_ref:
            return MASK
        return self.mask(repr(value))

    def add(self, path: str, message: str, *, got: Any = _NOTHING, secret: bool = False) -> None:
        """Record one issue at path; `got` is the offending value (shown unless secret)."""
        if path in self.unresolved:
            return  # the stand-in of a secret not resolved here: its checks are skipped
        self.flagged.add(path)
        doc, local = self.where(path)
        if got is not _NOTHING and not isinstance(got, dict | list | tuple):
            message = f"{message} (got {self.show(path, got, secret=secret)})"
        self.issues.append(
            ConfigIssue(doc.source, _locate(doc.text, local), local, self.mask(message))
        )

    def add_file(
        self, source: str, message: str, line: int | None = None, column: int | None = None
    ) -> None:
        """Record an issue about a whole file (unreadable, not TOML)."""
        self.issues.append(ConfigIssue(source, line, "", message, column))

    def note_secret(self, value: str) -> None:
        """Remember a secret value for masking here and in logs."""
        if value:
            self.secrets.add(value)
            register_secret(value)


def _is_placeholder(value: str) -> bool:
    """Tell whether a string is (or embeds) a value copied from the example and not edited."""
    return value.strip().lower() in {p.lower() for p in FORBIDDEN_PLACEHOLDERS} or any(
        p in value for p in ("CHANGE_ME", "<secret>")
    )


# What stands in for a secret that `secrets=False` leaves unresolved: long enough for
# the length checks, and obviously not a real value if it ever shows.
UNRESOLVED_STANDIN = "unresolved-secret-not-checked-0000"


def _child(path: str, key: str) -> str:
    """Return the dotted path of key under path; an empty key ([""] is valid TOML) quoted.

    Unquoted, an empty key at the top gave an issue with no path at all.
    """
    name = key or '""'
    return f"{path}.{name}" if path else name


def _resolve_refs(value: Any, path: str, loader: _Loader) -> Any:
    """Replace ${ENV} and file: references in every string, recursively."""
    if loader.resolve_all or not isinstance(value, str):
        return _resolve_refs_strict(value, path, loader)
    if not (value.startswith("file:") or "${" in value):
        return _resolve_refs_strict(value, path, loader)
    before = len(loader.issues)
    resolved = _resolve_refs_strict(value, path, loader)
    if len(loader.issues) == before:
        return resolved
    # Not resolvable here (unset variable, unreadable file): skipped, not an issue.
    del loader.issues[before:]
    loader.flagged.discard(path)
    loader.unresolved[path] = value
    return UNRESOLVED_STANDIN


def _resolve_refs_strict(value: Any, path: str, loader: _Loader) -> Any:
    """Replace ${ENV} and file: references in every string, recursively."""
    if isinstance(value, dict):
        return {k: _resolve_refs(v, _child(path, k), loader) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_refs(v, f"{path}[{i}]", loader) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value
    if _is_placeholder(value):
        loader.add(path, f"still holds the example placeholder {value!r}; set a real value")
        return value
    if value.startswith("file:") or "${" in value:
        loader.from_ref.add(path)

    def env(m: re.Match[str], secret: bool = True) -> str:
        """Return the value of the referenced variable, recording it as a secret."""
        name = m.group(1)
        if name not in os.environ:
            loader.add(path, f"environment variable {name} is not set")
            return ""
        resolved = os.environ[name]
        if secret:
            loader.note_secret(resolved)
        if _is_placeholder(resolved):
            loader.add(path, f"environment variable {name} still holds an example placeholder")
        return resolved

    if value.startswith("file:"):
        # ${VAR} in the path is expanded (file:${CREDENTIALS_DIRECTORY}/token); the
        # path itself is not secret, but what it points to is.
        missing = len(loader.issues)
        file_path = Path(_ENV_REF.sub(lambda m: env(m, secret=False), value[5:]))
        if len(loader.issues) > missing:
            return ""
        if "\x00" in str(file_path):
            # TOML allows "\u0000"; the OS does not, and pathlib raised ValueError
            # ("embedded null byte") past the OSError handler: a traceback, not this.
            loader.add(path, "the secret file path contains a NUL character")
            return ""
        if not file_path.is_absolute():
            file_path = loader.where(path)[0].base / file_path
        try:
            secret = file_path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            loader.add(path, f"cannot read secret file {str(file_path)!r}: {exc.strerror or exc}")
            return ""
        except UnicodeDecodeError:
            loader.add(path, f"secret file {str(file_path)!r} is not UTF-8 text")
            return ""
        if not secret:
            loader.add(path, f"secret file {str(file_path)!r} is empty")
        loader.note_secret(secret)
        if _is_placeholder(secret):
            loader.add(path, f"secret file {str(file_path)!r} still holds an example placeholder")
        return secret
    if "${" not in value:
        return value
    return _ENV_REF.sub(env, value)


def _add_validation_errors(
    loader: _Loader, exc: ValidationError, prefix: str, model: type[BaseModel]
) -> None:
    """Record pydantic errors as issues with path, reason and (non-secret) value."""
    for err in exc.errors():
        loc = prefix
        for part in err["loc"]:
            if isinstance(part, int):
                loc += f"[{part}]"
            else:
                loc = _child(loc, str(part))
        if loc in loader.flagged:
            continue  # e.g. "too short" after "environment variable X is not set"
        secret, parent = _walk(model, err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting"
            last = err["loc"][-1] if err["loc"] else ""
            if parent is not None and isinstance(last, str):
                close = difflib.get_close_matches(last, list(parent.model_fields), n=1)
                if close:
                    msg += f"; did you mean {close[0]!r}?"
            loader.add(loc, msg)
            continue
        if err["type"] == "missing":
            loader.add(loc, "required setting is missing")
            continue
        loader.add(loc, msg, got=err.get("input", _NOTHING), secret=secret)


def _validate_drivers(
    kind: str, sections: Iterable[Any], registry: dict[str, str], loader: _Loader
) -> list[Any]:
    """Validate each driver section with the model its type registers."""
    models = []
    names: dict[str, int] = {}
    for i, section in enumerate(sections):
        path = f"{kind}[{i}]"
        if not isinstance(section, dict):
            loader.add(path, "must be a table")
            continue
        try:
            head = DriverSection.model_validate(section)
        except ValidationError as exc:
            _add_validation_errors(loader, exc, path, DriverSection)
            continue
        try:
            cls = load_driver(registry, head.type)
        except KeyError:
            loader.add(
                f"{path}.type",
                f"unknown type {loader.show(f'{path}.type', head.type)}; "
                f"known: {', '.join(sorted(registry))}",
            )
            continue
        except ImportError as exc:
            loader.add(f"{path}.type", f"driver {head.type!r} cannot be loaded: {exc}")
            continue
        if head.name in names:
            first = loader.first_use(f"{kind}[{names[head.name]}]", path)
            loader.add(f"{path}.name", f"duplicate name {head.name!r} (first used by {first})")
        else:
            names[head.name] = i
        model: type[BaseModel] = cls.config_model
        try:
            models.append(model.model_validate(section))
        except ValidationError as exc:
            _add_validation_errors(loader, exc, path, model)
    return models


def _collect_secret_values(model: BaseModel, out: set[str]) -> None:
    """Add the values of every secret field of model (and nested models) to out."""
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if is_secret_field(info):
            values = value.values() if isinstance(value, dict) else [value]
            for v in values:
                if isinstance(v, SecretStr):
                    out.add(v.get_secret_value())
                elif isinstance(v, str):
                    out.add(v)
        elif isinstance(value, BaseModel):
            _collect_secret_values(value, out)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, BaseModel):
                    _collect_secret_values(item, out)


def _check_cross(loader: _Loader, config: Config, channels: list[Any], adapters: list[Any]) -> None:
    """Check what no single model can: references between sections and clashes."""
    adapter_names = sorted({a.name for a in adapters})
    seen: dict[str, int] = {}
    served: set[str] = set()
    for i, agent in enumerate(config.agents):
        if agent.id in seen:
            first = loader.first_use(f"agents[{seen[agent.id]}]", f"agents[{i}]")
            loader.add(
                f"agents[{i}].id", f"duplicate agent id {agent.id!r} (first used by {first})"
            )
        else:
            seen[agent.id] = i
        if agent.tool not in adapter_names:
            loader.add(
                f"agents[{i}].tool",
                f"no adapter named {loader.show(f'agents[{i}].tool', agent.tool)}; "
                f"configured: {', '.join(adapter_names) or 'none'}",
            )
        served.update(agent.queues)
    for label, queue in config.routing.queues.items():
        path = f"routing.queues.{label}"
        if label not in LABELS:
            loader.add(path, f"unknown label {label!r}; known: {', '.join(LABELS)}")
        elif config.agents and queue not in served:
            loader.add(
                path, f"no agent serves queue {queue!r}; served: {', '.join(sorted(served))}"
            )
    configured = sorted({a.name for a in adapters})
    for path, target in (
        ("classifier.crisis.target", config.classifier.crisis.target),
        ("scheduling.breach_target", config.scheduling.breach_target),
    ):
        if target is not None and target not in configured:
            loader.add(
                path, f"no adapter named {target!r}; configured: {', '.join(configured) or 'none'}"
            )

    for i, rule in enumerate(config.routing.rules):
        if config.agents and rule.queue not in served:
            loader.add(
                f"routing.rules[{i}].queue",
                f"no agent serves queue {rule.queue!r}; served: {', '.join(sorted(served))}",
            )
        for label in rule.labels:
            if label not in LABELS:
                loader.add(
                    f"routing.rules[{i}].labels",
                    f"unknown label {label!r}; known: {', '.join(LABELS)}",
                )
    for key in ("escalation_queue", "triage_queue"):
        special = getattr(config.routing, key)
        if special is not None and config.agents and special not in served:
            loader.add(
                f"routing.{key}",
                f"no agent serves queue {special!r}; served: {', '.join(sorted(served))}",
            )
    if config.daemon.shutdown_timeout < 1 and channels:
        loader.add("daemon.shutdown_timeout", "must leave at least 1 s to drain channels")
    if config.ops.enabled and not config.ops.allow_public and not _is_loopback(config.ops.host):
        loader.add(
            "ops.host",
            f"{config.ops.host!r} is not a loopback address: /metrics has no authentication "
            "and the admin API would be reachable from the network; set ops.allow_public = "
            "true if that is meant",
        )
    # Listeners that would fight over one address: fail here, not at bind time.
    listeners: dict[tuple[str, int], str] = {}
    if config.ops.enabled and config.ops.port:
        listeners[(config.ops.host, config.ops.port)] = "ops.port"
    for i, channel in enumerate(channels):
        host, port = getattr(channel, "host", None), getattr(channel, "port", None)
        if not isinstance(host, str) or not isinstance(port, int) or not port:
            continue
        other = listeners.get((host, port))
        if other is not None:
            loader.add(f"channels[{i}].port", f"{host}:{port} is already used by {other}")
        else:
            listeners[(host, port)] = f"channels[{i}].port"


def _is_loopback(host: str) -> bool:
    """Return whether host names only this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _build(raw: dict[str, Any], loader: _Loader, source: str) -> Config:
    """Resolve, validate and cross-check a merged document; raise ConfigError on any issue."""
    resolved = _resolve_refs(raw, "", loader)
    channel_sections = resolved.pop("channels", [])
    adapter_sections = resolved.pop("adapters", [])
    if not isinstance(channel_sections, list):
        loader.add("channels", "must be an array of tables ([[channels]])")
        channel_sections = []
    if not isinstance(adapter_sections, list):
        loader.add("adapters", "must be an array of tables ([[adapters]])")
        adapter_sections = []
    channels = _validate_drivers("channels", channel_sections, CHANNELS, loader)
    adapters = _validate_drivers("adapters", adapter_sections, ADAPTERS, loader)
    config: Config | None = None
    if "source" in resolved:
        loader.add("source", "unknown setting")
        resolved.pop("source")
    try:
        config = Config.model_validate({**resolved, "source": source})
    except ValidationError as exc:
        _add_validation_errors(loader, exc, "", Config)
    if config is not None:
        _check_cross(loader, config, channels, adapters)
    if loader.issues:
        raise ConfigError(source, loader.issues)
    assert config is not None
    secrets = set(loader.secrets)
    for model in [config, *channels, *adapters]:
        _collect_secret_values(model, secrets)
    for secret in secrets:
        register_secret(secret)
    result = config.model_copy(update={"channels": channels, "adapters": adapters})
    result._secret_values = frozenset(s for s in secrets if s and s != UNRESOLVED_STANDIN)
    result._unresolved = tuple(
        (loader.where(path)[1], ref) for path, ref in sorted(loader.unresolved.items())
    )
    return result


def build_config(
    raw: dict[str, Any], *, source: str, text: str = "", base: Path | None = None
) -> Config:
    """Validate a parsed TOML document (includes already merged) into a Config."""
    loader = _Loader(_Doc(source, text, base or Path.cwd()))
    for key in INCLUDABLE:
        items = raw.get(key)
        if isinstance(items, list):
            loader.origins[key] = [(loader.main, i) for i in range(len(items))]
    return _build(raw, loader, source)


def _parse(text: str, source: str, loader: _Loader) -> dict[str, Any] | None:
    """Parse TOML text, recording a syntax error with its line and column."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        m = _TOML_POS.search(message)
        line = int(m[1]) if m else None
        column = int(m[2]) if m else None
        if m is None and "at end of document" in message:
            # tomllib gives no line for an error at the very end (an unterminated string
            # or table header): name the last line, so every syntax error says where.
            line = max(1, len(text.splitlines()))
        loader.add_file(source, f"invalid TOML: {_TOML_POS.sub('', message)}", line, column)
        return None


def _read(path: Path, loader: _Loader) -> str | None:
    """Read a config file as UTF-8, recording why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        loader.add_file(str(path), f"cannot read: {exc.strerror or exc}")
    except UnicodeDecodeError as exc:
        loader.add_file(str(path), f"not valid UTF-8 at byte {exc.start}")
    return None


def _merge_includes(raw: dict[str, Any], main_path: Path | None, loader: _Loader) -> None:
    """Append the channels, adapters and agents of every daemon.include file to raw."""
    for key in INCLUDABLE:
        items = raw.get(key)
        if isinstance(items, list):
            loader.origins[key] = [(loader.main, i) for i in range(len(items))]
    daemon = raw.get("daemon")
    patterns = daemon.get("include", []) if isinstance(daemon, dict) else []
    if not isinstance(patterns, list):
        return  # reported by validation of daemon.include
    done: set[Path] = set() if main_path is None else {main_path.resolve()}
    for i, pattern in enumerate(patterns):
        if not isinstance(pattern, str):
            continue
        if "\x00" in pattern:
            # As for file: refs: glob would raise ValueError ("embedded null byte").
            loader.add(f"daemon.include[{i}]", "must not contain a NUL character")
            continue
        for name in sorted(glob.glob(os.path.join(loader.main.base, os.path.expandvars(pattern)))):
            inc = Path(name)
            if inc.resolve() in done or not inc.is_file():
                continue
            done.add(inc.resolve())
            text = _read(inc, loader)
            extra = None if text is None else _parse(text, str(inc), loader)
            if extra is None:
                continue
            doc = _Doc(str(inc), text or "", inc.parent)
            for key, value in extra.items():
                if key not in INCLUDABLE:
                    loader.issues.append(
                        ConfigIssue(
                            doc.source,
                            _locate(doc.text, key),
                            key,
                            "only channels, adapters and agents may be set in an included file",
                        )
                    )
                    continue
                if not isinstance(value, list):
                    loader.issues.append(
                        ConfigIssue(
                            doc.source,
                            _locate(doc.text, key),
                            key,
                            f"must be an array of tables ([[{key}]])",
                        )
                    )
                    continue
                target = raw.setdefault(key, [])
                if not isinstance(target, list):
                    continue  # the main file's own error is reported by validation
                loader.origins[key].extend((doc, i) for i in range(len(value)))
                target.extend(value)


def _load_text(
    text: str, *, source: str, base: Path, main_path: Path | None, secrets: bool = True
) -> Config:
    """Parse, merge includes, resolve and validate one config document."""
    loader = _Loader(_Doc(source, text, base), secrets=secrets)
    raw = _parse(text, source, loader)
    if raw is None:
        raise ConfigError(source, loader.issues)
    _merge_includes(raw, main_path, loader)
    return _build(raw, loader, source)


def loads_config(
    text: str,
    *,
    source: str = "<string>",
    base: str | os.PathLike[str] | None = None,
    secrets: bool = True,
) -> Config:
    """Load a config from TOML text; relative includes and file: refs resolve against base.

    `secrets=False` leaves secrets that cannot be resolved here unresolved (see _Loader).
    """
    return _load_text(
        text,
        source=source,
        base=Path(base) if base is not None else Path.cwd(),
        main_path=None,
        secrets=secrets,
    )


def load_config(path: str | os.PathLike[str] | None, *, secrets: bool = True) -> Config:
    """Load a config file (and its conf.d includes), or the embedded defaults when path is None.

    `secrets=False` leaves secrets that cannot be resolved here unresolved (see _Loader).
    """
    if path is None:
        text = resources.files("router").joinpath("default.toml").read_text(encoding="utf-8")
        return _load_text(text, source="<embedded defaults>", base=Path.cwd(), main_path=None)
    file_path = Path(path)
    loader = _Loader(_Doc(str(file_path), "", file_path.parent))
    content = _read(file_path, loader)
    if content is None:
        raise ConfigError(str(file_path), loader.issues)
    return _load_text(
        content,
        source=str(file_path),
        base=file_path.parent,
        main_path=file_path,
        secrets=secrets,
    )


# -- showing a config -----------------------------------------------------------------


def _dump_value(value: Any, mask: re.Pattern[str] | None) -> Any:
    """Convert one value to plain JSON data, masking secrets inside strings."""
    if isinstance(value, BaseModel):
        return _dump_model(value, mask)
    if isinstance(value, SecretStr | SecretBytes):
        return MASK
    if isinstance(value, dict):
        return {str(k): _dump_value(v, mask) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_dump_value(v, mask) for v in value]
    plain = to_jsonable_python(value)
    if isinstance(plain, str) and mask is not None:
        return mask.sub(MASK, plain)
    return plain


def _dump_model(model: BaseModel, mask: re.Pattern[str] | None) -> dict[str, Any]:
    """Dump a model field by field; secret fields become *** (None stays None: unset)."""
    out: dict[str, Any] = {}
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if is_secret_field(info) and value is not None:
            out[name] = {str(k): MASK for k in value} if isinstance(value, dict) else MASK
        else:
            out[name] = _dump_value(value, mask)
    return out


def redacted_dump(config: Config) -> dict[str, Any]:
    """Return the config as JSON-ready data with every secret replaced by ***."""
    values = sorted(
        (s for s in config._secret_values if len(s) >= MIN_SECRET_LENGTH), key=len, reverse=True
    )
    mask = re.compile("|".join(map(re.escape, values))) if values else None
    return _dump_model(config, mask)
