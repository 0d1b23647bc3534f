"""The SQL of the SQLite store: one function per unit of work, and the row mapping.

Every function here takes the writer's connection and runs inside the transaction the
writer (`router.store.writer`) opened: no commits, no effects outside the database, so
a unit can be run again with the same outcome. The store deals in conversation ids;
a ticket number is made only where a customer-facing record needs one.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Sequence
from typing import Any, cast

from router.codec import dumps
from router.delivery import WithdrawnPayload, payload_from_dict, payload_to_dict, target_from_str
from router.explain import render, stored_form
from router.lifecycle import CUSTOMER, LOW_SCORE, ROUTER, EventKind, TicketState
from router.model import Agent, Assignment, MessageState, ticket_number
from router.store import (
    DeadLetter,
    IngestResult,
    NewMessage,
    OpenConversation,
    OutboxItem,
    PendingSurvey,
    QueuedMessage,
    RoutingView,
    Snapshot,
    TicketEvent,
    TicketView,
)
from router.store.contact_queries import book_rows, link_contact
from router.store.portable import for_update, marks, rows_as_dicts

# Between a closed ticket's thread key and its id (ASCII record separator: never in a key).
_CLOSED_KEY_SEPARATOR = "\x1e"
_DELETE_CHUNK = 500  # ids per DELETE statement (SQLite's bound-parameter limit is higher)
_OUTBOX_COLUMNS = (
    "id, target, agent_id, address, kind, payload, message_id, attempts, next_attempt_at, "
    "created_at"
)
_OUTBOX_COLUMNS_OF_O = ", ".join(f"o.{name}" for name in _OUTBOX_COLUMNS.split(", "))

_dumps = dumps


# -- small reads and writes ------------------------------------------------------


def ping(c: sqlite3.Connection) -> bool:
    """Return True when a trivial query answers."""
    return bool(c.execute("SELECT 1").fetchone()[0] == 1)


def secret(c: sqlite3.Connection) -> bytes:
    """Return the installation secret created by the first migration."""
    return bytes.fromhex(c.execute("SELECT value FROM meta WHERE key='secret'").fetchone()[0])


def write_probe(c: sqlite3.Connection) -> None:
    """Write a page and take it back: fails as a real write would on a full or failing disk.

    SQLite only (the PostgreSQL engine has its own probe in `router.store.pg_engine`).
    """
    page_size = c.execute("PRAGMA page_size").fetchone()[0]
    c.execute(
        "INSERT OR REPLACE INTO meta(key, value) VALUES ('write_probe', zeroblob(?))",
        (page_size,),
    )
    c.execute("DELETE FROM meta WHERE key='write_probe'")


def set_presence(c: sqlite3.Connection, agent_id: str, present: bool) -> bool:
    """Store an agent's presence; False for an unknown agent."""
    cur = c.execute("UPDATE agents SET present=? WHERE id=?", (int(present), agent_id))
    return cur.rowcount > 0


def due_outbox(c: sqlite3.Connection, now: float, limit: int, owner: str) -> list[OutboxItem]:
    """Claim for `owner` and return the pending items due now that it may send, oldest first."""
    return claim_outbox(c, owner, now, due_by=now, limit=limit)


def claim_outbox(
    c: sqlite3.Connection, owner: str, now: float, *, due_by: float | None, limit: int | None
) -> list[OutboxItem]:
    """Return the pending items `owner` may send (oldest first) and make them its own.

    Its own, unowned ones, and those of an instance whose lease `instance:<id>` is gone
    (dead, or stopped): a live instance's sends are never taken, so two instances do
    not send one item; a dead one's are taken over, and it no longer sees them.
    """
    where = "" if due_by is None else "o.next_attempt_at<=? AND "
    args: list[Any] = [] if due_by is None else [due_by]
    rows = c.execute(
        f"SELECT {_OUTBOX_COLUMNS_OF_O}, o.owner FROM outbox o WHERE {where}"
        "(o.owner=? OR o.owner='' OR NOT EXISTS (SELECT 1 FROM leases l "
        "WHERE l.name='instance:' || o.owner AND l.expires_at>?)) "
        "ORDER BY o.next_attempt_at, o.id"
        + ("" if limit is None else f" LIMIT {int(limit)}")  # written in: see _streak
        # Two instances taking over a dead one's sends split them instead of both
        # sending each (PostgreSQL; SQLite has one writer).
        + for_update(c, skip_locked=True),
        (*args, owner, now),
    ).fetchall()
    taken = [r[0] for r in rows if r[-1] != owner]
    for start in range(0, len(taken), _DELETE_CHUNK):
        chunk = taken[start : start + _DELETE_CHUNK]
        c.execute(
            f"UPDATE outbox SET owner=? WHERE id IN ({marks(len(chunk))})",
            (owner, *chunk),
        )
    return [outbox_item(r) for r in rows]


def outbox_retry(
    c: sqlite3.Connection, item_id: str, attempts: int, next_attempt_at: float, error: str
) -> None:
    """Record a failed attempt."""
    c.execute(
        "UPDATE outbox SET attempts=?, next_attempt_at=?, last_error=? WHERE id=?",
        (attempts, next_attempt_at, error[:500], item_id),
    )


def dead_letters(c: sqlite3.Connection, limit: int) -> list[DeadLetter]:
    """List dead letters, newest first."""
    rows = c.execute(
        "SELECT id, target, agent_id, kind, message_id, attempts, reason, created_at, "
        "dead_at, payload "
        f"FROM dead_letters ORDER BY dead_at DESC, id DESC LIMIT {int(limit)}",
    ).fetchall()
    return [
        DeadLetter(
            id=r[0],
            target=r[1],
            agent_id=r[2],
            kind=r[3],
            message_id=r[4],
            attempts=r[5],
            reason=r[6],
            created_at=r[7],
            dead_at=r[8],
            payload=json.loads(r[9]),
        )
        for r in rows
    ]


# -- leases among instances sharing the database ------------------------------------


def acquire_lease(c: sqlite3.Connection, name: str, owner: str, ttl: float, now: float) -> bool:
    """Take a free or expired lease, or renew one `owner` holds; False while another holds it."""
    c.execute(
        "INSERT INTO leases(name, owner, expires_at, acquired_at) VALUES (?,?,?,?) "
        "ON CONFLICT(name) DO UPDATE SET owner=excluded.owner, "
        "expires_at=excluded.expires_at, acquired_at=CASE "
        "WHEN leases.owner=excluded.owner AND leases.expires_at>excluded.acquired_at "
        "THEN leases.acquired_at ELSE excluded.acquired_at END "
        "WHERE leases.owner=excluded.owner OR leases.expires_at<=excluded.acquired_at",
        (name, owner, now + ttl, now),
    )
    row = c.execute("SELECT owner FROM leases WHERE name=?", (name,)).fetchone()
    return row is not None and row[0] == owner


