"""What one email channel remembers across restarts, in its own directory under state_dir.

* `cursor.json`: UIDVALIDITY and the last UID whose message is committed. Written
  atomically (temp file, fsync, rename, fsync of the directory), so a crash leaves
  either the old or the new cursor, never half of one.
* `journal.jsonl`: one line per committed mail: its dedupe key, the conversation hint
  it was given and its ticket. The key is `<message-id>#<digest>`, the digest being
  the first 16 hex digits of the mail's content digest (sender, date, subject, body,
  attachments), or `sha256:<raw sha256>` for a mail without a Message-ID. It serves
  two purposes: a mail seen again (under a new UIDVALIDITY, or after a crash) is
  recognised and not routed twice, even if the server re-added headers; and a
  follow-up finds the conversation of the mail it answers (by In-Reply-To,
  References or a `[#T-…]` ticket token), through the Message-ID part of the key.
  A *different* mail reusing a Message-ID (broken mailers, templates, forgeries)
  has another key: it is routed, and the channel logs the reuse. Lines written
  before content keys existed, and lines for mail we sent, hold a bare Message-ID:
  any mail under that Message-ID counts as seen, as it always did. Bounded: when it
  holds more than twice `max_entries` lines it is rewritten with the newest
  `max_entries`.

Order on commit (the channel does it, for a window of mails at once): every sink
returns → their journal lines (one write, one fsync) → after-commit IMAP actions →
cursor (one write). A crash anywhere in between makes the mails be fetched again and
recognised (journal) or deduplicated by the store (external_id).
The file methods are blocking; the channel calls them through `asyncio.to_thread`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from channels.email.normalise import NormalisedMail

CURSOR_FILE = "cursor.json"
JOURNAL_FILE = "journal.jsonl"
DEFAULT_MAX_ENTRIES = 100_000


def atomic_write(path: Path, data: bytes) -> None:
    """Replace path with data durably: temp file in the same dir, fsync, rename, fsync dir."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in directory durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


DIGEST_CHARS = 16  # of the content digest in a dedupe key: 64 bits, enough per Message-ID
_CONTENT_KEY = re.compile(rf"^(<[^<>]*>)#[0-9a-f]{{{DIGEST_CHARS}}}$")


def dedupe_key(mail: NormalisedMail) -> str:
    """Return the key that identifies a mail across UIDVALIDITY changes and redeliveries."""
    if mail.message_id:
        return f"{mail.message_id}#{mail.content_digest[:DIGEST_CHARS]}"
    return f"sha256:{mail.sha256}"


