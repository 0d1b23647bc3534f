"""Tickets as customers see them: numbers, status tokens, and the status a token unlocks."""

from __future__ import annotations

import base64
import hmac
import os
import threading
from datetime import UTC, datetime

from router.drivers import TicketStatus
from router.model import TICKET_PREFIX
from router.store import Store


class RandomBytes:
    """Bytes from the operating system's CSPRNG, read a few KiB at a time.

    Each `os.urandom` call gives up the interpreter lock around getrandom(); under load
    the event loop then waits for the SQLite writer thread to hand it back, which costs
    far more than the few bytes a token needs. Every byte is handed out once, and a
    forked child reads afresh instead of reusing its parent's bytes.
    """

    def __init__(self, chunk: int = 4096) -> None:
        """Read nothing yet: the first `take` fills the buffer."""
        self._chunk = chunk
        self._buffer = b""
        self._pos = 0
        self._pid = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bytes:
        """Return `n` bytes never returned before."""
        pid = os.getpid()
        with self._lock:
            if self._pid != pid or self._pos + n > len(self._buffer):
                self._buffer = os.urandom(max(self._chunk, n))
                self._pos = 0
                self._pid = pid
            start = self._pos
            self._pos = start + n
            return self._buffer[start : start + n]

    def token_urlsafe(self, n: int) -> str:
        """Return a URL-safe text token of `n` random bytes (as secrets.token_urlsafe)."""
        return base64.urlsafe_b64encode(self.take(n)).rstrip(b"=").decode("ascii")


_random = RandomBytes()


class Tickets:
    """Issues and checks status tokens (HMAC under the installation secret)."""

    def __init__(self, store: Store) -> None:
        """Start without a key: `load_secret` reads it from the store."""
        self.store = store
        self._secret = b""
        self._mac: hmac.HMAC | None = None

    async def load_secret(self) -> None:
        """Read the installation secret (created by the store's first migration)."""
        self._secret = await self.store.secret()
        # Keyed once: copying a keyed HMAC is cheaper than keying one per ticket, and
        # unlike hmac.digest() it does not give up the GIL for a few bytes of input.
        self._mac = hmac.new(self._secret, digestmod="sha256")

    def status_token(self, ticket: str) -> str:
        """Return the token that lets a customer read this ticket."""
        if self._mac is None:
            self._mac = hmac.new(self._secret, digestmod="sha256")
        mac = self._mac.copy()
        mac.update(ticket.encode())
        return base64.urlsafe_b64encode(mac.digest()[:18]).decode().rstrip("=")

    def token_matches(self, ticket: str, token: str) -> bool:
        """Tell whether the token was issued for this ticket (constant time)."""
        return ticket.startswith(TICKET_PREFIX) and hmac.compare_digest(
            self.status_token(ticket).encode(), token.encode("utf-8", "replace")
        )

    def conversation_token(self, handle: str, seed: str | None = None) -> tuple[str, str]:
        """Return (thread hint, token) for a conversation a contact starts on an open channel.

        The token is what the contact shows to continue the conversation: a nonce and an
        HMAC over the contact's handle and that nonce, so it cannot be guessed and works
        for no other handle. With a seed (the request's Idempotency-Key) the nonce is
        derived from it, so a retried request gets the same token back.
        """
        if seed is None:
            nonce = _random.token_urlsafe(16)
        else:
            nonce = self._mac_b64(f"conversation-seed\x1f{handle}\x1f{seed}")
        mac = self._mac_b64(f"conversation\x1f{handle}\x1f{nonce}")
        return nonce, f"{nonce}.{mac}"

    def conversation_hint(self, handle: str, token: str) -> str | None:
        """Return the thread hint a conversation token proves for this handle, else None."""
        nonce, dot, mac = token.partition(".")
        if not dot or not nonce or not mac:
            return None
        expected = self._mac_b64(f"conversation\x1f{handle}\x1f{nonce}")
        if not hmac.compare_digest(expected.encode(), mac.encode("utf-8", "replace")):
            return None
        return nonce

    def _mac_b64(self, text: str) -> str:
        if self._mac is None:
            self._mac = hmac.new(self._secret, digestmod="sha256")
        mac = self._mac.copy()
        mac.update(text.encode("utf-8", "surrogatepass"))
        return base64.urlsafe_b64encode(mac.digest()[:18]).decode().rstrip("=")

    async def status(self, ticket: str, token: str) -> TicketStatus | None:
        """Return a ticket's status when the token matches; None otherwise (same for unknown)."""
        if not self.token_matches(ticket, token):
            return None
        view = await self.store.ticket(ticket[len(TICKET_PREFIX) :])
        if view is None:
            return None
        return TicketStatus(
            ticket=view.ticket,
            state=view.state,
            label=view.label,
            severity=view.severity,
            opened_at=datetime.fromtimestamp(view.opened_at, UTC),
            respond_by=datetime.fromtimestamp(view.respond_by, UTC),
            assigned=view.assigned,
            messages=view.messages,
            resolved_at=datetime.fromtimestamp(view.resolved_at, UTC) if view.resolved_at else None,
        )
