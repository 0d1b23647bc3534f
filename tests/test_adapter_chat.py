"""The chat adapter against local receivers that speak each service's webhook contract.

`ChatServices` answers like Slack, Mattermost, Teams, WeCom, DingTalk and Feishu do
(including errors inside an HTTP 200 JSON answer) and checks the shape, the size limit
and the signatures of what it gets. Also here: the escaping functions against hostile
input, truncation, the outbox path, and the webhook tool's Standard Webhooks option
verified with the `standardwebhooks` package as the oracle.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import random
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
import structlog
from aiohttp import web
from pydantic import ValidationError
from standardwebhooks import Webhook, WebhookVerificationError

from adapters import chat
from adapters.chat import ChatConfig, ChatTool, SlackAppConfig, SlackAppTool
from adapters.webhook import WebhookConfig, WebhookTool
from router.config import load_config
from router.delivery import (
    AlertPayload,
    Delivery,
    NoticePayload,
    WithdrawnPayload,
    encode_delivery,
)
from router.drivers import (
    ADAPTERS,
    AgentAction,
    DriverContext,
    DriverState,
    PermanentError,
    RateLimited,
    TransientError,
    load_driver,
    tool_sends_actions,
)
from router.metrics import Metrics
from router.model import ticket_number
from router.outbox import Dispatcher
from router.store.sqlite import SqliteStore
from tests import payloads
from tests.peers import free_port
from tests.test_outbox import FAST, item, put, wait_for

SECRET = "SEC0123456789abcdef"  # DingTalk "加签" / Feishu signing secret
WECOM_KEY = "693a91f6-7xxx"
DINGTALK_TOKEN = "tok123"
SLA = "2026-12-03T08:05:00+00:00"

HOSTILE = (
    "<!channel> <!here> <@U123> <http://evil.example|click me> @all @channel @here "
    "<script>alert(1)</script> [free money](http://evil.example) *bold* _it_ ~s~ `code` "
    '@\u200ball <@\u200bU1> <at user_id="all"></at> <font color="warning">x</font> '
    "&lt;!channel&gt; # heading\n> quote"
)


# -- the services ----------------------------------------------------------------------


@dataclass
class Got:
    """One request a fake service received."""

    fmt: str
    path: str
    query: dict[str, str]
    body: bytes
    json: Any


@dataclass
class ChatServices:
    """One aiohttp server on loopback playing all six chat services."""

    port: int = 0
    got: list[Got] = field(default_factory=list)
    # Canned answers (status, body, headers) for the next requests, in order.
    script: list[tuple[int, str, dict[str, str]]] = field(default_factory=list)
    runner: web.AppRunner | None = None

    def url(self, fmt: str) -> str:
        """Return the incoming-webhook URL of fmt on this server, as the service issues it."""
        base = f"http://127.0.0.1:{self.port}"
        return {
            "slack": f"{base}/services/T000/B000/XXXX",
            "mattermost": f"{base}/hooks/abc123",
            "teams": f"{base}/webhookb2/tenant/IncomingWebhook/x",
            "wecom": f"{base}/cgi-bin/webhook/send?key={WECOM_KEY}",
            "dingtalk": f"{base}/robot/send?access_token={DINGTALK_TOKEN}",
            "feishu": f"{base}/open-apis/bot/v2/hook/hook-id",
        }[fmt]

    def strings(self) -> Iterator[str]:
        """Yield every string value in every body received."""
        stack = [g.json for g in self.got]
        while stack:
            value = stack.pop()
            if isinstance(value, dict):
                stack.extend(value.values())
            elif isinstance(value, list):
                stack.extend(value)
            elif isinstance(value, str):
                yield value

    async def start(self) -> None:
        """Listen on a free loopback port."""
        app = web.Application()
        app.router.add_post("/services/{a}/{b}/{c}", self._slack)
        app.router.add_post("/hooks/{id}", self._mattermost)
        app.router.add_post("/webhookb2/{path:.*}", self._teams)
        app.router.add_post("/cgi-bin/webhook/send", self._wecom)
        app.router.add_post("/robot/send", self._dingtalk)
        app.router.add_post("/open-apis/bot/v2/hook/{id}", self._feishu)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        self.port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        """Stop listening."""
        if self.runner is not None:
            await self.runner.cleanup()

    async def _take(self, fmt: str, request: web.Request) -> tuple[Any, web.Response | None]:
        """Record the request; return its JSON and a scripted answer, if any."""
        raw = await request.read()
        assert request.content_type == "application/json"
        body = json.loads(raw)
        self.got.append(Got(fmt, request.path, dict(request.query), raw, body))
        if self.script:
            status, text, headers = self.script.pop(0)
            return body, web.Response(status=status, text=text, headers=headers)
        return body, None

    async def _slack(self, request: web.Request) -> web.Response:
        body, scripted = await self._take("slack", request)
        if scripted:
            return scripted
        # Slack answers 400 invalid_blocks for any block it does not accept.
        ok = isinstance(body.get("text"), str) and isinstance(body.get("blocks"), list)
        for block in body.get("blocks", []):
            ok = ok and block["type"] in ("header", "section", "actions")
            if block["type"] == "actions":
                ok = ok and 1 <= len(block["elements"]) <= 25
                ok = ok and all(len(e["value"]) <= 2000 for e in block["elements"])
            if block["type"] == "header":
                ok = ok and len(block["text"]["text"]) <= 150
            if block["type"] == "section" and "text" in block:
                ok = ok and len(block["text"]["text"]) <= 3000
            if block["type"] == "section" and "fields" in block:
                ok = ok and 1 <= len(block["fields"]) <= 10
                ok = ok and all(len(f["text"]) <= 2000 for f in block["fields"])
        return web.Response(text="ok") if ok else web.Response(status=400, text="invalid_blocks")

    async def _mattermost(self, request: web.Request) -> web.Response:
        body, scripted = await self._take("mattermost", request)
        if scripted:
            return scripted
        text = body.get("text")
        if not isinstance(text, str) or not text or len(text) > 16383:
            return web.json_response(
                {"id": "web.incoming_webhook.text.app_error", "status_code": 400}, status=400
            )
        return web.Response(text="ok")

    async def _teams(self, request: web.Request) -> web.Response:
        body, scripted = await self._take("teams", request)
        if scripted:
            return scripted
        [attachment] = body["attachments"]
        card = attachment["content"]
        ok = (
            body["type"] == "message"
            and attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
            and card["type"] == "AdaptiveCard"
            and len(await request.read()) <= 28000
        )
        return web.Response(text="1") if ok else web.Response(status=400, text="Bad payload")

    async def _wecom(self, request: web.Request) -> web.Response:
        body, scripted = await self._take("wecom", request)
        if scripted:
            return scripted
        if request.query.get("key") != WECOM_KEY:
            return web.json_response({"errcode": 93000, "errmsg": "invalid webhook url"})
        if body.get("msgtype") != "markdown":
            return web.json_response({"errcode": 40008, "errmsg": "invalid message type"})
        if len(body["markdown"]["content"].encode()) > 4096:
            return web.json_response({"errcode": 40058, "errmsg": "content exceed max length"})
        return web.json_response({"errcode": 0, "errmsg": "ok"})

    async def _dingtalk(self, request: web.Request) -> web.Response:
        body, scripted = await self._take("dingtalk", request)
        if scripted:
            return scripted
        q = request.query  # already URL-decoded, as DingTalk reads it
        if q.get("access_token") != DINGTALK_TOKEN:
            return web.json_response({"errcode": 300001, "errmsg": "token is not exist"})
        # The check DingTalk documents: HMAC-SHA256 keyed with the secret over
        # "timestamp\nsecret", base64, within an hour of its clock.
        expected = base64.b64encode(
            hmac.new(SECRET.encode(), f"{q.get('timestamp')}\n{SECRET}".encode(), "sha256").digest()
        ).decode()
        stale = abs(int(q.get("timestamp", "0")) - time.time() * 1000) > 3600_000
        if q.get("sign") != expected or stale:
            return web.json_response({"errcode": 310000, "errmsg": "sign not match"})
        md = body.get("markdown", {})
        if body.get("msgtype") != "markdown" or not md.get("title") or not md.get("text"):
            return web.json_response({"errcode": 40035, "errmsg": "缺少参数 json"})
        if len(await request.read()) > 20000:
            return web.json_response({"errcode": 460101, "errmsg": "message too long"})
        return web.json_response({"errcode": 0, "errmsg": "ok"})

    async def _feishu(self, request: web.Request) -> web.Response:
        body, scripted = await self._take("feishu", request)
        if scripted:
            return scripted
        key = f"{body.get('timestamp')}\n{SECRET}".encode()
        expected = base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode()
        stale = abs(int(body.get("timestamp", "0")) - time.time()) > 3600
        if body.get("sign") != expected or stale:
            return web.json_response(
                {"code": 19021, "msg": "sign match fail or timestamp is not within one hour"}
            )
        card = body.get("card", {})
        if body.get("msg_type") != "interactive" or not card.get("elements"):
            return web.json_response({"code": 9499, "msg": "Bad Request"}, status=400)
        if len(await request.read()) > 20000:
            return web.json_response({"code": 9499, "msg": "request body too large"}, status=400)
        return web.json_response({"code": 0, "msg": "success", "data": {}})


@pytest.fixture
async def services() -> AsyncIterator[ChatServices]:
    s = ChatServices()
    await s.start()
    yield s
    await s.stop()


def make_tool(fmt: str, services: ChatServices, tmp_path: Path, **config: Any) -> ChatTool:
    """Return a ChatTool of format fmt posting to the fake service."""
    settings: dict[str, Any] = {"type": "chat", "name": "team", "format": fmt}
    settings["url"] = services.url(fmt)
    if fmt in ("dingtalk", "feishu"):
        settings["secret"] = SECRET
    settings.update(config)
    ctx = DriverContext(state_dir=tmp_path, log=structlog.get_logger().bind(tool="team"))
    return ChatTool("team", ChatConfig(**settings), ctx)


def delivery(payload: Any, n: int = 1) -> Delivery:
    """Return a delivery of payload to alice."""
    return Delivery(id=f"d-{n}", target="team", agent_id="alice", address="", payload=payload)


def assert_inert(fmt: str, text: str) -> None:
    """Fail if text still holds markup or a mention the format's renderer would act on."""
    assert "\u200b" not in text
    if fmt == "slack":
        assert "<" not in text and ">" not in text
        assert re.search(r"&(?!amp;|lt;|gt;)", text) is None
    elif fmt in ("mattermost", "teams"):
        # Every markdown character is backslash-escaped (pairs of backslashes are literal).
        for match in re.finditer(r"[*_\[\]`~#|<>]", text):
            before = text[: match.start()]
            assert (len(before) - len(before.rstrip("\\"))) % 2 == 1, text
        if fmt == "mattermost":
            assert "<" not in text and ">" not in text
            assert re.search(r"(?<![\w.+-])@", text) is None
    else:
        assert re.search(r"[<>\[\]`~|]", text) is None
        assert re.search(r"(?<![\w.+-])@", text) is None


