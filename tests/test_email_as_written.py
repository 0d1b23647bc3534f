"""Mail reads as its sender wrote it (issue 13): the defects found with malformed mail.

Every fixture is a minimal mail built here. No I/O: the normaliser, the SMTP builder
and the channel's last-line guard are pure.
"""

from __future__ import annotations

from channels.email.normalise import decode_bytes, normalise

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
