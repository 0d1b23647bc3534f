"""The `omnirouter` command.

omnirouter run [--config FILE]            run the daemon (embedded defaults without --config)
omnirouter config check FILE [--show]     validate a config; exit 11 when invalid
omnirouter send TEXT [--contact …]        post a message to the local web channel
omnirouter dead-letters list|replay       inspect and resend deliveries that gave up
omnirouter agents | queues                what the running daemon sees (ops API)
omnirouter presence AGENT on|off          take an agent in or out of rotation
omnirouter explain MESSAGE_ID             why a message was labelled and routed as it was
omnirouter ticket history T-…             a ticket's audit: every transition, who and when
omnirouter classify                       JSON lines in, one verdict per line out
omnirouter classifier train|eval|corrections  train, evaluate, export agents' relabels
omnirouter migrate                        bring the store's schema up to date and exit
omnirouter store copy --from SRC --to DST  copy a whole store into an empty one (e.g. to PostgreSQL)
omnirouter simulate [generate|check] …    drive the real scheduler on a virtual clock
omnirouter staffing [--trace FILE]        agents each hour needs for its SLA (Erlang C) vs on shift

Every subcommand is declared once, next to its handler: `group("dead-letters", …)`
for a parent, `@command("dead-letters list", help, arguments)` for a handler, where
`arguments` adds the command's own options to its parser; `build_parser()` builds
argparse from that table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from router import __version__
from router.config import Config, ConfigError, load_config
from router.daemon import (
    EXIT_BAD_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    open_store,
    run_daemon,
)
from router.drivers import CHANNELS, load_driver

T = TypeVar("T")
Handler = Callable[[argparse.Namespace], int]
Arguments = Callable[[argparse.ArgumentParser], None]


# -- declaring subcommands ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Command:
    """One subcommand: a leaf with a handler, or a group whose subcommands are required."""

    path: tuple[str, ...]  # ("dead-letters", "list") for `omnirouter dead-letters list`
    help: str
    arguments: Arguments | None = None  # adds the command's own arguments to its parser
    handler: Handler | None = None  # None for a group
    config: bool = False  # takes -c/--config
    # The handler parses its own arguments (given as args.rest), e.g. a tool's own CLI.
    passthrough: bool = False
    description: str | None = None


# Every subcommand, parents before children, in the order `--help` lists them.
COMMANDS: dict[tuple[str, ...], Command] = {}


def _register(cmd: Command) -> None:
    """Add a command to COMMANDS; a duplicate or an orphan is a programming error."""
    if cmd.path in COMMANDS:
        raise ValueError(f"omnirouter {' '.join(cmd.path)} is declared twice")
    parent = COMMANDS.get(cmd.path[:-1])
    if len(cmd.path) > 1 and (parent is None or parent.handler is not None):
        raise ValueError(f"omnirouter {' '.join(cmd.path[:-1])} is not a declared group")
    COMMANDS[cmd.path] = cmd


def group(name: str, help: str, *, description: str | None = None) -> None:
    """Declare a command group such as `config` (its subcommands are declared after it)."""
    _register(Command(tuple(name.split()), help, description=description))


def command(
    name: str,
    help: str,
    arguments: Arguments | None = None,
    *,
    config: bool = False,
    passthrough: bool = False,
    description: str | None = None,
) -> Callable[[Handler], Handler]:
    """Declare the decorated function as the handler of `omnirouter NAME` ("group sub")."""

    def register(handler: Handler) -> Handler:
        _register(
            Command(
                tuple(name.split()),
                help,
                arguments,
                handler,
                config=config,
                passthrough=passthrough,
                description=description,
            )
        )
        return handler

    return register


def _load(path: str | None, *, secrets: bool = True) -> Config:
    try:
        return load_config(Path(path) if path else None, secrets=secrets)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        raise SystemExit(EXIT_BAD_CONFIG) from None


def _configure_logging(config: Config, fmt: str | None) -> None:
    from router.logging import configure_logging

    configure_logging(
        config.daemon.log_level,
        json=None if fmt in (None, "auto") else fmt == "json",
        log_bodies=config.daemon.log_bodies,
    )


def _run(coro: Coroutine[Any, Any, T], event_loop: str = "asyncio") -> T:
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if event_loop == "uvloop":
                coro.close()
                raise SystemExit(
                    'daemon.event_loop = "uvloop" but uvloop is not installed (pip install uvloop)'
                ) from None
        else:
            return uvloop.run(coro)
    return asyncio.run(coro)


# -- commands ---------------------------------------------------------------------


def _config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="TOML config file (default: the embedded demo defaults)")


def _state_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-dir",
        help="the running daemon's state directory (default: $OMNIROUTER_STATE_DIR, else the "
        "config's daemon.state_dir)",
    )
    p.add_argument(
        "--token",
        help="the ops API's admin token (default: $OMNIROUTER_ADMIN_TOKEN, the config's "
        "ops.admin_token, else <state dir>/admin-token)",
    )


class StateNotFound(SystemExit):
    """The daemon's state (store, admin token) is not where the command looked."""

    def __init__(self, message: str) -> None:
        print(message, file=sys.stderr)
        super().__init__(EXIT_FAILURE)


