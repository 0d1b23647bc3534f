"""Whether our own mail server vouched for a mail's sender: DMARC in Authentication-Results.

An e-mail From address is a claim anyone can type. It becomes an identifier that links
the customer's contacts across channels (router/contacts.py) only when the receiving
server checked it: the `Authentication-Results` header (RFC 8601) that *our* server
added, named by its authserv-id (the channel's `authserv_id`, e.g. `mx.example.com`),
says `dmarc=pass` for the From domain.

Only the topmost header with our authserv-id is read. A sender can write any
Authentication-Results of their own, including one with our name; RFC 8601 §5 has the
receiving MTA remove such headers before adding its own (OpenDMARC, Rspamd and
Dovecot's Pigeonhole pipelines do), and a forged one below ours is never reached.
Without `authserv_id` no sender is verified.
"""

from __future__ import annotations

import re
from email.parser import BytesHeaderParser
from email.policy import compat32

_HEADER_PARSER = BytesHeaderParser(policy=compat32)
_COMMENT = re.compile(r"\([^()]*\)")  # RFC 5322 comments; nested ones are peeled in a loop
_RESULT = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=\s*([A-Za-z0-9_-]+)(.*)$", re.S)
_PROPERTY = re.compile(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_.-]+)\s*=\s*(\"[^\"]*\"|[^\s;]+)")


def _strip_comments(value: str) -> str:
    for _ in range(8):
        stripped = _COMMENT.sub(" ", value)
        if stripped == value:
            break
        value = stripped
    return value


def _unquote(value: str) -> str:
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value


def dmarc_domains(value: str, authserv_id: str) -> set[str] | None:
    """Return the From domains one Authentication-Results value says passed DMARC.

    None when the header is not ours (another authserv-id); an empty set when it is
    ours and DMARC did not pass. A `dmarc=pass` without `header.from` names no domain
    and counts for nothing.
    """
    parts = _strip_comments(value.replace("\r", " ").replace("\n", " ")).split(";")
    head = parts[0].split()
    if not head or head[0].lower().rstrip(".") != authserv_id.lower().rstrip("."):
        return None
    passed: set[str] = set()
    for part in parts[1:]:
        match = _RESULT.match(part)
        if match is None:
            continue
        method, result, rest = match.group(1).lower(), match.group(2).lower(), match.group(3)
        if method != "dmarc" or result != "pass":
            continue
        for ptype, prop, pvalue in _PROPERTY.findall(rest):
            if ptype.lower() == "header" and prop.lower() == "from":
                passed.add(_unquote(pvalue).strip().lower().rstrip("."))
    return passed


def sender_verified(raw: bytes, from_address: str, authserv_id: str) -> bool:
    """Whether our server's topmost Authentication-Results passed DMARC for the From domain."""
    if not authserv_id or "@" not in from_address:
        return False
    end = raw.find(b"\r\n\r\n")
    end = raw.find(b"\n\n") if end < 0 else end
    headers = _HEADER_PARSER.parsebytes(raw[: end if end >= 0 else len(raw)])
    domain = from_address.rsplit("@", 1)[1].strip().lower().rstrip(".")
    for value in headers.get_all("Authentication-Results") or ():
        passed = dmarc_domains(str(value), authserv_id)
        if passed is None:
            continue  # another server's verdict: not ours to trust
        return domain in passed
    return False
