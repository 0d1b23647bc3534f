"""SMS peers on loopback: an emulator of Twilio's HTTP contract and a private Kannel.

`TwilioEmulator` is an aiohttp server speaking the Messages API as Twilio does
(`POST /2010-04-01/Accounts/{sid}/Messages.json`, basic auth, form fields, 201 with
the message resource as JSON, errors as `{"code", "message", "more_info", "status"}`),
serving MMS media behind basic auth, and playing Twilio's side of the webhooks: it
signs inbound texts and status callbacks with the official `twilio` package's
RequestValidator (the oracle) and POSTs them to the channel.

`Kannel` runs Debian's bearerbox + smsbox with the fake SMSC (real-peers.md section 4);
the test itself is the SMSC client over the fake SMSC's text-line protocol, so it
injects customer texts and reads what Kannel delivers.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import MultiDict
from twilio.request_validator import RequestValidator

from tests.peers import free_port

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "twilio-test-auth-token-7d1f"
OUR_NUMBER = "+14155550100"
CUSTOMER = "+14155550123"

BEARERBOX = "/usr/sbin/bearerbox"
SMSBOX = "/usr/sbin/smsbox"
needs_kannel = pytest.mark.skipif(
    not os.access(BEARERBOX, os.X_OK),
    reason="needs Kannel (Debian packages: kannel kannel-extras)",
)


def sign(url: str, params: list[tuple[str, str]], token: str = AUTH_TOKEN) -> str:
    """Return Twilio's signature of a request, computed by the official library."""
    return RequestValidator(token).compute_signature(url, MultiDict(params))


@dataclass
class Sent:
    """One Messages API request the emulator took."""

    form: dict[str, str]
    sid: str
    auth: str


