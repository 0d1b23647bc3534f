"""The web channel's browser side: widget.js and its WebSocket, the contact form, the status page.

Served by the `web` channel on its own port (`widget = true`, the default):

* `GET /widget.js`, `/widget.css`, `/static/*`: the committed files under
  `channels/web_static/` (no build step), with an ETag and a short cache, since
  sites embed the unversioned URL.
* `GET /v1/widget/ws?handle=H&conversation=TOKEN&since=SEQ`: the widget's WebSocket.
  The Origin must be the channel's own or in `allowed_origins` (403 before the
  upgrade). Without a token the first message starts a conversation and the answer
  hands out its token; with one, the server first sends what the widget missed
  (rows after `since`), then pushes acknowledgements, agent replies and the
  customer's own messages from other tabs as they are stored.
* `GET /contact` and `POST /v1/contact`: the contact form (multipart, one optional
  attachment), protected by an Origin check and a double-submit CSRF cookie.
* `GET /status`: the ticket status page; the data comes from `GET /v1/tickets/{t}`
  with the status token, which the page reads from the link's fragment.

Frames (JSON text) from the widget: `{"type": "message", "id": KEY, "text": ...}`;
`id` is the message's idempotency key, so a resend after a reconnect is a no-op.
From the server: `history` (a list of `message` frames), `message` (`seq`, `kind`
customer|ack|reply, `text`, `ticket`, `minutes`), `ready`, `accepted` and `error`.
Every page answers with a Content-Security-Policy that allows no inline script.
"""

from __future__ import annotations

import asyncio
import email.policy
import hashlib
import hmac
import html
import json
import re
import secrets
from dataclasses import dataclass
from email.parser import BytesParser
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from aiohttp import WSCloseCode, WSMsgType, web

from channels.conversations import keep_attachment
from channels.web_guard import PAGE_HEADERS, Rejected
from channels.web_outbox import Entry
from router.model import Attachment

if TYPE_CHECKING:
    from channels.web import WebChannel

STATIC = Path(__file__).with_name("web_static")
WS_PATH = "/v1/widget/ws"
CONTACT_PATH = "/contact"
CONTACT_API = "/v1/contact"
STATUS_PATH = "/status"
CSRF_COOKIE = "omnirouter_csrf"
# Sites embed /widget.js without a version in the URL: caches revalidate (ETag) soon.
ASSET_MAX_AGE = 300
_CONTENT_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
}
_HANDLE = re.compile(r"[\x21-\x7e]{1,200}")
_KEY = re.compile(r"[\x20-\x7e]{1,255}")
_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]{1,190}\.[A-Za-z]{2,24}")
_PHONE = re.compile(r"\+?[0-9][0-9 ().-]{5,24}")
# What an attachment's first bytes must be for its declared type (text/plain: UTF-8).
_MAGIC = {
    "image/png": b"\x89PNG\r\n\x1a\n",
    "image/jpeg": b"\xff\xd8\xff",
    "image/gif": b"GIF8",
    "application/pdf": b"%PDF-",
}
_FORM_FIELDS = frozenset({"name", "contact", "message", "csrf", "idempotency_key", "language"})
_MAX_FORM_FIELD = 64 * 1024


@dataclass(frozen=True, slots=True)
class _Asset:
    """A static file served from memory."""

    body: bytes
    etag: str
    content_type: str


class _Socket:
    """One widget connection: its conversation, and a bounded queue of frames to send."""

    def __init__(self, ws: web.WebSocketResponse, handle: str, token: str, limit: int) -> None:
        """Start with nothing queued; `pending` buffers pushes while history is read."""
        self.ws = ws
        self.handle = handle
        self.token = token
        self.thread = ""
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=limit)
        self.pending: list[dict[str, Any]] | None = None
        self.cut: asyncio.Task[Any] | None = None

    def offer(self, frame: dict[str, Any]) -> bool:
        """Queue a frame; a reader too slow to keep the queue short is disconnected."""
        if self.pending is not None and frame.get("type") == "message":
            self.pending.append(frame)
            return True
        try:
            self.queue.put_nowait(frame)
        except asyncio.QueueFull:
            if self.cut is None:
                # It reconnects and fetches what it missed from the log (since=seq), so
                # nothing is lost; memory per connection stays bounded.
                self.cut = asyncio.ensure_future(
                    self.ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"too slow")
                )
            return False
        return True


