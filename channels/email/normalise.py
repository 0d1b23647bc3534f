"""Turn raw RFC 5322 bytes into the fields of an `InboundMessage`, plus flags. No I/O.

Hostile mail is the normal case here: every step is tolerant and bounded, and the
whole of `normalise()` never raises (a last-resort fallback keeps what it can and
names the reason). What it does, in order:

* Parse with the stdlib `email` package and `policy.default`; if anything in the
  analysis raises (broken headers trip the new header parser), parse again with
  `compat32`, whose headers are plain strings.
* Headers are decoded from their raw form (RFC 2047 words and raw 8-bit bytes) with
  the tolerant charset decoder below, so a GBK subject without encoded words works.
* Body: text/plain preferred, else HTML converted to text by `html.parser` (scripts,
  styles and head dropped, nothing fetched), else attached plain text, else nothing.
  A text part is body text unless its disposition says attachment (a `name=` alone
  does not). The routed `text` has quoted replies and signatures removed; the full
  body stays in the raw payload.
* Charsets: the declared one, then gb18030 for gb2312/gbk (its superset), then
  utf-8, gb18030, big5 and latin-1; the first strict decode wins, otherwise the
  candidate with the fewest replacement characters. A declared charset (outside the
  often-confused Chinese labels) that decodes all but a few bad sequences wins over
  any guess, its bad bytes replaced. UTF-7 and HZ are decoded although their bytes
  are ASCII. Output never holds surrogates.
* Attachments: sanitised names, a clean `type/subtype`, size, sha256, inline flag;
  their bytes are returned only when within the size cap (the channel stores them).
  Nothing vanishes: HTML that is not the body and not merely the alternative of the
  plain text is kept as an attachment.
* Noise (auto-replies, bounces, lists) sets `noise_reason`; such mail is not routed.
* Threading: Message-ID, In-Reply-To, References and a `[#T-…]` ticket token.
"""

from __future__ import annotations

import codecs
import email
import email.header
import email.policy
import email.utils
import functools
import hashlib
import re
import unicodedata
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.message import Message
from html.parser import HTMLParser
from typing import Any

DEFAULT_MAX_MESSAGE_BYTES = 40 * 1024 * 1024
DEFAULT_MAX_ATTACHMENT_BYTES = 25 * 1024 * 1024
DEFAULT_MAX_TEXT_CHARS = 50_000
MAX_SUBJECT_CHARS = 998  # RFC 5322 line limit; subjects longer than that are not real
MAX_NAME_CHARS = 200
MAX_FILENAME_BYTES = 200
MAX_REFERENCES = 50
MAX_MESSAGE_ID_CHARS = 250
MAX_PARTS = 500  # a MIME tree with more leaves is cut (and flagged)
MAX_HEADER_CHARS = 16 * 1024  # one header value; more is cut before decoding
# Content-Type and Content-Disposition are parsed with at most this many parameters
# and characters: the standard library's parser spends tens of microseconds per
# parameter, so a 128 KB header of them took seconds (a cheap denial of service). Real
# mail has a handful, a long file name in RFC 2231 pieces a dozen or two.
MAX_HEADER_PARAMS = 40
MAX_PARAMETERISED_CHARS = 4096
# MIME parts nested deeper than this are cut off before parsing: the stdlib parser
# checks every line against every open boundary, so a few hundred levels of nesting
# cost seconds per megabyte. Real mail nests a few levels, a forwarded chain a dozen.
MAX_MIME_DEPTH = 64
TRUNCATION_NOTE = "[message truncated: the original was {size} bytes; see the raw mail]"

# Extensions for parts without a file name (mimetypes would read /etc/mime.types).
_EXTENSIONS = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/gif": ".gif",
    "image/webp": ".webp",
    "application/pdf": ".pdf",
    "text/plain": ".txt",
    "text/html": ".html",
    "text/calendar": ".ics",
    "message/rfc822": ".eml",
}

