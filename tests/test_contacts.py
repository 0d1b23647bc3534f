"""Contacts across channels: linked only by verified identifiers or a person's merge.

The pipeline runs in-process on the real SQLite store (tests/test_pipeline.py's
harness); the ops API is served by aiohttp's test server over the real pipeline, and
the CLI talks to it over HTTP. The channels' own part (which identifiers each one
vouches for) is checked at the end against their real parsers.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from channels.email.authres import dmarc_domains, sender_verified
from router.contacts import (
    SWEEP_EVERY,
    ContactBook,
    email_identifier,
    phone_identifier,
    telegram_identifier,
    valid_identifier,
)
from router.model import InboundMessage, new_ulid
from router.ops import OpsApi
from router.store.migrations import MIGRATIONS, migrate
from tests import test_pipeline
from tests.test_pipeline import ROSTER, Harness

PHONE = "+4915112345678"
TOKEN = "contacts-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def inbound(
    channel_type: str,
    handle: str,
    text: str = "Where is my parcel?",
    *,
    identifiers: tuple[str, ...] = (),
    name: str = "",
) -> InboundMessage:
    return InboundMessage(
        channel=channel_type,
        channel_type=channel_type,
        external_id=new_ulid(),
        contact_handle=handle,
        contact_name=name,
        text=text,
        identifiers=identifiers,
        conversation_hint=new_ulid(),  # a new thread each time: each message is a contact
    )


# The pipeline on a fresh store, from tests/test_pipeline.py (bound here for pytest).
h = test_pipeline.h


async def signals(h: Harness, message_id: str) -> set[str]:
    assert h.store is not None
    stored = await h.store.message(message_id)
    assert stored is not None
    raw = stored["signals"]
    return {s["kind"] for s in (json.loads(raw) if isinstance(raw, str) else raw)}


# -- identifiers --------------------------------------------------------------------------


def test_identifiers_are_normalised_and_junk_is_refused() -> None:
    assert email_identifier(" Ann@Example.ORG ") == "email:ann@example.org"
    assert email_identifier("not an address") == ""
    assert phone_identifier(PHONE) == f"phone:{PHONE}"
    assert phone_identifier(f"whatsapp:{PHONE}") == f"phone:{PHONE}"
    assert phone_identifier("015112345678") == ""  # not E.164: the channel normalises first
    assert telegram_identifier(4711) == "telegram:4711"
    assert telegram_identifier("@someone") == ""
    assert valid_identifier("phone:+4915112345678")
    assert not valid_identifier("phone:12")
    assert not valid_identifier("web:ann@example.org")  # a web form vouches for nothing


def test_the_book_counts_across_handles_and_an_unmerge_splits_exactly() -> None:
    book = ContactBook()
    book.learn("email:ann@x.org", "c_a")
    book.learn("sms:+4915112345678", "c_b")
    for at in (10.0, 20.0):
        book.seen("email:ann@x.org", at)
    book.seen("sms:+4915112345678", 30.0)
    assert book.count("sms:+4915112345678", (), now=40.0, window=100.0) == 2
    book.merged("c_b", "c_a")
    assert book.count("sms:+4915112345678", (), now=40.0, window=100.0) == 4
    assert book.count("email:ann@x.org", (), now=115.0, window=100.0) == 3  # 10.0 left the window
    book.unmerged("c_b")
    assert book.count("email:ann@x.org", (), now=115.0, window=100.0) == 2


def test_handles_that_left_the_window_are_swept_from_the_book() -> None:
    # One message each from many handles, never again: their times must not stay in
    # memory for the daemon's lifetime (bench/reliability/flood.py).
    book = ContactBook()
    assert book.count("email:first@x.org", (), now=0.0, window=100.0) == 1  # learns the window
    for n in range(SWEEP_EVERY):
        book.seen(f"email:old{n}@x.org", float(n % 50))
    book.seen("email:ann@x.org", 150.0)  # within 100 s of the sweep below
    for n in range(SWEEP_EVERY):
        book.seen(f"email:new{n}@x.org", 200.0)
    assert not any(k.startswith("email:old") for k in book.recent)
    assert len(book.recent) == SWEEP_EVERY + 1
    for n in range(10 * SWEEP_EVERY):  # a steady stream of one-off handles stays bounded
        book.seen(f"email:later{n}@x.org", 1000.0 + n / 10)
    assert len(book.recent) <= 4 * SWEEP_EVERY
    assert book.count("email:later40959@x.org", (), now=5096.0, window=100.0) == 2


def test_a_swept_one_off_contact_leaves_the_book_and_a_linked_one_stays() -> None:
    book = ContactBook()
    assert book.count("sms:+4915112345678", (), now=0.0, window=100.0) == 1
    book.learn("sms:+4915112345678", "c_linked", ("phone:+4915112345678",))
    book.learn("telegram:4711", "c_tg", ("telegram:4711",), links=(("c_tg", "c_linked"),))
    book.seen("sms:+4915112345678", 0.0)
    book.seen("telegram:4711", 0.0)
    for n in range(2 * SWEEP_EVERY):  # one-off handles, long after
        book.learn(f"email:c{n}@x.org", f"c_{n}", (f"email:c{n}@x.org",))
        book.seen(f"email:c{n}@x.org", 1000.0 + n)
    # Whoever left the window and stands alone is gone from every map...
    assert "email:c0@x.org" not in book.owner and "c_0" not in book.handles
    assert "c_0" not in book.identifiers
    assert len(book.owner) <= 4 * SWEEP_EVERY + 4
    # ...while the linked contact is still found by its identifier.
    assert book.roots_for("sms:+4915112345678", ("telegram:4711",)) == {"c_linked"}


def test_no_sweep_before_the_window_is_known() -> None:
    book = ContactBook()  # a restore replays times before anything asks for a count
    for n in range(2 * SWEEP_EVERY):
        book.seen(f"email:c{n}@x.org", float(n))
    assert len(book.recent) == 2 * SWEEP_EVERY


# -- linking at ingest --------------------------------------------------------------------


async def test_three_contacts_by_telegram_and_sms_escalate_as_one_customer(h: Harness) -> None:
    """The customer shares their own number on Telegram, then texts twice from it."""
    assert h.pipeline is not None
    first = await h.pipeline.ingest(
        inbound(
            "telegram",
            "4711",
            "My order did not arrive",
            identifiers=(telegram_identifier(4711), phone_identifier(PHONE)),
            name="Ann",
        )
    )
    second = await h.pipeline.ingest(
        inbound("sms", PHONE, "Still no parcel", identifiers=(phone_identifier(PHONE),))
    )
    third = await h.pipeline.ingest(
        inbound("sms", PHONE, "Still nothing, where is it", identifiers=(phone_identifier(PHONE),))
    )
    assert "repeat_contact" not in await signals(h, first.message_id)
    assert "repeat_contact" not in await signals(h, second.message_id)
    assert "repeat_contact" in await signals(h, third.message_id)
    view = await h.pipeline.contact(f"sms:{PHONE}")
    assert view is not None
    assert {x["key"] for x in view["handles"]} == {"telegram:4711", f"sms:{PHONE}"}
    assert view["recent_messages"] == 3 and view["name"] == "Ann"
    assert view == await h.pipeline.contact(f"phone:{PHONE}")


async def test_a_claim_without_verification_never_joins_someone_elses_contact(h: Harness) -> None:
    """A web form or an unsigned gateway can type any address: no link, no shared count."""
    assert h.pipeline is not None
    for _ in range(2):
        await h.pipeline.ingest(
            inbound("sms", PHONE, "Where is my refund", identifiers=(phone_identifier(PHONE),))
        )
    # The same number typed into the web form: a claim, its own contact.
    web = await h.pipeline.ingest(inbound("web", PHONE, "Where is my refund"))
    assert "repeat_contact" not in await signals(h, web.message_id)
    sms = await h.pipeline.contact(f"sms:{PHONE}")
    assert sms is not None and [x["key"] for x in sms["handles"]] == [f"sms:{PHONE}"]
    # An identifier that is not of a vouchable kind is dropped, not stored.
    await h.pipeline.ingest(inbound("web", "ann@x.org", identifiers=("web:ann@x.org",)))
    view = await h.pipeline.contact("web:ann@x.org")
    assert view is not None and view["identifiers"] == []


async def test_a_verified_identifier_joins_two_existing_contacts_oldest_first(h: Harness) -> None:
    assert h.pipeline is not None
    await h.pipeline.ingest(inbound("sms", PHONE, identifiers=(phone_identifier(PHONE),)))
    await h.pipeline.ingest(inbound("telegram", "4711", identifiers=(telegram_identifier(4711),)))
    sms = await h.pipeline.contact(f"sms:{PHONE}")
    tg = await h.pipeline.contact("telegram:4711")
    assert sms is not None and tg is not None and sms["id"] != tg["id"]
    # Later the Telegram user shares their own contact card: both contacts are one.
    third = await h.pipeline.ingest(
        inbound(
            "telegram",
            "4711",
            "Third time I ask",
            identifiers=(telegram_identifier(4711), phone_identifier(PHONE)),
        )
    )
    joined = await h.pipeline.contact("telegram:4711")
    assert joined is not None and joined["id"] == sms["id"]  # the older contact stays
    [event] = joined["events"]
    assert event["action"] == "link" and event["actor"] == "router"
    assert event["contact"] == tg["id"] and event["detail"]["identifier"] == f"phone:{PHONE}"
    # The link is known before the commit: this third contact already counts all three.
    assert "repeat_contact" in await signals(h, third.message_id)


# -- merge and unmerge --------------------------------------------------------------------


async def test_merge_counts_together_unmerge_splits_and_both_are_audited(h: Harness) -> None:
    assert h.pipeline is not None
    await h.pipeline.ingest(inbound("email", "ann@x.org", "Refund please"))
    await h.pipeline.ingest(inbound("web", "ann-widget", "Refund please"))
    change = await h.pipeline.merge_contacts(
        "email:ann@x.org", "web:ann-widget", "alice", "same order number"
    )
    assert change.ok
    third = await h.pipeline.ingest(inbound("web", "ann-widget", "Third time: refund!"))
    assert "repeat_contact" in await signals(h, third.message_id)

    again = await h.pipeline.merge_contacts("email:ann@x.org", "web:ann-widget", "alice", "")
    assert not again.ok and again.code == "already_merged"
    missing = await h.pipeline.merge_contacts("email:ann@x.org", "web:nobody", "alice", "")
    assert not missing.ok and missing.code == "not_found"
    root = await h.pipeline.unmerge_contact("email:ann@x.org", "bo", "")
    assert not root.ok and root.code == "not_merged" and change.child in root.error

    split = await h.pipeline.unmerge_contact("web:ann-widget", "bo", "different people")
    assert split.ok and (split.child, split.parent) == (change.child, change.parent)
    fourth = await h.pipeline.ingest(inbound("email", "ann@x.org", "Any news?"))
    assert "repeat_contact" not in await signals(h, fourth.message_id)  # 2 of her own only
    view = await h.pipeline.contact("email:ann@x.org")
    assert view is not None and [x["key"] for x in view["handles"]] == ["email:ann@x.org"]
    history = await h.pipeline.contact("web:ann-widget")
    assert history is not None
    assert [(e["action"], e["actor"], e["detail"]["reason"]) for e in history["events"]] == [
        ("merge", "alice", "same order number"),
        ("unmerge", "bo", "different people"),
    ]


async def test_a_verified_link_an_admin_undid_is_not_made_again(h: Harness) -> None:
    assert h.pipeline is not None
    await h.pipeline.ingest(inbound("sms", PHONE, identifiers=(phone_identifier(PHONE),)))
    card = (telegram_identifier(4711), phone_identifier(PHONE))
    await h.pipeline.ingest(inbound("telegram", "4711", identifiers=card))
    joined = await h.pipeline.contact("telegram:4711")
    assert joined is not None and len(joined["handles"]) == 2
    # The shared phone belongs to a household: the admin separates them.
    tg_contact = joined["handles"][1]["contact"]
    assert (await h.pipeline.unmerge_contact(tg_contact, "ops", "a shared phone")).ok
    await h.pipeline.ingest(inbound("telegram", "4711", identifiers=card))
    apart = await h.pipeline.contact("telegram:4711")
    assert apart is not None and [x["key"] for x in apart["handles"]] == ["telegram:4711"]
    # A person may still merge them explicitly.
    assert (await h.pipeline.merge_contacts(f"sms:{PHONE}", "telegram:4711", "ops", "")).ok


async def test_links_and_recent_contacts_survive_a_restart(tmp_path: Path) -> None:
    first = Harness(tmp_path, ROSTER)
    p = await first.start()
    await p.ingest(inbound("email", "ann@x.org", "Where is my refund"))
    await p.ingest(inbound("web", "ann-widget", "Where is my refund"))
    assert (await p.merge_contacts("email:ann@x.org", "web:ann-widget", "ops", "")).ok
    await first.stop()

    second = Harness(tmp_path, ROSTER)
    p = await second.start()
    try:
        third = await p.ingest(inbound("email", "ann@x.org", "Third time, refund!"))
        assert "repeat_contact" in await signals(second, third.message_id)
    finally:
        await second.stop()


async def test_find_matches_handles_names_and_identifiers(h: Harness) -> None:
    assert h.pipeline is not None
    await h.pipeline.ingest(
        inbound("telegram", "4711", identifiers=(telegram_identifier(4711),), name="Ann Lee")
    )
    await h.pipeline.ingest(inbound("web", "bob@y.org", name="Bob"))
    assert [c["handles"] for c in await h.pipeline.find_contacts("ann lee")] == [["telegram:4711"]]
    assert [c["handles"] for c in await h.pipeline.find_contacts("telegram:47")] == [
        ["telegram:4711"]
    ]
    assert await h.pipeline.find_contacts("%") == []  # LIKE wildcards are literal
    assert len(await h.pipeline.find_contacts("o")) == 1  # bob; "4711"/"Ann Lee" have no o


def test_the_migration_gives_every_existing_handle_a_contact(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "old.db")
    migrate(conn, MIGRATIONS[:4])
    conn.execute(
        "INSERT INTO contacts(key, channel_type, handle, name, created_at) VALUES "
        "('email:ann@x.org','email','ann@x.org','Ann',1.0), ('sms:+4915112345678','sms',"
        "'+4915112345678','',2.0)"
    )
    conn.commit()
    assert migrate(conn) == list(range(5, len(MIGRATIONS) + 1))
    rows = conn.execute(
        "SELECT c.key, p.id, p.name FROM contacts c JOIN people p ON "
        "p.id = c.person_id ORDER BY c.key"
    ).fetchall()
    assert [(r[0], r[2]) for r in rows] == [("email:ann@x.org", "Ann"), ("sms:+4915112345678", "")]
    assert len({r[1] for r in rows}) == 2 and all(r[1].startswith("c_") for r in rows)


# -- the ops API and the CLI ----------------------------------------------------------------


@pytest.fixture
async def api(h: Harness) -> AsyncIterator[TestClient[Any, Any]]:
    assert h.pipeline is not None and h.store is not None
    ops = OpsApi(
        health=None,  # type: ignore[arg-type]  (not reached by these routes)
        metrics=None,  # type: ignore[arg-type]
        agents=h.pipeline,
        dead_letters=None,  # type: ignore[arg-type]
        corrections=h.store,
        contacts=h.pipeline,
        admin_token=TOKEN,
    )
    async with TestClient(TestServer(ops.app())) as client:
        yield client


async def test_ops_api_finds_shows_merges_and_unmerges(
    h: Harness, api: TestClient[Any, Any]
) -> None:
    assert h.pipeline is not None
    await h.pipeline.ingest(inbound("email", "ann@x.org", name="Ann"))
    await h.pipeline.ingest(inbound("sms", PHONE, identifiers=(phone_identifier(PHONE),)))
    assert (await api.get("/v1/contacts?q=ann")).status == 401
    found = await (await api.get("/v1/contacts", params={"q": "ann"}, headers=AUTH)).json()
    [ann] = found["contacts"]
    assert ann["handles"] == ["email:ann@x.org"]
    assert (await api.get("/v1/contacts", headers=AUTH)).status == 400

    resp = await api.post(
        "/v1/contacts/merge",
        json={"into": ann["id"], "from": f"phone:{PHONE}", "actor": "alice", "reason": "called"},
        headers=AUTH,
    )
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["into"] == ann["id"] and body["actor"] == "alice"
    again = await api.post(
        "/v1/contacts/merge", json={"into": ann["id"], "from": f"sms:{PHONE}"}, headers=AUTH
    )
    assert again.status == 409 and (await again.json())["error"]["code"] == "already_merged"
    unknown = await api.post(
        "/v1/contacts/merge", json={"into": ann["id"], "from": "sms:+1"}, headers=AUTH
    )
    assert unknown.status == 404
    bad = await api.post("/v1/contacts/merge", json={"into": ann["id"]}, headers=AUTH)
    assert bad.status == 400 and "from" in (await bad.json())["error"]["message"]

    shown = await api.get(f"/v1/contacts/sms:{PHONE}", headers=AUTH)
    view = await shown.json()
    assert view["id"] == ann["id"] and len(view["handles"]) == 2
    assert view["events"][0]["actor"] == "alice"
    assert (await api.get("/v1/contacts/c_0000000000000000", headers=AUTH)).status == 404

    split = await api.post(f"/v1/contacts/sms:{PHONE}/unmerge", headers=AUTH)
    assert split.status == 200 and (await split.json())["actor"] == "ops"
    again = await api.post(f"/v1/contacts/sms:{PHONE}/unmerge", headers=AUTH)
    assert again.status == 409 and (await again.json())["error"]["code"] == "not_merged"


async def test_cli_contacts_commands_go_through_the_ops_api(
    h: Harness, api: TestClient[Any, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio

    from router import cli

    assert h.pipeline is not None and h.store is not None
    await h.pipeline.ingest(inbound("email", "ann@x.org", name="Ann"))
    await h.pipeline.ingest(inbound("web", "ann-widget"))
    state = tmp_path / "cli-state"
    state.mkdir()
    (state / "admin-token").write_text(TOKEN)
    conf = tmp_path / "cli.toml"
    conf.write_text(f'[daemon]\nstate_dir = "{state}"\n')
    url = str(api.make_url("")).rstrip("/")

    def run(*argv: str) -> int:
        return cli.main([*argv, "-c", str(conf), "--ops-url", url])

    async def call(*argv: str) -> int:
        return await asyncio.to_thread(run, *argv)

    assert await call("contacts", "find", "ann") == 0
    assert "email:ann@x.org" in capsys.readouterr().out
    code = await call(
        "contacts",
        "merge",
        "email:ann@x.org",
        "web:ann-widget",
        "--actor",
        "alice",
        "--reason",
        "x",
    )
    assert code == 0, capsys.readouterr()
    capsys.readouterr()
    assert await call("contacts", "show", "web:ann-widget") == 0
    out = capsys.readouterr().out
    assert "email:ann@x.org" in out and "web:ann-widget" in out and "by alice" in out
    assert await call("contacts", "unmerge", "web:ann-widget", "--actor", "bo") == 0
    assert await call("contacts", "unmerge", "web:ann-widget") == 1
    assert "not_merged" in capsys.readouterr().out


# -- what each channel vouches for ---------------------------------------------------------

_DMARC_PASS = (
    "Authentication-Results: mx.example.com; spf=pass smtp.mailfrom=x.org;\r\n"
    " dkim=pass (2048-bit key) header.d=x.org; dmarc=pass (p=reject dis=none) header.from=x.org\r\n"
)


def mail(headers: str, sender: str = "Ann <ann@x.org>") -> bytes:
    return (
        f"{headers}From: {sender}\r\nTo: help@example.com\r\nSubject: hi\r\n\r\nbody\r\n"
    ).encode()


def test_email_sender_is_verified_only_by_our_own_dmarc_pass() -> None:
    assert sender_verified(mail(_DMARC_PASS), "ann@x.org", "mx.example.com")
    assert sender_verified(mail(_DMARC_PASS), "ANN@X.ORG", "MX.example.com")
    # Not configured, another server's verdict, a failed check, another domain.
    assert not sender_verified(mail(_DMARC_PASS), "ann@x.org", "")
    assert not sender_verified(mail(_DMARC_PASS), "ann@x.org", "mx.other.net")
    failed = _DMARC_PASS.replace("dmarc=pass", "dmarc=fail")
    assert not sender_verified(mail(failed), "ann@x.org", "mx.example.com")
    assert not sender_verified(mail(_DMARC_PASS), "eve@evil.example", "mx.example.com")
    # A forged "pass" the sender wrote sits below ours: only the topmost of ours counts.
    ours_fail = "Authentication-Results: mx.example.com; dmarc=fail header.from=x.org\r\n"
    assert not sender_verified(mail(ours_fail + _DMARC_PASS), "ann@x.org", "mx.example.com")
    # A pass in a comment is no pass; a pass without header.from names no domain.
    assert (
        dmarc_domains("mx.example.com; dmarc=none (dmarc=pass header.from=x.org)", "mx.example.com")
        == set()
    )
    assert dmarc_domains("mx.example.com 1; dmarc=pass", "mx.example.com") == set()
    assert dmarc_domains("other; dmarc=pass header.from=x.org", "mx.example.com") is None


def test_our_servers_several_headers_count_and_what_came_from_outside_does_not() -> None:
    # OpenDKIM and OpenDMARC each add one, above our MTA's own Received line.
    dkim = "Authentication-Results: mx.example.com; dkim=pass header.d=x.org\r\n"
    dmarc = "Authentication-Results: mx.example.com; dmarc=pass header.from=x.org\r\n"
    ours = "Received: from out.x.org by mx.example.com; Thu, 3 Dec 2026 10:00:00 +0000\r\n"
    theirs = "Received: from laptop by out.x.org; Thu, 3 Dec 2026 09:59:00 +0000\r\n"
    assert sender_verified(mail(dkim + dmarc + ours + theirs), "ann@x.org", "mx.example.com")
    # A "pass" with our name that came with the mail, below the second Received: ignored.
    assert not sender_verified(mail(dkim + ours + theirs + dmarc), "ann@x.org", "mx.example.com")
    # Two of ours that disagree about the domain: not verified.
    failed = dmarc.replace("dmarc=pass", "dmarc=fail")
    assert not sender_verified(mail(dmarc + failed + ours), "ann@x.org", "mx.example.com")


def test_telegram_vouches_for_its_user_and_their_own_contact_card() -> None:
    from telegram import Message

    from channels.telegram import _identifiers

    def message(chat: dict[str, Any], **extra: Any) -> Message:
        data = {
            "message_id": 1,
            "date": int(time.time()),
            "chat": chat,
            "from": {"id": 4711, "is_bot": False, "first_name": "Ann"},
            **extra,
        }
        parsed = Message.de_json(data, None)
        assert parsed is not None
        return parsed

    private = {"id": 4711, "type": "private"}
    assert _identifiers(message(private, text="hi")) == ("telegram:4711",)
    own = {"phone_number": "49 151 1234-5678", "first_name": "Ann", "user_id": 4711}
    assert _identifiers(message(private, contact=own)) == ("telegram:4711", f"phone:{PHONE}")
    # Someone else's card is a claim about a third person, not about the sender.
    other = {**own, "user_id": 99}
    assert _identifiers(message(private, contact=other)) == ("telegram:4711",)
    # A group has many people behind one handle.
    group = {"id": -100123, "type": "supergroup", "title": "Shop"}
    assert _identifiers(message(group, text="hi")) == ()
