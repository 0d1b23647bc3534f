"""The ops API over its narrow interfaces: fakes stand in for the daemon's parts."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from router.drivers import AgentAction
from router.ops import OpsApi
from router.store import DeadLetter, TicketEvent
from tests.daemon_harness import REPO

TOKEN = "ops-api-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class FakeHealth:
    """A readiness report set by the test."""

    version = "9.9.9"

    def __init__(self) -> None:
        self.report: dict[str, Any] = {"ready": True, "drivers": {}}

    async def readiness(self) -> dict[str, Any]:
        """Return the report as set."""
        return self.report


class FakeMetrics:
    """A fixed exposition."""

    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def render(self) -> bytes:
        """Return one sample."""
        return b"omnirouter_up 1\n"


class FakeDesk:
    """One agent, alice, who accepts only message m1."""

    def __init__(self) -> None:
        self.presence: dict[str, str] = {}

    def agents_view(self) -> list[dict[str, Any]]:
        """Return alice."""
        return [{"id": "alice"}]

    def queues_view(self) -> list[dict[str, Any]]:
        """Return one empty queue."""
        return [{"queue": "default", "depth": 0}]

    async def set_presence(self, agent_id: str, present: bool, *, away: bool = False) -> bool:
        """Record alice's presence; refuse anyone else."""
        if agent_id != "alice":
            return False
        self.presence[agent_id] = "on" if present else "away" if away else "off"
        return True

    async def act(self, action: AgentAction) -> str:
        """Accept m1 for alice only."""
        return "ok" if (action.agent_id, action.message_id) == ("alice", "m1") else "not_offered"


class FakeDeadLetters:
    """Two dead letters; replays are recorded."""

    def __init__(self) -> None:
        self.replayed: list[list[str] | None] = []

    async def dead_letters(self, limit: int) -> Sequence[DeadLetter]:
        """Return up to limit dead letters."""
        return [
            DeadLetter(f"d{i}", "hook", "alice", "assignment", f"m{i}", 3, "500", 1.0, 2.0, {})
            for i in range(2)
        ][:limit]

    async def replay(self, ids: list[str] | None) -> int:
        """Record the replay; count one per id (two for all)."""
        self.replayed.append(ids)
        return 2 if ids is None else len(ids)


class FakeCorrections:
    """Knows message m1 only."""

    async def record_correction(
        self, message_id: str, label: str, agent_id: str, at: float
    ) -> bool:
        """Accept corrections of m1."""
        return message_id == "m1"


@pytest.fixture
async def client() -> AsyncIterator[tuple[TestClient[Any, Any], FakeHealth, FakeDeadLetters]]:
    """Serve an OpsApi over fakes on loopback."""
    health, dead = FakeHealth(), FakeDeadLetters()
    api = OpsApi(
        health=health,
        metrics=FakeMetrics(),
        agents=FakeDesk(),
        dead_letters=dead,
        corrections=FakeCorrections(),
        admin_token=TOKEN,
    )
    async with TestClient(TestServer(api.app())) as c:
        yield c, health, dead


async def test_health_readiness_and_metrics(
    client: tuple[TestClient[Any, Any], FakeHealth, FakeDeadLetters],
) -> None:
    c, health, _ = client
    resp = await c.get("/healthz")
    assert resp.status == 200 and await resp.json() == {"status": "ok", "version": "9.9.9"}
    assert (await c.get("/readyz")).status == 200
    health.report = {"ready": False, "drivers": {"hook": {"state": "transient_disconnect"}}}
    resp = await c.get("/readyz")
    assert resp.status == 503 and (await resp.json())["drivers"]["hook"]
    resp = await c.get("/metrics")
    assert resp.status == 200 and await resp.read() == b"omnirouter_up 1\n"
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")


