"""Every scheduling policy on every simulation scenario, the issue's bars, and Erlang C.

Usage: python bench/sim_compare.py [--scenarios steady_80,peak_burst,...] [--seeds 1,2,3]
       [--hours 4] [--theory-hours 48] [--theory-seeds 20] [--reserve-risk 0.1] [--json]

1. For each scenario of router.sim.generate.SCENARIOS and each seed, generate the trace
   once and replay it against every policy of router.sim.run.POLICIES with
   `run_and_summarise` (the summary is recomputed from the events by
   router.sim.check.analyse). One table per scenario, the seeds pooled: SLA attainment
   per class (messages of all seeds together), overall mean wait (the same), mean
   utilisation Gini over the seeds, summed counters, and the scheduler's decisions per
   second (decisions / time spent inside tick + dispatch).
2. The issue's bars, each comparing omnirouter with least_loaded on the same trace. A
   bar passes only if it holds on every seed; each line shows the numbers per seed,
   then the seeds pooled (for reading only: the verdict is per trace).
   Beyond the four "normal" scenarios: overload_110 (urgent SLA >= 95 %, nothing
   never accepted), no_answer (complaint SLA >= least_loaded's, no re-offer after a
   timeout), scarce_skills (urgent SLA >= 98 %; every class's mean wait <= 1.5 x
   least_loaded's, the baseline floored at 1 s so sub-second noise cannot fail it: the
   scheduler must not starve the one group that serves suggestions nor push complaints
   onto it), burst (urgent SLA >= 98 % and complaint SLA >= least_loaded's through a
   15-minute surge at three times the base rate). Every scenario also needs zero
   complaint streak violations.
3. The theory check: steady_80 is an M/M/c queue (one channel type, capacity 1 per
   agent, exponential 300 s handling for every class). For seeds 1..`--theory-seeds`
   a long trace (`--theory-hours`) gives λ = arrivals / arrival period, h = the trace's
   mean handle time and c = its agents; router.staffing.mean_wait(c, λ, h) is the
   Erlang C mean wait. The simulated mean wait of omnirouter and least_loaded, pooled
   over the seeds, is compared with the theory pooled the same way (target: within
   15 %). The mean wait of one 48 h trace scatters about ±26 % (one standard deviation)
   around Erlang C, so a handful of seeds cannot test a 15 % band: 20 seeds bring the
   pooled figure to about ±6 %. As a noise-free reference the table also replays each
   trace through an ideal first-come-first-served queue with c servers (no scheduler):
   a work-conserving policy should land near it seed by seed.

Prints figures only; the exit code is 0 after a completed run whatever the verdicts.
"""

from __future__ import annotations

import argparse
import heapq
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from router.sim.generate import SCENARIOS, generate
from router.sim.run import POLICIES, run_and_summarise
from router.staffing import mean_wait

CLASSES = ("complaint_urgent", "complaint", "inquiry", "suggestion")
SHORT = {"complaint_urgent": "urg", "complaint": "compl", "inquiry": "inq", "suggestion": "sugg"}
# The issue's bars for the four "normal" scenarios: SLA slack for inquiry and suggestion
# (fraction), mean wait factor, Gini slack, all against least_loaded on the same trace.
NORMAL_BARS: dict[str, tuple[float, float, float]] = {
    "steady_80": (0.01, 1.1, 0.01),
    "peak_burst": (0.05, 1.5, 0.02),
    "skills_split": (0.05, 3.0, 0.05),
    "shift_change": (0.01, 1.5, 0.02),
}
URGENT_SLA_BAR = 0.98
# scarce_skills: each class's mean wait against least_loaded's, with a floor on the
# baseline so that sub-second waits (0.2 s vs 0.4 s) are not read as a regression.
CLASS_WAIT_FACTOR = 1.5
CLASS_WAIT_FLOOR = 1.0
URGENT_SLA_BAR_OVERLOAD = 0.95
THEORY_TOLERANCE = 0.15


@dataclass
class Run:
    """One policy on one seed's trace: the summary plus the scheduler's own cost."""

    seed: int
    summary: dict[str, Any]
    decisions: int
    scheduler_seconds: float


def sla(summary: Mapping[str, Any], cls: str) -> float | None:
    """Return a class's SLA attainment, None if the class has no messages."""
    entry = summary["classes"].get(cls)
    return None if entry is None else entry["sla_attainment"]


def class_wait(summary: Mapping[str, Any], cls: str) -> float | None:
    """Return a class's mean wait, None if the class is absent or nothing was accepted."""
    entry = summary["classes"].get(cls)
    return None if entry is None else entry.get("mean_wait")


