"""Email fault tests: every mail in the mailbox becomes exactly one message, whatever breaks.

* The real daemon (`omnirouter run`) with `mark_seen = true` is SIGKILLed in the window
  between the store commit and the after-commit `\\Seen` flag / cursor write (held open
  deterministically: a proxy in front of Dovecot holds back the `UID STORE`), then again
  at a random point of the intake; after each restart the mail is fetched again and
  recognised. At the end each Message-ID is exactly one row and every mail is \\Seen.
* The connection is cut after K bytes of a large mail's FETCH answer (K random, seeded):
  the channel reconnects and each mail, large ones included, is committed once and whole.
* A backlog of 1,500 mails whose UID listing the channel reads at once (the proxy passes
  the answer on in one write, as a client behind a fast server reads it) is taken
  without reconnecting (aioimaplib 2.0.3 recurses once per line of a
  read, iroco-co/aioimaplib#118): the channel lists UIDs with one SEARCH line and
  fetches sizes in windows of 200, so it never reads a thousand lines at once.
* SMTP down for a while then back, through the outbox: tests/test_email_e2e.py.

The proxy (`FaultProxy`) runs its own event loop in a thread, so the blocking daemon
harness and an in-process channel can both use it. Randomness is seeded by
OMNIROUTER_TEST_SEED (default: a fixed seed) and printed, so a failure can be replayed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email
import email.policy
import os
import random
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aioimaplib
import pytest
import structlog

from channels.email import EmailChannel
from router.drivers import DriverContext, DriverState
from tests import peers_mail
from tests.daemon_harness import DaemonProcess, base_config, ports
from tests.peers import wait_until
from tests.peers_mail import PASSWORD, USER, Dovecot
from tests.test_email_channel import RecordingSink, config, deliver_to_maildir

pytestmark = [pytest.mark.slow, peers_mail.needs_dovecot]

dovecot = peers_mail.dovecot

SEED = int(os.environ.get("OMNIROUTER_TEST_SEED", "20240514"))
_UID_FETCH_BODY = re.compile(rb"UID FETCH (\d+) \(UID BODY\.PEEK\[\]")
# The channel's listing commands: UID SEARCH for new UIDs, then a FETCH of their sizes.
_UID_LIST = re.compile(rb"^(\S+) UID (?:SEARCH .*UID \d+:\*|FETCH \d+:[\d*]+ \(UID RFC822\.SIZE\))")
_UID_STORE_SEEN = re.compile(rb"UID STORE (\d+) \+FLAGS\.SILENT \(\\Seen\)")


@pytest.fixture
def rng() -> random.Random:
    """Return a seeded random generator (the seed is printed for replay)."""
    print(f"OMNIROUTER_TEST_SEED={SEED}")
    return random.Random(SEED)


# -- a TCP proxy that breaks IMAP connections on cue ----------------------------------


class FaultProxy:
    """A loopback TCP proxy to one upstream port, with two faults that can be armed.

    * `cut_fetch[uid] = [K, ...]`: the next FETCH of that UID's body (one K per FETCH)
      is cut after K bytes of server→client data (both sides aborted, like a reset).
    * `hold_store = n`: the n-th `UID STORE … (\\Seen)` is not forwarded; `held` is set
      with the UID, and the connection stays silent until the client goes away.
    * `coalesce_listing = True`: the answer to `UID FETCH n:* (UID RFC822.SIZE)` is
      passed on in one write once complete, as a client that falls behind a fast server
      reads it (many lines in one read).
    """

    def __init__(self, upstream_port: int, host: str = "127.0.0.1") -> None:
        """Prepare; start() listens on a free port."""
        self.host = host
        self.upstream_port = upstream_port
        self.port = 0
        self.connections = 0
        self.cuts: list[tuple[int, int]] = []  # (uid, bytes delivered before the cut)
        self.cut_fetch: dict[int, list[int]] = {}
        self.hold_store = 0
        self.coalesce_listing = False
        self.coalesced: list[int] = []  # bytes of each listing passed on in one write
        self.stores = 0
        self.held = threading.Event()
        self.held_uid = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> FaultProxy:
        """Listen in the proxy's own thread."""
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        future.result(10)
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        """Stop listening, abort every connection and stop the thread."""

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await asyncio.sleep(0.05)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(self.host, self.upstream_port)
        except OSError:
            client_w.transport.abort()
            return
        with self._lock:
            self.connections += 1
        self._writers.update((client_w, server_w))
        # The FETCH being answered that is to be cut: [uid, bytes left, bytes sent].
        cut: list[int] = []
        # The tag of a UID listing whose answer is being gathered, and the answer so far.
        gather: list[bytes] = []

        def abort() -> None:
            client_w.transport.abort()
            server_w.transport.abort()

        async def upstream() -> None:  # client → server
            while data := await client_r.read(65536):
                listing = _UID_LIST.search(data)
                if listing and self.coalesce_listing:
                    gather[:] = [listing.group(1), b""]
                match = _UID_FETCH_BODY.search(data)
                if match:
                    uid = int(match.group(1))
                    with self._lock:
                        plan = self.cut_fetch.get(uid)
                        if plan:
                            cut[:] = [uid, plan.pop(0), 0]
                store = _UID_STORE_SEEN.search(data)
                if store:
                    with self._lock:
                        self.stores += 1
                        hold = self.stores == self.hold_store
                    if hold:
                        self.held_uid = int(store.group(1))
                        self.held.set()
                        while await client_r.read(65536):  # swallow until the client dies
                            pass
                        break
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:  # server → client
            while data := await server_r.read(65536):
                if gather:
                    tag, sofar = gather
                    sofar += data
                    done = sofar.startswith(tag + b" ") or b"\r\n" + tag + b" " in sofar
                    if not (done and sofar.endswith(b"\r\n")):
                        gather[1] = sofar
                        continue
                    gather.clear()
                    self.coalesced.append(len(sofar))
                    data = sofar
                if cut:
                    uid, left, sent = cut
                    if len(data) >= left:
                        client_w.write(data[:left])
                        await client_w.drain()
                        with self._lock:
                            self.cuts.append((uid, sent + left))
                        abort()
                        return
                    cut[1], cut[2] = left - len(data), sent + len(data)
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            abort()
            self._writers.discard(client_w)
            self._writers.discard(server_w)


