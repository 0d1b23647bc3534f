"""Web intake channel: customers (or a site's backend) POST messages as JSON over HTTP.

`POST /v1/messages` validates the body by hand (a pydantic model per request costs
more than the whole rest of the handler), normalises it into an `InboundMessage`
and answers 201 only after the sink has committed it. `Idempotency-Key` becomes the
message's `external_id`, so a client that lost an answer retries with the same key
and gets the same ticket back (200, `"duplicate": true`); the same key with a
different body is a 422, as in the IETF idempotency-key draft.
`GET /v1/tickets/{ticket}` shows a ticket's status to whoever holds its status token.

Every answer is JSON with `X-Content-Type-Options: nosniff` and `Cache-Control:
no-store` (answers carry status tokens). Request bodies are never logged.
channels/README.md documents the API for client authors.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import ipaddress
import json
import math
import re
import sqlite3
import time
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from channels.web_guard import (
    Networks,
    Rejected,
    TokenBuckets,
    WebStats,
    client_ip,
    origin_allowed,
)
from channels.web_outbox import LogClosed, WidgetLog, thread_id
from channels.web_widget import WidgetServer
from router.drivers import (
    NAME_RE,
    ChannelBase,
    DriverContext,
    DriverState,
    MessageSink,
    Outbound,
    Receipt,
    TicketLookup,
    TicketStatus,
    TransientError,
)
from router.http import GuardedRunner, HttpLimits, new_app, start_site
from router.model import Attachment, InboundMessage, new_ulid, utcnow
from router.openapi import add_openapi_route
from router.store import StoreUnavailable

MESSAGES_PATH = "/v1/messages"
TICKETS_PATH = "/v1/tickets/"
HEALTH_PATH = "/v1/health"

MAX_HANDLE_CHARS = 200
MAX_NAME_CHARS = 200
MAX_CONVERSATION_CHARS = 200
MAX_IDEMPOTENCY_KEY = 255
MAX_TOKEN_CHARS = 512
LANGUAGES = frozenset({"zh", "en"})
RETRY_AFTER_SINK = "1"  # the store hiccuped: retry soon with the same Idempotency-Key
RETRY_AFTER_STOPPING = "5"  # the daemon is restarting or draining
RETRY_AFTER_STORE = "10"  # the store cannot write (disk full, read-only): an operator must act
# While the store is out, one request per this many seconds tries it; the others get a
# 503 at once, so retrying clients cost almost nothing until it is back.
STORE_PROBE_INTERVAL = 1.0
# sqlite3 error texts that mean the store cannot write at all, as opposed to a hiccup.
_STORE_OUTAGE_REASONS = ("full", "readonly", "read-only", "disk i/o")
# Room for the contact form's fields and multipart framing next to its attachment.
FORM_OVERHEAD = 64 * 1024
# How long runner.cleanup() waits for handlers still running. stop() has already
# waited for every request that reached the sink, so what is left are requests still
# being read or answered 503: a short grace keeps a stop under load from idling for
# seconds (clients retry those with the same Idempotency-Key).
_SHUTDOWN_GRACE = 1.0

_TOP_FIELDS = frozenset({"text", "contact", "subject", "conversation", "language"})
_CONTACT_FIELDS = frozenset({"handle", "name"})
# C0 controls except TAB and LF (CR is folded into LF first), plus DEL.
_TEXT_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# Single-line fields (name, subject): every C0 control and DEL; TAB/CR/LF become spaces first.
_LINE_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")
_LINE_BREAKS = re.compile(r"[\t\r\n]+")
# Identifiers (handle, conversation): C0, DEL and C1 controls are rejected, not stripped.
_ID_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Lone surrogates survive json.loads ("\ud800") but cannot be stored as UTF-8.
_SURROGATES = re.compile("[\ud800-\udfff]")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]+")
_TICKET = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ORIGIN = re.compile(
    r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?"
)

# Built once: json.dumps with non-default arguments builds a new encoder on every call.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
_COMPACT = json.JSONEncoder(separators=(",", ":"))

_JSON_HEADERS = {
    "Content-Type": "application/json",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Server": "omnirouter",  # instead of aiohttp's "Python/x aiohttp/y"
}


class WebConfig(BaseModel):
    """Settings of one web intake channel."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["web"]
    name: str = Field(pattern=NAME_RE)
    host: str = Field(default="127.0.0.1", min_length=1, max_length=255)
    port: int = Field(default=8080, ge=0, le=65535)  # 0: an ephemeral port (tests)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    max_text_chars: int = Field(default=10_000, ge=1, le=1_000_000)
    max_subject_chars: int = Field(default=300, ge=1, le=10_000)
    # Seconds a client has to send the request head, and again the body (slow-loris).
    read_timeout: float = Field(default=10.0, gt=0, le=300)
    # Open connections at once; when full, idle ones are evicted, else new ones closed.
    max_connections: int = Field(default=512, ge=1, le=100_000)

    # -- for browsers: the chat widget, the contact form, the ticket status page -----
    # Serve widget.js and its WebSocket, /contact and /status (the JSON API is always on).
    widget: bool = True
    # Origins (scheme://host[:port]) whose pages may embed the widget or call the API
    # from a browser; the channel's own origin is always allowed, others get 403.
    allowed_origins: tuple[str, ...] = ()
    # Token buckets per client IP (API posts, widget messages and connections, form
    # posts together) and per conversation: tokens per second (0: no limit) and burst.
    ip_rate: float = Field(default=1.0, ge=0, le=100_000)
    ip_burst: int = Field(default=30, ge=1, le=1_000_000)
    conversation_rate: float = Field(default=0.5, ge=0, le=100_000)
    conversation_burst: int = Field(default=10, ge=1, le=1_000_000)
    # Networks the limits do not apply to: a site's own backend posting for its users,
    # `omnirouter send` on the host. Behind a reverse proxy, list it in trusted_proxies
    # instead, so its clients are told apart by X-Forwarded-For.
    rate_limit_exempt: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    trusted_proxies: tuple[str, ...] = ()
    # Open widget WebSockets at once (each is also a connection under max_connections).
    max_ws_connections: int = Field(default=2000, ge=1, le=100_000)
    ws_heartbeat: float = Field(default=30.0, gt=0, le=600)  # seconds between pings
    ws_send_queue: int = Field(default=64, ge=1, le=10_000)  # frames; a slower reader is cut
    max_ws_frame_bytes: int = Field(default=64 * 1024, ge=1024, le=1024 * 1024)
    # The contact form's attachment: at most this size, one of these types.
    max_attachment_bytes: int = Field(default=5 * 1024 * 1024, ge=0, le=64 * 1024 * 1024)
    attachment_types: tuple[str, ...] = (
        "image/png",
        "image/jpeg",
        "application/pdf",
        "text/plain",
    )
    history_days: int = Field(default=30, ge=1, le=3650)  # widget history kept this long

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        """Accept only bare origins (scheme://host[:port], no path), kept lower-case."""
        for origin in value:
            if not _ORIGIN.fullmatch(origin):
                raise ValueError(
                    f"{origin!r} is not an origin like https://shop.example or "
                    "http://localhost:8000 (no path, no trailing slash)"
                )
        return tuple(o.lower() for o in value)

    @field_validator("rate_limit_exempt", "trusted_proxies")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        """Accept only IP addresses and networks (CIDR)."""
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not an IP address or network") from None
        return value


