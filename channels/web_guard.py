"""Abuse controls and counters of the web channel: buckets, origins, addresses, headers."""

from __future__ import annotations

import functools
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from router.metrics import Metrics

# Every HTML page: scripts and styles only from files we serve (no inline code), no
# framing, no plugins, forms and fetches only back to us.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": PAGE_CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Status links carry the status token in the query: never send it on as a referrer.
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",
    "Server": "omnirouter",
}


class TokenBuckets:
    """One token bucket per key (an IP, a conversation), at most `max_keys` of them.

    A bucket holds `burst` tokens and refills at `rate` per second. The least recently
    used keys are dropped past `max_keys`, so a flood of addresses costs bounded memory
    (a dropped key starts again with a full bucket, which only helps the flood a little).
    """

    def __init__(
        self,
        rate: float,
        burst: float,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Start with no buckets; rate 0 turns the limit off."""
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, cost: float = 1.0) -> float:
        """Take `cost` tokens; return 0 when allowed, else seconds until they would be there."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= cost:
            tokens -= cost
        else:
            wait = (cost - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait


_SEEN_MAX = 4096  # addresses whose answer a Networks keeps


class Networks:
    """A set of IP networks (exempt from limits, trusted proxies)."""

    def __init__(self, cidrs: Iterable[str]) -> None:
        """Parse the networks (validated by the config model already)."""
        self._nets = [ipaddress.ip_network(c, strict=False) for c in cidrs]
        # Answers by textual address: parsing one costs more than the rest of a rate
        # check, and a server sees the same clients and proxies again and again.
        self._lookup = functools.lru_cache(maxsize=_SEEN_MAX)(self._inside)

    def __contains__(self, address: object) -> bool:
        """Return whether the textual address is in one of the networks."""
        if not self._nets or not isinstance(address, str):
            return False
        return self._lookup(address)

    def _inside(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._nets)


def client_ip(request: web.Request, proxies: Networks) -> str:
    """Return the client's address: the peer, or the last hop a trusted proxy names."""
    peer = request.remote or ""
    if peer in proxies:
        forwarded = request.headers.get("X-Forwarded-For", "")
        hops = [h.strip() for h in forwarded.split(",") if h.strip()]
        # Walk back from the nearest hop: the first one that is not a proxy of ours is
        # the client (hops further left were written by the client and prove nothing).
        for hop in reversed(hops):
            if hop not in proxies:
                return hop[:64]
    return peer


def own_origin(request: web.Request) -> str:
    """Return this server's origin as the browser sees it (scheme://host[:port])."""
    return f"{request.scheme}://{request.host}".lower()


def origin_allowed(request: web.Request, allowed: frozenset[str]) -> bool:
    """Return whether the request's Origin is ours or allowed; no Origin is allowed.

    Browsers send Origin on every cross-site request that matters here (POST, WebSocket);
    clients without one (a site's backend, curl) are not browsers a page can drive.
    """
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    origin = origin.strip().lower()
    return origin == own_origin(request) or origin in allowed


class Rejected(Exception):
    """A request the channel refuses; carries the HTTP answer (or the widget's error frame)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        retry_after: str | None = None,
    ) -> None:
        """Keep the answer's parts."""
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.retry_after = retry_after


class WebStats:
    """The channel's counters: Prometheus (when the daemon gives a registry) and /readyz."""

    def __init__(self, channel: str, metrics: Metrics | None) -> None:
        """Start at zero; labelled children are looked up once."""
        self.channel = channel
        self._metrics = metrics
        self.connections = 0
        self.rejected: dict[str, int] = {}
        # Messages in the current and the previous minute (a two-slot sliding count).
        self._minute = 0
        self._this_minute = 0
        self._last_minute = 0
        self._in = self._out = self._gauge = None
        if metrics is not None:
            self._in = metrics.child(metrics.web_messages, channel, "in")
            self._out = metrics.child(metrics.web_messages, channel, "out")
            self._gauge = metrics.child(metrics.web_connections, channel)

    def _tick(self) -> None:
        minute = int(time.monotonic() // 60)
        if minute != self._minute:
            self._last_minute = self._this_minute if minute == self._minute + 1 else 0
            self._this_minute = 0
            self._minute = minute
        self._this_minute += 1

    def message_in(self) -> None:
        """Count a message a customer sent."""
        self._tick()
        if self._in is not None:
            self._in.inc()

    def message_out(self) -> None:
        """Count an acknowledgement or reply stored for a customer."""
        self._tick()
        if self._out is not None:
            self._out.inc()

    def connected(self, delta: int) -> None:
        """Count a widget WebSocket opened (+1) or closed (-1)."""
        self.connections += delta
        if self._gauge is not None:
            self._gauge.set(self.connections)

    def reject(self, reason: str) -> None:
        """Count a refused request or widget message by reason."""
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        if self._metrics is not None:
            self._metrics.child(self._metrics.web_rejected, self.channel, reason).inc()

    def details(self) -> dict[str, Any]:
        """Return the figures /readyz shows for the channel."""
        minute = int(time.monotonic() // 60)
        if minute == self._minute:
            this, last = self._this_minute, self._last_minute
        elif minute == self._minute + 1:
            this, last = 0, self._this_minute
        else:
            this, last = 0, 0
        return {
            "websockets": self.connections,
            "messages_last_minute": last,
            "messages_this_minute": this,
            "rejected": dict(self.rejected),
        }
