"""Load, resolve and validate the TOML configuration into typed, frozen models.

Every error names its place: `omnirouter.toml line 14: channels[2].port: must be
1–65535, got 99999`. Secrets are written as `${ENV_VAR}` or `file:/path` (systemd
credentials) and resolved before validation; they never appear in errors or logs.
Driver sections (channels, adapters) are validated against the model their module
exports, chosen by `type`, so a new driver brings its own schema.
"""

from __future__ import annotations

import glob
import os
import re
import tomllib
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from router.drivers import ADAPTERS, CHANNELS, load_driver

AGENT_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
NAME_RE = r"^[a-z0-9][a-z0-9_-]{0,39}$"
# Values copied from the example file and never edited: refuse to start on them
# rather than run with a password everyone knows (mautrix's ForbiddenDefault).
FORBIDDEN_PLACEHOLDERS = ("CHANGE_ME", "changeme", "<secret>")

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ConfigError(Exception):
    """A configuration that cannot be used; `errors` lists each problem with its path."""

    def __init__(self, source: str, errors: list[str]) -> None:
        super().__init__(f"{source}: " + "; ".join(errors))
        self.source = source
        self.errors = errors

    def render(self) -> str:
        """Return one error per line, ready for a terminal or the journal."""
        return "\n".join(f"{self.source} {e}" if e.startswith("line ") else f"{self.source}: {e}" for e in self.errors)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DaemonConfig(_Frozen):
    """Process-wide settings."""

    state_dir: Path = Field(default_factory=lambda: Path(os.environ.get("OMNIROUTER_STATE_DIR", "omnirouter-state")))
    shutdown_timeout: float = Field(20.0, gt=0, le=600)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Message bodies are customer data: they stay out of logs unless asked for.
    log_bodies: bool = False
    include: list[str] = Field(default_factory=list)  # globs of conf.d files, relative to this file


class StoreConfig(_Frozen):
    """Where messages are kept."""

    backend: Literal["sqlite"] = "sqlite"
    path: str = "omnirouter.db"  # relative to daemon.state_dir unless absolute
    synchronous: Literal["full", "normal"] = "full"
    raw_max_bytes: int = Field(256 * 1024, ge=0, le=64 * 1024 * 1024)


