"""The PostgreSQL backend beyond the contract suite: config, outages, the daemon on it.

The contract suite (tests/test_store_contract.py) proves each store method behaves the
same on SQLite and PostgreSQL; here: selecting the backend from config, what the store
does when the server goes away and comes back (through a TCP proxy we can cut), two
stores racing for the same work, and the real daemon routing on PostgreSQL across a
SIGKILL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio

from router.config import ConfigError, loads_config
from router.daemon import open_store
from router.model import Agent
from router.store import StoreCondition, StoreUnavailable
from router.store.postgres import PostgresStore
from tests import peers_pg
from tests.daemon_harness import DaemonProcess, base_config, http, ports
from tests.peers import wait_until
from tests.peers_pg import PgServer
from tests.reliability.tcp_proxy import TcpProxy
from tests.test_store_contract import T0, assignment_for, new_message, outbox_item

REPO = Path(__file__).resolve().parents[1]


server = peers_pg.server_fixture
dsn = peers_pg.database_fixture


@pytest_asyncio.fixture
async def store(dsn: str) -> AsyncIterator[PostgresStore]:
    s = PostgresStore(dsn, pool_size=3)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


# -- config ----------------------------------------------------------------------------


def test_a_url_selects_postgresql_and_the_shorthand_means_the_same() -> None:
    long = loads_config('[store]\nurl = "postgresql://router@db.example:5433/omni"\n')
    short = loads_config('store = "postgresql://router@db.example:5433/omni"\n')
    assert long.store.backend == short.store.backend == "postgresql"
    assert long.store.url == short.store.url
    assert long.store_label() == "postgresql://db.example:5433/omni"


def test_the_label_never_shows_the_password() -> None:
    config = loads_config(
        '[store]\nurl = "postgresql://router:s3cret-pw@db/omni?sslmode=require"\n'
    )
    assert "s3cret" not in config.store_label()
    assert config.store_label() == "postgresql://db/omni"


def test_postgresql_without_a_url_names_the_field() -> None:
    with pytest.raises(ConfigError) as err:
        loads_config('[store]\nbackend = "postgresql"\n')
    assert "store" in str(err.value) and "url: required" in str(err.value)


def test_a_url_of_another_scheme_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as err:
        loads_config('[store]\nurl = "mysql://root:hunter22@db/omni"\n')
    assert "store.url" in str(err.value) and "postgresql://" in str(err.value)
    assert "hunter22" not in str(err.value)


# -- races between instances --------------------------------------------------------


async def test_two_instances_never_overfill_an_agent_or_assign_twice(dsn: str) -> None:
    """Two stores (two instances) race to give 40 messages to one agent of capacity 3.

    Each message is offered by both instances at once: every message is assigned at
    most once, and the agent ends with exactly 3 open conversations.
    """
    a, b = PostgresStore(dsn, pool_size=3), PostgresStore(dsn, pool_size=3)
    await a.open()
    await b.open()
    try:
        await a.sync_agents([Agent("alice", "Alice", 3, "ops")])
        news = [new_message(handle=f"c{i}@example.com", ingested_at=T0 + i) for i in range(40)]
        for n in news:
            await a.ingest(n)

        async def offer(store: PostgresStore, n: Any) -> bool:
            assignment = dataclasses.replace(
                assignment_for(n, "alice"), capacity=3, pool="*", channel_type="web"
            )
            item = outbox_item(n.message_id, agent_id="alice", conversation_id=n.conversation_id)
            return await store.assign(assignment, item)

        results = await asyncio.gather(*(offer(s, n) for n in news for s in (a, b)))
        assert sum(results) == 3
        for i in range(len(news)):
            assert not (results[2 * i] and results[2 * i + 1])  # never both instances
        loads = await b.open_loads()
        assert sum(v for (agent, _), v in loads.items() if agent == "alice") == 3
        assert (await a.delivery_counts())["pending"] == 3  # the losers wrote nothing
    finally:
        await a.close()
        await b.close()


async def test_two_instances_storing_one_new_handle_make_one_contact(dsn: str) -> None:
    """Both instances take a first message from the same new handle at once (20 handles):
    each message is stored, and each handle is one contact row of one person."""
    a, b = PostgresStore(dsn, pool_size=3), PostgresStore(dsn, pool_size=3)
    await a.open()
    await b.open()
    try:
        handles = [f"new{i}@example.com" for i in range(20)]
        results = await asyncio.gather(
            *(
                store.ingest(new_message(handle=h, external_id=f"{h}-{n}", ingested_at=T0 + n))
                for h in handles
                for n, store in enumerate((a, b))
            )
        )
        assert not any(r.duplicate for r in results)
        for i, h in enumerate(handles):
            first, second = results[2 * i], results[2 * i + 1]
            assert first.contact is not None and second.contact is not None
            assert first.contact.person_id == second.contact.person_id, h
            view = await a.contact(f"web:{h}", T0)
            assert view is not None
            assert [x["key"] for x in view["handles"]] == [f"web:{h}"]
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize("prepared", [True, False])
async def test_statements_run_often_are_prepared_unless_switched_off(
    dsn: str, prepared: bool
) -> None:
    """`[store] prepared_statements`: on, the ingest's statements are prepared on the
    connection after a few messages; off (for PgBouncer's transaction mode), none is."""
    config = loads_config(
        f'[store]\nurl = "{dsn}"\npool_size = 1\nprepared_statements = {str(prepared).lower()}\n'
    )
    store = open_store(config)
    assert isinstance(store, PostgresStore)
    await store.open()
    try:
        for i in range(10):
            await store.ingest(new_message(handle=f"p{i}@example.com", ingested_at=T0 + i))

        def prepared_here(c: Any) -> int:
            (count,) = c.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()
            return int(count)

        count = await store.engine.run(prepared_here)  # on the pool's one connection
    finally:
        await store.close()
    if prepared:
        assert count >= 5  # the statements every ingest runs (8 here, unassigned)
    else:
        assert count == 0


# -- the server going away ----------------------------------------------------------


async def test_server_gone_fails_fast_and_recovers_by_itself(server: PgServer, dsn: str) -> None:
    """Cut the connection mid-run: calls raise StoreUnavailable, then work again."""
    database = dsn.rsplit("/", 1)[1]
    with TcpProxy(server.host, server.port) as proxy:
        s = PostgresStore(f"postgresql://{server.user}@{proxy.url_host}/{database}", pool_size=2)
        s.engine.connect_kwargs["connect_timeout"] = 2
        await s.open()
        try:
            await s.ingest(new_message(ingested_at=T0))
            proxy.cut()
            with pytest.raises(StoreUnavailable):
                for _ in range(4):  # each worker finds its connection gone
                    await s.ingest(new_message(ingested_at=T0 + 1))
            assert s.condition is StoreCondition.FAILING
            proxy.restore()
            await wait_until(lambda: s.condition is StoreCondition.OK, within=15)
            result = await s.ingest(new_message(ingested_at=T0 + 2))
            assert not result.duplicate
            assert (await s.message(result.message_id)) is not None  # committed, readable
        finally:
            await s.close()


async def test_opening_an_unreachable_server_says_so(server: PgServer) -> None:
    from tests.peers import free_port

    s = PostgresStore(f"postgresql://postgres@127.0.0.1:{free_port()}/none", connect_timeout=2)
    with pytest.raises(Exception, match=r"connect|refused|Connection"):
        await s.open()


# -- the daemon on PostgreSQL -----------------------------------------------------------


def pg_config(tmp_path: Path, dsn: str, web_port: int, ops_port: int) -> str:
    return base_config(tmp_path / "state", web_port=web_port, ops_port=ops_port) + (
        f'\n[store]\nurl = "{dsn}"\npool_size = 3\n'
    ).replace("[store]", "[store]", 1)


def test_migrate_command_on_postgresql(tmp_path: Path, dsn: str) -> None:
    config = tmp_path / "omnirouter.toml"
    config.write_text(f'store = "{dsn}"\n[daemon]\nstate_dir = "{tmp_path / "state"}"\n')
    done = subprocess.run(
        [sys.executable, "-m", "router.cli", "migrate", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert "is up to date" in done.stdout and "postgresql://" in done.stdout


def test_daemon_routes_on_postgresql_and_keeps_it_across_a_kill(tmp_path: Path, dsn: str) -> None:
    web_port, ops_port = ports()
    daemon = DaemonProcess(tmp_path, pg_config(tmp_path, dsn, web_port, ops_port))
    try:
        daemon.start()
        status, body, _ = http(
            "POST",
            f"http://127.0.0.1:{web_port}/v1/messages",
            {"text": "Where is my parcel?", "contact": {"handle": "dana@example.com"}},
            headers={"Idempotency-Key": "pg-order-1", "Content-Type": "application/json"},
        )
        assert status == 201, body
        assert body["state"] == "assigned"
        ticket, token = body["ticket"], body["status_token"]
        inbox = tmp_path / "state" / "inbox"
        deadline = time.monotonic() + 10
        while not any(f.stat().st_size for f in inbox.glob("*.jsonl")):
            assert time.monotonic() < deadline, "the agent's inbox got no delivery"
            time.sleep(0.02)
        daemon.kill()
        daemon.restart()
        # The retry after the crash is the same message, not a second one.
        status, again, _ = http(
            "POST",
            f"http://127.0.0.1:{web_port}/v1/messages",
            {"text": "Where is my parcel?", "contact": {"handle": "dana@example.com"}},
            headers={"Idempotency-Key": "pg-order-1", "Content-Type": "application/json"},
        )
        assert status in (200, 201) and again["ticket"] == ticket
        status, view, _ = http(
            "GET",
            f"http://127.0.0.1:{web_port}{body['status_url']}",
            headers={"Authorization": f"Bearer {token}"},
        )
        assert status == 200 and view["messages"] == 1
        status, ready, _ = http("GET", f"http://127.0.0.1:{ops_port}/readyz")
        assert status == 200, ready
        assert daemon.stop() == 0
    finally:
        daemon.close()
        print(daemon.log_text()[-4000:])
    # Nothing of the store went to the state dir: it is all in PostgreSQL.
    assert not (tmp_path / "state" / "omnirouter.db").exists()
    import psycopg

    with psycopg.connect(dsn) as conn:
        (messages,) = conn.execute("SELECT count(*) FROM messages").fetchone() or (0,)
        (assigned,) = conn.execute("SELECT count(*) FROM assignments").fetchone() or (0,)
    assert (messages, assigned) == (1, 1)


def test_no_unit_binds_a_limit() -> None:
    """Limits are written into the statements: the store prepares its frequent statements,
    and PostgreSQL plans a prepared statement for any value of its parameters, so a bound
    LIMIT is planned as if it could be large (the streak check read and sorted all an
    agent's assignments that way: 1.4 ms a message after some thousand of them)."""
    bound = [
        f"{path.relative_to(REPO)}:{number}"
        for path in sorted((REPO / "router" / "store").glob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "LIMIT ?" in line or "OFFSET ?" in line
    ]
    assert bound == []


async def test_a_table_altered_by_another_instance_does_not_fail_a_prepared_read(
    dsn: str,
) -> None:
    """A rolling upgrade: another instance's migration adds a column while this one has the
    message view's `SELECT *` prepared. The read answers (with the new column), no error."""
    store = PostgresStore(dsn, pool_size=1)
    await store.open()
    try:
        new = new_message()
        await store.ingest(new)
        for _ in range(8):  # prepared on the pool's one connection after five
            assert (await store.message(new.message_id)) is not None
        with psycopg.connect(dsn, autocommit=True) as other:
            other.execute("ALTER TABLE messages ADD COLUMN added_by_a_later_version TEXT")
        found = await store.message(new.message_id)
        assert found is not None and "added_by_a_later_version" in found
    finally:
        await store.close()


async def test_behind_pgbouncer_the_store_stops_preparing_and_loses_nothing(
    server: PgServer,
) -> None:
    """Through a real PgBouncer in transaction mode (two server connections shared by the
    store's four), sessions' prepared statements collide; the store notices, sends its
    statements unprepared from then on, and every message is stored."""
    with peers_pg.fresh_database(server) as direct, peers_pg.pgbouncer(server) as bouncer:
        store = PostgresStore(bouncer.dsn(direct.rsplit("/", 1)[1]), pool_size=4)
        await store.open()
        try:
            results = await asyncio.gather(
                *(
                    store.ingest(new_message(handle=f"b{i}@example.com", ingested_at=T0 + i))
                    for i in range(200)
                ),
                return_exceptions=True,
            )
            noticed = not store.engine.prepared_statements
        finally:
            await store.close()
        assert [r for r in results if isinstance(r, BaseException)] == []
        assert noticed
        with psycopg.connect(direct) as conn:
            (stored,) = conn.execute("SELECT count(*) FROM messages").fetchone() or (0,)
        assert stored == 200
