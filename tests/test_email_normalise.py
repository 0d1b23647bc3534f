"""The MIME normaliser against a corpus of hard mail and random input (no I/O, no server)."""

from __future__ import annotations

import base64
import hashlib
import os
from email.message import EmailMessage
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from channels.email import normalise as normalise_module
from channels.email.normalise import (
    MAX_FILENAME_BYTES,
    NormalisedMail,
    decode_bytes,
    decode_header_value,
    html_to_text,
    normalise,
    sanitise_filename,
    strip_quotes,
)

CORPUS = Path(__file__).parent / "email_corpus"


def load(name: str, **kwargs: Any) -> NormalisedMail:
    """Normalise one corpus file."""
    return normalise((CORPUS / name).read_bytes(), **kwargs)


def assert_clean(mail: NormalisedMail) -> None:
    """Every text field is storable UTF-8 (no surrogates) and single-line where it must be."""
    for value in (mail.text, mail.full_text, mail.subject, mail.from_name, mail.from_address):
        value.encode("utf-8")  # raises on lone surrogates
        assert "\x00" not in value
    for value in (mail.subject, mail.from_name, mail.from_address, mail.message_id):
        assert "\r" not in value and "\n" not in value
    for att in mail.attachments:
        att.name.encode("utf-8")
        assert "/" not in att.name and "\\" not in att.name and att.name not in ("", ".", "..")


# -- the corpus: every file ingests or names a reason ----------------------------------


def test_every_corpus_file_ingests_or_names_a_reason() -> None:
    files = sorted(CORPUS.glob("*.eml"))
    assert len(files) >= 20
    for path in files:
        mail = normalise(path.read_bytes())
        assert_clean(mail)
        assert mail.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        routable = not mail.noise_reason and not mail.reject_reason
        assert routable or mail.noise_reason or mail.reject_reason, path.name
        if routable:
            assert mail.text.strip(), path.name
            assert mail.from_address, path.name


def test_english_reply_strips_quote_and_signature_and_keeps_threading() -> None:
    mail = load("plain_en_reply.eml")
    assert mail.from_address == "alice@example.com"
    assert mail.from_name == "Alice Example"
    assert mail.text == "Still nothing arrived, please check again.\n\nThanks,\nAlice"
    assert "We received your message" in mail.full_text  # kept, only not routed
    assert mail.ticket == "T-01HZX5K2ABCDEF"
    assert mail.message_id == "<reply-1@mail.example.com>"
    assert mail.in_reply_to == "<ack-1@shop.test>"
    assert mail.references == ("<orig-1@mail.example.com>", "<ack-1@shop.test>")
    assert mail.thread_root == "<orig-1@mail.example.com>"
    assert mail.received_at is not None and mail.received_at.isoformat() == (
        "2024-05-14T08:20:30+00:00"
    )


def test_nested_multipart_prefers_plain_and_lists_inline_image_and_pdf() -> None:
    mail = load("nested_multipart.eml")
    assert mail.text == "The invoice total looks wrong."
    assert mail.body_source == "plain"
    names = {a.name: a for a in mail.attachments}
    assert set(names) == {"invoice.pdf", "inline-3.png"}
    pdf = names["invoice.pdf"]
    assert pdf.data == b"%PDF-1.4 fake invoice"
    assert pdf.sha256 == hashlib.sha256(b"%PDF-1.4 fake invoice").hexdigest()
    assert pdf.size == 21 and not pdf.inline
    image = names["inline-3.png"]
    assert image.inline and image.content_id == "<logo@x>" and image.mime_type == "image/png"


@pytest.mark.parametrize(
    ("name", "subject", "sender", "text"),
    [
        ("gbk_body.eml", "耳机坏了", "张三", "您好，我上周买的耳机坏了，要求退款。\n\n张先生"),
        ("big5_body.eml", "訂單查詢", "陳小姐", "您好，我的訂單何時到貨？請儘快回覆。"),
        # declared gb2312, written in Big5; subject raw 8-bit GBK without RFC 2047
        ("wrong_charset.eml", "退款申请", "", "請問我的退款何時到帳？"),
        ("missing_charset.eml", "Café order", "", "My café order was cold — très déçu."),
        ("unknown_charset.eml", "Hello", "", "我想咨询一下会员积分。"),
    ],
)
def test_chinese_and_broken_charsets_decode(
    name: str, subject: str, sender: str, text: str
) -> None:
    mail = load(name)
    assert mail.subject == subject
    assert mail.from_name == sender
    assert mail.text == text


