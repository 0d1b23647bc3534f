"""`omnirouter status`: the status page at a glance in the terminal.

Asks the running daemon's ops API for `GET /v1/status` (the same JSON the page polls)
and prints queues by class and severity, agents, channels and adapters, dead letters
and crisis alerts. `--watch` redraws every 2 s until Ctrl-C; `--json` prints the JSON
(one document per refresh with `--watch`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

from router.cli import EXIT_FAILURE, EXIT_OK, _admin_call, _admin_view_args, command

WATCH_INTERVAL = 2.0
_CLEAR = "\033[H\033[2J"  # cursor home, clear screen


def _status_args(p: argparse.ArgumentParser) -> None:
    _admin_view_args(p)  # --state-dir, --token, --ops-url, --json as `omnirouter agents`
    p.add_argument(
        "--watch", action="store_true", help=f"refresh every {WATCH_INTERVAL:g} s until Ctrl-C"
    )


def _dur(seconds: float) -> str:
    """Return a short duration such as 45s, 12m05s or 3h20m (negative: overdue)."""
    sign, s = ("-" if seconds < 0 else ""), int(abs(seconds))
    if s < 60:
        return f"{sign}{s}s"
    if s < 3600:
        return f"{sign}{s // 60}m{s % 60:02d}s"
    return f"{sign}{s // 3600}h{s % 3600 // 60:02d}m"


def _ago(ts: float | None, now: float) -> str:
    return f"{_dur(now - ts)} ago" if ts else "never"


def _clip(text: Any, width: int) -> str:
    """Return text on one line, cut to width (customer text may hold anything)."""
    flat = " ".join(str(text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def render_status(s: dict[str, Any]) -> list[str]:
    """Return the status as terminal lines."""
    now = s.get("now") or time.time()
    clock = datetime.fromtimestamp(now, UTC).strftime("%H:%M:%S UTC")
    state = "ready" if s["ready"] else "stopping" if s.get("stopping") else "DEGRADED"
    overdue = sum(q["overdue"] for q in s["queues"])
    on = sum(1 for a in s["agents"] if a["presence"] == "on")
    rows = [
        f"omnirouter {s['version']}  {state}  store {s['store']}  at {clock}",
        f"{s['waiting_total']} waiting, {overdue} past SLA, {on}/{len(s['agents'])} agents on "
        f"line, {s['dead_letters']['count']} dead letter(s), "
        f"{len(s['crisis']['open'])} crisis alert(s)",
        "",
        f"{'QUEUE':14} {'CLASS':10} {'SEV':3} {'WAITING':>7} {'PAST SLA':>8}  OLDEST / SLA",
    ]
    for q in s["queues"]:
        rows.append(
            f"{_clip(q['queue'], 14):14} {q['label']:10} {q['severity']:3} {q['depth']:>7} "
            f"{q['overdue']:>8}  {_dur(q['oldest_wait_s'])} / {_dur(q['oldest_sla_s'])}"
        )
    if not s["queues"]:
        rows.append("(nothing waits)")
    rows += ["", f"{'AGENT':16} {'PRESENCE':8} {'SHIFT':9} LOAD (per channel type)"]
    for a in s["agents"]:
        load = "  ".join(
            f"{p['channel_type'].replace('*', 'any')} {p['used']}/{p['capacity']}"
            for p in a["load"]
        )
        shift = "in shift" if a["on_shift"] else "off shift"
        rows.append(f"{_clip(a['id'], 16):16} {a['presence']:8} {shift:9} {load}")
    rows += ["", f"{'DRIVER':16} {'KIND':18} {'STATE':20} {'LAST SUCCESS':14} LAST ERROR"]
    for name, d in s["drivers"].items():
        kind = f"{d['kind']} {d['type']}"
        rows.append(
            f"{_clip(name, 16):16} {_clip(kind, 18):18} {d['state']:20} "
            f"{_ago(d.get('last_success'), now):14} {_clip(d.get('last_error') or '-', 60)}"
        )
    dead = s["dead_letters"]
    rows += ["", f"DEAD LETTERS: {dead['count']}"]
    for d in dead["newest"]:
        rows.append(
            f"  {_ago(d['dead_at'], now):14} {d['target']:12} {d['agent_id'] or '-':12} "
            f"{d['kind']:8} {_clip(d['reason'], 50)}"
        )
    crisis = s["crisis"]
    if not crisis["enabled"]:
        rows += ["", "CRISIS: detection off"]
    else:
        rows += ["", f"CRISIS: {len(crisis['open']) or 'none open'}"]
        for c in crisis["open"]:
            rows.append(f"  {c['reason']:14} {c['key']:20} raised {_ago(c['started_at'], now)}")
    return rows


def _show_once(args: argparse.Namespace, clear: bool) -> int:
    """Fetch and print the status once; return the exit code."""
    answer = _admin_call(args, "/v1/status")
    if answer is None:
        return EXIT_FAILURE
    status, reply = answer
    if status != 200:
        print(json.dumps(reply, indent=2, ensure_ascii=False), file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        # One line per refresh with --watch (JSON lines), indented otherwise.
        print(json.dumps(reply, ensure_ascii=False, indent=None if args.watch else 2))
    else:
        print((_CLEAR if clear else "") + "\n".join(render_status(reply)))
    sys.stdout.flush()
    return EXIT_OK


@command(
    "status",
    "queues, agents, channels and dead letters at a glance",
    _status_args,
    config=True,
)
def cmd_status(args: argparse.Namespace) -> int:
    """Print the running daemon's status (the ops status page, in the terminal)."""
    if not args.watch:
        return _show_once(args, clear=False)
    clear = sys.stdout.isatty() and not args.json
    try:
        while True:
            _show_once(args, clear=clear)
            time.sleep(WATCH_INTERVAL)
    except KeyboardInterrupt:
        return EXIT_OK
