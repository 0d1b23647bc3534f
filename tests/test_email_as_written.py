"""Mail reads as its sender wrote it (issue 13): the defects found with malformed mail.

Every fixture is a minimal mail built here. No server: the normaliser, the SMTP
builder and the channel's last-line guard are pure; the journal writes to tmp_path.
The same mail through Dovecot and aiosmtpd: tests/test_email_e2e.py (raw 8-bit
subject) and tests/test_email_channel.py (reused Message-ID).
"""

from __future__ import annotations

import base64
import json
import quopri
from datetime import UTC, datetime
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from channels.email.channel import guard_text
from channels.email.config import AckSettings, SmtpSettings
from channels.email.cursor import JOURNAL_FILE, MailState, conversation_hint, dedupe_key
from channels.email.normalise import decode_bytes, decode_header_value, normalise
from channels.email.smtp import build_message
from router.delivery import AckPayload, SurveyPayload
from router.drivers import Outbound
from router.lifecycle import survey_question
from router.model import Attachment, InboundMessage

CYRILLIC = "Здравствуйте, мой заказ 4711 не пришёл. Подскажите, пожалуйста, когда он будет?"


def mail(headers: bytes, body: bytes = b"Hello, where is my order?\r\n") -> bytes:
    """Return a minimal mail from a customer with extra raw header lines."""
    return (
        b"From: Carol <carol@example.com>\r\nTo: support@shop.test\r\n"
        b"Message-ID: <m1@example.com>\r\nDate: Tue, 14 May 2024 08:20:30 +0000\r\n"
        + headers
        + b"\r\n\r\n"
        + body
    )


# -- the declared charset wins over a guess when it decodes almost everything -----------


def test_utf8_body_with_one_bad_byte_stays_utf8() -> None:
    # Before the fix: strict UTF-8 failed, gb18030 decoded strictly and won (Chinese).
    body = CYRILLIC.encode() + b"\xff" + " Спасибо!".encode()
    raw = mail(b"Subject: order\r\nContent-Type: text/plain; charset=utf-8", body)
    assert normalise(raw).text == CYRILLIC + "\ufffd Спасибо!"
    assert decode_bytes(body, "utf-8") == CYRILLIC + "\ufffd Спасибо!"
    assert decode_bytes(body, None) == CYRILLIC + "\ufffd Спасибо!"  # UTF-8 by default
    assert decode_bytes("Grüße".encode() + b"\xff", "utf-8") == "Grüße\ufffd"


def test_declared_charset_with_many_bad_bytes_is_still_guessed() -> None:
    # GBK mislabelled UTF-8 is wrong everywhere, not in a few places: still guessed.
    gbk = "我的订单没到，请尽快处理".encode("gbk")
    assert decode_bytes(gbk, "utf-8") == "我的订单没到，请尽快处理"
    assert decode_bytes(b"x" * 500 + "中文".encode("gbk"), "utf-8") == "x" * 500 + "中文"


def test_single_byte_label_with_an_undefined_byte_keeps_its_charset() -> None:
    text = "Привет, где мой заказ?"
    assert decode_bytes(text.encode("cp1251") + b"\x98", "windows-1251") == text + "\ufffd"


# -- UTF-7 --------------------------------------------------------------------------------


def test_utf7_subject_and_body_are_decoded() -> None:
    # Before the fix: all-ASCII bytes skipped the declared charset ("Gr+APwA3w-e").
    raw = mail(
        b"Subject: =?utf-7?Q?Gr+APwA3w-e?= aus Wien\r\nContent-Type: text/plain; charset=utf-7",
        b"Gr+APwA3w-e, Carol\r\n",
    )
    parsed = normalise(raw)
    assert parsed.subject == "Grüße aus Wien"
    assert parsed.text == "Grüße, Carol"
    assert decode_bytes(b"Gr+APwA3w-e", "UTF-7") == "Grüße"
    assert decode_bytes(b"Gr+APwA3w-e", "utf-8") == "Gr+APwA3w-e"  # only under its label


# -- raw 8-bit bytes inside encoded words ------------------------------------------------


def no_escape(value: str) -> bool:
    """Tell whether value holds neither a lone surrogate nor one spelt out as text."""
    return "\\ud" not in value.lower() and not any("\ud800" <= c <= "\udfff" for c in value)


