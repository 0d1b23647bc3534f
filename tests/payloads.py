"""Typed payloads shaped like the pipeline's, for tests of agent tools, the outbox and the store."""

from __future__ import annotations

from router.delivery import (
    AckPayload,
    AssignmentPayload,
    ClassificationInfo,
    ContactInfo,
    MessageInfo,
    ReplyPayload,
    RoutingInfo,
)


def assignment(
    n: int = 1,
    *,
    agent: str = "alice",
    conversation_id: str = "",
    message_id: str = "",
    text: str = "Grüße, 你好\nline two",
    contact_name: str = "Dana",
) -> AssignmentPayload:
    """Return an assignment payload for message n."""
    return AssignmentPayload(
        conversation_id=conversation_id or f"01J{n:04d}",
        message=MessageInfo(
            id=message_id or f"m-{n}",
            channel="web",
            channel_type="web",
            contact=ContactInfo(f"customer{n}@example.com", contact_name),
            subject="",
            text=text,
            language="en",
            received_at="2026-12-03T08:00:00+00:00",
        ),
        classification=ClassificationInfo(
            label="complaint", confidence=0.91, scores={"complaint": 0.91}, severity="P2"
        ),
        routing=RoutingInfo(
            agent_id=agent,
            queue="default",
            reason="least loaded",
            sla_deadline="2026-12-03T08:05:00+00:00",
            assigned_at="2026-12-03T08:00:00+00:00",
        ),
    )


def ack(conversation_id: str = "01JACK", *, language: str = "en") -> AckPayload:
    """Return an acknowledgement payload."""
    return AckPayload(
        conversation_id=conversation_id,
        subject="Where is my parcel?",
        respond_by="2026-12-03T08:05:00+00:00",
        language=language,
        contact_name="Dana",
    )


def reply(conversation_id: str = "01JREPLY", text: str = "Your parcel left today.") -> ReplyPayload:
    """Return a relayed agent reply payload."""
    return ReplyPayload(
        conversation_id=conversation_id, subject="Where is my parcel?", text=text, language="en"
    )
