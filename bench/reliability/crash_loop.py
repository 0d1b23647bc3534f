"""Crash loop benchmark: SIGKILL the real daemon N times under mixed load; audit everything.

Usage: python bench/reliability/crash_loop.py [--kills 100] [--messages 3000]
       [--mails 500] [--texts 500] [--chats 500] [--seed S]

Runs tests/test_crash.py's scenario (web intake with retried idempotency keys, MQTT
resolver, inbox/MQTT/webhook deliveries) with `--kills` kill points spread over
`--messages` web messages, with `--mails` customer mails APPENDed to Dovecot, `--texts`
SMS from a retrying gateway and `--chats` Telegram messages arriving meanwhile (all 0:
web only). Every invariant is checked after each kill and at the end (see that module);
a violation stops the run with the assertion. Prints one line per kill (acknowledged,
stored, outbox pending, queued) and a JSON line with the totals.
Exit 0 when every invariant held, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.reliability.mixed_intake import SideChannels  # noqa: E402
from tests.test_crash import run_scenario  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--mails", type=int, default=500)
    parser.add_argument("--texts", type=int, default=500)
    parser.add_argument("--chats", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    # Each kill costs a restart (and, on quiet rounds, waiting for the views to agree).
    seconds = (
        120 + args.kills * 12 + args.messages / 20 + (args.mails + args.texts + args.chats) / 5
    )
    with tempfile.TemporaryDirectory(prefix="omnirouter-crash-loop-") as tmp:
        try:
            side = (
                SideChannels(args.seed, mails=args.mails, texts=args.texts, chats=args.chats)
                if args.mails or args.texts or args.chats
                else None
            )
            report = run_scenario(
                Path(tmp),
                args.seed,
                kills=args.kills,
                messages=args.messages,
                seconds=seconds,
                side=side,
            )
        except AssertionError as exc:
            print(f"INVARIANT VIOLATED: {exc}", file=sys.stderr)
            return 1
    for n, kill in enumerate(report["kills"], 1):
        print(
            f"kill {n:3}: acked {kill['acked']:5}  stored {kill['stored']:5}  "
            f"outbox pending {kill['outbox_pending']:4}  queued {kill['queued']:4}"
        )
    print(
        f"{len(report['kills'])} kills, {report['messages']} messages acknowledged and stored "
        f"once, {report['assigned']} assigned once, {report['delivered']} delivered once per "
        f"delivery id, {report['retried_keys']} keys retried, "
        f"{report.get('mails_stored', 0)} mails, {report.get('texts_stored', 0)} texts and "
        f"{report.get('chats_stored', 0)} Telegram messages "
        f"stored once, {report['seconds']} s"
    )
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
