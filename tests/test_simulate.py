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


def _messages(trace: list[dict[str, object]]) -> list[dict[str, object]]:
    return [line for line in trace if line["type"] == "message"]


def _agents(trace: list[dict[str, object]]) -> list[dict[str, object]]:
    return [line for line in trace if line["type"] == "agent"]


@pytest.mark.parametrize("scenario", ["scarce_skills", "burst"])
def test_new_scenarios_are_deterministic_per_seed(scenario: str) -> None:
    assert generate(scenario, 5, hours=1) == generate(scenario, 5, hours=1)
    assert generate(scenario, 5, hours=1) != generate(scenario, 6, hours=1)


@pytest.mark.parametrize("count", [6, 36, 50])
def test_scarce_skills_roster_keeps_its_groups(count: int) -> None:
    agents = _agents(generate("scarce_skills", 1, hours=0.1, agents=count))
    assert len(agents) == count
    suggestion = [a for a in agents if "suggestion" in a["skills"]]  # type: ignore[operator]
    complaint = [a for a in agents if "complaint" in a["skills"]]  # type: ignore[operator]
    # Generalists (inquiry + suggestion, both languages) are the only suggestion agents.
    assert all(a["skills"] == ["inquiry", "suggestion"] for a in suggestion)
    assert all(a["languages"] == ["zh", "en"] for a in suggestion)
    assert not {id(a) for a in suggestion} & {id(a) for a in complaint}
    specialists = [a for a in complaint if a["languages"] == ["zh", "en"]]
    flexible = [a for a in complaint if len(a["languages"]) == 1]  # type: ignore[arg-type]
    assert len(specialists) + len(flexible) + len(suggestion) == count
    assert abs(len(specialists) - count / 3) <= 1
    assert abs(len(flexible) - 0.4 * count) <= 1
    assert len(suggestion) >= 1 and abs(len(suggestion) - 0.25 * count) <= 2
    by_lang = [a["languages"] for a in flexible]
    assert abs(by_lang.count(["zh"]) - by_lang.count(["en"])) <= 1
    assert all(a["capacity"] == {"chat": 3, "email": 5} for a in agents)
    if count == 36:
        assert (len(specialists), len(flexible), len(suggestion)) == (12, 14, 10)


def test_scarce_skills_rejects_a_roster_too_small_for_its_groups() -> None:
    with pytest.raises(ValueError, match="at least 6"):
        generate("scarce_skills", 1, agents=5)


def _offered_load(trace: list[dict[str, object]], since: float = 0.0) -> dict[str, float]:
    """Return per channel type: handle time offered / (capacity x period)."""
    horizon = float(trace[-1]["t"])  # type: ignore[arg-type]
    capacity: dict[str, int] = {}
    for agent in _agents(trace):
        for channel_type, slots in agent["capacity"].items():  # type: ignore[attr-defined]
            capacity[channel_type] = capacity.get(channel_type, 0) + slots
    work: dict[str, float] = dict.fromkeys(capacity, 0.0)
    for m in _messages(trace):
        if float(m["t"]) >= since:  # type: ignore[arg-type]
            work[m["channel_type"]] += float(m["handle_time"])  # type: ignore[index, arg-type]
    return {c: work[c] / (capacity[c] * (horizon - since)) for c in capacity}


def test_scarce_skills_offers_the_target_load_and_suggestions_fit_the_generalists() -> None:
    trace = generate("scarce_skills", 3, hours=48)
    loads = _offered_load(trace)
    assert set(loads) == {"chat", "email"}
    for load in loads.values():
        assert load == pytest.approx(0.72, rel=0.10)
    override = _offered_load(generate("scarce_skills", 3, hours=48, agents=20, utilisation=0.5))
    for load in override.values():
        assert load == pytest.approx(0.5, rel=0.10)
    # The suggestion work alone stays well inside the generalists' capacity, and the
    # complaint work inside the complaint-skilled agents'.
    horizon = float(trace[-1]["t"])  # type: ignore[arg-type]
    agents = _agents(trace)
    for channel_type in ("chat", "email"):
        for cls, headroom in (("suggestion", 0.5), ("complaint", 0.8)):
            slots = sum(
                a["capacity"][channel_type]  # type: ignore[index]
                for a in agents
                if cls in a["skills"]  # type: ignore[operator]
            )
            work = sum(
                float(m["handle_time"])  # type: ignore[arg-type]
                for m in _messages(trace)
                if m["class"] == cls and m["channel_type"] == channel_type
            )
            assert work / horizon < headroom * slots, (channel_type, cls)


def test_burst_triples_the_rate_for_fifteen_minutes_then_returns_to_base() -> None:
    # Many seeds of the surge window pooled, so that 900 s of arrivals are not noise.
    inside = before = after = 0
    for seed in range(1, 9):
        times = [float(m["t"]) for m in _messages(generate("burst", seed, hours=4))]  # type: ignore[arg-type]
        inside += sum(1 for t in times if 3600 <= t < 4500)
        before += sum(1 for t in times if t < 3600)
        after += sum(1 for t in times if 4500 <= t < 14400)
    base_rate = (before + after) / (8 * (3600 + 9900))
    assert inside / (8 * 900) == pytest.approx(3 * base_rate, rel=0.20)
    assert before / 3600 == pytest.approx(after / 9900, rel=0.10)
    # Outside the surge, the offered load is the 0.55 base on every channel type.
    long = generate("burst", 2, hours=48)
    for load in _offered_load(long, since=4500.0).values():
        assert load == pytest.approx(0.55, rel=0.10)
    # A run shorter than the surge start has no surge at all.
    short = _offered_load(generate("burst", 2, hours=1, utilisation=0.5))
    assert all(load < 0.5 * 1.3 for load in short.values())


def test_cli_generates_the_new_scenarios(tmp_path: Path) -> None:
    for scenario in ("scarce_skills", "burst"):
        trace = tmp_path / f"{scenario}.jsonl"
        done = _omnirouter(
            "simulate", "generate", "--scenario", scenario, "--seed", "2", "--hours", "1",
            "--agents", "12", "--out", str(trace), cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        lines = load_jsonl(trace)
        assert lines == generate(scenario, 2, hours=1, agents=12)
        assert len(_agents(lines)) == 12
    done = _omnirouter(
        "simulate", "generate", "--scenario", "scarce_skills", "--agents", "3", cwd=tmp_path
    )
    assert done.returncode == 2 and "at least 6" in done.stderr


def test_a_trace_may_replay_with_another_reserve_setting() -> None:
    from router.schedule import Policy
    from router.sim.run import policy_from_trace

    assert policy_from_trace({"type": "config"}).reserve_risk == Policy().reserve_risk
    assert policy_from_trace({"type": "config", "reserve_risk": 0.03}).reserve_risk == 0.03