class MailState:
    """The cursor and the journal of one channel; load() before use."""

    def __init__(self, directory: Path, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        """Remember where the files live; nothing is read until load()."""
        self.directory = directory
        self.max_entries = max_entries
        self.uidvalidity: int | None = None
        self.last_uid = 0
        # dedupe key, Message-ID or "ticket:T-…" -> conversation hint; insertion order = age
        self._hints: OrderedDict[str, str] = OrderedDict()
        # Bare Message-IDs that stand for a whole mail (old journal lines, mail we sent).
        self._whole: set[str] = set()
        self._journal_lines = 0

    # -- loading ----------------------------------------------------------------

    def load(self) -> None:
        """Read the cursor and the journal (a torn last journal line is ignored)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        cursor = self.directory / CURSOR_FILE
        if cursor.exists():
            data = json.loads(cursor.read_text(encoding="utf-8"))
            self.uidvalidity = int(data["uidvalidity"]) if data.get("uidvalidity") else None
            self.last_uid = int(data.get("last_uid", 0))
        journal = self.directory / JOURNAL_FILE
        self._hints.clear()
        self._whole.clear()
        self._journal_lines = 0
        if journal.exists():
            with journal.open("rb") as f:
                for line in f:
                    self._journal_lines += 1
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue  # a line cut by a crash mid-write
                    if isinstance(entry, dict):
                        self._apply(entry)
            self._trim()

    def _apply(self, entry: dict[str, Any]) -> None:
        """Apply one journal entry to the in-memory maps."""
        key, hint, ticket = str(entry.get("k", "")), str(entry.get("h", "")), entry.get("t")
        if key:
            match = _CONTENT_KEY.match(key)
            if match:
                # Follow-ups quote the Message-ID alone: it leads to the conversation of
                # the first mail that used it.
                self._hints.setdefault(match.group(1), hint)
            elif key.startswith("<"):
                self._whole.add(key)
            self._hints[key] = hint
            self._hints.move_to_end(key)
        if ticket and f"ticket:{ticket}" not in self._hints:
            # The first mail of a ticket defines its thread; later ones follow it.
            self._hints[f"ticket:{ticket}"] = hint

    def _trim(self) -> None:
        """Forget the oldest entries beyond max_entries."""
        while len(self._hints) > self.max_entries:
            key, _ = self._hints.popitem(last=False)
            self._whole.discard(key)

    # -- cursor -----------------------------------------------------------------

    def set_uidvalidity(self, uidvalidity: int) -> bool:
        """Adopt the folder's UIDVALIDITY; return True when a known one changed (rescan)."""
        if self.uidvalidity == uidvalidity:
            return False
        previous = self.uidvalidity
        self.uidvalidity = uidvalidity
        self.last_uid = 0
        self._save_cursor()
        return previous is not None

    def advance(self, uid: int) -> None:
        """Persist that every mail up to uid is committed."""
        if uid <= self.last_uid:
            return
        self.last_uid = uid
        self._save_cursor()

    def _save_cursor(self) -> None:
        """Write cursor.json atomically."""
        data = {"version": 1, "uidvalidity": self.uidvalidity, "last_uid": self.last_uid}
        atomic_write(self.directory / CURSOR_FILE, json.dumps(data).encode("utf-8"))

    # -- journal ----------------------------------------------------------------

    def seen(self, key: str) -> bool:
        """Tell whether a mail with this dedupe key was committed before."""
        if not key:
            return False
        if key in self._hints:
            return True
        match = _CONTENT_KEY.match(key)
        return match is not None and match.group(1) in self._whole

    def reused(self, key: str) -> bool:
        """Tell whether another mail with the Message-ID of this dedupe key was seen."""
        match = _CONTENT_KEY.match(key)
        return match is not None and match.group(1) in self._hints and key not in self._hints

    def hint_for(self, key: str) -> str | None:
        """Return the conversation hint recorded for a Message-ID or "ticket:T-…"."""
        return self._hints.get(key) if key else None

    def note(self, key: str, hint: str) -> None:
        """Know a mail in memory before its journal line is written (see `record`).

        Later mails of the same fetch are checked against it (a redelivery, a follow-up)
        while its commit is still in flight. Whoever notes must `record` the line once
        the mail is committed, or `load()` again if that does not happen.
        """
        self._apply({"k": key, "h": hint})
        self._trim()

    def remember(self, key: str, hint: str, ticket: str = "") -> None:
        """Append one committed mail (or sent mail) to the journal, durably."""
        self.record([(key, hint, ticket)])

    def record(self, entries: Sequence[tuple[str, str, str]]) -> None:
        """Append (key, hint, ticket) lines for committed mails with one write and one fsync."""
        if not entries:
            return
        lines = []
        applied = []
        for key, hint, ticket in entries:
            entry = {"k": key, "h": hint}
            if ticket:
                entry["t"] = ticket
            lines.append(json.dumps(entry, ensure_ascii=False).encode("utf-8") + b"\n")
            applied.append(entry)
        path = self.directory / JOURNAL_FILE
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            data = memoryview(b"".join(lines))
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        self._journal_lines += len(lines)
        for entry in applied:
            self._apply(entry)
        self._trim()
        if self._journal_lines > 2 * self.max_entries:
            self._compact()

    def _compact(self) -> None:
        """Rewrite the journal with the entries still remembered."""
        tickets = {
            k[len("ticket:") :]: h for k, h in self._hints.items() if k.startswith("ticket:")
        }
        lines = []
        for key, hint in self._hints.items():
            if key.startswith("ticket:"):
                continue
            if key.startswith("<") and key not in self._whole and not _CONTENT_KEY.match(key):
                continue  # a Message-ID alone: re-derived from the content keys written
            lines.append(json.dumps({"k": key, "h": hint}, ensure_ascii=False))
        for ticket, hint in tickets.items():
            lines.append(json.dumps({"k": "", "h": hint, "t": ticket}, ensure_ascii=False))
        atomic_write(self.directory / JOURNAL_FILE, ("\n".join(lines) + "\n").encode("utf-8"))
        self._journal_lines = len(lines)


def conversation_hint(mail: NormalisedMail, state: MailState) -> str:
    """Return the thread key of a mail so follow-ups join their conversation.

    A known `[#T-…]` ticket wins; then the conversation of any mail it answers
    (In-Reply-To, then References newest first); then an unknown ticket token; then
    the thread root Message-ID (first of References, In-Reply-To, or its own).
    """
    if mail.ticket:
        known = state.hint_for(f"ticket:{mail.ticket}")
        if known:
            return known
    for ref in (mail.in_reply_to, *reversed(mail.references)):
        known = state.hint_for(ref)
        if known:
            return known
    if mail.ticket:
        return f"ticket:{mail.ticket}"
    return mail.thread_root
