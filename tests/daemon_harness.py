"""Run the real daemon as a subprocess, the way systemd runs it, and watch it.

The harness binds a unix datagram socket and passes it as NOTIFY_SOCKET, so tests see
exactly the READY/RELOADING/STOPPING/WATCHDOG notifications systemd would. Logs (JSON
lines on stdout, since stdout is not a TTY) are kept in a file and parsed on demand.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.peers import free_port

REPO = Path(__file__).resolve().parents[1]


def base_config(
    state_dir: Path,
    *,
    web_port: int,
    ops_port: int,
    admin_token: str = "test-admin-token-0123456789",
    extra: str = "",
    adapters: str = '[[adapters]]\ntype = "inbox"\nname = "inbox"\n',
    agents: str = "",
    shutdown_timeout: float = 10,
) -> str:
    """Return a config with a web channel and ops API on the given ports."""
    if not agents:
        agents = (
            '[[agents]]\nid = "alice"\ncapacity = 2\ntool = "inbox"\nskills = ["en"]\n\n'
            '[[agents]]\nid = "bo"\ncapacity = 2\ntool = "inbox"\nskills = ["zh", "en"]\n'
        )
    return f"""
[daemon]
state_dir = "{state_dir}"
shutdown_timeout = {shutdown_timeout}

[ops]
host = "127.0.0.1"
port = {ops_port}
admin_token = "{admin_token}"

[outbox]
backoff_base = 0.05
backoff_cap = 0.5
poll_interval = 0.5

[[channels]]
type = "web"
name = "web"
host = "127.0.0.1"
port = {web_port}

{adapters}

{agents}

{extra}
"""


class DaemonProcess:
    """One `omnirouter run -c FILE` process with a private notify socket."""

    def __init__(
        self,
        workdir: Path,
        config_text: str,
        *,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        """Write the config; preexec_fn runs in the child before exec (e.g. setrlimit)."""
        self.workdir = workdir
        self.config_path = workdir / "omnirouter.toml"
        self.config_path.write_text(config_text)
        self.log_path = workdir / f"daemon-{time.monotonic_ns()}.log"
        self.notify_path = workdir / f"notify-{time.monotonic_ns()}.sock"
        self.env = {**os.environ, **(env or {})}
        self.preexec_fn = preexec_fn
        self.proc: subprocess.Popen[bytes] | None = None
        self.notifications: list[dict[str, str]] = []
        self._sock: socket.socket | None = None
        self._log_file: Any = None

    # -- process -------------------------------------------------------------------

    def start(self, *, wait_ready: bool = True, timeout: float = 20.0) -> DaemonProcess:
        """Start the daemon; by default wait for READY=1."""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.notify_path))
        self._sock.setblocking(False)
        self._log_file = open(self.log_path, "ab")
        env = {**self.env, "NOTIFY_SOCKET": str(self.notify_path), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "router.cli", "run", "-c", str(self.config_path)],
            cwd=self.workdir,
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=self.preexec_fn,
        )
        if wait_ready:
            self.wait_notification("READY", timeout=timeout)
        return self

    def restart(self, *, wait_ready: bool = True, timeout: float = 20.0) -> DaemonProcess:
        """Start the daemon again on the same config and state dir (after kill() or stop()).

        The notify socket is bound afresh and the notifications seen so far are dropped,
        so wait_notification("READY") waits for the new process; the log file is kept
        (appended to).
        """
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("the daemon is still running; kill() or stop() it first")
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.notify_path.unlink(missing_ok=True)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self.notifications = []
        return self.start(wait_ready=wait_ready, timeout=timeout)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        """Send a signal to the daemon."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: no cleanup runs (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for exit; return the exit code."""
        assert self.proc is not None
        code = self.proc.wait(timeout)
        if self._sock is not None:
            self.poll_notifications()
        return code

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def close(self) -> None:
        """Kill if still running and release the socket and log file."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self.notify_path.unlink(missing_ok=True)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # -- notifications ----------------------------------------------------------------

    def poll_notifications(self) -> list[dict[str, str]]:
        """Read every datagram waiting on the notify socket."""
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                break
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.notifications.append(fields)
        return self.notifications

    def wait_notification(
        self, key: str, *, timeout: float = 20.0, after: int = 0
    ) -> dict[str, str]:
        """Wait for a notification containing key (among those with index >= after)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for n in self.poll_notifications()[after:]:
                if key in n:
                    return n
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited with {self.proc.returncode} before {key}:\n{self.log_text()}"
                )
            time.sleep(0.02)
        raise AssertionError(f"no {key} notification within {timeout}s:\n{self.log_text()[-4000:]}")

    # -- logs --------------------------------------------------------------------------

    def log_text(self) -> str:
        """Return everything the daemon printed."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log_events(
        self, event: str, count: int, *, within: float = 10.0
    ) -> list[dict[str, Any]]:
        """Return the event's lines once at least `count` of them are in the log.

        The daemon flushes what its loop logged at the end of the loop's iteration, so
        an HTTP answer can reach a test a moment before the lines logged while making
        it: wait for them rather than read once.
        """
        deadline = time.monotonic() + within
        while True:
            found = self.log_events(event)
            if len(found) >= count or time.monotonic() >= deadline:
                return found
            time.sleep(0.02)

    def log_events(self, event: str | None = None) -> list[dict[str, Any]]:
        """Return parsed JSON log lines (optionally only one event)."""
        out = []
        for line in self.log_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and (event is None or rec.get("event") == event):
                out.append(rec)
        return out


def http(
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, Any, dict[str, str]]:
    """Make one HTTP request (blocking); return status, parsed JSON (or text) and headers."""
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None and "Content-Type" not in (headers or {}):
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            status, hdrs = resp.status, dict(resp.headers)
    except urllib.error.HTTPError as exc:
        raw, status, hdrs = exc.read(), exc.code, dict(exc.headers)
    try:
        parsed: Any = json.loads(raw)
    except ValueError:
        parsed = raw.decode(errors="replace")
    return status, parsed, hdrs


def ports() -> tuple[int, int]:
    """Return two free ports (web, ops)."""
    return free_port(), free_port()
