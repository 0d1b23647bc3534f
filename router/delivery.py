"""The wire formats Omnirouter sends: one owner for every payload, one encoder, one schema.

Two families of sends leave through the outbox:

* **deliveries** to agent tools (`assignment`, `withdrawn`, `alert`, `notice`), encoded as
  one JSON object with the envelope of schema `omnirouter.delivery/1` (see
  adapters/README.md);
* **customer sends** (`ack`, `reply`, `survey`) handed to the channel the customer wrote
  from as an `Outbound`.

Each payload is a frozen dataclass built once, complete, by the core before the commit
that causes it. The only thing the store may decide inside that commit is which
conversation a message joined (it can reopen a resolved one); it does that with
`with_conversation`, which returns a new record, before anything is encoded, and hands
the committed records back so nobody rewrites a payload afterwards.

`delivery_schema()` generates the JSON Schema of the encoded deliveries from these
classes; `router/schemas/delivery.schema.json` is that output, committed, and a test
keeps the two equal.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Union

from router.codec import dumpb
from router.errors import PermanentError
from router.model import (
    TICKET_PREFIX,
    Assignment,
    Classification,
    InboundMessage,
    ticket_number,
)

DELIVERY_SCHEMA = "omnirouter.delivery/1"
# Envelope keys every encoded delivery carries before the payload's own keys.
ENVELOPE_KEYS = ("schema", "delivery_id", "kind", "agent_id", "attempt")


def iso(ts: float) -> str:
    """Return a Unix time as an ISO 8601 UTC string."""
    return datetime.fromtimestamp(ts, UTC).isoformat()


# -- outbox targets ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToolTarget:
    """An agent tool (adapter) from the config, by name."""

    name: str
    kind: ClassVar[str] = "tool"

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class ChannelTarget:
    """A customer channel from the config, by name: answers go back where the customer wrote."""

    name: str
    kind: ClassVar[str] = "channel"

    def __str__(self) -> str:
        return f"channel:{self.name}"


Target = ToolTarget | ChannelTarget


def target_from_str(text: str) -> Target:
    """Parse the text form of a target (`str(target)`), as the store keeps it."""
    if text.startswith("channel:"):
        return ChannelTarget(text[len("channel:") :])
    return ToolTarget(text)


# -- deliveries to agent tools ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContactInfo:
    """Who wrote: their handle on the channel and the name they gave."""

    handle: str
    name: str = ""


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """The customer's message as the agent sees it."""

    id: str
    channel: str
    channel_type: str
    contact: ContactInfo
    subject: str
    text: str
    language: str
    received_at: str  # ISO 8601


@dataclass(frozen=True, slots=True)
class SignalInfo:
    """One escalation signal with its evidence."""

    kind: str
    evidence: str
    span: tuple[int, ...] | None = None  # [start, end] in the text when known
    value: float | None = None


@dataclass(frozen=True, slots=True)
class ClassificationInfo:
    """The classifier's verdict, rounded for the wire."""

    label: str
    confidence: float
    scores: dict[str, float]
    severity: str
    signals: tuple[SignalInfo, ...] = ()


@dataclass(frozen=True, slots=True)
class RoutingInfo:
    """Who the message went to, from which queue, why, and by when."""

    agent_id: str
    queue: str
    reason: str
    sla_deadline: str  # ISO 8601
    assigned_at: str  # ISO 8601


@dataclass(frozen=True, slots=True)
class AssignmentPayload:
    """A customer message offered to (or held by) an agent."""

    kind: ClassVar[str] = "assignment"
    conversation_id: str
    message: MessageInfo
    classification: ClassificationInfo
    routing: RoutingInfo

    def with_conversation(self, conversation_id: str) -> AssignmentPayload:
        """Return this payload for the conversation the message really joined."""
        return dataclasses.replace(self, conversation_id=conversation_id)


@dataclass(frozen=True, slots=True)
class WithdrawnPayload:
    """Offers taken back from an agent (not accepted in time, or the agent went off line)."""

    kind: ClassVar[str] = "withdrawn"
    conversation_id: str
    message_ids: tuple[str, ...]
    reason: str

    def with_conversation(self, conversation_id: str) -> WithdrawnPayload:
        """Return this payload for another conversation id."""
        return dataclasses.replace(self, conversation_id=conversation_id)