def test_raw_latin1_byte_inside_a_q_word_reads_as_written() -> None:
    # Before the fix: the subject was stored as "Gr\\udcfc\\udcdfe" (spelt-out escapes).
    raw = mail(b"Subject: =?ISO-8859-1?Q?Gr\xfc\xdfe_aus_M=FCnchen?=\r\nContent-Type: text/plain")
    parsed = normalise(raw)
    assert parsed.subject == "Grüße aus München"
    raw = mail(b"Subject: Re: =?utf-8?q?Gr\xc3\xbc\xc3\x9fe?= \xe4\xbd\xa0\xe5\xa5\xbd")
    assert normalise(raw).subject == "Re: Grüße 你好"
    # Found by the property below: raw byte 0x85 (in UTF-8 "υ") is NEL to str.splitlines.
    raw = mail(b"Subject: =?utf-8?Q?" + "ευχαριστώ".encode() + b"?=")
    assert normalise(raw).subject == "ευχαριστώ"
    assert normalise(mail(b"Subject: \xcf\x85 \x00x")).subject == "υ x"
    name = b"From: =?iso-8859-1?q?J=FCrgen_M\xfcller?= <jm@example.com>\r\n"
    assert normalise(name + b"Subject: x\r\n\r\nhi\r\n").from_name == "Jürgen Müller"


def test_header_text_around_encoded_words_is_kept_as_it_was() -> None:
    assert decode_header_value("Größe =?utf-8?q?und?= 中") == "Größe und 中"
    assert decode_header_value("C:\\users =?utf-8?q?x?= 中") == "C:\\users x 中"
    assert decode_header_value("\udcce\udcd2\udcb5\udcc4") == "我的"  # raw GBK, no word


def test_the_channel_guard_leaves_no_surrogate_in_any_text_field() -> None:
    bad = "Gr\udcfc\udcdfe \\udcfc"
    message = InboundMessage(
        channel="support",
        channel_type="email",
        external_id="1:1",
        contact_handle="carol@example.com",
        contact_name=bad,
        text=bad,
        subject=bad,
        conversation_hint=bad,
        reply_ref=bad,
        thread_refs=(bad,),
        attachments=(Attachment(name=bad, mime_type=bad, size=1, sha256="0" * 64),),
    )
    guarded = guard_text(message)
    for value in (
        guarded.contact_name,
        guarded.subject,
        guarded.conversation_hint,
        guarded.reply_ref,
        *guarded.thread_refs,
        guarded.attachments[0].name,
        guarded.attachments[0].mime_type,
    ):
        assert value == "Gr\ufffd\ufffde \ufffd"
    # A body is decoded from bytes, never spelt out: a customer's "\\udcfc" there is kept.
    assert guarded.text == "Gr\ufffd\ufffde \\udcfc"
    assert guarded.external_id == "1:1" and guarded.contact_handle == "carol@example.com"


def test_the_acknowledgement_never_echoes_an_escaped_byte() -> None:
    # Rows stored before the fix hold spelt-out escapes; a future bug could hold real ones.
    smtp = SmtpSettings(host="127.0.0.1", from_address="support@shop.test", tls="none")
    for subject in ("Gr\\udcfc\\udcdfe", "Gr\udcfc\udcdfe"):
        outbound = Outbound(
            id="ob-1",
            channel="support",
            to="carol@example.com",
            payload=AckPayload(
                conversation_id="01HZX",
                subject=subject,
                respond_by=datetime(2025, 1, 2, 15, 30, tzinfo=UTC).isoformat(),
                language="",
                contact_name="J\udcfcrgen",
                in_reply_to="<m1@example.com>",
            ),
        )
        msg = build_message(outbound, smtp, AckSettings())
        assert str(msg["Subject"]) == "Re: Gr\ufffd\ufffde [#T-01HZX]"
        wire = msg.as_bytes()  # would raise on a lone surrogate
        assert no_escape(wire.decode("utf-8", "replace"))
        body = msg.get_body(("plain",))
        assert body is not None and no_escape(str(body.get_content()))


def test_the_survey_is_a_short_threaded_automatic_mail_with_the_question() -> None:
    smtp = SmtpSettings(host="127.0.0.1", from_address="support@shop.test", tls="none")
    question = survey_question("zh", "T-01HZX")
    outbound = Outbound(
        id="ob-2",
        channel="support",
        to="carol@example.com",
        payload=SurveyPayload(
            conversation_id="01HZX",
            subject="订单",
            text=question,
            language="zh",
            in_reply_to="<m1@example.com>",
            references=("<m0@example.com>", "<m1@example.com>"),
        ),
    )
    msg = build_message(outbound, smtp, AckSettings())
    assert str(msg["Subject"]) == "Re: 订单 [#T-01HZX]"
    assert msg["Auto-Submitted"] == "auto-generated" and msg["In-Reply-To"] == "<m1@example.com>"
    assert msg["X-Omnirouter-Ticket"] == "T-01HZX"
    body = msg.get_body(("plain",))
    assert body is not None and str(body.get_content()).strip() == question
    assert "满意" in question and "1–5" in question