def release_lease(c: sqlite3.Connection, name: str, owner: str) -> None:
    """Give a lease up (when `owner` holds it), so another instance may take it at once."""
    c.execute("DELETE FROM leases WHERE name=? AND owner=?", (name, owner))


def leases(c: sqlite3.Connection, now: float) -> list[tuple[str, str, float]]:
    """Return (name, owner, expires_at) of the leases held at `now`, by name."""
    return [
        (r[0], r[1], r[2])
        for r in c.execute(
            "SELECT name, owner, expires_at FROM leases WHERE expires_at>? ORDER BY name", (now,)
        )
    ]


# -- units with more to them -----------------------------------------------------


def resolve_conversation(
    c: sqlite3.Connection,
    conversation_id: str,
    at: float,
    actor: str = "",
    survey: OutboxItem | None = None,
    survey_until: float | None = None,
    *,
    owner: str,
) -> str | None:
    """Close an open conversation and its messages; return the agent who held it."""
    row = c.execute(
        f"SELECT agent_id FROM conversations WHERE id=? AND state='open'{for_update(c)}",
        (conversation_id,),
    ).fetchone()
    if row is None:
        return None
    lock_agent(c, row[0])
    c.execute(
        "UPDATE conversations SET state='resolved', status='resolved', resolved_at=?, "
        "updated_at=?, survey_until=? WHERE id=?",
        (at, at, survey_until if survey is not None else None, conversation_id),
    )
    c.execute(
        "UPDATE messages SET state='resolved' WHERE conversation_id=? AND state!='resolved'",
        (conversation_id,),
    )
    c.execute(
        "UPDATE assignments SET resolved_at=? WHERE conversation_id=? AND resolved_at IS NULL",
        (at, conversation_id),
    )
    holder = str(row[0]) if row[0] is not None else ""
    add_event(
        c,
        conversation_id,
        at,
        EventKind.RESOLVED,
        actor or holder or ROUTER,
        TicketState.RESOLVED,
        {"agent": holder} if holder else {},
    )
    if survey is not None:
        insert_outbox(c, survey, owner=owner)
        add_event(
            c,
            conversation_id,
            at,
            EventKind.SURVEY_SENT,
            ROUTER,
            TicketState.RESOLVED,
            {"channel": str(survey.target), "until": survey_until},
        )
    return holder


def close_conversation(c: sqlite3.Connection, conversation_id: str, at: float, why: str) -> None:
    """Archive a resolved conversation; its thread key is given up for the next ticket.

    The key is kept with the id appended (`UNIQUE (channel, thread_key)` holds for the
    thread's new ticket), so a closed ticket still shows where it came from.
    """
    c.execute(
        "UPDATE conversations SET state='closed', status='closed', closed_at=?, updated_at=?, "
        "survey_until=NULL, thread_key=thread_key || ? || id WHERE id=?",
        (at, at, _CLOSED_KEY_SEPARATOR, conversation_id),
    )
    add_event(c, conversation_id, at, EventKind.CLOSED, ROUTER, TicketState.CLOSED, {"reason": why})


def close_resolved(
    c: sqlite3.Connection, resolved_before: float, at: float, limit: int
) -> list[str]:
    """Close up to limit tickets resolved at or before resolved_before; return their ids."""
    ids = [
        r[0]
        for r in c.execute(
            "SELECT id FROM conversations WHERE state='resolved' AND resolved_at<=? "
            f"ORDER BY resolved_at LIMIT {int(limit)}{for_update(c, skip_locked=True)}",
            (resolved_before,),
        )
    ]
    for conversation_id in ids:
        close_conversation(c, conversation_id, at, "resolved for longer than close_after")
    return ids


def add_event(
    c: sqlite3.Connection,
    conversation_id: str,
    at: float,
    kind: str,
    actor: str,
    status: str,
    detail: dict[str, Any] | None = None,
) -> None:
    """Append one audit row (in the transaction of the change it records)."""
    add_events(c, conversation_id, at, [(kind, actor, status, detail)])


# The audit rows of one change, in order: (kind, actor, status, detail).
EventRow = tuple[str, str, str, dict[str, Any] | None]


def add_events(
    c: sqlite3.Connection, conversation_id: str, at: float, events: Sequence[EventRow]
) -> None:
    """Append a change's audit rows in one statement (their ids keep the given order)."""
    c.execute(
        "INSERT INTO ticket_events(conversation_id, at, kind, actor, status, detail) VALUES "
        + ",".join(["(?,?,?,?,?,?)"] * len(events)),
        [
            value
            for kind, actor, status, detail in events
            for value in (conversation_id, at, str(kind), actor, str(status), _dumps(detail or {}))
        ],
    )


def record_event(c: sqlite3.Connection, event: TicketEvent) -> None:
    """Append an audit row not tied to a state change (a refusal, a presence change)."""
    status = event.status
    if not status and event.conversation_id:
        row = c.execute(
            "SELECT status FROM conversations WHERE id=?", (event.conversation_id,)
        ).fetchone()
        status = row[0] if row else ""
    add_event(
        c, event.conversation_id, event.at, event.kind, event.actor, status, dict(event.detail)
    )


def ticket_events(c: sqlite3.Connection, conversation_id: str) -> list[TicketEvent]:
    """Return a ticket's audit rows, oldest first."""
    return [
        TicketEvent(
            conversation_id=r[0],
            at=r[1],
            kind=r[2],
            actor=r[3],
            status=r[4],
            detail=json.loads(r[5] or "{}"),
        )
        for r in c.execute(
            "SELECT conversation_id, at, kind, actor, status, detail FROM ticket_events "
            "WHERE conversation_id=? ORDER BY id",
            (conversation_id,),
        )
    ]


def reply(
    c: sqlite3.Connection,
    conversation_id: str,
    agent_id: str,
    item: OutboxItem,
    at: float,
    *,
    owner: str,
) -> bool:
    """Queue an agent's answer and mark the ticket waiting on the customer; False if not theirs."""
    row = c.execute(
        f"SELECT status FROM conversations WHERE id=? AND state='open' AND agent_id=?"
        f"{for_update(c)}",
        (conversation_id, agent_id),
    ).fetchone()
    if row is None:
        return False
    insert_outbox(c, item, owner=owner)
    # Answering is taking the conversation up: no accept timeout after that.
    accept(c, conversation_id, agent_id, at)
    c.execute(
        "UPDATE conversations SET status='waiting_on_customer', updated_at=? WHERE id=?",
        (at, conversation_id),
    )
    add_event(
        c,
        conversation_id,
        at,
        EventKind.REPLIED,
        agent_id,
        TicketState.WAITING,
        {"delivery_id": item.id},
    )
    return True


