"""Structured logging: one JSON object per line under systemd, pretty output on a TTY.

Call `configure_logging` once in the synchronous preinit (CLI → config → logging).
Calling it again (tests) takes effect at once, even for loggers that are already
cached (`cache_logger_on_first_use`), because every setting lives in one
module-level `_state` that the processors and the writer read on each event. On
SIGHUP the daemon calls `set_verbosity`, which changes only the level and body
logging: the stream and format chosen at start (`--log-format`) stay.

JSON lines start with `timestamp` (ISO 8601, UTC, `Z`), `level`, `logger`, `event`,
then bound and contextvars fields; an exception becomes a string field `exception`.
orjson serialises when it is installed, else the stdlib json module.

Every event is redacted before it is written:

* values of keys named like a credential (`secret`, `token`, `password`,
  `authorization`, `api_key`, `signature`, …), nested dicts included, become `"***"`;
* customer data under `text`, `body`, `subject`, `raw` becomes
  `"<redacted N chars>"` unless `log_bodies=True`;
* every string registered with `register_secret` (config loading registers each
  value resolved from `${ENV}` or `file:` and each secret field) is replaced by
  `***` in the rendered line, so it is masked wherever it appears: inside messages,
  nested values and exception text.

stdlib `logging` (aiohttp, aiomqtt, asyncio) goes through the same redaction and
renderer at WARNING and above, so the journal sees one format.
"""

from __future__ import annotations

import json as _json
import logging
import re
import sys
import threading
from asyncio import AbstractEventLoop
from asyncio import _get_running_loop as _running_loop
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from datetime import time as dtime
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

__all__ = [
    "BODY_KEYS",
    "MIN_SECRET_LENGTH",
    "SECRET_KEY_RE",
    "clear_secrets",
    "configure_logging",
    "get_logger",
    "mask_secrets",
    "redact_event",
    "register_secret",
    "set_verbosity",
]

LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}
# Key names whose values are credentials wherever they appear (also nested in dicts).
SECRET_KEY_RE = re.compile(
    r"secret|token|passw(?:or)?d|authorization|api[_-]?key|signature|cookie|credential",
    re.IGNORECASE,
)
# Keys that carry customer content: logged only as their size unless log_bodies.
BODY_KEYS = frozenset({"text", "body", "subject", "raw"})
# Shorter registered secrets are ignored for substring masking: masking "abc" inside
# every log line would make logs unreadable, and such a value is no real secret anyway.
MIN_SECRET_LENGTH = 4
MASK = "***"
DEFAULT_LOGGER_NAME = "omnirouter"


def _json_default(obj: Any) -> Any:
    """Serialise what JSON lacks: datetimes as ISO 8601, anything else as str()."""
    if isinstance(obj, datetime | date | dtime):
        return obj.isoformat()
    return str(obj)


def _stdlib_dumps(obj: Any) -> str:
    """Serialise one event to a compact JSON string (stdlib)."""
    return _json.dumps(obj, default=_json_default, ensure_ascii=False, separators=(",", ":"))


try:  # orjson is optional: used when the environment already has it (several times faster).
    import orjson

    def _orjson_dumps(obj: Any) -> str:
        """Serialise one event to a compact JSON string (orjson)."""
        return orjson.dumps(obj, default=_json_default, option=orjson.OPT_NON_STR_KEYS).decode()

    _dumps = _orjson_dumps
except ImportError:  # pragma: no cover - depends on the environment
    _dumps = _stdlib_dumps


@dataclass(slots=True)
class _State:
    """Everything configure_logging sets; read on every event so reconfiguring is instant."""

    min_level: int = logging.INFO
    json: bool = True
    log_bodies: bool = False
    stream: TextIO = field(default_factory=lambda: sys.stdout)
    lock: threading.Lock = field(default_factory=threading.Lock)
    console: Callable[[WrappedLogger, str, EventDict], str] | None = None
    secrets: set[str] = field(default_factory=set)
    # The forms a secret takes in rendered output, longest first so that a secret
    # containing another is masked whole: JSON-escaped for JSON lines; raw and
    # repr()-escaped for console lines and mask_secrets.
    json_forms: tuple[str, ...] = ()
    text_forms: tuple[str, ...] = ()
    # Flush once per event-loop iteration instead of once per line (see _write_line).
    defer_flush: bool = False
    flush_loop: AbstractEventLoop | None = None  # the loop a flush is scheduled on


