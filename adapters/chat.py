"""Chat agent tool: each delivery as a message in the team chat, via its incoming webhook.

One tool, one `format` per config block: `slack`, `mattermost`, `teams` (Adaptive Card),
`wecom` (企业微信 group robot), `dingtalk` (钉钉 robot, signed URL) or `feishu` (飞书/Lark
bot, signed body). A delivery becomes a `Card` (title, facts, customer text), and the
format's renderer turns the card into the JSON that service's incoming webhook takes.

Everything that did not come from us (customer text, contact, subject, reasons, alert
values) goes through the format's escaping function, so a customer cannot mention
`@all`, ping `<!channel>`, hide a link or inject markup. The customer text is cut to fit
the service's size limit, with "… (truncated, N characters)" where N is how many were
left out; the ticket and the SLA deadline sit in the title and facts, which are never cut.

HTTP, error mapping and the circuit breaker are the webhook tool's (`HttpPostTool`);
this module adds only rendering, signing and reading the services that report errors
inside an HTTP 200 answer (WeCom, DingTalk, Feishu, legacy Teams connectors).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qs, quote_plus

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from adapters.webhook import HttpPostTool, check_url, safe_url, url_for
from router.actions import ActionError, parse_action
from router.delivery import AlertPayload, AssignmentPayload, NoticePayload, WithdrawnPayload
from router.drivers import (
    NAME_RE,
    ActionSink,
    Delivery,
    DriverContext,
    PermanentError,
    RateLimited,
    TransientError,
)
from router.model import ticket_number

Format = Literal["slack", "mattermost", "teams", "wecom", "dingtalk", "feishu"]
FORMATS: tuple[str, ...] = ("slack", "mattermost", "teams", "wecom", "dingtalk", "feishu")

# Size limits of each service, as documented by it (characters or UTF-8 bytes).
SLACK_SECTION_CHARS = 3000  # a section block's text
SLACK_HEADER_CHARS = 150  # a header block's text
MATTERMOST_CHARS = 16383  # a post's message (the server default)
TEAMS_BYTES = 28000  # the whole request body
WECOM_BYTES = 4096  # markdown.content
DINGTALK_BYTES = 20000  # the whole request body
FEISHU_BYTES = 20000  # the whole request body (20 KB)

# How long the services ask us to wait once over their limit (their documented windows).
WECOM_RETRY_AFTER = 60.0  # 20 messages a minute per robot
DINGTALK_RETRY_AFTER = 600.0  # over 20 a minute: the robot is throttled for 10 minutes
FEISHU_RETRY_AFTER = 60.0  # 100 a minute, 5 a second per bot
TEAMS_RETRY_AFTER = 30.0

_FACT_CHARS = 200  # a fact value (subject, contact, reason) is clipped to this much
_FACT_CHARS_TIGHT = 40  # ... and to this when the card would not fit otherwise
_MAX_FACTS = 10  # Slack allows 10 fields per section; alerts with more keys are clipped
_SNIPPET = 200

# Characters that render as nothing or reorder text: they can hide a mention or a link
# ("@\u200ball") from a reviewer, so they are dropped before escaping.
_INVISIBLE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff]"
)
# "@" that starts a word: a mention in Mattermost (@channel), WeCom/DingTalk/Feishu (@all).
_MENTION_AT = re.compile(r"(?<![\w.+-])@")
# CommonMark punctuation a backslash makes literal (Mattermost, Teams). Only what opens
# markup: with [ and ] escaped "(url)" and "!" are plain, and ticket numbers and
# timestamps keep their "-" and "+" (escaped only where they would start a list).
_MD_SPECIAL = re.compile(r"([\\`*_\[\]#|~<>])")
_MD_LIST = re.compile(r"^([ \t]*)([-+])", re.MULTILINE)
# Where markdown has no reliable escape (WeCom, DingTalk, Feishu lark_md), markup
# characters become their full-width forms: readable, and never markup.
_FULLWIDTH = str.maketrans(
    {
        "<": "＜",
        ">": "＞",
        "*": "＊",
        "_": "＿",
        "`": "｀",
        "[": "［",
        "]": "］",
        "#": "＃",
        "~": "～",
        "|": "｜",
        "&": "＆",
    }
)


def clean(text: str) -> str:
    """Drop control and invisible characters (keep newlines and tabs)."""
    return _INVISIBLE.sub("", text)


def escape_slack(text: str) -> str:
    """Escape text for Slack: the three characters Slack documents (&, <, >) as entities."""
    # With <, > escaped no <!here>, <@U123> or <http://x|y> can form; the text goes in
    # plain_text objects, so *bold* and _italic_ stay literal too.
    return clean(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def escape_mattermost(text: str) -> str:
    """Escape text for Mattermost markdown: backslash markup, entities, break @mentions."""
    text = _md_escape(clean(text).replace("&", "&amp;"))
    text = text.replace("\\<", "&lt;").replace("\\>", "&gt;")
    # A full-width at sign reads the same and notifies nobody (@channel, @all, @bob).
    return _MENTION_AT.sub("＠", text)


def escape_teams(text: str) -> str:
    """Escape text for a Teams Adaptive Card TextBlock: backslash every markdown character."""
    # <at>…</at> mentions need an entity list we never send, and \< keeps them inert anyway.
    return _md_escape(clean(text))


def _md_escape(text: str) -> str:
    """Backslash-escape the markdown characters that open markup."""
    return _MD_LIST.sub(r"\1\\\2", _MD_SPECIAL.sub(r"\\\1", text))


def _neutralise(text: str) -> str:
    """Replace markup characters with full-width forms and break @mentions."""
    return _MENTION_AT.sub("＠", clean(text).translate(_FULLWIDTH))


def escape_wecom(text: str) -> str:
    """Escape text for WeCom markdown: no <@userid>, <font>, links, emphasis or @all."""
    return _neutralise(text)


def escape_dingtalk(text: str) -> str:
    """Escape text for DingTalk markdown: no links, emphasis, HTML or @mentions."""
    return _neutralise(text)


def escape_feishu(text: str) -> str:
    """Escape text for Feishu lark_md: no <at>, links, emphasis or @all."""
    return _neutralise(text)


def dingtalk_sign(secret: str, timestamp_ms: int) -> str:
    """Return DingTalk's URL-encoded `sign`: base64 HMAC-SHA256(secret, "<ts>\\n<secret>")."""
    mac = hmac.new(secret.encode(), f"{timestamp_ms}\n{secret}".encode(), hashlib.sha256)
    return quote_plus(base64.b64encode(mac.digest()))


