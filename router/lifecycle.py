"""The ticket lifecycle: the states a ticket goes through, the audited events, CSAT answers.

A ticket is a conversation as the service desk follows it::

    new ──► assigned ──► accepted ──► waiting_on_customer ──► resolved ──► closed
     ▲          │            ▲               │                   │
     └──────────┘ (offer     └───────────────┘ (the customer     └─► reopened (a follow-up
       taken back,             answers)                              within the reopen window,
       transfer)                                                     or a low survey answer)

Every transition, and every agent action (refused ones included), is one row of the
store's `ticket_events` audit: who (an agent id, `customer`, `router`, `ops`), when,
what, and the status the ticket was left in. The store writes each row in the same
transaction as the change it records.
"""

from __future__ import annotations

import re
import unicodedata
from enum import StrEnum


class TicketState(StrEnum):
    """Where a ticket is in its life (the conversation's `status`)."""

    NEW = "new"  # waiting for an agent
    ASSIGNED = "assigned"  # offered to (or held for) an agent who has not taken it up yet
    ACCEPTED = "accepted"  # an agent took it up: the customer waits for them
    WAITING = "waiting_on_customer"  # the agent answered: the customer's turn
    RESOLVED = "resolved"  # the agent closed it; a follow-up within the window reopens it
    CLOSED = "closed"  # archived: the thread's next message starts a new ticket


class EventKind(StrEnum):
    """What one audit row records."""

    CREATED = "created"  # the customer's first message opened the ticket
    ASSIGNED = "assigned"  # the scheduler gave it to an agent
    ACCEPTED = "accepted"  # the agent took it up
    REPLIED = "replied"  # the agent answered the customer
    CUSTOMER_REPLIED = "customer_replied"  # the customer wrote while it waited on them
    WITHDRAWN = "withdrawn"  # an offer taken back (not accepted in time, agent off line)
    TRANSFERRED = "transferred"  # moved to another agent or queue
    RESOLVED = "resolved"
    REOPENED = "reopened"
    CLOSED = "closed"
    RELABELLED = "relabelled"  # an agent corrected a message's label
    SURVEY_SENT = "survey_sent"
    SURVEY_ANSWERED = "survey_answered"
    REFUSED = "refused"  # an agent action that was not applied, and why
    PRESENCE = "presence"  # an agent went on line, away or off line (no ticket)


# Actors that are not agents.
CUSTOMER = "customer"
ROUTER = "router"

# A survey answer at or below this is unsatisfied: the ticket reopens, a supervisor is told.
LOW_SCORE = 2

_WORDS: dict[str, int] = {
    # Longest first where one contains another (非常不满意 before 不满意 before 满意).
    "非常不满意": 1,
    "很不满意": 1,
    "不满意": 2,
    "不太满意": 2,
    "一般": 3,
    "非常满意": 5,
    "很好": 5,
    "挺好": 4,
    "不错": 4,
    "还好": 3,
    "还行": 3,
    "不好": 2,
    "太差": 1,
    "很满意": 5,
    "满意": 4,
    "very satisfied": 5,
    "very unsatisfied": 1,
    "very dissatisfied": 1,
    "unsatisfied": 2,
    "dissatisfied": 2,
    "not satisfied": 2,
    "satisfied": 4,
    "excellent": 5,
    "great": 5,
    "good": 4,
    "ok": 3,
    "okay": 3,
    "bad": 2,
    "poor": 1,
    "terrible": 1,
    "yes": 4,
    "no": 2,
    "是": 4,
    "否": 2,
    "好": 4,
    "差": 2,
    "👍": 4,
    "👎": 2,
}
_WORD_ORDER = sorted(_WORDS, key=len, reverse=True)
# A negation just before the word turns it ("not good", "not really satisfied", "不好").
_NEGATION = re.compile(
    r"(?:\b(?:not|never|hardly|isn't|wasn't|didn't|don't)\s+(?:\w+\s+)?|[不没]\s*)$"
)
_QUESTION = re.compile(r"[?？吗嗎]|请问|請問|\b(?:how|what|when|where|why|can|could)\b")
# A survey answer is short: anything longer is a message, routed as one.
_MAX_ANSWER = 40
_DIGIT = re.compile(r"^\s*([1-5])(?:\s*(?:/\s*5|分|星|stars?|points?))?\s*[.!。！]*\s*$", re.I)


def parse_score(text: str) -> int | None:
    """Return the 1–5 score a short survey answer gives, or None when it is not one.

    Accepts a digit 1–5 (also "4/5", "4分"), 满意/不满意/非常满意 and their kin, and
    yes/no-ish words; anything longer than a short answer is a message, not a score.
    """
    folded = unicodedata.normalize("NFKC", text).strip().lower()
    if not folded or len(folded) > _MAX_ANSWER:
        return None
    digit = _DIGIT.match(folded)
    if digit:
        return int(digit.group(1))
    bare = folded.strip(" .!?,。！？，~～")
    if bare in _WORDS:
        return _WORDS[bare]
    if _QUESTION.search(folded):
        return None  # "你好，请问…？", "is it ok?": a question is a message, not a score
    for word in _WORD_ORDER:
        if len(word) < 2:
            continue  # 好, 差, 是: inside a longer text they are other words (你好, 差价)
        # A word inside a short answer ("很满意，谢谢", "no, not really"), whole words only
        # for the Latin ones so "no" does not match "know".
        if word.isascii():
            found = re.search(rf"(?<![a-z]){re.escape(word)}(?![a-z])", bare)
            at = found.start() if found else -1
        else:
            at = bare.find(word)
        if at >= 0:
            return _negated(_WORDS[word]) if _NEGATION.search(bare[:at]) else _WORDS[word]
    return None


def _negated(score: int) -> int:
    """Return what "not <word>" means: not good is low, not bad is middling."""
    return LOW_SCORE if score > 3 else 3 if score < 3 else score


def survey_question(language: str, ticket: str) -> str:
    """Return the satisfaction question in the customer's language (zh or en)."""
    if language == "zh":
        return (
            f"您的工单 {ticket} 已处理完毕。请对本次服务评分：回复 1–5（5 为非常满意），"
            "或回复“满意”/“不满意”。"
        )
    return (
        f"Your ticket {ticket} has been resolved. How did we do? Reply with a number "
        "from 1 (poor) to 5 (excellent), or simply yes or no."
    )
