"""The JSONL inbox adapter: one fsynced line per delivery, exactly once per delivery id."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import structlog

from adapters import inbox as inbox_module
from adapters.inbox import InboxConfig, InboxTool
from router import config as router_config
from router.backoff import backoff_ceiling, backoff_delay
from router.delivery import DELIVERY_SCHEMA, AlertPayload, encode_delivery
from router.drivers import (
    ADAPTERS,
    Delivery,
    DriverContext,
    DriverState,
    PermanentError,
    TransientError,
    load_driver,
)
from tests import payloads
from tests.peers import wait_until


def make_ctx(tmp_path: Path) -> DriverContext:
    """Return a driver context rooted in the test's temp dir."""
    return DriverContext(state_dir=tmp_path, log=structlog.get_logger().bind(tool="t"))


def make_delivery(n: int = 1, agent: str = "alice", **kw: Any) -> Delivery:
    """Return an assignment delivery shaped like the pipeline's."""
    fields: dict[str, Any] = {
        "id": f"d-{n}",
        "target": "inbox",
        "agent_id": agent,
        "address": "",
        "payload": payloads.assignment(n, agent=agent),
    }
    fields.update(kw)
    return Delivery(**fields)


def make_tool(tmp_path: Path, **config: Any) -> InboxTool:
    """Return an InboxTool writing under tmp_path."""
    return InboxTool("inbox", InboxConfig(type="inbox", name="inbox", **config), make_ctx(tmp_path))


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Return the parsed JSON lines of a file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


async def test_writes_one_line_per_delivery(tmp_path: Path) -> None:
    tool = make_tool(tmp_path)
    await tool.deliver(make_delivery(1))
    await tool.deliver(make_delivery(2))
    path = tmp_path / "inbox" / "alice.jsonl"
    lines = read_lines(path)
    assert [line["delivery_id"] for line in lines] == ["d-1", "d-2"]
    first = lines[0]
    assert first["schema"] == DELIVERY_SCHEMA
    assert first["kind"] == "assignment" and first["agent_id"] == "alice" and first["attempt"] == 1
    assert first["message"]["text"] == "Grüße, 你好\nline two"
    # Exactly the shared encoding: compact, UTF-8, not ASCII-escaped.
    assert path.read_bytes().splitlines()[0] == encode_delivery(make_delivery(1))
    assert "你好".encode() in path.read_bytes()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert tool.last_success is not None


async def test_repeated_delivery_is_written_once_even_across_instances(tmp_path: Path) -> None:
    first = make_tool(tmp_path)
    await first.deliver(make_delivery(1))
    await first.deliver(make_delivery(1, attempt=2))  # same id, same instance
    await first.stop()
    # A new instance (after a crash and restart) learns the ids from the file.
    second = make_tool(tmp_path)
    await second.deliver(make_delivery(1, attempt=3))
    await second.deliver(make_delivery(2))
    lines = read_lines(tmp_path / "inbox" / "alice.jsonl")
    assert [(line["delivery_id"], line["attempt"]) for line in lines] == [("d-1", 1), ("d-2", 1)]


async def test_concurrent_deliveries_group_commit_and_dedupe(tmp_path: Path) -> None:
    tool = make_tool(tmp_path)
    deliveries = [make_delivery(i, agent=f"agent{i % 3}") for i in range(300)]
    # Every delivery twice, concurrently: the duplicate shares the first write.
    await asyncio.gather(*(tool.deliver(d) for d in deliveries + deliveries))
    total = 0
    for agent in ("agent0", "agent1", "agent2"):
        ids = [line["delivery_id"] for line in read_lines(tmp_path / "inbox" / f"{agent}.jsonl")]
        assert len(ids) == len(set(ids)) == 100
        total += len(ids)
    assert total == 300


async def test_torn_last_line_is_cut_before_appending(tmp_path: Path) -> None:
    inbox_dir = tmp_path / "inbox"
    inbox_dir.mkdir()
    path = inbox_dir / "alice.jsonl"
    good = encode_delivery(make_delivery(1)) + b"\n"
    path.write_bytes(good + b'{"schema":"omnirouter.delivery/1","delivery_id":"d-2","ki')
    tool = make_tool(tmp_path)
    await tool.deliver(make_delivery(1))  # already there: not written again
    await tool.deliver(make_delivery(2))  # torn before the crash: written whole now
    assert [line["delivery_id"] for line in read_lines(path)] == ["d-1", "d-2"]