def feishu_sign(secret: str, timestamp: int) -> str:
    """Return Feishu's `sign`: base64 HMAC-SHA256 keyed with "<ts>\\n<secret>" over nothing."""
    mac = hmac.new(f"{timestamp}\n{secret}".encode(), b"", hashlib.sha256)
    return base64.b64encode(mac.digest()).decode("ascii")


# -- the card: what a delivery says, before any format ---------------------------------


@dataclass(frozen=True, slots=True)
class Card:
    """One delivery as a chat message: our words in labels, untrusted values anywhere else."""

    title: str  # always holds the ticket when there is one
    facts: tuple[tuple[str, str], ...]  # (label, value); labels are ours, values untrusted
    text: str = ""  # the customer's text: the only part cut to fit
    urgent: bool = False  # P0/P1 assignments and alerts: a warning colour where supported


def card_for(delivery: Delivery) -> Card:
    """Return the card for a delivery of any kind."""
    p = delivery.payload
    if isinstance(p, AssignmentPayload):
        m, c, r = p.message, p.classification, p.routing
        who = f"{m.contact.name} ({m.contact.handle})" if m.contact.name else m.contact.handle
        facts = [("Respond by", r.sla_deadline), ("From", who), ("Channel", m.channel)]
        facts += [("Queue", r.queue), ("Language", m.language)]
        if m.subject:
            facts.append(("Subject", m.subject))
        return Card(
            title=f"New {c.label} ({c.severity}) · {ticket_number(p.conversation_id)}",
            facts=tuple(facts),
            text=m.text,
            urgent=c.severity in ("P0", "P1"),
        )
    if isinstance(p, WithdrawnPayload):
        return Card(
            title=f"Withdrawn · {ticket_number(p.conversation_id)}",
            facts=(("Reason", p.reason), ("Messages", str(len(p.message_ids)))),
        )
    if isinstance(p, NoticePayload):
        ticket = ticket_number(p.conversation_id) if p.conversation_id else ""
        return Card(
            title=f"Not applied: {p.action}" + (f" · {ticket}" if ticket else ""),
            facts=(("Outcome", p.outcome), ("Reason", p.reason)),
        )
    if isinstance(p, AlertPayload):
        alert = dict(p.alert)
        kind = str(alert.pop("kind", "alert"))
        ticket = str(alert.pop("ticket", ""))
        return Card(
            title=f"Alert: {kind}" + (f" · {ticket}" if ticket else ""),
            facts=tuple((str(k), _fact_value(v)) for k, v in alert.items())[:_MAX_FACTS],
            urgent=True,
        )
    raise PermanentError(f"chat: cannot render a {delivery.kind!r} delivery")


