"""Crisis detection: a spike of complaints, or many customers about the same subject.

The service standards treat group complaints and a sudden rise in the complaint
rate as key incidents: the on-duty manager and the PR team are told at once. This
module decides *when* to tell them. It is pure and synchronous (no I/O, no
logging, no tasks): the pipeline calls `CrisisDetector.observe` for every
classified message and `CrisisDetector.tick` every few seconds, and sends each
returned `CrisisEvent` to the configured target (`CrisisConfig.target`).

Two detectors, each raising an alert once per episode and clearing it once:

``complaint_rate``
    Complaints counted in a short window (`rate_window`, 5 min) are compared
    with the trailing baseline: the complaint rate over the `baseline_window`
    (60 min) just before the short window. The alert is raised when the short
    window's rate (per hour) is at least `rate_multiple` times the baseline *and*
    the window holds at least `min_complaints` complaints, so two complaints on
    a quiet night are not a crisis. The baseline is never below
    `baseline_floor`, which is also the baseline used while the detector has less
    than one short window of history (just after start). While raised, the
    baseline is frozen at its value when the episode began (otherwise the spike
    itself would soon become the baseline); the alert clears once the rate has
    stayed under `clear_ratio` times that baseline for `clear_hold` seconds.
    A contact is counted once per short window, so one customer sending ten
    angry messages is repeat contact, not a crisis.

``same_subject``
    Messages are clustered by what they are about: the subject line when it has
    enough content, else the start of the text. The key is a set of shingles:
    character bigrams of each run of Han characters (a lone Han character is
    kept whole) and lower-cased words of other scripts minus English stop words
    and long digit runs (order and phone numbers). A message joins the cluster
    whose representative (the cluster's first message) has the highest Jaccard
    similarity with it, if that is at least `subject_similarity`; otherwise it
    starts a cluster. The alert is raised when `subject_contacts` distinct
    contacts joined one cluster within `subject_window`, and clears when no
    message has joined it for `subject_quiet` seconds.

Cost: `observe` is O(1) amortised for the rate (per-bucket counts in two
deques; a bucket is 1/30 of the short window) and, for subjects, proportional to
the number of clusters that share a prefix shingle with the message (prefix
filtering: a pair with Jaccard >= t must share one of the first
``n - ceil(t*n) + 1`` shingles of each set under one fixed order, so only
prefixes are indexed). Memory is bounded by the configuration: at most
`max_clusters` clusters (least recently joined evicted first, never an open
alert), `max_contacts` contacts remembered for de-duplication, a bounded
number of buckets, and `evidence_max` evidence items per alert.

Time is seconds since the epoch (floats), given with each call or taken from the
injected clock; timestamps that go backwards are treated as "now", so windows
never run backwards. State is in memory only: after a restart the baseline is
the floor until the short window has filled.
"""

from __future__ import annotations

import math
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import count as _counter
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from router.drivers import NAME_RE

__all__ = [
    "CrisisConfig",
    "CrisisDetector",
    "CrisisEvent",
    "CrisisEvidence",
    "excerpt",
    "jaccard",
    "subject_shingles",
]

EventKind = Literal["raised", "cleared"]
Reason = Literal["complaint_rate", "same_subject"]
_Label = Literal["inquiry", "complaint", "suggestion"]
_Severity = Literal["P0", "P1", "P2", "P3"]

RATE_KEY = "complaint_rate"
# The adapter-name pattern of router.config.NAME_RE, repeated here because
# router.config will import this module to mount CrisisConfig.
_BUCKETS_PER_WINDOW = 30  # rate resolution: 10 s buckets for a 5 min window
_MAX_BUCKET_RATIO = 288  # baseline_window / rate_window at most (24 h over 5 min)
_MAX_OPEN_SUBJECT_ALERTS = 64  # at most this many same_subject alerts open at once
_MAX_EXCERPT = 80
_EPS = 1e-9