def transfer(
    c: sqlite3.Connection,
    conversation_id: str,
    actor: str,
    to: str,
    queue: str | None,
    at: float,
    notice: OutboxItem | None,
    *,
    owner: str,
) -> list[str]:
    """Take an open conversation from its holder and put its messages back in line.

    Every message of the conversation not resolved waits again (in `queue` when given);
    the holder's assignments end in the offer history as `transferred`. The notice to
    the old holder is completed with the message ids and committed with the change.
    Returns the ids, oldest first; empty when the conversation is not open.
    """
    row = c.execute(
        f"SELECT agent_id, status FROM conversations WHERE id=? AND state='open'{for_update(c)}",
        (conversation_id,),
    ).fetchone()
    if row is None:
        return []
    holder = row[0] or ""
    lock_agent(c, holder)
    held = c.execute(
        "SELECT message_id, agent_id, assigned_at FROM assignments WHERE conversation_id=? "
        "AND resolved_at IS NULL",
        (conversation_id,),
    ).fetchall()
    c.executemany(
        "INSERT INTO assignment_history(message_id, agent_id, assigned_at, ended_at, "
        "outcome) VALUES (?,?,?,?,'transferred')",
        [(r[0], r[1], r[2], at) for r in held],
    )
    c.executemany("DELETE FROM assignments WHERE message_id=?", [(r[0],) for r in held])
    ids = [
        r[0]
        for r in c.execute(
            "SELECT id FROM messages WHERE conversation_id=? AND state!='resolved' ORDER BY id",
            (conversation_id,),
        )
    ]
    if queue is not None:
        c.execute(
            "UPDATE messages SET state='queued', queue=? WHERE conversation_id=? "
            "AND state!='resolved'",
            (queue, conversation_id),
        )
    else:
        c.execute(
            "UPDATE messages SET state='queued' WHERE conversation_id=? AND state!='resolved'",
            (conversation_id,),
        )
    c.execute(
        "UPDATE conversations SET agent_id=NULL, status='new', updated_at=? WHERE id=?",
        (at, conversation_id),
    )
    add_event(
        c,
        conversation_id,
        at,
        EventKind.TRANSFERRED,
        actor,
        TicketState.NEW,
        {"from": holder, "to": to, "message_ids": ids},
    )
    if notice is not None and isinstance(notice.payload, WithdrawnPayload):
        # The ids are the commit's own; completed here, before anything is encoded.
        notice = dataclasses.replace(
            notice, payload=dataclasses.replace(notice.payload, message_ids=tuple(ids))
        )
        insert_outbox(c, notice, owner=owner)
    return ids


def withdraw_offer(
    c: sqlite3.Connection, message_id: str, agent_id: str, at: float, outcome: str
) -> list[str]:
    """Take back unaccepted assignments of the message's conversation from the agent."""
    row = c.execute(
        "SELECT conversation_id FROM assignments WHERE message_id=? AND agent_id=? "
        f"AND accepted_at IS NULL AND resolved_at IS NULL{for_update(c)}",
        (message_id, agent_id),
    ).fetchone()
    if row is None:
        return []
    conversation_id = row[0]
    lock_agent(c, agent_id)
    rows = c.execute(
        "SELECT message_id, assigned_at FROM assignments WHERE conversation_id=? "
        f"AND agent_id=? AND accepted_at IS NULL AND resolved_at IS NULL{for_update(c)}",
        (conversation_id, agent_id),
    ).fetchall()
    ids = [r[0] for r in rows]
    c.executemany(
        "INSERT INTO assignment_history(message_id, agent_id, assigned_at, ended_at, "
        "outcome) VALUES (?,?,?,?,?)",
        [(r[0], agent_id, r[1], at, outcome) for r in rows],
    )
    c.executemany("DELETE FROM assignments WHERE message_id=?", [(i,) for i in ids])
    c.executemany(
        "UPDATE messages SET state='queued' WHERE id=? AND state='assigned'",
        [(i,) for i in ids],
    )
    cur = c.execute(
        "UPDATE conversations SET agent_id=NULL, status='new', updated_at=? "
        "WHERE id=? AND agent_id=?",
        (at, conversation_id, agent_id),
    )
    add_event(
        c,
        conversation_id,
        at,
        EventKind.WITHDRAWN,
        ROUTER,
        TicketState.NEW if cur.rowcount else "",
        {"agent": agent_id, "outcome": outcome, "message_ids": ids},
    )
    return ids


def pending_offers(c: sqlite3.Connection) -> list[tuple[str, str, str, float]]:
    """Return (message id, conversation id, agent id, assigned at) of open offers."""
    rows = c.execute(
        "SELECT a.message_id, a.conversation_id, a.agent_id, a.assigned_at "
        "FROM assignments a JOIN conversations c ON c.id=a.conversation_id "
        "WHERE a.accepted_at IS NULL AND a.resolved_at IS NULL AND c.state='open' "
        "AND c.agent_id=a.agent_id ORDER BY a.assigned_at"
    ).fetchall()
    return [(r[0], r[1], r[2], float(r[3])) for r in rows]


def timed_out_agents(c: sqlite3.Connection) -> dict[str, set[str]]:
    """Return, per queued or assigned message, the agents who let it time out.

    Assigned ones too: an offer pending at a stop may lapse after the start, and its
    message must not go back to an agent who let it lapse before.
    """
    out: dict[str, set[str]] = {}
    for mid, agent in c.execute(
        "SELECT h.message_id, h.agent_id FROM assignment_history h "
        "JOIN messages m ON m.id=h.message_id "
        "WHERE m.state IN ('queued', 'assigned') AND h.outcome='timeout'"
    ):
        out.setdefault(mid, set()).add(agent)
    return out


def open_loads(c: sqlite3.Connection) -> dict[tuple[str, str], int]:
    """Count open conversations per (agent, channel type), whoever assigned them."""
    rows = c.execute(
        "SELECT agent_id, channel_type, COUNT(*) FROM conversations "
        "WHERE state='open' AND agent_id IS NOT NULL GROUP BY agent_id, channel_type"
    ).fetchall()
    return {(r[0], r[1]): int(r[2]) for r in rows}