# -- which parts are text, which are attachments ------------------------------------------


def multipart(content_type: bytes, *parts: bytes, boundary: bytes = b"b1") -> bytes:
    """Return a mail whose body is the given raw parts (headers, blank line, body each)."""
    body = b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts)
    return mail(b"Subject: parts\r\nMIME-Version: 1.0\r\n" + content_type, body + b"--b1--\r\n")


def test_named_text_part_without_disposition_is_the_body() -> None:
    # Before the fix: taken for an attachment, so the message was routed with no text.
    raw = mail(
        b'Subject: order\r\nContent-Type: text/plain; charset=utf-8; name="note.txt"',
        b"My order 4711 has not arrived.\r\n",
    )
    parsed = normalise(raw)
    assert parsed.text == "My order 4711 has not arrived."
    assert parsed.body_source == "plain" and parsed.attachments == ()


def test_attached_text_is_the_body_only_when_there_is_no_other_text() -> None:
    note = b'Content-Type: text/plain; name="log.txt"\r\nContent-Disposition: attachment\r\n\r\n'
    alone = multipart(b"Content-Type: multipart/mixed; boundary=b1", note + b"error 42\r\n")
    parsed = normalise(alone)
    assert parsed.text == "error 42" and parsed.body_source == "attachment"
    assert [a.name for a in parsed.attachments] == ["log.txt"]
    both = multipart(
        b"Content-Type: multipart/mixed; boundary=b1",
        b"Content-Type: text/plain\r\n\r\nSee the log.\r\n",
        note + b"error 42\r\n",
    )
    parsed = normalise(both)
    assert parsed.text == "See the log." and [a.name for a in parsed.attachments] == ["log.txt"]


def test_inline_html_with_a_file_name_next_to_plain_text_is_kept() -> None:
    # Before the fix: neither in the text nor among the attachments.
    raw = multipart(
        b"Content-Type: multipart/mixed; boundary=b1",
        b"Content-Type: text/plain; charset=utf-8\r\n\r\nThe invoice is below.\r\n",
        b'Content-Type: text/html; charset=utf-8\r\nContent-Disposition: inline; filename="inv'
        b'oice.html"\r\n\r\n<p>Invoice 4711: 20 EUR</p>\r\n',
        b"Content-Type: text/html\r\n\r\n<p>unnamed, outside an alternative</p>\r\n",
    )
    parsed = normalise(raw)
    assert parsed.text == "The invoice is below."
    assert [(a.name, a.mime_type, a.inline) for a in parsed.attachments] == [
        ("invoice.html", "text/html", True),
        ("attachment-3.html", "text/html", False),
    ]
    assert (parsed.attachments[0].data or b"").strip() == b"<p>Invoice 4711: 20 EUR</p>"


def test_html_alternative_of_the_plain_text_is_not_an_attachment() -> None:
    raw = multipart(
        b"Content-Type: multipart/alternative; boundary=b1",
        b"Content-Type: text/plain\r\n\r\nHello\r\n",
        b"Content-Type: text/html\r\n\r\n<p>Hello</p>\r\n",
    )
    parsed = normalise(raw)
    assert parsed.text == "Hello" and parsed.attachments == ()


def test_content_type_missing_its_semicolon() -> None:
    # Before the fix: one attachment typed "multipart/mixed\tboundary=b1", no text.
    raw = multipart(
        b"Content-Type: multipart/mixed\tboundary=b1",
        b"Content-Type: text/plain charset=iso-8859-1\r\n\r\nGr\xfc\xdfe, Carol\r\n",
        b'Content-Type: application/pdf\tname="a.pdf"\r\nContent-Disposition: attachment\r\n\r\n'
        b"%PDF-1.4\r\n",
        b"Content-Type: image/png;;\r\nContent-Disposition: attachment\r\n\r\nx\r\n",
        b"Content-Type: ;x=1\r\nContent-Disposition: attachment\r\n\r\ny\r\n",
    )
    parsed = normalise(raw)
    assert parsed.text == "Grüße, Carol"
    assert [(a.name, a.mime_type) for a in parsed.attachments] == [
        ("a.pdf", "application/pdf"),
        ("attachment-3.png", "image/png"),
        ("attachment-4.txt", "text/plain"),  # no type at all: the RFC's default
    ]
    folded = mail(
        b"Subject: x\r\nContent-Type: text/plain\r\n\tcharset=koi8-r", "Привет".encode("koi8-r")
    )
    assert normalise(folded).text == "Привет"


