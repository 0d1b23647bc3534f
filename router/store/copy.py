"""Copy a whole store into an empty one: SQLite → PostgreSQL, and back (`omnirouter store copy`).

For an installation that outgrows the embedded store. Every table both schemas have is
copied with its ids, in foreign-key order, in one transaction on the target; the table
and column lists are read from the two databases, so a migration added later is copied
without touching this file. The `meta` table (the installation secret) replaces the
target's freshly generated one, so ticket status tokens issued before keep working.

What makes it safe to run:
- both schemas are brought to the latest migration first (a source still at an older
  migration is upgraded in place, and the report says so);
- the source is read in one read-only snapshot (a SQLite read transaction, a PostgreSQL
  REPEATABLE READ READ ONLY transaction), so a daemon still writing cannot tear it;
- a target holding any row in a copied table is refused (`meta` aside, which every
  fresh schema fills), before anything is written to it;
- the target's tables are locked against other writers for the copy, the row counts are
  compared before COMMIT (a difference rolls everything back) and again after it;
- PostgreSQL identity sequences are set past the copied ids so new rows do not collide.

A failure raises `CopyError` with one line to show; the target then holds no copied
row (a SQLite target file the copy created is removed again).
"""

from __future__ import annotations

import os
import sqlite3
import time
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from router.store import migrations as sqlite_migrations

Kind = Literal["sqlite", "postgresql"]

# Rows per read from the source (and per executemany on a SQLite target).
BATCH = 5000
# Bookkeeping of the migrations themselves: each side keeps its own.
NOT_COPIED = frozenset({"schema_migrations"})
# Tables a fresh schema fills itself: their rows are replaced by the source's.
SEEDED = frozenset({"meta"})


class CopyError(RuntimeError):
    """The copy cannot be made or failed; the message is one line for the user."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One side of a copy: a SQLite file or a PostgreSQL URL."""

    kind: Kind
    where: str  # the file path, or the postgresql:// URL

    @property
    def label(self) -> str:
        """Name it for people (never a URL's password or parameters)."""
        if self.kind == "sqlite":
            return f"sqlite:{self.where}"
        parts = urllib.parse.urlsplit(self.where)
        host = parts.hostname or "localhost"
        port = f":{parts.port}" if parts.port else ""
        return f"postgresql://{host}{port}{parts.path}"


def parse_endpoint(text: str) -> Endpoint:
    """Read `sqlite:PATH`, `sqlite:///PATH`, a bare path, or a `postgresql://` URL."""
    if text.startswith(("postgresql://", "postgres://")):
        return Endpoint("postgresql", text)
    if text.startswith("sqlite://"):
        path = text[len("sqlite://") :]
    elif text.startswith("sqlite:"):
        path = text[len("sqlite:") :]
    elif "://" in text:
        raise CopyError(
            f"{text.split('://')[0]}:// is not a store: use sqlite:PATH or postgresql://…"
        )
    else:
        path = text
    if not path:
        raise CopyError("sqlite: needs a path (sqlite:/var/lib/omnirouter/omnirouter.db)")
    return Endpoint("sqlite", str(Path(path).expanduser()))


@dataclass(frozen=True, slots=True)
class Table:
    """What the copy needs to know of one table on one side."""

    name: str
    columns: tuple[str, ...]
    primary_key: tuple[str, ...] = ()
    references: frozenset[tuple[str, str]] = frozenset()  # (column, referenced table)
    identity: tuple[str, ...] = ()  # PostgreSQL columns filled from a sequence
    implicit_rowid: bool = False  # SQLite rowid table without a column of that name