def accept(c: sqlite3.Connection, conversation_id: str, agent_id: str, at: float) -> bool:
    """Stamp accepted_at on the agent's open assignments in the conversation."""
    cur = c.execute(
        "UPDATE assignments SET accepted_at=? WHERE conversation_id=? AND agent_id=? "
        "AND accepted_at IS NULL AND resolved_at IS NULL",
        (at, conversation_id, agent_id),
    )
    if cur.rowcount <= 0:
        return False
    moved = c.execute(
        "UPDATE conversations SET status='accepted', updated_at=? WHERE id=? AND agent_id=? "
        "AND status IN ('new', 'assigned')",
        (at, conversation_id, agent_id),
    ).rowcount
    if moved:
        add_event(c, conversation_id, at, EventKind.ACCEPTED, agent_id, TicketState.ACCEPTED)
    return True


def sync_agents(c: sqlite3.Connection, agents: list[Agent]) -> dict[str, bool]:
    """Upsert the roster from config; an agent's stored presence outlives restarts."""
    for a in agents:
        c.execute(
            "INSERT INTO agents(id, name, capacity, tool, present) VALUES (?,?,?,?,?) "
            "ON CONFLICT(id) DO UPDATE SET name=excluded.name, capacity=excluded.capacity, "
            "tool=excluded.tool",
            (a.id, a.name, a.capacity, a.tool, int(a.present)),
        )
    ids = [a.id for a in agents]
    rows = c.execute(
        f"SELECT id, present FROM agents WHERE id IN ({marks(len(ids))})", ids
    ).fetchall()
    return {r[0]: bool(r[1]) for r in rows}


def outbox_dead(c: sqlite3.Connection, item_id: str, attempts: int, reason: str, at: float) -> None:
    """Move an outbox item to dead_letters."""
    # A replayed item that fails again replaces its old dead letter.
    c.execute("DELETE FROM dead_letters WHERE id=?", (item_id,))
    c.execute(
        "INSERT INTO dead_letters(id, target, agent_id, address, kind, "
        "payload, message_id, "
        "attempts, reason, created_at, dead_at) SELECT id, target, agent_id, address, "
        "kind, payload, "
        "message_id, ?, ?, created_at, ? FROM outbox WHERE id=?",
        (attempts, reason[:1000], at, item_id),
    )
    c.execute("DELETE FROM outbox WHERE id=?", (item_id,))


def replay_dead_letters(
    c: sqlite3.Connection, ids: list[str] | None, at: float, *, owner: str
) -> int:
    """Move dead letters back to the outbox with a fresh attempt count."""
    where, args = (
        # Never empty: SQLite needs a WHERE between INSERT ... SELECT and its ON CONFLICT.
        ("WHERE true", ()) if ids is None else (f"WHERE id IN ({marks(len(ids))})", tuple(ids))
    )
    c.execute(
        "INSERT INTO outbox(id, target, agent_id, address, kind, payload, "
        "message_id, attempts, "
        "next_attempt_at, created_at, owner) SELECT id, target, agent_id, address, kind, "
        "payload, message_id, 0, ?, "
        f"created_at, ? FROM dead_letters {where} ON CONFLICT (id) DO NOTHING",
        (at, owner, *args),
    )
    return c.execute(f"DELETE FROM dead_letters {where}", args).rowcount


def ticket(c: sqlite3.Connection, conversation_id: str) -> TicketView | None:
    """Return the customer-visible status of a ticket."""
    row = c.execute(
        "SELECT id, state, label, severity, opened_at, respond_by, agent_id, resolved_at, "
        "(SELECT COUNT(*) FROM messages m WHERE m.conversation_id=conversations.id), "
        "status, csat_score FROM conversations WHERE id=?",
        (conversation_id,),
    ).fetchone()
    if row is None:
        return None
    cid, state, label, severity, opened, respond_by, agent, resolved, count, status, score = row
    return TicketView(
        ticket=ticket_number(cid),
        state=state if state != "open" else ("assigned" if agent else "queued"),
        label=label,
        severity=severity,
        opened_at=opened,
        respond_by=respond_by,
        assigned=agent is not None,
        messages=count,
        resolved_at=resolved,
        status=status,
        score=score,
    )


def message(c: sqlite3.Connection, message_id: str) -> dict[str, Any] | None:
    """Return one message with classification and routing."""
    found = rows_as_dicts(c.execute("SELECT * FROM messages WHERE id=?", (message_id,)))
    if not found:
        return None
    out = {k: v for k, v in found[0].items() if k != "raw"}
    for k in ("scores", "signals", "features", "thread_refs"):  # JSON, decoded
        out[k] = json.loads(out[k])
    contact = c.execute(
        "SELECT handle, name FROM contacts WHERE key=?", (out["contact_key"],)
    ).fetchone()
    out["contact_handle"] = contact[0] if contact else ""
    out["contact_name"] = contact[1] if contact else ""
    out["classification"] = {
        "label": out["label"],
        "confidence": out["confidence"],
        "scores": out["scores"],
        "severity": out["severity"],
        "signals": out["signals"],
        "language": out["language"],
        "model_version": out["model_version"],
        "features": out["features"],
    }
    rows = rows_as_dicts(c.execute("SELECT * FROM assignments WHERE message_id=?", (message_id,)))
    assignment = rows[0] if rows else None
    if assignment is not None:
        raw_explain = assignment.get("explain") or ""
        assignment["explain"] = render(json.loads(raw_explain)) if raw_explain else None
    out["assignment"] = assignment
    out["offer_history"] = rows_as_dicts(
        c.execute(
            "SELECT agent_id, assigned_at, ended_at, outcome FROM assignment_history "
            "WHERE message_id=? ORDER BY id",
            (message_id,),
        )
    )
    # `rowid` is SQLite's insertion order; the PostgreSQL schema has a column of that name.
    out["attachments"] = rows_as_dicts(
        c.execute(
            "SELECT name, mime_type, size, sha256, storage_ref FROM attachments "
            "WHERE message_id=? ORDER BY rowid",
            (message_id,),
        )
    )
    return out


def delivery_counts(c: sqlite3.Connection) -> dict[str, int]:
    """Return pending and dead outbox counts."""
    pending = c.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    dead = c.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
    return {"pending": pending, "dead": dead}


