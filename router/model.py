"""The normalised message model shared by channels, the pipeline, the store and adapters.

Channels turn whatever their source speaks into an `InboundMessage`; the pipeline
gives it an id, a classification and an assignment. Everything here is plain
data: no I/O, no clock, so it is cheap to build in tests.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from enum import StrEnum
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

LABELS: tuple[str, ...] = ("inquiry", "complaint", "suggestion")
SEVERITIES: tuple[str, ...] = ("P0", "P1", "P2", "P3")
# Severities the service standards call urgent (a 30-second first response).
URGENT_SEVERITIES = frozenset({"P0", "P1"})
# A ticket number is its conversation's id behind this prefix ("T-01J…").
TICKET_PREFIX = "T-"


def ticket_number(conversation_id: str) -> str:
    """Return the customer-facing ticket number of a conversation."""
    return TICKET_PREFIX + conversation_id


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ulid_lock = threading.Lock()
_ulid_last_ms = 0
_ulid_last_rand = 0


def new_ulid(now_ms: int | None = None) -> str:
    """Return a new monotonic ULID (26 Crockford base32 characters, sortable by time)."""
    global _ulid_last_ms, _ulid_last_rand
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    with _ulid_lock:
        # Within one millisecond, increment the random part so ids stay sortable
        # in creation order (the ULID spec's monotonic mode).
        if ms <= _ulid_last_ms:
            ms = _ulid_last_ms
            rand = _ulid_last_rand + 1
        else:
            # Python's generator, seeded from the OS (and reseeded after fork), not
            # os.urandom: ids are not secrets, and getrandom() costs ~100 µs on some VMs.
            rand = random.getrandbits(79)
        _ulid_last_ms, _ulid_last_rand = ms, rand
    value = (ms << 80) | (rand & ((1 << 80) - 1))
    # Two characters (10 bits) per step: ids are made several times per message.
    pairs = _CROCKFORD_PAIRS
    # A list, not a generator: join() builds one from a generator first anyway.
    return "".join([pairs[(value >> shift) & 1023] for shift in _PAIR_SHIFTS])


_CROCKFORD_PAIRS = tuple(a + b for a in _CROCKFORD for b in _CROCKFORD)
_PAIR_SHIFTS = tuple(range(120, -1, -10))


def utcnow() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(UTC)


class MessageState(StrEnum):
    """Where a message is in its life."""

    QUEUED = "queued"  # stored and classified, waiting for an agent with room
    ASSIGNED = "assigned"  # given to an agent; a delivery sits in the outbox
    RESOLVED = "resolved"  # the conversation it belongs to was closed


@dataclass(frozen=True, slots=True)
class Attachment:
    """A file that came with a message; the bytes live elsewhere (storage_ref)."""

    name: str
    mime_type: str
    size: int
    sha256: str
    storage_ref: str = ""


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """What a channel hands to the pipeline: normalised, not yet stored."""

    channel: str
    channel_type: str
    external_id: str
    contact_handle: str
    text: str
    contact_name: str = ""
    subject: str = ""
    conversation_hint: str = ""  # channel's own thread key (web session, email thread)
    received_at: datetime | None = None
    language: str | None = None  # None: the pipeline detects it
    attachments: tuple[Attachment, ...] = ()
    payload_sha256: str = ""  # fingerprint of the source payload, to spot a reused idempotency key
    raw: bytes = b""
    # How an answer refers to this message on its channel (an email's Message-ID), and
    # the thread it continues (References): acknowledgements and replies carry them.
    reply_ref: str = ""
    thread_refs: tuple[str, ...] = ()
    # Confirm a new conversation also on the channel the contact handle reaches (an
    # e-mail address by an email channel, a phone number by SMS), when one is configured:
    # a contact form's customer should have the ticket number in writing.
    confirm_elsewhere: bool = False
    # Identifiers the channel vouches for (`email:…`, `phone:+…`, `telegram:<id>`; see
    # router.contacts): a signed or authenticated sender, never a claim typed into a form.
    # They link this message's contact to the contact already holding one of them.
    identifiers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Signal:
    """One escalation signal found in a message, with the evidence that raised it."""

    kind: str  # legal_threat, amount_over_threshold, abuse, safety, repeat_contact, vip, ...
    evidence: str
    start: int = -1
    end: int = -1
    value: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        out: dict[str, Any] = {"kind": self.kind, "evidence": self.evidence}
        if self.start >= 0:
            out["span"] = [self.start, self.end]
        if self.value is not None:
            out["value"] = self.value
        return out


@dataclass(frozen=True, slots=True)
class Classification:
    """The classifier's verdict on one message."""

    label: str
    confidence: float
    scores: dict[str, float]
    severity: str
    signals: tuple[Signal, ...]
    language: str
    model_version: str
    features: tuple[tuple[str, float], ...] = ()  # top contributing features, for `explain`

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "label": self.label,
            "confidence": round(self.confidence, 4),
            "scores": {k: round(v, 4) for k, v in self.scores.items()},
            "severity": self.severity,
            "signals": [s.to_dict() for s in self.signals],
            "language": self.language,
            "model_version": self.model_version,
            "features": [[f, round(w, 4)] for f, w in self.features],
        }