def mean_wait_of(summary: Mapping[str, Any]) -> float:
    """Return the overall mean wait (0 if nothing was accepted)."""
    return summary["overall"]["mean_wait"] or 0.0


def pooled(runs: list[Run]) -> dict[str, Any]:
    """Pool a policy's runs over the seeds (messages of all seeds together)."""
    out: dict[str, Any] = {}
    for cls in CLASSES:
        entries = [r.summary["classes"][cls] for r in runs if cls in r.summary["classes"]]
        count = sum(e["count"] for e in entries)
        hit = sum(e["sla_attainment"] * e["count"] for e in entries)
        out[cls] = hit / count if count else None
        waited = [e for e in entries if e["mean_wait"] is not None]
        weight = sum(e["count"] for e in waited)
        out[f"{cls}_mean_wait"] = (
            sum(e["mean_wait"] * e["count"] for e in waited) / weight if weight else None
        )
    count = sum(r.summary["overall"]["count"] for r in runs)
    waited = sum(mean_wait_of(r.summary) * r.summary["overall"]["count"] for r in runs)
    out["mean_wait"] = waited / count if count else 0.0
    out["gini"] = sum(r.summary["utilisation_gini"] for r in runs) / len(runs)
    for key in (
        "complaint_streak_violations",
        "reoffered_after_timeout",
        "never_accepted",
        "capacity_violations",
        "timeouts",
    ):
        out[key] = sum(r.summary[key] for r in runs)
    out["skill_violations"] = sum(
        r.summary["skill_violations"]
        + r.summary["language_violations"]
        + r.summary["channel_violations"]
        for r in runs
    )
    seconds = sum(r.scheduler_seconds for r in runs)
    out["decisions_per_s"] = sum(r.decisions for r in runs) / seconds if seconds else None
    out["messages"] = count
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def print_table(scenario: str, pools: Mapping[str, Mapping[str, Any]], seeds: list[int]) -> None:
    """Print one scenario's table, a row per policy."""
    messages = next(iter(pools.values()))["messages"]
    print(f"\n## {scenario}: {SCENARIOS[scenario]}")
    print(f"   seeds {','.join(map(str, seeds))}, {messages:,} messages in all")
    head = (
        f"{'policy':<13}"
        + "".join(f"{SHORT[c] + ' SLA%':>10}" for c in CLASSES)
        + f"{'wait s':>9}{'gini':>7}{'streak':>7}{'reoff':>6}{'never':>6}{'cap':>5}"
        f"{'skill':>6}{'dec/s':>9}"
    )
    print(head)
    for policy, p in pools.items():
        rate = p["decisions_per_s"]
        print(
            f"{policy:<13}"
            + "".join(f"{_pct(p[c]):>10}" for c in CLASSES)
            + f"{p['mean_wait']:>9.1f}{p['gini']:>7.3f}{p['complaint_streak_violations']:>7}"
            f"{p['reoffered_after_timeout']:>6}{p['never_accepted']:>6}"
            f"{p['capacity_violations']:>5}{p['skill_violations']:>6}"
            f"{'-' if rate is None else f'{rate:,.0f}':>9}"
        )


@dataclass
class Bar:
    """One of the issue's bars: a test on (ours, least_loaded) summaries of one trace."""

    name: str
    test: Callable[[Mapping[str, Any], Mapping[str, Any]], tuple[bool, str] | None]


def _sla_at_least(cls: str, floor: float) -> Bar:
    def test(ours: Mapping[str, Any], _base: Mapping[str, Any]) -> tuple[bool, str] | None:
        value = sla(ours, cls)
        if value is None:
            return None
        return value >= floor, f"{_pct(value)}%"

    return Bar(f"{cls} SLA >= {100 * floor:.0f}%", test)


def _sla_vs_base(cls: str, slack: float) -> Bar:
    def test(ours: Mapping[str, Any], base: Mapping[str, Any]) -> tuple[bool, str] | None:
        mine, theirs = sla(ours, cls), sla(base, cls)
        if mine is None or theirs is None:
            return None
        # Compare in rounded percent points, so that equal figures are not split by
        # floating-point noise.
        ok = round(100 * mine, 6) >= round(100 * (theirs - slack), 6)
        return ok, f"{_pct(mine)} vs {_pct(theirs)}"

    what = "least_loaded's" if not slack else f"least_loaded's - {100 * slack:.0f} pt"
    return Bar(f"{cls} SLA >= {what}", test)


