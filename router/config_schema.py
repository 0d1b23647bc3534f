"""The JSON Schema of omnirouter.toml, generated from the config models.

Editors validate and complete the TOML with it (Taplo / Even Better TOML read the
`#:schema ./omnirouter.schema.json` line at the top of config/omnirouter.example.toml).
The committed copy, config/omnirouter.schema.json, is kept equal to what this module
generates by tests/test_config_schema.py; regenerate it with
`omnirouter config schema > config/omnirouter.schema.json`.

`[[channels]]` and `[[adapters]]` entries are validated by their driver's own model,
chosen by `type`: the schema lists each driver's model under `oneOf` with `type` as the
discriminator. Any string may also be written as `${ENV_VAR}` or `file:/path`; those are
resolved before validation, so the schema describes the resolved values.
"""

from __future__ import annotations

import json
from typing import Any

from router.config import Config
from router.drivers import ADAPTERS, CHANNELS, load_driver

SCHEMA_ID = "https://omnirouter.dev/schema/omnirouter.schema.json"


def _driver_entries(registry: dict[str, str], defs: dict[str, Any]) -> dict[str, Any]:
    """Return the `items` schema of a driver list: one model per registered type."""
    options = []
    mapping = {}
    for type_name in sorted(registry):
        model = load_driver(registry, type_name).config_model
        schema = model.model_json_schema(ref_template="#/$defs/{model}")
        defs.update(schema.pop("$defs", {}))
        name = model.__name__
        defs[name] = schema
        options.append({"$ref": f"#/$defs/{name}"})
        mapping[type_name] = f"#/$defs/{name}"
    return {"oneOf": options, "discriminator": {"propertyName": "type", "mapping": mapping}}


def config_json_schema() -> dict[str, Any]:
    """Return the JSON Schema (draft 2020-12) of the whole config file."""
    schema = Config.model_json_schema(ref_template="#/$defs/{model}")
    defs: dict[str, Any] = schema.setdefault("$defs", {})
    props = schema["properties"]
    props["channels"] = {
        "type": "array",
        "description": "Customer-facing channels ([[channels]]), each by its `type`.",
        "items": _driver_entries(CHANNELS, defs),
    }
    props["adapters"] = {
        "type": "array",
        "description": "Agent tools ([[adapters]]), each by its `type`.",
        "items": _driver_entries(ADAPTERS, defs),
    }
    props.pop("source", None)  # set by the loader, not written in the file
    schema["$defs"] = dict(sorted(defs.items()))
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "Omnirouter configuration (omnirouter.toml)",
        **{k: v for k, v in schema.items() if k != "title"},
    }


def render() -> str:
    """Return the schema as committed: sorted keys, two-space indent, final newline."""
    return json.dumps(config_json_schema(), indent=2, ensure_ascii=False, sort_keys=True) + "\n"
