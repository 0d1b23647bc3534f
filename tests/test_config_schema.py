"""The committed JSON Schema of omnirouter.toml is what the models generate, and it validates.

Editors (Taplo, Even Better TOML) read it through the `#:schema` line of the example, so
it must accept every valid config and name what is wrong in an invalid one.
"""

from __future__ import annotations

import json
import tomllib

import jsonschema
import pytest

from router.config_schema import render
from tests.daemon_harness import REPO

SCHEMA_PATH = REPO / "config" / "omnirouter.schema.json"
EXAMPLE = REPO / "config" / "omnirouter.example.toml"


def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_the_committed_schema_is_the_generated_one() -> None:
    assert SCHEMA_PATH.read_text(encoding="utf-8") == render(), (
        "config/omnirouter.schema.json is stale: "
        "run `omnirouter config schema > config/omnirouter.schema.json`"
    )


def test_the_example_declares_the_schema_and_passes_it() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    assert text.startswith("#:schema ./omnirouter.schema.json\n")
    assert list(validator().iter_errors(tomllib.loads(text))) == []


@pytest.mark.parametrize(
    ("toml", "where"),
    [
        ("[ops]\nport = 99999\n", "$.ops.port"),
        ("[daemon]\nlog_level = 'loud'\n", "$.daemon.log_level"),
        ("[sla]\ninquiry = 300\nnot_a_setting = 1\n", "$.sla"),
        ('[[channels]]\ntype = "web"\nname = "web"\nport = 70000\n', "$.channels[0]"),
        ('[[adapters]]\ntype = "carrier-pigeon"\nname = "p"\n', "$.adapters[0]"),
    ],
)
def test_an_invalid_config_is_refused_at_the_right_place(toml: str, where: str) -> None:
    errors = list(validator().iter_errors(tomllib.loads(toml)))
    assert errors, toml
    assert any(e.json_path.startswith(where) for e in errors), [e.json_path for e in errors]