def test_rfc2047_subject_with_mixed_charsets() -> None:
    mail = load("rfc2047_subject.eml")
    assert mail.subject == "订单 réclamation ✓"
    assert mail.from_name == "李四"


def test_html_only_drops_scripts_styles_and_fetches_nothing() -> None:
    mail = load("html_only_script.eml")
    assert mail.body_source == "html"
    assert "Hello team," in mail.text
    assert "My account is locked & I can't log in." in mail.text
    for banned in ("alert", "document.cookie", "color:red", "evil.test", "tracker.test", "<"):
        assert banned not in mail.text
    assert "- one" in mail.text and "- two" in mail.text


def test_html_to_text_handles_unclosed_and_nested_skips() -> None:
    assert html_to_text("<script>a<b>x</b></script><style>s</style>visible") == "visible"
    assert html_to_text("<p>a<br>b</p><style>x") == "a\nb"
    assert html_to_text("&lt;b&gt; &#x4e2d;&#25991;") == "<b> 中文"


def test_attachment_names_are_sanitised() -> None:
    mail = load("path_filenames.eml")
    names = [a.name for a in mail.attachments]
    assert names[0] == "passwd"
    assert names[1] == "evil.bat" or names[1].endswith(".bat")
    assert "\x01" not in names[1] and "\\" not in names[1]
    assert names[2] == "发票fdp.exe"  # the right-to-left override that disguised .exe is gone
    assert names[3] == "attachment-5.bin"  # ".." is not a name
    assert names[4].endswith(".txt") and len(names[4].encode()) <= MAX_FILENAME_BYTES


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("../../etc/passwd", "passwd"),
        ("..\\..\\boot.ini", "boot.ini"),
        ("/abs/path/x.txt", "x.txt"),
        ("a\x00b\x1fc\x7f\x85.txt", "abc.txt"),
        ("  .hidden  ", "hidden"),
        ("...", "fallback"),
        ("", "fallback"),
        ("x" * 300 + ".pdf", "x" * (MAX_FILENAME_BYTES - 4) + ".pdf"),
        ("報告\u202egnp.exe", "報告gnp.exe"),
    ],
)
def test_sanitise_filename(raw: str, expected: str) -> None:
    assert sanitise_filename(raw, "fallback") == expected


def test_missing_from_is_kept_with_a_reason() -> None:
    mail = load("missing_date_from.eml")
    assert mail.reject_reason == "no_sender_address"
    assert mail.from_address == ""
    assert mail.received_at is None
    assert mail.text == "Who am I?"


def test_missing_date_and_message_id() -> None:
    mail = load("missing_date.eml")
    assert not mail.reject_reason and not mail.noise_reason
    assert mail.received_at is None and mail.message_id == ""
    assert mail.thread_root == ""


def test_bare_cr_header_lines() -> None:
    mail = load("bare_cr_headers.eml")
    assert mail.from_address == "ivy@example.com"
    assert mail.subject == "bare CR header"
    assert mail.message_id == "<cr-1@example.com>"
    assert mail.text == "Body after bare CRs."


def test_broken_headers_and_unclosed_boundary_do_not_crash() -> None:
    mail = load("broken_headers.eml")
    assert mail.from_address == "jack@example.com"
    assert mail.message_id == ""  # "not-a-valid-id" is not a msg-id
    assert mail.received_at is None
    assert mail.text == "Body with a broken MIME tree."
    assert "CloseBoundaryNotFoundDefect" in mail.defects


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("auto_reply.eml", "auto_submitted:auto-replied"),
        ("dsn_bounce.eml", "delivery_report"),
        ("list_mail.eml", "mailing_list"),
        ("precedence_bulk.eml", "precedence:bulk"),
        ("null_return_path.eml", "null_return_path"),
    ],
)
def test_noise_is_flagged(name: str, reason: str) -> None:
    assert load(name).noise_reason == reason


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"Auto-Submitted": "no"}, ""),
        ({"Auto-Submitted": "auto-generated"}, "auto_submitted:auto-generated"),
        ({"X-Autorespond": "1"}, "x_autorespond"),
        ({"Precedence": "junk"}, "precedence:junk"),
        ({"Precedence": "first-class"}, ""),
        ({"From": "MAILER-DAEMON@example.com"}, "from_mailer-daemon"),
    ],
)
def test_noise_headers(headers: dict[str, str], reason: str) -> None:
    msg = EmailMessage()
    msg["From"] = headers.pop("From", "a@example.com")
    for key, value in headers.items():
        msg[key] = value
    msg.set_content("hi")
    assert normalise(msg.as_bytes()).noise_reason == reason


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("outlook_quote_zh.eml", "已经三天了还没有人处理我的投诉。"),
        ("zh_wrote.eml", "还是没有收到货。"),
        ("original_message.eml", "Please cancel it."),
        ("only_quotes.eml", "> quoted line only\n> another"),  # nothing new: keep it all
    ],
)
def test_quoted_replies_are_stripped(name: str, text: str) -> None:
    assert load(name).text == text