# -- escaping ----------------------------------------------------------------------------

ESCAPERS = {
    "slack": chat.escape_slack,
    "mattermost": chat.escape_mattermost,
    "teams": chat.escape_teams,
    "wecom": chat.escape_wecom,
    "dingtalk": chat.escape_dingtalk,
    "feishu": chat.escape_feishu,
}


@pytest.mark.parametrize("fmt", chat.FORMATS)
@pytest.mark.parametrize(
    "hostile",
    [
        "<!channel>",
        "<!here|here>",
        "<@U123>",
        "<http://evil.example|your invoice>",
        "@all please",
        "hi @channel and @here",
        "<script>alert(1)</script>",
        "[click](http://evil.example)",
        "![img](http://evil.example/x.png)",
        "*bold* _italic_ ~strike~ `code`",
        "@\u200ball <\u200b!channel>",
        '<at user_id="all"></at> <@wangwu>',
        "\u202egnp.exe",
        HOSTILE,
    ],
)
def test_escaping_leaves_no_markup_or_mention(fmt: str, hostile: str) -> None:
    out = ESCAPERS[fmt](hostile)
    assert_inert(fmt, out)
    assert "\u202e" not in out


def test_escaping_keeps_ordinary_text_readable() -> None:
    text = "Order 42 for dana@example.com: 3.5 kg, 你好"
    assert chat.escape_slack(text) == text
    assert chat.escape_wecom(text) == text  # an e-mail address is not a mention
    assert chat.escape_mattermost("a & b <c>") == "a &amp; b &lt;c&gt;"
    assert chat.escape_slack("a & b <c>") == "a &amp; b &lt;c&gt;"
    assert chat.escape_wecom("@all *x*") == "＠all ＊x＊"
    assert chat.escape_teams("*x* [y](z)\n- item") == "\\*x\\* \\[y\\](z)\n\\- item"


