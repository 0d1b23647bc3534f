"""Real protocol peers on loopback for tests: a private mosquitto and a webhook receiver.

Use them from any test module:

    from tests import peers
    from tests.peers import Mosquitto, WebhookReceiver, free_port, needs_mosquitto

    mosquitto = peers.mosquitto  # makes the fixture visible to this module's tests
    webhook_receiver = peers.webhook_receiver

Binding the fixture by assignment (rather than `from tests.peers import mosquitto`)
keeps ruff from reporting each test parameter as a redefinition of the import.
Listing the module in `pytest_plugins` of a test module does not work: the module
is already imported by then and pytest fails with PytestAssertRewriteWarning. A
root tests/conftest.py with `pytest_plugins = ["tests.peers"]` would make both
fixtures global instead.

Recipes follow /work/shared/notes/real-peers.md section 3: mosquitto 2.0 starts in
about 15 ms, so a broker per test is cheap and keeps tests independent.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from adapters.webhook import verify_signature

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
)
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")
NEEDS_MOSQUITTO_REASON = "needs mosquitto (Debian package: mosquitto)"
needs_mosquitto = pytest.mark.skipif(MOSQUITTO is None, reason=NEEDS_MOSQUITTO_REASON)

WEBHOOK_SECRET = "test-webhook-secret-5f2c9a"


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on host a moment ago (bind to port 0, then release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(host: str, port: int, timeout: float = 5.0) -> bool:
    """Return True once a TCP connect to host:port succeeds, False after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.005)
    return False


async def wait_until(
    predicate: Callable[[], bool], within: float = 5.0, interval: float = 0.005
) -> None:
    """Poll predicate until it is true; raise TimeoutError after `within` seconds.

    For conditions nothing signals (a driver's `state`): the poll is short and
    bounded, so a test waits only as long as the condition takes.
    """
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110  (no event to wait on: drivers expose a plain attribute)
            await asyncio.sleep(interval)


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """Write a 2-day self-signed cert for localhost/127.0.0.1 into directory; return (cert, key).

    The cert is its own CA: pass it as the client's CA file to trust it.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs openssl (Debian package: openssl)")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


class Mosquitto:
    """A private mosquitto broker on a free loopback port; stop() and restart() keep the port.

    `users` turns on password authentication (anonymous access off); `persistence`
    keeps the broker's state in its directory across restart(); `extra_config` is
    appended verbatim to mosquitto.conf (e.g. "max_queued_messages 0").
    """

    def __init__(
        self,
        *,
        users: dict[str, str] | None = None,
        persistence: bool = False,
        extra_config: str = "",
        binary: str | None = None,
    ) -> None:
        """Write the config into a fresh temp dir; start() runs the broker."""
        binary = binary or MOSQUITTO
        if binary is None:
            raise RuntimeError(NEEDS_MOSQUITTO_REASON)
        self.binary = binary
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.dir = Path(tempfile.mkdtemp(prefix="omnirouter-mosquitto-"))
        self.log_path = self.dir / "mosquitto.log"
        self.users = dict(users or {})
        self._proc: subprocess.Popen[bytes] | None = None
        lines = [
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'false' if users is not None else 'true'}",
            f"persistence {'true' if persistence else 'false'}",
            f"log_dest file {self.log_path}",
        ]
        if persistence:
            lines.append(f"persistence_location {self.dir}/")
        if users is not None:
            passwd = self.dir / "passwd"
            passwd.touch(mode=0o600)
            for user, password in self.users.items():
                self._add_user(passwd, user, password)
            lines.append(f"password_file {passwd}")
        if os.geteuid() == 0:
            # As root mosquitto would drop to user `mosquitto`, which cannot read
            # this 0700 temp dir; keep it root (only ever on loopback, in tests).
            lines.append("user root")
        if extra_config:
            lines.append(extra_config)
        self.config_path = self.dir / "mosquitto.conf"
        self.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    @staticmethod
    def _add_user(passwd: Path, user: str, password: str) -> None:
        """Add one user to a mosquitto password file with mosquitto_passwd -b."""
        if MOSQUITTO_PASSWD is None:
            raise RuntimeError("needs mosquitto_passwd (Debian package: mosquitto)")
        subprocess.run(
            [MOSQUITTO_PASSWD, "-b", str(passwd), user, password],
            check=True,
            capture_output=True,
            timeout=10,
        )

    @property
    def running(self) -> bool:
        """Return whether the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 5.0) -> Mosquitto:
        """Start the broker and wait until it accepts TCP connections."""
        if self.running:
            return self
        deadline = time.monotonic() + timeout
        while True:
            with open(self.dir / "stdout.log", "ab") as out:
                self._proc = subprocess.Popen(
                    [self.binary, "-c", str(self.config_path)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            while time.monotonic() < deadline and self._proc.poll() is None:
                if wait_for_port(self.host, self.port, timeout=0.05):
                    return self
            # Exited early: on a fast restart the port can still be held; try again.
            if self._proc.poll() is None:
                self.stop()
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"mosquitto did not start on {self.port}: {self.log_text()[-2000:]}"
                )
            time.sleep(0.02)

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): connections stay open but nothing is answered."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused broker run again (SIGCONT)."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """Kill the broker at once (SIGKILL): its sockets close without an MQTT goodbye."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)

    def stop(self) -> None:
        """Stop the broker (SIGTERM, SIGKILL after 5 s); restart() reuses the port."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        proc.send_signal(signal.SIGCONT)  # a paused broker must wake up to handle SIGTERM
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def restart(self) -> Mosquitto:
        """Stop and start again on the same port (and, with persistence, the same state)."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the broker and delete its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_text(self) -> str:
        """Return what the broker logged so far (for assertion messages)."""
        parts = []
        for name in ("mosquitto.log", "stdout.log"):
            path = self.dir / name
            if path.exists():
                parts.append(path.read_text(encoding="utf-8", errors="replace"))
        return "\n".join(parts)

    def __enter__(self) -> Mosquitto:
        """Start the broker."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the broker and clean up."""
        self.close()


