"""`omnirouter simulate run|generate|check`: replay a trace, generate one, or check three files.

omnirouter simulate run --trace T.jsonl --out A.jsonl [--policy P[,P…]] [--summary S.json]
omnirouter simulate generate --scenario NAME --seed N [--out T.jsonl] [--hours H] …
omnirouter simulate check --trace T.jsonl --events A.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from router.sim.check import analyse, check, load_jsonl
from router.sim.generate import SCENARIOS, generate, write_trace
from router.sim.run import POLICIES, TraceError, run_and_summarise

EXIT_INVARIANTS = 1
EXIT_USAGE = 2


def add_run_arguments(sp: argparse.ArgumentParser) -> None:
    """Add the arguments of `simulate run` (replay a trace through the scheduler)."""
    sp.add_argument("--trace", help="the trace to replay (JSON lines)")
    sp.add_argument(
        "--out", help="write the assignment events here (one file per policy: NAME.POLICY.jsonl)"
    )
    sp.add_argument(
        "--policy",
        default="omnirouter",
        help=f"one or more of {', '.join(POLICIES)}, comma-separated, or 'all'",
    )
    sp.add_argument("--summary", help="write the summary JSON here")
    sp.add_argument("--seed", type=int, default=1, help="seed of the policies' ties (default 1)")
    sp.add_argument("--json", action="store_true", help="print summaries as JSON")


def add_generate_arguments(sp: argparse.ArgumentParser) -> None:
    """Add the arguments of `simulate generate` (write a scenario's trace)."""
    sp.add_argument("--scenario", choices=sorted(SCENARIOS), help="which scenario (required)")
    sp.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    sp.add_argument("--out", help="write the trace here (default: standard output)")
    sp.add_argument("--hours", type=float, help="trace length (default: the scenario's)")
    sp.add_argument("--agents", type=int, help="roster size (default: the scenario's)")
    sp.add_argument(
        "--utilisation", type=float, help="offered load per agent, 0-1 (default: the scenario's)"
    )


def add_check_arguments(sp: argparse.ArgumentParser) -> None:
    """Add the arguments of `simulate check` (test events against the invariants and bars)."""
    sp.add_argument("--trace", help="the trace the events came from (JSON lines)")
    sp.add_argument("--events", help="the assignment events to check (JSON lines)")
    sp.add_argument("--json", action="store_true", help="print the report as JSON")


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run the `simulate` action asked for."""
    try:
        if args.action == "generate":
            return _generate(args)
        if args.action == "check":
            return _check(args)
        return _run(args)
    except (TraceError, ValueError, OSError) as exc:
        print(f"omnirouter simulate: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _generate(args: argparse.Namespace) -> int:
    if not args.scenario:
        print("omnirouter simulate generate: --scenario is required", file=sys.stderr)
        return EXIT_USAGE
    lines = generate(
        args.scenario,
        args.seed,
        hours=args.hours,
        agents=args.agents,
        utilisation=args.utilisation,
    )
    if args.out:
        write_trace(lines, args.out)
        messages = sum(1 for line in lines if line.get("type") == "message")
        print(f"{args.out}: {args.scenario} seed {args.seed}, {messages} messages")
    else:
        write_trace(lines, sys.stdout)
    return 0


def _check(args: argparse.Namespace) -> int:
    if not args.trace or not args.events:
        print("omnirouter simulate check: --trace and --events are required", file=sys.stderr)
        return EXIT_USAGE
    summary = analyse(load_jsonl(args.trace), load_jsonl(args.events))
    failures = check(summary)
    if args.json:
        print(json.dumps(summary, indent=2))
    for failure in failures:
        print(f"invariant broken: {failure}")
    for line in summary.get("violations", [])[:10]:
        print(f"  {line}")
    if not failures:
        print("all invariants hold")
    return EXIT_INVARIANTS if failures else 0


def _run(args: argparse.Namespace) -> int:
    if not args.trace:
        print("omnirouter simulate: --trace is required (or: simulate generate)", file=sys.stderr)
        return EXIT_USAGE
    policies = POLICIES if args.policy == "all" else tuple(args.policy.split(","))
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        print(f"omnirouter simulate: unknown policy {unknown[0]!r}", file=sys.stderr)
        return EXIT_USAGE
    trace = load_jsonl(args.trace)
    summaries: dict[str, dict[str, Any]] = {}
    broken = False
    for policy in policies:
        result = run_and_summarise(trace, policy, seed=args.seed)
        summaries[policy] = result.summary
        if args.out:
            _write_jsonl(_per_policy(args.out, policy, len(policies)), result.events)
        if check(result.summary):
            broken = True
    if args.summary:
        body = summaries[policies[0]] if len(policies) == 1 else summaries
        Path(args.summary).write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(summaries, indent=2))
    else:
        print(render(summaries))
    return EXIT_INVARIANTS if broken else 0


def _per_policy(path: str, policy: str, count: int) -> Path:
    """Return the output path for one policy when several run (A.jsonl -> A.POLICY.jsonl)."""
    p = Path(path)
    return p if count == 1 else p.with_name(f"{p.stem}.{policy}{p.suffix}")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, separators=(",", ":")) + "\n")


def render(summaries: dict[str, dict[str, Any]]) -> str:
    """Return a side-by-side table of the policies' summaries."""
    names = list(summaries)
    rows: list[tuple[str, list[str]]] = []
    classes = ("complaint_urgent", "complaint", "inquiry", "suggestion")
    for cls in classes:
        if not any(cls in s["classes"] for s in summaries.values()):
            continue
        rows.append(
            (
                f"{cls} SLA attainment",
                [_pct(s["classes"].get(cls, {}).get("sla_attainment")) for s in summaries.values()],
            )
        )
        rows.append(
            (
                f"{cls} mean / p95 wait s",
                [_waits(s["classes"].get(cls, {})) for s in summaries.values()],
            )
        )
    rows.append(
        ("overall mean wait s", [_num(s["overall"]["mean_wait"]) for s in summaries.values()])
    )
    rows.append(("utilisation Gini", [_num(s["utilisation_gini"], 3) for s in summaries.values()]))
    rows.append(
        (
            "longest complaint streak",
            [str(s["longest_complaint_streak"]) for s in summaries.values()],
        )
    )
    rows.append(
        (
            "complaint streak violations",
            [str(s["complaint_streak_violations"]) for s in summaries.values()],
        )
    )
    rows.append(
        (
            "re-offered after timeout",
            [str(s["reoffered_after_timeout"]) for s in summaries.values()],
        )
    )
    rows.append(
        ("timeouts / returned", [f"{s['timeouts']} / {s['returned']}" for s in summaries.values()])
    )
    rows.append(("never accepted", [str(s["never_accepted"]) for s in summaries.values()]))
    rows.append(
        (
            "capacity/skill/lang violations",
            [
                f"{s['capacity_violations']}/{s['skill_violations']}/{s['language_violations']}"
                for s in summaries.values()
            ],
        )
    )
    rows.append(
        ("decisions per second", [str(s.get("decisions_per_second")) for s in summaries.values()])
    )
    width = max(len(r[0]) for r in rows)
    cols = [max(len(n), *(len(r[1][i]) for r in rows)) for i, n in enumerate(names)]
    out = [" " * width + "  " + "  ".join(n.rjust(c) for n, c in zip(names, cols, strict=True))]
    for label, values in rows:
        out.append(
            label.ljust(width)
            + "  "
            + "  ".join(v.rjust(c) for v, c in zip(values, cols, strict=True))
        )
    return "\n".join(out)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _waits(c: dict[str, Any]) -> str:
    return f"{_num(c.get('mean_wait'))} / {_num(c.get('p95_wait'))}"