def count_messages(c: sqlite3.Connection, labels: list[str], since: float, until: float) -> int:
    """Count messages with one of these labels ingested in [since, until)."""
    if not labels:
        return 0
    in_list = marks(len(labels))
    row = c.execute(
        f"SELECT COUNT(*) FROM messages WHERE label IN ({in_list}) "
        "AND ingested_at >= ? AND ingested_at < ?",
        (*labels, since, until),
    ).fetchone()
    return int(row[0])


def enqueue_outbox(c: sqlite3.Connection, items: list[OutboxItem], *, owner: str) -> None:
    """Commit sends not tied to an ingest (alerts, relayed agent replies)."""
    for item in items:
        insert_outbox(c, item, owner=owner)


def record_correction(
    c: sqlite3.Connection, message_id: str, label: str, agent_id: str, at: float
) -> bool:
    """Store an agent's relabelling of a message; False for an unknown message."""
    row = c.execute(
        "SELECT label, conversation_id FROM messages WHERE id=?", (message_id,)
    ).fetchone()
    if row is None:
        return False
    c.execute(
        "INSERT INTO corrections(message_id, label, previous_label, agent_id, at) "
        "VALUES (?,?,?,?,?)",
        (message_id, label, row[0], agent_id, at),
    )
    record_event(
        c,
        TicketEvent(
            row[1],
            at,
            EventKind.RELABELLED,
            agent_id,
            "",
            {"message_id": message_id, "label": label, "previous": row[0]},
        ),
    )
    return True


def corrections(c: sqlite3.Connection) -> list[dict[str, Any]]:
    """Return the latest correction per message as training records (text, label, lang)."""
    rows = c.execute(
        "SELECT m.id, m.subject, m.text, m.language, k.label, k.previous_label, "
        "k.agent_id, k.at FROM corrections k JOIN messages m ON m.id = k.message_id "
        "WHERE k.id = (SELECT MAX(id) FROM corrections WHERE message_id = k.message_id) "
        "ORDER BY k.id"
    ).fetchall()
    return [
        {
            "id": r[0],
            "text": f"{r[1]}\n{r[2]}" if r[1] else r[2],
            "lang": r[3],
            "label": r[4],
            "previous_label": r[5],
            "agent_id": r[6],
            "at": r[7],
            "source": "correction",
        }
        for r in rows
    ]


def reply_context(c: sqlite3.Connection, conversation_id: str) -> dict[str, Any] | None:
    """Return where an answer in this conversation goes: channel, contact, subject, refs."""
    row = c.execute(
        "SELECT m.id, m.channel, m.channel_type, ct.handle, ct.name, m.subject, "
        "m.reply_ref, m.thread_refs, m.language, cv.agent_id, cv.state, cv.thread_key "
        "FROM messages m "
        "JOIN contacts ct ON ct.key = m.contact_key "
        "JOIN conversations cv ON cv.id = m.conversation_id "
        "WHERE m.conversation_id=? ORDER BY m.id DESC LIMIT 1",
        (conversation_id,),
    ).fetchone()
    if row is None:
        return None
    return {
        "message_id": row[0],
        "channel": row[1],
        "channel_type": row[2],
        "handle": row[3],
        "name": row[4],
        "subject": row[5],
        "reply_ref": row[6],
        "thread_refs": json.loads(row[7] or "[]"),
        "language": row[8],
        "agent_id": row[9],
        "state": row[10],
        "thread_key": row[11],
    }


# -- shared pieces and row mapping ----------------------------------------------


def delete_outbox(c: sqlite3.Connection, ids: list[str]) -> None:
    """Delete delivered outbox items."""
    for start in range(0, len(ids), _DELETE_CHUNK):
        chunk = ids[start : start + _DELETE_CHUNK]
        c.execute(f"DELETE FROM outbox WHERE id IN ({marks(len(chunk))})", chunk)


def insert_outbox(c: sqlite3.Connection, o: OutboxItem, *, owner: str) -> None:
    """Insert one pending send, owned by the instance `owner` ("" = any instance may send it)."""
    c.execute(
        "INSERT INTO outbox(id, target, agent_id, address, kind, payload, message_id, attempts, "
        "next_attempt_at, "
        "created_at, owner) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        (
            o.id,
            str(o.target),
            o.agent_id,
            o.address,
            o.kind,
            _dumps(payload_to_dict(o.payload)),
            o.message_id,
            o.attempts,
            o.next_attempt_at,
            o.created_at,
            owner,
        ),
    )


def insert_assignment(c: sqlite3.Connection, a: Assignment) -> None:
    """Insert one routing decision."""
    c.execute(
        "INSERT INTO assignments(message_id, conversation_id, agent_id, queue, reason, "
        "sla_deadline, assigned_at, explain) "
        "VALUES (?,?,?,?,?,?,?,?)",
        (
            a.message_id,
            a.conversation_id,
            a.agent_id,
            a.queue,
            a.reason,
            a.sla_deadline.timestamp(),
            a.assigned_at.timestamp(),
            _dumps(stored_form(a.explain)) if a.explain else "",
        ),
    )


def _streak(c: sqlite3.Connection, agent_id: str, a: Assignment) -> int:
    """Return the agent's assignments in a row with a streak label (up to the limit)."""
    # The limit is written into the statement, not bound: PostgreSQL plans a prepared
    # statement once for any value, and a plan made without knowing the limit joins and
    # sorts all the agent's assignments (1.4 ms a message after some thousand of them,
    # against a few rows read from the index with the limit known).
    latest = c.execute(
        "SELECT m.label FROM assignments x JOIN messages m ON m.id = x.message_id "
        "WHERE x.agent_id=? ORDER BY x.assigned_at DESC, x.message_id DESC "
        f"LIMIT {int(a.streak_limit)}",
        (agent_id,),
    ).fetchall()
    count = 0
    for (previous,) in latest:
        if previous not in a.streak_labels:
            break
        count += 1
    return count


def streak_allows(c: sqlite3.Connection, a: Assignment, label: str) -> bool:
    """Whether the agent's complaint streak is still what the deciding instance saw.

    Refuses only when it grew meanwhile (another instance gave the agent streak work)
    and reached the limit: the decision was made on a streak that is no longer true.
    """
    if a.streak_seen is None or label not in a.streak_labels or a.streak_limit <= 0:
        return True
    actual = _streak(c, a.agent_id, a)
    if not (actual <= a.streak_seen or actual < a.streak_limit):
        return False
    # Chosen at its limit because everyone else was full or at it too: still true?
    for agent_id, pool, capacity in a.rested_full:
        if _streak(c, agent_id, a) >= a.streak_limit:
            continue
        if pool == "*":
            (held,) = c.execute(
                "SELECT COUNT(*) FROM conversations WHERE agent_id=? AND state='open'",
                (agent_id,),
            ).fetchone()
        else:
            (held,) = c.execute(
                "SELECT COUNT(*) FROM conversations "
                "WHERE agent_id=? AND state='open' AND channel_type=?",
                (agent_id, pool),
            ).fetchone()
        if int(held) < capacity:
            return False
    return True


