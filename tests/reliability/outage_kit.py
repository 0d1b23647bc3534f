"""What the outage tests share: reading the daemon's state, making a peer fail, a gateway sink.

`DaemonProbes` is mixed into each test's world (it needs `ops_url` and `db_path`);
`start_outage` makes a TcpProxy's peer slow, hung or dead; `GatewaySink` plays an SMS
gateway's send API and keeps who was texted.
"""

from __future__ import annotations

import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

from tests.daemon_harness import http
from tests.reliability.tcp_proxy import TcpProxy
from tests.test_crash import read_db

Mode = Literal["slow", "hung", "dead"]
SLOW = 0.3  # seconds of delay each way for a slow peer


class DaemonProbes:
    """Readiness and the outbox as the running daemon and its database tell them."""

    ops_url: str
    db_path: Path

    def ready(self) -> tuple[int, dict[str, Any]]:
        """Return /readyz's status and report."""
        status, body, _ = http("GET", self.ops_url + "/readyz")
        return status, body

    def outbox_and_dead(self) -> tuple[int, int]:
        """Return the outbox's and the dead letters' sizes, from the database."""
        with read_db(self.db_path) as db:
            outbox = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
            dead = db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
        return outbox, dead


def start_outage(proxy: TcpProxy, mode: Mode) -> None:
    """Make the proxy's peer slow (SLOW each way), hung (paused) or dead (cut)."""
    if mode == "slow":
        proxy.delay(SLOW)
    elif mode == "hung":
        proxy.pause()
    else:
        proxy.cut()


class _SendApi(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        self.server.sent.append(query.get("to", [""])[0])  # type: ignore[attr-defined]
        self.send_response(202)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return


class GatewaySink:
    """An SMS gateway's send API (`GET /send?to=…&text=…`, answered 202) in a thread."""

    def __init__(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _SendApi)
        self.server.sent = []  # type: ignore[attr-defined]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        """Return the port it listens on."""
        return int(self.server.server_address[1])

    @property
    def sent(self) -> list[str]:
        """Return the numbers texted so far, in order."""
        return list(self.server.sent)  # type: ignore[attr-defined]

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()