# -- each format, end to end -------------------------------------------------------------


def kinds() -> list[Any]:
    """Return one payload of each delivery kind."""
    return [
        payloads.assignment(1, text="My parcel never came.\nPlease help."),
        WithdrawnPayload("01J0001", ("m-1",), "not accepted in time"),
        AlertPayload({"kind": "sla_breach", "ticket": "T-01J0001", "queue": "default", "late": 5}),
        NoticePayload("resolve", "rejected", "you do not hold this conversation", "01J0001"),
    ]


@pytest.mark.parametrize("fmt", chat.FORMATS)
async def test_every_kind_is_accepted_by_the_service(
    fmt: str, services: ChatServices, tmp_path: Path
) -> None:
    tool = make_tool(fmt, services, tmp_path)
    try:
        for n, payload in enumerate(kinds(), 1):
            await tool.deliver(delivery(payload, n))
    finally:
        await tool.stop()
    assert [g.fmt for g in services.got] == [fmt] * 4
    assert tool.last_success is not None
    first = json.dumps(services.got[0].json, ensure_ascii=False)
    ticket = ticket_number("01J0001")
    assert ticket in first and SLA in first and "My parcel never came" in first
    for got in services.got:
        assert ticket in json.dumps(got.json, ensure_ascii=False)
    if fmt == "dingtalk":
        assert {"access_token", "timestamp", "sign"} <= set(services.got[0].query)
    if fmt == "feishu":
        assert {"timestamp", "sign", "msg_type", "card"} <= set(services.got[0].json)


