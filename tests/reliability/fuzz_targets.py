"""Fuzz targets shared by tests/reliability/test_fuzz.py (CI) and bench/reliability/fuzz.py.

Each `Target` pairs a hypothesis strategy with a `check` that feeds one generated case
to a parser that faces untrusted input and asserts its contract: the documented error
(if any) is the only exception allowed, plus a few properties that would otherwise be
silent data damage (lone surrogates that cannot be stored as UTF-8, texts over their
cap, an action attributed to another agent). Anything else escaping `check` is a bug.

`check` returns a short outcome tag ("ok", "rejected", "fallback", ...) so the bench can
show what share of the cases reached the deep paths rather than the first guard.
"""

from __future__ import annotations

import atexit
import base64
import json
import quopri
import re
import shutil
import string
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import structlog
from hypothesis import strategies as st

from adapters.webhook import sign, verify_signature
from channels.email.authres import dmarc_domains, sender_verified
from channels.email.normalise import TRUNCATION_NOTE, normalise
from channels.sms.common import clean_text, e164, keyword_of, split_segments
from channels.sms.twilio import signature, signature_algorithm, signature_valid
from channels.telegram import split_message, utf16_units
from channels.web import WebChannel, WebConfig, parse_body
from channels.web_guard import Rejected
from router.actions import ActionError, parse_action
from router.config import Config, ConfigError, build_config, loads_config
from router.drivers import DriverContext
from router.lifecycle import parse_score
from router.logging import clear_secrets

LONE_SURROGATE = re.compile("[\udc80-\udcff]")
ANY_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Target:
    """One parser under fuzz: what to generate, how to judge one case, its share of cases."""

    name: str
    strategy: st.SearchStrategy[Any]
    check: Callable[[Any], str]
    weight: int  # relative share of the campaign's cases (CI and bench alike)
    # For a tuple case, the indices the mutator may edit: the untrusted input, not the
    # caller's own settings (a cap, a limit, a clock). None: any part.
    mutable: tuple[int, ...] | None = None


# -- shared text pieces ---------------------------------------------------------------

SAMPLES = (
    "您好，我的订单还没到，请退款",
    "請問訂單什麼時候出貨？",
    "Здравствуйте, где мой заказ?",
    "Grüße aus Köln — café, naïve",
    "Where is my parcel? Order #1234",
    "😀 emoji 👍🏽 and 🇩🇪 flags",
    "On Mon, Dana wrote:\n> old text\n-- \nsig",
    "<p>Hello <b>world</b><script>x()</script></p>",
    "",
)
# Text with no surrogates (the mail itself is bytes; texts only seed those bytes).
TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=80) | st.sampled_from(
    SAMPLES
)
# Text as a hostile JSON or transport layer can hand it over: lone surrogates included.
WILD_TEXT = st.text(max_size=60) | st.text(
    alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF) | st.sampled_from("a\r\n "),
    max_size=8,
)


# -- 1. the MIME normaliser -----------------------------------------------------------

CHARSETS = (
    "utf-8",
    "gb18030",
    "gb2312",
    "gbk",
    "big5",
    "iso-8859-1",
    "utf-7",
    "koi8-r",
    "us-ascii",
    "utf-16",
    "x-bogus",
    "unicode-1-1-utf-7",
    "",
    "utf-8\x00",
    '"utf-8"',
    "hz-gb-2312",
)
# What the bytes really are: a subset of the above that Python can encode.
ACTUAL = ("utf-8", "gb18030", "big5", "iso-8859-1", "utf-7", "koi8-r", "utf-16")
NEWLINES = (b"\r\n", b"\n", b"\r")


def _encode(text: str, charset: str) -> bytes:
    """Encode text in charset, replacing what it cannot hold (that is what senders do)."""
    return text.encode(charset, "replace")


