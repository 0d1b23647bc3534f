"""Numbered schema migrations for the SQLite store.

Each migration is a function registered with its number and a description; the
database records the highest one applied in `PRAGMA user_version`. Add a new
migration at the end; never edit one that has shipped.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Callable, Sequence

Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: list[tuple[int, str, Migration]] = []


class SchemaTooNewError(RuntimeError):
    """The database was migrated by a newer omnirouter than this one."""


def register(
    number: int,
    description: str,
    registry: list[tuple[int, str, Migration]] | None = None,
) -> Callable[[Migration], Migration]:
    """Register a migration; numbers must follow each other without gaps.

    `registry` defaults to the module's MIGRATIONS; tests pass a list of their own.
    """
    target = MIGRATIONS if registry is None else registry

    def wrap(fn: Migration) -> Migration:
        expected = len(target) + 1
        if number != expected:
            raise RuntimeError(f"migration {number} registered out of order (expected {expected})")
        target.append((number, description, fn))
        return fn

    return wrap


def run_script(c: sqlite3.Connection, script: str) -> None:
    """Run a multi-statement SQL script inside the caller's transaction.

    `Connection.executescript` is not usable in a migration: it COMMITs any open
    transaction first, so the statements after it would each autocommit and a
    failure would leave a half-applied schema. This runs them one by one instead
    (`sqlite3.complete_statement` finds the statement ends, so a `;` inside a
    string, a comment or a trigger body does not split a statement).
    """
    pieces = script.split(";")
    statement = ""
    for piece in pieces[:-1]:
        statement += piece + ";"
        if sqlite3.complete_statement(statement):
            if statement.strip(" \t\r\n;"):
                c.execute(statement)  # a comment-only statement is a harmless no-op
            statement = ""
    rest = statement + pieces[-1]
    if rest.strip(" \t\r\n") and not _only_comments(rest):
        raise ValueError(f"incomplete SQL statement at the end of a migration script: {rest!r}")


def _only_comments(sql: str) -> bool:
    """Whether `sql` holds nothing but `--` comments and whitespace."""
    return all(not line.split("--", 1)[0].strip() for line in sql.splitlines())


@register(
    1,
    "initial schema: contacts, conversations, messages, agents, assignments, outbox, dead letters",
)
def _v001(c: sqlite3.Connection) -> None:
    run_script(
        c,
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE contacts (
            key TEXT PRIMARY KEY,            -- channel_type:handle
            channel_type TEXT NOT NULL,
            handle TEXT NOT NULL,
            name TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL
        );
        CREATE TABLE conversations (
            id TEXT PRIMARY KEY,             -- ULID; the ticket number is 'T-' || id
            channel TEXT NOT NULL,
            thread_key TEXT NOT NULL,
            contact_key TEXT NOT NULL REFERENCES contacts(key),
            state TEXT NOT NULL,             -- open | resolved
            agent_id TEXT,
            label TEXT NOT NULL,
            severity TEXT NOT NULL,
            opened_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            respond_by REAL NOT NULL,
            resolved_at REAL,
            UNIQUE (channel, thread_key)
        );
        CREATE INDEX conversations_open ON conversations(state) WHERE state = 'open';
        CREATE TABLE messages (
            id TEXT PRIMARY KEY,             -- ULID
            channel TEXT NOT NULL,
            channel_type TEXT NOT NULL,
            external_id TEXT NOT NULL,
            payload_sha256 TEXT NOT NULL DEFAULT '',
            conversation_id TEXT NOT NULL REFERENCES conversations(id),
            contact_key TEXT NOT NULL REFERENCES contacts(key),
            subject TEXT NOT NULL DEFAULT '',
            text TEXT NOT NULL,
            language TEXT NOT NULL,
            received_at REAL NOT NULL,
            ingested_at REAL NOT NULL,
            label TEXT NOT NULL,
            confidence REAL NOT NULL,
            scores TEXT NOT NULL,            -- JSON
            severity TEXT NOT NULL,
            signals TEXT NOT NULL,           -- JSON
            model_version TEXT NOT NULL,
            features TEXT NOT NULL DEFAULT '[]',
            queue TEXT NOT NULL,
            sla_deadline REAL NOT NULL,
            state TEXT NOT NULL,             -- queued | assigned | resolved
            raw BLOB,
            UNIQUE (channel, external_id)    -- a second delivery of the same message is a no-op
        );
        CREATE INDEX messages_queued ON messages(state) WHERE state = 'queued';
        CREATE INDEX messages_conversation ON messages(conversation_id);
        CREATE INDEX messages_contact_time ON messages(ingested_at, contact_key);
        CREATE TABLE attachments (
            message_id TEXT NOT NULL REFERENCES messages(id),
            name TEXT NOT NULL,
            mime_type TEXT NOT NULL,
            size INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            storage_ref TEXT NOT NULL DEFAULT ''
        );
        CREATE TABLE agents (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL DEFAULT '',
            capacity INTEGER NOT NULL,
            tool TEXT NOT NULL,
            present INTEGER NOT NULL DEFAULT 1
        );
        CREATE TABLE assignments (
            -- one assignment per message, ever
            message_id TEXT PRIMARY KEY REFERENCES messages(id),
            conversation_id TEXT NOT NULL,
            agent_id TEXT NOT NULL,
            queue TEXT NOT NULL,
            reason TEXT NOT NULL,
            sla_deadline REAL NOT NULL,
            assigned_at REAL NOT NULL,
            accepted_at REAL,
            resolved_at REAL
        );
        CREATE INDEX assignments_conversation ON assignments(conversation_id);
        CREATE TABLE outbox (
            id TEXT PRIMARY KEY,             -- the idempotency key every retry carries
            target TEXT NOT NULL,
            agent_id TEXT NOT NULL,
            address TEXT NOT NULL DEFAULT '',
            kind TEXT NOT NULL,
            payload TEXT NOT NULL,           -- JSON
            message_id TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at REAL NOT NULL,
            last_error TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL
        );
        CREATE INDEX outbox_due ON outbox(next_attempt_at);
        CREATE TABLE dead_letters (
            id TEXT PRIMARY KEY,
            target TEXT NOT NULL,
            agent_id TEXT NOT NULL,
            address TEXT NOT NULL DEFAULT '',
            kind TEXT NOT NULL,
            payload TEXT NOT NULL,
            message_id TEXT NOT NULL,
            attempts INTEGER NOT NULL,
            reason TEXT NOT NULL,
            created_at REAL NOT NULL,
            dead_at REAL NOT NULL
        );
        """,
    )
    c.execute("INSERT INTO meta(key, value) VALUES ('secret', ?)", (os.urandom(32).hex(),))


