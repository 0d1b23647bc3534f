"""The README tour on the embedded defaults: 20 customers, agents resolving through the CLI.

`omnirouter run` with no config (ports moved with --web-port/--ops-port so the test
does not depend on 8080/8081 being free) in an empty working directory, as a newcomer
runs it. Twenty messages arrive by `omnirouter send`; the demo roster has eight slots,
so most wait. The agents work the way the README says agents on the file inbox do:
they read their JSONL inbox and `omnirouter resolve T-… --agent NAME`, which frees
the slot for the next waiting message. The tour ends with every ticket resolved and
every queue empty, as `omnirouter queues` and `agents` show.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from router import cli
from tests.daemon_harness import http
from tests.peers import free_port

TEXTS = [
    "My order never arrived and I want a refund",
    "你好，请问怎么修改收货地址？",
    "What are your opening hours on Sunday?",
    "快递坏了，我很不满意，要投诉",
    "Could you add a dark mode to the app? Just a suggestion.",
]


def inbox_work(state: Path) -> dict[str, str]:
    """Return ticket -> agent of every assignment in the agents' inbox files."""
    work: dict[str, str] = {}
    for path in sorted((state / "inbox").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            d = json.loads(line)
            if d.get("kind") == "assignment":
                work[d["ticket"]] = d["agent_id"]
    return work


def test_twenty_customers_and_the_cli_resolving_until_the_queues_are_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OMNIROUTER_STATE_DIR", raising=False)
    web_port, ops_port = free_port(), free_port()
    web, ops = f"http://127.0.0.1:{web_port}", f"http://127.0.0.1:{ops_port}"
    log = (tmp_path / "daemon.log").open("wb")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "run", "--web-port", str(web_port),
         "--ops-port", str(ops_port)],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env={**os.environ},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if http("GET", ops + "/readyz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()
            time.sleep(0.2)
        tickets = []
        for n in range(20):
            text = f"{TEXTS[n % len(TEXTS)]} (#{n})"
            assert cli.main(["send", text, "--contact", f"c{n}@example.com", "--url", web]) == 0
            tickets.append(json.loads(capsys.readouterr().out)["ticket"])
        assert len(set(tickets)) == 20

        state = tmp_path / "omnirouter-state"
        resolved: set[str] = set()
        deadline = time.monotonic() + 60
        while len(resolved) < 20:
            assert time.monotonic() < deadline, f"resolved {len(resolved)} of 20"
            for ticket, agent in inbox_work(state).items():
                if ticket not in resolved:
                    argv = ["resolve", ticket, "--agent", agent, "--ops-url", ops]
                    assert cli.main(argv) == 0, capsys.readouterr()
                    resolved.add(ticket)
            time.sleep(0.1)
        capsys.readouterr()
        assert resolved == set(tickets)

        assert cli.main(["queues", "--json", "--ops-url", ops]) == 0
        queues = json.loads(capsys.readouterr().out)["queues"]
        assert queues and all(q["depth"] == 0 for q in queues)
        assert cli.main(["agents", "--json", "--ops-url", ops]) == 0
        agents = json.loads(capsys.readouterr().out)["agents"]
        assert {a["id"] for a in agents} == {"alice", "bo", "chen"}
        assert all(a["open_conversations"] == 0 for a in agents)
        assert cli.main(["ticket", "history", tickets[0]]) == 0
        assert "resolved" in capsys.readouterr().out
        # The daemon told the newcomer where the admin token is and what to try.
        text = (tmp_path / "daemon.log").read_text()
        assert "daemon.next_steps" in text and str(state / "admin-token") in text
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            assert daemon.wait(30) == 0
        finally:
            if daemon.poll() is None:
                daemon.kill()
            log.close()