def _fact_value(value: object) -> str:
    """Return an alert value as text (JSON for lists and objects)."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def _clip(text: str, limit: int) -> str:
    """Return text cut to limit characters, with an ellipsis when cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- renderers: a card as each service's webhook body ----------------------------------


def _truncation_note(cut: int) -> str:
    """Return the note that ends a cut text: how many characters were left out."""
    return f"… (truncated, {cut} characters)"


def render_slack(card: Card) -> dict[str, Any]:
    """Return a Slack incoming-webhook body: plain_text blocks only, nothing parsed."""
    esc = escape_slack
    blocks: list[dict[str, Any]] = [
        {
            "type": "header",
            "text": {"type": "plain_text", "text": _clip(esc(card.title), SLACK_HEADER_CHARS)},
        }
    ]
    if card.facts:  # Slack refuses a section with no fields
        fields = [
            {"type": "plain_text", "text": f"{label}: {esc(value)}", "emoji": False}
            for label, value in card.facts
        ]
        blocks.append({"type": "section", "fields": fields})
    if card.text:
        blocks.append(
            {
                "type": "section",
                "text": {"type": "plain_text", "text": esc(card.text), "emoji": False},
            }
        )
    # `text` is the notification and fallback; mrkdwn off so it is shown as it stands.
    return {"text": esc(card.title), "mrkdwn": False, "blocks": blocks}


def render_mattermost(card: Card) -> dict[str, Any]:
    """Return a Mattermost incoming-webhook body: one markdown `text`."""
    esc = escape_mattermost
    lines = [f"#### {esc(card.title)}"]
    lines += [f"**{label}:** {esc(value)}" for label, value in card.facts]
    if card.text:
        lines += ["", esc(card.text)]
    return {"text": "\n".join(lines)}


def render_teams(card: Card) -> dict[str, Any]:
    """Return a Teams webhook body: a message with one Adaptive Card (1.4)."""
    esc = escape_teams
    body: list[dict[str, Any]] = [
        {
            "type": "TextBlock",
            "text": esc(card.title),
            "weight": "Bolder",
            "size": "Medium",
            "wrap": True,
            "color": "Attention" if card.urgent else "Default",
        },
        {
            "type": "FactSet",
            "facts": [{"title": label, "value": esc(value)} for label, value in card.facts],
        },
    ]
    if card.text:
        body.append({"type": "TextBlock", "text": esc(card.text), "wrap": True})
    return {
        "type": "message",
        "attachments": [
            {
                "contentType": "application/vnd.microsoft.card.adaptive",
                "content": {
                    "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                    "type": "AdaptiveCard",
                    "version": "1.4",
                    "body": body,
                },
            }
        ],
    }


