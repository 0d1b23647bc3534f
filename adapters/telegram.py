"""Telegram agent tool: work posted to an agents' group or an agent's private chat, with buttons.

Deliveries go to the agent's private chat when the agent has an `address` (their
Telegram user id, which is also the id of their private chat with the bot), else to
the agents' group `chat_id`. Everything is sent as plain text (no `parse_mode`), so
customer text is never read as markup; `@` in customer text is followed by a word
joiner, so it cannot mention anyone in the group either. Texts longer than 4,096
UTF-16 units are split with the customer channel's splitter; an assignment's last part
carries the inline buttons Accept and Resolve.

Agents act in Telegram:

* a button press (a `callback_query`) hands `accept` / `resolve` to the router; the
  callback data is `<a|r>:<ref>:<sig>`, where `ref` numbers the post in the tool's own
  state file and `sig` is a truncated HMAC-SHA256 under a key kept there, so forged or
  altered data is refused (Telegram allows 64 bytes; ours is at most 40);
* a reply to one of the bot's posts (`reply_to_message`) is relayed to the customer as a
  `reply`; a reply that starts with a command acts on that ticket instead: `/accept`,
  `/resolve`, `/transfer billing` (a queue; `@bob` or `agent:bob` for an agent),
  `/relabel complaint`;
* `/on`, `/away`, `/off` in a private chat with the bot set the agent's presence.

Who acts is the Telegram user id of the sender, mapped to an agent by the `agents`
table of the config or by an agent's `address` (learned from deliveries and kept in the
state file). Anyone else is told so and nothing reaches the router. Whether the agent
may act on the ticket is the router's decision: it refuses an action on a ticket the
agent does not hold and sends a `notice`, which is posted to that agent like any
delivery.

Polling: `getUpdates` runs in `run()`; an update is confirmed (the offset moves past
it) only after the router's action sink returned, and the last handled update id is
kept in the state file, so an update re-read after a crash is not applied twice.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from telegram import Bot, CallbackQuery, InlineKeyboardButton, InlineKeyboardMarkup, Message, Update
from telegram.error import TelegramError

from channels.telegram import (
    build_bot,
    check_token,
    check_url,
    split_message,
    translate_error,
)
from router.actions import ActionError, parse_action
from router.delivery import (
    AlertPayload,
    AssignmentPayload,
    NoticePayload,
    WithdrawnPayload,
)
from router.drivers import (
    AGENT_ID_RE,
    NAME_RE,
    ActionSink,
    AgentAction,
    AgentToolBase,
    AuthFailed,
    Delivery,
    DriverContext,
    DriverError,
    DriverState,
    PermanentError,
    RateLimited,
    TransientError,
)
from router.model import ticket_number

__all__ = ["TelegramTool", "TelegramToolConfig", "callback_data", "verify_callback"]

ALLOWED_UPDATES = ("message", "callback_query")
# Callback data codes: what a button does.
_BUTTONS = {"a": "accept", "r": "resolve"}
_SIG_BYTES = 12  # 96 bits of HMAC, 16 characters of base64url
_WORD_JOINER = "\u2060"
_PRESENCE = ("on", "away", "off")
_POSTS_DAYS = 30
HELP = (
    "Work arrives here with Accept and Resolve buttons. Reply to a ticket to answer the "
    "customer; in a reply, /resolve, /transfer <queue or @agent> and /relabel <label> act "
    "on it. In this private chat, /on, /away and /off set your presence."
)


class TelegramToolConfig(BaseModel):
    """Settings of one Telegram agent tool (`[[adapters]] type = "telegram"`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["telegram"]
    name: str = Field(pattern=NAME_RE)
    token: SecretStr  # the tool's own bot, from @BotFather; "${ENV}" or "file:/path"
    # The agents' group (a negative id); agents without an address get their work here.
    chat_id: int | None = None
    # Telegram user id -> agent id; agents whose address is their user id need no entry.
    agents: dict[str, str] = Field(default_factory=dict)
    base_url: str = "https://api.telegram.org/bot"
    base_file_url: str = "https://api.telegram.org/file/bot"
    timeout: float = Field(default=10.0, gt=0, le=300)
    max_connections: int = Field(default=16, ge=1, le=1024)
    poll_timeout: int = Field(default=30, ge=0, le=50)
    poll_limit: int = Field(default=100, ge=1, le=100)

    @field_validator("token")
    @classmethod
    def _token(cls, value: SecretStr) -> SecretStr:
        """Refuse a token that cannot be a bot token."""
        return check_token(value)

    @field_validator("base_url", "base_file_url")
    @classmethod
    def _urls(cls, value: str) -> str:
        """Refuse non-http(s) URLs and plain http off loopback."""
        return check_url(value, "the URL")

    @field_validator("agents")
    @classmethod
    def _agents(cls, value: dict[str, str]) -> dict[str, str]:
        """Keys are Telegram user ids (digits), values agent ids."""
        for user, agent in value.items():
            if not user.isdigit() or len(user) > 20:
                raise ValueError(f"agents: key {user!r} must be a Telegram user id (digits)")
            if not re.fullmatch(AGENT_ID_RE, agent):
                raise ValueError(f"agents: {agent!r} is not a valid agent id")
        return value


# -- callback data -----------------------------------------------------------------------


def _sign(key: bytes, text: str) -> str:
    digest = hmac.new(key, text.encode(), hashlib.sha256).digest()[:_SIG_BYTES]
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def callback_data(key: bytes, code: str, ref: int) -> str:
    """Return the signed callback data of a button (`<code>:<ref>:<sig>`, ≤ 64 bytes)."""
    body = f"{code}:{ref}"
    return f"{body}:{_sign(key, body)}"


def verify_callback(key: bytes, data: str) -> tuple[str, int] | None:
    """Return (action, ref) of genuine callback data, or None for anything forged or odd."""
    parts = data.split(":")
    if len(parts) != 3 or parts[0] not in _BUTTONS or not parts[1].isdigit():
        return None
    if len(parts[1]) > 18:
        return None
    body = f"{parts[0]}:{parts[1]}"
    if not hmac.compare_digest(parts[2].encode(), _sign(key, body).encode()):
        return None
    return _BUTTONS[parts[0]], int(parts[1])


# -- the tool's own small state ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Ref:
    """What one post is about: the delivery's agent, conversation and message."""

    ref: int
    agent_id: str
    conversation_id: str
    message_id: str


class _ToolState:
    """Posts and their refs, parts sent, learned user ids, the signing key, the last update."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        with contextlib.suppress(OSError):
            os.chmod(path, 0o600)  # it holds the signing key
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS refs(ref INTEGER PRIMARY KEY AUTOINCREMENT,"
            " delivery TEXT UNIQUE NOT NULL, agent TEXT NOT NULL, conversation TEXT NOT NULL,"
            " message TEXT NOT NULL, chat TEXT NOT NULL, sent INTEGER NOT NULL DEFAULT 0,"
            " at REAL NOT NULL);"
            "CREATE TABLE IF NOT EXISTS posts(chat TEXT NOT NULL, message_id INTEGER NOT NULL,"
            " ref INTEGER NOT NULL, at REAL NOT NULL, PRIMARY KEY(chat, message_id));"
            "CREATE TABLE IF NOT EXISTS users(user TEXT PRIMARY KEY, agent TEXT NOT NULL);"
            "CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v TEXT NOT NULL);"
        )
        cutoff = time.time() - _POSTS_DAYS * 86400
        self._db.execute("DELETE FROM posts WHERE at < ?", (cutoff,))
        self._db.execute("DELETE FROM refs WHERE at < ?", (cutoff,))
        row = self._db.execute("SELECT v FROM meta WHERE k='key'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta(k, v) VALUES ('key', ?)", (secrets.token_hex(32),))
            row = self._db.execute("SELECT v FROM meta WHERE k='key'").fetchone()
        self.key = bytes.fromhex(str(row[0]))

    def ref_for(
        self, delivery: Delivery, conversation: str, message: str, chat: str
    ) -> tuple[int, int]:
        """Return (ref, parts already sent) of a delivery, creating its ref on first use."""
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO refs(delivery, agent, conversation, message, chat, at)"
                " VALUES (?,?,?,?,?,?)",
                (delivery.id, delivery.agent_id, conversation, message, chat, time.time()),
            )
            row = self._db.execute(
                "SELECT ref, sent FROM refs WHERE delivery=?", (delivery.id,)
            ).fetchone()
        return int(row[0]), int(row[1])

    def posted(self, ref: int, chat: str, message_id: int, sent: int) -> None:
        """Record one part sent: the post points at its ref, the ref counts its parts."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO posts(chat, message_id, ref, at) VALUES (?,?,?,?)",
                (chat, message_id, ref, time.time()),
            )
            self._db.execute("UPDATE refs SET sent=? WHERE ref=?", (sent, ref))

    def ref(self, ref: int) -> _Ref | None:
        """Return a ref by number."""
        with self._lock:
            row = self._db.execute(
                "SELECT ref, agent, conversation, message FROM refs WHERE ref=?", (ref,)
            ).fetchone()
        return None if row is None else _Ref(int(row[0]), str(row[1]), str(row[2]), str(row[3]))

    def ref_of_post(self, chat: str, message_id: int) -> _Ref | None:
        """Return the ref of one of our posts in a chat."""
        with self._lock:
            row = self._db.execute(
                "SELECT ref FROM posts WHERE chat=? AND message_id=?", (chat, message_id)
            ).fetchone()
        return None if row is None else self.ref(int(row[0]))

    def last_posts(self, agent: str, conversation: str) -> list[tuple[str, int]]:
        """Return (chat, last message id) of each assignment post of this agent's conversation."""
        with self._lock:
            rows = self._db.execute(
                "SELECT p.chat, MAX(p.message_id) FROM posts p JOIN refs r ON p.ref = r.ref"
                " WHERE r.agent=? AND r.conversation=? AND r.message != '' GROUP BY r.ref",
                (agent, conversation),
            ).fetchall()
        return [(str(r[0]), int(r[1])) for r in rows]

    def learn(self, user: str, agent: str) -> None:
        """Remember that this Telegram user id is this agent (from the agent's address)."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO users(user, agent) VALUES (?,?)", (user, agent)
            )

    def agent_of(self, user: str) -> str | None:
        """Return the agent a Telegram user id was learned as."""
        with self._lock:
            row = self._db.execute("SELECT agent FROM users WHERE user=?", (user,)).fetchone()
        return None if row is None else str(row[0])

    def handled(self) -> int:
        """Return the last update id handed to the router."""
        with self._lock:
            row = self._db.execute("SELECT v FROM meta WHERE k='handled'").fetchone()
        return 0 if row is None else int(row[0])

    def set_handled(self, update_id: int) -> None:
        """Record that this update was handed to the router."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO meta(k, v) VALUES ('handled', ?)", (str(update_id),)
            )

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._db.close()