@st.composite
def encoded_words(draw: st.DrawFn) -> bytes:
    """Return one RFC 2047 encoded word: valid, or broken the ways real mailers break them."""
    text = draw(TEXT)
    actual = draw(st.sampled_from(ACTUAL))
    declared = draw(st.sampled_from((actual, *CHARSETS)))
    data = _encode(text, actual)
    kind = draw(st.sampled_from(["b", "q", "bad_b64", "raw_q", "unterminated", "empty"]))
    label = declared.encode("latin-1", "replace")
    if kind == "b":
        return b"=?" + label + b"?B?" + base64.b64encode(data) + b"?="
    if kind == "q":
        return b"=?" + label + b"?Q?" + quopri.encodestring(data, header=True) + b"?="
    if kind == "bad_b64":
        junk = draw(st.binary(max_size=12)).replace(b"?", b"")
        return b"=?" + label + b"?B?" + base64.b64encode(data)[:-1] + junk + b"?="
    if kind == "raw_q":
        return b"=?" + label + b"?Q?" + data.replace(b"?", b"=3F") + b"?="
    if kind == "unterminated":
        return b"=?" + label + b"?B?" + base64.b64encode(data)
    return b"=?" + label + b"?Q??="


@st.composite
def header_values(draw: st.DrawFn) -> bytes:
    """Return a header value: raw 8-bit text, encoded words, random bytes, or a mix."""
    pieces = draw(
        st.lists(
            st.one_of(
                st.builds(_encode, TEXT, st.sampled_from(ACTUAL)),
                encoded_words(),
                st.binary(max_size=20),
                st.sampled_from([b" ", b"\r\n ", b"\n\t", b"\r", b'"', b"<", b">", b";"]),
            ),
            max_size=5,
        )
    )
    return b"".join(pieces)


@st.composite
def from_values(draw: st.DrawFn) -> bytes:
    """Return a From value: a display name (often encoded) and an address, or junk."""
    name = draw(header_values())
    local = draw(st.sampled_from([b"dana", b"wei.li", b"", b"a+b", "王".encode(), b"x\xff"]))
    host = draw(st.sampled_from([b"example.com", b"", b"[127.0.0.1]", b"xn--fsq.com", b"a..b"]))
    form = draw(st.sampled_from(["angle", "bare", "quoted", "junk", "group"]))
    if form == "angle":
        return name + b" <" + local + b"@" + host + b">"
    if form == "bare":
        return local + b"@" + host
    if form == "quoted":
        return b'"' + name + b'" <' + local + b"@" + host + b">"
    if form == "group":
        return b"undisclosed:" + local + b"@" + host + b";"
    return draw(st.binary(max_size=40))


@st.composite
def content_types(draw: st.DrawFn, multipart: bool, boundary: bytes = b"") -> bytes:
    """Return a Content-Type value, with or without its `;`, charset or boundary."""
    if multipart:
        subtype = draw(st.sampled_from([b"mixed", b"alternative", b"related", b"report", b"x"]))
        form = draw(st.sampled_from(["good", "no_semicolon", "no_boundary", "quoted", "empty"]))
        if form == "good":
            return b"multipart/" + subtype + b'; boundary="' + boundary + b'"'
        if form == "no_semicolon":
            return b"multipart/" + subtype + b" boundary=" + boundary
        if form == "no_boundary":
            return b"multipart/" + subtype
        if form == "quoted":
            return b"multipart/" + subtype + b'; boundary="' + boundary
        return b"multipart/" + subtype + b'; boundary=""'
    mime = draw(
        st.sampled_from(
            [
                b"text/plain",
                b"text/html",
                b"text/enriched",
                b"application/pdf",
                b"image/png",
                b"message/rfc822",
                b"text",
                b"",
                b"TEXT/PLAIN",
                b"text/plain/extra",
            ]
        )
    )
    charset = draw(st.sampled_from(CHARSETS)).encode("latin-1", "replace")
    form = draw(st.sampled_from(["good", "no_semicolon", "none", "name", "junk_param"]))
    if form == "good":
        return mime + b"; charset=" + charset
    if form == "no_semicolon":
        return mime + b" charset=" + charset
    if form == "name":
        return mime + b"; name=" + draw(header_values())
    if form == "junk_param":
        return mime + b"; " + draw(st.binary(max_size=16))
    return mime


