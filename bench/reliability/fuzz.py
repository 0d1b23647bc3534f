"""Fuzzing campaign: the CI fuzz targets (tests/reliability/fuzz_targets.py), at scale.

    python bench/reliability/fuzz.py [--cases 1000000] [--seed N] [--only NAME ...]

The cases are split over the targets by weight, as in CI, and each target runs the
campaign of tests/reliability/fuzz_engine.py: a pool of seed cases drawn by hypothesis
(`@given` with `max_examples`, generation phase only, no example database, no deadline,
health checks off; `--seed-share` of the cases, 2 % by default), then cheap structural
mutations of those seeds for the rest. Hypothesis alone generates 50–200 structured
cases/s here, which would make a million cases take hours; seeds plus mutations reach a
million in minutes (see docs/RELIABILITY.md ("Fuzzing") for measured figures).

A failing case does not stop the run: failures are counted and the first input of each
distinct one (by exception type and place) is printed, so one run reports every bug.
Prints one line per target (cases, cases/s, seeds, outcomes, raised), then one JSON line
with the totals. Exits 1 if any target raised (an unexpected exception or a broken
property), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the targets live in tests/reliability

from tests.reliability.fuzz_engine import run_campaign  # noqa: E402
from tests.reliability.fuzz_targets import TARGETS, share  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Run the campaign; print per-target figures and one JSON summary line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1_000_000, help="total over all targets")
    parser.add_argument("--seed", type=int, default=None, help="default: random, printed")
    parser.add_argument("--only", nargs="*", default=None, help="target names to run")
    parser.add_argument(
        "--seed-share", type=float, default=0.02, help="share of cases drawn by hypothesis"
    )
    args = parser.parse_args(argv)
    run_seed = args.seed if args.seed is not None else random.randrange(2**32)
    targets = [t for t in TARGETS if not args.only or t.name in args.only]
    shares = share(args.cases)
    print(f"fuzz: {args.cases} cases over {len(targets)} targets, seed {run_seed}", flush=True)
    results = []
    started = time.perf_counter()
    for target in targets:
        result = run_campaign(target, shares[target.name], run_seed, args.seed_share)
        results.append(result)
        outcomes = " ".join(f"{k}={v}" for k, v in sorted(result.outcomes.items()))
        rate = round(result.cases / result.seconds) if result.seconds else 0
        print(
            f"{target.name:36} {result.cases:>9} cases {rate:>7}/s seeds={result.seeds} "
            f"raised={result.raised}  [{outcomes}]",
            flush=True,
        )
        if result.failures:
            print("    " + result.report().replace("\n", "\n    "), flush=True)
    elapsed = time.perf_counter() - started
    total = sum(r.cases for r in results)
    raised = sum(r.raised for r in results)
    summary = {
        "bench": "reliability.fuzz",
        "seed": run_seed,
        "cases": total,
        "seconds": round(elapsed, 1),
        "cases_per_s": round(total / elapsed) if elapsed else 0,
        "raised": raised,
        "targets": {
            r.target: {
                "cases": r.cases,
                "seeds": r.seeds,
                "cases_per_s": round(r.cases / r.seconds) if r.seconds else 0,
                "raised": r.raised,
            }
            for r in results
        },
    }
    print(json.dumps(summary, ensure_ascii=False), flush=True)
    return 1 if raised else 0


if __name__ == "__main__":
    sys.exit(main())
