"""What the SMS channels share: numbers, segments, opt-outs, the webhook listener, the send path.

A gateway (Twilio, Kannel, a cloud provider) calls our webhook for each text a
customer sends. The shared intake is

    verify (signature or secret) → parse → E.164 → opt-out keyword? → thread → sink = commit
        → answer 2xx

so the gateway hears "delivered" only after the commit; a sink failure is a 503 and the
gateway's retry carries the same message id, which the store's (channel, external_id)
uniqueness turns into a no-op. A whole-message opt-out keyword (STOP, 退订, ...) is
recorded in the channel's state and not routed as a ticket; START lifts it. Sends
(acknowledgements, agent replies) check the opt-out first and raise PermanentError for
an opted-out number, so the outbox dead-letters them with that reason.

Per-channel state lives under `<state_dir>/sms/<name>/`: `threads.db` (idle threading,
channels.conversations.IdleThreads) and `sms.db` (opt-outs, keyword messages seen, and
the last known status of each sent message).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import re
import sqlite3
import threading
import time
import unicodedata
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

import phonenumbers
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from channels.conversations import IdleThreads, ShortAckSettings, ack_text
from router.contacts import phone_identifier
from router.drivers import (
    NAME_RE,
    ChannelBase,
    DriverContext,
    DriverState,
    MessageSink,
    Outbound,
    PermanentError,
    Receipt,
    TransientError,
)
from router.model import Attachment, InboundMessage, utcnow

# -- segments -----------------------------------------------------------------------

# 3GPP TS 23.038 default alphabet (ESC excluded) and its extension table, whose
# characters cost two septets (ESC + char).
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = frozenset("^{}\\[~]|€\f")
_GSM7 = GSM7_BASIC | GSM7_EXTENSION
# Characters per segment: one whole message, or each part of a concatenated one (the
# user data header takes the rest).
GSM7_SINGLE, GSM7_MULTI = 160, 153
UCS2_SINGLE, UCS2_MULTI = 70, 67


def is_gsm7(text: str) -> bool:
    """Tell whether text fits the GSM 7-bit alphabet (else it goes as UCS-2)."""
    return all(c in _GSM7 for c in text)


def split_segments(text: str) -> tuple[str, list[str]]:
    """Return the encoding ("gsm7" | "ucs2") and text cut as a gateway cuts it into segments.

    A two-septet extension character or a UTF-16 surrogate pair is never split across
    segments, as handsets require.
    """
    if is_gsm7(text):
        encoding, single, multi = "gsm7", GSM7_SINGLE, GSM7_MULTI
        costs = [2 if c in GSM7_EXTENSION else 1 for c in text]
    else:
        encoding, single, multi = "ucs2", UCS2_SINGLE, UCS2_MULTI
        costs = [2 if ord(c) > 0xFFFF else 1 for c in text]
    if not text:
        return encoding, []
    if sum(costs) <= single:
        return encoding, [text]
    parts: list[str] = []
    start = used = 0
    for i, cost in enumerate(costs):
        if used + cost > multi:
            parts.append(text[start:i])
            start, used = i, 0
        used += cost
    parts.append(text[start:])
    return encoding, parts


def segment_count(text: str) -> int:
    """Return how many segments text takes."""
    return len(split_segments(text)[1])


def fit_segments(text: str, cap: int, notice: str) -> tuple[str, bool]:
    """Return text cut to at most cap segments, ending with notice when cut; and whether it was.

    A GSM-7 text keeps GSM-7: a notice outside the alphabet (…) becomes "..." there,
    since one such character would switch the whole message to UCS-2 (70, not 160).
    """
    if segment_count(text) <= cap:
        return text, False
    if is_gsm7(text) and not is_gsm7(notice):
        notice = "..."
    lo, hi = 0, len(text)  # the longest prefix that fits, by bisection (cost is monotone)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if segment_count(text[:mid].rstrip() + notice) <= cap:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + notice, True


# -- numbers and text -----------------------------------------------------------------


_NUMBER_CHARS = re.compile(r"\+?[0-9 ()./-]+")


@functools.lru_cache(maxsize=4096)
def e164(raw: str, region: str) -> str:
    """Return raw as an E.164 number (+CC…); raise ValueError saying why it is not one."""
    raw = raw.strip()
    # Digits and the usual separators only: the library would also pull a number out of
    # "whatsapp:+1…" or a vanity "1-800-FLOWERS", which are not SMS senders.
    if not raw or len(raw) > 40 or not _NUMBER_CHARS.fullmatch(raw):
        raise ValueError("not a phone number")
    try:
        number = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"not a phone number ({exc._msg})") from None
    if not phonenumbers.is_possible_number(number):
        raise ValueError("not a possible phone number")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def number_ref(number: str) -> str:
    """Return a short digest of a phone number for logs (numbers are personal data)."""
    return hashlib.sha256(number.encode()).hexdigest()[:12]


# C0 controls except TAB and LF (CR is folded into LF first), plus DEL and C1.
_TEXT_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SURROGATES = re.compile("[\ud800-\udfff]")
_KEYWORD_TRIM = " \t\n.!。！"


def clean_text(text: str) -> str:
    """Return message text with CRLF as LF, no control characters or lone surrogates, NFC."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _SURROGATES.sub("\ufffd", _TEXT_CONTROLS.sub("", text))
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    return text.strip()


