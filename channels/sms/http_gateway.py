"""A generic HTTP SMS gateway (`type = "sms_http"`): Kannel's smsbox, cloud SMS APIs, phones.

Inbound: the gateway calls `{inbound.path}` with GET (query string) or POST (a form
or a flat JSON object) carrying the sender, text and message id under configurable
field names. It proves itself with a shared secret (a field or a header, compared in
constant time) or an HMAC-SHA256 of the raw body (POST) or raw query string (GET) in
a header (hex or base64, optionally prefixed `sha256=`). When the request names a
charset (Kannel's `%C`), the text's bytes are decoded with it; otherwise as UTF-8.
Answered 200 (`inbound.answer` as the body) only after the commit, 503 when the
commit failed so the gateway retries with the same id.

Outbound: one HTTP request per text, built from templates. In `outbound.url` every
field is percent-encoded; in `outbound.body` it is escaped for `body_format` (form:
percent-encoded, json: a JSON string's content, raw: as is). Fields: {to} (E.164),
{to_digits} (without +), {from}, {text}, {coding} (0 for GSM-7, 2 for UCS-2, Kannel's
numbering), {charset} (always UTF-8), {id} (the outbox id: a gateway that dedupes by a
client reference gets the same one on every retry), {username}, {password}.
Success is one of `success_status` and, when set, `success_regex` found in the
answer; 401/403 are AuthFailed, 429 RateLimited (Retry-After obeyed), `retry_status`
TransientError, anything else PermanentError (a dead letter, not a retry storm).

Kannel example (see README.md): get-url
`http://127.0.0.1:8093/sms?secret=...&from=%p&to=%P&text=%a&charset=%C&id=%I`, and
`url = "http://127.0.0.1:13013/cgi-bin/sendsms?username={username}&password={password}
&from={from}&to={to}&text={text}&coding={coding}&charset={charset}"`.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import hashlib
import hmac
import json
import re
import string
import time
from collections.abc import Iterable
from typing import ClassVar, Literal
from urllib.parse import parse_qsl, quote, urlencode, urlparse

import aiohttp
from aiohttp import web
from pydantic import Field, SecretStr, field_validator, model_validator

from channels.sms.common import Frozen, Handler, Rejected, SmsChannelBase, SmsSettings
from channels.sms.twilio import retry_after_seconds
from router.drivers import (
    AuthFailed,
    DriverContext,
    Outbound,
    PermanentError,
    RateLimited,
    TimedOut,
    TransientError,
)
from router.model import new_ulid

TEMPLATE_FIELDS = frozenset(
    {"to", "to_digits", "from", "text", "coding", "charset", "id", "username", "password"}
)
MAX_FIELDS = 200
MAX_ANSWER_BYTES = 64 * 1024
_FIELD_RE = r"^[A-Za-z0-9_.\-\[\]]{1,64}$"
_HEADER_RE = r"^[A-Za-z0-9-]{1,64}$"


def check_template(template: str, what: str) -> str:
    """Refuse a template with unknown fields, attribute access or format specs."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"{what} is not a valid template: {exc}") from None
    for _, field, spec, conversion in parsed:
        if field is not None and (field not in TEMPLATE_FIELDS or spec or conversion):
            raise ValueError(
                f"{what}: field {{{field}}} is not allowed; use "
                + " ".join(f"{{{f}}}" for f in sorted(TEMPLATE_FIELDS))
            )
    return template


class InboundSettings(Frozen):
    """How the gateway calls us with a customer's text."""

    path: str = Field(default="/sms", pattern=r"^/[A-Za-z0-9._~/-]{0,200}$")
    method: Literal["GET", "POST", "any"] = "any"
    from_field: str = Field(default="from", pattern=_FIELD_RE)
    to_field: str = Field(default="to", pattern=_FIELD_RE)
    text_field: str = Field(default="text", pattern=_FIELD_RE)
    # The gateway's message id (dedupes its retries). "": none, each request is new.
    id_field: str = Field(default="id", pattern=r"^([A-Za-z0-9_.\-\[\]]{1,64})?$")
    # A field naming the text's charset (Kannel's %C); "": the text is always UTF-8.
    charset_field: str = Field(default="charset", pattern=r"^([A-Za-z0-9_.\-\[\]]{1,64})?$")
    auth: Literal["secret", "hmac", "none"] = "secret"
    secret: SecretStr | None = None
    secret_field: str = Field(default="secret", pattern=_FIELD_RE)  # auth = "secret"
    secret_header: str = Field(default="", pattern=r"^([A-Za-z0-9-]{1,64})?$")  # or a header
    signature_header: str = Field(default="X-Signature", pattern=_HEADER_RE)  # auth = "hmac"
    answer: str = Field(default="", max_length=1000)  # body of the 200 answer

    @model_validator(mode="after")
    def _check(self) -> InboundSettings:
        """Require a secret unless auth is off."""
        if self.auth != "none" and (
            self.secret is None or len(self.secret.get_secret_value()) < 16
        ):
            raise ValueError(f'auth = "{self.auth}" needs a secret of at least 16 characters')
        return self