@st.composite
def leaf_parts(draw: st.DrawFn) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Return the headers and body of one non-multipart part, declared charset ≠ actual."""
    headers = [(b"Content-Type", draw(content_types(multipart=False)))]
    text = draw(TEXT)
    body = _encode(text, draw(st.sampled_from(ACTUAL)))
    encoding = draw(st.sampled_from([b"", b"7bit", b"8bit", b"base64", b"quoted-printable", b"x"]))
    if encoding:
        headers.append((b"Content-Transfer-Encoding", encoding))
    if encoding == b"base64":
        body = base64.encodebytes(body)
        if draw(st.booleans()):
            body = body[: draw(st.integers(0, len(body)))] + draw(st.binary(max_size=6))
    elif encoding == b"quoted-printable":
        body = quopri.encodestring(body)
    if draw(st.integers(0, 3)) == 0:
        disposition = draw(st.sampled_from([b"attachment", b"inline", b"bogus"]))
        headers.append(
            (b"Content-Disposition", disposition + b"; filename=" + draw(header_values()))
        )
    if draw(st.integers(0, 4)) == 0:
        body = draw(st.binary(max_size=64)) + body
    return headers, body


@st.composite
def parts(draw: st.DrawFn, depth: int = 0) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Return a part: a leaf, or a multipart tree whose boundaries may be wrong or missing."""
    if depth >= 3 or draw(st.integers(0, 2)) == 0:
        return draw(leaf_parts())
    boundary = draw(st.sampled_from([b"b1", b"b2", b"=_x", b"same", b"", b"a b", b"\xff"]))
    headers = [(b"Content-Type", draw(content_types(multipart=True, boundary=boundary)))]
    children = draw(st.lists(parts(depth=depth + 1), max_size=4))
    # The boundary the body actually uses: usually the declared one, sometimes not.
    used = boundary if draw(st.integers(0, 3)) else draw(st.sampled_from([b"b1", b"other", b""]))
    chunks = [draw(st.sampled_from([b"", b"preamble\r\n"]))]
    for child_headers, child_body in children:
        chunks.append(b"--" + used + b"\r\n" + _head(child_headers, b"\r\n") + b"\r\n")
        chunks.append(child_body + b"\r\n")
    if draw(st.booleans()):
        chunks.append(b"--" + used + b"--\r\n")
    return headers, b"".join(chunks)


def _head(headers: list[tuple[bytes, bytes]], newline: bytes) -> bytes:
    """Render header lines with one newline style."""
    return b"".join(name + b": " + value + newline for name, value in headers)


@st.composite
def mails(draw: st.DrawFn) -> bytes:
    """Return one raw mail: a hostile but mail-shaped message, or plain random bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=400))
    headers: list[tuple[bytes, bytes]] = []
    if draw(st.integers(0, 9)):
        headers.append((b"From", draw(from_values())))
    for name in (b"Subject", b"Message-ID", b"In-Reply-To", b"References", b"Date", b"To"):
        if draw(st.booleans()):
            headers.append((name, draw(header_values())))
    if draw(st.integers(0, 4)) == 0:
        headers.append(
            (
                draw(st.sampled_from([b"Auto-Submitted", b"Precedence", b"List-Id", b"X-\xff"])),
                draw(header_values()),
            )
        )
    part_headers, body = draw(parts())
    headers.extend(part_headers)
    draw(st.randoms(use_true_random=False)).shuffle(headers)
    newline = draw(st.sampled_from(NEWLINES))
    head = _head(headers, newline)
    if draw(st.integers(0, 3)) == 0:
        # Mixed line endings inside the head, as broken gateways write them.
        head = b"".join(
            line + draw(st.sampled_from(NEWLINES)) for line in head.split(newline) if line
        )
    return head + newline + body


def check_normalise(case: tuple[bytes, int, int]) -> str:
    """Normalise never raises; its fields hold no lone surrogates; text keeps its cap."""
    raw, max_text_chars, max_message_bytes = case
    mail = normalise(raw, max_text_chars=max_text_chars, max_message_bytes=max_message_bytes)
    fields = {
        "from_address": mail.from_address,
        "from_name": mail.from_name,
        "subject": mail.subject,
        "text": mail.text,
        **{f"attachment[{i}].name": a.name for i, a in enumerate(mail.attachments)},
    }
    for field, value in fields.items():
        assert not LONE_SURROGATE.search(value), f"lone surrogate in {field}: {value!r}"
    note = TRUNCATION_NOTE.format(size=mail.size)
    cap = max_text_chars + (len("\n\n" + note) if mail.truncated else 0)
    assert len(mail.text) <= cap, f"text is {len(mail.text)} chars, cap {cap}"
    return "fallback" if mail.body_source == "fallback" else "ok"


NORMALISE = Target(
    "email.normalise",
    st.tuples(
        mails(),
        st.sampled_from([1, 20, 200, 50_000]),
        st.sampled_from([40 * 1024 * 1024, 4096, 256, 64]),
    ),
    check_normalise,
    weight=3,
    mutable=(0,),
)


# -- 2. agent actions -----------------------------------------------------------------

AGENT_IDS = st.sampled_from(["alice", "bo", "", "ag-1", "王"]) | st.text(max_size=12)
_JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | WILD_TEXT


def _json_containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Return JSON arrays and objects of inner (a named function: hypothesis reads the
    source of an `extend` lambda to check it recurses, which fails on a wrapped lambda)."""
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)


