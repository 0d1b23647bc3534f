"""What the daemon benches (ingest.py, email_ingest.py) share: `--classifier-workers`.

The option is written into the daemon's config only when it is given, so a bench also
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


def classifier_section(workers: int | str | None) -> str:
    """Return the config's [classifier] section for --classifier-workers ("" when unset)."""
    return "" if workers is None else f"\n[classifier]\nworkers = {json.dumps(workers)}\n\n"