def test_ticket_token_in_subject() -> None:
    mail = load("zh_wrote.eml")
    assert mail.ticket == "T-01ABCDEF"
    assert mail.thread_root == "<ack-9@shop.test>"


def test_strip_quotes_keeps_plain_text() -> None:
    assert strip_quotes("a\n\n\n\nb   c\t d") == "a\n\nb c d"
    assert strip_quotes("On the other hand, I wrote: nothing") == (
        "On the other hand, I wrote: nothing"
    )


# -- size caps --------------------------------------------------------------------------


def big_mail(attachment: bytes) -> bytes:
    """Return a mail with a short text and one large attachment."""
    msg = MIMEMultipart()
    msg["From"] = "big@example.com"
    msg["Subject"] = "big file"
    msg["Message-ID"] = "<big@example.com>"
    msg.attach(MIMEText("Here is the log file.", "plain", "utf-8"))
    part = MIMEApplication(attachment, "octet-stream")
    part.add_header("Content-Disposition", "attachment", filename="server.log")
    msg.attach(part)
    return msg.as_bytes()


@pytest.fixture(scope="module")
def mail_25mb() -> bytes:
    """A mail with a 25 MB attachment, built in memory (not committed)."""
    return big_mail(os.urandom(25 * 1000 * 1000))


def test_25mb_attachment_within_caps_is_kept_whole(mail_25mb: bytes) -> None:
    mail = normalise(
        mail_25mb, max_message_bytes=40 * 1024 * 1024, max_attachment_bytes=25 * 1024 * 1024
    )
    assert not mail.truncated
    assert mail.text == "Here is the log file."
    (att,) = mail.attachments
    assert att.size == 25 * 1000 * 1000 and att.complete and att.data is not None
    assert att.sha256 == hashlib.sha256(att.data).hexdigest()


def test_attachment_over_its_cap_is_listed_without_bytes(mail_25mb: bytes) -> None:
    mail = normalise(mail_25mb, max_attachment_bytes=1024 * 1024)
    (att,) = mail.attachments
    assert att.size == 25 * 1000 * 1000 and att.data is None and att.complete
    assert len(att.sha256) == 64


def test_oversize_message_is_accepted_truncated_with_a_flag(mail_25mb: bytes) -> None:
    mail = normalise(mail_25mb, max_message_bytes=1024 * 1024)
    assert mail.truncated and mail.size == len(mail_25mb)
    assert mail.text.startswith("Here is the log file.")
    assert "[message truncated" in mail.text
    (att,) = mail.attachments
    assert not att.complete and att.data is None
    # A prefix fetched from the server counts as truncated too.
    prefix = normalise(mail_25mb[:2048], original_size=len(mail_25mb))
    assert prefix.truncated and prefix.size == len(mail_25mb)


def test_text_is_capped() -> None:
    msg = EmailMessage()
    msg["From"] = "a@example.com"
    msg.set_content("x " * 100_000)
    assert len(normalise(msg.as_bytes(), max_text_chars=1000).text) == 1000


# -- charsets ---------------------------------------------------------------------------


@pytest.mark.parametrize("declared", [None, "gb2312", "gbk", "utf-8", "us-ascii", "bogus"])
def test_gbk_and_big5_decode_under_any_label(declared: str | None) -> None:
    assert decode_bytes("我的订单没到，请尽快处理".encode("gbk"), declared) == (
        "我的订单没到，请尽快处理"
    )
    assert decode_bytes("請問我的訂單何時到？".encode("big5"), declared) == "請問我的訂單何時到？"


def test_gb18030_four_byte_characters_under_gb2312_label() -> None:
    assert decode_bytes("𠀀 and 中".encode("gb18030"), "gb2312") == "𠀀 and 中"


def test_latin1_label_on_utf8_bytes_and_real_latin1() -> None:
    assert decode_bytes("Größe".encode(), "iso-8859-1") == "Größe"
    assert decode_bytes("Größe".encode("latin-1"), "iso-8859-1") == "Größe"


