"""Every failing case the fuzz campaign found, as a plain test with its literal input.

Each was a real bug, fixed in the product code with a comment saying why; these keep it
fixed whatever the fuzzer's seeds or strategies become.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from channels.sms.twilio import signature, signature_valid
from router.config import ConfigError, build_config, loads_config
from tests.peers_sms import TwilioEmulator
from tests.test_channel_sms import serve
from tests.test_channel_web import FakePipeline

URL = "https://example.com/sms"


def test_twilio_signature_header_with_raw_bytes_is_refused_not_raised() -> None:
    """aiohttp hands a header's non-UTF-8 bytes over as lone surrogates.

    Found: `X-Twilio-Signature: \\xff\\xfe` arrives as "\\udcff\\udcfe" and
    signature_valid raised UnicodeEncodeError, so the forged request got a 500 and a
    logged traceback instead of a 403.
    """
    assert signature_valid("token", URL, [("Body", "hi")], "\udcff\udcfe") is False


async def test_twilio_webhook_with_raw_bytes_in_the_signature_is_a_403(tmp_path: Path) -> None:
    """The same case over HTTP: the real channel answers 403 (it answered 500)."""
    emulator = await TwilioEmulator().start()
    try:
        async with serve(tmp_path, FakePipeline(), emulator) as (channel, base):
            reader, writer = await asyncio.open_connection("127.0.0.1", int(base.split(":")[-1]))
            body = b"Body=hi&From=%2B14155550123&MessageSid=SM1"
            writer.write(
                b"POST /sms HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"X-Twilio-Signature: \xff\xfe\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
            )
            await writer.drain()
            answer = await reader.read()
            writer.close()
            await writer.wait_closed()
            assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
            assert channel.counts["bad_signature"] == 1
    finally:
        await emulator.close()


def test_twilio_signature_of_text_with_a_lone_surrogate_does_not_raise() -> None:
    """Found: signature() raised UnicodeEncodeError on a lone surrogate in a parameter."""
    signed = signature("token", URL, [("id", "\ud8c5")])
    assert signed and signed.isascii()
    assert signature_valid("token", URL, [("id", "\ud8c5")], signed) is True
    assert signature_valid("token", URL, [("id", "x")], signed) is False


def test_secret_file_reference_with_a_nul_is_a_config_error() -> None:
    """Found: `file:m\\u0000issing` (valid TOML) raised ValueError from pathlib."""
    text = '[[adapters]]\ntype = "webhook"\nname = "w"\nsecret = "file:m\\u0000issing"\n'
    with pytest.raises(ConfigError) as caught:
        loads_config(text)
    paths = [issue.path for issue in caught.value.issues]
    assert "adapters[0].secret" in paths


def test_secret_file_reference_with_a_nul_in_a_dict_is_a_config_error() -> None:
    """The same case as the fuzzer found it, through build_config (nested, unknown keys)."""
    doc = {"classifier": {"secret": {"keywords": [{"x": "file:m\x00issing"}]}}}
    with pytest.raises(ConfigError) as caught:
        build_config(doc, source="fuzz.toml")
    assert all(issue.path for issue in caught.value.issues)


def test_include_pattern_with_a_nul_is_a_config_error() -> None:
    """Found by reading the same code path: glob raised ValueError on a NUL in a pattern."""
    with pytest.raises(ConfigError) as caught:
        loads_config('[daemon]\ninclude = ["conf.d\\u0000/*.toml"]\n')
    assert [issue.path for issue in caught.value.issues] == ["daemon.include[0]"]


@pytest.mark.parametrize("text", ['"', "a = [1,", "[daemon", 'a = "x\n'])
def test_toml_error_at_the_end_of_the_text_names_a_line(text: str) -> None:
    """Found: an error "at end of document" had neither a field nor a line."""
    with pytest.raises(ConfigError) as caught:
        loads_config(text)
    (issue,) = caught.value.issues
    assert issue.line is not None and issue.line >= 1, issue


def test_an_empty_table_name_is_named_in_the_error() -> None:
    """Found: `[""]` (valid TOML) gave "unknown setting" with an empty path."""
    text = '[daemon]\nshutdown_timeout = 20\n[""]\nhost = "127.0.0.1"\n'
    with pytest.raises(ConfigError) as caught:
        loads_config(text)
    assert [(i.path, i.message) for i in caught.value.issues] == [('""', "unknown setting")]
    with pytest.raises(ConfigError) as caught:
        build_config({"daemon": {"": 1}}, source="fuzz.toml")
    assert [i.path for i in caught.value.issues] == ['daemon.""']