@dataclass(frozen=True, slots=True)
class Shift:
    """A weekly working window in a time zone; `end` before `start` runs past midnight."""

    days: frozenset[int]  # 0 = Monday
    start: int  # minutes after midnight
    end: int
    tz: str = "UTC"

    def contains(self, ts: float) -> bool:
        """Tell whether the Unix time falls inside this shift."""
        local = datetime.fromtimestamp(ts, _zone(self.tz))
        minute = local.hour * 60 + local.minute
        if self.start < self.end:
            return local.weekday() in self.days and self.start <= minute < self.end
        # Overnight: the part after midnight belongs to the previous day's shift.
        if minute >= self.start:
            return local.weekday() in self.days
        return minute < self.end and (local.weekday() - 1) % 7 in self.days


@lru_cache(maxsize=64)
def _zone(name: str) -> tzinfo:
    return UTC if name == "UTC" else ZoneInfo(name)


@dataclass(frozen=True, slots=True)
class Agent:
    """A human who takes work; `tool` names the adapter that reaches them."""

    id: str
    name: str
    capacity: int  # conversations per channel type when `capacities` is empty
    tool: str
    address: str = ""  # adapter-specific: topic suffix, webhook path, mailbox
    queues: frozenset[str] = frozenset({"default"})  # the departments the agent serves
    present: bool = True
    # Channel type -> concurrent conversations ("*" for any other type); empty means
    # `capacity` for every channel type.
    capacities: Mapping[str, int] = field(default_factory=dict)
    classes: frozenset[str] = frozenset()  # labels the agent takes; empty: all
    languages: frozenset[str] = frozenset()  # languages the agent takes; empty: all
    supervisor: bool = False  # takes overflow work whatever its skills
    shifts: tuple[Shift, ...] = ()  # empty: always in shift
    # Whether the agent's tool sends accept actions; if not, work is held at once and
    # no accept timeout applies (a file inbox cannot say "I took it").
    accepts: bool = True


@dataclass(slots=True)
class Assignment:
    """The routing decision for one message: who, why, and by when."""

    message_id: str
    conversation_id: str
    agent_id: str
    queue: str
    reason: str
    sla_deadline: datetime
    assigned_at: datetime = field(default_factory=utcnow)
    # The store refuses the assignment (atomically, in the same transaction) when the
    # agent already holds `capacity` open conversations of this channel type, or of any
    # type when `pool` is "*"; 0 skips the check. Two workers cannot overfill an agent.
    channel_type: str = ""
    capacity: int = 0
    pool: str = "*"
    explain: Mapping[str, Any] | None = None  # the scheduler's record of why this agent
    # Complaint rotation across instances: the agent's streak (assignments in a row
    # with one of `streak_labels`) as the deciding instance saw it. When the store's
    # streak is longer and at `streak_limit`, another instance gave the agent work
    # meanwhile: the store refuses, and the decision is made again on fresh state.
    # None (one instance, or not streak work): no check.
    streak_seen: int | None = None
    streak_limit: int = 0
    streak_labels: tuple[str, ...] = ()
    # When the agent was chosen at its limit: the other agents who may take the work
    # but were full or at the limit themselves then, as (agent, pool, capacity). If one
    # has room and is under the limit in the store at commit, another instance freed it
    # (or gave it other work) meanwhile: refused, and decided again on fresh state.
    rested_full: tuple[tuple[str, str, int], ...] = ()
    # Several instances: who the deciding instance believed holds the conversation
    # ("" nobody; an absent holder it takes the conversation from). If the store shows
    # another holder, another instance assigned it meanwhile: giving this message to
    # someone else would split the conversation, so the store refuses. None: no check.
    holder_seen: str | None = None