def _markdown_lines(card: Card, esc: Callable[[str], str]) -> str:
    """Return the card as the simple markdown WeCom and DingTalk render."""
    lines = [f"### {esc(card.title)}"]
    lines += [f"> **{label}:** {esc(value)}  " for label, value in card.facts]
    if card.text:
        # Two trailing spaces: a hard line break in markdown, as the customer wrote it.
        lines += ["", esc(card.text).replace("\n", "  \n")]
    return "\n".join(lines)


def render_wecom(card: Card) -> dict[str, Any]:
    """Return a WeCom group-robot body: msgtype markdown."""
    return {"msgtype": "markdown", "markdown": {"content": _markdown_lines(card, escape_wecom)}}


def render_dingtalk(card: Card) -> dict[str, Any]:
    """Return a DingTalk robot body: msgtype markdown (its title is the notification)."""
    return {
        "msgtype": "markdown",
        "markdown": {
            "title": escape_dingtalk(card.title),
            "text": _markdown_lines(card, escape_dingtalk),
        },
    }


def render_feishu(card: Card) -> dict[str, Any]:
    """Return a Feishu/Lark bot body: msg_type interactive (a message card)."""
    esc = escape_feishu
    elements: list[dict[str, Any]] = [
        {
            "tag": "div",
            "fields": [
                {"is_short": True, "text": {"tag": "lark_md", "content": f"**{label}**\n{esc(v)}"}}
                for label, v in card.facts
            ],
        }
    ]
    if card.text:
        elements.append({"tag": "div", "text": {"tag": "plain_text", "content": esc(card.text)}})
    return {
        "msg_type": "interactive",
        "card": {
            "config": {"wide_screen_mode": True},
            "header": {
                "title": {"tag": "plain_text", "content": esc(card.title)},
                "template": "red" if card.urgent else "blue",
            },
            "elements": elements,
        },
    }


def _body_bytes(body: dict[str, Any]) -> int:
    """Return the size of body on the wire."""
    return len(encode(body))


def _fits_slack(body: dict[str, Any]) -> bool:
    """Tell whether every section text is within Slack's 3000 characters."""
    return all(
        len(block["text"]["text"]) <= SLACK_SECTION_CHARS
        for block in body["blocks"]
        if block["type"] == "section" and "text" in block
    )


_FORMATS: dict[str, tuple[Callable[[Card], dict[str, Any]], Callable[[dict[str, Any]], bool]]] = {
    "slack": (render_slack, _fits_slack),
    "mattermost": (render_mattermost, lambda b: len(b["text"]) <= MATTERMOST_CHARS),
    "teams": (render_teams, lambda b: _body_bytes(b) <= TEAMS_BYTES),
    "wecom": (render_wecom, lambda b: len(b["markdown"]["content"].encode()) <= WECOM_BYTES),
    "dingtalk": (render_dingtalk, lambda b: _body_bytes(b) <= DINGTALK_BYTES),
    # Room for the timestamp and sign added to a Feishu body after rendering.
    "feishu": (render_feishu, lambda b: _body_bytes(b) <= FEISHU_BYTES - 128),
}


def encode(body: dict[str, Any]) -> bytes:
    """Return the request body as compact UTF-8 JSON."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def render(fmt: str, card: Card) -> dict[str, Any]:
    """Return the card as fmt's webhook body, cutting the customer text to fit its limit."""
    draw, fits = _FORMATS[fmt]
    card = _clip_facts(card, _FACT_CHARS)
    body = draw(card)
    if fits(body):
        return body
    if not fits(draw(_with_text(card, ""))):
        card = _clip_facts(card, _FACT_CHARS_TIGHT)
        if not fits(draw(_with_text(card, ""))):
            raise PermanentError(f"chat: a {fmt} message cannot fit even without the text")
    # The longest prefix that fits with the note: binary search over characters kept.
    text, low, high = card.text, 0, len(card.text)
    while low < high:
        mid = (low + high + 1) // 2
        if fits(draw(_with_text(card, _cut(text, mid)))):
            low = mid
        else:
            high = mid - 1
    return draw(_with_text(card, _cut(text, low)))


