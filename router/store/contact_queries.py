"""SQL for contacts across channels (router/contacts.py explains the model).

One function per unit of work, each run inside the writer's transaction: linking a
message's handle at ingest, merging and unmerging contacts, and the read views the
CLI and the ops API show. A refusal is returned as `ContactChange.error`, never raised:
a raising unit makes the writer run its whole batch again with savepoints.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from router.contacts import CONTACT_ID, ContactChange, ContactLink, valid_identifier
from router.store.migrations import new_person_id
from router.store.portable import marks

_MAX_DEPTH = 1000  # a merge chain longer than this is a corrupt database, not a customer


@dataclass(slots=True)
class ContactEvent:
    """One audit row: a merge, a verified link or an unmerge."""

    at: float
    action: str
    person_id: str
    other_id: str
    actor: str
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "at": self.at,
            "action": self.action,
            "contact": self.person_id,
            "other": self.other_id,
            "actor": self.actor,
            "detail": self.detail,
        }


# -- shared helpers ------------------------------------------------------------------


def root_of(c: sqlite3.Connection, person: str) -> str:
    """Return the contact `person` belongs to after every merge."""
    for _ in range(_MAX_DEPTH):
        row = c.execute("SELECT merged_into FROM people WHERE id=?", (person,)).fetchone()
        if row is None or row[0] is None:
            return person
        person = row[0]
    raise RuntimeError(f"contact merge chain too long at {person}")


def members_of(c: sqlite3.Connection, root: str) -> list[str]:
    """Return `root` and every contact merged into it, directly or not."""
    return [
        r[0]
        for r in c.execute(
            "WITH RECURSIVE tree(id, depth) AS (SELECT ?, 0 UNION "
            "SELECT p.id, t.depth + 1 FROM people p JOIN tree t ON p.merged_into = t.id "
            f"WHERE t.depth < {_MAX_DEPTH}) SELECT id FROM tree",
            (root,),
        )
    ]


def _separated(c: sqlite3.Connection, a: list[str], b: list[str]) -> bool:
    """Whether an unmerge ever separated a contact of `a` from one of `b`."""
    marks_a = marks(len(a))
    marks_b = marks(len(b))
    row = c.execute(
        f"SELECT 1 FROM contact_separations WHERE (person_id IN ({marks_a}) AND other_id IN "
        f"({marks_b})) OR (person_id IN ({marks_b}) AND other_id IN ({marks_a})) LIMIT 1",
        (*a, *b, *b, *a),
    ).fetchone()
    return row is not None


def _event(
    c: sqlite3.Connection,
    at: float,
    action: str,
    person: str,
    other: str,
    actor: str,
    detail: dict[str, Any],
) -> None:
    c.execute(
        "INSERT INTO contact_events(at, action, person_id, other_id, actor, detail) "
        "VALUES (?,?,?,?,?,?)",
        (at, action, person, other, actor, json.dumps(detail, ensure_ascii=False)),
    )


# -- at ingest -------------------------------------------------------------------------


def link_contact(
    c: sqlite3.Connection,
    key: str,
    name: str,
    identifiers: tuple[str, ...],
    at: float,
    *,
    channel_type: str,
    handle: str,
) -> ContactLink:
    """Store the handle `key` (`channel_type:handle`), give it its contact, record its
    verified identifiers, link contacts.

    A new handle starts a contact of its own; a known one takes a new, different name
    when one comes with it. When its identifiers belong to other contacts, the newer
    contacts join the oldest (a `link` event each, undone by an unmerge), unless an
    unmerge separated them before.
    """
    idents = tuple(i for i in dict.fromkeys(identifiers) if valid_identifier(i))
    # Read first, then write only what is new: this runs for every message, and a known
    # handle with its name unchanged (most messages) then costs this one statement.
    row = c.execute("SELECT person_id, name FROM contacts WHERE key=?", (key,)).fetchone()
    person: str | None = row[0] if row is not None else None
    if row is not None and name and name != row[1]:
        c.execute("UPDATE contacts SET name=? WHERE key=?", (name, key))
    owners: dict[str, str] = {}
    for ident in idents:
        hit = c.execute(
            "SELECT person_id FROM contact_identifiers WHERE identifier=?", (ident,)
        ).fetchone()
        if hit is not None:
            owners[ident] = hit[0]
    fresh = person is None
    if person is None:
        # A new handle is a contact of its own, linked below to the contact holding one of
        # its identifiers: every join is then a link an admin can see and undo.
        person = new_person_id()
        c.execute("INSERT INTO people(id, created_at, name) VALUES (?,?,?)", (person, at, name))
        if row is None:
            # Two instances storing the same new handle at once: the second insert fails
            # on the key and its unit runs again, finding this row.
            c.execute(
                "INSERT INTO contacts(key, channel_type, handle, name, created_at, person_id) "
                "VALUES (?,?,?,?,?,?)",
                (key, channel_type, handle, name, at, person),
            )
        else:  # a handle stored before contacts had people
            c.execute("UPDATE contacts SET person_id=? WHERE key=?", (person, key))
    for ident in idents:
        if ident not in owners:
            c.execute(
                "INSERT INTO contact_identifiers(identifier, person_id, contact_key, first_seen) "
                "VALUES (?,?,?,?)",
                (ident, person, key, at),
            )
    root = person if fresh else root_of(c, person)  # nothing is merged into a new contact
    links: list[tuple[str, str]] = []
    others = {root_of(c, p): ident for ident, p in owners.items()}
    others.pop(root, None)
    if others:
        roots = [root, *others]
        created = {
            r[0]: r[1]
            for r in c.execute(
                f"SELECT id, created_at FROM people WHERE id IN ({marks(len(roots))})",
                roots,
            )
        }
        target = min(roots, key=lambda r: (created.get(r, at), r))
        target_members = members_of(c, target)
        for other in sorted(roots, key=lambda r: (created.get(r, at), r)):
            if other == target:
                continue
            other_members = members_of(c, other)
            if _separated(c, target_members, other_members):
                continue  # an admin split these once; a verified identifier does not undo it
            c.execute(
                "UPDATE people SET merged_into=?, merged_at=? WHERE id=?", (target, at, other)
            )
            # The identifier that ties them: the one the other contact (or the target) held.
            via = others.get(other) or others.get(target, "")
            _event(c, at, "link", other, target, "router", {"identifier": via, "handle": key})
            links.append((other, target))
            target_members += other_members
        root = root_of(c, person)
    return ContactLink(person, root, idents, tuple(links))


# -- merge and unmerge -----------------------------------------------------------------


def resolve_ref(c: sqlite3.Connection, ref: str) -> str | None:
    """Return the contact a reference names directly (before merges), or None.

    A reference is a contact id (`c_…`), a handle key (`sms:+4915…`, `email:ann@x.org`)
    or a verified identifier (`phone:+4915…`).
    """
    ref = ref.strip()
    if CONTACT_ID.fullmatch(ref):
        row = c.execute("SELECT id FROM people WHERE id=?", (ref,)).fetchone()
        return row[0] if row is not None else None
    row = c.execute("SELECT person_id FROM contacts WHERE key=?", (ref,)).fetchone()
    if row is not None and row[0]:
        return str(row[0])
    row = c.execute(
        "SELECT person_id FROM contact_identifiers WHERE identifier=?", (ref.lower(),)
    ).fetchone()
    return row[0] if row is not None else None


def merge(
    c: sqlite3.Connection, into: str, other: str, actor: str, reason: str, at: float
) -> ContactChange:
    """Make the contact `other` names part of the one `into` names (an audited merge)."""
    a, b = resolve_ref(c, into), resolve_ref(c, other)
    if a is None or b is None:
        return ContactChange(error=f"no contact {into if a is None else other}", code="not_found")
    ra, rb = root_of(c, a), root_of(c, b)
    if ra == rb:
        return ContactChange(
            ra, ra, error=f"{into} and {other} are one contact already", code="already_merged"
        )
    c.execute("UPDATE people SET merged_into=?, merged_at=? WHERE id=?", (ra, at, rb))
    # A person's explicit merge outweighs an earlier unmerge between the two.
    ma, mb = members_of(c, ra), members_of(c, rb)
    for x in ma:
        for y in mb:
            c.execute(
                "DELETE FROM contact_separations WHERE (person_id=? AND other_id=?) OR "
                "(person_id=? AND other_id=?)",
                (x, y, y, x),
            )
    _event(c, at, "merge", rb, ra, actor, {"reason": reason, "into": into, "from": other})
    return ContactChange(rb, ra)


def unmerge(c: sqlite3.Connection, ref: str, actor: str, reason: str, at: float) -> ContactChange:
    """Undo the merge that made the contact `ref` names part of another (audited)."""
    person = resolve_ref(c, ref)
    if person is None:
        return ContactChange(error=f"no contact {ref}", code="not_found")
    row = c.execute("SELECT merged_into FROM people WHERE id=?", (person,)).fetchone()
    parent = row[0] if row is not None else None
    if parent is None:
        joined = [
            r[0]
            for r in c.execute("SELECT id FROM people WHERE merged_into=? ORDER BY id", (person,))
        ]
        hint = f"; contacts merged into it: {', '.join(joined)}" if joined else ""
        return ContactChange(
            person,
            error=f"{ref} ({person}) was not merged into another contact{hint}",
            code="not_merged",
        )
    c.execute("UPDATE people SET merged_into=NULL, merged_at=NULL WHERE id=?", (person,))
    c.execute(
        "INSERT INTO contact_separations(person_id, other_id) VALUES (?,?) ON CONFLICT DO NOTHING",
        (person, parent),
    )
    _event(c, at, "unmerge", person, parent, actor, {"reason": reason, "ref": ref})
    return ContactChange(person, parent)


# -- views -------------------------------------------------------------------------------


def contact_view(
    c: sqlite3.Connection, ref: str, since: float, tickets: int = 20
) -> dict[str, Any] | None:
    """Return the whole contact `ref` belongs to: handles, identifiers, tickets, audit."""
    person = resolve_ref(c, ref)
    if person is None:
        return None
    root = root_of(c, person)
    members = members_of(c, root)
    in_list = marks(len(members))
    people = [
        {"id": r[0], "created_at": r[1], "name": r[2], "merged_into": r[3], "merged_at": r[4]}
        for r in c.execute(
            "SELECT id, created_at, name, merged_into, merged_at FROM people "
            f"WHERE id IN ({in_list}) ORDER BY created_at, id",
            members,
        )
    ]
    handles = [
        {"key": r[0], "channel_type": r[1], "handle": r[2], "name": r[3], "contact": r[4]}
        for r in c.execute(
            f"SELECT key, channel_type, handle, name, person_id FROM contacts "
            f"WHERE person_id IN ({in_list}) ORDER BY created_at, key",
            members,
        )
    ]
    identifiers = [
        {"identifier": r[0], "contact": r[1], "first_handle": r[2], "first_seen": r[3]}
        for r in c.execute(
            f"SELECT identifier, person_id, contact_key, first_seen FROM contact_identifiers "
            f"WHERE person_id IN ({in_list}) ORDER BY first_seen, identifier",
            members,
        )
    ]
    keys = [h["key"] for h in handles] or [""]
    kmarks = marks(len(keys))
    recent = c.execute(
        f"SELECT count(*) FROM messages WHERE contact_key IN ({kmarks}) AND ingested_at>=?",
        (*keys, since),
    ).fetchone()[0]
    convs = [
        {
            "ticket": "T-" + r[0],
            "channel": r[1],
            "status": r[2],
            "label": r[3],
            "severity": r[4],
            "agent": r[5],
            "opened_at": r[6],
            "handle": r[7],
        }
        for r in c.execute(
            f"SELECT id, channel, status, label, severity, agent_id, opened_at, contact_key "
            f"FROM conversations WHERE contact_key IN ({kmarks}) ORDER BY opened_at DESC "
            f"LIMIT {int(tickets)}",
            keys,
        )
    ]
    events = [
        ContactEvent(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])).to_dict()
        for r in c.execute(
            f"SELECT at, action, person_id, other_id, actor, detail FROM contact_events "
            f"WHERE person_id IN ({in_list}) OR other_id IN ({in_list}) ORDER BY id",
            (*members, *members),
        )
    ]
    name = next((p["name"] for p in people if p["name"]), "") or next(
        (h["name"] for h in handles if h["name"]), ""
    )
    return {
        "id": root,
        "name": name,
        "contacts": people,
        "handles": handles,
        "identifiers": identifiers,
        "recent_messages": recent,
        "tickets": convs,
        "events": events,
    }


def find_contacts(c: sqlite3.Connection, query: str, limit: int) -> list[dict[str, Any]]:
    """Return contacts whose handle, name or identifier contains `query` (case-insensitive)."""
    # lower() on both sides: SQLite's LIKE ignores ASCII case, PostgreSQL's does not.
    like = "%" + query.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    persons = [
        r[0]
        for r in c.execute(
            "SELECT person_id FROM contacts WHERE (lower(key) LIKE ? ESCAPE '\\' "
            "OR lower(name) LIKE ? ESCAPE '\\') AND person_id IS NOT NULL "
            f"ORDER BY created_at DESC LIMIT {int(limit) * 4}",
            (like, like),
        )
    ]
    persons += [
        r[0]
        for r in c.execute(
            "SELECT person_id FROM contact_identifiers WHERE lower(identifier) LIKE ? ESCAPE '\\' "
            f"ORDER BY first_seen DESC LIMIT {int(limit) * 4}",
            (like,),
        )
    ]
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for person in persons:
        root = root_of(c, person)
        if root in seen:
            continue
        seen.add(root)
        members = members_of(c, root)
        in_list = marks(len(members))
        handles = [
            r[0]
            for r in c.execute(
                f"SELECT key FROM contacts WHERE person_id IN ({in_list}) ORDER BY created_at",
                members,
            )
        ]
        name = c.execute(
            f"SELECT name FROM contacts WHERE person_id IN ({in_list}) AND name!='' LIMIT 1",
            members,
        ).fetchone()
        out.append({"id": root, "name": name[0] if name else "", "handles": handles})
        if len(out) >= limit:
            break
    return out


def book_rows(
    c: sqlite3.Connection, since: float
) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, str]]]:
    """Return what the router's ContactBook starts from.

    (handle key, contact) for handles active since `since` or of contacts with more than
    one handle or any link; (identifier, contact) for those contacts; (contact, joined)
    for every merge link.
    """
    links = [
        (r[0], r[1])
        for r in c.execute("SELECT id, merged_into FROM people WHERE merged_into IS NOT NULL")
    ]
    handles = [
        (r[0], r[1])
        for r in c.execute(
            "SELECT key, person_id FROM contacts WHERE person_id IS NOT NULL AND ("
            "key IN (SELECT contact_key FROM messages WHERE ingested_at>=?) "
            "OR person_id IN (SELECT person_id FROM contacts GROUP BY person_id "
            "HAVING count(*) > 1) "
            "OR person_id IN (SELECT id FROM people WHERE merged_into IS NOT NULL) "
            "OR person_id IN (SELECT merged_into FROM people WHERE merged_into IS NOT NULL) "
            "OR person_id IN (SELECT person_id FROM contact_identifiers GROUP BY person_id "
            "HAVING count(*) > 1))",
            (since,),
        )
    ]
    persons = {p for _, p in handles}
    identifiers = [
        (r[0], r[1])
        for r in c.execute("SELECT identifier, person_id FROM contact_identifiers")
        if r[1] in persons
    ]
    return handles, identifiers, links