def test_hostile_codec_names_are_refused() -> None:
    assert decode_bytes(b"\\ud800 x", "unicode_escape").encode("utf-8")
    assert decode_bytes(b"6869", "hex") == "6869"
    assert decode_bytes(b"aGk=", "base64") == "aGk="


def test_header_decoding() -> None:
    assert decode_header_value("=?utf-8?q?a=0D=0Ab?=") == "a b"  # no CRLF injection via 2047
    assert decode_header_value("x\r\n\ty") == "x y"
    assert decode_header_value(None) == ""
    assert decode_header_value("=?gbk?B?" + base64.b64encode("中文".encode("gbk")).decode() + "?=")


# -- properties -------------------------------------------------------------------------

_HEADER_NAMES = st.sampled_from(
    [
        "From",
        "To",
        "Subject",
        "Date",
        "Message-ID",
        "References",
        "In-Reply-To",
        "Content-Type",
        "Content-Transfer-Encoding",
        "Content-Disposition",
        "Auto-Submitted",
        "Return-Path",
        "X-Anything",
    ]
)
_CHARSETS = st.sampled_from(
    ["utf-8", "gbk", "gb2312", "big5", "gb18030", "latin-1", "us-ascii", "bogus", "utf-7", ""]
)
_CTYPES = st.sampled_from(
    [
        "text/plain",
        "text/html",
        "image/png",
        "application/octet-stream",
        "message/rfc822",
        "message/delivery-status",
        "signature/plain",
        "text/x-weird",
    ]
)
_ENCODINGS = st.sampled_from(["7bit", "8bit", "base64", "quoted-printable", "x-uuencode", "bogus"])
_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=200
) | st.sampled_from(["您好 退款", "請問 訂單", "On Mon wrote:", "> q", "-- ", "<script>x</script>"])


def _leaf(draw: Any) -> bytes:
    """Draw one leaf part as raw bytes."""
    ctype = draw(_CTYPES)
    charset = draw(_CHARSETS)
    encoding = draw(_ENCODINGS)
    body_text = draw(_TEXT)
    codec = {"": "utf-8", "bogus": "utf-8", "utf-7": "utf-7"}.get(charset, charset)
    try:
        body = body_text.encode(codec, errors="replace")
    except LookupError:
        body = body_text.encode("utf-8")
    if encoding == "base64" and draw(st.booleans()):
        body = base64.b64encode(body)
    if draw(st.booleans()):
        body = draw(st.binary(max_size=64)) + body
    head = f"Content-Type: {ctype}" + (f"; charset={charset}" if charset else "")
    head += f"\r\nContent-Transfer-Encoding: {encoding}"
    if draw(st.booleans()):
        name = draw(st.text(max_size=40)).replace("\r", "").replace("\n", "")
        disposition = draw(st.sampled_from(["attachment", "inline", "x"]))
        head += f'\r\nContent-Disposition: {disposition}; filename="{name}"'
    return head.encode("utf-8", "surrogatepass") + b"\r\n\r\n" + body


@st.composite
def mime_trees(draw: Any, depth: int = 0) -> bytes:
    """Draw a random (often broken) MIME tree."""
    if depth >= 3 or draw(st.integers(0, 2)) == 0:
        return _leaf(draw)
    boundary = draw(st.sampled_from(["b1", "b2", "=_x", "same", ""]))
    subtype = draw(st.sampled_from(["mixed", "alternative", "related", "report", "signed"]))
    children = draw(st.lists(mime_trees(depth=depth + 1), min_size=0, max_size=4))
    parts = b"".join(b"--" + boundary.encode() + b"\r\n" + c + b"\r\n" for c in children)
    closing = b"--" + boundary.encode() + b"--\r\n" if draw(st.booleans()) else b""
    return (
        f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n\r\n'.encode()
        + parts
        + closing
    )


@st.composite
def mails(draw: Any) -> bytes:
    """Draw a random mail: random headers over a random MIME tree."""
    headers = b""
    for _ in range(draw(st.integers(0, 8))):
        name = draw(_HEADER_NAMES)
        value = draw(st.one_of(st.text(max_size=80), st.binary(max_size=80)))
        raw_value = value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")
        sep = draw(st.sampled_from([b"\r\n", b"\n", b"\r"]))
        headers += name.encode() + b": " + raw_value + sep
    return headers + draw(mime_trees())