def holder_allows(a: Assignment, holder: str | None) -> bool:
    """Whether giving the message to `a.agent_id` keeps its conversation whole.

    Refuses when the conversation has a holder other than the chosen agent that the
    deciding instance did not know of (another instance assigned it meanwhile).
    """
    if a.holder_seen is None or not holder or holder == a.agent_id:
        return True
    return holder == a.holder_seen


def lock_agent(c: sqlite3.Connection, agent_id: str | None) -> None:
    """Hold the agent's row until the commit (PostgreSQL; SQLite's writer holds all).

    Every unit that changes an agent's load takes it after the conversation's row:
    two instances' checks for one agent (room, streak) take turns, and the audit rows
    of one agent's assignments and resolves are numbered in the order they commit.
    """
    lock = for_update(c)
    if agent_id and lock:  # SQLite: the writer holds the whole database already
        c.execute(f"SELECT id FROM agents WHERE id=?{lock}", (agent_id,)).fetchall()


def has_room(
    c: sqlite3.Connection, a: Assignment, conversation_id: str, *, known: bool = True
) -> bool:
    """Tell whether the agent may take one more conversation (checked in the transaction).

    The scheduler in memory already checked; this is the check that holds when two
    workers (or two daemons on one database) decide at the same time: whether this
    conversation is already one of the agent's open ones (a follow-up joins the slot it
    holds), else the count of the agent's open conversations (of the pool). `known`
    False: the conversation is not in the store yet, so it holds no slot.
    """
    if a.capacity <= 0:
        return True
    lock_agent(c, a.agent_id)
    # Two lookups rather than one COUNT with a CASE on the id: the count then reads the
    # (agent_id, state) index alone, not every open conversation's row (an agent with
    # hundreds of open chats made this the writer's costliest statement).
    if (
        known
        and c.execute(
            "SELECT 1 FROM conversations WHERE id=? AND agent_id=? AND state='open'",
            (conversation_id, a.agent_id),
        ).fetchone()
    ):
        return True
    if a.pool == "*":
        (held,) = c.execute(
            "SELECT COUNT(*) FROM conversations WHERE agent_id=? AND state='open'",
            (a.agent_id,),
        ).fetchone()
    else:
        (held,) = c.execute(
            "SELECT COUNT(*) FROM conversations "
            "WHERE agent_id=? AND state='open' AND channel_type=?",
            (a.agent_id, a.pool),
        ).fetchone()
    return int(held) < a.capacity


def ingest(c: sqlite3.Connection, new: NewMessage, raw: bytes, *, owner: str) -> IngestResult:
    """Commit a message with its contact, conversation, assignment and outbox items."""
    m = new.inbound
    dup = c.execute(
        "SELECT id, conversation_id, state, payload_sha256 FROM messages WHERE channel=? AND "
        "external_id=?",
        (m.channel, m.external_id),
    ).fetchone()
    if dup is not None:
        conflict = bool(m.payload_sha256 and dup[3] and m.payload_sha256 != dup[3])
        return IngestResult(dup[0], dup[1], duplicate=True, state=dup[2], payload_conflict=conflict)

    contact_key = f"{m.channel_type}:{m.contact_handle}"
    at = new.ingested_at
    contact = link_contact(
        c,
        contact_key,
        m.contact_name,
        m.identifiers,
        at,
        channel_type=m.channel_type,
        handle=m.contact_handle,
    )
    survey = _survey_answer(c, new) if new.survey_score is not None and new.survey_of else None
    if survey is not None and new.survey_score is not None and new.survey_score > LOW_SCORE:
        # A satisfied answer is the ticket's score, nothing more: stored with the resolved
        # ticket (so a redelivery is a duplicate), never routed.
        _insert_message(c, new, survey, contact_key, MessageState.RESOLVED, raw)
        return IngestResult(
            new.message_id,
            survey,
            duplicate=False,
            state=str(MessageState.RESOLVED),
            survey_score=new.survey_score,
            contact=contact,
        )
    cls = new.classification
    conversation_id = new.conversation_id
    reopened = False
    row = c.execute(
        "SELECT id, state, agent_id, resolved_at, status FROM conversations "
        f"WHERE channel=? AND thread_key=?{for_update(c)}",
        (m.channel, new.thread_key),
    ).fetchone()
    if row is not None and row[1] == "resolved" and survey is None:
        window_open = new.reopen_since is None or (row[3] or 0.0) >= new.reopen_since
        if not window_open:
            # Too late to reopen: the old ticket is closed, this message starts a new one.
            close_conversation(c, row[0], at, "a follow-up came after the reopen window")
            row = None
    # The caller placed the message without knowing the thread's open conversation (it
    # proposed a new id): another instance opened it and an agent holds it. Giving the
    # message to someone else would split the conversation; it waits instead, and the
    # caller learns the holder (sticky placement) before placing it again.
    unknown_holder = (
        new.assignment is not None
        and row is not None
        and row[1] == "open"
        and row[2] is not None
        and row[2] != new.assignment.agent_id
        and row[0] != conversation_id
    )
    refused = new.assignment is not None and (
        unknown_holder
        or (row is not None and row[1] == "open" and not holder_allows(new.assignment, row[2]))
        or not has_room(
            c,
            new.assignment,
            row[0] if row is not None else conversation_id,
            known=row is not None,
        )
        or not streak_allows(c, new.assignment, new.classification.label)
    )
    assignment = None if refused else new.assignment
    agent_id = assignment.agent_id if assignment else None
    status = TicketState.ASSIGNED if agent_id else TicketState.NEW
    if row is None:
        c.execute(
            "INSERT INTO conversations(id, channel, thread_key, contact_key, state, agent_id, "
            "label, severity, "
            "opened_at, updated_at, respond_by, channel_type, status) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                conversation_id,
                m.channel,
                new.thread_key,
                contact_key,
                "open",
                agent_id,
                cls.label,
                cls.severity,
                at,
                at,
                new.sla_deadline,
                m.channel_type,
                str(status),
            ),
        )
        opened: EventRow = (
            EventKind.CREATED,
            CUSTOMER,
            TicketState.NEW,
            {"message_id": new.message_id, "label": cls.label, "severity": cls.severity},
        )
        add_events(c, conversation_id, at, _opened(opened, status, assignment))
    else:
        conversation_id = row[0]
        reopened = row[1] != "open"
        if reopened:
            # A reopened ticket starts afresh: the new message's holder (or none), label,
            # severity and response deadline; the old ones belong to the resolved episode.
            c.execute(
                "UPDATE conversations SET state='open', resolved_at=NULL, updated_at=?, "
                "agent_id=?, label=?, severity=?, respond_by=?, status=?, survey_until=NULL "
                "WHERE id=?",
                (
                    at,
                    agent_id,
                    cls.label,
                    cls.severity,
                    new.sla_deadline,
                    str(status),
                    conversation_id,
                ),
            )
            why = "unsatisfied survey answer" if survey is not None else "customer follow-up"
            first: EventRow = (
                EventKind.REOPENED,
                CUSTOMER,
                TicketState.NEW,
                {"message_id": new.message_id, "reason": why},
            )
            add_events(c, conversation_id, at, _opened(first, status, assignment))
        else:
            # A follow-up keeps the conversation's holder unless the caller assigned anew,
            # and can only raise its severity (P0 < P3).
            held, was = row[2], row[4]
            now_status = was
            if agent_id and agent_id != held:
                now_status = str(TicketState.ASSIGNED)
            elif was == TicketState.WAITING:
                now_status = str(TicketState.ACCEPTED)  # the customer answered: agent's turn
            c.execute(
                "UPDATE conversations SET updated_at=?, agent_id=COALESCE(?, agent_id), "
                "severity=CASE WHEN severity < ? THEN severity ELSE ? END, status=? WHERE id=?",
                (at, agent_id, cls.severity, cls.severity, now_status, conversation_id),
            )
            if now_status != was:
                if now_status == TicketState.ASSIGNED:
                    add_event(
                        c,
                        conversation_id,
                        at,
                        EventKind.ASSIGNED,
                        ROUTER,
                        now_status,
                        _assigned_detail(assignment),
                    )
                else:
                    add_event(
                        c,
                        conversation_id,
                        at,
                        EventKind.CUSTOMER_REPLIED,
                        CUSTOMER,
                        now_status,
                        {"message_id": new.message_id},
                    )
    state = MessageState.ASSIGNED if assignment else MessageState.QUEUED
    _insert_message(c, new, conversation_id, contact_key, state, raw)
    if assignment is not None:
        if conversation_id != assignment.conversation_id:
            assignment.conversation_id = conversation_id
        insert_assignment(c, assignment)
    committed: list[OutboxItem] = []
    for outbox in (new.outbox, *new.extra_outbox):
        if outbox is None or (refused and outbox is new.outbox):
            continue  # no delivery for an assignment the store refused
        if conversation_id != new.conversation_id:
            # The payload names the conversation the message really joined; decided here,
            # in the commit, before anything is encoded.
            outbox = dataclasses.replace(
                outbox, payload=outbox.payload.with_conversation(conversation_id)
            )
        insert_outbox(c, outbox, owner=owner)
        committed.append(outbox)
    return IngestResult(
        new.message_id,
        conversation_id,
        duplicate=False,
        state=str(state),
        reopened=reopened,
        assigned=not refused,
        outbox=tuple(committed),
        survey_score=new.survey_score if survey is not None else None,
        contact=contact,
    )