_state = _State()


# -- secrets --------------------------------------------------------------------------


def register_secret(value: str) -> None:
    """Mask this exact string wherever it appears in log output from now on."""
    if not isinstance(value, str) or len(value) < MIN_SECRET_LENGTH or value in _state.secrets:
        return
    _state.secrets.add(value)
    _compile_secrets()


def clear_secrets() -> None:
    """Forget every registered secret (tests; a reload registers the new set)."""
    _state.secrets.clear()
    _compile_secrets()


def _compile_secrets() -> None:
    """Precompute the output forms of every secret, longest first."""
    json_forms: set[str] = set()
    text_forms: set[str] = set()
    for secret in _state.secrets:
        json_forms.add(_stdlib_dumps(secret)[1:-1])
        json_forms.add(_json.dumps(secret)[1:-1])  # ASCII-escaped, as some encoders write it
        text_forms.add(secret)
        text_forms.add(repr(secret)[1:-1])
    _state.json_forms = tuple(sorted(json_forms, key=len, reverse=True))
    _state.text_forms = tuple(sorted(text_forms | json_forms, key=len, reverse=True))


def _mask(text: str, forms: tuple[str, ...]) -> str:
    """Replace each of forms found in text by ***."""
    for form in forms:
        if form in text:  # a C-speed substring scan; replace only on a hit
            text = text.replace(form, MASK)
    return text


def mask_secrets(text: str) -> str:
    """Return text with every registered secret replaced by ***."""
    return _mask(text, _state.text_forms)


# -- redaction ------------------------------------------------------------------------

_PLAIN, _SECRET, _BODY = 0, 1, 2
_CONTAINERS = (dict, list, tuple)  # a tuple: isinstance checks it faster than a union
_SCALARS = frozenset({str, int, float, bool, type(None)})
# Key name -> kind, memoised: events reuse a small set of keys.
_key_kinds: dict[str, int] = {}


def _key_kind(key: str) -> int:
    """Classify a key as plain, credential or customer body."""
    kind = _key_kinds.get(key)
    if kind is None:
        kind = _SECRET if SECRET_KEY_RE.search(key) else _BODY if key in BODY_KEYS else _PLAIN
        if len(_key_kinds) < 4096:  # bounded: keys are code, but be safe
            _key_kinds[key] = kind
    return kind


def _body_placeholder(value: Any) -> Any:
    """Describe customer content by its size only."""
    if value is None:
        return None
    if isinstance(value, str):
        return f"<redacted {len(value)} chars>"
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<redacted {len(value)} bytes>"
    return "<redacted>"


def _redact_container(value: Any, log_bodies: bool, depth: int) -> Any:
    """Redact credential and body keys inside nested dicts and lists (bounded depth)."""
    if depth >= 4:
        return value
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            kind = _key_kind(k) if isinstance(k, str) else _PLAIN
            if kind == _SECRET and v is not None:
                out[k] = MASK
            elif kind == _BODY and not log_bodies:
                out[k] = _body_placeholder(v)
            elif isinstance(v, _CONTAINERS):
                out[k] = _redact_container(v, log_bodies, depth + 1)
            else:
                out[k] = v
        return out
    return [
        _redact_container(v, log_bodies, depth + 1) if isinstance(v, _CONTAINERS) else v
        for v in value
    ]