JSON_VALUES = st.recursive(_JSON_SCALARS, _json_containers, max_leaves=12)
ACTION_VALUES = st.sampled_from(
    ["on", "away", "off", "inquiry", "complaint", "suggestion", "agent:bo", "queue:vip", "queue:"]
)


VALID_ACTIONS = (
    {"action": "accept", "conversation_id": "c1"},
    {"action": "resolve", "message_id": "m1"},
    {"action": "presence", "value": "away"},
    {"action": "reply", "conversation_id": "c1", "value": "您好，已退款"},
    {"action": "relabel", "message_id": "m1", "value": "complaint"},
    {"action": "transfer", "conversation_id": "c1", "value": "queue:vip", "note": "x"},
)


@st.composite
def action_payloads(draw: st.DrawFn, agent_id: str) -> Any:
    """Return an action payload: mostly a JSON object near the schema, sometimes anything."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=80))
    if kind == 1:
        return draw(st.none() | st.integers() | st.text(max_size=10) | st.just(bytearray(b"{}")))
    if kind >= 7:  # a valid action, so mutations start from payloads that get through
        valid = draw(st.sampled_from(VALID_ACTIONS))
        return json.dumps({**valid, "agent_id": agent_id} if kind == 9 else valid).encode()
    body: dict[str, Any] = {}
    body["action"] = draw(
        st.sampled_from(["accept", "resolve", "presence", "reply", "relabel", "transfer"])
        | JSON_VALUES
    )
    for key in ("conversation_id", "message_id", "value", "agent_id"):
        if draw(st.booleans()):
            body[key] = draw(ACTION_VALUES | st.just(agent_id) | st.text(max_size=70) | JSON_VALUES)
    body.update(draw(st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=2)))
    text = json.dumps(body, ensure_ascii=draw(st.booleans()), allow_nan=True)
    if kind == 2:
        text = text[: draw(st.integers(0, len(text)))]
    return text.encode("utf-8", "surrogatepass")


def check_action(case: tuple[str, Any]) -> str:
    """Only ActionError for bad input; an action is always attributed to its sender."""
    agent_id, payload = case
    try:
        action = parse_action(agent_id, payload)
    except ActionError as exc:
        refused = exc.as_action(agent_id)  # the router answers every refusal with this
        assert refused.agent_id == agent_id and refused.refused
        return "rejected"
    assert action.agent_id == agent_id, (action.agent_id, agent_id)
    return "ok"


AGENT_ACTION = Target(
    "router.parse_action",
    AGENT_IDS.flatmap(lambda a: st.tuples(st.just(a), action_payloads(a))),
    check_action,
    weight=2,
    mutable=(0, 1),
)


# -- 3. the config loader -------------------------------------------------------------

# Keys the loader knows (so cases get past "unknown setting"), and a few it does not.
CONFIG_KEYS = (
    "daemon store ops classifier sla routing outbox scheduling lifecycle channels adapters "
    "agents type name host port path id capacity tool skills queues shutdown_timeout "
    "include backend url token secret topic region keywords mode interval timeout "
    "webhook_url webhook_secret authserv_id max_text_chars accept_timeout source x"
).split()
# Strings safe to resolve: env references to variables that are never set, and file:
# references relative to an empty directory (never a device or a real secret).
CONFIG_STRINGS = st.sampled_from(
    [
        "web",
        "inbox",
        "mqtt",
        "webhook",
        "telegram",
        "email",
        "twilio",
        "sms_http",
        "127.0.0.1",
        "0.0.0.0",
        "CHANGE_ME",
        "${OMNIROUTER_FUZZ_UNSET}",
        "file:missing",
        "file:",
        "en",
        "zh",
        "http://127.0.0.1:1/x",
        "alice",
        "",
        "sqlite",
        "inquiry",
    ]
) | st.text(alphabet=string.printable + "王é", max_size=12).filter(
    lambda s: not s.startswith("file:") and "${" not in s
)
CONFIG_SCALARS = (
    CONFIG_STRINGS
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([0, 1, 8080, 65536, -1])
    | st.floats(allow_nan=True)
    | st.booleans()
)


def _config_containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Return arrays and tables of inner, keyed mostly by names the loader knows."""
    keys = st.sampled_from(CONFIG_KEYS) | st.text(max_size=6)
    return st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=4)