@pytest.mark.parametrize("fmt", chat.FORMATS)
async def test_injection_in_customer_fields_never_reaches_the_output(
    fmt: str, services: ChatServices, tmp_path: Path
) -> None:
    payload = payloads.assignment(1, text=HOSTILE, contact_name="<!channel> @all *Boss*")
    tool = make_tool(fmt, services, tmp_path)
    try:
        await tool.deliver(delivery(payload))
    finally:
        await tool.stop()
    raw = json.loads(services.got[0].body)  # as the service parses it
    text = "\n".join(services.strings())
    assert raw and "\u200b" not in text and "\u202e" not in text
    # No mention, link or HTML can form: every "<" the customer wrote is escaped.
    assert re.search(r"(?<!\\)<(!channel|!here|@U|http|script|at |font)", text) is None
    if fmt == "slack":
        return  # plain_text objects: Slack parses no markdown or @words in them
    # Markdown: emphasis and links stay literal, and no @word is a mention (Teams has
    # no text mentions: only <at> with an entity list, which we never send).
    if fmt != "teams":
        assert re.search(r"(?<![\w.+\\-])@(all|channel|here|U1)", text) is None
    if fmt in ("mattermost", "teams"):
        assert re.search(r"(?<!\\)(\*bold|\]\(http|_it_|`code)", text) is None
    else:
        assert not any(t in text for t in ("*bold", "](http", "_it_", "`code"))


@pytest.mark.parametrize("fmt", chat.FORMATS)
async def test_oversize_text_is_truncated_with_a_note(
    fmt: str, services: ChatServices, tmp_path: Path
) -> None:
    text = ("Lorem ipsum 你好世界 <&> " * 4000).strip()
    tool = make_tool(fmt, services, tmp_path)
    try:
        await tool.deliver(delivery(payloads.assignment(1, text=text)))
    finally:
        await tool.stop()
    [got] = services.got  # the service's own size check accepted it
    rendered = json.dumps(got.json, ensure_ascii=False)
    note = re.search(r"… \(truncated, (\d+) characters\)", rendered)
    assert note is not None and 0 < int(note.group(1)) < len(text)
    assert ticket_number("01J0001") in rendered and SLA in rendered


