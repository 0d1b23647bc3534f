"""sd_notify never holds up the daemon, even when the service manager stops reading."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from router.daemon import Notifier


def test_a_manager_that_does_not_read_never_blocks_the_sender(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(path))  # bound, never read: its queue fills after some datagrams
    notifier = Notifier(str(path))
    done = threading.Event()

    def flood() -> None:
        for i in range(20_000):
            notifier.send(STATUS=f"{i} waiting")
        done.set()

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    sender.join(30)  # a liveness bound: a blocking send would never return
    try:
        assert done.is_set(), "sd_notify blocked on a full service-manager queue"
        # What fitted arrived intact, oldest first; the rest was dropped, not queued.
        manager.setblocking(False)
        first = manager.recv(4096)
        assert first == b"STATUS=0 waiting"
    finally:
        notifier.close()
        manager.close()


def test_notices_flow_again_once_the_manager_reads(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(path))
    manager.setblocking(False)
    notifier = Notifier(str(path))
    try:
        for _ in range(5_000):
            notifier.send(WATCHDOG=1)
        while True:  # the manager catches up
            try:
                manager.recv(4096)
            except BlockingIOError:
                break
        notifier.send(READY=1)
        assert manager.recv(4096) == b"READY=1"
    finally:
        notifier.close()
        manager.close()