@dataclass
class TwilioEmulator:
    """Twilio's REST Messages API, media and webhook-sending side, on a loopback port."""

    token: str = AUTH_TOKEN
    sent: list[Sent] = field(default_factory=list)
    attempts: int = 0
    # Answers to give before succeeding: (HTTP status, Twilio code, extra headers).
    failures: list[tuple[int, int, dict[str, str]]] = field(default_factory=list)
    media: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    media_delay: float = 0.0
    auto_status: bool = True  # after a send, call its StatusCallback: sent, delivered
    status_codes: list[int] = field(default_factory=list)  # answers to our callbacks
    port: int = 0
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def base_url(self) -> str:
        """Return the API's base URL (what the channel's base_url is set to)."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> TwilioEmulator:
        """Listen on an ephemeral loopback port."""
        app = web.Application()
        app.router.add_post("/2010-04-01/Accounts/{account}/Messages.json", self._messages)
        app.router.add_get("/media/{name}", self._media)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        self._session = aiohttp.ClientSession()
        return self

    async def close(self) -> None:
        """Stop serving; wait for callbacks in flight."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def _authorised(self, request: web.Request, account: str) -> bool:
        expected = aiohttp.encode_basic_auth(account, self.token)
        return request.headers.get("Authorization") == expected

    async def _messages(self, request: web.Request) -> web.Response:
        self.attempts += 1
        account = request.match_info["account"]
        if not self._authorised(request, account) or account != ACCOUNT_SID:
            return _error(401, 20003, "Authenticate")
        form = {k: str(v) for k, v in (await request.post()).items()}
        if self.failures:
            status, code, headers = self.failures.pop(0)
            return _error(status, code, f"error {code}", headers)
        if not form.get("To") or not form.get("Body"):
            return _error(400, 21602, "Message body is required.")
        sid = "SM" + secrets.token_hex(16)
        self.sent.append(Sent(form, sid, request.headers["Authorization"]))
        callback = form.get("StatusCallback")
        if callback and self.auto_status:
            task = asyncio.create_task(self._statuses(callback, sid, form["To"]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return web.json_response(
            {
                "account_sid": ACCOUNT_SID,
                "api_version": "2010-04-01",
                "body": form["Body"],
                "date_created": "Thu, 03 Dec 2026 08:00:00 +0000",
                "direction": "outbound-api",
                "error_code": None,
                "error_message": None,
                "from": form.get("From"),
                "messaging_service_sid": form.get("MessagingServiceSid"),
                "num_media": "0",
                "num_segments": "1",
                "price": None,
                "sid": sid,
                "status": "queued",
                "to": form["To"],
                "uri": f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{sid}.json",
            },
            status=201,
        )

    async def _statuses(self, callback: str, sid: str, to: str) -> None:
        for status in ("sent", "delivered"):
            code = await self.status(callback, sid, to, status)
            self.status_codes.append(code)

    async def status(self, callback: str, sid: str, to: str, status: str, error: str = "") -> int:
        """POST one signed status callback, as Twilio does; return the answer's status."""
        params = [
            ("AccountSid", ACCOUNT_SID),
            ("ApiVersion", "2010-04-01"),
            ("From", OUR_NUMBER),
            ("MessageSid", sid),
            ("MessageStatus", status),
            ("SmsSid", sid),
            ("SmsStatus", status),
            ("To", to),
        ]
        if error:
            params.append(("ErrorCode", error))
        return (await self.post_signed(callback, params))[0]

    async def _media(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != aiohttp.encode_basic_auth(
            ACCOUNT_SID, self.token
        ):
            return _error(401, 20003, "Authenticate")
        if self.media_delay:
            await asyncio.sleep(self.media_delay)
        item = self.media.get(request.match_info["name"])
        if item is None:
            return _error(404, 20404, "not found")
        return web.Response(body=item[0], content_type=item[1])

    async def post_signed(
        self,
        url: str,
        params: list[tuple[str, str]],
        *,
        signed_url: str | None = None,
        signature: str | None = None,
        body: bytes | None = None,
        content_type: str = "application/x-www-form-urlencoded",
    ) -> tuple[int, str]:
        """POST a form to url, signed over signed_url (default: url); return the answer.

        `signature` replaces the computed one, `body` the encoded form (bad-input tests).
        """
        assert self._session is not None
        if signature is None:
            signature = sign(signed_url or url, params, self.token)
        headers = {"Content-Type": content_type, "User-Agent": "TwilioProxy/1.1"}
        if signature:
            headers["X-Twilio-Signature"] = signature
        data = urllib.parse.urlencode(params).encode() if body is None else body
        async with self._session.post(url, data=data, headers=headers) as resp:
            return resp.status, await resp.text()


def inbound_params(
    text: str, *, sid: str | None = None, sender: str = CUSTOMER, media: int = 0
) -> list[tuple[str, str]]:
    """Return the form of an inbound text as Twilio posts it (with fields we ignore)."""
    sid = sid or "SM" + secrets.token_hex(16)
    params = [
        ("ToCountry", "US"),
        ("ToState", "CA"),
        ("SmsMessageSid", sid),
        ("NumMedia", str(media)),
        ("ToCity", "SAN FRANCISCO"),
        ("FromZip", "94105"),
        ("SmsSid", sid),
        ("FromState", "CA"),
        ("SmsStatus", "received"),
        ("FromCity", "SAN FRANCISCO"),
        ("Body", text),
        ("FromCountry", "US"),
        ("To", OUR_NUMBER),
        ("MessagingServiceSid", ""),
        ("ToZip", "94105"),
        ("NumSegments", "1"),
        ("MessageSid", sid),
        ("AccountSid", ACCOUNT_SID),
        ("From", sender),
        ("ApiVersion", "2010-04-01"),
    ]
    return params


def _error(
    status: int, code: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {
            "code": code,
            "message": message,
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        },
        status=status,
        headers=headers,
    )


# -- Kannel ---------------------------------------------------------------------------


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, within: float = 10) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"port {port} not open within {within}s")


class Kannel:
    """A private bearerbox + smsbox with a fake SMSC; the test is the SMSC's client."""

    SENDSMS_USER = "router"
    SENDSMS_PASSWORD = "kannel-sendsms-pw"

    def __init__(self, mo_url: str) -> None:
        """Prepare the config; `mo_url` is the channel's webhook (get-url, query appended)."""
        self.dir = Path(tempfile.mkdtemp(prefix="kannel-"))
        self.admin, self.smsbox, self.sendsms, self.fake = (free_port() for _ in range(4))
        sep = "&" if "?" in mo_url else "?"
        get_url = f"{mo_url}{sep}from=%p&to=%P&text=%a&smsc=%i&coding=%c&charset=%C&id=%I"
        (self.dir / "kannel.conf").write_text(
            f"""group = core
admin-port = {self.admin}
admin-password = adminpw
status-password = statuspw
admin-allow-ip = "127.0.0.1"
smsbox-port = {self.smsbox}
box-allow-ip = "127.0.0.1"
log-file = "{self.dir}/bearerbox.log"
log-level = 0

group = smsc
smsc = fake
smsc-id = FAKE
our-host = 127.0.0.1
port = {self.fake}
connect-allow-ip = "127.0.0.1"

group = smsbox
bearerbox-host = 127.0.0.1
bearerbox-port = {self.smsbox}
sendsms-port = {self.sendsms}
sendsms-interface = 127.0.0.1
log-file = "{self.dir}/smsbox.log"
global-sender = 12345

group = sendsms-user
username = {self.SENDSMS_USER}
password = {self.SENDSMS_PASSWORD}
max-messages = 10
concatenation = true

group = sms-service
keyword = default
catch-all = true
max-messages = 0
get-url = "{get_url}"
"""
        )
        self.procs: list[subprocess.Popen[bytes]] = []
        self.smsc: socket.socket | None = None
        self._buffer = b""

    @property
    def sendsms_url(self) -> str:
        """Return the sendsms URL template for an sms_http channel."""
        return (
            f"http://127.0.0.1:{self.sendsms}/cgi-bin/sendsms?username={{username}}"
            "&password={password}&from={from}&to={to}&text={text}&coding={coding}"
            "&charset={charset}"
        )

    def start(self) -> Kannel:
        """Start bearerbox, connect as the SMSC client, then start smsbox."""
        bearerbox = self._spawn(BEARERBOX, "bearerbox")
        _wait_port(self.smsbox, bearerbox, self.dir / "bearerbox.out")
        _wait_port(self.fake, bearerbox, self.dir / "bearerbox.out")
        self.smsc = socket.create_connection(("127.0.0.1", self.fake), 5)
        smsbox = self._spawn(SMSBOX, "smsbox")
        _wait_port(self.sendsms, smsbox, self.dir / "smsbox.out")
        return self

    def _spawn(self, binary: str, name: str) -> subprocess.Popen[bytes]:
        """Start one Kannel box with its output in a file."""
        with open(self.dir / f"{name}.out", "wb") as out:
            proc = subprocess.Popen(
                [binary, "-v", "1", str(self.dir / "kannel.conf")],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        """SIGTERM in reverse order, then remove the directory."""
        if self.smsc is not None:
            self.smsc.close()
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def inject(self, sender: str, text: str, to: str = "12345") -> None:
        """Send a customer's text into Kannel, as the SMSC does (raw UTF-8 `text` line)."""
        assert self.smsc is not None
        self.smsc.sendall(f"{sender} {to} text {text}\n".encode())

    def received(self, within: float = 10.0) -> tuple[str, str, str]:
        """Return (from, to, text) of the next text Kannel hands to the SMSC."""
        assert self.smsc is not None
        deadline = time.monotonic() + within
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"nothing at the fake SMSC within {within}s")
            self.smsc.settimeout(left)
            try:
                chunk = self.smsc.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise AssertionError("the fake SMSC connection closed")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        sender, to, kind, rest = line.decode().split(" ", 3)
        if kind == "ucs-2":
            text = urllib.parse.unquote_to_bytes(rest).decode("utf-16-be")
        elif kind == "data":
            text = urllib.parse.unquote_to_bytes(rest).decode("utf-8")
        else:
            text = rest
        return sender, to, text

    def log(self) -> str:
        """Return Kannel's logs (for failure messages)."""
        return "\n".join(
            p.read_text(errors="replace")[-3000:]
            for p in sorted(self.dir.glob("*.log"))
            if p.exists()
        )


def kannel_status(kannel: Kannel) -> dict[str, Any]:
    """Return bearerbox's status page (a liveness check)."""
    import urllib.request

    with urllib.request.urlopen(
        f"http://127.0.0.1:{kannel.admin}/status.txt?password=statuspw", timeout=5
    ) as resp:
        return {"status": resp.status, "text": resp.read().decode(errors="replace")}