TICKET_RE = re.compile(r"\[#(T-[A-Za-z0-9_-]{1,64})\]")
_MSGID_RE = re.compile(r"<([^<>\s]{1,250})>")  # 250 = MAX_MESSAGE_ID_CHARS
_ADDR_RE = re.compile(r"^[^@\s<>()\[\],;:\"\\]{1,64}@[A-Za-z0-9.\-\[\]:_]{1,253}$")
# C0/C1 controls and DEL; TAB and LF are handled separately in bodies.
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_LINE_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Bidi overrides/isolates: they disguise file names ("invoice\u202efdp.exe").
_BIDI = re.compile("[\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_SURROGATES = re.compile("[\ud800-\udfff]")
_ESCAPES = re.compile("[\udc80-\udcff]")  # bytes 0x80-0xff kept by "surrogateescape"
_ESCAPE_TEXT = re.compile(r"\\ud[89a-f][0-9a-f]{2}", re.I)  # a surrogate spelt out

# Charsets whose superset decodes more of what real senders write under that label.
_SUPERSETS = {
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "cp936": "gb18030",
    "euc-cn": "gb18030",
    "big5": "big5hkscs",
    "x-big5": "big5hkscs",
    "ascii": "utf-8",  # 8-bit bytes under us-ascii are almost always UTF-8
    "us-ascii": "utf-8",
    "iso-8859-1": "cp1252",
    "latin-1": "cp1252",
}
_FALLBACKS = ("gb18030", "big5hkscs", "cp1252")
# Labels that decode anything without error: a UTF-8 body mislabelled with one of
# them must still come out as UTF-8, so valid UTF-8 is tried before them.
_PERMISSIVE = frozenset({"latin-1", "iso8859-1", "cp1252", "iso-8859-1", "windows-1252"})


@dataclass(frozen=True, slots=True)
class ParsedAttachment:
    """One attachment or inline part; `data` is None when it was over the cap or cut."""

    name: str
    mime_type: str
    size: int
    sha256: str
    inline: bool = False
    content_id: str = ""
    complete: bool = True  # False: the message was truncated inside this part
    data: bytes | None = None


@dataclass(frozen=True, slots=True)
class NormalisedMail:
    """What the channel needs from one mail; see the module docstring for each rule."""

    from_address: str  # lower-cased addr-spec, "" when missing or unusable
    from_name: str
    subject: str
    text: str  # routed text: quotes and signature stripped, whitespace folded
    full_text: str  # the chosen body before stripping (capped)
    message_id: str  # "<id@host>" or ""
    in_reply_to: str
    references: tuple[str, ...]
    ticket: str  # "T-…" from a [#T-…] subject token, or ""
    received_at: datetime | None
    attachments: tuple[ParsedAttachment, ...]
    noise_reason: str  # non-empty: recorded, not routed, never answered
    reject_reason: str  # non-empty: cannot be routed (e.g. no sender)
    truncated: bool
    size: int  # bytes of the raw mail as received (before any cut)
    sha256: str  # of the raw bytes handed in
    body_source: str  # "plain" | "html" | "attachment" | "none" | "fallback"
    defects: tuple[str, ...] = field(default=())

    @property
    def content_digest(self) -> str:
        """Return a sha256 of what the sender wrote: sender, date, subject, body, attachments.

        Unlike `sha256` it does not change when a server re-adds headers (Received,
        X-…) to a mail it delivers again; unlike the Message-ID it tells apart two
        different mails that reuse one.
        """
        digest = hashlib.sha256()
        date = self.received_at.isoformat() if self.received_at else ""
        for value in (self.from_address, date, self.subject, self.full_text):
            data = value.encode("utf-8", "surrogatepass")
            digest.update(b"%d:" % len(data) + data)  # length-prefixed: no field runs into the next
        for att in self.attachments:
            digest.update(att.sha256.encode("ascii"))
        return digest.hexdigest()

    @property
    def thread_root(self) -> str:
        """Return the first Message-ID of the thread this mail belongs to (may be its own)."""
        if self.references:
            return self.references[0]
        return self.in_reply_to or self.message_id


# -- charsets -----------------------------------------------------------------------------


def _codec_name(label: str | None) -> str | None:
    """Return the Python codec name for a MIME charset label, or None when unknown/unsafe."""
    if not label:
        return None
    label = label.strip().strip("\"'").lower()[:40]
    try:
        info = codecs.lookup(label)
    except (LookupError, ValueError):
        return None
    # Only text encodings: bytes transforms (hex, base64, zlib via aliases) are refused.
    if not getattr(info, "_is_text_encoding", True):
        return None
    return info.name


def decode_bytes(data: bytes, declared: str | None = None) -> str:
    """Decode bytes to text, trying the declared charset and then the common ones.

    A declared charset outside the Chinese family that decodes strictly wins (UTF-8
    beats permissive single-byte labels such as latin-1, which decode anything).
    Otherwise every strict decode among the declared charset, its superset, utf-8,
    gb18030 and big5 competes, and the most plausible text wins (valid UTF-8 first,
    then the fewest characters that are neither common simplified nor traditional
    Chinese). Before that contest, a declared charset outside the Chinese family (or
    UTF-8 when none is declared) that decodes all but a few bad sequences wins with
    them replaced. Without any strict decode, the fewest replacement characters win.
    Never raises; the result has no surrogates.
    """
    label = (declared or "").strip().strip("\"'").lower()
    codec = _codec_name(label)
    if data.isascii():
        # UTF-7 and HZ spell their non-ASCII text in ASCII bytes: only they change it.
        seven_bit = _try(data, codec) if codec and codec in _SEVEN_BIT else None
        return seven_bit if seven_bit is not None else _clean(data.decode("ascii"))
    superset = _SUPERSETS.get(label) or (_SUPERSETS.get(codec) if codec else None)
    permissive = label in _PERMISSIVE or (codec or "").replace("_", "-") in _PERMISSIVE
    utf8 = _try(data, "utf-8")
    if utf8 is not None and (codec is None or codec in _CONTESTED or permissive):
        return utf8
    # A declared charset outside the often-wrong ones is trusted when it decodes
    # strictly; a permissive one only when its text looks like text.
    first: tuple[int, int, str] | None = None
    if codec and codec not in _CONTESTED:
        text = _try(data, superset or codec) or _try(data, codec)
        if text is not None:
            if not permissive:
                return text
            first = (_oddness(text), -1, text)
            if first[0] == 0:
                return text
    # A declared charset (UTF-8 when none is) that decodes all but a few bad sequences
    # beats any guess: one corrupt byte must not turn Cyrillic into Chinese. The Chinese
    # labels are left to the contest below, as senders often mix them up.
    lenient = superset or codec or "utf-8"
    nearly = None
    if not permissive and lenient not in _GUESSED:
        nearly = _nearly(data, lenient)
        if nearly is not None and codec:
            return nearly
    candidates = [c for c in (superset, codec) if c and c in _CONTESTED]
    ordered = list(dict.fromkeys([*candidates, *_FALLBACKS]))
    strict_ok: list[tuple[int, int, str]] = [first] if first else []
    for rank, name in enumerate(ordered):
        text = _try(data, name)
        if text is not None:
            # Single-byte charsets decode anything: they win only on clearly better text.
            penalty = 1 if name == "cp1252" else 0
            strict_ok.append((_oddness(text) + penalty, rank, text))
    if strict_ok:
        best_strict = min(strict_ok)
        # Nothing declared: nearly-UTF-8 beats a guess unless the guess reads as plain
        # Chinese (a short GBK text can also look like UTF-8 with a few bad bytes).
        if nearly is not None and best_strict[0] > 0:
            return nearly
        return best_strict[2]
    if nearly is not None:
        return nearly
    best: tuple[int, int, int, str] | None = None
    for rank, name in enumerate([*ordered, *([codec] if codec else [])]):
        try:
            text = data.decode(name, errors="replace")
        except Exception:
            continue
        key = (text.count("\ufffd"), _oddness(text), rank, text)
        if best is None or key < best:
            best = key
    return _clean(best[3] if best is not None else data.decode("latin-1"))


_CONTESTED = frozenset(
    {"gb18030", "gbk", "gb2312", "big5", "big5hkscs", "cp950", "hz", "utf-8", "ascii"}
)


# The Chinese family: labels senders often get wrong within it, so their text is guessed.
_GUESSED = _CONTESTED - {"utf-8", "ascii"}
# Charsets whose encoded form is all ASCII.
_SEVEN_BIT = frozenset({"utf-7", "hz"})


def _nearly(data: bytes, codec: str) -> str | None:
    """Return data decoded with replacement when all but a few sequences are valid, else None.

    A few means at most 3 bad sequences or 1 in 100 characters; and the valid non-ASCII
    characters must outnumber the bad ones twice, so that mostly-ASCII text with a few
    bytes of another charset is not taken for a damaged copy of this one.
    """
    try:
        text = data.decode(codec, errors="replace")
    except Exception:  # a codec that fails in another way
        return None
    bad = text.count("\ufffd")
    good = sum(1 for ch in text if ch >= "\x80") - bad
    if bad <= max(3, len(text) // 100) and good >= 2 * bad:
        return _clean(text)
    return None


def _try(data: bytes, codec: str) -> str | None:
    """Return data decoded strictly with codec, or None."""
    try:
        return _clean(data.decode(codec))
    except Exception:  # UnicodeDecodeError, or a codec that fails in another way
        return None


def _oddness(text: str, sample: int = 2000) -> int:
    """Count characters unlikely in real mail text among the first `sample` non-Latin ones.

    Common means: Latin, general punctuation, or a level-1 (frequent) character or
    symbol of GB2312 or Big5. Text decoded with the wrong Chinese charset lands
    mostly on rare characters, kana and bopomofo, so its count is higher.
    """
    odd = 0
    seen = 0
    prev = " "
    for ch in text:
        if ch < "\u0250":  # ASCII and Latin: plausible, except controls and runs
            if ch < " " and ch not in "\t\n\r":
                odd += 1
            elif ch >= "\x80" and "\x80" <= prev < "\u0250":
                odd += 1  # accented letters come alone; runs of them are mojibake
            prev = ch
            continue
        prev = ch
        seen += 1
        if seen > sample:
            break
        if not _common(ch):
            odd += 1
    return odd


@functools.lru_cache(maxsize=8192)
def _common(ch: str) -> bool:
    """Tell whether a character is frequent in Chinese (or general) text."""
    if "\u2000" <= ch <= "\u206f" or ch in "\u00a0\u3000\ufffd\u20ac":
        return True
    try:
        b = ch.encode("gb2312")
        if 0xB0 <= b[0] <= 0xD7 or 0xA1 <= b[0] <= 0xA3:
            return True
    except UnicodeEncodeError:
        pass
    try:
        b = ch.encode("big5")
    except UnicodeEncodeError:
        return False
    value = b[0] << 8 | b[1] if len(b) == 2 else 0
    return 0xA440 <= value <= 0xC67E or 0xA140 <= value <= 0xA3BF


def no_surrogates(value: str, *, header: bool = False) -> str:
    """Return value with lone surrogates replaced (the last guard before a store or a peer).

    With `header`, "\\udc80"-style text is replaced too: that is how raw header bytes
    were spelt out before this guard existed (rows stored then may still hold it).
    """
    if header and "\\" in value:
        value = _ESCAPE_TEXT.sub("\ufffd", value)
    return _SURROGATES.sub("\ufffd", value)


def _clean(text: str) -> str:
    """Drop what cannot be stored as UTF-8 (lone surrogates) and NULs."""
    if "\x00" in text:
        text = text.replace("\x00", "")
    return _SURROGATES.sub("\ufffd", text)


# -- headers ------------------------------------------------------------------------------


def _raw_header(msg: Message, name: str) -> str | None:
    """Return the first raw (undecoded) value of a header, or None when absent."""
    lname = name.lower()
    for key, value in msg.raw_items():
        if key.lower() == lname:
            return str(value)[:MAX_HEADER_CHARS]
    return None


def _raw_headers(msg: Message, name: str) -> list[str]:
    """Return every raw value of a header."""
    lname = name.lower()
    return [str(v)[:MAX_HEADER_CHARS] for k, v in msg.raw_items() if k.lower() == lname]


def decode_header_value(value: str | None) -> str:
    """Decode a raw header value (RFC 2047 words, raw 8-bit bytes) into one clean line."""
    if not value:
        return ""
    value = str(value)
    # Folding: CRLF, bare CR and bare LF followed by whitespace are all unfolded here.
    value = re.sub(r"\r\n|\r|\n", "", value)
    # The parser keeps raw 8-bit header bytes as surrogate escapes, and decode_header
    # would spell those out as "\\udcfc" text. Each becomes the code point of its byte,
    # which decode_header hands on as that byte: inside an encoded word it is decoded
    # in the word's charset, outside one the run of raw bytes is guessed.
    raw8 = bool(_ESCAPES.search(value))
    if raw8:
        # Except 0x85: as U+0085 (NEL) it would split the line, and an encoded word with
        # it, inside decode_header. NUL stands in for it (a real NUL becomes a space,
        # as any control does below).
        value = _ESCAPES.sub(_escape_to_byte, value.replace("\x00", " "))
    # decode_header turns the text between encoded words into bytes with
    # raw-unicode-escape: code points above 255 come back from that codec only.
    wide = any(ord(ch) > 0xFF for ch in value)
    try:
        parts = email.header.decode_header(value)
    except Exception:
        parts = [(value, None)]
    out: list[str] = []
    for chunk, charset in parts:
        if isinstance(chunk, str):  # no encoded word at all
            out.append(_from_raw8(chunk) if raw8 else _clean(chunk))
        elif charset or raw8:
            out.append(decode_bytes(chunk.replace(b"\x00", b"\x85") if raw8 else chunk, charset))
        else:
            out.append(_between_words(chunk, wide))
    text = "".join(out)
    text = _LINE_CONTROLS.sub(" ", text)
    return re.sub(r"\s+", " ", text).strip()


def _escape_to_byte(match: re.Match[str]) -> str:
    """Return the code point standing for one surrogate-escaped byte (NUL for 0x85)."""
    byte = ord(match.group()) - 0xDC00
    return "\x00" if byte == 0x85 else chr(byte)


def _from_raw8(text: str) -> str:
    """Decode header text whose code points below 256 stand for raw bytes (NUL for 0x85)."""
    try:
        raw = text.encode("latin-1").replace(b"\x00", b"\x85")
    except UnicodeEncodeError:
        return _clean(text)
    return decode_bytes(raw, None)


def _between_words(chunk: bytes, wide: bool) -> str:
    """Return the text decode_header found between encoded words, as it was."""
    if wide:
        try:
            return _clean(chunk.decode("raw-unicode-escape"))
        except UnicodeDecodeError:  # a literal backslash-u that was not an escape
            pass
    return _clean(chunk.decode("latin-1"))


def _from_surrogateescape(text: str) -> str:
    """Recover raw 8-bit header bytes the parser kept as surrogate escapes, then decode."""
    if not _SURROGATES.search(text):
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return _clean(text)
    return decode_bytes(raw, None)


def _message_ids(value: str | None, limit: int = MAX_REFERENCES) -> tuple[str, ...]:
    """Return the <msg-id> tokens of a header (bracketed), at most `limit`, in order."""
    if not value:
        return ()
    value = _LINE_CONTROLS.sub(" ", _from_surrogateescape(value))
    found = [f"<{m}>" for m in _MSGID_RE.findall(value)]
    if not found:
        bare = value.strip()
        if bare and " " not in bare and len(bare) <= MAX_MESSAGE_ID_CHARS and "@" in bare:
            found = [f"<{bare.strip('<>')}>"]
    unique = list(dict.fromkeys(found))
    if len(unique) > limit:
        # Keep the root (first) and the most recent ones: both matter for threading.
        unique = unique[:1] + unique[-(limit - 1) :]
    return tuple(unique)


def _address(value: str | None) -> tuple[str, str]:
    """Return (lower-cased addr-spec or "", display name) from a From-like header."""
    if not value:
        return "", ""
    decoded = decode_header_value(value)
    try:
        pairs = email.utils.getaddresses([decoded])
    except Exception:
        pairs = []
    for name, addr in pairs:
        addr = addr.strip().strip("<>").strip()
        if _ADDR_RE.match(addr):
            return addr.lower(), name.strip()[:MAX_NAME_CHARS]
    match = re.search(r"[^\s<>()\[\],;:\"]+@[A-Za-z0-9.\-]+", decoded)
    if match and _ADDR_RE.match(match.group(0)):
        return match.group(0).lower(), ""
    return "", decoded[:MAX_NAME_CHARS] if "@" not in decoded else ""


def _date(value: str | None) -> datetime | None:
    """Parse a Date header into aware UTC; None when missing or unparseable."""
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(decode_header_value(value))
    except Exception:
        return None
    if parsed is None:
        return None
    if parsed.tzinfo is None:  # "-0000" or no zone: RFC 5322 says UTC is the best guess
        parsed = parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except (OverflowError, ValueError):
        return None


# -- noise --------------------------------------------------------------------------------


def noise_reason(msg: Message, from_address: str) -> str:
    """Return why a mail is automatic (auto-reply, bounce, list), or "" for a human's mail."""
    auto = decode_header_value(_raw_header(msg, "Auto-Submitted")).lower()
    if auto and auto.split(";")[0].strip() != "no":
        return f"auto_submitted:{auto.split(';')[0].strip()[:40]}"
    if _raw_header(msg, "X-Autoreply") is not None:
        return "x_autoreply"
    if _raw_header(msg, "X-Autorespond") is not None:
        return "x_autorespond"
    precedence = decode_header_value(_raw_header(msg, "Precedence")).lower()
    if precedence in ("bulk", "junk", "list", "auto_reply"):
        return f"precedence:{precedence}"
    if _raw_header(msg, "List-Id") is not None:
        return "mailing_list"
    ctype = _content_type(msg)
    if ctype == "multipart/report" or ctype in (
        "message/delivery-status",
        "message/disposition-notification",
    ):
        return "delivery_report"
    return_path = _raw_header(msg, "Return-Path")
    if return_path is not None and return_path.strip() in ("<>", ""):
        return "null_return_path"
    local = from_address.split("@", 1)[0]
    if local in ("mailer-daemon", "postmaster"):
        return f"from_{local}"
    return ""


# -- HTML ---------------------------------------------------------------------------------

_BLOCK_TAGS = frozenset(
    {
        "p", "div", "br", "tr", "li", "ul", "ol", "table", "h1", "h2", "h3", "h4", "h5",
        "h6", "blockquote", "pre", "hr", "section", "article", "header", "footer", "dd",
        "dt", "dl", "address", "center", "form", "fieldset",
    }
)  # fmt: skip
_SKIP_TAGS = frozenset(
    {"script", "style", "head", "title", "noscript", "template", "svg", "object", "iframe"}
)


class _HtmlText(HTMLParser):
    """Collect visible text; skip scripts, styles and quoted blocks' markup only."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        """Open a skipped element or break the line before a block."""
        if tag in _SKIP_TAGS:
            self._skip += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")
            if tag == "li":
                self.parts.append("- ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        """Treat <br/> and friends as line breaks; never enter a skip."""
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        """Close a skipped element or end a block's line."""
        if tag in _SKIP_TAGS:
            self._skip = max(0, self._skip - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        """Keep text outside skipped elements."""
        if not self._skip:
            self.parts.append(data)


_HTML_CHUNK = 1 << 20  # HTML longer than this is read a chunk at a time


def html_to_text(html: str, limit: int | None = None) -> str:
    """Convert HTML to plain text safely: no scripts/styles, no fetches, entities decoded.

    With `limit`, a long document is read only until that many characters of text were
    found: what follows would be cut anyway, and reading 10 MB of markup takes seconds.
    """
    parser = _HtmlText()
    try:
        if limit is None or len(html) <= _HTML_CHUNK:
            parser.feed(html)
        else:
            for start in range(0, len(html), _HTML_CHUNK):
                parser.feed(html[start : start + _HTML_CHUNK])
                if sum(map(len, parser.parts)) >= limit:
                    break
        parser.close()
    except Exception:  # html.parser is lenient; this is a last guard
        return re.sub(r"<[^>]*>", " ", html)
    text = "".join(parser.parts)
    # HTML whitespace rules: runs of spaces collapse, line breaks come from blocks.
    lines = [re.sub(r"[ \t\r\f\v\u00a0]+", " ", ln).strip() for ln in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# -- quotes and signatures ----------------------------------------------------------------

_CUT_MARKERS = [
    re.compile(r"^-{2,}\s*Original Message\s*-{2,}\s*$", re.I),
    re.compile(r"^-{2,}\s*Forwarded message\s*-{2,}\s*$", re.I),
    re.compile(r"^_{20,}\s*$"),  # Outlook's separator before the quoted header block
    re.compile(r"^-- ?$"),  # RFC 3676 signature separator ("-- ")
    re.compile(r"^在.{0,300}写道\s*[：:]\s*$"),
    re.compile(r"^於.{0,300}寫道\s*[：:]\s*$"),
    re.compile(r"^[-—\s]*原始邮件[-—\s]*$"),
    re.compile(r"^[-—\s]*原始郵件[-—\s]*$"),
    re.compile(r"^\s*发件人\s*[：:]"),
    re.compile(r"^\s*寄件者\s*[：:]"),
    re.compile(r"^On .{0,400}wrote:\s*$", re.S),
    re.compile(r"^Le .{0,400}a écrit\s*:\s*$", re.S),
    re.compile(r"^Am .{0,400}schrieb .{0,200}:\s*$", re.S),
]
_OUTLOOK_HEADER = re.compile(r"^\s*From:\s.+", re.I)
_OUTLOOK_NEXT = re.compile(r"^\s*(Sent|Date|To|Subject):\s", re.I)


def strip_quotes(text: str) -> str:
    """Remove quoted replies and the signature; return the new part of the mail.

    Lines starting with ">" go; everything from the first reply/forward header or
    signature marker on goes. If nothing would be left, the text is kept whole (an
    agent must never get an empty message because the customer wrote only quotes).
    """
    lines = text.split("\n")
    kept: list[str] = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        candidates = [stripped]
        if stripped.startswith("On ") and i + 1 < len(lines):
            candidates.append(stripped + " " + lines[i + 1].strip())  # Gmail wraps "On … wrote:"
        if any(m.match(c) for m in _CUT_MARKERS for c in candidates):
            break
        if (
            _OUTLOOK_HEADER.match(line)
            and i + 1 < len(lines)
            and _OUTLOOK_NEXT.match(lines[i + 1])
            and kept
        ):
            break
        if stripped.startswith(">"):
            continue
        kept.append(line)
    result = fold_whitespace("\n".join(kept))
    return result if result else fold_whitespace(text)


def fold_whitespace(text: str) -> str:
    """Normalise line ends and spaces: CRLF/CR to LF, runs of blanks folded, ends trimmed."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROLS.sub("", text.replace("\t", " "))
    lines = [re.sub(r"[ \u00a0\u3000]{2,}", " ", ln).rstrip() for ln in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# -- file names ---------------------------------------------------------------------------


def sanitise_filename(name: str, fallback: str = "attachment") -> str:
    """Return a safe file name: no directories, no controls or bidi tricks, bounded length."""
    name = unicodedata.normalize("NFC", _clean(name or ""))
    name = name.replace("\\", "/").split("/")[-1]
    name = _LINE_CONTROLS.sub("", _BIDI.sub("", name))
    name = name.strip().strip(".").strip()
    name = re.sub(r"\s+", " ", name)
    if not name or set(name) <= {"."}:
        name = fallback
    encoded = name.encode("utf-8")
    if len(encoded) > MAX_FILENAME_BYTES:
        stem, dot, ext = name.rpartition(".")
        if dot and 0 < len(ext.encode("utf-8")) <= 16 and stem:
            room = MAX_FILENAME_BYTES - len(ext.encode("utf-8")) - 1
            name = stem.encode("utf-8")[:room].decode("utf-8", "ignore") + "." + ext
        else:
            name = encoded[:MAX_FILENAME_BYTES].decode("utf-8", "ignore")
    return name


# -- MIME walking -------------------------------------------------------------------------


_MIME_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,63}")
# "type/subtype name=value": a Content-Type whose ";" before a parameter is missing.
_NO_SEMICOLON = re.compile(r"^(\s*[\w!#$&^.+-]+/[\w!#$&^.+-]+)\s+(?=[\w.-]+\s*=)")
_NO_SEMICOLON_RAW = re.compile(
    rb"(?im)^(content-type:[ \t]*[\w!#$&^.+-]+/[\w!#$&^.+-]+)(?=(?:\r?\n)?[ \t]+[\w.-]+[ \t]*=)"
)


def _content_type(part: Message) -> str:
    """Return the part's content type as a clean `type/subtype`, lower-case.

    text/plain when unreadable (the RFC's default); application/octet-stream when
    what it declares does not start with a type/subtype.
    """
    try:
        ctype = str(part.get_content_type()).lower()
    except Exception:
        return "text/plain"
    # A missing ";" leaves the parameters glued on ("multipart/mixed\tboundary=…").
    match = _MIME_TYPE.match(ctype)
    return match.group() if match else "application/octet-stream"


def _repair_content_type(part: Message) -> None:
    """Put back the ";" a part's Content-Type lacks, so its parameters (charset) are read."""
    raw = _raw_header(part, "Content-Type")
    if raw is None or not _NO_SEMICOLON.match(raw):
        return
    try:
        part.replace_header("Content-Type", _NO_SEMICOLON.sub(r"\1; ", raw, count=1))
    except Exception:  # the header is kept as it was; its type is still cleaned
        pass


def _param(part: Message, name: str) -> str | None:
    """Return a Content-Type parameter without raising."""
    try:
        value = part.get_param(name)
    except Exception:
        return None
    if isinstance(value, tuple):  # RFC 2231 (charset, language, value)
        try:
            return email.utils.collapse_rfc2231_value(value)
        except Exception:
            return str(value[2])
    return str(value) if value is not None else None


def _payload(part: Message) -> bytes:
    """Return the decoded payload bytes of a leaf part (transfer encoding undone)."""
    try:
        data = part.get_payload(decode=True)
    except Exception:
        data = None
    if isinstance(data, bytes):
        return data
    try:
        raw = part.get_payload()
    except Exception:
        return b""
    if isinstance(raw, str):
        return raw.encode("utf-8", "surrogateescape")
    return b""


def _filename(part: Message) -> str:
    """Return the part's declared file name (decoded), or ""."""
    try:
        name = part.get_filename()
    except Exception:
        name = None
    if not name:
        name = _param(part, "name")
    if not name:
        return ""
    return decode_header_value(str(name))


def _disposition(part: Message) -> str:
    """Return the Content-Disposition type, lower-case, or ""."""
    try:
        value = part.get_content_disposition()
    except Exception:
        return ""
    return str(value or "").lower()


@dataclass(slots=True)
class _Walk:
    """What a walk over the MIME tree collected."""

    plain: list[str] = field(default_factory=list)
    html: list[str] = field(default_factory=list)
    attached_text: list[str] = field(default_factory=list)  # text/plain attachments
    attachments: list[ParsedAttachment] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)
    leaves: int = 0


def _leaves(msg: Message) -> list[tuple[Message, bool]]:
    """Return every leaf part in document order, and whether a multipart/alternative holds it."""
    out: list[tuple[Message, bool]] = []
    stack: list[tuple[Message, bool]] = [(msg, False)]
    while stack:
        part, in_alternative = stack.pop()
        if not part.is_multipart():
            out.append((part, in_alternative))
            continue
        inside = in_alternative or _content_type(part) == "multipart/alternative"
        children = part.get_payload()
        if isinstance(children, list):
            stack.extend((c, inside) for c in reversed(children) if isinstance(c, Message))
    return out


def _walk(msg: Message, max_attachment_bytes: int, truncated: bool, defects: list[str]) -> _Walk:
    """Collect body candidates and attachments from every leaf part.

    text/plain and text/html are body text unless their disposition says attachment
    (a `name=` alone does not). Nothing is dropped: an HTML part that does not become
    the body is kept as an attachment when it has a file name or stands outside a
    multipart/alternative (where it would only repeat the plain text).
    """
    out = _Walk(defects=defects)
    leaves = _leaves(msg)
    if len(leaves) > MAX_PARTS:
        out.defects.append(f"too_many_parts:{len(leaves)}")
        leaves = leaves[:MAX_PARTS]
    last = leaves[-1][0] if leaves else None
    found: list[tuple[int, ParsedAttachment]] = []
    spare_html: list[tuple[int, ParsedAttachment]] = []  # attachments if plain text wins
    for index, (part, in_alternative) in enumerate(leaves):
        _repair_content_type(part)
        ctype = _content_type(part)
        disposition = _disposition(part)
        name = _filename(part)
        if ctype.startswith("message/") and ctype != "message/rfc822":
            continue
        complete = not (truncated and part is last)
        text_part = ctype in ("text/plain", "text/html")
        if text_part and disposition != "attachment":
            text = decode_bytes(_payload(part), _param(part, "charset"))
            if ctype == "text/plain":
                out.plain.append(text)
                continue
            out.html.append(text)
            if in_alternative and not name:
                continue  # another rendering of the plain text, not content of its own
        attachment = _attachment(
            part, index, ctype, disposition, name, complete, max_attachment_bytes
        )
        if text_part and disposition != "attachment":
            spare_html.append((index, attachment))
            continue
        if ctype == "text/plain" and complete:
            out.attached_text.append(decode_bytes(_payload(part), _param(part, "charset")))
        found.append((index, attachment))
    if any(t.strip() for t in out.plain):
        found.extend(spare_html)
    out.attachments = [a for _, a in sorted(found, key=lambda pair: pair[0])]
    return out


def _attachment(
    part: Message,
    index: int,
    ctype: str,
    disposition: str,
    name: str,
    complete: bool,
    max_attachment_bytes: int,
) -> ParsedAttachment:
    """Describe one leaf part as an attachment; its bytes only within the cap."""
    data = _payload(part)
    content_id = _message_ids(_raw_header(part, "Content-ID"), 1)
    inline = disposition == "inline" or (not disposition and bool(content_id))
    ext = _EXTENSIONS.get(ctype, ".bin")
    fallback = f"{'inline' if inline else 'attachment'}-{index + 1}{ext}"
    keep = complete and len(data) <= max_attachment_bytes
    return ParsedAttachment(
        name=sanitise_filename(name, fallback),
        mime_type=ctype,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        inline=inline,
        content_id=content_id[0] if content_id else "",
        complete=complete,
        data=data if keep else None,
    )


_CACHED_HEADER_CHARS = 1000  # longer values are rare and are parsed each time
_PARAMETERISED = frozenset({"content-type", "content-disposition"})


def _bounded(name: str, value: str) -> str:
    """Return a Content-Type/-Disposition value cut to its first parameters (see
    MAX_HEADER_PARAMS); any other header, or one within the bounds, as it is."""
    if (
        len(value) <= MAX_PARAMETERISED_CHARS and value.count(";") <= MAX_HEADER_PARAMS
    ) or name.lower() not in _PARAMETERISED:
        return value
    pieces = value[:MAX_PARAMETERISED_CHARS].split(";")
    if len(value) > MAX_PARAMETERISED_CHARS and len(pieces) > 1:
        pieces.pop()  # cut mid-parameter: leave that one out rather than misread it
    return ";".join(pieces[: MAX_HEADER_PARAMS + 1])


def _over_bounds(msg: Message) -> bool:
    """Tell whether a part's Content-Type or Content-Disposition was cut (see _bounded)."""
    return any(
        _bounded(name, str(value)) != str(value)
        for part in msg.walk()
        for name, value in part.raw_items()
    )


class _ReusedHeaders(email.policy.EmailPolicy):
    """policy.default, but a header value parsed once is not parsed again.

    The Message API parses a header on every read, and the parser and the walk read
    each part's Content-Type half a dozen times: that was most of normalising's time.
    A parsed header depends on its name and raw value only and is never changed here.
    """

    def header_fetch_parse(self, name: str, value: str) -> Any:
        """Return the parsed header, from the cache when it was parsed before."""
        if hasattr(value, "name"):
            return super().header_fetch_parse(name, value)
        value = _bounded(name, value)
        if len(value) > _CACHED_HEADER_CHARS:
            return super().header_fetch_parse(name, value)
        return _parsed_header(name, value)


@functools.lru_cache(maxsize=2048)
def _parsed_header(name: str, value: str) -> Any:
    """Return what policy.default makes of one header."""
    return email.policy.default.header_fetch_parse(name, value)


_POLICY = _ReusedHeaders()


class _BoundedCompat32(email.policy.Compat32):
    """compat32 (the fallback when policy.default fails on a mail), with the same bounds
    on Content-Type/-Disposition: its parameter split is quadratic in their number."""

    def header_fetch_parse(self, name: str, value: str) -> Any:
        """Return the header as compat32 does, cut to its first parameters."""
        return super().header_fetch_parse(name, _bounded(name, value))


_COMPAT32 = _BoundedCompat32()


def _parse(raw: bytes, compat: bool) -> Message:
    """Parse bytes into a message with policy.default (or compat32)."""
    policy = _COMPAT32 if compat else _POLICY
    return email.message_from_bytes(raw, policy=policy)


def _sanitise_raw(raw: bytes) -> bytes:
    """Repair the header block: bare CR line ends become CRLF (some MTAs emit them), and
    a Content-Type missing its ";" gets it back (else a multipart is read as one leaf)."""
    end = raw.find(b"\r\n\r\n")
    end2 = raw.find(b"\n\n")
    ends = [e for e in (end, end2) if e >= 0]
    head_end = min(ends) if ends else len(raw)
    head = raw[:head_end]
    fixed = head
    if b"\r" in head.replace(b"\r\n", b""):
        fixed = re.sub(rb"\r(?!\n)", b"\r\n", fixed)
    fixed = _NO_SEMICOLON_RAW.sub(rb"\1;", fixed, count=1)
    return raw if fixed == head else fixed + raw[head_end:]


_BOUNDARY_PARAM = re.compile(rb'boundary\s*=\s*(?:"([^"\r\n]{1,200})"|([^\s;"]{1,200}))', re.I)


def _cut_too_deep(raw: bytes) -> int | None:
    """Return where the first part nested deeper than MAX_MIME_DEPTH starts, or None.

    A line-by-line walk of the boundaries alone: a part's header block may declare a
    boundary, which opens a level at the blank line that ends the block; a delimiter
    line of an open boundary (the innermost level that uses it, as the parser reads it)
    starts a sibling part and closes the levels inside; its closing form ends the level.
    """
    if len(_BOUNDARY_PARAM.findall(raw)) <= MAX_MIME_DEPTH:
        return None  # fewer boundaries than levels allowed: nothing to walk
    open_levels: list[bytes] = []
    levels_of: dict[bytes, list[int]] = {}  # boundary -> the open levels using it
    in_headers, declared = True, None
    pos = 0
    for line in raw.split(b"\n"):
        start, pos = pos, pos + len(line) + 1
        line = line.rstrip(b"\r")
        if in_headers:
            if line.strip():
                found = _BOUNDARY_PARAM.search(line)
                if found is not None:
                    declared = found.group(1) or found.group(2)
                continue
            in_headers = False
            if declared is not None:
                if len(open_levels) >= MAX_MIME_DEPTH:
                    return start
                levels_of.setdefault(declared, []).append(len(open_levels))
                open_levels.append(declared)
                declared = None
            continue
        if not line.startswith(b"--"):
            continue
        token = line[2:].rstrip()
        closing = token.endswith(b"--") and bool(levels_of.get(token[:-2]))
        levels = levels_of.get(token[:-2] if closing else token)
        if not levels:
            continue
        keep = levels[-1] if closing else levels[-1] + 1
        while len(open_levels) > keep:
            levels_of[open_levels.pop()].pop()
        if not closing:
            in_headers = True  # a sibling part: its headers follow
    return None


def normalise(
    raw: bytes,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_attachment_bytes: int = DEFAULT_MAX_ATTACHMENT_BYTES,
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
    original_size: int | None = None,
) -> NormalisedMail:
    """Normalise one raw mail. Never raises.

    `original_size` is the server's size when the caller fetched only a prefix
    (the message is then flagged truncated even though `raw` is within the cap).
    """
    raw = bytes(raw)
    size = max(original_size or 0, len(raw))
    truncated = size > max_message_bytes or (original_size or 0) > len(raw)
    body = raw[:max_message_bytes]
    digest = hashlib.sha256(raw).hexdigest()
    cut = _cut_too_deep(body)
    if cut is not None:
        body, truncated = body[:cut], True
    error = ""
    for compat in (False, True):
        try:
            mail = _normalise(
                _sanitise_raw(body),
                compat=compat,
                size=size,
                digest=digest,
                truncated=truncated,
                max_attachment_bytes=max_attachment_bytes,
                max_text_chars=max_text_chars,
            )
        except Exception as exc:  # broken headers can trip policy.default; try compat32
            error = f"{type(exc).__name__}"
            continue
        if cut is not None:
            mail = replace(mail, defects=(*mail.defects, f"mime_too_deep:{MAX_MIME_DEPTH}"))
        return mail
    return _fallback(body, size, digest, truncated, max_text_chars, error)


def _normalise(
    raw: bytes,
    *,
    compat: bool,
    size: int,
    digest: str,
    truncated: bool,
    max_attachment_bytes: int,
    max_text_chars: int,
) -> NormalisedMail:
    """Do the work of normalise() with one parsing policy; may raise."""
    msg = _parse(raw, compat)
    defects = sorted({type(d).__name__ for p in msg.walk() for d in (p.defects or [])})
    if compat:
        defects.append("parsed_with_compat32")
    if _over_bounds(msg):
        defects.append(f"header_parameters_cut:{MAX_HEADER_PARAMS}")
    from_address, from_name = _address(_raw_header(msg, "From"))
    subject = decode_header_value(_raw_header(msg, "Subject"))[:MAX_SUBJECT_CHARS]
    walked = _walk(msg, max_attachment_bytes, truncated, list(defects))
    if walked.plain and any(t.strip() for t in walked.plain):
        full, source = "\n\n".join(t for t in walked.plain if t.strip()), "plain"
    elif walked.html:
        # Twice what is kept after folding: folding whitespace shortens the text.
        limit = max_text_chars * 8
        full, source = "\n\n".join(html_to_text(h, limit) for h in walked.html), "html"
    elif any(t.strip() for t in walked.attached_text):
        # Only attached text: read it as the body too, an agent must not get nothing.
        full, source = "\n\n".join(t for t in walked.attached_text if t.strip()), "attachment"
    else:
        full, source = "", "none"
    full = fold_whitespace(full)[: max_text_chars * 4]
    text = strip_quotes(full)[:max_text_chars]
    if truncated:
        note = TRUNCATION_NOTE.format(size=size)
        text = f"{text}\n\n{note}" if text else note
    message_id = (_message_ids(_raw_header(msg, "Message-ID"), 1) or ("",))[0]
    in_reply_to = (_message_ids(_raw_header(msg, "In-Reply-To"), 1) or ("",))[0]
    references = _message_ids(" ".join(_raw_headers(msg, "References")))
    ticket_match = TICKET_RE.search(subject)
    noise = noise_reason(msg, from_address)
    reject = "" if from_address else "no_sender_address"
    return NormalisedMail(
        from_address=from_address,
        from_name=from_name,
        subject=subject,
        text=text,
        full_text=full,
        message_id=message_id,
        in_reply_to=in_reply_to,
        references=references,
        ticket=ticket_match.group(1) if ticket_match else "",
        received_at=_date(_raw_header(msg, "Date")),
        attachments=tuple(walked.attachments),
        noise_reason=noise,
        reject_reason=reject,
        truncated=truncated,
        size=size,
        sha256=digest,
        body_source=source,
        defects=tuple(walked.defects),
    )


def _fallback(
    raw: bytes, size: int, digest: str, truncated: bool, max_text_chars: int, error: str
) -> NormalisedMail:
    """Keep what can be kept of a mail no parser could read: its bytes as text, no sender."""
    _, _, body = raw.partition(b"\n\n")
    text = fold_whitespace(decode_bytes(body or raw))[:max_text_chars]
    return NormalisedMail(
        from_address="",
        from_name="",
        subject="",
        text=text,
        full_text=text,
        message_id="",
        in_reply_to="",
        references=(),
        ticket="",
        received_at=None,
        attachments=(),
        noise_reason="",
        reject_reason=f"unparseable:{error}",
        truncated=truncated,
        size=size,
        sha256=digest,
        body_source="fallback",
        defects=(f"unparseable:{error}",),
    )
