"""Validate encoded deliveries against the committed JSON Schema (router/schemas/)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "router" / "schemas" / "delivery.schema.json"


@cache
def _validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def validate_delivery(body: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError unless body is a valid omnirouter.delivery/1."""
    _validator().validate(body)
