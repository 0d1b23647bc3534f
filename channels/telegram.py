"""The Telegram channel: a bot's private chats in, acknowledgements and agent replies out.

Intake runs in one of two modes, both through python-telegram-bot's `Bot`:

* **polling** (default): `run` drives `getUpdates` itself, so the offset moves past an
  update only after the sink committed it. Nothing is persisted for the offset: Telegram
  keeps every update the bot has not confirmed (for 24 h), so after a crash the next
  `getUpdates` re-delivers from the last confirmed one, and the store's
  (channel, external_id) uniqueness turns each re-read into a no-op. A batch is
  committed chat by chat in parallel (messages of one chat in order), so the store can
  group the commits;
* **webhook**: an aiohttp listener takes Telegram's POSTs, checks
  `X-Telegram-Bot-Api-Secret-Token` in constant time (403 otherwise) and answers 200 only
  after the commit (503 if the store failed, so Telegram retries). `setWebhook` is called
  at start with the secret and the update types we take.

external_id is `"<chat id>:<message id>"` for a message: the same message re-delivered
(under the same or, after a mode switch, any update id) is the same row. An edit is
`"<chat id>:<message id>:edit:<update id>"`: every edit is a row of its own, a re-delivery
of the same edit is not. An edit joins the conversation of the message it edits (kept in
the channel's state) with the subject `(edited)`, so the agent sees it as an edit in the
same ticket, not a new one.

Private chats are threaded per chat by inactivity (channels.conversations.IdleThreads).
Group chats are ignored unless `groups = true`. `/start` is answered with the greeting
and is not a ticket. Photos (largest size), documents, voice, audio and video are
downloaded (getFile) up to the Bot API's 20 MB and `max_attachment_bytes`; bigger ones
are listed without their bytes.

Sends: replies longer than Telegram's 4,096 UTF-16 code units are split (at a paragraph,
line, sentence or space where practical, never inside a character or a grapheme we can
recognise) and sent in order; the parts already sent of an outbound are recorded, so a
retry resumes after them. 429 pauses the chat and the bot (`RateLimited`), 403 "blocked"
marks the chat unreachable and dead-letters with "bot blocked by the user" until the
customer writes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import os
import re
import sqlite3
import threading
import time
import unicodedata
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from telegram import Bot, Message, Update
from telegram.error import (
    BadRequest,
    ChatMigrated,
    Conflict,
    Forbidden,
    InvalidToken,
    NetworkError,
    RetryAfter,
    TelegramError,
)
from telegram.error import TimedOut as TgTimedOut
from telegram.request import HTTPXRequest
from telegram.warnings import PTBDeprecationWarning

from channels.conversations import IdleThreads, ShortAckSettings, ack_text, keep_attachment
from router.contacts import phone_identifier, telegram_identifier
from router.drivers import (
    NAME_RE,
    AuthFailed,
    ChannelBase,
    DriverContext,
    DriverError,
    DriverState,
    MessageSink,
    Outbound,
    PermanentError,
    RateLimited,
    TimedOut,
    TransientError,
)
from router.model import Attachment, InboundMessage

# Telegram's limit on one message's text, counted in UTF-16 code units.
MAX_MESSAGE_UNITS = 4096
# The Bot API's getFile limit (a self-hosted Bot API server in local mode allows more).
BOT_API_DOWNLOAD_LIMIT = 20 * 1024 * 1024
# Only what we handle: other updates stay on Telegram's side and are never fetched.
ALLOWED_UPDATES = ("message", "edited_message")
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
BLOCKED = "bot blocked by the user"
EDITED_SUBJECT = "(edited)"
# How long the parts-sent record of a split reply and the message → thread map are kept.
_PROGRESS_DAYS = 7
_MESSAGES_DAYS = 30

DEFAULT_GREETINGS: dict[str, str] = {
    "en": "Hello! Write your question here and an agent will answer you in this chat.",
    "zh": "您好！请在这里留言，客服会在此对话中回复您。",
}


def _is_loopback(host: str) -> bool:
    """Tell whether host names this machine (plain http is allowed only there)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_token(value: SecretStr) -> SecretStr:
    """Refuse a token that cannot be a bot token (it becomes part of every URL)."""
    raw = value.get_secret_value()
    if not raw or len(raw) > 256 or any(c in raw for c in "/?#% \t\r\n"):
        raise ValueError("must be a bot token from @BotFather (like 123456:ABC-...)")
    return value


