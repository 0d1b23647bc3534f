"""Settings of one email channel (`type = "email"`): an IMAP mailbox in, SMTP out.

Validated by router.config like every driver model, so an error names its path,
e.g. `channels[1].imap.port: Input should be less than or equal to 65535`.
Passwords are `SecretStr` (masked in logs and `config check --show`).
"""

from __future__ import annotations

import ipaddress
import re
import string
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from channels.email.normalise import (
    DEFAULT_MAX_ATTACHMENT_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_TEXT_CHARS,
)
from router.drivers import NAME_RE, TimeZoneName

_ADDRESS_RE = (
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$"
)
# IMAP mailbox names we accept: printable ASCII without quotes or backslashes
# (non-ASCII names need modified UTF-7, which we do not encode).
_FOLDER_RE = r"^[\x20-\x21\x23-\x5b\x5d-\x7e]{1,200}$"
_HOST_RE = r"^[A-Za-z0-9.:\[\]-]{1,253}$"
TEMPLATE_FIELDS = frozenset({"ticket", "respond_by", "subject", "name"})

Language = Literal["en", "zh"]

DEFAULT_ACK_TEMPLATES: dict[Language, str] = {
    "en": (
        "Hello{name},\n\n"
        "Thank you for your message. We have opened ticket {ticket} for it, and you "
        "will hear from us by {respond_by}.\n\n"
        "Please keep [#{ticket}] in the subject when you reply, so your answer reaches "
        "the same person.\n\n"
        "This is an automatic acknowledgement."
    ),
    "zh": (
        "您好{name}：\n\n"
        "我们已收到您的来信，工单号为 {ticket}。我们将在 {respond_by} 之前回复您。\n\n"
        "回复时请保留主题中的 [#{ticket}]，以便由同一位客服跟进。\n\n"
        "此邮件为自动确认，请勿直接回复此确认内容以外的问题。"
    ),
}


def _is_loopback(host: str) -> bool:
    """Tell whether host names this machine (plain connections are allowed only there)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_template(template: str) -> str:
    """Reject a template with unknown fields or attribute/index access; return it."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"template is not a valid format string: {exc}") from None
    for _, field_name, spec, conversion in parsed:
        if field_name is None:
            continue
        if field_name not in TEMPLATE_FIELDS or spec or conversion:
            raise ValueError(
                f"template field {{{field_name}}} is not allowed; use only "
                + ", ".join(f"{{{f}}}" for f in sorted(TEMPLATE_FIELDS))
            )
    return template


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ImapSettings(_Frozen):
    """The mailbox the channel reads."""

    host: str = Field(min_length=1, max_length=253, pattern=_HOST_RE)
    # Unset: 993 for tls = "implicit", 143 otherwise.
    port: int | None = Field(default=None, ge=1, le=65535)
    # implicit: IMAPS; starttls: upgrade on 143; none: plain text, loopback only (tests).
    tls: Literal["implicit", "starttls", "none"] = "implicit"
    tls_verify: bool = True  # false: accept any certificate (logged as a warning at start)
    ca_file: Path | None = None  # trust this CA (a private server) instead of the system store
    username: str = Field(min_length=1, max_length=320)
    password: SecretStr
    folder: str = Field(default="INBOX", pattern=_FOLDER_RE)
    idle: bool = True  # use IDLE when the server offers it; else poll
    idle_renew: float = Field(default=1500.0, gt=0, le=1740)  # re-issue IDLE before 29 min
    # Without IDLE: how often to poll. With IDLE: how often IDLE is ended for a sync at
    # the least, the safety net that notices a lost push or a server gone silent.
    poll_interval: float = Field(default=60.0, gt=0, le=3600)
    mark_seen: bool = False  # after commit: set \Seen
    move_to: str | None = Field(default=None, pattern=_FOLDER_RE)  # after commit: move there
    timeout: float = Field(default=30.0, gt=0, le=600)  # per command (a FETCH counts per read)
    reconnect_min: float = Field(default=1.0, gt=0, le=600)
    reconnect_max: float = Field(default=300.0, gt=0, le=3600)
    # Pace of retries once the server refused the credentials (no hammering, no lockout).
    auth_retry_interval: float = Field(default=900.0, gt=0, le=86400)

    @field_validator("username", "password")
    @classmethod
    def _no_controls(cls, value: str | SecretStr) -> str | SecretStr:
        """Refuse CR, LF and other controls: they would end the IMAP command early."""
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if re.search(r"[\x00-\x1f\x7f]", raw):
            raise ValueError("must not contain control characters")
        return value

    @model_validator(mode="after")
    def _check(self) -> ImapSettings:
        """Reject contradictions: plain text off loopback, a folder moved into itself."""
        if self.tls == "none" and not _is_loopback(self.host):
            raise ValueError('tls = "none" is only allowed for a loopback host (tests)')
        if self.move_to is not None and self.move_to == self.folder:
            raise ValueError("move_to must differ from folder")
        if self.reconnect_min > self.reconnect_max:
            raise ValueError("reconnect_min must not exceed reconnect_max")
        return self

    @property
    def effective_port(self) -> int:
        """Return the configured port or the default for the TLS mode."""
        return self.port or (993 if self.tls == "implicit" else 143)