def _assert_no_escape(raw: bytes, **kwargs: Any) -> None:
    mail = normalise(raw, **kwargs)
    assert isinstance(mail, NormalisedMail)
    assert_clean(mail)
    for att in mail.attachments:
        assert len(att.sha256) == 64


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_random_bytes_never_raise(raw: bytes) -> None:
    _assert_no_escape(raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mails(), st.integers(min_value=64, max_value=1 << 16))
def test_random_mime_trees_never_raise(raw: bytes, cap: int) -> None:
    _assert_no_escape(raw, max_message_bytes=cap, max_attachment_bytes=cap // 2)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=256), st.sampled_from(["gbk", "big5", "utf-8", "x", "hex", None]))
def test_decode_bytes_gives_storable_text_for_any_bytes(data: bytes, declared: str | None) -> None:
    text = decode_bytes(data, declared)
    text.encode("utf-8")  # no lone surrogates
    assert "\x00" not in text


# UTF-8 under a label that is missing, unknown, a byte transform, Chinese or permissive
# (mislabelled mail): valid UTF-8 wins over all of them.
UTF8_LABELS = [None, "utf-8", "UTF8", "us-ascii", "gbk", "gb2312", "big5", "x", "hex", "latin-1"]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200), st.sampled_from(UTF8_LABELS))
def test_decode_bytes_gives_back_utf8_text(text: str, declared: str | None) -> None:
    assert decode_bytes(text.encode("utf-8"), declared) == text.replace("\x00", "")


# Phrases of common characters (GB2312 and Big5 level 1), as customers write them.
HANS = ["我的订单", "还没有到", "请尽快处理", "退款", "客服", "谢谢", "质量太差了", "什么时候发货"]
HANT = ["請問", "我的訂單", "何時到", "退款", "客服", "謝謝", "品質太差", "什麼時候出貨"]
GLUE = ["，", "。", "？", "！", " ", "Order 12", "ok"]


def _phrases(words: list[str]) -> st.SearchStrategy[str]:
    """Return texts made of `words` and punctuation, at least one word."""
    pieces = st.lists(st.sampled_from(words + GLUE), max_size=12)
    return st.tuples(st.sampled_from(words), pieces).map(lambda wp: wp[0] + "".join(wp[1]))


