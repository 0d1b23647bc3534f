"""Secrets and customer text never reach the logs, whatever the daemon goes through.

The real daemon runs with every kind of secret a deployment has (the admin token, a
Twilio auth token and a webhook signing secret through `${ENV}`, an MQTT-less roster on
the webhook) and `log_bodies` off. It is then put through what produces log lines:
routed messages with distinctive text, forged Twilio webhooks, wrong admin tokens, a
failing webhook endpoint (retries, errors), a SIGHUP reload and a stop. Every line of
its log is then scanned for each secret value and for every customer text and name.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
from collections.abc import Callable
from pathlib import Path

from tests.daemon_harness import DaemonProcess, base_config, http
from tests.peers import WebhookReceiver, free_port, wait_until
from tests.peers_sms import ACCOUNT_SID, AUTH_TOKEN, TwilioEmulator, inbound_params
from tests.test_daemon_e2e import spawn

spawn = spawn  # the daemon fixture of test_daemon_e2e (kills leftovers, prints logs)

ADMIN = "admin-" + secrets.token_hex(16)
HOOK_SECRET = "hook-" + secrets.token_hex(16)


async def test_no_secret_and_no_customer_text_in_any_log_line(
    tmp_path: Path, spawn: Callable[..., DaemonProcess]
) -> None:
    receiver = WebhookReceiver(HOOK_SECRET)
    await receiver.start()
    emulator = await TwilioEmulator().start()
    web_port, ops_port, sms_port = free_port(), free_port(), free_port()
    sms_base = f"http://127.0.0.1:{sms_port}"
    text = base_config(
        tmp_path / "state",
        web_port=web_port,
        ops_port=ops_port,
        admin_token=ADMIN,
        adapters=(
            '[[adapters]]\ntype = "webhook"\nname = "hook"\n'
            f'url = "{receiver.url}/inbox"\nsecret = "${{LOG_TEST_HOOK_SECRET}}"\n'
            "timeout = 2\nbreaker_threshold = 100\n"
        ),
        agents='[[agents]]\nid = "alice"\ncapacity = 50\ntool = "hook"\n',
        extra=(
            f'[[channels]]\ntype = "twilio"\nname = "sms"\nport = {sms_port}\n'
            f'account_sid = "{ACCOUNT_SID}"\nauth_token = "${{LOG_TEST_TWILIO_TOKEN}}"\n'
            f'from_number = "+15005550006"\npublic_url = "{sms_base}"\n'
            f'base_url = "{emulator.base_url}"\n'
        ),
    )
    env = {"LOG_TEST_HOOK_SECRET": HOOK_SECRET, "LOG_TEST_TWILIO_TOKEN": AUTH_TOKEN}
    customer_texts: list[str] = []
    try:
        daemon = await asyncio.to_thread(spawn, text, env=env)
        web = f"http://127.0.0.1:{web_port}"
        # The endpoint fails first: retries and errors are logged.
        receiver.respond_next(500, count=3)
        for n in range(5):
            marker = f"private parcel story {secrets.token_hex(6)} number {n}"
            name = f"Customer{secrets.token_hex(4)}"
            customer_texts += [marker, name]
            body = {"text": marker, "contact": {"handle": f"{name}@example.org", "name": name}}
            status, _, _ = await asyncio.to_thread(
                http, "POST", f"{web}/v1/messages", body, {"Idempotency-Key": f"k{n}"}
            )
            assert status == 201
        sms_text = f"sms secret story {secrets.token_hex(6)}"
        customer_texts.append(sms_text)
        signed = inbound_params(sms_text, sender="+14155550123")
        assert (await emulator.post_signed(f"{sms_base}/sms", signed))[0] == 200
        forged = inbound_params(f"forged {sms_text}", sender="+14155550199")
        assert (await emulator.post_signed(f"{sms_base}/sms", forged, signature="AAAA"))[0] == 403
        # Wrong and missing admin tokens, then the right one.
        ops = f"http://127.0.0.1:{ops_port}"
        wrong = {"Authorization": f"Bearer {ADMIN[:-1]}x"}
        assert (await asyncio.to_thread(http, "GET", f"{ops}/v1/agents", None, wrong))[0] == 401
        right = {"Authorization": f"Bearer {ADMIN}"}
        assert (await asyncio.to_thread(http, "GET", f"{ops}/v1/agents", None, right))[0] == 200
        await wait_until(lambda: len(receiver.deliveries) >= 6, 20)
        daemon.signal(signal.SIGHUP)
        await asyncio.to_thread(daemon.wait_notification, "RELOADING", timeout=10)
        assert await asyncio.to_thread(daemon.stop) == 0
        log = daemon.log_text()
    finally:
        await receiver.stop()
        await emulator.close()

    # The log is not empty: it recorded what happened, without the content.
    for event in ("message.routed", "twilio.bad_signature"):
        assert event in log, f"{event} missing from the log"
    assert receiver.requests[0].status == 500  # the failures did happen
    for secret in (ADMIN, HOOK_SECRET, AUTH_TOKEN, ADMIN[:-1] + "x"):
        assert secret not in log, "a secret reached the log"
    for text_ in customer_texts:
        assert text_ not in log, f"customer content reached the log: {text_[:20]}"
    assert "+14155550123" not in log, "a full phone number reached the log"
