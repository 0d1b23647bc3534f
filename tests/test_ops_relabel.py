"""Agents correct the classifier through the ops API; the corrections feed retraining."""

from __future__ import annotations

import json
import subprocess
import sys
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
