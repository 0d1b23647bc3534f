"""Shared by the chat-like channels (SMS, Telegram, ...): threads by inactivity,
short acknowledgements, and attachments kept on disk.

Email threads by its headers and answers in a mail; a chat or a phone number has no
such structure, so these channels thread a contact's messages into one conversation
until the contact has been quiet for a while, and acknowledge in one short text.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import sqlite3
import threading
import time
import unicodedata
from pathlib import Path
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, field_validator

from router.delivery import Outbound
from router.drivers import TimeZoneName
from router.model import Attachment, new_ulid

DEFAULT_ACK_TEMPLATES: dict[str, str] = {
    "en": "Thanks, we got your message. Ticket {ticket}; "
    "an agent will answer within {minutes} min.",
    "zh": "已收到您的消息，工单号 {ticket}，客服将在 {minutes} 分钟内回复。",
}
_TEMPLATE_FIELDS = frozenset({"ticket", "minutes", "respond_by", "name"})
_FIELD = re.compile(r"\{([^{}]*)\}")


class ShortAckSettings(BaseModel):
    """The written confirmation a chat or SMS customer gets for a new conversation."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    # Per language, with {ticket}, {minutes} (until the promised answer, rounded up),
    # {respond_by} (local time, HH:MM) and {name} (the contact's name or "").
    templates: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_ACK_TEMPLATES))
    default_language: str = Field(default="en", pattern=r"^(en|zh)$")
    timezone: TimeZoneName = "UTC"

    @field_validator("templates")
    @classmethod
    def _templates(cls, value: dict[str, str]) -> dict[str, str]:
        """Refuse empty templates and unknown fields; fill missing languages from the defaults."""
        for lang, template in value.items():
            if lang not in DEFAULT_ACK_TEMPLATES:
                raise ValueError(f"template language {lang!r}: must be one of en, zh")
            if not template.strip():
                raise ValueError(f"template {lang!r} is empty")
            unknown = {f for f in _FIELD.findall(template) if f not in _TEMPLATE_FIELDS}
            if unknown:
                raise ValueError(
                    f"template {lang!r}: unknown field(s) {sorted(unknown)}; "
                    f"allowed: {sorted(_TEMPLATE_FIELDS)}"
                )
        return {**DEFAULT_ACK_TEMPLATES, **value}


def ack_text(outbound: Outbound, settings: ShortAckSettings, now: float | None = None) -> str:
    """Return the acknowledgement in the customer's language (zh or en, else the default)."""
    lang = outbound.language if outbound.language in settings.templates else ""
    lang = lang or settings.default_language
    respond_by = outbound.respond_by
    now = time.time() if now is None else now
    if respond_by is None:
        minutes, local = 0, ""
    else:
        minutes = max(1, math.ceil((respond_by.timestamp() - now) / 60))
        local = respond_by.astimezone(ZoneInfo(settings.timezone)).strftime("%H:%M")
    name = getattr(outbound.payload, "contact_name", "") or ""
    return settings.templates[lang].format(
        ticket=outbound.ticket, minutes=minutes, respond_by=local, name=name
    )


class IdleThreads:
    """Threads a contact's messages into one conversation until they are quiet for `window`.

    Kept in a small SQLite file of the channel's own, so a restart keeps the threads.
    The thread id goes into `InboundMessage.conversation_hint`; the pipeline scopes it
    by the contact, so knowing someone's id does not let anyone else join their thread.
    """

    def __init__(self, path: Path, window: float) -> None:
        """Open (or create) the thread file; `window` is seconds of inactivity."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.window = window
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS threads("
            "handle TEXT PRIMARY KEY, thread TEXT NOT NULL, last_seen REAL NOT NULL)"
        )

    def thread_for(self, handle: str, at: float) -> str:
        """Return the contact's current thread id at time `at`, or a new one after a quiet spell.

        Call `seen` once the message is committed; until then the thread is not recorded,
        so a message that never committed does not keep a thread alive.
        """
        with self._lock:
            row = self._db.execute(
                "SELECT thread, last_seen FROM threads WHERE handle=?", (handle,)
            ).fetchone()
        if row is not None and at - float(row[1]) <= self.window:
            return str(row[0])
        return new_ulid()

    def seen(self, handle: str, thread: str, at: float) -> None:
        """Record that the contact wrote in this thread at `at` (after the commit)."""
        with self._lock:
            self._db.execute(
                "INSERT INTO threads(handle, thread, last_seen) VALUES (?,?,?) "
                "ON CONFLICT(handle) DO UPDATE SET thread=excluded.thread, "
                "last_seen=MAX(last_seen, excluded.last_seen) "
                "WHERE threads.thread=excluded.thread OR excluded.last_seen>threads.last_seen",
                (handle, thread, at),
            )

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._db.close()


_UNSAFE_NAME = re.compile(r"[^\w.\- ()\[\]]+")
_MIME = re.compile(r"[\w.+-]+/[\w.+-]+")


def safe_filename(name: str, fallback: str = "attachment") -> str:
    """Return a file name without paths, controls or odd characters (at most 120 chars)."""
    name = unicodedata.normalize("NFC", name).replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE_NAME.sub("_", name).strip(" ._")[:120]
    return name or fallback


def keep_attachment(folder: Path, name: str, mime_type: str, data: bytes) -> Attachment:
    """Write bytes content-addressed under folder (once per content) and describe them."""
    digest = hashlib.sha256(data).hexdigest()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / digest
    if not path.exists():
        tmp = path.with_name(f".{digest}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return Attachment(
        name=safe_filename(name),
        mime_type=mime_type if _MIME.fullmatch(mime_type) else "application/octet-stream",
        size=len(data),
        sha256=digest,
        storage_ref=f"file:{path}",
    )