_WHERE_HINT = (
    "pass the daemon's config (-c /etc/omnirouter/omnirouter.toml), its state directory "
    "(--state-dir DIR) or set OMNIROUTER_STATE_DIR"
)


def _admin_config(args: argparse.Namespace) -> Config:
    """Load the config for a command that reads a running daemon's state, never creating any.

    Secrets that cannot be read here are left unresolved (only the admin token matters,
    and it may come from --token or the state directory). The state directory comes
    from --state-dir, $OMNIROUTER_STATE_DIR, or the config, in that order.
    """
    config = _load(getattr(args, "config", None), secrets=False)
    chosen = getattr(args, "state_dir", None) or os.environ.get("OMNIROUTER_STATE_DIR")
    if chosen:
        daemon = config.daemon.model_copy(update={"state_dir": Path(chosen)})
        config = config.model_copy(update={"daemon": daemon})
    return config


def _existing_store(config: Config) -> Config:
    """Return config when its store exists; say clearly where it looked otherwise."""
    if config.store.backend == "postgresql":
        return config  # a server: opening it says whether it is there
    path = config.db_path()
    if not path.is_file():
        raise StateNotFound(
            f"no Omnirouter store at {path.resolve()} (nothing was created); {_WHERE_HINT}"
        )
    return config


def _admin_token(args: argparse.Namespace, config: Config) -> tuple[str, str]:
    """Return (token, where it came from) for the ops API; never create one."""
    given = getattr(args, "token", None)
    if given:
        return given, "--token"
    if os.environ.get("OMNIROUTER_ADMIN_TOKEN"):
        return os.environ["OMNIROUTER_ADMIN_TOKEN"], "$OMNIROUTER_ADMIN_TOKEN"
    unresolved = {where for where, _ in config.unresolved_secrets}
    if config.ops.admin_token and "ops.admin_token" not in unresolved:
        return config.ops.admin_token, "the config's ops.admin_token"
    path = config.daemon.state_dir / "admin-token"
    try:
        return path.read_text().strip(), str(path.resolve())
    except FileNotFoundError:
        raise StateNotFound(
            f"no admin token at {path.resolve()} (nothing was created); pass --token, or "
            + _WHERE_HINT
        ) from None
    except PermissionError:
        raise StateNotFound(f"cannot read {path}: run as the daemon's user or root") from None


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-format",
        choices=["auto", "json", "pretty"],
        default="auto",
        help="auto: pretty on a terminal, JSON lines otherwise",
    )
    p.add_argument("--web-port", type=int, help="listen for the web channel here instead")
    p.add_argument("--ops-port", type=int, help="serve the ops API here instead")


def _with_ports(config: Config, web_port: int | None, ops_port: int | None) -> Config:
    """Return config with the web channel's and the ops API's ports overridden (the demo)."""
    if ops_port is not None:
        config = config.model_copy(update={"ops": config.ops.model_copy(update={"port": ops_port})})
    if web_port is not None:
        web = _web_channel(config)
        if web is None:
            raise SystemExit("--web-port: no web channel is configured")
        channels: list[Any] = list(config.channels)
        index = next(i for i, c in enumerate(channels) if c is web)
        channels[index] = channels[index].model_copy(update={"port": web_port})
        config = config.model_copy(update={"channels": channels})
    return config