def _wait_vs_base(factor: float) -> Bar:
    def test(ours: Mapping[str, Any], base: Mapping[str, Any]) -> tuple[bool, str] | None:
        mine, theirs = mean_wait_of(ours), mean_wait_of(base)
        ratio = f"{mine / theirs:.2f}x" if theirs else "-"
        return mine <= factor * theirs, f"{mine:.2f}s vs {theirs:.2f}s ({ratio})"

    return Bar(f"mean wait <= {factor:g} x least_loaded's", test)


def _class_wait_vs_base(cls: str, factor: float, floor: float = CLASS_WAIT_FLOOR) -> Bar:
    def test(ours: Mapping[str, Any], base: Mapping[str, Any]) -> tuple[bool, str] | None:
        mine, theirs = class_wait(ours, cls), class_wait(base, cls)
        if mine is None or theirs is None:
            return None
        limit = factor * max(theirs, floor)
        return mine <= limit, f"{mine:.2f}s vs {theirs:.2f}s (limit {limit:.2f}s)"

    return Bar(f"{cls} wait <= {factor:g} x max(least_loaded's, {floor:g} s)", test)


def _gini_vs_base(slack: float) -> Bar:
    def test(ours: Mapping[str, Any], base: Mapping[str, Any]) -> tuple[bool, str] | None:
        mine, theirs = ours["utilisation_gini"], base["utilisation_gini"]
        return mine <= theirs + slack, f"{mine:.3f} vs {theirs:.3f}"

    return Bar(f"utilisation Gini <= least_loaded's + {slack:g}", test)


def _counter_zero(key: str) -> Bar:
    def test(ours: Mapping[str, Any], _base: Mapping[str, Any]) -> tuple[bool, str] | None:
        return ours[key] == 0, str(ours[key])

    return Bar(f"{key} == 0", test)


def bars_for(scenario: str) -> list[Bar]:
    """Return the issue's bars that apply to a scenario."""
    bars: list[Bar] = []
    if scenario in NORMAL_BARS:
        slack, factor, gini_slack = NORMAL_BARS[scenario]
        bars += [
            _sla_at_least("complaint_urgent", URGENT_SLA_BAR),
            _sla_vs_base("complaint", 0.0),
            _sla_vs_base("inquiry", slack),
            _sla_vs_base("suggestion", slack),
            _wait_vs_base(factor),
            _gini_vs_base(gini_slack),
        ]
    elif scenario == "overload_110":
        bars += [
            _sla_at_least("complaint_urgent", URGENT_SLA_BAR_OVERLOAD),
            _counter_zero("never_accepted"),
        ]
    elif scenario == "no_answer":
        bars += [_sla_vs_base("complaint", 0.0), _counter_zero("reoffered_after_timeout")]
    elif scenario == "scarce_skills":
        bars.append(_sla_at_least("complaint_urgent", URGENT_SLA_BAR))
        bars += [_class_wait_vs_base(cls, CLASS_WAIT_FACTOR) for cls in CLASSES]
    elif scenario == "burst":
        bars += [_sla_at_least("complaint_urgent", URGENT_SLA_BAR), _sla_vs_base("complaint", 0.0)]
    bars.append(_counter_zero("complaint_streak_violations"))
    return bars


def as_summary(pool: Mapping[str, Any]) -> dict[str, Any]:
    """Return pooled figures in the shape of an analyse() summary, for the bar tests."""
    summary = dict(pool)
    summary["classes"] = {
        c: {"sla_attainment": pool[c], "mean_wait": pool[f"{c}_mean_wait"]}
        for c in CLASSES
        if pool.get(c) is not None
    }
    summary["overall"] = {"mean_wait": pool["mean_wait"]}
    summary["utilisation_gini"] = pool["gini"]
    return summary


