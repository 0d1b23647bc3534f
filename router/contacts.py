"""Contacts across channels: one customer writing by email, SMS and Telegram is one contact.

Two levels, both kept by the store:

* a **handle** is one channel address, keyed `"<channel type>:<handle>"` (`email:ann@x.org`,
  `sms:+4915112345678`, `telegram:4711`); the store's `contacts` table holds one row each.
  Every message belongs to exactly one handle.
* a **contact** (a person; the store's `people` table, ids `c_…`) owns one or more handles.
  A handle's first message creates its contact. Contacts join in two ways only:
  - a **verified identifier** (`email:…`, `phone:+…`, `telegram:<user id>`) that the
    channel vouches for and that another contact already holds: a Twilio sender (the
    webhook is signed), an SMS gateway sender when its webhook is authenticated, a
    Telegram user id (and the phone number of a contact card the user shared of
    themselves), an e-mail sender whose DMARC passed by the receiving server's own
    `Authentication-Results`. A web form's e-mail field or an unauthenticated sender
    is a claim, never an identifier: it cannot pull someone's history into a stranger's
    ticket;
  - an agent's or admin's **merge** (`omnirouter contacts merge A B`, the ops API).
  A merge is a link from the merged contact to the one it joined (`people.merged_into`),
  never a rewrite, so `unmerge` undoes exactly one merge and every join is audited in
  `contact_events`. A verified link an admin undid is not made again by the router.

The router needs the contact of each incoming message *before* it commits it: the
service standards escalate a customer's third contact within the window (default three
within 72 h, `[classifier] repeat_contact_count/_window`) whatever channels they used.
`ContactBook` is that memory: which handles and identifiers belong to which contact
(for every contact seen since the start or active in the window, and every contact
with more than one handle), the merge links, and the recent message times per handle.
The store stays the authority; the book learns each commit's outcome.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

# ContactBook.seen() looks for handles that left the repeat-contact window at most
# once per this many messages (more rarely while the book is larger).
SWEEP_EVERY = 4096

# The identifier kinds a channel may vouch for, and what their values look like.
_PHONE = re.compile(r"\+[1-9]\d{5,14}")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_TELEGRAM = re.compile(r"\d{1,20}")
IDENTIFIER_KINDS = ("email", "phone", "telegram")
CONTACT_ID = re.compile(r"c_[0-9a-f]{16}")


def email_identifier(address: str) -> str:
    """Return the identifier of a verified e-mail address (case folded), or ''."""
    address = address.strip().lower()
    return f"email:{address}" if _EMAIL.fullmatch(address) else ""


def phone_identifier(number: str) -> str:
    """Return the identifier of a verified phone number in E.164 (`+…`), or ''."""
    number = number.strip()
    if number.startswith("whatsapp:"):  # Twilio's WhatsApp senders are phone numbers too
        number = number.removeprefix("whatsapp:")
    return f"phone:{number}" if _PHONE.fullmatch(number) else ""


def telegram_identifier(user_id: int | str) -> str:
    """Return the identifier of a Telegram user id, or ''."""
    value = str(user_id).strip()
    return f"telegram:{value}" if _TELEGRAM.fullmatch(value) else ""


def valid_identifier(identifier: str) -> bool:
    """Whether `identifier` is one a channel may vouch for (kind and value checked)."""
    kind, _, value = identifier.partition(":")
    if kind == "email":
        return email_identifier(value) == identifier
    if kind == "phone":
        return phone_identifier(value) == identifier
    if kind == "telegram":
        return telegram_identifier(value) == identifier
    return False


@dataclass(frozen=True, slots=True)
class ContactLink:
    """What ingest decided about a message's contact."""

    person_id: str  # the contact the handle was recorded for (before merges)
    root_id: str  # the contact it belongs to now
    identifiers: tuple[str, ...] = ()  # the verified identifiers it came with
    links: tuple[tuple[str, str], ...] = ()  # (contact, joined) links this message made


@dataclass(frozen=True, slots=True)
class ContactChange:
    """The outcome of a merge or unmerge: the link made or undone, or why not."""

    child: str = ""
    parent: str = ""
    error: str = ""
    code: str = ""

    @property
    def ok(self) -> bool:
        """Whether the change was made."""
        return not self.error


def handle_key(channel_type: str, handle: str) -> str:
    """Return the key of one channel address (the store's `contacts.key`)."""
    return f"{channel_type}:{handle}"


