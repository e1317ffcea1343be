"""`jsonout.document`, the hot path's JSON reader, against `json.loads` on any text."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gateway.jsonout import document, scanner

SCAN = scanner(json.JSONDecoder())
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)
blank = st.text(alphabet=" \t\n\r", max_size=3)


def _loads(text: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(text)
    except ValueError:
        return False, None


def _document(text: str) -> tuple[bool, Any]:
    try:
        return True, document(text, SCAN)
    except ValueError:
        return False, None


@given(values, blank, blank)
def test_a_json_document_reads_as_json_loads_reads_it(value: Any, before: str, after: str) -> None:
    text = before + json.dumps(value) + after
    assert _document(text) == _loads(text)


@given(st.text(alphabet='{}[]":,0123456789.eE-+ \t\nabcdefghijklmnopqrstuvwxyz\\', max_size=30))
def test_any_text_is_read_or_refused_as_json_loads_does(text: str) -> None:
    assert _document(text) == _loads(text)
