"""Several daemons on one PostgreSQL store share the work as one router would.

Two real `omnirouter run` processes with their own state dirs and ports, one database.
What one instance does (an assignment, a resolve, a presence change) the other learns
through the store's change notices, so: an agent full on one instance is full on the
other, a slot freed on one is filled from the other's queue, and a conversation stays
with its agent whichever instance the customer's next message reaches.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.cluster import (
    AgentDesk,
    Cluster,
    LoadSampler,
    history_violations,
    post_all,
    wait_drained,
)
from tests.daemon_harness import DaemonProcess, base_config, http, ports
from tests.peers_pg import PgServer, fresh_database, pg_server

TOKEN = "test-admin-token-0123456789"
AGENTS = '[[agents]]\nid = "alice"\ncapacity = 1\ntool = "inbox"\nskills = ["en"]\n'


@pytest.fixture(scope="module")
def server() -> Iterator[PgServer]:
    with pg_server() as found:
        yield found


@pytest.fixture
def dsn(server: PgServer) -> Iterator[str]:
    with fresh_database(server) as url:
        yield url


class Instance:
    """One daemon of the group, with its ports."""

    def __init__(self, root: Path, name: str, dsn: str) -> None:
        self.dir = root / name
        self.dir.mkdir()
        self.web_port, self.ops_port = ports()
        config = base_config(
            self.dir / "state", web_port=self.web_port, ops_port=self.ops_port, agents=AGENTS
        )
        config += f'\n[store]\nurl = "{dsn}"\npool_size = 3\n'
        self.daemon = DaemonProcess(self.dir, config)

    def post(self, text: str, handle: str, key: str, conversation: str = "") -> dict[str, Any]:
        body: dict[str, Any] = {"text": text, "contact": {"handle": handle}}
        if conversation:
            body["conversation"] = conversation
        status, answer, _ = http(
            "POST",
            f"http://127.0.0.1:{self.web_port}/v1/messages",
            body,
            headers={"Idempotency-Key": key, "Content-Type": "application/json"},
        )
        assert status == 201, answer
        assert isinstance(answer, dict)
        return answer

    def act(self, ticket: str, **body: Any) -> tuple[int, Any]:
        status, answer, _ = http(
            "POST",
            f"http://127.0.0.1:{self.ops_port}/v1/tickets/{ticket}/actions",
            body,
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        return status, answer

    def message_state(self, ticket: str) -> list[dict[str, Any]]:
        status, answer, _ = http(
            "GET",
            f"http://127.0.0.1:{self.ops_port}/v1/tickets/{ticket}/events",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert status == 200, answer
        events: list[dict[str, Any]] = answer["events"]
        return events


@pytest.fixture
def group(tmp_path: Path, dsn: str) -> Iterator[Callable[[str], Instance]]:
    started: list[Instance] = []

    def start(name: str) -> Instance:
        instance = Instance(tmp_path, name, dsn)
        instance.daemon.start()
        started.append(instance)
        return instance

    yield start
    for instance in started:
        instance.daemon.close()
        print(f"--- {instance.dir.name} ---\n{instance.daemon.log_text()[-5000:]}")


def eventually(check: Callable[[], bool], within: float = 15.0) -> None:
    """Wait until check() holds (a liveness bound, not a speed measurement)."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "the instances did not converge in time"
        time.sleep(0.05)


def assigned_to(instance: Instance, ticket: str) -> str | None:
    """Return the agent the ticket's latest assignment names, if any."""
    agent = None
    for event in instance.message_state(ticket):
        if event["kind"] == "assigned":
            agent = event["detail"].get("agent")
        if event["kind"] in ("resolved", "closed"):
            agent = None
    return agent


def test_two_instances_share_one_agents_capacity_and_queue(
    group: Callable[[str], Instance],
) -> None:
    a, b = group("a"), group("b")
    first = a.post("Where is my parcel?", "dana@example.com", "k-1")
    assert first["state"] == "assigned"
    # Alice (capacity 1) is full: b knows it, or the store refuses b's try: it waits.
    second = b.post("My invoice is wrong", "erik@example.com", "k-2")
    assert second["state"] == "queued"
    # Resolved through b's ops API although a assigned it: b learnt the holder.
    eventually(lambda: b.act(first["ticket"], agent="alice", action="resolve")[0] == 200)
    # The freed slot takes the waiting message, whichever instance places it.
    eventually(lambda: assigned_to(a, second["ticket"]) == "alice")
    # The customer's follow-up on the other instance stays with its agent (sticky).
    follow = a.post(
        "Any news?", "erik@example.com", "k-3", conversation=second["conversation_token"]
    )
    assert follow["ticket"] == second["ticket"]
    assert follow["state"] == "assigned"
    # A third customer waits on either instance: alice still holds erik's conversation.
    third = a.post("Hello", "fay@example.com", "k-4")
    assert third["state"] == "queued"


# -- three instances, one killed, thousands of messages ---------------------------------

MESSAGES = int(os.environ.get("OMNIROUTER_CLUSTER_MESSAGES", "5000"))
CAPACITIES = {f"agent{i}": 3 for i in range(6)}


def test_three_instances_one_killed_every_message_assigned_once(tmp_path: Path, dsn: str) -> None:
    """5,000 messages over three instances' web intake; one SIGKILLed at 40 %.

    The agents resolve every ticket as it arrives, so the whole load goes through the
    agents' 18 slots: every message is stored once, assigned once and delivered under
    one delivery id, and no agent is ever over capacity (sampled from the database
    throughout, and replayed from the assignment history afterwards).
    """
    desk = AgentDesk().start()
    cluster = Cluster(tmp_path, dsn, desk.url, list(CAPACITIES.items()), size=3)
    desk.cluster = cluster
    sampler = LoadSampler(dsn, CAPACITIES)
    try:
        cluster.start()
        sampler.start()
        report = post_all(cluster, MESSAGES, kill_at=int(MESSAGES * 0.4), kill_index=0)
        counts = wait_drained(dsn, MESSAGES, within=180)
        sampler.stop()
    finally:
        sampler.stop()
        cluster.close()
        desk.stop()
        for instance in cluster.instances:
            print(f"--- {instance.name} ---\n{instance.daemon.log_text()[-3000:]}")
    # Every customer got an answer, and a retried post its first ticket.
    assert len(report.answered) == MESSAGES
    assert counts == {"resolved": MESSAGES}, counts
    with psycopg.connect(dsn) as conn:
        assignments = dict(conn.execute("SELECT message_id, agent_id FROM assignments").fetchall())
        tickets = conn.execute("SELECT count(*) FROM conversations").fetchone()
    assert len(assignments) == MESSAGES  # one row per message: assigned once
    assert tickets == (MESSAGES,)
    # Delivered under one delivery id per message, to the agent the store names.
    ids_by_message: dict[str, set[str]] = {}
    for d in desk.deliveries:
        ids_by_message.setdefault(d.message_id, set()).add(d.delivery_id)
        assert assignments[d.message_id] == d.agent_id
    assert set(ids_by_message) == set(assignments)
    assert all(len(ids) == 1 for ids in ids_by_message.values())
    assert sampler.samples > 10 and sampler.violations == []
    assert history_violations(dsn, CAPACITIES) == []
