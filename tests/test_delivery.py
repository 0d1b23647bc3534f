"""The wire formats: typed payloads, one encoder, and the committed JSON Schema."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from router.delivery import (
    AGENT_PAYLOADS,
    AlertPayload,
    AssignmentPayload,
    ChannelTarget,
    ClassificationInfo,
    ContactInfo,
    Delivery,
    MessageInfo,
    NoticePayload,
    RoutingInfo,
    SignalInfo,
    SurveyPayload,
    ToolTarget,
    WithdrawnPayload,
    delivery_schema,
    encode_delivery,
    payload_from_dict,
    payload_to_dict,
    target_from_str,
)
from tests import payloads
from tests.schema_check import SCHEMA_PATH, validate_delivery

text = st.text(max_size=40)


def test_the_committed_schema_is_the_generated_one() -> None:
    # Regenerate with: python -c "import json; from router.delivery import delivery_schema;
    # print(json.dumps(delivery_schema(), indent=2, ensure_ascii=False))" > router/schemas/...
    assert json.loads(SCHEMA_PATH.read_text(encoding="utf-8")) == delivery_schema()


assignments = st.builds(
    AssignmentPayload,
    conversation_id=st.text(min_size=1, max_size=30),
    message=st.builds(
        MessageInfo,
        id=text,
        channel=text,
        channel_type=text,
        contact=st.builds(ContactInfo, handle=text, name=text),
        subject=text,
        text=st.text(max_size=200),
        language=st.sampled_from(["en", "zh", "other"]),
        received_at=text,
    ),
    classification=st.builds(
        ClassificationInfo,
        label=st.sampled_from(["inquiry", "complaint", "suggestion"]),
        confidence=st.floats(0, 1),
        scores=st.dictionaries(text, st.floats(0, 1), max_size=3),
        severity=st.sampled_from(["P0", "P1", "P2", "P3"]),
        signals=st.lists(
            st.builds(
                SignalInfo,
                kind=text,
                evidence=text,
                span=st.none() | st.tuples(st.integers(0, 99), st.integers(0, 99)),
                value=st.none() | st.floats(allow_nan=False, allow_infinity=False),
            ),
            max_size=3,
        ).map(tuple),
    ),
    routing=st.builds(
        RoutingInfo, agent_id=text, queue=text, reason=text, sla_deadline=text, assigned_at=text
    ),
)
withdrawn = st.builds(
    WithdrawnPayload,
    conversation_id=st.text(min_size=1, max_size=30),
    message_ids=st.lists(text, max_size=3).map(tuple),
    reason=text,
)
alerts = st.builds(AlertPayload, alert=st.dictionaries(text, st.integers() | text, max_size=4))
notices = st.builds(
    NoticePayload,
    action=text,
    outcome=st.sampled_from(["refused", "unsupported"]),
    reason=text,
    conversation_id=st.sampled_from(["", "01JX"]),
    message_id=text,
)


@given(payload=st.one_of(assignments, withdrawn, alerts, notices), attempt=st.integers(1, 50))
def test_every_agent_payload_encodes_to_the_schema_and_reads_back(
    payload: Any, attempt: int
) -> None:
    delivery = Delivery(
        id="d1", target="t", agent_id="alice", address="", payload=payload, attempt=attempt
    )
    body = json.loads(encode_delivery(delivery))
    validate_delivery(body)
    assert body["kind"] == payload.kind and body["attempt"] == attempt
    stored = payload_to_dict(payload)
    assert payload_from_dict(payload.kind, json.loads(json.dumps(stored))) == payload


def test_customer_payloads_read_back_and_a_ticket_is_derived_never_stored_apart() -> None:
    survey = SurveyPayload(conversation_id="01JX", subject="s", text="满意吗？", language="zh")
    for payload in (payloads.ack("01JX"), payloads.reply("01JX", "你好"), survey):
        body = payload_to_dict(payload)
        assert body["ticket"] == "T-01JX" and body["conversation_id"] == "01JX"
        assert payload_from_dict(payload.kind, body) == payload
        moved = payload.with_conversation("01JY")
        assert payload_to_dict(moved)["ticket"] == "T-01JY"
        assert not isinstance(payload, AGENT_PAYLOADS)


def test_targets_are_typed_and_keep_their_text_form() -> None:
    assert target_from_str(str(ChannelTarget("mail"))) == ChannelTarget("mail")
    assert target_from_str(str(ToolTarget("mqtt"))) == ToolTarget("mqtt")
    assert ChannelTarget("x") != ToolTarget("x")


def test_unknown_kinds_and_incomplete_bodies_are_refused() -> None:
    import pytest

    with pytest.raises(ValueError, match="unknown payload kind"):
        payload_from_dict("fax", {})
    with pytest.raises(ValueError, match="lacks"):
        payload_from_dict("reply", {"subject": "x"})


def test_a_notice_about_no_ticket_has_an_empty_ticket() -> None:
    notice = NoticePayload(action="presence", outcome="refused", reason="unknown agent")
    body = json.loads(
        encode_delivery(Delivery(id="d", target="t", agent_id="a", address="", payload=notice))
    )
    validate_delivery(body)
    assert body["ticket"] == "" and body["kind"] == "notice"