def check_bars(
    scenario: str,
    ours: list[Run],
    base: list[Run],
    pools: Mapping[str, Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """Evaluate the scenario's bars on each seed; a bar passes if every seed passes."""
    results = []
    pooled_ours = as_summary(pools["omnirouter"])
    pooled_base = as_summary(pools["least_loaded"])
    for bar in bars_for(scenario):
        per_seed = []
        for mine, theirs in zip(ours, base, strict=True):
            verdict = bar.test(mine.summary, theirs.summary)
            if verdict is not None:
                per_seed.append({"seed": mine.seed, "ok": verdict[0], "figures": verdict[1]})
        ok = all(s["ok"] for s in per_seed) if per_seed else None
        together = bar.test(pooled_ours, pooled_base)
        results.append(
            {
                "scenario": scenario,
                "bar": bar.name,
                "ok": ok,
                "seeds": per_seed,
                "pooled": None if together is None else together[1],
                "pooled_ok": None if together is None else together[0],
            }
        )
    return results


def print_bars(results: list[dict[str, Any]]) -> None:
    """Print a scenario's verdicts, one line per bar, with the numbers per seed."""
    for r in results:
        verdict = "n/a " if r["ok"] is None else "PASS" if r["ok"] else "FAIL"
        seeds = "; ".join(
            f"s{s['seed']} {s['figures']}{'' if s['ok'] else ' FAIL'}" for s in r["seeds"]
        )
        print(f"   {verdict}  {r['bar']:<52} {seeds}")
        if len(r["seeds"]) > 1 and r["pooled"] is not None:
            print(f"   {'':<6}{'':<52} pooled {r['pooled']}")


def fcfs_wait(messages: list[dict[str, Any]], servers: int) -> float:
    """Return the mean wait of the messages through an ideal FCFS queue with c servers."""
    free = [0.0] * servers  # when each server is next free (a heap)
    waited = 0.0
    for m in messages:
        t = float(m["t"])
        start = max(t, heapq.heappop(free))
        waited += start - t
        heapq.heappush(free, start + float(m["handle_time"]))
    return waited / len(messages)


def theory(seeds: list[int], hours: float) -> dict[str, Any]:
    """Compare steady_80's simulated mean wait with Erlang C, long runs, seeds pooled."""
    rows = []
    sims: dict[str, list[tuple[float, int]]] = {"omnirouter": [], "least_loaded": []}
    for seed in seeds:
        trace = generate("steady_80", seed, hours=hours)
        messages = [line for line in trace if line["type"] == "message"]
        agents = [line for line in trace if line["type"] == "agent"]
        if any(sum(a["capacity"].values()) != 1 for a in agents) or {
            m["channel_type"] for m in messages
        } != {"chat"}:
            raise SystemExit("steady_80 is no longer one channel type at capacity 1: fix theory()")
        period = float(trace[-1]["t"])
        rate = len(messages) / period
        handle = sum(float(m["handle_time"]) for m in messages) / len(messages)
        expected = mean_wait(len(agents), rate, handle)
        row: dict[str, Any] = {
            "seed": seed,
            "messages": len(messages),
            "agents": len(agents),
            "arrival_rate": rate,
            "mean_handle": handle,
            "offered_load": rate * handle,
            "theory_wait": expected,
            "fcfs_wait": fcfs_wait(messages, len(agents)),
        }
        for policy in sims:
            summary = run_and_summarise(trace, policy, seed=seed).summary
            wait = mean_wait_of(summary)
            row[f"{policy}_wait"] = wait
            sims[policy].append((wait, summary["overall"]["count"]))
        rows.append(row)
    total = sum(r["messages"] for r in rows)
    theory_wait = sum(r["theory_wait"] * r["messages"] for r in rows) / total
    fcfs = sum(r["fcfs_wait"] * r["messages"] for r in rows) / total
    out: dict[str, Any] = {
        "hours": hours,
        "seeds": rows,
        "theory_wait": theory_wait,
        "fcfs_wait": fcfs,
        "fcfs_ratio": fcfs / theory_wait if theory_wait else None,
    }
    for policy, waits in sims.items():
        count = sum(n for _, n in waits)
        wait = sum(w * n for w, n in waits) / count
        out[f"{policy}_wait"] = wait
        out[f"{policy}_ratio"] = wait / theory_wait if theory_wait else None
        out[f"{policy}_ok"] = abs(wait / theory_wait - 1) <= THEORY_TOLERANCE
        out[f"{policy}_vs_fcfs"] = wait / fcfs if fcfs else None
    return out


def print_theory(t: Mapping[str, Any]) -> None:
    """Print the Erlang C comparison."""
    seeds = len(t["seeds"])
    print(f"\n## Theory: steady_80 as M/M/c, {t['hours']:g} h x {seeds} seeds, pooled")
    print(
        f"{'seed':>5}{'messages':>10}{'c':>5}{'λ /s':>9}{'h s':>8}{'a Erl':>8}"
        f"{'ErlangC s':>11}{'FCFS s':>8}{'omnirouter s':>14}{'least_loaded s':>16}"
    )
    for r in t["seeds"]:
        print(
            f"{r['seed']:>5}{r['messages']:>10,}{r['agents']:>5}{r['arrival_rate']:>9.4f}"
            f"{r['mean_handle']:>8.1f}{r['offered_load']:>8.2f}{r['theory_wait']:>11.2f}"
            f"{r['fcfs_wait']:>8.2f}{r['omnirouter_wait']:>14.2f}{r['least_loaded_wait']:>16.2f}"
        )
    print(
        f"   ideal FCFS replay {t['fcfs_wait']:.2f} s / Erlang C {t['theory_wait']:.2f} s"
        f" = {t['fcfs_ratio']:.3f} (sampling noise of these traces)"
    )
    for policy in ("omnirouter", "least_loaded"):
        ok = "PASS" if t[f"{policy}_ok"] else "FAIL"
        print(
            f"   {ok}  {policy:<13} simulated {t[f'{policy}_wait']:.2f} s / Erlang C "
            f"{t['theory_wait']:.2f} s = {t[f'{policy}_ratio']:.3f} "
            f"(target within {100 * THEORY_TOLERANCE:.0f}%); / FCFS replay "
            f"{t[f'{policy}_vs_fcfs']:.3f}"
        )


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated")
    ap.add_argument("--seeds", default="1,2,3", help="comma-separated")
    ap.add_argument("--hours", type=float, default=None, help="arrival period (default 4)")
    ap.add_argument("--theory-hours", type=float, default=48.0)
    ap.add_argument("--theory-seeds", type=int, default=20, help="seeds 1..N for the theory")
    ap.add_argument(
        "--reserve-risk",
        type=float,
        default=None,
        help="replay with this scheduling.reserve_risk (default: the daemon's)",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON line at the end")
    args = ap.parse_args()
    scenarios = _csv(args.scenarios)
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    seeds = [int(s) for s in _csv(args.seeds)]
    started = time.perf_counter()
    hours = "4 (default)" if args.hours is None else f"{args.hours:g}"
    print(f"sim_compare: policies {', '.join(POLICIES)}; seeds {seeds}; {hours} h per trace")

    report: dict[str, Any] = {"seeds": seeds, "hours": args.hours, "scenarios": {}}
    all_bars: list[dict[str, Any]] = []
    for scenario in scenarios:
        runs: dict[str, list[Run]] = {policy: [] for policy in POLICIES}
        for seed in seeds:
            trace = generate(scenario, seed, hours=args.hours)
            if args.reserve_risk is not None:
                trace[0]["reserve_risk"] = args.reserve_risk
            for policy in POLICIES:
                result = run_and_summarise(trace, policy, seed=seed)
                runs[policy].append(
                    Run(seed, result.summary, result.decisions, result.scheduler_seconds)
                )
        pools = {policy: pooled(r) for policy, r in runs.items()}
        print_table(scenario, pools, seeds)
        bars = check_bars(scenario, runs["omnirouter"], runs["least_loaded"], pools)
        print("   bars (omnirouter vs least_loaded on the same trace):")
        print_bars(bars)
        all_bars += bars
        report["scenarios"][scenario] = {
            "pooled": pools,
            "per_seed": {
                policy: [
                    {
                        "seed": r.seed,
                        "sla": {c: sla(r.summary, c) for c in CLASSES},
                        "mean_wait": mean_wait_of(r.summary),
                        "gini": r.summary["utilisation_gini"],
                        "complaint_streak_violations": r.summary["complaint_streak_violations"],
                        "reoffered_after_timeout": r.summary["reoffered_after_timeout"],
                        "never_accepted": r.summary["never_accepted"],
                    }
                    for r in rs
                ]
                for policy, rs in runs.items()
            },
            "bars": bars,
        }

    t = theory(list(range(1, args.theory_seeds + 1)), args.theory_hours)
    print_theory(t)
    report["theory"] = t

    failed = [b for b in all_bars if b["ok"] is False]
    passed = sum(1 for b in all_bars if b["ok"])
    print(f"\nbars: {passed} PASS, {len(failed)} FAIL")
    for b in failed:
        worst = "; ".join(f"s{s['seed']} {s['figures']}" for s in b["seeds"] if not s["ok"])
        print(f"   FAIL {b['scenario']}: {b['bar']} ({worst}; pooled {b['pooled']})")
    for policy in ("omnirouter", "least_loaded"):
        verdict = "PASS" if t[f"{policy}_ok"] else "FAIL"
        print(f"   theory {verdict} {policy}: simulated / Erlang C {t[f'{policy}_ratio']:.3f}")
    print(f"total run time {time.perf_counter() - started:.0f} s")
    if args.json:
        print(json.dumps({"bench": "sim_compare", **report}, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