@pytest.fixture
def proxy(dovecot: Dovecot) -> Iterator[FaultProxy]:
    """Yield a started FaultProxy in front of the Dovecot fixture."""
    p = FaultProxy(dovecot.port).start()
    try:
        yield p
    finally:
        p.close()


# -- mail helpers ----------------------------------------------------------------------


def make_mail(n: int, *, attachment: int = 0, tag: str = "") -> bytes:
    """Return distinct mail n (own sender, own Message-ID); `attachment` bytes of noise."""
    msg = EmailMessage()
    msg["From"] = f"Customer {n} <c{n}.{tag}@example.com>"
    msg["To"] = "support@shop.test"
    msg["Subject"] = f"order question [{tag}-{n}]"
    msg["Message-ID"] = f"<f{n}.{tag}@faults.example.com>"
    msg["Date"] = "Tue, 14 May 2024 10:20:30 +0000"
    msg.set_content(f"My order {n} has not arrived." + (" 订单还没到。" if n % 2 else ""))
    if attachment:
        msg.add_attachment(
            random.Random(n).randbytes(attachment),
            maintype="application",
            subtype="octet-stream",
            filename=f"scan-{n}.bin",
        )
    return msg.as_bytes()


@asynccontextmanager
async def imap_session(server: Dovecot) -> AsyncIterator[aioimaplib.IMAP4]:
    """Yield a logged-in client; log out and close the socket (even if asyncio.run ends next)."""
    client = aioimaplib.IMAP4(server.host, server.port, timeout=10)
    try:
        await client.wait_hello_from_server()
        response = await client.login(USER, PASSWORD)
        assert response.result == "OK", response
        yield client
        await client.logout()
    finally:
        transport = client.protocol.transport
        if transport is not None:
            transport.close()
        await asyncio.sleep(0)  # let the transport finish closing on this loop


async def append_all(server: Dovecot, raws: list[bytes], connections: int = 1) -> None:
    """APPEND raws in order (over several connections when asked: order then varies)."""
    queue = collections.deque(raws)

    async def worker() -> None:
        async with imap_session(server) as client:
            while queue:
                response = await client.append(queue.popleft(), mailbox="INBOX")
                assert response.result == "OK", response

    await asyncio.gather(*(worker() for _ in range(connections)))


async def seen_flags(server: Dovecot) -> dict[int, bool]:
    """Return uid → whether \\Seen is set, for every mail in INBOX."""
    async with imap_session(server) as client:
        await client.select("INBOX")
        response = await client.uid("fetch", "1:*", "(UID FLAGS)")
        out: dict[int, bool] = {}
        for line in response.lines:
            m = re.search(rb"UID (\d+) FLAGS \(([^)]*)\)", bytes(line)) or re.search(
                rb"FLAGS \(([^)]*)\) UID (\d+)", bytes(line)
            )
            if m is None:
                continue
            if m.group(1).isdigit():
                out[int(m.group(1))] = b"\\Seen" in m.group(2)
            else:
                out[int(m.group(2))] = b"\\Seen" in m.group(1)
        return out