async def test_admin_routes_need_the_token_and_use_the_desks(
    client: tuple[TestClient[Any, Any], FakeHealth, FakeDeadLetters],
) -> None:
    c, _, dead = client
    resp = await c.get("/v1/agents")
    assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await c.get("/v1/agents", headers={"Authorization": "Bearer nope"})).status == 401
    assert (await (await c.get("/v1/agents", headers=AUTH)).json()) == {"agents": [{"id": "alice"}]}
    assert (await (await c.get("/v1/queues", headers=AUTH)).json())["queues"][0]["depth"] == 0
    resp = await c.post("/v1/agents/alice/presence/away", headers=AUTH)
    assert await resp.json() == {"agent": "alice", "present": False, "presence": "away"}
    assert (await c.put("/v1/agents/zed/presence/on", headers=AUTH)).status == 404
    assert (await c.post("/v1/agents/alice/presence/maybe", headers=AUTH)).status == 400

    listed = await (await c.get("/v1/dead-letters?limit=1", headers=AUTH)).json()
    assert [d["id"] for d in listed["dead_letters"]] == ["d0"]
    assert "payload" not in listed["dead_letters"][0]
    assert (await c.get("/v1/dead-letters?limit=x", headers=AUTH)).status == 400
    resp = await c.post("/v1/dead-letters/replay", json={"ids": ["d0"]}, headers=AUTH)
    assert await resp.json() == {"replayed": 1}
    resp = await c.post("/v1/dead-letters/replay", json={"all": True}, headers=AUTH)
    assert await resp.json() == {"replayed": 2}
    assert dead.replayed == [["d0"], None]
    assert (await c.post("/v1/dead-letters/replay", json={}, headers=AUTH)).status == 400

    url = "/v1/messages/m1/label"
    resp = await c.post(url, json={"label": "complaint", "agent": "alice"}, headers=AUTH)
    assert await resp.json() == {"message_id": "m1", "label": "complaint"}
    assert (
        await c.post("/v1/messages/m2/label", json={"label": "complaint"}, headers=AUTH)
    ).status == 404
    resp = await c.post("/v1/messages/m1/accept", json={"agent": "alice"}, headers=AUTH)
    assert (await resp.json())["accepted"] is True
    assert (
        await c.post("/v1/messages/m1/accept", json={"agent": "bo"}, headers=AUTH)
    ).status == 409


def test_ops_does_not_import_the_daemon() -> None:
    # The daemon imports the ops API; the other way round would be a cycle.
    code = "import sys, router.ops; print('router.daemon' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    # Not even for type checking: the API is typed by its own protocols.
    tree = ast.parse((REPO / "router" / "ops.py").read_text())
    imported = {
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert "router.daemon" not in imported


class FakeHistory:
    """A ticket audit with one ticket."""

    async def ticket_events(self, conversation_id: str) -> list[TicketEvent]:
        if conversation_id != "01JX":
            return []
        return [
            TicketEvent("01JX", 1_700_000_000.0, "created", "customer", "new"),
            TicketEvent("01JX", 1_700_000_060.0, "transferred", "bob", "new", {"to": "queue:b"}),
        ]


async def test_ticket_events_route_lists_the_audit_behind_the_token() -> None:
    api = OpsApi(
        health=FakeHealth(),
        metrics=FakeMetrics(),
        agents=FakeDesk(),
        dead_letters=FakeDeadLetters(),
        corrections=FakeCorrections(),
        admin_token=TOKEN,
        history=FakeHistory(),
    )
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with TestClient(TestServer(api.app())) as c:
        assert (await c.get("/v1/tickets/T-01JX/events")).status == 401
        resp = await c.get("/v1/tickets/T-01JX/events", headers=auth)
        assert resp.status == 200
        body = await resp.json()
        assert body["ticket"] == "T-01JX"
        assert [(e["kind"], e["actor"]) for e in body["events"]] == [
            ("created", "customer"),
            ("transferred", "bob"),
        ]
        assert body["events"][1]["detail"] == {"to": "queue:b"}
        assert body["events"][0]["at"].startswith("2023-11-14T22:13:20")
        assert (await c.get("/v1/tickets/T-NOPE/events", headers=auth)).status == 404
        assert (await c.get("/v1/tickets/01JX/events", headers=auth)).status == 400
