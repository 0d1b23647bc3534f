"""How many agents each class needs per hour to meet its SLA (Erlang C), against the roster.

The queueing model is M/M/c: Poisson arrivals at rate λ, exponential handle times
with mean h (so μ = 1/h), c agents each working one contact at a time, first come
first served. The offered load is a = λ·h Erlangs. Erlang C gives the probability
that an arrival has to wait; from it follow the share answered within a target wait
and the mean wait.

Demand is observed per local hour of the day and per class, either from a simulation
trace (`observe_trace`) or from the store's messages and assignments (`observe_db`).
`plan` turns observations into agents needed per hour and compares them with agents
on shift. Everything except `observe_db`/`observe_store` is pure and cheap to test.
"""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from router.model import Agent

if TYPE_CHECKING:
    from router.config import Config
    from router.store.sqlite import SqliteStore

URGENT_CLASS = "complaint_urgent"
URGENT_SEVERITIES = ("P0", "P1")
DEFAULT_HANDLE = 300.0  # seconds, used for a class with arrivals but no finished work
DEFAULT_LEVEL = 0.8
DEFAULT_OCCUPANCY = 0.85
CLASS_ORDER: tuple[str, ...] = ("inquiry", "complaint", URGENT_CLASS, "suggestion")
HOUR = 3600.0
DAY = 24 * HOUR


class StaffingError(RuntimeError):
    """The inputs of a staffing plan cannot be read (missing store, bad trace, bad zone)."""


# -- Erlang C -------------------------------------------------------------------------


def erlang_c(agents: int, offered_load: float) -> float:
    """Return the probability that an arrival waits in an M/M/c queue (Erlang C)."""
    if offered_load < 0:
        raise ValueError(f"offered load must be >= 0, got {offered_load}")
    if agents <= offered_load:
        return 1.0  # unstable (or no agents): the queue grows without bound
    # The Erlang B recursion stays within [0, 1] at every step, unlike the textbook
    # sum of a^k/k! terms, which overflows for a few hundred agents.
    b = 1.0
    for k in range(1, agents + 1):
        b = offered_load * b / (k + offered_load * b)
    return agents * b / (agents - offered_load * (1.0 - b))


def _load(arrival_rate: float, mean_handle: float) -> float:
    """Return the offered load a = λ·h, checking that both make sense."""
    if arrival_rate < 0:
        raise ValueError(f"arrival rate must be >= 0, got {arrival_rate}")
    if arrival_rate > 0 and mean_handle <= 0:
        raise ValueError(f"mean handle time must be > 0, got {mean_handle}")
    return arrival_rate * mean_handle


def service_level(
    agents: int, arrival_rate: float, mean_handle: float, target_wait: float
) -> float:
    """Return the share of arrivals answered within `target_wait` (all times in one unit)."""
    if target_wait < 0:
        raise ValueError(f"target wait must be >= 0, got {target_wait}")
    a = _load(arrival_rate, mean_handle)
    if a == 0:
        return 1.0
    if agents <= a:
        return 0.0  # unstable: in the long run every wait exceeds any target
    c = erlang_c(agents, a)
    # (c·μ − λ)·t with μ = 1/h is (c − a)·t/h.
    return 1.0 - c * math.exp(-(agents - a) * target_wait / mean_handle)


def mean_wait(agents: int, arrival_rate: float, mean_handle: float) -> float:
    """Return the mean wait before an agent answers, C/(c·μ − λ); inf when unstable."""
    a = _load(arrival_rate, mean_handle)
    if a == 0:
        return 0.0
    if agents <= a:
        return math.inf
    return erlang_c(agents, a) * mean_handle / (agents - a)


def agents_needed(
    arrival_rate: float,
    mean_handle: float,
    target_wait: float,
    target_level: float = DEFAULT_LEVEL,
    max_occupancy: float = DEFAULT_OCCUPANCY,
) -> int:
    """Return the fewest agents meeting the service level with occupancy a/c ≤ max_occupancy."""
    if not 0 <= target_level < 1:
        # A level of 1 is never reached: some arrivals always wait past any target.
        raise ValueError(f"target level must be in [0, 1), got {target_level}")
    if not 0 < max_occupancy <= 1:
        raise ValueError(f"max occupancy must be in (0, 1], got {max_occupancy}")
    a = _load(arrival_rate, mean_handle)
    if a == 0:
        return 0
    agents = max(1, math.ceil(a / max_occupancy))
    while a / agents > max_occupancy:  # ceil of a rounded quotient can fall one short
        agents += 1
    while service_level(agents, arrival_rate, mean_handle, target_wait) < target_level:
        agents += 1
    return agents