def redact_event(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Mask credential keys and customer bodies in an event dict (processor).

    Registered secret values are masked later, in the rendered line, which also
    covers exception text and values nested anywhere.
    """
    log_bodies = _state.log_bodies
    kinds = _key_kinds
    scalars = _SCALARS
    for key, value in event_dict.items():
        kind = kinds.get(key)
        if kind is None:
            kind = _key_kind(key)
        if kind == _PLAIN:
            # Most values are plain scalars: one set lookup instead of an isinstance.
            if (
                value.__class__ not in scalars
                and isinstance(value, _CONTAINERS)
                and key != "exc_info"
            ):
                event_dict[key] = _redact_container(value, log_bodies, 0)
        elif kind == _SECRET:
            if value is not None:
                event_dict[key] = MASK
        elif not log_bodies:
            event_dict[key] = _body_placeholder(value)
    return event_dict


# -- pipeline -------------------------------------------------------------------------


def _filter_level(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Drop events below the configured level (first processor: cheap early exit)."""
    if LEVELS.get(method_name, logging.INFO) < _state.min_level:
        raise structlog.DropEvent
    return event_dict


def _add_logger_name(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Add `logger`: the name given to get_logger, unless the event already has one."""
    if "logger" not in event_dict:
        event_dict["logger"] = getattr(logger, "name", None) or DEFAULT_LOGGER_NAME
    return event_dict


_timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp")
_format_exc = structlog.processors.format_exc_info
_FIRST_KEYS = ("timestamp", "level", "logger", "event")


def _render_json(event_dict: EventDict) -> str:
    """Render one event as a JSON object with the fixed keys first."""
    ordered = {k: event_dict.pop(k) for k in _FIRST_KEYS if k in event_dict}
    ordered.update(event_dict)
    return _dumps(ordered)


def _render(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> str:
    """Redact, render as JSON or for a console, then mask registered secrets (last processor)."""
    state = _state
    if state.json or state.console is None:
        # Exceptions become a plain string field, masked with the rest of the line.
        event_dict = _format_exc(logger, method_name, event_dict)
        line = _render_json(redact_event(logger, method_name, event_dict))
        return _mask(line, state.json_forms) if state.json_forms else line
    line = state.console(logger, method_name, redact_event(logger, method_name, event_dict))
    return _mask(line, state.text_forms) if state.text_forms else line


PROCESSORS: list[Callable[[WrappedLogger, str, EventDict], Any]] = [
    _filter_level,
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    _add_logger_name,
    _timestamper,
    structlog.processors.StackInfoRenderer(),
    _render,
]


def _write_line(line: str) -> None:
    """Write one line; flush it now, or at the end of the event loop's current iteration.

    journald reads a pipe, which is block-buffered, so lines must be flushed. A flush is
    a write(2) that also gives up the GIL (which the SQLite writer thread then takes,
    and the loop has to win back): on an OS stream, lines written by the event loop
    thread are flushed together by a callback in the loop's next iteration, a fraction
    of a millisecond later. Lines from any other thread, or outside a loop, are flushed
    at once (and take along whatever is buffered).
    """
    state = _state
    with state.lock:
        state.stream.write(line + "\n")
        if state.defer_flush:
            loop = _running_loop()
            if loop is not None:
                if state.flush_loop is not loop:  # no flush scheduled on this loop yet
                    state.flush_loop = loop
                    loop.call_soon(flush_log)
                return
        state.stream.flush()


def flush_log() -> None:
    """Write out every line logged so far, including those whose flush was deferred.

    The loop calls it at the end of an iteration in which lines were logged; whoever is
    about to tell another process that something happened (sd_notify's READY=1) calls it
    first, so that the lines logged before are readable when the news arrives.
    """
    state = _state
    with state.lock:
        state.flush_loop = None
        try:
            state.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: the next line reports it
            pass


def _is_os_stream(stream: TextIO) -> bool:
    """Whether stream writes to a file descriptor (a pipe, file or socket), not memory."""
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return False
    return True


class LineLogger:
    """Write each rendered event as one line to the configured stream (see _write_line).

    Like structlog's PrintLogger, but the stream is looked up per write so that a
    cached logger follows `configure_logging(stream=…)`.
    """

    __slots__ = ("name",)

    def __init__(self, name: str | None = None) -> None:
        """Remember the logger name (shown as the `logger` key)."""
        self.name = name or DEFAULT_LOGGER_NAME

    def msg(self, message: str) -> None:
        """Write one rendered event as a line."""
        _write_line(message)

    log = debug = info = warn = warning = error = err = critical = fatal = exception = msg


def _logger_factory(*args: Any) -> LineLogger:
    """Build the wrapped logger; the first positional argument of get_logger is its name."""
    return LineLogger(str(args[0]) if args and args[0] else None)


class _StdlibHandler(logging.Handler):
    """Send stdlib log records through the same redaction and renderer."""

    def emit(self, record: logging.LogRecord) -> None:
        """Turn a LogRecord into an event dict, render and write it."""
        try:
            event: EventDict = {
                "event": record.getMessage(),
                "level": record.levelname.lower(),
                "logger": record.name,
            }
            if record.exc_info:
                event["exc_info"] = record.exc_info
            # The record's own time, in the format TimeStamper gives structlog events.
            when = datetime.fromtimestamp(record.created, UTC).isoformat()
            event["timestamp"] = when.replace("+00:00", "Z")
            _write_line(_render(None, record.levelname.lower(), event))
        except Exception:  # logging must never take the daemon down
            self.handleError(record)


_handler: _StdlibHandler | None = None


def configure_logging(
    level: str = "info",
    *,
    json: bool | None = None,
    stream: TextIO | None = None,
    log_bodies: bool = False,
    cache: bool = True,
) -> None:
    """Configure structlog and stdlib logging: JSON lines unless the stream is a TTY.

    `cache=False` is for tests that run daemon code in process: a logger cached under
    this configuration would keep it, and blind later tests' `capture_logs`.
    """
    global _handler
    min_level = _level_number(level)
    out = stream if stream is not None else sys.stdout
    isatty = getattr(out, "isatty", None)
    tty = bool(isatty()) if callable(isatty) else False
    use_json = (not tty) if json is None else json

    with _state.lock:
        if _state.stream is not out:
            try:
                _state.stream.flush()  # lines whose flush was deferred go to the old stream
            except (OSError, ValueError):
                pass
        _state.min_level = min_level
        _state.json = use_json
        _state.log_bodies = log_bodies
        _state.stream = out
        _state.defer_flush = not tty and _is_os_stream(out)
        _state.flush_loop = None
        # plain_traceback: rich's formatter (the default when installed) prints locals.
        _state.console = (
            None
            if use_json
            else structlog.dev.ConsoleRenderer(
                colors=tty, exception_formatter=structlog.dev.plain_traceback
            )
        )

    structlog.configure(
        processors=PROCESSORS,
        # Level filtering is done by _filter_level so a reconfigure reaches cached loggers.
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        context_class=dict,
        logger_factory=_logger_factory,
        cache_logger_on_first_use=cache,
    )

    # Third-party libraries log through stdlib: same pipeline, WARNING and above only.
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = _StdlibHandler(level=max(logging.WARNING, min_level))
    root.addHandler(_handler)
    if root.level == logging.NOTSET or root.level > _handler.level:
        root.setLevel(_handler.level)


def set_verbosity(level: str, *, log_bodies: bool) -> None:
    """Change the level and body logging in place (a reload); stream and format stay."""
    min_level = _level_number(level)
    with _state.lock:
        _state.min_level = min_level
        _state.log_bodies = log_bodies
    if _handler is not None:
        # Third-party libraries: WARNING and above, or less if the level asks for less.
        _handler.setLevel(max(logging.WARNING, min_level))
        root = logging.getLogger()
        if root.level == logging.NOTSET or root.level > _handler.level:
            root.setLevel(_handler.level)


def _level_number(level: str) -> int:
    """Return the stdlib number of a level name; raise ValueError for an unknown one."""
    try:
        return LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; known: {', '.join(LEVELS)}") from None


def get_logger(name: str | None = None, **bound: Any) -> Any:
    """Return a structlog logger named `name` (the `logger` key) with `bound` fields."""
    return structlog.get_logger(name, **bound) if name else structlog.get_logger(**bound)