class OutboundSettings(Frozen):
    """The request that hands one text to the gateway."""

    method: Literal["GET", "POST"] = "GET"
    url: str = Field(min_length=8, max_length=2000)
    body: str = Field(default="", max_length=10_000)
    body_format: Literal["form", "json", "raw"] = "form"
    from_number: str = Field(default="", max_length=40)  # the sender id the gateway expects
    username: str = Field(default="", max_length=200)
    password: SecretStr | None = None
    basic_auth: bool = False  # also send username and password as HTTP Basic auth
    headers: dict[str, SecretStr] = Field(default_factory=dict, max_length=20)
    success_status: tuple[int, ...] = Field(default=(200, 201, 202), min_length=1)
    success_regex: str = Field(default="", max_length=500)
    retry_status: tuple[int, ...] = (408, 425, 500, 502, 503, 504)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        """Check the template and that it names an http(s) URL."""
        check_template(value, "url")
        parsed = urlparse(value.replace("{", "").replace("}", ""))
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError("url must be an http(s) URL")
        return value

    @field_validator("body")
    @classmethod
    def _body(cls, value: str) -> str:
        """Check the body template's fields."""
        return check_template(value, "body")

    @field_validator("success_regex")
    @classmethod
    def _regex(cls, value: str) -> str:
        """Refuse a regular expression that does not compile."""
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        """Refuse header names that are not tokens and values with line breaks."""
        for name, v in value.items():
            if not re.fullmatch(_HEADER_RE, name):
                raise ValueError(f"header name {name!r} is not allowed")
            if re.search(r"[\r\n\x00]", v.get_secret_value()):
                raise ValueError(f"header {name}: line breaks are not allowed")
        return value


class HttpSmsConfig(SmsSettings):
    """Settings of one generic HTTP SMS gateway channel."""

    type: Literal["sms_http"]
    inbound: InboundSettings = Field(default_factory=lambda: InboundSettings(auth="none"))
    outbound: OutboundSettings

    @model_validator(mode="after")
    def _open_only_on_loopback(self) -> HttpSmsConfig:
        """Refuse unauthenticated webhooks on anything but a loopback listener."""
        if self.inbound.auth == "none" and self.host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError('inbound.auth = "none" is only allowed on a loopback host')
        return self


# -- requests -------------------------------------------------------------------------


def _pairs(raw: str) -> list[tuple[str, bytes]]:
    """Return the (key, value bytes) pairs of a query string or form; Rejected when malformed."""
    try:
        pairs = parse_qsl(
            raw,
            keep_blank_values=True,
            strict_parsing=True,
            encoding="latin-1",  # byte-transparent: values are decoded later, per charset
            max_num_fields=MAX_FIELDS,
        )
    except ValueError:
        raise Rejected(400, "malformed_form", "the query or form is malformed") from None
    return [(k, v.encode("latin-1")) for k, v in pairs]


def _codec(charset: str) -> str:
    """Return the Python codec of a charset name (unknown or 8-BIT: UTF-8)."""
    try:
        return codecs.lookup(charset).name if charset else "utf-8"
    except LookupError:
        return "utf-8"