# -- SIGKILL between commit and \Seen / cursor ------------------------------------------


def email_daemon_config(state_dir: Path, imap_port: int) -> str:
    """Return a daemon config with one email channel (\\Seen after commit, short timers)."""
    web_port, ops_port = ports()
    channel = (
        '[[channels]]\ntype = "email"\nname = "support"\n'
        "[channels.imap]\n"
        f'host = "127.0.0.1"\nport = {imap_port}\ntls = "none"\n'
        f'username = "{USER}"\npassword = "{PASSWORD}"\n'
        "mark_seen = true\nidle_renew = 60\npoll_interval = 1\ntimeout = 5\n"
        "reconnect_min = 0.05\nreconnect_max = 0.5\n"
        "[channels.smtp]\n"
        f'host = "127.0.0.1"\nport = {ports()[0]}\ntls = "none"\n'
        'from_address = "support@shop.test"\n'
        "[channels.ack]\nenabled = false\n"
    )
    agents = '[[agents]]\nid = "alice"\ncapacity = 1000\ntool = "inbox"\nskills = ["en", "zh"]\n'
    return base_config(
        state_dir, web_port=web_port, ops_port=ops_port, agents=agents, extra=channel
    )


class Db:
    """Read-only views of the daemon's database (it may be dead or alive)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _rows(self, sql: str, *args: Any) -> list[Any]:
        if not self.path.exists():
            return []
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:  # before the schema exists
            if "no such table" in str(exc):
                return []
            raise
        finally:
            conn.close()

    def count(self) -> int:
        return int(self._rows("SELECT count(*) FROM messages WHERE channel='support'")[0][0])

    def external_ids(self) -> set[str]:
        return {
            r[0] for r in self._rows("SELECT external_id FROM messages WHERE channel='support'")
        }

    def message_ids(self) -> collections.Counter[str]:
        """Count stored rows per Message-ID (parsed from the stored raw mail)."""
        counter: collections.Counter[str] = collections.Counter()
        for (raw,) in self._rows("SELECT raw FROM messages WHERE channel='support'"):
            headers = email.message_from_bytes(bytes(raw), policy=email.policy.default)
            counter[str(headers["Message-ID"])] += 1
        return counter


def wait_for(predicate: Any, within: float, what: str, daemon: DaemonProcess) -> None:
    """Poll a blocking predicate; fail with the daemon's log tail."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}:\n{daemon.log_text()[-4000:]}")


