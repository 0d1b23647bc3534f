"""Mailbox agent tool: work arrives as readable e-mail, the agent's answer comes back by mail.

`deliver()` renders a delivery as a plain-text mail (with an escaped HTML alternative)
and sends it by SMTP with the email channel's sender (`channels.email.smtp`). Its
`Reply-To` is the configured reply mailbox with a signed routing token after a `+`
(`replies+<token>@example.com`); the token also travels in `X-Omnirouter-Token` and
inside the Message-ID, so a reply that lost the plus address is still recognised by
its `In-Reply-To`. The Message-ID is built from the delivery id and the token, whose
expiry counts from the outbox item's creation: every retry is the same mail.

A token is base32 (lower case: mail systems may fold the case of local parts) of
`expiry|agent|conversation|message|sender-tag` followed by 16 bytes of HMAC-SHA256
under `token_secret`. The sender tag is an HMAC of the agent's address the mail went
to, so the reply's `From` can be checked without keeping any state.

`run(actions)` reads the reply mailbox with the email channel's IMAP session and
cursor (IDLE or polling, reconnect with backoff). For each new mail:

    fetch → normalise (quotes stripped, charsets) → noise? → token (plus address,
    then In-Reply-To/References) → verify → From is the agent? → actions → sink
    → journal → \\Seen (and move_to) → cursor

A forged or unreadable token and a `From` that is not the agent are logged
(`mailbox.reply_refused`) and never applied; nothing is mailed back to a sender we
cannot trust. An expired token from the right sender is handed to the router as a
refused action, so the agent gets a `notice` mail saying why.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import email.policy
import hashlib
import hmac
import html
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.headerregistry import Address, BaseHeader, HeaderRegistry, UnstructuredHeader
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.utils import formatdate, getaddresses
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from channels.email.config import ImapSettings, SmtpSettings
from channels.email.cursor import MailState, dedupe_key
from channels.email.imap import UID_BATCH, ImapSession
from channels.email.normalise import NormalisedMail, no_surrogates, normalise
from channels.email.smtp import (
    format_respond_by,
    one_line,
    send_message,
    valid_recipient,
)
from router.actions import Action, ActionError, parse_action
from router.backoff import backoff_delay
from router.delivery import (
    AlertPayload,
    AssignmentPayload,
    NoticePayload,
    WithdrawnPayload,
)
from router.drivers import (
    NAME_RE,
    ActionSink,
    AgentAction,
    AgentToolBase,
    AuthFailed,
    Delivery,
    DriverContext,
    DriverState,
    PermanentError,
    TimeZoneName,
    TransientError,
)
from router.model import ticket_number

__all__ = ["MailboxConfig", "MailboxTool", "TokenError", "make_token", "read_token"]

_REPLY_ADDRESS_RE = (
    r"^[A-Za-z0-9.!#$%&'*/=?^_`{|}~-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$"
)
_TOKEN_RE = re.compile(r"^[a-z2-7]{16,400}$")
_ID_SAFE = re.compile(r"^[A-Za-z0-9._-]{1,120}$")
_MAC_BYTES = 16
_TOKEN_CONTEXT = b"omnirouter.mailbox/1\x00"
_DAY = 86400.0
# Commands an agent may put on the first line of a reply.
_PRESENCE = {"#on": "on", "#away": "away", "#off": "off"}
_COMMANDS = ("#accept", "#resolve", "#transfer", "#relabel", *_PRESENCE)
_HELP = (
    "Reply to this mail: your text goes to the customer (quoted text is removed).\n"
    "Or start the first line with a command:\n"
    "  #accept                take the ticket (text below it goes to the customer)\n"
    "  #resolve               close the ticket (text below it goes to the customer first)\n"
    "  #transfer billing      hand it to a queue; #transfer agent:bob to a person\n"
    "  #relabel inquiry       correct the class (inquiry, complaint or suggestion)\n"
    "  #away  #on  #off       your presence"
)


class MailboxConfig(BaseModel):
    """Settings of one mailbox adapter: SMTP out to agents, IMAP in from the reply mailbox."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["mailbox"]
    name: str = Field(pattern=NAME_RE)
    smtp: SmtpSettings  # sends deliveries (From: smtp.from_address)
    imap: ImapSettings  # the reply mailbox (every `reply_address+token` lands here)
    # The reply mailbox; replies go to <local><separator><token>@<domain>.
    reply_address: str = Field(pattern=_REPLY_ADDRESS_RE, max_length=254)
    separator: Literal["+", "-"] = "+"
    token_secret: SecretStr  # HMAC key of the routing tokens; changing it voids old ones
    token_ttl: float = Field(default=14 * _DAY, ge=60, le=366 * _DAY)  # seconds
    # "address": a reply counts only from the address the work was sent to.
    sender_check: Literal["address", "off"] = "address"
    html: bool = True  # add an HTML alternative (everything escaped)
    timezone: TimeZoneName = "UTC"  # SLA deadlines are shown in this zone
    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=64 * 1024, le=64 * 1024 * 1024)
    max_reply_chars: int = Field(default=20_000, ge=100, le=1_000_000)

    @field_validator("token_secret")
    @classmethod
    def _strong(cls, value: SecretStr) -> SecretStr:
        """Refuse a short secret: tokens must not be guessable."""
        if len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return value