def _valid_utf8(data: bytes) -> bool:
    """Tell whether bytes also decode as UTF-8 (then UTF-8 wins, by design)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.tuples(
            _phrases(HANS),
            st.sampled_from(["gbk", "gb18030"]),
            st.sampled_from([None, "gbk", "gb2312", "GB18030", "x-gbk"]),
        ),
        st.tuples(_phrases(HANT), st.just("big5"), st.sampled_from(["big5", "x-big5"])),
    )
)
def test_decode_bytes_gives_back_gbk_and_big5_text(case: tuple[str, str, str | None]) -> None:
    text, charset, declared = case
    data = text.encode(charset)
    assume(not _valid_utf8(data))
    assert decode_bytes(data, declared) == text


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_sanitise_filename_property(name: str) -> None:
    out = sanitise_filename(name)
    assert out and "/" not in out and "\\" not in out and out not in (".", "..")
    assert len(out.encode("utf-8")) <= MAX_FILENAME_BYTES
    assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in out)


# -- header parameters: bounded, so a header of thousands costs nothing ----------------


def _params(n: int, name: str = "p") -> str:
    return "".join(f"; {name}{i}=v{i}" for i in range(n))


def test_thousands_of_content_type_parameters_are_cut_and_the_first_ones_read() -> None:
    body = "你好，我的订单还没到。".encode("gbk")
    raw = (
        b"From: a@example.com\r\nSubject: x\r\nContent-Type: text/plain; charset=gbk"
        + _params(10_000).encode()
        + b"\r\n\r\n"
        + body
    )
    mail = normalise(raw)
    assert mail.text == "你好，我的订单还没到。"  # charset, the first parameter, still read
    assert f"header_parameters_cut:{normalise_module.MAX_HEADER_PARAMS}" in mail.defects
    assert_clean(mail)
    for compat in (False, True):  # both parsing policies see the cut header
        part = normalise_module._parse(normalise_module._sanitise_raw(raw), compat)
        assert part.get_param("charset") == "gbk"
        assert len(part.get_params()) == normalise_module.MAX_HEADER_PARAMS + 1


def test_a_huge_disposition_keeps_the_file_name_of_each_part() -> None:
    parts = "".join(
        f"--B\r\nContent-Type: text/plain\r\nContent-Disposition: attachment; "
        f"filename=a{k}.txt{_params(3000, 'q')}\r\n\r\nbody {k}\r\n"
        for k in range(20)
    )
    raw = (
        "From: a@example.com\r\nSubject: x\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
        "hi\r\n" + parts + "--B--\r\n"
    ).encode()
    mail = normalise(raw)
    assert [a.name for a in mail.attachments] == [f"a{k}.txt" for k in range(20)]
    assert any(d.startswith("header_parameters_cut") for d in mail.defects)


def test_a_value_cut_by_length_leaves_out_the_parameter_it_cut() -> None:
    raw = (
        'From: a@example.com\r\nContent-Type: text/plain; charset=utf-8; name="'
        + "a" * 6000
        + '"\r\n\r\nhello'
    ).encode()
    part = normalise_module._parse(raw, False)
    assert part.get_param("charset") == "utf-8" and part.get_param("name") is None
    assert normalise(raw).text == "hello"


def test_a_long_rfc2231_file_name_within_the_bounds_is_untouched() -> None:
    name = "季度报告-" * 12 + ".pdf"
    msg = EmailMessage()
    msg["From"] = "a@example.com"
    msg.set_content("see attached")
    msg.add_attachment(b"%PDF-1.4", maintype="application", subtype="pdf", filename=name)
    mail = normalise(msg.as_bytes())
    assert [a.name for a in mail.attachments] == [name]
    assert not any(d.startswith("header_parameters_cut") for d in mail.defects)


# -- MIME depth: parts nested too deep are cut before parsing ---------------------------


def _nested(depth: int, boundary: str | None = None) -> bytes:
    levels = "".join(
        f"Content-Type: multipart/mixed; boundary={boundary or f'b{i}'}\r\n\r\n"
        f"--{boundary or f'b{i}'}\r\n"
        for i in range(depth)
    )
    return ("From: Dana <dana@example.com>\r\nSubject: deep\r\n" + levels).encode() + (
        b"Content-Type: text/plain\r\n\r\nthe innermost text\r\n"
    )


@pytest.mark.parametrize("boundary", [None, "same"])
def test_parts_nested_too_deep_are_cut_and_the_sender_kept(boundary: str | None) -> None:
    limit = normalise_module.MAX_MIME_DEPTH
    mail = normalise(_nested(10 * limit, boundary))
    assert f"mime_too_deep:{limit}" in mail.defects and mail.truncated
    assert mail.body_source != "fallback"  # parsed, not given up on (RecursionError before)
    assert (mail.from_address, mail.subject) == ("dana@example.com", "deep")
    assert_clean(mail)


def test_nesting_within_the_limit_is_read_whole() -> None:
    mail = normalise(_nested(normalise_module.MAX_MIME_DEPTH))
    assert mail.text == "the innermost text"
    assert not any(d.startswith("mime_too_deep") for d in mail.defects)


def test_many_shallow_multiparts_are_not_too_deep() -> None:
    # More declared boundaries than the depth limit, two levels deep: a digest.
    parts = "".join(
        f"--outer\r\nContent-Type: multipart/alternative; boundary=in{k}\r\n\r\n"
        f"--in{k}\r\nContent-Type: text/plain\r\n\r\nplain {k}\r\n--in{k}--\r\n"
        for k in range(3 * normalise_module.MAX_MIME_DEPTH)
    )
    raw = (
        "From: a@example.com\r\nContent-Type: multipart/mixed; boundary=outer\r\n\r\n"
        + parts
        + "--outer--\r\n"
    ).encode()
    assert normalise_module._cut_too_deep(raw) is None
    mail = normalise(raw)
    assert "plain 0" in mail.full_text and "plain 191" in mail.full_text
    assert not mail.truncated


def test_a_huge_html_body_is_read_only_as_far_as_the_text_kept() -> None:
    html = "".join(f"<p>line {i} of <b>a long</b> report</p>" for i in range(80_000))
    assert len(html) > 2 * normalise_module._HTML_CHUNK
    raw = b"From: a@example.com\r\nContent-Type: text/html\r\n\r\n" + html.encode()
    mail = normalise(raw, max_text_chars=1000)
    # Exactly what reading the whole document gives, cut where normalise cuts it.
    whole = normalise_module.fold_whitespace(html_to_text(html))
    assert mail.full_text == whole[: 4 * 1000] and mail.body_source == "html"
    limited = html_to_text(html, 8000)
    assert 8000 <= len(limited) < len(whole) and whole.startswith(limited[:8000])