# -- observations ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Observation:
    """Demand of one class in one local hour of the day, averaged over the observed days."""

    hour: int  # 0-23, local time of the zone observed in
    cls: str  # inquiry, complaint, complaint_urgent, suggestion (or a trace's own class)
    arrivals_per_hour: float  # arrivals in this hour of the day / hours of it observed
    mean_handle: float  # seconds
    count: int  # arrivals observed in this hour of the day, all days together
    handled: int = 0  # arrivals among them with a known handle time
    # "observed": this hour's handle times; "class": the class's mean over all hours
    # (none finished in this hour); "default": an assumption, nothing of the class finished.
    handle_source: str = "observed"
    hours_observed: float = 1.0  # how many hours of this hour-of-day the window covers

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "hour": self.hour,
            "class": self.cls,
            "arrivals_per_hour": round(self.arrivals_per_hour, 3),
            "mean_handle_s": round(self.mean_handle, 1),
            "count": self.count,
            "handled": self.handled,
            "handle_source": self.handle_source,
            "hours_observed": round(self.hours_observed, 3),
        }


def _zone(tz: str) -> ZoneInfo:
    """Return the zone named `tz`, or raise StaffingError."""
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise StaffingError(f"unknown time zone {tz!r}") from exc


def _exposure(since: float, until: float, zone: ZoneInfo) -> dict[int, float]:
    """Return, per local hour of the day, the seconds of [since, until) that fall in it."""
    seconds: dict[int, float] = defaultdict(float)
    t = since
    while t < until:
        local = datetime.fromtimestamp(t, zone)
        into = local.minute * 60 + local.second + local.microsecond / 1e6
        # Offsets change on hour boundaries (DST), so the next local hour starts here.
        step = min(HOUR - into, until - t)
        seconds[local.hour] += step
        t += step
    return dict(seconds)


def _observations(
    arrivals: Iterable[tuple[int, str, float | None]],
    exposure: Mapping[int, float],
    default_handle: float,
) -> list[Observation]:
    """Return one Observation per (hour, class) from (hour, class, handle time) arrivals."""
    counts: dict[tuple[int, str], int] = defaultdict(int)
    handles: dict[tuple[int, str], list[float]] = defaultdict(list)
    by_class: dict[str, list[float]] = defaultdict(list)
    for hour, cls, handle in arrivals:
        counts[hour, cls] += 1
        if handle is not None and handle >= 0:  # a negative span is clock skew, not work
            handles[hour, cls].append(handle)
            by_class[cls].append(handle)
    out: list[Observation] = []
    for (hour, cls), count in counts.items():
        own = handles.get((hour, cls), [])
        if own:
            handle, source = sum(own) / len(own), "observed"
        elif by_class.get(cls):
            # Nothing that arrived in this hour has finished yet; the class's mean over
            # the other hours is a better guess than a constant.
            handle, source = sum(by_class[cls]) / len(by_class[cls]), "class"
        else:
            handle, source = default_handle, "default"
        # An arrival always lies inside the window, so its hour has some exposure.
        hours = max(exposure.get(hour, 0.0), 1e-9) / HOUR
        out.append(
            Observation(
                hour=hour,
                cls=cls,
                arrivals_per_hour=count / hours,
                mean_handle=handle,
                count=count,
                handled=len(own),
                handle_source=source,
                hours_observed=hours,
            )
        )
    out.sort(key=lambda o: (o.hour, _class_rank(o.cls)))
    return out


def _class_rank(cls: str) -> tuple[int, str]:
    """Return a sort key putting the known classes first, in their usual order."""
    return (CLASS_ORDER.index(cls) if cls in CLASS_ORDER else len(CLASS_ORDER), cls)


