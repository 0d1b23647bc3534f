"""Small helpers that keep the unit-of-work SQL the same on SQLite and PostgreSQL."""

from __future__ import annotations

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