def _cut(text: str, keep: int) -> str:
    """Return the first keep characters of text and the truncation note."""
    return text[:keep].rstrip() + "\n" + _truncation_note(len(text) - keep)


def _with_text(card: Card, text: str) -> Card:
    """Return card with another customer text."""
    return Card(card.title, card.facts, text, card.urgent)


def _clip_facts(card: Card, limit: int) -> Card:
    """Return card with its title and fact values clipped to limit characters."""
    facts = tuple((label, _clip(value, limit)) for label, value in card.facts)
    return Card(_clip(card.title, limit), facts, card.text, card.urgent)


# -- the tool --------------------------------------------------------------------------


class ChatConfig(BaseModel):
    """Settings of one chat adapter (one incoming webhook format)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["chat"]
    name: str = Field(pattern=NAME_RE)
    format: Format
    # The incoming-webhook URL holds the credential (Slack's path, WeCom's key=,
    # DingTalk's access_token=), so it is a secret: `${ENV}` or `file:` in the config,
    # masked in `config show`. {agent_id}/{address} are substituted as for `webhook`,
    # and an agent whose address is a full http(s) URL gets messages there.
    url: SecretStr
    # DingTalk "加签" / Feishu "签名校验" secret; only those two sign.
    secret: SecretStr | None = None
    timeout: float = Field(default=10.0, gt=0, le=300)
    max_connections: int = Field(default=10, ge=1, le=1000)
    breaker_threshold: int = Field(default=5, ge=1, le=1000)
    breaker_probe_min: float = Field(default=0.5, gt=0, le=60)
    breaker_probe_max: float = Field(default=30.0, gt=0, le=3600)

    @field_validator("url")
    @classmethod
    def _url(cls, value: SecretStr) -> SecretStr:
        """Accept only http(s) URLs with a host (the message never shows the URL)."""
        try:
            check_url(value.get_secret_value())
        except ValueError as exc:
            raise ValueError(f"url: {exc}") from None
        return value

    @model_validator(mode="after")
    def _checks(self) -> ChatConfig:
        """Allow a secret only where the service signs; keep probe bounds ordered."""
        if self.secret is not None and self.format not in ("dingtalk", "feishu"):
            raise ValueError(f"secret is only for dingtalk and feishu, not {self.format}")
        if self.breaker_probe_min > self.breaker_probe_max:
            raise ValueError("breaker_probe_min must not exceed breaker_probe_max")
        return self


class ChatTool(HttpPostTool):
    """Post each delivery as a chat message through the format's incoming webhook."""

    config_model: ClassVar[type[ChatConfig]] = ChatConfig
    sends_actions = False  # outgoing only: its agents hold work at once

    def __init__(self, name: str, config: ChatConfig, ctx: DriverContext) -> None:
        """Prepare the tool; the HTTP session is created on first use."""
        super().__init__(name, config, ctx, {})
        self.config = config
        self._url = config.url.get_secret_value()
        self._secret = config.secret.get_secret_value() if config.secret else ""

    async def deliver(self, delivery: Delivery) -> None:
        """Render the delivery for the chat service and POST it; raise by the taxonomy."""
        if self._stopped:
            raise TransientError(f"chat {self.name} is stopped")
        url = url_for(self._url, delivery)
        body = self._render(delivery)
        if self._secret and self.config.format == "dingtalk":
            ms = int(self.clock() * 1000)  # DingTalk signs milliseconds, within an hour
            sep = "&" if "?" in url else "?"
            url = f"{url}{sep}timestamp={ms}&sign={dingtalk_sign(self._secret, ms)}"
        elif self._secret and self.config.format == "feishu":
            ts = int(self.clock())  # Feishu signs seconds, in the body
            body = {"timestamp": str(ts), "sign": feishu_sign(self._secret, ts), **body}
        try:
            data = encode(body)
        except ValueError as exc:
            raise PermanentError(f"chat: message is not JSON-serialisable: {exc}") from None
        await self._post(url, data, {})

    def _render(self, delivery: Delivery) -> dict[str, Any]:
        """Return the webhook body for a delivery in this tool's format."""
        return render(self.config.format, card_for(delivery))

    def _check_answer(self, url: str, answer: bytes) -> None:
        """Raise when a 2xx answer reports an error (WeCom, DingTalk, Feishu, Teams)."""
        fmt = self.config.format
        where = safe_url(url)
        if fmt == "teams":
            _check_teams(where, answer)
        elif fmt in ("wecom", "dingtalk", "feishu"):
            _check_json_code(fmt, where, answer)