def check_url(value: str, what: str) -> str:
    """Refuse anything but https (http only on loopback, for tests and local Bot API servers)."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} must be an http(s) URL")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ValueError(f"{what} must use https (plain http only on loopback)")
    return value


class TelegramConfig(BaseModel):
    """Settings of one Telegram bot (`type = "telegram"`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["telegram"]
    name: str = Field(pattern=NAME_RE)
    token: SecretStr  # from @BotFather; write "${ENV}" or "file:/path"
    mode: Literal["polling", "webhook"] = "polling"
    # The Bot API; override for a self-hosted telegram-bot-api server (or tests).
    base_url: str = "https://api.telegram.org/bot"
    base_file_url: str = "https://api.telegram.org/file/bot"
    timeout: float = Field(default=10.0, gt=0, le=300)  # connect/read/write per request
    max_connections: int = Field(default=32, ge=1, le=1024)  # concurrent sends
    poll_timeout: int = Field(default=30, ge=0, le=50)  # long-poll seconds of getUpdates
    poll_limit: int = Field(default=100, ge=1, le=100)  # updates per getUpdates
    # Webhook mode: where we listen, and the public https URL Telegram calls.
    webhook_host: str = Field(default="127.0.0.1", min_length=1, max_length=255)
    webhook_port: int = Field(default=8443, ge=0, le=65535)
    webhook_path: str = Field(default="/telegram", pattern=r"^/[A-Za-z0-9/_.-]{0,200}$")
    webhook_url: str | None = None
    webhook_secret: SecretStr | None = None  # 1-256 of A-Z a-z 0-9 _ -
    webhook_max_connections: int = Field(default=40, ge=1, le=100)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024, le=16 * 1024 * 1024)
    # Seconds a chat may stay quiet and still continue its conversation.
    thread_window: float = Field(default=6 * 3600.0, gt=0, le=30 * 86400)
    groups: bool = False  # take messages from group chats too (one conversation per group)
    # The answer to /start, per language (the user's Telegram language, else "en").
    greeting: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_GREETINGS))
    ack: ShortAckSettings = Field(default_factory=ShortAckSettings)
    max_attachment_bytes: int = Field(
        default=BOT_API_DOWNLOAD_LIMIT, ge=0, le=BOT_API_DOWNLOAD_LIMIT
    )
    # Pace of start attempts once the Bot API refused the token.
    auth_retry_interval: float = Field(default=900.0, gt=0, le=86400)

    @field_validator("token")
    @classmethod
    def _token(cls, value: SecretStr) -> SecretStr:
        """Refuse a token that cannot be a bot token (it becomes part of every URL)."""
        return check_token(value)

    @field_validator("base_url", "base_file_url", "webhook_url")
    @classmethod
    def _urls(cls, value: str | None) -> str | None:
        """Refuse non-http(s) URLs and plain http off loopback."""
        return None if value is None else check_url(value, "the URL")

    @field_validator("greeting")
    @classmethod
    def _greeting(cls, value: dict[str, str]) -> dict[str, str]:
        """Refuse empty greetings and unknown languages; fill missing ones from the defaults."""
        for lang, text in value.items():
            if lang not in DEFAULT_GREETINGS:
                raise ValueError(f"greeting language {lang!r}: must be one of en, zh")
            if not text.strip() or len(text) > MAX_MESSAGE_UNITS:
                raise ValueError(f"greeting {lang!r} must be 1-{MAX_MESSAGE_UNITS} characters")
        return {**DEFAULT_GREETINGS, **value}

    @field_validator("webhook_secret")
    @classmethod
    def _secret(cls, value: SecretStr | None) -> SecretStr | None:
        """Refuse a secret Telegram would not accept in setWebhook."""
        if value is None:
            return value
        raw = value.get_secret_value()
        if not 1 <= len(raw) <= 256 or not all(
            c.isascii() and (c.isalnum() or c in "_-") for c in raw
        ):
            raise ValueError("must be 1-256 characters of A-Z, a-z, 0-9, _ and -")
        return value

    @model_validator(mode="after")
    def _webhook(self) -> TelegramConfig:
        """Webhook mode needs its public URL and its secret."""
        if self.mode == "webhook" and (self.webhook_url is None or self.webhook_secret is None):
            raise ValueError('mode = "webhook" needs webhook_url and webhook_secret')
        return self


# -- splitting long texts ---------------------------------------------------------------


def utf16_units(text: str) -> int:
    """Return the length of text as Telegram counts it (UTF-16 code units)."""
    return len(text) + sum(1 for c in text if ord(c) > 0xFFFF)


def _continues_grapheme(text: str, i: int) -> bool:
    """Tell whether a cut before text[i] would break a character cluster we can recognise."""
    if i <= 0 or i >= len(text):
        return False
    c, prev = text[i], text[i - 1]
    cp, pp = ord(c), ord(prev)
    if unicodedata.combining(c) or unicodedata.category(c) in ("Mn", "Me", "Mc"):
        return True
    if cp == 0x200D or pp == 0x200D:  # zero-width joiner (emoji sequences)
        return True
    if 0xFE00 <= cp <= 0xFE0F or 0xE0100 <= cp <= 0xE01EF:  # variation selectors
        return True
    if 0x1F3FB <= cp <= 0x1F3FF or 0xE0020 <= cp <= 0xE007F:  # skin tones, tag sequences
        return True
    if prev == "\r" and c == "\n":
        return True
    if 0x1F1E6 <= cp <= 0x1F1FF and 0x1F1E6 <= pp <= 0x1F1FF:
        # Regional indicators pair into flags: cut only after an even count.
        run = 0
        j = i - 1
        while j >= 0 and 0x1F1E6 <= ord(text[j]) <= 0x1F1FF:
            run += 1
            j -= 1
        return run % 2 == 1
    return False