# -- deduplication on the Message-ID and the content --------------------------------------


def test_dedupe_key_is_the_message_id_and_a_digest_of_what_was_written() -> None:
    base = mail(b"Subject: order\r\nContent-Type: text/plain", b"Where is order 1?\r\n")
    same = b"Received: from mx2 by imap; Tue, 14 May 2024\r\nX-Spam: no\r\n" + base
    other = base.replace(b"order 1", b"order 2")
    key = dedupe_key(normalise(base))
    assert key.startswith("<m1@example.com>#") and len(key.partition("#")[2]) == 16
    assert dedupe_key(normalise(same)) == key  # a server re-adding headers: same mail
    assert dedupe_key(normalise(other)) != key
    later = base.replace(b"08:20:30", b"09:20:30")  # a template sent again later
    assert dedupe_key(normalise(later)) != key


def test_journal_tells_a_reused_message_id_from_a_redelivery(tmp_path: Path) -> None:
    state = MailState(tmp_path)
    state.load()
    first = normalise(mail(b"Subject: a", b"first\r\n"))
    second = normalise(mail(b"Subject: a", b"second\r\n"))
    state.remember(dedupe_key(first), conversation_hint(first, state), "T-1")
    assert state.seen(dedupe_key(first)) and not state.reused(dedupe_key(first))
    assert not state.seen(dedupe_key(second)) and state.reused(dedupe_key(second))
    # Threading still finds the conversation by the Message-ID alone.
    assert state.hint_for("<m1@example.com>") == "<m1@example.com>"
    state.remember(dedupe_key(second), "other-thread")
    assert state.hint_for("<m1@example.com>") == "<m1@example.com>"  # the first mail's
    reloaded = MailState(tmp_path)
    reloaded.load()
    assert reloaded.seen(dedupe_key(first)) and reloaded.seen(dedupe_key(second))
    assert reloaded.hint_for("<m1@example.com>") == "<m1@example.com>"


def test_old_journal_lines_and_sent_mail_keep_matching_any_content(tmp_path: Path) -> None:
    # A journal written before content keys: a redelivery after the upgrade is still
    # recognised (so is, as before, a different mail under that Message-ID).
    lines = [{"k": "<m1@example.com>", "h": "<m1@example.com>", "t": "T-1"}]
    (tmp_path / JOURNAL_FILE).write_text("".join(json.dumps(x) + "\n" for x in lines))
    state = MailState(tmp_path)
    state.load()
    assert state.seen(dedupe_key(normalise(mail(b"Subject: a"))))
    state.remember("<ack-1@shop.test>", "<m1@example.com>")  # a mail we sent
    ours = mail(b"Subject: a").replace(b"<m1@example.com>", b"<ack-1@shop.test>")
    assert state.seen(dedupe_key(normalise(ours)))
    # Compaction keeps every kind of line as it was.
    for n in range(4):
        fresh = normalise(mail(b"Subject: a").replace(b"<m1@", b"<n%d@" % n))
        state.remember(dedupe_key(fresh), f"<n{n}@example.com>")
    state._compact()
    assert len((tmp_path / JOURNAL_FILE).read_text().splitlines()) == 7  # 6 mails, 1 ticket
    again = MailState(tmp_path)
    again.load()
    assert again.seen(dedupe_key(normalise(ours)))
    assert again.hint_for("<n3@example.com>") == "<n3@example.com>"
    assert again.seen(dedupe_key(normalise(mail(b"Subject: a").replace(b"<m1@", b"<n3@"))))
    assert not again.seen(dedupe_key(normalise(mail(b"Subject: b").replace(b"<m1@", b"<n3@"))))


# -- property: declared and actual charsets mixed, raw 8-bit headers, encoded words -------

