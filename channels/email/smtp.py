"""Outbound mail: build an acknowledgement, agent reply or survey from an `Outbound`, send it.

The Message-ID is derived from `outbound.id` (the outbox's idempotency key), so
every retry of one send is the same mail to the recipient's client. Header values
are folded onto one line (control characters become spaces); a recipient that is
not exactly one plain address is refused as a PermanentError. Errors are mapped in
one place (`translate_error`): 4xx, refused connections and timeouts are transient,
5xx permanent (with the server's reason), a refused login is AuthFailed.
"""

from __future__ import annotations

import hashlib
import re
import ssl
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate
from zoneinfo import ZoneInfo

import aiosmtplib

from channels.email.config import AckSettings, Language, SmtpSettings
from channels.email.normalise import no_surrogates
from router.drivers import AuthFailed, Outbound, PermanentError, TimedOut, TransientError

_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_RECIPIENT = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~\-\u0080-\uffff]{1,64}@[A-Za-z0-9\-\u0080-\uffff]+(?:\.[A-Za-z0-9\-\u0080-\uffff]+)+$"
)
_MSGID = re.compile(r"^<[^<>\s@]{1,200}@[^<>\s@]{1,200}>$")
_ID_SAFE = re.compile(r"^[A-Za-z0-9._-]{1,120}$")
_REPLY_PREFIX = re.compile(r"^\s*((re|aw|sv|fw|fwd|回复|答复|回覆)\s*[:：]\s*)+", re.I)
_CJK = re.compile(r"[\u3400-\u9fff]")
MAX_REFERENCES = 20


def one_line(value: str, limit: int = 500) -> str:
    """Fold a header value onto one line: controls (CR, LF, NUL, …) become one space."""
    # The customer's subject and name come from the store: never echo an escaped raw
    # byte (a lone surrogate, or one spelt out as "\\udcfc") back to them.
    return _CONTROLS.sub(" ", no_surrogates(value, header=True)).strip()[:limit]


def message_id_for(outbound_id: str, domain: str) -> str:
    """Return the deterministic Message-ID of an outbound send (same for every retry)."""
    local = (
        outbound_id
        if _ID_SAFE.match(outbound_id)
        else hashlib.sha256(outbound_id.encode("utf-8", "surrogatepass")).hexdigest()[:40]
    )
    return f"<{local}@{domain}>"


def reply_subject(subject: str, ticket: str) -> str:
    """Return `Re: <subject> [#<ticket>]` without stacking prefixes or tokens."""
    base = _REPLY_PREFIX.sub("", one_line(subject, 300)).strip()
    token = f"[#{one_line(ticket, 80)}]" if ticket else ""
    if token and token in base:
        base = base.replace(token, "").strip()
    parts = ["Re:", base] if base else ["Re:"]
    if token:
        parts.append(token)
    return " ".join(parts) if base or token else "Re:"


def pick_language(outbound: Outbound, default: Language) -> Language:
    """Return "zh" or "en": the outbound's hint, else CJK in what the customer wrote."""
    lang = outbound.language
    if lang == "zh":
        return "zh"
    if lang == "en":
        return "en"
    if _CJK.search(outbound.subject):
        return "zh"
    return default


def format_respond_by(when: datetime | None, zone: str, lang: str) -> str:
    """Render the promised answer time for a customer."""
    if when is None:
        return "soon" if lang == "en" else "尽快"
    local = when.astimezone(ZoneInfo(zone))
    if lang == "zh":
        return local.strftime("%Y年%m月%d日 %H:%M ") + (local.tzname() or zone)
    return local.strftime("%a %d %b %Y %H:%M ") + (local.tzname() or zone)


def _recipient(to: str) -> str:
    """Return the recipient address, or raise PermanentError if it is not one plain address."""
    if (
        to != to.strip()
        or _CONTROLS.search(to)
        or not _RECIPIENT.match(to)
        or len(to) > 254
        or to != no_surrogates(to)
    ):
        raise PermanentError(f"email: recipient {one_line(to, 80)!r} is not a single valid address")
    return to


def valid_recipient(to: str) -> str:
    """Return `to` if it is one plain address; raise PermanentError otherwise (public check)."""
    return _recipient(to)


def _refs(outbound: Outbound) -> tuple[str, list[str]]:
    """Return (In-Reply-To, References) from the outbound, keeping only real msg-ids."""
    refs = [r for r in (one_line(x, 300) for x in outbound.references) if _MSGID.match(r)]
    parent = one_line(outbound.in_reply_to, 300)
    if not _MSGID.match(parent):
        parent = refs[-1] if refs else ""  # in_reply_to may be our "uidvalidity:uid" id
    if parent and parent not in refs:
        refs.append(parent)
    if len(refs) > MAX_REFERENCES:
        refs = refs[:1] + refs[-(MAX_REFERENCES - 1) :]
    return parent, refs


