"""HTTP hardening shared by the listeners: the web intake channel and the ops API.

aiohttp's defaults trust the client: a request whose headers never finish is kept
for an hour, connections are accepted until the process runs out of descriptors,
and malformed requests are answered in text/plain with a version banner while the
raw header or body bytes (tokens, customer text) go to the log. Each listener here:

* closes a connection that has not sent a complete request head within
  `read_timeout` (aiohttp's keep-alive timer, which also runs before the first
  request), and answers 408 to a body that has not arrived within `read_timeout`;
* holds at most `max_connections` connections: when full, a new connection evicts
  the one that has waited longest without a request in progress (a slow-loris or an
  idle keep-alive), or is closed at once when every connection is busy, so a flood
  costs an accept and a close, never the listener; each listener has its own budget,
  so a flood on the web port leaves `/healthz` answering;
* answers every error, aiohttp's own included, as `{"error": {"code", "message"}}`
  JSON without a `Server` version banner, and logs client mistakes as one debug
  line naming the error class only (never the bytes that caused it);
* refuses compressed request bodies (415) instead of inflating them.

`AcceptErrorLog` keeps the loop's "accept() out of system resource" reports to one
line per interval with a count.
"""

from __future__ import annotations

import asyncio
import errno
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong

from router.drivers import TransientError

log = structlog.get_logger("router.http")

SERVER = "omnirouter"  # the Server header: no Python or aiohttp version for scanners
JSON_HEADERS = {
    "Content-Type": "application/json",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Server": SERVER,
}
# Overload and accept-error reports: at most one line per listener per this many seconds.
REPORT_INTERVAL = 10.0
_ACCEPT_ERROR = "socket.accept() out of system resource"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ListenError(TransientError):
    """A listener could not bind its address (port in use, address not available)."""


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """What one listener allows a client."""

    read_timeout: float = 10.0  # seconds for the request head, and again for the body
    max_connections: int = 512  # open connections at once; more evict idle ones
    max_body_bytes: int = 64 * 1024


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """Return the JSON error answer {"error": {"code", "message"}} with the security headers."""
    body = json.dumps({"error": {"code": code, "message": message}}, separators=(",", ":"))
    return web.Response(
        status=status,
        body=body.encode("ascii"),
        headers=JSON_HEADERS if headers is None else {**JSON_HEADERS, **headers},
    )


def new_app(limits: HttpLimits) -> web.Application:
    """Return an Application that reads bodies within the limits and answers errors as JSON."""
    app = web.Application(
        client_max_size=limits.max_body_bytes, middlewares=[_guard_middleware(limits)]
    )
    app.on_response_prepare.append(_set_server_header)
    return app


async def _set_server_header(request: web.Request, response: web.StreamResponse) -> None:
    """Replace aiohttp's `Server: Python/x aiohttp/y` banner (runs before headers go out)."""
    response.headers["Server"] = SERVER


