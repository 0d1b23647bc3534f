"""Webhook agent tool: an HMAC-signed HTTP POST of each delivery to the agent's endpoint.

The body is the delivery JSON (schema `omnirouter.delivery/1`). The receiver checks
`X-Omnirouter-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>." + body)>`
with `X-Omnirouter-Timestamp`; `verify_signature` below is the reference check and
what a Python receiver can import. Redirects are not followed: a signed body must
not be replayed to wherever a 3xx points.

Responses map onto the driver taxonomy in `_check_response` and `_translate`, the
only two places that know about HTTP and aiohttp errors.

A circuit breaker keeps an outage from turning the backlog into dead letters:
`breaker_threshold` consecutive transient failures (no connection, 5xx, timeouts)
open it, and the state becomes TRANSIENT_DISCONNECT, which the outbox takes as
"hold the items without spending attempts" (as with a lost MQTT broker) and /readyz
shows. While it is open, `run()` sends one HEAD probe to the failing URL after each
cool-down (full jitter, doubling from `breaker_probe_min` up to `breaker_probe_max`);
any answer that is not a 5xx, 408 or 425 closes it, as does any delivery still in
flight that gets an answer. A probe carries no delivery and no signature.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar, Literal, Protocol
from urllib.parse import quote, urlsplit

import aiohttp
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from router import __version__
from router.actions import ActionError, parse_action
from router.backoff import backoff_delay
from router.delivery import encode_delivery
from router.drivers import (
    AGENT_ID_RE,
    NAME_RE,
    ActionSink,
    AgentToolBase,
    Delivery,
    DriverContext,
    DriverError,
    DriverState,
    PermanentError,
    RateLimited,
    TimedOut,
    TransientError,
)

SIGNATURE_PREFIX = "sha256="
TOLERANCE = 300  # seconds a signed request is good for (both directions)
CALLBACK_MAX_BYTES = 64 * 1024
STANDARD_SECRET_PREFIX = "whsec_"  # Standard Webhooks: the key is base64 after this prefix
DEFAULT_RETRY_AFTER = 30.0
MAX_RETRY_AFTER = 3600.0  # a peer asking for more than an hour is ignored down to an hour
_SNIPPET = 200  # at most this much of an error response body goes into the error message
_READ_LIMIT = 64 * 1024  # response bodies are read up to this, only to keep the connection reusable

_SIGNATURE = re.compile(r"sha256=[0-9a-f]{64}")
_AGENT_ID = re.compile(AGENT_ID_RE)
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_RESERVED_HEADERS = frozenset(
    {
        "content-type",
        "content-length",
        "host",
        "user-agent",
        "transfer-encoding",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    }
)


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """Return the signature header value: "sha256=" + hex HMAC-SHA256(secret, "<ts>." + body)."""
    mac = hmac.new(secret, f"{timestamp}.".encode("ascii") + body, hashlib.sha256)
    return SIGNATURE_PREFIX + mac.hexdigest()


def standard_key(secret: str) -> bytes:
    """Return the HMAC key in a Standard Webhooks secret `whsec_<base64>`; raise if malformed."""
    if not secret.startswith(STANDARD_SECRET_PREFIX):
        raise ValueError("a Standard Webhooks secret starts with whsec_ (whsec_<base64 key>)")
    try:
        key = base64.b64decode(secret[len(STANDARD_SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a Standard Webhooks secret is whsec_ followed by base64") from None
    if len(key) < 16:
        raise ValueError("a Standard Webhooks key should be at least 16 bytes (24 recommended)")
    return key


def sign_standard(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """Return the Standard Webhooks `webhook-signature`: "v1," + base64 HMAC of "id.ts.body"."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")


def verify_signature(
    secret: bytes,
    timestamp_header: str,
    body: bytes,
    signature_header: str,
    *,
    now: float | None = None,
    tolerance: int = 300,
) -> bool:
    """Return True if the signature matches and the timestamp is within tolerance seconds of now."""
    if not isinstance(timestamp_header, str) or not isinstance(signature_header, str):
        return False
    if not _TIMESTAMP.fullmatch(timestamp_header):
        return False
    # Lower-case hex only, exactly as sign() writes it: one canonical form to compare.
    if not _SIGNATURE.fullmatch(signature_header):
        return False
    timestamp = int(timestamp_header)
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        return False  # stale (a replay) or from the future (a skewed or forged clock)
    expected = sign(secret, timestamp, body)
    return hmac.compare_digest(expected.encode("ascii"), signature_header.encode("ascii"))