def keyword_of(text: str) -> str:
    """Return the whole message folded for keyword matching ("Stop." → "stop")."""
    return unicodedata.normalize("NFKC", text).strip(_KEYWORD_TRIM).casefold()


def iso(ts: float) -> str:
    """Return a Unix time as ISO 8601 UTC, seconds precision."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# -- settings -------------------------------------------------------------------------


class Frozen(BaseModel):
    """Base of the SMS config models: frozen, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class SmsSettings(Frozen):
    """What every SMS channel has: the listener, numbers, limits, keywords, threading, acks."""

    name: str = Field(pattern=NAME_RE)
    host: str = Field(default="127.0.0.1", min_length=1, max_length=255)
    port: int = Field(default=8092, ge=0, le=65535)  # 0: an ephemeral port (tests)
    # Region for numbers written without +CC (ISO 3166 alpha-2, e.g. "CN", "DE").
    default_region: str = Field(default="US", pattern=r"^[A-Z]{2}$")
    # A contact's texts join one conversation until they are quiet this many seconds.
    thread_window: float = Field(default=86400.0, gt=0, le=30 * 86400)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    max_text_chars: int = Field(default=5000, ge=1, le=100_000)
    # Outbound texts longer than this many segments are cut, ending with the notice.
    max_segments: int = Field(default=10, ge=1, le=50)
    truncation_notice: str = Field(default="…", max_length=40)
    # Whole-message keywords, any case: opt out of further texts / opt back in.
    opt_out_keywords: tuple[str, ...] = Field(
        default=("STOP", "UNSUBSCRIBE", "退订", "TD"), min_length=1, max_length=50
    )
    opt_in_keywords: tuple[str, ...] = Field(default=("START",), max_length=50)
    send_timeout: float = Field(default=15.0, gt=0, le=300)
    ack: ShortAckSettings = Field(default_factory=lambda: ShortAckSettings())

    @field_validator("default_region")
    @classmethod
    def _region(cls, value: str) -> str:
        """Refuse a region the phone number library does not know."""
        if value not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"unknown region {value!r} (ISO 3166 alpha-2, e.g. CN, DE, US)")
        return value

    @field_validator("opt_out_keywords", "opt_in_keywords")
    @classmethod
    def _keywords(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        """Refuse blank keywords."""
        if any(not keyword_of(k) for k in value):
            raise ValueError("keywords must not be blank")
        return value


# -- state on disk --------------------------------------------------------------------

# Later statuses win over earlier ones when callbacks arrive out of order.
_STATUS_RANK = {
    "accepted": 0,
    "scheduled": 0,
    "queued": 1,
    "sending": 2,
    "sent": 3,
    "undelivered": 4,
    "failed": 4,
    "delivered": 5,
    "read": 6,
}
# Sends kept for status callbacks and retry dedupe; older rows are dropped at start.
SENT_RETENTION = 30 * 86400.0


@dataclass(frozen=True, slots=True)
class OptOut:
    """A number that asked for no more texts."""

    at: float
    keyword: str
    source: str  # "keyword" (the customer texted it) | "gateway" (the carrier refused)


class SmsState:
    """The channel's own small SQLite file: opt-outs, keyword messages seen, sent statuses."""

    def __init__(self, path: Path) -> None:
        """Open (or create) the file."""
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # An opt-out is a legal promise: it is on disk before the gateway hears 200.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS opt_outs("
            " number TEXT PRIMARY KEY, opted_out INTEGER NOT NULL, at REAL NOT NULL,"
            " keyword TEXT NOT NULL, source TEXT NOT NULL);"
            "CREATE TABLE IF NOT EXISTS keywords_seen("
            " external_id TEXT PRIMARY KEY, at REAL NOT NULL);"
            "CREATE TABLE IF NOT EXISTS sent("
            " outbound_id TEXT PRIMARY KEY, sid TEXT NOT NULL, number TEXT NOT NULL,"
            " status TEXT NOT NULL, error_code TEXT NOT NULL DEFAULT '',"
            " segments INTEGER NOT NULL, updated_at REAL NOT NULL);"
            "CREATE INDEX IF NOT EXISTS sent_sid ON sent(sid);"
        )

    def prune(self, before: float) -> None:
        """Drop sent records and keyword ids older than `before`."""
        with self._lock:
            self._db.execute("DELETE FROM sent WHERE updated_at < ?", (before,))
            self._db.execute("DELETE FROM keywords_seen WHERE at < ?", (before,))

    def keyword(
        self, external_id: str, number: str, opted_out: bool, at: float, keyword: str
    ) -> bool:
        """Record an opt-out/opt-in keyword message once; return False for a replay."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seen = self._db.execute(
                    "INSERT OR IGNORE INTO keywords_seen(external_id, at) VALUES (?,?)",
                    (external_id, at),
                ).rowcount
                if seen:
                    self._set(number, opted_out, at, keyword, "keyword")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return bool(seen)

    def gateway_opt_out(self, number: str, at: float, reason: str) -> None:
        """Record that the gateway reports the number unsubscribed (e.g. Twilio 21610)."""
        with self._lock:
            self._set(number, True, at, reason, "gateway")

    def _set(self, number: str, opted_out: bool, at: float, keyword: str, source: str) -> None:
        self._db.execute(
            "INSERT INTO opt_outs(number, opted_out, at, keyword, source) VALUES (?,?,?,?,?) "
            "ON CONFLICT(number) DO UPDATE SET opted_out=excluded.opted_out, at=excluded.at, "
            "keyword=excluded.keyword, source=excluded.source WHERE excluded.at >= opt_outs.at",
            (number, int(opted_out), at, keyword, source),
        )

    def opted_out(self, number: str) -> OptOut | None:
        """Return the number's opt-out, or None when it may be texted."""
        with self._lock:
            row = self._db.execute(
                "SELECT at, keyword, source FROM opt_outs WHERE number=? AND opted_out=1",
                (number,),
            ).fetchone()
        return None if row is None else OptOut(float(row[0]), str(row[1]), str(row[2]))

    def record_sent(
        self, outbound_id: str, sid: str, number: str, status: str, segments: int, at: float
    ) -> None:
        """Remember a send the gateway accepted (its id and first status)."""
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO sent(outbound_id, sid, number, status, segments, updated_at)"
                " VALUES (?,?,?,?,?,?)",
                (outbound_id, sid, number, status, segments, at),
            )

    def sent_sid(self, outbound_id: str) -> str | None:
        """Return the gateway's id of an outbound message already accepted, else None."""
        with self._lock:
            row = self._db.execute(
                "SELECT sid FROM sent WHERE outbound_id=?", (outbound_id,)
            ).fetchone()
        return None if row is None else str(row[0])

    def update_status(
        self, sid: str, outbound_id: str, status: str, error_code: str, at: float
    ) -> tuple[str, str] | None:
        """Apply a delivery status (never moving backwards); return (number, old status).

        None when neither the gateway id nor our outbound id is known.
        """
        with self._lock:
            row = self._db.execute(
                "SELECT outbound_id, number, status FROM sent WHERE sid=? OR outbound_id=? LIMIT 1",
                (sid, outbound_id),
            ).fetchone()
            if row is None:
                return None
            key, number, old = str(row[0]), str(row[1]), str(row[2])
            if _STATUS_RANK.get(status, 0) >= _STATUS_RANK.get(old, 0):
                self._db.execute(
                    "UPDATE sent SET status=?, error_code=?, updated_at=?, "
                    "sid=CASE WHEN sid='' THEN ? ELSE sid END WHERE outbound_id=?",
                    (status, error_code, at, sid, key),
                )
        return number, old

    def status_of(self, outbound_id: str) -> tuple[str, str, str] | None:
        """Return (sid, status, error code) of a send, for tests and operators."""
        with self._lock:
            row = self._db.execute(
                "SELECT sid, status, error_code FROM sent WHERE outbound_id=?", (outbound_id,)
            ).fetchone()
        return None if row is None else (str(row[0]), str(row[1]), str(row[2]))

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._db.close()


