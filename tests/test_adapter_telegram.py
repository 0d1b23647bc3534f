"""The Telegram agent tool against the Bot API emulator, driven by python-telegram-bot."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydantic import SecretStr, ValidationError

from adapters.telegram import TelegramTool, TelegramToolConfig, callback_data, verify_callback
from router.delivery import NoticePayload, WithdrawnPayload
from router.drivers import (
    ADAPTERS,
    AgentAction,
    Delivery,
    DriverContext,
    PermanentError,
    RateLimited,
    TransientError,
    load_driver,
)
from tests import payloads
from tests.peers import wait_until
from tests.peers_telegram import TOKEN, BotApiEmulator, Sent

GROUP = -100123
ALICE, BOB, STRANGER = 1001, 1002, 6666


@pytest.fixture
def api() -> Iterator[BotApiEmulator]:
    """Yield a running Bot API emulator."""
    with BotApiEmulator() as emulator:
        yield emulator


def make_tool(api: BotApiEmulator, tmp_path: Path, **config: Any) -> TelegramTool:
    """Return a tool for the emulator, posting to GROUP, with Alice and Bob known."""
    settings: dict[str, Any] = {
        "type": "telegram",
        "name": "tg-desk",
        "token": SecretStr(TOKEN),
        "chat_id": GROUP,
        "agents": {str(ALICE): "alice", str(BOB): "bob"},
        "base_url": api.base_url,
        "base_file_url": api.base_file_url,
        "poll_timeout": 1,
    }
    settings.update(config)
    ctx = DriverContext(state_dir=tmp_path, log=structlog.get_logger().bind(tool="t"))
    return TelegramTool("tg-desk", TelegramToolConfig(**settings), ctx)


def delivery(n: int = 1, agent: str = "alice", address: str = "", **kw: Any) -> Delivery:
    """Return an assignment delivery for message n."""
    payload = kw.pop("payload", None) or payloads.assignment(n, agent=agent, **kw)
    return Delivery(
        id=f"d-{n}-{agent}", target="tg-desk", agent_id=agent, address=address, payload=payload
    )


class Running:
    """A tool whose run() is a task, with the actions it handed over."""

    def __init__(self, tool: TelegramTool) -> None:
        self.tool = tool
        self.actions: list[AgentAction] = []
        self.task: asyncio.Task[None] | None = None

    async def sink(self, action: AgentAction) -> None:
        """Record an action (the router's sink)."""
        self.actions.append(action)


@pytest.fixture
async def running(api: BotApiEmulator, tmp_path: Path) -> AsyncIterator[Running]:
    """Yield a running tool; cancel and stop it afterwards."""
    r = Running(make_tool(api, tmp_path))
    r.task = asyncio.create_task(r.tool.run(r.sink))
    await wait_until(lambda: r.tool.state == "connected", 5)
    yield r
    r.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await r.task
    await r.tool.stop()


def buttons(sent: Sent) -> list[dict[str, Any]]:
    """Return the inline buttons of a sent message."""
    markup = sent.params.get("reply_markup") or {}
    return [b for row in markup.get("inline_keyboard", []) for b in row]


async def post(api: BotApiEmulator, tool: TelegramTool, d: Delivery) -> Sent:
    """Deliver d and return the (last) message the bot sent."""
    await tool.deliver(d)
    return api.sent[-1]


def test_registered_and_sends_actions() -> None:
    assert load_driver(ADAPTERS, "telegram") is TelegramTool
    assert TelegramTool.sends_actions is True


def test_config_refuses_bad_agent_keys() -> None:
    base = {"type": "telegram", "name": "t", "token": "1:a"}
    with pytest.raises(ValidationError):
        TelegramToolConfig(**base, agents={"alice": "alice"})
    with pytest.raises(ValidationError):
        TelegramToolConfig(**base, agents={"1": "a/b"})
    with pytest.raises(ValidationError):
        TelegramToolConfig(**{**base, "token": "bad token"})


def test_callback_data_is_short_and_signed() -> None:
    key = b"k" * 32
    data = callback_data(key, "a", 10**17)
    assert len(data.encode()) <= 64
    assert verify_callback(key, data) == ("accept", 10**17)
    assert verify_callback(b"x" * 32, data) is None
    assert verify_callback(key, data.replace("a:", "r:", 1)) is None
    assert verify_callback(key, "a:1") is None


async def test_assignment_in_group_with_buttons_and_accept(
    api: BotApiEmulator, running: Running
) -> None:
    text = "My order <b>never</b> arrived @channel *bold*"
    # The core fills an unset address with the agent id: the work goes to the group.
    sent = await post(api, running.tool, delivery(1, address="alice", text=text))
    assert sent.chat_id == GROUP
    assert "parse_mode" not in sent.params  # plain text: nothing is read as markup
    assert "<b>never</b>" in sent.text and "*bold*" in sent.text
    assert "@channel" not in sent.text  # a word joiner after @: no mention
    assert "T-01J0001" in sent.text and "for alice" in sent.text
    labels = [b["text"] for b in buttons(sent)]
    assert labels == ["Accept", "Resolve"]
    assert all(len(b["callback_data"].encode()) <= 64 for b in buttons(sent))

    api.press(sent, buttons(sent)[0]["callback_data"], ALICE)
    await wait_until(lambda: len(api.answers) == 1, 5)
    [action] = running.actions
    assert (action.agent_id, action.action) == ("alice", "accept")
    assert (action.conversation_id, action.message_id) == ("01J0001", "m-1")
    assert not action.refused
    assert "T-01J0001" in api.answers[0]["text"]
    await wait_until(lambda: not api.pending(), 5)  # confirmed after the sink returned


async def test_reply_and_commands_become_actions(api: BotApiEmulator, running: Running) -> None:
    sent = await post(api, running.tool, delivery(2))
    api.reply_to(sent, "Your parcel left today.\nSorry!", ALICE)
    api.reply_to(sent, "/transfer billing", ALICE)
    api.reply_to(sent, "/relabel@shop_help_bot inquiry", ALICE)
    api.reply_to(sent, "/resolve", ALICE)
    await wait_until(lambda: len(running.actions) == 4, 5)
    reply, transfer, relabel, resolve = running.actions
    assert (reply.action, reply.conversation_id) == ("reply", "01J0002")
    assert reply.value == "Your parcel left today.\nSorry!"
    assert (transfer.action, transfer.value) == ("transfer", "queue:billing")
    assert (relabel.action, relabel.value, relabel.message_id) == ("relabel", "inquiry", "m-2")
    assert (resolve.action, resolve.conversation_id, resolve.agent_id) == (
        "resolve",
        "01J0002",
        "alice",
    )
    assert not any(a.refused for a in running.actions)


async def test_presence_in_private_chat(api: BotApiEmulator, running: Running) -> None:
    api.send_text(ALICE, "/away")
    api.send_text(BOB, "/on")
    await wait_until(lambda: len(running.actions) == 2, 5)
    assert [(a.agent_id, a.action, a.value) for a in running.actions] == [
        ("alice", "presence", "away"),
        ("bob", "presence", "on"),
    ]


async def test_unknown_user_and_forged_data_not_applied(
    api: BotApiEmulator, running: Running
) -> None:
    sent = await post(api, running.tool, delivery(3))
    good = buttons(sent)[0]["callback_data"]
    api.press(sent, good, STRANGER)  # not an agent
    ref = good.split(":")[1]
    api.press(sent, f"r:{ref}:AAAAAAAAAAAAAAAA", ALICE)  # forged signature
    api.press(sent, f"a:{int(ref) + 1}:{good.split(':')[2]}", ALICE)  # another ref, old sig
    api.reply_to(sent, "hi there", STRANGER)
    await wait_until(lambda: len(api.answers) == 3 and not api.pending(), 5)
    assert running.actions == []
    assert running.tool.rejected == 4
    assert "not registered" in api.answers[0]["text"]
    assert "not valid" in api.answers[1]["text"]
    assert any("not registered" in s.text for s in api.sent_to(GROUP))


async def test_another_agents_ticket_goes_to_router_and_notice_is_posted(
    api: BotApiEmulator, running: Running
) -> None:
    sent = await post(api, running.tool, delivery(4, agent="alice"))
    api.press(sent, buttons(sent)[1]["callback_data"], BOB)
    await wait_until(lambda: len(running.actions) == 1, 5)
    # The router decides who holds the ticket; it refuses Bob and sends him a notice.
    assert (running.actions[0].agent_id, running.actions[0].action) == ("bob", "resolve")
    notice = NoticePayload(
        action="resolve",
        outcome="rejected",
        reason="you do not hold this conversation",
        conversation_id="01J0004",
    )
    await running.tool.deliver(delivery(5, agent="bob", payload=notice))
    assert "you do not hold this conversation" in api.sent[-1].text
    assert "for bob" in api.sent[-1].text and "T-01J0004" in api.sent[-1].text


async def test_private_chat_address_identifies_agent(api: BotApiEmulator, tmp_path: Path) -> None:
    tool = make_tool(api, tmp_path, agents={}, chat_id=None)
    r = Running(tool)
    await tool.deliver(delivery(6, agent="carol", address="4242"))
    sent = api.sent_to(4242)[-1]
    assert "for carol" not in sent.text
    task = asyncio.create_task(tool.run(r.sink))
    try:
        api.press(sent, buttons(sent)[0]["callback_data"], 4242)
        await wait_until(lambda: len(r.actions) == 1, 5)
        assert (r.actions[0].agent_id, r.actions[0].action) == ("carol", "accept")
        # Withdrawn work loses its buttons.
        gone = WithdrawnPayload("01J0006", ("m-6",), "not accepted in time")
        await tool.deliver(delivery(7, agent="carol", address="4242", payload=gone))
        assert api.markup_edits and int(api.markup_edits[0]["message_id"]) == sent.message_id
        assert "not accepted in time" in api.sent_to(4242)[-1].text
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await tool.stop()
    with pytest.raises(TransientError):  # stopped: the item stays in the outbox
        await tool.deliver(delivery(8, agent="carol", address="4242"))


async def test_no_group_and_no_address_is_permanent(api: BotApiEmulator, tmp_path: Path) -> None:
    tool = make_tool(api, tmp_path, chat_id=None)
    with pytest.raises(PermanentError):
        await tool.deliver(delivery(9))
    with pytest.raises(PermanentError):
        await tool.deliver(delivery(9, address="not-a-chat"))
    await tool.stop()


async def test_rate_limit_obeyed_and_long_text_split(api: BotApiEmulator, tmp_path: Path) -> None:
    tool = make_tool(api, tmp_path)
    api.rate_limits.append(7)
    with pytest.raises(RateLimited) as caught:
        await tool.deliver(delivery(10))
    assert 6 < caught.value.retry_after <= 7
    with pytest.raises(RateLimited):  # held without asking Telegram again
        await tool.deliver(delivery(11))
    assert api.send_calls == 1
    tool._paused_until = 0.0  # the pause has passed
    await tool.deliver(delivery(12, text="x" * 9000))
    parts = api.sent_to(GROUP)
    assert len(parts) == 3
    assert not buttons(parts[0]) and not buttons(parts[1]) and buttons(parts[2])
    api.blocked.add(GROUP)
    with pytest.raises(PermanentError):
        await tool.deliver(delivery(13))
    await tool.stop()


async def test_sink_failure_keeps_the_update(api: BotApiEmulator, tmp_path: Path) -> None:
    tool = make_tool(api, tmp_path)
    calls: list[AgentAction] = []

    async def failing(action: AgentAction) -> None:
        calls.append(action)
        raise RuntimeError("store down")

    api.send_text(ALICE, "/off")
    with pytest.raises(Exception, match="router failed"):
        await asyncio.wait_for(tool.run(failing), 5)
    assert len(calls) == 1 and api.pending()  # not confirmed: read again on the next run
    r = Running(tool)
    task = asyncio.create_task(tool.run(r.sink))
    try:
        await wait_until(lambda: len(r.actions) == 1 and not api.pending(), 5)
        assert r.actions[0].value == "off"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await tool.stop()


def test_the_commented_example_block_is_valid_when_uncommented(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from router.config import load_config

    example = Path(__file__).resolve().parents[1] / "config" / "omnirouter.example.toml"
    text = example.read_text(encoding="utf-8")
    start = text.index('# name = "agents-tg"') - len('# type = "telegram"\n')
    block = text[start : text.index("# --- Agents")]
    lines = [line[2:] for line in block.splitlines() if re.match(r"^# [a-z_]+ = ", line)]
    toml = "[[adapters]]\n" + "\n".join(lines) + '\n[[agents]]\nid = "alice"\ntool = "agents-tg"\n'
    monkeypatch.setenv("OMNIROUTER_TELEGRAM_AGENTS_TOKEN", "123456:example")
    path = tmp_path / "omnirouter.toml"
    path.write_text(toml, encoding="utf-8")
    (tool,) = load_config(path).adapters
    assert tool.type == "telegram" and tool.chat_id == -1001234567890
    assert tool.agents["123456789"] == "alice"


# -- end to end through the daemon ---------------------------------------------------------

AGENTS_TOKEN = "654321:AGENTS-token_for-the-emulator"


@pytest.mark.slow
def test_round_trip_customer_telegram_to_agents_group_and_back(tmp_path: Path) -> None:
    """A customer's Telegram message reaches the agents' group; the agent's reply returns."""
    from tests.daemon_harness import DaemonProcess, base_config, http, ports
    from tests.test_daemon_e2e import poll

    with BotApiEmulator() as customers, BotApiEmulator(token=AGENTS_TOKEN) as agents:
        state = tmp_path / "state"
        web_port, ops_port = ports()
        channel = (
            f'[[channels]]\ntype = "telegram"\nname = "tg"\ntoken = "{TOKEN}"\n'
            f'base_url = "{customers.base_url}"\nbase_file_url = "{customers.base_file_url}"\n'
            "poll_timeout = 2\ntimeout = 5\n"
        )
        adapters = (
            f'[[adapters]]\ntype = "telegram"\nname = "agents-tg"\ntoken = "{AGENTS_TOKEN}"\n'
            f'base_url = "{agents.base_url}"\nbase_file_url = "{agents.base_file_url}"\n'
            f'chat_id = {GROUP}\nagents = {{ "{ALICE}" = "alice" }}\npoll_timeout = 2\n'
        )
        roster = '[[agents]]\nid = "alice"\ncapacity = 5\ntool = "agents-tg"\nskills = ["en"]\n'
        config = base_config(
            state,
            web_port=web_port,
            ops_port=ops_port,
            adapters=adapters,
            agents=roster,
            extra=channel,
        )
        d = DaemonProcess(tmp_path, config)
        d.start()
        try:
            ops = f"http://127.0.0.1:{ops_port}"
            poll(lambda: http("GET", ops + "/readyz")[0] == 200, within=20, what="/readyz")
            customer = 777
            customers.send_text(customer, "Hello, my order 4711 has not arrived <b>@all</b>")
            work = poll(
                lambda: [s for s in agents.sent_to(GROUP) if buttons(s)],
                within=20,
                what="the assignment in the agents' group",
            )[0]
            assert "order 4711" in work.text and "<b>" in work.text and "for alice" in work.text

            agents.press(work, buttons(work)[0]["callback_data"], ALICE)
            poll(lambda: agents.answers, what="the answered button press")
            agents.reply_to(work, "Your parcel left today.", ALICE)
            poll(
                lambda: any(s.text == "Your parcel left today." for s in customers.sent_to(777)),
                within=20,
                what="the agent's reply in the customer's chat",
            )
            before = len(customers.sent_to(customer))
            agents.reply_to(work, "/resolve", ALICE)
            # Resolving asks the customer the satisfaction question.
            poll(
                lambda: len(customers.sent_to(customer)) > before,
                within=20,
                what="the survey question after /resolve",
            )
            # Every agent update was confirmed once the router had taken its action.
            poll(lambda: not agents.pending(), within=10, what="agents' updates confirmed")
        finally:
            d.close()
            print(d.log_text()[-6000:])
