"""A local emulator of the Telegram Bot API (aiohttp), for python-telegram-bot pointed at it.

Telegram's servers cannot run here, so this speaks the HTTP contract PTB uses
(notes/real-peers.md section 5): `POST /bot<token>/<method>` with form-encoded
parameters (nested values as JSON strings), answers `{"ok": true, "result": ...}` or
`{"ok": false, "error_code": ..., "description": ...[, "parameters": {...}]}`, and
`GET /file/bot<token>/<path>` for downloads. Methods: getMe, getUpdates (long poll,
offset confirms every update below it), sendMessage, sendPhoto, getFile, setWebhook,
deleteWebhook, answerCallbackQuery, editMessageReplyMarkup; `press` and `reply_to` play
a user pressing an inline button or replying to one of the bot's messages. Results are
shaped like the real ones (Message, User, Chat, File).

It runs its own event loop in a thread, so synchronous tests, async tests and a daemon
subprocess can all use it; every public method is thread-safe. Faults are scripted:
blocked chats (403), flood control (429 with retry_after), refused tokens (401),
and `freeze_confirm`, which makes a getUpdates that would confirm new updates hang
without confirming them (a crash window between commit and acknowledgement).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from tests.peers import free_port

TOKEN = "123456:TEST-token_for-the-emulator"
BOT_USER = {"id": 123456, "is_bot": True, "first_name": "Shop", "username": "shop_help_bot"}


@dataclass
class Sent:
    """One message the bot sent (sendMessage / sendPhoto)."""

    chat_id: int
    text: str
    method: str = "sendMessage"
    at: float = field(default_factory=time.time)
    params: dict[str, Any] = field(default_factory=dict)
    message_id: int = 0


class BotApiEmulator:
    """The Bot API on 127.0.0.1:port, with scriptable faults."""

    def __init__(self, token: str = TOKEN, port: int | None = None) -> None:
        self.token = token
        self.port = port or free_port()
        self.updates: list[dict[str, Any]] = []  # not yet confirmed, in update_id order
        self.confirmed = 0  # every update_id below this is confirmed
        self.sent: list[Sent] = []
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.answers: list[dict[str, Any]] = []  # answerCallbackQuery parameters, in order
        self.markup_edits: list[dict[str, Any]] = []  # editMessageReplyMarkup parameters
        self.files: dict[str, tuple[str, bytes]] = {}  # file_id -> (file_path, bytes)
        self.webhook: dict[str, Any] | None = None
        self.blocked: set[int] = set()
        self.rate_limits: list[int] = []  # retry_after of the next sendMessage calls
        self.send_failures: list[int] = []  # HTTP status of the next sendMessage calls (5xx)
        self.fail_send_call: dict[int, int] = {}  # the Nth send (from 1) -> HTTP status
        self.send_calls = 0
        self.freeze_confirm = False
        self.confirm_attempts = 0
        self.reject_token = False
        self._next_update = 1
        self._next_message: dict[int, int] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._new: asyncio.Event | None = None
        self._thawed: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._started = threading.Event()

    # -- URLs ------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """Return the `base_url` to give PTB (the token is appended)."""
        return f"http://127.0.0.1:{self.port}/bot"

    @property
    def base_file_url(self) -> str:
        """Return the `base_file_url` to give PTB."""
        return f"http://127.0.0.1:{self.port}/file/bot"

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> BotApiEmulator:
        """Serve in a background thread; return once listening."""
        self._thread = threading.Thread(target=self._main, name="bot-api-emulator", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the Bot API emulator did not start")
        return self

    def stop(self) -> None:
        """Stop serving and join the thread."""
        loop = self._loop
        if loop is not None and self._thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(10)

    def __enter__(self) -> BotApiEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._new = asyncio.Event()
        self._thawed = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/bot{token}/{method}", self._api)
        app.router.add_get("/file/bot{token}/{path:.+}", self._file)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        loop.run_until_complete(site.start())
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._runner.cleanup())
            # Long polls still waiting: cancel them so none is destroyed pending.
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _wake(self) -> None:
        """Wake long polls (from any thread)."""
        loop, event = self._loop, self._new
        if loop is not None and event is not None:
            loop.call_soon_threadsafe(event.set)

    # -- what the customer does --------------------------------------------------------

    def next_message_id(self, chat_id: int) -> int:
        """Return the next message id of a chat (ids count per chat, as on Telegram)."""
        with self._lock:
            n = self._next_message.get(chat_id, 0) + 1
            self._next_message[chat_id] = n
            return n

    def push(self, kind: str, message: dict[str, Any]) -> dict[str, Any]:
        """Queue an update of `kind` (message | edited_message | ...) and return it."""
        with self._lock:
            update = {"update_id": self._next_update, kind: message}
            self._next_update += 1
            self.updates.append(update)
        self._wake()
        return update

    def push_many(self, kind: str, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Queue several updates at once (one getUpdates returns them together)."""
        with self._lock:
            updates = []
            for message in messages:
                updates.append({"update_id": self._next_update, kind: message})
                self._next_update += 1
            self.updates.extend(updates)
        self._wake()
        return updates

    def message(
        self,
        chat_id: int,
        text: str | None = None,
        *,
        first_name: str = "Carol",
        last_name: str | None = None,
        username: str | None = None,
        language_code: str = "en",
        chat_type: str = "private",
        **extra: Any,
    ) -> dict[str, Any]:
        """Return a Message as Telegram sends it (a new message id of the chat)."""
        user: dict[str, Any] = {"id": chat_id, "is_bot": False, "first_name": first_name}
        if last_name:
            user["last_name"] = last_name
        if username:
            user["username"] = username
        user["language_code"] = language_code
        chat: dict[str, Any] = {"id": chat_id, "type": chat_type}
        if chat_type == "private":
            chat["first_name"] = first_name
        else:
            chat["title"] = "Some group"
        msg: dict[str, Any] = {
            "message_id": self.next_message_id(chat_id),
            "from": user,
            "chat": chat,
            "date": int(time.time()),
        }
        if text is not None:
            msg["text"] = text
        msg.update(extra)
        return msg

    def send_text(self, chat_id: int, text: str, **kwargs: Any) -> dict[str, Any]:
        """A customer writes text; return the update."""
        return self.push("message", self.message(chat_id, text, **kwargs))

    def user(self, user_id: int, first_name: str = "Agent") -> dict[str, Any]:
        """Return a User as Telegram sends it."""
        return {"id": user_id, "is_bot": False, "first_name": first_name, "language_code": "en"}

    def bot_message(self, sent: Sent) -> dict[str, Any]:
        """Return a message the bot sent, as Telegram embeds it in replies and callbacks."""
        chat_type = "private" if sent.chat_id > 0 else "supergroup"
        return {
            "message_id": sent.message_id,
            "from": BOT_USER,
            "chat": {"id": sent.chat_id, "type": chat_type, "title": "Agents"},
            "date": int(sent.at),
            "text": sent.text,
        }

    def press(self, sent: Sent, data: str, user_id: int) -> dict[str, Any]:
        """A user presses an inline button of a bot message; return the callback_query update."""
        with self._lock:
            query_id = f"Q{self._next_update}"
        query = {
            "id": query_id,
            "from": self.user(user_id),
            "message": self.bot_message(sent),
            "chat_instance": f"ci{sent.chat_id}",
            "data": data,
        }
        return self.push("callback_query", query)

    def reply_to(self, sent: Sent, text: str, user_id: int) -> dict[str, Any]:
        """A user replies to a bot message in its chat; return the update."""
        chat_type = "private" if sent.chat_id > 0 else "supergroup"
        msg: dict[str, Any] = {
            "message_id": self.next_message_id(sent.chat_id),
            "from": self.user(user_id),
            "chat": {"id": sent.chat_id, "type": chat_type, "title": "Agents"},
            "date": int(time.time()),
            "text": text,
            "reply_to_message": self.bot_message(sent),
        }
        return self.push("message", msg)

    def edit(self, message: dict[str, Any], text: str) -> dict[str, Any]:
        """A customer edits an earlier message; return the update."""
        edited = {**message, "text": text, "edit_date": int(time.time())}
        return self.push("edited_message", edited)

    def add_file(self, data: bytes, path: str, *, size: int | None = None) -> dict[str, Any]:
        """Make a file downloadable; return its id fields (file_id, file_unique_id, file_size)."""
        with self._lock:
            n = len(self.files) + 1
            file_id = f"FILE{n:04d}"
            self.files[file_id] = (path, data)
        return {
            "file_id": file_id,
            "file_unique_id": f"U{n:04d}",
            "file_size": len(data) if size is None else size,
        }

    # -- what tests read ----------------------------------------------------------------

    def sent_to(self, chat_id: int) -> list[Sent]:
        """Return what the bot sent to one chat, in order."""
        with self._lock:
            return [s for s in self.sent if s.chat_id == chat_id]

    def pending(self) -> list[int]:
        """Return the ids of updates not yet confirmed."""
        with self._lock:
            return [u["update_id"] for u in self.updates]

    def methods(self) -> list[str]:
        """Return the names of the methods called, in order."""
        with self._lock:
            return [m for m, _ in self.calls]

    def unfreeze(self) -> None:
        """Let getUpdates confirm updates again."""
        with self._lock:
            self.freeze_confirm = False
        loop, thawed = self._loop, self._thawed
        if loop is not None and thawed is not None:
            loop.call_soon_threadsafe(thawed.set)

    # -- the API ---------------------------------------------------------------------------

    async def _params(self, request: web.Request) -> dict[str, Any]:
        """Read form or JSON parameters; nested values arrive as JSON strings."""
        if request.content_type == "application/json":
            body = await request.json()
            return dict(body) if isinstance(body, dict) else {}
        form = await request.post()
        out: dict[str, Any] = {}
        for key, value in form.items():
            if isinstance(value, str):
                try:
                    out[key] = json.loads(value)
                except ValueError:
                    out[key] = value
            else:
                out[key] = value  # an uploaded file
        return out

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params = await self._params(request)
        with self._lock:
            self.calls.append((method, params))
            refused = self.reject_token or request.match_info["token"] != self.token
        if refused:
            return _fail(401, "Unauthorized")
        handler = {
            "getMe": self._get_me,
            "getUpdates": self._get_updates,
            "sendMessage": self._send_message,
            "sendPhoto": self._send_photo,
            "getFile": self._get_file,
            "setWebhook": self._set_webhook,
            "deleteWebhook": self._delete_webhook,
            "answerCallbackQuery": self._answer_callback,
            "editMessageReplyMarkup": self._edit_markup,
        }.get(method)
        if handler is None:
            return _fail(404, "Not Found: method not found")
        return await handler(params)

    async def _get_me(self, params: dict[str, Any]) -> web.Response:
        return _ok(BOT_USER)

    async def _get_updates(self, params: dict[str, Any]) -> web.Response:
        if self.webhook is not None:
            return _fail(409, "Conflict: can't use getUpdates method while webhook is active")
        offset = params.get("offset")
        limit = int(params.get("limit") or 100)
        timeout = float(params.get("timeout") or 0)
        if isinstance(offset, int) and offset > self.confirmed:
            with self._lock:
                would_confirm = any(u["update_id"] < offset for u in self.updates)
                frozen = self.freeze_confirm and would_confirm
                if frozen:
                    self.confirm_attempts += 1
            if frozen:
                # The crash window: the client committed, its acknowledgement never lands
                # (this request is answered, late, as if it had never arrived).
                assert self._thawed is not None
                while self.freeze_confirm:
                    self._thawed.clear()
                    await self._thawed.wait()
                return _ok([])
            with self._lock:
                self.updates = [u for u in self.updates if u["update_id"] >= offset]
                self.confirmed = offset
        deadline = time.monotonic() + timeout
        while True:
            assert self._new is not None
            self._new.clear()
            with self._lock:
                ready = self.updates[:limit]
            left = deadline - time.monotonic()
            if ready or left <= 0:
                return _ok(ready)
            try:
                await asyncio.wait_for(self._new.wait(), left)
            except TimeoutError:
                pass

    def _check_send(self, chat_id: int) -> web.Response | None:
        with self._lock:
            self.send_calls += 1
            status = self.fail_send_call.pop(self.send_calls, None)
            if status is not None:
                return _fail(status, "Internal Server Error")
            if chat_id in self.blocked:
                return _fail(403, "Forbidden: bot was blocked by the user")
            if self.rate_limits:
                wait = self.rate_limits.pop(0)
                return _fail(429, f"Too Many Requests: retry after {wait}", {"retry_after": wait})
            if self.send_failures:
                return _fail(self.send_failures.pop(0), "Internal Server Error")
        return None

    def _message_result(self, chat_id: int, **content: Any) -> dict[str, Any]:
        return {
            "message_id": self.next_message_id(chat_id),
            "from": BOT_USER,
            "chat": {"id": chat_id, "type": "private" if chat_id > 0 else "supergroup"},
            "date": int(time.time()),
            **content,
        }

    async def _send_message(self, params: dict[str, Any]) -> web.Response:
        chat_id = int(params["chat_id"])
        text = str(params.get("text", ""))
        refused = self._check_send(chat_id)
        if refused is not None:
            return refused
        if not text.strip():
            return _fail(400, "Bad Request: message text is empty")
        if len(text.encode("utf-16-le")) // 2 > 4096:
            return _fail(400, "Bad Request: message is too long")
        result = self._message_result(chat_id, text=text)
        with self._lock:
            self.sent.append(Sent(chat_id, text, params=params, message_id=result["message_id"]))
        return _ok(result)

    async def _send_photo(self, params: dict[str, Any]) -> web.Response:
        chat_id = int(params["chat_id"])
        refused = self._check_send(chat_id)
        if refused is not None:
            return refused
        caption = str(params.get("caption", ""))
        with self._lock:
            self.sent.append(Sent(chat_id, caption, method="sendPhoto", params=params))
        photo = [{"file_id": "SENT1", "file_unique_id": "S1", "width": 90, "height": 90}]
        return _ok(self._message_result(chat_id, photo=photo, caption=caption))

    async def _get_file(self, params: dict[str, Any]) -> web.Response:
        file_id = str(params.get("file_id", ""))
        with self._lock:
            found = self.files.get(file_id)
        if found is None:
            return _fail(400, "Bad Request: wrong file_id or the file is temporarily unavailable")
        path, data = found
        if len(data) > 20 * 1024 * 1024:
            return _fail(400, "Bad Request: file is too big")
        return _ok(
            {
                "file_id": file_id,
                "file_unique_id": "U" + file_id,
                "file_size": len(data),
                "file_path": path,
            }
        )

    async def _file(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return web.Response(status=401)
        path = request.match_info["path"]
        with self._lock:
            for stored_path, data in self.files.values():
                if stored_path == path:
                    return web.Response(body=data)
        return web.Response(status=404)

    async def _answer_callback(self, params: dict[str, Any]) -> web.Response:
        with self._lock:
            self.answers.append(params)
        return _ok(True)

    async def _edit_markup(self, params: dict[str, Any]) -> web.Response:
        with self._lock:
            self.markup_edits.append(params)
            found = any(
                s.chat_id == int(params["chat_id"]) and s.message_id == int(params["message_id"])
                for s in self.sent
            )
        if not found:
            return _fail(400, "Bad Request: message to edit not found")
        return _ok(True)

    async def _set_webhook(self, params: dict[str, Any]) -> web.Response:
        with self._lock:
            self.webhook = params
        return _ok(True)

    async def _delete_webhook(self, params: dict[str, Any]) -> web.Response:
        with self._lock:
            self.webhook = None
        return _ok(True)

    # -- webhook delivery (as Telegram's servers do it) ---------------------------------

    async def deliver(
        self,
        update: dict[str, Any] | bytes,
        *,
        secret: str | None = None,
        url: str | None = None,
        headers: dict[str, str] | None = None,
        omit_secret: bool = False,
    ) -> int:
        """POST one update to the registered webhook (or url); return the HTTP status."""
        target = url or (self.webhook or {}).get("url")
        assert target, "no webhook registered"
        token = secret if secret is not None else (self.webhook or {}).get("secret_token")
        sent_headers = {"Content-Type": "application/json", **(headers or {})}
        if token is not None and not omit_secret:
            sent_headers["X-Telegram-Bot-Api-Secret-Token"] = str(token)
        body = update if isinstance(update, bytes) else json.dumps(update).encode()
        async with (
            aiohttp.ClientSession() as session,
            session.post(target, data=body, headers=sent_headers) as resp,
        ):
            await resp.read()
            return resp.status


def _ok(result: Any) -> web.Response:
    return web.json_response({"ok": True, "result": result})


def _fail(code: int, description: str, parameters: dict[str, Any] | None = None) -> web.Response:
    body: dict[str, Any] = {"ok": False, "error_code": code, "description": description}
    if parameters:
        body["parameters"] = parameters
    return web.json_response(body, status=code)
