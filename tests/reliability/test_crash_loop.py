"""Crash loop: ten SIGKILLs of the real daemon under mixed load, every invariant after each.

The scenario is tests/test_crash.py's (web intake with retried idempotency keys, a
roster far smaller than the conversations, an agent resolving over MQTT, deliveries to
inbox files, MQTT and a signed webhook), run with ten kill points spread over the load
instead of two, with e-mail (customers' mails APPENDed to Dovecot), SMS (a gateway
retrying each text until it is answered 200) and Telegram (a bot's customers, long
polling) coming in at the same time (tests/reliability/mixed_intake.py). After every
kill the dead process's database holds every acknowledged message once, no message is
assigned twice and no agent is over capacity (from the assignment history); after every
restart the daemon's view equals the store's (on the quiet rounds) or stays within
capacity; at the end every message, mail, acknowledged text and Telegram message is
stored once and every assignment is delivered once per delivery id.
`bench/reliability/crash_loop.py` runs the same with 100 kills.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.peers_mail import DOVECOT
from tests.reliability.mixed_intake import SideChannels
from tests.test_crash import run_scenario

KILLS = 10
MESSAGES = 800
MAILS = 150
TEXTS = 200
CHATS = 150


@pytest.mark.skipif(DOVECOT is None, reason="needs dovecot (Debian package: dovecot-imapd)")
def test_ten_kills_under_load_lose_and_double_nothing(tmp_path: Path) -> None:
    side = SideChannels(4242, mails=MAILS, texts=TEXTS, chats=CHATS)
    report = run_scenario(tmp_path, 4242, kills=KILLS, messages=MESSAGES, seconds=240, side=side)
    assert report["mails_stored"] == MAILS and report["texts_stored"] == TEXTS
    assert report["chats_stored"] == CHATS
    assert len(report["kills"]) == KILLS
    # Each kill found some work acknowledged and (on most) some still in flight.
    acked = [k["acked"] for k in report["kills"]]
    assert acked == sorted(acked) and acked[0] > 0
    print("crash loop report:", json.dumps(report))