def _check_teams(where: str, answer: bytes) -> None:
    """Raise for a legacy connector's 200 "Microsoft Teams endpoint returned HTTP error N"."""
    text = answer[:_SNIPPET].decode("utf-8", "replace")
    found = re.search(r"returned HTTP error (\d{3})", text)
    if found is None:
        return  # "1" (connector) or an empty 202 (Workflows): accepted
    status = int(found.group(1))
    message = f"chat teams {where} answered 200 reporting HTTP {status}"
    if status == 429:
        raise RateLimited(message, TEAMS_RETRY_AFTER)
    if status >= 500 or status in (408, 425):
        raise TransientError(message)
    raise PermanentError(message)


def _check_json_code(fmt: str, where: str, answer: bytes) -> None:
    """Raise for a non-zero errcode/code/StatusCode in the JSON a robot answers with."""
    try:
        result = json.loads(answer)
    except ValueError:
        result = None
    if not isinstance(result, dict):
        raise PermanentError(f"chat {fmt} {where} answered 2xx without a JSON result")
    code = result.get("errcode", result.get("code", result.get("StatusCode")))
    if code == 0:
        return
    if not isinstance(code, int):
        raise PermanentError(f"chat {fmt} {where} answered 2xx without an error code")
    raw = result.get("errmsg", result.get("msg", result.get("StatusMessage", "")))
    text = "".join(c if c.isprintable() else " " for c in str(raw)[:_SNIPPET])
    message = f"chat {fmt} {where} answered error {code}: {text}"
    if code == -1:  # all three: "system busy"
        raise TransientError(message)
    if fmt == "wecom" and code == 45009:  # api freq out of limit
        raise RateLimited(message, WECOM_RETRY_AFTER)
    if fmt == "dingtalk" and code == 130101:  # send too fast
        raise RateLimited(message, DINGTALK_RETRY_AFTER)
    if fmt == "feishu" and code == 11232:  # frequency limited
        raise RateLimited(message, FEISHU_RETRY_AFTER)
    raise PermanentError(message)


# -- Slack app: buttons and signed interactive callbacks -------------------------------

SLACK_TOLERANCE = 300  # seconds: Slack's advice; older requests are replays
SLACK_BUTTONS = (("accept", "Accept", "primary"), ("resolve", "Resolve", None))
_SLACK_MAX_BODY = 64 * 1024


def slack_signature(signing_secret: str, timestamp: str, body: bytes) -> str:
    """Return Slack's `X-Slack-Signature`: "v0=" + hex HMAC-SHA256 of "v0:<ts>:<body>"."""
    base = f"v0:{timestamp}:".encode() + body
    return "v0=" + hmac.new(signing_secret.encode(), base, hashlib.sha256).hexdigest()


def verify_slack(
    signing_secret: str, timestamp: str, body: bytes, signature: str, now: float
) -> bool:
    """Return True if the request is signed with the secret and at most 5 minutes old."""
    if not timestamp.isdigit() or abs(now - int(timestamp)) > SLACK_TOLERANCE:
        return False
    expected = slack_signature(signing_secret, timestamp, body)
    return hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace"))