# Words per script, and the charsets that can carry them. Words, not random code points:
# the round trip is asserted on text a person writes (the decoder weighs plausibility).
_SCRIPTS: dict[str, tuple[list[str], list[str]]] = {
    "latin": (
        ["Grüße", "Größe", "café", "naïve", "Bestellung", "reçu", "año", "order", "4711"],
        ["utf-8", "utf-7", "iso-8859-1", "iso-8859-15", "windows-1252"],
    ),
    "cyrillic": (
        ["Здравствуйте", "заказ", "пришёл", "спасибо", "где", "мой", "4711"],
        ["utf-8", "utf-7", "koi8-r", "windows-1251", "iso-8859-5"],
    ),
    "greek": (["Καλημέρα", "παραγγελία", "ευχαριστώ", "4711"], ["utf-8", "iso-8859-7"]),
    "simplified": (
        ["您好", "订单", "退款", "请问", "没有", "收到", "4711"],
        ["utf-8", "gbk", "gb18030"],
    ),
    "traditional": (["您好", "訂單", "請問", "退款", "收到", "4711"], ["utf-8", "big5"]),
}
_WRONG_LABELS = ["utf-8", "us-ascii", "iso-8859-1", "gbk", "big5", "utf-7", "koi8-r", "bogus", ""]


def _q_word(data: bytes, charset: str, raw8: bool) -> bytes:
    """Return an RFC 2047 Q word; with raw8, 8-bit bytes stay raw as old mailers left them."""
    out = b""
    for byte in data:
        if (chr(byte).isalnum() and byte < 0x80) or (raw8 and byte >= 0x80):
            out += bytes([byte])
        else:
            out += b"=%02X" % byte
    return b"=?" + charset.encode() + b"?Q?" + out + b"?="


@st.composite
def charset_mails(draw: st.DrawFn) -> tuple[bytes, str, str, bool]:
    """Draw (raw mail, subject text, body text, whether every label told the truth)."""
    words, charsets = _SCRIPTS[draw(st.sampled_from(sorted(_SCRIPTS)))]
    actual = draw(st.sampled_from(charsets))
    right = draw(st.booleans())
    declared = actual if right else draw(st.sampled_from(_WRONG_LABELS))
    subject = " ".join(draw(st.lists(st.sampled_from(words), min_size=1, max_size=6)))
    body = " ".join(draw(st.lists(st.sampled_from(words), min_size=1, max_size=40)))
    encoded = subject.encode(actual)
    form = draw(st.sampled_from(["q", "q-raw8", "b", "raw8", "split"]))
    if form == "q":
        header = _q_word(encoded, declared or actual, raw8=False)
    elif form == "q-raw8":
        header = _q_word(encoded, declared or actual, raw8=True)
    elif form == "b":
        header = b"=?" + (declared or actual).encode() + b"?B?" + base64.b64encode(encoded) + b"?="
    elif form == "raw8":  # no encoded word: no label at all, only UTF-8 can be trusted
        header = encoded
        right = right and actual == "utf-8"
    else:  # a word per word of the subject, folded; the space between words is ignored
        pieces = subject.split(" ")
        header = b"\r\n ".join(
            _q_word(
                (w if i == len(pieces) - 1 else w + " ").encode(actual),
                declared or actual,
                raw8=draw(st.booleans()),
            )
            for i, w in enumerate(pieces)
        )
    cte = draw(st.sampled_from(["8bit", "base64", "quoted-printable"]))
    payload = body.encode(actual)
    if cte == "base64":
        payload = base64.encodebytes(payload)
    elif cte == "quoted-printable":
        payload = quopri.encodestring(payload)
    label = f"; charset={declared}" if declared else ""
    raw = mail(
        b"Subject: " + header + b"\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain" + label.encode() + b"\r\n"
        b"Content-Transfer-Encoding: " + cte.encode(),
        payload + b"\r\n",
    )
    if draw(st.booleans()):  # raw 8-bit bytes in a header the sender did not label
        raw = raw.replace(b"From: Carol", b"From: " + draw(st.sampled_from(words)).encode(actual))
    return raw, subject, body, right and declared == actual


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(charset_mails())
def test_mixed_charsets_never_raise_never_leak_and_round_trip(
    case: tuple[bytes, str, str, bool],
) -> None:
    raw, subject, body, truthful = case
    parsed = normalise(raw)
    headers = [parsed.subject, parsed.from_name, parsed.from_address, parsed.message_id]
    for value in (*headers, parsed.text, parsed.full_text, *(a.name for a in parsed.attachments)):
        value.encode("utf-8")  # raises on a lone surrogate
    assert all(no_escape(v) for v in headers)
    if truthful:
        assert parsed.subject == subject
        assert parsed.text == body
