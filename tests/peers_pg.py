"""PostgreSQL for the tests: the machine's server, or a private cluster, and fresh databases.

`pg_server()` finds a server once per session: `$TEST_PG_DSN`, else the local one on
127.0.0.1:5432 (trust auth, as on Debian's CI machines), else a private cluster made
with Debian's `initdb`/`pg_ctl` in a temp dir (run as the `postgres` or `nobody` user:
PostgreSQL refuses root). Without any of these the tests skip, naming the package.
Every test then gets a database of its own (`fresh_database`), dropped afterwards.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.peers import free_port

psycopg = pytest.importorskip("psycopg", reason="needs psycopg (pip install 'omnirouter[test]')")


INITDB_OPTIONS = ("-E", "UTF8", "--locale=C", "--no-sync")
# A test server: nothing to survive a power cut, room for several daemons' pools.
SERVER_OPTIONS = (
    "-c",
    "listen_addresses=127.0.0.1",
    "-c",
    "fsync=off",
    "-c",
    "max_connections=300",
)


@dataclass(frozen=True)
class PgServer:
    """A server the tests may create databases on (`admin_dsn` names its postgres db)."""

    host: str
    port: int
    user: str

    def dsn(self, database: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    @property
    def admin_dsn(self) -> str:
        return self.dsn("postgres")


def _answers(dsn: str) -> bool:
    try:
        psycopg.connect(dsn, connect_timeout=2).close()
    except psycopg.Error:
        return False
    return True


def _from_env() -> PgServer | None:
    dsn = os.environ.get("TEST_PG_DSN", "")
    if not dsn:
        return None
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    server = PgServer(
        str(info.get("host") or "127.0.0.1"),
        int(info.get("port") or 5432),
        str(info.get("user") or "postgres"),
    )
    return server if _answers(server.admin_dsn) else None


@contextlib.contextmanager
def _private_cluster() -> Iterator[PgServer | None]:
    """Start a throw-away cluster with Debian's binaries (None when they are absent)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        yield None
        return
    bindir = Path(found[-1]).parent
    base = Path(tempfile.mkdtemp(prefix="omnirouter-pg-"))
    as_user = _as_service_account(base)
    port = free_port()
    subprocess.run(
        [bindir / "initdb", "-D", base / "data", "-U", "postgres", "-A", "trust", *INITDB_OPTIONS],
        check=True,
        capture_output=True,
        **as_user,
    )
    try:
        with (
            open(base / "server.log", "wb") as log,
            _serving(
                [bindir / "postgres", "-D", base / "data", "-p", port, "-k", base, *SERVER_OPTIONS],
                PgServer("127.0.0.1", port, "postgres"),
                as_user,
                log,
                f"private PostgreSQL did not start: see {base}/server.log",
            ) as server,
        ):
            yield server
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _as_service_account(base: Path) -> dict[str, Any]:
    """Give `base` to the account servers run as (PostgreSQL and PgBouncer refuse root:
    `postgres`, else `nobody`); return the subprocess keywords that run as it."""
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        pw = pwd.getpwnam("nobody")
    for path in (base, *base.iterdir()):
        os.chown(path, pw.pw_uid, pw.pw_gid)
    if os.getuid() != 0:
        return {}
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


@contextlib.contextmanager
def _serving(
    argv: list[Any], server: PgServer, as_user: dict[str, Any], log: Any, failed: str
) -> Iterator[PgServer]:
    """Run a server process until the block ends; yield once `server` answers."""
    proc = subprocess.Popen([str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT, **as_user)
    try:
        deadline = time.monotonic() + 30
        while not _answers(server.admin_dsn):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(failed)
            time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def pg_server() -> Iterator[PgServer]:
    """Yield a server to create test databases on, or skip naming what is missing."""
    server = _from_env()
    if server is None:
        local = PgServer("127.0.0.1", 5432, "postgres")
        server = local if _answers(local.admin_dsn) else None
    if server is not None:
        yield server
        return
    with _private_cluster() as private:
        if private is None:
            pytest.skip(
                "needs PostgreSQL: a server on 127.0.0.1:5432, $TEST_PG_DSN, or Debian's "
                "postgresql package for a private cluster"
            )
        yield private


@contextlib.contextmanager
def fresh_database(server: PgServer) -> Iterator[str]:
    """Create an empty database for one test; yield its DSN; drop it (and its sessions)."""
    name = f"omnirouter_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server.dsn(name)
    finally:
        with psycopg.connect(server.admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def server_fixture() -> Iterator[PgServer]:
    """A server for a test module (use as `server = peers_pg.server_fixture`)."""
    with pg_server() as found:
        yield found


@pytest.fixture
def database_fixture(server: PgServer) -> Iterator[str]:
    """A fresh database per test, dropped after it (`dsn = peers_pg.database_fixture`)."""
    with fresh_database(server) as url:
        yield url


@contextlib.contextmanager
def pgbouncer(server: PgServer, *, pool_mode: str = "transaction") -> Iterator[PgServer]:
    """Run Debian's PgBouncer in front of `server` (skip naming the package when absent).

    Transaction pooling on two server connections per database, so client sessions take
    turns on them, as in a typical deployment. The router's `options` startup parameter
    (its timeouts) is ignored, as PgBouncer's documentation advises for such clients.
    """
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.path.exists(binary):
        pytest.skip("needs PgBouncer: apt-get install pgbouncer (Debian package)")
    base = Path(tempfile.mkdtemp(prefix="omnirouter-pgbouncer-"))
    port = free_port()
    (base / "users.txt").write_text(f'"{server.user}" ""\n')
    (base / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={server.host} port={server.port}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {base}/users.txt\n"
        f"pool_mode = {pool_mode}\ndefault_pool_size = 2\nmax_client_conn = 200\n"
        "ignore_startup_parameters = options,extra_float_digits\n"
        f"logfile = {base}/pgbouncer.log\npidfile = {base}/pgbouncer.pid\n"
    )
    try:
        with _serving(
            [binary, base / "pgbouncer.ini"],
            PgServer("127.0.0.1", port, server.user),
            _as_service_account(base),
            subprocess.DEVNULL,
            f"PgBouncer did not start: see {base}/pgbouncer.log",
        ) as bouncer:
            yield bouncer
    finally:
        shutil.rmtree(base, ignore_errors=True)
