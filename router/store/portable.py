"""Small helpers that keep the unit-of-work SQL the same on SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3
from typing import Any


def marks(count: int) -> str:
    """Return `count` placeholders for an IN list; NULL (matches nothing) when empty.

    `IN ()` is an error in PostgreSQL (SQLite takes it).
    """
    return ",".join("?" * count) if count else "NULL"


def rows_as_dicts(cur: Any) -> list[dict[str, Any]]:
    """Return a cursor's rows as dicts keyed by column name (any DB-API cursor)."""
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def for_update(c: Any, *, skip_locked: bool = False) -> str:
    """Return the row-lock clause for a SELECT whose rows the unit is about to change.

    PostgreSQL (READ COMMITTED, several instances): ` FOR UPDATE` holds the rows until
    the commit, so a concurrent unit on the same rows waits and then sees this one's
    outcome; `skip_locked` passes over rows another instance is working on instead.
    SQLite: nothing; its single writer already holds the whole database.
    """
    if isinstance(c, sqlite3.Connection):
        return ""
    return " FOR UPDATE SKIP LOCKED" if skip_locked else " FOR UPDATE"
