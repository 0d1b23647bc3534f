"""Numbered schema migrations for the PostgreSQL store.

The same tables as the SQLite store (`router.store.migrations`), so the unit-of-work
SQL in `router.store.queries` runs unchanged on both; only the column types differ
(DOUBLE PRECISION for times, BYTEA for raw payloads, identity columns for SQLite's
INTEGER PRIMARY KEY). PostgreSQL's history starts at SQLite's schema 5: migration 1
here is that schema whole, and each later SQLite migration gets its PostgreSQL twin.

Applied versions are rows of `schema_migrations`. Several instances may start at once:
each migration runs in its own transaction under an advisory lock, so one of them
migrates and the others find the work done. Add a new migration at the end; never
edit one that has shipped.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from router.store.migrations import SchemaTooNewError

# A unit of DDL: statements run in order inside one transaction.
Migration = Callable[[Any], None]
MIGRATIONS: list[tuple[int, str, Migration]] = []
# pg_advisory_xact_lock key: "omnirouter migrate" in the 64-bit key space (any constant
# works; it only has to be the same for every instance).
_LOCK_KEY = 0x6F6D6E69_6D696772


def register(number: int, description: str) -> Callable[[Migration], Migration]:
    """Register a migration; numbers must follow each other without gaps."""

    def wrap(fn: Migration) -> Migration:
        if number != len(MIGRATIONS) + 1:
            raise RuntimeError(f"migration {number} registered out of order")
        MIGRATIONS.append((number, description, fn))
        return fn

    return wrap


def latest_version() -> int:
    """Return the version the registered migrations reach."""
    return MIGRATIONS[-1][0]


def _script(c: Any, script: str) -> None:
    """Run `;`-separated DDL statements (no `;` inside them) one by one."""
    for statement in script.split(";"):
        if statement.strip():
            c.execute(statement)


@register(1, "schema of SQLite migration 5: messages, conversations, contacts, outbox, audit")
def _v001(c: Any) -> None:
    _script(
        c,
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE people (
            id TEXT PRIMARY KEY,
            created_at DOUBLE PRECISION NOT NULL,
            name TEXT NOT NULL DEFAULT '',
            merged_into TEXT REFERENCES people(id),
            merged_at DOUBLE PRECISION
        );
        CREATE INDEX people_merged_into ON people(merged_into) WHERE merged_into IS NOT NULL;
        CREATE TABLE contacts (
            key TEXT PRIMARY KEY,
            channel_type TEXT NOT NULL,
            handle TEXT NOT NULL,
            name TEXT NOT NULL DEFAULT '',
            created_at DOUBLE PRECISION NOT NULL,
            person_id TEXT REFERENCES people(id)
        );
        CREATE INDEX contacts_person ON contacts(person_id);
        CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            channel TEXT NOT NULL,
            thread_key TEXT NOT NULL,
            contact_key TEXT NOT NULL REFERENCES contacts(key),
            state TEXT NOT NULL,
            agent_id TEXT,
            label TEXT NOT NULL,
            severity TEXT NOT NULL,
            opened_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            respond_by DOUBLE PRECISION NOT NULL,
            resolved_at DOUBLE PRECISION,
            channel_type TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL DEFAULT 'new',
            closed_at DOUBLE PRECISION,
            survey_until DOUBLE PRECISION,
            csat_score INTEGER,
            csat_at DOUBLE PRECISION,
            UNIQUE (channel, thread_key)
        );
        CREATE INDEX conversations_open ON conversations(state) WHERE state = 'open';
        CREATE INDEX conversations_agent ON conversations(agent_id, state);
        CREATE INDEX conversations_resolved ON conversations(resolved_at)
            WHERE state = 'resolved';
        CREATE INDEX conversations_survey ON conversations(survey_until)
            WHERE survey_until IS NOT NULL;
        CREATE TABLE messages (
            id TEXT PRIMARY KEY,
            channel TEXT NOT NULL,
            channel_type TEXT NOT NULL,
            external_id TEXT NOT NULL,
            payload_sha256 TEXT NOT NULL DEFAULT '',
            conversation_id TEXT NOT NULL REFERENCES conversations(id),
            contact_key TEXT NOT NULL REFERENCES contacts(key),
            subject TEXT NOT NULL DEFAULT '',
            text TEXT NOT NULL,
            language TEXT NOT NULL,
            received_at DOUBLE PRECISION NOT NULL,
            ingested_at DOUBLE PRECISION NOT NULL,
            label TEXT NOT NULL,
            confidence DOUBLE PRECISION NOT NULL,
            scores TEXT NOT NULL,
            severity TEXT NOT NULL,
            signals TEXT NOT NULL,
            model_version TEXT NOT NULL,
            features TEXT NOT NULL DEFAULT '[]',
            queue TEXT NOT NULL,
            sla_deadline DOUBLE PRECISION NOT NULL,
            state TEXT NOT NULL,
            raw BYTEA,
            reply_ref TEXT NOT NULL DEFAULT '',
            thread_refs TEXT NOT NULL DEFAULT '[]',
            UNIQUE (channel, external_id)
        );
        CREATE INDEX messages_queued ON messages(state) WHERE state = 'queued';
        CREATE INDEX messages_conversation ON messages(conversation_id);
        CREATE INDEX messages_contact_time ON messages(ingested_at, contact_key);
        CREATE INDEX messages_contact_recent ON messages(contact_key, ingested_at);
        CREATE TABLE attachments (
            -- `rowid` keeps insertion order, as SQLite's implicit rowid does there
            rowid BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            message_id TEXT NOT NULL REFERENCES messages(id),
            name TEXT NOT NULL,
            mime_type TEXT NOT NULL,
            size BIGINT NOT NULL,
            sha256 TEXT NOT NULL,
            storage_ref TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX attachments_message ON attachments(message_id);
        CREATE TABLE agents (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL DEFAULT '',
            capacity INTEGER NOT NULL,
            tool TEXT NOT NULL,
            present INTEGER NOT NULL DEFAULT 1
        );
        CREATE TABLE assignments (
            message_id TEXT PRIMARY KEY REFERENCES messages(id),
            conversation_id TEXT NOT NULL,
            agent_id TEXT NOT NULL,
            queue TEXT NOT NULL,
            reason TEXT NOT NULL,
            sla_deadline DOUBLE PRECISION NOT NULL,
            assigned_at DOUBLE PRECISION NOT NULL,
            accepted_at DOUBLE PRECISION,
            resolved_at DOUBLE PRECISION,
            explain TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX assignments_conversation ON assignments(conversation_id);
        -- an agent's latest assignments (the complaint streak check across instances)
        CREATE INDEX assignments_agent_time ON assignments(agent_id, assigned_at);
        CREATE TABLE outbox (
            id TEXT PRIMARY KEY,
            target TEXT NOT NULL,
            agent_id TEXT NOT NULL,
            address TEXT NOT NULL DEFAULT '',
            kind TEXT NOT NULL,
            payload TEXT NOT NULL,
            message_id TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at DOUBLE PRECISION NOT NULL,
            last_error TEXT NOT NULL DEFAULT '',
            created_at DOUBLE PRECISION NOT NULL
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
            created_at DOUBLE PRECISION NOT NULL,
            dead_at DOUBLE PRECISION NOT NULL
        );
        CREATE TABLE corrections (
            id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            message_id TEXT NOT NULL REFERENCES messages(id),
            label TEXT NOT NULL,
            previous_label TEXT NOT NULL,
            agent_id TEXT NOT NULL,
            at DOUBLE PRECISION NOT NULL
        );
        CREATE INDEX corrections_message ON corrections(message_id);
        CREATE TABLE assignment_history (
            id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            message_id TEXT NOT NULL REFERENCES messages(id),
            agent_id TEXT NOT NULL,
            assigned_at DOUBLE PRECISION NOT NULL,
            ended_at DOUBLE PRECISION NOT NULL,
            outcome TEXT NOT NULL
        );
        CREATE INDEX assignment_history_message ON assignment_history(message_id);
        CREATE TABLE ticket_events (
            id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            conversation_id TEXT NOT NULL,
            at DOUBLE PRECISION NOT NULL,
            kind TEXT NOT NULL,
            actor TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT '',
            detail TEXT NOT NULL DEFAULT '{}'
        );
        CREATE INDEX ticket_events_conversation ON ticket_events(conversation_id, id);
        CREATE TABLE contact_identifiers (
            identifier TEXT PRIMARY KEY,
            person_id TEXT NOT NULL REFERENCES people(id),
            contact_key TEXT NOT NULL,
            first_seen DOUBLE PRECISION NOT NULL
        );
        CREATE INDEX contact_identifiers_person ON contact_identifiers(person_id);
        CREATE TABLE contact_events (
            id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            at DOUBLE PRECISION NOT NULL,
            action TEXT NOT NULL,
            person_id TEXT NOT NULL,
            other_id TEXT NOT NULL,
            actor TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT '{}'
        );
        CREATE INDEX contact_events_person ON contact_events(person_id, id);
        CREATE INDEX contact_events_other ON contact_events(other_id, id);
        CREATE TABLE contact_separations (
            person_id TEXT NOT NULL,
            other_id TEXT NOT NULL,
            PRIMARY KEY (person_id, other_id)
        )
        """,
    )
    c.execute(
        "INSERT INTO meta(key, value) VALUES ('secret', %s)", (secrets.token_bytes(32).hex(),)
    )
    # Change notices for the other instances (router.shared_routing): whatever commits a
    # change to a conversation, a message's state or an agent's presence announces it
    # on commit, whichever code path made it. The payload names the announcing instance
    # (its connections' application_name) so it can skip its own notices.
    c.execute(
        """
        CREATE FUNCTION omnirouter_conversation_changed() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('omnirouter_changes',
                current_setting('application_name') || ' c ' || NEW.id);
            RETURN NULL;
        END $$
        """
    )
    c.execute(
        """
        CREATE FUNCTION omnirouter_message_changed() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('omnirouter_changes',
                current_setting('application_name') || ' c ' || NEW.conversation_id);
            RETURN NULL;
        END $$
        """
    )
    c.execute(
        """
        CREATE FUNCTION omnirouter_agent_changed() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('omnirouter_changes',
                current_setting('application_name') || ' a ' || NEW.id);
            RETURN NULL;
        END $$
        """
    )
    _script(
        c,
        """
        CREATE TRIGGER conversations_changed AFTER INSERT OR UPDATE ON conversations
            FOR EACH ROW EXECUTE FUNCTION omnirouter_conversation_changed();
        CREATE TRIGGER messages_changed AFTER INSERT OR UPDATE OF state, conversation_id
            ON messages FOR EACH ROW EXECUTE FUNCTION omnirouter_message_changed();
        CREATE TRIGGER agents_changed AFTER INSERT OR UPDATE OF present ON agents
            FOR EACH ROW EXECUTE FUNCTION omnirouter_agent_changed()
        """,
    )


@register(2, "SQLite migration 6: leases, and the instance that owns each outbox item")
def _v002(c: Any) -> None:
    _script(
        c,
        """
        CREATE TABLE leases (
            name TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL,
            acquired_at DOUBLE PRECISION NOT NULL
        );
        ALTER TABLE outbox ADD COLUMN owner TEXT NOT NULL DEFAULT ''
        """,
    )


def current_version(conn: Any) -> int:
    """Return the highest migration applied (0 for an empty database)."""
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()[0]
    if not exists:
        return 0
    row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()
    return int(row[0])


def migrate(conn: Any) -> int:
    """Apply pending migrations on a psycopg connection (autocommit); return the version.

    Each migration commits alone with its `schema_migrations` row; the advisory lock
    makes instances that start together take turns.
    """
    latest = latest_version()
    while True:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                "description TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            version = current_version(conn)
            if version > latest:
                raise SchemaTooNewError(
                    f"database schema {version} is newer than this omnirouter's ({latest}); "
                    "upgrade omnirouter"
                )
            if version == latest:
                return version
            number, description, fn = MIGRATIONS[version]
            fn(conn)
            conn.execute(
                "INSERT INTO schema_migrations(version, description) VALUES (%s, %s)",
                (number, description),
            )