CONFIG_TREES = st.recursive(CONFIG_SCALARS, _config_containers, max_leaves=16)
BASE_CONFIG: dict[str, Any] = {
    "daemon": {"shutdown_timeout": 20},
    "ops": {"host": "127.0.0.1", "port": 8081},
    "channels": [{"type": "web", "name": "web", "host": "127.0.0.1", "port": 8080}],
    "adapters": [{"type": "inbox", "name": "inbox"}],
    "agents": [{"id": "alice", "name": "Alice", "capacity": 3, "tool": "inbox", "skills": ["en"]}],
}


@st.composite
def config_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """Return a raw config document: the defaults with random subtrees grafted in, or noise."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.dictionaries(st.sampled_from(CONFIG_KEYS), CONFIG_TREES, max_size=5))
    doc = json.loads(json.dumps(BASE_CONFIG))
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from([*list(doc), "store", "routing", "sla", "scheduling"]))
        value = doc.get(section)
        item = draw(st.sampled_from(value)) if isinstance(value, list) and value else None
        if isinstance(item, dict) and draw(st.booleans()):
            item[draw(st.sampled_from(CONFIG_KEYS))] = draw(CONFIG_TREES)
        elif isinstance(value, dict) and draw(st.booleans()):
            value[draw(st.sampled_from(CONFIG_KEYS))] = draw(CONFIG_TREES)
        else:
            doc[section] = draw(CONFIG_TREES)
    return doc


def _toml_value(value: Any) -> str:
    """Render a value as inline TOML (json.dumps is valid TOML for strings and numbers)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
        )
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    return json.dumps(value)


def to_toml(doc: dict[str, Any]) -> str:
    """Render a config document as TOML text: tables, arrays of tables, inline values."""
    lines: list[str] = []
    for key, value in doc.items():
        if not isinstance(value, dict | list):
            lines.append(f"{json.dumps(key)} = {_toml_value(value)}")
    for key, value in doc.items():
        if isinstance(value, dict):
            lines.append(f"[{json.dumps(key)}]")
            lines.extend(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items())
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                lines.append(f"[[{json.dumps(key)}]]")
                lines.extend(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in item.items())
        elif isinstance(value, list):
            lines.append(f"{json.dumps(key)} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


@st.composite
def config_texts(draw: st.DrawFn) -> str:
    """Return TOML text: a rendered document, often cut, spliced or sprinkled with junk."""
    text = to_toml(draw(config_dicts()))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(text)))
        junk = draw(
            st.sampled_from(["[", "]]", "=", '"', "\n", "\x00", "[[channels]]\n", "'''", "\\u"])
            | st.text(max_size=6)
        )
        text = text[:at] + junk + text[at + draw(st.integers(0, 3)) :]
    return text


_EMPTY_DIR = Path(tempfile.mkdtemp(prefix="omnirouter-fuzz-"))
atexit.register(shutil.rmtree, _EMPTY_DIR, ignore_errors=True)


def _check_config_error(exc: ConfigError, needs_path: bool) -> None:
    """A ConfigError lists at least one issue, each saying where (a field or a line)."""
    assert exc.issues, "ConfigError without issues"
    for issue in exc.issues:
        assert issue.message, issue
        if needs_path:
            assert issue.path or issue.line is not None, f"issue names no field: {issue}"
    str(exc)


def _has_surrogate(value: Any) -> bool:
    """Tell whether a document holds a lone surrogate in any key or string."""
    if isinstance(value, str):
        return bool(ANY_SURROGATE.search(value))
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False


