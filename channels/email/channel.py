"""The email channel: IMAP intake with a persisted cursor, SMTP replies.

`run(sink)` keeps one IMAP session alive (reconnecting with capped, jittered
backoff), syncs every message above the cursor in UID order, then waits in IDLE
(re-issued every `idle_renew` seconds) or polls. For each message:

    fetch → normalise → (already seen? noise? no sender?) → sink(message) = commit
          → journal (Message-ID → conversation, ticket) → \\Seen / move → cursor

so nothing on the server and no cursor moves before the commit. Up to WINDOW mails
are taken at a time: each is fetched and handed to the sink in UID order without
waiting for the commits before it, so the store commits them in groups; once all
are committed, their journal lines are written with one fsync, the IMAP actions
follow in UID order, and the cursor is written once. A crash anywhere makes the
message be fetched again: the journal recognises it (also under a new UIDVALIDITY,
by Message-ID plus a digest of its content, or by raw sha256 when it has no
Message-ID), and the store's (channel, external_id) uniqueness catches a commit
whose journal line was lost (or never written: a failed commit stops the window,
and the mails behind it are offered again).

external_id is `"{UIDVALIDITY}:{UID}"`: unique per mailbox folder and cheap to
re-derive. The Message-ID is not part of it (a missing or reused Message-ID must not
merge two mails in the store); it is kept in the raw mail and in the journal, which
is where the duplicate check across UIDVALIDITY changes happens. A different mail
under a Message-ID seen before is routed as a new mail and logged once
(`email.message_id_reused`, without its text).

Noise (auto-replies, bounces, lists) and mail without a usable sender are not
routed: the store has no place for "recorded, not routed" messages yet. They are
logged (`email.noise`, `email.rejected` with reason and Message-ID), counted, and
journalled, and the cursor passes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import time
from pathlib import Path
from typing import Any, ClassVar

from channels.email.authres import sender_verified
from channels.email.config import EmailConfig
from channels.email.cursor import MailState, atomic_write, conversation_hint, dedupe_key
from channels.email.imap import UID_BATCH, ImapSession
from channels.email.normalise import NormalisedMail, no_surrogates, normalise
from channels.email.smtp import build_message, send_message
from router.backoff import backoff_delay
from router.contacts import email_identifier
from router.drivers import (
    AuthFailed,
    ChannelBase,
    DriverContext,
    DriverState,
    MessageSink,
    Outbound,
    PermanentError,
    Receipt,
    TransientError,
)
from router.model import Attachment, InboundMessage

# Messages taken at once: their commits overlap (the store group-commits them), then
# one journal write and one cursor write serve them all. The bytes bound what a window
# holds in memory while its commits are in flight (a larger mail forms its own window).
WINDOW = 32
WINDOW_BYTES = 4 * 1024 * 1024
# Small mails of a window are fetched together, up to this many bytes per FETCH.
FETCH_BYTES = 256 * 1024


@dataclasses.dataclass(slots=True)
class _Pending:
    """One message of a window, from its fetch until the cursor passes it."""

    uid: int
    fetched: bool = True  # False: gone from the server before its fetch
    message_id: str = ""
    truncated_size: int = 0  # the size of a mail cut to max_message_bytes, else 0
    key: str = ""  # the journal line's key; "" when none is due (a duplicate, a gone mail)
    hint: str = ""
    commit: asyncio.Future[Receipt] | None = None  # the sink's answer, for routed mail

    def fields(self) -> dict[str, Any]:
        """Return the log fields that name this message."""
        return {"uid": self.uid, "message_id": no_surrogates(self.message_id, header=True) or None}


def _windows(batch: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Split listed (uid, size) pairs into windows of at most WINDOW mails and WINDOW_BYTES."""
    windows: list[list[tuple[int, int]]] = []
    total = 0
    for uid, size in batch:
        if not windows or len(windows[-1]) >= WINDOW or total + size > WINDOW_BYTES:
            windows.append([])
            total = 0
        windows[-1].append((uid, size))
        total += size
    return windows


