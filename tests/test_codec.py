"""router.codec: orjson's speed with the standard library's meaning for every value."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.codec import dumpb, dumps

_STD = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(values)
def test_any_json_value_reads_back_as_the_standard_library_writes_it(value: Any) -> None:
    expected = json.loads(_STD.encode(value))
    assert json.loads(dumps(value)) == expected
    assert json.loads(dumpb(value)) == expected


def test_text_is_compact_and_keeps_characters() -> None:
    assert dumps({"a": [1, "订单"], "b": None}) == '{"a":[1,"订单"],"b":null}'
    assert dumpb({"n": 2**65}) == b'{"n":36893488147419103232}'  # beyond orjson's 64 bits


def test_nan_is_kept_in_store_columns_and_refused_on_the_wire() -> None:
    assert math.isnan(json.loads(dumps({"x": float("nan")}))["x"])
    with pytest.raises(ValueError):
        dumpb({"x": float("inf")})
    with pytest.raises(TypeError):
        dumpb({"x": object()})