def _survey_answer(c: sqlite3.Connection, new: NewMessage) -> str | None:
    """Record a survey answer on the surveyed ticket; return its id (None: not pending)."""
    row = c.execute(
        "SELECT id FROM conversations WHERE id=? AND state='resolved' AND survey_until>=?"
        f"{for_update(c)}",
        (new.survey_of, new.ingested_at),
    ).fetchone()
    if row is None:
        return None  # answered, reopened or closed meanwhile: an ordinary message
    score = new.survey_score
    c.execute(
        "UPDATE conversations SET csat_score=?, csat_at=?, survey_until=NULL WHERE id=?",
        (score, new.ingested_at, row[0]),
    )
    add_event(
        c,
        row[0],
        new.ingested_at,
        EventKind.SURVEY_ANSWERED,
        CUSTOMER,
        TicketState.RESOLVED,
        {
            "score": score,
            "message_id": new.message_id,
            "low": score is not None and score <= LOW_SCORE,
        },
    )
    return str(row[0])


def _opened(first: EventRow, status: str, assignment: Assignment | None) -> list[EventRow]:
    """The audit rows of a ticket (re)opened by a message: `first`, then its assignment."""
    if assignment is None:
        return [first]
    return [first, (EventKind.ASSIGNED, ROUTER, status, _assigned_detail(assignment))]


def _assigned_detail(a: Assignment | None) -> dict[str, Any]:
    if a is None:
        return {}
    return {"agent": a.agent_id, "queue": a.queue, "message_id": a.message_id, "reason": a.reason}


def _insert_message(
    c: sqlite3.Connection,
    new: NewMessage,
    conversation_id: str,
    contact_key: str,
    state: MessageState,
    raw: bytes,
) -> None:
    """Insert the message row and its attachments."""
    m, cls = new.inbound, new.classification
    c.execute(
        "INSERT INTO messages(id, channel, channel_type, external_id, payload_sha256, "
        "conversation_id, contact_key, "
        "subject, text, language, received_at, ingested_at, label, confidence, scores, severity, "
        "signals, "
        "model_version, features, queue, sla_deadline, state, raw, reply_ref, thread_refs) VALUES "
        "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (
            new.message_id,
            m.channel,
            m.channel_type,
            m.external_id,
            m.payload_sha256,
            conversation_id,
            contact_key,
            m.subject,
            m.text,
            cls.language,
            m.received_at.timestamp() if m.received_at else new.ingested_at,
            new.ingested_at,
            cls.label,
            cls.confidence,
            _dumps(cls.scores),
            cls.severity,
            _dumps([s.to_dict() for s in cls.signals]),
            cls.model_version,
            _dumps(cls.features),
            new.queue,
            new.sla_deadline,
            str(state),
            raw or None,
            m.reply_ref,
            _dumps(list(m.thread_refs)),
        ),
    )
    for att in m.attachments:
        c.execute(
            "INSERT INTO attachments(message_id, name, mime_type, size, sha256, storage_ref) "
            "VALUES (?,?,?,?,?,?)",
            (new.message_id, att.name, att.mime_type, att.size, att.sha256, att.storage_ref),
        )