def test_truncation_keeps_as_much_as_fits() -> None:
    text = "x" * 10000
    card = chat.card_for(delivery(payloads.assignment(1, text=text)))
    body = chat.render("wecom", card)
    content = body["markdown"]["content"]
    assert len(content.encode()) <= chat.WECOM_BYTES
    assert len(content.encode()) > chat.WECOM_BYTES - 10  # not cut more than needed
    kept = content.split("\n\n", 1)[1].count("x")
    assert f"(truncated, {10000 - kept} characters)" in content


# -- answers: errors in 200s, 429s ---------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "status", "answer", "error"),
    [
        ("wecom", 200, {"errcode": 45009, "errmsg": "api freq out of limit"}, RateLimited),
        ("wecom", 200, {"errcode": -1, "errmsg": "system busy"}, TransientError),
        ("wecom", 200, {"errcode": 93000, "errmsg": "invalid webhook url"}, PermanentError),
        ("dingtalk", 200, {"errcode": 130101, "errmsg": "send too fast"}, RateLimited),
        ("dingtalk", 200, {"errcode": 310000, "errmsg": "keywords not in content"}, PermanentError),
        ("feishu", 200, {"code": 11232, "msg": "frequency limited"}, RateLimited),
        (
            "feishu",
            200,
            {"StatusCode": 19024, "StatusMessage": "Key Words Not Found"},
            PermanentError,
        ),
        ("feishu", 400, {"code": 9499, "msg": "Bad Request"}, PermanentError),
        ("slack", 404, "no_team", PermanentError),
        ("slack", 500, "rollup_error", TransientError),
        ("mattermost", 503, "down", TransientError),
        (
            "teams",
            200,
            "Microsoft Teams endpoint returned HTTP error 429 with ContextId x",
            RateLimited,
        ),
        (
            "teams",
            200,
            "Microsoft Teams endpoint returned HTTP error 413 with ContextId x",
            PermanentError,
        ),
        ("wecom", 200, "<html>proxy</html>", PermanentError),
    ],
)
async def test_service_answers_map_to_the_taxonomy(
    fmt: str,
    status: int,
    answer: Any,
    error: type[Exception],
    services: ChatServices,
    tmp_path: Path,
) -> None:
    text = answer if isinstance(answer, str) else json.dumps(answer)
    services.script.append((status, text, {}))
    tool = make_tool(fmt, services, tmp_path)
    try:
        with pytest.raises(error) as info:
            await tool.deliver(delivery(payloads.assignment(1)))
        assert type(info.value) is error
        assert "key=" not in str(info.value) and "access_token" not in str(info.value)
        if fmt == "dingtalk" and error is RateLimited:
            assert info.value.retry_after == chat.DINGTALK_RETRY_AFTER  # type: ignore[attr-defined]
        await tool.deliver(delivery(payloads.assignment(2), 2))  # the next one goes through
    finally:
        await tool.stop()


async def test_slack_429_obeys_retry_after(services: ChatServices, tmp_path: Path) -> None:
    services.script.append((429, "rate_limited", {"Retry-After": "7"}))
    tool = make_tool("slack", services, tmp_path)
    try:
        with pytest.raises(RateLimited) as info:
            await tool.deliver(delivery(payloads.assignment(1)))
    finally:
        await tool.stop()
    assert info.value.retry_after == 7


async def test_wrong_signing_secret_is_refused_by_dingtalk_and_feishu(
    services: ChatServices, tmp_path: Path
) -> None:
    for fmt in ("dingtalk", "feishu"):
        tool = make_tool(fmt, services, tmp_path, secret="not-the-secret")
        try:
            with pytest.raises(PermanentError, match=r"310000|19021"):
                await tool.deliver(delivery(payloads.assignment(1)))
        finally:
            await tool.stop()


def test_config_checks() -> None:
    base = {"type": "chat", "name": "t", "url": "https://hooks.slack.com/services/T/B/X"}
    with pytest.raises(ValidationError, match="only for dingtalk and feishu"):
        ChatConfig(**base, format="slack", secret="s")
    with pytest.raises(ValidationError, match="format"):
        ChatConfig(**base, format="discord")
    with pytest.raises(ValidationError, match="http"):
        ChatConfig(**{**base, "url": "ftp://x/y"}, format="slack")
    config = ChatConfig(**base, format="slack")
    assert "services" not in repr(config)  # the URL is the credential: masked
    assert load_driver(ADAPTERS, "chat") is ChatTool