def check_config_dict(doc: dict[str, Any]) -> str:
    """build_config gives a Config or a ConfigError naming a field, nothing else.

    Its input is a parsed TOML document, and TOML cannot hold a lone surrogate (tomllib
    refuses the escape, files are read as strict UTF-8): such documents are skipped.
    """
    if _has_surrogate(doc):
        return "skipped_not_toml"
    try:
        config = build_config(doc, source="fuzz.toml", base=_EMPTY_DIR)
    except ConfigError as exc:
        _check_config_error(exc, needs_path=True)
        return "rejected"
    finally:
        clear_secrets()  # a successful load registers its secrets process-wide
    assert isinstance(config, Config)
    return "ok"


def check_config_text(text: str) -> str:
    """loads_config gives a Config or a ConfigError naming a field or a line.

    Text with a lone surrogate is skipped: config files are read as strict UTF-8.
    """
    if ANY_SURROGATE.search(text):
        return "skipped_not_utf8"
    try:
        config = loads_config(text, source="fuzz.toml", base=_EMPTY_DIR)
    except ConfigError as exc:
        _check_config_error(exc, needs_path=True)
        return "rejected"
    finally:
        clear_secrets()
    assert isinstance(config, Config)
    return "ok"


CONFIG_DICT = Target("router.build_config", config_dicts(), check_config_dict, weight=2)
CONFIG_TEXT = Target("router.loads_config", config_texts(), check_config_text, weight=2)


# -- 4. webhook, SMS, authentication results, survey answers --------------------------

PHONE_TEXT = st.text(alphabet="+0123456789 ()./-x#*", max_size=24) | WILD_TEXT
REGIONS = st.sampled_from(["CN", "DE", "US", "GB", "ZZ", "", "XX", "de"])
URLS = st.sampled_from(
    [
        "https://example.com/sms",
        "http://example.com:8080/x?a=1",
        "https://h:99999/",
        "http://[::1",
        "https://[::1]:443/p",
        "",
        "https://user:pw@h/",
        "mailto:x",
        "https://h:/",
    ]
) | st.text(max_size=30)
PARAMS = st.lists(st.tuples(st.text(max_size=8), WILD_TEXT), max_size=4)


@st.composite
def sms_cases(draw: st.DrawFn) -> tuple[str, Any]:
    """Return (helper name, its arguments) for one SMS helper call."""
    which = draw(st.sampled_from(["e164", "clean_text", "split_segments", "keyword_of", "twilio"]))
    if which == "e164":
        return which, (draw(PHONE_TEXT), draw(REGIONS))
    if which == "twilio":
        algorithm = draw(st.sampled_from(["HMAC_SHA1", "HMAC_SHA256", "hmac_sha256", "md5", ""]))
        return which, (draw(WILD_TEXT), draw(URLS), draw(PARAMS), draw(WILD_TEXT), algorithm)
    return which, draw(WILD_TEXT | st.text(alphabet="@£$¥èé{}[]~€^\\|", max_size=400))


def _round_trips(url: str) -> bool:
    """Tell whether urlparse gives the URL back unchanged (and its port is readable)."""
    try:
        parsed = urlparse(url)
        parsed.port  # noqa: B018  (raises ValueError on a malformed port)
    except ValueError:
        return False
    return parsed.geturl() == url


def check_sms(case: tuple[str, Any]) -> str:
    """e164 raises only ValueError; the others never raise and keep their promises."""
    which, args = case
    if which == "e164":
        try:
            number = e164(*args)
        except ValueError:
            return "rejected"
        assert number.startswith("+") and number[1:].isdigit(), number
        return "ok"
    if which == "clean_text":
        cleaned = clean_text(args)
        assert not ANY_SURROGATE.search(cleaned) and "\r" not in cleaned, repr(cleaned)
        return "ok"
    if which == "split_segments":
        encoding, segments = split_segments(args)
        assert "".join(segments) == args and encoding in ("gsm7", "ucs2")
        return "ok"
    if which == "keyword_of":
        keyword_of(args)
        return "ok"
    token, url, params, given, algorithm = args
    valid = signature_valid(token, url, params, given, algorithm)
    assert valid is False or valid is True
    if algorithm.upper() in ("HMAC_SHA1", "HMAC_SHA256") and _round_trips(url):
        # Like twilio-python, only the URL as urlparse writes it back is signed-checked.
        own = signature(token, url, params, algorithm)
        assert signature_valid(token, url, params, own, algorithm), "own signature refused"
    signature_algorithm(given)
    return "ok"