def check_url(url: str) -> str:
    """Validate an http(s) URL with a host; return it unchanged."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on a malformed port)
    except ValueError as exc:
        raise ValueError(f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if any(c in url for c in "\r\n\x00 "):
        raise ValueError("must not contain spaces or control characters")
    if parts.username is not None or parts.password is not None:
        # URL fields are not secret: credentials belong in `headers` (e.g. Authorization).
        raise ValueError("must not contain user:password@; put credentials in headers")
    return url


def safe_url(url: str) -> str:
    """Return only scheme://host:port of url, for logs and error messages.

    Paths and queries of webhook URLs often carry tokens (Slack-style
    /services/T…/B…/secret), so neither is ever shown.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<invalid url>"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}"


class WebhookConfig(BaseModel):
    """Settings of one webhook adapter."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["webhook"]
    name: str = Field(pattern=NAME_RE)
    # May hold {agent_id} (the agent's id) and {address} (address, else agent id),
    # URL-quoted on substitution. A delivery whose address is a full http(s) URL goes there.
    url: str = Field(max_length=2048)
    secret: SecretStr = Field(min_length=1)
    # "omnirouter": X-Omnirouter-Signature (hex HMAC of "<ts>." + body). "standard": the
    # Standard Webhooks headers (webhook-id/-timestamp/-signature), secret `whsec_<base64>`,
    # so receivers can verify with any standardwebhooks library.
    signature: Literal["omnirouter", "standard"] = "omnirouter"
    timeout: float = Field(default=10.0, gt=0, le=300)
    # Extra request headers, e.g. Authorization for a gateway; values are secrets
    # because they usually carry tokens.
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    max_connections: int = Field(default=100, ge=1, le=10000)
    # Consecutive transient failures that open the circuit breaker (see the module doc).
    breaker_threshold: int = Field(default=5, ge=1, le=1000)
    breaker_probe_min: float = Field(default=0.5, gt=0, le=60)  # first probe delay ceiling, s
    breaker_probe_max: float = Field(default=30.0, gt=0, le=3600)  # probe delay cap, s
    # Two-way, when callback_port is set: the receiver POSTs agent actions (JSON with
    # "agent_id" and "action", as on MQTT) to http://callback_host:callback_port
    # {callback_path}, signed with the same secret and scheme as our deliveries.
    # `callback_url` is that endpoint as receivers reach it (e.g. behind a proxy); it is
    # sent with every delivery in X-Omnirouter-Callback.
    callback_port: int | None = Field(default=None, ge=1, le=65535)
    callback_host: str = Field(default="127.0.0.1", min_length=1, max_length=253)
    callback_path: str = Field(default="/omnirouter/actions", pattern=r"^/[A-Za-z0-9/_.-]{0,200}$")
    callback_url: str = Field(default="", max_length=2048)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        """Accept only http(s) URLs with a host."""
        return check_url(value)

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        """Reject header names that are not HTTP tokens, CR/LF in values, and headers we own."""
        for name, secret in value.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"header name {name!r} is not a valid HTTP token")
            lower = name.lower()
            if lower in _RESERVED_HEADERS or lower.startswith("x-omnirouter-"):
                raise ValueError(f"header {name!r} is set by the adapter and cannot be overridden")
            if any(c in secret.get_secret_value() for c in "\r\n\x00"):
                raise ValueError(f"header {name!r} value must not contain CR, LF or NUL")
        return value

    @model_validator(mode="after")
    def _probe_bounds(self) -> WebhookConfig:
        """Require breaker_probe_min <= breaker_probe_max and a whsec_ secret for "standard"."""
        if self.breaker_probe_min > self.breaker_probe_max:
            raise ValueError("breaker_probe_min must not exceed breaker_probe_max")
        if self.callback_url:
            check_url(self.callback_url)
            if self.callback_port is None:
                raise ValueError("callback_url needs callback_port (where the router listens)")
        if self.signature == "standard":
            standard_key(self.secret.get_secret_value())  # raises on a malformed secret
        return self


class PostSettings(Protocol):
    """What HttpPostTool needs from a config: timeouts, pool size and breaker bounds."""

    @property
    def timeout(self) -> float: ...
    @property
    def max_connections(self) -> int: ...
    @property
    def breaker_threshold(self) -> int: ...
    @property
    def breaker_probe_min(self) -> float: ...
    @property
    def breaker_probe_max(self) -> float: ...


class HttpPostTool(AgentToolBase):
    """Base of agent tools that POST each delivery: session, error mapping, circuit breaker.

    Subclasses build the URL, body and headers in `deliver` and hand them to `_post`;
    a service that reports failures inside a 2xx answer overrides `_check_answer`.
    """

    def __init__(
        self, name: str, settings: PostSettings, ctx: DriverContext, headers: Mapping[str, str]
    ) -> None:
        """Prepare the tool; the HTTP session is created on first use."""
        super().__init__(name, ctx)
        self.settings = settings
        self.clock: Callable[[], float] = time.time  # injectable for tests
        self.sleep: Callable[[float], Awaitable[object]] = asyncio.sleep  # injectable for tests
        self._failures = 0  # consecutive transient failures, for the breaker
        self._tripped = asyncio.Event()  # set when the breaker opens: run() starts probing
        self._probe_url = ""  # the URL whose failures opened the breaker
        self._session: aiohttp.ClientSession | None = None
        self._stopped = False
        self._static_headers = {
            "Content-Type": "application/json",
            "User-Agent": f"omnirouter/{__version__}",
            **headers,
        }

    async def run(self, actions: ActionSink) -> None:
        """Open the HTTP session and live until cancelled, probing while the breaker is open."""
        self._stopped = False
        self._ensure_session()
        self._failures = 0
        self._set_state(DriverState.CONNECTED)
        try:
            # Outgoing only: the only work here is closing the breaker.
            while True:
                await self._tripped.wait()
                # Cleared before probing, so an opening after the probes end is not missed.
                self._tripped.clear()
                await self._probe_until_answered()
        finally:
            self._set_state(DriverState.STOPPED)

    async def _run_with_callbacks(
        self,
        actions: ActionSink,
        where: tuple[str, int, str],
        max_bytes: int,
        handler: Callable[[web.Request, ActionSink], Awaitable[web.StreamResponse]],
    ) -> None:
        """Serve POST callbacks at (host, port, path) to `handler` while `run` keeps the breaker.

        The tools whose receivers answer back (a webhook's callback, Slack's buttons)
        listen here; a port that cannot be bound parks the tool with the reason.
        """
        host, port, path = where
        app = web.Application(client_max_size=max_bytes)

        async def callback(request: web.Request) -> web.StreamResponse:
            return await handler(request, actions)

        app.router.add_post(path, callback)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            try:
                await web.TCPSite(runner, host, port).start()
            except OSError as exc:
                self.last_error = f"cannot listen for callbacks on port {port}: {exc.strerror}"
                raise PermanentError(self.last_error) from None
            await HttpPostTool.run(self, actions)
        finally:
            await runner.cleanup()

    async def _post(self, url: str, body: bytes, headers: Mapping[str, str]) -> None:
        """POST body and return on an accepted answer; raise by the taxonomy otherwise."""
        session = self._ensure_session()
        try:
            async with session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
                status = resp.status
                snippet = b""
                if not 200 <= status < 300:
                    snippet = await resp.content.read(_SNIPPET)
                    self._check_response(url, status, resp.headers, snippet)
                # Read (also to drain, so the connection is reused) and let the subclass
                # look for an error reported inside a 2xx answer.
                self._check_answer(url, await resp.content.read(_READ_LIMIT))
        except DriverError as exc:  # from the checks: already in the taxonomy
            self.last_error = str(exc)
            if _target_failing(exc):
                self._failed(url, exc)
            else:
                self._answered()
            raise
        except Exception as exc:
            error = self._translate(url, exc)
            self.last_error = str(error)
            if _target_failing(error):
                self._failed(url, error)
            raise error from None  # not `from exc`: its text may carry the full URL
        self._succeeded()
        self._answered()

    def _check_answer(self, url: str, answer: bytes) -> None:
        """Raise if a 2xx answer reports a failure; plain webhooks take any 2xx as success."""

    async def stop(self) -> None:
        """Close the HTTP session; deliveries not yet answered stay in the outbox."""
        self._stopped = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        self._set_state(DriverState.STOPPED)

    # -- circuit breaker -------------------------------------------------------

    def _failed(self, url: str, error: Exception) -> None:
        """Count a transient failure of the target; open the breaker at the threshold."""
        self._failures += 1
        self._probe_url = url
        if (
            self._failures >= self.settings.breaker_threshold
            and self.state == DriverState.CONNECTED
        ):
            self._set_state(DriverState.TRANSIENT_DISCONNECT, str(error))
            self._tripped.set()

    def _answered(self) -> None:
        """Note that the target answered: reset the count and close the breaker."""
        self._failures = 0
        if self.state == DriverState.TRANSIENT_DISCONNECT:
            self._set_state(DriverState.CONNECTED)

    async def _probe_until_answered(self) -> None:
        """Probe the failing URL after each jittered, capped cool-down until it answers."""
        probes = 0
        while self.state == DriverState.TRANSIENT_DISCONNECT:
            await self.sleep(
                backoff_delay(
                    probes, self.settings.breaker_probe_min, self.settings.breaker_probe_max
                )
            )
            probes += 1
            if self.state != DriverState.TRANSIENT_DISCONNECT:
                return  # a delivery that was in flight got an answer and closed it
            error = await self._probe(self._probe_url)
            if error is None:
                self._answered()
            else:
                self.last_error = str(error)

    async def _probe(self, url: str) -> Exception | None:
        """Send one HEAD to url (half-open); return None if the receiver answers, else why not."""
        session = self._ensure_session()
        try:
            async with session.head(url, allow_redirects=False) as resp:
                status = resp.status
        except Exception as exc:
            return self._translate(url, exc)
        # Any other answer (405 for HEAD, 401 without a signature, …) shows it is back.
        if status in (408, 425) or status >= 500:
            return TransientError(f"webhook {safe_url(url)} answered {status} to a probe")
        return None

    # -- helpers ---------------------------------------------------------------

    def _ensure_session(self) -> aiohttp.ClientSession:
        """Return the tool's ClientSession, creating it on first use."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.settings.max_connections),
                # `total` also counts waiting for a free pooled connection, so a
                # slow receiver under load shows up as TimedOut rather than a hang.
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout),
                headers=self._static_headers,
                # Proxies from the environment are an unreviewed path for signed bodies.
                trust_env=False,
            )
        return self._session

    def _check_response(
        self, url: str, status: int, headers: Mapping[str, str], snippet: bytes
    ) -> None:
        """Raise the taxonomy error a non-2xx status means."""
        if 200 <= status < 300:
            return
        where = safe_url(url)
        text = _printable(snippet)
        if status == 429:
            retry_after = _retry_after(headers.get("Retry-After"), self.clock())
            raise RateLimited(
                f"webhook {where} answered 429, retry after {retry_after:g} s", retry_after
            )
        if status in (408, 425) or status >= 500:
            raise TransientError(f"webhook {where} answered {status}: {text}")
        if 300 <= status < 400:
            location = _printable(headers.get("Location", "").encode("utf-8", "replace"))
            raise PermanentError(
                f"webhook {where} answered {status} redirect to {location!r}; redirects are not "
                "followed, configure the final URL"
            )
        raise PermanentError(f"webhook {where} answered {status}: {text}")

    def _translate(self, url: str, exc: Exception) -> Exception:
        """Map an aiohttp/OS error into the taxonomy, without the URL's query or user info."""
        where = safe_url(url)
        if isinstance(exc, TimeoutError):  # aiohttp's timeouts all subclass it
            return TimedOut(f"webhook {where}: no answer within {self.settings.timeout:g} s")
        if isinstance(exc, aiohttp.InvalidURL):
            return PermanentError(f"webhook {where}: invalid URL")
        if isinstance(exc, aiohttp.ClientConnectorError):
            return TransientError(
                f"webhook {where}: cannot connect: {exc.os_error.strerror or exc.os_error}"
            )
        if isinstance(exc, aiohttp.ClientError | OSError):
            return TransientError(f"webhook {where}: {type(exc).__name__}")
        if isinstance(exc, ValueError):
            # aiohttp refuses to build the request (e.g. conflicting auth): resending cannot help.
            return PermanentError(f"webhook {where}: request rejected before sending: {exc}")
        return TransientError(f"webhook {where}: unexpected {type(exc).__name__}")