@dataclass(frozen=True, slots=True)
class AlertPayload:
    """A notice for the on-duty manager: a P0 message, an SLA breach, a crisis event.

    `alert["kind"]` says which (urgent | sla_breach | spike | rate | ...); the other
    keys depend on it and are documented in adapters/README.md.
    """

    kind: ClassVar[str] = "alert"
    alert: dict[str, Any]

    def with_conversation(self, conversation_id: str) -> AlertPayload:
        """Return self: an alert names tickets inside its own record."""
        return self


@dataclass(frozen=True, slots=True)
class NoticePayload:
    """What became of an agent's action that was not applied (refused), told to their tool.

    `action` is what they sent (accept, transfer, ...; the raw name when unknown),
    `outcome` is `refused` (not allowed, or not understood) or `unsupported` (the
    router cannot do it here), `reason` says why in words for the agent.
    """

    kind: ClassVar[str] = "notice"
    action: str
    outcome: str
    reason: str
    conversation_id: str = ""
    message_id: str = ""

    def with_conversation(self, conversation_id: str) -> NoticePayload:
        """Return this payload for another conversation id."""
        return dataclasses.replace(self, conversation_id=conversation_id)


# -- sends to customers -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AckPayload:
    """The written confirmation of a new conversation, with its ticket and answer time."""

    kind: ClassVar[str] = "ack"
    conversation_id: str
    subject: str
    respond_by: str  # ISO 8601
    language: str
    contact_name: str = ""
    # How the answer refers to the customer's message on its channel (email Message-ID).
    in_reply_to: str = ""
    references: tuple[str, ...] = ()
    # The channel's own thread key, so it can file the answer under the conversation.
    conversation_hint: str = ""

    def with_conversation(self, conversation_id: str) -> AckPayload:
        """Return this payload for the conversation the message really joined."""
        return dataclasses.replace(self, conversation_id=conversation_id)


@dataclass(frozen=True, slots=True)
class ReplyPayload:
    """An agent's answer relayed to the customer on their channel."""

    kind: ClassVar[str] = "reply"
    conversation_id: str
    subject: str
    text: str
    language: str
    contact_name: str = ""
    in_reply_to: str = ""
    references: tuple[str, ...] = ()
    conversation_hint: str = ""

    def with_conversation(self, conversation_id: str) -> ReplyPayload:
        """Return this payload for another conversation id."""
        return dataclasses.replace(self, conversation_id=conversation_id)


@dataclass(frozen=True, slots=True)
class SurveyPayload:
    """The satisfaction question sent when a ticket is resolved (1-5, 满意/不满意).

    `text` is the question, written by the core in the customer's language, so every
    channel can send it as it stands; the customer's next message in the conversation
    within `[lifecycle] survey_window` is read as the answer.
    """

    kind: ClassVar[str] = "survey"
    conversation_id: str
    subject: str
    text: str
    language: str
    contact_name: str = ""
    in_reply_to: str = ""
    references: tuple[str, ...] = ()
    conversation_hint: str = ""

    def with_conversation(self, conversation_id: str) -> SurveyPayload:
        """Return this payload for another conversation id."""
        return dataclasses.replace(self, conversation_id=conversation_id)


AgentPayload = AssignmentPayload | WithdrawnPayload | AlertPayload | NoticePayload
CustomerPayload = AckPayload | ReplyPayload | SurveyPayload
Payload = AgentPayload | CustomerPayload

# For isinstance checks where a payload crosses from the outbox to a driver.
AGENT_PAYLOADS = (AssignmentPayload, WithdrawnPayload, AlertPayload, NoticePayload)
CUSTOMER_PAYLOADS = (AckPayload, ReplyPayload, SurveyPayload)
PAYLOAD_TYPES: dict[str, type[Any]] = {
    cls.kind: cls for cls in (*AGENT_PAYLOADS, *CUSTOMER_PAYLOADS)
}