@command("run", "run the daemon", _run_args, config=True)
def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM."""
    config = _with_ports(_load(args.config), args.web_port, args.ops_port)
    _configure_logging(config, args.log_format)
    return _run(
        run_daemon(config, Path(args.config) if args.config else None), config.daemon.event_loop
    )


group("config", "configuration tools")


def _config_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="the TOML config (its conf.d/*.toml includes are read too)")
    p.add_argument("--show", action="store_true", help="print the resolved config, secrets masked")
    p.add_argument(
        "--no-secrets",
        action="store_true",
        help="check everything but the ${ENV} and file: secrets that cannot be read here "
        "(an admin's laptop, CI on the config repository); lists the ones skipped",
    )


@command("config check", "validate a config file", _config_check_args)
def cmd_config_check(args: argparse.Namespace) -> int:
    """Validate a config file (exit 11 when invalid); optionally print it, secrets masked."""
    config = _load(args.file, secrets=not args.no_secrets)
    for where, ref in config.unresolved_secrets:
        print(f"not checked: {where} = {ref!r} (secret not available here)", file=sys.stderr)
    if args.show:
        from router.config import redacted_dump

        print(json.dumps(redacted_dump(config), indent=2, ensure_ascii=False, default=str))
    print(
        f"{config.source}: OK ({len(config.channels)} channel(s), "
        f"{len(config.adapters)} adapter(s), {len(config.agents)} agent(s))"
    )
    return EXIT_OK


def _config_diff_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("old", help="the config the daemon runs now")
    p.add_argument("new", help="the edited config")
    p.add_argument(
        "--no-secrets", action="store_true", help="do not resolve secrets (see config check)"
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


@command(
    "config diff",
    "show what a reload from OLD to NEW would change (started, stopped, restarted, in place)",
    _config_diff_args,
)
def cmd_config_diff(args: argparse.Namespace) -> int:
    """Print the reload plan; exit 0 when nothing changes, 1 when something does."""
    from router.config_diff import reload_plan, render

    old = _load(args.old, secrets=not args.no_secrets)
    new = _load(args.new, secrets=not args.no_secrets)
    plan = reload_plan(old, new)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2, ensure_ascii=False))
    else:
        print("\n".join(render(plan)))
    return EXIT_OK if plan.empty else EXIT_FAILURE


@command(
    "config schema",
    "print the config file's JSON Schema (for editors; committed as config/omnirouter.schema.json)",
)
def cmd_config_schema(args: argparse.Namespace) -> int:
    """Print the JSON Schema generated from the config models."""
    from router.config_schema import render

    sys.stdout.write(render())
    return EXIT_OK


def _http(
    method: str, url: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode(errors="replace")


class _HttpListener(Protocol):
    """What `omnirouter send` needs of the channel it posts to: where it listens."""

    host: str
    port: int


def _web_channel(config: Config) -> _HttpListener | None:
    """Return the configured channel that takes `POST /v1/messages`, or None."""
    for c in config.channels:
        # Asked of the driver class, not guessed from its type name.
        if load_driver(CHANNELS, c.type).takes_message_posts:
            channel: _HttpListener = c
            return channel
    return None


def _web_url(config: Config, override: str | None) -> str:
    if override:
        return override.rstrip("/")
    c = _web_channel(config)
    if c is None:
        raise SystemExit("no web channel is configured; pass --url")
    host = "127.0.0.1" if c.host in ("0.0.0.0", "::", "") else c.host
    return f"http://{host}:{c.port}"


def _ops_url(config: Config, override: str | None) -> str:
    if override:
        return override.rstrip("/")
    host = "127.0.0.1" if config.ops.host in ("0.0.0.0", "::", "") else config.ops.host
    return f"http://{host}:{config.ops.port}"


def _send_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", help="what the customer writes")
    p.add_argument(
        "--contact", default="demo@example.com", help="the customer's handle (e-mail, phone, id)"
    )
    p.add_argument("--name", default="", help="the customer's name")
    p.add_argument("--subject", default="", help="a subject line")
    p.add_argument(
        "--conversation", default="", help="continue the conversation of this token or thread"
    )
    p.add_argument(
        "--idempotency-key", default="", help="send again with the same key: stored once"
    )
    p.add_argument("--url", help="web channel base URL (default: from the config)")
    _state_options(p)


@command("send", "send a test message to the web channel", _send_args, config=True)
def cmd_send(args: argparse.Namespace) -> int:
    """Post one message to the local web channel and print its answer."""
    config = _load(args.config)
    body: dict[str, Any] = {"text": args.text, "contact": {"handle": args.contact}}
    if args.name:
        body["contact"]["name"] = args.name
    if args.subject:
        body["subject"] = args.subject
    if args.conversation:
        body["conversation"] = args.conversation
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    try:
        status, reply = _http("POST", _web_url(config, args.url) + "/v1/messages", body, headers)
    except OSError as exc:
        print(f"cannot reach the web channel: {exc}. Is `omnirouter run` running?", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(reply, indent=2, ensure_ascii=False))
    if 200 <= status < 300 and isinstance(reply, dict):
        print(_routed_line(args, reply), file=sys.stderr)
    return EXIT_OK if 200 <= status < 300 else EXIT_FAILURE


def _routed_line(args: argparse.Namespace, reply: dict[str, Any]) -> str:
    """Return "T-… complaint P2 → alice" from the store, when this machine can read it."""
    ticket = reply.get("ticket", "?")
    try:
        config = _existing_store(_admin_config(args))
        stored = _run(_with_store(config, lambda s: s.message(str(reply.get("message_id")))))
    except (SystemExit, Exception):  # the daemon's state is elsewhere: the answer is enough
        return f"{ticket}: {reply.get('state', '?')}"
    if not stored:
        return f"{ticket}: {reply.get('state', '?')}"
    who = (stored.get("assignment") or {}).get("agent_id") or f"waiting in {stored['queue']}"
    return f"{ticket}: {stored['label']} {stored['severity']} → {who}"


async def _with_store(config: Config, fn: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
    store = open_store(_existing_store(config))
    await store.open()
    try:
        return await fn(store)
    finally:
        await store.close()


def _ts(value: float) -> str:
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


group("dead-letters", "list or replay dead letters")


def _dead_letters_list_args(p: argparse.ArgumentParser) -> None:
    _state_options(p)
    p.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")


@command("dead-letters list", "list dead letters", _dead_letters_list_args, config=True)
def cmd_dead_letters_list(args: argparse.Namespace) -> int:
    """Print the dead letters, newest first."""
    config = _admin_config(args)
    items = _run(_with_store(config, lambda s: s.dead_letters(args.limit)))
    if args.json:
        from router.ops import dead_letter_view

        for d in items:
            print(json.dumps(dead_letter_view(d), ensure_ascii=False))
        return EXIT_OK
    if not items:
        print("no dead letters")
        return EXIT_OK
    print(f"{'ID':26}  {'TARGET':12}  {'AGENT':12}  {'TRIES':>5}  {'DEAD AT':20}  REASON")
    for d in items:
        print(
            f"{d.id:26}  {d.target:12}  {d.agent_id:12}  {d.attempts:>5}  "
            f"{_ts(d.dead_at):20}  {d.reason}"
        )
    return EXIT_OK


def _dead_letters_replay_args(p: argparse.ArgumentParser) -> None:
    _state_options(p)
    p.add_argument("ids", nargs="*", help="dead letter ids to replay")
    p.add_argument("--all", action="store_true", help="replay every dead letter")


@command(
    "dead-letters replay",
    "move dead letters back to the outbox",
    _dead_letters_replay_args,
    config=True,
)
def cmd_dead_letters_replay(args: argparse.Namespace) -> int:
    """Move the named (or all) dead letters back to the outbox."""
    config = _admin_config(args)
    if not args.ids and not args.all:
        print("name the dead letters to replay, or pass --all", file=sys.stderr)
        return 2
    ids = None if args.all else list(args.ids)
    count = _run(_with_store(config, lambda s: s.replay_dead_letters(ids, time.time())))
    print(
        f"{count} dead letter(s) moved back to the outbox; a running daemon sends them within "
        f"{config.outbox.poll_interval:g} s"
    )
    return EXIT_OK if count or args.all else EXIT_FAILURE


def _admin_call(
    args: argparse.Namespace, path: str, method: str = "GET", body: dict[str, Any] | None = None
) -> tuple[int, Any] | None:
    config = _admin_config(args)
    token, source = _admin_token(args, config)
    url = _ops_url(config, args.ops_url)
    try:
        answer = _http(method, url + path, body, headers={"Authorization": f"Bearer {token}"})
    except OSError as exc:
        print(
            f"cannot reach the ops API at {url}: {exc}. Is `omnirouter run` running?",
            file=sys.stderr,
        )
        return None
    if answer[0] == 401:
        print(
            f"the ops API at {url} refused the admin token from {source}: it belongs to "
            f"another daemon or an old start; {_WHERE_HINT}, or pass --token",
            file=sys.stderr,
        )
        return None
    return answer


def _admin_show(
    args: argparse.Namespace,
    path: str,
    table: Callable[[Any], list[str]] | None = None,
    method: str = "GET",
    body: dict[str, Any] | None = None,
) -> int:
    answer = _admin_call(args, path, method, body)
    if answer is None:
        return EXIT_FAILURE
    status, reply = answer
    ok = 200 <= status < 300
    if ok and table is not None and not getattr(args, "json", False):
        print("\n".join(table(reply)))
    else:
        print(json.dumps(reply, indent=2, ensure_ascii=False))
    return EXIT_OK if ok else EXIT_FAILURE


def _agents_table(reply: Any) -> list[str]:
    rows = [f"{'AGENT':16} {'PRESENT':7} {'LOAD':>9}  {'TOOL':10} {'SKILLS':22} QUEUES"]
    for a in reply.get("agents", []):
        load = f"{a['open_conversations']}/{a['capacity']}"
        skills = ",".join([*a.get("classes", []), *a.get("languages", [])]) or "any"
        rows.append(
            f"{a['id']:16} {'yes' if a['present'] else 'no':7} {load:>9}  {a['tool']:10} "
            f"{skills:22} {','.join(a['queues'])}"
        )
    return rows


def _queues_table(reply: Any) -> list[str]:
    rows = [f"{'QUEUE':16} {'WAITING':>7} {'OVERDUE':>7} {'OLDEST (s)':>10}  AGENTS"]
    for q in reply.get("queues", []):
        rows.append(
            f"{q['queue']:16} {q['depth']:>7} {q['overdue']:>7} {q['oldest_wait_s']:>10.1f}  "
            f"{','.join(q['agents']) or '-'}"
        )
    return rows


def _admin_view_args(p: argparse.ArgumentParser) -> None:
    _state_options(p)
    p.add_argument("--ops-url", help="the ops API base URL (default: from the config)")
    p.add_argument("--json", action="store_true", help="print the API's JSON")


@command("agents", "list agents, load and presence", _admin_view_args, config=True)
def cmd_agents(args: argparse.Namespace) -> int:
    """Print the running daemon's agents."""
    return _admin_show(args, "/v1/agents", _agents_table)