def build_message(outbound: Outbound, smtp: SmtpSettings, ack: AckSettings) -> EmailMessage:
    """Build the mail for one outbound send (raises PermanentError for a bad recipient)."""
    to = _recipient(outbound.to)
    msg = EmailMessage()
    msg["From"] = Address(display_name=one_line(smtp.from_name, 200), addr_spec=smtp.from_address)
    msg["To"] = to
    msg["Subject"] = reply_subject(outbound.subject, outbound.ticket)
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = message_id_for(outbound.id, smtp.domain)
    parent, refs = _refs(outbound)
    if parent:
        msg["In-Reply-To"] = parent
    if refs:
        msg["References"] = " ".join(refs)
    if outbound.ticket:
        msg["X-Omnirouter-Ticket"] = one_line(outbound.ticket, 80)
    if outbound.kind == "ack":
        # RFC 3834: an automatic answer; other robots must not answer it back.
        msg["Auto-Submitted"] = "auto-replied"
        msg["X-Auto-Response-Suppress"] = "All"
        msg["Precedence"] = "auto_reply"
        lang = pick_language(outbound, ack.default_language)
        name = one_line(outbound.payload.contact_name, 100)
        body = ack.templates[lang].format(
            ticket=one_line(outbound.ticket, 80),
            respond_by=format_respond_by(outbound.respond_by, ack.timezone, lang),
            subject=one_line(outbound.subject, 300),
            name=(f" {name}" if lang == "en" else name) if name else "",
        )
    elif outbound.kind == "survey":
        # The satisfaction question, written by the router in the customer's language:
        # automatic too (RFC 3834), but the customer's answer is wanted, so no suppression
        # of replies beyond other robots'.
        msg["Auto-Submitted"] = "auto-generated"
        body = outbound.text
    else:
        body = outbound.text
    body = no_surrogates(body).replace("\r\n", "\n").replace("\r", "\n")
    msg.set_content(body, charset="utf-8", cte="quoted-printable")
    return msg


def _tls_context(smtp: SmtpSettings) -> ssl.SSLContext:
    """Return the client TLS context: verifying (system store or ca_file) unless opted out."""
    context = ssl.create_default_context(cafile=str(smtp.ca_file) if smtp.ca_file else None)
    if not smtp.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def send_message(msg: EmailMessage, smtp: SmtpSettings) -> None:
    """Send one message; raise the driver taxonomy on failure."""
    password = smtp.password.get_secret_value() if smtp.password is not None else None
    tls = smtp.tls
    try:
        await aiosmtplib.send(
            msg,
            sender=smtp.from_address,
            recipients=[str(msg["To"])],
            hostname=smtp.host,
            port=smtp.effective_port,
            username=smtp.username,
            password=password,
            use_tls=tls == "implicit",
            start_tls=True if tls == "starttls" else False,
            tls_context=_tls_context(smtp) if tls != "none" else None,
            validate_certs=smtp.tls_verify,
            timeout=smtp.timeout,
        )
    except Exception as exc:
        raise translate_error(exc) from exc


def translate_error(exc: BaseException) -> Exception:
    """Map an aiosmtplib/OS error into the driver taxonomy (the one place that does)."""
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return AuthFailed(f"smtp: login refused: {exc.code} {one_line(exc.message, 200)}")
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [r.code for r in exc.recipients]
        reason = "; ".join(f"{r.code} {one_line(r.message, 200)}" for r in exc.recipients)
        if codes and all(500 <= c < 600 for c in codes):
            return PermanentError(f"smtp: recipient refused: {reason}")
        return TransientError(f"smtp: recipient deferred: {reason}")
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | TimeoutError):
        return TimedOut(f"smtp: timed out: {exc}")
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        reason = f"{exc.code} {one_line(exc.message, 200)}"
        if 500 <= exc.code < 600:
            return PermanentError(f"smtp: refused: {reason}")
        return TransientError(f"smtp: temporary failure: {reason}")
    if isinstance(exc, aiosmtplib.SMTPException | OSError | ssl.SSLError):
        return TransientError(f"smtp: {type(exc).__name__}: {one_line(str(exc), 200)}")
    return TransientError(f"smtp: unexpected {type(exc).__name__}: {one_line(str(exc), 200)}")