@st.composite
def webhook_cases(draw: st.DrawFn) -> tuple[bytes, str, bytes, str, float]:
    """Return verify_signature arguments: well-formed, near misses and junk headers."""
    secret = draw(st.binary(max_size=16))
    body = draw(st.binary(max_size=64))
    now = 1_700_000_000.0
    timestamp = draw(st.integers(0, 10**13))
    signed = sign(secret, int(now), body)
    if draw(st.integers(0, 2)) == 0:  # a genuine request, so mutations start from one
        return secret, str(int(now)), body, signed, now
    ts_header = draw(st.sampled_from([str(timestamp), str(int(now)), " 1", "", "１２３"]))
    sig_header = draw(
        st.sampled_from([signed, signed.upper(), signed[:-1], "sha256=", ""]) | WILD_TEXT
    )
    return secret, ts_header, body, sig_header, now


def check_webhook(case: tuple[bytes, str, bytes, str, float]) -> str:
    """verify_signature answers True or False, never raises; its own signature passes."""
    secret, ts_header, body, sig_header, now = case
    ok = verify_signature(secret, ts_header, body, sig_header, now=now)
    assert ok is True or ok is False
    assert verify_signature(secret, str(int(now)), body, sign(secret, int(now), body), now=now)
    return "ok" if ok else "rejected"


AUTHSERV = st.sampled_from(["mx.example.com", "MX.example.com.", "", "other"])
AUTHRES_TEXT = st.lists(
    st.sampled_from(
        [
            "mx.example.com",
            ";",
            " dmarc=pass",
            " dmarc=fail",
            " header.from=example.com",
            ' header.from="Example.COM."',
            " (comment",
            ")",
            "spf=pass",
            "\r\n ",
            "=",
            ".",
        ]
    )
    | st.text(max_size=8),
    max_size=10,
).map("".join)


@st.composite
def authres_cases(draw: st.DrawFn) -> tuple[str, str, bytes, str]:
    """Return (header value, authserv-id, raw mail, From address) for the DMARC helpers."""
    if draw(st.integers(0, 2)) == 0:  # a genuine verdict of ours, so mutations start from one
        value = (
            "mx.example.com; spf=pass smtp.mailfrom=example.com; dmarc=pass header.from=example.com"
        )
        raw = b"Authentication-Results: " + value.encode() + b"\r\nFrom: d@example.com\r\n\r\nhi"
        return value, "mx.example.com", raw, "dana@example.com"
    value = draw(AUTHRES_TEXT | WILD_TEXT)
    authserv = draw(AUTHSERV | st.text(max_size=8))
    header = value.encode("utf-8", "surrogatepass")
    raw = draw(
        st.sampled_from([b"Authentication-Results: " + header + b"\r\n\r\nbody", b""])
        | st.binary(max_size=80)
    )
    address = draw(st.sampled_from(["dana@example.com", "x@", "@", "", "nobody"]) | WILD_TEXT)
    return value, authserv, raw, address


def check_authres(case: tuple[str, str, bytes, str]) -> str:
    """dmarc_domains and sender_verified never raise; they answer None/set and a bool."""
    value, authserv, raw, address = case
    domains = dmarc_domains(value, authserv)
    assert domains is None or isinstance(domains, set)
    verified = sender_verified(raw, address, authserv)
    assert verified is True or verified is False
    return "ok" if verified else "rejected"


@st.composite
def telegram_cases(draw: st.DrawFn) -> tuple[str, int]:
    """Return a text and a part limit for split_message (long texts, astral characters)."""
    unit = draw(WILD_TEXT | st.sampled_from(["😀", "👍🏽", "🇩🇪", "e\u0301", "\r\n", "。", " "]))
    text = unit * draw(st.integers(0, 60)) + draw(TEXT)
    return text, draw(st.sampled_from([2, 3, 7, 64, 4096]))


def check_telegram(case: tuple[str, int]) -> str:
    """split_message ends, and every part is within the limit in UTF-16 units."""
    text, limit = case
    parts = split_message(text, limit)
    assert parts, "no part"
    for part in parts:
        assert utf16_units(part) <= limit, (limit, part)
    return "ok" if len(parts) == 1 else "split"


def check_score(text: str) -> str:
    """parse_score answers 1–5 or None, never raises."""
    score = parse_score(text)
    assert score is None or 1 <= score <= 5, score
    return "ok" if score else "rejected"