@command("queues", "list queues and waiting messages", _admin_view_args, config=True)
def cmd_queues(args: argparse.Namespace) -> int:
    """Print the running daemon's queues."""
    return _admin_show(args, "/v1/queues", _queues_table)


def _presence_args(p: argparse.ArgumentParser) -> None:
    _state_options(p)
    p.add_argument("agent", help="the agent's id")
    p.add_argument(
        "state",
        choices=["on", "away", "off"],
        help="on: takes new work; away: no new work, keeps its offers; off: off line, "
        "unaccepted offers go back to the queue",
    )
    p.add_argument("--ops-url", help="the ops API base URL (default: from the config)")


@command("presence", "set an agent on or off", _presence_args, config=True)
def cmd_presence(args: argparse.Namespace) -> int:
    """Set an agent on, away or off in the running daemon."""
    return _admin_show(args, f"/v1/agents/{args.agent}/presence/{args.state}", method="POST")


# -- acting for an agent (tools that cannot send actions: the file inbox, webhooks) --


def _ticket_action_args(
    value: str | None = None, value_help: str = ""
) -> Callable[[argparse.ArgumentParser], None]:
    def add(p: argparse.ArgumentParser) -> None:
        _state_options(p)
        p.add_argument("ticket", help="the ticket number, T-01J…")
        if value is not None:
            p.add_argument(value, help=value_help)
        p.add_argument("--agent", required=True, help="the agent acting (audited under this name)")
        p.add_argument("--ops-url", help="the ops API (default: from the config)")

    return add