_Rejected = Rejected


@dataclass(frozen=True, slots=True)
class Committed:
    """A message the sink committed, with what its answer tells the customer."""

    receipt: Receipt
    message: InboundMessage
    conversation_token: str  # "" when the client threads on its own (no token service)
    thread: str  # the widget log's key of the conversation (see web_outbox.thread_id)


class WebChannel(ChannelBase):
    """Serve the web intake API on host:port and hand each valid message to the sink."""

    config_model: ClassVar[type[WebConfig]] = WebConfig
    # Acknowledgements and agent replies are kept for the widget and pushed to it live;
    # an API client reads its answer in the HTTP response and the ticket status instead.
    answers_customers: ClassVar[bool] = True
    # Serves `POST /v1/messages` on its host and port (what `omnirouter send` posts to).
    takes_message_posts: ClassVar[bool] = True

    def __init__(self, name: str, config: WebConfig, ctx: DriverContext) -> None:
        """Prepare the channel; nothing listens until run()."""
        super().__init__(name, ctx)
        self.config = config
        # Set while the listener accepts connections; cleared when it closes.
        self.started = asyncio.Event()
        self._tickets: TicketLookup = ctx.tickets
        self._sink: MessageSink | None = None
        self._port: int | None = None
        self._stopping = False  # set by stop(), for good: a stopped instance is not restarted
        self._closed = asyncio.Event()  # stop() tells run() to close the listener
        self._done = asyncio.Event()  # set while no run() holds a listener
        self._done.set()
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Set while the store cannot write; requests before _store_probe_at get a 503.
        self._store_outage: str | None = None
        self._store_probe_at = 0.0
        self.stats = WebStats(self.name, ctx.metrics)
        self.log_db = WidgetLog(ctx.state_dir / "web" / self.name / "outbox.db")
        self._origins = frozenset(config.allowed_origins)
        self._exempt = Networks(config.rate_limit_exempt)
        self._proxies = Networks(config.trusted_proxies)
        self._ip_buckets = TokenBuckets(config.ip_rate, config.ip_burst)
        self._conversation_buckets = TokenBuckets(
            config.conversation_rate, config.conversation_burst
        )
        self.widget = WidgetServer(self) if config.widget else None

    @property
    def stopping(self) -> bool:
        """Return whether stop() was called (new messages are refused)."""
        return self._stopping

    def thread_of(self, handle: str, token: str) -> str:
        """Return the widget log's thread a conversation token proves; raise 403 if none."""
        tokens = self.ctx.conversations
        hint = token if tokens is None else tokens.conversation_hint(handle, token)
        if hint is None:
            raise Rejected(
                403,
                "invalid_conversation_token",
                "this conversation token was not issued to this contact",
                "conversation",
            )
        return thread_id(handle, hint)

    @property
    def bound_port(self) -> int | None:
        """Return the port listened on (the real one for port 0); None when not listening."""
        return self._port

    async def run(self, sink: MessageSink) -> None:
        """Listen until stop() has drained the channel or the task is cancelled.

        Returns at once after stop(); the supervisor builds a new instance to serve again.
        A port that cannot be bound raises router.http.ListenError (a TransientError).
        """
        if self._stopping:
            return
        if not self._done.is_set():
            raise RuntimeError(f"web channel {self.name} is already running")
        self._done.clear()
        self._sink = sink
        self._set_state(DriverState.CONNECTING)
        limits = HttpLimits(
            read_timeout=self.config.read_timeout,
            max_connections=self.config.max_connections,
            # The contact form's attachment needs more room than a JSON post; the JSON
            # handler checks its own, smaller limit.
            max_body_bytes=max(
                self.config.max_body_bytes,
                self.config.max_attachment_bytes + FORM_OVERHEAD if self.config.widget else 0,
            ),
        )
        app = self.app(limits)
        # No access log (see router.http): one line per request is the pipeline's job
        # (it logs each routed message once).
        runner = GuardedRunner(
            app, name=f"web:{self.name}", limits=limits, shutdown_timeout=_SHUTDOWN_GRACE
        )
        try:
            if self.config.widget:
                # Widget history past its keep time goes at each start (a restart a day
                # or a deploy is enough; the rows are small).
                await self.log_db.prune(time.time() - self.config.history_days * 86400)
            await runner.setup()
            try:
                self._port = await start_site(
                    runner, self.config.host, self.config.port, f"web {self.name}"
                )
            except TransientError as exc:  # a ListenError: the port is taken or not ours
                self.last_error = str(exc)
                self._set_state(DriverState.TRANSIENT_DISCONNECT)
                raise
            self.started.set()
            self._set_state(DriverState.CONNECTED)
            self.log.info("web.listening", host=self.config.host, port=self._port)
            await self._closed.wait()
        finally:
            self.started.clear()
            self._port = None
            try:
                # Stops the site, closes idle keep-alive connections and waits up to
                # _SHUTDOWN_GRACE for handlers still running (when run() is cancelled).
                await runner.cleanup()
            finally:
                if self.state != DriverState.TRANSIENT_DISCONNECT:
                    self._set_state(DriverState.STOPPED)
                self._done.set()

    def app(self, limits: HttpLimits) -> web.Application:
        """Return the application with every route (router/openapi.json describes them)."""
        app = new_app(limits)
        app.router.add_route("*", MESSAGES_PATH, self._handle_messages)
        app.router.add_route("*", TICKETS_PATH + "{ticket}", self._handle_ticket)
        app.router.add_route("*", HEALTH_PATH, self._handle_health)
        if self.widget is not None:
            self.widget.add_routes(app)
        add_openapi_route(app, "customer")
        app.router.add_route("*", "/{tail:.*}", self._handle_unknown)
        return app

    async def stop(self) -> None:
        """Refuse new messages with 503, let in-flight ones finish, then close the listener."""
        self._stopping = True
        await self._idle.wait()
        if self.widget is not None:
            # Widgets reconnect (to the next daemon) and fetch what they missed.
            await self.widget.close_all()
        self._closed.set()
        await self._done.wait()
        await self.log_db.close()
        self._set_state(DriverState.STOPPED)

    async def send(self, outbound: Outbound) -> None:
        """Keep an acknowledgement or reply in the widget log, then push it to open widgets.

        Idempotent on outbound.id: a retried send is stored once and pushed once. The
        JSON API's answer is unchanged; an API client that wants the reply reads the
        ticket status or opens the widget's WebSocket with its conversation token.
        """
        hint = outbound.payload.conversation_hint or outbound.conversation_id
        fields: dict[str, Any] = {"ticket": outbound.ticket}
        if outbound.kind == "reply":
            fields["text"] = outbound.text
        else:
            respond_by = outbound.respond_by
            if respond_by is not None:
                fields["respond_by"] = _iso(respond_by)
                fields["minutes"] = max(1, math.ceil((respond_by.timestamp() - time.time()) / 60))
        try:
            entry, new = await self.log_db.add(
                thread_id(outbound.to, hint), outbound.id, outbound.kind, fields
            )
        except LogClosed:
            raise TransientError(f"web channel {self.name} is stopped") from None
        except sqlite3.Error as exc:
            raise TransientError(f"widget log: {type(exc).__name__}: {exc}") from None
        self._succeeded()
        if new:
            self.stats.message_out()
            if self.widget is not None:
                self.widget.push(thread_id(outbound.to, hint), entry)

    def details(self) -> dict[str, Any]:
        """Return the widget's counters for /readyz (connections, messages a minute, rejects)."""
        return self.stats.details()

    # -- limits, origins ---------------------------------------------------------------

    def client(self, request: web.Request) -> str:
        """Return the client's IP address (behind a trusted proxy: the one it names)."""
        return client_ip(request, self._proxies)

    def _limit(self, request: web.Request, conversation: str | None) -> None:
        """Take a token from the client's IP bucket (and the conversation's); raise 429 if empty."""
        self.check_rate(self.client(request), conversation)

    def check_rate(self, ip: str, conversation: str | None) -> None:
        """Raise a 429 Rejected when the IP or the conversation is over its rate."""
        if ip in self._exempt:
            return
        wait = self._ip_buckets.take(ip)
        if not wait and conversation:
            wait = self._conversation_buckets.take(conversation)
        if wait:
            raise Rejected(
                429,
                "rate_limited",
                "too many messages; slow down",
                retry_after=str(max(1, math.ceil(wait))),
            )

    def rejected(self, exc: Rejected) -> web.Response:
        """Return the JSON answer of a rejection and count it by reason."""
        self.stats.reject(exc.code)
        if exc.retry_after is not None:
            response = _json(
                exc.status,
                {"error": {"code": exc.code, "message": exc.message}},
                {"Retry-After": exc.retry_after},
            )
            if exc.status == 503:
                response.force_close()
            return response
        return _error(exc.status, exc.code, exc.message, exc.field)

    def origin_ok(self, request: web.Request) -> bool:
        """Return whether the request comes from our own or an allowed origin (or no browser)."""
        return origin_allowed(request, self._origins)

    def _cors(self, request: web.Request, response: web.Response) -> web.Response:
        """Let an allowed origin's page read the answer (CORS)."""
        origin = request.headers.get("Origin")
        if origin is not None and origin.strip().lower() in self._origins:
            response.headers["Access-Control-Allow-Origin"] = origin.strip()
            response.headers["Vary"] = "Origin"
        return response

    def _preflight(self, request: web.Request) -> web.Response:
        """Answer a CORS preflight: allowed origins may POST JSON with an Idempotency-Key."""
        origin = (request.headers.get("Origin") or "").strip().lower()
        if origin not in self._origins:
            return self.rejected(_origin_rejected())
        response = web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Origin": request.headers["Origin"].strip(),
                "Access-Control-Allow-Methods": "POST",
                "Access-Control-Allow-Headers": "Content-Type, Idempotency-Key",
                "Access-Control-Max-Age": "600",
                "Vary": "Origin",
                "Server": "omnirouter",
            },
        )
        return response

    # -- handlers ----------------------------------------------------------------

    async def _handle_messages(self, request: web.Request) -> web.Response:
        """Take one message: validate, commit through the sink, answer with its ticket."""
        if request.method == "OPTIONS":
            return self._preflight(request)
        if request.method != "POST":
            return _method_not_allowed("POST")
        if not origin_allowed(request, self._origins):
            return self.rejected(_origin_rejected())
        if self._stopping:
            return _unavailable("the channel is shutting down", RETRY_AFTER_STOPPING)
        # Counted from here, so stop() waits for a request already being read.
        self._inflight += 1
        self._idle.clear()
        try:
            return self._cors(request, await self._intake(request))
        except _Rejected as exc:
            return self._cors(request, self.rejected(exc))
        except Exception:
            self.log.exception("web.internal_error", path=MESSAGES_PATH)
            return _error(500, "internal_error", "internal error")
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    async def _intake(self, request: web.Request) -> web.Response:
        """Run the intake steps; raise _Rejected for anything not storable."""
        config = self.config
        if request.content_type != "application/json":
            raise _Rejected(415, "unsupported_media_type", "Content-Type must be application/json")
        charset = request.charset
        if charset is not None and charset.lower() not in ("utf-8", "utf8"):
            raise _Rejected(415, "unsupported_media_type", "the body must be UTF-8")
        length = request.content_length
        if length is not None and length > config.max_body_bytes:
            raise _too_large(config.max_body_bytes)
        key = request.headers.get("Idempotency-Key")
        if key is not None and (
            len(key) > MAX_IDEMPOTENCY_KEY or not _PRINTABLE_ASCII.fullmatch(key)
        ):
            raise _Rejected(
                400,
                "invalid_idempotency_key",
                f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} printable ASCII characters",
                "Idempotency-Key",
            )
        # Already read by router.http's middleware (within read_timeout and the size cap).
        body = await request.read()
        document = parse_body(body)
        if len(body) > config.max_body_bytes:  # chunked: no Content-Length to check first
            raise _too_large(config.max_body_bytes)
        fields = self.validate(document)
        self._limit(request, fields["conversation"] or None)
        committed = await self.commit(fields, key, body)
        receipt = committed.receipt
        status_url = TICKETS_PATH + receipt.ticket
        answer: dict[str, Any] = {
            "ticket": receipt.ticket,
            "status_token": receipt.status_token,
            "message_id": receipt.message_id,
            "conversation_id": receipt.conversation_id,
            "state": receipt.state,
            "status_url": status_url,
        }
        if committed.conversation_token:
            answer["conversation_token"] = committed.conversation_token
        if receipt.duplicate:
            answer["duplicate"] = True
            return _json(200, answer)
        return _json(201, answer, {"Location": status_url})

    async def commit(
        self,
        fields: dict[str, Any],
        key: str | None,
        raw: bytes,
        attachments: tuple[Attachment, ...] = (),
        *,
        resendable: bool = False,
        confirm_elsewhere: bool = False,
    ) -> Committed:
        """Commit validated fields through the sink; raise Rejected (503s included) if not.

        Shared by the API, the widget's WebSocket and the contact form, so all three
        thread, deduplicate and refuse alike. `resendable` leaves the conversation token
        out of the fingerprint: a widget resends a conversation's first message with the
        token it got meanwhile, and that is the same message, not a reused key.
        """
        fingerprint = {**fields, "conversation": ""} if resendable else fields
        digest = hashlib.sha256(_CANONICAL.encode(fingerprint).encode("ascii")).hexdigest()
        contact = fields["contact"]
        hint, conversation_token = self._thread(contact["handle"], fields["conversation"], key)
        message = InboundMessage(
            channel=self.name,
            channel_type="web",
            external_id=key if key is not None else new_ulid(),
            contact_handle=contact["handle"],
            text=fields["text"],
            contact_name=contact["name"],
            subject=fields["subject"],
            conversation_hint=hint,
            received_at=utcnow(),
            language=fields["language"],
            attachments=attachments,
            payload_sha256=digest,
            raw=raw,
            confirm_elsewhere=confirm_elsewhere,
        )
        sink = self._sink
        if sink is None:
            raise Rejected(
                503, "unavailable", "the channel is shutting down", retry_after=RETRY_AFTER_STOPPING
            )
        if self._store_outage is not None:
            now = time.monotonic()
            if now < self._store_probe_at:
                raise _store_unavailable()
            self._store_probe_at = now + STORE_PROBE_INTERVAL  # this request is the probe
        # Counted synchronously with the check above, so stop() waits for this commit.
        self._inflight += 1
        self._idle.clear()
        try:
            receipt = await sink(message)
        except Exception as exc:
            # Not committed (or not known to be): the client retries with the same key.
            if _is_store_outage(exc):
                self._store_down(exc)
                raise _store_unavailable() from None
            self.last_error = f"sink failed: {type(exc).__name__}"
            self.log.error("web.sink_failed", error=type(exc).__name__, exc_info=True)
            raise Rejected(
                503,
                "unavailable",
                "the message could not be stored; retry",
                retry_after=RETRY_AFTER_SINK,
            ) from None
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()
        if self._store_outage is not None:
            self._store_up()
        if receipt.payload_conflict:
            raise _Rejected(
                422,
                "idempotency_key_conflict",
                "this Idempotency-Key was already used with a different request body",
                "Idempotency-Key",
            )
        self._succeeded()
        self.stats.message_in()
        return Committed(
            receipt, message, conversation_token, thread_id(message.contact_handle, hint)
        )

    def _thread(self, handle: str, token: str, key: str | None) -> tuple[str, str]:
        """Return (thread hint, conversation token) for a post; refuse a token not proven.

        Anyone may start a conversation; only who holds its token continues it. Without
        a token a post starts a new conversation, whoever else wrote from that handle: a
        bare handle is no proof of identity on the open web.
        """
        tokens = self.ctx.conversations
        if tokens is None:
            # No token service (a channel tested alone): the client's key threads as given.
            return token or (key or new_ulid()), ""
        if not token:
            return tokens.conversation_token(handle, key)
        hint = tokens.conversation_hint(handle, token)
        if hint is None:
            raise _Rejected(
                403,
                "invalid_conversation_token",
                "this conversation token was not issued to this contact",
                "conversation",
            )
        return hint, token

    def validate(self, document: object) -> dict[str, Any]:
        """Return the normalised fields of a request body; raise _Rejected naming the bad field."""
        if type(document) is not dict:
            raise _Rejected(400, "invalid_body", "the body must be a JSON object")
        for key in document:
            if key not in _TOP_FIELDS:
                raise _Rejected(400, "unknown_field", "unknown field", _field_name(key))
        if "text" not in document:
            raise _Rejected(400, "missing_field", "text is required", "text")
        text = _clean_text(document["text"], "text")
        if not text:
            raise _Rejected(400, "invalid_field", "text must not be blank", "text")
        if len(text) > self.config.max_text_chars:
            raise _Rejected(
                422,
                "too_long",
                f"text must be at most {self.config.max_text_chars} characters",
                "text",
            )
        contact = document.get("contact")
        if contact is None:
            raise _Rejected(400, "missing_field", "contact is required", "contact")
        if type(contact) is not dict:
            raise _Rejected(400, "invalid_field", "contact must be an object", "contact")
        for key in contact:
            if key not in _CONTACT_FIELDS:
                raise _Rejected(
                    400, "unknown_field", "unknown field", "contact." + _field_name(key)
                )
        if "handle" not in contact:
            raise _Rejected(400, "missing_field", "contact.handle is required", "contact.handle")
        handle = _clean_id(contact["handle"], "contact.handle", MAX_HANDLE_CHARS)
        if not handle:
            raise _Rejected(
                400, "invalid_field", "contact.handle must not be blank", "contact.handle"
            )
        name = _clean_line(contact.get("name"), "contact.name", MAX_NAME_CHARS)
        subject = _clean_line(document.get("subject"), "subject", None)
        if len(subject) > self.config.max_subject_chars:
            raise _Rejected(
                422,
                "too_long",
                f"subject must be at most {self.config.max_subject_chars} characters",
                "subject",
            )
        conversation = document.get("conversation")
        conversation = (
            ""
            if conversation is None
            else _clean_id(conversation, "conversation", MAX_CONVERSATION_CHARS)
        )
        language = document.get("language")
        if language is not None and (type(language) is not str or language not in LANGUAGES):
            raise _Rejected(400, "invalid_field", 'language must be "zh" or "en"', "language")
        return {
            "text": text,
            "contact": {"handle": handle, "name": name},
            "subject": subject,
            "conversation": conversation,
            "language": language,
        }

    async def _handle_ticket(self, request: web.Request) -> web.Response:
        """Answer a ticket's status to the holder of its status token."""
        if request.method != "GET":
            return _method_not_allowed("GET")
        try:
            return await self._ticket_status(request)
        except Exception:
            self.log.exception("web.internal_error", path=TICKETS_PATH)
            return _error(500, "internal_error", "internal error")

    async def _ticket_status(self, request: web.Request) -> web.Response:
        """Look the ticket up with the token from the Authorization header or ?token=."""
        token = ""
        authorization = request.headers.get("Authorization")
        if authorization:
            scheme, _, credentials = authorization.partition(" ")
            if scheme.lower() == "bearer":
                token = credentials.strip()
        if not token:
            token = request.query.get("token", "")
        if not token:
            # Independent of the ticket, so it reveals nothing about which tickets exist.
            return _json(
                401,
                {"error": {"code": "unauthorized", "message": "a status token is required"}},
                {"WWW-Authenticate": "Bearer"},
            )
        ticket = request.match_info["ticket"]
        if not _TICKET.fullmatch(ticket) or len(token) > MAX_TOKEN_CHARS:
            return _not_found()
        try:
            status = await self._tickets(ticket, token)
        except Exception as exc:
            self.log.error("web.ticket_lookup_failed", error=type(exc).__name__, exc_info=True)
            return _unavailable("the ticket could not be read; retry", RETRY_AFTER_SINK)
        if status is None:
            return _not_found()
        return _json(200, _ticket_json(status))

    async def _handle_health(self, request: web.Request) -> web.Response:
        """Answer 200 while accepting messages, 503 while shutting down."""
        if request.method != "GET":
            return _method_not_allowed("GET")
        if self._stopping:
            return _unavailable("the channel is shutting down", RETRY_AFTER_STOPPING)
        return _json(200, {"status": "ok"})

    async def _handle_unknown(self, request: web.Request) -> web.Response:
        """Answer 404 as JSON for any other path."""
        return _not_found()

    # -- helpers -------------------------------------------------------------------

    def _store_down(self, exc: BaseException) -> None:
        """Answer 503 without trying the store until the next probe; log the outage once."""
        self._store_probe_at = time.monotonic() + STORE_PROBE_INTERVAL
        if self._store_outage is None:
            self._store_outage = f"{type(exc).__name__}: {exc}"
            self.last_error = f"store unavailable: {self._store_outage}"
            self.log.error("web.store_unavailable", error=self._store_outage)

    def _store_up(self) -> None:
        """Log that the store writes again (once)."""
        self.log.info("web.store_recovered", error=self._store_outage)
        self._store_outage = None
        self.last_error = ""


