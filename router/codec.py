"""Compact JSON for what the daemon writes on every message: store columns and wire bodies.

orjson encodes these dicts about seven times faster than the standard library, and a
message is encoded several times on its way (its scores, signals and features, the
routing explanation, each outbox payload, the agent tool's body). The output is the
standard library's compact form with `ensure_ascii=False`, so stored rows and wire
bodies parse the same either way, and every value keeps the standard library's
meaning: orjson writes NaN and infinities as `null`, so output that holds a `null` is
encoded again by the standard library (which writes them as before, or refuses them
where asked), as is anything orjson refuses (an integer beyond 64 bits).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

# What the standard library does with these values: store columns accept NaN (Python
# reads its own `NaN` back); wire bodies refuse it, as strict parsers would.
_LENIENT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_STRICT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_OPTIONS = orjson.OPT_NON_STR_KEYS


def dumps(value: Any) -> str:
    """Return `value` as compact JSON text for a store column (NaN written as `NaN`)."""
    return _encode(value, _LENIENT).decode()


def dumpb(value: Any) -> bytes:
    """Return `value` as compact UTF-8 JSON bytes; ValueError for NaN or infinity."""
    return _encode(value, _STRICT)


def _encode(value: Any, fallback: json.JSONEncoder) -> bytes:
    """Encode with orjson; with `fallback` where orjson refuses or may have written NaN."""
    try:
        out = orjson.dumps(value, option=_OPTIONS)
    except orjson.JSONEncodeError:
        return fallback.encode(value).encode()
    return fallback.encode(value).encode() if b"null" in out else out
