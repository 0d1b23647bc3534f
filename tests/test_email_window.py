"""The email channel takes mails a window at a time: grouped FETCHes, overlapping commits.

* Small mails are fetched several per UID FETCH; each is still committed once, whole,
  and handed to the sink in UID order.
* A commit that fails inside a window stops it: the mails before it are journalled and
  passed by the cursor, those behind it are offered again (the store recognises the ones
  that committed), and every mail ends up stored once.
* The answer to a grouped FETCH is split per message whatever the order of its items.
* A window's mails and bytes are bounded (what it holds while its commits are in flight).
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any

import aioimaplib
import pytest

from channels.email.channel import _windows
from channels.email.config import ImapSettings
from channels.email.imap import ImapSession
from router.drivers import Receipt
from router.model import InboundMessage
from tests import peers_mail
from tests.peers import wait_until
from tests.peers_mail import Dovecot
from tests.test_email_channel import RecordingSink, config, cursor, running
from tests.test_email_faults import append_all, make_mail

dovecot = peers_mail.dovecot


class FailingOnceSink(RecordingSink):
    """A RecordingSink whose first commit of one external_id fails."""

    def __init__(self, fail_uid: str) -> None:
        """Fail the first attempt on the mail whose external_id ends with `:fail_uid`."""
        super().__init__()
        self.fail_uid = fail_uid
        self.failed = False

    async def __call__(self, message: InboundMessage) -> Receipt:
        """Commit, except for the chosen mail's first attempt."""
        if not self.failed and message.external_id.endswith(f":{self.fail_uid}"):
            self.failed = True
            self.calls.append(message)
            raise RuntimeError("database is locked")
        return await super().__call__(message)


@peers_mail.needs_dovecot
async def test_small_mails_are_fetched_together_and_each_committed_once_in_order(
    dovecot: Dovecot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 40
    tag = secrets.token_hex(3)
    raws = [make_mail(i, tag=tag) for i in range(n)]
    await append_all(dovecot, raws)
    groups: list[list[int]] = []
    fetch_many = ImapSession.fetch_many

    async def spy(session: ImapSession, uids: list[int]) -> dict[int, bytes]:
        groups.append(list(uids))
        return await fetch_many(session, uids)

    monkeypatch.setattr(ImapSession, "fetch_many", spy)
    sink = RecordingSink()
    async with running(config(dovecot, poll_interval=60), tmp_path, sink) as channel:
        await sink.wait_for(n)
        await asyncio.wait_for(channel.synced.wait(), 10)
    assert groups and max(len(g) for g in groups) > 1
    assert len(sink.calls) == n
    validity = cursor(tmp_path)["uidvalidity"]
    assert [m.external_id for m in sink.stored] == [f"{validity}:{uid}" for uid in range(1, n + 1)]
    for message, raw in zip(sink.stored, raws, strict=True):
        assert message.raw is not None
        assert message.raw.replace(b"\r\n", b"\n") == raw.replace(b"\r\n", b"\n")
    assert cursor(tmp_path)["last_uid"] == n


@peers_mail.needs_dovecot
async def test_a_failed_commit_mid_window_passes_the_mails_before_it_and_retries_the_rest(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    n = 6
    tag = secrets.token_hex(3)
    await append_all(dovecot, [make_mail(i, tag=tag) for i in range(n)])
    sink = FailingOnceSink(fail_uid="3")
    async with running(config(dovecot), tmp_path, sink) as channel:
        await sink.wait_for(n)
        await wait_until(lambda: cursor(tmp_path)["last_uid"] == n)
    validity = cursor(tmp_path)["uidvalidity"]
    stored = [m.external_id for m in sink.stored]
    assert sorted(stored) == sorted(f"{validity}:{uid}" for uid in range(1, n + 1))
    assert len(set(stored)) == n  # nothing committed twice
    # The mails before the failed one were passed: only 3 and what followed it came again.
    offered = [m.external_id.split(":")[1] for m in sink.calls]
    assert offered.count("1") == offered.count("2") == 1
    assert offered.count("3") == 2
    # 4..6 committed in the failed window; offered again, the store recognised them.
    assert (channel.committed, channel.duplicates) == (3, 3)


class _Client:
    """Answers UID FETCH with a canned response."""

    def __init__(self, lines: list[Any]) -> None:
        self.lines = lines

    async def uid(self, *args: str) -> aioimaplib.Response:
        return aioimaplib.Response("OK", self.lines)


async def test_a_grouped_fetch_answer_is_split_per_message() -> None:
    settings = ImapSettings(host="127.0.0.1", tls="none", username="u", password="p")
    session = ImapSession(settings)
    session._client = _Client(  # type: ignore[assignment]
        [
            b"1 FETCH (UID 11 BODY[] {5}",
            bytearray(b"first"),
            b")",
            b"2 FETCH (FLAGS (\\Seen))",  # unsolicited: another client set a flag
            b"3 FETCH (BODY[] {5}",
            bytearray(b"third"),
            b" UID 13)",  # the UID after the literal
            b"4 FETCH (UID 99 BODY[] {5}",
            bytearray(b"other"),  # not asked for
            b")",
            b"Fetch completed.",
        ]
    )
    assert await session.fetch_many([11, 12, 13]) == {11: b"first", 13: b"third"}


def test_a_window_holds_at_most_32_mails_and_4_mib() -> None:
    small = [(uid, 1000) for uid in range(1, 71)]
    assert [len(w) for w in _windows(small)] == [32, 32, 6]
    mixed = [(1, 1000), (2, 3_000_000), (3, 2_000_000), (4, 9_000_000), (5, 0)]
    # Mails whose bytes would pass 4 MiB start a new window; a larger one stands alone.
    assert _windows(mixed) == [
        [(1, 1000), (2, 3_000_000)],
        [(3, 2_000_000)],
        [(4, 9_000_000)],
        [(5, 0)],
    ]
