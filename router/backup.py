"""`omnirouter backup OUT`: a consistent copy of a daemon's state while it runs.

The state directory holds the main store (`omnirouter.db`) and the drivers' own small
SQLite files (web widget logs, SMS and Telegram threading, the Telegram tool's state),
files (the e-mail cursor, attachments, agents' inbox files) and the admin token. Every
SQLite database is copied with SQLite's online backup API: a read transaction over the
whole copy, so the copy is one consistent moment even while the daemon commits (in WAL
mode a reader never blocks the writer). Other files are copied as they are. The copy is
then checked with `PRAGMA integrity_check`.

Restore: stop the daemon, replace the state directory with the backup's contents (keep
owner and mode: the unit's DynamicUser owns /var/lib/private/omnirouter), start it. The
outbox resends what was pending at the backup's moment under the same delivery ids;
receivers deduplicate.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

_SQLITE_MAGIC = b"SQLite format 3\x00"
_SKIP_SUFFIXES = ("-wal", "-shm", "-journal")


@dataclass(slots=True)
class BackupReport:
    """What a backup copied."""

    databases: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0


class BackupError(RuntimeError):
    """The backup could not be made (the message says why)."""


def _is_sqlite(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(16) == _SQLITE_MAGIC
    except OSError:
        return False


def _copy_database(source: Path, target: Path) -> None:
    """Copy one SQLite database consistently with the online backup API, then check it."""
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)  # all pages in one step: one read transaction, one moment
            dst.execute("PRAGMA journal_mode=DELETE")  # a self-contained file, no -wal
            result = dst.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            dst.close()
    finally:
        src.close()
    if result != "ok":
        raise BackupError(f"the copy of {source.name} failed its integrity check: {result}")


def backup_state(state_dir: Path, out: Path, db_path: Path | None = None) -> BackupReport:
    """Copy `state_dir` (and the store, when it lives elsewhere) into the new directory `out`.

    Raise BackupError when there is nothing to back up or the copy fails its check.
    """
    db_path = db_path or state_dir / "omnirouter.db"
    if not db_path.is_file():
        raise BackupError(f"no Omnirouter store at {db_path}")
    if out.exists() and any(out.iterdir()):
        raise BackupError(f"{out} exists and is not empty: choose a new directory")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    report = BackupReport()
    for root, dirs, files in os.walk(state_dir):
        dirs.sort()
        rel = Path(root).relative_to(state_dir)
        (out / rel).mkdir(parents=True, exist_ok=True, mode=0o700)
        for name in sorted(files):
            if name.endswith(_SKIP_SUFFIXES):
                continue  # a database's live journal: the backup API copies its content
            source = Path(root) / name
            target = out / rel / name
            if _is_sqlite(source):
                _copy_database(source, target)
                report.databases.append(str(rel / name))
            else:
                shutil.copy2(source, target)
                report.files += 1
            os.chmod(target, 0o600)
            report.bytes += target.stat().st_size
    if state_dir.resolve() not in db_path.resolve().parents:
        target = out / db_path.name
        _copy_database(db_path, target)
        report.databases.append(db_path.name)
        report.bytes += target.stat().st_size
    return report
