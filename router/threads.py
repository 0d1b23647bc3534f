"""Conversation threads: which open conversation a message joins, and one lock per thread."""

from __future__ import annotations

import asyncio
from types import TracebackType

from router.model import InboundMessage

ThreadKey = tuple[str, str]  # (channel name, the channel's thread key)


def thread_key(msg: InboundMessage) -> str:
    """Return the key that threads this message, scoped by its contact.

    Scoped by contact, so a customer cannot join someone else's thread by guessing its
    key. A channel that cannot tell who wrote (the web) must put a proven conversation
    (a token it issued) or a fresh one in `conversation_hint`.
    """
    if msg.conversation_hint:
        return f"{msg.contact_handle}\x1f{msg.conversation_hint}"
    return msg.contact_handle


class Threads:
    """The open conversation of each thread; messages of one thread go one at a time.

    Routing a thread's messages one at a time means a burst of first messages cannot
    open two conversations or reserve two slots for one.
    """

    def __init__(self) -> None:
        """Start with no open threads."""
        self._open: dict[ThreadKey, str] = {}
        self._key_of: dict[str, ThreadKey] = {}
        self._locks: dict[ThreadKey, asyncio.Lock] = {}
        self._users: dict[ThreadKey, int] = {}

    def conversation(self, key: ThreadKey) -> str | None:
        """Return the open conversation of a thread, if any."""
        return self._open.get(key)

    def key_of(self, conversation_id: str) -> ThreadKey | None:
        """Return the thread of an open conversation, if it is open."""
        return self._key_of.get(conversation_id)

    def is_open(self, conversation_id: str) -> bool:
        """Tell whether the conversation is open (known to a thread)."""
        return conversation_id in self._key_of

    def opened(self, key: ThreadKey, conversation_id: str) -> None:
        """Record that the thread's open conversation is this one."""
        self._open[key] = conversation_id
        self._key_of[conversation_id] = key

    def closed(self, key: ThreadKey, conversation_id: str) -> None:
        """Forget a resolved conversation (a later message of its thread reopens it)."""
        if self._key_of.get(conversation_id) == key:
            del self._key_of[conversation_id]
        if self._open.get(key) == conversation_id:
            del self._open[key]

    def busy(self, key: ThreadKey) -> bool:
        """Tell whether a message of the thread is being routed (its lock is in use)."""
        return key in self._users

    def lock(self, key: ThreadKey) -> _ThreadLock:
        """Return an async context manager holding the thread's lock."""
        return _ThreadLock(self, key)

    def enter(self, key: ThreadKey) -> asyncio.Lock:
        """Count one user of the thread's lock in and return the lock (pair with `leave`).

        The per-message path uses this pair instead of `lock()`: two calls, no object.
        """
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        self._users[key] = self._users.get(key, 0) + 1
        return lock

    def leave(self, key: ThreadKey) -> None:
        """Count one user of the thread's lock out; the last one drops the lock."""
        left = self._users[key] - 1
        if left:
            self._users[key] = left
        else:
            del self._users[key]
            del self._locks[key]


class _ThreadLock:
    """`async with threads.lock(key)`: a class, not a generator (it runs per message)."""

    __slots__ = ("_key", "_lock", "_threads")

    def __init__(self, threads: Threads, key: ThreadKey) -> None:
        self._threads = threads
        self._key = key
        self._lock = threads.enter(key)

    async def __aenter__(self) -> None:
        try:
            await self._lock.acquire()
        except BaseException:
            self._threads.leave(self._key)
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._lock.release()
        self._threads.leave(self._key)