def _ticket_action(args: argparse.Namespace, action: str, value: str = "") -> int:
    body: dict[str, Any] = {"agent": args.agent, "action": action}
    if value:
        body["value"] = value
    return _admin_show(args, f"/v1/tickets/{args.ticket}/actions", method="POST", body=body)


@command("accept", "take up an offered ticket for an agent", _ticket_action_args(), config=True)
def cmd_accept(args: argparse.Namespace) -> int:
    """Accept a ticket's offer for an agent in the running daemon."""
    return _ticket_action(args, "accept")


@command(
    "reply",
    "answer the customer of a ticket on their channel",
    _ticket_action_args("text", "the answer, sent to the customer as written"),
    config=True,
)
def cmd_reply(args: argparse.Namespace) -> int:
    """Relay an agent's reply to the ticket's customer."""
    return _ticket_action(args, "reply", args.text)


@command("resolve", "resolve a ticket an agent holds", _ticket_action_args(), config=True)
def cmd_resolve(args: argparse.Namespace) -> int:
    """Resolve a ticket for the agent holding it."""
    return _ticket_action(args, "resolve")


@command(
    "transfer",
    "hand a ticket to another agent or queue",
    _ticket_action_args("to", "agent:<id> or queue:<name>"),
    config=True,
)
def cmd_transfer(args: argparse.Namespace) -> int:
    """Transfer a ticket from the agent holding it."""
    return _ticket_action(args, "transfer", args.to)


def _explain_args(p: argparse.ArgumentParser) -> None:
    _state_options(p)
    p.add_argument("message_id", help="the message id (a ULID, as in the delivery and logs)")
    p.add_argument("--json", action="store_true", help="print the stored record as JSON")