# -- building, from the core's model ----------------------------------------------


def message_info(msg: InboundMessage, message_id: str, language: str, now: float) -> MessageInfo:
    """Return the agent's view of a customer message."""
    return MessageInfo(
        id=message_id,
        channel=msg.channel,
        channel_type=msg.channel_type,
        contact=ContactInfo(msg.contact_handle, msg.contact_name),
        subject=msg.subject,
        text=msg.text,
        language=language,
        received_at=msg.received_at.isoformat() if msg.received_at else iso(now),
    )


def classification_info(cls: Classification) -> ClassificationInfo:
    """Return the classifier's verdict as the agent sees it (rounded)."""
    return ClassificationInfo(
        label=cls.label,
        confidence=round(cls.confidence, 4),
        scores={k: round(v, 4) for k, v in cls.scores.items()},
        severity=cls.severity,
        signals=tuple(
            SignalInfo(
                kind=s.kind,
                evidence=s.evidence,
                span=(s.start, s.end) if s.start >= 0 else None,
                value=s.value,
            )
            for s in cls.signals
        )
        if cls.signals
        else (),
    )


def assignment_payload(
    msg: InboundMessage, cls: Classification, a: Assignment, now: float
) -> AssignmentPayload:
    """Return what an agent's tool receives when a message is given to them."""
    return AssignmentPayload(
        conversation_id=a.conversation_id,
        message=message_info(msg, a.message_id, cls.language, now),
        classification=classification_info(cls),
        routing=RoutingInfo(
            agent_id=a.agent_id,
            queue=a.queue,
            reason=a.reason,
            sla_deadline=a.sla_deadline.isoformat(),
            assigned_at=a.assigned_at.isoformat(),
        ),
    )


def ack_payload(
    msg: InboundMessage, conversation_id: str, language: str, respond_by: float
) -> AckPayload:
    """Return the written confirmation of a new conversation for the customer's channel."""
    return AckPayload(
        conversation_id=conversation_id,
        subject=msg.subject,
        respond_by=iso(respond_by),
        language=language,
        contact_name=msg.contact_name,
        in_reply_to=msg.reply_ref,
        references=(*msg.thread_refs, msg.reply_ref) if msg.reply_ref else (),
        conversation_hint=msg.conversation_hint,
    )


# -- converting -------------------------------------------------------------------