@register(2, "message reply references; agent label corrections")
def _v002(c: sqlite3.Connection) -> None:
    run_script(
        c,
        """
        ALTER TABLE messages ADD COLUMN reply_ref TEXT NOT NULL DEFAULT '';
        ALTER TABLE messages ADD COLUMN thread_refs TEXT NOT NULL DEFAULT '[]';
        CREATE TABLE corrections (
            id INTEGER PRIMARY KEY,
            message_id TEXT NOT NULL REFERENCES messages(id),
            label TEXT NOT NULL,             -- what the agent says it is
            previous_label TEXT NOT NULL,    -- what the classifier said
            agent_id TEXT NOT NULL,
            at REAL NOT NULL
        );
        CREATE INDEX corrections_message ON corrections(message_id);
        """,
    )


@register(3, "scheduling: channel type per conversation, explain records, offer history")
def _v003(c: sqlite3.Connection) -> None:
    run_script(
        c,
        """
        ALTER TABLE conversations ADD COLUMN channel_type TEXT NOT NULL DEFAULT '';
        UPDATE conversations SET channel_type = COALESCE(
            (SELECT m.channel_type FROM messages m WHERE m.conversation_id = conversations.id
             ORDER BY m.ingested_at LIMIT 1), '');
        CREATE INDEX conversations_agent ON conversations(agent_id, state);
        ALTER TABLE assignments ADD COLUMN explain TEXT NOT NULL DEFAULT '';  -- JSON
        CREATE TABLE assignment_history (
            -- offers taken back: not accepted in time, or the agent went off line
            id INTEGER PRIMARY KEY,
            message_id TEXT NOT NULL REFERENCES messages(id),
            agent_id TEXT NOT NULL,
            assigned_at REAL NOT NULL,
            ended_at REAL NOT NULL,
            outcome TEXT NOT NULL            -- timeout | returned
        );
        CREATE INDEX assignment_history_message ON assignment_history(message_id);
        """,
    )