def parse_body(body: bytes) -> object:
    """Return the JSON document of a request body; raise Rejected (400) naming why not.

    Pure (no request, no channel), so the reliability fuzzer drives it directly with
    `WebChannel.validate`: together they are everything the API does with a body.
    """
    try:
        # Decoded strictly here rather than by json.loads(bytes), which would also
        # take UTF-16/32 and encoded surrogates ("surrogatepass").
        return json.loads(body.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise _Rejected(400, "invalid_encoding", "the body is not valid UTF-8") from None
    except _DuplicateKey as exc:
        raise _Rejected(
            400, "duplicate_field", "a key appears more than once", _field_name(exc.key)
        ) from None
    except (ValueError, RecursionError):
        raise _Rejected(400, "invalid_json", "the body is not valid JSON") from None


def _clean_text(value: object, field: str) -> str:
    """Return multi-line text without control characters (TAB and LF kept), NFC, stripped."""
    if type(value) is not str:
        raise _Rejected(400, "invalid_field", f"{field} must be a string", field)
    if "\r" in value:
        value = value.replace("\r\n", "\n").replace("\r", "\n")
    value = _TEXT_CONTROLS.sub("", value)
    if not value.isascii():
        value = _nfc(value, field)
    return value.strip()


def _clean_line(value: object, field: str, limit: int | None) -> str:
    """Return a one-line optional field (null: ""), controls removed, NFC, stripped, bounded."""
    if value is None:
        return ""
    if type(value) is not str:
        raise _Rejected(400, "invalid_field", f"{field} must be a string", field)
    value = _LINE_CONTROLS.sub("", _LINE_BREAKS.sub(" ", value))
    if not value.isascii():
        value = _nfc(value, field)
    value = value.strip()
    if limit is not None and len(value) > limit:
        raise _Rejected(400, "invalid_field", f"{field} must be at most {limit} characters", field)
    return value


def _clean_id(value: object, field: str, limit: int) -> str:
    """Return an identifier NFC and stripped; reject control characters and overlong values."""
    if type(value) is not str:
        raise _Rejected(400, "invalid_field", f"{field} must be a string", field)
    if _ID_CONTROLS.search(value):
        raise _Rejected(400, "invalid_field", f"{field} must not contain control characters", field)
    if not value.isascii():
        value = _nfc(value, field)
    value = value.strip()
    if len(value) > limit:
        raise _Rejected(400, "invalid_field", f"{field} must be at most {limit} characters", field)
    return value


def _nfc(value: str, field: str) -> str:
    """Return value in NFC; reject lone surrogates (not Unicode text, not storable as UTF-8)."""
    if _SURROGATES.search(value):
        raise _Rejected(400, "invalid_field", f"{field} is not valid Unicode", field)
    if unicodedata.is_normalized("NFC", value):
        return value
    return unicodedata.normalize("NFC", value)


class _DuplicateKey(ValueError):
    """A JSON object in the body names a key twice (json.loads would keep the last)."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Build a JSON object's dict; raise _DuplicateKey if a key repeats (object_pairs_hook)."""
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return document


def _is_store_outage(exc: BaseException) -> bool:
    """Return whether exc means the store cannot write at all (disk full, read-only, I/O).

    Those last until an operator acts, unlike a locked database or a passing failure.
    """
    if isinstance(exc, StoreUnavailable):
        return True
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc).lower()
        return any(reason in text for reason in _STORE_OUTAGE_REASONS)
    return False