# -- the outbox path ---------------------------------------------------------------------


async def test_outbox_retries_transient_and_dead_letters_permanent(
    services: ChatServices, tmp_path: Path
) -> None:
    store = SqliteStore(tmp_path / "o.db")
    await store.open()
    tool = make_tool("wecom", services, tmp_path)
    busy = json.dumps({"errcode": -1, "errmsg": "system busy"})
    bad = json.dumps({"errcode": 93000, "errmsg": "invalid webhook url"})
    services.script += [(200, busy, {}), (502, "bad gateway", {})]
    d = Dispatcher(store, lambda: {"t": tool}, FAST, Metrics(), rng=random.Random(1))
    task = asyncio.create_task(d.run())
    try:
        first = item()
        await put(store, first)
        d.submit(first)
        await wait_for(lambda: len(services.got) == 3)
        await wait_for(lambda: d.backlog == 0)
        services.script.append((200, bad, {}))
        second = item()
        await put(store, second)
        d.submit(second)
        await wait_for(lambda: len(services.got) == 4)
        await wait_for(lambda: d.backlog == 0)
        [dead] = await store.dead_letters()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await tool.stop()
        await store.close()
    assert dead.id == second.id and "93000" in dead.reason and WECOM_KEY not in dead.reason
    # The same message three times (two failures, then accepted), then the refused one.
    assert [g.json for g in services.got[:3]] == [services.got[0].json] * 3


# -- the webhook tool's Standard Webhooks option -----------------------------------------


async def test_standard_webhooks_signature_verifies_with_the_reference_library(
    tmp_path: Path,
) -> None:
    secret = "whsec_" + base64.b64encode(b"0123456789abcdef01234567").decode()
    received: list[tuple[bytes, dict[str, str]]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append((await request.read(), dict(request.headers)))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    config = WebhookConfig(
        type="webhook",
        name="hook",
        url=f"http://127.0.0.1:{port}/hook",
        secret=secret,
        signature="standard",
    )
    ctx = DriverContext(state_dir=tmp_path, log=structlog.get_logger())
    tool = WebhookTool("hook", config, ctx)
    sent = delivery(payloads.assignment(1, text="Grüße 你好"))
    try:
        await tool.deliver(sent)
    finally:
        await tool.stop()
        await runner.cleanup()
    [(body, headers)] = received
    assert body == encode_delivery(sent)
    assert headers["webhook-id"] == "d-1"
    assert Webhook(secret).verify(body, headers)["delivery_id"] == "d-1"
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body + b" ", headers)
    other = "whsec_" + base64.b64encode(b"another-key-of-24-bytes!").decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(body, headers)
    assert "X-Omnirouter-Signature" not in headers


def test_standard_signature_needs_a_whsec_secret() -> None:
    base = {"type": "webhook", "name": "h", "url": "https://x.example/h", "signature": "standard"}
    with pytest.raises(ValidationError, match="whsec_"):
        WebhookConfig(**base, secret="plain-secret")
    with pytest.raises(ValidationError, match="base64"):
        WebhookConfig(**base, secret="whsec_not base64!")


def test_example_config_block_loads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[1] / "config" / "omnirouter.example.toml"
    text = example.read_text(encoding="utf-8")
    block = text[text.index('# type = "chat"') : text.index("# A Slack app")]
    lines = [ln[2:] for ln in block.splitlines() if re.match(r"^# [a-z_]+ = ", ln)]
    monkeypatch.setenv("OMNIROUTER_CHAT_WEBHOOK_URL", "https://oapi.dingtalk.com/robot/send?x=1")
    monkeypatch.setenv("OMNIROUTER_CHAT_SIGNING_SECRET", "SECexample")
    path = tmp_path / "omnirouter.toml"
    path.write_text("[[adapters]]\n" + "\n".join(lines), encoding="utf-8")
    (tool,) = load_config(path).adapters
    assert tool.type == "chat" and tool.format == "dingtalk"
    assert tool.secret.get_secret_value() == "SECexample"


# -- the Slack app: buttons and signed callbacks -----------------------------------------

SIGNING = "8f742231b10e8888abcd99yyyzzz85a5"