@register(4, "ticket lifecycle: status, survey and score per conversation; ticket_events audit")
def _v004(c: sqlite3.Connection) -> None:
    run_script(
        c,
        """
        -- new | assigned | accepted | waiting_on_customer | resolved | closed
        -- (router/lifecycle.py); `state` stays open | resolved | closed for the router.
        ALTER TABLE conversations ADD COLUMN status TEXT NOT NULL DEFAULT 'new';
        UPDATE conversations SET status = CASE
            WHEN state = 'resolved' THEN 'resolved'
            WHEN agent_id IS NULL THEN 'new'
            WHEN EXISTS (SELECT 1 FROM assignments a WHERE a.conversation_id = conversations.id
                         AND a.agent_id = conversations.agent_id
                         AND a.accepted_at IS NOT NULL AND a.resolved_at IS NULL) THEN 'accepted'
            ELSE 'assigned' END;
        ALTER TABLE conversations ADD COLUMN closed_at REAL;
        -- The satisfaction survey: pending while survey_until is set (cleared when
        -- answered, reopened or closed); the latest answer is the ticket's score.
        ALTER TABLE conversations ADD COLUMN survey_until REAL;
        ALTER TABLE conversations ADD COLUMN csat_score INTEGER;
        ALTER TABLE conversations ADD COLUMN csat_at REAL;
        CREATE INDEX conversations_resolved ON conversations(resolved_at)
            WHERE state = 'resolved';
        CREATE INDEX conversations_survey ON conversations(survey_until)
            WHERE survey_until IS NOT NULL;
        CREATE TABLE ticket_events (
            -- the audit: every transition and agent action, who and when
            id INTEGER PRIMARY KEY,
            conversation_id TEXT NOT NULL,   -- '' for an agent's own event (presence)
            at REAL NOT NULL,
            kind TEXT NOT NULL,              -- router.lifecycle.EventKind
            actor TEXT NOT NULL,             -- agent id, customer, router or ops
            status TEXT NOT NULL DEFAULT '', -- the ticket's status after the event
            detail TEXT NOT NULL DEFAULT '{}'  -- JSON: agent, reason, score, from/to, ...
        );
        CREATE INDEX ticket_events_conversation ON ticket_events(conversation_id, id);
        """,
    )
    # Open tickets get their first audit row now, so no history starts empty.
    c.execute(
        "INSERT INTO ticket_events(conversation_id, at, kind, actor, status, detail) "
        "SELECT id, opened_at, 'created', 'customer', status, '{\"migrated\":true}' "
        "FROM conversations"
    )


@register(5, "contacts across channels: people, verified identifiers, merge links, audit")
def _v005(c: sqlite3.Connection) -> None:
    run_script(
        c,
        """
        -- A person (router/contacts.py): one or more handles (rows of `contacts`, one per
        -- channel address). merged_into links a merged contact to the one it joined.
        CREATE TABLE people (
            id TEXT PRIMARY KEY,             -- c_ + 16 hex digits
            created_at REAL NOT NULL,
            name TEXT NOT NULL DEFAULT '',
            merged_into TEXT REFERENCES people(id),
            merged_at REAL
        );
        CREATE INDEX people_merged_into ON people(merged_into) WHERE merged_into IS NOT NULL;
        ALTER TABLE contacts ADD COLUMN person_id TEXT REFERENCES people(id);
        CREATE INDEX contacts_person ON contacts(person_id);
        -- Identifiers a channel vouched for; each belongs to the person it was first seen for.
        CREATE TABLE contact_identifiers (
            identifier TEXT PRIMARY KEY,     -- email:..., phone:+..., telegram:<user id>
            person_id TEXT NOT NULL REFERENCES people(id),
            contact_key TEXT NOT NULL,       -- the handle it first came with
            first_seen REAL NOT NULL
        );
        CREATE INDEX contact_identifiers_person ON contact_identifiers(person_id);
        -- The audit of every join and split: merge (agent/admin), link (verified
        -- identifier), unmerge; and the pairs an unmerge separated, never linked again.
        CREATE TABLE contact_events (
            id INTEGER PRIMARY KEY,
            at REAL NOT NULL,
            action TEXT NOT NULL,            -- merge | link | unmerge
            person_id TEXT NOT NULL,         -- the contact merged, linked or taken out
            other_id TEXT NOT NULL,          -- the contact it joined or left
            actor TEXT NOT NULL,             -- agent id, ops, or router
            detail TEXT NOT NULL DEFAULT '{}'
        );
        CREATE INDEX contact_events_person ON contact_events(person_id, id);
        CREATE INDEX contact_events_other ON contact_events(other_id, id);
        CREATE TABLE contact_separations (
            person_id TEXT NOT NULL,
            other_id TEXT NOT NULL,
            PRIMARY KEY (person_id, other_id)
        );
        -- The repeat-contact count reads a handle's recent messages.
        CREATE INDEX messages_contact_recent ON messages(contact_key, ingested_at);
        """,
    )
    # Every existing handle becomes a contact of its own.
    rows = c.execute("SELECT key, name, created_at FROM contacts").fetchall()
    for key, name, created_at in rows:
        person = new_person_id()
        c.execute(
            "INSERT INTO people(id, created_at, name) VALUES (?,?,?)", (person, created_at, name)
        )
        c.execute("UPDATE contacts SET person_id=? WHERE key=?", (person, key))