class ContactBook:
    """The router's memory of contacts: who is who, and who wrote when.

    Owners map a handle key or an identifier to the contact it was first recorded for;
    `parent` holds the merge links (merged contact -> the contact it joined). The
    recent times are kept per handle, so an unmerge splits them again exactly.
    """

    def __init__(self) -> None:
        """Start empty; `load` and `learn` fill it."""
        self.owner: dict[str, str] = {}
        self.parent: dict[str, str] = {}
        self.children: dict[str, set[str]] = {}
        self.handles: dict[str, set[str]] = {}
        self.identifiers: dict[str, set[str]] = {}  # contact -> the identifiers it owns
        self.recent: dict[str, deque[float]] = {}
        # The longest window count() was asked for: times older than that are never
        # counted again, so seen() sweeps handles with nothing newer (0: not yet known).
        self.horizon = 0.0
        self._seen_since_sweep = 0
        self._sweep_after = SWEEP_EVERY  # calls of seen() until the next sweep

    # -- who is who --------------------------------------------------------------

    def root(self, person: str) -> str:
        """Return the contact `person` belongs to after every merge."""
        seen = 0
        while person in self.parent and seen < 10_000:  # the store refuses cycles
            person = self.parent[person]
            seen += 1
        return person

    def members(self, root: str) -> set[str]:
        """Return every contact merged (directly or not) into `root`, itself included."""
        out = {root}
        todo = [root]
        while todo:
            for child in self.children.get(todo.pop(), ()):
                if child not in out:
                    out.add(child)
                    todo.append(child)
        return out

    def handles_of(self, roots: Iterable[str]) -> set[str]:
        """Return the handle keys of the given contacts and everything merged into them."""
        out: set[str] = set()
        for root in roots:
            for person in self.members(root):
                out |= self.handles.get(person, set())
        return out

    def roots_for(self, key: str, identifiers: Iterable[str] = ()) -> set[str]:
        """Return the contacts a message from handle `key` with these identifiers joins."""
        roots = set()
        for ref in (key, *identifiers):
            person = self.owner.get(ref)
            if person is not None:
                roots.add(self.root(person))
        return roots

    # -- what the store decided --------------------------------------------------

    def learn(
        self,
        key: str,
        person: str,
        identifiers: Iterable[str] = (),
        links: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Record a committed message's handle, its contact, identifiers and new links."""
        if not person:
            return
        self.owner.setdefault(key, person)
        self.handles.setdefault(self.owner[key], set()).add(key)
        for identifier in identifiers:
            self.learn_identifier(identifier, person)
        for child, parent in links:
            self.merged(child, parent)

    def learn_identifier(self, identifier: str, person: str) -> None:
        """Record a verified identifier and the contact it was first seen for."""
        owner = self.owner.setdefault(identifier, person)
        self.identifiers.setdefault(owner, set()).add(identifier)

    def merged(self, child: str, parent: str) -> None:
        """Record that contact `child` joined `parent`."""
        old = self.parent.get(child)
        if old is not None:
            self.children.get(old, set()).discard(child)
        self.parent[child] = parent
        self.children.setdefault(parent, set()).add(child)

    def unmerged(self, child: str) -> None:
        """Record that contact `child` was taken out of the contact it had joined."""
        old = self.parent.pop(child, None)
        if old is not None:
            self.children.get(old, set()).discard(child)

    # -- repeat contacts ---------------------------------------------------------

    def seen(self, key: str, at: float) -> None:
        """Record one message from handle `key` at `at`; now and then drop stale handles.

        count() prunes only the handles it is asked about, so a handle that wrote once
        and never again kept its entry (about 0.6 KiB) for the daemon's lifetime: memory
        grew with every distinct contact (bench/reliability/flood.py). The next sweep
        comes after as many calls as handles were left (at least SWEEP_EVERY), so the
        cost stays amortised O(1) per message.
        """
        self.recent.setdefault(key, deque()).append(at)
        self._seen_since_sweep += 1
        if self.horizon and self._seen_since_sweep >= self._sweep_after:
            since = at - self.horizon
            stale = [k for k, times in self.recent.items() if not times or times[-1] < since]
            for k in stale:
                del self.recent[k]
                self._forget_if_alone(k)
            self._seen_since_sweep = 0
            self._sweep_after = max(SWEEP_EVERY, len(self.recent))

    def _forget_if_alone(self, key: str) -> None:
        """Drop a quiet handle's contact when it has no other handle and no link.

        Nothing of it can count any more (its times left the window), and its next
        message teaches the book again from the store's answer. Linked contacts stay:
        a message from another handle must find them.
        """
        person = self.owner.get(key)
        if person is None or person in self.parent or person in self.children:
            return
        if self.handles.get(person, set()) - {key}:
            return
        del self.owner[key]
        self.handles.pop(person, None)
        for identifier in self.identifiers.pop(person, ()):
            self.owner.pop(identifier, None)

    def count(self, key: str, identifiers: Iterable[str], now: float, window: float) -> int:
        """Return how many messages the contact wrote within `window`, this one included.

        Counts every handle of the contact (and of contacts a verified identifier of
        this message links it to), across channels.
        """
        self.horizon = max(self.horizon, window)
        keys = self.handles_of(self.roots_for(key, identifiers))
        keys.add(key)
        since = now - window
        total = 1
        for k in keys:
            times = self.recent.get(k)
            if times is None:
                continue
            while times and times[0] < since:
                times.popleft()
            if not times:
                del self.recent[k]
                continue
            total += len(times)
        return total