class EmailChannel(ChannelBase):
    """One mailbox: IMAP in, SMTP out. Constructed as `EmailChannel(name, config, ctx)`."""

    config_model: ClassVar[type[EmailConfig]] = EmailConfig
    answers_customers = True  # acknowledgements and agent replies go out by SMTP
    single_owner = True  # one IMAP reader at a time (any instance sends by SMTP)

    def __init__(self, name: str, config: EmailConfig, ctx: DriverContext) -> None:
        """Prepare the channel; nothing connects until run() or send()."""
        super().__init__(name, ctx)
        self.config = config
        self.directory = Path(ctx.state_dir) / "email" / name
        self.mail_state = MailState(self.directory)
        # Counters for metrics and tests.
        self.committed = 0
        self.duplicates = 0
        self.noise = 0
        self.rejected = 0
        self.sent = 0
        self.synced = asyncio.Event()  # set after each completed sync pass (tests wait on it)
        self._state_loaded = False
        self._state_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._done = asyncio.Event()
        self._done.set()
        if not config.imap.tls_verify or not config.smtp.tls_verify:
            self.log.warning(
                "email.tls_verify_disabled",
                imap=not config.imap.tls_verify,
                smtp=not config.smtp.tls_verify,
            )

    @property
    def lag(self) -> float | None:
        """Return seconds since the last successful sync (None before the first)."""
        return None if self.last_success is None else max(0.0, time.time() - self.last_success)

    # -- lifecycle ----------------------------------------------------------------

    async def run(self, sink: MessageSink) -> None:
        """Sync the mailbox into sink until stop() or cancellation; reconnect on failures."""
        if self._stop.is_set():
            return
        if not self._done.is_set():
            raise RuntimeError(f"email channel {self.name} is already running")
        self._done.clear()
        failures = 0
        try:
            await self._load_state()
            self._set_state(DriverState.CONNECTING)
            while not self._stop.is_set():
                session = ImapSession(self.config.imap)
                try:
                    await self._session(session, sink)
                    failures = 0
                    continue  # stop() ended the session
                except asyncio.CancelledError:
                    raise
                except AuthFailed as exc:
                    # Refused credentials (or no STARTTLS): retry only slowly, log once.
                    self._set_state(DriverState.BAD_CREDENTIALS, str(exc))
                    delay = self.config.imap.auth_retry_interval
                except Exception as exc:
                    if self.state == DriverState.CONNECTED:
                        failures = 0  # it worked until now: back off from the bottom
                    error = str(exc) if isinstance(exc, TransientError) else repr(exc)
                    if not isinstance(exc, TransientError):
                        self.log.exception("email.unexpected_error", error_type=type(exc).__name__)
                    if self.state != DriverState.BAD_CREDENTIALS:
                        self._set_state(DriverState.TRANSIENT_DISCONNECT, error)
                    else:
                        self.last_error = error
                    delay = backoff_delay(
                        failures, self.config.imap.reconnect_min, self.config.imap.reconnect_max
                    )
                    failures += 1
                finally:
                    await session.close()
                await self._sleep(delay)
        finally:
            self._set_state(DriverState.STOPPED)
            self._done.set()

    async def stop(self) -> None:
        """Stop after the message in flight is committed; close the connection."""
        self._stop.set()
        await self._done.wait()

    async def _sleep(self, delay: float) -> None:
        """Wait delay seconds or until stop()."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), delay)

    # -- one session --------------------------------------------------------------

    async def _session(self, session: ImapSession, sink: MessageSink) -> None:
        """Run one connection: select, sync, wait for news, repeat until stop()."""
        cfg = self.config.imap
        await self._load_state()  # again after a failed window left it unsure
        await session.open()
        changed = await asyncio.to_thread(self.mail_state.set_uidvalidity, session.uidvalidity)
        if changed:
            self.log.warning(
                "email.uidvalidity_changed",
                uidvalidity=session.uidvalidity,
                note="rescanning the folder; mails seen before are recognised by Message-ID",
            )
        if cfg.move_to:
            await session.ensure_folder(cfg.move_to)
        self._set_state(DriverState.CONNECTED)
        while not self._stop.is_set():
            await self._sync(session, sink)
            self._succeeded()
            self.synced.set()
            if self._stop.is_set():
                return
            if session.can_idle:
                # IDLE is ended at least every poll_interval: a push lost on the way, or
                # a server that stopped answering (it keeps the socket open), shows at
                # the next sync's command timeout instead of after idle_renew (25 min).
                await session.idle(min(cfg.idle_renew, cfg.poll_interval), self._stop)
            else:
                await self._sleep(cfg.poll_interval)

    async def _sync(self, session: ImapSession, sink: MessageSink) -> None:
        """Hand every message above the cursor to the sink, in UID order, a window at a time."""
        while True:
            batch = await session.new_uids(self.mail_state.last_uid)
            for window in _windows(batch):
                if self._stop.is_set():
                    return
                await self._take_window(session, sink, window)
            if len(batch) < UID_BATCH:
                return

    async def _take_window(
        self, session: ImapSession, sink: MessageSink, window: list[tuple[int, int]]
    ) -> None:
        """Take up to WINDOW messages; their commits overlap, their cursor moves after them.

        A failure stops the window: what is committed before it is still journalled,
        acted on and passed by the cursor, then the failure propagates.
        """
        sizes = dict(window)
        pending: list[_Pending] = []
        try:
            try:
                for group in self._fetch_groups(window):
                    if self._stop.is_set():
                        break
                    raws = await self._fetch(session, group, sizes)
                    # One thread hop for the group: normalising is pure CPU.
                    mails = await asyncio.to_thread(self._normalise_all, raws, group, sizes)
                    for uid, raw, mail in zip(group, raws, mails, strict=True):
                        if self._stop.is_set():
                            break
                        pending.append(await self._prepare(session, sink, uid, raw, mail))
            except Exception:
                await self._settle(session, pending)
                raise
            await self._settle(session, pending)
        except BaseException:
            # Mails noted in memory may have no journal line: read the state again.
            self._state_loaded = False
            raise

    def _fetch_groups(self, window: list[tuple[int, int]]) -> list[list[int]]:
        """Split a window's UIDs into runs fetched with one FETCH each: small mails together.

        A mail over FETCH_BYTES (or over max_message_bytes, fetched as a prefix) goes
        alone, so a large answer cut by the network costs only its own refetch.
        """
        single = min(FETCH_BYTES, self.config.max_message_bytes)
        groups: list[list[int]] = []
        room = -1  # bytes the last group can still take; -1: it takes nothing more
        for uid, size in window:
            if size <= room:
                groups[-1].append(uid)
                room -= size
            else:
                groups.append([uid])
                room = FETCH_BYTES - size if size <= single else -1
        return groups

    async def _fetch(
        self, session: ImapSession, group: list[int], sizes: dict[int, int]
    ) -> list[bytes | None]:
        """Return the raw mails of a group (None for a mail gone from the server)."""
        cfg = self.config
        bodies = await session.fetch_many(group) if len(group) > 1 else {}
        raws: list[bytes | None] = []
        for uid in group:
            raw = bodies.get(uid)
            if raw is None:
                # Alone, gone, or missing from the group's answer: fetch it by itself.
                oversize = sizes[uid] > cfg.max_message_bytes
                raw = await session.fetch(uid, cfg.max_message_bytes if oversize else None)
            raws.append(raw)
        return raws

    def _normalise_all(
        self, raws: list[bytes | None], group: list[int], sizes: dict[int, int]
    ) -> list[NormalisedMail | None]:
        """Normalise the fetched mails of a group, in order."""
        cfg = self.config
        return [
            None
            if raw is None
            else normalise(
                raw,
                max_message_bytes=cfg.max_message_bytes,
                max_attachment_bytes=cfg.max_attachment_bytes,
                max_text_chars=cfg.max_text_chars,
                original_size=sizes[uid],
            )
            for uid, raw in zip(group, raws, strict=True)
        ]

    async def _prepare(
        self,
        session: ImapSession,
        sink: MessageSink,
        uid: int,
        raw: bytes | None,
        mail: NormalisedMail | None,
    ) -> _Pending:
        """Decide the fate of one fetched message; start (not await) its commit if routed."""
        if raw is None or mail is None:
            return _Pending(uid, fetched=False)
        key = dedupe_key(mail)
        # Only what the settling needs: the window must not hold every mail's bytes.
        item = _Pending(uid, message_id=mail.message_id)
        item.truncated_size = mail.size if mail.truncated else 0
        fields = item.fields()
        if self.mail_state.seen(key):
            self.duplicates += 1
            self.log.info("email.duplicate", **fields)
            return item
        if self.mail_state.reused(key):
            # Broken mailers and templates reuse Message-IDs: a different mail is a new one.
            self.log.warning("email.message_id_reused", digest=key.rpartition("#")[2], **fields)
        item.key = key
        if mail.noise_reason or mail.reject_reason:
            reason = mail.noise_reason or mail.reject_reason
            if mail.noise_reason:
                self.noise += 1
                self.log.info("email.noise", reason=reason, **fields)
            else:
                self.rejected += 1
                self.log.warning("email.rejected", reason=reason, **fields)
            self.mail_state.note(key, "")
            return item
        item.hint = hint = conversation_hint(mail, self.mail_state)
        if any(att.data is not None for att in mail.attachments):
            attachments = await asyncio.to_thread(self._store_attachments, mail)
        else:
            attachments = self._store_attachments(mail)
        message = InboundMessage(
            channel=self.name,
            channel_type="email",
            external_id=f"{session.uidvalidity}:{uid}",
            contact_handle=mail.from_address,
            contact_name=mail.from_name,
            text=mail.text,
            subject=mail.subject,
            conversation_hint=hint,
            received_at=mail.received_at,
            attachments=attachments,
            payload_sha256=mail.sha256,
            raw=raw,
            reply_ref=mail.message_id,
            thread_refs=mail.references,
            identifiers=self._identifiers(raw, mail.from_address),
        )
        # Later mails of this window must see this one (a redelivery, a follow-up).
        self.mail_state.note(key, hint)
        # Commits start in UID order, so a follow-up queues behind the mail it answers.
        item.commit = asyncio.ensure_future(sink(guard_text(message)))
        return item

    async def _settle(self, session: ImapSession, pending: list[_Pending]) -> None:
        """Await the window's commits in order, journal them at once, act, move the cursor.

        Only the mails before the first failed commit count as taken; those behind it
        are offered again later (the store recognises the ones that did commit).
        """
        entries: list[tuple[str, str, str]] = []
        taken = 0
        failure: TransientError | None = None
        for item in pending:
            if item.commit is not None:
                try:
                    receipt = await item.commit
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    # Not committed: the cursor stays, the session restarts after a
                    # backoff and the same UID is offered again.
                    failure = TransientError(
                        f"sink failed on uid {item.uid}: {type(exc).__name__}: {exc}"
                    )
                    failure.__cause__ = exc
                    break
                if receipt.duplicate:
                    self.duplicates += 1
                else:
                    self.committed += 1
                if item.truncated_size:
                    self.log.warning("email.truncated", size=item.truncated_size, **item.fields())
                entries.append((item.key, item.hint, receipt.ticket))
            elif item.key:
                entries.append((item.key, "", ""))
            taken += 1
        if failure is not None:
            # Let the commits behind the failed one end before the session goes.
            await asyncio.gather(
                *(i.commit for i in pending[taken + 1 :] if i.commit is not None),
                return_exceptions=True,
            )
        await asyncio.to_thread(self.mail_state.record, entries)
        acted = 0
        try:
            for item in pending[:taken]:
                if item.fetched:
                    await self._after_commit(session, item.uid)
                acted += 1
        finally:
            if acted:
                await asyncio.to_thread(self.mail_state.advance, pending[acted - 1].uid)
        if failure is not None:
            raise failure

    async def _after_commit(self, session: ImapSession, uid: int) -> None:
        """Flag or move one taken message on the server, as configured."""
        if self.config.imap.move_to:
            await session.move(uid, self.config.imap.move_to)
        elif self.config.imap.mark_seen:
            await session.mark_seen(uid)

    def _identifiers(self, raw: bytes, from_address: str) -> tuple[str, ...]:
        """Return the sender's e-mail identifier when our server's DMARC check passed it."""
        if not sender_verified(raw, from_address, self.config.authserv_id):
            return ()
        identifier = email_identifier(from_address)
        return (identifier,) if identifier else ()

    def _store_attachments(self, mail: NormalisedMail) -> tuple[Attachment, ...]:
        """Write attachment bytes content-addressed under the state dir; return the records."""
        out: list[Attachment] = []
        folder = self.directory / "attachments"
        for att in mail.attachments:
            ref = ""
            if att.data is not None:
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / att.sha256
                if not path.exists():
                    atomic_write(path, att.data)
                ref = f"file:{path}"
            out.append(
                Attachment(
                    name=att.name,
                    mime_type=att.mime_type,
                    size=att.size,
                    sha256=att.sha256,
                    storage_ref=ref,
                )
            )
        return tuple(out)

    # -- outbound -----------------------------------------------------------------

    async def send(self, outbound: Outbound) -> None:
        """Send an acknowledgement, agent reply or survey by SMTP; raise the driver taxonomy."""
        if outbound.kind == "ack" and not self.config.ack.enabled:
            self.log.info("email.ack_disabled", outbound_id=outbound.id)
            return
        if outbound.kind not in ("ack", "reply", "survey"):
            raise PermanentError(f"email: unknown outbound kind {outbound.kind!r}")
        msg = build_message(outbound, self.config.smtp, self.config.ack)
        await send_message(msg, self.config.smtp)
        self.sent += 1
        # A customer answering this mail may quote only its Message-ID: remember
        # which conversation it belongs to.
        await self._load_state()
        parent = str(msg["In-Reply-To"] or "")
        hint = self.mail_state.hint_for(parent) if parent else None
        # The pipeline passes the thread along: the acknowledgement may be sent before
        # this channel has recorded the customer's mail it answers.
        hint = hint or outbound.payload.conversation_hint or None
        if hint:
            await asyncio.to_thread(self.mail_state.remember, str(msg["Message-ID"]), hint)
        self.log.info(
            "email.sent",
            outbound_id=outbound.id,
            kind=outbound.kind,
            message_id=str(msg["Message-ID"]),
            to_sha=hashlib.sha256(outbound.to.encode()).hexdigest()[:12],
        )

    # -- helpers ------------------------------------------------------------------

    async def _load_state(self) -> None:
        """Read the cursor and journal once."""
        async with self._state_lock:
            if not self._state_loaded:
                await asyncio.to_thread(self._load_state_sync)
                self._state_loaded = True

    def _load_state_sync(self) -> None:
        """Create the state directory (private) and load it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(self.directory, 0o700)
        self.mail_state.load()


def guard_text(message: InboundMessage) -> InboundMessage:
    """Return message with no lone surrogate in any text field (the last line of defence).

    The normaliser already gives clean text; this guard makes sure that no escaped raw
    byte ("\\udcfc") reaches the store, a log, an agent or a customer's acknowledgement
    even if a future parsing path lets one through.
    """
    return dataclasses.replace(
        message,
        contact_handle=no_surrogates(message.contact_handle, header=True),
        contact_name=no_surrogates(message.contact_name, header=True),
        text=no_surrogates(message.text),
        subject=no_surrogates(message.subject, header=True),
        conversation_hint=no_surrogates(message.conversation_hint, header=True),
        reply_ref=no_surrogates(message.reply_ref, header=True),
        thread_refs=tuple(no_surrogates(r, header=True) for r in message.thread_refs),
        attachments=tuple(
            dataclasses.replace(
                a,
                name=no_surrogates(a.name, header=True),
                mime_type=no_surrogates(a.mime_type, header=True),
            )
            for a in message.attachments
        ),
    )