@dataclass(slots=True)
class CopyReport:
    """What was copied: rows per table in copy order, times, schema notes."""

    source: str
    target: str
    schema: int  # the target's schema version after migrating it
    source_migrated: tuple[int, int] | None = None  # (from, to) when the source was upgraded
    tables: list[tuple[str, int]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rows(self) -> int:
        """Count every row copied."""
        return sum(n for _, n in self.tables)

    @property
    def messages(self) -> int:
        """Count the messages copied (the figure people know their store by)."""
        return dict(self.tables).get("messages", 0)


def _quote(name: str) -> str:
    """Quote an identifier for either database."""
    return '"' + name.replace('"', '""') + '"'


def _one_line(exc: BaseException) -> str:
    """The first line of a driver's message (PostgreSQL adds DETAIL lines)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# -- the two kinds of database ------------------------------------------------------


class Side(ABC):
    """A database seen by the copy: its schema, its rows, its writes."""

    endpoint: Endpoint
    placeholder = "?"

    @abstractmethod
    def version(self) -> int:
        """Return the schema version the database records (0: none)."""

    @abstractmethod
    def latest(self) -> int:
        """Return the version this omnirouter's migrations reach."""

    @abstractmethod
    def migrate(self) -> None:
        """Bring the schema to the latest migration (each committed on its own)."""

    @abstractmethod
    def tables(self) -> dict[str, Table]:
        """Return every table of the store, internal bookkeeping aside."""

    @abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement; return its cursor."""

    def count(self, table: str) -> int:
        """Count a table's rows (in the open transaction, if one is)."""
        row = self.execute(f"SELECT COUNT(*) FROM {_quote(table)}").fetchone()
        return int(row[0])

    @abstractmethod
    def begin_read(self) -> None:
        """Start the read-only snapshot every read of the copy comes from."""

    @abstractmethod
    def read(self, table: Table, columns: Sequence[str]) -> Iterator[list[tuple[Any, ...]]]:
        """Yield the table's rows in batches, in id order."""

    @abstractmethod
    def begin_write(self, tables: Sequence[str]) -> None:
        """Start the one write transaction, other writers of `tables` held off."""

    @abstractmethod
    def insert(self, table: str, columns: Sequence[str], rows: Iterator[tuple[Any, ...]]) -> None:
        """Append rows to a table."""

    def advance_identities(self, table: Table) -> None:  # noqa: B027 (SQLite needs nothing)
        """Make the table's generated ids continue after the copied ones."""

    @abstractmethod
    def commit(self) -> None:
        """Commit the write transaction."""

    @abstractmethod
    def rollback(self) -> None:
        """Undo whatever the open transaction did."""

    @abstractmethod
    def close(self) -> None:
        """Close the connection."""


class SqliteSide(Side):
    """A SQLite store file."""

    def __init__(self, endpoint: Endpoint, *, create: bool) -> None:
        self.endpoint = endpoint
        self.path = Path(endpoint.where)
        self.created = False
        if not self.path.is_file():
            if not create:
                raise CopyError(f"no SQLite store at {self.path}")
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Private from the start, as the store makes it: -wal and -shm copy its mode.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
            self.created = True
        # A source is only read (unless it needs migrating): a copy of someone else's
        # store, or one on a read-only mount, can be copied from.
        self.mode = "rw" if create else "ro"
        self.conn = self._connect(self.mode)

    def _connect(self, mode: str) -> sqlite3.Connection:
        uri = f"file:{urllib.parse.quote(str(self.path))}?mode={mode}"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    def version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def latest(self) -> int:
        return sqlite_migrations.latest_version()

    def migrate(self) -> None:
        if self.mode == "ro":
            if self.version() >= self.latest():
                return  # nothing to write (a newer schema is refused before this)
            self.conn.close()
            self.mode = "rw"
            self.conn = self._connect(self.mode)
        sqlite_migrations.migrate(self.conn)

    def tables(self) -> dict[str, Table]:
        found: dict[str, Table] = {}
        rows = self.conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
        ).fetchall()
        for name, sql in rows:
            info = self.conn.execute(f"PRAGMA table_info({_quote(name)})").fetchall()
            columns = tuple(r[1] for r in info)
            pk = tuple(r[1] for r in sorted((r for r in info if r[5]), key=lambda r: r[5]))
            fks = self.conn.execute(f"PRAGMA foreign_key_list({_quote(name)})").fetchall()
            without_rowid = "WITHOUT ROWID" in " ".join(str(sql).upper().split())
            found[name] = Table(
                name,
                columns,
                pk,
                frozenset((r[3], r[2]) for r in fks),
                implicit_rowid=not without_rowid and "rowid" not in columns,
            )
        return found

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.conn.execute(sql, params)

    def begin_read(self) -> None:
        # Read-only; the snapshot starts at the first read after BEGIN and holds until
        # the end (in WAL mode the daemon keeps writing meanwhile).
        if self.mode != "ro":
            self.conn.close()
            self.mode = "ro"
            self.conn = self._connect(self.mode)
        self.conn.execute("BEGIN")
        self.conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()

    def read(self, table: Table, columns: Sequence[str]) -> Iterator[list[tuple[Any, ...]]]:
        if table.implicit_rowid or "rowid" in table.columns:
            order = " ORDER BY rowid"
        elif table.primary_key:  # a WITHOUT ROWID table
            order = " ORDER BY " + ", ".join(_quote(c) for c in table.primary_key)
        else:
            order = ""
        cols = ", ".join(_quote(c) for c in columns)
        cur = self.conn.execute(f"SELECT {cols} FROM {_quote(table.name)}{order}")
        while batch := cur.fetchmany(BATCH):
            yield batch

    def begin_write(self, tables: Sequence[str]) -> None:
        # The store's own journal mode, so the daemon opening this file later finds it so.
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        # IMMEDIATE takes the write lock now: no other writer until COMMIT or ROLLBACK.
        self.conn.execute("BEGIN IMMEDIATE")

    def insert(self, table: str, columns: Sequence[str], rows: Iterator[tuple[Any, ...]]) -> None:
        cols = ", ".join(_quote(c) for c in columns)
        marks = ", ".join("?" for _ in columns)
        sql = f"INSERT INTO {_quote(table)} ({cols}) VALUES ({marks})"
        batch: list[tuple[Any, ...]] = []
        for row in rows:
            batch.append(row)
            if len(batch) >= BATCH:
                self.conn.executemany(sql, batch)
                batch = []
        if batch:
            self.conn.executemany(sql, batch)

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def close(self) -> None:
        self.conn.close()

    def discard(self) -> None:
        """Remove the file again when this copy created it (a failed copy leaves nothing)."""
        if self.created:
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)


