"""The record of why an agent was chosen (`omnirouter explain`), kept compact until read.

The scheduler writes one record per assignment, naming every agent of a small roster
(or a sample of a big one) with its verdict. Rendering each verdict as a sentence on
every decision cost more than the decision itself, and the sentences were stored with
every assignment though they are read only when someone asks. So the scheduler keeps,
per agent, the few values its verdict follows from (a row), and the sentences are
rendered from the rows when the record is read: `Explanation` on the decision, or
`render` on a stored record. Rows are taken at decision time, so a verdict says what
held then, whatever changed since.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

# The stored form's version key; records without it were stored rendered (older rows).
COMPACT = "compact"
COMPACT_VERSION = 1

# One agent as the decision saw it: id, on line, on shift, slots of the channel type,
# slots held, slots free, complaint streak, let an offer time out lately, group index.
Row = list[Any]
# Per group of agents with the same skills: may take the work, why not, and the note
# that kept it from being chosen (a reserve, scarce work), "" for none. (No nulls: the
# store's encoder writes a record holding one again with the slower standard library.)
GroupFacts = list[Any]

# Why an agent was kept from the work, when it was not by letting this message's offer
# time out (the reason the scheduler first excluded for, so it needs no mark: records
# stored before reasons were kept, and exclusions restored from the store, are all
# timeouts). The scheduler skips every excluded agent alike; only the wording differs.
HANDED_ON = "handed_on"  # the agent transferred the ticket it held
TRANSFERRED = "transferred"  # a supervisor transferred the ticket the agent held
# The message had joined the agent's offer of its conversation (a follow-up) when the
# offer lapsed: the timeout ran from the offer, not from this message.
OFFER_LAPSED = "offer_lapsed"

_TIMED_OUT = "let this message time out before"
_EXCLUDED_FOR = {
    HANDED_ON: "handed this ticket on",
    TRANSFERRED: "had this ticket until a supervisor transferred it",
    OFFER_LAPSED: "let this conversation's offer time out before",
}


class Explanation(Mapping[str, Any]):
    """A decision's explain record: stored compact, rendered on first read."""

    __slots__ = ("_rendered", "compact")

    def __init__(self, compact: dict[str, Any]) -> None:
        """Wrap a compact record (see `compact_record`)."""
        self.compact = compact
        self._rendered: dict[str, Any] | None = None

    def rendered(self) -> dict[str, Any]:
        """Return the record as `omnirouter explain` shows it."""
        if self._rendered is None:
            self._rendered = render(self.compact)
        return self._rendered

    def __getitem__(self, key: str) -> Any:
        return self.rendered()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.rendered())

    def __len__(self) -> int:
        return len(self.rendered())

    def __bool__(self) -> bool:
        # A record always names its chosen agent; without this, Mapping's truth test
        # (len) would render every record where the store only checks for one.
        return True

    def __repr__(self) -> str:
        return f"Explanation({self.rendered()!r})"


def compact_record(
    header: dict[str, Any],
    rows: list[Row],
    groups: list[GroupFacts],
    *,
    excluded: list[str],
    rotation_limit: int,
    others: dict[str, int],
    excluded_for: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Return the stored form: the header, the rows and what verdicts need besides.

    `excluded_for` maps the excluded agents kept off for another reason than a timeout
    to that reason (HANDED_ON, ...); it is stored only when there is one, so records
    without it (all timeouts, and every record stored before it) read alike.
    """
    record = {
        **header,
        COMPACT: COMPACT_VERSION,
        "rows": rows,
        "groups": groups,
        "excluded": excluded,
        "rotation_limit": rotation_limit,
        "others": others,
    }
    if excluded_for:
        record["excluded_for"] = excluded_for
    return record


def stored_form(record: Mapping[str, Any]) -> Mapping[str, Any]:
    """Return what the store keeps of a record (compact when it is an `Explanation`)."""
    return record.compact if isinstance(record, Explanation) else record


def render(record: dict[str, Any]) -> dict[str, Any]:
    """Return a stored record as shown: candidates with their verdicts, others counted."""
    if record.get(COMPACT) != COMPACT_VERSION:
        return record  # stored rendered
    out = {k: v for k, v in record.items() if k not in _COMPACT_ONLY}
    out["candidates"] = [
        {"agent": row[0], "verdict": verdict(row, record)} for row in record["rows"]
    ]
    out["others"] = record["others"]
    return out


_COMPACT_ONLY = frozenset(
    (COMPACT, "rows", "groups", "excluded", "excluded_for", "rotation_limit", "others")
)


def verdict(row: Row, record: Mapping[str, Any]) -> str:
    """Say why the agent of `row` was, or was not, chosen (first reason that holds)."""
    agent, online, on_shift, capacity, used, room, streak, unreliable, group = row
    ct = record["channel_type"]
    if agent == record["chosen"]:
        return f"chosen ({room} of {capacity} {ct} slots free before)"
    if not online:
        return "off line"
    if not on_shift:
        return "off shift"
    if capacity <= 0:
        return f"takes no {ct}"
    if room <= 0:
        return f"full: {used}/{capacity} {ct}"
    if agent in record["excluded"]:
        why = record.get("excluded_for")
        return _EXCLUDED_FOR.get(why.get(agent, ""), _TIMED_OUT) if why else _TIMED_OUT
    may_take, refusal, note = record["groups"][group]
    if not may_take:
        return str(refusal)
    limit = record["rotation_limit"]
    if limit and streak >= limit:
        return f"rotation: {streak} complaints in a row"
    if unreliable:
        return "let an offer time out lately"
    if note:
        return str(note)
    return f"eligible, less spare room or assigned more recently ({room}/{capacity} {ct} free)"