class WidgetServer:
    """The routes a web channel serves to browsers (see the module docstring)."""

    def __init__(self, channel: WebChannel) -> None:
        """Load the static files; nothing is served until add_routes()."""
        self.channel = channel
        self.config = channel.config
        self.assets = _load_assets()
        self._threads: dict[str, set[_Socket]] = {}
        self._sockets: set[_Socket] = set()
        self._attachments = channel.ctx.state_dir / "web" / channel.name / "attachments"

    def add_routes(self, app: web.Application) -> None:
        """Add the widget's, form's and status page's routes to the channel's app."""
        app.router.add_get("/widget.js", self._asset)
        app.router.add_get("/widget.css", self._asset)
        app.router.add_get("/static/{name}", self._asset)
        app.router.add_route("*", WS_PATH, self._websocket)
        app.router.add_get(CONTACT_PATH, self._contact_page)
        app.router.add_route("*", CONTACT_API, self._contact_post)
        app.router.add_get(STATUS_PATH, self._status_page)

    # -- pushing -------------------------------------------------------------------

    def push(self, thread: str, entry: Entry) -> None:
        """Send a stored row to every widget open on its conversation."""
        frame = entry.frame()
        for sock in tuple(self._threads.get(thread, ())):
            sock.offer(frame)

    async def close_all(self) -> None:
        """Close every widget connection as going away (they reconnect and catch up)."""
        socks = tuple(self._sockets)
        if socks:
            await asyncio.gather(
                *(s.ws.close(code=WSCloseCode.GOING_AWAY, message=b"restarting") for s in socks),
                return_exceptions=True,
            )

    def _follow(self, sock: _Socket, thread: str) -> None:
        """Subscribe a connection to its conversation's pushes."""
        sock.thread = thread
        self._threads.setdefault(thread, set()).add(sock)

    def _forget(self, sock: _Socket) -> None:
        """Drop a closed connection."""
        self._sockets.discard(sock)
        if sock.thread:
            followers = self._threads.get(sock.thread)
            if followers is not None:
                followers.discard(sock)
                if not followers:
                    del self._threads[sock.thread]

    async def _catch_up(self, sock: _Socket, since: int) -> int:
        """Send the rows after `since` as one history frame; return the last seq sent.

        Pushes that arrive while the log is read wait in `pending` and follow the history,
        so the widget sees every row once and in order.
        """
        sock.pending = []
        try:
            entries = await self.channel.log_db.since(sock.thread, since)
        except BaseException:
            sock.pending = None
            raise
        last = entries[-1].seq if entries else since
        sock.offer({"type": "history", "messages": [e.frame() for e in entries]})
        pending, sock.pending = sock.pending, None
        for frame in pending:
            if frame["seq"] > last:
                sock.offer(frame)
                last = frame["seq"]
        return last

    # -- the WebSocket ---------------------------------------------------------------

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        """Check origin, limits and token, then serve one widget connection."""
        ch = self.channel
        if request.method != "GET":
            return _json_error(405, "method_not_allowed", "use GET")
        try:
            if not ch.origin_ok(request):
                raise Rejected(403, "origin_not_allowed", "this origin may not use this channel")
            if ch.stopping:
                raise Rejected(503, "unavailable", "the channel is restarting", retry_after="5")
            ip = ch.client(request)
            ch.check_rate(ip, None)
            if len(self._sockets) >= self.config.max_ws_connections:
                raise Rejected(503, "too_many_connections", "too many open chats", retry_after="10")
            handle = request.query.get("handle", "")
            if not _HANDLE.fullmatch(handle):
                raise Rejected(
                    400, "invalid_field", "handle must be 1-200 printable characters", "handle"
                )
            token = request.query.get("conversation", "")
            refused: Rejected | None = None
            try:
                thread = ch.thread_of(handle, token) if token else ""
            except Rejected as exc:
                # Told over the socket, not as a 403: a browser's WebSocket cannot read
                # the status, and the widget must learn to drop the token, not retry.
                refused, thread = exc, ""
            try:
                since = max(0, int(request.query.get("since", "0")))
            except ValueError:
                raise Rejected(400, "invalid_field", "since must be a number", "since") from None
            ws = web.WebSocketResponse(
                heartbeat=self.config.ws_heartbeat,
                max_msg_size=self.config.max_ws_frame_bytes,
                compress=False,
            )
            if not ws.can_prepare(request).ok:
                raise Rejected(400, "websocket_required", "this path takes a WebSocket upgrade")
        except Rejected as exc:
            return ch.rejected(exc)
        await ws.prepare(request)
        if refused is not None:
            ch.stats.reject(refused.code)
            await ws.send_json({"type": "error", "code": refused.code, "message": refused.message})
            await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"invalid token")
            return ws
        sock = _Socket(ws, handle, token, self.config.ws_send_queue)
        self._sockets.add(sock)
        ch.stats.connected(1)
        writer = asyncio.create_task(self._write(sock), name=f"web:{ch.name}:ws-writer")
        try:
            last = since
            if thread:
                self._follow(sock, thread)
                last = await self._catch_up(sock, since)
            sock.offer(
                {
                    "type": "ready",
                    "seq": last,
                    "conversation": token or None,
                    "max_text_chars": self.config.max_text_chars,
                }
            )
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await self._on_frame(sock, msg.data, ip)
                else:  # binary: not ours
                    ch.stats.reject("binary_frame")
                    await ws.close(code=WSCloseCode.UNSUPPORTED_DATA, message=b"text frames only")
            if ws.close_code == WSCloseCode.MESSAGE_TOO_BIG:
                ch.stats.reject("payload_too_large")
        finally:
            self._forget(sock)
            ch.stats.connected(-1)
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            if sock.cut is not None:
                await asyncio.gather(sock.cut, return_exceptions=True)
        return ws

    async def _write(self, sock: _Socket) -> None:
        """Send queued frames in order until the connection closes."""
        while True:
            frame = await sock.queue.get()
            if frame is None or sock.ws.closed:
                return
            try:
                await sock.ws.send_str(json.dumps(frame, ensure_ascii=False))
            except (ConnectionError, RuntimeError):
                return  # closed under us; the reader ends too

    async def _on_frame(self, sock: _Socket, data: str, ip: str) -> None:
        """Take one frame from the widget: a message to commit (other types are errors)."""
        ch = self.channel
        key = None
        try:
            try:
                frame = json.loads(data)
            except ValueError:
                raise Rejected(400, "invalid_json", "the frame is not valid JSON") from None
            if type(frame) is not dict or frame.get("type") != "message":
                raise Rejected(400, "invalid_frame", 'send {"type": "message", ...} frames')
            key = frame.get("id")
            if type(key) is not str or not _KEY.fullmatch(key):
                key = None
                raise Rejected(400, "invalid_field", "id must be 1-255 printable characters", "id")
            if ch.stopping:
                raise Rejected(503, "unavailable", "the channel is restarting", retry_after="5")
            ch.check_rate(ip, sock.thread or None)
            document: dict[str, Any] = {
                "text": frame.get("text"),
                "contact": {"handle": sock.handle},
            }
            if type(frame.get("name")) is str and frame["name"].strip():
                document["contact"]["name"] = frame["name"]
            if sock.token:
                document["conversation"] = sock.token
            fields = ch.validate(document)
            committed = await ch.commit(
                fields, key, data.encode("utf-8", "surrogatepass"), resendable=True
            )
        except Rejected as exc:
            ch.stats.reject(exc.code)
            error: dict[str, Any] = {"type": "error", "code": exc.code, "message": exc.message}
            if key is not None:
                error["id"] = key
            if exc.field is not None:
                error["field"] = exc.field
            if exc.retry_after is not None:
                error["retry_after"] = int(exc.retry_after)
            sock.offer(error)
            return
        receipt = committed.receipt
        started = not sock.thread
        if started:
            sock.token = committed.conversation_token or sock.token
            self._follow(sock, committed.thread)
        entry, new = await ch.log_db.add(
            committed.thread,
            "in:" + committed.message.external_id,
            "customer",
            {"text": committed.message.text, "id": key, "ticket": receipt.ticket},
        )
        sock.offer(
            {
                "type": "accepted",
                "id": key,
                "seq": entry.seq,
                "ticket": receipt.ticket,
                "status_token": receipt.status_token,
                "status_url": f"{STATUS_PATH}?ticket={receipt.ticket}#token={receipt.status_token}",
                "conversation": sock.token or None,
                "duplicate": receipt.duplicate,
            }
        )
        if started:
            # An acknowledgement stored before this connection followed the thread.
            await self._catch_up(sock, 0)
        elif new:
            self.push(committed.thread, entry)
        else:
            sock.offer(entry.frame())

    # -- static files and pages ------------------------------------------------------

    async def _asset(self, request: web.Request) -> web.Response:
        """Serve a committed static file with an ETag (304 when the browser has it)."""
        name = request.match_info.get("name") or request.path.lstrip("/")
        asset = self.assets.get(name)
        if asset is None or name.endswith(".html"):  # pages have their own routes
            return _json_error(404, "not_found", "not found")
        headers = {
            "Content-Type": asset.content_type,
            "ETag": asset.etag,
            "Cache-Control": f"public, max-age={ASSET_MAX_AGE}",
            "X-Content-Type-Options": "nosniff",
            # Loaded by other sites' pages (the widget), also under COEP.
            "Cross-Origin-Resource-Policy": "cross-origin",
            "Server": "omnirouter",
        }
        if asset.etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        return web.Response(body=asset.body, headers=headers)

    async def _contact_page(self, request: web.Request) -> web.Response:
        """Serve the contact form with a fresh (or the browser's) CSRF token."""
        token = request.cookies.get(CSRF_COOKIE, "")
        if not re.fullmatch(r"[A-Za-z0-9_-]{32,64}", token):
            token = secrets.token_urlsafe(32)
        page = self.assets["contact.html"].body.decode()
        page = page.replace("{{csrf}}", html.escape(token, quote=True))
        page = page.replace("{{max_mb}}", f"{self.config.max_attachment_bytes / 1048576:.0f}")
        page = page.replace(
            "{{types}}", html.escape(",".join(self.config.attachment_types), quote=True)
        )
        response = web.Response(
            body=page.encode(), headers={**PAGE_HEADERS, "Content-Type": _CONTENT_TYPES[".html"]}
        )
        # SameSite=Strict: another site's page cannot make the browser send it at all.
        response.set_cookie(
            CSRF_COOKIE,
            token,
            path="/",
            httponly=True,
            samesite="Strict",
            secure=request.secure,
            max_age=86400,
        )
        return response

    async def _status_page(self, request: web.Request) -> web.Response:
        """Serve the status page shell: no data here, its script asks with the token."""
        return web.Response(
            body=self.assets["status.html"].body,
            headers={**PAGE_HEADERS, "Content-Type": _CONTENT_TYPES[".html"]},
        )

    async def _contact_post(self, request: web.Request) -> web.Response:
        """Take the contact form: CSRF, limits, fields and attachment checked; answer the ticket."""
        ch = self.channel
        if request.method != "POST":
            return _json_error(405, "method_not_allowed", "use POST")
        try:
            # A browser names the page a POST comes from (Origin, or at least Referer).
            from_page = "Origin" in request.headers or _same_referer(request)
            if not ch.origin_ok(request) or not from_page:
                raise Rejected(403, "origin_not_allowed", "post the form from its own page")
            if ch.stopping:
                raise Rejected(503, "unavailable", "the channel is restarting", retry_after="5")
            ch.check_rate(ch.client(request), None)
            if request.content_type != "multipart/form-data":
                raise Rejected(
                    415, "unsupported_media_type", "Content-Type must be multipart/form-data"
                )
            form, upload = await self._read_form(request)
            cookie = request.cookies.get(CSRF_COOKIE, "")
            if not cookie or not hmac.compare_digest(
                cookie.encode(), form.get("csrf", "").encode()
            ):
                raise Rejected(403, "csrf_failed", "reload the form and send it again")
            handle = _contact_handle(form.get("contact", ""))
            document: dict[str, Any] = {
                "text": form.get("message", ""),
                "contact": {"handle": handle, "name": form.get("name") or None},
                "subject": "Contact form",
            }
            if form.get("language") in ("zh", "en"):
                document["language"] = form["language"]
            fields = ch.validate(document)
            attachments: tuple[Attachment, ...] = ()
            if upload is not None:
                name, mime, data = upload
                attachments = (
                    await asyncio.to_thread(keep_attachment, self._attachments, name, mime, data),
                )
            key = form.get("idempotency_key") or None
            if key is not None and not _KEY.fullmatch(key):
                raise Rejected(400, "invalid_field", "bad idempotency_key", "idempotency_key")
            raw = json.dumps(
                {k: v for k, v in form.items() if k != "csrf"}, ensure_ascii=False
            ).encode()
            # The form's customer gets the ticket number in writing too, by e-mail or SMS
            # when the handle they gave is reachable by a configured channel.
            committed = await ch.commit(fields, key, raw, attachments, confirm_elsewhere=True)
        except Rejected as exc:
            return ch.rejected(exc)
        receipt = committed.receipt
        status_url = f"{STATUS_PATH}?ticket={receipt.ticket}#token={receipt.status_token}"
        body = {
            "ticket": receipt.ticket,
            "status_token": receipt.status_token,
            "status_url": status_url,
            "state": receipt.state,
        }
        return web.json_response(
            body,
            status=200 if receipt.duplicate else 201,
            headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
            dumps=_safe_dumps,
        )

    async def _read_form(
        self, request: web.Request
    ) -> tuple[dict[str, str], tuple[str, str, bytes] | None]:
        """Return the form's text fields and its attachment (name, type, bytes), checked.

        The body is already read whole by router.http's guard (within its size cap and
        read timeout), so it is parsed from bytes with the standard library's MIME parser.
        """
        body = await request.read()
        head = f"Content-Type: {request.headers.get('Content-Type', '')}\r\n\r\n".encode(
            "latin-1", "replace"
        )
        document = BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
        if not document.is_multipart():
            raise Rejected(400, "invalid_form", "the body is not a multipart form")
        form: dict[str, str] = {}
        upload: tuple[str, str, bytes] | None = None
        for part in document.iter_parts():
            name = part.get_param("name", header="content-disposition")
            name = name if isinstance(name, str) else ""
            data = part.get_payload(decode=True)
            data = data if isinstance(data, bytes) else b""
            if name == "attachment":
                filename = part.get_filename()
                if not filename and not data:
                    continue  # the file input left empty
                if upload is not None:
                    raise Rejected(400, "invalid_form", "one attachment at most", "attachment")
                # Browsers send the bare name; some clients percent-encode it.
                filename = unquote(filename or "attachment")
                upload = self._check_upload(filename, part.get_content_type(), data)
                continue
            if name not in _FORM_FIELDS or name in form:
                raise Rejected(400, "invalid_form", "unknown or repeated field", name[:64])
            if len(data) > _MAX_FORM_FIELD:
                raise Rejected(413, "payload_too_large", f"{name} is too long", name)
            try:
                form[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                raise Rejected(400, "invalid_encoding", f"{name} is not UTF-8", name) from None
        return form, upload

    def _check_upload(self, filename: str, mime: str, data: bytes) -> tuple[str, str, bytes]:
        """Check an attachment's size and its type against its first bytes."""
        limit = self.config.max_attachment_bytes
        mime = mime.strip().lower()
        if mime not in self.config.attachment_types:
            raise Rejected(
                415,
                "attachment_type",
                "attachments must be one of " + ", ".join(self.config.attachment_types),
                "attachment",
            )
        if len(data) > limit:
            raise Rejected(
                413,
                "attachment_too_large",
                f"the attachment must be at most {limit} bytes",
                "attachment",
            )
        if not data:
            raise Rejected(400, "invalid_field", "the attachment is empty", "attachment")
        magic = _MAGIC.get(mime)
        bad = (magic is not None and not data.startswith(magic)) or (
            mime == "text/plain" and not _is_utf8(data)
        )
        if bad:
            raise Rejected(
                415, "attachment_type", "the attachment is not what its type says", "attachment"
            )
        return filename, mime, data


def _is_utf8(data: bytes) -> bool:
    """Return whether data decodes as UTF-8."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _same_referer(request: web.Request) -> bool:
    """Return whether the Referer (when a browser sent no Origin) is this server."""
    referer = request.headers.get("Referer", "")
    own = f"{request.scheme}://{request.host}/"
    return referer.lower().startswith(own.lower())


def _contact_handle(value: str) -> str:
    """Return the form's e-mail (lower-cased domain) or phone number (digits, + kept)."""
    value = value.strip()
    if _EMAIL.fullmatch(value):
        local, _, domain = value.rpartition("@")
        return f"{local}@{domain.lower()}"
    if _PHONE.fullmatch(value):
        digits = re.sub(r"[^0-9]", "", value)
        if 6 <= len(digits) <= 15:
            return ("+" if value.startswith("+") else "") + digits
    raise Rejected(400, "invalid_field", "give an e-mail address or a phone number", "contact")


def _safe_dumps(value: Any) -> str:
    """Return JSON with <, > and & escaped (nothing in an answer can become markup)."""
    text = json.dumps(value, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _json_error(status: int, code: str, message: str) -> web.Response:
    """Return a JSON error without counting it (method and path mistakes)."""
    return web.json_response(
        {"error": {"code": code, "message": message}},
        status=status,
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"},
    )


def _load_assets() -> dict[str, _Asset]:
    """Read the static files once (they are part of the release, not of the config)."""
    assets: dict[str, _Asset] = {}
    for path in sorted(STATIC.iterdir()):
        content_type = _CONTENT_TYPES.get(path.suffix)
        if content_type is None or not path.is_file():
            continue
        body = path.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        assets[path.name] = _Asset(body, etag, content_type)
    return assets
