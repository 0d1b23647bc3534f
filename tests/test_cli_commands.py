"""Subcommands are declared in one table; the parser built from it keeps every contract."""

from __future__ import annotations

from pathlib import Path

import pytest

from router import cli


def test_every_declared_command_has_help_and_a_handler_or_children() -> None:
    paths = set(cli.COMMANDS)
    for path, cmd in cli.COMMANDS.items():
        assert cmd.help
        children = [p for p in paths if p[:-1] == path]
        assert (cmd.handler is None) == bool(children), path
    top = [p[0] for p in paths if len(p) == 1]
    for name in (
        "run", "config", "send", "dead-letters", "agents", "queues", "presence", "explain",
        "classify", "classifier", "migrate", "simulate", "staffing", "ticket",
    ):  # fmt: skip
        assert name in top
    assert {("config", "check"), ("dead-letters", "list"), ("dead-letters", "replay")} <= paths
    assert {("classifier", "train"), ("classifier", "eval"), ("classifier", "corrections")} <= paths
    assert ("ticket", "history") in paths


def test_a_duplicate_or_an_orphan_is_refused() -> None:
    with pytest.raises(ValueError, match="declared twice"):
        cli.command("run", "again")(cli.cmd_run)
    with pytest.raises(ValueError, match="not a declared group"):
        cli.command("nowhere sub", "orphan")(cli.cmd_run)
    with pytest.raises(ValueError, match="not a declared group"):
        cli.command("run sub", "under a leaf")(cli.cmd_run)


@pytest.mark.parametrize(
    ("argv", "fn", "expected"),
    [
        (["config", "check", "f.toml", "--show"], cli.cmd_config_check, {"file": "f.toml"}),
        (["dead-letters", "list", "-c", "x", "--json"], cli.cmd_dead_letters_list, {"json": True}),
        (["dead-letters", "replay", "a", "b"], cli.cmd_dead_letters_replay, {"ids": ["a", "b"]}),
        (
            ["dead-letters", "replay", "--all", "-c", "x"],
            cli.cmd_dead_letters_replay,
            {"all": True},
        ),
        (["classifier", "corrections", "--out", "o"], cli.cmd_classifier_corrections, {"out": "o"}),
        (["simulate", "check", "--trace", "t"], cli.cmd_simulate_check, {"trace": "t"}),
        (["simulate", "run", "--trace", "t"], cli.cmd_simulate_run, {"policy": "omnirouter"}),
        (cli.normalised(["simulate", "--trace", "t"]), cli.cmd_simulate_run, {"trace": "t"}),
        (["simulate", "generate", "--seed", "3"], cli.cmd_simulate_generate, {"seed": 3}),
        (["presence", "alice", "away"], cli.cmd_presence, {"state": "away"}),
    ],
)
def test_nested_and_flat_commands_parse_to_their_handler(
    argv: list[str], fn: cli.Handler, expected: dict[str, object]
) -> None:
    args = cli.build_parser().parse_args(argv)
    assert args.fn is fn
    for key, value in expected.items():
        assert getattr(args, key) == value


def test_passthrough_hands_every_argument_over(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake_train(argv: list[str]) -> int:
        seen.append(argv)
        return 7

    monkeypatch.setattr("router.intent.train_command", fake_train)
    argv = ["--data", "d.jsonl", "--out", "m.bin", "--seed", "-1", "--help"]
    assert cli.main(["classifier", "train", *argv]) == 7
    assert seen == [argv]


def test_unknown_arguments_and_missing_subcommands_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for argv in (["migrate", "--bogus"], ["dead-letters"], ["config"], ["classifier"]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2, argv
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_replay_without_ids_or_all_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\n')
    assert cli.main(["dead-letters", "replay", "-c", str(config)]) == 2
    assert "pass --all" in capsys.readouterr().err


def test_send_finds_the_web_channel_in_the_config() -> None:
    from router.config import load_config

    config = load_config(None)
    web = cli._web_channel(config)
    assert web is not None and web.port == 8080
    assert cli._web_url(config, None) == "http://127.0.0.1:8080"
    assert cli._web_url(config, "http://h:1/") == "http://h:1"


def test_ticket_history_prints_the_audit_from_the_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio
    import json

    from router.config import load_config
    from router.daemon import open_store
    from tests.test_store_contract import new_message

    conf = tmp_path / "omnirouter.toml"
    conf.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n', encoding="utf-8")
    new = new_message(assign_to="bob")

    async def seed() -> None:
        store = open_store(load_config(conf))
        await store.open()
        try:
            await store.ingest(new)
            await store.resolve_conversation(new.conversation_id, 1_700_000_100.0, actor="bob")
        finally:
            await store.close()

    asyncio.run(seed())
    ticket = f"T-{new.conversation_id}"
    assert cli.main(["ticket", "history", ticket, "-c", str(conf)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["AT", "EVENT", "BY"]
    assert [line.split()[2] for line in table[1:]] == ["created", "assigned", "resolved"]
    assert "agent=bob" in table[2]
    assert cli.main(["ticket", "history", ticket, "-c", str(conf), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["kind"], r["actor"], r["ticket"]) for r in rows][-1] == ("resolved", "bob", ticket)
    assert cli.main(["ticket", "history", "T-UNKNOWN", "-c", str(conf)]) == 1


def test_every_argument_of_every_command_has_help() -> None:
    import argparse

    missing: list[str] = []

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{' '.join(path)} {action.option_strings or action.dest}")

    walk(cli.build_parser(), [])
    assert not missing, missing