class HttpSmsChannel(SmsChannelBase):
    """Webhooks in from a generic SMS gateway, a templated HTTP request out."""

    config_model: ClassVar[type[HttpSmsConfig]] = HttpSmsConfig
    kind: ClassVar[str] = "sms_http"

    @property
    def sender_verified(self) -> bool:
        """Senders are authenticated when the gateway's webhook is (a secret or an HMAC)."""
        return self.config.inbound.auth != "none"

    def __init__(self, name: str, config: HttpSmsConfig, ctx: DriverContext) -> None:
        """Prepare the channel; nothing listens until run()."""
        super().__init__(name, config, ctx)
        self.config = config
        inbound = config.inbound
        self._secret = inbound.secret.get_secret_value().encode() if inbound.secret else b""
        self._success = re.compile(config.outbound.success_regex)
        self._session: aiohttp.ClientSession | None = None

    def routes(self) -> Iterable[tuple[str, str, Handler]]:
        """Return the inbound endpoint."""
        return (("*", self.config.inbound.path, self._inbound),)

    async def closing(self) -> None:
        """Close the HTTP client session."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def stop(self) -> None:
        """Stop the listener and close the HTTP client."""
        await super().stop()
        await self.closing()

    def _client(self) -> aiohttp.ClientSession:
        """Return the channel's HTTP client, creating it on first use."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers={"User-Agent": "omnirouter"})
        return self._session

    # -- inbound --------------------------------------------------------------------

    async def _inbound(self, request: web.Request) -> web.StreamResponse:
        """Take one inbound text: authenticate, decode, commit, then answer 200."""
        cfg = self.config.inbound
        if cfg.method != "any" and request.method != cfg.method:
            raise Rejected(405, "method_not_allowed", f"use {cfg.method}")
        if request.method not in ("GET", "POST"):
            raise Rejected(405, "method_not_allowed", "use GET or POST")
        query = request.rel_url.raw_query_string
        params = _pairs(query) if query else []
        body = b""
        if request.method == "POST":
            body = await self._read(request)
            params += self._body_pairs(request, body)
        self._authenticate(request, params, body if request.method == "POST" else query.encode())
        values: dict[str, bytes] = {}
        for key, value in params:
            if key in values and values[key] != value:
                raise Rejected(400, "ambiguous_field", f"{key} is given more than once")
            values[key] = value
        sender = self._field(values, cfg.from_field, "utf-8")
        if sender is None:
            raise Rejected(400, "missing_field", f"{cfg.from_field} is missing")
        number = self.number(sender, cfg.from_field)
        charset = self._field(values, cfg.charset_field, "utf-8") if cfg.charset_field else None
        text = self.text(self._field(values, cfg.text_field, _codec(charset or "")) or "")
        recipient = self._field(values, cfg.to_field, "utf-8") or ""
        external_id = self._field(values, cfg.id_field, "utf-8") if cfg.id_field else ""
        if cfg.id_field and not external_id:
            raise Rejected(400, "missing_field", f"{cfg.id_field} is missing")
        if len(external_id or "") > 200:
            raise Rejected(400, "invalid_field", f"{cfg.id_field} is over 200 characters")
        digest = hashlib.sha256(json.dumps([number, recipient, text]).encode()).hexdigest()
        kept = {cfg.from_field, cfg.to_field, cfg.text_field, cfg.id_field} - {""}
        raw = urlencode([(k, v) for k, v in params if k in kept]).encode()
        await self.ingest(
            external_id=external_id or new_ulid(),
            number=number,
            text=text,
            payload_sha256=digest,
            raw=raw,
        )
        return web.Response(status=200, text=cfg.answer)

    async def _read(self, request: web.Request) -> bytes:
        """Read a POST body within max_body_bytes (413 otherwise)."""
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise Rejected(413, "payload_too_large", f"the body must be at most {limit} bytes")
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise Rejected(
                413, "payload_too_large", f"the body must be at most {limit} bytes"
            ) from None

    def _body_pairs(self, request: web.Request, body: bytes) -> list[tuple[str, bytes]]:
        """Return the fields of a form or flat JSON body."""
        if request.content_type == "application/x-www-form-urlencoded":
            return _pairs(body.decode("latin-1"))
        if request.content_type == "application/json":
            try:
                document = json.loads(body.decode("utf-8"))
            except UnicodeDecodeError:
                raise Rejected(400, "invalid_encoding", "the body is not valid UTF-8") from None
            except (ValueError, RecursionError):
                raise Rejected(400, "invalid_json", "the body is not valid JSON") from None
            if not isinstance(document, dict):
                raise Rejected(400, "invalid_body", "the body must be a JSON object")
            return [
                (str(k), str(v).encode("utf-8", "surrogatepass"))
                for k, v in document.items()
                if isinstance(v, str | int | float) and not isinstance(v, bool)
            ]
        raise Rejected(415, "unsupported_media_type", "expected a form or a JSON object")

    def _authenticate(
        self, request: web.Request, params: list[tuple[str, bytes]], signed: bytes
    ) -> None:
        """Check the shared secret or HMAC; raise a 403 (nothing stored) when wrong."""
        cfg = self.config.inbound
        if cfg.auth == "none":
            return
        if cfg.auth == "secret":
            if cfg.secret_header:
                given = request.headers.get(cfg.secret_header, "").encode("utf-8", "replace")
            else:
                given = next((v for k, v in params if k == cfg.secret_field), b"")
            ok = bool(given) and hmac.compare_digest(given, self._secret)
        else:
            header = request.headers.get(cfg.signature_header, "").strip()
            header = header.removeprefix("sha256=")
            mac = hmac.new(self._secret, signed, hashlib.sha256).digest()
            ok = bool(header) and (
                hmac.compare_digest(header.lower().encode(), mac.hex().encode())
                or hmac.compare_digest(header.encode(), base64.b64encode(mac))
            )
        if not ok:
            self.counts["bad_secret"] += 1
            self.log.warning("sms_http.bad_secret", auth=cfg.auth)
            raise Rejected(403, "forbidden", "the secret or signature does not match")

    @staticmethod
    def _field(values: dict[str, bytes], key: str, codec: str) -> str | None:
        """Return a field decoded with codec (None when absent); invalid bytes are a 400."""
        raw = values.get(key)
        if raw is None:
            return None
        try:
            return raw.decode(codec)
        except UnicodeDecodeError:
            raise Rejected(400, "invalid_encoding", f"{key} is not valid {codec}") from None

    # -- outbound -------------------------------------------------------------------

    async def deliver(
        self, outbound: Outbound, to: str, text: str, encoding: str, segments: int
    ) -> None:
        """Send one templated request to the gateway; map its answer onto the taxonomy."""
        cfg = self.config.outbound
        values = {
            "to": to,
            "to_digits": to.lstrip("+"),
            "from": cfg.from_number,
            "text": text,
            "coding": "0" if encoding == "gsm7" else "2",
            "charset": "UTF-8",
            "id": outbound.id,
            "username": cfg.username,
            "password": cfg.password.get_secret_value() if cfg.password else "",
        }
        url = cfg.url.format(**{k: quote(v, safe="") for k, v in values.items()})
        headers = {k: v.get_secret_value() for k, v in cfg.headers.items()}
        data: bytes | None = None
        if cfg.body:
            rendered = cfg.body.format(
                **{k: _escape(v, cfg.body_format) for k, v in values.items()}
            )
            data = rendered.encode("utf-8")
            content_type = {
                "form": "application/x-www-form-urlencoded",
                "json": "application/json",
                "raw": "text/plain; charset=utf-8",
            }[cfg.body_format]
            headers.setdefault("Content-Type", content_type)
        if cfg.basic_auth:
            headers["Authorization"] = aiohttp.encode_basic_auth(cfg.username, values["password"])
        try:
            async with asyncio.timeout(self.config.send_timeout):
                async with self._client().request(
                    cfg.method, url, data=data, headers=headers
                ) as resp:
                    status, retry_after = resp.status, resp.headers.get("Retry-After")
                    answer = (await resp.content.read(MAX_ANSWER_BYTES)).decode("utf-8", "replace")
        except TimeoutError:
            raise TimedOut(f"gateway: no answer within {self.config.send_timeout}s") from None
        except aiohttp.ClientError as exc:
            raise TransientError(f"gateway: {type(exc).__name__}") from None
        what = f"gateway HTTP {status}: {answer.strip()[:200]!r}"
        if status in cfg.success_status:
            if not self._success.search(answer):
                raise PermanentError(f"{what} does not match success_regex")
            await asyncio.to_thread(
                self.store.record_sent, outbound.id, "", to, "accepted", segments, time.time()
            )
            return
        if status in (401, 403):
            self.auth_refused(what)
            raise AuthFailed(what)
        delay = retry_after_seconds(retry_after)
        if status == 429:
            raise RateLimited(what, 1.0 if delay is None else delay)
        if status in cfg.retry_status:
            raise TransientError(what) if delay is None else RateLimited(what, delay)
        raise PermanentError(what)


def _escape(value: str, body_format: str) -> str:
    """Return value escaped for a body of the given format."""
    if body_format == "form":
        return quote(value, safe="")
    if body_format == "json":
        return json.dumps(value, ensure_ascii=False)[1:-1]
    return value