@pytest.mark.parametrize(
    "hostile",
    [
        "../etc/passwd",
        "..",
        ".hidden",
        "a/b",
        "a b",
        "",
        "x" * 65,
        "évil",
        "a\x00b",
        "-rf",
        "bob\n",
    ],
)
async def test_rejects_hostile_agent_ids(tmp_path: Path, hostile: str) -> None:
    tool = make_tool(tmp_path)
    with pytest.raises(PermanentError, match="not a safe file name"):
        await tool.deliver(make_delivery(1, agent=hostile))
    inbox_dir = tmp_path / "inbox"
    assert not inbox_dir.exists() or list(inbox_dir.iterdir()) == []


async def test_address_names_the_file_and_is_checked_too(tmp_path: Path) -> None:
    tool = make_tool(tmp_path)
    await tool.deliver(make_delivery(1, address="team-a"))
    assert (tmp_path / "inbox" / "team-a.jsonl").exists()
    with pytest.raises(PermanentError):
        await tool.deliver(make_delivery(2, address="../x"))


async def test_custom_dir_and_run_state(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere" / "inboxes"
    tool = make_tool(tmp_path, dir=target)
    assert tool.state == DriverState.STOPPED

    async def no_actions(action: Any) -> None:
        raise AssertionError("the inbox has no actions")

    runner = asyncio.create_task(tool.run(no_actions))
    await wait_until(lambda: tool.state == DriverState.CONNECTED)
    assert target.is_dir()
    await tool.deliver(make_delivery(1))
    assert (target / "alice.jsonl").exists()
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    await tool.stop()
    assert tool.state == DriverState.STOPPED
    with pytest.raises(Exception, match="stopped"):
        await tool.deliver(make_delivery(2))


async def test_unwritable_dir_is_transient(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root ignores permission bits; a regular file where the dir should be fails for everyone.
        (tmp_path / "blocked").write_text("not a dir")
        tool = make_tool(tmp_path, dir=tmp_path / "blocked")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        tool = make_tool(tmp_path, dir=locked)
    with pytest.raises(TransientError):
        await tool.deliver(make_delivery(1))


def test_payload_cannot_override_envelope_or_hold_non_json() -> None:
    body = json.loads(encode_delivery(make_delivery(1, payload=AlertPayload({"kind": "x"}))))
    assert body["delivery_id"] == "d-1" and body["alert"] == {"kind": "x"}
    with pytest.raises(PermanentError, match="JSON"):
        encode_delivery(make_delivery(1, payload=AlertPayload({"x": float("nan")})))
    with pytest.raises(PermanentError, match="JSON"):
        encode_delivery(make_delivery(1, payload=AlertPayload({"x": object()})))


def test_registry_and_config_model() -> None:
    assert load_driver(ADAPTERS, "inbox") is InboxTool
    assert InboxTool.config_model is InboxConfig
    with pytest.raises(ValueError):
        InboxConfig(type="inbox", name="inbox", colour="blue")  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        InboxConfig(type="mqtt", name="inbox")  # type: ignore[arg-type]


def test_local_patterns_match_router_config() -> None:
    # The adapters copy these patterns to avoid importing the config loader.
    assert inbox_module.AGENT_ID_RE == router_config.AGENT_ID_RE
    assert inbox_module.NAME_RE == router_config.NAME_RE


def test_backoff_is_full_jitter_and_capped() -> None:
    import random

    rng = random.Random(7)
    assert backoff_ceiling(0, 0.5, 30) == 0.5
    assert backoff_ceiling(3, 0.5, 30) == 4.0
    assert backoff_ceiling(10, 0.5, 30) == 30
    assert backoff_ceiling(10_000, 0.5, 30) == 30  # no overflow
    delays = [backoff_delay(5, 0.5, 30, rng) for _ in range(1000)]
    assert all(0 <= d <= 16 for d in delays)
    assert min(delays) < 1 and max(delays) > 15  # spread over the whole range
