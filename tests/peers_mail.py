"""Mail peers on loopback for tests: a private Dovecot (IMAP) and an aiosmtpd SMTP sink.

Recipes follow /work/shared/notes/real-peers.md sections 1 and 2. Dovecot refuses to
run as root, so under root it runs as nobody (its directory is chowned to it).
Each `Dovecot` has its own directory, port and users; `stop()`/`start()` keep the
port and the mail, so a test can take the server away mid-IDLE and bring it back.

Use from a test module:

    from tests import peers_mail
    dovecot = peers_mail.dovecot          # fixture: a started Dovecot, user "alice"
    smtp_sink = peers_mail.smtp_sink      # fixture: a started aiosmtpd Controller
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

from tests.peers import free_port, self_signed_cert

DOVECOT = shutil.which("dovecot") or (
    "/usr/sbin/dovecot" if os.path.exists("/usr/sbin/dovecot") else None
)
NEEDS_DOVECOT_REASON = "needs dovecot (Debian package: dovecot-imapd)"
needs_dovecot = pytest.mark.skipif(DOVECOT is None, reason=NEEDS_DOVECOT_REASON)

USER = "alice"
PASSWORD = "alice-imap-pw-4711"

_CONF = """\
protocols = imap
listen = 127.0.0.1
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
{ssl}
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
default_login_user = {user}
default_internal_user = {user}
default_internal_group = {group}
mail_location = maildir:{d}/mail/%u/Maildir
imap_idle_notify_interval = 1 secs
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={d}/mail/%u
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {imaps_port}
    {imaps_ssl}
  }}
}}
service anvil {{
  chroot =
}}
"""


class Dovecot:
    """A private dovecot on free loopback ports; `tls=True` adds STARTTLS and IMAPS."""

    def __init__(self, *, users: dict[str, str] | None = None, tls: bool = False) -> None:
        """Write config, users and certificate into a fresh temp dir; start() runs it."""
        if DOVECOT is None:
            raise RuntimeError(NEEDS_DOVECOT_REASON)
        self.binary = DOVECOT
        self.host = "127.0.0.1"
        self.port = free_port()
        self.imaps_port = free_port() if tls else 0
        self.dir = Path(tempfile.mkdtemp(prefix="omnirouter-dovecot-"))
        self.users = dict(users or {USER: PASSWORD})
        self.tls = tls
        self.cert: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        if os.geteuid() == 0:
            pw = pwd.getpwnam("nobody")
            self.uid, self.gid = pw.pw_uid, pw.pw_gid
            user, group = "nobody", "nogroup"
        else:
            self.uid, self.gid = os.getuid(), os.getgid()
            user = pwd.getpwuid(self.uid).pw_name
            group = user
        ssl_conf, imaps_ssl = "ssl = no", "ssl = no"
        if tls:
            self.cert, key = self_signed_cert(self.dir)
            ssl_conf = f"ssl = yes\nssl_cert = <{self.cert}\nssl_key = <{key}"
            imaps_ssl = "ssl = yes"
        for sub in ("run", "state", "mail"):
            (self.dir / sub).mkdir()
        (self.dir / "passwd").write_text(
            "".join(f"{u}:{{PLAIN}}{p}::::::\n" for u, p in self.users.items())
        )
        (self.dir / "dovecot.conf").write_text(
            _CONF.format(
                d=self.dir,
                ssl=ssl_conf,
                user=user,
                group=group,
                uid=self.uid,
                gid=self.gid,
                port=self.port,
                imaps_port=self.imaps_port,
                imaps_ssl=imaps_ssl,
            )
        )
        self._chown()

    def _chown(self) -> None:
        """Give the whole directory to the account dovecot runs as."""
        if os.geteuid() != 0:
            return
        for root, dirs, files in os.walk(self.dir):
            os.chown(root, self.uid, self.gid)
            for name in dirs + files:
                os.chown(os.path.join(root, name), self.uid, self.gid)

    @property
    def running(self) -> bool:
        """Return whether the master process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> Dovecot:
        """Start dovecot in the foreground (own process group) and wait for `* OK`."""
        if self.running:
            return self
        kwargs: dict[str, Any] = {}
        if os.geteuid() == 0:
            kwargs = {"user": self.uid, "group": self.gid, "extra_groups": []}
        with open(self.dir / "out.log", "ab") as out:
            self._proc = subprocess.Popen(
                [self.binary, "-F", "-c", str(self.dir / "dovecot.conf")],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **kwargs,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if self._greets():
                return self
            time.sleep(0.02)
        log = self.log_text()[-3000:]
        self.stop()
        raise RuntimeError(f"dovecot did not start on {self.port}: {log}")

    def _greets(self) -> bool:
        """Return True once a connection reads the `* OK` greeting."""
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.settimeout(0.5)
                return s.recv(64).startswith(b"* OK")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop every dovecot process (SIGTERM to the foreground master, SIGKILL after 5 s)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            self._killpg(proc)

    def kill(self) -> None:
        """Kill dovecot and all its children at once (SIGKILL to its process group)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            self._killpg(proc)

    @staticmethod
    def _killpg(proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the process group this fixture started (and only that one)."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)

    def restart(self) -> Dovecot:
        """Stop and start again on the same port with the same mail."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop and delete the directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_text(self) -> str:
        """Return what dovecot logged (for assertion messages)."""
        parts = []
        for name in ("dovecot.log", "out.log"):
            path = self.dir / name
            if path.exists():
                parts.append(path.read_text(encoding="utf-8", errors="replace"))
        return "\n".join(parts)

    def uidvalidity_reset(self, user: str = USER, folder: str = "INBOX") -> None:
        """Make the next session see a new UIDVALIDITY (dovecot stopped: drop the uid list)."""
        was_running = self.running
        self.stop()
        maildir = self.dir / "mail" / user / "Maildir"
        if folder != "INBOX":
            maildir = maildir / f".{folder}"
        for name in (
            "dovecot-uidlist",
            "dovecot.index",
            "dovecot.index.cache",
            "dovecot.index.log",
        ):
            try:
                (maildir / name).unlink()
            except FileNotFoundError:
                pass
        # Dovecot takes the new UIDVALIDITY from the clock (seconds): make it differ.
        time.sleep(1.1)
        if was_running:
            self.start()

    def client_tls_context(self) -> ssl.SSLContext:
        """Return a verifying TLS context that trusts this server's certificate."""
        assert self.cert is not None
        return ssl.create_default_context(cafile=str(self.cert))

    def __enter__(self) -> Dovecot:
        """Start the server."""
        return self.start()

    def __exit__(self, *exc: object) -> None:
        """Stop the server and clean up."""
        self.close()


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    """Yield a started private dovecot with user alice; skip when dovecot is not installed."""
    if DOVECOT is None:
        pytest.skip(NEEDS_DOVECOT_REASON)
    with Dovecot() as server:
        yield server


@pytest.fixture
def dovecot_tls() -> Iterator[Dovecot]:
    """Yield a started private dovecot offering STARTTLS and IMAPS with a self-signed cert."""
    if DOVECOT is None:
        pytest.skip(NEEDS_DOVECOT_REASON)
    with Dovecot(tls=True) as server:
        yield server


# -- SMTP -----------------------------------------------------------------------------


@dataclass
class SmtpSink:
    """An aiosmtpd handler that records every accepted mail and can be scripted to fail."""

    messages: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    fail_with: str | None = None  # e.g. "451 4.3.0 try later" answered to DATA
    rcpt_reply: str | None = None  # e.g. "550 5.1.1 no such user" answered to RCPT

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        """Accept the recipient unless scripted otherwise."""
        if self.rcpt_reply is not None:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Record the mail, or answer the scripted failure."""
        if self.fail_with is not None:
            return self.fail_with
        content = envelope.content
        data = content if isinstance(content, bytes) else str(content).encode()
        self.messages.append((str(envelope.mail_from), list(envelope.rcpt_tos), data))
        return "250 OK"


class SmtpServer:
    """An aiosmtpd Controller (own thread) on a free port; stop()/start() keep the port."""

    def __init__(self, **controller_kwargs: Any) -> None:
        """Prepare the sink and the port; start() listens."""
        self.sink = SmtpSink()
        self.host = "127.0.0.1"
        self.port = free_port()
        self._kwargs = controller_kwargs
        self._controller: Controller | None = None

    def start(self) -> SmtpServer:
        """Start listening."""
        if self._controller is None:
            self._controller = Controller(
                self.sink, hostname=self.host, port=self.port, **self._kwargs
            )
            self._controller.start()
        return self

    def stop(self) -> None:
        """Stop listening (connections are then refused)."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None


def smtp_authenticator(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
) -> AuthResult:
    """Accept login bot / bot-pw only."""
    ok = data.login == b"bot" and data.password == b"bot-pw"
    return AuthResult(success=ok, handled=False)


@pytest.fixture
def smtp_sink() -> Iterator[SmtpServer]:
    """Yield a started plain aiosmtpd server."""
    server = SmtpServer().start()
    try:
        yield server
    finally:
        server.stop()