_SENTENCE_ENDS = "。！？；!?;…"


def _cut_point(text: str, fit: int) -> tuple[int, int]:
    """Return (end of this part, start of the next) for a text whose first `fit` chars fit."""
    floor = fit // 2  # do not make tiny parts to find a nicer break
    for sep in ("\n\n", "\n"):
        j = text.rfind(sep, floor, fit)
        if j > 0:
            return j, j + len(sep)
    for j in range(fit - 1, floor - 1, -1):
        c = text[j]
        if c in _SENTENCE_ENDS or (c == "." and j + 1 < len(text) and text[j + 1] == " "):
            return j + 1, j + 1
    for j in range(fit - 1, floor - 1, -1):
        if text[j].isspace():
            return j, j + 1
    cut = fit
    while cut > 1 and _continues_grapheme(text, cut):
        cut -= 1
    return cut, cut


def split_message(text: str, limit: int = MAX_MESSAGE_UNITS) -> list[str]:
    """Split text into parts of at most `limit` UTF-16 units, at natural breaks where practical."""
    parts: list[str] = []
    rest = text
    while utf16_units(rest) > limit:
        units = fit = 0
        for i, c in enumerate(rest):
            units += 2 if ord(c) > 0xFFFF else 1
            if units > limit:
                break
            fit = i + 1
        end, start = _cut_point(rest, fit)
        if rest[:end].strip():
            parts.append(rest[:end])
        rest = rest[start:]
    if rest.strip() or not parts:
        parts.append(rest)
    return parts


# -- the channel's own small state ------------------------------------------------------


class _ChatState:
    """Which thread each message went to, parts sent of split replies, blocked chats.

    A small SQLite file of the channel's own (calls are quick; run them in a thread).
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS messages(chat TEXT NOT NULL, message_id INTEGER NOT NULL,"
            " thread TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY(chat, message_id));"
            "CREATE TABLE IF NOT EXISTS progress(outbound_id TEXT PRIMARY KEY,"
            " sent INTEGER NOT NULL, at REAL NOT NULL);"
            "CREATE TABLE IF NOT EXISTS unreachable(chat TEXT PRIMARY KEY,"
            " reason TEXT NOT NULL, at REAL NOT NULL);"
        )
        now = time.time()
        self._db.execute("DELETE FROM progress WHERE at < ?", (now - _PROGRESS_DAYS * 86400,))
        self._db.execute("DELETE FROM messages WHERE at < ?", (now - _MESSAGES_DAYS * 86400,))

    def thread_of(self, chat: str, message_id: int) -> str | None:
        """Return the thread a message of this chat went to, if known."""
        with self._lock:
            row = self._db.execute(
                "SELECT thread FROM messages WHERE chat=? AND message_id=?", (chat, message_id)
            ).fetchone()
        return None if row is None else str(row[0])

    def committed(self, chat: str, message_id: int, thread: str, at: float) -> None:
        """Record a committed message's thread; the chat is reachable again (it wrote)."""
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO messages(chat, message_id, thread, at) VALUES (?,?,?,?)",
                (chat, message_id, thread, at),
            )
            self._db.execute("DELETE FROM unreachable WHERE chat=?", (chat,))

    def unreachable(self, chat: str) -> str | None:
        """Return why the chat cannot be written to, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT reason FROM unreachable WHERE chat=?", (chat,)
            ).fetchone()
        return None if row is None else str(row[0])

    def mark_unreachable(self, chat: str, reason: str) -> None:
        """Record that sends to this chat fail for good (until the customer writes again)."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO unreachable(chat, reason, at) VALUES (?,?,?)",
                (chat, reason, time.time()),
            )

    def parts_sent(self, outbound_id: str) -> int:
        """Return how many parts of this outbound went out already."""
        with self._lock:
            row = self._db.execute(
                "SELECT sent FROM progress WHERE outbound_id=?", (outbound_id,)
            ).fetchone()
        return 0 if row is None else int(row[0])

    def record_parts(self, outbound_id: str, sent: int) -> None:
        """Record that the first `sent` parts of this outbound went out."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO progress(outbound_id, sent, at) VALUES (?,?,?)",
                (outbound_id, sent, time.time()),
            )

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._db.close()


# -- the channel ---------------------------------------------------------------------------


def retry_after_seconds(exc: RetryAfter) -> float:
    """Return a RetryAfter's wait in seconds (PTB 22 warns on the int form; read both)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        value: Any = exc.retry_after
    if isinstance(value, timedelta):
        return max(0.0, value.total_seconds())
    return max(0.0, float(value))


