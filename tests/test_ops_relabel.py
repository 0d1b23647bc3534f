"""Agents correct the classifier through the ops API; the corrections feed retraining."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.daemon_harness import DaemonProcess, base_config, http, ports

TOKEN = "test-admin-token-0123456789"


def test_relabel_through_the_ops_api_is_exported_for_training(tmp_path: Path) -> None:
    web, ops = ports()
    d = DaemonProcess(tmp_path, base_config(tmp_path / "state", web_port=web, ops_port=ops))
    d.start()
    try:
        status, body, _ = http(
            "POST",
            f"http://127.0.0.1:{web}/v1/messages",
            {"text": "Could you add an export to CSV?", "contact": {"handle": "dana"}},
        )
        assert status == 201, body
        url = f"http://127.0.0.1:{ops}/v1/messages/{body['message_id']}/label"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert http("POST", url, {"label": "complaint"})[0] == 401
        assert http("POST", url, {"label": "nonsense"}, auth)[0] == 400
        missing = f"http://127.0.0.1:{ops}/v1/messages/01NOPE/label"
        assert http("POST", missing, {"label": "complaint"}, auth)[0] == 404
        status, answer, _ = http("POST", url, {"label": "complaint", "agent": "alice"}, auth)
        assert status == 200 and answer["label"] == "complaint"
    finally:
        assert d.stop() == 0
        d.close()
    out = tmp_path / "corrections.jsonl"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "router.cli",
            "classifier",
            "corrections",
            "-c",
            str(d.config_path),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["label"] == "complaint" and record["agent_id"] == "alice"
    assert record["text"] == "Could you add an export to CSV?"


def _inbox_ids(state: Path) -> dict[str, list[str]]:
    """Return agent -> message ids of the assignments in its inbox file."""
    out: dict[str, list[str]] = {}
    for path in sorted((state / "inbox").glob("*.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line]
        out[path.stem] = [d["message"]["id"] for d in lines if d["kind"] == "assignment"]
    return out


def _withdrawn_ids(state: Path) -> dict[str, list[str]]:
    """Return agent -> message ids of the offers taken back from it (withdrawn notices)."""
    out: dict[str, list[str]] = {}
    for path in sorted((state / "inbox").glob("*.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line]
        out[path.stem] = [i for d in lines if d["kind"] == "withdrawn" for i in d["message_ids"]]
    return out


def _wait(condition: Callable[[], bool], within: float, what: str) -> None:
    """Poll the daemon's real output until `condition` holds; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_accept_through_the_ops_api_stops_the_accept_timeout(tmp_path: Path) -> None:
    web, ops = ports()
    agents = "\n".join(
        f'[[agents]]\nid = "{a}"\ncapacity = 1\ntool = "inbox"\nskills = ["en"]\naccepts = true\n'
        for a in ("alice", "bo")
    )
    config = base_config(
        tmp_path / "state",
        web_port=web,
        ops_port=ops,
        agents=agents,
        extra="[scheduling]\naccept_timeout = 3.0\n",
    )
    d = DaemonProcess(tmp_path, config)
    d.start()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        status, taken, _ = http(
            "POST",
            f"http://127.0.0.1:{web}/v1/messages",
            {"text": "When do you open tomorrow?", "contact": {"handle": "eve"}},
        )
        assert status == 201 and taken["state"] == "assigned", taken
        state = tmp_path / "state"
        _wait(lambda: any(_inbox_ids(state).values()), 5, "no delivery")
        (holder,) = [a for a, ids in _inbox_ids(state).items() if ids]
        other = "bo" if holder == "alice" else "alice"
        url = f"http://127.0.0.1:{ops}/v1/messages/{taken['message_id']}/accept"
        assert http("POST", url, {"agent": holder})[0] == 401
        assert http("POST", url, {"agent": other}, auth)[0] == 409
        assert http("POST", url, {}, auth)[0] == 400
        status, answer, _ = http("POST", url, {"agent": holder}, auth)
        assert status == 200 and answer["accepted"] is True

        # A second message nobody accepts moves on after the timeout; the accepted one stays.
        status, ignored, _ = http(
            "POST",
            f"http://127.0.0.1:{web}/v1/messages",
            {"text": "Do you deliver on Sundays?", "contact": {"handle": "fin"}},
        )
        assert status == 201 and ignored["state"] == "assigned", ignored
        # Until its offer runs out (accept timeout, then the once-a-second tick). The
        # accepted message was offered earlier, so had accepting not stopped its
        # timeout it would have been taken back from the holder before this.
        _wait(
            lambda: ignored["message_id"] in _withdrawn_ids(state).get(other, []),
            30,
            "the offer nobody accepted was never taken back",
        )
        assert taken["message_id"] not in _withdrawn_ids(state)[holder]
        inboxes = _inbox_ids(state)
        assert inboxes[holder].count(taken["message_id"]) == 1
        assert taken["message_id"] not in inboxes.get(other, [])
        assert inboxes[other] == [ignored["message_id"]]  # offered to the free agent once
        # ... then taken back: the holder is full, so it waits (never back to `other`).
        status, queues, _ = http("GET", f"http://127.0.0.1:{ops}/v1/queues", None, auth)
        assert status == 200 and sum(q["depth"] for q in queues["queues"]) == 1
    finally:
        assert d.stop() == 0
        d.close()