class PostgresSide(Side):
    """A PostgreSQL database (psycopg 3)."""

    placeholder = "%s"

    def __init__(self, endpoint: Endpoint) -> None:
        try:
            import psycopg
        except ImportError:
            raise CopyError(
                "PostgreSQL needs psycopg: pip install 'omnirouter[postgresql]'"
            ) from None
        self.endpoint = endpoint
        self.psycopg = psycopg
        self.conn: Any = psycopg.connect(
            endpoint.where, autocommit=True, application_name="omnirouter store copy"
        )

    def version(self) -> int:
        from router.store.pg_migrations import current_version

        return current_version(self.conn)

    def latest(self) -> int:
        from router.store.pg_migrations import latest_version

        return latest_version()

    def migrate(self) -> None:
        from router.store.pg_migrations import migrate

        migrate(self.conn)

    def tables(self) -> dict[str, Table]:
        columns: dict[str, list[str]] = {}
        identity: dict[str, list[str]] = {}
        for table, column, generated in self.conn.execute(
            "SELECT c.table_name, c.column_name, "
            "  c.is_identity = 'YES' OR COALESCE(c.column_default, '') LIKE 'nextval(%' "
            "FROM information_schema.columns c JOIN information_schema.tables t "
            "  ON t.table_schema = c.table_schema AND t.table_name = c.table_name "
            "WHERE c.table_schema = current_schema() AND t.table_type = 'BASE TABLE' "
            "ORDER BY c.table_name, c.ordinal_position"
        ):
            columns.setdefault(table, []).append(column)
            if generated:
                identity.setdefault(table, []).append(column)
        keys: dict[str, list[str]] = {}
        for table, column in self.conn.execute(
            "SELECT cl.relname, a.attname FROM pg_index i "
            "JOIN pg_class cl ON cl.oid = i.indrelid "
            "JOIN pg_namespace n ON n.oid = cl.relnamespace "
            "JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, pos) ON true "
            "JOIN pg_attribute a ON a.attrelid = cl.oid AND a.attnum = k.attnum "
            "WHERE i.indisprimary AND n.nspname = current_schema() ORDER BY cl.relname, k.pos"
        ):
            keys.setdefault(table, []).append(column)
        refs: dict[str, set[tuple[str, str]]] = {}
        for table, column, referenced in self.conn.execute(
            "SELECT cl.relname, a.attname, rcl.relname FROM pg_constraint con "
            "JOIN pg_class cl ON cl.oid = con.conrelid "
            "JOIN pg_class rcl ON rcl.oid = con.confrelid "
            "JOIN pg_namespace n ON n.oid = cl.relnamespace "
            "JOIN LATERAL unnest(con.conkey) AS k(attnum) ON true "
            "JOIN pg_attribute a ON a.attrelid = cl.oid AND a.attnum = k.attnum "
            "WHERE con.contype = 'f' AND n.nspname = current_schema()"
        ):
            refs.setdefault(table, set()).add((column, referenced))
        return {
            name: Table(
                name,
                tuple(cols),
                tuple(keys.get(name, ())),
                frozenset(refs.get(name, ())),
                tuple(identity.get(name, ())),
            )
            for name, cols in columns.items()
        }

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.conn.execute(sql, params)

    def begin_read(self) -> None:
        from psycopg import IsolationLevel

        self.conn.autocommit = False
        self.conn.isolation_level = IsolationLevel.REPEATABLE_READ
        self.conn.read_only = True
        self.conn.execute("SELECT 1").fetchone()  # the snapshot is taken here

    def read(self, table: Table, columns: Sequence[str]) -> Iterator[list[tuple[Any, ...]]]:
        cols = ", ".join(_quote(c) for c in columns)
        order = ""
        if table.primary_key:
            order = " ORDER BY " + ", ".join(_quote(c) for c in table.primary_key)
        # A server-side cursor: a big table streams instead of landing in memory whole.
        with self.conn.cursor(name=f"copy_{table.name}") as cur:
            cur.itersize = BATCH
            cur.execute(f"SELECT {cols} FROM {_quote(table.name)}{order}")
            while batch := cur.fetchmany(BATCH):
                yield batch

    def begin_write(self, tables: Sequence[str]) -> None:
        self.conn.autocommit = False
        names = ", ".join(_quote(t) for t in tables)
        # EXCLUSIVE lets readers in but no other writer (an instance started meanwhile
        # waits) until COMMIT, so the emptiness checked below stays true.
        self.conn.execute(f"LOCK TABLE {names} IN EXCLUSIVE MODE")

    def insert(self, table: str, columns: Sequence[str], rows: Iterator[tuple[Any, ...]]) -> None:
        cols = ", ".join(_quote(c) for c in columns)
        with self.conn.cursor() as cur:
            with cur.copy(f"COPY {_quote(table)} ({cols}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)

    def advance_identities(self, table: Table) -> None:
        for column in table.identity:
            # is_called = false: the next id handed out is exactly MAX + 1 (1 when empty).
            self.conn.execute(
                "SELECT setval(pg_get_serial_sequence(%s, %s), "
                f"COALESCE(MAX({_quote(column)}), 0) + 1, false) FROM {_quote(table.name)}",
                (_quote(table.name), column),
            )

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        if not self.conn.closed:
            self.conn.rollback()

    def close(self) -> None:
        self.conn.close()


def _open(endpoint: Endpoint, *, create: bool) -> Side:
    if endpoint.kind == "postgresql":
        return PostgresSide(endpoint)
    return SqliteSide(endpoint, create=create)


# -- the plan ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Step:
    """One table to copy: its two sides, the columns copied, what waits for a second pass."""

    source: Table
    target: Table
    columns: tuple[str, ...]  # the same names on both sides
    # Columns naming a row of the same table (people.merged_into): written NULL first
    # and set once every row is in, since the row they name may come later.
    self_refs: tuple[str, ...] = ()


def plan(source: dict[str, Table], target: dict[str, Table], counts: dict[str, int]) -> list[Step]:
    """Return the tables to copy, referenced tables first; refuse what would lose data."""
    steps: dict[str, Step] = {}
    for name in sorted(source):
        if name in NOT_COPIED:
            continue
        src = source[name]
        if name not in target:
            if counts[name]:
                raise CopyError(
                    f"table {name} ({counts[name]} rows) has no counterpart in the target's "
                    "schema: this omnirouter's SQLite and PostgreSQL migrations differ"
                )
            continue
        dst = target[name]
        # SQLite's implicit rowid is PostgreSQL's explicit `rowid` (attachments keep
        # their order and ids both ways).
        columns = [
            c for c in src.columns if c in dst.columns or (c == "rowid" and dst.implicit_rowid)
        ]
        if "rowid" in dst.columns and src.implicit_rowid:
            columns.append("rowid")
        lost = [c for c in src.columns if c not in columns]
        if lost and counts[name]:
            raise CopyError(
                f"table {name}: column(s) {', '.join(lost)} have no counterpart in the "
                "target's schema: this omnirouter's SQLite and PostgreSQL migrations differ"
            )
        write = tuple(columns)
        self_refs = tuple(
            sorted(
                col for col, ref in src.references | dst.references if ref == name and col in write
            )
        )
        if self_refs and not dst.primary_key:
            raise CopyError(f"table {name} refers to itself but has no primary key")
        steps[name] = Step(src, dst, write, self_refs)
    return [steps[name] for name in _fk_order(steps)]


def _fk_order(steps: dict[str, Step]) -> list[str]:
    """Order tables so each comes after the tables it references (by name among equals)."""
    needs = {
        name: {
            ref
            for _, ref in step.source.references | step.target.references
            if ref != name and ref in steps
        }
        for name, step in steps.items()
    }
    done: list[str] = []
    while needs:
        ready = sorted(name for name, deps in needs.items() if not deps - set(done))
        if not ready:
            raise CopyError(f"foreign keys form a cycle among {', '.join(sorted(needs))}")
        done.append(ready[0])
        del needs[ready[0]]
    return done


# -- the copy -------------------------------------------------------------------------


def copy_store(source_text: str, target_text: str) -> CopyReport:
    """Copy the store at `source_text` into the empty store at `target_text`."""
    source_ep, target_ep = parse_endpoint(source_text), parse_endpoint(target_text)
    if source_ep == target_ep or (
        source_ep.kind == target_ep.kind == "sqlite"
        and Path(source_ep.where).resolve() == Path(target_ep.where).resolve()
    ):
        raise CopyError("source and target are the same store")
    started = time.perf_counter()
    source: Side | None = None
    target: Side | None = None
    ok = False
    try:
        source = _connect(source_ep, create=False)
        migrated = _prepare_source(source)
        target = _connect(target_ep, create=True)
        report = CopyReport(source_ep.label, target_ep.label, 0, migrated)
        _refuse_data(
            target, _guard(target, target.tables) if _guard(target, target.version) else {}
        )
        _guard(target, target.migrate)
        report.schema = _guard(target, target.version)
        _guard(source, source.begin_read)
        source_tables = _guard(source, source.tables)
        counts = {name: _guard(source, lambda n=name: source.count(n)) for name in source_tables}
        steps = plan(source_tables, _guard(target, target.tables), counts)
        _write(source, target, steps, counts)
        report.tables = [(s.source.name, counts[s.source.name]) for s in steps]
        _verify(target, steps, counts, "after COMMIT")
        report.seconds = time.perf_counter() - started
        ok = True
        return report
    finally:
        for side in (source, target):
            if side is not None:
                try:
                    side.rollback()
                    side.close()
                except Exception:  # closing after a failure: the first error is the one to show
                    pass
        if not ok and isinstance(target, SqliteSide):
            target.discard()


def _connect(endpoint: Endpoint, *, create: bool) -> Side:
    """Open one side, naming it in the error when that fails."""
    try:
        return _open(endpoint, create=create)
    except CopyError:
        raise
    except Exception as exc:  # sqlite3.Error, psycopg.Error, OSError: say which side
        raise CopyError(f"{endpoint.label}: {_one_line(exc)}") from exc


def _guard(side: Side, fn: Any) -> Any:
    """Run fn; turn a database error into a CopyError naming the side."""
    try:
        return fn()
    except CopyError:
        raise
    except sqlite_migrations.SchemaTooNewError as exc:
        raise CopyError(f"{side.endpoint.label}: {exc}") from exc
    except Exception as exc:
        raise CopyError(f"{side.endpoint.label}: {_one_line(exc)}") from exc


def _prepare_source(source: Side) -> tuple[int, int] | None:
    """Bring the source to the latest schema; return (from, to) when it had to move."""
    before = _guard(source, source.version)
    if before == 0:
        raise CopyError(f"{source.endpoint.label} is not an Omnirouter store (no schema)")
    latest = source.latest()
    if before > latest:
        raise CopyError(
            f"{source.endpoint.label} has schema v{before}, newer than this omnirouter's "
            f"(v{latest}): copy it with the omnirouter that wrote it"
        )
    _guard(source, source.migrate)
    after = _guard(source, source.version)
    return (before, after) if after != before else None


def _refuse_data(target: Side, tables: dict[str, Table]) -> None:
    """Refuse a target holding rows of its own (checked again under the write lock)."""
    for name in sorted(tables):
        if name in NOT_COPIED or name in SEEDED:
            continue
        rows = _guard(target, lambda n=name: target.count(n))
        if rows:
            raise CopyError(
                f"target {target.endpoint.label} is not empty: table {name} holds {rows} "
                "row(s); copy into a new database or a new SQLite file"
            )


def _write(source: Side, target: Side, steps: list[Step], counts: dict[str, int]) -> None:
    """Copy every step in one transaction on the target; roll back on any failure."""
    names = [s.target.name for s in steps]
    _guard(target, lambda: target.begin_write(names))
    _refuse_data(target, {s.target.name: s.target for s in steps})
    for name in SEEDED & set(names):
        _guard(target, lambda n=name: target.execute(f"DELETE FROM {_quote(n)}"))
    for step in steps:
        _copy_table(source, target, step)
        _guard(target, lambda s=step: target.advance_identities(s.target))
    _verify(target, steps, counts, "before COMMIT")
    _guard(target, target.commit)


def _copy_table(source: Side, target: Side, step: Step) -> None:
    """Stream one table from source to target (self-references in a second pass)."""
    late_index = [step.columns.index(c) for c in step.self_refs]
    key_index = [step.columns.index(c) for c in step.target.primary_key]
    late: list[tuple[Any, ...]] = []

    def rows() -> Iterator[tuple[Any, ...]]:
        for batch in source.read(step.source, step.columns):
            for row in batch:
                if late_index and any(row[i] is not None for i in late_index):
                    late.append(tuple(row[i] for i in late_index + key_index))
                    row = tuple(None if i in late_index else v for i, v in enumerate(row))
                yield tuple(row)

    try:
        target.insert(step.target.name, step.columns, rows())
        if late:
            mark = target.placeholder
            sets = ", ".join(f"{_quote(c)} = {mark}" for c in step.self_refs)
            where = " AND ".join(f"{_quote(c)} = {mark}" for c in step.target.primary_key)
            sql = f"UPDATE {_quote(step.target.name)} SET {sets} WHERE {where}"
            for values in late:
                target.execute(sql, values)
    except CopyError:
        raise
    except Exception as exc:
        raise CopyError(f"copying table {step.target.name}: {_one_line(exc)}") from exc


def _verify(target: Side, steps: list[Step], counts: dict[str, int], when: str) -> None:
    """Compare the target's row counts with the source's snapshot."""
    for step in steps:
        name = step.target.name
        have = _guard(target, lambda n=name: target.count(n))
        if have != counts[step.source.name]:
            raise CopyError(
                f"table {name}: {have} rows in the target {when}, "
                f"{counts[step.source.name]} in the source (did something else write to it?)"
            )