SMS = Target("channels.sms helpers", sms_cases(), check_sms, weight=2, mutable=(1,))
WEBHOOK = Target(
    "adapters.webhook.verify_signature",
    webhook_cases(),
    check_webhook,
    weight=1,
    mutable=(0, 1, 2, 3),
)
AUTHRES = Target("channels.email.authres", authres_cases(), check_authres, weight=1)
TELEGRAM = Target(
    "channels.telegram.split_message", telegram_cases(), check_telegram, weight=1, mutable=(0,)
)
SCORE = Target(
    "router.lifecycle.parse_score",
    WILD_TEXT | st.sampled_from(["5", "4/5", "4分", "满意", "不满意", "no, not really", "１"]),
    check_score,
    weight=1,
)


# -- 5. the web channel's body intake -------------------------------------------------

_WEB_CHANNEL: WebChannel | None = None


def web_channel() -> WebChannel:
    """Return one WebChannel (never run) whose validate() the body cases go through."""
    global _WEB_CHANNEL
    if _WEB_CHANNEL is None:
        ctx = DriverContext(state_dir=_EMPTY_DIR, log=structlog.get_logger())
        _WEB_CHANNEL = WebChannel("fuzz", WebConfig(type="web", name="fuzz", port=0), ctx)
    return _WEB_CHANNEL


@st.composite
def web_bodies(draw: st.DrawFn) -> bytes:
    """Return a request body: near-valid JSON messages, broken JSON, or random bytes."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=120))
    doc: dict[str, Any] = {}
    if kind >= 6:  # a valid message, so mutations start from bodies that get through
        doc = {"text": draw(TEXT.filter(str.strip)), "contact": {"handle": "dana@example.com"}}
        if draw(st.booleans()):
            doc["contact"]["name"] = draw(TEXT)
        if draw(st.booleans()):
            doc["subject"] = draw(TEXT)
        if draw(st.booleans()):
            doc["language"] = draw(st.sampled_from(["zh", "en"]))
        return json.dumps(doc, ensure_ascii=draw(st.booleans())).encode()
    for key in ("text", "contact", "subject", "conversation", "language"):
        if draw(st.integers(0, 3)):
            if key == "contact" and draw(st.booleans()):
                contact = {"handle": draw(WILD_TEXT | JSON_VALUES)}
                if draw(st.booleans()):
                    contact["name"] = draw(WILD_TEXT | JSON_VALUES)
                doc[key] = contact
            else:
                doc[key] = draw(WILD_TEXT | TEXT | JSON_VALUES)
    if draw(st.integers(0, 5)) == 0:
        doc[draw(st.text(max_size=6))] = draw(JSON_VALUES)
    text = json.dumps(doc, ensure_ascii=draw(st.booleans()))
    if kind == 1:
        text = text[: draw(st.integers(0, len(text)))]
    if kind == 2:
        text = text[:-1] + ', "text": "again"}' if len(text) > 2 else text
    if kind == 3:
        text = "[" * draw(st.integers(1, 3000)) + text
    return text.encode("utf-8", "surrogatepass")


def check_web(body: bytes) -> str:
    """A body becomes fields or a 4xx Rejected naming a code; the fields are storable text."""
    channel = web_channel()
    try:
        fields = channel.validate(parse_body(body))
    except Rejected as exc:
        assert 400 <= exc.status < 500 and exc.code, (exc.status, exc.code)
        response = channel.rejected(exc)  # the answer the client gets: it must render
        assert response.status == exc.status and response.body
        return "rejected"
    for value in (
        fields["text"],
        fields["subject"],
        fields["conversation"],
        *fields["contact"].values(),
    ):
        value.encode("utf-8")  # strict: raises on a lone surrogate
    return "ok"


WEB = Target("channels.web body intake", web_bodies(), check_web, weight=2)


TARGETS: tuple[Target, ...] = (
    NORMALISE,
    AGENT_ACTION,
    CONFIG_DICT,
    CONFIG_TEXT,
    SMS,
    WEBHOOK,
    AUTHRES,
    TELEGRAM,
    SCORE,
    WEB,
)


def share(total: int) -> dict[str, int]:
    """Split a total number of cases over the targets by weight (each gets at least 1)."""
    weights = sum(t.weight for t in TARGETS)
    return {t.name: max(1, total * t.weight // weights) for t in TARGETS}