@register(6, "several instances: leases, and the instance that owns each outbox item")
def _v006(c: sqlite3.Connection) -> None:
    run_script(
        c,
        """
        -- Who holds what among instances sharing the database (router/leases.py):
        -- instance:<id> while an instance lives, channel:<name> / tool:<name> for a
        -- source that must have one reader. Free once expires_at has passed.
        CREATE TABLE leases (
            name TEXT PRIMARY KEY,
            owner TEXT NOT NULL,             -- the holding instance's id
            expires_at REAL NOT NULL,
            acquired_at REAL NOT NULL        -- when this owner took it (renewals keep it)
        );
        -- The instance that sends the item ('' = any): another instance takes it over
        -- only once the owner's instance lease is gone.
        ALTER TABLE outbox ADD COLUMN owner TEXT NOT NULL DEFAULT '';
        """,
    )


def new_person_id() -> str:
    """Return a fresh contact id (`c_` and 16 hex digits)."""
    return "c_" + secrets.token_hex(8)


def latest_version(migrations: Sequence[tuple[int, str, Migration]] | None = None) -> int:
    """Return the schema version the given (default: registered) migrations reach."""
    return len(MIGRATIONS if migrations is None else migrations)


def migrate(
    conn: sqlite3.Connection,
    migrations: Sequence[tuple[int, str, Migration]] | None = None,
) -> list[int]:
    """Apply every migration newer than the database; return the numbers applied.

    Each migration runs in its own `BEGIN IMMEDIATE` transaction together with the
    `user_version` bump, so it is applied entirely or not at all. A database at a
    newer version than `migrations` knows is refused with SchemaTooNewError.
    `migrations` defaults to the registered MIGRATIONS (tests pass their own).
    """
    steps = list(MIGRATIONS if migrations is None else migrations)
    for index, (number, _description, _fn) in enumerate(steps, start=1):
        if number != index:
            raise RuntimeError(f"migration {number} out of order (expected {index})")
    latest = len(steps)
    if conn.in_transaction:  # checked first: setting isolation_level would COMMIT it
        raise RuntimeError("migrate() needs a connection without an open transaction")
    saved_isolation = conn.isolation_level
    conn.isolation_level = None  # explicit transactions only; no implicit BEGIN/COMMIT
    try:
        current = conn.execute("PRAGMA user_version").fetchone()[0]
        if current > latest:
            raise SchemaTooNewError(
                f"database schema v{current} is newer than this omnirouter knows (v{latest}); "
                "upgrade omnirouter or restore a matching backup"
            )
        applied: list[int] = []
        for number, description, fn in steps[current:]:
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Re-check under the write lock: another process may have migrated meanwhile.
                now_at = conn.execute("PRAGMA user_version").fetchone()[0]
                if now_at >= number:
                    conn.execute("COMMIT")
                    continue
                fn(conn)
                if not conn.in_transaction:
                    raise RuntimeError(
                        f"migration {number} ({description}) ended the transaction "
                        "(executescript or COMMIT inside a migration is not allowed)"
                    )
                conn.execute(f"PRAGMA user_version={int(number)}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            applied.append(number)
        return applied
    finally:
        conn.isolation_level = saved_isolation
