"""Twilio (or any gateway speaking its HTTP contract): signed webhooks in, Messages API out.

Endpoints, under the URL Twilio reaches this listener at (`public_url`):

* `POST {public_url}/sms`: an inbound text (form-encoded `MessageSid`, `From`, `To`,
  `Body`, `NumMedia`, `MediaUrl{N}`, ... and fields Twilio adds without notice, which
  are ignored). Verified with `X-Twilio-Signature` (HMAC-SHA1 of the configured URL
  plus the sorted parameters, keyed with the auth token; see `signature_valid`); a
  missing or wrong signature is a 403 and nothing is stored. Answered with empty TwiML
  after the commit.
* `POST {public_url}/status`: delivery-status callbacks of the texts we sent (the
  `StatusCallback` we pass carries our outbox id), signed the same way. The status of
  each send is kept in the channel's state (`sms.db`, never moving backwards) and
  logged; a carrier unsubscribe (error 21610) records an opt-out.

Sends go to `POST {base_url}/2010-04-01/Accounts/{AccountSid}/Messages.json` with basic
auth (account SID, auth token); Twilio's answer is mapped by `twilio_error` onto the
driver taxonomy (429/20429/14107 → RateLimited, 5xx → TransientError, 20003/401 →
AuthFailed, 21211/21610/21614/... → PermanentError).

MMS media: each `MediaUrl{N}` is fetched (with basic auth only when it is on the API's
own origin), bounded by `max_media_bytes` per file and `media_timeout` for all of them,
and kept content-addressed under the channel's state directory. A file that cannot be
fetched in time is recorded with its URL as `storage_ref` (size 0, no digest) rather
than holding up the commit: Twilio gives up on a webhook after 15 s.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import mimetypes
import re
import time
from collections.abc import Iterable, Sequence
from typing import ClassVar, Literal
from urllib.parse import ParseResult, quote, unquote_plus, urlparse

import aiohttp
from aiohttp import web
from pydantic import Field, SecretStr, field_validator, model_validator

from channels.conversations import keep_attachment
from channels.sms.common import (
    Handler,
    Rejected,
    SmsChannelBase,
    SmsSettings,
    e164,
    number_ref,
)
from router.drivers import (
    AuthFailed,
    DriverContext,
    DriverError,
    Outbound,
    PermanentError,
    RateLimited,
    TimedOut,
    TransientError,
)
from router.model import Attachment

INBOUND_PATH = "/sms"
STATUS_PATH = "/status"
SIGNATURE_HEADER = "X-Twilio-Signature"
SIGNATURE_SETTINGS_HEADER = "X-Twilio-Webhooks-Signature-Settings"
EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'
MAX_MEDIA = 10  # Twilio's own limit per message
MAX_ANSWER_BYTES = 64 * 1024  # of a Messages API answer; more is not a real answer
MAX_FIELDS = 500
_SID = re.compile(r"[A-Za-z0-9]{2,64}")
_STATUS = re.compile(r"[a-z_]{1,32}")
_ERROR_CODE = re.compile(r"[0-9]{0,10}")
# Twilio's error codes (https://www.twilio.com/docs/api/errors) that are not permanent.
RATE_LIMIT_CODES = frozenset({20429, 14107})  # too many requests / SMS send rate exceeded
TRANSIENT_CODES = frozenset({20500, 20503, 30001})  # internal error, unavailable, queue full
AUTH_CODES = frozenset({20003})  # authentication failed
UNSUBSCRIBED_CODE = 21610  # the recipient replied STOP to this sender (carrier-level)
_HASHES = {"HMAC_SHA1": hashlib.sha1, "HMAC_SHA256": hashlib.sha256}


# -- signatures -------------------------------------------------------------------------


def signature(
    token: str, url: str, params: Sequence[tuple[str, str]], algorithm: str = "HMAC_SHA1"
) -> str:
    """Return the X-Twilio-Signature of a request: base64 HMAC of url + sorted key+value pairs.

    Keys are sorted; each key's values are de-duplicated and sorted, as twilio-python does.
    """
    values: dict[str, set[str]] = {}
    for key, value in params:
        values.setdefault(key, set()).add(value)
    data = url + "".join(key + v for key in sorted(values) for v in sorted(values[key]))
    # surrogatepass: text with a lone surrogate (how Python spells undecodable bytes)
    # gives a signature that matches nothing instead of raising UnicodeEncodeError in
    # the webhook handler; valid text encodes exactly as before.
    digest = hmac.new(
        token.encode("utf-8", "surrogatepass"),
        data.encode("utf-8", "surrogatepass"),
        _HASHES[algorithm.upper()],
    ).digest()
    return base64.b64encode(digest).decode("ascii")


def signature_valid(
    token: str,
    url: str,
    params: Sequence[tuple[str, str]],
    given: str,
    algorithm: str = "HMAC_SHA1",
) -> bool:
    """Tell whether `given` signs the request, with the URL's port written or left out.

    Twilio signs the URL as configured in its console, and its own validator accepts a
    signature over the URL with the default port added (`:443`/`:80`) or with any port
    removed: so do we, nothing more.
    """
    if algorithm.upper() not in _HASHES:
        return False
    # A signature is base64, so ASCII. aiohttp hands a header's non-UTF-8 bytes over
    # as lone surrogates ("\udcff"), which given.encode() refused with an exception:
    # a forged header got a 500 and a logged traceback instead of a 403.
    if not given.isascii():
        return False
    try:
        parsed = urlparse(url)
        variants = (_without_port(parsed), _with_port(parsed))
    except ValueError:  # an invalid port
        return False
    given_bytes = given.encode("ascii")
    # The URL as written first: it is the one Twilio signs unless a proxy rewrote it.
    candidates = [url, *(v for v in variants if v != url)] if url in variants else variants
    return any(
        hmac.compare_digest(signature(token, u, params, algorithm).encode(), given_bytes)
        for u in candidates
    )


def signature_algorithm(settings_header: str | None) -> str:
    """Return the algorithm named by X-Twilio-Webhooks-Signature-Settings (default HMAC_SHA1)."""
    for part in (settings_header or "").split(","):
        name, sep, value = part.partition("=")
        if sep and name.strip() == "algorithm" and value.strip():
            return value.strip()
    return "HMAC_SHA1"


def _without_port(uri: ParseResult) -> str:
    """Return the URL with its port removed (twilio-python's remove_port)."""
    if not uri.port:
        return uri.geturl()
    return uri._replace(netloc=uri.netloc.split(":")[0]).geturl()


def _with_port(uri: ParseResult) -> str:
    """Return the URL with the scheme's default port added unless one is written."""
    if uri.port:
        return uri.geturl()
    port = 443 if uri.scheme == "https" else 80
    return uri._replace(netloc=f"{uri.netloc}:{port}").geturl()


# -- errors -----------------------------------------------------------------------------


def retry_after_seconds(value: str | None) -> float | None:
    """Return a Retry-After header in seconds (capped at an hour), None when absent or odd."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return min(3600.0, seconds) if seconds >= 0 else None


def twilio_error(status: int, body: bytes, retry_after: str | None) -> DriverError:
    """Return the driver error for a failed Messages API answer (HTTP status + Twilio code)."""
    code: int | None = None
    message = ""
    try:
        document = json.loads(body)
        if isinstance(document, dict):
            if isinstance(document.get("code"), int):
                code = document["code"]
            message = str(document.get("message") or "")[:200]
    except ValueError:
        pass
    what = f"twilio HTTP {status}" + (f" error {code}" if code else "")
    what += f": {message}" if message else ""
    delay = retry_after_seconds(retry_after)
    if status == 401 or code in AUTH_CODES:
        return AuthFailed(what)
    if status == 429 or code in RATE_LIMIT_CODES:
        return RateLimited(what, 1.0 if delay is None else delay)
    if status >= 500 or status in (408, 409) or code in TRANSIENT_CODES:
        return TransientError(what) if delay is None else RateLimited(what, delay)
    return PermanentError(what)


def error_code(exc: DriverError) -> int | None:
    """Return the Twilio error code named in a twilio_error message."""
    match = re.search(r" error (\d+)", str(exc))
    return int(match.group(1)) if match else None


# -- config -----------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    """Tell whether host names this machine (plain http is allowed only there)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_url(value: str, what: str) -> str:
    """Refuse anything but an http(s) URL without credentials, query or fragment."""
    try:
        parsed = urlparse(value)
        parsed.port  # noqa: B018  (raises ValueError for an invalid port)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"{what} must be an http(s) URL")
    if parsed.username is not None or parsed.password is not None:
        raise ValueError(f"{what} must not hold credentials")
    if parsed.query or parsed.fragment:
        raise ValueError(f"{what} must not have a query or fragment")
    if parsed.scheme == "http" and not _is_loopback(parsed.hostname):
        raise ValueError(f"{what}: plain http is only allowed for a loopback host (tests)")
    return value.rstrip("/")


class TwilioConfig(SmsSettings):
    """Settings of one Twilio (or Twilio-compatible) SMS channel."""

    type: Literal["twilio"]
    account_sid: str = Field(pattern=r"^AC[0-9a-fA-F]{32}$")
    auth_token: SecretStr
    # The sender: a number of the account, or a Messaging Service (one of the two).
    from_number: str | None = Field(default=None, max_length=40)
    messaging_service_sid: str | None = Field(default=None, pattern=r"^MG[0-9a-fA-F]{32}$")
    # Where Twilio reaches this listener (behind a proxy it is not what aiohttp sees):
    # signatures are checked against it, and status callbacks are asked for under it.
    public_url: str = Field(max_length=500)
    base_url: str = Field(default="https://api.twilio.com", max_length=500)
    status_callbacks: bool = True  # ask Twilio for delivery statuses at {public_url}/status
    fetch_media: bool = True  # false: MMS media are recorded by URL only
    max_media_bytes: int = Field(default=5 * 1024 * 1024, ge=0, le=64 * 1024 * 1024)
    media_timeout: float = Field(default=8.0, gt=0, le=60)  # for all media of one message

    @field_validator("auth_token")
    @classmethod
    def _token(cls, value: SecretStr) -> SecretStr:
        """Refuse an empty token: every webhook would be refused."""
        if not value.get_secret_value().strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("public_url")
    @classmethod
    def _public(cls, value: str) -> str:
        """Check the public URL (no trailing slash kept)."""
        return _check_url(value, "public_url")

    @field_validator("base_url")
    @classmethod
    def _base(cls, value: str) -> str:
        """Check the API's URL (no trailing slash kept)."""
        return _check_url(value, "base_url")

    @model_validator(mode="after")
    def _sender(self) -> TwilioConfig:
        """Require exactly one sender, and a from_number that is a phone number."""
        if (self.from_number is None) == (self.messaging_service_sid is None):
            raise ValueError("set exactly one of from_number and messaging_service_sid")
        if self.from_number is not None:
            try:
                e164(self.from_number, self.default_region)
            except ValueError as exc:
                raise ValueError(f"from_number: {exc}") from None
        return self


# -- form bodies ------------------------------------------------------------------------


def parse_form(body: bytes) -> list[tuple[str, str]]:
    """Return the (key, value) pairs of a form body; raise Rejected (400) when it is not one.

    Strict like `parse_qsl(strict_parsing=True)` (every field has "=", no empty fields),
    in a third of its time: this runs for every webhook.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected(400, "invalid_encoding", "the form is not valid UTF-8") from None
    if not text:
        return []
    fields = text.split("&")
    if len(fields) > MAX_FIELDS:
        raise Rejected(400, "malformed_form", f"the form has over {MAX_FIELDS} fields")
    pairs = []
    for field in fields:
        key, eq, value = field.partition("=")
        if not eq:
            raise Rejected(400, "malformed_form", "the body is not a valid form")
        try:
            pairs.append((unquote_plus(key, errors="strict"), unquote_plus(value, errors="strict")))
        except UnicodeDecodeError:
            raise Rejected(400, "invalid_encoding", "the form is not valid UTF-8") from None
    return pairs


def one(params: Sequence[tuple[str, str]], key: str) -> str | None:
    """Return the value of key (None when absent); refuse a key sent with different values."""
    found: str | None = None
    for k, v in params:
        if k == key:
            if found is not None and v != found:
                raise Rejected(400, "ambiguous_field", f"{key} is given more than once")
            found = v
    return found


# -- the channel ------------------------------------------------------------------------


class TwilioChannel(SmsChannelBase):
    """Twilio webhooks in (signed), Twilio Messages API out."""

    config_model: ClassVar[type[TwilioConfig]] = TwilioConfig
    kind: ClassVar[str] = "twilio"

    @property
    def sender_verified(self) -> bool:
        """Twilio signs every webhook (a request without a valid signature is refused)."""
        return True

    def __init__(self, name: str, config: TwilioConfig, ctx: DriverContext) -> None:
        """Prepare the channel; nothing listens until run()."""
        super().__init__(name, config, ctx)
        self.config = config
        self._token = config.auth_token.get_secret_value()
        self._auth = {"Authorization": aiohttp.encode_basic_auth(config.account_sid, self._token)}
        self._messages_url = (
            f"{config.base_url}/2010-04-01/Accounts/{config.account_sid}/Messages.json"
        )
        self._api_origin = _origin(config.base_url)
        self._session: aiohttp.ClientSession | None = None

    def routes(self) -> Iterable[tuple[str, str, Handler]]:
        """Return the inbound and status-callback endpoints."""
        return (("*", INBOUND_PATH, self._inbound), ("*", STATUS_PATH, self._status))

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
            self._session = aiohttp.ClientSession(
                headers={"User-Agent": "omnirouter"},
                connector=aiohttp.TCPConnector(limit=32),
            )
        return self._session

    # -- webhooks -------------------------------------------------------------------

    async def _signed_form(self, request: web.Request) -> tuple[list[tuple[str, str]], bytes]:
        """Read a webhook's form and check its signature; raise Rejected otherwise."""
        if request.method != "POST":
            raise Rejected(405, "method_not_allowed", "use POST")
        given = request.headers.get(SIGNATURE_HEADER)
        if not given:
            self.counts["bad_signature"] += 1
            raise Rejected(403, "forbidden", f"{SIGNATURE_HEADER} is missing")
        if request.content_type != "application/x-www-form-urlencoded":
            raise Rejected(415, "unsupported_media_type", "expected a form body")
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise Rejected(413, "payload_too_large", f"the body must be at most {limit} bytes")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise Rejected(
                413, "payload_too_large", f"the body must be at most {limit} bytes"
            ) from None
        params = parse_form(body)
        # The URL Twilio signed: our public prefix plus the path and query as sent.
        url = self.config.public_url + request.raw_path
        algorithm = signature_algorithm(request.headers.get(SIGNATURE_SETTINGS_HEADER))
        if not signature_valid(self._token, url, params, given, algorithm):
            self.counts["bad_signature"] += 1
            self.log.warning("twilio.bad_signature", path=request.path)
            raise Rejected(403, "forbidden", "the signature does not match")
        return params, body

    async def _inbound(self, request: web.Request) -> web.StreamResponse:
        """Take one inbound text: verify, normalise, commit, then answer empty TwiML."""
        params, body = await self._signed_form(request)
        sid = one(params, "MessageSid") or one(params, "SmsSid") or ""
        if not _SID.fullmatch(sid):
            raise Rejected(400, "invalid_field", "MessageSid is missing or malformed")
        sender = one(params, "From")
        if sender is None:
            raise Rejected(400, "missing_field", "From is missing")
        number = self.number(sender, "From")
        try:
            num_media = int(one(params, "NumMedia") or "0")
        except ValueError:
            raise Rejected(400, "invalid_field", "NumMedia is not a number") from None
        if not 0 <= num_media <= MAX_MEDIA:
            raise Rejected(400, "invalid_field", f"NumMedia must be 0-{MAX_MEDIA}")
        text = self.text(one(params, "Body") or "", media=num_media > 0)
        media = [
            (one(params, f"MediaUrl{i}") or "", one(params, f"MediaContentType{i}") or "")
            for i in range(num_media)
        ]
        if any(not url.startswith(("https://", "http://")) for url, _ in media):
            raise Rejected(400, "invalid_field", "a MediaUrl is missing or not an http(s) URL")
        # The fields that make the message, so fields Twilio adds later are not a conflict.
        digest = hashlib.sha256(
            json.dumps([sid, number, one(params, "To"), text, media]).encode()
        ).hexdigest()
        attachments = await self._fetch_media(media) if media else ()
        await self.ingest(
            external_id=sid,
            number=number,
            text=text,
            payload_sha256=digest,
            raw=body,
            attachments=attachments,
        )
        return web.Response(status=200, text=EMPTY_TWIML, content_type="text/xml")

    async def _status(self, request: web.Request) -> web.StreamResponse:
        """Record a delivery status of a text we sent."""
        params, _ = await self._signed_form(request)
        sid = one(params, "MessageSid") or one(params, "SmsSid") or ""
        status = (one(params, "MessageStatus") or one(params, "SmsStatus") or "").lower()
        code = one(params, "ErrorCode") or ""
        if not _SID.fullmatch(sid) or not _STATUS.fullmatch(status):
            raise Rejected(400, "invalid_field", "MessageSid or MessageStatus is malformed")
        if not _ERROR_CODE.fullmatch(code):
            raise Rejected(400, "invalid_field", "ErrorCode is not a number")
        outbound_id = request.query.get("outbound", "")
        now = time.time()
        known = await asyncio.to_thread(
            self.store.update_status, sid, outbound_id, status, code, now
        )
        self.counts[f"status:{status}"] += 1
        fields = {"sid": sid, "status": status, "outbound_id": outbound_id or None}
        if known is None:
            self.log.info("twilio.status_unknown_message", **fields)
        else:
            number, old = known
            level = self.log.warning if status in ("failed", "undelivered") else self.log.info
            level("twilio.status", old=old, error_code=code or None, **fields)
            if code == str(UNSUBSCRIBED_CODE):
                await asyncio.to_thread(
                    self.store.gateway_opt_out, number, now, f"Twilio {UNSUBSCRIBED_CODE}"
                )
                self.log.warning("twilio.recipient_unsubscribed", to_ref=number_ref(number))
        self._succeeded()
        return web.Response(status=200, text="")

    async def _fetch_media(self, media: list[tuple[str, str]]) -> tuple[Attachment, ...]:
        """Fetch and keep each medium within the size and time budget; else keep its URL."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.media_timeout
        out = []
        for i, (url, mime) in enumerate(media):
            mime = mime or "application/octet-stream"
            name = f"media{i}{mimetypes.guess_extension(mime) or ''}"
            linked = Attachment(name=name, mime_type=mime, size=0, sha256="", storage_ref=url)
            if not self.config.fetch_media:
                out.append(linked)
                continue
            try:
                async with asyncio.timeout_at(deadline):
                    data = await self._download(url)
            except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                reason = str(exc) if isinstance(exc, ValueError) else type(exc).__name__
                self.counts["media_not_fetched"] += 1
                self.log.warning("twilio.media_not_fetched", index=i, reason=reason)
                out.append(linked)
                continue
            folder = self.directory / "media"
            out.append(await asyncio.to_thread(keep_attachment, folder, name, mime, data))
        return tuple(out)

    async def _download(self, url: str) -> bytes:
        """Return a medium's bytes; raise ValueError when refused or too large."""
        limit = self.config.max_media_bytes
        # Credentials go only to the API's own origin, never to a host the URL names.
        # (aiohttp drops the header itself on a redirect to another origin.)
        headers = self._auth if _origin(url) == self._api_origin else None
        async with self._client().get(url, headers=headers, max_redirects=3) as resp:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}")
            if resp.content_length is not None and resp.content_length > limit:
                raise ValueError(f"over {limit} bytes")
            data = await resp.content.read(limit + 1)
        if len(data) > limit:
            raise ValueError(f"over {limit} bytes")
        return data

    # -- sending --------------------------------------------------------------------

    async def deliver(
        self, outbound: Outbound, to: str, text: str, encoding: str, segments: int
    ) -> None:
        """POST one text to the Messages API; map Twilio's answer onto the taxonomy."""
        config = self.config
        form = {"To": to, "Body": text}
        if config.from_number is not None:
            form["From"] = e164(config.from_number, config.default_region)
        else:
            assert config.messaging_service_sid is not None
            form["MessagingServiceSid"] = config.messaging_service_sid
        if config.status_callbacks:
            # Our outbox id in the callback URL links a status to the send even when
            # Twilio's answer (with its sid) was lost.
            form["StatusCallback"] = (
                f"{config.public_url}{STATUS_PATH}?outbound={quote(outbound.id, safe='')}"
            )
        try:
            async with asyncio.timeout(config.send_timeout):
                async with self._client().post(
                    self._messages_url, data=form, headers=self._auth
                ) as resp:
                    status, retry_after = resp.status, resp.headers.get("Retry-After")
                    body = await resp.content.read(MAX_ANSWER_BYTES)
        except TimeoutError:
            raise TimedOut(f"twilio: no answer within {config.send_timeout}s") from None
        except aiohttp.ClientError as exc:
            raise TransientError(f"twilio: {type(exc).__name__}: {exc}") from None
        if 200 <= status < 300:
            sid, first = "", "queued"
            try:
                document = json.loads(body)
                sid = str(document.get("sid") or "")
                first = str(document.get("status") or "queued")
            except (ValueError, AttributeError):
                self.log.warning("twilio.unreadable_answer", outbound_id=outbound.id)
            await asyncio.to_thread(
                self.store.record_sent, outbound.id, sid, to, first, segments, time.time()
            )
            return
        error = twilio_error(status, body, retry_after)
        if isinstance(error, AuthFailed):
            self.auth_refused(str(error))
        elif error_code(error) == UNSUBSCRIBED_CODE:
            await asyncio.to_thread(
                self.store.gateway_opt_out, to, time.time(), f"Twilio {UNSUBSCRIBED_CODE}"
            )
        raise error


def _origin(url: str) -> tuple[str, str, int | None]:
    """Return (scheme, host, port) of a URL, the default port filled in."""
    parsed = urlparse(url)
    try:
        port = parsed.port
    except ValueError:
        port = -1
    default = 443 if parsed.scheme == "https" else 80
    return parsed.scheme, (parsed.hostname or "").lower(), port or default
