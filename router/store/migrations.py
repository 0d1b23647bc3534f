"""Numbered schema migrations for the SQLite store.

Each migration is a function registered with its number and a description; the
database records the highest one applied in `PRAGMA user_version`. Add a new
migration at the end; never edit one that has shipped.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable

Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: list[tuple[int, str, Migration]] = []


def register(number: int, description: str) -> Callable[[Migration], Migration]:
    """Register a migration; numbers must follow each other without gaps."""

    def wrap(fn: Migration) -> Migration:
        expected = len(MIGRATIONS) + 1
        if number != expected:
            raise RuntimeError(f"migration {number} registered out of order (expected {expected})")
        MIGRATIONS.append((number, description, fn))
        return fn

    return wrap


@register(1, "initial schema: contacts, conversations, messages, agents, assignments, outbox, dead letters")
def _v001(c: sqlite3.Connection) -> None:
    c.executescript(
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
            message_id TEXT PRIMARY KEY REFERENCES messages(id),   -- one assignment per message, ever
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
        """
    )
    c.execute("INSERT INTO meta(key, value) VALUES ('secret', ?)", (os.urandom(32).hex(),))


def migrate(conn: sqlite3.Connection) -> list[int]:
    """Apply every migration newer than the database; return the numbers applied."""
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    latest = len(MIGRATIONS)
    if current > latest:
        raise RuntimeError(f"database schema v{current} is newer than this omnirouter (v{latest}); upgrade omnirouter")
    applied = []
    for number, _description, fn in MIGRATIONS[current:]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            fn(conn)
            conn.execute(f"PRAGMA user_version={number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        applied.append(number)
    return applied