class WebhookTool(HttpPostTool):
    """POST each delivery, signed, to the agent's webhook; map the answer to the error taxonomy.

    With `callback_port` set, it also listens for agent actions the receiver POSTs back
    (signed like our deliveries, within the timestamp tolerance, each signature taken
    once); the router accepts them only for agents whose tool this webhook is.
    """

    config_model: ClassVar[type[WebhookConfig]] = WebhookConfig
    sends_actions = False  # outgoing only unless a callback is configured: see actions_enabled
    # Callbacks are signed with the webhook's one secret, not per agent: the router takes
    # them only for agents whose tool this webhook is (router.pipeline.actions_from).
    acts_only_for_its_agents = True

    @classmethod
    def actions_enabled(cls, config: Any) -> bool:
        """A webhook sends actions back when its callback endpoint is configured."""
        return isinstance(config, WebhookConfig) and config.callback_port is not None

    def __init__(self, name: str, config: WebhookConfig, ctx: DriverContext) -> None:
        """Prepare the tool; the HTTP session is created on first use."""
        headers = {k: v.get_secret_value() for k, v in config.headers.items()}
        super().__init__(name, config, ctx, headers)
        self.config = config
        secret = config.secret.get_secret_value()
        self._secret = secret.encode("utf-8")
        self._standard_key = standard_key(secret) if config.signature == "standard" else b""
        self._seen_signatures: dict[str, float] = {}  # callback replay guard: signature -> ts
        port = config.callback_port
        self.callback_url = config.callback_url or (
            f"http://{config.callback_host}:{port}{config.callback_path}" if port else ""
        )

    async def run(self, actions: ActionSink) -> None:
        """Serve the callback endpoint (when configured) and keep the breaker, until cancelled."""
        cfg = self.config
        if cfg.callback_port is None:
            await super().run(actions)
            return
        where = (cfg.callback_host, cfg.callback_port, cfg.callback_path)
        await self._run_with_callbacks(actions, where, CALLBACK_MAX_BYTES, self._callback)

    async def _callback(self, request: web.Request, actions: ActionSink) -> web.Response:
        """Verify one signed action from the receiver and hand it to the router."""
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _answer(413, "too_large", f"an action is at most {CALLBACK_MAX_BYTES} bytes")
        signature = self._verify_callback(request.headers, body)
        if signature is None:
            self.log.warning("webhook.callback_rejected", reason="bad, stale or replayed signature")
            return _answer(401, "bad_signature", "the signature does not match, is stale or reused")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return _answer(400, "invalid_json", "the body is not UTF-8 JSON")
        agent_id = data.get("agent_id") if isinstance(data, dict) else None
        if not isinstance(agent_id, str) or not _AGENT_ID.fullmatch(agent_id):
            return _answer(400, "invalid_agent", 'name the acting agent: {"agent_id": "alice"}')
        try:
            action = parse_action(agent_id, body, max_bytes=CALLBACK_MAX_BYTES)
        except ActionError as exc:
            # Refused by the router too, so the agent hears why (a `notice` delivery).
            action = exc.as_action(agent_id)
        await actions(action)
        # The outcome reaches the agent as a `notice` when it is refused.
        return _answer(202, "", "", action=action.action, agent_id=agent_id)

    def _verify_callback(self, headers: Mapping[str, str], body: bytes) -> str | None:
        """Return the request's signature when it is valid and new, else None."""
        now = self.clock()
        if self.config.signature == "standard":
            msg_id = headers.get("webhook-id", "")
            stamp = headers.get("webhook-timestamp", "")
            given = headers.get("webhook-signature", "")
            if not (msg_id and _TIMESTAMP.fullmatch(stamp)) or abs(now - int(stamp)) > TOLERANCE:
                return None
            expected = sign_standard(self._standard_key, msg_id, int(stamp), body).encode()
            # The header may list several space-separated signatures (key rotation).
            if not any(hmac.compare_digest(expected, g.encode()) for g in given.split()):
                return None
            key = f"id:{msg_id}"
        else:
            stamp = headers.get("X-Omnirouter-Timestamp", "")
            given = headers.get("X-Omnirouter-Signature", "")
            if not verify_signature(self._secret, stamp, body, given, now=now):
                return None
            key = given
        # A signed request is good for TOLERANCE seconds: take each one once. The dict is
        # in arrival order, so the expired ones are at its front.
        seen = self._seen_signatures
        while seen and next(iter(seen.values())) < now - 2 * TOLERANCE:
            del seen[next(iter(seen))]
        if key in self._seen_signatures:
            return None
        self._seen_signatures[key] = now
        return key

    async def deliver(self, delivery: Delivery) -> None:
        """POST the signed delivery and return on a 2xx answer; raise by the taxonomy otherwise."""
        if self._stopped:
            raise TransientError(f"webhook {self.name} is stopped")
        url = self._url_for(delivery)
        body = encode_delivery(delivery)
        timestamp = int(self.clock())
        headers = {"X-Omnirouter-Delivery": delivery.id}
        if self.config.signature == "standard":
            headers["webhook-id"] = delivery.id  # the same on every retry: receivers dedupe on it
            headers["webhook-timestamp"] = str(timestamp)
            headers["webhook-signature"] = sign_standard(
                self._standard_key, delivery.id, timestamp, body
            )
        else:
            headers["X-Omnirouter-Timestamp"] = str(timestamp)
            headers["X-Omnirouter-Signature"] = sign(self._secret, timestamp, body)
        if self.callback_url:
            headers["X-Omnirouter-Callback"] = self.callback_url
        await self._post(url, body, headers)

    def _url_for(self, delivery: Delivery) -> str:
        """Return the URL for this delivery: its address if that is a URL, else the template."""
        return url_for(self.config.url, delivery)