@pytest.fixture
async def slack_app(
    services: ChatServices, tmp_path: Path
) -> AsyncIterator[tuple[SlackAppTool, list[AgentAction], str]]:
    port = free_port()
    config = SlackAppConfig(
        type="slack_app",
        name="slack",
        url=services.url("slack"),
        signing_secret=SIGNING,
        users={"U0ALICE": "alice"},
        callback_port=port,
    )
    tool = SlackAppTool(
        "slack", config, DriverContext(state_dir=tmp_path, log=structlog.get_logger())
    )
    got: list[AgentAction] = []

    async def sink(action: AgentAction) -> None:
        got.append(action)

    task = asyncio.create_task(tool.run(sink))
    await wait_for(lambda: tool.state == DriverState.CONNECTED)
    yield tool, got, f"http://127.0.0.1:{port}/slack/actions"
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await tool.stop()


def click(user: str, action_id: str, value: str) -> bytes:
    """Return the form body Slack posts when a user clicks a button."""
    payload = {
        "type": "block_actions",
        "user": {"id": user, "username": "someone"},
        "actions": [{"action_id": action_id, "value": value, "type": "button"}],
    }
    return urlencode({"payload": json.dumps(payload)}).encode()


async def post_signed(
    url: str, body: bytes, *, ts: int | None = None, secret: str = SIGNING
) -> int:
    """POST body to the callback as Slack does, signed; return the status."""
    stamp = str(int(time.time()) if ts is None else ts)
    signature = (
        "v0=" + hmac.new(secret.encode(), f"v0:{stamp}:".encode() + body, "sha256").hexdigest()
    )
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Slack-Request-Timestamp": stamp,
        "X-Slack-Signature": signature,
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=headers) as r,
    ):
        return r.status


async def test_slack_app_buttons_come_back_as_actions(
    slack_app: tuple[SlackAppTool, list[AgentAction], str], services: ChatServices
) -> None:
    tool, got, url = slack_app
    assert tool_sends_actions("slack_app") and not tool_sends_actions("chat")
    await tool.deliver(delivery(payloads.assignment(1)))
    [sent] = services.got
    [actions_block] = [b for b in sent.json["blocks"] if b["type"] == "actions"]
    accept, resolve = actions_block["elements"]
    assert (accept["action_id"], resolve["action_id"]) == ("accept", "resolve")
    assert await post_signed(url, click("U0ALICE", "accept", accept["value"])) == 200
    assert await post_signed(url, click("U0ALICE", "resolve", resolve["value"])) == 200
    assert [(a.agent_id, a.action, a.conversation_id, a.message_id, a.refused) for a in got] == [
        ("alice", "accept", "01J0001", "m-1", ""),
        ("alice", "resolve", "01J0001", "m-1", ""),
    ]


async def test_slack_app_rejects_forged_stale_and_unlinked_clicks(
    slack_app: tuple[SlackAppTool, list[AgentAction], str],
) -> None:
    _, got, url = slack_app
    value = json.dumps({"conversation_id": "01J0001", "message_id": "m-1"})
    body = click("U0ALICE", "accept", value)
    assert await post_signed(url, body, secret="wrong-secret") == 401
    assert await post_signed(url, body, ts=int(time.time()) - 301) == 401  # stale: a replay
    assert await post_signed(url, body, ts=int(time.time()) + 301) == 401
    assert await post_signed(url, click("U0MALLORY", "accept", value)) == 200  # not an agent
    assert await post_signed(url, b"payload=not-json") == 400
    assert got == []
    # A click the router cannot read is handed over refused, so the agent is told why.
    assert await post_signed(url, click("U0ALICE", "transfer-all", value)) == 200
    [refused] = got
    assert refused.agent_id == "alice" and refused.refused


def test_slack_signature_matches_slacks_documented_example() -> None:
    # The worked example in Slack's "Verifying requests from Slack" guide.
    body = (
        b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V"
        b"&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect"
        b"&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554"
        b"%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
    )
    expected = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"
    assert chat.slack_signature(SIGNING, "1531420618", body) == expected
    assert chat.verify_slack(SIGNING, "1531420618", body, expected, now=1531420618 + 10)
    assert not chat.verify_slack(SIGNING, "1531420618", body, expected, now=1531420618 + 301)
