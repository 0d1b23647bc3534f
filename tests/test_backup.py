"""`omnirouter backup` while the daemon writes, then a restore that the daemon starts from."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from router import cli
from tests.daemon_harness import DaemonProcess, base_config, http, ports
from tests.test_daemon_e2e import spawn

spawn = spawn  # the daemon fixture of test_daemon_e2e (kills leftovers, prints logs)


def stored_keys(db: Path) -> set[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return {r[0] for r in conn.execute("SELECT external_id FROM messages")}
    finally:
        conn.close()


def test_backup_under_writes_is_consistent_and_restores(
    tmp_path: Path, spawn: Callable[..., DaemonProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    web_port, ops_port = ports()
    daemon = spawn(base_config(state, web_port=web_port, ops_port=ops_port))
    web = f"http://127.0.0.1:{web_port}/v1/messages"
    acked: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        n = 0
        while not stop.is_set():
            key = f"bk-{n:05d}"
            body = {"text": f"Where is my parcel {n}?", "contact": {"handle": f"c{n % 30}@x.org"}}
            if http("POST", web, body, {"Idempotency-Key": key})[0] == 201:
                acked.append(key)
            n += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while len(acked) < 50:
            thread.join(0.05)
        out = tmp_path / "backup"
        assert cli.main(["backup", str(out), "--state-dir", str(state)]) == 0
        during = len(acked)
        while len(acked) < during + 20:  # the daemon kept committing after the copy
            thread.join(0.05)
    finally:
        stop.set()
        thread.join(10)
    assert "passed integrity_check" in capsys.readouterr().out
    copied = stored_keys(out / "omnirouter.db")
    assert len(copied) >= 50 and copied <= set(acked)
    assert set(acked[: len(copied)]) == copied  # a prefix of what was acknowledged, no gap
    # The agents' inbox files (plain files beside the databases) came along.
    assert list((out / "inbox").glob("*.jsonl"))
    assert not list(out.glob("*-wal"))
    # A second backup into a used directory is refused, not merged.
    assert cli.main(["backup", str(out), "--state-dir", str(state)]) == 1
    assert daemon.stop() == 0

    # Restore: a daemon started on the copy has exactly the copied messages and works on.
    web_port, ops_port = ports()
    restored = spawn(base_config(out, web_port=web_port, ops_port=ops_port))
    body = {"text": "After the restore", "contact": {"handle": "new@x.org"}}
    url = f"http://127.0.0.1:{web_port}/v1/messages"
    assert http("POST", url, body, {"Idempotency-Key": "after"})[0] == 201
    first = {"text": "Where is my parcel 0?", "contact": {"handle": "c0@x.org"}}
    assert acked[0] == "bk-00000"
    assert http("POST", url, first, {"Idempotency-Key": acked[0]})[0] == 200  # known there
    assert restored.stop() == 0
    assert stored_keys(out / "omnirouter.db") == copied | {"after"}
