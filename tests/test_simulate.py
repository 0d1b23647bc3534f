"""`omnirouter simulate` end to end: the three files, read back, keep the invariants.

Every scenario of the generator runs on several seeds through the real scheduler and
the baselines; the checks are computed from the files by router.sim.check (which trusts
nothing the scheduler says about itself).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from router.sim.check import INVARIANT_COUNTERS, analyse, check, load_jsonl
from router.sim.generate import SCENARIOS, generate, write_trace
from router.sim.run import POLICIES, run_and_summarise

SEEDS = (1, 2)


def _run_files(tmp_path: Path, scenario: str, seed: int, policy: str) -> dict[str, object]:
    """Generate a trace file, simulate into files, and analyse what the files say."""
    trace_path = tmp_path / f"{scenario}-{seed}.jsonl"
    write_trace(generate(scenario, seed, hours=2), trace_path)
    trace = load_jsonl(trace_path)
    result = run_and_summarise(trace, policy)
    events_path = tmp_path / f"{scenario}-{seed}-{policy}.out.jsonl"
    with events_path.open("w", encoding="utf-8") as f:
        for event in result.events:
            f.write(json.dumps(event) + "\n")
    summary = analyse(load_jsonl(trace_path), load_jsonl(events_path))
    # The summary the simulator reports is the one the files give.
    for key in INVARIANT_COUNTERS:
        assert result.summary[key] == summary[key]
    summary["messages_in_trace"] = sum(1 for line in trace if line.get("type") == "message")
    return summary


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("seed", SEEDS)
def test_every_scenario_keeps_the_invariants(tmp_path: Path, scenario: str, seed: int) -> None:
    ours = _run_files(tmp_path, scenario, seed, "omnirouter")
    assert check(ours) == []
    assert ours["never_accepted"] == 0 and ours["accepted_more_than_once"] == 0
    assert ours["messages"] == ours["messages_in_trace"]
    assert ours["complaint_streak_violations"] == 0
    assert ours["reoffered_after_timeout"] == 0
    baseline = _run_files(tmp_path, scenario, seed, "least_loaded")
    assert check(baseline) == []  # the baselines are held to the same hard invariants
    classes = ours["classes"]
    assert isinstance(classes, dict)
    base_classes = baseline["classes"]
    assert isinstance(base_classes, dict)
    if "complaint_urgent" in classes:
        urgent = classes["complaint_urgent"]["sla_attainment"]
        assert urgent >= base_classes["complaint_urgent"]["sla_attainment"]


def test_no_answer_moves_timed_out_work_and_the_baseline_does_not(tmp_path: Path) -> None:
    ours = _run_files(tmp_path, "no_answer", 3, "omnirouter")
    base = _run_files(tmp_path, "no_answer", 3, "least_loaded")
    assert ours["timeouts"] > 0  # the unreliable agents really ignored some offers
    assert ours["reoffered_after_timeout"] == 0
    assert base["reoffered_after_timeout"] > 0
    assert ours["timeouts"] < base["timeouts"]  # we stop offering to agents who ignore


def test_baselines_break_rotation_and_we_do_not(tmp_path: Path) -> None:
    for policy in ("least_loaded", "round_robin", "random"):
        assert _run_files(tmp_path, "steady_80", 1, policy)["complaint_streak_violations"] > 0
    assert _run_files(tmp_path, "steady_80", 1, "omnirouter")["longest_complaint_streak"] <= 3


def test_shift_change_returns_nothing_lost(tmp_path: Path) -> None:
    # A third of the agents leave mid-run; the work they had not accepted moves on.
    ours = _run_files(tmp_path, "shift_change", 2, "omnirouter")
    assert ours["offline_violations"] == 0 and ours["never_accepted"] == 0


def _omnirouter(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "router.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_generate_simulate_and_check(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    done = _omnirouter(
        "simulate", "generate", "--scenario", "peak_burst", "--seed", "4", "--hours", "1",
        "--out", str(trace), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert load_jsonl(trace)[0]["type"] == "config"

    out = tmp_path / "assignments.jsonl"
    summary = tmp_path / "summary.json"
    done = _omnirouter(
        "simulate", "--trace", str(trace), "--out", str(out), "--policy", "all",
        "--summary", str(summary), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for policy in POLICIES:
        assert (tmp_path / f"assignments.{policy}.jsonl").stat().st_size > 0
        assert policy in done.stdout.splitlines()[0]
    body = json.loads(summary.read_text(encoding="utf-8"))
    assert set(body) == set(POLICIES)
    assert body["omnirouter"]["never_accepted"] == 0

    done = _omnirouter(
        "simulate", "check", "--trace", str(trace),
        "--events", str(tmp_path / "assignments.omnirouter.jsonl"), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0 and "all invariants hold" in done.stdout

    # A tampered file is caught: one accepted event dropped means a message never accepted.
    lines = (tmp_path / "assignments.omnirouter.jsonl").read_text(encoding="utf-8").splitlines()
    first_accept = next(i for i, line in enumerate(lines) if '"accepted"' in line)
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text("\n".join(lines[:first_accept] + lines[first_accept + 1 :]) + "\n")
    done = _omnirouter(
        "simulate", "check", "--trace", str(trace), "--events", str(tampered), cwd=tmp_path
    )
    assert done.returncode == 1 and "invariant broken" in done.stdout


def test_cli_rejects_an_unknown_policy_and_a_bad_trace(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"type": "message", "t": 0}\n', encoding="utf-8")
    done = _omnirouter("simulate", "--trace", str(trace), "--policy", "fastest", cwd=tmp_path)
    assert done.returncode == 2 and "unknown policy 'fastest'" in done.stderr
    done = _omnirouter("simulate", "--trace", str(trace), cwd=tmp_path)
    assert done.returncode == 2 and "config line" in done.stderr


@pytest.mark.parametrize("seed", range(6))
def test_random_traces_keep_the_invariants_for_every_policy(seed: int) -> None:
    # Small hand-rolled worlds the generator does not make: agents joining late, going
    # off and back on line, narrow skills, unknown languages, agents ignoring offers.
    rng = random.Random(seed)
    lines: list[dict[str, object]] = [
        {
            "type": "config",
            "t": 0,
            "sla": {"complaint": 120, "complaint_urgent": 30, "inquiry": 300, "suggestion": 3600},
            "accept_timeout": 30,
            "complaint_streak_limit": 2,
        }
    ]
    agents = [f"a{i}" for i in range(6)]
    events: list[dict[str, object]] = []
    for i, agent_id in enumerate(agents):
        events.append(
            {
                "type": "agent",
                "t": 0.0 if i < 4 else rng.uniform(100, 2000),
                "id": agent_id,
                "skills": rng.sample(["inquiry", "complaint", "suggestion"], rng.randint(1, 3)),
                "languages": rng.sample(["en", "zh"], rng.randint(1, 2)),
                "capacity": {"chat": rng.randint(1, 3), "email": rng.randint(0, 4)},
                "online": True,
            }
        )
    for _ in range(12):
        events.append(
            {
                "type": "presence",
                "t": rng.uniform(2100, 5000),
                "agent": rng.choice(agents),
                "online": rng.random() < 0.5,
            }
        )
    for n in range(250):
        message: dict[str, object] = {
            "type": "message",
            "t": rng.uniform(0, 6000),
            "id": f"m{n:04d}",
            "class": rng.choice(["inquiry", "complaint", "suggestion"]),
            "urgent": rng.random() < 0.1,
            "channel_type": rng.choice(["chat", "chat", "email"]),
            "lang": rng.choice(["en", "zh"]),
            "conversation": f"c{rng.randrange(120):03d}",
            "handle_time": rng.expovariate(1 / 200) + 1,
        }
        if rng.random() < 0.2:
            message["ignored_by"] = rng.sample(agents, 2)
        events.append(message)
    events.sort(key=lambda e: float(e["t"]))  # type: ignore[arg-type]
    # Everyone comes back on line at the end, so all work can drain.
    tail = [{"type": "presence", "t": 6000.0, "agent": a, "online": True} for a in agents]
    trace = [*lines, *events, *tail, {"type": "end", "t": 6000.0}]
    for policy in POLICIES:
        summary = run_and_summarise(trace, policy).summary
        broken = [
            f"{k}={summary[k]}"
            for k in INVARIANT_COUNTERS
            if summary[k] and k not in ("never_accepted", "skill_violations")
        ]
        assert broken == [], (policy, broken, summary["violations"][:3])
        if policy == "omnirouter":
            assert summary["reoffered_after_timeout"] == 0
            assert summary["complaint_streak_violations"] == 0, summary["violations"][:3]