def build_bot(
    token: str, base_url: str, base_file_url: str, timeout: float, max_connections: int
) -> Bot:
    """Return a python-telegram-bot client with our timeouts (no I/O until initialize())."""
    t = timeout
    return Bot(
        token,
        base_url=base_url,
        base_file_url=base_file_url,
        request=HTTPXRequest(
            connection_pool_size=max_connections,
            read_timeout=t,
            write_timeout=t,
            connect_timeout=t,
            pool_timeout=t,
            media_write_timeout=max(t, 20.0),
        ),
        # getUpdates adds its long-poll timeout to this read timeout itself.
        get_updates_request=HTTPXRequest(
            connection_pool_size=1,
            read_timeout=t,
            write_timeout=t,
            connect_timeout=t,
            pool_timeout=t,
        ),
    )


def translate_error(exc: TelegramError, what: str, token: str) -> DriverError:
    """Map a Bot API error to the driver taxonomy (the token never reaches a message)."""
    detail = str(exc).replace(token, "***")
    if isinstance(exc, InvalidToken):
        return AuthFailed(f"{what}: the Bot API refused the bot token")
    if isinstance(exc, RetryAfter):
        wait = retry_after_seconds(exc)
        return RateLimited(f"{what}: Telegram flood control, retry in {wait:g} s", wait)
    if isinstance(exc, Forbidden):
        return PermanentError(f"{what}: forbidden: {detail}")
    if isinstance(exc, ChatMigrated):
        return PermanentError(f"{what}: the group moved to chat {exc.new_chat_id}")
    if isinstance(exc, BadRequest):
        return PermanentError(f"{what}: Telegram refused the request: {detail}")
    if isinstance(exc, TgTimedOut):
        return TimedOut(f"{what}: timed out")
    if isinstance(exc, Conflict):
        return TransientError(f"{what}: conflict (another poller or a webhook?): {detail}")
    if isinstance(exc, NetworkError):
        return TransientError(f"{what}: {detail}")
    return TransientError(f"{what}: {type(exc).__name__}: {detail}")


def _identifiers(message: Message) -> tuple[str, ...]:
    """Return what Telegram vouches for about a private chat's customer.

    The user id (Telegram authenticates its users), and the phone number of a contact
    card the user shared of themselves (Telegram fills `user_id` only for an account's
    own number, and the share button sends only the sender's own). A group chat has
    many people behind one handle: it links nothing.
    """
    user = message.from_user
    if message.chat.type != "private" or user is None or user.is_bot:
        return ()
    out = [telegram_identifier(user.id)]
    card = message.contact
    if card is not None and card.user_id == user.id and card.phone_number:
        digits = re.sub(r"[\s().-]", "", card.phone_number)
        out.append(phone_identifier(digits if digits.startswith("+") else "+" + digits))
    return tuple(i for i in out if i)


def _display_name(message: Message) -> str:
    """Return the sender's first and last name, else @username, else ""."""
    user = message.from_user
    if user is None:
        return message.chat.title or ""
    name = " ".join(p for p in (user.first_name, user.last_name) if p).strip()
    return name or (f"@{user.username}" if user.username else "")


def _is_start(text: str | None) -> bool:
    """Tell whether the text is the /start command (optionally @bot and a deep-link payload)."""
    if not text or not text.startswith("/start"):
        return False
    command = text.split(maxsplit=1)[0]
    return command == "/start" or command.startswith("/start@")


def _describe(message: Message) -> str:
    """Return a short text for content without text (a sticker, a location, a contact)."""
    if message.sticker is not None:
        return f"[sticker {message.sticker.emoji or ''}]".replace(" ]", "]")
    if message.location is not None:
        loc = message.location
        return f"[location {loc.latitude:.6f}, {loc.longitude:.6f}]"
    if message.contact is not None:
        c = message.contact
        name = " ".join(p for p in (c.first_name, c.last_name) if p)
        return f"[contact {name} {c.phone_number}]".strip()
    return ""


