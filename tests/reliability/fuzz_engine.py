"""Drive a fuzz target: hypothesis seeds, then cheap structural mutations of them.

Why not hypothesis alone: its generation costs 5–20 ms per structured case here (a
hostile mail is a few hundred draws), so a million cases would take hours, and CI's
10,000 would not fit in a minute. The targets' own checks cost 0.01–2 ms. So each
campaign draws a pool of seed cases with hypothesis's public engine (`@given`,
generation phase only), then derives the remaining cases by mutating one leaf of a
seed: flip, insert, delete or duplicate bytes or characters, splice in a token that
parsers trip on (encoded-word brackets, CR, lone surrogates, `[[`, `${`), or move an
integer to a boundary. Structure is kept (a mail stays a mail, a config dict a dict),
so the mutations reach deep paths that random bytes would not. This is the AFL/radamsa
idea on top of hypothesis's structure-aware seeds.

A failure does not stop a campaign: it is counted by exception type and place, and the
first input of each distinct failure is kept for the report.
"""

from __future__ import annotations

import random
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed, settings

from tests.reliability.fuzz_targets import Target

# Bytes and characters that parsers of mail, JSON, TOML and URLs treat specially.
BYTE_TOKENS = (
    b"=?",
    b"?=",
    b"?B?",
    b"?Q?",
    b"\r\n",
    b"\r",
    b"\n",
    b"\r\n\r\n",
    b"\n ",
    b"--",
    b";",
    b'"',
    b"\\",
    b"\x00",
    b"\xff",
    b"\x85",
    b"\xed\xb2\x80",  # a UTF-8-encoded lone surrogate
    b"\xe4\xbd",  # a cut multi-byte sequence
    b"boundary=",
    b"charset=",
    b"Content-Type: ",
    b"{",
    b"}",
    b"[",
    b"]",
    b"\\ud800",
    b"1e999",
    b"%",
)
TEXT_TOKENS = (
    "\udc80",
    "\ud800",
    "\udfff",
    "\r",
    "\n",
    "\r\n",
    "\x00",
    "\x85",
    "\u2028",
    "\ufeff",
    "王",
    "😀",
    "🇩🇪",
    "e\u0301",
    "=",
    "[",
    "[[",
    "]",
    '"',
    "'''",
    "\\",
    "\\u",
    "${",
    "}",
    ":",
    "@",
    "+",
    "/",
    ";",
    ".",
    " ",
)
INT_EDGES = (0, 1, -1, 2, 7, 63, 64, 65, 255, 256, 65535, 65536, 2**31, 2**63, -(2**63))
MAX_KEPT = 5  # distinct failures kept per campaign
CASE_REPR = 600  # characters of a failing case kept


@dataclass
class Result:
    """What one campaign did: cases run, outcomes, and the first input of each failure."""

    target: str
    cases: int = 0
    seeds: int = 0
    seconds: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def raised(self) -> int:
        """Return how many cases raised (an unexpected exception or a broken property)."""
        return self.outcomes["raised"]

    def report(self) -> str:
        """Return the failures, one block each, for an assertion message or a terminal."""
        return "\n".join(
            f"{where}: {error}\n  case: {case}" for where, (case, error) in self.failures.items()
        )


def collect_seeds(target: Target, count: int, run_seed: int) -> list[Any]:
    """Return up to `count` cases drawn by hypothesis from the target's strategy."""
    seeds: list[Any] = []

    @seed(run_seed)
    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate],
    )
    @given(target.strategy)
    def draw(case: Any) -> None:
        seeds.append(case)

    draw()
    return seeds


def _mutate_seq(value: Any, rnd: random.Random, tokens: tuple[Any, ...], donor: Any) -> Any:
    """Return bytes or str with one random edit (flip, insert, delete, duplicate, splice)."""
    n = len(value)
    at = rnd.randint(0, n)
    op = rnd.randrange(6)
    if op == 0 and n:  # change one element
        at = min(at, n - 1)
        if isinstance(value, bytes):
            return value[:at] + bytes([rnd.randrange(256)]) + value[at + 1 :]
        return (
            value[:at]
            + chr(rnd.choice((rnd.randrange(128), rnd.randrange(0x110000))))
            + value[at + 1 :]
        )
    if op == 1:  # insert a token
        return value[:at] + rnd.choice(tokens) + value[at:]
    if op == 2 and n:  # delete a range
        return value[:at] + value[at + rnd.randint(1, 16) :]
    if op == 3 and n:  # duplicate a range (repeated headers, nested brackets, long lines)
        end = min(n, at + rnd.randint(1, 64))
        return value[:at] + value[at:end] * rnd.randint(2, 8) + value[at:]
    if op == 4 and type(donor) is type(value) and donor:  # splice another seed's middle in
        start = rnd.randrange(len(donor))
        return value[:at] + donor[start : start + rnd.randint(1, 80)] + value[at:]
    if op == 5 and n:  # truncate
        return value[:at]
    return value + rnd.choice(tokens)


