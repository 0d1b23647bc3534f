"""`omnirouter contacts …`: find, show, merge and unmerge contacts across channels.

Every command asks the running daemon through the ops API (merges change what the
router counts as one customer's repeat contacts, so the daemon must make them);
`--actor` names who merged, and every merge and unmerge lands in the contact's audit.
"""

from __future__ import annotations

import argparse
import urllib.parse
from datetime import UTC, datetime
from typing import Any

from router.cli import _admin_show, _state_options, command, group

group("contacts", "contacts across channels: find, show, merge, unmerge")

_REF_HELP = "a contact id (c_…), a handle (sms:+4915…, email:ann@example.org) or an identifier"


def _ts(at: float | None) -> str:
    if not at:
        return "-"
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _common(p: argparse.ArgumentParser) -> None:
    _state_options(p)
    p.add_argument("--ops-url", help="the ops API (default: from the config)")
    p.add_argument("--json", action="store_true", help="print the API's JSON")


def _find_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("query", help="part of a handle, a name or an identifier")
    p.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    _common(p)


def _find_table(reply: Any) -> list[str]:
    rows = [f"{'CONTACT':20}  {'NAME':24}  HANDLES"]
    for c in reply.get("contacts", []):
        rows.append(f"{c['id']:20}  {c['name'][:24]:24}  {', '.join(c['handles'])}")
    if len(rows) == 1:
        rows.append("(no contact matches)")
    return rows


@command("contacts find", "find contacts by handle, name or identifier", _find_args, config=True)
def cmd_contacts_find(args: argparse.Namespace) -> int:
    """Print the contacts whose handle, name or identifier contains the query."""
    query = urllib.parse.urlencode({"q": args.query, "limit": args.limit})
    return _admin_show(args, f"/v1/contacts?{query}", _find_table)


def _show_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ref", help=_REF_HELP)
    _common(p)


def _show_table(c: Any) -> list[str]:
    rows = [f"contact {c['id']}" + (f"  ({c['name']})" if c["name"] else "")]
    rows.append(f"  messages in the repeat-contact window: {c['recent_messages']}")
    rows.append("  handles:")
    for h in c["handles"]:
        rows.append(f"    {h['key']:40}  {h['name'][:24]:24}  via {h['contact']}")
    if c["identifiers"]:
        rows.append("  verified identifiers:")
        for i in c["identifiers"]:
            rows.append(f"    {i['identifier']:40}  since {_ts(i['first_seen'])}")
    if c["tickets"]:
        rows.append("  tickets (newest first):")
        for t in c["tickets"]:
            rows.append(
                f"    {t['ticket']:32}  {t['status']:19}  {t['label']:10}  {t['severity']:3}  "
                f"{t['agent'] or '-':12}  {t['channel']}"
            )
    if c["events"]:
        rows.append("  audit:")
        for e in c["events"]:
            reason = e["detail"].get("reason") or e["detail"].get("identifier") or ""
            rows.append(
                f"    {_ts(e['at'])}  {e['action']:8}  {e['contact']} -> {e['other']}  "
                f"by {e['actor']}" + (f"  ({reason})" if reason else "")
            )
    return rows


@command(
    "contacts show", "show a contact: handles, identifiers, tickets, audit", _show_args, config=True
)
def cmd_contacts_show(args: argparse.Namespace) -> int:
    """Print one contact with every channel handle and its merge history."""
    ref = urllib.parse.quote(args.ref, safe="")
    return _admin_show(args, f"/v1/contacts/{ref}", _show_table)


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("into", help="the contact that stays: " + _REF_HELP)
    p.add_argument("other", help="the contact that joins it")
    p.add_argument("--actor", default="ops", help="who merges (recorded in the audit)")
    p.add_argument("--reason", default="", help="why (recorded in the audit)")
    p.add_argument("--ops-url", help="the ops API (default: from the config)")
    _state_options(p)


@command("contacts merge", "make two contacts one (audited)", _merge_args, config=True)
def cmd_contacts_merge(args: argparse.Namespace) -> int:
    """Merge contact OTHER into INTO: their repeat contacts count together from now on."""
    body = {"into": args.into, "from": args.other, "actor": args.actor, "reason": args.reason}
    return _admin_show(args, "/v1/contacts/merge", method="POST", body=body)


def _unmerge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ref", help="the merged contact to take out: " + _REF_HELP)
    p.add_argument("--actor", default="ops", help="who splits (recorded in the audit)")
    p.add_argument("--reason", default="", help="why (recorded in the audit)")
    p.add_argument("--ops-url", help="the ops API (default: from the config)")
    _state_options(p)


@command("contacts unmerge", "undo a merge (audited)", _unmerge_args, config=True)
def cmd_contacts_unmerge(args: argparse.Namespace) -> int:
    """Take a merged contact out again; a verified identifier will not link them back."""
    ref = urllib.parse.quote(args.ref, safe="")
    body = {"actor": args.actor, "reason": args.reason}
    return _admin_show(args, f"/v1/contacts/{ref}/unmerge", method="POST", body=body)