# -- routing tokens ------------------------------------------------------------------------


class TokenError(ValueError):
    """A token that cannot be used; `reason` is forged | malformed | expired."""

    def __init__(self, reason: str, claims: TokenClaims | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.claims = claims  # set for an expired token (its signature was good)


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """What a verified token says: who may answer, in which conversation, until when."""

    agent_id: str
    conversation_id: str
    message_id: str
    expires: int  # Unix seconds
    sender_tag: str  # HMAC tag of the agent's address the work was mailed to


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def sender_tag(secret: str | bytes, address: str) -> str:
    """Return the short keyed tag of an address (case-insensitive)."""
    digest = hmac.new(_key(secret), b"sender\x00" + address.strip().lower().encode(), "sha256")
    return digest.hexdigest()[:12]


def make_token(
    secret: str | bytes,
    *,
    agent_id: str,
    conversation_id: str,
    message_id: str,
    address: str,
    expires: int,
) -> str:
    """Return the signed routing token for a reply (lower-case base32, no padding)."""
    fields = (f"{expires:x}", agent_id, conversation_id, message_id, sender_tag(secret, address))
    if any("|" in f for f in fields):
        raise PermanentError("mailbox: ids must not contain '|'")
    body = "|".join(fields).encode()
    mac = hmac.new(_key(secret), _TOKEN_CONTEXT + body, "sha256").digest()[:_MAC_BYTES]
    return base64.b32encode(body + mac).decode().rstrip("=").lower()


def read_token(secret: str | bytes, token: str, now: float) -> TokenClaims:
    """Verify a token and return its claims; raise TokenError(forged|malformed|expired)."""
    token = token.strip().lower()
    if not _TOKEN_RE.match(token):
        raise TokenError("malformed")
    try:
        raw = base64.b32decode(token.upper() + "=" * (-len(token) % 8))
    except ValueError:
        raise TokenError("malformed") from None
    body, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
    good = hmac.new(_key(secret), _TOKEN_CONTEXT + body, "sha256").digest()[:_MAC_BYTES]
    if len(raw) <= _MAC_BYTES or not hmac.compare_digest(mac, good):
        raise TokenError("forged")
    parts = body.decode("utf-8", "replace").split("|")
    if len(parts) != 5:
        raise TokenError("malformed")
    try:
        expires = int(parts[0], 16)
    except ValueError:
        raise TokenError("malformed") from None
    claims = TokenClaims(parts[1], parts[2], parts[3], expires, parts[4])
    if now >= expires:
        raise TokenError("expired", claims)
    return claims


# -- rendering deliveries -------------------------------------------------------------------


def _first_words(text: str, limit: int = 60) -> str:
    """Return the start of a text for a subject line: whole words up to limit chars."""
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    cut = flat[:limit].rsplit(" ", 1)[0] or flat[:limit]
    return cut + "…"


def _when(value: str, zone: str) -> str:
    """Render an ISO 8601 time for the agent, in the configured zone."""
    try:
        return format_respond_by(datetime.fromisoformat(value), zone, "en")
    except ValueError:
        return value or "—"


def _table(rows: Sequence[tuple[str, str]]) -> str:
    """Return aligned `name: value` lines."""
    width = max((len(k) for k, _ in rows), default=0) + 1
    return "\n".join(f"{(k + ':').ljust(width)} {v}" for k, v in rows)


@dataclass(frozen=True, slots=True)
class Rendered:
    """What a delivery mail says: subject, plain body and whether it takes replies."""

    subject: str
    body: str
    token: str = ""  # "" when replies to this mail mean nothing (withdrawn, alert)


def render(delivery: Delivery, config: MailboxConfig, token: str) -> Rendered:
    """Turn a delivery into the subject and plain-text body an agent reads."""
    p = delivery.payload
    if isinstance(p, AssignmentPayload):
        m, c, r = p.message, p.classification, p.routing
        ticket = ticket_number(p.conversation_id)
        topic = one_line(m.subject, 200) or _first_words(no_surrogates(m.text)) or "(no text)"
        who = one_line(m.contact.name, 100)
        handle = one_line(m.contact.handle, 200)
        rows = [
            ("Ticket", ticket),
            ("Class", f"{c.label} ({c.confidence:.0%})"),
            ("Severity", c.severity),
            ("Respond by", _when(r.sla_deadline, config.timezone)),
            ("Customer", f"{who} <{handle}>" if who else handle),
            ("Channel", f"{one_line(m.channel, 60)} ({one_line(m.channel_type, 40)})"),
            ("Language", m.language or "—"),
            ("Queue", f"{r.queue} ({one_line(r.reason, 200)})"),
            ("Received", _when(m.received_at, config.timezone)),
        ]
        if m.subject:
            rows.append(("Subject", one_line(m.subject, 300)))
        signals = [f"  - {s.kind}: {one_line(s.evidence, 200)}" for s in c.signals]
        body = (
            f"New {c.label} ({c.severity}) for you: ticket {ticket}\n\n{_table(rows)}\n\n"
            + ("Signals:\n" + "\n".join(signals) + "\n\n" if signals else "")
            + "---- The customer wrote ----\n"
            + no_surrogates(m.text).replace("\r\n", "\n")
            + "\n---- end ----\n\n"
            + _HELP
        )
        return Rendered(f"[{ticket}] {c.label}/{c.severity}: {topic}", body, token)
    if isinstance(p, WithdrawnPayload):
        ticket = ticket_number(p.conversation_id)
        body = (
            f"Ticket {ticket} is no longer yours to take: {one_line(p.reason, 300)}.\n\n"
            f"Messages taken back: {', '.join(p.message_ids) or '—'}\n"
            "Nothing to do; replies to this mail are not read."
        )
        return Rendered(f"[{ticket}] withdrawn: {one_line(p.reason, 120)}", body)
    if isinstance(p, NoticePayload):
        ticket = ticket_number(p.conversation_id) if p.conversation_id else ""
        rows = [("Action", p.action), ("Outcome", p.outcome), ("Reason", one_line(p.reason, 500))]
        if ticket:
            rows.insert(0, ("Ticket", ticket))
        body = f"What you sent was not applied.\n\n{_table(rows)}\n"
        if token:
            body += "\nYou can answer this mail as you would the work mail.\n\n" + _HELP
        prefix = f"[{ticket}] " if ticket else ""
        return Rendered(f"{prefix}not applied: {p.action}", body, token)
    if isinstance(p, AlertPayload):
        alert = p.alert
        kind = one_line(str(alert.get("kind", "alert")), 60)
        rows = [
            (one_line(str(k), 60), one_line(v if isinstance(v, str) else json.dumps(v), 500))
            for k, v in alert.items()
        ]
        return Rendered(f"[alert] {kind}", f"Alert: {kind}\n\n{_table(rows)}\n")
    raise PermanentError(f"mailbox: cannot render a {delivery.kind}")


def _html(text: str) -> str:
    """Return a minimal HTML version of a plain body: every character escaped."""
    return (
        '<!DOCTYPE html><html><body><pre style="white-space: pre-wrap; font-family: monospace">'
        + html.escape(text)
        + "</pre></body></html>\n"
    )


class _OneLineHeader(UnstructuredHeader, BaseHeader):
    """A header written on one line: a token split into encoded words could not be matched."""

    def fold(self, *, policy: Any) -> str:
        """Return the header unfolded (its value is ASCII without controls)."""
        return f"{self.name}: {self}{policy.linesep}"


_HEADERS = HeaderRegistry()
_HEADERS.map_to_type("x-omnirouter-token", _OneLineHeader)
_POLICY = email.policy.default.clone(header_factory=_HEADERS)


# -- the tool -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refused:
    """Why a reply mail was not applied (logged; never its text)."""

    reason: str


class MailboxTool(AgentToolBase):
    """Mail work to agents and turn their answers in the reply mailbox into actions."""

    config_model: ClassVar[type[MailboxConfig]] = MailboxConfig
    sends_actions = True  # agents answer by mail: replies and #commands come back
    single_owner = True  # one reader of the reply mailbox at a time (any instance mails work)

    def __init__(self, name: str, config: MailboxConfig, ctx: DriverContext) -> None:
        """Prepare the tool; nothing connects until run() or deliver()."""
        super().__init__(name, ctx)
        self.config = config
        self.clock = time.time  # injectable for tests (token expiry)
        self.directory = Path(ctx.state_dir) / "mailbox" / name
        self.mail_state = MailState(self.directory)
        local, _, domain = config.reply_address.partition("@")
        self._reply_local = local.lower()
        self._reply_domain = domain.lower()
        self._stop = asyncio.Event()
        self._stopped = False
        self._done = asyncio.Event()
        self._done.set()
        self.sent = 0
        self.applied = 0
        self.refused = 0
        self.synced = asyncio.Event()  # set after each completed sync pass (tests wait on it)
        if not config.imap.tls_verify or not config.smtp.tls_verify:
            self.log.warning("mailbox.tls_verify_disabled")

    @property
    def _secret(self) -> bytes:
        return self.config.token_secret.get_secret_value().encode()

    # -- deliveries -------------------------------------------------------------------------

    def token_for(self, delivery: Delivery) -> str:
        """Return the routing token of a delivery ("" for kinds that take no replies)."""
        p = delivery.payload
        if isinstance(p, AssignmentPayload):
            cid, mid = p.conversation_id, p.message.id
        elif isinstance(p, NoticePayload):
            cid, mid = p.conversation_id, p.message_id
        else:
            return ""
        created = delivery.created_at.timestamp() if delivery.created_at else self.clock()
        return make_token(
            self._secret,
            agent_id=delivery.agent_id,
            conversation_id=cid,
            message_id=mid,
            address=delivery.address,
            expires=int(created + self.config.token_ttl),
        )

    def build(self, delivery: Delivery) -> EmailMessage:
        """Build the mail for one delivery (raises PermanentError for a bad address)."""
        cfg = self.config
        to = valid_recipient(delivery.address)
        rendered = render(delivery, cfg, self.token_for(delivery))
        msg = EmailMessage(policy=_POLICY)
        msg["From"] = Address(
            display_name=one_line(cfg.smtp.from_name, 200), addr_spec=cfg.smtp.from_address
        )
        msg["To"] = to
        msg["Subject"] = one_line(rendered.subject, 300)
        msg["Date"] = formatdate(localtime=False, usegmt=True)
        local = (
            delivery.id
            if _ID_SAFE.match(delivery.id)
            else hashlib.sha256(delivery.id.encode("utf-8", "surrogatepass")).hexdigest()[:40]
        )
        if rendered.token:
            msg["Message-ID"] = f"<{local}.{rendered.token}@{cfg.smtp.domain}>"
            msg["Reply-To"] = self.reply_to(rendered.token)
            msg["X-Omnirouter-Token"] = rendered.token
        else:
            msg["Message-ID"] = f"<{local}@{cfg.smtp.domain}>"
        msg["X-Omnirouter-Delivery"] = one_line(delivery.id, 120)
        msg["X-Omnirouter-Kind"] = delivery.kind
        # Robots (out-of-office) must not answer work mail: the reply mailbox wants humans.
        msg["Auto-Submitted"] = "auto-generated"
        msg["X-Auto-Response-Suppress"] = "OOF, AutoReply"
        body = rendered.body.replace("\r\n", "\n").replace("\r", "\n")
        msg.set_content(body, charset="utf-8", cte="quoted-printable")
        if cfg.html:
            msg.add_alternative(
                _html(body), subtype="html", charset="utf-8", cte="quoted-printable"
            )
        return msg

    def reply_to(self, token: str) -> str:
        """Return the reply address carrying a token."""
        local, _, domain = self.config.reply_address.partition("@")
        return f"{local}{self.config.separator}{token}@{domain}"

    async def deliver(self, delivery: Delivery) -> None:
        """Mail one delivery to the agent; raise the driver taxonomy on failure."""
        if self._stopped:
            raise TransientError("mailbox: stopped")
        msg = self.build(delivery)
        await send_message(msg, self.config.smtp)
        self.sent += 1
        self._succeeded()
        self.log.info(
            "mailbox.sent",
            delivery_id=delivery.id,
            kind=delivery.kind,
            agent_id=delivery.agent_id,
            message_id=str(msg["Message-ID"])[:60],
        )

    # -- reading replies ------------------------------------------------------------------

    def find_token(self, raw: bytes, mail: NormalisedMail) -> str:
        """Return the token a reply carries: plus address first, then the mail it answers."""
        headers = BytesHeaderParser().parsebytes(raw[: 256 * 1024])
        values: list[str] = []
        for name in ("Delivered-To", "X-Original-To", "To", "Cc"):
            values.extend(str(v) for v in headers.get_all(name, []))
        prefix = self._reply_local + self.config.separator
        for _, addr in getaddresses(values):
            local, _, domain = addr.strip().lower().rpartition("@")
            if domain == self._reply_domain and local.startswith(prefix):
                candidate = local[len(prefix) :]
                if _TOKEN_RE.match(candidate):
                    return candidate
        suffix = "@" + self.config.smtp.domain
        for ref in (mail.in_reply_to, *reversed(mail.references)):
            inner = ref.strip("<>")
            if inner.lower().endswith(suffix.lower()):
                candidate = inner[: -len(suffix)].rpartition(".")[2].lower()
                if _TOKEN_RE.match(candidate):
                    return candidate
        return ""

    def actions_for(self, claims: TokenClaims, text: str) -> list[AgentAction]:
        """Turn the agent's stripped text into actions: a first-line command and/or a reply."""
        agent = claims.agent_id
        text = text.strip()[: self.config.max_reply_chars]
        first, _, rest = text.partition("\n")
        words = first.split()
        base = {"conversation_id": claims.conversation_id, "message_id": claims.message_id}

        def parsed(action: str, value: str = "", **over: str) -> AgentAction:
            data = {"action": action, **base, "value": value, **over}
            try:
                return parse_action(agent, json.dumps(data).encode())
            except ActionError as exc:
                return exc.as_action(agent)

        if not words or not words[0].startswith("#"):
            if not text:
                return [
                    AgentAction(
                        agent, "reply", claims.conversation_id, refused="the reply has no text"
                    )
                ]
            return [parsed(Action.REPLY, text)]
        command, args, rest = words[0].lower(), words[1:], rest.strip()
        if command in _PRESENCE:
            return [parsed(Action.PRESENCE, _PRESENCE[command], conversation_id="", message_id="")]
        if command == "#transfer":
            target = args[0] if args else ""
            if target and ":" not in target:
                target = f"queue:{target}"
            return [parsed(Action.TRANSFER, target)]
        if command == "#relabel":
            return [parsed(Action.RELABEL, args[0].lower() if args else "")]
        if command == "#accept":
            return [parsed(Action.ACCEPT)] + ([parsed(Action.REPLY, rest)] if rest else [])
        if command == "#resolve":
            return ([parsed(Action.REPLY, rest)] if rest else []) + [parsed(Action.RESOLVE)]
        return [
            AgentAction(
                agent,
                "unknown",
                claims.conversation_id,
                claims.message_id,
                refused=f"unknown command {command[:40]}; known: {' '.join(_COMMANDS)}",
            )
        ]

    def check(self, raw: bytes, mail: NormalisedMail) -> list[AgentAction] | Refused:
        """Return the actions a reply mail asks for, or why it must not be applied."""
        if mail.noise_reason:
            return Refused(f"automatic mail ({mail.noise_reason})")
        if mail.reject_reason:
            return Refused(mail.reject_reason)
        token = self.find_token(raw, mail)
        if not token:
            return Refused("no routing token")
        expired: TokenClaims | None = None
        try:
            claims = read_token(self._secret, token, self.clock())
        except TokenError as exc:
            if exc.claims is None:
                return Refused(f"token {exc.reason}")
            claims = expired = exc.claims
        if self.config.sender_check == "address" and not hmac.compare_digest(
            sender_tag(self._secret, mail.from_address), claims.sender_tag
        ):
            return Refused("sender is not the agent the token names")
        intended = self.actions_for(claims, mail.text)
        if expired is not None:
            # Genuine but too old: the router refuses it (audited) and mails the agent why.
            reason = (
                "the reply address of that mail has expired; answer the latest mail about "
                "this ticket"
            )
            return [dataclasses.replace(intended[0], refused=reason)]
        return intended

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self, actions: ActionSink) -> None:
        """Read the reply mailbox into `actions` until cancelled; reconnect on failures."""
        if self._stopped:
            await asyncio.Event().wait()
        if not self._done.is_set():
            raise RuntimeError(f"mailbox tool {self.name} is already running")
        self._done.clear()
        failures = 0
        cfg = self.config.imap
        try:
            await asyncio.to_thread(self._load_state)
            self._set_state(DriverState.CONNECTING)
            while not self._stop.is_set():
                session = ImapSession(cfg)
                try:
                    await self._session(session, actions)
                    failures = 0
                    continue
                except asyncio.CancelledError:
                    raise
                except AuthFailed as exc:
                    self._set_state(DriverState.BAD_CREDENTIALS, str(exc))
                    delay = cfg.auth_retry_interval
                except Exception as exc:
                    if self.state == DriverState.CONNECTED:
                        failures = 0
                    error = str(exc) if isinstance(exc, TransientError) else repr(exc)
                    if not isinstance(exc, TransientError):
                        self.log.exception(
                            "mailbox.unexpected_error", error_type=type(exc).__name__
                        )
                    self._set_state(DriverState.TRANSIENT_DISCONNECT, error)
                    delay = backoff_delay(failures, cfg.reconnect_min, cfg.reconnect_max)
                    failures += 1
                finally:
                    await session.close()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
        finally:
            self._set_state(DriverState.STOPPED)
            self._done.set()
        await asyncio.Event().wait()  # stopped on purpose: park until cancelled

    async def stop(self) -> None:
        """Stop reading after the mail in flight; deliveries then stay in the outbox."""
        self._stopped = True
        self._stop.set()
        await self._done.wait()
        self._set_state(DriverState.STOPPED)

    def _load_state(self) -> None:
        """Create the private state directory and read the cursor and journal."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        self.mail_state.load()

    async def _session(self, session: ImapSession, actions: ActionSink) -> None:
        """Run one connection: sync, then IDLE or poll, until stop()."""
        cfg = self.config.imap
        await session.open()
        changed = await asyncio.to_thread(self.mail_state.set_uidvalidity, session.uidvalidity)
        if changed:
            self.log.warning("mailbox.uidvalidity_changed", uidvalidity=session.uidvalidity)
        if cfg.move_to:
            await session.ensure_folder(cfg.move_to)
        self._set_state(DriverState.CONNECTED)
        while not self._stop.is_set():
            while True:
                batch = await session.new_uids(self.mail_state.last_uid)
                for uid, size in batch:
                    if self._stop.is_set():
                        return
                    await self._take(session, actions, uid, size)
                if len(batch) < UID_BATCH:
                    break
            self._succeeded()
            self.synced.set()
            if session.can_idle:
                await session.idle(cfg.idle_renew, self._stop)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), cfg.poll_interval)

    async def _take(self, session: ImapSession, actions: ActionSink, uid: int, size: int) -> None:
        """Apply one reply mail; mark it seen and move the cursor only after the hand-over."""
        cfg = self.config
        oversize = size > cfg.max_message_bytes
        raw = await session.fetch(uid, cfg.max_message_bytes if oversize else None)
        if raw is not None:
            mail = await asyncio.to_thread(
                normalise,
                raw,
                max_message_bytes=cfg.max_message_bytes,
                max_attachment_bytes=0,
                max_text_chars=cfg.max_reply_chars,
                original_size=size,
            )
            key = dedupe_key(mail)
            if self.mail_state.seen(key):
                self.log.info("mailbox.duplicate", uid=uid)
            else:
                await self._apply(actions, uid, raw, mail)
                await asyncio.to_thread(self.mail_state.remember, key, "")
            if cfg.imap.move_to:
                await session.move(uid, cfg.imap.move_to)
            else:
                await session.mark_seen(uid)
        await asyncio.to_thread(self.mail_state.advance, uid)

    async def _apply(self, actions: ActionSink, uid: int, raw: bytes, mail: NormalisedMail) -> None:
        """Hand the actions of one reply to the router, or log why it is refused."""
        outcome = self.check(raw, mail)
        if isinstance(outcome, Refused):
            self.refused += 1
            level = self.log.info if outcome.reason.startswith("automatic") else self.log.warning
            level(
                "mailbox.reply_refused",
                uid=uid,
                reason=outcome.reason,
                from_sha=hashlib.sha256(mail.from_address.encode()).hexdigest()[:12],
            )
            return
        for action in outcome:
            try:
                await actions(action)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Not applied: the cursor stays and the session restarts after a backoff.
                raise TransientError(
                    f"mailbox: the router failed on uid {uid}: {type(exc).__name__}"
                ) from exc
            self.applied += 1
            self.log.info(
                "mailbox.action",
                uid=uid,
                agent_id=action.agent_id,
                action=action.action,
                refused=action.refused or None,
            )
