"""JSON out: every JSON answer and `--json` output, with credit amounts written exactly; and
`document`, the hot path's JSON in.

`pricing.credits_json` gives an int or a float whenever `json.dumps` writes the exact decimal for
it, and a `Decimal` only when it would not (past 15 significant digits, or under 0.0001).
`json.dumps` has no hook for a number's own text and refuses a Decimal, so `dumps` tries it first,
in C as before (the chat path's 402 bodies take this way), and only on that refusal writes the
document itself, with the same text except that a Decimal is written as its digits.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from json.encoder import encode_basestring_ascii as _string
from typing import Any

from aiohttp import web

_BLANK = " \t\n\r"  # JSON's whitespace
Scanner = Callable[[str, int], tuple[Any, int]]


def scanner(decoder: json.JSONDecoder) -> Scanner:
    """The decoder's C scanner (`scan_once`, which the json module does not declare), for `document`."""
    scan: Scanner = decoder.scan_once  # type: ignore[attr-defined]
    return scan


def document(text: str, scan: Scanner) -> Any:
    """The one JSON value `text` holds, with whitespace around it, read by a decoder's scanner:
    `json.JSONDecoder.decode` without its two Python layers (the hot path reads two documents a
    request). ValueError if it holds none, or more."""
    start = len(text) - len(text.lstrip(_BLANK))
    try:
        value, end = scan(text, start)
    except StopIteration:
        raise ValueError("not a JSON document") from None
    if end != len(text) and text[end:].strip(_BLANK):
        raise ValueError("extra data after the JSON document")
    return value


# NaN and Infinity are not JSON; refuse them rather than answer what a client cannot parse.
_ENCODER = json.JSONEncoder(allow_nan=False)


def dumps(obj: Any, *, indent: int | None = None) -> str:
    """obj as JSON text (ASCII, ", " and ": ", or indent), a Decimal written as its exact digits."""
    try:
        if indent is None:
            return _ENCODER.encode(obj)
        return json.dumps(obj, allow_nan=False, indent=indent)
    except TypeError:
        pass  # a Decimal, or something no JSON can hold; _write tells them apart
    out: list[str] = []
    _write(obj, out, None if indent is None else "\n", " " * (indent or 0))
    return "".join(out)


def json_response(data: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """web.json_response, written by `dumps`."""
    return web.Response(text=dumps(data), status=status, headers=headers, content_type="application/json")


def _write(o: Any, out: list[str], newline: str | None, step: str) -> None:
    """Append o's JSON text; newline is None when compact, else the line break and current indent."""
    if isinstance(o, str):
        out.append(_string(o))
    elif isinstance(o, Decimal):
        if not o.is_finite():
            raise ValueError(f"{o!r} is not a JSON number")
        out.append(format(o, "f"))
    elif isinstance(o, dict):
        _object(o, out, newline, step)
    elif isinstance(o, list | tuple):
        _array(o, out, newline, step)
    elif o is None or isinstance(o, bool | int | float):
        out.append(_ENCODER.encode(o))
    else:
        raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def _object(o: dict[Any, Any], out: list[str], newline: str | None, step: str) -> None:
    if not o:
        out.append("{}")
        return
    inner = None if newline is None else newline + step
    before, separator = ("{", ", ") if inner is None else ("{" + inner, "," + inner)
    for key, value in o.items():
        if not isinstance(key, str):
            raise TypeError(f"keys must be str, not {type(key).__name__}")
        out.append(before + _string(key) + ": ")
        before = separator
        _write(value, out, inner, step)
    out.append("}" if newline is None else newline + "}")


def _array(o: list[Any] | tuple[Any, ...], out: list[str], newline: str | None, step: str) -> None:
    if not o:
        out.append("[]")
        return
    inner = None if newline is None else newline + step
    before, separator = ("[", ", ") if inner is None else ("[" + inner, "," + inner)
    for value in o:
        out.append(before)
        before = separator
        _write(value, out, inner, step)
    out.append("]" if newline is None else newline + "]")