class SlackAppConfig(ChatConfig):
    """Settings of a Slack app: the chat tool's Slack format plus buttons that act."""

    type: Literal["slack_app"]  # type: ignore[assignment]
    format: Literal["slack"] = "slack"
    # The app's "Signing Secret" (Basic Information): Slack signs every callback with it.
    signing_secret: SecretStr = Field(min_length=1)
    # Slack user id → agent id: who a click acts as. Clicks by anyone else are ignored,
    # so a colleague in the channel cannot accept Alice's work as Alice.
    users: dict[str, str] = Field(default_factory=dict)
    # Where the listener for the app's Interactivity "Request URL" binds (behind TLS).
    callback_host: str = "127.0.0.1"
    callback_port: int = Field(default=8790, ge=1, le=65535)
    callback_path: str = Field(default="/slack/actions", pattern=r"^/[A-Za-z0-9/_.-]*$")


class SlackAppTool(ChatTool):
    """The Slack format with Accept/Resolve buttons; clicks come back as agent actions."""

    config_model: ClassVar[type[ChatConfig]] = SlackAppConfig
    sends_actions = True  # agents accept and resolve with the buttons

    def __init__(self, name: str, config: SlackAppConfig, ctx: DriverContext) -> None:
        """Prepare the tool; the listener starts in run()."""
        super().__init__(name, config, ctx)
        self.app_config = config
        self._signing = config.signing_secret.get_secret_value()

    def _render(self, delivery: Delivery) -> dict[str, Any]:
        """Return the Slack body, with Accept/Resolve buttons on an assignment."""
        body = super()._render(delivery)
        p = delivery.payload
        if isinstance(p, AssignmentPayload):
            value = json.dumps({"conversation_id": p.conversation_id, "message_id": p.message.id})
            buttons = []
            for action_id, label, style in SLACK_BUTTONS:
                button: dict[str, Any] = {
                    "type": "button",
                    "action_id": action_id,
                    "text": {"type": "plain_text", "text": label},
                    "value": value,
                }
                if style:
                    button["style"] = style
                buttons.append(button)
            body["blocks"].append({"type": "actions", "elements": buttons})
        return body

    async def run(self, actions: ActionSink) -> None:
        """Listen for Slack's signed callbacks and probe the webhook until cancelled."""
        cfg = self.app_config
        where = (cfg.callback_host, cfg.callback_port, cfg.callback_path)
        await self._run_with_callbacks(actions, where, _SLACK_MAX_BODY, self._callback)

    async def _callback(self, request: web.Request, actions: ActionSink) -> web.Response:
        """Verify one interactive callback and hand its button clicks to the router."""
        body = await request.read()
        ok = verify_slack(
            self._signing,
            request.headers.get("X-Slack-Request-Timestamp", ""),
            body,
            request.headers.get("X-Slack-Signature", ""),
            self.clock(),
        )
        if not ok:
            self.log.warning("chat.callback_rejected", reason="bad or stale signature")
            return web.Response(status=401, text="bad signature")
        try:
            form = parse_qs(body.decode("utf-8"), strict_parsing=True)
            payload = json.loads(form["payload"][0])
            user = str(payload["user"]["id"])
            clicks = [a for a in payload.get("actions", []) if isinstance(a, dict)]
        except (ValueError, KeyError, TypeError, IndexError):
            return web.Response(status=400, text="not a Slack interaction payload")
        agent_id = self.app_config.users.get(user)
        if agent_id is None:
            # Not linked to an agent: nobody to act as, and nobody to tell in the router.
            self.log.warning("chat.callback_unknown_user", slack_user=user)
            return web.Response(status=200)
        for click in clicks:
            try:
                value = json.loads(str(click.get("value", "")))
                raw = json.dumps({**value, "action": click.get("action_id")}).encode()
                action = parse_action(agent_id, raw)
            except ActionError as exc:
                action = exc.as_action(agent_id)
            except (ValueError, TypeError):
                action = ActionError("button value is not an action").as_action(agent_id)
            await actions(action)
        # Slack wants an answer within 3 s; the outcome reaches the agent as a notice.
        return web.Response(status=200)