# -- rendering ---------------------------------------------------------------------------


def _quiet(text: str) -> str:
    """Return customer text that cannot mention anyone (plain text: no markup to escape)."""
    return text.replace("@", "@" + _WORD_JOINER)


def _when(iso_text: str) -> str:
    """Return an ISO 8601 time as `YYYY-MM-DD HH:MM UTC±hh:mm`, or the text as given."""
    try:
        dt = datetime.fromisoformat(iso_text)
    except ValueError:
        return iso_text
    return dt.strftime("%Y-%m-%d %H:%M %Z").strip() or iso_text


def render(delivery: Delivery, in_group: bool) -> str:
    """Return the plain text of a delivery as the agent reads it in Telegram."""
    p = delivery.payload
    whom = f" · for {delivery.agent_id}" if in_group else ""
    if isinstance(p, AssignmentPayload):
        m, c = p.message, p.classification
        contact = m.contact.name or m.contact.handle
        lines = [
            f"New work {ticket_number(p.conversation_id)} · {c.label} · {c.severity}{whom}",
            f"From: {_quiet(contact)} ({m.channel})",
            f"Respond by: {_when(p.routing.sla_deadline)}",
        ]
        if m.subject:
            lines.append(f"Subject: {_quiet(m.subject)}")
        lines += ["", _quiet(m.text) or "(no text)", "", "Reply to this message to answer."]
        return "\n".join(lines)
    if isinstance(p, WithdrawnPayload):
        return f"Withdrawn {ticket_number(p.conversation_id)}{whom}: {p.reason}"
    if isinstance(p, NoticePayload):
        ticket = f" on {ticket_number(p.conversation_id)}" if p.conversation_id else ""
        return f"Not done{whom}: {p.action}{ticket} ({p.outcome}): {p.reason}"
    if isinstance(p, AlertPayload):
        kind = str(p.alert.get("kind", "alert"))
        detail = json.dumps(p.alert, ensure_ascii=False, sort_keys=True, default=str)
        return f"Alert{whom}: {kind}\n{_quiet(detail)}"
    raise PermanentError(f"telegram: unknown delivery kind {delivery.kind!r}")