def payload_to_dict(payload: Payload) -> dict[str, Any]:
    """Return the JSON-ready body of a payload (what follows the envelope on the wire)."""
    # Hand-written for the hot kinds: dataclasses.asdict deep-copies and costs ~10x.
    if isinstance(payload, AssignmentPayload):
        m, c, r = payload.message, payload.classification, payload.routing
        return {
            "ticket": ticket_number(payload.conversation_id),
            "conversation_id": payload.conversation_id,
            "message": {
                "id": m.id,
                "channel": m.channel,
                "channel_type": m.channel_type,
                "contact": {"handle": m.contact.handle, "name": m.contact.name},
                "subject": m.subject,
                "text": m.text,
                "language": m.language,
                "received_at": m.received_at,
            },
            "classification": {
                "label": c.label,
                "confidence": c.confidence,
                "scores": c.scores,
                "severity": c.severity,
                "signals": [_signal_dict(s) for s in c.signals],
            },
            "routing": {
                "agent_id": r.agent_id,
                "queue": r.queue,
                "reason": r.reason,
                "sla_deadline": r.sla_deadline,
                "assigned_at": r.assigned_at,
            },
        }
    if isinstance(payload, AlertPayload):
        return {"alert": payload.alert}
    # A notice may be about no ticket at all (a presence change): its ticket is then "".
    cid = payload.conversation_id
    out: dict[str, Any] = {"ticket": ticket_number(cid) if cid else ""}
    for f in dataclasses.fields(payload):
        value = getattr(payload, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _signal_dict(s: SignalInfo) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": s.kind, "evidence": s.evidence}
    if s.span is not None:
        out["span"] = list(s.span)
    if s.value is not None:
        out["value"] = s.value
    return out


def payload_from_dict(kind: str, data: dict[str, Any]) -> Payload:
    """Rebuild a payload from its stored body; unknown keys are ignored, missing ones default.

    Raises ValueError for an unknown kind or a body that lacks a required field.
    """
    cls = PAYLOAD_TYPES.get(kind)
    if cls is None:
        raise ValueError(f"unknown payload kind {kind!r}")
    if cls is AssignmentPayload:
        m, c, r = data.get("message") or {}, data.get("classification") or {}, data.get("routing")
        r = r or {}
        contact = m.get("contact") or {}
        return AssignmentPayload(
            conversation_id=str(data.get("conversation_id", "")),
            message=MessageInfo(
                id=str(m.get("id", "")),
                channel=str(m.get("channel", "")),
                channel_type=str(m.get("channel_type", "")),
                contact=ContactInfo(str(contact.get("handle", "")), str(contact.get("name", ""))),
                subject=str(m.get("subject", "")),
                text=str(m.get("text", "")),
                language=str(m.get("language", "")),
                received_at=str(m.get("received_at", "")),
            ),
            classification=ClassificationInfo(
                label=str(c.get("label", "")),
                confidence=float(c.get("confidence", 0.0)),
                scores={str(k): float(v) for k, v in (c.get("scores") or {}).items()},
                severity=str(c.get("severity", "")),
                signals=tuple(
                    SignalInfo(
                        kind=str(s.get("kind", "")),
                        evidence=str(s.get("evidence", "")),
                        span=tuple(int(x) for x in s["span"]) if s.get("span") else None,
                        value=s.get("value"),
                    )
                    for s in c.get("signals") or ()
                ),
            ),
            routing=RoutingInfo(
                agent_id=str(r.get("agent_id", "")),
                queue=str(r.get("queue", "")),
                reason=str(r.get("reason", "")),
                sla_deadline=str(r.get("sla_deadline", "")),
                assigned_at=str(r.get("assigned_at", "")),
            ),
        )
    if cls is AlertPayload:
        return AlertPayload(alert=dict(data.get("alert") or {}))
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING:
                if f.name == "conversation_id" and str(data.get("ticket", "")).startswith(
                    TICKET_PREFIX
                ):
                    kwargs[f.name] = str(data["ticket"])[len(TICKET_PREFIX) :]
                    continue
                raise ValueError(f"{kind} payload lacks {f.name!r}")
            continue
        value = data[f.name]
        kwargs[f.name] = tuple(str(v) for v in value) if isinstance(value, list) else value
    payload: Payload = cls(**kwargs)
    return payload


# -- what the outbox hands to drivers ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    """One outbox entry handed to an agent tool. `id` is the idempotency key of the send."""

    id: str
    target: str  # agent tool name from the config
    agent_id: str
    address: str  # agent's address in that tool (topic suffix, URL path, file name)
    payload: AgentPayload
    attempt: int = 1
    created_at: datetime | None = None

    @property
    def kind(self) -> str:
        """Return the payload's kind (assignment | withdrawn | alert | notice)."""
        return self.payload.kind


@dataclass(frozen=True, slots=True)
class Outbound:
    """A send to a customer on their channel (acknowledgement, agent reply), from the outbox.

    `id` is the idempotency key: every retry of this send carries it (email derives one
    Message-ID from it, so a retried acknowledgement is recognisably the same mail).
    """

    id: str
    channel: str  # configured channel name
    to: str  # the contact handle on that channel (address, number, chat id)
    payload: CustomerPayload
    attempt: int = 1

    @property
    def kind(self) -> str:
        """Return the payload's kind (ack | reply | survey)."""
        return self.payload.kind

    @property
    def conversation_id(self) -> str:
        """Return the conversation this send belongs to."""
        return self.payload.conversation_id

    @property
    def ticket(self) -> str:
        """Return the ticket number the customer is told."""
        return ticket_number(self.payload.conversation_id)

    @property
    def text(self) -> str:
        """Return the text to send (a reply, the survey question); a channel writes acks."""
        return self.payload.text if isinstance(self.payload, ReplyPayload | SurveyPayload) else ""

    @property
    def subject(self) -> str:
        """Return the subject of the customer's message."""
        return self.payload.subject

    @property
    def in_reply_to(self) -> str:
        """Return the channel's reference to the customer's message (email Message-ID)."""
        return self.payload.in_reply_to

    @property
    def references(self) -> tuple[str, ...]:
        """Return the thread this send continues (email References)."""
        return self.payload.references

    @property
    def respond_by(self) -> datetime | None:
        """Return the promised answer time (acknowledgements only)."""
        if isinstance(self.payload, AckPayload) and self.payload.respond_by:
            return datetime.fromisoformat(self.payload.respond_by)
        return None

    @property
    def language(self) -> str:
        """Return the language of the customer's message (zh, en, ...)."""
        return self.payload.language


# -- the envelope and its encoder -------------------------------------------------


def encode_delivery(delivery: Delivery) -> bytes:
    """Return the compact UTF-8 JSON body every agent tool sends (omnirouter.delivery/1)."""
    body: dict[str, Any] = {
        "schema": DELIVERY_SCHEMA,
        "delivery_id": delivery.id,
        "kind": delivery.payload.kind,
        "agent_id": delivery.agent_id,
        "attempt": delivery.attempt,
        **payload_to_dict(delivery.payload),
    }
    try:
        return dumpb(body)
    except (TypeError, ValueError) as exc:
        raise PermanentError(f"delivery is not JSON-serialisable: {exc}") from exc


# -- the JSON Schema, generated ---------------------------------------------------


def _type_schema(tp: Any) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    if tp is str:
        return {"type": "string"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is Any:
        return {}
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = (
            _type_schema(args[0]) if len(args) == 1 else {"anyOf": [_type_schema(a) for a in args]}
        )
        if type(None) in typing.get_args(tp):
            return {"anyOf": [inner, {"type": "null"}]}
        return inner
    if origin is tuple or origin is list:
        items = typing.get_args(tp)
        return {"type": "array", "items": _type_schema(items[0]) if items else {}}
    if origin is dict:
        _, value = typing.get_args(tp)
        schema: dict[str, Any] = {"type": "object"}
        if value is not Any:
            schema["additionalProperties"] = _type_schema(value)
        return schema
    if dataclasses.is_dataclass(tp):
        return _object_schema(tp)
    raise TypeError(f"no schema for {tp!r}")


def _object_schema(cls: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    props: dict[str, Any] = {}
    required: list[str] = []
    for f in dataclasses.fields(cls):
        props[f.name] = _type_schema(hints[f.name])
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
    if cls is SignalInfo:
        props["span"] = {"type": "array", "items": {"type": "integer"}, "minItems": 2}
        required = ["kind", "evidence"]
    return {"type": "object", "properties": props, "required": required}


def delivery_schema() -> dict[str, Any]:
    """Return the JSON Schema (2020-12) of every encoded delivery to an agent tool."""
    variants = []
    for cls in AGENT_PAYLOADS:
        body = _object_schema(cls)
        props = {
            "schema": {"const": DELIVERY_SCHEMA},
            "delivery_id": {"type": "string", "minLength": 1},
            "kind": {"const": cls.kind},
            "agent_id": {"type": "string"},
            "attempt": {"type": "integer", "minimum": 1},
            **body["properties"],
        }
        required = [*ENVELOPE_KEYS, *body["required"]]
        if "conversation_id" in body["properties"]:
            # A notice about no ticket (a refused presence change) has ticket "".
            pattern = f"^({TICKET_PREFIX}|$)" if cls is NoticePayload else f"^{TICKET_PREFIX}"
            props["ticket"] = {"type": "string", "pattern": pattern}
            required.append("ticket")
        variants.append(
            {
                "title": cls.__name__,
                "type": "object",
                "properties": props,
                "required": required,
            }
        )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://omnirouter.example/schemas/delivery.schema.json",
        "title": DELIVERY_SCHEMA,
        "description": "What every agent tool receives from Omnirouter (router/delivery.py).",
        "oneOf": variants,
    }
