"""One IMAP connection for the email channel, on aioimaplib, with typed errors.

`ImapSession` connects (IMAPS, STARTTLS or, on loopback only, plain), logs in,
selects the folder and offers the few operations intake needs: list new UIDs with
their sizes, fetch one message (a prefix for oversize mail), set \\Seen, move,
and IDLE until the server pushes something. Every command races the connection's
loss, so a server that dies mid-IDLE or mid-FETCH is noticed at once instead of at
a timeout. Errors come out as the driver taxonomy (`translate_error`):
AuthFailed for a refused login, TimedOut, TransientError for everything else.

aioimaplib has no STARTTLS command; `_starttls` issues it and upgrades the
transport with `loop.start_tls`, then asks for the capabilities again (RFC 3501
says the pre-TLS ones must be discarded).
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Awaitable
from typing import Any, TypeVar

import aioimaplib
from aioimaplib.aioimaplib import Command

from channels.email.config import ImapSettings
from router.drivers import AuthFailed, TimedOut, TransientError

T = TypeVar("T")

_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]")
_UID = re.compile(rb"UID (\d+)")
_SIZE = re.compile(rb"RFC822\.SIZE (\d+)")
_FETCH_START = re.compile(rb"^(?:\* )?\d+ FETCH \(")
_ATOM = re.compile(r"^[A-Za-z0-9._@+-]+$")


class ConnectionLost(TransientError):
    """The server closed the connection (or it broke) while a command was pending."""


class StartTlsUnavailable(AuthFailed):
    """STARTTLS was configured but the server does not offer it: never fall back to plain."""


def imap_string(value: str) -> str:
    """Return value as an IMAP atom when it is one, else as a quoted string."""
    return value if _ATOM.match(value) else aioimaplib.quoted(value)


def tls_context(settings: ImapSettings) -> ssl.SSLContext:
    """Return a verifying client context (system store or ca_file) unless tls_verify is off."""
    cafile = str(settings.ca_file) if settings.ca_file is not None else None
    context = ssl.create_default_context(cafile=cafile)
    if not settings.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def translate_error(exc: BaseException) -> Exception:
    """Map an aioimaplib/OS error into the driver taxonomy (the one place that does)."""
    if isinstance(exc, TransientError | AuthFailed):
        return exc
    if isinstance(exc, aioimaplib.CommandTimeout | asyncio.TimeoutError | TimeoutError):
        return TimedOut(f"imap: no answer in time ({type(exc).__name__})")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TransientError(f"imap: certificate not trusted: {exc.verify_message}")
    if isinstance(exc, aioimaplib.AioImapException):
        return TransientError(f"imap: {type(exc).__name__}: {getattr(exc, 'reason', exc)}")
    if isinstance(exc, OSError):
        return TransientError(f"imap: {type(exc).__name__}: {exc.strerror or exc}")
    return TransientError(f"imap: unexpected {type(exc).__name__}: {exc}")


# Messages listed (and sized) per round trip; well under what aioimaplib can parse at once.
UID_BATCH = 200


class ImapSession:
    """One logged-in connection with the folder selected; build a new one to reconnect."""

    def __init__(self, settings: ImapSettings) -> None:
        """Remember the settings; open() connects."""
        self.settings = settings
        self.uidvalidity = 0
        self.capabilities: frozenset[str] = frozenset()
        self._client: aioimaplib.IMAP4 | None = None
        self._lost: asyncio.Future[None] | None = None

    @property
    def client(self) -> aioimaplib.IMAP4:
        """Return the open client."""
        if self._client is None:
            raise ConnectionLost("imap: not connected")
        return self._client

    @property
    def can_idle(self) -> bool:
        """Tell whether IDLE is offered (and wanted)."""
        return self.settings.idle and "IDLE" in self.capabilities

    def _on_lost(self, exc: Exception | None) -> None:
        """Resolve the loss future from aioimaplib's connection_lost callback."""
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    async def _run(self, aw: Awaitable[T], timeout: float | None = None) -> T:
        """Await one command, failing fast if the connection drops meanwhile."""
        task = asyncio.ensure_future(aw)
        lost = self._lost
        waiters: set[asyncio.Future[Any]] = {task}
        if lost is not None:
            waiters.add(lost)
        try:
            done, _ = await asyncio.wait(
                waiters,
                timeout=timeout if timeout is not None else self.settings.timeout * 2,
                return_when=asyncio.FIRST_COMPLETED,
            )
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task in done:
            try:
                return task.result()
            except Exception as exc:
                raise translate_error(exc) from exc
        task.cancel()
        if lost is not None and lost.done():
            raise ConnectionLost("imap: connection lost")
        raise TimedOut("imap: no answer in time")

    # -- connect ----------------------------------------------------------------

    async def open(self) -> None:
        """Connect, secure, log in and select the folder; sets uidvalidity."""
        s = self.settings
        loop = asyncio.get_running_loop()
        self._lost = loop.create_future()
        context = tls_context(s) if s.tls == "implicit" else None
        try:
            self._client = aioimaplib.IMAP4(
                host=s.host,
                port=s.effective_port,
                timeout=s.timeout,
                conn_lost_cb=self._on_lost,
                ssl_context=context,
            )
        except Exception as exc:
            raise translate_error(exc) from exc
        await self._run(self.client.wait_hello_from_server(), s.timeout)
        if s.tls == "starttls":
            await self._starttls()
        response = await self._run(
            self.client.login(imap_string(s.username), s.password.get_secret_value())
        )
        if response.result != "OK":
            text = b" ".join(bytes(x) for x in response.lines).decode("utf-8", "replace")[:200]
            if "UNAVAILABLE" in text or "INUSE" in text or "LIMIT" in text:
                raise TransientError(f"imap: login refused for now: {text}")
            raise AuthFailed(f"imap: login refused: {text}")
        self.capabilities = frozenset(c.upper() for c in self.client.protocol.capabilities)
        response = await self._run(self.client.select(imap_string(s.folder)))
        if response.result != "OK":
            raise TransientError(f"imap: cannot select {s.folder!r}: {_text(response)}")
        for line in response.lines:
            match = _UIDVALIDITY.search(bytes(line))
            if match:
                self.uidvalidity = int(match.group(1))
        if not self.uidvalidity:
            raise TransientError("imap: the server gave no UIDVALIDITY")

    async def _starttls(self) -> None:
        """Upgrade the plain connection with STARTTLS, or refuse to go on without it."""
        protocol = self.client.protocol
        if "STARTTLS" not in protocol.capabilities:
            raise StartTlsUnavailable("imap: the server does not offer STARTTLS")
        response = await self._run(
            protocol.execute(Command("STARTTLS", protocol.new_tag(), loop=protocol.loop))
        )
        if response.result != "OK":
            raise TransientError(f"imap: STARTTLS refused: {_text(response)}")
        loop = asyncio.get_running_loop()
        transport = await self._run(
            loop.start_tls(
                protocol.transport,
                protocol,
                tls_context(self.settings),
                server_hostname=self.settings.host,
            )
        )
        protocol.transport = transport
        await self._run(protocol.capability())

    async def close(self) -> None:
        """Log out politely if possible; always drop the connection."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            if self._lost is not None and not self._lost.done():
                await asyncio.wait_for(client.logout(), 2.0)
        except Exception:  # the server may be gone already; nothing to do about it
            pass
        transport = client.protocol.transport
        if transport is not None:
            transport.close()
        for task in list(client.tasks) + list(client.protocol.tasks):
            task.cancel()

    # -- intake -----------------------------------------------------------------

    async def new_uids(self, after: int, limit: int = UID_BATCH) -> list[tuple[int, int]]:
        """Return (uid, size) of up to `limit` messages with a UID above `after`, in UID order.

        The UIDs come from one SEARCH line and the sizes from a FETCH over at most `limit`
        of them: aioimaplib recurses once per response line it reads at once, and a
        backlog of ~1,000 FETCH lines overflows the stack (aioimaplib issue #118), which
        would drop the connection on every attempt and never take a mail.
        """
        response = await self._run(self.client.uid_search(f"UID {after + 1}:*", charset=None))
        if response.result != "OK":
            raise TransientError(f"imap: UID SEARCH failed: {_text(response)}")
        uids: list[int] = []
        for line in response.lines:
            if not isinstance(line, bytes | bytearray):
                continue
            # The untagged answer is a line of UIDs (aioimaplib drops its "SEARCH"
            # keyword; tolerate it anyway); the tagged "Search completed" has none.
            words = line.split()
            if words and words[0].upper() == b"SEARCH":
                words = words[1:]
            if words and all(w.isdigit() for w in words):
                # "N:*" always matches the last message, even below N: filter.
                uids.extend(u for u in map(int, words) if u > after)
        uids = sorted(set(uids))[:limit]
        if not uids:
            return []
        response = await self._run(
            self.client.uid("fetch", f"{uids[0]}:{uids[-1]}", "(UID RFC822.SIZE)")
        )
        if response.result != "OK":
            raise TransientError(f"imap: UID FETCH failed: {_text(response)}")
        wanted = set(uids)
        found: dict[int, int] = {}
        for line in response.lines:
            if not isinstance(line, bytes | bytearray):
                continue
            uid, size = _UID.search(line), _SIZE.search(line)
            if uid and size and int(uid.group(1)) in wanted:
                found[int(uid.group(1))] = int(size.group(1))
        return sorted(found.items())

    async def fetch(self, uid: int, limit: int | None = None) -> bytes | None:
        """Return the raw message (or its first `limit` bytes); None if it is gone."""
        part = "BODY.PEEK[]" if limit is None else f"BODY.PEEK[]<0.{limit}>"
        # aioimaplib's FETCH timer restarts on every chunk: a big mail is fine as long
        # as bytes keep coming. Our own outer bound is generous for the same reason.
        response = await self._run(
            self.client.uid("fetch", str(uid), f"(UID {part})"), timeout=self.settings.timeout * 20
        )
        if response.result != "OK":
            raise TransientError(f"imap: FETCH {uid} failed: {_text(response)}")
        for line in response.lines[1:]:
            if isinstance(line, bytearray):
                return bytes(line)
        return None

    async def fetch_many(self, uids: list[int]) -> dict[int, bytes]:
        """Return the raw messages of several UIDs in one FETCH; a UID that is gone is absent.

        Meant for small mails (the caller bounds their total size): the whole answer is
        held in memory, and a cut connection makes all of them be fetched again.
        """
        response = await self._run(
            self.client.uid("fetch", ",".join(map(str, uids)), "(UID BODY.PEEK[])"),
            timeout=self.settings.timeout * 20,
        )
        if response.result != "OK":
            raise TransientError(f"imap: FETCH of {len(uids)} failed: {_text(response)}")
        # One "n FETCH (" line opens each message's answer; its UID may come before or
        # after the literal, and unsolicited FETCH answers (flags) carry no literal.
        answers: list[list[bytes | bytearray]] = []
        for line in response.lines:
            if isinstance(line, bytes) and _FETCH_START.match(line):
                answers.append([])
            if answers and isinstance(line, bytes | bytearray):
                answers[-1].append(line)
        wanted = set(uids)
        found: dict[int, bytes] = {}
        for answer in answers:
            bodies = [bytes(x) for x in answer if isinstance(x, bytearray)]
            named = [m for x in answer if isinstance(x, bytes) for m in [_UID.search(x)] if m]
            if bodies and named and int(named[0].group(1)) in wanted:
                found.setdefault(int(named[0].group(1)), bodies[0])
        return found

    async def mark_seen(self, uid: int) -> None:
        """Set \\Seen on one message."""
        response = await self._run(self.client.uid("store", str(uid), "+FLAGS.SILENT", r"(\Seen)"))
        if response.result != "OK":
            raise TransientError(f"imap: STORE {uid} failed: {_text(response)}")

    async def move(self, uid: int, folder: str) -> None:
        """Move one message to folder (MOVE, else COPY + \\Deleted + UID EXPUNGE)."""
        target = imap_string(folder)
        if "MOVE" in self.capabilities:
            response = await self._run(self.client.uid("move", str(uid), target))
        else:
            response = await self._run(self.client.uid("copy", str(uid), target))
            if response.result == "OK":
                await self._run(self.client.uid("store", str(uid), "+FLAGS.SILENT", r"(\Deleted)"))
                if "UIDPLUS" in self.capabilities:
                    response = await self._run(self.client.uid("expunge", str(uid)))
        if response.result != "OK":
            raise TransientError(f"imap: moving {uid} to {folder!r} failed: {_text(response)}")

    async def ensure_folder(self, folder: str) -> None:
        """Create folder if it does not exist (an existing one gives NO, which is fine)."""
        await self._run(self.client.create(imap_string(folder)))

    async def idle(self, renew: float, stop: asyncio.Event) -> bool:
        """IDLE until the server pushes something, `renew` seconds pass, or stop is set.

        Returns True when the server pushed something (a sync is due).
        """
        client = self.client
        idle_task = await self._run(client.idle_start(timeout=renew))
        push = asyncio.ensure_future(client.wait_server_push(timeout=renew + 5))
        stopping = asyncio.ensure_future(stop.wait())
        waiters: set[asyncio.Future[Any]] = {push, stopping}
        if self._lost is not None:
            waiters.add(self._lost)
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not push.done():
                push.cancel()
        if self._lost is not None and self._lost.done():
            idle_task.cancel()
            raise ConnectionLost("imap: connection lost during IDLE")
        pushed = False
        if push.done() and not push.cancelled() and push.exception() is None:
            pushed = push.result() != aioimaplib.STOP_WAIT_SERVER_PUSH
        if client.has_pending_idle():
            client.idle_done()
        await self._run(idle_task)
        return pushed


def _text(response: Any) -> str:
    """Return a response's text lines for an error message."""
    lines = [bytes(x) for x in getattr(response, "lines", []) if isinstance(x, bytes | bytearray)]
    return b" ".join(lines).decode("utf-8", "replace")[:200]