class TelegramChannel(ChannelBase):
    """One Telegram bot. Constructed as `TelegramChannel(name, config, ctx)`."""

    config_model: ClassVar[type[TelegramConfig]] = TelegramConfig
    answers_customers = True  # acknowledgements and agent replies go to the chat
    single_owner = True  # when polling: getUpdates allows one poller per bot

    @classmethod
    def single_owner_for(cls, config: TelegramConfig) -> bool:
        """Poll on one instance only; in webhook mode every instance takes Telegram's POSTs."""
        return config.mode == "polling"

    def __init__(self, name: str, config: TelegramConfig, ctx: DriverContext) -> None:
        """Prepare the channel; nothing connects until run() or send()."""
        super().__init__(name, ctx)
        # PTB 22 warns on every RetryAfter (and media durations) unless the process opts
        # into v23's timedelta attributes; we read both forms, so opt in.
        os.environ.setdefault("PTB_TIMEDELTA", "true")
        self.config = config
        self.directory = Path(ctx.state_dir) / "telegram" / name
        self._token = config.token.get_secret_value()
        self._bot: Bot | None = None
        self._bot_ready = False
        self._bot_lock = asyncio.Lock()
        self._threads: IdleThreads | None = None
        self._state: _ChatState | None = None
        self._offset: int | None = None  # kept across run() calls of this instance only
        self._auth_failed = False
        self._stopping = False
        self._stop = asyncio.Event()
        self._done = asyncio.Event()
        self._done.set()
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._port: int | None = None
        self._sink: MessageSink | None = None
        # Flood control: monotonic time until which a chat ("" = the whole bot) waits.
        self._paused: dict[str, float] = {}
        self._chat_locks: dict[str, asyncio.Lock] = {}
        # Counters for metrics and tests.
        self.committed = 0
        self.duplicates = 0
        self.ignored = 0
        self.sent = 0

    @property
    def bound_port(self) -> int | None:
        """Return the webhook listener's port (the real one for port 0); None when not listening."""
        return self._port

    # -- resources ---------------------------------------------------------------------

    @property
    def bot(self) -> Bot:
        """Return the Bot API client (built on first use; no I/O)."""
        if self._bot is None:
            cfg = self.config
            self._bot = build_bot(
                self._token, cfg.base_url, cfg.base_file_url, cfg.timeout, cfg.max_connections
            )
        return self._bot

    def _files(self) -> tuple[IdleThreads, _ChatState]:
        """Open the thread and state files on first use."""
        if self._threads is None or self._state is None:
            self._threads = IdleThreads(self.directory / "threads.db", self.config.thread_window)
            self._state = _ChatState(self.directory / "state.db")
        return self._threads, self._state

    async def _ensure_bot(self) -> Bot:
        """Initialise the client once (getMe checks the token); raise the driver taxonomy."""
        bot = self.bot
        if self._bot_ready:
            return bot
        async with self._bot_lock:
            if not self._bot_ready:
                try:
                    await bot.initialize()
                except TelegramError as exc:
                    raise self._translate(exc, "getMe") from None
                self._bot_ready = True
                self.log.info("telegram.bot", bot_id=bot.id, username=bot.username)
        return bot

    async def _close_bot(self) -> None:
        """Release the HTTP connections (a later send initialises again)."""
        # Also after a failed initialize(): its HTTP clients are open by then.
        if self._bot is not None:
            self._bot_ready = False
            with contextlib.suppress(Exception):
                await self._bot.shutdown()

    def _translate(self, exc: TelegramError, what: str) -> DriverError:
        """Map a Bot API error to the driver taxonomy (the token never reaches a message)."""
        return translate_error(exc, what, self._token)

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self, sink: MessageSink) -> None:
        """Take updates into sink until stop() or cancellation; raise on failures.

        An invalid token parks the channel as bad_credentials (AuthFailed, and the next
        attempt waits `auth_retry_interval`); network trouble raises TransientError so the
        supervisor backs off.
        """
        if self._stopping:
            return
        if not self._done.is_set():
            raise RuntimeError(f"telegram channel {self.name} is already running")
        self._done.clear()
        self._sink = sink
        try:
            if self._auth_failed:
                await self._sleep(self.config.auth_retry_interval)
                if self._stopping:
                    return
            self._set_state(DriverState.CONNECTING)
            await asyncio.to_thread(self._files)
            await self._ensure_bot()
            self._auth_failed = False
            if self.config.mode == "polling":
                await self._poll(sink)
            else:
                await self._serve()
        except AuthFailed as exc:
            self._auth_failed = True
            self._set_state(DriverState.BAD_CREDENTIALS, str(exc))
            raise
        except TransientError as exc:
            self._set_state(DriverState.TRANSIENT_DISCONNECT, str(exc))
            raise
        finally:
            if self.state not in (DriverState.TRANSIENT_DISCONNECT, DriverState.BAD_CREDENTIALS):
                self._set_state(DriverState.STOPPED)
            self._done.set()

    async def stop(self) -> None:
        """Stop taking updates; what is being committed finishes; release connections."""
        self._stopping = True
        self._stop.set()
        await self._idle.wait()
        await self._done.wait()
        await self._close_bot()
        if self._threads is not None and self._state is not None:
            threads, state = self._threads, self._state
            self._threads = self._state = None
            threads.close()
            state.close()
        self._set_state(DriverState.STOPPED)

    async def _sleep(self, delay: float) -> None:
        """Wait delay seconds or until stop()."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), delay)

    # -- polling -------------------------------------------------------------------------

    async def _poll(self, sink: MessageSink) -> None:
        """Long-poll getUpdates; move the offset past a batch only once it is committed."""
        bot = self.bot
        cfg = self.config
        try:
            # getUpdates answers 409 while a webhook is set.
            await bot.delete_webhook(drop_pending_updates=False)
        except TelegramError as exc:
            raise self._translate(exc, "deleteWebhook") from None
        self._set_state(DriverState.CONNECTED)
        self.log.info("telegram.polling", offset=self._offset)
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            while not self._stopping:
                fetch = asyncio.ensure_future(
                    bot.get_updates(
                        offset=self._offset,
                        limit=cfg.poll_limit,
                        timeout=cfg.poll_timeout,
                        allowed_updates=ALLOWED_UPDATES,
                    )
                )
                await asyncio.wait({fetch, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if not fetch.done():
                    fetch.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await fetch
                    break
                try:
                    updates = fetch.result()
                except TelegramError as exc:
                    raise self._translate(exc, "getUpdates") from None
                self._set_state(DriverState.CONNECTED)
                self._succeeded()
                if updates:
                    await self._take_batch(updates, sink)
                    # Telegram confirms everything below the offset of the next call.
                    self._offset = updates[-1].update_id + 1
        finally:
            stopped.cancel()
        await self._confirm()

    async def _confirm(self) -> None:
        """Confirm the committed updates before exiting (saves a re-read; best effort)."""
        if self._offset is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self.bot.get_updates(offset=self._offset, limit=1, timeout=0), self.config.timeout
            )

    async def _take_batch(self, updates: tuple[Update, ...], sink: MessageSink) -> None:
        """Commit a batch: chats in parallel (the store groups the commits), each in order."""
        by_chat: dict[str, list[Update]] = {}
        for update in updates:
            chat = update.effective_chat
            by_chat.setdefault("" if chat is None else str(chat.id), []).append(update)
        if len(by_chat) == 1:
            await self._take_chat(updates, sink)
            return
        results = await asyncio.gather(
            *(self._take_chat(batch, sink) for batch in by_chat.values()), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                # Committed ones become no-ops when the batch is read again.
                raise result

    async def _take_chat(
        self, updates: tuple[Update, ...] | list[Update], sink: MessageSink
    ) -> None:
        """Take one chat's updates in order."""
        for update in updates:
            await self._take(update, sink)

    # -- one update ------------------------------------------------------------------------

    async def _take(self, update: Update, sink: MessageSink) -> None:
        """Commit one update's message (or greet, or skip it); raise TransientError to retry."""
        edited = update.edited_message is not None
        message = update.edited_message if edited else update.message
        if message is None:
            self.ignored += 1
            self.log.debug("telegram.update_ignored", update_id=update.update_id)
            return
        chat = message.chat
        if chat.type != "private" and not self.config.groups:
            self.ignored += 1
            self.log.debug(
                "telegram.group_ignored", update_id=update.update_id, chat_type=chat.type
            )
            return
        chat_id = str(chat.id)
        if not edited and _is_start(message.text):
            await self._greet(message)
            return
        text = message.text or message.caption or _describe(message)
        attachments = await self._attachments(message)
        if not text and not attachments:
            self.ignored += 1  # service messages (a member joined, a pinned message, ...)
            self.log.debug("telegram.no_content", update_id=update.update_id)
            return
        threads, state = self._files()
        now = time.time()
        hint: str | None = None
        if edited:
            hint = await asyncio.to_thread(state.thread_of, chat_id, message.message_id)
        if hint is None:
            hint = await asyncio.to_thread(threads.thread_for, chat_id, now)
        raw = _canonical(update)
        when = message.edit_date if edited and message.edit_date else message.date
        inbound = InboundMessage(
            channel=self.name,
            channel_type="telegram",
            external_id=(
                f"{chat_id}:{message.message_id}:edit:{update.update_id}"
                if edited
                else f"{chat_id}:{message.message_id}"
            ),
            contact_handle=chat_id,
            contact_name=_display_name(message),
            text=text,
            subject=EDITED_SUBJECT if edited else "",
            conversation_hint=hint,
            received_at=when.astimezone(UTC) if isinstance(when, datetime) else None,
            attachments=attachments,
            payload_sha256=hashlib.sha256(raw).hexdigest(),
            raw=raw,
            reply_ref=str(message.message_id),
            identifiers=_identifiers(message),
        )
        try:
            receipt = await sink(inbound)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Not committed: the offset stays (polling) or Telegram retries (503).
            raise TransientError(
                f"sink failed on update {update.update_id}: {type(exc).__name__}: {exc}"
            ) from exc
        await asyncio.to_thread(self._after_commit, chat_id, message.message_id, hint, now, edited)
        if receipt.duplicate:
            self.duplicates += 1
        else:
            self.committed += 1
        self._succeeded()

    def _after_commit(
        self, chat: str, message_id: int, hint: str, now: float, edited: bool
    ) -> None:
        """Record the thread's activity and the message's thread (for later edits)."""
        threads, state = self._files()
        if not edited:
            # An edit of an older message must not make its old thread current again.
            threads.seen(chat, hint, now)
        state.committed(chat, message_id, hint, now)

    async def _greet(self, message: Message) -> None:
        """Answer /start with the greeting; a refused send is logged, a network error retried."""
        user = message.from_user
        code = (user.language_code or "") if user is not None else ""
        lang = "zh" if code.lower().startswith("zh") else "en"
        try:
            await self._ensure_bot()
            await self.bot.send_message(chat_id=message.chat.id, text=self.config.greeting[lang])
        except TelegramError as exc:
            error = self._translate(exc, "sendMessage")
            if isinstance(error, TransientError):
                raise error from None
            self.log.warning("telegram.greeting_failed", error=str(error))
            return
        self.log.info("telegram.greeted", language=lang)

    async def _attachments(self, message: Message) -> tuple[Attachment, ...]:
        """Download the message's file (photo, document, voice, audio, video) and keep it."""
        file_id = ""
        size: int | None = None
        name, mime = "", "application/octet-stream"
        mid = message.message_id
        if message.photo:
            best = max(message.photo, key=lambda p: (p.file_size or 0, p.width * p.height))
            file_id, size, name, mime = (
                best.file_id,
                best.file_size,
                f"photo-{mid}.jpg",
                "image/jpeg",
            )
        elif message.document is not None:
            d = message.document
            file_id, size = d.file_id, d.file_size
            name, mime = d.file_name or f"document-{mid}", d.mime_type or mime
        elif message.voice is not None:
            v = message.voice
            file_id, size, name, mime = (
                v.file_id,
                v.file_size,
                f"voice-{mid}.ogg",
                v.mime_type or "audio/ogg",
            )
        elif message.audio is not None:
            a = message.audio
            file_id, size = a.file_id, a.file_size
            name, mime = a.file_name or f"audio-{mid}", a.mime_type or "audio/mpeg"
        elif message.video is not None:
            vd = message.video
            file_id, size = vd.file_id, vd.file_size
            name, mime = vd.file_name or f"video-{mid}.mp4", vd.mime_type or "video/mp4"
        if not file_id:
            return ()
        cap = self.config.max_attachment_bytes
        if size is not None and size > cap:
            self.log.warning("telegram.attachment_too_large", size=size, limit=cap)
            return (Attachment(name=name, mime_type=mime, size=size, sha256=""),)
        try:
            await self._ensure_bot()
            tg_file = await self.bot.get_file(file_id)
            if tg_file.file_size is not None and tg_file.file_size > cap:
                self.log.warning("telegram.attachment_too_large", size=tg_file.file_size, limit=cap)
                return (Attachment(name=name, mime_type=mime, size=tg_file.file_size, sha256=""),)
            data = bytes(await tg_file.download_as_bytearray())
        except TelegramError as exc:
            error = self._translate(exc, "getFile")
            if isinstance(error, TransientError):
                raise error from None
            # Gone or too big for the Bot API: list it without its bytes.
            self.log.warning("telegram.attachment_unavailable", error=str(error))
            return (Attachment(name=name, mime_type=mime, size=size or 0, sha256=""),)
        if len(data) > cap:
            self.log.warning("telegram.attachment_too_large", size=len(data), limit=cap)
            return (Attachment(name=name, mime_type=mime, size=len(data), sha256=""),)
        folder = self.directory / "attachments"
        return (await asyncio.to_thread(keep_attachment, folder, name, mime, data),)

    # -- webhook -------------------------------------------------------------------------

    async def _serve(self) -> None:
        """Listen for Telegram's POSTs, register the webhook, serve until stop()."""
        cfg = self.config
        app = web.Application(client_max_size=cfg.max_body_bytes)
        app.router.add_route("*", cfg.webhook_path, self._handle_webhook)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, cfg.webhook_host, cfg.webhook_port)
            try:
                await site.start()
            except OSError as exc:
                raise TransientError(
                    f"cannot listen on {cfg.webhook_host}:{cfg.webhook_port}: {exc.strerror or exc}"
                ) from None
            self._port = int(runner.addresses[0][1])
            assert cfg.webhook_url is not None and cfg.webhook_secret is not None  # validated
            try:
                await self.bot.set_webhook(
                    url=cfg.webhook_url,
                    secret_token=cfg.webhook_secret.get_secret_value(),
                    allowed_updates=ALLOWED_UPDATES,
                    max_connections=cfg.webhook_max_connections,
                    drop_pending_updates=False,
                )
            except TelegramError as exc:
                raise self._translate(exc, "setWebhook") from None
            self._set_state(DriverState.CONNECTED)
            self.log.info("telegram.webhook_listening", host=cfg.webhook_host, port=self._port)
            await self._stop.wait()
            # The webhook stays set: Telegram keeps and retries updates while we are down.
        finally:
            self._port = None
            await runner.cleanup()

    async def _handle_webhook(self, request: web.Request) -> web.Response:
        """Take one update from Telegram: 200 after commit, 4xx for bad input, 503 to retry."""
        if request.method != "POST":
            return web.Response(status=405, headers={"Allow": "POST"})
        if self._stopping or self._sink is None:
            return web.Response(status=503, headers={"Retry-After": "5"})
        secret = self.config.webhook_secret
        given = request.headers.get(SECRET_HEADER, "")
        if secret is None or not hmac.compare_digest(
            given.encode("utf-8", "replace"), secret.get_secret_value().encode()
        ):
            return web.json_response({"error": "forbidden"}, status=403)
        length = request.content_length
        if length is not None and length > self.config.max_body_bytes:
            return web.json_response({"error": "body too large"}, status=413)
        self._inflight += 1
        self._idle.clear()
        try:
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return web.json_response({"error": "body too large"}, status=413)
            try:
                data = json.loads(body.decode("utf-8"))
                if not isinstance(data, dict) or type(data.get("update_id")) is not int:
                    raise ValueError("not an Update")
                update = Update.de_json(data, self.bot)
            except (ValueError, TypeError, KeyError, RecursionError, AttributeError):
                return web.json_response({"error": "not a Telegram Update"}, status=400)
            try:
                await self._take(update, self._sink)
            except TransientError as exc:
                self.last_error = str(exc)
                self.log.error("telegram.webhook_not_committed", error=str(exc))
                return web.Response(status=503, headers={"Retry-After": "1"})
            except Exception:
                # A bug on one update must not make Telegram retry it for ever.
                self.log.exception("telegram.update_failed", update_id=update.update_id)
                return web.Response(status=200)
            return web.Response(status=200)
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    # -- sending -------------------------------------------------------------------------

    async def send(self, outbound: Outbound) -> None:
        """Send an acknowledgement or agent reply to the chat; raise the driver taxonomy."""
        cfg = self.config
        if outbound.kind == "ack" and not cfg.ack.enabled:
            self.log.info("telegram.ack_disabled", outbound_id=outbound.id)
            return
        # A survey (the satisfaction question after resolve) is sent like a reply.
        if outbound.kind not in ("ack", "reply", "survey"):
            raise PermanentError(f"telegram: unknown outbound kind {outbound.kind!r}")
        chat = outbound.to
        try:
            chat_id = int(chat)
        except ValueError:
            raise PermanentError(f"telegram: {chat!r} is not a chat id") from None
        _, state = await asyncio.to_thread(self._files)
        reason = await asyncio.to_thread(state.unreachable, chat)
        if reason is not None:
            raise PermanentError(reason)
        text = ack_text(outbound, cfg.ack) if outbound.kind == "ack" else outbound.text
        parts = split_message(text)
        lock = self._chat_locks.setdefault(chat, asyncio.Lock())
        async with lock:
            done = await asyncio.to_thread(state.parts_sent, outbound.id) if len(parts) > 1 else 0
            for i in range(done, len(parts)):
                self._check_pause(chat)
                bot = await self._ensure_bot()
                try:
                    await bot.send_message(chat_id=chat_id, text=parts[i])
                except TelegramError as exc:
                    raise await self._send_failed(exc, chat) from None
                if len(parts) > 1:
                    # A retry after a later part failed resumes after this one.
                    await asyncio.to_thread(state.record_parts, outbound.id, i + 1)
        if not lock.locked() and self._chat_locks.get(chat) is lock:
            del self._chat_locks[chat]
        self.sent += 1
        self._succeeded()
        self.log.info(
            "telegram.sent", outbound_id=outbound.id, kind=outbound.kind, parts=len(parts)
        )

    def _check_pause(self, chat: str) -> None:
        """Raise RateLimited while Telegram's flood control holds this chat or the bot."""
        now = time.monotonic()
        until = max(self._paused.get(chat, 0.0), self._paused.get("", 0.0))
        if until > now:
            raise RateLimited("telegram: waiting out flood control", until - now)

    async def _send_failed(self, exc: TelegramError, chat: str) -> DriverError:
        """Return the taxonomy error of a failed send, recording pauses and blocked chats."""
        error = self._translate(exc, "sendMessage")
        if isinstance(error, RateLimited):
            # Telegram does not say whether the chat's or the bot's limit was hit: hold
            # both, so other sends obey it too instead of deepening the ban.
            until = time.monotonic() + error.retry_after
            self._paused[chat] = max(self._paused.get(chat, 0.0), until)
            self._paused[""] = max(self._paused.get("", 0.0), until)
            self.log.warning("telegram.rate_limited", retry_after=error.retry_after)
        elif isinstance(exc, Forbidden):
            detail = str(exc).lower()
            reason = (
                BLOCKED
                if "blocked" in detail
                else "user is deactivated"
                if "deactivated" in detail
                else f"bot cannot write to this chat ({exc})"
            )
            _, state = self._files()
            await asyncio.to_thread(state.mark_unreachable, chat, reason)
            self.log.warning("telegram.chat_unreachable", reason=reason)
            error = PermanentError(reason)
        elif isinstance(error, AuthFailed):
            self._set_state(DriverState.BAD_CREDENTIALS, str(error))
        return error


def _canonical(update: Update) -> bytes:
    """Return the update as canonical JSON (the same bytes for a re-delivered update)."""
    return json.dumps(
        update.to_dict(), ensure_ascii=False, sort_keys=True, separators=(",", ":")
    ).encode("utf-8")
