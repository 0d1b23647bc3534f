"""What the daemon benches (ingest.py, email_ingest.py) share: `--classifier-workers`
and `--classifier-stop-after`.

An option is written into the daemon's config only when it is given, so a bench also
runs a daemon from before the option existed (a before/after comparison in one session).
"""

from __future__ import annotations

import argparse
import json


def worker_count(value: str) -> int | str:
    """Parse --classifier-workers: "auto" or a count."""
    return value if value == "auto" else int(value)


def add_classifier_workers(parser: argparse.ArgumentParser) -> None:
    """Add --classifier-workers (default None: not written, the daemon's own default)."""
    parser.add_argument(
        "--classifier-workers",
        type=worker_count,
        default=None,
        help="the daemon's [classifier] workers: processes that classify beside the loop, "
        '"auto" or a number (default: not written, so the daemon\'s default, "auto")',
    )
    parser.add_argument(
        "--classifier-stop-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="the daemon's [classifier] workers_stop_after: seconds of low load that stop "
        "an on-demand worker (default: not written, so the daemon's default)",
    )


def classifier_section(workers: int | str | None, stop_after: float | None = None) -> str:
    """Return the config's [classifier] section for the options ("" when none is set)."""
    lines = [] if workers is None else [f"workers = {json.dumps(workers)}"]
    if stop_after is not None:
        lines.append(f"workers_stop_after = {stop_after!r}")
    return "\n[classifier]\n" + "\n".join(lines) + "\n\n" if lines else ""
