"""The chat channels' shared parts: idle threading, short acknowledgements, attachments."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from channels.conversations import (
    IdleThreads,
    ShortAckSettings,
    ack_text,
    keep_attachment,
    safe_filename,
)
from router.delivery import AckPayload, Outbound


def test_a_contact_stays_in_its_thread_until_quiet_for_the_window(tmp_path: Path) -> None:
    threads = IdleThreads(tmp_path / "threads.db", window=600)
    first = threads.thread_for("+4915112345678", 1000.0)
    threads.seen("+4915112345678", first, 1000.0)
    assert threads.thread_for("+4915112345678", 1500.0) == first
    threads.seen("+4915112345678", first, 1500.0)
    assert threads.thread_for("+4915112345678", 2000.0) == first  # 500 s after the last
    assert threads.thread_for("+4915112345678", 2101.0) != first  # quiet for 601 s
    assert threads.thread_for("+8613800000000", 1000.0) != first  # another contact
    threads.close()
    again = IdleThreads(tmp_path / "threads.db", window=600)  # kept across restarts
    assert again.thread_for("+4915112345678", 1600.0) == first


def test_an_uncommitted_message_does_not_keep_a_thread_alive(tmp_path: Path) -> None:
    threads = IdleThreads(tmp_path / "t.db", window=60)
    t1 = threads.thread_for("a", 0.0)
    assert threads.thread_for("a", 10.0) != t1  # never `seen`: nothing recorded


def _ack(language: str) -> Outbound:
    payload = AckPayload(
        conversation_id="01JABC",
        subject="",
        respond_by=datetime(2026, 12, 3, 8, 5, tzinfo=UTC).isoformat(),
        language=language,
    )
    return Outbound(id="o1", channel="sms", to="+4915112345678", payload=payload)


def test_ack_names_the_ticket_and_minutes_in_the_customers_language() -> None:
    now = datetime(2026, 12, 3, 8, 0, 30, tzinfo=UTC).timestamp()
    settings = ShortAckSettings()
    en = ack_text(_ack("en"), settings, now)
    assert "T-01JABC" in en and "5 min" in en
    zh = ack_text(_ack("zh"), settings, now)
    assert "T-01JABC" in zh and "5 分钟" in zh
    assert ack_text(_ack("other"), settings, now) == en  # default language


def test_ack_templates_are_checked() -> None:
    with pytest.raises(ValidationError, match="unknown field"):
        ShortAckSettings(templates={"en": "Ticket {tikcet}"})
    with pytest.raises(ValidationError, match="time zone"):
        ShortAckSettings(timezone="Mars/Olympus")


def test_attachments_are_content_addressed_with_safe_names(tmp_path: Path) -> None:
    a = keep_attachment(tmp_path, "../../etc/passwd", "text/plain\r\nX: y", b"hello")
    assert a.name == "passwd" and a.mime_type == "application/octet-stream" and a.size == 5
    path = Path(a.storage_ref.removeprefix("file:"))
    assert path.parent == tmp_path and path.read_bytes() == b"hello"
    assert keep_attachment(tmp_path, "b.txt", "text/plain", b"hello").storage_ref == a.storage_ref
    assert safe_filename("\x00\x1f") == "attachment"
    assert safe_filename("报告 (1).pdf") == "报告 (1).pdf"