def _guard_middleware(limits: HttpLimits) -> Any:
    """Return the middleware that reads the body in time and turns HTTP errors into JSON."""
    too_large = f"the body must be at most {limits.max_body_bytes} bytes"

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Read the whole body within read_timeout, then run the handler; errors as JSON."""
        try:
            if request.body_exists:
                encoding = request.headers.get("Content-Encoding", "").strip().lower()
                if encoding not in ("", "identity"):
                    return _closing(
                        error_response(
                            415,
                            "unsupported_encoding",
                            "Content-Encoding must be identity: compressed bodies are not accepted",
                        )
                    )
                length = request.content_length
                if length is not None and length > limits.max_body_bytes:
                    return _closing(error_response(413, "payload_too_large", too_large))
                try:
                    # Cached by aiohttp: the handler's read()/json() return these bytes.
                    async with asyncio.timeout(limits.read_timeout):
                        await request.read()
                except TimeoutError:
                    log.debug("http.body_timeout", path=request.path)
                    return _closing(
                        error_response(408, "request_timeout", "the body did not arrive in time")
                    )
                except (ConnectionError, HttpProcessingError) as exc:
                    # The client hung up or sent a broken body: its problem, not ours. The
                    # answer is best effort (the peer is usually gone).
                    log.debug("http.body_incomplete", path=request.path, error=type(exc).__name__)
                    return _closing(
                        error_response(400, "incomplete_body", "the body was not received whole")
                    )
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            if exc.status == 413:
                return _closing(error_response(413, "payload_too_large", too_large))
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return error_response(exc.status, _status_code(exc.status), exc.reason, headers)

    return guard


def _closing(response: web.Response) -> web.Response:
    """Mark the answer to close the connection (a body may be left unread)."""
    response.force_close()
    return response


def _status_code(status: int) -> str:
    """Return the error code for an HTTP status: its phrase in snake case."""
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


class _Reporter:
    """Count events and log them at most once per interval, with the count."""

    def __init__(self, event: str, interval: float = REPORT_INTERVAL, **fields: Any) -> None:
        """Remember the event name and the fields every line carries."""
        self.event = event
        self.interval = interval
        self.fields = fields
        self.counts: dict[str, int] = {}
        self._next = 0.0
        self._flush: asyncio.TimerHandle | None = None

    def count(self, key: str, **extra: Any) -> None:
        """Count one event; log now if the interval has passed, else by the end of it."""
        self.counts[key] = self.counts.get(key, 0) + 1
        now = time.monotonic()
        if now >= self._next:
            self.report(**extra)
        elif self._flush is None:
            # Whatever is counted before the interval ends is reported then, not lost.
            loop = asyncio.get_running_loop()
            self._flush = loop.call_later(self._next - now, self.report)

    def report(self, **extra: Any) -> None:
        """Log the counts so far in one line and start a new interval."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self.counts:
            log.warning(self.event, **self.fields, **self.counts, **extra, every_s=self.interval)
            self.counts = {}
        self._next = time.monotonic() + self.interval

    def close(self) -> None:
        """Cancel a pending report."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None


class AcceptErrorLog:
    """A loop exception handler that reports accept() failures once per interval.

    When the process runs out of descriptors, asyncio reports every failed accept;
    unlimited, that was 150,000 tracebacks in 31 s. Everything else goes to the
    previous handler (asyncio's default one).
    """

    def __init__(self, interval: float = REPORT_INTERVAL) -> None:
        """Start with nothing counted."""
        self._reporter = _Reporter("http.accept_failed", interval)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Count accept errors; pass every other report on."""
        if context.get("message") != _ACCEPT_ERROR:
            loop.default_exception_handler(context)
            return
        exc = context.get("exception")
        code = getattr(exc, "errno", None)
        name = errno.errorcode.get(code, "error") if isinstance(code, int) else "error"
        self._reporter.count(name)


class _GuardedHandler(web.RequestHandler):
    """aiohttp's connection protocol, answering and logging errors our way."""

    listener = ""

    def is_idle(self) -> bool:
        """Return whether the connection waits for its next request (safe to evict).

        Waiting means aiohttp's read loop is parked on its waiter with nothing queued.
        "No request in progress and none queued" is not enough: between taking a
        request off the queue and the first step of its handler task (a separate task,
        not started eagerly before Python 3.12) both are false, and evicting then lets
        the handler commit the message while its 201 can no longer be sent. A fresh
        connection whose read loop has not started yet is not idle either.
        """
        waiter = self._waiter
        return (
            waiter is not None
            and not waiter.done()
            and not self._messages
            and not self._request_in_progress
        )

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Answer a malformed request or a handler failure in JSON; log without raw bytes."""
        error = type(exc).__name__ if exc is not None else None
        if status >= 500 and not isinstance(exc, HttpProcessingError):
            log.error("http.internal_error", listener=self.listener, status=status, error=error)
            code, text = (
                ("timeout", "the request timed out")
                if status == 504
                else (
                    "internal_error",
                    "internal error",
                )
            )
        else:
            # The exception's text quotes the offending bytes (tokens, customer text).
            log.debug("http.bad_request", listener=self.listener, status=status, error=error)
            code, text = _describe(exc)
        if request.writer.output_size > 0:
            raise ConnectionError("the answer was already started; cannot send an error")
        return _closing(error_response(status, code, text))

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """Log aiohttp's internal failures by class; client breakage only at debug level."""
        exc = kw.get("exc_info")
        error = type(exc).__name__ if isinstance(exc, BaseException) else None
        if isinstance(exc, HttpProcessingError | ConnectionError):
            log.debug("http.client_error", listener=self.listener, error=error)
        else:
            log.error("http.unhandled", listener=self.listener, error=error)


def _describe(exc: BaseException | None) -> tuple[str, str]:
    """Return the code and a fixed message for a malformed request (nothing of its bytes)."""
    if isinstance(exc, BadHttpMethod):
        return "bad_method", "the request method is not valid HTTP"
    if isinstance(exc, LineTooLong):
        return "line_too_long", "a request line or header is too long"
    return "bad_request", "the request is not valid HTTP"


class _GuardedServer(web.Server):
    """aiohttp's connection factory with a connection cap and our protocol class."""

    def __init__(
        self,
        handler: Any,
        *,
        request_factory: Any,
        handler_cancellation: bool,
        name: str,
        limits: HttpLimits,
        handler_args: dict[str, Any],
    ) -> None:
        """Keep the settings; connections are admitted in connection_made."""
        super().__init__(
            handler,
            request_factory=request_factory,
            handler_cancellation=handler_cancellation,
        )
        self.name = name
        self.limits = limits
        self._handler_args = handler_args
        self._live: dict[web.RequestHandler, asyncio.Transport] = {}  # oldest first
        self.reporter = _Reporter(
            "http.overloaded", listener=name, max_connections=limits.max_connections
        )

    def __call__(self) -> web.RequestHandler:
        """Build the protocol for one new connection."""
        handler = _GuardedHandler(self, loop=asyncio.get_running_loop(), **self._handler_args)
        handler.listener = self.name
        return handler

    def connection_made(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        """Admit the connection, making room by evicting an idle one, or close it at once."""
        if len(self._live) >= self.limits.max_connections:
            victim = next(
                (h for h in self._live if isinstance(h, _GuardedHandler) and h.is_idle()), None
            )
            if victim is None:
                # Every connection is busy with a request: refuse without reading anything.
                self.reporter.count("refused")
                transport.abort()
                return
            self.reporter.count("evicted")
            del self._live[victim]
            victim.force_close()
        self._live[handler] = transport
        super().connection_made(handler, transport)

    def connection_lost(
        self, handler: web.RequestHandler, exc: BaseException | None = None
    ) -> None:
        """Forget the connection."""
        self._live.pop(handler, None)
        super().connection_lost(handler, exc)

    async def shutdown(self, timeout: float | None = None) -> None:
        """Close every connection and drop a pending overload report."""
        self.reporter.close()
        await super().shutdown(timeout)


class GuardedRunner(web.AppRunner):
    """An AppRunner whose connections follow the listener's limits (see the module doc)."""

    def __init__(
        self, app: web.Application, *, name: str, limits: HttpLimits, shutdown_timeout: float
    ) -> None:
        """Prepare the runner; nothing listens until a site starts."""
        super().__init__(app, handle_signals=False, shutdown_timeout=shutdown_timeout)
        self._name = name
        self._limits = limits

    async def _make_server(self) -> web.Server:
        """Run the app's startup as AppRunner does, then serve it with our connection factory."""
        plain = await super()._make_server()
        return _GuardedServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            name=self._name,
            limits=self._limits,
            handler_args={
                # No access log: it would hold ?token= status tokens and client addresses.
                "access_log": None,
                # Closes a connection that sends no complete request head in time (the
                # timer runs from the connection's start too, not only between requests).
                "keepalive_timeout": self._limits.read_timeout,
                # How long an unread body is drained after the answer before closing.
                "lingering_time": min(2.0, self._limits.read_timeout),
                # Compressed bodies are refused with 415; never inflate them.
                "auto_decompress": False,
                "max_line_size": 8190,
                "max_field_size": 8190,
                "max_headers": 64,
            },
        )


async def start_site(runner: GuardedRunner, host: str, port: int, what: str) -> int:
    """Listen on host:port; return the bound port or raise ListenError naming what failed."""
    site = web.TCPSite(runner, host, port, backlog=128)
    try:
        await site.start()
    except OSError as exc:
        raise ListenError(
            f"{what}: cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from None
    return int(runner.addresses[-1][1])
