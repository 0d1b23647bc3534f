"""Whether our own mail server vouched for a mail's sender: DMARC in Authentication-Results.

An e-mail From address is a claim anyone can type. It becomes an identifier that links
the customer's contacts across channels (router/contacts.py) only when the receiving
server checked it: the `Authentication-Results` header (RFC 8601) that *our* server
added, named by its authserv-id (the channel's `authserv_id`, e.g. `mx.example.com`),
says `dmarc=pass` for the From domain.

Only headers our own server added are read: those with our authserv-id above the
second `Received:` line (our MTA's own Received is the first; whatever lies below the
second came with the mail from outside). Several of ours are usual (OpenDKIM and
OpenDMARC each add one). A sender can write any Authentication-Results of their own,
including one with our name; RFC 8601 §5 has the receiving MTA remove such headers
before adding its own, and one below that line is never read either. Among ours, a
`dmarc=pass` for the From domain verifies the sender unless one of them says another
DMARC result for it. Without `authserv_id` no sender is verified.
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


def dmarc_results(value: str, authserv_id: str) -> dict[str, str] | None:
    """Return {From domain: DMARC result} of one Authentication-Results value.

    None when the header is not ours (another authserv-id). A dmarc result without
    `header.from` names no domain and counts for nothing.
    """
    parts = _strip_comments(value.replace("\r", " ").replace("\n", " ")).split(";")
    head = parts[0].split()
    if not head or head[0].lower().rstrip(".") != authserv_id.lower().rstrip("."):
        return None
    results: dict[str, str] = {}
    for part in parts[1:]:
        match = _RESULT.match(part)
        if match is None or match.group(1).lower() != "dmarc":
            continue
        for ptype, prop, pvalue in _PROPERTY.findall(match.group(3)):
            if ptype.lower() == "header" and prop.lower() == "from":
                domain = _unquote(pvalue).strip().lower().rstrip(".")
                results[domain] = match.group(2).lower()
    return results


def dmarc_domains(value: str, authserv_id: str) -> set[str] | None:
    """Return the From domains one Authentication-Results value says passed DMARC.

    None when the header is not ours (another authserv-id); an empty set when it is
    ours and DMARC did not pass.
    """
    results = dmarc_results(value, authserv_id)
    if results is None:
        return None
    return {domain for domain, result in results.items() if result == "pass"}


def sender_verified(raw: bytes, from_address: str, authserv_id: str) -> bool:
    """Whether our own server's Authentication-Results passed DMARC for the From domain."""
    if not authserv_id or "@" not in from_address:
        return False
    end = raw.find(b"\r\n\r\n")
    end = raw.find(b"\n\n") if end < 0 else end
    headers = _HEADER_PARSER.parsebytes(raw[: end if end >= 0 else len(raw)])
    domain = from_address.rsplit("@", 1)[1].strip().lower().rstrip(".")
    verdicts: list[str] = []
    received = 0
    for name, value in headers.items():
        lower = name.lower()
        if lower == "received":
            received += 1
            if received == 2:
                break  # below: headers that came with the mail from outside
        elif lower == "authentication-results":
            results = dmarc_results(str(value), authserv_id)
            if results is not None and domain in results:
                verdicts.append(results[domain])
    return bool(verdicts) and all(v == "pass" for v in verdicts)