def test_sigkill_between_commit_and_seen_loses_and_doubles_nothing(
    dovecot: Dovecot, proxy: FaultProxy, tmp_path: Path, rng: random.Random
) -> None:
    n = 40
    tag = secrets.token_hex(3)
    raws = [make_mail(i, tag=tag) for i in range(n)]
    asyncio.run(append_all(dovecot, raws))
    state_dir = tmp_path / "state"
    db = Db(state_dir / "omnirouter.db")
    daemon = DaemonProcess(tmp_path, email_daemon_config(state_dir, proxy.port))
    try:
        # Kill 1: deterministic. The k-th \Seen is held back by the proxy: the mail is
        # committed (and journalled) but not flagged, and the cursor has not moved.
        k = rng.randint(2, n // 2)
        proxy.hold_store = k
        daemon.start()
        assert proxy.held.wait(30), f"no STORE #{k} seen:\n{daemon.log_text()[-3000:]}"
        uidvalidity = asyncio.run(_uidvalidity(dovecot))
        held = f"{uidvalidity}:{proxy.held_uid}"
        assert held in db.external_ids(), "the held mail must be committed before its \\Seen"
        assert not asyncio.run(seen_flags(dovecot))[proxy.held_uid]
        daemon.kill()
        first_kill = db.count()

        # Kill 2: at a random point of the rest of the intake (no fault armed).
        target = rng.randint(first_kill + 1, n - 1)
        daemon.restart()
        wait_for(lambda: db.count() >= target, 30, f"{target} messages", daemon)
        daemon.kill()

        # Restart; everything is taken, each mail once, and all are \Seen.
        daemon.restart()
        wait_for(lambda: db.count() >= n, 30, f"all {n} messages", daemon)
        wait_for(lambda: all(asyncio.run(seen_flags(dovecot)).values()), 30, "all \\Seen", daemon)
        time.sleep(0.5)  # anything doubled late would show now
        ids = db.message_ids()
        expected = {f"<f{i}.{tag}@faults.example.com>" for i in range(n)}
        assert set(ids) == expected, (expected - set(ids), set(ids) - expected)
        assert all(c == 1 for c in ids.values()), {m: c for m, c in ids.items() if c > 1}
        assert db.count() == n
        flags = asyncio.run(seen_flags(dovecot))
        assert len(flags) == n and all(flags.values())
        # The held mail was fetched again after the restart and recognised, not re-routed.
        duplicates = daemon.log_events("email.duplicate")
        assert any(e.get("uid") == proxy.held_uid for e in duplicates), daemon.log_text()[-3000:]
        assert daemon.stop() == 0
    finally:
        daemon.close()
    print(f"kill 1 held STORE #{k} (uid {proxy.held_uid}) at {first_kill} rows; kill 2 at {target}")


async def _uidvalidity(server: Dovecot) -> int:
    async with imap_session(server) as client:
        response = await client.select("INBOX")
    for line in response.lines:
        m = re.search(rb"\[UIDVALIDITY (\d+)\]", bytes(line))
        if m:
            return int(m.group(1))
    raise AssertionError(f"no UIDVALIDITY in {response.lines}")


# -- connection cut mid-FETCH ----------------------------------------------------------


async def test_connection_cut_mid_fetch_then_every_mail_once_and_whole(
    dovecot: Dovecot, proxy: FaultProxy, tmp_path: Path, rng: random.Random
) -> None:
    tag = secrets.token_hex(3)
    sizes = [0, 1_500_000, 0, 800_000, 0, 2_000_000]  # attachment bytes per mail
    raws = [make_mail(i, attachment=size, tag=tag) for i, size in enumerate(sizes)]
    await append_all(dovecot, raws)
    # UIDs 1..6 in order. Cut each large mail's FETCH at a random byte, uid 4 twice, and
    # one cut inside the first few bytes of an answer (before the literal starts).
    plan = {
        2: [rng.randint(200, 1_000_000)],
        4: [rng.randint(200, 500_000), rng.randint(500_000, 1_000_000)],
        6: [rng.randint(1, 40)],
    }
    proxy.cut_fetch = {uid: list(ks) for uid, ks in plan.items()}
    cfg = config(
        dovecot,
        port=proxy.port,
        poll_interval=60,
        reconnect_min=0.05,
        reconnect_max=0.2,
    )
    sink = RecordingSink()
    channel = EmailChannel("support", cfg, DriverContext(tmp_path, structlog.get_logger()))
    task = asyncio.create_task(channel.run(sink))
    try:
        await sink.wait_for(len(raws), within=60)
        await wait_until(lambda: channel.state == DriverState.CONNECTED, within=10)
    finally:
        await asyncio.wait_for(channel.stop(), 10)
        await asyncio.wait_for(task, 10)
    assert sorted(uid for uid, _ in proxy.cuts) == [2, 4, 4, 6], proxy.cuts
    assert proxy.connections >= 1 + len(proxy.cuts)  # reconnected after every cut
    # Each mail once, in UID order, whole (Dovecot answers with CRLF line ends).
    assert [m.external_id.split(":")[1] for m in sink.stored] == ["1", "2", "3", "4", "5", "6"]
    assert len({m.external_id for m in sink.stored}) == len(raws)
    for message, raw in zip(sink.stored, raws, strict=True):
        assert message.raw is not None
        assert message.raw.replace(b"\r\n", b"\n") == raw.replace(b"\r\n", b"\n")
    # Nothing cut short ever reached the sink, and nothing was offered twice.
    assert len(sink.calls) == len(raws)
    assert channel.committed == len(raws) and channel.duplicates == 0


# -- a backlog of more than ~1,000 mails -------------------------------------------------


async def test_backlog_of_1500_mails_read_at_once_is_taken_without_reconnecting(
    dovecot: Dovecot, proxy: FaultProxy, tmp_path: Path
) -> None:
    n = 1500
    tag = secrets.token_hex(3)
    async with imap_session(dovecot) as client:  # Dovecot creates the Maildir (as its user)
        await client.select("INBOX")
    for i in range(n):  # an MDA delivered them while the channel was away
        deliver_to_maildir(dovecot, make_mail(i, tag=tag))
    proxy.coalesce_listing = True
    sink = RecordingSink()
    cfg = config(dovecot, port=proxy.port, poll_interval=60)
    channel = EmailChannel("support", cfg, DriverContext(tmp_path, structlog.get_logger()))
    task = asyncio.create_task(channel.run(sink))
    dropped = False
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(90):
                while len(sink.stored) < n:
                    if proxy.connections > 1 or channel.last_error:  # it had to reconnect
                        dropped = True
                        break
                    await asyncio.sleep(0.01)
    finally:
        await asyncio.wait_for(channel.stop(), 10)
        await asyncio.wait_for(task, 10)
    assert proxy.coalesced, "the listing never went through the proxy"
    assert not dropped, f"the channel reconnected: {channel.last_error!r}"
    assert len(sink.stored) == n
    assert len({m.external_id for m in sink.stored}) == n