def _command(text: str) -> tuple[str, str] | None:
    """Return (command, argument) of a `/command[@bot] arg` text, or None."""
    if not text.startswith("/"):
        return None
    head, _, arg = text.strip().partition(" ")
    name = head[1:].split("@", 1)[0].lower()
    return (name, arg.strip()) if name else None


def _transfer_target(arg: str) -> str:
    """Return the transfer value for `billing`, `@bob`, `agent:bob` or `queue:billing`."""
    if arg.startswith("@"):
        return f"agent:{arg[1:]}"
    if arg.startswith(("agent:", "queue:")) or not arg:
        return arg
    return f"queue:{arg}"


# -- the tool ----------------------------------------------------------------------------


class TelegramTool(AgentToolBase):
    """Post deliveries to Telegram; turn agents' buttons and replies into actions."""

    config_model: ClassVar[type[TelegramToolConfig]] = TelegramToolConfig
    sends_actions = True  # buttons, replies, slash commands and presence come back
    single_owner = True  # getUpdates allows one poller per bot (any instance posts)

    def __init__(self, name: str, config: TelegramToolConfig, ctx: DriverContext) -> None:
        """Prepare the tool; nothing connects until run() or deliver()."""
        super().__init__(name, ctx)
        os.environ.setdefault("PTB_TIMEDELTA", "true")  # as the channel: read both forms
        self.config = config
        self.directory = Path(ctx.state_dir) / "telegram-tool" / name
        self._token = config.token.get_secret_value()
        self._bot: Bot | None = None
        self._bot_ready = False
        self._bot_lock = asyncio.Lock()
        self._state: _ToolState | None = None
        self._offset: int | None = None
        self._stopping = False
        self._paused_until = 0.0  # monotonic: flood control holds every send until then
        self.sleep: Callable[[float], Any] = asyncio.sleep  # injectable for tests
        self.rejected = 0  # presses and replies not handed to the router

    # -- resources -------------------------------------------------------------------------

    @property
    def bot(self) -> Bot:
        """Return the Bot API client (built on first use; no I/O)."""
        if self._bot is None:
            cfg = self.config
            self._bot = build_bot(
                self._token, cfg.base_url, cfg.base_file_url, cfg.timeout, cfg.max_connections
            )
        return self._bot

    async def _files(self) -> _ToolState:
        """Open the state file on first use."""
        if self._state is None:
            self._state = await asyncio.to_thread(_ToolState, self.directory / "state.db")
        return self._state

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
        return bot

    def _translate(self, exc: TelegramError, what: str) -> DriverError:
        """Map a Bot API error to the taxonomy; remember flood control for every send."""
        error = translate_error(exc, what, self._token)
        if isinstance(error, RateLimited):
            self._paused_until = max(self._paused_until, time.monotonic() + error.retry_after)
        return error

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self, actions: ActionSink) -> None:
        """Poll getUpdates and hand agents' actions to the router until cancelled."""
        if self._stopping:
            await asyncio.Event().wait()
        self._set_state(DriverState.CONNECTING)
        try:
            state = await self._files()
            bot = await self._ensure_bot()
            try:
                await bot.delete_webhook(drop_pending_updates=False)
            except TelegramError as exc:
                raise self._translate(exc, "deleteWebhook") from None
            self._set_state(DriverState.CONNECTED)
            await self._poll(bot, state, actions)
        except AuthFailed as exc:
            self._set_state(DriverState.BAD_CREDENTIALS, str(exc))
            raise
        except TransientError as exc:
            self._set_state(DriverState.TRANSIENT_DISCONNECT, str(exc))
            raise

    async def _poll(self, bot: Bot, state: _ToolState, actions: ActionSink) -> None:
        """Long-poll; confirm an update only after the router took its action."""
        cfg = self.config
        while True:
            try:
                updates = await bot.get_updates(
                    offset=self._offset,
                    limit=cfg.poll_limit,
                    timeout=cfg.poll_timeout,
                    allowed_updates=ALLOWED_UPDATES,
                )
            except TelegramError as exc:
                error = self._translate(exc, "getUpdates")
                if isinstance(error, RateLimited):
                    await self.sleep(error.retry_after)
                    continue
                raise error from None
            self._set_state(DriverState.CONNECTED)
            handled = await asyncio.to_thread(state.handled)
            for update in updates:
                if update.update_id > handled:
                    await self._take(update, actions)
                    await asyncio.to_thread(state.set_handled, update.update_id)
                # The next getUpdates confirms everything below the offset.
                self._offset = update.update_id + 1

    async def stop(self) -> None:
        """Release the HTTP connections and the state file; later deliveries wait."""
        self._stopping = True
        if self._bot is not None:
            self._bot_ready = False
            with contextlib.suppress(Exception):
                await self._bot.shutdown()
        if self._state is not None:
            state, self._state = self._state, None
            state.close()
        self._set_state(DriverState.STOPPED)

    # -- one update ----------------------------------------------------------------------

    async def _agent_of(self, user_id: int) -> str | None:
        """Return the agent a Telegram user is, from the config or a learned address."""
        key = str(user_id)
        agent = self.config.agents.get(key)
        if agent is None:
            state = await self._files()
            agent = await asyncio.to_thread(state.agent_of, key)
        return agent

    async def _take(self, update: Update, actions: ActionSink) -> None:
        """Turn one update into at most one action and hand it to the router."""
        if update.callback_query is not None:
            await self._take_press(update.callback_query, actions)
        elif update.message is not None:
            await self._take_message(update.message, actions)

    async def _hand(self, action: AgentAction, actions: ActionSink) -> None:
        """Hand an action to the router; its failure keeps the update for a retry."""
        try:
            await actions(action)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise TransientError(
                f"router failed on a {action.action} action: {type(exc).__name__}"
            ) from exc

    def _parse(self, agent_id: str, body: dict[str, str]) -> AgentAction:
        """Validate an action with the one parser; an invalid one goes to the router refused."""
        try:
            return parse_action(agent_id, json.dumps(body).encode())
        except ActionError as exc:
            self.log.warning("telegram.action_rejected", agent_id=agent_id, reason=str(exc))
            return exc.as_action(agent_id)

    async def _take_press(self, query: CallbackQuery, actions: ActionSink) -> None:
        """Handle a button press: check who pressed and the signature, then hand it over."""
        state = await self._files()
        agent = await self._agent_of(query.from_user.id)
        checked = verify_callback(state.key, query.data or "")
        ref = None if checked is None else await asyncio.to_thread(state.ref, checked[1])
        if agent is None:
            self.rejected += 1
            self.log.warning("telegram.action_rejected", reason="unknown Telegram user")
            await self._answer(query, "You are not registered as an agent here.")
            return
        if checked is None or ref is None:
            self.rejected += 1
            self.log.warning("telegram.action_rejected", agent_id=agent, reason="bad button data")
            await self._answer(query, "This button is not valid.")
            return
        name = checked[0]
        body = {"action": name, "conversation_id": ref.conversation_id}
        body["message_id"] = ref.message_id
        await self._hand(self._parse(agent, body), actions)
        await self._answer(
            query, f"{name.capitalize()}: sent for {ticket_number(ref.conversation_id)}"
        )

    async def _answer(self, query: CallbackQuery, text: str) -> None:
        """Answer a button press (stops its spinner); a failure is only logged."""
        try:
            await self.bot.answer_callback_query(query.id, text=text)
        except TelegramError as exc:
            self.log.warning("telegram.answer_failed", error=str(self._translate(exc, "answer")))

    async def _tell(self, message: Message, text: str) -> None:
        """Answer an agent's message in its chat (best effort)."""
        try:
            await self.bot.send_message(
                chat_id=message.chat.id, text=text, reply_to_message_id=message.message_id
            )
        except TelegramError as exc:
            self.log.warning("telegram.tell_failed", error=str(self._translate(exc, "send")))

    async def _take_message(self, message: Message, actions: ActionSink) -> None:
        """Handle a reply to one of our posts, or a presence command in a private chat."""
        user = message.from_user
        text = message.text or message.caption or ""
        if user is None or user.is_bot or not text.strip():
            return
        bot = self.bot
        parent = message.reply_to_message
        ours = parent is not None and parent.from_user is not None and parent.from_user.id == bot.id
        command = _command(text)
        private = message.chat.type == "private"
        if not ours and not (private and command is not None):
            return  # group talk that is not for us
        agent = await self._agent_of(user.id)
        if agent is None:
            self.rejected += 1
            self.log.warning("telegram.action_rejected", reason="unknown Telegram user")
            await self._tell(message, "Not done: you are not registered as an agent here.")
            return
        if not ours:
            assert command is not None
            name, _ = command
            if name in _PRESENCE:
                body = {"action": "presence", "value": name}
                await self._hand(self._parse(agent, body), actions)
            elif name in ("start", "help"):
                await self._tell(message, HELP)
            else:
                await self._tell(message, f"Unknown command /{name}. {HELP}")
            return
        assert parent is not None
        state = await self._files()
        ref = await asyncio.to_thread(state.ref_of_post, str(message.chat.id), parent.message_id)
        if ref is None:
            self.rejected += 1
            await self._tell(message, "Not done: that message is not a ticket I know.")
            return
        conv = ref.conversation_id
        if command is None:
            body = {"action": "reply", "conversation_id": conv, "value": text}
        else:
            name, arg = command
            body = {"action": name, "conversation_id": conv, "message_id": ref.message_id}
            if name == "transfer":
                body["value"] = _transfer_target(arg)
            elif name == "relabel":
                body["value"] = arg.lower()
        await self._hand(self._parse(agent, body), actions)

    # -- deliveries ----------------------------------------------------------------------

    async def deliver(self, delivery: Delivery) -> None:
        """Post the delivery (split at 4,096); raise the taxonomy of router.errors."""
        if self._stopping:
            raise TransientError(f"telegram {self.name}: stopped")
        # The core fills an unset address with the agent id: that means "no chat of its own".
        address = "" if delivery.address == delivery.agent_id else delivery.address
        if address:
            if not address.lstrip("-").isdigit():
                raise PermanentError(f"telegram: address {address[:40]!r} is not a chat id")
            chat_id = int(address)
        elif self.config.chat_id is not None:
            chat_id = self.config.chat_id
        else:
            raise PermanentError(
                f"telegram: agent {delivery.agent_id} has no address and no group is configured"
            )
        in_group = not address
        text = render(delivery, in_group)
        wait = self._paused_until - time.monotonic()
        if wait > 0:
            raise RateLimited("telegram: waiting out flood control", wait)
        state = await self._files()
        if address and int(address) > 0:
            await asyncio.to_thread(state.learn, address, delivery.agent_id)
        p = delivery.payload
        conv = p.conversation_id if not isinstance(p, AlertPayload) else ""
        mid = p.message.id if isinstance(p, AssignmentPayload) else ""
        chat = str(chat_id)
        ref, done = await asyncio.to_thread(state.ref_for, delivery, conv, mid, chat)
        parts = split_message(text)
        markup = None
        if isinstance(p, AssignmentPayload):
            markup = InlineKeyboardMarkup(
                [
                    [
                        InlineKeyboardButton(
                            "Accept", callback_data=callback_data(state.key, "a", ref)
                        ),
                        InlineKeyboardButton(
                            "Resolve", callback_data=callback_data(state.key, "r", ref)
                        ),
                    ]
                ]
            )
        bot = await self._ensure_bot()
        if isinstance(p, WithdrawnPayload) and done == 0:
            await self._withdraw_buttons(bot, state, delivery.agent_id, p.conversation_id)
        for i in range(done, len(parts)):
            last = i == len(parts) - 1
            try:
                sent = await bot.send_message(
                    chat_id=chat_id, text=parts[i], reply_markup=markup if last else None
                )
            except TelegramError as exc:
                raise self._translate(exc, "sendMessage") from None
            await asyncio.to_thread(state.posted, ref, chat, sent.message_id, i + 1)
        self._succeeded()
        self.log.info(
            "telegram.delivered", delivery_id=delivery.id, kind=delivery.kind, parts=len(parts)
        )

    async def _withdraw_buttons(
        self, bot: Bot, state: _ToolState, agent: str, conversation: str
    ) -> None:
        """Take the buttons off the posts of withdrawn work (a refused edit is only logged)."""
        posts = await asyncio.to_thread(state.last_posts, agent, conversation)
        for chat, message_id in posts:
            try:
                await bot.edit_message_reply_markup(chat_id=int(chat), message_id=message_id)
            except TelegramError as exc:
                error = self._translate(exc, "editMessageReplyMarkup")
                if not isinstance(error, PermanentError):
                    raise error from None
                self.log.info("telegram.edit_refused", error=str(error))