def trace_class(line: Mapping[str, Any]) -> str:
    """Return the staffing class of a trace message line (urgent complaints apart)."""
    cls = str(line.get("class", ""))
    return URGENT_CLASS if cls == "complaint" and line.get("urgent") else cls


def _trace_end(lines: Sequence[Mapping[str, Any]]) -> float:
    """Return when the trace's observation window ends (its `end` line, or the last hour)."""
    end: float | None = None
    last = -1.0
    for line in lines:
        if line.get("type") == "end":
            end = float(line["t"])
        elif line.get("type") == "message":
            last = max(last, float(line["t"]))
    if last >= 0 and (end is None or last >= end):
        # No `end`, or arrivals after it: close the window at the end of the last arrival's hour.
        end = max(end or 0.0, (math.floor(last / HOUR) + 1) * HOUR)
    return end or 0.0


def observe_trace(
    lines: Sequence[Mapping[str, Any]], default_handle: float = DEFAULT_HANDLE
) -> list[Observation]:
    """Return per-hour, per-class demand of a simulation trace (one day from t = 0)."""
    # A trace's clock starts at 0; hour k of a trace longer than a day is folded onto
    # hour k mod 24, and the exposure divides by how often that hour was covered.
    end = _trace_end(lines)
    exposure = _exposure(0.0, end, _zone("UTC"))
    arrivals = [
        (
            int(float(line["t"]) // HOUR) % 24,
            trace_class(line),
            float(line["handle_time"]) if line.get("handle_time") is not None else None,
        )
        for line in lines
        if line.get("type") == "message"
    ]
    return _observations(arrivals, exposure, default_handle)


def read_trace(path: Path) -> list[dict[str, Any]]:
    """Return the JSON lines of a trace file, or raise StaffingError."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise StaffingError(f"cannot read trace {path}: {exc.strerror or exc}") from exc
    lines: list[dict[str, Any]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError as exc:
            raise StaffingError(f"{path} line {number}: not JSON ({exc})") from exc
        if not isinstance(line, dict) or "type" not in line:
            raise StaffingError(f"{path} line {number}: not a trace line (no 'type')")
        lines.append(line)
    return lines


_STORE_QUERY = """
SELECT m.ingested_at, m.label, m.severity,
       CASE WHEN a.resolved_at IS NOT NULL
            THEN a.resolved_at - COALESCE(a.accepted_at, a.assigned_at) END
FROM messages AS m LEFT JOIN assignments AS a ON a.message_id = m.id
WHERE m.ingested_at >= ? AND m.ingested_at < ?
"""


def observe_db(
    path: Path,
    since: float,
    until: float,
    tz: str = "UTC",
    default_handle: float = DEFAULT_HANDLE,
) -> list[Observation]:
    """Return per-hour, per-class demand from the SQLite store, opened read-only."""
    zone = _zone(tz)
    if until <= since:
        raise StaffingError(f"empty window: since {since} is not before until {until}")
    if not Path(path).is_file():
        raise StaffingError(f"no store at {path} (pass --trace FILE to read a trace instead)")
    # Read-only, so a running daemon's writer is never blocked or raced by a report.
    uri = Path(path).resolve().as_uri() + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as exc:
        raise StaffingError(f"cannot open the store at {path}: {exc}") from exc
    try:
        conn.execute("PRAGMA busy_timeout=5000")
        rows = conn.execute(_STORE_QUERY, (since, until)).fetchall()
    except sqlite3.Error as exc:
        raise StaffingError(f"cannot read the store at {path}: {exc}") from exc
    finally:
        conn.close()
    # ingested_at, not received_at: work reaches agents when the router has it, and an
    # email's own date can lie hours or days before that.
    arrivals = [
        (
            datetime.fromtimestamp(at, zone).hour,
            URGENT_CLASS if label == "complaint" and severity in URGENT_SEVERITIES else label,
            handle,
        )
        for at, label, severity, handle in rows
    ]
    return _observations(arrivals, _exposure(since, until, zone), default_handle)


async def observe_store(
    store: SqliteStore | Path,
    since: float,
    until: float,
    tz: str = "UTC",
    default_handle: float = DEFAULT_HANDLE,
) -> list[Observation]:
    """Return `observe_db` of the store's database file, read in a worker thread."""
    path = store if isinstance(store, Path) else store.path
    return await asyncio.to_thread(observe_db, path, since, until, tz, default_handle)


# -- agents on shift ------------------------------------------------------------------


def on_shift_counts(agents: Iterable[Agent], day: date, tz: str = "UTC") -> dict[int, int]:
    """Return, per local hour of `day`, how many present agents are in shift at half past."""
    zone = _zone(tz)
    roster = [a for a in agents if a.present]
    counts: dict[int, int] = {}
    for hour in range(24):
        ts = datetime(day.year, day.month, day.day, hour, 30, tzinfo=zone).timestamp()
        # No shifts means always in shift (the roster before shifts were configured).
        counts[hour] = sum(
            1 for a in roster if not a.shifts or any(s.contains(ts) for s in a.shifts)
        )
    return counts


def roster_on_shift(config: Config, day: date, tz: str = "UTC") -> dict[int, int]:
    """Return the configured roster's agents in shift per local hour of `day`."""
    # Imported here: the pipeline pulls in the scheduler, classifier and outbox, which
    # the pure staffing maths and the trace path do not need.
    from router.roster import agents_from_config

    return on_shift_counts(agents_from_config(config), day, tz)


def trace_on_shift(lines: Sequence[Mapping[str, Any]]) -> dict[int, int] | None:
    """Return agents on line at half past each trace hour (fewest over days), None if no agents."""
    if not any(line.get("type") == "agent" for line in lines):
        return None
    end = _trace_end(lines)
    probes = [k * HOUR + HOUR / 2 for k in range(math.ceil(end / HOUR))]
    online: dict[str, bool] = {}
    counts: dict[int, int] = {}
    events = [line for line in lines if line.get("type") in ("agent", "presence")]
    i = 0
    for probe in probes:
        while i < len(events) and float(events[i]["t"]) <= probe:
            e = events[i]
            if e["type"] == "agent":
                online[str(e["id"])] = bool(e.get("online", True))
            else:
                online[str(e["agent"])] = bool(e.get("online", True))
            i += 1
        hour = int(probe // HOUR) % 24
        now_on = sum(online.values())
        # Over several days an hour keeps its thinnest cover: the gap is then a floor.
        counts[hour] = min(counts.get(hour, now_on), now_on)
    return counts


# -- the plan -------------------------------------------------------------------------


def sla_targets(sla: Mapping[str, float]) -> dict[str, float]:
    """Return SLA seconds per staffing class from config-style keys (urgent → complaint_urgent)."""
    out = {k: float(v) for k, v in sla.items() if k != "urgent"}
    if "urgent" in sla and URGENT_CLASS not in out:
        out[URGENT_CLASS] = float(sla["urgent"])
    return out


def plan(
    observations: Iterable[Observation],
    sla: Mapping[str, float],
    on_shift: Mapping[int, int] | None,
    target_level: float = DEFAULT_LEVEL,
    max_occupancy: float = DEFAULT_OCCUPANCY,
) -> list[dict[str, Any]]:
    """Return, for each hour 0-23, each class's demand and need, the total, on shift and gap.

    Each class is staffed as its own pool (Erlang C per class) and the hour's `need`
    is the sum over classes: the conservative split-pool figure. Agents who take
    several classes pool their time, and a shared pool needs fewer agents than the
    sum, so the true need lies between the pooled and this figure. `gap` is on shift
    minus need: negative means under-staffed. `on_shift` None leaves both as None.
    An agent is counted as one server: handle times are read as time per contact, so
    an agent juggling several chats at once is worth more than one.
    """
    if not sla:
        raise ValueError("no SLA targets")
    targets = sla_targets(sla)
    by_hour: dict[int, list[Observation]] = defaultdict(list)
    for o in observations:
        by_hour[o.hour].append(o)
    rows: list[dict[str, Any]] = []
    for hour in range(24):
        classes: dict[str, dict[str, Any]] = {}
        assumptions: list[str] = []
        for o in sorted(by_hour.get(hour, []), key=lambda o: _class_rank(o.cls)):
            target = targets.get(o.cls)
            if target is None:
                target = min(targets.values())
                assumptions.append(f"{o.cls}: no SLA target; used the strictest one ({target:g} s)")
            if o.handle_source == "default":
                assumptions.append(
                    f"{o.cls}: no finished work to measure; assumed {o.mean_handle:g} s handle time"
                )
            rate = o.arrivals_per_hour / HOUR
            need = agents_needed(rate, o.mean_handle, target, target_level, max_occupancy)
            classes[o.cls] = {
                "arrivals_per_hour": round(o.arrivals_per_hour, 2),
                "mean_handle_s": round(o.mean_handle, 1),
                "handle_source": o.handle_source,
                "count": o.count,
                "erlangs": round(rate * o.mean_handle, 3),
                "sla_s": target,
                "need": need,
                "service_level": round(service_level(need, rate, o.mean_handle, target), 4),
                "mean_wait_s": round(mean_wait(need, rate, o.mean_handle), 1),
            }
        need_total = sum(c["need"] for c in classes.values())
        staffed = None if on_shift is None else int(on_shift.get(hour, 0))
        rows.append(
            {
                "hour": hour,
                "classes": classes,
                "need": need_total,
                "need_pooled": _pooled_need(classes, target_level, max_occupancy),
                "on_shift": staffed,
                "gap": None if staffed is None else staffed - need_total,
                "assumptions": assumptions,
            }
        )
    return rows


def _pooled_need(
    classes: Mapping[str, Mapping[str, Any]], target_level: float, max_occupancy: float
) -> int:
    """Return the agents one shared pool needs for every class's SLA in the hour.

    First come first served, so every class sees the same waits: the pool must meet the
    strictest target. The scheduler serves urgent work first and does better than
    this for it, so the true need lies between this and the split-pool sum.
    """
    if not classes:
        return 0
    rate = sum(c["arrivals_per_hour"] for c in classes.values()) / HOUR
    erlangs = sum(c["erlangs"] for c in classes.values())
    if rate <= 0:
        return 0
    strictest = min(c["sla_s"] for c in classes.values())
    return agents_needed(rate, erlangs / rate, strictest, target_level, max_occupancy)


# -- the report (what `omnirouter staffing` prints) -------------------------------------


def _parse_day(day: str | None, tz: str) -> date:
    """Return the date named YYYY-MM-DD, or today in `tz`."""
    if day is None:
        return datetime.now(_zone(tz)).date()
    try:
        return date.fromisoformat(day)
    except ValueError as exc:
        raise StaffingError(f"--date must be YYYY-MM-DD, got {day!r}") from exc


def staffing_report(
    config: Config,
    *,
    trace: Path | None = None,
    days: float = 7.0,
    tz: str = "UTC",
    level: float = DEFAULT_LEVEL,
    day: str | None = None,
    max_occupancy: float = DEFAULT_OCCUPANCY,
    default_handle: float = DEFAULT_HANDLE,
    now: float | None = None,
) -> dict[str, Any]:
    """Return the JSON-ready staffing plan from a trace or the store's last `days` days."""
    if not 0 < level < 1:
        raise StaffingError(f"--level must be between 0 and 1 (exclusive), got {level}")
    if days <= 0:
        raise StaffingError(f"--days must be positive, got {days}")
    _zone(tz)
    report: dict[str, Any] = {"target_level": level, "max_occupancy": max_occupancy}
    sla: dict[str, float] = sla_targets(config.sla.model_dump())
    if trace is not None:
        lines = read_trace(trace)
        try:
            observations = observe_trace(lines, default_handle)
        except (KeyError, TypeError, ValueError) as exc:
            raise StaffingError(
                f"{trace}: a line lacks a field or has a bad value ({exc})"
            ) from exc
        trace_sla = next((x.get("sla") for x in lines if x.get("type") == "config"), None)
        if isinstance(trace_sla, dict) and trace_sla:
            sla = sla_targets(trace_sla)
        # The trace says who was on line; the config's roster describes another world.
        on_shift = trace_on_shift(lines)
        roster = "trace"
        if on_shift is None:
            on_shift = roster_on_shift(config, _parse_day(day, tz), tz)
            roster = "config"
        # Trace times count from 0, so its hours are hours since the start, not a zone's.
        report.update(source="trace", trace=str(trace), tz=None)
    else:
        until = time.time() if now is None else now
        since = until - days * DAY
        if config.store.backend != "sqlite":
            raise StaffingError(
                "staffing reads the observed traffic from an SQLite store; with "
                f"{config.store_label()} give a trace (--trace) exported from it"
            )
        path = config.db_path()
        observations = observe_db(path, since, until, tz, default_handle)
        on_day = _parse_day(day, tz)
        on_shift = roster_on_shift(config, on_day, tz)
        roster = "config"
        report.update(
            source="store",
            store=str(path),
            since=since,
            until=until,
            days=days,
            tz=tz,
            shift_date=on_day.isoformat(),
        )
    rows = plan(observations, sla, on_shift, level, max_occupancy)
    report.update(
        roster=roster,
        sla={k: sla[k] for k in sorted(sla, key=_class_rank)},
        hours=rows,
        assumptions=sorted({a for r in rows for a in r["assumptions"]}),
    )
    return report


def _fmt_rate(value: float) -> str:
    """Return an arrival rate short enough for its column."""
    return f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def render_report(report: Mapping[str, Any]) -> list[str]:
    """Return the human table of a staffing report: active hours, then verdicts."""
    rows: list[dict[str, Any]] = report["hours"]
    classes = sorted({c for r in rows for c in r["classes"]}, key=_class_rank)
    active = [r for r in rows if r["classes"] or r["on_shift"]]
    where = report["trace"] if report["source"] == "trace" else report["store"]
    out = [
        f"staffing from {report['source']} {where}: {report['target_level']:.0%} answered "
        f"within SLA, occupancy at most {report['max_occupancy']:.0%}",
        "SLA: " + ", ".join(f"{k} {v:g} s" for k, v in report["sla"].items()),
        "NEED sums one pool per class (conservative); POOLED: one shared pool meeting the "
        "strictest target; GAP = ON SHIFT − NEED"
        f" (roster from the {report['roster']})",
    ]
    if report["source"] == "store":
        out.append(
            f"window: last {report['days']:g} day(s), hours in {report['tz']}; "
            f"on shift on {report['shift_date']}"
        )
    if not active:
        out.append("no arrivals and nobody on shift in the window")
        return out
    cell = 20
    out.append("")
    if classes:
        out.append("    " + "".join(f"  {c[:cell]:-^{cell}}" for c in classes))
    else:
        out.append("no arrivals in the window")
    out.append(
        "HOUR"
        + "".join(f"  {'λ/h':>8}{'AHT s':>7}{'need':>5}" for _ in classes)
        + f"  {'NEED':>5}  {'POOLED':>6}  {'ON SHIFT':>8}  {'GAP':>5}"
    )
    for r in active:
        cells = []
        for c in classes:
            d = r["classes"].get(c)
            if d is None:
                cells.append(f"  {'-':>8}{'-':>7}{'-':>5}")
            else:
                mark = "*" if d["handle_source"] == "default" else ""
                aht = f"{d['mean_handle_s']:.0f}{mark}"
                cells.append(f"  {_fmt_rate(d['arrivals_per_hour']):>8}{aht:>7}{d['need']:>5}")
        staffed = "-" if r["on_shift"] is None else str(r["on_shift"])
        gap = "-" if r["gap"] is None else f"{r['gap']:+d}"
        out.append(
            f"{r['hour']:02d}  "
            + "".join(cells)
            + f"  {r['need']:>5}  {r['need_pooled']:>6}  {staffed:>8}  {gap:>5}"
        )
    out.append("")
    short = [r for r in active if r["gap"] is not None and r["gap"] < 0]
    for r in short:
        parts = ", ".join(f"{c} {d['need']}" for c, d in r["classes"].items())
        out.append(
            f"hour {r['hour']:02d}: short by {-r['gap']} agent(s): need {r['need']} "
            f"({parts}), {r['on_shift']} on shift"
        )
    if not short:
        out.append("every hour has enough agents on shift for its SLA targets")
    if any(d["handle_source"] == "default" for r in active for d in r["classes"].values()):
        out.append("* handle time assumed: nothing of the class finished in the window")
    out.extend(f"note: {a}" for a in report["assumptions"])
    return out