def _donor(pool: list[Any], rnd: random.Random, kind: type) -> Any:
    """Return a leaf of type kind from a random seed, for splicing (or None)."""
    node = rnd.choice(pool)
    for _ in range(6):
        if isinstance(node, kind):
            return node
        if isinstance(node, tuple | list) and node:
            node = rnd.choice(node)
        elif isinstance(node, dict) and node:
            node = rnd.choice(list(node.values()))
        else:
            return None
    return None


def mutate(case: Any, rnd: random.Random, pool: list[Any], depth: int = 0) -> Any:
    """Return a copy of case with one leaf edited (containers are copied along the path)."""
    if isinstance(case, bool) or case is None:
        return rnd.choice((True, False, None, 0, ""))
    if isinstance(case, int):
        return rnd.choice((*INT_EDGES, case + rnd.randint(-3, 3), -case))
    if isinstance(case, float):
        return rnd.choice((0.0, -0.0, float("nan"), float("inf"), 1e308, case * 2))
    if isinstance(case, bytes | bytearray):
        return _mutate_seq(bytes(case), rnd, BYTE_TOKENS, _donor(pool, rnd, bytes))
    if isinstance(case, str):
        return _mutate_seq(case, rnd, TEXT_TOKENS, _donor(pool, rnd, str))
    if depth > 20:
        return case
    if isinstance(case, tuple) and case:
        i = rnd.randrange(len(case))
        return (*case[:i], mutate(case[i], rnd, pool, depth + 1), *case[i + 1 :])
    if isinstance(case, list):
        if case and rnd.randrange(4):
            i = rnd.randrange(len(case))
            return [*case[:i], mutate(case[i], rnd, pool, depth + 1), *case[i + 1 :]]
        if not case:
            return case
        # Grow by a copy of a sibling (same shape: a list of pairs stays one), or shrink.
        return [*case, rnd.choice(case)] if rnd.randrange(2) else case[:-1]
    if isinstance(case, dict):
        out = dict(case)
        if out and rnd.randrange(5):
            key = rnd.choice(list(out))
            out[key] = mutate(out[key], rnd, pool, depth + 1)
        elif out and rnd.randrange(2):
            del out[rnd.choice(list(out))]
        else:
            value = rnd.choice(list(out.values())) if out else _donor(pool, rnd, str)
            out[rnd.choice((*TEXT_TOKENS, "type", "name", "port", "id"))] = value
        return out
    return case


def _mutate_case(target: Target, case: Any, rnd: random.Random, pool: list[Any]) -> Any:
    """Mutate one of the target's untrusted arguments (never its caller's settings)."""
    if target.mutable is None or not isinstance(case, tuple):
        return mutate(case, rnd, pool)
    i = rnd.choice(target.mutable)
    return (*case[:i], mutate(case[i], rnd, pool), *case[i + 1 :])


def _where(exc: BaseException) -> str:
    """Return `Type at file:line` of the innermost frame, to group failures."""
    frames = traceback.extract_tb(exc.__traceback__)
    inner = frames[-1] if frames else None
    place = f"{Path(inner.filename).name}:{inner.lineno}" if inner else "?"
    return f"{type(exc).__name__} at {place}"


def run_campaign(target: Target, cases: int, run_seed: int, seed_share: float = 0.02) -> Result:
    """Run `cases` cases of one target: hypothesis seeds first, then mutations of them."""
    result = Result(target.name)
    started = time.perf_counter()
    pool = collect_seeds(target, max(20, min(cases, int(cases * seed_share))), run_seed)
    result.seeds = len(pool)
    rnd = random.Random(run_seed)
    for i in range(cases):
        if i < len(pool):
            case = pool[i]
        else:
            case = rnd.choice(pool)
            for _ in range(1 if rnd.randrange(3) else 2):  # sometimes two edits
                case = _mutate_case(target, case, rnd, pool)
        try:
            result.outcomes[target.check(case)] += 1
        except Exception as exc:  # the campaign counts every failure and goes on
            result.outcomes["raised"] += 1
            key = _where(exc)
            if key not in result.failures and len(result.failures) < MAX_KEPT:
                error = f"{type(exc).__name__}: {exc}"[:400]
                result.failures[key] = (repr(case)[:CASE_REPR], error)
    result.cases = sum(result.outcomes.values())
    result.seconds = time.perf_counter() - started
    return result