class OpsConfig(_Frozen):
    """The operations HTTP API: health, readiness, metrics, admin."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8081, ge=0, le=65535)
    # Unset: a random token is written to <state_dir>/admin-token on first start.
    admin_token: str | None = Field(None, min_length=16, json_schema_extra={"secret": True})


class ClassifierConfig(_Frozen):
    """Thresholds the classifier and escalation rules use."""

    amount_threshold: float = Field(5000.0, gt=0)
    vip_contacts: list[str] = Field(default_factory=list)
    repeat_contact_count: int = Field(3, ge=2, le=100)
    repeat_contact_window: float = Field(72 * 3600.0, gt=0)  # seconds


class SlaConfig(_Frozen):
    """Seconds to first response, by class; urgent (P0/P1) overrides the class."""

    inquiry: float = Field(300.0, gt=0)
    complaint: float = Field(120.0, gt=0)
    suggestion: float = Field(24 * 3600.0, gt=0)
    urgent: float = Field(30.0, gt=0)


class RoutingConfig(_Frozen):
    """Which queue a message joins."""

    # label -> queue; labels not listed go to "default".
    queues: dict[str, str] = Field(default_factory=dict)
    # P0/P1 messages go here when set (a supervisor queue), else to their label's queue.
    escalation_queue: str | None = None


class OutboxConfig(_Frozen):
    """How deliveries are retried before they become dead letters."""

    max_attempts: int = Field(8, ge=1, le=100)
    backoff_base: float = Field(0.5, gt=0, le=60)
    backoff_cap: float = Field(300.0, gt=0, le=86400)
    concurrency: int = Field(256, ge=1, le=10000)
    poll_interval: float = Field(5.0, gt=0, le=3600)


class AgentConfig(_Frozen):
    """One human on the roster."""

    id: str = Field(pattern=AGENT_ID_RE)
    name: str = ""
    capacity: int = Field(3, ge=1, le=1000)
    tool: str  # name of an adapter
    address: str = ""
    skills: list[str] = Field(default_factory=list)
    queues: list[str] = Field(default_factory=lambda: ["default"])
    present: bool = True


class DriverSection(_Frozen):
    """What every channel/adapter section has before its own model takes over."""

    model_config = ConfigDict(frozen=True, extra="allow")
    type: str
    name: str = Field(pattern=NAME_RE)


class Config(_Frozen):
    """The whole validated configuration."""

    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    ops: OpsConfig = Field(default_factory=OpsConfig)
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    sla: SlaConfig = Field(default_factory=SlaConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    channels: list[Any] = Field(default_factory=list)  # driver models, validated below
    adapters: list[Any] = Field(default_factory=list)
    agents: list[AgentConfig] = Field(default_factory=list)
    source: str = "<embedded defaults>"

    def db_path(self) -> Path:
        """Return the SQLite path, resolved against the state directory."""
        p = Path(self.store.path)
        return p if p.is_absolute() else self.daemon.state_dir / p

    def queue_for(self, label: str, severity: str) -> str:
        """Return the queue a message of this label and severity joins."""
        if severity in ("P0", "P1") and self.routing.escalation_queue:
            return self.routing.escalation_queue
        return self.routing.queues.get(label, "default")


def _resolve_refs(value: Any, path: str, errors: list[str], base: Path) -> Any:
    """Replace ${ENV} and file: references in every string, recursively."""
    if isinstance(value, dict):
        return {k: _resolve_refs(v, f"{path}.{k}" if path else k, errors, base) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_refs(v, f"{path}[{i}]", errors, base) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value
    if value in FORBIDDEN_PLACEHOLDERS:
        errors.append(f"{path}: still holds the example placeholder {value!r}; set a real value")
        return value
    if value.startswith("file:"):
        file_path = Path(os.path.expandvars(value[5:]))
        if not file_path.is_absolute():
            file_path = base / file_path
        try:
            return file_path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            errors.append(f"{path}: cannot read secret file {str(file_path)!r}: {exc.strerror}")
            return ""

    def env(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in os.environ:
            errors.append(f"{path}: environment variable {name} is not set")
            return ""
        return os.environ[name]

    return _ENV_REF.sub(env, value)


def _locate(text: str, loc: str) -> int | None:
    """Best-effort line number of a dotted config path like `channels[2].port` in TOML text."""
    if not text:
        return None
    lines = text.splitlines()
    parts = re.findall(r"([A-Za-z0-9_-]+)(?:\[(\d+)\])?", loc)
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
        key = re.compile(rf"^\s*{re.escape(name)}\s*=")
        sub = re.compile(rf"^\s*\[\s*{re.escape(f'{table}.{name}' if table else name)}\s*\]")
        for i in range(start, len(lines)):
            if key.match(lines[i]) or sub.match(lines[i]):
                start, found = i + 1, i + 1
                break
            # Stop at the next array-of-tables entry of the same kind: the key is not in ours.
            if i > start and table and re.match(rf"^\s*\[\[\s*{re.escape(table)}\s*\]\]", lines[i]):
                break
        table = f"{table}.{name}" if table else name
    return found


def _format_pydantic(exc: ValidationError, prefix: str, raw: dict[str, Any], text: str) -> list[str]:
    """Turn pydantic errors into `line N: path: message, got value` strings."""
    out = []
    for err in exc.errors():
        loc = prefix
        for part in err["loc"]:
            if isinstance(part, int):
                loc += f"[{part}]"
            else:
                loc = f"{loc}.{part}" if loc else str(part)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting"
        got = ""
        if "input" in err and err["type"] not in ("missing", "extra_forbidden"):
            value = err["input"]
            secret = any(w in loc.lower() for w in ("secret", "password", "token", "key"))
            if not isinstance(value, dict | list):
                got = ", got [redacted]" if secret else f", got {value!r}"
        line = _locate(text, loc)
        where = f"line {line}: " if line else ""
        out.append(f"{where}{loc}: {msg}{got}")
    return out


def _validate_drivers(
    kind: str, sections: Iterable[Any], registry: dict[str, str], errors: list[str], text: str
) -> list[Any]:
    """Validate each driver section with the model its type registers."""
    models = []
    names: set[str] = set()
    for i, section in enumerate(sections):
        path = f"{kind}[{i}]"
        if not isinstance(section, dict):
            errors.append(f"{path}: must be a table")
            continue
        try:
            head = DriverSection.model_validate(section)
        except ValidationError as exc:
            errors.extend(_format_pydantic(exc, path, section, text))
            continue
        try:
            cls = load_driver(registry, head.type)
        except KeyError:
            errors.append(f"{path}.type: unknown type {head.type!r}; known: {', '.join(sorted(registry))}")
            continue
        except ImportError as exc:
            errors.append(f"{path}.type: driver {head.type!r} cannot be loaded: {exc}")
            continue
        if head.name in names:
            errors.append(f"{path}.name: duplicate name {head.name!r}")
        names.add(head.name)
        try:
            models.append(cls.config_model.model_validate(section))
        except ValidationError as exc:
            errors.extend(_format_pydantic(exc, path, section, text))
    return models


def build_config(raw: dict[str, Any], *, source: str, text: str = "", base: Path | None = None) -> Config:
    """Validate a parsed TOML document (plus includes already merged) into a Config."""
    errors: list[str] = []
    resolved = _resolve_refs(raw, "", errors, base or Path.cwd())
    channel_sections = resolved.pop("channels", [])
    adapter_sections = resolved.pop("adapters", [])
    if not isinstance(channel_sections, list):
        errors.append("channels: must be an array of tables ([[channels]])")
        channel_sections = []
    if not isinstance(adapter_sections, list):
        errors.append("adapters: must be an array of tables ([[adapters]])")
        adapter_sections = []
    channels = _validate_drivers("channels", channel_sections, CHANNELS, errors, text)
    adapters = _validate_drivers("adapters", adapter_sections, ADAPTERS, errors, text)
    config: Config | None = None
    try:
        config = Config.model_validate({**resolved, "source": source})
    except ValidationError as exc:
        errors.extend(_format_pydantic(exc, "", resolved, text))
    if config is not None:
        adapter_names = {a.name for a in adapters}
        seen: set[str] = set()
        for i, agent in enumerate(config.agents):
            if agent.id in seen:
                errors.append(f"agents[{i}].id: duplicate agent id {agent.id!r}")
            seen.add(agent.id)
            if agent.tool not in adapter_names:
                known = ", ".join(sorted(adapter_names)) or "none configured"
                errors.append(f"agents[{i}].tool: no adapter named {agent.tool!r} (adapters: {known})")
        if config.daemon.shutdown_timeout < 1 and channels:
            errors.append("daemon.shutdown_timeout: must leave at least 1 s to drain channels")
    if errors:
        raise ConfigError(source, errors)
    assert config is not None
    return config.model_copy(update={"channels": channels, "adapters": adapters})


def _read_toml(path: Path) -> tuple[dict[str, Any], str]:
    """Read and parse one TOML file, turning every failure into a ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), [f"not valid UTF-8 at byte {exc.start}"]) from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [f"not valid TOML: {exc}"]) from None


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Load a config file (and its conf.d includes), or the embedded defaults when path is None."""
    if path is None:
        text = resources.files("router").joinpath("default.toml").read_text(encoding="utf-8")
        return build_config(tomllib.loads(text), source="<embedded defaults>", text=text)
    file_path = Path(path)
    raw, text = _read_toml(file_path)
    includes = raw.get("daemon", {}).get("include", [])
    for pattern in includes if isinstance(includes, list) else []:
        for inc in sorted(glob.glob(str(file_path.parent / pattern))):
            extra, _ = _read_toml(Path(inc))
            for key in ("channels", "adapters", "agents"):
                if key in extra:
                    raw.setdefault(key, []).extend(extra[key])
            unknown = set(extra) - {"channels", "adapters", "agents"}
            if unknown:
                raise ConfigError(inc, [f"{k}: only channels, adapters and agents may be set in an included file" for k in sorted(unknown)])
    return build_config(raw, source=str(file_path), text=text, base=file_path.parent)
