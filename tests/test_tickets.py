"""router/tickets.py: random bytes for conversation tokens, each handed out once."""

from __future__ import annotations

import itertools
import re

import pytest

from router import tickets
from router.tickets import RandomBytes


def counting_urandom(calls: list[int]) -> object:
    """An os.urandom stand-in whose bytes count up, so overlaps and gaps show."""
    counter = itertools.count()

    def urandom(n: int) -> bytes:
        calls.append(n)
        return bytes(next(counter) % 256 for _ in range(n))

    return urandom


def test_bytes_are_handed_out_once_in_order_across_refills(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(tickets.os, "urandom", counting_urandom(calls))
    source = RandomBytes(chunk=16)
    taken = b"".join(source.take(n) for n in (3, 5, 7, 4, 16, 1, 9))
    # Refills happen when the rest of a chunk is too short: what was left is skipped,
    # never handed out twice.
    assert calls == [16, 16, 16, 16]
    assert list(taken[:15]) == list(range(15))  # 3 + 5 + 7 from the first chunk
    assert len(taken) == 45 and len(set(taken)) == 45  # no byte value repeats: none reused


def test_a_forked_child_reads_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(tickets.os, "urandom", counting_urandom(calls))
    source = RandomBytes(chunk=64)
    parent = source.take(8)
    monkeypatch.setattr(tickets.os, "getpid", lambda: -1)  # as after a fork
    child = source.take(8)
    assert calls == [64, 64] and parent != child


def test_tokens_look_like_secrets_tokens_and_do_not_repeat() -> None:
    source = RandomBytes()
    made = [source.token_urlsafe(16) for _ in range(5000)]
    assert len(set(made)) == len(made)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{22}", t) for t in made)
    assert len(source.take(10_000)) == 10_000  # more than a chunk at once