def assign(c: sqlite3.Connection, a: Assignment, outbox: OutboxItem, *, owner: str) -> bool:
    """Assign a queued message and queue its delivery; False when it is not queued."""
    row = c.execute(
        f"SELECT conversation_id, label FROM messages WHERE id=? AND state='queued'{for_update(c)}",
        (a.message_id,),
    ).fetchone()
    if row is None:
        return False
    # The message's own conversation, whatever the caller believed it to be. Locked
    # before the agent (as ingest and resolve do), so two units never wait on each other.
    conversation_id = row[0]
    before = c.execute(
        f"SELECT agent_id, status FROM conversations WHERE id=?{for_update(c)}",
        (conversation_id,),
    ).fetchone()
    if not has_room(c, a, conversation_id) or not streak_allows(c, a, row[1]):
        return False
    if before is not None and not holder_allows(a, before[0]):
        return False
    c.execute("UPDATE messages SET state='assigned' WHERE id=?", (a.message_id,))
    at = a.assigned_at.timestamp()
    held, status = (before[0], before[1]) if before else (None, "")
    if held != a.agent_id:
        status = str(TicketState.ASSIGNED)
    elif status == TicketState.WAITING:
        status = str(TicketState.ACCEPTED)  # a follow-up joined while the holder was away
    c.execute(
        "UPDATE conversations SET agent_id=?, updated_at=?, status=? WHERE id=?",
        (a.agent_id, at, status, conversation_id),
    )
    if held != a.agent_id:
        add_event(c, conversation_id, at, EventKind.ASSIGNED, ROUTER, status, _assigned_detail(a))
    if a.conversation_id != conversation_id:
        a = dataclasses.replace(a, conversation_id=conversation_id)
    insert_assignment(c, a)
    insert_outbox(c, outbox, owner=owner)
    return True


def outbox_item(r: tuple[Any, ...]) -> OutboxItem:
    """Map an outbox row (in `_OUTBOX_COLUMNS` order) to an item."""
    return OutboxItem(
        id=r[0],
        target=target_from_str(r[1]),
        agent_id=r[2],
        address=r[3],
        payload=payload_from_dict(r[4], json.loads(r[5])),
        message_id=r[6],
        attempts=r[7],
        next_attempt_at=r[8],
        created_at=r[9],
    )


def routing_view(
    c: sqlite3.Connection,
    streak_labels: frozenset[str],
    depth: int,
    since: float,
    conversations: frozenset[str] | None = None,
    arrivals_since: float | None = None,
) -> RoutingView:
    """Return open conversations, queued messages, presence and streaks since `since`.

    With `conversations`, only those conversations and their queued messages (a look at
    what changed); presence and streaks are always whole (they are small). A whole view
    with `arrivals_since` also counts the messages taken in since then, per class.
    """
    view = RoutingView(scope=conversations)
    where, args = "", cast(tuple[str, ...], ())
    if conversations is not None:
        ids = tuple(conversations)
        where, args = f" AND id IN ({marks(len(ids))})", ids
    view.open_conversations = [
        OpenConversation(*r)
        for r in c.execute(
            "SELECT id, channel, thread_key, agent_id, channel_type FROM conversations "
            f"WHERE state='open'{where}",
            args,
        )
    ]
    view.queued = [
        QueuedMessage(*r)
        for r in c.execute(
            "SELECT id, conversation_id, queue, label, severity, language, sla_deadline, "
            "ingested_at, channel_type "
            f"FROM messages WHERE state='queued'{where.replace(' id IN', ' conversation_id IN')} "
            "ORDER BY id",
            args,
        )
    ]
    view.presence = {r[0]: bool(r[1]) for r in c.execute("SELECT id, present FROM agents")}
    # Each agent's latest assignments, newest first (a window function: both engines).
    latest = c.execute(
        "SELECT agent_id, label, assigned_at FROM ("
        "SELECT a.agent_id, m.label, a.assigned_at, ROW_NUMBER() OVER "
        "(PARTITION BY a.agent_id ORDER BY a.assigned_at DESC, a.message_id DESC) AS n "
        "FROM assignments a JOIN messages m ON m.id = a.message_id "
        "WHERE a.assigned_at >= ?) AS recent "
        "WHERE n <= ? ORDER BY agent_id, assigned_at DESC",
        (since, depth),
    )
    counting: set[str] = set()
    for agent_id, label, assigned_at in latest:
        if agent_id not in view.streaks:
            view.streaks[agent_id] = (0, float(assigned_at))
            counting.add(agent_id)
        if agent_id in counting:
            if label in streak_labels:
                streak, last = view.streaks[agent_id]
                view.streaks[agent_id] = (streak + 1, last)
            else:
                counting.discard(agent_id)
    if conversations is None and arrivals_since is not None:
        view.arrivals = [
            (str(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]), int(r[5]))
            for r in c.execute(
                "SELECT label, severity, language, queue, channel_type, COUNT(*) "
                "FROM messages WHERE ingested_at >= ? "
                "GROUP BY label, severity, language, queue, channel_type",
                (arrivals_since,),
            )
        ]
    return view


def snapshot(c: sqlite3.Connection, now: float, repeat_window: float, *, owner: str) -> Snapshot:
    """Load what the router keeps in memory (the pending sends `owner` may send, claimed)."""
    snap = Snapshot()
    snap.open_conversations = [
        OpenConversation(*r)
        for r in c.execute(
            "SELECT id, channel, thread_key, agent_id, channel_type FROM conversations "
            "WHERE state='open'"
        )
    ]
    snap.queued = [
        QueuedMessage(*r)
        for r in c.execute(
            "SELECT id, conversation_id, queue, label, severity, language, sla_deadline, "
            "ingested_at, channel_type "
            "FROM messages WHERE state='queued' ORDER BY id"
        )
    ]
    snap.pending_outbox = claim_outbox(c, owner, now, due_by=None, limit=None)
    snap.recent_contacts = [
        (r[0], r[1])
        for r in c.execute(
            "SELECT contact_key, ingested_at FROM messages WHERE ingested_at>=? ORDER BY "
            "ingested_at",
            (now - repeat_window,),
        )
    ]
    snap.presence = {r[0]: bool(r[1]) for r in c.execute("SELECT id, present FROM agents")}
    snap.contact_handles, snap.contact_identifiers, snap.contact_links = book_rows(
        c, now - repeat_window
    )
    snap.pending_surveys = [
        PendingSurvey(*r)
        for r in c.execute(
            "SELECT id, channel, thread_key, survey_until FROM conversations "
            "WHERE survey_until IS NOT NULL AND survey_until>? AND state='resolved'",
            (now,),
        )
    ]
    return snap