class CrisisConfig(BaseModel):
    """When a rise in complaints becomes a crisis alert, and where the alert goes.

    Mounted at `classifier.crisis`. Rates are per hour, windows and holds seconds.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    # The adapter (by its `name`) that receives alerts; None: the events are only
    # recorded (metrics, log, ops API).
    target: str | None = Field(default=None, pattern=NAME_RE)
    address: str = Field(default="", max_length=256)  # adapter-specific, like Agent.address
    # Which messages count: these labels, plus any message at one of `severities`
    # whatever its label (a safety threat phrased as a question still counts).
    labels: tuple[_Label, ...] = Field(default=("complaint",), min_length=1)
    severities: tuple[_Severity, ...] = ("P0",)

    # -- complaint-rate spike --------------------------------------------------------
    rate_enabled: bool = True
    rate_window: float = Field(default=300.0, ge=30, le=3600)
    baseline_window: float = Field(default=3600.0, ge=60, le=86400)
    rate_multiple: float = Field(default=3.0, gt=1, le=100)
    min_complaints: int = Field(default=10, ge=1, le=100_000)
    baseline_floor: float = Field(default=20.0, gt=0, le=1_000_000)  # complaints per hour
    clear_ratio: float = Field(default=1.5, gt=0, le=100)
    clear_hold: float = Field(default=600.0, ge=0, le=86400)
    max_contacts: int = Field(default=10_000, ge=100, le=1_000_000)

    # -- many contacts about one subject -----------------------------------------------
    subject_enabled: bool = True
    subject_labels: tuple[_Label, ...] = Field(default=("complaint",), min_length=1)
    subject_contacts: int = Field(default=5, ge=2, le=1000)
    subject_window: float = Field(default=600.0, ge=30, le=86400)
    subject_quiet: float = Field(default=600.0, ge=30, le=86400)
    subject_similarity: float = Field(default=0.5, gt=0, le=1)
    subject_min_tokens: int = Field(default=2, ge=1, le=50)
    subject_chars: int = Field(default=160, ge=20, le=2000)  # of the text, when no subject
    max_clusters: int = Field(default=2000, ge=10, le=100_000)

    # -- what an alert carries --------------------------------------------------------
    evidence_max: int = Field(default=10, ge=1, le=100)
    excerpt_chars: int = Field(default=_MAX_EXCERPT, ge=0, le=_MAX_EXCERPT)  # 0: no text

    @field_validator("baseline_window")
    @classmethod
    def _baseline_longer(cls, v: float, info: ValidationInfo) -> float:
        """The baseline must span at least two short windows, and at most 288."""
        short = info.data.get("rate_window")
        if short is not None:
            if v < 2 * short:
                raise ValueError(f"must be at least twice rate_window ({short:g} s)")
            if v > _MAX_BUCKET_RATIO * short:
                raise ValueError(f"must be at most {_MAX_BUCKET_RATIO} times rate_window")
        return v

    @field_validator("clear_ratio")
    @classmethod
    def _clear_below_raise(cls, v: float, info: ValidationInfo) -> float:
        """Clearing must need a lower rate than raising, or alerts would flap."""
        multiple = info.data.get("rate_multiple")
        if multiple is not None and v >= multiple:
            raise ValueError(f"must be less than rate_multiple ({multiple:g})")
        return v


@dataclass(frozen=True, slots=True)
class CrisisEvidence:
    """One message behind an alert: which, from whom, and a short excerpt."""

    message_id: str
    contact: str
    excerpt: str
    at: float
    label: str = ""
    severity: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "message_id": self.message_id,
            "contact": self.contact,
            "excerpt": self.excerpt,
            "at": self.at,
            "label": self.label,
            "severity": self.severity,
        }


@dataclass(frozen=True, slots=True)
class CrisisEvent:
    """An alert raised or cleared.

    `key` pairs a `cleared` event with its `raised` one ("complaint_rate", or
    "same_subject:<n>"). `rate` is per hour over the short window (complaints for
    complaint_rate; distinct contacts over `subject_window` for same_subject);
    `baseline` is the episode's baseline (None for same_subject); `count` is the
    number of complaints (or distinct contacts) in the window at `at`.
    """

    kind: EventKind
    reason: Reason
    key: str
    started_at: float
    at: float
    rate: float
    baseline: float | None
    count: int
    evidence: tuple[CrisisEvidence, ...] = ()
    subject: str = ""  # same_subject: an excerpt of the cluster's first message

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "kind": self.kind,
            "reason": self.reason,
            "key": self.key,
            "started_at": self.started_at,
            "at": self.at,
            "rate": round(self.rate, 3),
            "baseline": None if self.baseline is None else round(self.baseline, 3),
            "count": self.count,
            "evidence": [e.to_dict() for e in self.evidence],
            "subject": self.subject,
        }


# -- text ----------------------------------------------------------------------------
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN_RE = re.compile(rf"[{_HAN}]+|[^\W_{_HAN}]+")
_REPLY_PREFIX_RE = re.compile(
    r"^\s*(?:(?:re|fwd?|aw|wg|回复|答复|转发|回覆|轉發)\s*[:：]\s*)+", re.I
)
_LONG_DIGITS = 5  # digit runs this long are order, phone or ticket numbers
_STOP_WORDS = frozenset(
    # Negations and particles such as "down", "out", "not" stay: "site down", "power out".
    """a about above after again all am an and any are as at be been before being below
    between both but by can could did do does doing during each few for from further had
    has have having he her here hers him his how i if in into is it its itself just me more
    most my myself now of on once only or other our ours own please re fw fwd same she
    should so some such than thank thanks that the their them then there these they this
    those through to too until very was we were what when where which while who whom why
    will with would you your yours hi hello dear""".split()
    # Words that name the kind of message, not its subject: a form's fixed subject
    # ("Complaint", "【投诉】") must not make every message one cluster.
    + """complaint complaints complain inquiry enquiry question feedback suggestion issue
    problem request help urgent ticket""".split()
)
_ZH_GENERIC_RE = re.compile("投诉|咨询|建议|反馈|问题|请问|你好|您好|紧急")


def excerpt(text: str, limit: int = _MAX_EXCERPT) -> str:
    """Return `text` with whitespace collapsed, cut to at most `limit` characters (… ends a cut)."""
    if limit <= 0:
        return ""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def subject_shingles(text: str) -> frozenset[str]:
    """Return the clustering key of `text`: Han bigrams plus other words minus stop words.

    >>> sorted(subject_shingles("Re: 停电了"))
    ['停电', '电了']
    """
    text = _REPLY_PREFIX_RE.sub("", text.lower()).replace("'", "").replace("\u2019", "")
    out: set[str] = set()
    for m in _TOKEN_RE.finditer(text):
        tok = m.group()
        if _is_han(tok[0]):
            for run in _ZH_GENERIC_RE.split(tok) if _ZH_GENERIC_RE.search(tok) else (tok,):
                if len(run) == 1:
                    out.add(run)
                elif run:
                    out.update(run[i : i + 2] for i in range(len(run) - 1))
        elif not (
            tok in _STOP_WORDS
            or (len(tok) == 1 and tok.isascii())
            or (tok.isdigit() and len(tok) >= _LONG_DIGITS)
        ):
            out.add(tok)
    return frozenset(out)


def _is_han(ch: str) -> bool:
    return "\u3400" <= ch <= "\u4dbf" or "\u4e00" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff"


def jaccard(a: frozenset[str] | set[str], b: frozenset[str] | set[str]) -> float:
    """Return |a ∩ b| / |a ∪ b| (0.0 for two empty sets)."""
    if not a and not b:
        return 0.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def _prefix(shingles: Iterable[str], threshold: float) -> tuple[str, ...]:
    """Return the prefix of `shingles` (in a fixed order) that prefix filtering indexes."""
    # Any fixed total order works; hash order is cheap. (Two shingles with equal
    # hashes, a ~2**-64 event, could only cost a missed match, never a wrong one.)
    ordered = sorted(shingles, key=hash)
    n = len(ordered)
    keep = n - math.ceil(threshold * n - _EPS) + 1
    return tuple(ordered[: max(1, min(n, keep))])


# -- state ---------------------------------------------------------------------------
# A message as remembered for evidence: (at, message_id, contact, text, label,
# severity). Excerpts are only cut when an alert is raised.
_Seen = tuple[float, str, str, str, str, str]


def _evidence(seen: _Seen, limit: int) -> CrisisEvidence:
    at, message_id, contact, text, label, severity = seen
    return CrisisEvidence(message_id, contact, excerpt(text, limit), at, label, severity)


@dataclass(slots=True)
class _RateEpisode:
    started_at: float
    baseline: float
    below_since: float | None = None


@dataclass(slots=True, eq=False)
class _Cluster:
    id: int
    shingles: frozenset[str]
    prefix: tuple[str, ...]
    subject: str
    last_at: float
    # contact -> its latest message, oldest first (move_to_end on every join)
    contacts: OrderedDict[str, _Seen] = field(default_factory=OrderedDict)
    raised_at: float | None = None


class CrisisDetector:
    """Watch classified messages for crises; see the module docstring for the rules.

    Not thread-safe: call it from one thread (the pipeline's event loop).
    """

    def __init__(self, config: CrisisConfig, clock: Callable[[], float] = time.time) -> None:
        """Start with empty history at `clock()`; the baseline is the floor until it fills."""
        self.config = config
        self._clock = clock
        self._now = float(clock())
        self._started = self._now
        self._counted = frozenset(config.labels)
        self._subject_counted = frozenset(config.subject_labels)
        self._severities = frozenset(config.severities)
        # rate: [bucket index, count] pairs, oldest first; short window, then baseline
        self._res = config.rate_window / _BUCKETS_PER_WINDOW
        self._n_base = math.ceil(config.baseline_window / self._res)
        self._short: deque[list[int]] = deque()
        self._base: deque[list[int]] = deque()
        self._short_sum = 0
        self._base_sum = 0
        self._k = -1  # the bucket _expire last moved to
        self._seen: OrderedDict[str, float] = OrderedDict()  # contact -> when last counted
        self._recent: deque[_Seen] = deque(maxlen=config.evidence_max)
        self._episode: _RateEpisode | None = None
        # subjects
        self._clusters: OrderedDict[int, _Cluster] = OrderedDict()  # least recently joined first
        self._index: dict[str, set[int]] = {}  # prefix shingle -> cluster ids
        self._raised: dict[int, _Cluster] = {}
        self._ids = _counter(1)
        self._contacts_cap = max(config.subject_contacts, config.evidence_max)
        self._max_open = min(_MAX_OPEN_SUBJECT_ALERTS, config.max_clusters // 2)
        self.suppressed = 0  # same_subject alerts not raised: too many already open

    # -- public ----------------------------------------------------------------------
    def observe(
        self,
        message_id: str,
        contact_key: str,
        label: str,
        severity: str,
        text: str,
        subject: str = "",
        at: float | None = None,
    ) -> list[CrisisEvent]:
        """Record one classified message; return the alerts it raises or clears (often none).

        Every message is observed (it moves time on); only those whose label is in
        `labels` (or severity in `severities`) count. `contact_key` identifies the
        customer across channels; an empty key counts every message as a new contact.
        """
        now = self._advance(at)
        cfg = self.config
        events: list[CrisisEvent] = []
        if not cfg.enabled:
            return events
        self._expire(now, events)
        urgent = severity in self._severities
        if cfg.rate_enabled and (label in self._counted or urgent):
            self._count(message_id, contact_key, label, severity, text or subject, now)
        if cfg.rate_enabled:
            self._check_rate(now, events)
        if cfg.subject_enabled and (label in self._subject_counted or urgent):
            self._join(message_id, contact_key, label, severity, text, subject, now, events)
        return events

    def tick(self, now: float | None = None) -> list[CrisisEvent]:
        """Move time on without a message; return alerts that clear (or, rarely, rise)."""
        t = self._advance(now)
        events: list[CrisisEvent] = []
        if not self.config.enabled:
            return events
        self._expire(t, events)
        if self.config.rate_enabled:
            self._check_rate(t, events)
        return events

    def prime(self, complaints: int, span: float, now: float | None = None) -> None:
        """Seed the baseline with `complaints` counted over the `span` seconds before now.

        For a restart: the pipeline counts recent complaints in the store so the
        detector need not fall back on the floor. Only baseline history is seeded
        (the span ends where the short window starts), so a crisis already alerted
        before the restart is not raised again from the seed alone. Call it before
        the first complaint is observed.
        """
        if complaints < 0 or not span > 0:
            raise ValueError("complaints must be >= 0 and span > 0")
        if self._short or self._base:
            raise RuntimeError("prime() must come before the first complaint")
        t = self._advance(now)
        k_end = math.floor(t / self._res) - _BUCKETS_PER_WINDOW  # last bucket before the window
        n = max(1, min(self._n_base, math.ceil(span / self._res)))
        per, extra = divmod(complaints, n)
        for i in range(n):
            c = per + (1 if i >= n - extra else 0)
            if c:
                self._base.append([k_end - n + 1 + i, c])
                self._base_sum += c
        self._started = min(self._started, (k_end - n + 1) * self._res)

    def rate(self) -> tuple[int, float, float]:
        """Return (complaints in the short window, their rate per hour, the current baseline)."""
        return self._short_sum, self._rate_now(), self._baseline(self._now)

    def open_alerts(self) -> list[tuple[Reason, str, float]]:
        """Return (reason, key, started_at) for every alert raised and not yet cleared."""
        out: list[tuple[Reason, str, float]] = []
        if self._episode is not None:
            out.append(("complaint_rate", RATE_KEY, self._episode.started_at))
        for c in self._raised.values():
            out.append(("same_subject", _cluster_key(c), c.raised_at or c.last_at))
        return out

    def sizes(self) -> dict[str, int]:
        """Return the size of every structure that grows with traffic (all bounded)."""
        return {
            "buckets": len(self._short) + len(self._base),
            "contacts": len(self._seen),
            "evidence": len(self._recent),
            "clusters": len(self._clusters),
            "index_keys": len(self._index),
            "index_entries": sum(len(v) for v in self._index.values()),
            "cluster_contacts": sum(len(c.contacts) for c in self._clusters.values()),
            "open_subject_alerts": len(self._raised),
        }

    # -- time ------------------------------------------------------------------------
    def _advance(self, at: float | None) -> float:
        t = float(self._clock()) if at is None else float(at)
        if not math.isfinite(t):
            raise ValueError(f"time must be finite, got {t!r}")
        if t > self._now:
            self._now = t
        return self._now

    def _expire(self, now: float, events: list[CrisisEvent]) -> None:
        """Drop what fell out of every window; clear subject alerts that went quiet."""
        cfg = self.config
        # Rate buckets: short -> baseline -> gone; only when a new bucket began.
        k = math.floor(now / self._res)
        if k != self._k:
            self._k = k
            edge = k - _BUCKETS_PER_WINDOW
            short, base = self._short, self._base
            while short and short[0][0] <= edge:
                b = short.popleft()
                self._short_sum -= b[1]
                base.append(b)
                self._base_sum += b[1]
            gone = edge - self._n_base
            while base and base[0][0] <= gone:
                self._base_sum -= base.popleft()[1]
        seen = self._seen
        while seen and next(iter(seen.values())) <= now - cfg.rate_window:
            seen.popitem(last=False)
        # Subject alerts: quiet clusters clear. Few are ever open.
        if self._raised:
            quiet = cfg.subject_quiet
            for c in [c for c in self._raised.values() if now - c.last_at >= quiet]:
                events.append(self._subject_event("cleared", c, now))
                self._drop(c)
        # Clusters nobody joined for a whole window (or quiet period) are forgotten.
        stale = max(cfg.subject_window, cfg.subject_quiet)
        clusters = self._clusters
        while clusters:
            c = next(iter(clusters.values()))
            if now - c.last_at <= stale:
                break
            self._drop(c)  # not raised: raised ones were cleared above (quiet <= stale)

    # -- complaint rate ------------------------------------------------------------------
    def _count(
        self, message_id: str, contact: str, label: str, severity: str, text: str, now: float
    ) -> None:
        if contact:
            seen = self._seen
            if contact in seen:
                return  # counted in this window already: repeat contact, not a crisis
            seen[contact] = now
            if len(seen) > self.config.max_contacts:
                seen.popitem(last=False)
        k = math.floor(now / self._res)
        short = self._short
        if short and short[-1][0] == k:
            short[-1][1] += 1
        else:
            short.append([k, 1])
        self._short_sum += 1
        self._recent.append((now, message_id, contact, text, label, severity))

    def _rate_now(self) -> float:
        return self._short_sum * 3600.0 / self.config.rate_window

    def _baseline(self, now: float) -> float:
        """Return the trailing complaint rate per hour before the short window (>= floor)."""
        cfg = self.config
        k = math.floor(now / self._res)
        short_start = (k - _BUCKETS_PER_WINDOW + 1) * self._res
        span = min(self._n_base * self._res, short_start - self._started)
        if span < cfg.rate_window:
            return cfg.baseline_floor  # not enough history yet
        return max(self._base_sum * 3600.0 / span, cfg.baseline_floor)

    def _check_rate(self, now: float, events: list[CrisisEvent]) -> None:
        cfg = self.config
        rate = self._rate_now()
        ep = self._episode
        if ep is None:
            if self._short_sum < cfg.min_complaints:
                return
            baseline = self._baseline(now)
            if rate + _EPS < cfg.rate_multiple * baseline:
                return
            self._episode = _RateEpisode(started_at=now, baseline=baseline)
            since = now - cfg.rate_window
            limit = cfg.excerpt_chars
            evidence = tuple(_evidence(e, limit) for e in reversed(self._recent) if e[0] > since)
            events.append(
                CrisisEvent(
                    kind="raised",
                    reason="complaint_rate",
                    key=RATE_KEY,
                    started_at=now,
                    at=now,
                    rate=rate,
                    baseline=baseline,
                    count=self._short_sum,
                    evidence=evidence,
                )
            )
            return
        if rate >= cfg.clear_ratio * ep.baseline:
            ep.below_since = None
            return
        if ep.below_since is None:
            ep.below_since = now
        if now - ep.below_since >= cfg.clear_hold:
            self._episode = None
            events.append(
                CrisisEvent(
                    kind="cleared",
                    reason="complaint_rate",
                    key=RATE_KEY,
                    started_at=ep.started_at,
                    at=now,
                    rate=rate,
                    baseline=ep.baseline,
                    count=self._short_sum,
                )
            )

    # -- same subject --------------------------------------------------------------------
    def _join(
        self,
        message_id: str,
        contact: str,
        label: str,
        severity: str,
        text: str,
        subject: str,
        now: float,
        events: list[CrisisEvent],
    ) -> None:
        cfg = self.config
        key_text = subject
        shingles = subject_shingles(subject) if subject else frozenset()
        if len(shingles) < cfg.subject_min_tokens:
            key_text = text[: cfg.subject_chars]
            shingles = subject_shingles(key_text)
            if len(shingles) < cfg.subject_min_tokens:
                return  # too little to tell what it is about
        prefix = _prefix(shingles, cfg.subject_similarity)
        cluster = self._match(shingles, prefix)
        if cluster is None:
            cluster = _Cluster(
                next(self._ids),
                shingles,
                prefix,
                excerpt(key_text, cfg.excerpt_chars),
                now,
            )
            self._clusters[cluster.id] = cluster
            for sh in cluster.prefix:
                self._index.setdefault(sh, set()).add(cluster.id)
            if len(self._clusters) > cfg.max_clusters:
                self._evict()
                if cluster.id not in self._clusters:
                    return  # every older cluster holds an open alert; this one made way
        else:
            cluster.last_at = now
            self._clusters.move_to_end(cluster.id)
        contacts = cluster.contacts
        who = contact or f"#{message_id}"
        contacts[who] = (now, message_id, contact, text or subject, label, severity)
        contacts.move_to_end(who)
        since = now - cfg.subject_window
        while contacts and next(iter(contacts.values()))[0] <= since:
            contacts.popitem(last=False)
        while len(contacts) > self._contacts_cap:
            contacts.popitem(last=False)
        if cluster.raised_at is None and len(contacts) >= cfg.subject_contacts:
            if len(self._raised) >= self._max_open:
                self.suppressed += 1
                return
            cluster.raised_at = now
            self._raised[cluster.id] = cluster
            events.append(self._subject_event("raised", cluster, now))

    def _match(self, shingles: frozenset[str], prefix: tuple[str, ...]) -> _Cluster | None:
        """Return the cluster most similar to `shingles` (at least the threshold), if any."""
        t = self.config.subject_similarity
        candidates: set[int] = set()
        index = self._index
        for sh in prefix:
            ids = index.get(sh)
            if ids:
                candidates |= ids
        best: _Cluster | None = None
        best_sim = 0.0
        for cid in candidates:
            c = self._clusters[cid]
            sim = jaccard(shingles, c.shingles)
            if sim + _EPS >= t and (
                sim > best_sim + _EPS
                or (best is not None and abs(sim - best_sim) <= _EPS and cid < best.id)
            ):
                best, best_sim = c, sim
        return best

    def _evict(self) -> None:
        """Forget the least recently joined cluster that has no open alert."""
        for c in self._clusters.values():
            if c.raised_at is None:
                self._drop(c)
                return

    def _drop(self, c: _Cluster) -> None:
        del self._clusters[c.id]
        self._raised.pop(c.id, None)
        for sh in c.prefix:
            ids = self._index.get(sh)
            if ids is not None:
                ids.discard(c.id)
                if not ids:
                    del self._index[sh]

    def _subject_event(self, kind: EventKind, c: _Cluster, now: float) -> CrisisEvent:
        cfg = self.config
        since = now - cfg.subject_window
        recent = [e for e in c.contacts.values() if e[0] > since]
        evidence = (
            tuple(_evidence(e, cfg.excerpt_chars) for e in reversed(recent[-cfg.evidence_max :]))
            if kind == "raised"
            else ()
        )
        return CrisisEvent(
            kind=kind,
            reason="same_subject",
            key=_cluster_key(c),
            started_at=c.raised_at if c.raised_at is not None else now,
            at=now,
            rate=len(recent) * 3600.0 / cfg.subject_window,
            baseline=None,
            count=len(recent),
            evidence=evidence,
            subject=c.subject,
        )


def _cluster_key(c: _Cluster) -> str:
    return f"same_subject:{c.id}"