@command("explain", "show a message's classification and routing", _explain_args, config=True)
def cmd_explain(args: argparse.Namespace) -> int:
    """Print why a stored message was labelled and routed as it was."""
    config = _admin_config(args)
    stored = _run(_with_store(config, lambda s: s.message(args.message_id)))
    if stored is None:
        print(f"no message {args.message_id}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(stored, indent=2, ensure_ascii=False, default=str))
    else:
        print(render_explain(stored))
    return EXIT_OK


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def render_explain(stored: dict[str, Any]) -> str:
    """Return why a message was labelled and routed as it was, for a human."""
    cls = stored["classification"]
    signals = ", ".join(s.get("kind", "?") for s in cls["signals"]) or "none"
    lines = [
        f"message {stored['id']} on {stored['channel']} ({stored['channel_type']}, "
        f"{cls['language']}), ticket T-{stored['conversation_id']}, state {stored['state']}",
        f"  classified {cls['label']} ({cls['confidence']:.2f}), severity {cls['severity']}, "
        f"signals: {signals}",
        f"  queue {stored['queue']}, respond by {_when(stored['sla_deadline'])}",
    ]
    for offer in stored.get("offer_history", []):
        lines.append(
            f"  offered to {offer['agent_id']} at {_when(offer['assigned_at'])}: "
            f"{offer['outcome']} at {_when(offer['ended_at'])}"
        )
    a = stored.get("assignment")
    if not a:
        lines.append("  not assigned: waiting for an agent with room")
        return "\n".join(lines)
    accepted = f", accepted {_when(a['accepted_at'])}" if a.get("accepted_at") else ""
    lines.append(f"  assigned to {a['agent_id']} at {_when(a['assigned_at'])}{accepted}")
    lines.append(f"  why: {a['reason']}")
    explain = a.get("explain")
    if explain:
        lines.append(
            f"  rule {explain['rule']}; "
            f"{len(explain['candidates']) + sum(explain.get('others', {}).values())} agents "
            "considered "
            f"for {explain['label']} / {explain['language']} / {explain['channel_type']} "
            f"in {explain['department']}:"
        )
        width = max(len(c["agent"]) for c in explain["candidates"])
        for c in explain["candidates"]:
            lines.append(f"    {c['agent'].ljust(width)}  {c['verdict']}")
        for reason, count in sorted(explain.get("others", {}).items()):
            lines.append(f"    and {count} more: {reason}")
    return "\n".join(lines)


group("ticket", "tickets and their lifecycle")


def _ticket_history_args(p: argparse.ArgumentParser) -> None:
    _state_options(p)
    p.add_argument("ticket", help="the ticket number, T-…")
    p.add_argument("--json", action="store_true", help="one JSON object per event")


@command("ticket history", "show a ticket's audit trail", _ticket_history_args, config=True)
def cmd_ticket_history(args: argparse.Namespace) -> int:
    """Print every transition and agent action of a ticket, oldest first."""
    from router.model import TICKET_PREFIX

    config = _admin_config(args)
    ticket: str = args.ticket
    conversation_id = ticket.removeprefix(TICKET_PREFIX)
    events = _run(_with_store(config, lambda s: s.ticket_events(conversation_id)))
    if not events:
        print(f"no ticket {ticket}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        for e in events:
            print(json.dumps(e.to_dict(), ensure_ascii=False))
        return EXIT_OK
    print(f"{'AT':20}  {'EVENT':16}  {'BY':12}  {'STATUS':19}  DETAIL")
    for e in events:
        detail = ", ".join(f"{k}={v}" for k, v in e.detail.items() if v not in ("", None, []))
        print(f"{_ts(e.at):20}  {e.kind:16}  {e.actor:12}  {e.status:19}  {detail}")
    return EXIT_OK


@command("classify", "classify JSON lines (or plain text lines) from stdin", config=True)
def cmd_classify(args: argparse.Namespace) -> int:
    """Print one verdict per input line, in order."""
    from router.intake import make_classifier

    config = _load(args.config)
    clf = make_classifier(config)
    out = sys.stdout
    for line in sys.stdin:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        record: dict[str, Any]
        try:
            parsed = json.loads(line)
            record = (
                parsed
                if isinstance(parsed, dict) and isinstance(parsed.get("text"), str)
                else {"text": line}
            )
        except ValueError:
            record = {"text": line}
        lang = record.get("lang")
        cls = clf.classify(record["text"], language=lang if isinstance(lang, str) else None)
        result: dict[str, Any] = {}
        if "id" in record:
            result["id"] = record["id"]
        result.update(cls.to_dict())
        out.write(json.dumps(result, ensure_ascii=False) + "\n")
    out.flush()
    return EXIT_OK


group(
    "classifier",
    "train or evaluate the intent model",
    description="omnirouter classifier train --data F.jsonl --out MODEL [--seed N] "
    "[--corrections F.jsonl]; omnirouter classifier eval --data F.jsonl [--model M] "
    "[--split] [--loso]; omnirouter classifier corrections [-c CONFIG] --out F.jsonl",
)


@command("classifier train", "train a model from labelled JSON lines", passthrough=True)
def cmd_classifier_train(args: argparse.Namespace) -> int:
    """Hand the arguments to the trainer's own command line."""
    from router.intent import train_command

    return train_command(list(args.rest))


@command("classifier eval", "evaluate a model on labelled JSON lines", passthrough=True)
def cmd_classifier_eval(args: argparse.Namespace) -> int:
    """Hand the arguments to the evaluator's own command line."""
    from router.intent import eval_command

    return eval_command(list(args.rest))


def _corrections_args(p: argparse.ArgumentParser) -> None:
    _state_options(p)
    p.add_argument("--out", required=True, help="JSON lines for `classifier train --corrections`")


@command(
    "classifier corrections",
    "export agents' relabels as training records",
    _corrections_args,
    config=True,
)
def cmd_classifier_corrections(args: argparse.Namespace) -> int:
    """Write the agents' relabels as JSON lines for `classifier train --corrections`."""
    config = _admin_config(args)
    records = _run(_with_store(config, lambda s: s.corrections()))
    with open(args.out, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} correction(s) to {args.out}")
    return EXIT_OK


def _backup_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="a new directory for the copy")
    _state_options(p)


@command(
    "backup",
    "copy the daemon's state consistently while it runs (SQLite online backup)",
    _backup_args,
    config=True,
)
def cmd_backup(args: argparse.Namespace) -> int:
    """Copy the store and the drivers' state into OUT; every database checked."""
    from router.backup import BackupError, backup_state

    config = _existing_store(_admin_config(args))
    try:
        report = backup_state(config.daemon.state_dir, Path(args.out), config.db_path())
    except (BackupError, OSError) as exc:
        print(f"backup failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(
        f"backed up {len(report.databases)} database(s) and {report.files} file(s), "
        f"{report.bytes / 1e6:.1f} MB, into {args.out}; each database passed integrity_check"
    )
    if config.store.backend == "postgresql":
        print(
            f"the store itself is {config.store_label()}: back it up with the server's tools "
            "(pg_dump, or base backups with WAL archiving)"
        )
    return EXIT_OK


@command("migrate", "migrate the store schema and exit", config=True)
def cmd_migrate(args: argparse.Namespace) -> int:
    """Bring the store's schema up to date."""
    config = _load(args.config)

    async def noop(store: Any) -> None:
        return None

    _run(_with_store(config, noop))
    print(f"store at {config.store_label()} is up to date")
    return EXIT_OK


group("store", "move the store between SQLite and PostgreSQL")


def _store_copy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="SRC",
        help="the store to copy: sqlite:PATH (or a bare path) or postgresql://…",
    )
    p.add_argument(
        "--to",
        dest="target",
        required=True,
        metavar="DST",
        help="an empty store to fill: postgresql://… (the database must exist) or sqlite:PATH",
    )