# -- the channel ----------------------------------------------------------------------

RETRY_AFTER_SINK = "1"
RETRY_AFTER_STOPPING = "5"
_SHUTDOWN_GRACE = 1.0  # see channels/web.py: stop() already waited for committed work


class Rejected(Exception):
    """A request the channel refuses; carries the HTTP answer (plain text)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def rejected_response(exc: Rejected) -> web.Response:
    """Return the plain-text answer of a rejection ("code: message")."""
    return web.Response(
        status=exc.status, text=f"{exc.code}: {exc.message}\n", headers=_TEXT_HEADERS
    )


def unavailable(message: str, retry_after: str) -> web.Response:
    """Return 503 with Retry-After: the gateway retries with the same message id."""
    response = web.Response(
        status=503,
        text=f"unavailable: {message}\n",
        headers={**_TEXT_HEADERS, "Retry-After": retry_after},
    )
    response.force_close()
    return response


_TEXT_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}


class SinkFailed(Exception):
    """The sink did not commit: answer 503 so the gateway retries."""


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Intake:
    """The outcome of one inbound text: routed (with its receipt) or a keyword recorded."""

    outcome: str  # routed | duplicate | opted_out | opted_in | keyword_replay
    receipt: Receipt | None = None


class SmsChannelBase(ChannelBase, ABC):
    """The webhook listener, intake and send path shared by the SMS gateway drivers."""

    answers_customers = True  # acknowledgements and agent replies go back as texts
    kind: ClassVar[str] = "sms"  # log prefix of the driver

    @property
    def sender_verified(self) -> bool:
        """Whether inbound senders are authenticated by the gateway (a signed webhook).

        Only then is the sender's number an identifier that links the customer's
        contacts across channels (router/contacts.py); otherwise anyone reaching the
        webhook could claim someone else's number.
        """
        return False

    def __init__(self, name: str, settings: SmsSettings, ctx: DriverContext) -> None:
        """Open the channel's state files; nothing listens until run()."""
        super().__init__(name, ctx)
        self.settings = settings
        self.directory = Path(ctx.state_dir) / "sms" / name
        self.directory.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(self.directory, 0o700)  # phone numbers and opt-outs: personal data
        self.threads = IdleThreads(self.directory / "threads.db", settings.thread_window)
        self.store = SmsState(self.directory / "sms.db")
        self.store.prune(time.time() - SENT_RETENTION)
        self._opt_out = frozenset(keyword_of(k) for k in settings.opt_out_keywords)
        self._opt_in = frozenset(keyword_of(k) for k in settings.opt_in_keywords)
        # Counters for tests and operators (received, duplicate, rejected:<code>,
        # opted_out, sent, segments_sent, truncated, status:<status>, ...).
        self.counts: Counter[str] = Counter()
        self.started = asyncio.Event()  # set while the listener accepts connections
        self._sink: MessageSink | None = None
        self._port: int | None = None
        self._stopping = False
        self._closed = asyncio.Event()
        self._done = asyncio.Event()
        self._done.set()
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def bound_port(self) -> int | None:
        """Return the port listened on (the real one for port 0); None when not listening."""
        return self._port

    @abstractmethod
    def routes(self) -> Iterable[tuple[str, str, Handler]]:
        """Return (method, path, handler) of the driver's webhook endpoints."""

    async def closing(self) -> None:
        """Release the driver's own resources when the listener closes (HTTP sessions)."""

    # -- lifecycle ------------------------------------------------------------------

    async def run(self, sink: MessageSink) -> None:
        """Listen for webhooks until stop() or cancellation; a busy port is a TransientError."""
        if self._stopping:
            return
        if not self._done.is_set():
            raise RuntimeError(f"{self.kind} channel {self.name} is already running")
        self._done.clear()
        self._sink = sink
        self._set_state(DriverState.CONNECTING)
        app = web.Application(client_max_size=self.settings.max_body_bytes)
        for method, path, handler in self.routes():
            app.router.add_route(method, path, self._guarded(handler))
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        # No access log: query strings carry phone numbers, text and shared secrets.
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=_SHUTDOWN_GRACE
        )
        try:
            await runner.setup()
            site = web.TCPSite(runner, self.settings.host, self.settings.port)
            try:
                await site.start()
            except OSError as exc:
                where = f"{self.settings.host}:{self.settings.port}"
                self._set_state(
                    DriverState.TRANSIENT_DISCONNECT,
                    f"cannot listen on {where}: {exc.strerror or exc}",
                )
                raise TransientError(f"{self.kind} {self.name}: {self.last_error}") from None
            self._port = int(runner.addresses[0][1])
            self.started.set()
            self._set_state(DriverState.CONNECTED)
            self.log.info(f"{self.kind}.listening", host=self.settings.host, port=self._port)
            await self._closed.wait()
        finally:
            self.started.clear()
            self._port = None
            try:
                await runner.cleanup()
                await self.closing()
            finally:
                if self.state != DriverState.TRANSIENT_DISCONNECT:
                    self._set_state(DriverState.STOPPED)
                self._done.set()

    async def stop(self) -> None:
        """Answer new webhooks 503, let in-flight commits finish, then close the listener."""
        self._stopping = True
        await self._idle.wait()
        self._closed.set()
        await self._done.wait()
        self._set_state(DriverState.STOPPED)

    def _guarded(self, handler: Handler) -> Handler:
        """Wrap a handler: 503 while stopping, rejections as 4xx, bugs as a logged 500."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            if self._stopping:
                return unavailable("the channel is shutting down", RETRY_AFTER_STOPPING)
            # Counted synchronously with the check above, so stop() waits for this request.
            self._inflight += 1
            self._idle.clear()
            try:
                return await handler(request)
            except SinkFailed:
                return unavailable("the message could not be stored; retry", RETRY_AFTER_SINK)
            except Rejected as exc:
                self.counts[f"rejected:{exc.code}"] += 1
                self.log.info(f"{self.kind}.rejected", code=exc.code, status=exc.status)
                return rejected_response(exc)
            except Exception:
                self.log.exception(f"{self.kind}.internal_error", path=request.path)
                return web.Response(status=500, text="internal error\n", headers=_TEXT_HEADERS)
            finally:
                self._inflight -= 1
                if not self._inflight:
                    self._idle.set()

        return guarded

    async def _not_found(self, request: web.Request) -> web.Response:
        """Answer 404 for any other path."""
        return web.Response(status=404, text="not found\n", headers=_TEXT_HEADERS)

    # -- intake ---------------------------------------------------------------------

    def number(self, raw: str, field: str) -> str:
        """Return a sender's number in E.164, or raise a 400 naming the field."""
        try:
            return e164(raw, self.settings.default_region)
        except ValueError as exc:
            raise Rejected(400, "invalid_number", f"{field}: {exc}") from None

    def text(self, raw: str, *, media: bool = False) -> str:
        """Return the cleaned text, or raise a 400 when blank (without media) or too long."""
        text = clean_text(raw)
        if not text and not media:
            raise Rejected(400, "empty_text", "the message has no text")
        if len(text) > self.settings.max_text_chars:
            raise Rejected(
                413, "text_too_long", f"text over {self.settings.max_text_chars} characters"
            )
        return text

    def _identifiers(self, number: str) -> tuple[str, ...]:
        """Return the sender's phone identifier when the gateway authenticated it."""
        if not self.sender_verified:
            return ()
        identifier = phone_identifier(number)
        return (identifier,) if identifier else ()

    async def ingest(
        self,
        *,
        external_id: str,
        number: str,
        text: str,
        payload_sha256: str,
        raw: bytes,
        attachments: tuple[Attachment, ...] = (),
    ) -> Intake:
        """Commit one inbound text (or record its keyword); raise SinkFailed when not stored."""
        now = time.time()
        fields = {"external_id": external_id, "from_ref": number_ref(number)}
        folded = keyword_of(text) if not attachments else ""
        if folded in self._opt_out or folded in self._opt_in:
            opted_out = folded in self._opt_out
            fresh = await asyncio.to_thread(
                self.store.keyword, external_id, number, opted_out, now, text.strip()
            )
            outcome = "keyword_replay" if not fresh else "opted_out" if opted_out else "opted_in"
            self.counts[outcome] += 1
            self.log.info(f"{self.kind}.{outcome}", keyword=folded, **fields)
            self._succeeded()
            return Intake(outcome)
        hint = self.threads.thread_for(number, now)
        message = InboundMessage(
            channel=self.name,
            channel_type="sms",
            external_id=external_id,
            contact_handle=number,
            text=text,
            conversation_hint=hint,
            received_at=utcnow(),
            attachments=attachments,
            payload_sha256=payload_sha256,
            raw=raw,
            identifiers=self._identifiers(number),
        )
        sink = self._sink
        if sink is None:  # pragma: no cover  (handlers only run inside run())
            raise RuntimeError("no sink")
        try:
            receipt = await sink(message)
        except Exception as exc:
            # Not committed (or not known to be): the gateway retries with the same id.
            self.last_error = f"sink failed: {type(exc).__name__}"
            self.counts["sink_failed"] += 1
            self.log.error(f"{self.kind}.sink_failed", error=type(exc).__name__, **fields)
            raise SinkFailed from exc
        if receipt.duplicate:
            # A replay: the hint may be a fresh one, so the thread is left as it is.
            self.counts["duplicate"] += 1
            if receipt.payload_conflict:
                self.log.warning(f"{self.kind}.id_reused_with_other_content", **fields)
        else:
            self.threads.seen(number, hint, now)
            self.counts["received"] += 1
        self._succeeded()
        encoding, parts = split_segments(text)
        # Debug only: the pipeline logs one canonical line per routed message.
        self.log.debug(
            f"{self.kind}.received",
            ticket=receipt.ticket,
            duplicate=receipt.duplicate,
            segments=len(parts),
            encoding=encoding,
            media=len(attachments),
            **fields,
        )
        return Intake("duplicate" if receipt.duplicate else "routed", receipt)

    # -- sending --------------------------------------------------------------------

    async def send(self, outbound: Outbound) -> None:
        """Text an acknowledgement or agent reply; raise the driver taxonomy on failure."""
        # A survey (the satisfaction question after resolve) is texted like a reply.
        if outbound.kind not in ("ack", "reply", "survey"):
            raise PermanentError(f"{self.kind}: unknown outbound kind {outbound.kind!r}")
        if outbound.kind == "ack" and not self.settings.ack.enabled:
            self.log.debug(f"{self.kind}.ack_disabled", outbound_id=outbound.id)
            return
        # Accepted by the gateway before (the outbox did not learn it): not sent twice.
        prior = await asyncio.to_thread(self.store.sent_sid, outbound.id)
        if prior is not None:
            self.log.info(f"{self.kind}.already_sent", outbound_id=outbound.id, sid=prior or None)
            return
        try:
            to = e164(outbound.to, self.settings.default_region)
        except ValueError as exc:
            raise PermanentError(f"cannot text {outbound.to!r}: {exc}") from None
        opt_out = await asyncio.to_thread(self.store.opted_out, to)
        if opt_out is not None:
            self.counts["refused_opted_out"] += 1
            raise PermanentError(
                f"recipient opted out ({opt_out.keyword} at {iso(opt_out.at)}, "
                f"{opt_out.source}); texting resumes after the customer sends START"
            )
        if outbound.kind == "ack":
            text = ack_text(outbound, self.settings.ack)
        else:
            text = outbound.text
        text = clean_text(text)
        if not text:
            raise PermanentError("the reply has no text")
        text, truncated = fit_segments(
            text, self.settings.max_segments, self.settings.truncation_notice
        )
        encoding, parts = split_segments(text)
        if truncated:
            self.counts["truncated"] += 1
            self.log.warning(
                f"{self.kind}.truncated",
                outbound_id=outbound.id,
                max_segments=self.settings.max_segments,
            )
        await self.deliver(outbound, to, text, encoding, len(parts))
        self.counts["sent"] += 1
        self.counts["segments_sent"] += len(parts)
        self._succeeded()
        if self.state == DriverState.BAD_CREDENTIALS and self.started.is_set():
            self._set_state(DriverState.CONNECTED)  # the gateway takes our credentials again
        self.log.info(
            f"{self.kind}.sent",
            outbound_id=outbound.id,
            kind=outbound.kind,
            to_ref=number_ref(to),
            segments=len(parts),
            encoding=encoding,
        )

    @abstractmethod
    async def deliver(
        self, outbound: Outbound, to: str, text: str, encoding: str, segments: int
    ) -> None:
        """Hand one text to the gateway and record_sent() it; raise the driver taxonomy."""

    def auth_refused(self, message: str) -> None:
        """Park the channel as bad_credentials: its sends cannot work until fixed."""
        self._set_state(DriverState.BAD_CREDENTIALS, message)
