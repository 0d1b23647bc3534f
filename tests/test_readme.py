"""The README's two commands are the project's contract with a newcomer and with CI."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.S)]


def test_readme_has_exactly_two_setup_commands() -> None:
    commands = _commands()
    assert len(commands) == 2, commands
    assert "omnirouter run" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    test_command = _commands()[1]
    ci = (REPO / ".ci" / "run").read_text()
    assert test_command in ci.splitlines(), f"{test_command!r} not a line of .ci/run"


def test_embedded_defaults_match_the_readme_tour() -> None:
    from router.config import load_config

    config = load_config(None)
    web = [c for c in config.channels if c.type == "web"]
    assert web and web[0].host == "127.0.0.1" and web[0].port == 8080
    assert config.ops.port == 8081
    assert {a.tool for a in config.agents} == {"inbox"}