@command(
    "store copy",
    "copy a whole store, history and ids, into an empty one (SQLite ↔ PostgreSQL)",
    _store_copy_args,
    description=(
        "Copy every table of the store at SRC into the empty store at DST in one "
        "transaction, keeping ids and the installation secret (ticket status links keep "
        "working); both schemas are migrated to the latest version first. Stop the daemon "
        "first: the copy reads one consistent snapshot, so whatever the daemon commits "
        "after it starts is not copied. A non-empty DST is refused."
    ),
)
def cmd_store_copy(args: argparse.Namespace) -> int:
    """Copy the store at --from into the empty store at --to; print rows per table."""
    from router.store.copy import CopyError, copy_store

    try:
        report = copy_store(args.source, args.target)
    except CopyError as exc:
        print(f"store copy failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if report.source_migrated:
        old, new = report.source_migrated
        print(f"migrated the source {report.source} from schema v{old} to v{new} first")
    print(f"copied {report.source} → {report.target} (schema v{report.schema})")
    width = max((len(name) for name, _ in report.tables), default=5)
    for name, rows in report.tables:
        print(f"  {name:{width}}  {rows:>10,}")
    rate = report.messages / report.seconds if report.seconds else 0.0
    print(
        f"{report.rows:,} rows in {len(report.tables)} tables in {report.seconds:.1f} s "
        f"({report.messages:,} messages, {rate:,.0f} messages/s)"
    )
    print("row counts match on both sides; the installation secret came along")
    return EXIT_OK


group("simulate", "drive the real scheduler on a virtual clock: run, generate, check")


def _simulate(args: argparse.Namespace, action: str) -> int:
    from router.sim.command import cmd_simulate as simulate

    args.action = action
    return simulate(args)


def _sim_args(name: str) -> Callable[[argparse.ArgumentParser], None]:
    def add(p: argparse.ArgumentParser) -> None:
        from router.sim import command

        getattr(command, f"add_{name}_arguments")(p)

    return add


@command(
    "simulate run",
    "replay a trace through the scheduler (and other policies) on a virtual clock",
    _sim_args("run"),
)
def cmd_simulate_run(args: argparse.Namespace) -> int:
    """Replay a trace; print (and write) each policy's summary."""
    return _simulate(args, "run")


@command("simulate generate", "write the trace of a named scenario", _sim_args("generate"))
def cmd_simulate_generate(args: argparse.Namespace) -> int:
    """Write a scenario's trace (JSON lines)."""
    return _simulate(args, "generate")


@command(
    "simulate check",
    "check assignment events against the invariants and the SLA bars",
    _sim_args("check"),
)
def cmd_simulate_check(args: argparse.Namespace) -> int:
    """Check events against their trace; exit 1 when an invariant breaks."""
    return _simulate(args, "check")


def _staffing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", help="observe a simulation trace (JSON lines) instead of the store")
    p.add_argument("--days", type=float, default=7.0, help="store window in days (default 7)")
    p.add_argument("--tz", default="UTC", help="time zone of the hours (default UTC)")
    p.add_argument("--level", type=float, default=0.8, help="share to answer within SLA")
    p.add_argument("--date", help="YYYY-MM-DD whose shifts count as on shift (default today)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


@command(
    "staffing",
    "agents needed per hour for the SLA targets vs on shift",
    _staffing_args,
    config=True,
)
def cmd_staffing(args: argparse.Namespace) -> int:
    """Print the agents each hour needs for its SLA targets next to the agents on shift."""
    from router.staffing import StaffingError, render_report, staffing_report

    config = _load(args.config)
    try:
        report = staffing_report(
            config,
            trace=Path(args.trace) if args.trace else None,
            days=args.days,
            tz=args.tz,
            level=args.level,
            day=args.date,
        )
    except StaffingError as exc:
        print(f"staffing: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print("\n".join(render_report(report)))
    return EXIT_OK


# -- parser -----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every declared subcommand."""
    p = argparse.ArgumentParser(prog="omnirouter", description="Omnichannel message router daemon.")
    p.add_argument("--version", action="version", version=f"omnirouter {__version__}")
    # argparse names no public type for what add_subparsers() returns.
    subparsers: dict[tuple[str, ...], Any] = {(): p.add_subparsers(dest="command", required=True)}
    for path, cmd in COMMANDS.items():
        sp = subparsers[path[:-1]].add_parser(
            path[-1],
            help=cmd.help,
            description=cmd.description,
            # A passthrough command's --help belongs to the command line it hands over to.
            add_help=not cmd.passthrough,
        )
        if cmd.config:
            _config_option(sp)
        if cmd.arguments is not None:
            cmd.arguments(sp)
        if cmd.handler is None:
            dest = "_".join(path).replace("-", "_") + "_command"
            subparsers[path] = sp.add_subparsers(dest=dest, required=True)
        else:
            sp.set_defaults(fn=cmd.handler, passthrough=cmd.passthrough)
    return p


# Command groups kept in modules of their own register themselves on import.
from router import cli_contacts, cli_status  # noqa: E402, F401


def normalised(argv: list[str]) -> list[str]:
    """Return argv with what earlier versions accepted spelled the current way.

    `omnirouter simulate --trace T …` (before `simulate` had subcommands) means
    `omnirouter simulate run --trace T …`.
    """
    if argv[:1] == ["simulate"] and (
        len(argv) == 1 or argv[1] not in ("run", "generate", "check", "-h", "--help")
    ):
        return ["simulate", "run", *argv[1:]]
    return argv


# What a shell reports for a command that SIGPIPE ended (128 + 13), as for `yes | head`.
EXIT_BROKEN_PIPE = 141


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `omnirouter` console script."""
    parser = build_parser()
    args, rest = parser.parse_known_args(normalised(sys.argv[1:] if argv is None else argv))
    if rest and not args.passthrough:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    try:
        code: int = args.fn(args)
        sys.stdout.flush()  # a reader gone shows here, not in the interpreter's last flush
    except BrokenPipeError:
        # The reader went away (`omnirouter status --watch | head`): end quietly, as Unix
        # tools do. What is still buffered goes to /dev/null so the interpreter's final
        # flush does not fail again (the recipe in Python's `signal` documentation).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    return code


if __name__ == "__main__":
    # Run as `python -m router.cli`, this file is `__main__`: the command modules
    # registered themselves in `router.cli`, so that module's main is the one to run.
    from router.cli import main as registered_main

    raise SystemExit(registered_main())
