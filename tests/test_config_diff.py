"""`omnirouter config diff OLD NEW`: the reload plan, as the daemon itself follows it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from router import cli
from router.config import loads_config
from router.config_diff import reload_plan

BASE = """
[daemon]
state_dir = "/tmp/x"
[ops]
port = 9100
[[channels]]
type = "web"
name = "web"
port = 8080
[[channels]]
type = "web"
name = "forms"
port = 8081
[[adapters]]
type = "inbox"
name = "inbox"
[[agents]]
id = "alice"
capacity = 2
tool = "inbox"
[[agents]]
id = "bo"
capacity = 2
tool = "inbox"
"""


def edited() -> str:
    text = BASE.replace("port = 8081", "port = 8082")  # forms restarts
    text = text.replace('id = "bo"\ncapacity = 2', 'id = "bo"\ncapacity = 4')  # bo changes
    text = text.replace("port = 9100", "port = 9101")  # ops: needs a restart
    text += '[[agents]]\nid = "chen"\ncapacity = 1\ntool = "inbox"\n'
    text += "[sla]\ninquiry = 120\n"
    return text


def test_the_plan_names_every_change_and_what_needs_a_restart() -> None:
    plan = reload_plan(loads_config(BASE), loads_config(edited()))
    assert plan.channels.restarted == ["forms"] and plan.channels.changed_fields["forms"] == [
        "port"
    ]
    assert plan.channels.added == plan.channels.removed == []
    assert plan.agents_added == ["chen"] and plan.agents_changed == {"bo": ["capacity"]}
    assert plan.live == ["sla"] and plan.needs_restart == ["ops"]
    assert reload_plan(loads_config(BASE), loads_config(BASE)).empty


def test_cli_prints_the_plan_and_exits_1_when_something_changes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = tmp_path / "old.toml", tmp_path / "new.toml"
    old.write_text(BASE)
    new.write_text(edited().replace('[[channels]]\ntype = "web"\nname = "web"\nport = 8080\n', ""))
    assert cli.main(["config", "diff", str(old), str(new)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert "- channel web (stopped)" in out
    assert "~ channel forms (restarted: port)" in out
    assert "+ agent chen" in out and "~ agent bo (capacity)" in out
    assert any(line.startswith("! [ops] changed: needs a restart") for line in out)
    assert cli.main(["config", "diff", str(old), str(new), "--json"]) == 1
    plan = json.loads(capsys.readouterr().out)
    assert plan["channels"]["removed"] == ["web"] and plan["needs_restart"] == ["ops"]
    assert cli.main(["config", "diff", str(old), str(old)]) == 0
    assert "no change" in capsys.readouterr().out