def url_for(template: str, delivery: Delivery) -> str:
    """Return where a delivery goes: its address if that is a URL, else the filled template."""
    address = delivery.address
    if address.startswith(("http://", "https://")):
        try:
            return check_url(address)
        except ValueError as exc:
            raise PermanentError(f"webhook: agent address is not a usable URL: {exc}") from None
    url = template
    if "{" in url:
        url = url.replace("{agent_id}", quote(delivery.agent_id, safe=""))
        url = url.replace("{address}", quote(address or delivery.agent_id, safe=""))
    return url


def _answer(status: int, code: str, message: str, **fields: str) -> web.Response:
    """Return a JSON answer for the callback endpoint."""
    body: dict[str, Any] = {"error": {"code": code, "message": message}} if code else fields
    return web.json_response(body, status=status)


def _target_failing(error: Exception) -> bool:
    """Return whether error says the target is failing (not a 429: that one answered)."""
    return isinstance(error, TransientError) and not isinstance(error, RateLimited)


def _retry_after(value: str | None, now: float) -> float:
    """Parse Retry-After (delta seconds or HTTP date) into seconds, bounded; default 30."""
    if not value:
        return DEFAULT_RETRY_AFTER
    value = value.strip()
    seconds: float
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError, IndexError, OverflowError):
            return DEFAULT_RETRY_AFTER
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _printable(raw: bytes) -> str:
    """Return at most _SNIPPET characters of raw as text with control characters replaced."""
    text = raw[:_SNIPPET].decode("utf-8", "replace")
    return "".join(c if c.isprintable() else " " for c in text).strip()