def _field_name(key: str) -> str:
    """Return a client-supplied field name safe and short enough to echo in an error."""
    return key[:64]


def _ticket_json(status: TicketStatus) -> dict[str, Any]:
    """Return the JSON-ready dict of a ticket status, datetimes as ISO 8601 UTC."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(status):
        value = getattr(status, f.name)
        out[f.name] = _iso(value) if isinstance(value, datetime) else value
    return out


def _iso(value: datetime) -> str:
    """Return value as ISO 8601 in UTC with a Z suffix (naive values are taken as UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _json(status: int, body: dict[str, Any], extra: dict[str, str] | None = None) -> web.Response:
    """Return a JSON response with the security headers.

    Non-ASCII is escaped and so are <, > and &, so even a client-chosen field name
    echoed in an error cannot become markup if something renders the answer.
    """
    text = _COMPACT.encode(body)
    if "<" in text or ">" in text or "&" in text:
        text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    headers = _JSON_HEADERS if extra is None else {**_JSON_HEADERS, **extra}
    return web.Response(status=status, body=text.encode("ascii"), headers=headers)


def _error(status: int, code: str, message: str, field: str | None = None) -> web.Response:
    """Return the JSON error answer {"error": {"code", "message"[, "field"]}}."""
    error: dict[str, str] = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    return _json(status, {"error": error})


def _store_unavailable() -> Rejected:
    """Return the 503 rejection while the store cannot write."""
    return Rejected(
        503,
        "unavailable",
        "the message cannot be stored now; retry later",
        retry_after=RETRY_AFTER_STORE,
    )


def _origin_rejected() -> Rejected:
    """Return the 403 rejection of a page whose origin is not allowed."""
    return Rejected(403, "origin_not_allowed", "this origin may not use this channel")


def _too_large(limit: int) -> _Rejected:
    """Return the 413 rejection for a body over limit bytes."""
    return _Rejected(413, "payload_too_large", f"the body must be at most {limit} bytes")


def _unavailable(message: str, retry_after: str) -> web.Response:
    """Return 503 with Retry-After; the connection is closed so the client reconnects."""
    response = _json(
        503,
        {"error": {"code": "unavailable", "message": message}},
        {"Retry-After": retry_after},
    )
    response.force_close()
    return response


def _not_found() -> web.Response:
    """Return the one 404 answer (unknown ticket, wrong token and unknown path alike)."""
    return _json(404, {"error": {"code": "not_found", "message": "not found"}})


def _method_not_allowed(allowed: str) -> web.Response:
    """Return 405 naming the allowed method."""
    return _json(
        405,
        {"error": {"code": "method_not_allowed", "message": f"use {allowed}"}},
        {"Allow": allowed},
    )