@pytest.fixture
def mosquitto() -> Iterator[Mosquitto]:
    """Yield a started private anonymous broker; skip when mosquitto is not installed."""
    if MOSQUITTO is None:
        pytest.skip(NEEDS_MOSQUITTO_REASON)
    with Mosquitto() as broker:
        yield broker


@dataclass(slots=True)
class ReceivedRequest:
    """One request the webhook receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes
    signature_ok: bool
    status: int  # what the receiver answered
    json: Any = None  # the parsed body, when it was JSON


@dataclass(slots=True)
class _Scripted:
    """A canned answer for the next `count` requests."""

    status: int
    count: int
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""
    delay: float = 0.0


class WebhookReceiver:
    """An aiohttp server on loopback that receives signed deliveries like an agent's endpoint.

    Every request is verified with `verify_signature` (401 when it fails) and kept
    in `requests`; accepted ones (2xx) also in `deliveries`. `respond_next` scripts
    the answers to the next requests (status, headers, body, delay).
    """

    def __init__(self, secret: str | bytes = WEBHOOK_SECRET, *, tolerance: int = 300) -> None:
        """Prepare the receiver; start() binds it to a free port."""
        self.secret = secret.encode("utf-8") if isinstance(secret, str) else secret
        self.tolerance = tolerance
        self.requests: list[ReceivedRequest] = []
        self._script: list[_Scripted] = []
        self._runner: web.AppRunner | None = None
        self._changed = asyncio.Event()
        self.port = 0

    @property
    def url(self) -> str:
        """Return the base URL, e.g. http://127.0.0.1:PORT (any path is accepted)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def deliveries(self) -> list[ReceivedRequest]:
        """Return the requests that were accepted (signature valid, answered 2xx)."""
        return [r for r in self.requests if r.signature_ok and 200 <= r.status < 300]

    def respond_next(
        self,
        status: int,
        count: int = 1,
        *,
        headers: dict[str, str] | None = None,
        body: str = "",
        delay: float = 0.0,
    ) -> None:
        """Answer the next `count` valid requests with `status` (after `delay` seconds)."""
        self._script.append(_Scripted(status, count, dict(headers or {}), body, delay))

    async def start(self) -> WebhookReceiver:
        """Bind to a free loopback port and start serving."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # A short shutdown_timeout: a test that ends mid-request should not wait 60 s.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))  # no free_port() race: keep the bound socket
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        return self

    async def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_for(self, count: int, within: float = 5.0) -> list[ReceivedRequest]:
        """Wait until at least `count` requests arrived; return them all."""
        async with asyncio.timeout(within):
            while len(self.requests) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.requests

    async def _handle(self, request: web.Request) -> web.Response:
        """Verify, record and answer one request."""
        body = await request.read()
        ok = verify_signature(
            self.secret,
            request.headers.get("X-Omnirouter-Timestamp", ""),
            body,
            request.headers.get("X-Omnirouter-Signature", ""),
            tolerance=self.tolerance,
        )
        status, headers, text, delay = 200, {}, "", 0.0
        if not ok:
            status, text = 401, "bad signature"
        elif self._script:
            step = self._script[0]
            status, headers, text, delay = step.status, step.headers, step.body, step.delay
            step.count -= 1
            if step.count <= 0:
                self._script.pop(0)
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        self.requests.append(
            ReceivedRequest(request.path, dict(request.headers), body, ok, status, parsed)
        )
        self._changed.set()
        if delay:
            await asyncio.sleep(delay)
        return web.Response(status=status, text=text, headers=headers)

    async def __aenter__(self) -> WebhookReceiver:
        """Start the receiver."""
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the receiver."""
        await self.stop()


@pytest_asyncio.fixture
async def webhook_receiver() -> AsyncIterator[WebhookReceiver]:
    """Yield a started WebhookReceiver that checks signatures with WEBHOOK_SECRET."""
    async with WebhookReceiver() as receiver:
        yield receiver