class SmtpSettings(_Frozen):
    """The server that sends acknowledgements and agent replies."""

    host: str = Field(min_length=1, max_length=253, pattern=_HOST_RE)
    # Unset: 465 for tls = "implicit", 587 for "starttls", 25 for "none".
    port: int | None = Field(default=None, ge=1, le=65535)
    tls: Literal["implicit", "starttls", "none"] = "starttls"
    tls_verify: bool = True
    ca_file: Path | None = None
    username: str | None = Field(default=None, min_length=1, max_length=320)
    password: SecretStr | None = None
    from_address: str = Field(pattern=_ADDRESS_RE, max_length=254)
    from_name: str = Field(default="", max_length=200)
    # Domain of generated Message-IDs; unset: the domain of from_address.
    message_id_domain: str | None = Field(default=None, pattern=r"^[A-Za-z0-9.-]{1,253}$")
    timeout: float = Field(default=30.0, gt=0, le=600)

    @field_validator("from_name")
    @classmethod
    def _one_line(cls, value: str) -> str:
        """Refuse control characters in the display name (header injection)."""
        if re.search(r"[\x00-\x1f\x7f]", value):
            raise ValueError("must not contain control characters")
        return value

    @model_validator(mode="after")
    def _check(self) -> SmtpSettings:
        """Reject contradictions."""
        if self.tls == "none" and not _is_loopback(self.host):
            raise ValueError('tls = "none" is only allowed for a loopback host (tests)')
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        return self

    @property
    def effective_port(self) -> int:
        """Return the configured port or the default for the TLS mode."""
        return self.port or {"implicit": 465, "starttls": 587, "none": 25}[self.tls]

    @property
    def domain(self) -> str:
        """Return the domain used in Message-IDs."""
        return self.message_id_domain or self.from_address.rpartition("@")[2].lower()


class AckSettings(_Frozen):
    """The automatic acknowledgement sent to a customer for a new ticket."""

    enabled: bool = True
    # Body per language, with {ticket}, {respond_by}, {subject}, {name} (" Alice" or "").
    templates: dict[Language, str] = Field(default_factory=lambda: dict(DEFAULT_ACK_TEMPLATES))
    default_language: Language = "en"
    timezone: TimeZoneName = "UTC"  # the respond-by time is shown in this zone

    @field_validator("templates")
    @classmethod
    def _templates(cls, value: dict[Language, str]) -> dict[Language, str]:
        """Check every template's fields; fill the languages not given from the defaults."""
        for lang, template in value.items():
            if not template.strip():
                raise ValueError(f"template {lang!r} is empty")
            check_template(template)
        return {**DEFAULT_ACK_TEMPLATES, **value}


class EmailConfig(_Frozen):
    """Settings of one email channel."""

    type: Literal["email"]
    name: str = Field(pattern=NAME_RE)
    imap: ImapSettings
    smtp: SmtpSettings
    ack: AckSettings = Field(default_factory=lambda: AckSettings())
    # A bigger mail is accepted as a truncated message (flagged), never dropped.
    max_message_bytes: int = Field(
        default=DEFAULT_MAX_MESSAGE_BYTES, ge=64 * 1024, le=256 * 1024 * 1024
    )
    # A bigger attachment is listed (name, size, sha256) but its bytes are not kept.
    max_attachment_bytes: int = Field(
        default=DEFAULT_MAX_ATTACHMENT_BYTES, ge=0, le=256 * 1024 * 1024
    )
    max_text_chars: int = Field(default=DEFAULT_MAX_TEXT_CHARS, ge=100, le=1_000_000)
    # The authserv-id our receiving server writes in Authentication-Results (RFC 8601).
    # Set it, and a sender whose DMARC passed there is a verified e-mail address that
    # links the customer's contacts across channels; unset, no sender is verified.
    authserv_id: str = Field(default="", pattern=r"^[A-Za-z0-9.-]{0,253}$")
